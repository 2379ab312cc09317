"""Model loading, metadata, vocabulary, and what goes wrong on bad files."""

from __future__ import annotations

import logging

import pytest

from pyllama_mtp import (
    ClosedError,
    InvalidArgumentError,
    LoadCancelledError,
    Model,
    ModelLoadError,
    fixtures,
)


def test_metadata_and_hparams(model, arch):
    assert model.architecture == arch
    assert model.n_embd == 64
    assert model.n_layer == 4
    assert model.n_layer_nextn == 1
    assert model.has_mtp and model.mtp_loaded
    assert model.n_vocab == len(fixtures.byte_vocab()[0])
    assert model.size > 0 and model.n_params > 0
    assert model.metadata["general.architecture"] == arch
    assert model.is_hybrid == (arch == "qwen35")


def test_model_without_mtp_layers(model_path, arch):
    with Model.load(model_path(arch, mtp=False)) as model:
        assert model.n_layer == 4
        assert not model.has_mtp and not model.mtp_loaded


def test_load_mtp_false_keeps_mtp_out_of_memory(model_path):
    path = model_path("qwen35")
    with Model.load(path, load_mtp=True) as with_mtp, Model.load(path, load_mtp=False) as without:
        assert with_mtp.has_mtp and without.has_mtp
        assert with_mtp.mtp_loaded and not without.mtp_loaded
        weights = []
        for model in (with_mtp, without):
            with model.context(n_ctx=64) as ctx:
                weights.append(sum(entry["model"] for entry in ctx.memory_breakdown()))
        assert weights[1] < weights[0]


@pytest.mark.parametrize("text", ["hello world", "naïve café ☕ — 𝄞", "", "  leading spaces\n\ttabs"])
def test_tokenize_round_trip(model, text):
    tokens = model.tokenize(text, add_special=False)
    assert all(0 <= t < model.n_vocab for t in tokens)
    assert model.detokenize(tokens) == text
    assert b"".join(model.token_to_piece(t) for t in tokens) == text.encode()


def test_special_tokens(model):
    assert model.bos != model.eos
    assert model.is_eog(model.eos)
    assert not model.is_eog(model.tokenize("a", add_special=False)[0])
    assert model.token_to_piece(model.eos, special=True) == b"<|endoftext|>"


def test_missing_file_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model file"):
        Model.load(tmp_path / "absent.gguf")


def test_not_a_gguf_raises_model_load_error(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        Model.load(bogus)


def test_truncated_gguf_raises_model_load_error(model_path, tmp_path):
    data = model_path("qwen35").read_bytes()
    for cut in (16, len(data) // 3, len(data) - 100):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            Model.load(truncated)


def test_progress_is_reported_and_cancellable(model_path):
    path = model_path("qwen35")
    seen = []
    with Model.load(path, progress=seen.append):
        pass
    assert seen and seen[-1] == pytest.approx(1.0)
    assert seen == sorted(seen)

    with pytest.raises(LoadCancelledError):
        Model.load(path, progress=lambda fraction: False)


def test_progress_exception_propagates(model_path):
    def boom(fraction):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Model.load(model_path("qwen35"), progress=boom)


def test_llama_cpp_logs_reach_python_logging(model_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="pyllama_mtp.llama_cpp"):
        Model.load(model_path("glm4moe")).close()
    assert any("llama" in record.getMessage() or "gguf" in record.getMessage()
               for record in caplog.records if record.name == "pyllama_mtp.llama_cpp")


def test_bad_token_ids_are_rejected(model):
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        model.detokenize([1, model.n_vocab])
    with pytest.raises(InvalidArgumentError):
        model.token_to_piece(-1)
    with pytest.raises(InvalidArgumentError, match="integers"):
        model.detokenize([1.5])


def test_close_is_idempotent_and_blocks_use(model_path):
    model = Model.load(model_path("qwen35"))
    model.close()
    model.close()
    assert model.closed
    with pytest.raises(ClosedError):
        model.tokenize("abc")
    with pytest.raises(ClosedError):
        model.context()


def test_unclosed_model_warns(model_path):
    model = Model.load(model_path("qwen35"))
    with pytest.warns(ResourceWarning, match="unclosed"):
        model.__del__()
    assert model.closed
