"""The OpenAI-compatible server, as a client sees it: `pyllama-mtp serve` started in its
own process on 127.0.0.1, driven by the official `openai` client and by raw HTTP.

Load tests stay on 127.0.0.1, are bounded in count and time, and stop by themselves.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from chat_cases import QWEN_SPECIALS, TOOLS, template_source
from helpers import EXACT
from pyllama_mtp import Model

httpx = pytest.importorskip("httpx", reason="the test extra installs httpx")
openai = pytest.importorskip("openai", reason="the test extra installs the openai client")
jsonschema = pytest.importorskip("jsonschema", reason="the test extra installs jsonschema")

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}}, "required": ["n", "ok"]}


pytestmark = pytest.mark.backend_independent(
    "the server process uses llama.cpp's default devices and its HTTP layer does not "
    "depend on the backend")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m pyllama_mtp serve` on 127.0.0.1: started, awaited on /health, stopped."""

    def __init__(self, model: str, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pyllama_mtp", "serve", "-m", model, "--port", str(self.port), "--threads", "1",
             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited: {self.process.stdout.read()}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not answer /health within 120 s")

    def client(self, api_key: str = "unused") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, timeout=120, max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {name: float(value) for name, value in re.findall(r"^(\S+) (\S+)$", text, re.M)}

    def stop(self) -> None:
        alive = self.process.poll() is None
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        assert alive, "the server process died during the tests"


@pytest.fixture(scope="module")
def chat_model(model_path):
    return model_path("qwen35", chat_template=template_source("Qwen3.5-4B"), special_tokens=QWEN_SPECIALS)


@pytest.fixture(scope="module")
def server(chat_model):
    process = ServerProcess(chat_model, "--parallel", "4", "--ctx-size", "8192", "--draft", "3",
                            "--queue-size", "64")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def plain_server(chat_model):
    process = ServerProcess(chat_model, "--parallel", "4", "--ctx-size", "8192", "--no-mtp")
    yield process
    process.stop()


def _model_id(client) -> str:
    return client.models.list().data[0].id


def test_chat_completion_streaming_and_not(server):
    client = server.client()
    model = _model_id(client)
    messages = [{"role": "user", "content": "Hello there"}]
    kwargs = dict(model=model, messages=messages, max_tokens=40, temperature=0,
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    timings = whole.model_extra["timings"]
    assert timings["predicted_n"] == whole.usage.completion_tokens
    assert 0 <= timings["draft_n_accepted"] <= timings["draft_n"] and timings["draft_n"] > 0
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == (choice.message.content or "")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]


def test_chat_with_tools_and_with_a_json_schema(server):
    client = server.client()
    model = _model_id(client)
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, max_tokens=30,
        temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for stream in (False, True):
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "A number"}], max_tokens=300, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
            extra_body={"chat_template_kwargs": {"enable_thinking": False}}, stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in response if c.choices) if stream \
            else response.choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMA)


def test_completions_streaming_and_not(server):
    client = server.client()
    model = _model_id(client)
    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=32, temperature=0)
    assert whole.usage.completion_tokens == 32 and whole.choices[0].finish_reason == "length"
    pieces = [c.choices[0].text for c in client.completions.create(model=model, prompt="Once upon a time",
                                                                   max_tokens=32, temperature=0, stream=True)]
    assert "".join(pieces) == whole.choices[0].text


# Batched arithmetic moves a sequence's logits with the batch's composition (up to 6e-4
# measured on the CPU against the same sequence alone), as in llama-server: a greedy
# continuation through a near-tie can then differ. The load tests use continuations
# whose top-two logits stay at least this far apart.
MIN_MARGIN = 1e-2


def _min_margin(model, prompt: str, n_tokens: int) -> float:
    with model.context(n_ctx=1024, **EXACT) as ctx:
        ctx.decode(model.tokenize(prompt, add_special=True, parse_special=True))
        margin = float("inf")
        for _ in range(n_tokens):
            logits = ctx.logits()
            top2 = np.sort(logits)[-2:]
            margin = min(margin, float(top2[1] - top2[0]))
            ctx.decode([int(np.argmax(logits))])
    return margin


@pytest.fixture(scope="module")
def load_requests(chat_model):
    """32 distinct completions of different lengths: greedy ones clear of near-ties, and
    every fourth sampled with its own seed."""
    out, candidate = [], 0
    with Model.load(chat_model) as model:
        while len(out) < 32:
            i = len(out)
            request = {"prompt": f"Request {candidate}: the story of {'abcdefgh'[candidate % 8] * (1 + i % 3)}",
                       "max_tokens": 20 + 3 * i}
            candidate += 1
            if i % 4 == 3:
                # Cold prompts: a prefix reused from a slot's cache was computed in another
                # batch, and logits that move a little move a seeded draw's boundaries
                # (greedy ones, clear of near-ties, keep the cache: reuse under load).
                request.update(temperature=0.5, seed=1000 + i, cache_prompt=False)
            elif _min_margin(model, request["prompt"], request["max_tokens"]) >= MIN_MARGIN:
                request.update(temperature=0)
            else:
                continue
            out.append(request)
    return out


