"""llama.cpp's chat layer through the shim: templates, rendering, output parsing and
JSON schemas, with JSON text crossing the C boundary."""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from .._ffi import ffi, lib
from .handle import NativeHandle, take_string, to_json
from .model import NativeModel
from .status import check_status


def call_json(function: Callable[[Any], int], action: str) -> str:
    """Call a shim function that hands back a string (the result, or the error message)."""
    out = ffi.new("char **")
    status = function(out)
    text = take_string(out[0])
    check_status(status, action, message=text)
    return text


class NativeChatTemplates(NativeHandle):
    """A model's chat templates (or a given Jinja source), as llama.cpp loads them."""

    _kind = "chat template"

    def __init__(self, model: Optional[NativeModel], source: Optional[str]) -> None:
        out = ffi.new("pmtp_chat_templates **")
        error = ffi.new("char **")
        model_ptr = model.ptr() if model is not None else ffi.NULL
        source_c = source.encode("utf-8") if source else ffi.NULL
        status = lib.pmtp_chat_templates_new(model_ptr, source_c, out, error)
        check_status(status, "load the chat template", message=take_string(error[0]))
        super().__init__(out[0])

    def _free(self, ptr: Any) -> None:
        lib.pmtp_chat_templates_free(ptr)

    def info(self) -> dict[str, Any]:
        with self.lock:
            return json.loads(call_json(lambda out: lib.pmtp_chat_templates_info(self.ptr(), out),
                                        "read the chat template"))

    def apply(self, request: dict[str, Any]) -> dict[str, Any]:
        payload = to_json(request, "the chat request")
        with self.lock:
            return json.loads(call_json(lambda out: lib.pmtp_chat_apply(self.ptr(), payload, out),
                                        "apply the chat template"))


def chat_parse(text: str, partial: bool, parser_state: dict[str, Any]) -> dict[str, Any]:
    state = to_json(parser_state, "the parser state")
    raw = text.encode("utf-8")
    return json.loads(call_json(lambda out: lib.pmtp_chat_parse(raw, int(partial), state, out),
                                "parse the chat output"))


def json_schema_to_grammar(schema: Any) -> str:
    payload = to_json(schema, "the JSON schema")
    return call_json(lambda out: lib.pmtp_json_schema_to_grammar(payload, out), "convert the JSON schema")
