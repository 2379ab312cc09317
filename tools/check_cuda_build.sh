#!/usr/bin/env bash
# Compile the CUDA backend with this machine's nvcc for one architecture, without a GPU,
# so breakage of the CUDA build is caught here. The binding itself is not installed.
# Usage: tools/check_cuda_build.sh [ARCH] [BUILD_DIR]      (default ARCH 89, Ada)
#        CONFIGURE_ONLY=1 tools/check_cuda_build.sh         (toolchain check in seconds)
#
# cuBLAS: used from the CUDA toolkit when present; otherwise from the nvidia-cublas wheel
# on the package index (matching the toolkit's major version), in a private folder.
set -euo pipefail
arch="${1:-89}"
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${2:-$root/build/cuda-check-sm$arch}"
nvcc="$(command -v nvcc || true)"
[ -n "$nvcc" ] || { echo "check_cuda_build: no nvcc on PATH" >&2; exit 2; }
toolkit="$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)"
cuda_major="$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
[ -f "$root/vendor/llama.cpp/include/llama.h" ] || python3 "$root/tools/provision_llama_cpp.py"

extra=()
if ! ls "$toolkit"/lib64/libcublas.so* "$toolkit"/targets/*/lib/libcublas.so* >/dev/null 2>&1; then
    cublas="${PYLLAMA_MTP_CACHE:-$HOME/.cache/pyllama_mtp}/cublas-cu$cuda_major"
    if [ ! -d "$cublas/nvidia" ]; then
        pip install --quiet --no-deps --target "$cublas" "nvidia-cublas==$cuda_major.*"
    fi
    lib="$(dirname "$(find "$cublas" -name 'libcublas.so*' | head -1)")"
    inc="$(dirname "$(find "$cublas" -name 'cublas_v2.h' | head -1)")"
    # FindCUDAToolkit only looks inside the toolkit: name the libraries and headers directly.
    [ -e "$lib/libcublas.so" ] || ln -sf "$(ls "$lib"/libcublas.so.* | head -1)" "$lib/libcublas.so"
    [ -e "$lib/libcublasLt.so" ] || ln -sf "$(ls "$lib"/libcublasLt.so.* | head -1)" "$lib/libcublasLt.so"
    extra+=(-DCUDA_cublas_LIBRARY="$lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$lib/libcublasLt.so"
            -DCMAKE_CUDA_FLAGS="-I$inc" -DCMAKE_CXX_FLAGS="-I$inc")
fi

# No GPU driver here: without libcuda (or its stub) build the no-VMM variant, which does
# not link the driver library; every kernel is still compiled.
if ! ls "$toolkit"/lib64/stubs/libcuda.so "$toolkit"/targets/*/lib/stubs/libcuda.so /usr/lib/*/libcuda.so* >/dev/null 2>&1; then
    extra+=(-DGGML_CUDA_NO_VMM=ON)
fi

launcher=()
command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache
    -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
start=$(date +%s)
cmake -S "$root/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF "${launcher[@]}" "${extra[@]}"
if [ -n "${CONFIGURE_ONLY:-}" ]; then
    echo "check_cuda_build: configured for sm_$arch in $(( $(date +%s) - start )) s (not compiled)"
    exit 0
fi
cmake --build "$build" --target ggml-cuda llama -j "$(nproc)"
echo "check_cuda_build: ggml-cuda for sm_$arch compiled in $(( $(date +%s) - start )) s"
