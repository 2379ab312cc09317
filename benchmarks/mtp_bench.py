"""MTP benchmark: our decoder vs plain decoding vs llama.cpp's native loops, one run.

    python benchmarks/mtp_bench.py [--quick] [--size 400m] [--threads 2] [--ftype q8_0[,f32,...]]
                                   [--device CPU] [--drafts 1,2,3,4]

Every method runs on the same model, build and thread count, with repetitions
interleaved (A B A B ...) so drift of the machine hits all methods alike. Decode rates
exclude prompt evaluation on both sides (ours: after the first token, see
benchmarks/measure.py; llama.cpp's: its eval / decode timers, which start after the
prompt). A ratio is the median of per-repetition ratios, with its spread. Writes
``benchmarks/results/latest.{json,md,png}`` (one JSON and one table for all the
ftypes) and prints each target ratio, met or not. It never fails on a missed target:
speed is reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

from pyllama_mtp import Model, __version__, fixtures, system_info

import measure

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
NATIVE_SPEED = re.compile(rb"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s")
NATIVE_EVAL = re.compile(rb"\s eval time =\s+([\d.]+) ms /\s+(\d+) runs")

# Sizes: --quick uses the demo model (134 M parameters); the full run a 400 M one; a GPU
# run (tools/gpu_check.sh) a 1.3 B one, large enough to be memory-bound there.
SIZES = {"400m": dict(n_embd=1536, n_layer=16), "1b": dict(n_embd=2048, n_layer=32)}


def native_tool(name: str) -> pathlib.Path | None:
    folder = os.environ.get("PYLLAMA_MTP_TOOLS_DIR")
    for candidate in ([pathlib.Path(folder)] if folder else sorted(REPO.glob("build/*/bin"))):
        if (candidate / name).is_file():
            return candidate / name
    return None


def benchmark_model(args) -> pathlib.Path:
    if args.model:
        return pathlib.Path(args.model)
    source = fixtures.make_demo_model() if args.quick else fixtures.make_model(
        "qwen35", **SIZES[args.size], head_dim=64, seed=0, eps=fixtures.DEMO_EPS_TABLE[4][0] * 1.06)
    return measure.quantized(source, args.ftype)


# -- one measurement each (ours through benchmarks/measure.py) ----------------------------

def _gpu_args(args) -> list[str]:
    """The native tools offload every layer where ours does (llama.cpp's default offload)."""
    return [] if args.device.upper() == "CPU" else ["-ngl", "999"]


def native_plain(path, args) -> dict | None:
    tool = native_tool("llama-completion")
    if tool is None:
        return None
    out = subprocess.run([str(tool), "-m", str(path), "-p", PROMPT, "-n", str(args.n_tokens), "--temp", "0",
                          "-t", str(args.threads), "-c", "2048", "-no-cnv", "--no-warmup", *_gpu_args(args)],
                         capture_output=True, timeout=600)
    found = NATIVE_EVAL.search(out.stderr)
    if not found:
        measure.log("llama-completion printed no timing:", out.stderr[-500:].decode(errors="replace"))
        return None
    ms, runs = float(found.group(1)), int(found.group(2))
    return {"tps": 1000.0 * runs / ms}


def native_mtp(path, args, n_draft) -> dict | None:
    tool = native_tool("llama-speculative-simple")
    if tool is None:
        return None
    out = subprocess.run([str(tool), "-m", str(path), "--spec-type", "draft-mtp", "--spec-draft-n-max",
                          str(n_draft), "-p", PROMPT, "-n", str(args.n_tokens), "--temp", "0",
                          "-t", str(args.threads), "-c", "2048", *_gpu_args(args)],
                         capture_output=True, timeout=600)
    found = NATIVE_SPEED.search(out.stderr) or NATIVE_SPEED.search(out.stdout)
    if not found:
        measure.log("llama-speculative-simple printed no timing:", out.stderr[-500:].decode(errors="replace"))
        return None
    return {"tps": float(found.group(3))}


def peak_memory(path, args, mtp: bool) -> int:
    """Peak RSS (bytes) of a fresh process that loads the model and decodes 16 tokens."""
    code = f"""
import resource
from pyllama_mtp import Model, SpeculativeDecoder
with Model.load({str(path)!r}, load_mtp={mtp}) as m:
    if {mtp}:
        with SpeculativeDecoder.create(m, n_ctx=2048, n_draft=3, n_threads={args.threads}) as d:
            list(d.generate({PROMPT!r}, max_tokens=16))
    else:
        with m.context(n_ctx=2048, n_threads={args.threads}) as c:
            list(c.generate({PROMPT!r}, max_tokens=16))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return int(out.stdout.strip().splitlines()[-1]) * 1024


# -- the run ---------------------------------------------------------------------------

def run(args) -> dict:
    """One ftype: every method, interleaved; medians and per-repetition ratios."""
    path = benchmark_model(args)
    drafts = args.drafts
    with Model.load(path) as model:
        measure.log(f"model: {path.name}, {model.n_params / 1e6:.0f} M parameters, {model.size / 2**20:.0f} MiB")
        prompt = model.tokenize(PROMPT)
        methods = {"ours_plain": lambda: measure.plain(model, prompt, args.n_tokens, threads=args.threads),
                   "native_plain": lambda: native_plain(path, args)}
        for n in drafts:
            methods[f"ours_mtp_{n}"] = lambda n=n: measure.speculative(model, prompt, args.n_tokens,
                                                                       threads=args.threads, n_draft=n)
            methods[f"native_mtp_{n}"] = lambda n=n: native_mtp(path, args, n)
        # A native tool that printed no timing gives nan: its ratios drop that repetition.
        nan = {"tps": float("nan")}
        samples = measure.interleaved({name: (lambda f=f: f() or nan) for name, f in methods.items()},
                                      args.repeats)
        params, size = model.n_params, model.size
    reference = samples["ours_plain"][0]["tokens"]
    lossless = all(s["tokens"] == reference for n in drafts for s in samples[f"ours_mtp_{n}"])
    rates = {m: [s["tps"] for s in runs] for m, runs in samples.items()}
    summary = {m: {"tps": statistics.median(v), "n": len(v)} for m, v in rates.items()
               if not all(x != x for x in v)}
    for n in drafts:
        runs = samples[f"ours_mtp_{n}"]
        for key in ("acceptance", "mean_accepted_length", "python_us_per_step", "python_fraction", "ttft_s"):
            summary[f"ours_mtp_{n}"][key] = statistics.median(r[key] for r in runs)
        summary[f"ours_mtp_{n}"]["acceptance_at"] = runs[-1]["acceptance_at"]
    summary["ours_plain"]["ttft_s"] = statistics.median(r["ttft_s"] for r in samples["ours_plain"])
    ratios = {}
    for n in drafts:
        ratios[f"ours_mtp_{n} / native_mtp_{n}"] = _pairs(rates[f"ours_mtp_{n}"], rates[f"native_mtp_{n}"])
        ratios[f"ours_mtp_{n} / ours_plain"] = _pairs(rates[f"ours_mtp_{n}"], rates["ours_plain"])
        ratios[f"ttft ours_mtp_{n} / ours_plain"] = _pairs([r["ttft_s"] for r in samples[f"ours_mtp_{n}"]],
                                                           [r["ttft_s"] for r in samples["ours_plain"]])
    ratios["ours_plain / native_plain"] = _pairs(rates["ours_plain"], rates["native_plain"])
    memory = {"plain": peak_memory(path, args, False), "mtp": peak_memory(path, args, True)} if args.memory else {}
    return {
        "model": {"path": path.name, "n_params": params, "size": size, "ftype": args.ftype},
        "lossless": lossless, "summary": summary, "ratios": ratios, "peak_rss": memory,
    }


def _pairs(numerator, denominator):
    """Median (lowest, highest) of the repetitions where both sides measured; None if none."""
    pairs = [(a, b) for a, b in zip(numerator, denominator) if a == a and b == b]
    return measure.ratio(*zip(*pairs)) if pairs else None


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def targets(result: dict) -> list[tuple[str, tuple, float, bool]]:
    """(name, (median, lowest, highest), goal, met) for one ftype's run."""
    s, r = result["summary"], result["ratios"]
    drafts = sorted(int(m.rsplit("_", 1)[1]) for m in s if m.startswith("ours_mtp_"))
    rows = []
    for n in drafts:
        if r[f"ours_mtp_{n} / native_mtp_{n}"]:
            value = r[f"ours_mtp_{n} / native_mtp_{n}"]
            rows.append((f"our MTP / native MTP, n_draft {n}", value, 0.98, value[0] >= 0.98))
    if r["ours_plain / native_plain"]:
        value = r["ours_plain / native_plain"]
        rows.append(("our plain / native plain", value, 0.98, value[0] >= 0.98))
    best = max(drafts, key=lambda n: s[f"ours_mtp_{n}"]["tps"])
    value = r[f"ours_mtp_{best} / ours_plain"]
    rows.append((f"best MTP (n_draft {best}) / plain", value, 1.6, value[0] >= 1.6))
    value = r[f"ttft ours_mtp_{best} / ours_plain"]
    rows.append((f"time to first token, MTP n_draft {best} / plain (lower is better)", value, 1.05,
                 value[0] <= 1.05))
    fraction = s[f"ours_mtp_{best}"]["python_fraction"]
    rows.append(("Python share of the decoder's wall time", (fraction,) * 3, 0.02, fraction < 0.02))
    return rows


def write_outputs(result: dict, out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(result, indent=1))
    lines = [f"# MTP benchmark ({result['threads']} threads, {result['backend']}, {result['tokens']} tokens, "
             f"{result['repeats']} interleaved repetitions, commit {result['commit']})", "",
             "Decode tokens/s exclude prompt evaluation on both sides; a ratio is the median of "
             "per-repetition ratios (lowest-highest).", ""]
    for run_ in result["runs"]:
        s, model = run_["summary"], run_["model"]
        lines += [f"## {model['path']} ({model['n_params'] / 1e6:.0f} M params, {model['ftype']})", "",
                  "| method | tokens/s | acceptance | mean accepted length | Python µs/step |",
                  "|---|---|---|---|---|"]
        for method, row in s.items():
            lines.append(f"| {method} | {row['tps']:.1f} | {row.get('acceptance', float('nan')):.1%} | "
                         f"{row.get('mean_accepted_length', float('nan')):.2f} | "
                         f"{row.get('python_us_per_step', float('nan')):.0f} |")
        lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
        for name, value, goal, met in targets(run_):
            lines.append(f"| {name} | {measure.spread(value, 3)} | {goal} | {'yes' if met else 'no'} |")
        mib = 1 / 2**20
        memory = run_["peak_rss"]
        lines += ["", (f"Peak RSS: plain {memory['plain'] * mib:.0f} MiB, MTP {memory['mtp'] * mib:.0f} MiB. "
                       if memory else "") + f"Greedy MTP output identical to plain: {run_['lossless']}.", ""]
    (out_dir / "latest.md").write_text("\n".join(lines) + "\n")
    _plot(result["runs"][0], result, out_dir)


def _plot(run_: dict, result: dict, out_dir: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        measure.log("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    s = run_["summary"]
    drafts = sorted(int(m.rsplit("_", 1)[1]) for m in s if m.startswith("ours_mtp_"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(drafts, [s[f"ours_mtp_{n}"]["tps"] for n in drafts], "o-", label="pyllama_mtp MTP")
    if all(f"native_mtp_{n}" in s for n in drafts):
        ax.plot(drafts, [s[f"native_mtp_{n}"]["tps"] for n in drafts], "s--", label="llama.cpp native MTP")
    ax.axhline(s["ours_plain"]["tps"], color="gray", label="pyllama_mtp plain")
    if "native_plain" in s:
        ax.axhline(s["native_plain"]["tps"], color="gray", linestyle=":", label="llama.cpp plain")
    ax.set_xlabel("n_draft")
    ax.set_ylabel("decode tokens/s")
    ax.set_xticks(drafts)
    ax.set_title(f"{run_['model']['n_params'] / 1e6:.0f} M qwen35, {run_['model']['ftype']}, "
                 f"{result['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latest.png", dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mtp_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo-size model, fewer tokens (< 3 minutes)")
    parser.add_argument("--size", choices=sorted(SIZES), default="400m", help="generated model size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ftype", default="q8_0", help="quantizations of the benchmark model, comma-separated")
    parser.add_argument("--model", help="benchmark this GGUF instead of the generated one")
    parser.add_argument("--device", default="CPU", help="backend the figures are recorded for")
    parser.add_argument("--drafts", default="1,2,3,4", help="n_draft values, comma-separated")
    parser.add_argument("--tokens", dest="n_tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak RSS runs")
    parser.add_argument("--plan", action="store_true", help="print what would run and exit")
    parser.add_argument("--prepare", action="store_true", help="make (and quantize) the models, then exit")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.n_tokens = args.n_tokens or (64 if args.quick else 128)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.drafts = [int(n) for n in args.drafts.split(",")]
    ftypes = args.ftype.split(",")
    if args.plan:
        size = "demo" if args.quick else args.size
        print(f"bench plan: {args.model or size} model as {', '.join(ftypes)}; n_draft {args.drafts}; "
              f"{args.n_tokens} tokens x {args.repeats} repetitions; native tools: "
              f"{native_tool('llama-completion') or 'not built'}")
        return 0
    start = time.perf_counter()
    if args.prepare:
        for ftype in ftypes:
            args.ftype = ftype
            measure.log(f"model ready: {benchmark_model(args).name} ({time.perf_counter() - start:.0f} s)")
        return 0
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "threads": args.threads, "tokens": args.n_tokens, "repeats": args.repeats, "backend": args.device,
        "version": __version__, "llama_cpp_commit": system_info()["llama_cpp_commit"], "commit": _git_commit(),
        "runs": [],
    }
    for ftype in ftypes:
        args.ftype = ftype
        measure.log(f"== {ftype}")
        result["runs"].append(run(args))
    result["wall_s"] = time.perf_counter() - start
    write_outputs(result, args.out)
    print((args.out / "latest.md").read_text())
    measure.log(f"benchmark took {result['wall_s']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
