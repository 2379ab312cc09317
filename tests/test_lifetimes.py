"""Lifetimes and threads: children keep parents alive; a model's close is deferred, a
context's closes what points into it; close() from any thread; one lock order."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from helpers import EXACT, plain_greedy, run_threads
from pyllama_mtp import ClosedError, Model, Sampler, SpeculativeDecoder


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


# -- draft contexts, decoders and failed constructors -----------------------------------

def test_a_draft_context_is_closed_with_its_target(model_path):
    """llama.cpp keeps a pointer into the target (ctx_other): the draft cannot outlive it."""
    with Model.load(model_path("qwen35")) as model:
        target = model.context(n_ctx=64, n_threads=1)
        draft = model.mtp_context(target)
        target.close()
        assert draft.closed
        with pytest.raises(ClosedError):
            draft.decode([1, 2, 3])
        with pytest.raises(ClosedError):
            model.mtp_context(target)
        with model.context(n_ctx=64, n_threads=1) as ctx:  # the model is untouched
            ctx.decode([1, 2, 3])


def test_a_draft_context_keeps_its_target_alive(model_path):
    with Model.load(model_path("qwen35")) as model:
        draft = model.mtp_context(model.context(n_ctx=64, n_threads=1))
        gc.collect()
        assert not draft._target.closed
        draft.close()
        draft._target.close()


def test_a_decoder_is_closed_with_either_of_its_contexts(model_path):
    with Model.load(model_path("qwen35")) as model:
        for closing in ("target", "draft"):
            target = model.context(n_ctx=128, n_rs_seq=4, n_threads=1)
            draft = model.mtp_context(target)
            decoder = SpeculativeDecoder(target, draft, n_draft=3)
            decoder.prefill("abc")
            decoder.step()
            (target if closing == "target" else draft).close()
            assert decoder.closed
            with pytest.raises(ClosedError):
                decoder.step()
            target.close()


def test_a_failed_constructor_frees_its_native_handle(model_path, monkeypatch):
    from pyllama_mtp import _lowlevel, context as context_module

    with Model.load(model_path("qwen35")) as model:
        made = []
        real = _lowlevel.NativeContext

        def recording(*args, **kwargs):
            made.append(real(*args, **kwargs))
            return made[-1]

        def failing(self, warmup):
            raise RuntimeError("injected")

        monkeypatch.setattr(context_module._lowlevel, "NativeContext", recording)
        monkeypatch.setattr(context_module.Context, "_finish_init", failing)
        with pytest.raises(RuntimeError, match="injected"):
            model.context(n_ctx=64)
        assert len(made) == 1 and made[0].closed
        assert model._open_children() == []

    native_models = []
    real_model = _lowlevel.NativeModel

    def recording_model(*args, **kwargs):
        native_models.append(real_model(*args, **kwargs))
        return native_models[-1]

    monkeypatch.setattr("pyllama_mtp.model._lowlevel.NativeModel", recording_model)
    monkeypatch.setattr(Model, "_mark_open", lambda self: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        Model.load(model_path("qwen35"))
    assert len(native_models) == 1 and native_models[0].closed


# -- threads ------------------------------------------------------------------------

def test_a_shared_sampler_across_threads(model_path, backend_name):
    """One Sampler used by four threads, each on its own context: greedy results equal the
    solo ones; a sampled one draws valid tokens (the draws interleave, nothing crashes)."""
    if backend_name == "rpc":
        # Four contexts computing from four threads: see test_reliability's threads_supported.
        pytest.skip("backend rpc: ggml's RPC client aborted the process (in a thread of its own, "
                    "no message) with contexts computing from several threads, even serialised")
    prompts = ["The quick brown fox", "Once upon a time", "import numpy as np", "Dear sir"]
    with Model.load(model_path("qwen35")) as model:
        expected = [plain_greedy(model, p, 40) for p in prompts]
        for sampler, check in ((Sampler.greedy(), True), (Sampler(0.8, seed=3), False)):
            results = [None] * len(prompts)

            def work(i):
                with model.context(n_ctx=256, **EXACT) as ctx:
                    results[i] = list(ctx.generate(prompts[i], max_tokens=40, sampler=sampler,
                                                   stop_at_eog=False))

            with sampler:
                assert run_threads(work, len(prompts)) == []
            if check:
                assert results == expected
            else:
                assert all(len(r) == 40 and all(0 <= t < model.n_vocab for t in r) for r in results)


def _interleaving_exists(reference, per_thread):
    """Whether the threads' step outputs, each thread's in its own order, interleave into
    ``reference`` (steps are atomic, so some interleaving must)."""
    import functools

    @functools.lru_cache(maxsize=None)
    def fits(position, indices):
        if all(i == len(steps) for i, steps in zip(indices, per_thread)):
            return position == len(reference)
        for t, (i, steps) in enumerate(zip(indices, per_thread)):
            if i < len(steps) and reference[position:position + len(steps[i])] == steps[i]:
                if fits(position + len(steps[i]), indices[:t] + (i + 1,) + indices[t + 1:]):
                    return True
        return False

    return fits(0, tuple(0 for _ in per_thread))


def test_a_shared_decoder_takes_whole_steps(model_path):
    """Four threads stepping one decoder: each step is atomic, so the tokens of all steps,
    in the order they ran, are exactly the solo greedy continuation."""
    with Model.load(model_path("qwen35")) as model:
        with SpeculativeDecoder.create(model, n_ctx=512, n_draft=3, adaptive=True, **EXACT) as decoder:
            decoder.prefill("The quick brown fox")
            per_thread = [[] for _ in range(4)]

            def work(i):
                for _ in range(8):
                    per_thread[i].append(decoder.step()[0])
                    decoder.stats, decoder.last_drafted  # readers between steps

            assert run_threads(work, 4) == []
        total = sum(len(step) for steps in per_thread for step in steps)
        reference = plain_greedy(model, "The quick brown fox", total)
        assert _interleaving_exists(reference, per_thread)


@pytest.mark.parametrize("closing", ["decoder", "target", "draft", "model"])
def test_close_during_a_step_from_another_thread(model_path, closing):
    """close() from another thread while steps run: the running call finishes, the next
    raises ClosedError, and nothing dangles (the process survives, the model still works)."""
    model = Model.load(model_path("qwen35"))
    decoder = SpeculativeDecoder.create(model, n_ctx=2048, n_draft=3, n_threads=1)
    decoder.prefill("Once upon a time")
    started, outcome = threading.Event(), []

    def stepping(_):
        try:
            for _ in range(400):
                decoder.step()
                started.set()
        except ClosedError:
            outcome.append("closed")
        else:
            outcome.append("finished")
        finally:
            started.set()

    worker = threading.Thread(target=stepping, args=(0,))
    worker.start()
    started.wait(60)
    {"decoder": decoder, "target": decoder.target, "draft": decoder.draft_context, "model": model}[closing].close()
    worker.join(300)
    assert not worker.is_alive()
    if closing == "model":  # deferred: the decoder's contexts keep the weights
        assert outcome == ["finished"]
        decoder.close()
        assert model._native.closed
    else:
        assert outcome == ["closed"], outcome
        assert decoder.closed
        with model.context(n_ctx=64, n_threads=1) as ctx:
            ctx.decode([1, 2, 3])
        decoder.close()
        model.close()


def test_memory_is_freed_children_first_whatever_order_the_closes_come_in(model_path, monkeypatch):
    """The model's close is deferred, then a decoder's draft context is closed: the C
    driver, the draft, the target and the model are freed in that order (a target freed
    before its draft, or a model before its contexts, is a use after free in llama.cpp)."""
    from pyllama_mtp._lowlevel import handle

    freed = []
    real_free = handle.NativeHandle.free

    def recording_free(self):
        if not self.closed:
            freed.append(self)
        real_free(self)

    monkeypatch.setattr(handle.NativeHandle, "free", recording_free)
    model = Model.load(model_path("qwen35"))
    decoder = SpeculativeDecoder.create(model, n_ctx=128, n_draft=2, n_threads=1)
    order = [decoder._native, decoder.draft_context._native, decoder.target._native, model._native]
    model.close()
    assert freed == []
    decoder.draft_context.close()
    assert decoder.closed and decoder.target.closed
    assert [n for n in freed if n in order] == order
