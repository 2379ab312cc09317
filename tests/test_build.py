"""The build: pinned commit, compiled backends, shim version, installed layout."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

import pyllama_mtp
from pyllama_mtp import _ffi

PINNED = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
REPO = pathlib.Path(__file__).resolve().parent.parent


def test_system_info_reports_pinned_commit_and_cpu():
    info = pyllama_mtp.system_info()
    assert info["llama_cpp_commit"] == PINNED
    assert "ggml-cpu" in info["backends"]
    assert info["version"] == info["shim_version"] == pyllama_mtp.__version__
    assert any(device["type"] == "cpu" for device in info["devices"])


def test_installed_package_holds_no_llama_cpp_build_junk():
    package = pathlib.Path(pyllama_mtp.__file__).parent
    files = [p for p in package.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "libllama.so" in names or "libllama.dylib" in names
    junk = [p for p in files if p.suffix in {".h", ".a", ".hpp", ".cmake"} or p.name.startswith("llama-")]
    assert junk == []


def test_extension_finds_its_libraries_through_origin():
    extension = pathlib.Path(_ffi.__file__).parent
    extension_so = next(extension.glob("_cffi*.so"))
    if shutil.which("readelf") is None:
        pytest.skip("readelf is not installed")
    dynamic = subprocess.run(["readelf", "-d", str(extension_so)], capture_output=True, text=True)
    assert "$ORIGIN/lib" in dynamic.stdout


def test_vendor_is_a_gitlink_only():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout (installed from an sdist)")
    listed = subprocess.run(["git", "ls-files", "-s", "vendor"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert listed == [f"160000 {PINNED} 0\tvendor/llama.cpp"]
