"""One answer, request to text: what :class:`~pyllama_mtp.LLM` (one sequence) and the
server (many sequences, one engine thread) share.

A request becomes a :class:`Prompt` (tokens, stop strings, constraint, the rendered chat
for parsing); generated tokens go into a :class:`TokenOutput` one at a time and come out
as text with stops and limits applied; a chat answer's text goes into a
:class:`ChatOutput`, which streams content and reasoning apart and parses the end with
the template's own parser. Nothing here decodes: whoever owns the decoder pushes tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from .chat_template import RenderedChat, parse_chat_output
from .errors import InvalidArgumentError, LlamaError, ModelLoadError
from .generation import TextStream, check_sampling
from .grammar import Grammar, GrammarLike, as_grammar
from .stops import StopMatcher

__all__ = ["Usage", "Completion", "ChatResponse", "ChatDelta", "Prompt", "prepare_chat", "prepare_completion",
           "TokenOutput", "ChatOutput", "Sampling"]

Stop = Union[str, Sequence[str], None]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    #: prompt tokens the sequence already held from the previous call (not decoded again)
    prompt_tokens_reused: int
    #: MTP draft tokens proposed and accepted while generating this answer
    drafted_tokens: int
    accepted_tokens: int

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    usage: Usage


@dataclass(frozen=True)
class ChatResponse:
    #: {"role": "assistant", "content", "reasoning_content", "tool_calls"}
    message: dict[str, Any]
    finish_reason: str  # "stop", "length" or "tool_calls"
    usage: Usage


@dataclass(frozen=True)
class ChatDelta:
    """One streamed piece: new answer text and new reasoning text kept apart. The last
    delta carries ``finish_reason``, the whole parsed ``message`` and ``usage``."""

    content: str = ""
    reasoning_content: str = ""
    finish_reason: Optional[str] = None
    message: Optional[dict[str, Any]] = None
    usage: Optional[Usage] = None


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings (checked on creation); temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise InvalidArgumentError(f"seed must be an int in [0, 2**32), got {self.seed!r}")

    def as_kwargs(self) -> dict[str, Any]:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    seed=self.seed)


@dataclass(frozen=True)
class Prompt:
    """A request made ready to decode."""

    tokens: list[int]
    stops: tuple[str, ...]
    grammar: Optional[Grammar]
    #: control tokens the answer shows as text (the template's tool-call markers)
    special: tuple[int, ...] = ()
    #: the chat as rendered (None for a raw completion): parses the answer
    rendered: Optional[RenderedChat] = None
    #: where a slot should checkpoint a hybrid model's state besides the prompt's end: the
    #: start of the generation prompt, where the next turn's rendering of this one begins
    checkpoint_at: tuple[int, ...] = ()


def _stop_list(stop: Stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise InvalidArgumentError("stop must be a string or a list of strings")
    return stops


def _schema_of(response_format: Optional[Mapping[str, Any]]) -> Optional[Any]:
    """The JSON schema an OpenAI ``response_format`` asks for (None: free text)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return response_format.get("schema") or {"type": "object"}
    if kind == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema") or {"type": "object"}
    raise InvalidArgumentError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def check_chat_template(model: Any) -> None:
    """ModelLoadError at load time, not at the first chat request, for a model whose chat
    template cannot render a one-message conversation (it loops, recurses or fails)."""
    try:
        model.chat_template.check()
    except LlamaError as error:
        raise ModelLoadError(f"{model.path}: the model's chat template cannot be used: {error}") from None


def prepare_chat(model: Any, messages: Sequence[Mapping[str, Any]], *,
                 tools: Optional[Sequence[Mapping[str, Any]]] = None, tool_choice: Optional[str] = None,
                 response_format: Optional[Mapping[str, Any]] = None, grammar: Optional[str] = None,
                 stop: Stop = None, enable_thinking: Optional[bool] = None, **template_kwargs: Any) -> Prompt:
    """Render a conversation (OpenAI message and tool shapes) with the model's template."""
    options = dict(tools=tools, tool_choice=tool_choice, enable_thinking=enable_thinking,
                   json_schema=_schema_of(response_format), grammar=grammar, **template_kwargs)
    rendered = model.chat_template.render(messages, **options)
    tokens = model.tokenize(rendered.prompt, add_special=True, parse_special=True)
    checkpoint_at = _history_end(model, messages, options, rendered.prompt, tokens) if model.is_hybrid or \
        model.is_recurrent else ()
    special = [ids[0] for ids in (model.tokenize(text, add_special=False, parse_special=True)
                                  for text in rendered.preserved_tokens) if len(ids) == 1]
    # A user's grammar applies as given where the template made no grammar of its own
    # (as in llama-server).
    constraint = rendered.grammar or as_grammar(grammar)
    return Prompt(tokens, tuple(rendered.stops) + tuple(_stop_list(stop)), constraint, tuple(special), rendered,
                  checkpoint_at)


