"""MTP speculative decoding: lossless greedy output, exact rollback, several sequences."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pyllama_mtp import (
    AbortedError,
    ContextFullError,
    DecodeTimeoutError,
    InvalidArgumentError,
    Model,
    NoMTPError,
    SpeculativeDecoder,
)

from helpers import EXACT as CTX
from helpers import greedy_reference, plain_greedy

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away", "import numpy as np\n"]
def assert_same_greedy(got, want, margins, tolerance, what="output"):
    """Token-for-token equality; on a backend whose batched arithmetic differs (Vulkan) a
    divergence is accepted only at a near-tie of the reference (top-2 gap <= 2 x tolerance)."""
    diverged = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if diverged is None:
        assert len(got) == len(want), f"{what}: {len(got)} tokens, expected {len(want)}"
        return
    gap = margins[diverged]
    assert gap <= 2 * tolerance, (
        f"{what} diverged at token {diverged}: {got[diverged]} vs {want[diverged]}; the reference's "
        f"top-2 logit gap there is {gap:.4g}, above this backend's tolerance {tolerance:g}")


@pytest.mark.parametrize("n_draft", [1, 2, 3, 4])
def test_greedy_mtp_is_lossless(model, arch, n_draft, lossless_tokens):
    """1,000 tokens on the CPU (fewer on software backends: see the run's header)."""
    expected = plain_greedy(model, PROMPTS[0], lossless_tokens, n_ctx=2048)
    with SpeculativeDecoder.create(model, n_ctx=2048, n_draft=n_draft, **CTX) as decoder:
        produced = list(decoder.generate(PROMPTS[0], max_tokens=lossless_tokens, stop_at_eog=False))
        stats = decoder.stats
    first_diff = next((i for i, (a, b) in enumerate(zip(produced, expected)) if a != b), None)
    assert first_diff is None and len(produced) == lossless_tokens, f"diverged at token {first_diff}"
    # Partial acceptance: both the accept and the rollback paths ran many times.
    assert 0.2 < stats.acceptance < 0.95, stats
    assert stats.drafted == sum(stats.drafted_at) and stats.accepted == sum(stats.accepted_at)
    assert stats.generated == stats.accepted + stats.steps
    assert stats.mean_accepted_length > 1.2
    assert "mean accepted length" in str(stats)


def test_rollback_leaves_exactly_the_accepted_state(model, arch, logit_tolerance):
    """After any run of steps, the target's next logits equal a context that decoded only
    the accepted tokens (the pending token evaluated as a one-token verify)."""
    prompt = model.tokenize(PROMPTS[1])
    with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=4, **CTX) as decoder:
        decoder.prefill(prompt)
        produced = []
        for _ in range(40):
            produced += decoder.step()[0]
        assert decoder.stats.accepted < decoder.stats.drafted  # rollbacks happened
        pending, position = decoder.pending()
        assert pending == produced[-1] and position == len(prompt) + len(produced) - 1
        decoder.set_draft([])
        decoder.verify()
        got = decoder.verified_logits(0)
    with model.context(n_ctx=1024, **CTX) as reference:
        history = prompt + produced
        for start in range(0, len(history) - 1, 64):
            reference.decode(history[start:min(start + 64, len(history) - 1)])
        reference.decode([history[-1]])
        expected = reference.logits()
    assert reference is not None
    np.testing.assert_allclose(got, expected, atol=logit_tolerance)


def test_several_sequences_match_their_single_runs(model, logit_tolerance, lossless_tokens):
    n_tokens = min(300, lossless_tokens)
    expected = [greedy_reference(model, prompt, n_tokens) for prompt in PROMPTS]
    with SpeculativeDecoder.create(model, n_ctx=4096, n_draft=3, n_seq_max=len(PROMPTS), **CTX) as decoder:
        outputs = decoder.generate_many(PROMPTS, max_tokens=n_tokens, stop_at_eog=False)
        assert 0.2 < decoder.stats.acceptance < 0.95
    for seq, (got, want) in enumerate(zip(outputs, expected)):
        assert_same_greedy(got, want.tokens, want.margins, logit_tolerance, what=f"sequence {seq}")


