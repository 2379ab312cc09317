"""The fixture generator: chained MTP heads, size-aware eps, the demo model's settings."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from pyllama_mtp import Model, NoMTPError, fixtures

pytestmark = pytest.mark.backend_independent(
    "the fixture generator writes files; its calibration is measured on the CPU")


def _reader(path):
    return gguf.GGUFReader(str(path))


def _kv(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.parts[field.data[0]][0]


def _tensors(reader):
    return {t.name: np.array(t.data) for t in reader.tensors}


def test_defaults_keep_their_names_and_parameters(model_path):
    path = model_path("qwen35")
    assert path.name.startswith("qwen35-mtp-eps2.034-e64-l4-s0-f32-g1-")
    info = fixtures.fixture_info(path)
    assert not {"n_mtp", "n_ff", "head_dim"} & set(info)
    # the size scaling is exactly 1 at the size the table was measured at
    assert fixtures.eps_for_acceptance("qwen35", 0.75) == info["eps"] == 2.034
    assert fixtures.eps_for_acceptance("qwen35", 0.75, n_embd=64, n_layer=4) == 2.034


def test_size_aware_eps():
    base = fixtures.eps_for_acceptance("glm4moe", 0.75)
    assert fixtures.eps_for_acceptance("glm4moe", 0.75, n_embd=256) == pytest.approx(2 * base, abs=1e-3)
    assert fixtures.eps_for_acceptance("glm4moe", 0.75, n_layer=16) == pytest.approx(base / 2, abs=1e-3)


@pytest.mark.parametrize("arch", fixtures.ARCHES)
def test_chained_heads_layout(model_path, arch):
    one, two = model_path(arch), model_path(arch, n_mtp=2)
    assert "-mtp-m2-" in two.name
    assert fixtures.fixture_info(two)["n_mtp"] == 2
    r1, r2 = _reader(one), _reader(two)
    assert _kv(r2, f"{arch}.nextn_predict_layers") == 2
    assert _kv(r2, f"{arch}.block_count") == 4 + 2
    t1, t2 = _tensors(r1), _tensors(r2)
    # trunk and the first head as in the one-head file; the second head is its own block
    assert set(t1) < set(t2)
    for name, arr in t1.items():
        assert np.array_equal(arr, t2[name]), name
    extra = {n for n in t2 if n not in t1}
    assert extra and all(n.startswith("blk.5.") for n in extra)
    assert "blk.5.nextn.eh_proj.weight" in extra
    assert not np.array_equal(t2["blk.5.attn_q.weight"], t2["blk.4.attn_q.weight"])
    with Model.load(two) as model:
        assert model.n_layer == 4
        assert model.n_layer_nextn == 2
    assert fixtures.greedy_generate(two, n_tokens=40) == fixtures.greedy_generate(one, n_tokens=40)


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError):
        fixtures.make_model("qwen35", n_mtp=0, cache_dir=tmp_path)
    with pytest.raises(ValueError):
        fixtures.make_model("qwen35", mtp=False, n_mtp=2, cache_dir=tmp_path)
    with pytest.raises(ValueError):
        fixtures.make_model("qwen35", head_dim=48, cache_dir=tmp_path)
    with pytest.raises(ValueError):
        fixtures.make_model("qwen35", n_ff=100, cache_dir=tmp_path)
    with pytest.raises(ValueError):
        fixtures.make_demo_model(cache_dir=tmp_path, acceptance=0.1)
    assert not list(tmp_path.iterdir())


def test_measure_mtp_agreement_refuses_unsupported_chains(model_path):
    with pytest.raises(ValueError, match="MTP blocks"):
        fixtures.measure_mtp_agreement(model_path("qwen35", n_mtp=2))


@pytest.mark.parametrize("arch", fixtures.ARCHES)
def test_several_mtp_blocks_are_refused_not_fatal(model_path, arch):
    """The pinned llama.cpp asserts a single MTP block for these architectures (a process
    abort); Model.mtp_context refuses first, and the trunk still decodes."""
    with Model.load(model_path(arch, n_mtp=2)) as model, model.context(n_ctx=64, n_threads=1) as ctx:
        assert model.n_layer_nextn == 2
        with pytest.raises(NoMTPError, match="single MTP block"):
            model.mtp_context(ctx)
        ctx.decode(model.tokenize("still decodes"))


def test_demo_model_settings(monkeypatch, tmp_path):
    """make_demo_model's arguments (the 536 MB file itself is not written here)."""
    seen = {}
    monkeypatch.setattr(fixtures.generator, "make_model", lambda **kw: seen.update(kw) or tmp_path / "x.gguf")
    assert fixtures.make_demo_model(cache_dir=tmp_path) == tmp_path / "x.gguf"
    assert seen["arch"] == "qwen35" and seen["n_embd"] == 1024 and seen["n_layer"] == 12
    assert seen["head_dim"] == 64 and seen["ftype"] == "f32" and seen["cache_dir"] == tmp_path
    assert seen["text"] == fixtures.DEMO_TEXT
    # acceptance 0.9 lies between the measured rows at eps 4.5 and 5.0
    table = dict(fixtures.DEMO_TEXT_EPS_TABLE)
    assert table[4.5] >= 0.9 >= table[5.0] and 4.5 < seen["eps"] < 5.0
    assert 0.6 < dict(fixtures.DEMO_EPS_TABLE)[5.0] < 0.9


