"""n-gram lookup + MTP drafting (pyllama_mtp.lookup): lossless, and lookup drafts win on
repetitive text."""

from __future__ import annotations

import pytest

from pyllama_mtp import Model, SpeculativeDecoder
from pyllama_mtp.lookup import LookupStats, generate_with_lookup, lookup_draft

CTX = dict(n_threads=1, flash_attn=False)


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
        with model.context(n_ctx=1024, **CTX) as ctx:
            expected = list(ctx.generate(prompt, max_tokens=200, stop_at_eog=False))
        stats = LookupStats()
        with SpeculativeDecoder.create(model, n_ctx=1024, n_draft=8, **CTX) as decoder:
            produced = list(generate_with_lookup(decoder, prompt, max_tokens=200, stats=stats))
        assert produced == expected
        assert stats.steps["lookup"] > 0 and stats.steps["mtp"] > 0, stats
        print(f"{arch}: {stats}")
