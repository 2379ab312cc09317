"""The shim's C functions check their own arguments: a C caller (not only our Python
layer) gets PMTP_ERR_ARGUMENT instead of a write past a buffer or an index past the
vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from pyllama_mtp import Model, SpeculativeDecoder
from pyllama_mtp._ffi import ffi, lib
from pyllama_mtp._resource import native_handle


@pytest.fixture(scope="module")
def decoder(model_dir):
    from pyllama_mtp import fixtures

    with Model.load(fixtures.make_model("qwen35", cache_dir=model_dir)) as model:
        with SpeculativeDecoder.create(model, n_ctx=256, n_draft=3, n_threads=1) as dec:
            dec.prefill("The quick brown fox")
            yield dec


def tokens(*values):
    return ffi.new("llama_token[]", list(values))


def test_set_draft_refuses_more_than_the_longest_draft_and_foreign_ids(decoder):
    spec = native_handle(decoder).ptr()
    n_max = lib.pmtp_spec_n_draft_max(spec)
    n_vocab = decoder.target.model.n_vocab
    assert lib.pmtp_spec_set_draft(spec, 0, tokens(*[1] * (n_max + 1)), n_max + 1) == lib.PMTP_ERR_ARGUMENT
    assert lib.pmtp_spec_set_draft(spec, 0, tokens(1, n_vocab), 2) == lib.PMTP_ERR_ARGUMENT
    assert lib.pmtp_spec_set_draft(spec, 0, tokens(1, -1), 2) == lib.PMTP_ERR_ARGUMENT
    assert lib.pmtp_spec_set_draft(spec, 0, ffi.NULL, 1) == lib.PMTP_ERR_ARGUMENT
    assert lib.pmtp_spec_set_draft(spec, 7, tokens(1), 1) == lib.PMTP_ERR_ARGUMENT
    assert lib.pmtp_spec_set_draft(spec, 0, tokens(*[1] * n_max), n_max) == lib.PMTP_OK
    assert lib.pmtp_spec_set_draft(spec, 0, ffi.NULL, 0) == lib.PMTP_OK


def test_prefill_and_decode_refuse_ids_outside_the_vocabulary(decoder):
    spec = native_handle(decoder).ptr()
    n_vocab = decoder.target.model.n_vocab
    assert lib.pmtp_spec_prefill(spec, 0, tokens(1, n_vocab + 5), 2) == lib.PMTP_ERR_ARGUMENT
    ctx = native_handle(decoder.target).ptr()
    n_batch = lib.llama_n_batch(ctx)
    pos = ffi.new("llama_pos[]", [1000, 1001])
    seqs = ffi.new("llama_seq_id[]", [0, 0])
    assert lib.pmtp_decode_tokens(ctx, 2, tokens(1, n_vocab), pos, seqs, ffi.NULL) == lib.PMTP_ERR_ARGUMENT
    assert lib.pmtp_decode_tokens(ctx, 2, tokens(1, 2), pos, ffi.new("llama_seq_id[]", [0, 64]),
                                  ffi.NULL) == lib.PMTP_ERR_ARGUMENT
    assert lib.pmtp_decode_tokens(ctx, 2, tokens(1, 2), ffi.new("llama_pos[]", [-3, 0]), seqs,
                                  ffi.NULL) == lib.PMTP_ERR_ARGUMENT
    many = n_batch + 1
    assert lib.pmtp_decode_tokens(ctx, many, ffi.new("llama_token[]", many), ffi.new("llama_pos[]", many),
                                  ffi.new("llama_seq_id[]", many), ffi.NULL) == lib.PMTP_ERR_ARGUMENT
    # The decoder's sequence is untouched by the refused calls.
    before = decoder.pending(0)
    assert decoder.step()[0]
    assert decoder.pending(0)[1] > before[1]


def test_spec_new_refuses_impossible_sizes(decoder):
    target, draft = native_handle(decoder.target).ptr(), native_handle(decoder.draft_context).ptr()
    status = ffi.new("int32_t *")
    for n_seq, n_draft in ((2, 3), (1, lib.PMTP_MAX_DRAFT + 1), (0, 3), (1, 0)):
        assert lib.pmtp_spec_new(target, draft, n_seq, n_draft, status) == ffi.NULL
        assert status[0] == lib.PMTP_ERR_ARGUMENT
    assert lib.pmtp_spec_new(target, draft, 0, 3, ffi.NULL) == ffi.NULL  # no status to write: still refused


def test_target_choices_refuses_a_missing_buffer(decoder):
    spec = native_handle(decoder).ptr()
    assert lib.pmtp_spec_target_choices(spec, 0, ffi.NULL, 4) == lib.PMTP_ERR_ARGUMENT
    out = np.zeros(1, dtype=np.int32)
    assert lib.pmtp_spec_target_choices(spec, 0, ffi.cast("llama_token *", ffi.from_buffer(out)), 0) >= 0


def test_set_catch_up_from_refuses_a_bad_sequence_or_position(decoder):
    spec = native_handle(decoder).ptr()
    assert lib.pmtp_spec_set_catch_up_from(spec, 0, 10) == lib.PMTP_OK
    assert lib.pmtp_spec_set_catch_up_from(spec, 0, -1) == lib.PMTP_OK
    assert lib.pmtp_spec_set_catch_up_from(spec, 0, -2) == lib.PMTP_ERR_ARGUMENT
    assert lib.pmtp_spec_set_catch_up_from(spec, 7, 0) == lib.PMTP_ERR_ARGUMENT
    assert lib.pmtp_spec_set_catch_up_from(ffi.NULL, 0, 0) == lib.PMTP_ERR_ARGUMENT
