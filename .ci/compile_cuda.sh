#!/usr/bin/env bash
# Compile-check every CUDA kernel file in csrc/ with nvcc for sm_80 and sm_90a (the flags of the real build), print
# ptxas register / spill / shared-memory use per kernel, then syntax-check the torch binding (csrc/bindings.cpp)
# against the installed torch headers when that is possible. Any compile error exits non-zero.
#
#   .ci/compile_cuda.sh            # all .cu files, sm_80 and sm_90a
#   ARCHS="80" .ci/compile_cuda.sh # other architectures
#   JOBS=4 .ci/compile_cuda.sh     # parallel nvcc processes (default: number of cores, at most 4)
#   CSRC_DIR=path .ci/compile_cuda.sh  # another source folder (the tests use it to check that errors fail)
#
# Without nvcc it prints "SKIP" and exits 0 (the kernels cannot be checked on that machine).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NVCC="${NVCC:-nvcc}"
ARCHS="${ARCHS:-80 90a}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
(( JOBS > 4 )) && JOBS=4
CSRC="${CSRC_DIR:-csrc}"
FLAGS=(-std=c++17 -O3 --use_fast_math -lineinfo -Xptxas -v -I"$CSRC")

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_cuda: SKIP: nvcc not found (set NVCC or put the CUDA toolkit on PATH); CUDA kernels NOT checked"
  exit 0
fi
echo "compile_cuda: $("$NVCC" --version | tail -n 1); archs: $ARCHS; jobs: $JOBS"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

shopt -s nullglob
sources=("$CSRC"/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "compile_cuda: FAIL: no .cu files in $CSRC/"
  exit 1
fi

# One job per (file, arch); each writes its log and exit status, so parallel output never interleaves.
jobs_list="$WORK/jobs"
: >"$jobs_list"
for src in "${sources[@]}"; do
  for arch in $ARCHS; do
    echo "$src $arch" >>"$jobs_list"
  done
done
FIRST_ARCH="${ARCHS%% *}"
export NVCC WORK FIRST_ARCH
export FLAGS_STR="${FLAGS[*]}"
compile_one() {
  local src="$1" arch="$2"
  local tag
  tag="$(basename "$src" .cu).sm_$arch"
  # The first arch compiles host and device code (-c); the others only device code (-cubin), about half the time.
  local mode=(-c -o "$WORK/$tag.o")
  [[ "$arch" != "$FIRST_ARCH" ]] && mode=(-cubin -o "$WORK/$tag.cubin")
  # shellcheck disable=SC2086
  if "$NVCC" $FLAGS_STR -arch="sm_$arch" "${mode[@]}" "$src" >"$WORK/$tag.log" 2>&1; then
    echo 0 >"$WORK/$tag.rc"
  else
    echo 1 >"$WORK/$tag.rc"
  fi
}
export -f compile_one
xargs -P "$JOBS" -L 1 bash -c 'compile_one "$0" "$1"' <"$jobs_list"

failed=0
spilling=0
while read -r src arch; do
  tag="$(basename "$src" .cu).sm_$arch"
  echo "=== $src  sm_$arch"
  # ptxas -v: a 'Compiling entry function' line, then spills, then registers / smem. Demangle the kernel names.
  if command -v c++filt >/dev/null 2>&1; then
    sed -E 's/^ptxas info\s*: //' "$WORK/$tag.log" | c++filt
  else
    cat "$WORK/$tag.log"
  fi
  if [[ "$(cat "$WORK/$tag.rc")" != 0 ]]; then
    echo "compile_cuda: FAIL: $src for sm_$arch"
    failed=1
  fi
  if grep -Eq "[1-9][0-9]* bytes spill (stores|loads)" "$WORK/$tag.log"; then
    echo "compile_cuda: WARNING: register spills in $src for sm_$arch (see above)"
    spilling=1
  fi
done <"$jobs_list"

# The binding needs torch's CUDA headers; a CPU-only torch ships them but lacks one generated header
# (c10/cuda/impl/cuda_cmake_macros.h), which an empty stand-in replaces for this syntax-only check.
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON="$(command -v python3 || command -v python || true)"; fi
fi
if [[ "${SKIP_BINDING_CHECK:-0}" != 1 && -f "$CSRC/bindings.cpp" && -n "$PYTHON" ]] && "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  CXX="${CXX:-c++}"
  TORCH_INC="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))')"
  PY_INC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  CUDA_INC=""
  for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" /usr/local/cuda; do
    if [[ -n "$d" && -f "$d/include/cuda_runtime.h" ]]; then CUDA_INC="$d/include"; break; fi
  done
  mkdir -p "$WORK/stub/c10/cuda/impl"
  : >"$WORK/stub/c10/cuda/impl/cuda_cmake_macros.h"
  isys=()
  for d in $TORCH_INC "$PY_INC" "$CUDA_INC"; do isys+=(-isystem "$d"); done
  echo "=== $CSRC/bindings.cpp  syntax check ($CXX, torch headers)"
  if "$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -Werror "${isys[@]}" -isystem "$WORK/stub" -I"$CSRC" \
      -DTORCH_EXTENSION_NAME=_C "$CSRC/bindings.cpp"; then
    echo "bindings.cpp: OK"
  else
    echo "compile_cuda: FAIL: $CSRC/bindings.cpp does not compile against torch headers"
    failed=1
  fi
else
  echo "compile_cuda: binding syntax check skipped (torch not importable or SKIP_BINDING_CHECK=1)"
fi

echo "compile_cuda: ${#sources[@]} kernel files x archs [$ARCHS] in $(( $(date +%s) - start )) s;" \
     "$([[ $failed == 0 ]] && echo OK || echo FAILED)$([[ $spilling == 1 ]] && echo ', with register spills' || true)"
exit "$failed"
