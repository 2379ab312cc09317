"""The pre-flight (src/pyllama_mtp/_preflight.py, csrc/preflight.cpp): what it turns into
errors, when it runs a child, what it caches, and the repacking fallback."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest

from pyllama_mtp import LlamaError, Model, ModelLoadError, _preflight

pytestmark = pytest.mark.backend_independent("the pre-flight helper runs on the CPU whatever the model's device")


@pytest.fixture
def fresh_copy(model_path, tmp_path):
    """A copy of the qwen35 fixture nobody has tried yet (the cache is per file)."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(model_path("qwen35"), path)
    return path


@pytest.fixture
def aborting_file(model_path, tmp_path):
    """A valid GGUF whose first norm weight is stored as q4_0: ggml's CPU kernels abort."""
    from gguf_mutations import structured_mutations

    case = next(m for m in structured_mutations(model_path("qwen35"))
                if m.name == "tensor:blk.0.attn_norm.weight:retype:Q4_0")
    path = tmp_path / "aborting.gguf"
    case.write(path)
    return path


def test_an_abort_inside_llama_cpp_is_a_model_load_error(aborting_file):
    with pytest.raises(ModelLoadError, match="SIGABRT.*binary_op: unsupported types"):
        Model.load(aborting_file)
    # What it protects from: the same file without it ends the process.
    script = ("import resource, sys; from pyllama_mtp import Model\n"
              "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an expected death: no core file\n"
              "with Model.load(sys.argv[1], preflight=False) as m, m.context(n_ctx=64) as c: c.decode([1, 2])")
    child = subprocess.run([sys.executable, "-c", script, str(aborting_file)], capture_output=True,
                           env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    assert child.returncode < 0, child.stderr[-500:]


@pytest.fixture
def children(monkeypatch):
    """The helper runs started, as (arguments)."""
    started = []
    real = subprocess.run

    def counting(command, *args, **kwargs):
        started.append(command[2:])
        return real(command, *args, **kwargs)

    monkeypatch.setattr(_preflight.subprocess, "run", counting)
    return started


def test_one_child_per_file_and_shape(fresh_copy, children, monkeypatch):
    with Model.load(fresh_copy) as model:
        assert len(children) == 1 and children[0][1] == "2"  # computed, with the MTP step
        with model.context(n_ctx=2048, n_batch=512):  # the load's own shape: known
            pass
        assert len(children) == 1
        with model.context(n_ctx=256, n_batch=64):  # a new shape: tried dry
            pass
        assert len(children) == 2 and children[1][1] == "0"
        with model.context(n_ctx=256, n_batch=64):
            pass
        assert len(children) == 2
    Model.load(fresh_copy).close()
    assert len(children) == 2  # the same file again
    os.utime(fresh_copy)  # touched: another file as far as the cache knows
    Model.load(fresh_copy, preflight=False).close()
    monkeypatch.setenv(_preflight.ENV_SWITCH, "0")
    Model.load(fresh_copy).close()
    assert len(children) == 2
    monkeypatch.delenv(_preflight.ENV_SWITCH)
    Model.load(fresh_copy).close()
    assert len(children) == 3


def test_a_file_moved_after_loading_still_takes_new_contexts(fresh_copy, children):
    with Model.load(fresh_copy) as model:
        os.unlink(fresh_copy)
        with model.context(n_ctx=128, n_batch=32) as ctx:
            ctx.decode([1, 2, 3])
    assert len(children) == 1


def fake_helper(tmp_path, body):
    script = tmp_path / "fake-preflight"
    # ulimit: its deaths are staged, like the real helper's, so no core file either.
    script.write_text("#!/bin/sh\nulimit -c 0\n" + body + "\n")
    script.chmod(0o755)
    return script


@pytest.mark.skipif(os.name == "nt", reason="the fake helper is a POSIX shell script")
def test_a_trial_killed_from_outside_is_reported_and_not_cached(fresh_copy, tmp_path, monkeypatch):
    monkeypatch.setattr(_preflight, "HELPER", fake_helper(tmp_path, "kill -KILL $$"))
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="stopped from outside.*SIGKILL"):
            Model.load(fresh_copy)
    assert not any(key[0][0] == os.path.realpath(fresh_copy) for key in _preflight._cache)


@pytest.mark.skipif(os.name == "nt", reason="the fake helper is a POSIX shell script")
def test_kernels_that_die_only_repacked_load_without_repacking(fresh_copy, tmp_path, monkeypatch, caplog):
    # Arguments: MODEL LOAD_MTP COMPUTE REPACK ...: dies in the computation when repacking.
    monkeypatch.setattr(_preflight, "HELPER", fake_helper(
        tmp_path, 'echo "stage compute"; if [ "$4" = "1" ]; then kill -ILL $$; fi; exit 0'))
    with caplog.at_level(logging.WARNING, logger="pyllama_mtp"):
        with Model.load(fresh_copy, n_gpu_layers=0) as model:  # weights on the CPU: repacking matters
            assert model._preflight.repack is False
            with model.context(n_ctx=64) as ctx:
                ctx.decode([1, 2, 3])
    assert "repack=False" in caplog.text and "SIGILL" in caplog.text
    with pytest.raises(ModelLoadError, match="SIGILL"):  # asked for: no fallback
        Model.load(fresh_copy, repack=True, n_gpu_layers=0)


@pytest.mark.skipif(os.name == "nt", reason="the fake helper is a POSIX shell script")
def test_a_context_the_trial_cannot_make_is_a_llama_error(fresh_copy, tmp_path, monkeypatch):
    with Model.load(fresh_copy) as model:
        monkeypatch.setattr(_preflight, "HELPER", fake_helper(
            tmp_path, 'echo "stage context 0"; echo "abort: graph.cpp:1: GGML_ASSERT(x) failed" >&2; kill -ABRT $$'))
        with pytest.raises(LlamaError, match=r"SIGABRT while building the graphs of context 0.*GGML_ASSERT\(x\)"):
            model.context(n_ctx=96)
        with model.context(n_ctx=2048):  # the shape the load tried is known good
            pass


def test_a_missing_helper_says_how_to_go_on(fresh_copy, tmp_path, monkeypatch):
    monkeypatch.setattr(_preflight, "HELPER", tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="reinstall.*PYLLAMA_MTP_PREFLIGHT=0"):
        Model.load(fresh_copy)
