"""Time to first token and decode rate with and without MTP, for long prompts (greedy, CPU).

    python benchmarks/ttft_bench.py [--lengths 512,2048,8192] [--repeats 3] [--threads 2]

With MTP the prompt costs more than the target's prefill: the drafter catches up over the
prompt (one MTP-layer pass per prompt token, so that its own attention sees the whole
text), and the first token comes after a first speculative step. Target (issue 17): TTFT
with MTP within 5% of plain decoding at every length. ``--catch-up N`` also measures the
decoder with the drafter's catch-up bounded to the last N prompt tokens. Ratios are the
median of per-repetition ratios with their spread (benchmarks/measure.py); decode rates
exclude the prompt and the first token. Writes benchmarks/results/ttft.json.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

from pyllama_mtp import Model, fixtures

import measure

HERE = pathlib.Path(__file__).resolve().parent
GOAL = 1.05


def prompt_of(model, length: int) -> list[int]:
    """A prompt of exactly ``length`` tokens: the model's own text, repeated."""
    base = model.tokenize("The quick brown fox jumps over the lazy dog, and then it runs away. ")
    return (base * (length // len(base) + 1))[:length]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated after the prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-draft", type=int, default=3)
    parser.add_argument("--catch-up", type=int, default=0, help="also measure catch-up bounded to N tokens")
    parser.add_argument("--n-embd", type=int, default=1024)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "ttft.json")
    args = parser.parse_args()
    start = time.perf_counter()
    path = fixtures.make_model("qwen35", n_embd=args.n_embd, n_layer=args.n_layer)
    rows = []
    with Model.load(path) as model:
        measure.log(f"model: {path.name}, {model.n_params / 1e6:.0f} M parameters")
        for length in map(int, args.lengths.split(",")):
            prompt = prompt_of(model, length)
            n_ctx = length + args.tokens + 64
            common = dict(threads=args.threads, n_ctx=n_ctx)
            methods = {
                "plain": lambda: measure.plain(model, prompt, args.tokens, **common),
                "mtp": lambda: measure.speculative(model, prompt, args.tokens, n_draft=args.n_draft, **common),
            }
            if args.catch_up:
                methods["mtp, bounded catch-up"] = lambda: measure.speculative(
                    model, prompt, args.tokens, n_draft=args.n_draft, catch_up=args.catch_up, **common)
            measure.log(f"== prompt of {length} tokens")
            samples = measure.interleaved(methods, args.repeats)
            row = {"length": length}
            for name, runs in samples.items():
                row[name] = {"ttft_s": statistics.median(r["ttft_s"] for r in runs),
                             "tps": statistics.median(r["tps"] for r in runs),
                             "acceptance": runs[-1].get("acceptance")}
                if name != "plain":
                    row[name]["ttft_vs_plain"] = measure.ratio([r["ttft_s"] for r in runs],
                                                               [r["ttft_s"] for r in samples["plain"]])
            rows.append(row)
    lines = ["| prompt tokens | method | TTFT ms | TTFT / plain | met (<= 1.05) | decode tokens/s | acceptance |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, value in row.items():
            if name == "length":
                continue
            versus = value.get("ttft_vs_plain")
            lines.append(f"| {row['length']} | {name} | {1000 * value['ttft_s']:.0f} "
                         f"| {measure.spread(versus, 3) if versus else ''} "
                         f"| {('yes' if versus[0] <= GOAL else 'no') if versus else ''} | {value['tps']:.1f} "
                         f"| {'' if value['acceptance'] is None else format(value['acceptance'], '.0%')} |")
    measure.write_json(args.out, args, rows=rows, wall_s=time.perf_counter() - start)
    print("\n".join(lines))
    measure.log(f"took {time.perf_counter() - start:.0f} s; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
