"""The OpenAI wire format: request bodies checked field by field into what the engine
needs, and responses, chunks and error objects shaped as OpenAI's (with llama-server's
``timings`` and ``reasoning_content``). No HTTP here."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from ..answer import Sampling, Usage

# Fields of OpenAI requests that we accept only at their neutral value.
_NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "echo": False,
            "best_of": 1, "top_logprobs": None, "logit_bias": None, "suffix": None}
_ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """A request we will not serve: an HTTP status and an OpenAI error object."""

    def __init__(self, message: str, *, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 4 << 20
    max_messages: int = 1024
    max_tokens: int = 32768
    max_stops: int = 16


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: what to render and how to generate."""

    chat: bool
    #: prepare_chat / prepare_completion keyword arguments
    prepare: dict[str, Any]
    max_tokens: Optional[int]
    sampling: Sampling
    n_draft: Optional[int]
    stream: bool
    include_usage: bool
    #: llama-server's cache_prompt: reuse what a slot holds of the prompt (default)
    cache_prompt: bool = True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(body: dict[str, Any], name: str, kinds: str, default: Any = None) -> Any:
    """Field ``name`` if present and not null, checked against ``kinds`` (words: int,
    number, str, bool, list, dict)."""
    value = body.get(name)
    if value is None:
        return default
    checks = {"int": _is_int, "number": _is_number, "str": lambda v: isinstance(v, str),
              "bool": lambda v: isinstance(v, bool), "list": lambda v: isinstance(v, list),
              "dict": lambda v: isinstance(v, dict)}
    if not any(checks[kind](value) for kind in kinds.split()):
        raise RequestError(f"'{name}' must be of type {' or '.join(kinds.split())}, got {type(value).__name__}",
                           param=name)
    return value


def _in_range(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> Any:
    if value is None:
        return None
    if not low <= value <= high or (high_open and value == high):
        raise RequestError(f"'{name}' must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}", param=name)
    return value


def _check_messages(messages: Any, limits: Limits) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    if len(messages) > limits.max_messages:
        raise RequestError(f"at most {limits.max_messages} messages per request", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"'{where}' must be an object", param=where)
        if message.get("role") not in _ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(_ROLES)}", param=f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(f"'{where}.content' must be a string or a list of parts", param=f"{where}.content")
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"'{where}.content' parts must be {{'type': 'text', 'text': ...}} "
                                   "(this server reads text only)", param=f"{where}.content")
        if content is None and not message.get("tool_calls"):
            raise RequestError(f"'{where}' has no content", param=f"{where}.content")


def parse_generation(body: Any, *, chat: bool, model_name: str, n_draft_max: int, limits: Limits) -> GenerationRequest:
    """A request body (parsed JSON) -> GenerationRequest, or RequestError saying what is wrong."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = _get(body, "model", "str")
    if model is not None and model != model_name:
        raise RequestError(f"the model '{model}' does not exist: this server serves '{model_name}'",
                           status=404, param="model", code="model_not_found")
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and value != neutral and not (name == "logit_bias" and value == {}):
            raise RequestError(f"'{name}' is not supported (only {neutral!r})", param=name)
    max_tokens = _get(body, "max_completion_tokens", "int", _get(body, "max_tokens", "int"))
    _in_range("max_tokens", max_tokens, 0, limits.max_tokens)
    stop = _get(body, "stop", "str list")
    if isinstance(stop, list) and (len(stop) > limits.max_stops or not all(isinstance(s, str) for s in stop)):
        raise RequestError(f"'stop' must be a string or a list of at most {limits.max_stops} strings", param="stop")
    temperature = _in_range("temperature", _get(body, "temperature", "number", 1.0), 0, 2)
    top_p = _in_range("top_p", _get(body, "top_p", "number", 1.0), 0, 1)
    if top_p == 0:
        raise RequestError("'top_p' must be greater than 0", param="top_p")
    top_k = _in_range("top_k", _get(body, "top_k", "int", 0), 0, 1 << 20)
    min_p = _in_range("min_p", _get(body, "min_p", "number", 0.0), 0, 1, high_open=True)
    seed = _get(body, "seed", "int")
    # OpenAI's seed is any int64: fold it; without one, every request draws its own.
    seed = random.getrandbits(32) if seed is None else seed % (2 ** 32)
    n_draft = _in_range("n_draft", _get(body, "n_draft", "int"), 0, n_draft_max)
    stream = bool(_get(body, "stream", "bool", False))
    options = _get(body, "stream_options", "dict", {})
    grammar = _get(body, "grammar", "str")
    prepare: dict[str, Any] = {"stop": stop, "grammar": grammar}
    if chat:
        _check_messages(body.get("messages"), limits)
        prepare["messages"] = body["messages"]
        tools = _get(body, "tools", "list")
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise RequestError("'tools' must be a list of objects", param="tools")
        tool_choice = _get(body, "tool_choice", "str dict")
        if isinstance(tool_choice, dict):
            tool_choice = "required"  # a named function: llama.cpp's parsers take required
        response_format = _get(body, "response_format", "dict")
        if response_format is not None and response_format.get("type") not in ("text", "json_object", "json_schema"):
            raise RequestError("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                               param="response_format")
        kwargs = _get(body, "chat_template_kwargs", "dict", {})
        if "enable_thinking" in kwargs and not isinstance(kwargs["enable_thinking"], bool):
            raise RequestError("'chat_template_kwargs.enable_thinking' must be a boolean",
                               param="chat_template_kwargs")
        prepare.update(tools=tools, tool_choice=tool_choice, response_format=response_format,
                       parallel_tool_calls=_get(body, "parallel_tool_calls", "bool"), **kwargs)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("'prompt' must be a non-empty string", param="prompt")
        prepare["prompt"] = prompt
        prepare["json_schema"] = _get(body, "json_schema", "dict")
    return GenerationRequest(
        chat=chat, prepare=prepare, max_tokens=max_tokens,
        sampling=Sampling(float(temperature), int(top_k), float(top_p), float(min_p), seed),
        n_draft=n_draft, stream=stream, include_usage=bool(options.get("include_usage")),
        cache_prompt=bool(_get(body, "cache_prompt", "bool", True)))


# -- responses ---------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage_json(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.prompt_tokens_reused}}


def message_json(message: dict[str, Any]) -> dict[str, Any]:
    """A parsed answer as an OpenAI assistant message (tool calls with ids and types)."""
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content") or None}
    if message.get("reasoning_content"):
        out["reasoning_content"] = message["reasoning_content"]
    calls = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [{"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                              "function": {"name": call["function"]["name"],
                                           "arguments": call["function"].get("arguments") or "{}"}}
                             for call in calls]
    elif out["content"] is None:
        out["content"] = ""
    return out


def envelope(request_id: str, model_name: str, chat: bool, *, chunk: bool, choices: list,
             **extra: Any) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model_name,
            "choices": choices, **extra}


def chat_choice(*, message: Optional[dict] = None, delta: Optional[dict] = None,
                finish_reason: Optional[str] = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if message is not None:
        choice["message"] = message
    if delta is not None:
        choice["delta"] = delta
    return choice


def text_choice(text: str, finish_reason: Optional[str] = None) -> dict[str, Any]:
    return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
