"""tools/gpu_check.sh --dry-run: the GPU check's plan and input checks run on any machine,
so the script is known to work before a GPU machine is at hand."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.backend_independent("the GPU check's plan")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "tools" / "gpu_check.sh"
if not SCRIPT.is_file():
    pytest.skip("not a source checkout", allow_module_level=True)


def dry_run(tmp_path, *args, fakes=()):
    """Run the dry run with a PATH of this Python's folder, the system's basics and, for
    each name in ``fakes``, a stand-in that prints what the real tool would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    answers = {"nvidia-smi": "echo 'NVIDIA H200, 9.0, 143771'",
               "nvcc": "echo 'Cuda compilation tools, release 12.8, V12.8.93'",
               "python3": f'exec "{sys.executable}" "$@"'}  # this test run's interpreter and packages
    for name in ("python3", *fakes):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{answers[name]}\n")
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_without_a_gpu_the_plan_is_printed_and_the_missing_inputs_named(tmp_path):
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "no NVIDIA GPU answers here" in out
    assert ("no nvcc" in out) != os.path.exists("/usr/local/cuda/bin/nvcc")  # its fallback
    assert "1. build" in out and "2. tests" in out and "3. bench" in out and "4. report" in out
    assert "PYLLAMA_MTP_TEST_BACKEND=cuda" in out
    # The benchmark read its own arguments (the package is installed in the test run).
    assert "bench plan: 1b model as f32, q8_0, q4_k_m; n_draft [2, 3]" in out
    assert "a real run here would stop" in out


def test_the_gpu_found_sets_the_architecture(tmp_path):
    out = dry_run(tmp_path, fakes=("nvidia-smi", "nvcc")).stdout
    assert "GPU: NVIDIA H200, compute capability 90" in out
    assert "CUDA toolkit: 12.8" in out
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in out
    assert "no NVIDIA GPU" not in out and "no nvcc" not in out
    out = dry_run(tmp_path, "--arch", "89", fakes=("nvidia-smi", "nvcc")).stdout
    assert "-DCMAKE_CUDA_ARCHITECTURES=89" in out


def test_a_bad_argument_is_refused(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--no-such-flag"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 64 and "unknown argument" in result.stderr
