"""Quantized models decode, plain and with MTP, so that a CPU kernel that crashes on this
machine (AMX, repacked layouts) fails the suite wherever it runs; repacking can be
turned off by argument, environment and command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyllama_mtp import Model, SpeculativeDecoder, fixtures, quantize

from helpers import EXACT, greedy_reference

FTYPES = ["q8_0", "q4_k_m"]
PROMPT = "The quick brown fox"
QUANTIZED_TIE = 0.05  # logit gap under which batched and one-row quantized kernels may disagree


@pytest.fixture(scope="module", params=[(arch, ftype) for arch in fixtures.ARCHES for ftype in FTYPES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def quantized(request, model_path):
    """A fixture wide enough for Q4_K's 256-wide blocks, quantized by llama.cpp's quantizer."""
    arch, ftype = request.param
    source = model_path(arch, n_embd=256)
    target = source.with_name(f"{source.stem}-{ftype}.gguf")
    if not target.exists():
        quantize(source, target, ftype)
    return target


def weight_buffers(model: Model) -> dict[str, int]:
    with model.context(n_ctx=64) as ctx:
        return {entry["buffer_type"]: entry["model"] for entry in ctx.memory_breakdown() if entry["model"]}


def test_quantized_models_generate_plain_and_with_mtp(quantized, backend_name):
    if backend_name == "vulkan":
        pytest.skip("backend vulkan: the weights live on the Vulkan device, so none of the CPU's quantized "
                    "kernels this guards runs (the CPU and RPC runs cover them)")
    with Model.load(quantized) as model:
        reference = greedy_reference(model, PROMPT, 48, n_ctx=256)
        with model.context(n_ctx=256, **EXACT) as ctx:
            plain = list(ctx.generate(PROMPT, max_tokens=48, stop_at_eog=False))
        with SpeculativeDecoder.create(model, n_ctx=256, n_draft=3, **EXACT) as decoder:
            drafted = list(decoder.generate(PROMPT, max_tokens=48, stop_at_eog=False))
            stats = decoder.stats
    assert plain == reference.tokens
    assert len(drafted) == 48 and stats.drafted > 0 and stats.accepted > 0, stats
    # Quantized kernels round a batched verify and a one-row decode differently (llama.cpp's
    # own loop too): MTP may leave the plain text only where its top two logits nearly tie.
    diverged = next((i for i, (a, b) in enumerate(zip(drafted, plain)) if a != b), None)
    assert diverged is None or reference.margins[diverged] < QUANTIZED_TIE, (diverged, reference.margins[diverged])


@pytest.mark.backend_independent("repacking concerns weights kept on the CPU")
def test_repacking_can_be_turned_off(model_path, tmp_path, monkeypatch):
    path = tmp_path / "q4_k_m.gguf"
    quantize(model_path("qwen35", n_embd=256), path, "q4_k_m")
    with Model.load(path) as model:
        default = weight_buffers(model)
    if "CPU_REPACK" not in default:
        pytest.skip(f"llama.cpp repacks no Q4_K weights on this CPU ({sorted(default)})")
    with Model.load(path, repack=False) as model:
        assert "CPU_REPACK" not in weight_buffers(model)
    monkeypatch.setenv("PYLLAMA_MTP_REPACK", "0")
    with Model.load(path) as model:
        assert "CPU_REPACK" not in weight_buffers(model)
    with Model.load(path, repack=True) as model:  # an argument outranks the environment
        assert "CPU_REPACK" in weight_buffers(model)
    monkeypatch.delenv("PYLLAMA_MTP_REPACK")
    # The command line's --no-repack: the same through the environment, for every command.
    script = ("import os, sys\nfrom pyllama_mtp import cli\n"
              "rc = cli.main(['--no-repack', 'info'])\nprint('REPACK=' + os.environ.get('PYLLAMA_MTP_REPACK', ''))")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "REPACK=0" in shown.stdout, shown.stderr[-2000:]
