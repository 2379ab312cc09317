"""The text sandbox: llama.cpp's parsers of caller- and file-supplied text, in a child process.

GBNF grammars, JSON schemas (with their regex patterns) and Jinja chat templates are
parsed by llama.cpp code that trusts its input in places: a deeply nested grammar
recurses past the stack (SIGSEGV), a template can loop forever or build a string past
memory. A list of known bad inputs cannot keep up, so the process that takes the risk is
a throw-away one, as with model files (see ``_preflight``):

- chat templates are loaded and rendered only in the worker
  (``python -m pyllama_mtp._sandbox_worker``), which answers with the prompt;
- JSON schemas become grammars there;
- a grammar is compiled there first, exactly as the sampler will compile it; only
  then does the caller compile it in-process (on a thread with a larger stack than the
  worker's, so recursion that fitted there fits here).

A request that takes longer than :data:`TIME_LIMIT_S`, or kills the worker, raises
:class:`InvalidArgumentError` naming the limit or the signal; the worker is killed and a
new one starts with the next request. Results of schemas and grammar checks are cached
by their text, so a repeated grammar costs a dictionary look-up.

``PYLLAMA_MTP_SANDBOX=0`` runs the same operations in-process instead (a hostile text
then crashes the process, as in llama.cpp itself).
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import pathlib
import select
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from . import _sandbox_worker, errors
from ._preflight import signal_name
from .errors import InvalidArgumentError, LlamaError

ENV_SWITCH = "PYLLAMA_MTP_SANDBOX"
#: seconds one operation (a render, a schema, a grammar) may take
TIME_LIMIT_S = float(os.environ.get("PYLLAMA_MTP_SANDBOX_TIME_LIMIT", "10"))
_START_LIMIT_S = 120.0  # a cold start imports numpy and llama.cpp's libraries
_CACHE_ENTRIES = 512
_PACKAGE_PARENT = pathlib.Path(__file__).resolve().parent.parent


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() not in {"0", "false", "no", "off"}


class _TimedOut(InvalidArgumentError):
    """Past the time limit: not remembered (the machine may only have been busy)."""


class _Worker:
    """One child process, one request at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._child: Optional[subprocess.Popen] = None
        self._owner = os.getpid()
        self._pending = b""

    def call(self, op: str, args_json: str, what: str) -> Any:
        """``args_json``: the arguments as :func:`_encode` wrote them (encoded once)."""
        line = f'{{"op": {json.dumps(op)}, "args": {args_json}}}\n'.encode()
        with self._lock:
            child = self._running()
            try:
                child.stdin.write(line)
                child.stdin.flush()
            except OSError:
                pass  # it died: reading says how
            answer = self._read_line(child, TIME_LIMIT_S, what)
        answer = json.loads(answer)
        if "error" in answer:
            kind = getattr(errors, answer.get("type", ""), LlamaError)
            if not (isinstance(kind, type) and issubclass(kind, LlamaError)):
                kind = LlamaError
            raise kind(f"{what}: {answer['error']}")
        return answer["result"]

    def _running(self) -> subprocess.Popen:
        if self._child is not None and (self._owner != os.getpid() or self._child.poll() is not None):
            self._child = None  # died (reported when it did), or inherited over a fork
        if self._child is None:
            self._owner = os.getpid()
            self._pending = b""
            session = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                       else {"start_new_session": True})  # a Ctrl-C meant for the caller spares it
            child = subprocess.Popen([sys.executable, "-m", "pyllama_mtp._sandbox_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=str(_PACKAGE_PARENT), **session)
            try:
                ready = self._read_line(child, _START_LIMIT_S, "starting the text sandbox") == "ready"
            except InvalidArgumentError:  # it died or stalled (_TimedOut) before serving anything
                ready = False
            if not ready:
                self._kill(child)
                raise LlamaError("the text sandbox did not start: reinstall pyllama_mtp, or set "
                                 f"{ENV_SWITCH}=0 to parse templates and grammars in-process")
            self._child = child
        return self._child

    def _read_line(self, child: subprocess.Popen, limit: float, what: str) -> str:
        deadline = time.monotonic() + limit
        fd = child.stdout.fileno()
        chunk = self._pending
        while b"\n" not in chunk:  # only the newest chunk can hold the end of the line
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                self._kill(child)
                raise _TimedOut(
                    f"{what}: llama.cpp did not finish within {limit:g} s (the time limit of "
                    f"PYLLAMA_MTP_SANDBOX_TIME_LIMIT); the work was stopped")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                code = child.wait()
                _stop(child)
                self._child = None
                raise InvalidArgumentError(
                    f"{what}: llama.cpp would have ended the process ({_death(code)}; found in the "
                    "text sandbox, a child process, which was replaced)")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def _kill(self, child: subprocess.Popen) -> None:
        _stop(child)
        if child is self._child:
            self._child = None

    def close(self) -> None:
        """Stop the child (at exit too: without the lock, which a stalled call may hold)."""
        child = self._child
        if child is not None and self._owner == os.getpid():
            _stop(child)


def _stop(child: subprocess.Popen) -> None:
    child.kill()
    child.wait()
    for pipe in (child.stdin, child.stdout):
        try:
            pipe.close()
        except OSError:
            pass  # a write it never read, to a process now gone


def _encode(value: Any, what: str) -> str:
    """One line of JSON (ASCII: no character of the text can split the line)."""
    try:
        return json.dumps(value, ensure_ascii=True, allow_nan=False)  # key order is meaning (tool schemas)
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(f"{what} must be JSON data: {error}") from None
    except RecursionError:
        raise InvalidArgumentError(f"{what} is nested too deeply for JSON") from None


def _death(code: int) -> str:
    return "out of memory or an uncaught error, exit status 1" if code == 1 else signal_name(code)


_worker = _Worker()
atexit.register(_worker.close)
_cache: "collections.OrderedDict[tuple, tuple[bool, Any]]" = collections.OrderedDict()
_cache_lock = threading.Lock()


def run(op: str, what: str, **args: Any) -> Any:
    """Operation ``op`` of the worker (see ``_sandbox_worker.OPERATIONS``) on ``args``."""
    return _run(op, what, args, None)


def _run(op: str, what: str, args: dict[str, Any], args_json: Optional[str]) -> Any:
    if not enabled():
        return _sandbox_worker.OPERATIONS[op](**args)
    return _worker.call(op, _encode(args, what) if args_json is None else args_json, what)


def run_cached(op: str, what: str, **args: Any) -> Any:
    """:func:`run`, remembered by its arguments: failures too, except a time-out (the
    machine may have been busy)."""
    args_json = _encode(args, what)
    key = (op, args_json)
    with _cache_lock:
        known = _cache.get(key)
        if known is not None:
            _cache.move_to_end(key)
    if known is not None:
        ok, value = known
        if ok:
            return value
        raise value[0](value[1])
    try:
        value = _run(op, what, args, args_json)
    except _TimedOut:
        raise
    except LlamaError as error:
        _remember(key, (False, (type(error), str(error))))
        raise
    _remember(key, (True, value))
    return value


def _remember(key: tuple, entry: tuple[bool, Any]) -> None:
    with _cache_lock:
        _cache[key] = entry
        while len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)


def check_grammar(model_path: str, constraint: dict[str, Any]) -> None:
    """Compile ``constraint``'s grammar in the sandbox first (the real compile follows
    in-process): InvalidArgumentError if llama.cpp refuses it, stalls or dies on it."""
    if enabled():
        run_cached("compile_grammar", "the grammar", model=model_path, constraint=constraint)


def schema_to_grammar(schema: Any) -> str:
    return run_cached("schema_to_grammar", "the JSON schema", schema=schema)