def test_custom_policy_through_the_low_level_api(model):
    """draft / verify / accept driven from Python give the same tokens as plain decoding."""
    expected = plain_greedy(model, PROMPTS[2], 200, n_ctx=2048)
    with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=4, **CTX) as decoder:
        decoder.prefill(PROMPTS[2])
        produced: list[int] = []
        step = 0
        while len(produced) < 200:
            if step % 3 == 2:
                # A deliberately bad draft of our own: it must be rejected, losslessly.
                decoder.set_draft([(produced[-1] + 1) % 256, 5, 6])
                draft = [(produced[-1] + 1) % 256, 5, 6]
            else:
                draft = decoder.draft(1 + step % 4)
            choices = decoder.verify()[0]
            assert len(choices) == len(draft) + 1
            n = 0
            while n < len(draft) and choices[n] == draft[n]:
                n += 1
            produced += decoder.accept(n) if n else decoder.rollback()
            step += 1
    assert produced[:200] == expected


def test_prefill_continues_a_sequence(model):
    first, second = model.tokenize(PROMPTS[0]), model.tokenize(" and more", add_special=False)
    with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=2, **CTX) as decoder:
        decoder.prefill(first)
        produced = decoder.step()[0] + decoder.step()[0]
        decoder.prefill(second)
        after = list(decoder.generate([], max_tokens=0)) if False else decoder.step()[0]
    expected_history = first + produced + second
    with model.context(n_ctx=1024, **CTX) as ctx:
        ctx.decode(expected_history)
        assert int(np.argmax(ctx.logits())) == after[0]


def test_model_without_mtp_cannot_draft(model_path, arch):
    with Model.load(model_path(arch, mtp=False)) as model, model.context(n_ctx=256) as ctx:
        with pytest.raises(NoMTPError):
            model.mtp_context(ctx)
        with pytest.raises(NoMTPError):
            SpeculativeDecoder.create(model)


def test_load_mtp_false_cannot_draft_but_decodes(model_path):
    with Model.load(model_path("qwen35"), load_mtp=False) as model:
        with model.context(n_ctx=256) as ctx:
            with pytest.raises(NoMTPError):
                model.mtp_context(ctx)
            ctx.decode(model.tokenize("still decodes"))
            assert np.isfinite(ctx.logits()).all()


def test_hybrid_target_needs_recurrent_snapshots(model_path):
    with Model.load(model_path("qwen35")) as model:
        with model.context(n_ctx=256, n_rs_seq=3) as target, model.mtp_context(target) as draft:
            with pytest.raises(InvalidArgumentError, match="n_rs_seq"):
                SpeculativeDecoder(target, draft, n_draft=3)


def test_bad_arguments(model):
    with SpeculativeDecoder.create(model, n_ctx=256, n_draft=2, **CTX) as decoder:
        for kwargs in ({"n_draft": 0}, {"n_draft": 99}):
            with pytest.raises(InvalidArgumentError):
                SpeculativeDecoder(decoder.target, decoder.draft_context, **kwargs)
        with pytest.raises(InvalidArgumentError):
            decoder.prefill([model.n_vocab + 5])
        with pytest.raises(InvalidArgumentError):
            decoder.accept(0)  # nothing verified yet
        with pytest.raises(InvalidArgumentError):
            decoder.pending(3)
        decoder.prefill(PROMPTS[0])
        decoder.draft(2)
        decoder.verify()
        with pytest.raises(InvalidArgumentError):
            decoder.accept(5)
        assert decoder.step()  # still usable


