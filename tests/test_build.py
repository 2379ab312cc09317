"""The build: pinned commit, compiled backends, shim version, installed layout."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import pytest

import pyllama_mtp
from pyllama_mtp import _ffi

pytestmark = pytest.mark.backend_independent("the build, its pin and its layout")

REPO = pathlib.Path(__file__).resolve().parent.parent
PROVISION = REPO / "tools" / "provision_llama_cpp.py"
# The pin as the provisioning script writes it (its one place).
PINNED = re.search(r'^PINNED_COMMIT = "([0-9a-f]{40})"', PROVISION.read_text(), re.M).group(1)


def test_system_info_reports_pinned_commit_and_cpu():
    info = pyllama_mtp.system_info()
    assert info["llama_cpp_commit"] == PINNED
    assert "ggml-cpu" in info["backends"]
    assert info["version"] == info["shim_version"] == pyllama_mtp.__version__
    assert any(device["type"] == "cpu" for device in info["devices"])


def _commit_cmake_reports(tree: pathlib.Path) -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    result = subprocess.run([cmake, f"-DSOURCE_DIR={tree}", "-P", str(REPO / "cmake" / "source_commit.cmake")],
                            capture_output=True, text=True, check=True)
    return result.stderr.strip()  # message() writes to stderr


def test_the_reported_commit_is_read_from_the_tree_built(tmp_path):
    """system_info()'s commit comes from the tree, not from the pin: a tree provisioned at
    another commit, a git checkout and a tree of unknown origin each report their own."""
    stamped = tmp_path / "stamped"
    stamped.mkdir()
    (stamped / ".pyllama_mtp-provenance").write_text("commit 1234abcd\nfrom somewhere\n")
    assert _commit_cmake_reports(stamped) == "1234abcd"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert _commit_cmake_reports(bare) == "unknown"
    if shutil.which("git"):
        repo = tmp_path / "repo"
        repo.mkdir()
        git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*git, "init", "-q"], check=True)
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        assert _commit_cmake_reports(repo) == head


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


def test_source_tree_import_says_what_to_run(tmp_path):
    """The uninstalled source tree on sys.path: one line that says what to run."""
    if not (REPO / "src" / "pyllama_mtp").is_dir():
        pytest.skip("not a source checkout")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", "import pyllama_mtp"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pyllama_mtp was imported from its source tree"), result.stderr
    assert "run 'pip install .'" in last


def test_provisioning_reports_an_unreachable_index_in_one_line(tmp_path):
    """No package index: the provisioning script says so in one line and writes nothing."""
    script = PROVISION
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYLLAMA_MTP_CACHE": str(tmp_path / "cache"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": f"http://127.0.0.1:{port}/simple/", "PIP_RETRIES": "0", "PIP_TIMEOUT": "5"}
    dest = tmp_path / "llama.cpp"
    result = subprocess.run([sys.executable, str(script), "--dest", str(dest)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"provision: error: could not download llama-cpp-python==[0-9.]+ from the package "
                    r"index \(", last), result.stderr
    assert not dest.exists()
    assert not list((tmp_path / "cache").rglob("*.tar.gz"))


def _package_imports() -> dict[str, set[str]]:
    """Module -> modules of this package it imports when it runs (``if TYPE_CHECKING:``
    blocks, which only annotations read, left out), from the installed sources."""
    import ast

    root = pathlib.Path(pyllama_mtp.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        hidden = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                  and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
        found = set()
        for node in ast.walk(tree):
            if id(node) in hidden or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                found |= {(alias.name, alias.name) for alias in node.names}
                continue
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # "from X import a": the submodule X.a where there is one, else names of X
            found |= {(target, f"{target}.{alias.name}") for alias in node.names}
        graph[name] = found
    modules = set(graph)
    return {name: {sub if sub in modules else target for target, sub in found} & modules - {name}
            for name, found in graph.items()}


def test_no_module_imports_one_that_imports_it_back():
    graph = _package_imports()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for dep in sorted(graph[name]):
            if seen.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in seen:
                visit(dep, path + [dep])
        seen[name] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [name])
    # and the layers: only the low level (and _ffi itself) reaches the compiled library
    touching = sorted(name for name, deps in graph.items() if "pyllama_mtp._ffi" in deps)
    assert all(name.startswith("pyllama_mtp._lowlevel") for name in touching), touching



def test_no_source_file_is_over_500_lines():
    package = pathlib.Path(pyllama_mtp.__file__).parent
    files = list(package.rglob("*.py"))
    if (REPO / "csrc").is_dir():
        files += list((REPO / "csrc").glob("*.[ch]*"))
    long = {str(f): n for f in files if (n := len(f.read_text().splitlines())) > 500}
    assert long == {}
