"""Chat templates as llama.cpp renders them (``llama-server --jinja``): its own Jinja
engine and per-family output parsers, reached through the shim (``csrc/chat.cpp``).
Templates are loaded and rendered in the text sandbox (``_sandbox``), a child process,
so a template that loops, recurses or grows without end costs a clean error.

Nothing here renders or parses in Python: upstream keeps each model family's template
quirks and tool-call formats current, and the binding follows its pin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from . import _lowlevel, _sandbox
from ._resource import Resource
from .errors import ClosedError, InvalidArgumentError
from .grammar import Grammar

__all__ = ["ChatTemplate", "RenderedChat"]

Message = Mapping[str, Any]


@dataclass(frozen=True)
class RenderedChat:
    """A chat request rendered by a template: what generation needs and how to read it."""

    prompt: str
    #: the template's own end markers, to stop on besides the model's end tokens
    stops: tuple[str, ...]
    #: output constraint from a JSON schema or tool calls (None: free text)
    grammar: Optional[Grammar]
    #: text the template already put at the start of the answer (e.g. "<think>\n")
    generation_prompt: str
    #: tokens the output parser needs to see as text (e.g. "<tool_call>")
    preserved_tokens: tuple[str, ...]
    #: llama.cpp's name of the output format (e.g. "peg-native")
    format_name: str
    _parser_state: dict[str, Any] = field(repr=False, default_factory=dict)


class ChatTemplate(Resource):
    """One chat template: Jinja ``source``, or a model's own (:attr:`Model.chat_template`).

    With a ``model`` the template sees that model's BOS and EOS text, as llama-server's
    ``--chat-template-file`` does; the template does not keep the model.
    """

    def __init__(self, source: Optional[str] = None, *, model: Any = None) -> None:
        if model is None and not source:
            raise InvalidArgumentError("a chat template needs its Jinja source (or use model.chat_template)")
        if source is not None and not isinstance(source, str):
            raise InvalidArgumentError(f"a chat template's source is text, got {type(source).__name__}")
        # Loaded and rendered in the text sandbox only (see _sandbox): a template is code,
        # and one that loops or recurses must not take this process with it. The sandbox
        # reads the model's vocabulary from its file for the BOS and EOS text.
        self._model_path: Optional[str] = model.path if model is not None else None
        self._source = source or None
        info = self._call("template_info", "loading the chat template")
        self.source: str = info["source"]
        self.tool_use_source: Optional[str] = info["tool_use_source"]
        self.supports_thinking: bool = bool(info["supports_thinking"])
        self.caps: dict[str, bool] = dict(info["caps"])
        self._mark_open()

    def _call(self, op: str, what: str, **args: Any) -> Any:
        return _sandbox.run(op, what, model=self._model_path, source=self._source, **args)

    def _release(self) -> None:
        pass  # nothing native is held in this process

    def render(self, messages: Sequence[Message], *, tools: Optional[Sequence[Mapping[str, Any]]] = None,
               tool_choice: Optional[str] = None, add_generation_prompt: bool = True,
               enable_thinking: Optional[bool] = None, json_schema: Optional[Any] = None,
               grammar: Optional[str] = None, parallel_tool_calls: Optional[bool] = None,
               reasoning_format: str = "deepseek", **template_kwargs: Any) -> RenderedChat:
        """Render an OpenAI-style conversation into a prompt, as llama-server does.

        ``enable_thinking`` None keeps the template's default (thinking on where it can
        be turned off); extra keyword arguments reach the template as variables
        (``chat_template_kwargs``).
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise InvalidArgumentError("messages must be a list of {'role', 'content'} dicts")
        request: dict[str, Any] = {"messages": [dict(m) for m in messages],
                                   "add_generation_prompt": bool(add_generation_prompt),
                                   "reasoning_format": reasoning_format}
        if tools:
            request["tools"] = [dict(t) for t in tools]
        if tool_choice is not None:
            request["tool_choice"] = tool_choice
        if enable_thinking is not None:
            request["enable_thinking"] = bool(enable_thinking)
        if json_schema is not None:
            request["json_schema"] = json_schema
        if grammar is not None:
            request["grammar"] = grammar
        if parallel_tool_calls is not None:
            request["parallel_tool_calls"] = bool(parallel_tool_calls)
        if template_kwargs:
            request["chat_template_kwargs"] = template_kwargs
        if self.closed:
            raise ClosedError("this chat template is closed")
        out = self._call("render", "rendering the chat template", request=request)
        parser_state = {key: out[key] for key in ("format", "generation_prompt", "parser", "reasoning_format",
                                                  "parse_tool_calls")}
        return RenderedChat(prompt=out["prompt"], stops=tuple(out["additional_stops"]),
                            grammar=Grammar.from_chat(out), generation_prompt=out["generation_prompt"],
                            preserved_tokens=tuple(out["preserved_tokens"]), format_name=out["format_name"],
                            _parser_state=parser_state)

    def check(self) -> None:
        """Render a one-message conversation: an error now, rather than at the first
        request, for a template that cannot render at all (it loops, recurses, fails)."""
        self.render([{"role": "user", "content": "Hello"}])

    def apply(self, messages: Sequence[Message], **kwargs: Any) -> str:
        """The prompt alone (see :meth:`render` for the arguments)."""
        return self.render(messages, **kwargs).prompt


def parse_chat_output(text: str, rendered: RenderedChat, *, partial: bool = False) -> dict[str, Any]:
    """Generated text -> an OpenAI message ``{role, content, reasoning_content, tool_calls}``,
    read by the parser of the template that rendered the request. ``partial``: the text
    may stop mid-way (streaming)."""
    message = _lowlevel.chat_parse(text, partial, rendered._parser_state)
    message.setdefault("content", None)
    message.setdefault("reasoning_content", None)
    message.setdefault("tool_calls", [])
    return message
