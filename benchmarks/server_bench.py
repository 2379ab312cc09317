"""Our server against llama.cpp's own llama-server, on the same model and the same load.

    pip install ".[bench,server]" -C cmake.define.PYLLAMA_MTP_NATIVE_TOOLS=ON
    python benchmarks/server_bench.py [--clients 1 4 8] [--tokens 64] [--requests 2] [--repeats 3]

For a high- and a low-acceptance fixture (qwen35, f32), each server in turn (ours with MTP,
adaptive by default; ours --no-mtp; llama-server --spec-type draft-mtp; llama-server
without speculation; all with --parallel 8 and the same threads) serves N concurrent
clients, each sending ``--requests`` greedy streamed completions of ``--tokens`` tokens
over 127.0.0.1. Measured: aggregate completion tokens/s (all tokens / wall time of the
load, prompts included) and the median time to first token. Repetitions are interleaved
(every server once, then again); each goal's ratio is the median of the per-repetition
ratios, with their range. A multi-turn case (``--turns``, one
client) sends a conversation whose prompt grows by each answer and a few words: the
later turns' time to first token shows what the server reuses of the history (prefix
caching; on the hybrid qwen35, recurrent-state checkpoints). Writes
benchmarks/results/server_latest.{json,md,png} and prints each goal of issue 26, met or
not.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from pyllama_mtp import fixtures

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODELS = {"high acceptance (0.9)": 0.9, "low acceptance (0.4)": 0.4}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _llama_server() -> str:
    found = sorted(REPO.glob("build/*/bin/llama-server"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit("no llama-server in build/*/bin: install with -C cmake.define.PYLLAMA_MTP_NATIVE_TOOLS=ON")
    return str(found[-1])


def server_commands(model: str, port: int, threads: int, parallel: int, n_ctx: int, draft: int) -> dict:
    ours = [sys.executable, "-m", "pyllama_mtp", "serve", "-m", model, "--port", str(port), "--threads", str(threads),
            "--parallel", str(parallel), "--ctx-size", str(n_ctx), "--draft", str(draft)]
    native = [_llama_server(), "-m", model, "--port", str(port), "--host", "127.0.0.1", "-t", str(threads),
              "-np", str(parallel), "-c", str(n_ctx), "--no-webui", "-lv", "0"]
    return {
        "ours MTP": ours,
        "ours no-MTP": ours + ["--no-mtp"],
        "llama-server MTP": native + ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(draft)],
        "llama-server no-MTP": native,
    }


def start(command: list, url: str) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 180 s")


def one_request(url: str, prompt: str, tokens: int) -> tuple[int, float, str]:
    """(completion tokens, seconds to the first token, text) of one streamed greedy completion."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    start, first, produced, text = time.perf_counter(), None, 0, []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode(errors='replace')}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - start if first is None else first
                text.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                produced = chunk["usage"]["completion_tokens"]
    return produced, first if first is not None else float("nan"), "".join(text)


