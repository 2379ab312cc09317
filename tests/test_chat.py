"""Chat and completion on the MTP engine (LLM): the model's template, greedy output equal to
plain decoding's, stop strings, JSON-schema answers, streaming, multi-turn reuse."""

from __future__ import annotations

import json

import pytest

from chat_cases import CONVERSATIONS, QWEN_SPECIALS, template_source
from helpers import EXACT
from pyllama_mtp import LLM, InvalidArgumentError, Model, Sampler, TextStream, parse_chat_output

pytestmark = pytest.mark.backend_independent(
    "templates, stops and text over the decoder's tokens; the decoder's tokens "
    "on each device are test_speculative's")

N_TOKENS = 60
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}}, "required": ["n", "ok"]}


@pytest.fixture(scope="module")
def chat_model_path(model_path):
    """Fixtures that chat with the Qwen3.5 template and have its special tokens."""
    return lambda arch="qwen35": model_path(arch, chat_template=template_source("Qwen3.5-4B"),
                                            special_tokens=QWEN_SPECIALS)


def plain_text(model, rendered, max_tokens):
    """Plain greedy decoding of a rendered request, as text (the reference)."""
    tokens = model.tokenize(rendered.prompt, add_special=True, parse_special=True)
    special = [model.tokenize(t, add_special=False, parse_special=True)[0] for t in rendered.preserved_tokens]
    with model.context(n_ctx=4096, **EXACT) as ctx, Sampler(0.0, grammar=rendered.grammar) as sampler:
        out = list(ctx.generate(tokens, max_tokens=max_tokens, sampler=sampler))
    stream = TextStream(model, special=special)
    return "".join(stream.push(t) for t in out) + stream.flush()


def make_llm(model, n_draft=3):
    return LLM(model, n_ctx=4096, n_draft=n_draft, **EXACT)


@pytest.mark.parametrize("n_draft", [1, 2, 3, 4])
def test_greedy_chat_is_plain_decoding(chat_model_path, n_draft):
    messages = CONVERSATIONS["system_turns"]
    with Model.load(chat_model_path()) as model, make_llm(model, n_draft) as llm:
        rendered = model.chat_template.render(messages)
        expected = parse_chat_output(plain_text(model, rendered, N_TOKENS), rendered)
        response = llm.chat(messages, max_tokens=N_TOKENS)
    assert response.message == expected
    assert response.finish_reason == "length"
    usage = response.usage
    assert usage.completion_tokens == N_TOKENS and usage.prompt_tokens > 0
    assert 0 < usage.accepted_tokens < usage.drafted_tokens  # partial acceptance


@pytest.mark.parametrize("n_draft", [1, 2, 3, 4])
def test_json_schema_answer_is_plain_constrained_decoding(chat_model_path, n_draft):
    messages = CONVERSATIONS["single"]
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    with Model.load(chat_model_path()) as model, make_llm(model, n_draft) as llm:
        rendered = model.chat_template.render(messages, json_schema=SCHEMA, enable_thinking=False)
        expected = parse_chat_output(plain_text(model, rendered, 300), rendered)
        response = llm.chat(messages, response_format=response_format, enable_thinking=False, max_tokens=300)
    assert response.message == expected
    answer = json.loads(response.message["content"])
    assert set(answer) >= {"n", "ok"} and 0 <= answer["n"] <= 99
    assert response.finish_reason == "stop"  # the grammar ends the answer


@pytest.mark.parametrize("n_draft", [1, 2, 3, 4])
def test_stop_string_ends_the_answer_exactly(chat_model_path, n_draft):
    messages = CONVERSATIONS["single"]
    with Model.load(chat_model_path()) as model, make_llm(model, n_draft) as llm:
        rendered = model.chat_template.render(messages, enable_thinking=False)
        full = parse_chat_output(plain_text(model, rendered, N_TOKENS), rendered)["content"]
        stop = full[25:28]
        expected = full[:full.find(stop)]
        response = llm.chat(messages, stop=stop, enable_thinking=False, max_tokens=N_TOKENS)
        deltas = list(llm.chat(messages, stop=[stop, "never"], enable_thinking=False, max_tokens=N_TOKENS,
                               stream=True))
    assert response.message["content"] == expected and response.finish_reason == "stop"
    assert response.usage.completion_tokens < N_TOKENS
    streamed = "".join(delta.content for delta in deltas)
    assert streamed == expected
    assert all(stop not in delta.content for delta in deltas)
    assert deltas[-1].finish_reason == "stop" and deltas[-1].message["content"] == expected


