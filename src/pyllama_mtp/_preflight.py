"""Pre-flight: llama.cpp's own loader and context set-up, run dry in a child process first.

llama.cpp trusts a model file in places: an inconsistent hyperparameter can fail a
``GGML_ASSERT`` (``abort()``), escape as an uncaught C++ exception, or divide by zero
(SIGFPE), and each of those ends the whole process, Python included. No list of known
bad values can keep up with upstream's asserts, so the process that takes the risk is a
throw-away one: the helper ``pmtp-preflight`` (csrc/preflight.cpp) loads the file with
``no_alloc`` (metadata and tensor shapes, no weight read: upstream's parameter-fitting dry
run), exercises the vocabulary's special tokens, creates each requested context
without allocating it (every graph is built and reserved), and at load time loads the
model for real on the CPU and computes once (a decode, and a speculative step where it
has MTP layers): ggml checks some tensor types only in its kernels. If it dies, the caller gets a
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
REPACK_SWITCH = "PYLLAMA_MTP_REPACK"  # 0 / 1: Model.load's repack default
TIMEOUT_S = 300.0
HELPER = pathlib.Path(__file__).parent / "lib" / ("pmtp-preflight.exe" if os.name == "nt" else "pmtp-preflight")
_log = logging.getLogger("pyllama_mtp.llama_cpp")

# Exit statuses of the helper (csrc/preflight.cpp): clean refusals by llama.cpp. Kept
# clear of 1-3 (a C runtime's abort() exits 3 on Windows).
_LOAD_FAILED, _CONTEXT_FAILED, _COMPUTE_FAILED = 10, 11, 12
# Deaths that say nothing about the file (Ctrl-C, a kill, the OOM killer): never cached.
_OUTSIDE_SIGNALS = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGKILL", "SIGHUP") if hasattr(signal, name)}


class _Unfinished(Exception):
    """The trial could not finish for a reason outside the file (killed, timed out)."""

_cache: dict[tuple, tuple[int, Optional[tuple[str, str]]]] = {}
_cache_lock = threading.Lock()


def _env_flag(name: str) -> Optional[bool]:
    """An environment switch: None when unset or empty, False for 0/false/no/off, else True."""
    value = os.environ.get(name, "").strip().lower()
    return None if not value else value not in {"0", "false", "no", "off"}


def enabled(requested: Optional[bool]) -> bool:
    """``requested`` if given, else the environment switch (on unless set to 0/false/no/off)."""
    if requested is not None:
        return bool(requested)
    return _env_flag(ENV_SWITCH) is not False


def repack_setting(requested: Optional[bool]) -> Optional[bool]:
    """Weight repacking: ``requested`` if given, else PYLLAMA_MTP_REPACK, else None (the
    library decides: on, unless the pre-flight finds the repacked kernels failing)."""
    return requested if requested is not None else _env_flag(REPACK_SWITCH)


def context_spec(config: ContextConfig) -> str:
    """The helper's argument for one context (threads are left out: they shape no graph)."""
    flash = -1 if config.flash_attn is None else int(bool(config.flash_attn))
    values = (config.n_ctx, config.n_batch, config.n_ubatch, config.n_seq_max, config.n_rs_seq,
              int(config.embeddings), flash, int(config.kv_unified), int(config.mtp))
    return ",".join(str(int(v)) for v in values)


