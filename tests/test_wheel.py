"""The wheel a user installs: built with ``pip wheel .``, installed into a new virtual
environment, run from outside the source tree.

Slow (a wheel build, reusing the persistent build folder, and a venv with numpy, cffi and
gguf from the package index), so it runs once, in the CPU run.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import venv
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(*args, cwd, timeout=1800, env=None):
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, f"{args[:3]}...: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path, backend_name, model_path):
    if backend_name != "cpu":
        pytest.skip(f"backend {backend_name}: the wheel is built and tested once, in the CPU run")
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, REPO, cwd=tmp_path)
    wheels = list(dist.glob("pyllama_mtp-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    names = zipfile.ZipFile(wheel).namelist()
    size_mib = wheel.stat().st_size / (1 << 20)
    print(f"wheel {wheel.name}: {size_mib:.1f} MiB, {len(names)} files")
    # Ours and llama.cpp's shared libraries, typed, and nothing of a build tree.
    assert any(n.startswith("pyllama_mtp/lib/libllama") for n in names)
    assert "pyllama_mtp/py.typed" in names
    assert not [n for n in names if n.endswith((".h", ".a", ".o", ".cmake")) or "/bin/" in n]
    assert size_mib < 100

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    run(bin_dir / "pip", "install", "-q", wheel, cwd=tmp_path)
    # From a folder without the source tree: the installed package is what runs.
    env = {**os.environ, "PYLLAMA_MTP_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    demo = run(bin_dir / "pyllama-mtp", "demo", "-n", "24", cwd=tmp_path, env=env)
    print(demo.stdout.strip().splitlines()[-1])
    assert "identical to plain greedy decoding" in demo.stdout

    original = model_path("qwen35")
    shown = run(bin_dir / "pyllama-mtp", "inspect", original, cwd=tmp_path)
    assert "MTP: 1 layer" in shown.stdout
    run(bin_dir / "pyllama-mtp", "strip", original, "-o", tmp_path / "trunk.gguf", cwd=tmp_path)
    run(bin_dir / "pyllama-mtp", "extract-mtp", original, "-o", tmp_path / "mtp.gguf", cwd=tmp_path)
    run(bin_dir / "pyllama-mtp", "graft", "--mtp-from", tmp_path / "mtp.gguf", "--into",
        tmp_path / "trunk.gguf", "-o", tmp_path / "grafted.gguf", cwd=tmp_path)
    check = (
        "import sys\n"
        "from pyllama_mtp import Model, SpeculativeDecoder\n"
        "out = []\n"
        "for path in sys.argv[1:]:\n"
        "    with Model.load(path) as m, SpeculativeDecoder.create(m, n_ctx=512, n_threads=1, "
        "flash_attn=False) as d:\n"
        "        out.append(list(d.generate('The quick brown fox', max_tokens=100, stop_at_eog=False)))\n"
        "print(out[0] == out[1], len(out[0]))\n"
    )
    same = run(bin_dir / "python", "-c", check, original, tmp_path / "grafted.gguf", cwd=tmp_path)
    assert same.stdout.split() == ["True", "100"], same.stdout