def test_full_context_keeps_accepted_tokens(model):
    with SpeculativeDecoder.create(model, n_ctx=256, n_draft=3, **CTX) as decoder:
        n_ctx = decoder.target.n_ctx
        produced = []
        with pytest.raises(ContextFullError):
            for token in decoder.generate(PROMPTS[0], max_tokens=10 * n_ctx, stop_at_eog=False):
                produced.append(token)
        prompt_len = len(model.tokenize(PROMPTS[0]))
        assert prompt_len + len(produced) >= n_ctx
        assert produced == plain_greedy(model, PROMPTS[0], len(produced), n_ctx=2 * n_ctx)
        decoder.reset()
        assert list(decoder.generate(PROMPTS[0], max_tokens=20, stop_at_eog=False)) == produced[:20]


def test_aborted_steps_leave_the_decoder_consistent(model, arch, logit_tolerance):
    """A step stopped while drafting, or before its verify batch, changes nothing; the
    drafter's catch-up on a verified batch is never cut (undoing the target's finished
    batch is impossible for recurrent memory). Decoding continues losslessly."""
    reference = greedy_reference(model, PROMPTS[1], 120)
    expected, margins = reference.tokens, reference.margins
    with SpeculativeDecoder.create(model, n_ctx=512, n_draft=3, **CTX) as decoder:
        decoder.prefill(PROMPTS[1])
        produced = []
        # (whose deadline passes at once, n_draft, whether the step stops). Off the CPU the
        # draft context is stopped only between calls, so its passed deadline stops the
        # step before it starts; on the CPU only the catch-up runs there, and it is held.
        draft_between_calls = decoder.draft_context._native.between_calls_only
        stops = [(decoder, 3, True), (decoder, 0, True), (decoder.draft_context, 0, draft_between_calls)]
        while len(produced) < 120:
            if stops and len(produced) >= 10 * (4 - len(stops)):
                where, n_draft, stopped = stops.pop(0)
                with where.time_limit(1e-6):
                    time.sleep(1e-5)
                    if stopped:
                        with pytest.raises(DecodeTimeoutError):
                            decoder.step(n_draft)
                    else:
                        produced += decoder.step(n_draft)[0]
            produced += decoder.step()[0]
        assert not stops
        assert_same_greedy(produced[:120], expected, margins, logit_tolerance)
        # cancel() with nothing running stops the next step, once.
        decoder.cancel()
        with pytest.raises(AbortedError, match="cancelled"):
            decoder.step()
        assert decoder.step()


def test_draft_context_shares_the_weights(model_path, backend_name):
    """The draft context adds its KV and buffers, never a second copy of the weights."""
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    path = model_path("qwen35", n_embd=768, n_layer=6)
    with Model.load(path, use_mmap=False) as model, model.context(n_ctx=512, n_rs_seq=4, **CTX) as target:
        before = process.memory_info().rss
        with model.mtp_context(target) as draft:
            after = process.memory_info().rss
            target_weights = {e["buffer_type"]: e["model"] for e in target.memory_breakdown()}
            draft_weights = {e["buffer_type"]: e["model"] for e in draft.memory_breakdown()}
            draft_own = sum(e["context"] + e["compute"] for e in draft.memory_breakdown())
            with SpeculativeDecoder(target, draft, n_draft=3) as decoder:
                report = decoder.memory_report()
        assert model.size > 100 << 20
        # Same weight buffers seen from both contexts; the process grew by about the
        # draft's own buffers, far less than the weights. A GPU backend also gives each
        # context staging and command buffers that memory_breakdown does not list
        # (about 9 MiB on llvmpipe, whose device memory is this process's memory).
        slack = (8 << 20) if backend_name == "cpu" else (24 << 20)
        assert draft_weights == target_weights
        assert after - before < draft_own + slack, (after - before, draft_own)
        assert after - before < model.size // 3
        assert 0 < report.mtp_weights < model.size
        assert report.recurrent_snapshots > 0
        assert report.draft_context == draft_own
        assert "MTP costs" in str(report)


def test_draft_context_follows_the_targets_attention_setting(model):
    """Upstream builds its drafter from the target's parameters; a draft that chose its
    own attention kernel ran a graph the target never ran (and crashed llvmpipe)."""
    for flash_attn in (False, True, None):
        with model.context(n_ctx=128, n_threads=1, flash_attn=flash_attn) as target, \
                model.mtp_context(target) as draft:
            assert (target.flash_attn, draft.flash_attn) == (flash_attn, flash_attn)


