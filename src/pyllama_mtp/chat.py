"""The application layer: chat and completion on the MTP engine.

:class:`LLM` holds a model and a speculative decoder. ``chat()`` renders the
conversation with the model's own template (llama.cpp's), generates with MTP under the
request's sampling and constraints (JSON schema, grammar, tool calls), stops at the
template's end markers and the caller's stop strings, and parses the answer with the
template's own parser. Greedy output is plain greedy decoding's, token for token.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from ._resource import Resource
from .answer import (ChatDelta, ChatOutput, ChatResponse, Completion, Prompt, Sampling, Stop, Usage,
                     check_chat_template, prepare_chat, prepare_completion, token_budget)
from .chat_template import RenderedChat
from .grammar import GrammarLike
from .model import Model
from .session import Session
from .slots import SpeculativeSlots
from .speculative import SpeculativeDecoder

__all__ = ["LLM", "Usage", "Completion", "ChatResponse", "ChatDelta"]


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
        check_chat_template(model)
        self.decoder = SpeculativeDecoder.create(model, n_ctx=n_ctx, n_draft=n_draft, adaptive=adaptive,
                                                 n_threads=n_threads, n_batch=n_batch, flash_attn=flash_attn)
        self._owned_model: Optional[Model] = None
        # One slot: a conversation's next turn decodes only what it adds.
        self._slots = SpeculativeSlots(self.decoder)
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
        self._slots.close()
        self.decoder.close()
        if self._owned_model is not None:
            self._owned_model.close()

    # -- public calls -----------------------------------------------------------------
    def complete(self, prompt: str, *, stop: Stop = None, max_tokens: Optional[int] = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int = 0, grammar: GrammarLike = None, json_schema: Optional[Any] = None,
                 stream: bool = False) -> Union[Completion, Iterator[str]]:
        """Continue ``prompt`` (raw text, no template). Streaming yields text pieces."""
        prepared = prepare_completion(self.model, prompt, stop=stop, grammar=grammar, json_schema=json_schema)
        run = _Run(self, prepared, max_tokens, Sampling(temperature, top_k, top_p, min_p, seed))
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
        prepared = prepare_chat(self.model, messages, tools=tools, tool_choice=tool_choice,
                                response_format=response_format, grammar=grammar, stop=stop,
                                enable_thinking=enable_thinking, **template_kwargs)
        run = _Run(self, prepared, max_tokens, Sampling(temperature, top_k, top_p, min_p, seed))
        deltas = _chat_deltas(run, prepared.rendered)
        if stream:
            return deltas
        last = ChatDelta()
        for last in deltas:
            pass
        assert last.message is not None and last.finish_reason is not None and last.usage is not None
        return ChatResponse(last.message, last.finish_reason, last.usage)


class _Run:
    """One generation on the LLM's only slot: a session driven inline."""

    def __init__(self, llm: LLM, prompt: Prompt, max_tokens: Optional[int], sampling: Sampling) -> None:
        self.llm = llm
        budget = token_budget(prompt, llm.decoder.target.n_ctx, max_tokens)
        self.session = Session(llm.model, prompt, budget, sampling)

    @property
    def finish_reason(self) -> str:
        return self.session.finish_reason

    @property
    def usage(self) -> Usage:
        return self.session.usage

    def pieces(self) -> Iterator[str]:
        slots, session = self.llm._slots, self.session
        slots.start(0, session)
        try:
            while not session.done:
                produced, drafted, failed = slots.step([session])
                if failed:
                    raise failed[0]
                piece = session.push(produced[0], drafted[0])
                if piece:
                    yield piece
            tail = session.close()
            if tail:
                yield tail
        finally:
            slots.finish(0)


def _chat_deltas(run: _Run, rendered: Optional[RenderedChat]) -> Iterator[ChatDelta]:
    """Stream a chat answer: parse the text so far (partially) and emit what each field grew by."""
    assert rendered is not None
    chat = ChatOutput(rendered)
    for piece in run.pieces():
        delta = chat.push(piece)
        if delta is not None:
            yield delta
    yield chat.finish(run.finish_reason, run.usage)
