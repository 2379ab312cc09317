#!/usr/bin/env bash
# Build pyllama_mtp and llama.cpp with AddressSanitizer + UBSan into a private virtual
# environment and run the test suite under them.
#
#   tools/sanitize.sh                 # the whole suite
#   tools/sanitize.sh tests/test_speculative.py -k lossless   # any pytest arguments
#
# CPU backend only. Python itself is not instrumented, so libasan is preloaded; leak
# detection is off (the interpreter keeps memory until exit by design). Any ASan report
# or UBSan finding aborts the process, which fails the test that caused it. The build
# folder (build/sanitize) is kept, so a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=build/sanitize-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# The instrumented build must not pick up backend flags meant for the normal build.
env -u CMAKE_ARGS "$venv/bin/pip" install -q ".[test]" \
    -C build-dir=build/sanitize \
    -C cmake.define.PYLLAMA_MTP_SANITIZE=ON

libasan=$(${CC:-cc} -print-file-name=libasan.so)
[ -f "$libasan" ] || { echo "sanitize: libasan.so not found (install gcc's libasan)" >&2; exit 1; }

# libstdc++ is preloaded too: Python does not link it, and ASan resolves the real
# __cxa_throw when it starts, so without it every C++ exception (llama.cpp reports bad
# files with them) would end in an ASan CHECK failure instead of being caught.
libstdcxx=$(${CXX:-c++} -print-file-name=libstdc++.so.6)
export LD_PRELOAD="$libasan $libstdcxx"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
export PYLLAMA_MTP_TEST_BACKEND=cpu
# The venv's pytest script (not "python -m pytest") keeps the source tree off sys.path,
# so the instrumented installed package is the one imported.
# The wheel test builds with the normal toolchain: nothing of it runs instrumented.
exec "$venv/bin/pytest" --ignore=tests/test_wheel.py "$@"
