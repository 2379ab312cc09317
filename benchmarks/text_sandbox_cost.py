"""What the text sandbox costs a request: grammars, JSON schemas and chat templates
through the child process (first time and cached) against the same work in-process.

    python benchmarks/text_sandbox_cost.py [--reps 20] [--model PATH]

Per case, median (lowest-highest) milliseconds of:
- ``first``: the sandbox on, its cache emptied (the child converts / compiles / walks the
  grammar, then the caller compiles it);
- ``cached``: the sandbox on, the same text again (a look-up, then the caller's compile);
- ``in-process``: PYLLAMA_MTP_SANDBOX=0 (the caller's work alone; a hostile text would
  end the process).
Templates are rendered per request (messages differ), so they have no cached case. The
child's start is timed once. Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from typing import Callable

from pyllama_mtp import Grammar, Model, Sampler, _sandbox, fixtures

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import log, write_json  # noqa: E402

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"},
                                           "tags": {"type": "array", "items": {"type": "string"},
                                                    "minItems": 2, "maxItems": 4}},
          "required": ["title", "tags"]}
GBNF = r'''root ::= object
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three llamas."}]


def timed_ms(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return (time.perf_counter() - start) * 1e3


def summary(values: list[float]) -> dict:
    return {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--model", help="GGUF file (default: the demo model, made here)")
    args = parser.parse_args()
    path = args.model or str(fixtures.make_demo_model())
    results: dict[str, dict] = {}
    with Model.load(path) as model:
        _sandbox._worker.close()
        start = time.perf_counter()
        _sandbox.run("schema_to_grammar", "warm-up", schema={"type": "string"})
        results["child start"] = {"ms": (time.perf_counter() - start) * 1e3}

        def compile_schema() -> None:
            Sampler(grammar=Grammar.from_json_schema(SCHEMA)).native_for(model).free()

        def compile_gbnf() -> None:
            Sampler(grammar=GBNF).native_for(model).free()

        template = model.chat_template
        for name, work in (("JSON schema", compile_schema), ("GBNF grammar", compile_gbnf)):
            first, cached, inline = [], [], []
            for _ in range(args.reps):
                _sandbox._cache.clear()
                first.append(timed_ms(work))
                cached.append(timed_ms(work))
                os.environ[_sandbox.ENV_SWITCH] = "0"
                inline.append(timed_ms(work))
                del os.environ[_sandbox.ENV_SWITCH]
            results[name] = {"first": summary(first), "cached": summary(cached), "in-process": summary(inline)}
        sandboxed, inline = [], []
        for _ in range(args.reps):  # the switch is read at each call
            sandboxed.append(timed_ms(lambda: template.render(MESSAGES)))
            os.environ[_sandbox.ENV_SWITCH] = "0"
            inline.append(timed_ms(lambda: template.render(MESSAGES)))
            del os.environ[_sandbox.ENV_SWITCH]
        results["chat template render"] = {"sandbox": summary(sandboxed), "in-process": summary(inline)}
        n_vocab = model.n_vocab
    for name, figures in results.items():
        log(name, {key: (f"{v['median_ms']:.3f} ({v['min_ms']:.3f}-{v['max_ms']:.3f})" if "median_ms" in v
                         else f"{v['ms']:.1f}") if isinstance(v, dict) else v
                   for key, v in (figures.items() if "ms" not in figures else [("ms", figures)])})
    write_json(HERE / "results" / "text_sandbox_cost.json", args, model=path, n_vocab=n_vocab, results=results)


if __name__ == "__main__":
    main()
