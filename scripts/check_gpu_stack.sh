#!/usr/bin/env bash
# The test suite under the GPU machine's exact software stack, on any machine (CPU included: there the Triton kernels
# run under the interpreter, as in CI). Catches what a version difference breaks before a GPU session is spent on it.
#
#   bash scripts/check_gpu_stack.sh                 # the default suite (pytest's own arguments can follow)
#   bash scripts/check_gpu_stack.sh -m slow         # the slow tests
#
# Stack (the project's GPU machine, an H200): Python 3.12, torch 2.11.0 (the cu130 build: it also runs on a CPU),
# triton 3.6.0, transformers 5.17.0, numpy 2.5.2, plus the test tools. The project is installed the way the GPU
# machine installs it, `pip install --no-build-isolation --no-deps -e .`, which builds the CUDA extension
# bark_kernels._C wherever nvcc is found (BARK_KERNELS_SKIP_CUDA_BUILD=1 skips it).
#   PYTHON   the Python 3.12 interpreter (default: python3.12 on PATH, else the newest 3.12 under pyenv)
#   VENV     the environment, created or reused (default: .venv-gpu-stack)
#   INSTALL_FAIL_OK=1  a stack pip cannot install (no index, no disk) is a loud SKIP, not a failure (CI uses this)
# A reused environment is only reinstalled when a pin is off or what the install builds from changed (setup.py,
# pyproject.toml, csrc/, bark_kernels/_jit.py). Measured on a 2-core CPU machine: first run ~7 min (~2.5 min installing
# ~5 GB, mostly torch's CUDA libraries, ~1.7 min building the extension, ~2.7 min of tests), later runs ~2.5 min.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-gpu-stack}"
STACK=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 numpy==2.5.2)
TOOLS=(pytest pytest-xdist pytest-timeout pytest-benchmark ml_dtypes matplotlib tqdm safetensors tokenizers
       "setuptools>=64" wheel)
started=$(date +%s)

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

find_python() {  # $PYTHON, else the first Python 3.12 that runs: python3.12 on PATH, pyenv's 3.12.x, python3
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    local root candidate
    root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    # (a pyenv shim named python3.12 exists even when no 3.12 is selected: each candidate is run, not just found)
    for candidate in "$(command -v python3.12 || true)" \
                     $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV) \
                     "$(command -v python3 || true)"; do
        if [ -n "$candidate" ] && is_312 "$candidate"; then echo "$candidate"; return; fi
    done
    echo "check_gpu_stack: no Python 3.12 found (set PYTHON=/path/to/python3.12)" >&2
    return 2
}

if [ ! -x "$VENV/bin/python" ]; then
    PYTHON_312="$(find_python)" || exit 2
    is_312 "$PYTHON_312" || { echo "check_gpu_stack: $PYTHON_312 is not a working Python 3.12" >&2; exit 2; }
    echo "== creating $VENV with $PYTHON_312"
    "$PYTHON_312" -m venv "$VENV"
fi
PY="$VENV/bin/python"
is_312 "$PY" || { echo "check_gpu_stack: $VENV is not a Python 3.12 environment (remove it, or set VENV)" >&2; exit 2; }

# the pins: installed only when one is missing or off
if ! "$PY" - "${STACK[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if have.split("+")[0] != want:
        sys.exit(1)
EOF
then
    echo "== installing ${STACK[*]} and the test tools (~5 GB installed)"
    if ! "$PY" -m pip install --quiet "${STACK[@]}" "${TOOLS[@]}"; then
        if [ "${INSTALL_FAIL_OK:-0}" = 1 ]; then
            echo "check_gpu_stack: SKIP: pip could not install the GPU machine's stack; the suite was NOT run under it"
            exit 0
        fi
        echo "check_gpu_stack: FAIL: pip could not install ${STACK[*]}" >&2
        exit 1
    fi
fi

# the project, as the GPU machine installs it; again only when its build inputs changed
stamp="$VENV/.bark-kernels-install"
inputs="$( { echo "$PWD ${BARK_KERNELS_SKIP_CUDA_BUILD:-} ${BARK_KERNELS_CUDA_ARCHS:-}";
             find setup.py pyproject.toml bark_kernels/_jit.py csrc -maxdepth 1 -type f | sort | xargs cat; } \
           | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ] || ! "$PY" -c "import bark_kernels" 2>/dev/null; then
    echo "== pip install --no-build-isolation --no-deps -e .  (builds bark_kernels._C where nvcc is found)"
    install_start=$(date +%s)
    "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
    echo "== installed in $(( $(date +%s) - install_start )) s"
    echo "$inputs" > "$stamp"
fi
ready=$(date +%s)

stack="$("$PY" - <<'EOF'
import platform

import numpy
import torch
import transformers
import triton

try:
    import bark_kernels._C  # noqa: F401
    ext = "built"
except ImportError:
    ext = "not built"
cuda = f"CUDA device: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else \
    "no CUDA device: Triton runs under its interpreter"
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"triton {triton.__version__} | transformers {transformers.__version__} | numpy {numpy.__version__} | "
      f"bark_kernels._C {ext} | {cuda}")
EOF
)"
echo "== stack: $stack"
set +e
"$PY" -m pytest -q -rs "$@"
rc=$?
set -e
now=$(date +%s)
echo "== stack: $stack"
echo "== check_gpu_stack: pytest exit $rc; set-up $(( ready - started )) s, tests $(( now - ready )) s"
exit "$rc"
