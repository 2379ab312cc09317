"""Prefix reuse across requests (pyllama_mtp.slots): a request that shares a prefix with
what a slot holds decodes only the rest, and its greedy answer is the cold answer token
for token: attention models cut back by position, the hybrid qwen35 resumes from a
recurrent-state checkpoint, with MTP (the drafter's KV and hidden row follow) and without.
Through the slots directly, then through `pyllama-mtp serve` as a client sees it."""

from __future__ import annotations

import pytest

from helpers import EXACT, plain_greedy
from pyllama_mtp import Context, Model, SpeculativeDecoder
from pyllama_mtp.answer import Prompt, Sampling
from pyllama_mtp.session import Session
from pyllama_mtp.slots import SpeculativeSlots, common_prefix
from pyllama_mtp.slots_plain import PlainSlots
from test_server import ServerProcess

pytestmark = pytest.mark.backend_independent(
    "which tokens a slot keeps and decodes again is Python over the decoder; the decoder's "
    "tokens on each device are test_speculative's")

N_TOKENS = 12
BASE = "the cache keeps what was said before and the next turn says more. " * 4


def _slots(model, mtp: bool, n_slots: int, **cache):
    if mtp:
        decoder = SpeculativeDecoder.create(model, n_ctx=1024 * n_slots, n_draft=3, n_seq_max=n_slots, **EXACT)
        return SpeculativeSlots(decoder, **cache), decoder
    context = Context(model, n_ctx=1024 * n_slots, n_seq_max=n_slots, **EXACT)
    return PlainSlots(context, **cache), context


def _answer(model, slots, slot: int, tokens: list[int]) -> tuple[list[int], int]:
    """Greedy tokens (end of generation included, nothing stops early) and the reuse."""
    session = Session(model, Prompt(list(tokens), (), None), N_TOKENS, Sampling())
    slots.start(slot, session)
    out: list[int] = []
    while len(out) < N_TOKENS:
        produced, _, failed = slots.step([session if s == slot else None for s in range(slots.n_slots)])
        assert not failed
        out += produced[slot]
    slots.finish(slot)
    return out[:N_TOKENS], session.reused


@pytest.mark.parametrize("mtp", [True, False], ids=["mtp", "plain"])
@pytest.mark.parametrize("arch", ["qwen35", "glm4moe"])
def test_reused_prefixes_give_the_cold_answer(model_path, arch, mtp):
    with Model.load(model_path(arch)) as model:
        first = model.tokenize(BASE)
        cold_first = plain_greedy(model, first, N_TOKENS)
        # The next requests: the same prompt again; the prompt, its answer and more (a next
        # turn); a prompt that leaves the first one inside its answer; one that leaves it
        # inside the prompt; and one that shares nothing.
        turn = first + cold_first + model.tokenize(" and then it goes on", add_special=False)
        inside_answer = first + cold_first[:5] + model.tokenize(" but not", add_special=False)
        inside_prompt = first[:len(first) - 9] + model.tokenize(" something else", add_special=False)
        other = model.tokenize("an unrelated question about the weather")
        slots, owner = _slots(model, mtp, n_slots=1, checkpoint_every=16)
        reuses = []
        try:
            out, reused = _answer(model, slots, 0, first)
            assert out == cold_first and reused == 0
            for tokens in (first, turn, inside_answer, inside_prompt, other, turn):
                held = slots._held[0]
                shared, n_held = common_prefix(held.tokens, tokens), len(held.tokens)
                inside = [c.n_tokens for c in held.checkpoints if c.n_tokens <= min(shared, len(tokens))]
                out, reused = _answer(model, slots, 0, tokens)
                assert out == plain_greedy(model, tokens, N_TOKENS), tokens
                if shared == n_held:  # continued: only its pending token again
                    assert reused == shared - 1
                elif slots.recurrent:  # resumed at the last checkpoint inside the shared prefix
                    assert reused == (max(inside) - 1 if inside else 0)
                else:  # cut back to the shared prefix (MTP evaluates its last token again)
                    assert min(shared, len(tokens)) - 2 <= reused < len(tokens)
                reuses.append(reused)
            assert min(reuses[:4]) > 0  # each of those found something to reuse
        finally:
            slots.close()
            owner.close()


def test_a_request_takes_the_slot_holding_its_prefix_and_checkpoints_are_bounded(model_path):
    with Model.load(model_path("qwen35")) as model:
        a = model.tokenize(BASE)
        b = model.tokenize("a second conversation, about something else entirely. " * 4)
        slots, owner = _slots(model, True, n_slots=2, max_checkpoints=3, checkpoint_every=16)
        try:
            _answer(model, slots, 0, a)
            _answer(model, slots, 1, b)
            assert slots.choose([0, 1], a + [5, 6]) == 0
            assert slots.choose([0, 1], b + [5, 6]) == 1
            # Every 16 tokens, four before the prompt's end and (prompts evaluated in calls of
            # their own: MTP on a hybrid model) at its end; at most 3 kept per slot.
            assert all(len(held.checkpoints) == 3 for held in slots._held)
            assert slots.checkpoint_count == 6 and slots.checkpoint_bytes > 0
            kept = [c.n_tokens for c in slots._held[0].checkpoints]
            assert kept == sorted(kept) and kept[-1] == (len(a) - 4 if slots.inline else len(a))
            slots.forget(0)
            assert slots.checkpoint_count == 3 and slots.reusable(0, a) == 0
        finally:
            slots.close()
            owner.close()


