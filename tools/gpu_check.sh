#!/usr/bin/env bash
# GPU check, meant to run unchanged the first time a Linux machine with an NVIDIA GPU and
# the CUDA toolkit is at hand (16 cores): build with GGML_CUDA=ON for the GPU it finds,
# run the test suite on the CUDA backend, then the benchmark (ours against llama.cpp's
# native loops, plain against MTP, on f32, Q8_0 and Q4_K_M fixtures of about 1.3 B
# parameters generated there), and write one JSON and one Markdown table. Every stage has
# a time limit, so the whole run ends within 10 minutes; progress goes to stdout.
#
# Usage: tools/gpu_check.sh [--dry-run] [--out DIR] [--wheelhouse DIR] [--arch SM]
#   --dry-run         print the plan and check the inputs; build and run nothing (no GPU needed)
#   --out DIR         results: gpu_check.json, gpu_check.md, logs (default build/gpu-check/results)
#   --wheelhouse DIR  Python packages from this folder only (a machine without the package index)
#   --arch SM         CUDA architecture (default: the first GPU's compute capability, e.g. 90)
# Stage limits in seconds: GPU_CHECK_BUILD_S (300), GPU_CHECK_TESTS_S (120), GPU_CHECK_BENCH_S (120);
# the benchmark's models are generated and quantized beside the tests (GPU_CHECK_MODELS_S, 180).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
dry_run=0 out="$root/build/gpu-check/results" wheelhouse="" arch=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out="$2"; shift ;;
        --wheelhouse) wheelhouse="$2"; shift ;;
        --arch) arch="$2"; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
build_s=${GPU_CHECK_BUILD_S:-300} tests_s=${GPU_CHECK_TESTS_S:-120} bench_s=${GPU_CHECK_BENCH_S:-120}
models_s=${GPU_CHECK_MODELS_S:-180}
work="$root/build/gpu-check"
start=$(date +%s)
problems=0
say() { echo "gpu_check [$(( $(date +%s) - start ))s] $*"; }
problem() { say "PROBLEM: $*"; problems=$(( problems + 1 )); }

# -- inputs ------------------------------------------------------------------------------
gpu="" memory_mib=""
if command -v nvidia-smi >/dev/null 2>&1 && query=$(nvidia-smi --query-gpu=name,compute_cap,memory.total \
        --format=csv,noheader,nounits 2>/dev/null | head -1) && [ -n "$query" ]; then
    gpu=$(echo "$query" | cut -d, -f1 | sed 's/^ *//')
    found_arch=$(echo "$query" | cut -d, -f2 | tr -d ' .')
    memory_mib=$(echo "$query" | cut -d, -f3 | tr -d ' ')
    arch=${arch:-$found_arch}
    say "GPU: $gpu, compute capability ${found_arch}, ${memory_mib} MiB"
else
    problem "no NVIDIA GPU answers here (nvidia-smi missing or silent)"
fi
arch=${arch:-90}
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
if [ -n "$nvcc" ]; then
    say "CUDA toolkit: $("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') ($nvcc)"
else
    problem "no nvcc (CUDA toolkit) on PATH or in /usr/local/cuda/bin"
fi
cores=$(nproc)
[ "$cores" -ge 16 ] || say "note: $cores cores; the 10-minute plan assumes 16 (the build will take longer)"
python=$(command -v python3 || true)
if [ -z "$python" ] || ! "$python" -c 'import sys, venv; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
    problem "python3 >= 3.9 with venv is needed"
else
    say "Python: $("$python" --version 2>&1)"
fi
if [ -f vendor/llama.cpp/include/llama.h ]; then
    say "llama.cpp source: the provisioned tree in vendor/llama.cpp"
