"""The batch-aware adaptive plan (pyllama_mtp.adaptive) and the resting drafter
(PMTP_DRAFT_REST): the plan follows measured step times and acceptance, and resting
never changes the output."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import EXACT, plain_greedy
from pyllama_mtp import Model, SpeculativeDecoder, _lowlevel
from pyllama_mtp.adaptive import AdaptiveDraft, StepCost, plan_drafts

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away"]


def _policies(n_seq: int, acceptance: float, n_max: int = 3) -> list[AdaptiveDraft]:
    policies = [AdaptiveDraft(n_max, n_max) for _ in range(n_seq)]
    for policy in policies:
        policy.accept[:] = acceptance
        policy.steps = 1  # not an exploring step
    return policies


def _cost(seconds: dict[tuple[int, int], float]) -> StepCost:
    cost = StepCost()
    for (active, rounds), value in seconds.items():
        cost.observe(active, rounds, value)
    cost.steps = 1
    return cost


# Measured on the benchmark fixture at 8 sequences (ms per step by draft rounds).
EIGHT = {(8, 0): 0.033, (8, 1): 0.053, (8, 2): 0.070, (8, 3): 0.106}


def test_a_poor_head_in_a_full_batch_drafts_nothing():
    lengths = plan_drafts(_policies(8, 0.4), [True] * 8, _cost(EIGHT))
    assert lengths == [0] * 8


def test_a_good_head_drafts_where_it_pays():
    lengths = plan_drafts(_policies(8, 0.9), [True] * 8, _cost(EIGHT))
    # 8 * (1 + .9 + .81) / 0.070 = 310 tokens/s beats 8 / 0.033 = 242 and the others.
    assert lengths == [2] * 8


def test_fixed_lengths_are_kept_and_inactive_sequences_draft_nothing():
    lengths = plan_drafts(_policies(4, 0.9), [True, True, False, True], _cost({(3, r): 0.01 * (1 + r) for r in
                                                                                range(4)}), [1, None, None, 3])
    assert lengths[0] == 1 and lengths[3] == 3 and lengths[2] == 0


def test_untried_lengths_are_tried_shortest_first_and_other_sizes_borrow_relative_costs():
    policies, cost = _policies(2, 0.6), StepCost()
    assert plan_drafts(policies, [True, True], cost) == [0, 0]
    cost.observe(2, 0, 0.030)
    assert plan_drafts(policies, [True, True], cost) == [1, 1]
    cost = _cost({(8, 0): 0.030, (8, 3): 0.120, (7, 0): 0.028})
    # At 7 sequences length 3 is unmeasured: 0.028 * 0.120 / 0.030, not 8's seconds scaled.
    assert cost.seconds(7, 3) == pytest.approx(0.112)
    assert cost.seconds(1, 3) == pytest.approx(0.120)  # nothing to anchor: the nearest as it is


def test_a_sequence_stops_where_its_drafts_are_rarely_kept():
    policies = _policies(2, 0.9)
    policies[1].accept[:] = [0.5, 0.3, 0.3]  # kept with chance .5, then .15: one draft
    lengths = plan_drafts(policies, [True, True], _cost({(2, r): 0.02 + 0.001 * r for r in range(4)}))
    assert lengths == [3, 1]


def test_a_few_steps_tell_a_good_head_and_a_bad_one_from_the_prior():
    good, bad = AdaptiveDraft(3, 3), AdaptiveDraft(3, 3)
    for _ in range(3):
        good.observe(3, 3)
        bad.observe(3, 0)
    # Three steps weigh three times the prior: 0.6 -> 0.9 and 0.6 -> 0.15 at position 0.
    assert good.accept[0] == pytest.approx(0.9) and bad.accept[0] == pytest.approx(0.15)
    assert bad.accept[1] == pytest.approx(0.6)  # never reached: no evidence
    for _ in range(200):
        good.observe(3, 3)
    assert good.accept.min() > 0.99  # then a running average that keeps following


def test_a_shapes_first_step_does_not_decide_its_cost():
    cost = StepCost()
    cost.observe(1, 3, 0.500)  # graph build on first use
    cost.observe(1, 3, 0.020)
    assert cost.seconds(1, 3) == pytest.approx(0.020)
    cost.observe(1, 3, 0.030)
    assert cost.seconds(1, 3) == pytest.approx(0.025)


def test_the_first_step_after_a_prefill_drafts_nothing_unless_told(model):
    with SpeculativeDecoder.create(model, n_ctx=512, n_draft=3, **EXACT) as decoder:
        decoder.prefill(PROMPTS[0])
        assert len(decoder.step()[0]) == 1 and decoder.last_drafted == [0]
        decoder.step()
        assert decoder.last_drafted == [3]
        decoder.prefill(" and then", 0)
        decoder.step(2)  # an explicit length is kept
        assert decoder.last_drafted == [2]


@pytest.mark.parametrize("arch", ["qwen35", "glm4moe"])
def test_a_resting_drafter_changes_nothing_and_drafts_again(model_path, arch, backend_name):
    if backend_name != "cpu":
        pytest.skip(f"backend {backend_name}: exact token equality is checked on the CPU run")
    rest = _lowlevel.PMTP_DRAFT_REST
    with Model.load(model_path(arch)) as model:
        expected = [plain_greedy(model, prompt, 90) for prompt in PROMPTS[:2]]
        with SpeculativeDecoder.create(model, n_ctx=1024, n_seq_max=2, n_draft=3, **EXACT) as decoder:
            for seq, prompt in enumerate(PROMPTS[:2]):
                decoder.prefill(prompt, seq)
            outputs: list[list[int]] = [[], []]
            native = decoder._native
            drafted = 0
            for step in range(200):
                # Sequence 0 rests in bursts, sequence 1 every other step; both draft between.
                lengths = [rest if (step // 5) % 2 else 3, rest if step % 2 else 2]
                tokens, counts, verified, _ = native.step_each(lengths, 0.0)
                for seq in range(2):
                    outputs[seq] += tokens[seq, :counts[seq]].tolist()
                drafted += int(np.maximum(verified, 0).sum())
                if min(len(out) for out in outputs) >= 90:
                    break
    assert [out[:90] for out in outputs] == expected
    assert drafted > 0
