"""Constrained output with MTP: speed and acceptance with and without a grammar, one run.

    python benchmarks/grammar_bench.py [--tokens 200] [--repeats 3] [--threads 2]

On the demo model (f32; it recites English text), four methods side by side, repetitions
interleaved (A B C D A B C D ...): plain greedy decoding and MTP (n_draft 3), each free
and under a JSON schema whose one string field the text fits in (so the model writes what
it would anyway, and what the grammar costs shows). Prints a table and the MTP/plain
ratio with and without the grammar. Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pyllama_mtp import Grammar, Model, Sampler, SpeculativeDecoder, fixtures

PROMPT = "The quick brown fox"
SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}


def plain(model, grammar, tokens, threads):
    with model.context(n_ctx=1024, n_threads=threads) as ctx, Sampler(0.0, grammar=grammar) as sampler:
        start = time.perf_counter()
        out = list(ctx.generate(PROMPT, max_tokens=tokens, sampler=sampler, stop_at_eog=False))
        return len(out) / (time.perf_counter() - start), None, out


def mtp(model, grammar, tokens, threads):
    with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=3, n_threads=threads, grammar=grammar) as decoder:
        start = time.perf_counter()
        out = list(decoder.generate(PROMPT, max_tokens=tokens, stop_at_eog=False))
        return len(out) / (time.perf_counter() - start), decoder.stats.acceptance, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    grammar = Grammar.from_json_schema(SCHEMA)
    methods = {"plain": (plain, None), "plain + grammar": (plain, grammar),
               "MTP": (mtp, None), "MTP + grammar": (mtp, grammar)}
    speeds = {name: [] for name in methods}
    acceptance, outputs = {}, {}
    with Model.load(fixtures.make_demo_model()) as model:
        for _ in range(args.repeats):
            for name, (run, constraint) in methods.items():
                speed, accepted, out = run(model, constraint, args.tokens, args.threads)
                speeds[name].append(speed)
                acceptance[name], outputs[name] = accepted, out
        sample = model.detokenize(outputs["MTP + grammar"])[:80]
    print(f"demo model, {args.tokens} tokens, median of {args.repeats}, {args.threads} threads")
    print("| method | tokens/s | acceptance |\n|---|---|---|")
    for name in methods:
        rate = acceptance[name]
        print(f"| {name} | {statistics.median(speeds[name]):.1f} | {'-' if rate is None else f'{rate:.1%}'} |")
    for suffix in ("", " + grammar"):
        ratio = statistics.median(speeds["MTP" + suffix]) / statistics.median(speeds["plain" + suffix])
        print(f"MTP / plain{suffix}: {ratio:.2f}")
    print("same tokens with and without MTP:",
          outputs["MTP"] == outputs["plain"] and outputs["MTP + grammar"] == outputs["plain + grammar"])
    print("constrained output starts:", repr(sample))


if __name__ == "__main__":
    main()