elif ls "${PYLLAMA_MTP_CACHE:-$HOME/.cache/pyllama_mtp}"/sdist/*.tar.gz >/dev/null 2>&1; then
    say "llama.cpp source: the cached pinned sdist"
elif [ -n "$wheelhouse" ] && ls "$wheelhouse"/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    say "llama.cpp source: the pinned sdist in the wheelhouse"
else
    say "llama.cpp source: the pinned sdist from the package index, at build time (needs the index)"
fi
if [ -n "$wheelhouse" ]; then
    if ls "$wheelhouse"/*.whl >/dev/null 2>&1; then
        say "Python packages: $(ls "$wheelhouse"/*.whl | wc -l) wheels in $wheelhouse, no index"
    else
        problem "--wheelhouse $wheelhouse holds no wheels"
    fi
else
    say "Python packages: from the package index"
fi
mkdir -p "$work"
free_gib=$(df -Pk "$work" | awk 'NR == 2 { print int($4 / 1048576) }')
[ "$free_gib" -ge 14 ] || problem "$free_gib GiB free under $work; models and build need about 14"
for script in benchmarks/mtp_bench.py benchmarks/measure.py; do
    "$python" -m py_compile "$script" 2>/dev/null || problem "$script does not compile"
done
unset PYLLAMA_MTP_TEST_BACKEND
bench_args=(--size 1b --ftype f32,q8_0,q4_k_m --device CUDA --threads 8 --tokens 128 --repeats 2 --drafts 2,3
            --no-memory)

cat <<PLAN
gpu_check: plan (results in $out)
  1. build    (<= ${build_s} s): new venv in $work/venv; pip install ".[test]" with
              CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch -DPYLLAMA_MTP_NATIVE_TOOLS=ON",
              build folder $work/cmake, $cores parallel jobs${wheelhouse:+, packages from $wheelhouse only}
  2. tests    (<= ${tests_s} s): PYLLAMA_MTP_TEST_BACKEND=cuda pytest (every model offloaded to the GPU);
              beside them (<= ${models_s} s from the start of this stage) the benchmark's models are
              generated and quantized on the CPU (mtp_bench.py --prepare)
  3. bench    (<= ${bench_s} s): benchmarks/mtp_bench.py --size 1b --ftype f32,q8_0,q4_k_m --device CUDA
              (ours vs llama-completion / llama-speculative-simple, plain vs MTP n_draft 2 and 3)
  4. report: gpu_check.json and gpu_check.md (GPU, stage times, test counts, the benchmark table)
PLAN
if [ "$dry_run" -eq 1 ]; then
    # The benchmark's own reading of its arguments, where the package is installed here.
    if "$python" -c "import pyllama_mtp" 2>/dev/null; then
        "$python" benchmarks/mtp_bench.py "${bench_args[@]}" --plan || problem "mtp_bench.py rejects its arguments"
    else
        say "pyllama_mtp is not installed here: the benchmark's arguments are checked at run time"
    fi
    if [ "$problems" -gt 0 ]; then
        say "dry run: $problems input problem(s) above; a real run here would stop at them"
    else
        say "dry run: inputs look complete"
    fi
    exit 0
fi
[ "$problems" -eq 0 ] || { say "stopping: $problems input problem(s)"; exit 2; }

# -- 1. build ----------------------------------------------------------------------------
mkdir -p "$out"
stage_start=$(date +%s)
"$python" -m venv "$work/venv" && source "$work/venv/bin/activate" || { say "venv failed"; exit 3; }
pip_args=(--quiet)
[ -z "$wheelhouse" ] || pip_args+=(--no-index --find-links "$wheelhouse")
export CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch -DPYLLAMA_MTP_NATIVE_TOOLS=ON"
export CMAKE_BUILD_PARALLEL_LEVEL=$cores
say "1. build: started"
timeout "$build_s" pip install "${pip_args[@]}" ".[test]" -C build-dir="$work/cmake" -C build.verbose=false \
    > "$out/build.log" 2>&1
build_rc=$?
build_wall=$(( $(date +%s) - stage_start ))
say "1. build: exit $build_rc in ${build_wall} s (log: build.log)"
[ "$build_rc" -eq 0 ] || { tail -30 "$out/build.log"; exit 3; }
python -c "import pyllama_mtp as p; d=[x.name for x in p.devices()]; print('devices:', d); assert any(n.startswith('CUDA') for n in d)" \
    || { say "the build sees no CUDA device"; exit 3; }

# -- 2. tests (and the benchmark's models, on the CPU beside them) -------------------------
stage_start=$(date +%s)
PYTHONUNBUFFERED=1 timeout "$models_s" python benchmarks/mtp_bench.py "${bench_args[@]}" --prepare \
    > "$out/models.log" 2>&1 &
models_pid=$!
say "2. tests: started (models being made beside them, log: models.log)"
PYLLAMA_MTP_TEST_BACKEND=cuda timeout "$tests_s" python -m pytest -q -p no:cacheprovider \
    --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1
tests_rc=$?
tests_wall=$(( $(date +%s) - stage_start ))
tests_line=$(grep -E '(passed|failed|error).* in [0-9.]+s' "$out/tests.log" | tail -1 | tr -d '=')
say "2. tests: exit $tests_rc in ${tests_wall} s: ${tests_line:-no summary (stopped at the limit?)}"
grep -E '^(FAILED|ERROR)' "$out/tests.log" | head -20
wait "$models_pid"
models_rc=$?
say "models: exit $models_rc after $(( $(date +%s) - stage_start )) s: $(grep 'model ready' "$out/models.log" | tr '\n' ' ')"

# -- 3. benchmark ------------------------------------------------------------------------
stage_start=$(date +%s)
say "3. bench: started"
PYLLAMA_MTP_TOOLS_DIR="$work/cmake/bin" PYTHONUNBUFFERED=1 timeout "$bench_s" python benchmarks/mtp_bench.py \
    "${bench_args[@]}" --out "$out" 2>&1 | tee "$out/bench.log" | grep -E '^(rep|model|quantizing|==)' 
bench_rc=${PIPESTATUS[0]}
bench_wall=$(( $(date +%s) - stage_start ))
say "3. bench: exit $bench_rc in ${bench_wall} s"

# -- 4. report ---------------------------------------------------------------------------
GPU="$gpu" ARCH="$arch" MEM="$memory_mib" BUILD="$build_rc $build_wall" TESTS="$tests_rc $tests_wall" \
TESTS_LINE="$tests_line" BENCH="$bench_rc $bench_wall" OUT="$out" python - <<'REPORT'
import json, os, pathlib
out = pathlib.Path(os.environ["OUT"])
stage = lambda name: dict(zip(("exit", "wall_s"), map(int, os.environ[name].split())))
bench = out / "latest.json"
report = {"gpu": os.environ["GPU"], "cuda_arch": os.environ["ARCH"], "gpu_memory_mib": os.environ["MEM"],
          "build": stage("BUILD"), "tests": {**stage("TESTS"), "summary": os.environ["TESTS_LINE"]},
          "bench": {**stage("BENCH"), "results": json.loads(bench.read_text()) if bench.exists() else None}}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
lines = [f"# GPU check: {report['gpu']} (sm_{report['cuda_arch']})", "",
         f"- build: exit {report['build']['exit']}, {report['build']['wall_s']} s",
         f"- tests (CUDA backend): exit {report['tests']['exit']}, {report['tests']['wall_s']} s: "
         f"{report['tests']['summary'] or 'no summary'}",
         f"- bench: exit {report['bench']['exit']}, {report['bench']['wall_s']} s", ""]
table = out / "latest.md"
lines.append(table.read_text() if table.exists() else "(no benchmark table)")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
REPORT
say "done in $(( $(date +%s) - start )) s: $out/gpu_check.json, $out/gpu_check.md"
[ "$build_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