def _complete(server, request):
    response = httpx.post(server.url + "/v1/completions", json=request, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["choices"][0]["text"], body["usage"]["completion_tokens"], body["timings"]


def test_32_concurrent_requests_through_4_slots_equal_their_solo_runs(server, plain_server, load_requests):
    requests = load_requests
    start = server.metrics()
    solo = [_complete(server, request) for request in requests]
    before = server.metrics()
    solo_steps = before["pyllama_mtp_steps_total"] - start["pyllama_mtp_steps_total"]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda request: _complete(server, request), requests))
    after = server.metrics()
    greedy = [i for i, request in enumerate(requests) if request["temperature"] == 0]
    assert [together[i][0] for i in greedy] == [solo[i][0] for i in greedy]
    # A seeded sampled answer is drawn in token-id order, so logits that move a little move
    # the draw's boundaries a little; over a hundred tokens one can still cross (a
    # divergence measured at a step where the cumulative probabilities moved by 1e-4).
    # Most must match; a sampler that ignored the seed or shared a stream would match none.
    sampled = [i for i in range(len(requests)) if i not in greedy]
    assert sum(together[i][0] == solo[i][0] for i in sampled) >= len(sampled) // 2
    assert all(0 < tokens <= request["max_tokens"] for (_, tokens, _), request in zip(together, requests))
    # They ran side by side: the same answers took fewer steps than one at a time (not a
    # quarter: the adaptive plan drafts less in a full batch; the plain server below
    # shows the batching itself).
    steps = after["pyllama_mtp_steps_total"] - before["pyllama_mtp_steps_total"]
    assert steps < solo_steps, (steps, solo_steps)
    assert sum(t["draft_n_accepted"] for _, _, t in together) > 0
    # Greedy answers are plain decoding's: the server without MTP gives the same text.
    plain_before = plain_server.metrics()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        plain = list(pool.map(lambda i: _complete(plain_server, requests[i]), greedy))
    plain_steps = plain_server.metrics()["pyllama_mtp_steps_total"] - plain_before["pyllama_mtp_steps_total"]
    assert [out[0] for out in plain] == [solo[i][0] for i in greedy]
    # One token per sequence per step there: fewer steps than half the tokens means
    # several slots were served in most steps.
    assert plain_steps < sum(tokens for _, tokens, _ in plain) / 2, plain_steps
    assert all(t["draft_n"] == 0 for _, _, t in plain)


def test_a_client_that_disconnects_frees_its_slot(chat_model):
    process = ServerProcess(chat_model, "--parallel", "1", "--ctx-size", "40000")
    try:
        request = {"prompt": "Once upon a time", "max_tokens": 30000, "temperature": 0, "stream": True}
        with httpx.stream("POST", process.url + "/v1/completions", json=request, timeout=60) as response:
            lines = response.iter_lines()
            assert sum(1 for _, line in zip(range(5), lines) if line.startswith("data:")) >= 2
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = process.metrics()
            if metrics['pyllama_mtp_requests_total{outcome="cancelled"}'] == 1:
                break
            time.sleep(0.1)
        assert metrics['pyllama_mtp_requests_total{outcome="cancelled"}'] == 1
        assert metrics['pyllama_mtp_requests_total{outcome="completed"}'] == 0
        assert metrics["pyllama_mtp_slots_busy"] == 0
        assert metrics["pyllama_mtp_completion_tokens_total"] == 0  # never finished
        # The one slot serves the next request.
        _complete(process, {"prompt": "Hello", "max_tokens": 5, "temperature": 0})
    finally:
        process.stop()


def test_a_full_queue_answers_503(chat_model):
    process = ServerProcess(chat_model, "--parallel", "1", "--queue-size", "1", "--ctx-size", "40000")
    try:
        request = {"prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: httpx.post(process.url + "/v1/completions", json=request,
                                                           timeout=120), range(4)))
        statuses = sorted(response.status_code for response in responses)
        assert statuses.count(200) >= 2 and 503 in statuses, statuses
        refused = next(response for response in responses if response.status_code == 503).json()
        assert "busy" in refused["error"]["message"]
    finally:
        process.stop()


