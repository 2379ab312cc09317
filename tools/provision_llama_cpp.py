#!/usr/bin/env python3
"""Fill ``vendor/llama.cpp`` with the pinned llama.cpp tree, without GitHub.

The pinned commit is the one that the ``llama-cpp-python`` sdist (version below) on the
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

# The one place the pin is written (CMakeLists.txt and the tests read it from here; the
# submodule's gitlink must agree, which a test checks).
PINNED_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
SDIST_VERSION = "0.3.36"
SDIST_REQUIREMENT = f"llama-cpp-python=={SDIST_VERSION}"
SDIST_NAME = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TREE_PREFIX = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
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


# Variables that would change how the child pip resolves the sdist. Build isolation
# must stay on (the sdist's build backend is fetched as a wheel into pip's own isolated
# environment just to read its metadata), and binaries must stay allowed for that backend.
_CHILD_ENV_DROP = (
    "PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME",  # what pip's build isolation adds
    "PIP_NO_BUILD_ISOLATION", "PIP_NO_BINARY", "PIP_ONLY_BINARY", "PIP_REQUIRE_VIRTUALENV",
    "PIP_NO_DEPS", "PIP_TARGET", "PIP_PREFIX", "PIP_USER",
)


class ProvisionError(Exception):
    """A failure to report to the user in one line."""


def _child_env() -> dict[str, str]:
    """This environment minus what would break a plain ``pip download`` of the sdist."""
    return {name: value for name, value in os.environ.items() if name not in _CHILD_ENV_DROP}


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
    raise ProvisionError("pip is needed to fetch the llama.cpp source and was not found")


def _pip_reason(output: str) -> str:
    """pip's own last error line, for a one-line report."""
    errors = [line.strip() for line in output.splitlines() if line.strip().startswith("ERROR:")]
    lines = errors or [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def fetch_sdist() -> Path:
    """Return the cached, verified sdist, downloading it first if needed."""
    target_dir = cache_dir() / "sdist"
    target = target_dir / SDIST_NAME
    if target.exists() and sha256_of(target) == SDIST_SHA256:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as scratch:
        # pip prepares an sdist's metadata before saving it, which imports the sdist's
        # build backend: with build isolation on, and binaries allowed for everything
        # but the sdist itself, pip brings that backend as a wheel (seconds), in any
        # fresh environment that has pip and the package index.
        env = _child_env()
        cmd = pip_command(env) + [
            "download", "--no-deps", "--no-binary", SDIST_REQUIREMENT.split("==")[0],
            "--disable-pip-version-check", "--progress-bar", "off", "-d", scratch,
            SDIST_REQUIREMENT,
        ]
        print("provision: fetching", SDIST_REQUIREMENT, "with pip", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise ProvisionError(
                f"could not download {SDIST_REQUIREMENT} from the package index "
                f"({_pip_reason(done.stdout + done.stderr)}); check the network and pip's "
                "index settings, or fill vendor/llama.cpp with 'git submodule update --init'"
            )
        downloaded = Path(scratch) / SDIST_NAME
        if not downloaded.exists():
            raise ProvisionError(f"pip reported success but saved no {SDIST_NAME}")
        actual = sha256_of(downloaded)
        if actual != SDIST_SHA256:
            raise ProvisionError(
                f"{SDIST_NAME} has sha256 {actual}, expected {SDIST_SHA256}; refusing it"
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
    try:
        if dest.exists() and any(dest.iterdir()):
            raise ProvisionError(f"{dest} is neither empty nor a llama.cpp tree; not touching it")
        extract_tree(fetch_sdist(), dest)
    except ProvisionError as error:
        # One line, recognisable by the CMake step that runs this script.
        print(f"provision: error: {error}", file=sys.stderr)
        return 1
    print(f"provision: filled {dest} with llama.cpp {PINNED_COMMIT[:12]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
