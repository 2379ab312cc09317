#!/usr/bin/env python3
"""Generate the C source of the cffi extension ``pyllama_mtp._cffi``.

CMake runs this at build time and compiles the output against the real llama.cpp
and shim headers (cffi API mode), so a declaration in ``src/pyllama_mtp/_cdefs`` that
disagrees with its header is a compile error, not a crash at run time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cffi

CDEFS_DIR = Path(__file__).resolve().parent.parent / "src" / "pyllama_mtp" / "_cdefs"
# Explicit order: later files use types declared by earlier ones.
CDEF_FILES = ("ggml.h", "llama.h", "shim.h", "callbacks.h")

SOURCE_PRELUDE = """
#include "ggml.h"
#include "ggml-backend.h"
#include "llama.h"
#include "pyllama_mtp.h"
"""


def make_ffi() -> cffi.FFI:
    ffi = cffi.FFI()
    for name in CDEF_FILES:
        ffi.cdef((CDEFS_DIR / name).read_text(), override=False)
    ffi.set_source("pyllama_mtp._cffi", SOURCE_PRELUDE)
    return ffi


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: build_cffi.py OUTPUT.c", file=sys.stderr)
        return 2
    make_ffi().emit_c_code(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
