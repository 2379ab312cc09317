"""Portable builds: any x86-64 CPU runs them, with the best CPU kernels it can.

A portable build (``PYLLAMA_MTP_PORTABLE=ON``, what wheels for other machines are built
with) has its backends as modules and one CPU backend per instruction-set level; the one
that scores best on the CPU is loaded at import. Checked here: the variant named by
system_info() uses only instructions this CPU has; no library other than the dispatched
variants holds an instruction beyond the x86-64 baseline (tools/check_portable.py); and
the package imports, loads a model and decodes (plain and MTP, same tokens) on older
CPUs emulated by qemu-user, each picking its own variant.

A native build (the default source install) is checked for what it is. With
PYLLAMA_MTP_REQUIRE_PORTABLE=1 (CI) a build or emulator missing for these checks is a
failure, not a skip.
"""

from __future__ import annotations

import io
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys

import pytest

import pyllama_mtp
from pyllama_mtp._lowlevel import ContextConfig
from pyllama_mtp._preflight import HELPER, context_spec

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = pathlib.Path(pyllama_mtp.__file__).resolve().parent
INFO = pyllama_mtp.system_info()
PORTABLE = INFO["backend_loading"] == "dynamic"
REQUIRED = os.environ.get("PYLLAMA_MTP_REQUIRE_PORTABLE") == "1"

sys.path.insert(0, str(REPO / "tools"))
import check_portable  # noqa: E402  (a tool of the repository, not of the package)

# ggml's feature names (system_info's cpu_features) -> the kernel's /proc/cpuinfo flags.
CPUINFO_FLAG = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
    "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}


def needs_portable_build():
    if not PORTABLE:
        message = ("the installed build links its backends (a native build); build with "
                   "-C cmake.define.PYLLAMA_MTP_PORTABLE=ON for this check")
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the instruction checks are for x86-64, not {platform.machine()}")


def compiled_features(cpu_features: str) -> set[str]:
    """The features the loaded CPU variant was compiled for ("AVX2 = 1" and so on)."""
    return {name for name, value in re.findall(r"(\w+) = (\d+)", cpu_features)
            if value == "1" and name in CPUINFO_FLAG}


