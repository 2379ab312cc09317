"""What the pre-flight costs: Model.load (and a first context) with and without it.

    python benchmarks/preflight_cost.py [--reps 5] [--full] [--cold]

For each model, loads with ``preflight=True`` and ``preflight=False`` alternate (A B A B
...), the pre-flight's cache emptied before each, the file in the page cache for both.
Reports median wall time of load + one context (2048 positions) and the helper's peak
resident memory (it is a separate process: it never adds to the caller's). ``--full``
adds the 391 M-parameter benchmark model of mtp_bench.py (f32, 1.5 GB; written once).
``--cold`` empties the page cache before each load instead (Linux, as root), as for a
file read for the first time.
Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

from pyllama_mtp import Model, _preflight, fixtures

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mtp_bench import FULL_MODEL  # noqa: E402 - the one definition of the benchmark model


def helper_peak_mib(path: pathlib.Path) -> float:
    """The helper's own peak RSS, read by /usr/bin/time: getrusage(RUSAGE_CHILDREN) would
    count the parent's memory, which a child shares until it executes the helper."""
    timer = shutil.which("time") or ("/usr/bin/time" if pathlib.Path("/usr/bin/time").exists() else None)
    if timer is None:
        return float("nan")
    specs = [_preflight.context_spec(c) for c in Model._load_time_contexts(
        {"n_layer_nextn": 1, "architecture": "qwen35"}, True)]
    run = subprocess.run([timer, "-f", "%M", str(_preflight.HELPER), str(path), "1", "2", "1", *specs],
                         capture_output=True, text=True, check=True)
    return int(run.stderr.strip().splitlines()[-1]) / 1024


def drop_page_cache() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


def measure(path: pathlib.Path, reps: int, cold: bool = False) -> dict:
    timings: dict[bool, list[float]] = {True: [], False: []}
    helper_only: list[float] = []
    for _ in range(reps):
        for preflight in (True, False):
            _preflight._cache.clear()
            if cold:
                drop_page_cache()
            start = time.perf_counter()
            with Model.load(path, preflight=preflight) as model, model.context(n_ctx=2048):
                pass
            timings[preflight].append(time.perf_counter() - start)
        _preflight._cache.clear()
        if cold:
            drop_page_cache()
        start = time.perf_counter()
        _preflight.Preflight(str(path), True).check_load(Model._load_time_contexts(
            {"n_layer_nextn": 1, "architecture": "qwen35"}, True), compute=2)
        helper_only.append(time.perf_counter() - start)
    on, off = statistics.median(timings[True]), statistics.median(timings[False])
    return {"model": path.name, "bytes": path.stat().st_size, "load_with_s": on, "load_without_s": off,
            "extra_s": on - off, "helper_run_s": statistics.median(helper_only),
            "ratio": on / off, "helper_peak_rss_mib": helper_peak_mib(path)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="also the 391 M-parameter model")
    parser.add_argument("--cold", action="store_true", help="empty the page cache before each load (root)")
    args = parser.parse_args()
    models = [fixtures.make_model("qwen35"), fixtures.make_model("glm4moe")]
    if args.full:
        models.append(fixtures.make_model(**FULL_MODEL, eps=fixtures.DEMO_EPS_TABLE[4][0] * 1.06))
    rows = [measure(path, args.reps, args.cold) for path in models]
    print("| model | size | load + context, pre-flight on | off | extra | helper alone | helper peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model'][:40]} | {row['bytes'] / 2**20:.0f} MiB | {row['load_with_s'] * 1000:.0f} ms | "
              f"{row['load_without_s'] * 1000:.0f} ms | {row['extra_s'] * 1000:+.0f} ms | "
              f"{row['helper_run_s'] * 1000:.0f} ms | {row['helper_peak_rss_mib']:.0f} MiB |")
    print(json.dumps(rows, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