def test_streaming_keeps_reasoning_and_content_apart(chat_model_path):
    messages = CONVERSATIONS["single"]
    with Model.load(chat_model_path()) as model, make_llm(model) as llm:
        whole = llm.chat(messages, max_tokens=N_TOKENS)
        deltas = list(llm.chat(messages, max_tokens=N_TOKENS, stream=True))
    assert "".join(d.reasoning_content for d in deltas) == (whole.message["reasoning_content"] or "")
    assert "".join(d.content for d in deltas) == (whole.message["content"] or "")
    assert deltas[-1].message == whole.message and deltas[-1].usage.completion_tokens == N_TOKENS
    assert sum(bool(d.reasoning_content) for d in deltas) > 1  # it did stream


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("arch", ["glm4moe", "qwen35"])
def test_next_turn_decodes_only_the_new_suffix(chat_model_path, arch):
    first = CONVERSATIONS["system_turns"]
    with Model.load(chat_model_path(arch)) as model:
        with make_llm(model) as llm:
            answer = llm.chat(first, max_tokens=20, enable_thinking=False)
            second = first + [{"role": "assistant", "content": answer.message["content"]},
                              {"role": "user", "content": "And then?"}]
            again = llm.chat(second, max_tokens=20, enable_thinking=False)
        with make_llm(model) as fresh:
            reference = fresh.chat(second, max_tokens=20, enable_thinking=False)
        # The template renders a past answer unlike the prompt that asked for it (Qwen3.5
        # drops the empty thinking block): the shared part is the rendered prefix.
        shared = common_prefix(*(model.tokenize(model.chat_template.apply(m, enable_thinking=False),
                                                add_special=True, parse_special=True) for m in (first, second)))
        if arch == "qwen35":
            history = model.chat_template.render(first, add_generation_prompt=False, enable_thinking=False).prompt
            start = len(model.tokenize(history, add_special=True, parse_special=True)) - 1
    assert again.message == reference.message
    assert reference.usage.prompt_tokens_reused == 0
    reused = again.usage.prompt_tokens_reused
    assert shared > 0.8 * answer.usage.prompt_tokens
    if arch == "glm4moe":  # attention only: the KV cache goes back to the common prefix (the
        # last two tokens there are evaluated again: the pending one and the row it pairs with)
        assert shared - 2 <= reused < again.usage.prompt_tokens
    else:  # recurrent state resumes at a checkpoint inside the common prefix: where the
        # first prompt's generation prompt starts, less the token that may merge (answer.py)
        assert start <= shared and reused == start - 1


def test_complete_with_stops_and_limits(chat_model_path):
    with Model.load(chat_model_path()) as model, make_llm(model) as llm:
        full = llm.complete("Once upon", max_tokens=40)
        assert full.finish_reason == "length" and full.usage.completion_tokens == 40
        stop = full.text[10:12]
        cut = llm.complete("Once upon", max_tokens=40, stop=stop)
        assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
        assert "".join(llm.complete("Once upon", max_tokens=40, stream=True)) == full.text
        document = llm.complete("Once upon", json_schema=SCHEMA, max_tokens=300)
        assert json.loads(document.text)["ok"] in (True, False)


def test_bad_requests_are_clear_errors_and_lose_nothing(chat_model_path):
    with Model.load(chat_model_path()) as model, make_llm(model) as llm:
        good = llm.chat(CONVERSATIONS["single"], max_tokens=5)
        for bad in (dict(messages="hi"), dict(messages=CONVERSATIONS["single"], max_tokens=-1),
                    dict(messages=CONVERSATIONS["single"], response_format={"type": "xml"}),
                    dict(messages=CONVERSATIONS["single"], stop=[1]),
                    dict(messages=CONVERSATIONS["single"], temperature=-1.0),
                    dict(messages=CONVERSATIONS["single"], grammar="root ::= (")):
            with pytest.raises(InvalidArgumentError):
                llm.chat(**bad)
        assert llm.chat(CONVERSATIONS["single"], max_tokens=5).message == good.message