class Preflight:
    """The checks of one model file with one load setting."""

    def __init__(self, path: str, load_mtp: bool, repack: Optional[bool] = None) -> None:
        self.path = path
        self.load_mtp = load_mtp
        #: Weight repacking into the CPU's extra buffer types (AMX, ...); None until decided.
        self.repack = repack
        # The repacking the load's trial ran with: context trials reuse its results.
        self._trial_repack = repack is not False
        self._identity = self._identity_now()

    def _identity_now(self) -> Optional[tuple]:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (os.path.realpath(self.path), st.st_size, st.st_mtime_ns, st.st_ino, self.load_mtp)

    def check_load(self, contexts: Sequence[ContextConfig], compute: int, weights_on_cpu: bool = True) -> bool:
        """The load's check: the file, ``contexts`` (in order; an MTP context pairs with the
        last plain one before it) and one computation on the CPU (1: a decode, 2: a
        speculative step through the MTP layers). Returns whether to repack weights: left
        to the library (None), a run that dies in the repacked kernels only is retried
        without them, and the model then loads without (with a warning in the log).
        Raises ModelLoadError otherwise. When the weights go to another device
        (``weights_on_cpu`` False) the trial never repacks: a repacked copy of a large
        model would cost the child its size in memory, for kernels the load will not use."""
        specs = tuple(context_spec(c) for c in contexts)
        self._trial_repack = self.repack is not False and weights_on_cpu
        try:
            failure = self._cached(specs, compute, self._trial_repack)
            retry = (failure is not None and self.repack is None and weights_on_cpu
                     and failure[0] == "compute-died")
            if retry and self._cached(specs, compute, False) is None:
                logging.getLogger("pyllama_mtp").warning(
                    "%s: llama.cpp's repacked CPU kernels fail on this machine (%s); loading it with "
                    "repack=False", self.path, failure[1])
                self.repack = self._trial_repack = False
                return False
        except _Unfinished as unfinished:
            raise ModelLoadError(str(unfinished)) from None
        if failure is not None:
            raise ModelLoadError(failure[1])
        self.repack = self.repack is not False
        return self.repack

    def check_context(self, contexts: Sequence[ContextConfig]) -> None:
        """A context of a shape not checked yet (after its target's, for an MTP one):
        LlamaError if llama.cpp fails or dies creating it. Skipped when the file is no
        longer the one loaded (moved, replaced): the model in memory was checked at load."""
        if self._identity != self._identity_now():
            _log.debug("pre-flight: %s changed since it was loaded; context not tried", self.path)
            return
        try:
            failure = self._cached(tuple(context_spec(c) for c in contexts), 0, self._trial_repack)
        except _Unfinished as unfinished:
            raise LlamaError(str(unfinished)) from None
        if failure is not None:
            raise (ModelLoadError if failure[0] == "load" else LlamaError)(failure[1])

    def _cached(self, specs: tuple[str, ...], compute: int, repack: bool) -> Optional[tuple[str, str]]:
        """A run's result; a run of the same contexts that computed at least as much, or
        that failed before computing, answers for this one."""
        key = (self._identity, specs, repack)
        with _cache_lock:
            known = _cache.get(key)
        if known is not None:
            computed, result = known
            if computed >= compute or (result is not None and not result[0].startswith("compute")):
                return result
        result = self._run(specs, compute, repack)
        with _cache_lock:
            _cache[key] = (compute, result)
            if result is None:  # contexts are made in order: each prefix was made dry too
                for end in range(1, len(specs)):
                    _cache.setdefault((self._identity, specs[:end], repack), (0, None))
        return result

    def _run(self, specs: tuple[str, ...], compute: int, repack: bool) -> Optional[tuple[str, str]]:
        """None when sound, else (stage kind, message): kind is load, context, compute (a
        clean failure) or compute-died. _Unfinished for a death from outside."""
        if not HELPER.is_file():
            raise ModelLoadError(f"the pre-flight helper {HELPER.name} is missing from this installation: "
                                 f"reinstall pyllama_mtp, or set {ENV_SWITCH}=0 to load without it")
        command = [str(HELPER), self.path, *(str(int(v)) for v in (self.load_mtp, compute, repack)),
                   *specs]
        # A session of its own: a Ctrl-C meant for this process does not kill the trial.
        session = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                   else {"start_new_session": True})
        try:
            child = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                   timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, **session)
        except subprocess.TimeoutExpired:
            raise _Unfinished(f"{self.path}: llama.cpp's trial run did not finish within {TIMEOUT_S:.0f} s "
                              f"(set {ENV_SWITCH}=0 to load without it)") from None
        for line in child.stderr.splitlines():
            _log.debug("pre-flight: %s", line)
        if child.returncode == 0:
            return None
        if -child.returncode in _OUTSIDE_SIGNALS:
            raise _Unfinished(f"{self.path}: llama.cpp's trial run was stopped from outside "
                              f"({signal_name(child.returncode)}; out of memory?)")
        stages = [line[6:] for line in child.stdout.splitlines() if line.startswith("stage ")]
        stage = stages[-1] if stages else "load"
        kind = "context" if stage.startswith("context") else "compute" if stage == "compute" else "load"
        reason = _reason(child.stderr)
        if child.returncode == _LOAD_FAILED:
            return "load", f"llama.cpp cannot load {self.path}: {reason}"
        if child.returncode == _CONTEXT_FAILED:
            return kind, f"llama.cpp cannot create a context on {self.path}: {reason}"
        if child.returncode == _COMPUTE_FAILED:
            return "compute", f"llama.cpp cannot compute with {self.path}: {reason}"
        doing = {"compute": "loading the model and computing with it once", "context": f"building the graphs of {stage}"}
        return ("compute-died" if kind == "compute" else kind), (
            f"{self.path}: llama.cpp would end the process ({signal_name(child.returncode)} while "
            f"{doing.get(kind, 'loading the model')}; found by a trial run in a child process): {reason}")


def _reason(stderr: str) -> str:
    """llama.cpp's own words: a failed assert, an uncaught exception, or an error line."""
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
    return "no message from llama.cpp"


def signal_name(returncode: int) -> str:
    """A child's death as a person reads it: SIGSEGV, or the exit status."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"
