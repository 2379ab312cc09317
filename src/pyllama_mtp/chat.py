"""The application layer: chat and completion on the MTP engine.

:class:`LLM` holds a model and a speculative decoder. ``chat()`` renders the
conversation with the model's own template (llama.cpp's), generates with MTP under the
request's sampling and constraints (JSON schema, grammar, tool calls), stops at the
template's end markers and the caller's stop strings, and parses the answer with the
template's own parser. Greedy output is plain greedy decoding's, token for token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from ._resource import Resource
from .chat_template import RenderedChat, parse_chat_output
from .errors import InvalidArgumentError, LlamaError, StateError
from .generation import TextStream, check_sampling
from .grammar import Grammar, GrammarLike, as_grammar
from .model import Model
from .speculative import SpeculativeDecoder
from .stops import StopMatcher

__all__ = ["LLM", "Usage", "Completion", "ChatResponse", "ChatDelta"]

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


class LLM(Resource):
    """A chat model with MTP speculative decoding, for applications.

    Args:
        model: a loaded :class:`Model` with MTP layers (see :meth:`load` to open one).
        n_ctx: context length. n_draft: MTP draft length (1..16). adaptive: pick the
            draft length per step from measured acceptance and cost. The rest: see
            :meth:`SpeculativeDecoder.create`.
    """

    def __init__(self, model: Model, *, n_ctx: int = 4096, n_draft: int = 3, adaptive: bool = False,
                 n_threads: Optional[int] = None, n_batch: int = 512, flash_attn: Optional[bool] = None) -> None:
        self.model = model
        self.decoder = SpeculativeDecoder.create(model, n_ctx=n_ctx, n_draft=n_draft, adaptive=adaptive,
                                                 n_threads=n_threads, n_batch=n_batch, flash_attn=flash_attn)
        self._owned_model: Optional[Model] = None
        self._held: list[int] = []  # tokens sequence 0 holds (its pending token last)
        self._mark_open()

    @classmethod
    def load(cls, path: str, *, n_gpu_layers: int = -1, **kwargs: Any) -> "LLM":
        """Open a GGUF and make an LLM that owns it."""
        model = Model.load(path, n_gpu_layers=n_gpu_layers)
        try:
            llm = cls(model, **kwargs)
        except BaseException:
            model.close()
            raise
        llm._owned_model = model
        return llm

    def _release(self) -> None:
        self.decoder.close()
        if self._owned_model is not None:
            self._owned_model.close()

    # -- public calls -----------------------------------------------------------------
    def complete(self, prompt: str, *, stop: Stop = None, max_tokens: Optional[int] = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int = 0, grammar: GrammarLike = None, json_schema: Optional[Any] = None,
                 stream: bool = False) -> Union[Completion, Iterator[str]]:
        """Continue ``prompt`` (raw text, no template). Streaming yields text pieces."""
        if grammar is not None and json_schema is not None:
            raise InvalidArgumentError("give a grammar or a JSON schema, not both")
        constraint = Grammar.from_json_schema(json_schema) if json_schema is not None else as_grammar(grammar)
        tokens = self.model.tokenize(prompt, add_special=True, parse_special=True)
        run = _Run(self, tokens, _stop_list(stop), max_tokens, constraint, special=(),
                   sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed))
        if stream:
            return run.pieces()
        text = "".join(run.pieces())
        return Completion(text, run.finish_reason, run.usage)

    def chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Optional[Sequence[Mapping[str, Any]]] = None,
             tool_choice: Optional[str] = None, response_format: Optional[Mapping[str, Any]] = None,
             grammar: Optional[str] = None, stop: Stop = None, max_tokens: Optional[int] = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
             enable_thinking: Optional[bool] = None, stream: bool = False,
             **template_kwargs: Any) -> Union[ChatResponse, Iterator[ChatDelta]]:
        """Answer a conversation (OpenAI message and tool shapes) with the model's template."""
        rendered = self.model.chat_template.render(
            messages, tools=tools, tool_choice=tool_choice, enable_thinking=enable_thinking,
            json_schema=_schema_of(response_format), grammar=grammar, **template_kwargs)
        tokens = self.model.tokenize(rendered.prompt, add_special=True, parse_special=True)
        special = [ids[0] for ids in (self.model.tokenize(text, add_special=False, parse_special=True)
                                      for text in rendered.preserved_tokens) if len(ids) == 1]
        # A user's grammar applies as given where the template made no grammar of its own
        # (as in llama-server).
        constraint = rendered.grammar or as_grammar(grammar)
        run = _Run(self, tokens, list(rendered.stops) + _stop_list(stop), max_tokens, constraint,
                   special=special,
                   sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed))
        deltas = _chat_deltas(run, rendered)
        if stream:
            return deltas
        last = ChatDelta()
        for last in deltas:
            pass
        assert last.message is not None and last.finish_reason is not None and last.usage is not None
        return ChatResponse(last.message, last.finish_reason, last.usage)

    # -- the engine -------------------------------------------------------------------
    def _start(self, tokens: list[int]) -> int:
        """Put ``tokens`` in sequence 0, decoding only what it does not hold yet; returns how
        many prompt tokens were reused."""
        held, keep = self._held, 0
        limit = min(len(held), len(tokens) - 1)  # at least one new token to decode
        while keep < limit and held[keep] == tokens[keep]:
            keep += 1
        if keep < len(held) and keep >= 2:
            try:
                self.decoder.truncate(keep)
            except StateError:  # recurrent state cannot go back that far: start over
                keep = 0
        elif keep < len(held):
            keep = 0
        if keep == 0:
            self.decoder.reset()
        self._held = []
        self.decoder.prefill(tokens[keep:])
        self._held = list(tokens)
        return keep