def test_api_key_guards_every_endpoint_but_health(chat_model):
    process = ServerProcess(chat_model, "--parallel", "1", "--api-key", "s3cret")
    try:
        assert httpx.get(process.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(process.url + path).status_code == 401
            assert httpx.get(process.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(process.url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        refused = httpx.post(process.url + "/v1/chat/completions", json=request)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            process.client("wrong").chat.completions.create(model="x", messages=request["messages"])
        answer = process.client("s3cret").chat.completions.create(model=_model_id(process.client("s3cret")),
                                                                  messages=request["messages"], max_tokens=3)
        assert answer.usage.completion_tokens <= 3
    finally:
        process.stop()


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MALFORMED = [
    ("chat", b"{bad", 400), ("chat", b"[]", 400), ("chat", b'"hi"', 400), ("chat", b"", 400),
    ("chat", b"\xff\xfe\x00", 400), ("chat", b"[" * 100000 + b"]" * 100000, 400),
    ("chat", {"max_tokens": 4}, 400), ("chat", {"messages": []}, 400), ("chat", {"messages": "hi"}, 400),
    ("chat", {"messages": [1]}, 400), ("chat", {"messages": [{"content": "hi"}]}, 400),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("chat", {**CHAT, "max_tokens": "4"}, 400), ("chat", {**CHAT, "max_tokens": -1}, 400),
    ("chat", {**CHAT, "max_tokens": 10 ** 9}, 400), ("chat", {**CHAT, "temperature": "hot"}, 400),
    ("chat", {**CHAT, "temperature": 5}, 400), ("chat", {**CHAT, "top_p": 0}, 400),
    ("chat", {**CHAT, "top_p": 2}, 400), ("chat", {**CHAT, "top_k": -1}, 400), ("chat", {**CHAT, "min_p": 1}, 400),
    ("chat", {**CHAT, "n": 2}, 400), ("chat", {**CHAT, "stream": "yes"}, 400), ("chat", {**CHAT, "stop": 5}, 400),
    ("chat", {**CHAT, "stop": ["x"] * 40}, 400), ("chat", {**CHAT, "stop": ["x", 1]}, 400),
    ("chat", {**CHAT, "model": "no-such-model"}, 404), ("chat", {**CHAT, "response_format": {"type": "xml"}}, 400),
    ("chat", {**CHAT, "response_format": {"type": "json_schema",
                                          "json_schema": {"schema": {"$ref": "#/definitions/missing"}}}}, 400),
    ("chat", {**CHAT, "grammar": "root ::= ("}, 400), ("chat", {**CHAT, "tools": "x"}, 400),
    ("chat", {**CHAT, "tools": ["x"]}, 400), ("chat", {**CHAT, "seed": "x"}, 400),
    ("chat", {**CHAT, "presence_penalty": 1}, 400), ("chat", {**CHAT, "logprobs": True}, 400),
    ("chat", {**CHAT, "chat_template_kwargs": {"enable_thinking": "yes"}}, 400),
    ("chat", {**CHAT, "chat_template_kwargs": "x"}, 400), ("chat", {**CHAT, "n_draft": 99}, 400),
    ("chat", {"messages": [{"role": "user", "content": "word " * 5000}]}, 400),
    ("chat", b"x" * (5 << 20), 413),
    ("completions", {"max_tokens": 4}, 400), ("completions", {"prompt": 5}, 400),
    ("completions", {"prompt": ""}, 400), ("completions", {"prompt": "hi", "json_schema": "x"}, 400),
    ("completions", {"prompt": "hi", "echo": True}, 400),
]


@pytest.mark.parametrize("index", range(len(MALFORMED)))
def test_malformed_requests_get_a_4xx_and_the_server_goes_on(server, index):
    endpoint, body, status = MALFORMED[index]
    url = server.url + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_wrong_method_and_path_get_openai_errors(server):
    assert len(MALFORMED) >= 30
    for method, path, status in (("GET", "/v1/chat/completions", 405), ("POST", "/v1/models", 405),
                                 ("GET", "/v2/nothing", 404)):
        response = httpx.request(method, server.url + path)
        assert response.status_code == status and response.json()["error"]["message"]


def test_metrics_and_models(server):
    client = server.client()
    models = client.models.list().data
    assert len(models) == 1 and models[0].id.startswith("qwen35")
    _complete(server, {"prompt": "Hello", "max_tokens": 8, "temperature": 0})
    metrics = server.metrics()
    for name in ("pyllama_mtp_prompt_tokens_total", "pyllama_mtp_completion_tokens_total",
                 "pyllama_mtp_draft_tokens_total", "pyllama_mtp_slots_busy", "pyllama_mtp_queue_length",
                 'pyllama_mtp_draft_acceptance{position="1"}', 'pyllama_mtp_requests_total{outcome="completed"}'):
        assert name in metrics, name
    assert metrics["pyllama_mtp_slots"] == 4
    assert 0 < metrics['pyllama_mtp_draft_acceptance{position="1"}'] <= 1


def test_serve_listens_on_loopback_by_default():
    from pyllama_mtp.cli import build_parser

    args = build_parser().parse_args(["serve", "-m", "x.gguf"])
    assert args.host == "127.0.0.1" and args.api_key is None and not args.fixed_draft