def _word_tokens(model, text):
    by_piece = {model.token_to_piece(t): t for t in range(model.n_vocab)}
    return {by_piece[(" " + word).encode()] for word in text.split()}


def test_text_vocab_recites_its_text_at_eps_zero(model_path):
    """With no context mixing the rule alone decides: the model recites the text, in a loop."""
    text = fixtures.DEMO_TEXT
    with Model.load(model_path("qwen35", text=text, eps=0.0)) as model:
        assert len(_word_tokens(model, text)) == len(text.split())
        for word in text.split():  # the pre-tokenizer splits punctuation off; the rest merges fully
            if word.isalpha():
                assert len(model.tokenize(" " + word)) == 1, word
        assert model.tokenize(" quick brown") == [*model.tokenize(" quick"), *model.tokenize(" brown")]
        with model.context(n_ctx=256, n_threads=1) as ctx:
            tokens = list(ctx.generate("The quick brown fox", max_tokens=2 * len(text.split())))
        written = b"".join(model.token_to_piece(t) for t in tokens).decode()
    loop = (" " + text) * 3  # every word token carries its leading space
    recital = loop[loop.index(" fox") + len(" fox"):]
    assert len(written) > len(text) and written == recital[:len(written)]


@pytest.mark.parametrize("arch", fixtures.ARCHES)
def test_text_vocab_writes_only_its_words_where_context_overrides_the_rule(model_path, arch):
    """At 75% rule agreement a quarter of the steps leave the recital, yet every token
    written is a word of the text: the output stays readable."""
    text = fixtures.DEMO_TEXT
    path = model_path(arch, text=text, acceptance=0.75)
    succ = fixtures.successor_map(path)
    with Model.load(path) as model:
        words = _word_tokens(model, text)
        assert {int(t) for t in np.flatnonzero(succ >= 0)} == words
        with model.context(n_ctx=512, n_threads=1) as ctx:
            tokens = list(ctx.generate("In the beginning", max_tokens=200))
    assert set(tokens) <= words
    followed = sum(int(succ[a] == b) for a, b in zip(tokens, tokens[1:]))
    assert 0.4 < followed / (len(tokens) - 1) < 1.0  # the rule mostly holds, but not always


def test_text_vocab_argument_checks():
    with pytest.raises(ValueError, match="repeated"):
        fixtures.text_vocab("one two one")
    with pytest.raises(ValueError, match="two or more"):
        fixtures.text_vocab("alone")
