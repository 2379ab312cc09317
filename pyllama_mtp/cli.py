"""The ``pyllama-mtp`` command (also ``python -m pyllama_mtp``)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from . import Model, Sampler, TextStream, __version__, fixtures, system_info


def _progress_bar(label: str):
    """A one-line progress bar on stderr for model loads."""
    last = [-1]

    def report(fraction: float) -> bool:
        percent = int(fraction * 100)
        if percent != last[0] and sys.stderr.isatty():
            bar = "#" * (percent // 4)
            print(f"\r{label} [{bar:<25}] {percent:3d}%", end="", file=sys.stderr, flush=True)
            if percent == 100:
                print(file=sys.stderr)
        last[0] = percent
        return True

    return report


def cmd_generate(args: argparse.Namespace) -> int:
    with Model.load(args.model, progress=_progress_bar("loading")) as model, \
            model.context(n_ctx=args.ctx_size, n_threads=args.threads) as ctx, \
            Sampler(args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    seed=args.seed) as sampler:
        prompt_tokens = model.tokenize(args.prompt)
        stream = TextStream(model)
        print(args.prompt, end="", flush=True)
        start = time.perf_counter()
        n_generated = 0
        first_token_at: Optional[float] = None
        for token in ctx.generate(prompt_tokens, max_tokens=args.n_predict, sampler=sampler):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            n_generated += 1
            print(stream.push(token), end="", flush=True)
        print(stream.flush())
        end = time.perf_counter()
        decode_s = end - (first_token_at or end)
        rate = (n_generated - 1) / decode_s if n_generated > 1 and decode_s > 0 else 0.0
        print(f"\n[{model.architecture}: {len(prompt_tokens)} prompt tokens, {n_generated} generated, "
              f"prompt+first token {((first_token_at or end) - start) * 1e3:.1f} ms, "
              f"decode {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    path = fixtures.make_model("qwen35", acceptance=0.75)
    print(f"demo model: {path}", file=sys.stderr)
    args.model = str(path)
    return cmd_generate(args)


def cmd_info(args: argparse.Namespace) -> int:
    for key, value in system_info().items():
        print(f"{key}: {value}")
    return 0


def _add_generation_options(parser: argparse.ArgumentParser, prompt_default: Optional[str]) -> None:
    parser.add_argument("-p", "--prompt", default=prompt_default, required=prompt_default is None,
                        help="text to continue")
    parser.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size (default 2048)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="top-p (1 = off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p (0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyllama-mtp",
        description="Multi-token-prediction speculative decoding on llama.cpp.")
    parser.add_argument("--version", action="version", version=f"pyllama_mtp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate text from a GGUF model")
    generate.add_argument("-m", "--model", required=True, help="GGUF file")
    _add_generation_options(generate, None)
    generate.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="make the project's demo model and generate with it")
    _add_generation_options(demo, "The quick brown fox")
    demo.set_defaults(func=cmd_demo)

    info = commands.add_parser("info", help="versions, backends and devices")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