@pytest.mark.parametrize("mtp", [True, False], ids=["mtp", "plain"])
@pytest.mark.parametrize("arch", ["qwen35", "glm4moe"])
def test_server_reports_cached_tokens_and_answers_as_cold(model_path, arch, mtp):
    path = str(model_path(arch))
    with Model.load(path) as model:
        first_text = BASE
        first_answer_ref = model.detokenize(plain_greedy(model, model.tokenize(first_text), N_TOKENS))
    server = ServerProcess(path, "--parallel", "2", "--ctx-size", "4096", *([] if mtp else ["--no-mtp"]))
    try:
        client = server.client()
        model_id = client.models.list().data[0].id

        def complete(prompt, **extra):
            return client.completions.create(model=model_id, prompt=prompt, max_tokens=N_TOKENS, temperature=0,
                                             extra_body=extra or None)

        first = complete(first_text)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        second_text = first_text + first.choices[0].text + " and then it goes on"
        second = complete(second_text)
        with Model.load(path) as model:
            tokens = model.tokenize(second_text)
            expected = model.detokenize(plain_greedy(model, tokens, N_TOKENS, n_ctx=2048))
            eog_free = [t for t in plain_greedy(model, tokens, N_TOKENS) if model.is_eog(t)] == []
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached >= 0.6 * first.usage.prompt_tokens, (cached, first.usage.prompt_tokens)
        assert cached < second.usage.prompt_tokens
        if eog_free:
            assert second.choices[0].text == expected
        else:
            assert expected.startswith(second.choices[0].text)
        assert first.choices[0].text == first_answer_ref or first_answer_ref.startswith(first.choices[0].text)
        cold = complete(second_text, cache_prompt=False)  # llama-server's field: evaluated cold
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        assert cold.choices[0].text == second.choices[0].text
        metrics = server.metrics()
        assert metrics["pyllama_mtp_prompt_cached_tokens_total"] >= cached
    finally:
        server.stop()


@pytest.mark.parametrize("arch", ["qwen35", "glm4moe"])
def test_queued_prompts_are_fed_inside_the_others_steps(model_path, arch):
    """pmtp_spec_enqueue: a prompt longer than what a batch leaves goes in over several
    steps while another sequence decodes at every one; a short one gets its first token
    from the first step; a prompt queued in parts (checkpoint between) continues as one."""
    with Model.load(model_path(arch)) as model:
        running = model.tokenize(BASE)
        long = model.tokenize("a much longer prompt that needs several batches to go in. " * 3)
        short = model.tokenize("short")
        decoder = SpeculativeDecoder.create(model, n_ctx=3 * 1024, n_draft=3, n_seq_max=3, n_batch=32, **EXACT)
        try:
            decoder.prefill(running, 0)
            decoder.enqueue(long, 1)
            decoder.enqueue(short, 2)
            out: list[list[int]] = [[], [], []]
            first_token_step = [None, None, None]
            for step in range(40):
                produced = decoder.step([3, 3, 3])
                assert produced[0], "the running sequence waited for the queued prompts"
                for seq in range(3):
                    if produced[seq] and first_token_step[seq] is None:
                        first_token_step[seq] = step
                    out[seq] += produced[seq]
                if step < first_token_step[1] if first_token_step[1] is not None else True:
                    assert not decoder.is_active(1)
                if all(len(o) >= N_TOKENS for o in out):
                    break
            # Each batch holds the running sequence's rows (4) first: 28 tokens of prompt
            # each step at most, so the long prompt needs several steps; the short one
            # fits beside it from the first.
            assert first_token_step[2] == 0
            assert first_token_step[1] >= (len(long) - 1) // 28
            for seq, prompt in enumerate((running, long, short)):
                assert out[seq][:N_TOKENS] == plain_greedy(model, prompt, N_TOKENS), seq
            # In two parts, the first parked for a checkpoint: the same as one prompt.
            decoder.reset(1)
            decoder.enqueue(long[:40], 1, ready=False)
            while not decoder.is_active(1):
                decoder.step([3, 0, 0])
            checkpoint = decoder.checkpoint(1)
            assert checkpoint.n_tokens == 40
            decoder.enqueue(long[40:], 1)
            again: list[int] = []
            while len(again) < N_TOKENS:
                again += decoder.step([0, 3, 0])[1]
            assert again[:N_TOKENS] == out[1][:N_TOKENS]
            checkpoint.free()
        finally:
            decoder.close()
