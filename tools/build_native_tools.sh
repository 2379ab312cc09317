#!/usr/bin/env bash
# Build llama.cpp's own reference tools from the vendored tree, for the oracle tests
# and the benchmarks (never shipped in the wheel):
#   llama-speculative-simple (native MTP loop), llama-completion (native plain decode).
# Usage: tools/build_native_tools.sh [BUILD_DIR]   (default: build/native-tools)
# Extra CMake arguments (backends) come from $CMAKE_ARGS, as for pip install.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build/native-tools}"
src="${LLAMA_CPP_SOURCE_DIR:-$root/vendor/llama.cpp}"
[ -f "$src/include/llama.h" ] || python3 "$root/tools/provision_llama_cpp.py" --dest "$src"

launcher=()
if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
# shellcheck disable=SC2086 # CMAKE_ARGS is a list of arguments
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF \
    "${launcher[@]}" ${CMAKE_ARGS:-} >/dev/null
cmake --build "$build" --target llama-speculative-simple llama-completion -j "$(nproc)"
echo "$build/bin"