class _Run:
    """One generation on sequence 0: tokens in, text pieces out, stops and limits applied."""

    def __init__(self, llm: LLM, tokens: list[int], stops: list[str], max_tokens: Optional[int],
                 grammar: Optional[Grammar], special: Sequence[int], sampling: dict[str, Any]) -> None:
        if not tokens:
            raise InvalidArgumentError("the prompt is empty")
        room = llm.decoder.target.n_ctx - len(tokens)
        if room <= 0:
            raise InvalidArgumentError(f"the prompt ({len(tokens)} tokens) does not fit the context "
                                       f"({llm.decoder.target.n_ctx})")
        check_sampling(sampling["temperature"], sampling["top_k"], sampling["top_p"], sampling["min_p"])
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 0):
            raise InvalidArgumentError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
        self.llm, self.tokens, self.grammar, self.sampling = llm, tokens, grammar, sampling
        self.max_tokens = room - 1 if max_tokens is None else min(max_tokens, room - 1)
        self.stops = StopMatcher(stops)
        self.special = special
        self.finish_reason = "length"
        self.usage = Usage(len(tokens), 0, 0, 0, 0)

    def pieces(self) -> Iterator[str]:
        llm, model = self.llm, self.llm.model
        decoder = llm.decoder
        decoder.set_sampling(grammar=self.grammar, seq_id=0, **self.sampling)
        before = decoder.stats
        reused = llm._start(self.tokens)
        text = TextStream(model, special=self.special)
        produced = 0
        try:
            while produced < self.max_tokens and not self.stops.stopped:
                for token in decoder.step()[0]:
                    llm._held.append(token)
                    if model.is_eog(token):
                        self.finish_reason = "stop"
                        break
                    produced += 1
                    piece = self.stops.push(text.push(token))
                    if piece:
                        yield piece
                    if self.stops.stopped:
                        self.finish_reason = "stop"
                        break
                    if produced >= self.max_tokens:
                        break
                if self.finish_reason == "stop":
                    break
            tail = self.stops.push(text.flush()) + self.stops.flush()
            if tail:
                yield tail
        finally:
            after = decoder.stats
            self.usage = Usage(len(self.tokens), produced, reused, after.drafted - before.drafted,
                               after.accepted - before.accepted)


def _grown(before: str, after: Optional[str]) -> tuple[str, str]:
    """(what a field grew by, its new value); a field the parser rewrote rather than
    extended emits nothing and keeps its old value."""
    after = after or ""
    return (after[len(before):], after) if after.startswith(before) else ("", before)


def _chat_deltas(run: _Run, rendered: RenderedChat) -> Iterator[ChatDelta]:
    """Stream a chat answer: parse the text so far (partially) and emit what each field grew by."""
    text, content, reasoning = "", "", ""
    for piece in run.pieces():
        text += piece
        try:
            partial = parse_chat_output(text, rendered, partial=True)
        except LlamaError:
            continue  # not readable yet: the next piece may complete it
        delta_c, content = _grown(content, partial["content"])
        delta_r, reasoning = _grown(reasoning, partial["reasoning_content"])
        if delta_c or delta_r:
            yield ChatDelta(content=delta_c, reasoning_content=delta_r)
    try:
        message = parse_chat_output(text, rendered)
    except LlamaError as error:  # output the family's parser cannot read: keep it as text
        logger.warning("chat output kept as plain content: %s", error)
        message = {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": []}
    finish = "tool_calls" if message["tool_calls"] else run.finish_reason
    yield ChatDelta(content=_grown(content, message["content"])[0],
                    reasoning_content=_grown(reasoning, message["reasoning_content"])[0],
                    finish_reason=finish, message=message, usage=run.usage)
