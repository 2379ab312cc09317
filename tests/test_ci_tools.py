"""The CI's crash triage (.ci/classify_crash.py): only a fault inside Mesa's software
Vulkan driver may be retried; a crash in our code, llama.cpp, ggml or Python never passes."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytestmark = pytest.mark.backend_independent("CI's crash triage")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / ".ci" / "classify_crash.py"
if not SCRIPT.is_file():
    pytest.skip("not a source checkout", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("classify_crash", SCRIPT)
classify_crash = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(classify_crash)

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
OURS = "/venv/site-packages/pyllama_mtp/lib"
MESA = "/usr/lib/x86_64-linux-gnu"


def verdict(*frames: str) -> tuple[bool, str]:
    backtrace = "\n".join(f"#{i}  0x00007f00000{i:05x} in {frame}" for i, frame in enumerate(frames))
    return classify_crash.classify(backtrace, classify_crash.known_patterns())


def test_a_fault_in_llvmpipe_threads_is_known():
    known, where = verdict("?? ()", f"lp_rast_shade_tile () from {MESA}/libvulkan_lvp.so",
                           f"start_thread () from {LIBC}")
    assert known and where.startswith("libvulkan_lvp.so: ")


@pytest.mark.parametrize("culprit", [
    f"ggml_abort () from {OURS}/libggml-base.so",
    f"ggml_vk_synchronize(ggml_backend_vk_context*, std::vector<int, std::allocator<int> >&) () "
    f"from {OURS}/libggml-vulkan.so",
    f"pmtp_spec_step_each () from {OURS}/libpyllama_mtp.so",
    "_PyEval_EvalFrameDefault ()",
])
def test_a_crash_outside_mesa_is_never_known(culprit):
    # abort's plumbing in libc is passed over; the frame that called it is blamed, even
    # when Mesa's frames lie further out on the same stack
    known, where = verdict(f"raise () from {LIBC}", f"abort () from {LIBC}", culprit,
                           f"lvp_queue_submit () from {MESA}/libvulkan_lvp.so")
    assert not known and culprit.split(" (")[0] in where


def test_glibc_frames_with_sources_are_plumbing_and_an_unreadable_stack_is_unknown():
    known, where = classify_crash.classify(
        "#0  __pthread_kill_implementation (no_tid=0) at ./nptl/pthread_kill.c:44\n"
        f"#1  0x00007f in llvm::MCJIT::run () from {MESA}/libLLVM-15.so.1\n",
        classify_crash.known_patterns())
    assert known and where.startswith("libLLVM-15.so.1: ")
    assert classify_crash.classify("", classify_crash.known_patterns()) == (False, "no frame gdb could read")


@pytest.mark.parametrize("culprit, known", [
    (f"lp_rast_shade_tile () from {MESA}/libvulkan_lvp.so", True),
    (f"ggml_abort () from {OURS}/libggml-base.so", False),
])
def test_frames_of_a_signal_handler_are_passed_over(culprit, known):
    """With Python's faulthandler on (pytest's default), the crashing thread's stack starts
    with the handler re-raising the signal: the blame goes to the frame below it."""
    verdict_known, where = verdict(f"raise () from {LIBC}", "faulthandler_fatal_error ()",
                                   "<signal handler called>", f"abort () from {LIBC}", culprit)
    assert verdict_known is known and culprit.split(" (")[0] in where
