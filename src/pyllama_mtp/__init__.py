"""pyllama_mtp: multi-token-prediction speculative decoding on llama.cpp, from Python.

    >>> from pyllama_mtp import Model
    >>> with Model.load("model.gguf") as model, model.context(n_ctx=1024) as ctx:
    ...     for token in ctx.generate("Hello", max_tokens=16):
    ...         print(model.token_to_piece(token).decode(errors="replace"), end="")
"""

from __future__ import annotations

from typing import Any

from . import _lowlevel
from ._lowlevel import DeviceInfo
from ._version import __version__
from .context import Batch, Context
from .errors import (
    AbortedError,
    ClosedError,
    ContextFullError,
    DecodeError,
    NonFiniteLogitsError,
    GrammarDeadEndError,
    DecodeTimeoutError,
    InvalidArgumentError,
    LlamaError,
    LoadCancelledError,
    ModelLoadError,
    NoMTPError,
    StateError,
)
from .generation import Sampler, TextStream, generate, stream_text
from .chat import LLM, ChatDelta, ChatResponse, Completion, Usage
from .chat_template import ChatTemplate, RenderedChat, parse_chat_output
from .grammar import Grammar
from .model import Model, quantize
from .speculative import MemoryReport, SpeculativeDecoder, SpeculativeStats

__all__ = [
    "__version__",
    "Model",
    "Context",
    "Batch",
    "Sampler",
    "Grammar",
    "LLM",
    "ChatTemplate",
    "RenderedChat",
    "parse_chat_output",
    "ChatResponse",
    "ChatDelta",
    "Completion",
    "Usage",
    "SpeculativeDecoder",
    "SpeculativeStats",
    "MemoryReport",
    "TextStream",
    "generate",
    "quantize",
    "stream_text",
    "system_info",
    "devices",
    "add_rpc_server",
    "DeviceInfo",
    "LlamaError",
    "ModelLoadError",
    "LoadCancelledError",
    "ContextFullError",
    "DecodeError",
    "NonFiniteLogitsError",
    "GrammarDeadEndError",
    "DecodeTimeoutError",
    "AbortedError",
    "InvalidArgumentError",
    "ClosedError",
    "NoMTPError",
    "StateError",
]


def devices() -> list[DeviceInfo]:
    """Devices the compiled backends see (name, type, memory)."""
    return _lowlevel.devices()


def add_rpc_server(endpoint: str) -> None:
    """Use a ggml RPC server ("host:port") as a device. The RPC protocol has no
    authentication: run servers on loopback or a network you trust."""
    _lowlevel.add_rpc_server(endpoint)


def system_info() -> dict[str, Any]:
    """Versions, the llama.cpp commit, compiled backends, devices and CPU features.

    ``cpu_variant`` says which CPU kernels run: in a portable build (backends loaded at
    run time, ``backend_loading == "dynamic"``) the variant chosen for this CPU, such as
    ``"haswell"`` or ``"zen4"``; ``"native"`` for a build tuned to the machine that
    compiled it. ``cpu_features`` lists the instruction sets that variant was built for.
    """
    return {
        "version": __version__,
        "shim_version": _lowlevel.shim_version(),
        "llama_cpp_commit": _lowlevel.llama_commit(),
        "backends": _lowlevel.compiled_backends(),
        "backend_loading": _lowlevel.backend_loading(),
        "cpu_variant": _lowlevel.cpu_variant(),
        "devices": [device.__dict__ for device in _lowlevel.devices()],
        "cpu_features": _lowlevel.cpu_features(),
    }
