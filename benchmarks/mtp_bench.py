"""MTP benchmark: our decoder vs plain decoding vs llama.cpp's native loops, one run.

    python benchmarks/mtp_bench.py [--quick] [--threads 2] [--ftype q8_0] [--device CPU]

Every method runs on the same model, build and thread count, with repetitions
interleaved (A B A B ...) so drift of the machine hits all methods alike. Writes
``benchmarks/results/latest.{json,md,png}`` and prints each target ratio, met or not.
It never fails on a missed target: speed is reported, not asserted.
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

from pyllama_mtp import Model, SpeculativeDecoder, __version__, fixtures, quantize, system_info

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
NATIVE_SPEED = re.compile(rb"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s")
NATIVE_EVAL = re.compile(rb"\s eval time =\s+([\d.]+) ms /\s+(\d+) runs")

# Sizes: --quick uses the demo model (134 M parameters); the full run a 400 M one.
FULL_MODEL = dict(arch="qwen35", n_embd=1536, n_layer=16, head_dim=64, seed=0)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def native_tool(name: str) -> pathlib.Path | None:
    folder = os.environ.get("PYLLAMA_MTP_TOOLS_DIR")
    for candidate in ([pathlib.Path(folder)] if folder else sorted(REPO.glob("build/*/bin"))):
        if (candidate / name).is_file():
            return candidate / name
    return None


def benchmark_model(args) -> pathlib.Path:
    if args.model:
        return pathlib.Path(args.model)
    cache = fixtures.default_cache_dir()
    source = fixtures.make_demo_model() if args.quick else fixtures.make_model(
        **FULL_MODEL, eps=fixtures.DEMO_EPS_TABLE[4][0] * 1.06)
    if args.ftype == "f32":
        return source
    target = cache / f"{source.stem}-{args.ftype}.gguf"
    if not target.exists():
        log(f"quantizing {source.name} to {args.ftype} with llama.cpp's quantizer ...")
        partial = target.with_suffix(".part")
        quantize(source, partial, args.ftype, n_threads=args.threads)
        partial.replace(target)
    return target


# -- one measurement each --------------------------------------------------------------

def ours_plain(model, args) -> dict:
    with model.context(n_ctx=2048, n_threads=args.threads) as ctx:
        prompt = model.tokenize(PROMPT)
        start = time.perf_counter()
        ctx.decode(prompt)
        prompt_s = time.perf_counter() - start
        tokens, first = [], None
        for token in _plain_stream(ctx, args.n_tokens):
            first = first or time.perf_counter()
            tokens.append(token)
        decode_s = time.perf_counter() - first
    return {"tps": (len(tokens) - 1) / decode_s, "pp_tps": len(prompt) / prompt_s, "tokens": tokens}


def _plain_stream(ctx, n_tokens):
    """Greedy continuation of what the context holds (prompt already decoded)."""
    import numpy as np

    for _ in range(n_tokens):
        token = int(np.argmax(ctx.logits()))
        yield token
        ctx.decode([token])


def ours_mtp(model, args, n_draft) -> dict:
    with SpeculativeDecoder.create(model, n_ctx=2048, n_draft=n_draft, n_threads=args.threads) as dec:
        prompt = model.tokenize(PROMPT)
        start = time.perf_counter()
        dec.prefill(prompt)
        prompt_s = time.perf_counter() - start
        dec.reset_stats()
        tokens = []
        start = time.perf_counter()
        while len(tokens) < args.n_tokens:
            tokens += dec.step()[0]
        wall = time.perf_counter() - start
        stats = dec.stats
    return {
        "tps": len(tokens) / wall, "pp_tps": len(prompt) / prompt_s, "tokens": tokens[: args.n_tokens],
        "acceptance": stats.acceptance, "acceptance_at": stats.acceptance_at,
        "mean_accepted_length": stats.mean_accepted_length,
        "python_us_per_step": 1e6 * stats.python_s / max(1, stats.steps),
        "python_fraction": stats.python_s / stats.wall_s if stats.wall_s else 0.0,
    }


def native_plain(path, args) -> dict | None:
    tool = native_tool("llama-completion")
    if tool is None:
        return None
    out = subprocess.run([str(tool), "-m", str(path), "-p", PROMPT, "-n", str(args.n_tokens), "--temp", "0",
                          "-t", str(args.threads), "-c", "2048", "-no-cnv", "--no-warmup"],
                         capture_output=True, timeout=600)
    found = NATIVE_EVAL.search(out.stderr)
    if not found:
        log("llama-completion printed no timing:", out.stderr[-500:].decode(errors="replace"))
        return None
    ms, runs = float(found.group(1)), int(found.group(2))
    return {"tps": 1000.0 * runs / ms}


def native_mtp(path, args, n_draft) -> dict | None:
    tool = native_tool("llama-speculative-simple")
    if tool is None:
        return None
    out = subprocess.run([str(tool), "-m", str(path), "--spec-type", "draft-mtp", "--spec-draft-n-max",
                          str(n_draft), "-p", PROMPT, "-n", str(args.n_tokens), "--temp", "0",
                          "-t", str(args.threads), "-c", "2048"], capture_output=True, timeout=600)
    found = NATIVE_SPEED.search(out.stderr) or NATIVE_SPEED.search(out.stdout)
    if not found:
        log("llama-speculative-simple printed no timing:", out.stderr[-500:].decode(errors="replace"))
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
    path = benchmark_model(args)
    drafts = [1, 2, 3, 4]
    methods = ["ours_plain", "native_plain"] + [f"ours_mtp_{n}" for n in drafts] + [f"native_mtp_{n}" for n in drafts]
    samples: dict[str, list[dict]] = {m: [] for m in methods}
    with Model.load(path) as model:
        log(f"model: {path.name}, {model.n_params / 1e6:.0f} M parameters, {model.size / 2**20:.0f} MiB")
        for rep in range(args.repeats):
            for method in methods:
                if method == "ours_plain":
                    result = ours_plain(model, args)
                elif method == "native_plain":
                    result = native_plain(path, args)
                elif method.startswith("ours_mtp_"):
                    result = ours_mtp(model, args, int(method.rsplit("_", 1)[1]))
                else:
                    result = native_mtp(path, args, int(method.rsplit("_", 1)[1]))
                if result is not None:
                    samples[method].append(result)
                    log(f"rep {rep + 1}/{args.repeats} {method:>14}: {result['tps']:7.1f} tokens/s")
        params, size = model.n_params, model.size
    lossless = all(s["tokens"] == samples["ours_plain"][0]["tokens"]
                   for n in drafts for s in samples[f"ours_mtp_{n}"])
    summary = {m: {"tps": statistics.median(s["tps"] for s in v), "n": len(v)} for m, v in samples.items() if v}
    for n in drafts:
        runs = samples[f"ours_mtp_{n}"]
        for key in ("acceptance", "mean_accepted_length", "python_us_per_step", "python_fraction", "pp_tps"):
            summary[f"ours_mtp_{n}"][key] = statistics.median(r[key] for r in runs)
        summary[f"ours_mtp_{n}"]["acceptance_at"] = runs[-1]["acceptance_at"]
    summary["ours_plain"]["pp_tps"] = statistics.median(r["pp_tps"] for r in samples["ours_plain"])
    memory = {"plain": peak_memory(path, args, False), "mtp": peak_memory(path, args, True)}
    return {
        "model": {"path": path.name, "n_params": params, "size": size, "ftype": args.ftype},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "threads": args.threads, "tokens": args.n_tokens, "repeats": args.repeats,
        "backend": args.device, "version": __version__,
        "llama_cpp_commit": system_info()["llama_cpp_commit"], "commit": _git_commit(),
        "lossless": lossless, "summary": summary, "peak_rss": memory,
    }


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def targets(result: dict) -> list[tuple[str, float, float, bool]]:
    s = result["summary"]
    rows = []
    for n in (1, 2, 3, 4):
        if f"native_mtp_{n}" in s:
            ratio = s[f"ours_mtp_{n}"]["tps"] / s[f"native_mtp_{n}"]["tps"]
            rows.append((f"our MTP / native MTP, n_draft {n}", ratio, 0.98, ratio >= 0.98))
    if "native_plain" in s:
        ratio = s["ours_plain"]["tps"] / s["native_plain"]["tps"]
        rows.append(("our plain / native plain", ratio, 0.98, ratio >= 0.98))
    best = max((1, 2, 3, 4), key=lambda n: s[f"ours_mtp_{n}"]["tps"])
    ratio = s[f"ours_mtp_{best}"]["tps"] / s["ours_plain"]["tps"]
    rows.append((f"best MTP (n_draft {best}) / plain", ratio, 1.6, ratio >= 1.6))
    ratio = s[f"ours_mtp_{best}"]["pp_tps"] / s["ours_plain"]["pp_tps"]
    rows.append(("prompt processing with MTP / without", ratio, 0.95, ratio >= 0.95))
    fraction = s[f"ours_mtp_{best}"]["python_fraction"]
    rows.append(("Python share of decode wall time", fraction, 0.02, fraction < 0.02))
    return rows


def write_outputs(result: dict, out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(result, indent=1))
    s = result["summary"]
    lines = [f"# MTP benchmark ({result['model']['path']}, {result['model']['n_params'] / 1e6:.0f} M params, "
             f"{result['model']['ftype']}, {result['threads']} threads, {result['backend']}, commit {result['commit']})",
             "", "| method | tokens/s | acceptance | mean accepted length | Python µs/step |",
             "|---|---|---|---|---|"]
    for method, row in s.items():
        lines.append(f"| {method} | {row['tps']:.1f} | {row.get('acceptance', float('nan')):.1%} | "
                     f"{row.get('mean_accepted_length', float('nan')):.2f} | "
                     f"{row.get('python_us_per_step', float('nan')):.0f} |")
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for name, value, goal, met in targets(result):
        lines.append(f"| {name} | {value:.3f} | {goal} | {'yes' if met else 'no'} |")
    mib = 1 / 2**20
    lines += ["", f"Peak RSS: plain {result['peak_rss']['plain'] * mib:.0f} MiB, "
              f"MTP {result['peak_rss']['mtp'] * mib:.0f} MiB. Greedy MTP output identical to plain: "
              f"{result['lossless']}."]
    (out_dir / "latest.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    drafts = [1, 2, 3, 4]
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
    ax.set_title(f"{result['model']['n_params'] / 1e6:.0f} M qwen35, {result['model']['ftype']}, "
                 f"{result['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latest.png", dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mtp_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo-size model, fewer tokens (< 3 minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ftype", default="q8_0", help="quantization of the benchmark model (default q8_0)")
    parser.add_argument("--model", help="benchmark this GGUF instead of the generated one")
    parser.add_argument("--device", default="CPU", help="backend the figures are recorded for")
    parser.add_argument("--tokens", dest="n_tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.n_tokens = args.n_tokens or (64 if args.quick else 128)
    args.repeats = args.repeats or (2 if args.quick else 3)
    start = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - start
    write_outputs(result, args.out)
    print((args.out / "latest.md").read_text())
    log(f"benchmark took {result['wall_s']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
