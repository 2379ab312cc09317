"""Pre-flight: llama.cpp's own loader and context set-up, run dry in a child process first.

llama.cpp trusts a model file in places: an inconsistent hyperparameter can fail a
``GGML_ASSERT`` (``abort()``), escape as an uncaught C++ exception, or divide by zero
(SIGFPE), and each of those ends the whole process, Python included. No list of known
bad values can keep up with upstream's asserts, so the process that takes the risk is a
throw-away one: the helper ``pmtp-preflight`` (csrc/preflight.cpp) loads the file with
``no_alloc`` (metadata and tensor shapes, no weight read: upstream's parameter-fitting dry
run), exercises the vocabulary's special tokens, and creates each requested context
without allocating it (every graph is built and reserved). If it dies, the caller gets a
:class:`ModelLoadError` (or :class:`LlamaError` for a context) carrying llama.cpp's own
message, and nothing was loaded. If it succeeds, the real load follows.

Results are cached per file (path, size, mtime, inode), load setting and context shape,
so a model loaded again or a second context of the same shape costs nothing. Turn it off
per load (``Model.load(..., preflight=False)``) or for the process
(``PYLLAMA_MTP_PREFLIGHT=0``) for files known to be sound.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import threading
from typing import Optional, Sequence

from ._lowlevel import ContextConfig
from .errors import LlamaError, ModelLoadError

ENV_SWITCH = "PYLLAMA_MTP_PREFLIGHT"
TIMEOUT_S = 300.0
HELPER = pathlib.Path(__file__).parent / "lib" / ("pmtp-preflight.exe" if os.name == "nt" else "pmtp-preflight")
_log = logging.getLogger("pyllama_mtp.llama_cpp")

# Exit statuses of the helper (csrc/preflight.cpp).
_LOAD_FAILED, _CONTEXT_FAILED = 2, 3

_cache: dict[tuple, Optional[str]] = {}
_cache_lock = threading.Lock()


def enabled(requested: Optional[bool]) -> bool:
    """``requested`` if given, else the environment switch (on unless set to 0/false/no/off)."""
    if requested is not None:
        return bool(requested)
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def context_spec(config: ContextConfig) -> str:
    """The helper's argument for one context (threads are left out: they shape no graph)."""
    flash = -1 if config.flash_attn is None else int(bool(config.flash_attn))
    values = (config.n_ctx, config.n_batch, config.n_ubatch, config.n_seq_max, config.n_rs_seq,
              int(config.embeddings), flash, int(config.kv_unified), int(config.mtp))
    return ",".join(str(int(v)) for v in values)


class Preflight:
    """The checks of one model file with one load setting."""

    def __init__(self, path: str, load_mtp: bool) -> None:
        self.path = path
        self.load_mtp = load_mtp
        st = os.stat(path)
        self._identity = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, load_mtp)

    def check(self, contexts: Sequence[ContextConfig] = (), *, for_model: bool = True) -> None:
        """Raise if llama.cpp fails or dies loading the file and creating ``contexts`` (in
        order; an MTP context pairs with the last plain one before it). ``for_model``: a
        failure is the file's (ModelLoadError), else the context's (LlamaError)."""
        specs = tuple(context_spec(c) for c in contexts)
        key = (self._identity, specs)
        with _cache_lock:
            cached = _cache.get(key, "")
        if cached == "":
            cached = self._run(specs)
            with _cache_lock:
                _cache[key] = cached
        if cached is not None:
            failed_at_load = cached.startswith("load:")
            message = cached.split(":", 1)[1]
            raise (ModelLoadError if for_model or failed_at_load else LlamaError)(message)

    def _run(self, specs: tuple[str, ...]) -> Optional[str]:
        """None when sound, else "load:<message>" or "context:<message>"."""
        if not HELPER.is_file():
            raise ModelLoadError(f"the pre-flight helper {HELPER.name} is missing from this installation: "
                                 f"reinstall pyllama_mtp, or set {ENV_SWITCH}=0 to load without it")
        command = [str(HELPER), self.path, "1" if self.load_mtp else "0", *specs]
        try:
            child = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                   timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"load:{self.path}: llama.cpp's dry load did not finish within {TIMEOUT_S:.0f} s"
        for line in child.stderr.splitlines():
            _log.debug("pre-flight: %s", line)
        if child.returncode == 0:
            return None
        stages = [line[6:] for line in child.stdout.splitlines() if line.startswith("stage ")]
        stage = stages[-1] if stages else "start"
        reason = _reason(child.stderr)
        where = "load" if stage in ("start", "load", "vocabulary") else "context"
        if child.returncode == _LOAD_FAILED:
            return f"load:llama.cpp cannot load {self.path}: {reason}"
        if child.returncode == _CONTEXT_FAILED:
            return f"context:llama.cpp cannot create a context on {self.path}: {reason}"
        what = _signal_name(child.returncode)
        doing = "loading the model" if where == "load" else f"building the graphs of {stage}"
        return (f"{where}:{self.path}: llama.cpp would end the process ({what} while {doing}; "
                f"found by a dry run in a child process): {reason}")


def _reason(stderr: str) -> str:
    """llama.cpp's own words: a failed assert, else its error line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("abort: "):
            return line[len("abort: "):]
    for line in lines:
        if line.startswith("terminate called"):
            return line
    for marker in ("error loading model:", "error:"):
        for line in lines:
            if marker in line and line.split(marker, 1)[1].strip():
                return line.split(marker, 1)[1].strip()
    for line in lines:
        if "failed" in line:
            return line
    return lines[-1] if lines else "no message"


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"
