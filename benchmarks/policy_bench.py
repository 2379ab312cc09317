"""Drafting policies side by side: fixed n_draft=3 against adaptive drafting and a p_min
cut-off, on constructed models with high and low MTP acceptance, and n-gram lookup
drafts on repetitive prompts (greedy, CPU).

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

    # Repetitive prompts: n-gram lookup drafts (MTP when there is none) against MTP alone.
    # The 0.75 fixture does not copy text (its next token depends on the whole history),
    # so its repeats rarely continue the way they did before. The 1.0 fixture follows its
    # successor rule everywhere, so text it wrote before is what it writes again: the
    # case lookup is for, which a real model meets when it quotes code or its prompt.
    for acceptance in (0.75, 1.0):
        path = fixtures.make_model("qwen35", n_embd=1024, n_layer=8, acceptance=acceptance)
        with Model.load(path) as model:
            code = model.tokenize("def add(a, b):\n    return a + b\n\n" * 8 + "def add(a, b):\n")
            # The model quoting itself: its own continuation of a prompt, then the prompt again.
            start = model.tokenize(PROMPT)
            with model.context(n_ctx=2048, n_threads=args.threads) as ctx:
                own = list(ctx.generate(start, max_tokens=args.tokens, stop_at_eog=False))
            quoting = start + own + model.tokenize("\n\n") + start
            for label, prompt in (("repeated code snippet", code), ("quotes its own earlier output", quoting)):
                repetitive_prompt(model, f"{label} ({acceptance})", prompt, args)


def repetitive_prompt(model, label, prompt, args) -> None:
    rates = {"plain": [], "fixed n_draft=3": [], "fixed n_draft=8": [], "lookup + MTP (C step)": [],
             "lookup + MTP (Python policy)": []}
    lookup = dict(n_draft=3, lookup_ngram=3, lookup_min=2, lookup_max=8)
    for _ in range(args.repeats):
        with model.context(n_ctx=2048, n_threads=args.threads) as ctx:
            start = time.perf_counter()
            produced = list(ctx.generate(prompt, max_tokens=args.tokens, stop_at_eog=False))
            rates["plain"].append(len(produced) / (time.perf_counter() - start))
        with SpeculativeDecoder.create(model, n_ctx=2048, n_draft=3, n_threads=args.threads) as decoder:
            start = time.perf_counter()
            produced = list(decoder.generate(prompt, max_tokens=args.tokens, stop_at_eog=False))
            rates["fixed n_draft=3"].append(len(produced) / (time.perf_counter() - start))
            fixed = decoder.stats
        with SpeculativeDecoder.create(model, n_ctx=2048, n_draft=8, n_threads=args.threads) as decoder:
            start = time.perf_counter()
            produced = list(decoder.generate(prompt, max_tokens=args.tokens, stop_at_eog=False))
            rates["fixed n_draft=8"].append(len(produced) / (time.perf_counter() - start))
            fixed8 = decoder.stats
        with SpeculativeDecoder.create(model, n_ctx=2048, n_threads=args.threads, **lookup) as decoder:
            start = time.perf_counter()
            produced = list(decoder.generate(prompt, max_tokens=args.tokens, stop_at_eog=False))
            rates["lookup + MTP (C step)"].append(len(produced) / (time.perf_counter() - start))
            native = decoder.stats
        stats = LookupStats()
        with SpeculativeDecoder.create(model, n_ctx=2048, n_draft=8, n_threads=args.threads) as decoder:
            start = time.perf_counter()
            produced = list(generate_with_lookup(decoder, prompt, max_tokens=args.tokens, stats=stats))
            rates["lookup + MTP (Python policy)"].append(len(produced) / (time.perf_counter() - start))
    median = {name: statistics.median(values) for name, values in rates.items()}
    base = median["fixed n_draft=3"]
    print(f"| {label} | fixed n_draft=3 | {base:.1f} | 1.00 | {base / median['plain']:.2f} "
          f"| {fixed.acceptance:.1%} | {fixed.mean_accepted_length:.2f} |")
    name = "fixed n_draft=8"
    print(f"| {label} | {name} | {median[name]:.1f} | {median[name] / base:.2f} "
          f"| {median[name] / median['plain']:.2f} | {fixed8.acceptance:.1%} | {fixed8.mean_accepted_length:.2f} |")
    name = "lookup + MTP (C step)"
    print(f"| {label} | {name} | {median[name]:.1f} | {median[name] / base:.2f} "
          f"| {median[name] / median['plain']:.2f} | lookup {native.lookup_acceptance:.1%} "
          f"({native.lookup_steps} of {native.steps} steps), MTP {native.mtp_acceptance:.1%} "
          f"| {native.mean_accepted_length:.2f} |")
    name = "lookup + MTP (Python policy)"
    print(f"| {label} | {name} | {median[name]:.1f} | {median[name] / base:.2f} "
          f"| {median[name] / median['plain']:.2f} | lookup {stats.acceptance('lookup'):.1%} "
          f"({stats.steps['lookup']} steps), MTP {stats.acceptance('mtp'):.1%} ({stats.steps['mtp']} steps) | |")
    print(f"| {label} | plain | {median['plain']:.1f} | | 1.00 | | |")


if __name__ == "__main__":
    main()
