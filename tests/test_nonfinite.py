"""NaN and Inf logits are an error on every path that chooses a token from them (plain,
MTP verify, the server), naming the sequence and position; a broken draft head only
loses its drafts, so the output stays plain decoding's."""

from __future__ import annotations

import concurrent.futures
import shutil

import numpy as np
import pytest
from gguf import GGUFReader

from pyllama_mtp import DecodeError, Model, NonFiniteLogitsError, Sampler, SpeculativeDecoder

pytestmark = pytest.mark.backend_independent(
    "the check reads the logits on the host, after whichever device computed them")

PROMPT = "the quick brown fox"


def _broken_copy(source, tmp_path, name: str, edit) -> str:
    """A copy of ``source`` whose tensor ``name`` is changed in place by ``edit(array)``."""
    out = tmp_path / f"{name.replace('.', '_')}-{edit.__name__}.gguf"
    shutil.copyfile(source, out)
    reader = GGUFReader(out, "r+")
    (tensor,) = [t for t in reader.tensors if t.name == name]
    edit(tensor.data)
    tensor.data.flush()
    del reader
    return str(out)


def _nan_token_copy(source, tmp_path, token: int) -> str:
    """A copy whose embedding row of ``token`` is NaN: the model breaks when it reads it."""
    def nan_row(array: np.ndarray) -> None:
        array[token] = np.nan
    nan_row.__name__ = f"nan_row_{token}"
    return _broken_copy(source, tmp_path, "token_embd.weight", nan_row)


def all_nan(array: np.ndarray) -> None:
    array[...] = np.nan


def some_inf(array: np.ndarray) -> None:
    array[::7] = np.inf


@pytest.fixture(scope="module")
def qwen35(model_path):
    return model_path("qwen35")


@pytest.mark.parametrize("edit", [all_nan, some_inf])
def test_non_finite_output_weights_raise_on_plain_and_mtp_paths(qwen35, tmp_path, edit):
    path = _broken_copy(qwen35, tmp_path, "output.weight", edit)
    with Model.load(path) as model:
        n_prompt = len(model.tokenize(PROMPT))
        with model.context(n_ctx=128) as ctx:
            with pytest.raises(NonFiniteLogitsError) as plain:
                list(ctx.generate(PROMPT, max_tokens=8))
        assert plain.value.positions == {0: n_prompt - 1}
        assert "sequence 0 at position" in str(plain.value) and isinstance(plain.value, DecodeError)
        for temperature in (0.0, 0.8):
            with SpeculativeDecoder.create(model, n_ctx=128, n_draft=3, temperature=temperature) as decoder:
                with pytest.raises(NonFiniteLogitsError) as mtp:
                    list(decoder.generate(PROMPT, max_tokens=8))
            assert mtp.value.positions == {0: n_prompt - 1}


def test_a_nan_embedding_row_fails_when_its_token_is_read(qwen35, tmp_path):
    with Model.load(qwen35) as model:
        tokens = model.tokenize(PROMPT)
    bad = tokens[2]
    path = _nan_token_copy(qwen35, tmp_path, bad)
    with Model.load(path) as model:
        with model.context(n_ctx=128) as ctx:
            clean = [t for t in tokens if t != bad]
            assert len(list(ctx.generate(clean, max_tokens=4))) == 4  # other tokens still work
            ctx.seq_rm(0)
            with pytest.raises(NonFiniteLogitsError):
                list(ctx.generate(tokens, max_tokens=4))
        with SpeculativeDecoder.create(model, n_ctx=128, n_draft=3) as decoder:
            with pytest.raises(NonFiniteLogitsError):
                list(decoder.generate(tokens, max_tokens=4))


def test_a_nan_draft_head_changes_nothing_but_the_drafts(qwen35, tmp_path, lossless_tokens):
    n = min(lossless_tokens, 200)
    with Model.load(qwen35) as model, model.context(n_ctx=512) as ctx:
        reference = list(ctx.generate(PROMPT, max_tokens=n, stop_at_eog=False))
    path = _broken_copy(qwen35, tmp_path, "blk.4.nextn.eh_proj.weight", all_nan)
    with Model.load(path) as model:
        with SpeculativeDecoder.create(model, n_ctx=512, n_draft=3) as decoder:
            assert list(decoder.generate(PROMPT, max_tokens=n, stop_at_eog=False)) == reference
            assert decoder.stats.drafted == 0 and decoder.stats.generated == n


@pytest.mark.parametrize("flash_attn", [False, None])
def test_only_the_sequence_with_nan_fails_among_several(qwen35, tmp_path, flash_attn):
    """llama.cpp lets NaN reach other sequences (masked cells times zero weights without
    flash attention, freed recurrent states re-initialised by a scale by zero): the
    decoder finds the source alone and evaluates the others again."""
    with Model.load(qwen35) as model:
        tokens = model.tokenize(PROMPT)
    bad = tokens[1]
    path = _nan_token_copy(qwen35, tmp_path, bad)
    clean = [t for t in tokens if t != bad]
    with Model.load(path) as model:
        with model.context(n_ctx=128) as ctx:
            solo = list(ctx.generate(clean, max_tokens=6, stop_at_eog=False))
        with SpeculativeDecoder.create(model, n_ctx=256, n_draft=3, n_seq_max=2, flash_attn=flash_attn) as decoder:
            decoder.prefill(tokens, 1)  # the source first: the clean prompt is computed beside it
            decoder.prefill(clean, 0)
            with pytest.raises(NonFiniteLogitsError) as failed:
                decoder.step()
            assert failed.value.positions == {1: len(tokens) - 1}
            out = list(failed.value.produced[0])
            while len(out) < 6:
                out += decoder.step()[0]
            assert out[:6] == solo
            # A freed slot of the source, reused by a new sequence, is clean too.
            decoder.reset(0)
            decoder.prefill(clean, 1)
            out = []
            while len(out) < 6:
                out += decoder.step()[1]
            assert out[:6] == solo


def test_the_server_fails_the_request_with_nan_and_goes_on(qwen35, tmp_path):
    from test_server import ServerProcess, httpx
    with Model.load(qwen35) as model:
        fine_tokens = set(model.tokenize("the fox"))
        bad = next(t for t in model.tokenize(PROMPT) if t not in fine_tokens)
        bad_text = model.detokenize([bad])
    path = _nan_token_copy(qwen35, tmp_path, bad)
    for mode in ((), ("--no-mtp",)):
        server = ServerProcess(path, "--parallel", "2", "--ctx-size", "512", *mode)
        try:
            def ask(prompt: str) -> httpx.Response:
                return httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 24},
                                  timeout=60)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                broken, fine = pool.map(ask, [f"the {bad_text} fox", "the fox"])
            assert broken.status_code == 500 and "NaN or Inf" in broken.json()["error"]["message"], broken.text
            # The others go on, or fail with the same error: NaN that the rebuild does not reach
            # still met a concurrent or later request in about 1 run of 3 here (issue note).
            after = ask("the fox")
            for other in (fine, after):
                assert other.status_code == 200 or "NaN or Inf" in other.json()["error"]["message"], other.text
            assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        finally:
            server.stop()


def test_a_sampler_on_finite_logits_is_unchanged(qwen35):
    with Model.load(qwen35) as model, model.context(n_ctx=128) as ctx, Sampler(0.7, seed=3) as sampler:
        assert len(list(ctx.generate(PROMPT, max_tokens=8, sampler=sampler))) == 8
