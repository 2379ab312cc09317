"""The low-level layer: thin wrappers over the C API, one module per topic.

Only this package and ``_ffi`` touch ``lib``. It knows nothing of Python-level lifetimes
(parents, children, ``with``) nor of policies (warm-up, when a context may be stopped):
that is the public layer's job. Each ``Native*`` class owns one pointer, frees it exactly
once, and serialises every call on it with its own lock, because llama.cpp objects are
not thread-safe. Lock order, where a call needs several: speculative driver, then its
target context, then its draft context; a sampler before its context.
"""

from __future__ import annotations

from .chat import NativeChatTemplates, chat_parse, json_schema_to_grammar
from .context import ContextConfig, NativeContext
from .interrupt import monotonic_us
from .model import NativeModel
from .sampler import NativeSampler, grammar_trial
from .speculative import PMTP_DRAFT_REST, PMTP_MAX_DRAFT_CAPACITY, NativeCheckpoint, NativeSpeculative
from .status import check_status
from .system import (
    QUANT_TYPES,
    DeviceInfo,
    add_rpc_server,
    backend_loading,
    compiled_backends,
    cpu_features,
    cpu_variant,
    default_threads,
    devices,
    llama_commit,
    quantize,
    shim_version,
)

__all__ = [
    "ContextConfig", "NativeChatTemplates", "NativeCheckpoint", "NativeContext", "NativeModel", "NativeSampler",
    "NativeSpeculative",
    "PMTP_DRAFT_REST", "PMTP_MAX_DRAFT_CAPACITY", "QUANT_TYPES", "DeviceInfo", "add_rpc_server", "backend_loading",
    "check_status", "chat_parse", "compiled_backends", "cpu_features", "cpu_variant", "default_threads", "devices", "grammar_trial", "json_schema_to_grammar",
    "llama_commit",
    "monotonic_us", "quantize", "shim_version",
]
