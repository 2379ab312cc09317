#!/usr/bin/env python3
"""Fill ``vendor/llama.cpp`` with the pinned llama.cpp tree, without GitHub.

The pinned commit is the one that the ``llama-cpp-python==0.3.36`` sdist on the
Python package index carries under ``vendor/llama.cpp/``. This script fetches that
sdist with pip's normal client, checks its sha256, and extracts only that folder.
The sdist is cached (``$PYLLAMA_MTP_CACHE`` or ``~/.cache/pyllama_mtp``) so the
download happens once per machine.

Run it on its own (``python tools/provision_llama_cpp.py``) or let CMake run it
when the submodule folder is empty. Standard library only: it runs inside pip's
isolated build environment.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PINNED_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TREE_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
# Written into the filled tree so a later run (and the build) can tell what is there.
STAMP_NAME = ".pyllama_mtp-provenance"

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / "vendor" / "llama.cpp"


def cache_dir() -> Path:
    env = os.environ.get("PYLLAMA_MTP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyllama_mtp"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _outside_build_isolation_env() -> dict[str, str]:
    """This environment minus what pip's build isolation adds to hide site-packages."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME"):
        env.pop(name, None)
    return env


def pip_command(env: dict[str, str]) -> list[str]:
    """A working pip: this interpreter's, its base interpreter's, or the first on PATH.

    Inside an isolated build environment pip itself is hidden, so each candidate runs
    with the isolation variables removed.
    """
    candidates = [[sys.executable, "-m", "pip"]]
    base = getattr(sys, "_base_executable", None)
    if base and base != sys.executable:
        candidates.append([base, "-m", "pip"])
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            candidates.append([found])
    for cmd in candidates:
        probe = subprocess.run(cmd + ["--version"], capture_output=True, check=False, env=env)
        if probe.returncode == 0:
            return cmd
    raise SystemExit("provision: pip is needed to fetch the llama.cpp source and was not found")


def fetch_sdist() -> Path:
    """Return the cached, verified sdist, downloading it first if needed."""
    target_dir = cache_dir() / "sdist"
    target = target_dir / SDIST_NAME
    if target.exists() and sha256_of(target) == SDIST_SHA256:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as scratch:
        # --no-build-isolation: pip would otherwise build cmake from source just to
        # read the sdist's metadata; we never build this sdist, only unpack it.
        env = _outside_build_isolation_env()
        cmd = pip_command(env) + [
            "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
            "--disable-pip-version-check", "-d", scratch, SDIST_REQUIREMENT,
        ]
        print("provision: fetching", SDIST_REQUIREMENT, file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=sys.stderr, env=env)
        downloaded = Path(scratch) / SDIST_NAME
        actual = sha256_of(downloaded)
        if actual != SDIST_SHA256:
            raise SystemExit(
                f"provision: {SDIST_NAME} has sha256 {actual}, expected {SDIST_SHA256}; refusing it"
            )
        os.replace(downloaded, target)
    return target


def extract_tree(sdist: Path, dest: Path) -> None:
    """Unpack only vendor/llama.cpp/ of the sdist into dest, atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            members = []
            for member in archive.getmembers():
                if not member.name.startswith(TREE_PREFIX):
                    continue
                relative = member.name[len(TREE_PREFIX):]
                # The sdist's .git file points into the sdist's own .git/modules;
                # copied along it would break every git command in our checkout.
                if not relative or relative == ".git" or relative.startswith(".git/"):
                    continue
                member.name = relative
                members.append(member)
            archive.extractall(staging, members=members, filter="data")
        (staging / STAMP_NAME).write_text(
            f"commit {PINNED_COMMIT}\nfrom {SDIST_REQUIREMENT} sha256 {SDIST_SHA256}\n"
        )
        # dest may exist as the empty submodule folder of a fresh clone.
        if dest.exists():
            dest.rmdir()
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_filled(dest: Path) -> bool:
    return (dest / "CMakeLists.txt").exists() and (dest / "include" / "llama.h").exists()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST,
                        help="folder to fill (default: vendor/llama.cpp)")
    args = parser.parse_args(argv)
    dest: Path = args.dest
    if is_filled(dest):
        print(f"provision: {dest} already holds llama.cpp", file=sys.stderr)
        return 0
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"provision: {dest} is neither empty nor a llama.cpp tree; not touching it")
    extract_tree(fetch_sdist(), dest)
    print(f"provision: filled {dest} with llama.cpp {PINNED_COMMIT[:12]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
