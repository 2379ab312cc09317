"""Oracle: our MTP decoder against llama.cpp's own C++ loop from the same vendored tree.

``llama-speculative-simple --spec-type draft-mtp`` is built into the build folder with
``-C cmake.define.PYLLAMA_MTP_NATIVE_TOOLS=ON`` (CI does it; it is never part of the
wheel). Without it these tests are reported as skipped, with the reason.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

from pyllama_mtp import Model, SpeculativeDecoder

REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox"
N_PREDICT = 200


def native_tool(name: str) -> pathlib.Path:
    """A llama.cpp tool built beside the binding (PYLLAMA_MTP_NATIVE_TOOLS=ON)."""
    folders = [pathlib.Path(os.environ["PYLLAMA_MTP_TOOLS_DIR"])] if "PYLLAMA_MTP_TOOLS_DIR" in os.environ \
        else sorted(REPO.glob("build/*/bin"))
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"{name} is not built (pip install . -C cmake.define.PYLLAMA_MTP_NATIVE_TOOLS=ON): "
                "no native oracle")


def native_mtp_output(model_path: pathlib.Path, n_draft: int) -> bytes:
    tool = native_tool("llama-speculative-simple")
    # Both sides on the CPU backend in every run: the oracle checks our loop against
    # upstream's, not a backend (test_backends does that). The native tool crashed
    # (SIGSEGV) on Mesa's llvmpipe, so it never sees the software Vulkan device.
    env = {k: v for k, v in os.environ.items() if k != "GGML_VK_VISIBLE_DEVICES"}
    result = subprocess.run(
        [str(tool), "-m", str(model_path), "--spec-type", "draft-mtp", "--spec-draft-n-max", str(n_draft),
         "-p", PROMPT, "-n", str(N_PREDICT), "--temp", "0", "-t", "1", "-fa", "off", "-c", "2048",
         "--seed", "1", "-ngl", "0"],
        capture_output=True, timeout=300, check=False, env=env)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout


@pytest.mark.parametrize("n_draft", [1, 3])
def test_same_tokens_as_llama_speculative_simple(model_path, arch, n_draft):
    path = model_path(arch)
    native = native_mtp_output(path, n_draft)
    with Model.load(path, n_gpu_layers=0) as model:
        with SpeculativeDecoder.create(model, n_ctx=2048, n_draft=n_draft, n_threads=1,
                                       flash_attn=False) as decoder:
            ours = list(decoder.generate(PROMPT, max_tokens=N_PREDICT, stop_at_eog=False))
        # The tool prints each piece with printf("%s"): a NUL byte token prints as nothing.
        ours_bytes = b"".join(model.token_to_piece(t) for t in ours).replace(b"\x00", b"")
    # The tool prints the prompt, then the generated pieces (it may overshoot -n by a
    # draft), around blank lines and, on some backends, device messages.
    start = native.find(PROMPT.encode())
    assert start >= 0, native[:300]
    generated = native[start + len(PROMPT):].rstrip(b"\n")
    common = min(len(generated), len(ours_bytes))
    assert common >= N_PREDICT // 2
    assert generated[:common] == ours_bytes[:common]
