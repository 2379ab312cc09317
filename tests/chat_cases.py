"""Chat test data: the vendored templates of MTP model families and conversations."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# The MTP model families whose templates the provisioned llama.cpp tree carries.
MTP_TEMPLATES = (
    "Qwen3.5-4B", "GLM-4.6", "GLM-4.7-Flash", "deepseek-ai-DeepSeek-V3.1", "deepseek-ai-DeepSeek-V3.2",
    "deepseek-ai-DeepSeek-V4", "deepseek-ai-DeepSeek-V4-Flash-0731", "StepFun3.5-Flash", "MiMo-VL",
    "Kimi-K2-Instruct", "Kimi-K2-Thinking", "moonshotai-Kimi-K2",
)

# Special tokens of the ChatML-style families (Qwen3.5, MiMo, Step): a fixture that chats
# with the Qwen3.5 template has them in its vocabulary, <|im_end|> ending a turn.
QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello there"}],
    "system_turns": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question?"},
    ],
    "tool_result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ],
}


def llama_cpp_tree() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LLAMA_CPP_SOURCE_DIR") or REPO / "vendor" / "llama.cpp")


def template_source(name: str) -> str:
    path = llama_cpp_tree() / "models" / "templates" / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"{path} is missing: the provisioned llama.cpp tree (pip install . fills it) has the templates")
    return path.read_text(encoding="utf-8")
