"""Oracle: our MTP decoder against llama.cpp's own C++ loop from the same vendored tree.

``llama-speculative-simple --spec-type draft-mtp`` is built by
``tools/build_native_tools.sh`` (CI does it; it is never part of the wheel). Without it
these tests are reported as skipped, with the reason.
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
    folder = pathlib.Path(os.environ.get("PYLLAMA_MTP_NATIVE_TOOLS", REPO / "build" / "native-tools" / "bin"))
    tool = folder / name
    if not tool.is_file():
        pytest.skip(f"{name} is not built (run tools/build_native_tools.sh): no native oracle")
    return tool


def native_mtp_output(model_path: pathlib.Path, n_draft: int) -> bytes:
    tool = native_tool("llama-speculative-simple")
    result = subprocess.run(
        [str(tool), "-m", str(model_path), "--spec-type", "draft-mtp", "--spec-draft-n-max", str(n_draft),
         "-p", PROMPT, "-n", str(N_PREDICT), "--temp", "0", "-t", "1", "-fa", "off", "-c", "2048",
         "--seed", "1"],
        capture_output=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout


@pytest.mark.parametrize("n_draft", [1, 3])
def test_same_tokens_as_llama_speculative_simple(model_path, arch, n_draft):
    path = model_path(arch)
    native = native_mtp_output(path, n_draft)
    with Model.load(path) as model:
        with SpeculativeDecoder.create(model, n_ctx=2048, n_draft=n_draft, n_threads=1,
                                       flash_attn=False) as decoder:
            ours = list(decoder.generate(PROMPT, max_tokens=N_PREDICT, stop_at_eog=False))
        # The tool prints each piece with printf("%s"): a NUL byte token prints as nothing.
        ours_bytes = b"".join(model.token_to_piece(t) for t in ours).replace(b"\x00", b"")
    # The tool prints blank lines, the prompt, then the generated pieces (it may overshoot
    # -n by a draft), then blank lines.
    native = native.lstrip(b"\n")
    assert native.startswith(PROMPT.encode()), native[:200]
    generated = native[len(PROMPT):].rstrip(b"\n")
    common = min(len(generated), len(ours_bytes))
    assert common >= N_PREDICT // 2
    assert generated[:common] == ours_bytes[:common]
