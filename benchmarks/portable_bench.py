"""What portability costs: decode speed of a portable build (the CPU variant chosen at run
time) against a native one (tuned to this machine), and of repacked weights against plain
ones, for f32, Q8_0 and Q4_K_M, side by side in one run.

Each build is installed in its own environment; give both interpreters:

    python -m venv /tmp/portable && /tmp/portable/bin/pip install . -C build-dir=build/portable \\
        -C cmake.define.PYLLAMA_MTP_PORTABLE=ON
    python benchmarks/portable_bench.py --native python --portable /tmp/portable/bin/python

Every repetition runs each (build, ftype, repack) case once in a fresh process of that
build, in a rotated order; a ratio is the median of per-repetition ratios (lowest-highest).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

import measure
from pyllama_mtp import fixtures

# Runs inside the interpreter of one build: one plain greedy generation, timed.
WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import measure
import pyllama_mtp
from pyllama_mtp import Model
path, repack, tokens, threads = sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
with Model.load(path, repack=repack) as model:
    with model.context(n_ctx=64) as ctx:
        buffers = sorted({e["buffer_type"] for e in ctx.memory_breakdown() if e["model"]})
    result = measure.plain(model, model.tokenize("The quick brown fox"), tokens, threads=threads, n_ctx=tokens + 64)
print(json.dumps({"tps": result["tps"], "variant": pyllama_mtp.system_info()["cpu_variant"], "buffers": buffers}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--native", required=True, help="Python of an environment with a native build")
    parser.add_argument("--portable", required=True, help="Python of an environment with a portable build")
    parser.add_argument("--ftype", default="f32,q8_0,q4_k_m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "portable")
    args = parser.parse_args()

    source = fixtures.make_model("qwen35", n_embd=1024, n_layer=8, acceptance=0.75)
    models = {ftype: measure.quantized(source, ftype) for ftype in args.ftype.split(",")}
    here = str(pathlib.Path(__file__).resolve().parent)
    seen: dict[str, dict] = {}

    def case(build: str, python: str, ftype: str, repack: bool):
        def run() -> dict:
            out = subprocess.run([python, "-c", WORKER, here, str(models[ftype]), str(int(repack)),
                                  str(args.tokens), str(args.threads)], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{build} {ftype}: the worker failed: {out.stderr[-2000:]}")
            result = json.loads(out.stdout.splitlines()[-1])
            seen[f"{build} {ftype} repack {'on' if repack else 'off'}"] = result
            return result
        return run

    methods = {f"{build} {ftype} repack {'on' if repack else 'off'}": case(build, python, ftype, repack)
               for build, python in (("native", args.native), ("portable", args.portable))
               for ftype in models for repack in (True, False)}
    samples = measure.interleaved(methods, args.repeats)
    tps = {name: [s["tps"] for s in runs] for name, runs in samples.items()}

    lines = [f"# Portable against native build ({args.tokens} tokens, {args.threads} threads, "
             f"{args.repeats} interleaved repetitions)", "",
             f"CPU variant of the portable build here: {seen[next(n for n in seen if n.startswith('portable'))]['variant']}",
             "", "| case | tokens/s | weight buffers |", "|---|---|---|"]
    for name in methods:
        lines.append(f"| {name} | {statistics.median(tps[name]):.1f} | {', '.join(seen[name]['buffers'])} |")
    lines += ["", "| ratio | median (lowest-highest) |", "|---|---|"]
    for ftype in models:
        for repack in ("on", "off"):
            lines.append(f"| {ftype} portable / native, repack {repack} | "
                         f"{measure.spread(measure.ratio(tps[f'portable {ftype} repack {repack}'], tps[f'native {ftype} repack {repack}']))} |")
        for build in ("native", "portable"):
            lines.append(f"| {ftype} {build}: repack on / off | "
                         f"{measure.spread(measure.ratio(tps[f'{build} {ftype} repack on'], tps[f'{build} {ftype} repack off']))} |")
    table = "\n".join(lines)
    print(table)
    measure.write_json(args.out.with_suffix(".json"), args, tokens_per_s=tps, cases=seen)
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
