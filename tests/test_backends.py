"""Backends: what the build has, which device a run uses, and equality with the CPU."""

from __future__ import annotations

import numpy as np
import pytest

import pyllama_mtp
from pyllama_mtp import InvalidArgumentError, Model, SpeculativeDecoder

from helpers import EXACT, PROMPT, greedy_reference, plain_greedy


def weight_buffers(model) -> set[str]:
    with model.context(n_ctx=64) as ctx:
        return {e["buffer_type"] for e in ctx.memory_breakdown() if e["model"] > 0}


def test_devices_and_compiled_backends():
    info = pyllama_mtp.system_info()
    assert "ggml-cpu" in info["backends"]
    names = [d.name for d in pyllama_mtp.devices()]
    assert "CPU" in names
    for device in pyllama_mtp.devices():
        assert device.type in {"cpu", "gpu", "igpu", "accel"}
        assert device.memory_total >= device.memory_free >= 0


def test_this_run_really_uses_its_backend(model, backend_device, backend_name):
    buffers = weight_buffers(model)
    if backend_name == "cpu":
        assert all("CPU" in b for b in buffers), buffers
    else:
        assert any(b.startswith(backend_device.split("[")[0]) for b in buffers), (backend_device, buffers)


def test_unknown_device_is_rejected(model_path):
    with pytest.raises(InvalidArgumentError, match="no device named"):
        Model.load(model_path("qwen35"), devices=["NoSuchGPU7"])


def test_greedy_tokens_equal_the_cpu_backend(model_path, arch, backend_device, backend_name):
    if backend_name == "cpu":
        pytest.skip("this run is the CPU reference itself")
    path = model_path(arch)
    with Model.load(path, n_gpu_layers=0) as on_cpu:
        want = greedy_reference(on_cpu, PROMPT, 200, n_ctx=512)
    with Model.load(path) as on_backend:
        got = greedy_reference(on_backend, PROMPT, 200, n_ctx=512)
    if got.tokens != want.tokens:
        i = next(i for i, (a, b) in enumerate(zip(got.tokens, want.tokens)) if a != b)
        delta = float(np.max(np.abs(got.logits[i] - want.logits[i])))
        pytest.fail(f"{backend_device} diverges from the CPU at token {i}: {got.tokens[i]} vs {want.tokens[i]}; "
                    f"max |logit difference| there {delta:.4g}")


def test_mtp_layers_on_another_device(model_path, arch):
    """The draft (MTP layers) on the CPU while the trunk is wherever the run puts it."""
    path = model_path(arch)
    with Model.load(path, mtp_device="CPU") as model:
        expected = plain_greedy(model, PROMPT, 150, n_ctx=1024)
        with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=3, **EXACT) as dec:
            assert list(dec.generate(PROMPT, max_tokens=150, stop_at_eog=False)) == expected
            assert dec.stats.accepted > 0
