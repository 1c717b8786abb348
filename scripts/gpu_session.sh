#!/usr/bin/env bash
# The GPU session in one command: scripts/first_light.py (build _C for sm_90, check, the test suite, decode, kernel and
# end-to-end benchmarks, compute-sanitizer), each step under its own deadline from one global budget.
#
#   bash scripts/gpu_session.sh [OUT] [BUDGET_SECONDS]      # default OUT: benchmarks/results/<date>-<gpu>
#
# Extra arguments after those two go to first_light.py (e.g. --steps, --caps). See docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia ', '').replace(' ', '-'))" \
      2>/dev/null || echo "no-gpu")
if [ "$gpu" = no-gpu ]; then
    echo "gpu_session: no CUDA device visible to torch; for the CPU rehearsal run: $PY scripts/first_light.py --cpu --out DIR" >&2
    exit 1
fi
OUT_DIR="${1:-${OUT:-benchmarks/results/$(date -u +%Y-%m-%d)-${gpu}}}"
BUDGET="${2:-540}"
shift $(( $# > 2 ? 2 : $# ))
exec "$PY" scripts/first_light.py --out "$OUT_DIR" --budget "$BUDGET" "$@"
