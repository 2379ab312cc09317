"""Lifetimes: children keep parents alive; closing is deferred, idempotent, warned."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from pyllama_mtp import ClosedError, Model


def test_closing_model_with_open_context_is_deferred(model_path):
    model = Model.load(model_path("qwen35"))
    ctx = model.context(n_ctx=64, n_threads=1)
    tokens = model.tokenize("still works")
    model.close()
    assert model.closed
    with pytest.raises(ClosedError):
        model.context()
    ctx.decode(tokens)  # the weights are still there
    assert np.isfinite(ctx.logits()).all()
    assert not model._native.closed
    ctx.close()
    assert model._native.closed


def test_context_keeps_model_alive(model_path):
    ctx = Model.load(model_path("glm4moe")).context(n_ctx=64, n_threads=1)
    gc.collect()
    ctx.decode([1, 2, 3])
    assert ctx.model.n_vocab > 0
    model = ctx.model
    ctx.close()
    model.close()


def test_unclosed_context_warns(model_path):
    with Model.load(model_path("glm4moe")) as model:
        ctx = model.context(n_ctx=64)
        with pytest.warns(ResourceWarning):
            ctx.__del__()
        assert ctx.closed