def test_adaptive_drafting_is_lossless_and_drafts_less_when_the_head_is_wrong(model_path):
    per_step, recent = {}, {}
    for acceptance in (0.95, 0.3):
        with Model.load(model_path("qwen35", acceptance=acceptance)) as model:
            expected = plain_greedy(model, PROMPTS[0], 300, n_ctx=2048)
            with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=6, adaptive=True, **CTX) as decoder:
                produced = list(decoder.generate(PROMPTS[0], max_tokens=300, stop_at_eog=False))
                stats = decoder.stats
                assert produced == expected
                recent[acceptance] = decoder.adaptive.accept[0]  # running estimate, ~10 steps
                per_step[acceptance] = stats.drafted / stats.steps
    assert recent[0.3] < recent[0.95], recent
    assert per_step[0.3] < per_step[0.95], per_step


def test_adaptive_policies_are_per_sequence(model, backend_name):
    """Each sequence has its own adaptive policy, fed only by its own steps: a sequence
    that starts later has seen fewer steps, and both stay lossless in shared batches."""
    if backend_name != "cpu":
        pytest.skip(f"backend {backend_name}: exact token equality in shared batches is checked on the CPU run")
    expected = [plain_greedy(model, prompt, 150, n_ctx=2048) for prompt in PROMPTS[:2]]
    with SpeculativeDecoder.create(model, n_ctx=1024, n_seq_max=2, n_draft=5, adaptive=True, **CTX) as decoder:
        outputs = [[], []]
        decoder.prefill(PROMPTS[0], seq_id=0)
        for _ in range(10):
            outputs[0] += decoder.step()[0]
        assert decoder.policies[1].steps == 0  # sequence 1 has not started
        decoder.prefill(PROMPTS[1], seq_id=1)
        while min(len(out) for out in outputs) < 150:
            for seq_id, tokens in enumerate(decoder.step()):
                outputs[seq_id] += tokens
        assert decoder.policies[0].steps == decoder.policies[1].steps + 10
        assert decoder.adaptive is decoder.policies[0]
    assert [out[:150] for out in outputs] == expected


def test_bounded_catch_up_skips_the_prompts_start_and_is_lossless(model, backend_name):
    """catch_up=N: the drafter's memory holds the prompt's last N positions only (its
    catch-up ran over those), across the ubatch-sized calls of a recurrent target's
    prefill; output stays the target's own."""
    prompt = (model.tokenize(PROMPTS[1]) * 40)[:300]
    expected = plain_greedy(model, prompt, 60, n_ctx=1024)
    settings = dict(n_ctx=1024, n_batch=64, n_draft=3, **CTX)
    with SpeculativeDecoder.create(model, **settings) as whole, \
            SpeculativeDecoder.create(model, catch_up=16, **settings) as bounded:
        whole.prefill(prompt)
        bounded.prefill(prompt)
        # The last prompt token is pending: positions 0..298 were evaluated.
        assert (whole.draft_context.pos_min(0), whole.draft_context.pos_max(0)) == (0, 298)
        assert (bounded.draft_context.pos_min(0), bounded.draft_context.pos_max(0)) == (299 - 16, 298)
        produced = []
        while len(produced) < 60:
            produced += bounded.step()[0]
        if backend_name == "cpu":  # elsewhere batched arithmetic may flip a near-tie
            assert produced[:60] == expected
        assert bounded.stats.accepted > 0
        # A continuation prefill with the window: the drafter restarts at its window again.
        bounded.prefill(prompt[:40])
        pending_at = bounded.target.pos_max(0) + 1
        assert (bounded.draft_context.pos_min(0), bounded.draft_context.pos_max(0)) == (pending_at - 16,
                                                                                        pending_at - 1)
    with pytest.raises(InvalidArgumentError, match="catch_up"):
        SpeculativeDecoder.create(model, catch_up=0, **settings)
