#!/usr/bin/env bash
# Everything a GPU session should do, in stages that each fit a 10-minute command:
#
#   bash scripts/gpu_session.sh build      # build the CUDA extension (pip install -e), `bark-kernels check`
#   bash scripts/gpu_session.sh test       # the test suite on the GPU (the gpu-marked tests run; slow ones do not)
#   bash scripts/gpu_session.sh sanitize   # compute-sanitizer memcheck + racecheck over the cuda and triton backends
#   bash scripts/gpu_session.sh bench      # the benchmark suite in GPU mode (< 8 minutes on an H100)
#
# Results go to $OUT (default benchmarks/results/<date>-<gpu name>/): logs, JUnit XML, sanitizer reports, and the
# benchmark JSON/markdown/plots. Commit that folder. Assumes torch with CUDA, triton and transformers are installed
# (the project's GPU machine has them; install there with --no-build-isolation --no-deps, as below).
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-test}"
case "$stage" in build|test|sanitize|bench) ;; *) echo "usage: bash scripts/gpu_session.sh {build|test|sanitize|bench}" >&2; exit 2;; esac
PY="${PYTHON:-python}"
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia ', '').replace(' ', '-'))" \
      2>/dev/null || echo "no-gpu")
if [ "$gpu" = no-gpu ]; then echo "gpu_session: no CUDA device visible to torch: nothing to do here" >&2; exit 1; fi
OUT="${OUT:-benchmarks/results/$(date -u +%Y-%m-%d)-${gpu}}"
mkdir -p "$OUT"
status=0
step() { echo; echo "== $*"; }
run() {  # run NAME TIMEOUT CMD...: log to $OUT/NAME.log, remember a failure, keep going
    local name=$1 limit=$2; shift 2
    step "$name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

case "$stage" in
build)
    {
        echo "gpu session $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null)"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
        "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
    } | tee "$OUT/summary.txt"
    run install 360 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    run check 200 bark-kernels check
    ;;
test)
    run pytest 560 "$PY" -m pytest -q -rs --junitxml "$OUT/pytest.xml"
    ;;
sanitize)
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ -n "$sanitizer" ]; then
        # small, GPU-only subsets: the sanitizer slows kernels down 10-100x
        run memcheck 300 "$sanitizer" --tool memcheck --leak-check no --error-exitcode 1 \
            "$PY" -m pytest -q -x -m gpu tests/test_cuda_backend.py tests/test_triton_backend.py -k "not graph and not compile"
        run racecheck 270 "$sanitizer" --tool racecheck --error-exitcode 1 \
            "$PY" -m pytest -q -x -m gpu tests/test_cuda_backend.py -k "(kvcache or attention) and not graph and not compile"
    else
        echo "== sanitizer: compute-sanitizer not found: NOT run" | tee -a "$OUT/summary.txt"
        status=1
    fi
    ;;
bench)
    run bench 570 "$PY" -m benchmarks --out "$OUT" --mode gpu
    ;;
esac
echo; cat "$OUT/summary.txt"
exit "$status"
