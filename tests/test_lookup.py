"""n-gram lookup + MTP drafting (pyllama_mtp.lookup): lossless, and lookup drafts win on
repetitive text."""

from __future__ import annotations

import pytest

from pyllama_mtp import Model, SpeculativeDecoder
from pyllama_mtp.lookup import LookupStats, generate_with_lookup, lookup_draft

from helpers import EXACT as CTX
from helpers import plain_greedy


def test_lookup_draft_finds_the_latest_continuation():
    history = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup_draft(history, 3, 4) == [7, 8, 5, 1]
    assert lookup_draft(history, 3, 1) == [7]
    assert lookup_draft([4, 5, 6], 3, 4) == []
    assert lookup_draft([1, 2, 3, 4], 2, 4) == []


def test_lookup_and_mtp_drafts_are_lossless(model_path, arch, backend_name):
    if backend_name != "cpu":
        pytest.skip(f"backend {backend_name}: exact token equality is checked on the CPU run; batched "
                    "arithmetic elsewhere flips near-ties (test_speculative checks those with margins)")
    with Model.load(model_path(arch)) as model:
        # A prompt that repeats itself, as code and quotations do.
        prompt = model.tokenize("def add(a, b):\n    return a + b\n\n" * 6 + "def add(a, b):\n")
        expected = plain_greedy(model, prompt, 200, n_ctx=1024)
        stats = LookupStats()
        with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=8, **CTX) as decoder:
            produced = list(generate_with_lookup(decoder, prompt, max_tokens=200, stats=stats))
        assert produced == expected
        assert stats.steps["lookup"] > 0 and stats.steps["mtp"] > 0, stats
        print(f"{arch}: {stats}")


REPETITIVE = "def add(a, b):\n    return a + b\n\n" * 6 + "def add(a, b):\n"


def test_native_lookup_matches_the_python_policy(model_path, arch, backend_name):
    """The C step's lookup (SpeculativeDecoder.create(lookup_ngram=...)) makes the same
    choices as the Python policy on the low-level API: same tokens, same lookup steps,
    drafts and acceptances; and both are plain greedy decoding."""
    if backend_name != "cpu":
        pytest.skip(f"backend {backend_name}: exact token equality is checked on the CPU run")
    with Model.load(model_path(arch)) as model:
        prompt = model.tokenize(REPETITIVE)
        expected = plain_greedy(model, prompt, 200, n_ctx=1024)
        python_stats = LookupStats()
        with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=8, **CTX) as decoder:
            by_python = list(generate_with_lookup(decoder, prompt, max_tokens=200, n_mtp=3, stats=python_stats))
        with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=3, lookup_ngram=3, lookup_min=2,
                                       lookup_max=8, **CTX) as decoder:
            native = list(decoder.generate(prompt, max_tokens=200, stop_at_eog=False))
            stats = decoder.stats
    assert by_python == expected
    assert native == expected
    assert stats.lookup_steps == python_stats.steps["lookup"] > 0
    assert stats.steps - stats.lookup_steps == python_stats.steps["mtp"] > 0
    assert stats.lookup_drafted == python_stats.drafted["lookup"]
    assert stats.lookup_accepted == python_stats.accepted["lookup"]
    assert stats.drafted == python_stats.drafted["lookup"] + python_stats.drafted["mtp"]
    assert stats.n_draft_max == 8 and stats.drafted_at[7] > 0  # lookup drafts reach past n_draft
    print(f"{arch}: {stats}")


def test_native_lookup_with_adaptive_drafting_and_several_sequences(model_path, arch, backend_name):
    if backend_name != "cpu":
        pytest.skip(f"backend {backend_name}: exact token equality is checked on the CPU run")
    with Model.load(model_path(arch)) as model:
        prompts = [REPETITIVE, "Once upon a time"]
        expected = [plain_greedy(model, prompt, 120) for prompt in prompts]
        with SpeculativeDecoder.create(model, n_ctx=512, n_seq_max=2, n_draft=3, adaptive=True,
                                       lookup_ngram=2, lookup_max=6, **CTX) as decoder:
            outputs = decoder.generate_many(prompts, max_tokens=120, stop_at_eog=False)
            assert decoder.stats.lookup_steps > 0
    assert outputs == expected


def test_lookup_arguments_are_checked(model_path):
    from pyllama_mtp import InvalidArgumentError

    with Model.load(model_path("qwen35")) as model:
        with SpeculativeDecoder.create(model, n_ctx=64, n_draft=2, lookup_ngram=2, lookup_max=4, **CTX) as decoder:
            for kwargs in ({"ngram": -1}, {"ngram": 2, "max_tokens": 5}, {"ngram": 2, "min_tokens": 0},
                           {"ngram": 2, "min_tokens": 5, "max_tokens": 4}):
                ngram = kwargs.pop("ngram")
                with pytest.raises(InvalidArgumentError):
                    decoder.set_lookup(ngram, **kwargs)
            decoder.set_lookup(0)  # off again: plain MTP steps
            list(decoder.generate("abcabcabcabc", max_tokens=20, stop_at_eog=False))
            assert decoder.stats.lookup_steps == 0
        with pytest.raises(InvalidArgumentError):
            SpeculativeDecoder.create(model, n_ctx=64, lookup_ngram=-2, **CTX)
