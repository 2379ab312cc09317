"""Plain (non-speculative) generation: llama.cpp's sampler chain, streamed token by token."""

from __future__ import annotations

import codecs
import threading
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Union

from . import _lowlevel, _sandbox
from ._args import int_arg, number_arg
from ._resource import Resource, native_handle
from .errors import ClosedError, InvalidArgumentError
from .grammar import GrammarLike, as_grammar

# Binding a sampler to its model happens once; two threads sharing a new sampler must not
# both make a native one.
_BIND_LOCK = threading.Lock()

if TYPE_CHECKING:  # annotations only: Context imports this module
    from .context import Context
    from .model import Model


def check_sampling(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    """Raise InvalidArgumentError for sampling settings llama.cpp's chain cannot take."""
    number_arg("temperature", temperature, 0.0, float("inf"), high_open=True)
    int_arg("top_k", top_k, 0)
    number_arg("top_p", top_p, 0.0, 1.0, low_open=True)
    number_arg("min_p", min_p, 0.0, 1.0, high_open=True)


class Sampler(Resource):
    """llama.cpp's sampler (common_sampler). ``temperature <= 0`` is greedy (argmax).

    Otherwise: top-k, top-p, min-p (each skipped at its neutral value), temperature,
    then a draw seeded by ``seed``, so a run is reproducible. ``grammar`` (GBNF text or a
    :class:`~pyllama_mtp.Grammar`) constrains every choice. The speculative decoder
    draws from this same implementation, so both produce the same distribution.
    A sampler serves the first model it is used with.
    """

    def __init__(self, temperature: float = 0.0, *, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int = 0, grammar: GrammarLike = None) -> None:
        check_sampling(temperature, top_k, top_p, min_p)
        self.temperature = float(temperature)
        self.top_k, self.top_p, self.min_p, self.seed = int(top_k), float(top_p), float(min_p), int(seed)
        self.grammar = as_grammar(grammar)
        self._model: Optional["Model"] = None
        self._bound: Optional[_lowlevel.NativeSampler] = None
        self._mark_open()

    @classmethod
    def greedy(cls) -> "Sampler":
        return cls(0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    def native_for(self, model: "Model", *, exact_match: bool = False,
                   seed: Optional[int] = None) -> _lowlevel.NativeSampler:
        """A new native sampler with these settings (``seed`` replacing this one's, if given)
        for ``model``; the caller owns it."""
        constraint = self.grammar.constraint() if self.grammar else None
        if constraint is not None:
            _sandbox.check_grammar(model.path, constraint)  # a grammar that kills llama.cpp kills the child
        return _lowlevel.NativeSampler(
            native_handle(model), temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, seed=self.seed if seed is None else seed, exact_match=exact_match,
            constraint=constraint)

    def _native_sampler(self, model: "Model") -> _lowlevel.NativeSampler:
        if self.closed:
            raise ClosedError("this sampler is closed")
        with _BIND_LOCK:
            if self._bound is None:
                self._bound, self._model = self.native_for(model), model
        if self._model is not model:
            raise InvalidArgumentError("this sampler serves another model; make one per model")
        return self._bound

    def sample(self, context: "Context", index: int = -1) -> int:
        """Choose a token from output ``index`` of the context's last batch."""
        return context.sample(self, index)

    def reset(self) -> None:
        """Back to the start: grammar state and random stream."""
        if self._bound is not None:
            self._bound.reset()

    def _release(self) -> None:
        if self._bound is not None:
            self._bound.free()


def generate(context: "Context", prompt: Union[str, Iterable[int]], *, max_tokens: int = 128,
             sampler: Optional[Sampler] = None, seq_id: int = 0,
             stop_at_eog: bool = True, timeout: Optional[float] = None) -> Iterator[int]:
    """Evaluate ``prompt`` on sequence ``seq_id``, then yield up to ``max_tokens`` new tokens.

    The prompt continues whatever the sequence already holds. Long prompts are fed in
    chunks of ``n_batch``. With no sampler, decoding is greedy. ``timeout`` (seconds)
    bounds the whole generation: past it, :class:`DecodeTimeoutError` is raised and every
    token yielded so far is in the context.
    """
    max_tokens = int_arg("max_tokens", max_tokens, 0)
    model = context.model
    tokens = model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    if not tokens:
        raise InvalidArgumentError("the prompt is empty")
    model.check_tokens(tokens)
    own_sampler = sampler is None
    sampler = Sampler.greedy() if own_sampler else sampler
    try:
        with context.time_limit(timeout):
            # Each decode and the sampling of its output happen under the context's lock, so
            # generators on different sequences of one shared context interleave safely.
            # Every yielded token is decoded before returning: the sequence can be continued.
            with context.lock:
                for start in range(0, len(tokens), context.n_batch):
                    context.decode(tokens[start:start + context.n_batch], seq_id=seq_id)
                token = context.sample(sampler) if max_tokens > 0 else None
            for produced in range(max_tokens):
                if stop_at_eog and model.is_eog(token):
                    return
                yield token
                with context.lock:
                    context.decode([token], seq_id=seq_id)
                    if produced + 1 < max_tokens:
                        token = context.sample(sampler)
    finally:
        if own_sampler:
            sampler.close()


class TextStream:
    """Turns a stream of token ids into text, holding back incomplete UTF-8 characters."""

    def __init__(self, model: "Model", *, special: Iterable[int] = ()) -> None:
        self._model = model
        self._special = frozenset(special)  # control tokens to render as their text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._model.token_to_piece(token, special=token in self._special))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def stream_text(model: "Model", tokens: Iterable[int]) -> Iterator[str]:
    """Yield text pieces for a token stream (e.g. from :func:`generate`)."""
    stream = TextStream(model)
    for token in tokens:
        piece = stream.push(token)
        if piece:
            yield piece
    tail = stream.flush()
    if tail:
        yield tail
