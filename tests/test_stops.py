"""Stop strings over streamed text: the output ends exactly where a stop string starts,
whatever the split of the text into pieces (one speculative step can emit several tokens)."""

from __future__ import annotations

import random

import pytest

from pyllama_mtp.stops import StopMatcher

pytestmark = pytest.mark.backend_independent("stop strings over text")


def stream(pieces, stops):
    matcher = StopMatcher(stops)
    emitted = []
    for piece in pieces:
        emitted.append(matcher.push(piece))
        if matcher.stopped:
            break
    emitted.append(matcher.flush())
    return emitted, matcher.stopped


def random_split(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if len(text) > 1 else []
    bounds = [0] + cuts + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("seed", range(200))
def test_any_split_stops_exactly_at_the_earliest_stop(seed):
    rng = random.Random(seed)
    alphabet = "ab<|>/ "
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    hits = [text.find(stop) for stop in stops if stop in text]
    expected = text[:min(hits)] if hits else text
    emitted, stopped = stream(random_split(text, rng), stops)
    assert "".join(emitted) == expected
    assert stopped == bool(hits)
    # Nothing emitted ever reaches into a stop string: every prefix of the output is a
    # prefix of the expected text.
    so_far = ""
    for piece in emitted:
        so_far += piece
        assert expected.startswith(so_far)


def test_holds_back_only_what_could_become_a_stop():
    matcher = StopMatcher(["</answer>"])
    assert matcher.push("hello </ans") == "hello "
    assert matcher.push("wer") == ""
    assert matcher.push("!") == "</answer!"
    assert matcher.push(" </answer> tail") == " "
    assert matcher.stopped and matcher.push("more") == "" and matcher.flush() == ""


def test_no_stops_passes_everything_through():
    matcher = StopMatcher(["", ""])
    assert matcher.push("abc") == "abc" and matcher.flush() == ""
