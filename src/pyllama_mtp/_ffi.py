"""Owner of the cffi ``ffi``/``lib`` pair and of one-time native initialisation.

Only this module and ``_lowlevel`` may touch ``lib``. Importing it checks that the
compiled shim matches this Python package (a stale build would otherwise call C with
the wrong layout), initialises the llama.cpp backends once, and routes llama.cpp /
ggml logging into the :mod:`logging` module under ``pyllama_mtp.llama_cpp``.
"""

from __future__ import annotations

import logging
import os

from ._version import __version__

try:
    from ._cffi import ffi, lib
except ModuleNotFoundError as missing:
    if missing.name != f"{__package__}._cffi":
        raise
    # A source checkout on sys.path (PYTHONPATH=src, or an IDE) has no compiled part.
    source_tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    raise ImportError(
        f"pyllama_mtp was imported from its source tree ({source_tree}), which "
        "has no compiled extension: run 'pip install .' in the repository root and import "
        "the installed package"
    ) from None

__all__ = ["ffi", "lib", "llama_logger"]

llama_logger = logging.getLogger("pyllama_mtp.llama_cpp")
# A library stays quiet unless the application configures logging.
logging.getLogger("pyllama_mtp").addHandler(logging.NullHandler())

_compiled_version = ffi.string(lib.pmtp_version()).decode()
if _compiled_version != __version__:
    raise ImportError(
        f"pyllama_mtp's compiled extension is version {_compiled_version} but the Python "
        f"package is {__version__}: reinstall the package so both come from one build"
    )

# ggml levels -> logging levels. CONT continues the previous message.
_LEVELS = {
    lib.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    lib.GGML_LOG_LEVEL_INFO: logging.INFO,
    lib.GGML_LOG_LEVEL_WARN: logging.WARNING,
    lib.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}
_last_level = [logging.DEBUG]


@ffi.def_extern()
def pmtp_py_log(level: int, text, user_data) -> None:  # noqa: ARG001 - C signature
    # Called from any thread llama.cpp logs on; cffi takes the GIL for us.
    # llama.cpp is chatty at INFO (every tensor, every context); we demote INFO to
    # DEBUG so the package is quiet unless a user asks for llama.cpp's detail.
    if level == lib.GGML_LOG_LEVEL_CONT:
        py_level = _last_level[0]
    else:
        py_level = _LEVELS.get(level, logging.DEBUG)
        if py_level == logging.INFO:
            py_level = logging.DEBUG
        _last_level[0] = py_level
    if llama_logger.isEnabledFor(py_level):
        message = ffi.string(text).decode("utf-8", "replace").rstrip("\n")
        if message:
            llama_logger.log(py_level, "%s", message)


def _init_once() -> None:
    # Route logs before the backends initialise, so their start-up chatter is caught too.
    lib.llama_log_set(lib.pmtp_py_log, ffi.NULL)
    lib.pmtp_common_log_pause()
    # A portable build's backends are modules beside the shim: load them from there
    # first (llama_backend_init would look in Python's folder and the current directory).
    if lib.pmtp_backends_load() != lib.PMTP_OK:
        raise ImportError(
            "pyllama_mtp: no CPU backend could be loaded from the package's lib folder; "
            "the installation is incomplete: reinstall pyllama_mtp")
    lib.llama_backend_init()


ffi.init_once(_init_once, "pyllama_mtp.backend_init")
