"""What every benchmark here measures the same way (imported by the scripts beside it).

One generation, timed as a user sees it: time to first token (TTFT: the prompt's
evaluation, the drafter's catch-up over it and, with MTP, the first step) and the decode
rate after it, which excludes prompt evaluation on both sides of every comparison.
Repetitions are interleaved (A B A B ...), and a ratio is the median of the per-repetition
ratios, reported with its spread (lowest, highest).
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

from pyllama_mtp import SpeculativeDecoder, quantize


def log(*parts: object) -> None:
    """Progress on stderr (stdout carries the tables)."""
    print(*parts, file=sys.stderr, flush=True)


def quantized(source: pathlib.Path, ftype: str) -> pathlib.Path:
    """``source`` itself for f32, else its ``ftype`` copy beside it, made once with
    llama.cpp's quantizer (all cores) and reused."""
    if ftype == "f32":
        return source
    target = source.with_name(f"{source.stem}-{ftype}.gguf")
    if not target.exists():
        log(f"quantizing {source.name} to {ftype} with llama.cpp's quantizer ...")
        partial = target.with_suffix(".part")
        quantize(source, partial, ftype, n_threads=os.cpu_count() or 1)
        partial.replace(target)
    return target


def write_json(path: pathlib.Path, args: Any, **data: Any) -> None:
    """One result file: the run's arguments and its data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **data}, indent=1))


def timed_stream(stream: Iterable[int], n_tokens: int) -> dict:
    """Drain a token stream: TTFT, decode tokens/s after the first token, the tokens."""
    start = time.perf_counter()
    tokens: list[int] = []
    first_at = None
    for token in stream:
        tokens.append(token)
        if first_at is None:
            first_at = time.perf_counter()
        if len(tokens) >= n_tokens:
            break
    end = time.perf_counter()
    if first_at is None:
        raise RuntimeError("the model produced no token")
    decode_s = end - first_at
    return {"ttft_s": first_at - start, "tps": (len(tokens) - 1) / decode_s if decode_s > 0 else float("nan"),
            "tokens": tokens}


def plain(model, prompt: Sequence[int], n_tokens: int, *, threads: int, n_ctx: int = 2048) -> dict:
    """Plain greedy decoding through Context.generate."""
    with model.context(n_ctx=n_ctx, n_batch=min(n_ctx, 2048), n_threads=threads) as ctx:
        return timed_stream(ctx.generate(list(prompt), max_tokens=n_tokens, stop_at_eog=False), n_tokens)


def speculative(model, prompt: Sequence[int], n_tokens: int, *, threads: int, n_ctx: int = 2048,
                **settings) -> dict:
    """Greedy MTP decoding through SpeculativeDecoder.generate (``settings``: n_draft,
    adaptive, ...), with the step statistics."""
    with SpeculativeDecoder.create(model, n_ctx=n_ctx, n_batch=min(n_ctx, 2048), n_threads=threads,
                                   **settings) as decoder:
        result = timed_stream(decoder.generate(list(prompt), max_tokens=n_tokens, stop_at_eog=False), n_tokens)
        stats = decoder.stats
        result.update(acceptance=stats.acceptance, mean_accepted_length=stats.mean_accepted_length,
                      drafted=stats.drafted, steps=stats.steps, acceptance_at=stats.acceptance_at,
                      python_us_per_step=1e6 * stats.python_s / max(1, stats.steps),
                      python_fraction=stats.python_s / stats.wall_s if stats.wall_s else 0.0)
    return result


def interleaved(methods: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Run every method once per repetition, in an order rotated each time, so drift of
    the machine and the position in the cycle hit all methods alike."""
    names = list(methods)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            result = methods[name]()
            samples[name].append(result)
            ttft = f", TTFT {1000 * result['ttft_s']:8.1f} ms" if "ttft_s" in result else ""
            log(f"rep {rep + 1}/{repeats} {name:>24}: {result['tps']:7.1f} tokens/s{ttft}")
    return samples


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) of the per-repetition ratios."""
    pairs = [a / b for a, b in zip(numerator, denominator)]
    return statistics.median(pairs), min(pairs), max(pairs)


def spread(values: tuple[float, float, float], digits: int = 2) -> str:
    median, low, high = values
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"
