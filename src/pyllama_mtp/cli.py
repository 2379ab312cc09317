"""The ``pyllama-mtp`` command (also ``python -m pyllama_mtp``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

from . import Model, Sampler, SpeculativeDecoder, TextStream, __version__, fixtures, gguf_tools, system_info
from ._preflight import REPACK_SWITCH
from .errors import LlamaError
from .model import quantize


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


def _decode_plain(model: Model, args: argparse.Namespace, prompt_tokens: list, echo: bool) -> tuple:
    """Plain decoding; returns (tokens, decode tokens/s)."""
    with model.context(n_ctx=args.ctx_size, n_threads=args.threads) as ctx, \
            Sampler(args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed) as sampler:
        return _stream(model, ctx.generate(prompt_tokens, max_tokens=args.n_predict, sampler=sampler), echo)


def _decode_mtp(model: Model, args: argparse.Namespace, prompt_tokens: list, echo: bool) -> tuple:
    """MTP speculative decoding; returns (tokens, decode tokens/s, stats)."""
    with SpeculativeDecoder.create(model, n_ctx=args.ctx_size, n_draft=args.draft, n_threads=args.threads,
                                   temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                                   min_p=args.min_p, seed=args.seed, adaptive=getattr(args, "adaptive", False),
                                   lookup_ngram=getattr(args, "lookup", 0)) as decoder:
        tokens, rate = _stream(model, decoder.generate(prompt_tokens, max_tokens=args.n_predict), echo)
        return tokens, rate, decoder.stats


def _stream(model: Model, token_iter, echo: bool) -> tuple:
    """Consume a token stream (printing it if echo); rate excludes the prompt and first token."""
    stream = TextStream(model)
    tokens = []
    first_at = None
    for token in token_iter:
        if first_at is None:
            first_at = time.perf_counter()
        tokens.append(token)
        if echo:
            print(stream.push(token), end="", flush=True)
    end = time.perf_counter()
    if echo:
        print(stream.flush(), flush=True)
    rate = (len(tokens) - 1) / (end - first_at) if first_at and len(tokens) > 1 and end > first_at else 0.0
    return tokens, rate


def cmd_generate(args: argparse.Namespace) -> int:
    with Model.load(args.model, progress=_progress_bar("loading"), load_mtp=not args.no_mtp) as model:
        prompt_tokens = model.tokenize(args.prompt)
        use_mtp = model.mtp_loaded and not args.no_mtp
        print(args.prompt, end="", flush=True)
        if use_mtp:
            _, rate, stats = _decode_mtp(model, args, prompt_tokens, echo=True)
            print(f"[{model.architecture}, MTP n_draft={args.draft}: {rate:.1f} tokens/s, acceptance "
                  f"{stats.acceptance:.1%}, mean accepted length {stats.mean_accepted_length:.2f}]",
                  file=sys.stderr)
            if stats.lookup_steps:
                print(f"[n-gram lookup drafted {stats.lookup_steps} of {stats.steps} steps, "
                      f"{stats.lookup_acceptance:.1%} accepted; MTP {stats.mtp_acceptance:.1%}]", file=sys.stderr)
        else:
            _, rate = _decode_plain(model, args, prompt_tokens, echo=True)
            print(f"[{model.architecture}, no MTP: {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Plain greedy decoding, then MTP, on the project's own model: same text, two speeds."""
    print("making the demo model (cached after the first run)...", file=sys.stderr)
    path = fixtures.make_demo_model()
    args.temp = 0.0
    with Model.load(path, progress=_progress_bar("loading")) as model:
        print(f"demo model: {model.architecture}, {model.n_params / 1e6:.1f} M parameters, "
              f"{model.n_layer_nextn} MTP block(s); {path}", file=sys.stderr)
        prompt_tokens = model.tokenize(args.prompt)
        print(f"\nplain decoding:\n{args.prompt}", end="")
        plain_tokens, plain_rate = _decode_plain(model, args, prompt_tokens, echo=True)
        print(f"\nMTP speculative decoding (n_draft {args.draft}):\n{args.prompt}", end="")
        mtp_tokens, mtp_rate, stats = _decode_mtp(model, args, prompt_tokens, echo=True)
    same = "identical to" if mtp_tokens == plain_tokens else "DIFFERENT from"
    speedup = mtp_rate / plain_rate if plain_rate else 0.0
    print(f"\n{'':16}{'tokens/s':>9}{'speed-up':>10}  acceptance\n"
          f"{'plain':16}{plain_rate:9.1f}{1.0:9.2f}x\n"
          f"{f'MTP, n_draft {args.draft}':16}{mtp_rate:9.1f}{speedup:9.2f}x  {stats.acceptance:.1%} "
          f"(mean accepted length {stats.mean_accepted_length:.2f})\n"
          f"MTP output ({len(mtp_tokens)} tokens): {same} plain greedy decoding")
    return 0 if mtp_tokens == plain_tokens else 1