def test_system_info_names_the_cpu_kernels():
    variant = INFO["cpu_variant"]
    if not PORTABLE:
        assert INFO["backend_loading"] == "linked"
        assert variant in ("native", "fixed")
        return
    modules = sorted(p.name for p in (PACKAGE / "lib").glob("libggml-cpu-*.so"))
    assert f"libggml-cpu-{variant}.so" in modules, (variant, modules)
    assert len(modules) > 1, modules  # one per instruction-set level
    if platform.machine() != "x86_64" or not pathlib.Path("/proc/cpuinfo").exists():
        return  # the feature names below are x86-64 Linux's
    # What the chosen variant was compiled for, this CPU has.
    flags = set(re.search(r"^flags\s*:(.*)$", pathlib.Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    missing = {f for f in compiled_features(INFO["cpu_features"]) if CPUINFO_FLAG[f] not in flags}
    assert flags and not missing, (variant, missing)


def test_no_library_needs_more_than_the_x86_64_baseline():
    needs_portable_build()
    if shutil.which("objdump") is None:
        pytest.fail("objdump (binutils) is needed to read the libraries") if REQUIRED else pytest.skip("no objdump")
    listing = io.StringIO()
    checked, dispatched, failures = check_portable.check([PACKAGE], out=listing)
    print(listing.getvalue())
    assert checked >= 6 and dispatched >= 1, (checked, dispatched)
    assert not failures, failures


def test_the_checker_finds_instructions_beyond_the_baseline(tmp_path):
    """The scan itself can fail: code built for Haswell is caught, plain C is not."""
    if shutil.which("objdump") is None or shutil.which("cc") is None or platform.machine() != "x86_64":
        pytest.skip("needs objdump and a C compiler on x86-64")
    source = tmp_path / "sum.c"
    source.write_text("float dot(const float *a, const float *b, int n) {\n"
                      "  float s = 0; for (int i = 0; i < n; i++) s += a[i] * b[i]; return s; }\n"
                      "unsigned bits(unsigned long x) { return __builtin_popcountl(x); }\n")
    for flags, expected in ((["-O2"], set()), (["-O3", "-march=haswell", "-ffast-math"], {"AVX/AVX2/FMA/F16C", "SSE4.2"})):
        library = tmp_path / f"lib{len(flags)}.so"
        subprocess.run(["cc", "-shared", "-fPIC", *flags, "-o", str(library), str(source)], check=True)
        assert set(check_portable.scan(library)) == expected, flags


EMULATED = """
import sys
import pyllama_mtp
from pyllama_mtp import Model, SpeculativeDecoder
print("variant", pyllama_mtp.system_info()["cpu_variant"])
for path in sys.argv[1:]:
    with Model.load(path, preflight=False) as model:
        with model.context(n_ctx=256, n_threads=1, flash_attn=False) as ctx:
            plain = list(ctx.generate("The quick brown fox", max_tokens=24, stop_at_eog=False))
        with SpeculativeDecoder.create(model, n_draft=3, n_ctx=256, n_threads=1, flash_attn=False) as decoder:
            mtp = list(decoder.generate("The quick brown fox", max_tokens=24, stop_at_eog=False))
            accepted = decoder.stats.accepted
    print("model", len(plain), len(mtp), accepted, plain == mtp)
"""

# qemu-user's CPU models, the variant each must load, and whether Python itself can run
# there: NumPy 2.4 and later need x86-64-v2 (SSE4.2, POPCNT), so on a plain x86-64 CPU
# only the C side is run (the pre-flight helper: backends, a load, a prefill and a draft).
EMULATED_CPUS = [("qemu64", "x64", False), ("Nehalem-v1", "sse42", True), ("Haswell-noTSX", "haswell", True)]


@pytest.fixture(scope="module")
def emulated_models(model_path):
    """An f32 fixture and a Q4_K_M copy (quantized kernels, repacked where the variant can)."""
    source = model_path("qwen35", n_embd=256)
    quantized = source.with_name(f"{source.stem}-q4_k_m.gguf")
    if not quantized.exists():
        pyllama_mtp.quantize(source, quantized, "q4_k_m")
    return [model_path("qwen35"), quantized]


@pytest.mark.slow
@pytest.mark.backend_independent("the emulated runs compute on the emulated CPU")
@pytest.mark.parametrize("cpu, variant, runs_python", EMULATED_CPUS, ids=[c[0] for c in EMULATED_CPUS])
def test_runs_on_an_older_cpu_under_emulation(cpu, variant, runs_python, emulated_models, tmp_path):
    """The stack on an emulated CPU: the loader picks that CPU's variant, and loading and
    computing (plain and MTP; f32 and Q4_K_M) run without an illegal instruction."""
    needs_portable_build()
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        message = "qemu-x86_64 (Debian's qemu-user) is needed to emulate an older CPU"
        pytest.fail(message) if REQUIRED else pytest.skip(message)

    def emulate(*command):
        result = subprocess.run([qemu, "-cpu", cpu, *map(str, command)], capture_output=True, text=True,
                                timeout=600, cwd=tmp_path, env={**os.environ, "PYLLAMA_MTP_CACHE": str(tmp_path)})
        assert result.returncode == 0, f"{cpu}: exit {result.returncode}: {result.stderr[-3000:]}"
        return result.stdout

    contexts = [context_spec(ContextConfig(n_ctx=256, n_batch=64, n_ubatch=64, n_rs_seq=1, flash_attn=False,
                                              kv_unified=False, mtp=mtp))
                for mtp in (False, True)]
    for path in emulated_models:  # load, contexts, then a prefill and a draft through the shim
        out = emulate(HELPER, path, 1, 2, 1, *contexts)
        assert out.splitlines()[0] == f"cpu {variant}" and out.splitlines()[-1] == "stage sound", out
    if not runs_python:
        return
    out = emulate(sys.executable, "-c", EMULATED, *emulated_models)
    print(out.strip())
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["variant", variant], out
    f32, quantized = lines[1:]
    assert f32 == ["model", "24", "24", f32[3], "True"] and int(f32[3]) > 0, out  # lossless, drafts kept
    assert quantized[1:3] == ["24", "24"] and int(quantized[3]) > 0, out