def load(url: str, clients: int, requests: int, tokens: int) -> tuple[float, float]:
    """(aggregate tokens/s, median TTFT s) of ``clients`` concurrent clients."""
    def client(index: int) -> list:
        return [one_request(url, f"Client {index} request {r}: once upon a time", tokens) for r in range(requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [item for batch in pool.map(client, range(clients)) for item in batch]
    wall = time.perf_counter() - start
    return sum(n for n, _, _ in results) / wall, statistics.median(t for _, t, _ in results)


def engine_seconds(url: str, server: str) -> tuple[float, float]:
    """(busy, compute) seconds of our engine thread so far, from /metrics; (0, 0) for
    llama-server."""
    if not server.startswith("ours"):
        return 0.0, 0.0
    text = httpx.get(url + "/metrics", timeout=10).text
    value = {name: float(v) for name, v in (line.split() for line in text.splitlines()
                                             if line and not line.startswith("#"))}
    return value["pyllama_mtp_engine_busy_seconds_total"], value["pyllama_mtp_engine_compute_seconds_total"]


def python_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The part of the engine's working time that was not llama.cpp computing."""
    busy = after[0] - before[0]
    return 1.0 - (after[1] - before[1]) / busy if busy > 0 else float("nan")


def multi_turn(url: str, system: str, turns: int, tokens: int) -> list[float]:
    """TTFT (s) of each turn of one conversation whose history grows: each prompt is the
    last one, its answer and a few new words (what a chat client sends)."""
    history, ttfts = system, []
    for turn in range(turns):
        prompt = history + f"\nUser: and what happened in part {turn + 1}?\nAssistant:"
        _, ttft, text = one_request(url, prompt, tokens)
        history = prompt + text
        ttfts.append(ttft)
    return ttfts


def system_prompt(model: str, n_tokens: int) -> str:
    """A text of about ``n_tokens`` tokens of the model's vocabulary."""
    from pyllama_mtp import Model

    sentence = "The story so far: a long account of what everyone said and did, told in order. "
    with Model.load(model, n_gpu_layers=0) as loaded:
        per = len(loaded.tokenize(sentence, add_special=False))
    return sentence * max(1, round(n_tokens / per))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft", type=int, default=3)
    parser.add_argument("--n-embd", type=int, default=1024)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--turns", type=int, default=4, help="turns of the multi-turn case (0: none; each slot holds 2048 tokens)")
    parser.add_argument("--history", type=int, default=750, help="tokens of the multi-turn case's first prompt")
    args = parser.parse_args()
    parallel = max(args.clients)
    rows = []
    for label, acceptance in MODELS.items():
        model = fixtures.make_model("qwen35", n_embd=args.n_embd, n_layer=args.n_layer, acceptance=acceptance)
        system = system_prompt(str(model), args.history)
        for repeat in range(args.repeats):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            for name, command in server_commands(model, port, args.threads, parallel, 2048 * parallel,
                                                 args.draft).items():
                process = start(command, url)
                try:
                    load(url, 1, 1, 8)  # warm-up
                    for clients in args.clients:
                        before = engine_seconds(url, name)
                        rate, ttft = load(url, clients, args.requests, args.tokens)
                        after = engine_seconds(url, name)
                        rows.append({"model": label, "server": name, "clients": clients, "repeat": repeat,
                                     "tokens_per_s": rate, "ttft_s": ttft,
                                     "python_share": python_share(before, after)})
                        print(f"{label:22} #{repeat} {name:20} {clients} clients: {rate:7.1f} tok/s, "
                              f"TTFT {ttft * 1e3:6.0f} ms", flush=True)
                    if args.turns:
                        ttfts = multi_turn(url, system, args.turns, args.tokens)
                        rows.append({"model": label, "server": name, "clients": 0, "repeat": repeat,
                                     "first_turn_ttft_s": ttfts[0], "later_turn_ttft_s": statistics.median(ttfts[1:])})
                        print(f"{label:22} #{repeat} {name:20} multi-turn TTFT: "
                              + " ".join(f"{t * 1e3:.0f}" for t in ttfts) + " ms", flush=True)
                finally:
                    process.terminate()
                    process.wait(timeout=30)
    report(rows, args)


def _median(rows: list, key: str, **where: Any) -> float:
    return statistics.median(r[key] for r in rows if all(r[k] == v for k, v in where.items()))


def _per_repeat(rows: list, model: str, clients: int, key: str) -> dict:
    """{repeat: {server: value}} of one measurement."""
    out: dict = {}
    for r in rows:
        if r["model"] == model and r["clients"] == clients:
            out.setdefault(r["repeat"], {})[r["server"]] = r[key]
    return out


def _ratios(rows: list, model: str, clients: int, key: str, ratio) -> list:
    """ratio(values of one repetition by server), for each repetition."""
    return [ratio(values) for _, values in sorted(_per_repeat(rows, model, clients, key).items())]


def report(rows: list, args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "server_latest.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    servers = list(dict.fromkeys(r["server"] for r in rows))
    lines = [f"Medians of {args.repeats} interleaved repetitions; {args.requests} streamed greedy requests of "
             f"{args.tokens} tokens per client; {args.threads} threads.", "",
             "| model | server | clients | tokens/s | median TTFT (ms) | engine time not in llama.cpp |",
             "|---|---|---|---|---|---|"]
    for model in MODELS:
        for server in servers:
            for clients in args.clients:
                where = {"model": model, "server": server, "clients": clients}
                share = _median(rows, "python_share", **where) if server.startswith("ours") else None
                lines.append(f"| {model} | {server} | {clients} | {_median(rows, 'tokens_per_s', **where):.1f} | "
                             f"{_median(rows, 'ttft_s', **where) * 1e3:.0f} | "
                             f"{'-' if share is None else f'{share:.1%}'} |")
    if args.turns:
        lines += ["", f"Multi-turn: one client, {args.turns} turns, a first prompt of about {args.history} tokens, "
                  "each next prompt the last one + its answer + a few words.", "",
                  "| model | server | first-turn TTFT (ms) | later turns, median TTFT (ms) |", "|---|---|---|---|"]
        for model in MODELS:
            for server in servers:
                where = {"model": model, "server": server, "clients": 0}
                lines.append(f"| {model} | {server} | {_median(rows, 'first_turn_ttft_s', **where) * 1e3:.0f} | "
                             f"{_median(rows, 'later_turn_ttft_s', **where) * 1e3:.0f} |")
    high, low = list(MODELS)
    ours, native, native_plain = "ours MTP", "llama-server MTP", "llama-server no-MTP"
    goals = []
    for clients in args.clients:
        goals.append((f"ours MTP / better of llama-server's two, {clients} clients, {high}", 1.0,
                      _ratios(rows, high, clients, "tokens_per_s",
                              lambda v: v[ours] / max(v[native], v[native_plain]))))
    for clients in args.clients:
        goals.append((f"ours MTP / llama-server no-MTP, {clients} clients, {low}", 0.97,
                      _ratios(rows, low, clients, "tokens_per_s", lambda v: v[ours] / v[native_plain])))
    top = max(args.clients)
    goals.append((f"llama-server's better median TTFT / ours MTP, {top} clients, {high}", 1.0,
                  _ratios(rows, high, top, "ttft_s", lambda v: min(v[native], v[native_plain]) / v[ours])))
    if args.turns:
        goals.append((f"llama-server MTP / ours MTP, later-turn TTFT, {high} (ours at most 1.2x)", 1 / 1.2,
                      _ratios(rows, high, 0, "later_turn_ttft_s", lambda v: v[native] / v[ours])))
        first = _ratios(rows, high, 0, "first_turn_ttft_s", lambda v: v[ours])
        later = _ratios(rows, high, 0, "later_turn_ttft_s", lambda v: v[ours])
        goals.append((f"ours MTP first-turn / later-turn TTFT, {high} (later at most 0.2x)", 5.0,
                      [f / t for f, t in zip(first, later)]))
    lines += ["", "| goal | target | ratio (median) | range | met |", "|---|---|---|---|---|"]
    for goal, target, ratios in goals:
        median = statistics.median(ratios)
        lines.append(f"| {goal} | >= {target:.2f} | {median:.2f} | {min(ratios):.2f}-{max(ratios):.2f} | "
                     f"{'yes' if median >= target else 'no'} |")
    (RESULTS / "server_latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, len(MODELS), figsize=(11, 4), sharey=True)
    for axis, model in zip(axes, MODELS):
        for server in servers:
            points = [(clients, _median(rows, "tokens_per_s", model=model, server=server, clients=clients))
                      for clients in args.clients]
            axis.plot(*zip(*points), marker="o", label=server)
        axis.set_title(model)
        axis.set_xlabel("concurrent clients")
        axis.set_xticks(args.clients)
    axes[0].set_ylabel("aggregate tokens/s")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "server_latest.png", dpi=100)


if __name__ == "__main__":
    main()
