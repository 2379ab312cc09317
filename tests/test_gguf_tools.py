"""GGUF MTP tools: inspect, strip, extract-mtp, graft (and their command line)."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest

from pyllama_mtp import InvalidArgumentError, Model, ModelLoadError, SpeculativeDecoder, gguf_tools

from helpers import EXACT as CTX
from helpers import PROMPT, plain_greedy

pytestmark = pytest.mark.backend_independent(
    "GGUF file tools; a grafted model's tokens are compared with the original's "
    "on one device")


def greedy_with_mtp(path, n_tokens=150):
    with Model.load(path) as model, \
            SpeculativeDecoder.create(model, n_ctx=512, n_draft=3, **CTX) as decoder:
        tokens = list(decoder.generate(PROMPT, max_tokens=n_tokens, stop_at_eog=False))
        return tokens, decoder.stats


def plain(path, n_tokens=150):
    with Model.load(path) as model:
        return plain_greedy(model, PROMPT, n_tokens)


def tensors(path):
    return {t.name: (t.tensor_type, np.array(t.data)) for t in gguf.GGUFReader(path).tensors}


def test_inspect_reports_the_mtp_layers(model_path, arch):
    summary = gguf_tools.inspect(model_path(arch))
    assert summary.architecture == arch
    assert summary.n_mtp_layers == 1 and summary.n_layer >= 1
    assert 0 < summary.mtp_tensor_bytes < summary.tensor_bytes <= summary.file_bytes
    assert sum(summary.types.values()) == summary.n_tensors
    assert summary.mtp_memory(4096) > summary.mtp_memory(0) == summary.mtp_tensor_bytes
    assert "MTP: 1 layer" in str(summary)


def test_strip_extract_graft_round_trip(model_path, arch, tmp_path):
    original = model_path(arch)
    stripped = tmp_path / "trunk.gguf"
    donor = tmp_path / "mtp.gguf"
    grafted = tmp_path / "grafted.gguf"

    trunk = gguf_tools.strip(original, stripped)
    assert trunk.n_mtp_layers == 0 and trunk.mtp_tensor_bytes == 0
    with Model.load(stripped) as model:
        assert not model.has_mtp
    # The trunk is untouched: plain decoding is the same.
    assert plain(stripped) == plain(original)

    extracted = gguf_tools.extract_mtp(original, donor)
    assert extracted.tensor_bytes == extracted.mtp_tensor_bytes > 0

    result = gguf_tools.graft(donor, stripped, grafted)
    assert result.n_mtp_layers == 1
    # Every tensor is back, byte for byte, and the model runs MTP exactly as before.
    got, want = tensors(grafted), tensors(original)
    assert got.keys() == want.keys()
    for name, (kind, data) in want.items():
        assert got[name][0] == kind
        assert np.array_equal(got[name][1], data), name
    tokens, stats = greedy_with_mtp(grafted)
    want_tokens, want_stats = greedy_with_mtp(original)
    assert tokens == want_tokens
    assert (stats.drafted, stats.accepted) == (want_stats.drafted, want_stats.accepted)


def test_graft_refuses_models_that_do_not_match(model_path, tmp_path):
    qwen_trunk = tmp_path / "qwen-trunk.gguf"
    gguf_tools.strip(model_path("qwen35"), qwen_trunk)
    with pytest.raises(InvalidArgumentError, match="architecture"):
        gguf_tools.graft(model_path("glm4moe"), qwen_trunk, tmp_path / "x.gguf")
    with pytest.raises(InvalidArgumentError, match="n_embd"):
        gguf_tools.graft(model_path("qwen35", n_embd=128), qwen_trunk, tmp_path / "x.gguf")
    with pytest.raises(InvalidArgumentError, match="already has"):
        gguf_tools.graft(model_path("qwen35"), model_path("qwen35"), tmp_path / "x.gguf")
    with pytest.raises(InvalidArgumentError, match="no MTP layers"):
        gguf_tools.strip(qwen_trunk, tmp_path / "x.gguf")
    with pytest.raises(InvalidArgumentError, match="overwrite"):
        gguf_tools.strip(model_path("qwen35"), model_path("qwen35"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ModelLoadError):
        gguf_tools.inspect(broken)


def test_command_line_tools(model_path, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "pyllama_mtp", *map(str, args)], cwd="/",
                              capture_output=True, text=True, timeout=300)

    original = model_path("qwen35")
    shown = run("inspect", original)
    assert shown.returncode == 0, shown.stderr
    assert "qwen35" in shown.stdout and "MTP: 1 layer" in shown.stdout
    assert run("strip", original, "-o", tmp_path / "t.gguf").returncode == 0
    assert run("extract-mtp", original, "-o", tmp_path / "m.gguf").returncode == 0
    grafted = run("graft", "--mtp-from", tmp_path / "m.gguf", "--into", tmp_path / "t.gguf",
                  "-o", tmp_path / "g.gguf")
    assert grafted.returncode == 0, grafted.stderr
    assert gguf_tools.inspect(tmp_path / "g.gguf").n_mtp_layers == 1
    refused = run("graft", "--mtp-from", model_path("glm4moe"), "--into", tmp_path / "t.gguf",
                  "-o", tmp_path / "x.gguf")
    assert refused.returncode == 2 and "architecture" in refused.stderr
    assert "Traceback" not in refused.stderr
    bench = run("bench", "-m", original, "-n", "32", "-t", "1", "--drafts", "1", "3")
    assert bench.returncode == 0, bench.stderr
    assert "plain:" in bench.stdout and "MTP n_draft=3:" in bench.stdout and "acceptance" in bench.stdout


def test_graft_compares_tokens_that_are_not_utf8(model_path, tmp_path):
    """A donor whose first token is not UTF-8 text differs from the trunk: an
    InvalidArgumentError, not a UnicodeDecodeError from the GGUF reader."""
    from gguf_mutations import structured_mutations

    source = model_path("qwen35")
    donor = tmp_path / "donor.gguf"
    case = next(m for m in structured_mutations(source) if m.name.endswith("[0]=invalid-utf8"))
    case.write(donor)
    trunk = tmp_path / "trunk.gguf"
    gguf_tools.strip(source, trunk)
    with pytest.raises(InvalidArgumentError, match="vocabulary tokens differ"):
        gguf_tools.graft(donor, trunk, tmp_path / "x.gguf")