def cmd_info(args: argparse.Namespace) -> int:
    for key, value in system_info().items():
        print(f"{key}: {value}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    summary = gguf_tools.inspect(args.model)
    print(summary)
    if summary.n_mtp_layers:
        print(f"  MTP memory at n_ctx {args.ctx_size}: {summary.mtp_memory(args.ctx_size) / (1 << 20):.1f} MiB "
              f"(weights {summary.mtp_tensor_bytes / (1 << 20):.1f} MiB + its KV cache)")
    return 0


def cmd_strip(args: argparse.Namespace) -> int:
    print(gguf_tools.strip(args.model, args.output))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    print(gguf_tools.extract_mtp(args.model, args.output))
    return 0


def cmd_graft(args: argparse.Namespace) -> int:
    print(gguf_tools.graft(args.mtp_from, args.into, args.output))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Plain decoding against MTP at each n_draft on one model, same prompt, greedy."""
    args.temp, args.top_k, args.top_p, args.min_p = 0.0, 0, 1.0, 0.0
    with Model.load(args.model, progress=_progress_bar("loading")) as model:
        prompt_tokens = model.tokenize(args.prompt)
        _, plain_rate = _decode_plain(model, args, prompt_tokens, echo=False)
        print(f"plain: {plain_rate:.1f} tokens/s")
        if not model.mtp_loaded:
            print("no MTP layers: nothing more to compare")
            return 0
        for n_draft in args.drafts:
            args.draft = n_draft
            _, rate, stats = _decode_mtp(model, args, prompt_tokens, echo=False)
            ratio = rate / plain_rate if plain_rate else 0.0
            print(f"MTP n_draft={n_draft}: {rate:.1f} tokens/s ({ratio:.2f}x plain), acceptance "
                  f"{stats.acceptance:.1%}, mean accepted length {stats.mean_accepted_length:.2f}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    quantize(args.model, args.output, args.type, n_threads=args.threads)
    print(gguf_tools.inspect(args.output))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as exc:  # starlette / uvicorn missing
        print(f"pyllama-mtp serve: {exc.name or exc} is not installed: pip install 'pyllama_mtp[server]'",
              file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"pyllama-mtp serve: listening on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, alias=args.alias,
          n_gpu_layers=args.n_gpu_layers, parallel=args.parallel, n_ctx=args.ctx_size, n_draft=args.draft,
          adaptive=not args.fixed_draft, mtp=not args.no_mtp, queue_size=args.queue_size,
          max_checkpoints=args.ctx_checkpoints, checkpoint_every=args.checkpoint_every, n_threads=args.threads)
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
    parser.add_argument("--draft", type=int, default=3, help="MTP tokens drafted per step (default 3)")
    parser.add_argument("--adaptive", action="store_true",
                        help="choose the draft length per step from the measured acceptance (at most --draft)")
    parser.add_argument("--lookup", type=int, default=0, metavar="N",
                        help="draft from the text itself where its last N tokens occurred before "
                             "(n-gram lookup, up to 8 tokens); MTP drafts otherwise (default 0: off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyllama-mtp",
        description="Multi-token-prediction speculative decoding on llama.cpp.")
    parser.add_argument("--version", action="version", version=f"pyllama_mtp {__version__}")
    parser.add_argument("--no-repack", action="store_true",
                        help="keep quantized weights in their file layout (no repacking into the CPU's "
                             "AMX / interleaved buffers); the same as PYLLAMA_MTP_REPACK=0")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate text from a GGUF model")
    generate.add_argument("-m", "--model", required=True, help="GGUF file")
    generate.add_argument("--no-mtp", action="store_true", help="plain decoding; MTP layers are not loaded")
    _add_generation_options(generate, None)
    generate.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="make the project's demo model and generate with it")
    _add_generation_options(demo, "The quick brown fox")
    demo.set_defaults(func=cmd_demo)

    info = commands.add_parser("info", help="versions, backends and devices")
    info.set_defaults(func=cmd_info)

    inspect = commands.add_parser("inspect", help="architecture, sizes, types and MTP layers of a GGUF")
    inspect.add_argument("model", help="GGUF file")
    inspect.add_argument("-c", "--ctx-size", type=int, default=4096,
                         help="context size for the MTP memory estimate (default 4096)")
    inspect.set_defaults(func=cmd_inspect)

    strip = commands.add_parser("strip", help="write a copy without the MTP layers")
    strip.add_argument("model", help="GGUF file with MTP layers")
    strip.add_argument("-o", "--output", required=True, help="output GGUF")
    strip.set_defaults(func=cmd_strip)

    extract = commands.add_parser("extract-mtp", help="write only the MTP layers (a donor for graft)")
    extract.add_argument("model", help="GGUF file with MTP layers")
    extract.add_argument("-o", "--output", required=True, help="output GGUF")
    extract.set_defaults(func=cmd_extract)

    graft = commands.add_parser("graft", help="copy MTP layers into the same model without them")
    graft.add_argument("--mtp-from", required=True, help="GGUF with MTP layers (full model or extract-mtp output)")
    graft.add_argument("--into", required=True, help="GGUF of the same model without MTP layers")
    graft.add_argument("-o", "--output", required=True, help="output GGUF")
    graft.set_defaults(func=cmd_graft)

    bench = commands.add_parser("bench", help="plain vs MTP tokens/s at several draft lengths "
                                              "(benchmarks/mtp_bench.py has the full benchmark)")
    bench.add_argument("-m", "--model", required=True, help="GGUF file")
    bench.add_argument("-p", "--prompt", default="The quick brown fox", help="text to continue")
    bench.add_argument("-n", "--n-predict", type=int, default=128, help="tokens per run (default 128)")
    bench.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size (default 2048)")
    bench.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    bench.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    bench.add_argument("--drafts", type=int, nargs="+", default=[1, 2, 3, 4], help="n_draft values (default 1 2 3 4)")
    bench.set_defaults(func=cmd_bench)

    server = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching and MTP "
                                               "(needs the server extra)")
    server.add_argument("-m", "--model", required=True, help="GGUF file")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    server.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    server.add_argument("--alias", default=None, help="model name in the API (default: the file name)")
    server.add_argument("-np", "--parallel", type=int, default=4, help="sequence slots (default 4)")
    server.add_argument("-c", "--ctx-size", type=int, default=8192,
                        help="context size shared by the slots (default 8192)")
    server.add_argument("--draft", type=int, default=3, help="longest MTP draft per step (default 3)")
    drafting = server.add_mutually_exclusive_group()
    drafting.add_argument("--adaptive", action="store_true",
                          help="draft lengths planned for the batch each step, at most --draft (the default)")
    drafting.add_argument("--fixed-draft", action="store_true", help="always draft --draft tokens")
    server.add_argument("--no-mtp", action="store_true", help="plain decoding, no MTP")
    server.add_argument("--queue-size", type=int, default=64, help="requests that may wait for a slot (default 64)")
    server.add_argument("--ctx-checkpoints", type=int, default=8,
                        help="recurrent-state checkpoints kept per slot for prefix reuse on hybrid models "
                             "(default 8; 0: none)")
    server.add_argument("--checkpoint-every", type=int, default=2048,
                        help="also checkpoint every N tokens of a long prompt (default 2048)")
    server.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1, help="layers on the GPU (default all)")
    server.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    server.set_defaults(func=cmd_serve)

    quant = commands.add_parser("quantize", help="quantize a GGUF with llama.cpp (MTP layers included)")
    quant.add_argument("model", help="GGUF file")
    quant.add_argument("-o", "--output", required=True, help="output GGUF")
    quant.add_argument("--type", default="q8_0", help="q8_0 (default), q4_k_m, f16, ...")
    quant.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    quant.set_defaults(func=cmd_quantize)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_repack:  # for every command, the server's loads included
        os.environ[REPACK_SWITCH] = "0"
    try:
        return args.func(args)
    except LlamaError as exc:  # a bad file or argument: one line, no traceback
        print(f"pyllama-mtp {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
