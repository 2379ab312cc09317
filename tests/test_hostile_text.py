"""Text that llama.cpp parses (grammars, JSON schemas, regex patterns, chat templates) cannot
crash or hang the process: it is parsed in the text sandbox first (see _sandbox).

The generated suite (tests/hostile_inputs.py) runs its cases in child processes, as the
damaged-model tests do, so a case that got through would kill a child, not pytest; CI
prints its counts. PYLLAMA_MTP_FUZZ_FULL=1 runs the full set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import hostile_inputs
from pyllama_mtp import (ChatTemplate, Grammar, GrammarDeadEndError, InvalidArgumentError, LLM, Model, ModelLoadError,
                         Sampler, SpeculativeDecoder)
from test_native_oracle import native_tool
from test_server import ServerProcess, httpx

pytestmark = pytest.mark.backend_independent("llama.cpp's text parsers run on the CPU, in a child process")

# Nested 100,000 deep: llama.cpp's GBNF parser recurses once per group, past any stack.
DEEP_GRAMMAR = "root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000
# Valid Jinja whose rendering recurses without end, and one that loops 10^12 times.
RECURSIVE_TEMPLATE = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
LOOPING_TEMPLATE = "{% for i in range(1000000) %}{% for j in range(1000000) %}x{% endfor %}{% endfor %}"
CASE_LIMIT_S = 2.0  # the sandbox's time limit in the suite's children: a hang costs this much


def test_a_grammar_that_kills_llama_server_gets_a_400_from_ours(model_path):
    model = str(model_path("qwen35"))
    request = {"prompt": "hello", "max_tokens": 4, "grammar": DEEP_GRAMMAR}
    upstream = subprocess.Popen([str(native_tool("llama-server")), "-m", model, "--host", "127.0.0.1", "--port",
                                 str(_free_port()), "-c", "512", "-ngl", "0", "-t", "1", "--no-warmup"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = _upstream_url(upstream)
        with pytest.raises(httpx.HTTPError):
            httpx.post(url + "/v1/completions", json=request, timeout=60)
        assert upstream.wait(timeout=30) < 0, "llama-server survived the grammar: the test shows nothing"
    finally:
        upstream.kill()
        upstream.wait()

    ours = ServerProcess(model, "--parallel", "2", "--ctx-size", "512")
    try:
        for _ in range(2):  # the second time from the cache
            answer = httpx.post(ours.url + "/v1/completions", json=request, timeout=60)
            assert answer.status_code == 400, answer.text
            assert "SIGSEGV" in answer.json()["error"]["message"]
            assert httpx.get(ours.url + "/health").json() == {"status": "ok"}
        fine = httpx.post(ours.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4,
                                                              "grammar": 'root ::= ("a" | "b")+'}, timeout=60)
        assert fine.status_code == 200 and set(fine.json()["choices"][0]["text"]) <= {"a", "b"}
    finally:
        ours.stop()


def _free_port() -> int:
    from test_server import _free_port as free
    return free()


def _upstream_url(process: subprocess.Popen) -> str:
    port = process.args[process.args.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"llama-server exited with {process.returncode}"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.2)
    pytest.fail("llama-server did not become healthy within 60 s")


@pytest.mark.parametrize("source, limit", [(RECURSIVE_TEMPLATE, "SIGSEGV"), (LOOPING_TEMPLATE, "within 2 s")])
def test_a_template_that_crashes_or_hangs_is_an_error_at_load(model_path, monkeypatch, source, limit):
    monkeypatch.setattr("pyllama_mtp._sandbox.TIME_LIMIT_S", CASE_LIMIT_S)
    path = str(model_path("qwen35", chat_template=source))
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=limit):
        LLM.load(path, n_ctx=256)
    assert time.monotonic() - start < 30
    with Model.load(path) as model:  # the model itself is fine: raw completion still works
        with model.context(n_ctx=128) as ctx:
            assert len(list(ctx.generate("hello", max_tokens=3))) == 3
        with pytest.raises(InvalidArgumentError, match=limit):
            model.apply_chat_template([{"role": "user", "content": "hi"}])


def test_serve_reports_an_unusable_template_at_start_up(model_path):
    path = str(model_path("qwen35", chat_template=RECURSIVE_TEMPLATE))
    done = subprocess.run([sys.executable, "-m", "pyllama_mtp", "serve", "-m", path, "--port", str(_free_port())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "chat template cannot be used" in done.stderr and "SIGSEGV" in done.stderr


def test_deep_schema_and_grammar_errors_name_what_went_wrong(model_path):
    with Model.load(model_path("qwen35")) as model:
        with pytest.raises(InvalidArgumentError, match="SIGSEGV"):
            with Sampler(grammar=DEEP_GRAMMAR) as sampler:
                sampler.native_for(model)
        with pytest.raises(InvalidArgumentError, match="grammar"):
            with Sampler(grammar="root ::= (") as sampler:
                sampler.native_for(model)
        nested = {"type": "string"}
        for _ in range(400):
            nested = {"type": "array", "items": nested}
        grammar = Grammar.from_json_schema(nested)  # deep, but within every stack: fine
        with model.context(n_ctx=128) as ctx, Sampler(grammar=grammar) as sampler:
            assert len(list(ctx.generate("hello", max_tokens=4, sampler=sampler))) == 4


def test_a_killed_sandbox_is_replaced(model_path):
    from pyllama_mtp import _sandbox
    template = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template.apply([{"role": "user", "content": "hi"}]) == "hi"
    _sandbox._worker.close()
    assert template.apply([{"role": "user", "content": "again"}]) == "again"


# -- the generated suite, in child processes --------------------------------------------------------

_CHILD = r"""
import json, sys
from pyllama_mtp import ChatTemplate, Grammar, LlamaError, Model, Sampler
import hostile_inputs
model = Model.load(sys.argv[1])
ctx = model.context(n_ctx=256)
cases = {case.name: case for case in hostile_inputs.cases(full=sys.argv[2] == "1")}
conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]

