"""Oracle: prompts rendered by the binding equal llama-server's own (POST /apply-template),
byte for byte, for the vendored templates of MTP model families.

llama-server is built beside the binding with -C cmake.define.PYLLAMA_MTP_NATIVE_TOOLS=ON
(CI does); without it this test is reported as skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

from chat_cases import CONVERSATIONS, MTP_TEMPLATES, TOOLS, llama_cpp_tree, template_source
from pyllama_mtp import ChatTemplate, Model
from test_native_oracle import native_tool

pytestmark = pytest.mark.backend_independent("prompt rendering by llama.cpp's chat layer, on the CPU")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port, path, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def start_server(model_file, template_file):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GGML_VK_VISIBLE_DEVICES"}
    process = subprocess.Popen(
        [str(native_tool("llama-server")), "-m", str(model_file), "--jinja", "--chat-template-file",
         str(template_file), "--host", "127.0.0.1", "--port", str(port), "-c", "512", "-ngl", "0", "-t", "1",
         "--no-warmup"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"llama-server exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    pytest.fail("llama-server did not become healthy within 60 s")


# (conversation, tools, thinking): thinking None leaves the template's default.
CASES = [(conversation, tools, thinking)
         for conversation in sorted(CONVERSATIONS)
         for tools in (False, True)
         for thinking in (None, True, False)
         if tools or conversation != "tool_result"]


@pytest.mark.parametrize("name", MTP_TEMPLATES)
def test_prompts_equal_llama_server_apply_template(model_path, name):
    native_tool("llama-server")
    template_source(name)
    template_file = llama_cpp_tree() / "models" / "templates" / f"{name}.jinja"
    model_file = model_path("qwen35")
    process, port = start_server(model_file, template_file)
    try:
        with Model.load(model_file, n_gpu_layers=0) as model, \
                ChatTemplate(template_file.read_text(encoding="utf-8"), model=model) as template:
            for conversation, tools, thinking in CASES:
                body = {"messages": CONVERSATIONS[conversation]}
                if tools:
                    body["tools"] = TOOLS
                if thinking is not None:
                    body["chat_template_kwargs"] = {"enable_thinking": thinking}
                theirs = post(port, "/apply-template", body)["prompt"]
                ours = template.apply(CONVERSATIONS[conversation], tools=TOOLS if tools else None,
                                      enable_thinking=thinking)
                assert ours == theirs, (conversation, tools, thinking)
    finally:
        process.terminate()
        process.wait(timeout=30)
