"""Chat templates through llama.cpp's own chat layer: rendering, thinking, tools, and the
family's output parser reading back what its template wrote."""

from __future__ import annotations

import json

import pytest

from chat_cases import CONVERSATIONS, MTP_TEMPLATES, QWEN_SPECIALS, TOOL_CALL, TOOLS, template_source
from pyllama_mtp import ChatTemplate, InvalidArgumentError, LlamaError, Model, parse_chat_output

pytestmark = pytest.mark.backend_independent("prompt rendering and parsing by llama.cpp's chat layer, on the CPU")

# What ends an assistant turn in the families whose end is a marker of its own (the model
# emits it as an end-of-generation token; it is never part of the parsed text).
TURN_ENDS = ("<|im_end|>", "<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("name", MTP_TEMPLATES)
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_renders_every_message_in_order(name, conversation):
    messages = CONVERSATIONS[conversation]
    with ChatTemplate(template_source(name)) as template:
        prompt = template.apply(messages, tools=TOOLS if conversation == "tool_result" else None)
        with_prompt = template.apply(messages)
        without = template.apply(messages, add_generation_prompt=False)
    at = 0
    for message in messages:
        if message["content"]:
            at = prompt.find(message["content"], at)
            assert at >= 0, (message, prompt)
    if conversation == "tool_result":
        assert "get_weather" in prompt and "Paris" in prompt
    assert with_prompt.startswith(without)
    if messages[-1]["role"] == "user":  # (after a tool result, DeepSeek V3.1 adds nothing)
        assert len(with_prompt) > len(without)


# Templates whose prompt follows enable_thinking. Step 3.5 always thinks; Kimi K2's
# templates leave thinking to the model; MiMo-VL has no thinking block.
THINKING_SWITCH = {"Qwen3.5-4B", "GLM-4.6", "GLM-4.7-Flash", "deepseek-ai-DeepSeek-V3.1", "deepseek-ai-DeepSeek-V3.2",
                   "deepseek-ai-DeepSeek-V4", "deepseek-ai-DeepSeek-V4-Flash-0731"}


@pytest.mark.parametrize("name", MTP_TEMPLATES)
def test_thinking_switch(name):
    with ChatTemplate(template_source(name)) as template:
        on = template.render(CONVERSATIONS["single"], enable_thinking=True)
        off = template.render(CONVERSATIONS["single"], enable_thinking=False)
        default = template.render(CONVERSATIONS["single"])
    assert template.supports_thinking == (name != "MiMo-VL")
    assert (on.prompt != off.prompt) == (name in THINKING_SWITCH)
    assert default.prompt == on.prompt  # llama-server's default: thinking on


@pytest.mark.parametrize("name", MTP_TEMPLATES)
def test_the_parser_reads_back_the_tool_call_its_template_writes(name):
    """Render a conversation ending in an assistant tool call; what the template wrote for
    that turn, parsed by the same family's parser, is the same call."""
    base = CONVERSATIONS["system_turns"]
    with ChatTemplate(template_source(name)) as template:
        full = template.render(base + [{"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]}],
                               tools=TOOLS, add_generation_prompt=False).prompt
        # The request the model would have answered: whichever thinking setting renders
        # a prefix of the full conversation (templates drop the thinking block of past turns).
        for thinking in (None, False, True):
            rendered = template.render(base, tools=TOOLS, enable_thinking=thinking)
            if full.startswith(rendered.prompt):
                break
        else:
            pytest.fail("no rendering of the request is a prefix of the rendered conversation")
    turn = full[len(rendered.prompt):]
    for end in TURN_ENDS:
        turn = turn.split(end)[0]
    message = parse_chat_output(turn, rendered)
    assert [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in message["tool_calls"]] \
        == [("get_weather", {"city": "Paris", "days": 2})]
    assert not (message["content"] or "").strip()


def test_reasoning_is_parsed_apart():
    with ChatTemplate(template_source("Qwen3.5-4B")) as template:
        rendered = template.render(CONVERSATIONS["single"])
    assert rendered.generation_prompt.endswith("<think>\n")
    message = parse_chat_output("Let me see.\n</think>\n\nHello!", rendered)
    assert message["reasoning_content"].strip() == "Let me see." and message["content"] == "Hello!"
    partial = parse_chat_output("Let me", rendered, partial=True)
    assert partial["reasoning_content"] == "Let me" and not partial["content"]


def test_json_schema_gives_the_template_a_grammar():
    with ChatTemplate(template_source("Qwen3.5-4B")) as template:
        plain = template.render(CONVERSATIONS["single"])
        schema = template.render(CONVERSATIONS["single"], json_schema={"type": "object"}, enable_thinking=False)
        tools = template.render(CONVERSATIONS["single"], tools=TOOLS)
    assert plain.grammar is None
    assert schema.grammar is not None and not schema.grammar.lazy and "root ::=" in schema.grammar.gbnf
    assert tools.grammar is not None and tools.grammar.lazy and tools.grammar.triggers
    assert "<tool_call>" in tools.preserved_tokens


def test_bad_input_is_a_clear_error():
    with pytest.raises(InvalidArgumentError):
        ChatTemplate("")
    with pytest.raises(LlamaError, match="chat template"):
        ChatTemplate("{% for x in %}")  # does not parse
    with ChatTemplate(template_source("Qwen3.5-4B")) as template:
        with pytest.raises(InvalidArgumentError):
            template.apply("hello")
        with pytest.raises(LlamaError):
            template.apply([{"role": "user"}])  # no content
        with pytest.raises(LlamaError):
            template.render(CONVERSATIONS["single"], json_schema={"type": "object"}, grammar="root ::= \"a\"")
        with pytest.raises(InvalidArgumentError):
            template.render(CONVERSATIONS["single"], thinking_mode=object())


def test_model_template_from_the_gguf(model_path):
    source = template_source("Qwen3.5-4B")
    with Model.load(model_path("qwen35", chat_template=source, special_tokens=QWEN_SPECIALS)) as model:
        assert model.chat_template.source == source
        messages = CONVERSATIONS["system_turns"]
        with ChatTemplate(source) as same:
            assert model.apply_chat_template(messages) == same.apply(messages)
        assert model.chat_template_names == []
        with pytest.raises(InvalidArgumentError):
            model.named_chat_template("tool_use")
