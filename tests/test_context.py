"""Context: decoding, outputs, memory operations, state, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from pyllama_mtp import (
    Batch,
    ClosedError,
    ContextFullError,
    InvalidArgumentError,
    StateError,
)

PROMPT = "The quick brown fox jumps over the lazy dog."


def prompt_tokens(model):
    return model.tokenize(PROMPT)


def feed(ctx, tokens, seq_id=0):
    """Decode tokens one by one; return the logits after each."""
    rows = []
    for token in tokens:
        ctx.decode([token], seq_id=seq_id)
        rows.append(ctx.logits())
    return np.stack(rows)


def test_decode_gives_logits_of_vocab_size(model, context):
    context.decode(prompt_tokens(model))
    logits = context.logits()
    assert logits.shape == (model.n_vocab,) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert context.pos_max(0) == len(prompt_tokens(model)) - 1


def test_logits_are_copies(model, context):
    tokens = prompt_tokens(model)
    context.decode(tokens[:5])
    first = context.logits()
    kept = first.copy()
    context.decode(tokens[5:9])
    assert np.array_equal(first, kept)
    assert not np.array_equal(first, context.logits())


def test_decoding_is_deterministic(model):
    tokens = prompt_tokens(model)
    results = []
    for _ in range(2):
        with model.context(n_ctx=256, n_batch=64, n_threads=1) as ctx:
            ctx.decode(tokens)
            results.append(ctx.logits())
    assert np.array_equal(results[0], results[1])


def test_warm_up_leaves_no_trace(model):
    tokens = prompt_tokens(model)
    results = []
    for warmup in (True, False):
        with model.context(n_ctx=256, n_batch=64, n_threads=1, warmup=warmup) as ctx:
            assert ctx.pos_max(0) == -1
            ctx.decode(tokens)
            assert ctx.pos_max(0) == len(tokens) - 1
            results.append(ctx.logits())
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-5)


def test_warm_up_fits_a_one_token_batch(model):
    """n_batch=1: the warm-up decodes what fits (a two-token warm-up would be refused)."""
    with model.context(n_ctx=64, n_batch=1, n_threads=1) as ctx:
        assert ctx.pos_max(0) == -1
        for token in prompt_tokens(model)[:4]:
            ctx.decode([token])
        assert ctx.pos_max(0) == 3


def test_all_outputs_of_a_batch(model, context):
    tokens = prompt_tokens(model)
    context.decode(Batch(tokens, outputs=True))
    rows = np.stack([context.logits(i) for i in range(len(tokens))])
    assert rows.shape == (len(tokens), model.n_vocab)
    # Each position predicts from different context: rows differ.
    assert len({row.argmax() for row in rows}) > 1


def test_output_flags_are_enforced(model, context):
    tokens = prompt_tokens(model)
    context.decode(tokens)
    with pytest.raises(InvalidArgumentError, match="not marked as an output"):
        context.logits(0)
    with pytest.raises(InvalidArgumentError, match="outside the last batch"):
        context.logits(len(tokens))


def test_kv_removal_then_redecode_is_identical(model, context, arch):
    tokens = prompt_tokens(model)
    prefix, tail = tokens[:20], tokens[20:30]
    context.decode(prefix)
    expected = feed(context, tail)
    if arch == "qwen35":
        # Recurrent state has no history: cutting inside a sequence must be refused, loudly.
        with pytest.raises(StateError):
            context.seq_rm(0, len(prefix))
        context.seq_rm(0)
        assert context.pos_max(0) == -1
        context.decode(prefix)
    else:
        context.seq_rm(0, len(prefix))
        assert context.pos_max(0) == len(prefix) - 1
    assert np.array_equal(feed(context, tail), expected)


def test_state_save_and_restore(model, context):
    tokens = prompt_tokens(model)
    context.decode(tokens[:20])
    state = context.save_state(0)
    expected = feed(context, tokens[20:30])
    context.seq_rm(0)
    context.load_state(state, 0)
    assert context.pos_max(0) == 19
    assert np.array_equal(feed(context, tokens[20:30]), expected)


def test_sequences_are_independent(model, logit_tolerance):
    tokens = prompt_tokens(model)
    with model.context(n_ctx=256, n_batch=64, n_seq_max=2, n_threads=1) as ctx:
        ctx.decode(tokens[:12], seq_id=0)
        single = ctx.logits()
        # seq 1 gets a copy of seq 0, then both continue differently in one batch.
        ctx.seq_cp(0, 1)
        ctx.decode(Batch([tokens[12], tokens[13]], positions=[12, 12], seq_ids=[0, 1], outputs=True))
        two = (ctx.logits(0), ctx.logits(1))
        ctx.seq_keep(1)
        assert ctx.pos_max(0) == -1 and ctx.pos_max(1) == 12
    with model.context(n_ctx=256, n_batch=64, n_threads=1) as ref:
        ref.decode(tokens[:12])
        assert np.array_equal(ref.logits(), single)
        ref.decode([tokens[12]])
        np.testing.assert_allclose(ref.logits(), two[0], atol=logit_tolerance)
        ref.seq_rm(0)
        ref.decode(tokens[:12] + [tokens[13]])
        np.testing.assert_allclose(ref.logits(), two[1], atol=logit_tolerance)


@pytest.mark.parametrize("bad_batch, message", [
    (lambda m: [1, 2, 10_000], "outside the vocabulary"),
    (lambda m: [-3], "outside the vocabulary"),
    (lambda m: Batch([1, 2], seq_ids=[0, 5]), "n_seq_max"),
    (lambda m: list(range(1, 66)), "exceeds n_batch"),
    (lambda m: Batch([1, 2], positions=[-1, 0]), "non-negative"),
    (lambda m: np.array([1.0, 2.0]), "integers"),
    (lambda m: np.array([[1, 2]]), "one-dimensional"),
])
def test_bad_input_is_rejected_and_context_stays_usable(model, context, bad_batch, message):
    tokens = prompt_tokens(model)
    context.decode(tokens[:8])
    expected_pos = context.pos_max(0)
    with pytest.raises(InvalidArgumentError, match=message):
        context.decode(bad_batch(model))
    assert context.pos_max(0) == expected_pos
    context.decode(tokens[8:10])
    with model.context(n_ctx=256, n_batch=64, n_threads=1) as fresh:
        fresh.decode(tokens[:8])
        fresh.decode(tokens[8:10])
        assert np.array_equal(fresh.logits(), context.logits())


def test_bad_sizes_are_rejected(model):
    for kwargs in ({"n_ctx": 0}, {"n_batch": -1}, {"n_seq_max": 0}, {"n_ubatch": 1000},
                   {"n_threads": 0}):
        with pytest.raises(InvalidArgumentError):
            model.context(**kwargs)
    with model.context(n_ctx=64) as ctx:
        with pytest.raises(InvalidArgumentError):
            ctx.seq_rm(3)
        with pytest.raises(InvalidArgumentError):
            ctx.load_state(b"")


def test_full_context_raises_and_recovers(model):
    with model.context(n_ctx=64, n_batch=64, n_threads=1) as ctx:
        n_ctx = ctx.n_ctx  # llama.cpp may round the size up
        tokens = (prompt_tokens(model) * (n_ctx // 10 + 1))[:n_ctx]
        for start in range(0, n_ctx, 64):
            ctx.decode(tokens[start:start + 64])
        with pytest.raises(ContextFullError, match="full"):
            ctx.decode([tokens[0]])
        assert ctx.pos_max(0) == n_ctx - 1  # nothing lost
        ctx.seq_rm(0)
        ctx.decode(tokens[:5])
        assert ctx.pos_max(0) == 4


def test_closed_context_refuses_use(model):
    ctx = model.context(n_ctx=64)
    ctx.close()
    ctx.close()
    with pytest.raises(ClosedError):
        ctx.decode([1])
    with pytest.raises(ClosedError):
        ctx.pos_max(0)


def test_memory_breakdown_counts_weights_and_kv(model, context):
    breakdown = context.memory_breakdown()
    assert breakdown, "llama.cpp reported no buffers"
    assert sum(entry["model"] for entry in breakdown) > 0
    assert sum(entry["context"] for entry in breakdown) > 0