def _history_end(model: Any, messages: Sequence[Mapping[str, Any]], options: dict, prompt: str,
                 tokens: list[int]) -> tuple[int, ...]:
    """Tokens of the conversation before its generation prompt (which templates such as
    Qwen3.5's render unlike the same turn in the next request's history); () if the
    template's output without it is no prefix of the prompt."""
    try:
        history = model.chat_template.render(messages, add_generation_prompt=False, **options).prompt
    except LlamaError:
        return ()
    if not prompt.startswith(history) or len(history) == len(prompt):
        return ()
    before = model.tokenize(history, add_special=True, parse_special=True)
    # Its last token may merge with the generation prompt's first: stop before it.
    n = len(before) - 1
    return (n,) if 1 < n < len(tokens) and tokens[:n] == before[:n] else ()


def prepare_completion(model: Any, prompt: str, *, stop: Stop = None, grammar: GrammarLike = None,
                       json_schema: Optional[Any] = None) -> Prompt:
    """Raw text to continue (no template)."""
    if grammar is not None and json_schema is not None:
        raise InvalidArgumentError("give a grammar or a JSON schema, not both")
    constraint = Grammar.from_json_schema(json_schema) if json_schema is not None else as_grammar(grammar)
    tokens = model.tokenize(prompt, add_special=True, parse_special=True)
    return Prompt(tokens, tuple(_stop_list(stop)), constraint)


def token_budget(prompt: Prompt, n_ctx: int, max_tokens: Optional[int]) -> int:
    """How many tokens an answer may have: ``max_tokens``, within what the context leaves."""
    if not prompt.tokens:
        raise InvalidArgumentError("the prompt is empty")
    room = n_ctx - len(prompt.tokens)
    if room <= 1:
        raise InvalidArgumentError(f"the prompt ({len(prompt.tokens)} tokens) does not fit the context ({n_ctx})")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 0):
        raise InvalidArgumentError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
    return room - 1 if max_tokens is None else min(max_tokens, room - 1)


class TokenOutput:
    """Generated tokens in, text out: end of generation, stop strings and the token
    budget applied. ``finish_reason`` is "stop" or "length" once ``done``."""

    def __init__(self, model: Any, prompt: Prompt, max_tokens: int) -> None:
        self._model = model
        self._text = TextStream(model, special=prompt.special)
        self._stops = StopMatcher(prompt.stops)
        self.max_tokens = max_tokens
        self.produced = 0
        self.finish_reason: Optional[str] = None if max_tokens > 0 else "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        """One generated token; the text that may be shown now."""
        if self.done:
            return ""
        if self._model.is_eog(token):
            self.finish_reason = "stop"
            return ""
        self.produced += 1
        piece = self._stops.push(self._text.push(token))
        if self._stops.stopped:
            self.finish_reason = "stop"
        elif self.produced >= self.max_tokens:
            self.finish_reason = "length"
        return piece

    def close(self) -> str:
        """The end of the answer: text held back that turned out to be no stop string."""
        if self.finish_reason is None:
            self.finish_reason = "stop"  # stopped from outside (a cancelled request)
        return self._stops.push(self._text.flush()) + self._stops.flush()


def _grown(before: str, after: Optional[str]) -> tuple[str, str]:
    """(what a field grew by, its new value); a field the parser rewrote rather than
    extended emits nothing and keeps its old value."""
    after = after or ""
    return (after[len(before):], after) if after.startswith(before) else ("", before)


class ChatOutput:
    """A chat answer's text in, :class:`ChatDelta` out: parsed (partially) after each
    piece, each field emitting what it grew by; :meth:`finish` parses the whole answer."""

    def __init__(self, rendered: RenderedChat) -> None:
        self._rendered = rendered
        self.text = ""
        self._content = ""
        self._reasoning = ""

    def push(self, piece: str) -> Optional[ChatDelta]:
        self.text += piece
        try:
            partial = parse_chat_output(self.text, self._rendered, partial=True)
        except LlamaError:
            return None  # not readable yet: the next piece may complete it
        delta_c, self._content = _grown(self._content, partial["content"])
        delta_r, self._reasoning = _grown(self._reasoning, partial["reasoning_content"])
        return ChatDelta(content=delta_c, reasoning_content=delta_r) if delta_c or delta_r else None

    def finish(self, finish_reason: str, usage: Usage) -> ChatDelta:
        try:
            message = parse_chat_output(self.text, self._rendered)
        except LlamaError as error:  # output the family's parser cannot read: keep it as text
            logger.warning("chat output kept as plain content: %s", error)
            message = {"role": "assistant", "content": self.text, "reasoning_content": None, "tool_calls": []}
        finish = "tool_calls" if message["tool_calls"] else finish_reason
        return ChatDelta(content=_grown(self._content, message["content"])[0],
                         reasoning_content=_grown(self._reasoning, message["reasoning_content"])[0],
                         finish_reason=finish, message=message, usage=usage)
