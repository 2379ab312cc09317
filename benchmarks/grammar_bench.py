"""Constrained output with MTP: speed and acceptance with and without a grammar, one run.

    python benchmarks/grammar_bench.py [--tokens 200] [--repeats 3] [--threads 2]

On the demo model (f32; it recites English text), plain greedy decoding and MTP
(n_draft 3) side by side, repetitions interleaved (A B C ... A B C ...), each free, under a
light GBNF grammar the text satisfies anyway (what checking a grammar costs), and under a
JSON schema with one string field (the structure is forced; the text goes inside the
string). Prints a table and the MTP/plain ratio for each. Speed is reported, never
asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pyllama_mtp import Grammar, Model, Sampler, SpeculativeDecoder, fixtures

PROMPT = "The quick brown fox"
SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
LIGHT = r'root ::= [^{}|~]*'  # no braces, bars or tildes: the demo text has none


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
    constraints = {"": None, " + light grammar": Grammar(LIGHT), " + JSON schema": Grammar.from_json_schema(SCHEMA)}
    methods = {f"{kind}{suffix}": (run, constraint) for suffix, constraint in constraints.items()
               for kind, run in (("plain", plain), ("MTP", mtp))}
    speeds = {name: [] for name in methods}
    acceptance, outputs = {}, {}
    with Model.load(fixtures.make_demo_model()) as model:
        for _ in range(args.repeats):
            for name, (run, constraint) in methods.items():
                speed, accepted, out = run(model, constraint, args.tokens, args.threads)
                speeds[name].append(speed)
                acceptance[name], outputs[name] = accepted, out
        sample = model.detokenize(outputs["MTP + JSON schema"])[:100]
    print(f"demo model, {args.tokens} tokens, median of {args.repeats}, {args.threads} threads")
    print("| method | tokens/s | acceptance |\n|---|---|---|")
    for name in methods:
        rate = acceptance[name]
        print(f"| {name} | {statistics.median(speeds[name]):.1f} | {'-' if rate is None else f'{rate:.1%}'} |")
    for suffix in constraints:
        ratio = statistics.median(speeds["MTP" + suffix]) / statistics.median(speeds["plain" + suffix])
        print(f"MTP / plain{suffix}: {ratio:.2f}; same tokens: {outputs['MTP' + suffix] == outputs['plain' + suffix]}")
    print("constrained output starts:", repr(sample))


if __name__ == "__main__":
    main()