def sample(grammar):
    ctx.seq_rm(0)
    with Sampler(grammar=grammar) as sampler:
        list(ctx.generate("hello", max_tokens=3, sampler=sampler))

def run(case):
    if case.kind == "gbnf":
        sample(case.text)
    elif case.kind == "json_schema":
        sample(Grammar.from_json_schema(json.loads(case.text)))
    elif case.kind == "regex":
        sample(Grammar.from_json_schema({"type": "string", "pattern": case.text}))
    else:
        with ChatTemplate(case.text) as template:
            template.render(conversation)

for line in sys.stdin:
    name = line.strip()
    try:
        run(cases[name])
        outcome = "ran"
    except (LlamaError, ValueError, RecursionError) as error:
        outcome = "error"  # RecursionError/ValueError: Python's json refusing the case text itself
    print("done " + outcome, flush=True)
"""


def _run_suite(model_file: str, full: bool) -> dict[str, list[str]]:
    """Each case's outcome: ran, error (clean), crash (the child died) or hang (no answer)."""
    cases = [case.name for case in hostile_inputs.cases(full=full)]
    env = {**os.environ, "PYLLAMA_MTP_SANDBOX_TIME_LIMIT": str(CASE_LIMIT_S),
           "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    outcomes: dict[str, list[str]] = {"ran": [], "error": [], "crash": [], "hang": []}
    queue = list(cases)
    while queue:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, model_file, "1" if full else "0"], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            while queue:
                name = queue.pop(0)
                child.stdin.write(name + "\n")
                child.stdin.flush()
                outcome = _outcome(child, name)
                outcomes[outcome].append(name)
                if outcome in ("crash", "hang"):
                    break
        finally:
            child.kill()
            child.wait()
    return outcomes


def _outcome(child: subprocess.Popen, name: str) -> str:
    import selectors
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        # One answer line a case (more would sit in readline's buffer, unseen by select).
        if not selector.select(timeout=60 + 4 * CASE_LIMIT_S):  # a few sandbox limits, a cold start
            return "hang"
        line = child.stdout.readline()
        return line.split()[1] if line.startswith("done ") else "crash"


def test_generated_hostile_inputs_never_crash_or_hang(model_path, summary_line):
    full = os.environ.get("PYLLAMA_MTP_FUZZ_FULL") == "1"
    outcomes = _run_suite(str(model_path("qwen35")), full)
    total = sum(len(names) for names in outcomes.values())
    summary_line(f"hostile text inputs ({'full' if full else 'CI'} set): {total} cases, "
                 f"{len(outcomes['error'])} clean errors, {len(outcomes['ran'])} ran, "
                 f"{len(outcomes['crash'])} crashes, {len(outcomes['hang'])} hangs")
    assert not outcomes["crash"] and not outcomes["hang"], {k: v for k, v in outcomes.items() if k in ("crash", "hang")}
    valid = [name for name in outcomes["ran"] if name.endswith("-valid")]
    assert valid and not [name for name in outcomes["error"] if name.endswith("-valid")], \
        "valid cases must run"
    assert outcomes["error"], "no case was refused: the generator makes nothing hostile"


# -- a grammar with no way on --------------------------------------------------------------------

EMPTY_CLASS = "[z-a]"  # a reversed range: no character matches it


def test_a_grammar_that_cannot_start_is_refused_before_decoding(model_path):
    with Model.load(model_path("qwen35")) as model:
        with pytest.raises(InvalidArgumentError, match="none of the model's tokens at its start"):
            with Sampler(grammar=f"root ::= {EMPTY_CLASS}") as sampler:
                sampler.native_for(model)


def test_a_grammar_dead_end_fails_its_sequence_only(model_path):
    """llama.cpp accepted a token anyway where the grammar allowed none (and aborted on an
    end-of-generation token): now that sequence fails, with its position."""
    grammar = f'root ::= "a" {EMPTY_CLASS}'
    with Model.load(model_path("qwen35")) as model:
        with model.context(n_ctx=128) as ctx:
            solo = list(ctx.generate("hello", max_tokens=6, stop_at_eog=False))
            ctx.clear()
            with Sampler(grammar=grammar) as sampler, pytest.raises(GrammarDeadEndError) as plain:
                list(ctx.generate("hello", max_tokens=6, sampler=sampler))
            n_prompt = len(model.tokenize("hello"))
            assert plain.value.positions == {0: n_prompt}  # after the one "a"
        with SpeculativeDecoder.create(model, n_ctx=256, n_draft=3, n_seq_max=2) as decoder:
            decoder.set_sampling(grammar=grammar, seq_id=0)
            decoder.prefill("hello", 0)
            decoder.prefill("hello", 1)
            outputs: list[list[int]] = [[], []]
            with pytest.raises(GrammarDeadEndError) as mtp:
                while True:
                    for seq, tokens in enumerate(decoder.step()):
                        outputs[seq] += tokens
            assert list(mtp.value.positions) == [0] and isinstance(mtp.value.failed[0], GrammarDeadEndError)
            outputs[1] += mtp.value.produced[1]
            while len(outputs[1]) < 6:
                outputs[1] += decoder.step()[1]
            assert outputs[1][:6] == solo
