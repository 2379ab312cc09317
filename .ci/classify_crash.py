#!/usr/bin/env python3
"""Is a native crash a known Mesa fault, or ours? Reads gdb's ``bt`` of the crashing thread.

Usage: classify_crash.py BACKTRACE_FILE. Prints one line, ``known: LIBRARY: FRAME`` (exit 0)
or ``unknown: FRAME`` (exit 1). The known libraries are the patterns in
``.ci/known-native-faults`` (beside this script), which also says why each is there.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PATTERNS_FILE = Path(__file__).with_name("known-native-faults")
# Where a signal is raised or an abort unwinds: never the cause, so passed over.
PLUMBING = re.compile(r"(^|/)(libc|libpthread|libgcc_s|libstdc\+\+)[-.0-9a-z]*\.so")
GLIBC_SOURCE = re.compile(r"^\.\.?/(nptl|sysdeps|stdlib|signal|assert)/")
FRAME = re.compile(r"^#\d+\s+(?:0x[0-9a-f]+ in )?(?P<rest>.*)$")


def known_patterns() -> list[re.Pattern[str]]:
    lines = PATTERNS_FILE.read_text().splitlines()
    return [re.compile(line.strip()) for line in lines if line.strip() and not line.startswith("#")]


def classify(backtrace: str, patterns: list[re.Pattern[str]]) -> tuple[bool, str]:
    """(known, where) for the innermost frame that can be blamed."""
    lines = backtrace.splitlines()
    # A signal handler that ran on the crashing thread (Python's faulthandler, which
    # pytest turns on, re-raises the signal from it) sits above the frame that faulted:
    # blame starts below the handler's frames.
    marker = next((i for i, line in enumerate(lines) if "<signal handler called>" in line), None)
    if marker is not None:
        lines = lines[marker + 1:]
    for line in lines:
        frame = FRAME.match(line.strip())
        if frame is None:
            continue
        rest = frame.group("rest")
        library = re.search(r" from (\S+)$", rest)
        source = re.search(r" at (\S+):\d+$", rest)
        if library is None and rest.startswith("?? ("):
            continue  # JIT code (llvmpipe's shaders) or a frame gdb cannot name
        if library is not None and PLUMBING.search(library.group(1)):
            continue
        if library is None and source is not None and GLIBC_SOURCE.match(source.group(1)):
            continue
        if library is None:  # the executable itself (Python), or a library built with -g
            return False, line.strip()
        name = Path(library.group(1)).name
        if any(pattern.search(name) for pattern in patterns):
            return True, f"{name}: {line.strip()}"
        return False, line.strip()
    return False, "no frame gdb could read"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    known, where = classify(Path(argv[1]).read_text(errors="replace"), known_patterns())
    print(f"{'known' if known else 'unknown'}: {where}")
    return 0 if known else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
