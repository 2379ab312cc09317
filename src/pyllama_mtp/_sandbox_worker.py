"""The text sandbox's child process: llama.cpp's parsers of caller- and file-supplied text.

Run as ``python -m pyllama_mtp._sandbox_worker`` by :mod:`pyllama_mtp._sandbox`. It reads
one JSON request a line on stdin and answers one JSON line on stdout. Whatever a text
does to llama.cpp here (a parser recursing past its stack, a template looping forever,
a string grown past memory) ends or stalls this process, never the caller's: the caller
kills it past its time limit and starts another.

Each operation runs on a thread with a smaller stack (:data:`STACK_BYTES`) than the
caller's in-process compile gets (csrc/internal.h's ``on_own_stack``), so a grammar that
compiled here compiles there with room to spare. The address space is capped at
start-up plus :data:`MEMORY_BYTES`: an allocation past it fails with an error, cleanly.

The operations are :data:`OPERATIONS`; the caller runs the same functions in-process
when the sandbox is switched off.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from typing import Any, Callable, Optional

from . import _lowlevel
from .errors import InvalidArgumentError, LlamaError

STACK_BYTES = 2 << 20
MEMORY_BYTES = 4 << 30
#: the longest rendered prompt accepted (characters): far past any context length
MAX_PROMPT_CHARS = 16 << 20

# Models (vocabulary only) and templates already loaded, by what identifies them.
_models: dict[str, _lowlevel.NativeModel] = {}
_templates: dict[tuple[Optional[str], Optional[str]], _lowlevel.NativeChatTemplates] = {}
_MAX_CACHED = 16


def _vocab(path: str) -> _lowlevel.NativeModel:
    """The model's vocabulary and metadata (no weights), loaded once."""
    model = _models.get(path)
    if model is None:
        if len(_models) >= _MAX_CACHED:
            _models.pop(next(iter(_models))).free()
        model = _models[path] = _lowlevel.NativeModel(path, n_gpu_layers=0, load_mtp=False, use_mmap=True,
                                                        vocab_only=True)
    return model


def _template(model: Optional[str], source: Optional[str]) -> _lowlevel.NativeChatTemplates:
    key = (model, source)
    template = _templates.get(key)
    if template is None:
        if len(_templates) >= _MAX_CACHED:
            _templates.pop(next(iter(_templates))).free()
        template = _templates[key] = _lowlevel.NativeChatTemplates(_vocab(model) if model else None, source)
    return template


def template_info(model: Optional[str], source: Optional[str]) -> dict[str, Any]:
    return _template(model, source).info()


def render(model: Optional[str], source: Optional[str], request: dict[str, Any]) -> dict[str, Any]:
    rendered = _template(model, source).apply(request)
    if len(rendered["prompt"]) > MAX_PROMPT_CHARS:
        raise InvalidArgumentError(f"the chat template rendered {len(rendered['prompt']):,} characters, over the "
                                   f"limit of {MAX_PROMPT_CHARS:,}")
    return rendered


def schema_to_grammar(schema: Any) -> str:
    return _lowlevel.json_schema_to_grammar(schema)


#: tokens a grammar is walked over before it is used: its stacks grow token by token,
#: and a grammar that costs seconds a token is refused by the sandbox's time limit
TRIAL_TOKENS = 8


def compile_grammar(model: str, constraint: dict[str, Any]) -> None:
    """Build (and free) the sampler the caller is about to build with this grammar, then
    walk the grammar over the vocabulary for a few tokens."""
    vocab = _vocab(model)
    _lowlevel.NativeSampler(vocab, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0,
                            constraint=constraint).free()
    # A template's grammar begins after its generation prompt or a trigger: only a user's
    # grammar must be able to start right away.
    from_start = constraint.get("grammar_type", "user") == "user" and not constraint.get("grammar_lazy")
    _lowlevel.grammar_trial(vocab, constraint["grammar"], TRIAL_TOKENS, from_start=from_start)


OPERATIONS: dict[str, Callable[..., Any]] = {
    "template_info": template_info,
    "render": render,
    "schema_to_grammar": schema_to_grammar,
    "compile_grammar": compile_grammar,
}


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"result": OPERATIONS[request["op"]](**request["args"])}
    except LlamaError as error:
        return {"error": str(error), "type": type(error).__name__}
    except MemoryError:
        return {"error": f"it needed more than the sandbox's {MEMORY_BYTES >> 30} GiB of memory",
                "type": "InvalidArgumentError"}
    except RecursionError:
        return {"error": "it is nested too deeply", "type": "InvalidArgumentError"}
    except (TypeError, ValueError) as error:  # text Python cannot pass on (a lone surrogate)
        return {"error": f"{type(error).__name__}: {error}", "type": "InvalidArgumentError"}
    except Exception as error:  # noqa: BLE001 - the worker must answer whatever happened
        return {"error": f"{type(error).__name__}: {error}", "type": "LlamaError"}


def _cap_memory() -> None:
    try:
        import resource
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + MEMORY_BYTES, resource.RLIM_INFINITY))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a death here is expected, and reported
    except (ImportError, OSError, ValueError):
        pass  # not Linux: the time limit still bounds a runaway render


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # only answers go to the caller's pipe
    _cap_memory()
    requests: queue.Queue = queue.Queue()
    answers: queue.Queue = queue.Queue()

    def serve() -> None:
        while True:
            answers.put(_answer(requests.get()))

    threading.stack_size(STACK_BYTES)
    threading.Thread(target=serve, name="pmtp-sandbox", daemon=True).start()
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError as error:  # the caller's bug, not the text's
            answer = {"error": f"unreadable request: {error}", "type": "LlamaError"}
        else:
            requests.put(request)
            answer = answers.get()
        out.write(json.dumps(answer, ensure_ascii=True) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
