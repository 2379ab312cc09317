"""Drafting policies side by side: fixed n_draft=3 against adaptive drafting and a p_min
cut-off, on constructed models with high and low MTP acceptance (greedy, CPU).

    python benchmarks/policy_bench.py [--tokens 300] [--repeats 3]

Ratios are within one run, repetitions interleaved; prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pyllama_mtp import Model, SpeculativeDecoder, fixtures
from pyllama_mtp.lookup import LookupStats, generate_with_lookup

PROMPT = "The quick brown fox"
POLICIES = {
    "fixed n_draft=3": dict(n_draft=3),
    "adaptive (n_draft <= 4)": dict(n_draft=4, adaptive=True),
    "n_draft=3, p_min=0.5": dict(n_draft=3, p_min=0.5),
}


def plain_rate(model, n_tokens, threads):
    with model.context(n_ctx=2048, n_threads=threads) as ctx:
        start = time.perf_counter()
        produced = list(ctx.generate(PROMPT, max_tokens=n_tokens, stop_at_eog=False))
        return len(produced) / (time.perf_counter() - start)


def policy_rate(model, n_tokens, threads, settings):
    with SpeculativeDecoder.create(model, n_ctx=2048, n_threads=threads, **settings) as decoder:
        start = time.perf_counter()
        produced = list(decoder.generate(PROMPT, max_tokens=n_tokens, stop_at_eog=False))
        rate = len(produced) / (time.perf_counter() - start)
        return rate, decoder.stats.acceptance, decoder.stats.mean_accepted_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print("| model | policy | tokens/s | vs fixed 3 | vs plain | acceptance | mean accepted length |")
    print("|---|---|---|---|---|---|---|")
    for label, acceptance in (("high acceptance (0.9)", 0.9), ("low acceptance (0.4)", 0.4)):
        path = fixtures.make_model("qwen35", n_embd=1024, n_layer=8, acceptance=acceptance)
        with Model.load(path) as model:
            rates = {name: [] for name in ["plain", *POLICIES]}
            extra = {}
            for _ in range(args.repeats):
                rates["plain"].append(plain_rate(model, args.tokens, args.threads))
                for name, settings in POLICIES.items():
                    rate, accepted, length = policy_rate(model, args.tokens, args.threads, settings)
                    rates[name].append(rate)
                    extra[name] = (accepted, length)
            median = {name: statistics.median(values) for name, values in rates.items()}
            for name in POLICIES:
                accepted, length = extra[name]
                print(f"| {label} | {name} | {median[name]:.1f} | {median[name] / median['fixed n_draft=3']:.2f} "
                      f"| {median[name] / median['plain']:.2f} | {accepted:.1%} | {length:.2f} |")
            print(f"| {label} | plain | {median['plain']:.1f} | | 1.00 | | |")

    # A repetitive prompt: n-gram lookup drafts (MTP when there is none) against MTP alone.
    path = fixtures.make_model("qwen35", n_embd=1024, n_layer=8, acceptance=0.75)
    with Model.load(path) as model:
        prompt = model.tokenize("def add(a, b):\n    return a + b\n\n" * 8 + "def add(a, b):\n")
        rates = {"plain": [], "fixed n_draft=3": [], "lookup + MTP": []}
        for _ in range(args.repeats):
            with model.context(n_ctx=2048, n_threads=args.threads) as ctx:
                start = time.perf_counter()
                produced = list(ctx.generate(prompt, max_tokens=args.tokens, stop_at_eog=False))
                rates["plain"].append(len(produced) / (time.perf_counter() - start))
            with SpeculativeDecoder.create(model, n_ctx=2048, n_draft=3, n_threads=args.threads) as decoder:
                start = time.perf_counter()
                produced = list(decoder.generate(prompt, max_tokens=args.tokens, stop_at_eog=False))
                rates["fixed n_draft=3"].append(len(produced) / (time.perf_counter() - start))
                fixed_acceptance = decoder.stats.acceptance
            stats = LookupStats()
            with SpeculativeDecoder.create(model, n_ctx=2048, n_draft=8, n_threads=args.threads) as decoder:
                start = time.perf_counter()
                produced = list(generate_with_lookup(decoder, prompt, max_tokens=args.tokens, stats=stats))
                rates["lookup + MTP"].append(len(produced) / (time.perf_counter() - start))
        median = {name: statistics.median(values) for name, values in rates.items()}
        print(f"| repetitive prompt (0.75) | fixed n_draft=3 | {median['fixed n_draft=3']:.1f} | 1.00 "
              f"| {median['fixed n_draft=3'] / median['plain']:.2f} | {fixed_acceptance:.1%} | |")
        print(f"| repetitive prompt (0.75) | lookup + MTP | {median['lookup + MTP']:.1f} "
              f"| {median['lookup + MTP'] / median['fixed n_draft=3']:.2f} "
              f"| {median['lookup + MTP'] / median['plain']:.2f} | lookup {stats.acceptance('lookup'):.1%} "
              f"({stats.steps['lookup']} steps), MTP {stats.acceptance('mtp'):.1%} ({stats.steps['mtp']} steps) | |")
        print(f"| repetitive prompt (0.75) | plain | {median['plain']:.1f} | | 1.00 | | |")


if __name__ == "__main__":
    main()
