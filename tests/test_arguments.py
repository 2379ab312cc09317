"""A bad argument is named as the caller passed it, with the value that came."""

from __future__ import annotations

import pytest

from pyllama_mtp import Context, InvalidArgumentError, Model, Sampler, SpeculativeDecoder

pytestmark = pytest.mark.backend_independent("argument checks run before any device is used")

# (call, the argument's name, the bad value): each call gets only that one bad value.
CASES = [
    (lambda m: SpeculativeDecoder.create(m, n_draft=64), "n_draft", 64),
    (lambda m: SpeculativeDecoder.create(m, n_draft="3"), "n_draft", "3"),
    (lambda m: SpeculativeDecoder.create(m, p_min="x"), "p_min", "x"),
    (lambda m: SpeculativeDecoder.create(m, p_min=float("nan")), "p_min", float("nan")),
    (lambda m: SpeculativeDecoder.create(m, catch_up=0), "catch_up", 0),
    (lambda m: SpeculativeDecoder.create(m, lookup_ngram=-1), "lookup_ngram", -1),
    (lambda m: SpeculativeDecoder.create(m, lookup_ngram=2, lookup_max=99), "lookup_max", 99),
    (lambda m: Context(m, n_ctx=0), "n_ctx", 0),
    (lambda m: Context(m, n_ctx=True), "n_ctx", True),
    (lambda m: Context(m, n_batch=64, n_ubatch=128), "n_ubatch", 128),
    (lambda m: Context(m, n_threads=-2), "n_threads", -2),
    (lambda m: Context(m, n_rs_seq=65), "n_rs_seq", 65),
    (lambda m: Sampler(temperature=-1), "temperature", -1),
    (lambda m: Sampler(temperature="hot"), "temperature", "hot"),
    (lambda m: Sampler(top_k=1.5), "top_k", 1.5),
    (lambda m: Sampler(top_p=0), "top_p", 0),
    (lambda m: Sampler(min_p=1), "min_p", 1),
    (lambda m: Model.load(m.path, n_gpu_layers="all"), "n_gpu_layers", "all"),
]


@pytest.fixture(scope="module")
def model(model_path):
    with Model.load(model_path("qwen35")) as loaded:
        yield loaded


@pytest.mark.parametrize("index", range(len(CASES)))
def test_an_argument_error_names_what_the_caller_passed(model, index):
    call, name, value = CASES[index]
    with pytest.raises(InvalidArgumentError) as error:
        call(model)
    message = str(error.value)
    assert message.startswith(f"{name} must be ") and message.endswith(f"got {value!r}"), message


def test_lookup_lengths_are_checked_where_they_are_set(model):
    with SpeculativeDecoder.create(model, n_draft=2, n_ctx=128) as decoder:
        with pytest.raises(InvalidArgumentError, match=r"^min_tokens must be an int in \[1, 2\], got 3$"):
            decoder.set_lookup(2, min_tokens=3, max_tokens=2)
