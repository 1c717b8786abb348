#!/usr/bin/env bash
# Build and link the real CUDA extension bark_kernels._C against a CUDA build of torch, import it, and check what can be
# checked without a GPU: the .so loads (every symbol resolved: Python dlopens with RTLD_NOW), the TORCH_LIBRARY
# registration runs, the op schemas equal the m.def(...) strings of csrc/bindings.cpp, the fake (meta)
# implementations give the right shapes on CUDA fake tensors, torch.export functionalizes the in-place cache append,
# and the cuda backend reports "no CUDA device" (not an import error). Then the on-demand (JIT) build of the same sources.
#
#   .ci/build_cuda_extension.sh                  # venv $VENV (created if missing), torch $TORCH_VERSION
#   VENV=/path TORCH_VERSION=2.14.1 ARCHS="80;90" JIT=0 KEEP=1 .ci/build_cuda_extension.sh
#   INSTALL_FAIL_OK=1: a torch that cannot be installed (no wheel, no disk) is a SKIP, not a failure (CI uses this)
#
# Costs: a ~5.5 GB venv the first time (torch + nvidia-* wheels, from the machine's package index), then about a minute
# per run on 2 cores. The repository and its .venv are never written to: the build runs in a temporary copy of the
# working tree (tracked and untracked-but-not-ignored files) and installs with `pip install --target` into that copy.
# Exit status: 0 when everything passed, 1 on any failure; SKIP (exit 0) without nvcc.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-${TMPDIR:-/tmp}/cudatorch}"
TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
ARCHS="${ARCHS:-80;90}"
JIT_ARCHS="${JIT_ARCHS:-80}"
JIT="${JIT:-1}"
KEEP="${KEEP:-0}"

log() { echo "build_cuda_extension: $*"; }
now() { date +%s; }
t_start=$(now)

if ! command -v nvcc >/dev/null 2>&1 && [[ -z "${CUDA_HOME:-}" ]]; then
  log "SKIP: nvcc not found (put the CUDA toolkit on PATH or set CUDA_HOME); the extension build is NOT checked"
  exit 0
fi

# 1. a venv with a CUDA torch
t0=$(now)
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV ($PYTHON -m venv)"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  log "installing torch==$TORCH_VERSION into $VENV (several GB the first time)"
  if ! "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" numpy setuptools wheel ninja \
      >"$VENV/install-torch.log" 2>&1; then
    tail -n 30 "$VENV/install-torch.log"
    if [[ "${INSTALL_FAIL_OK:-0}" == 1 ]]; then
      log "SKIP: pip could not install torch==$TORCH_VERSION into $VENV; the extension build is NOT checked"
      exit 0
    fi
    log "FAIL: pip could not install torch==$TORCH_VERSION into $VENV (log: $VENV/install-torch.log)"
    exit 1
  fi
fi
"$VENV/bin/python" -m pip install -q setuptools wheel ninja >/dev/null 2>&1 || true
# An installed bark-kernels (an editable one maps bark_kernels._C to its own tree) would shadow the copy under test.
if "$VENV/bin/python" -m pip show -q bark-kernels >/dev/null 2>&1; then
  log "uninstalling bark-kernels from $VENV (it would shadow the build under test)"
  "$VENV/bin/python" -m pip uninstall -q -y bark-kernels
fi
TORCH_DESC="$("$VENV/bin/python" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
if [[ "$TORCH_DESC" == *"cuda None" ]]; then
  log "FAIL: torch in $VENV has no CUDA ($TORCH_DESC): install a CUDA build (TORCH_VERSION=$TORCH_VERSION)"
  exit 1
fi
log "venv ready in $(( $(now) - t0 )) s: torch $TORCH_DESC; $(nvcc --version 2>/dev/null | tail -n 1)"

# 2. a temporary copy of the working tree
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bark-cuda-build.XXXXXX")"
if [[ "$KEEP" == 1 ]]; then log "keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  # tracked files deleted in the working tree (someone's edit in progress) are skipped, as the build would see them
  (cd "$ROOT" && git ls-files -z -co --exclude-standard \
     | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
     | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
  (cd "$ROOT" && tar --exclude=.venv --exclude=.git --exclude=build --exclude='*.so' -cf - .) | tar -xf - -C "$WORK/src"
fi

# 3. the build, as a user runs it (PEP 517 through pip, no build isolation), into $WORK/site; ptxas -v in the log
t0=$(now)
log "building bark_kernels._C for archs $ARCHS (log: $WORK/build.log)"
if ! (cd "$WORK/src" && BARK_KERNELS_CUDA_ARCHS="$ARCHS" NVCC_APPEND_FLAGS="-Xptxas -v ${NVCC_APPEND_FLAGS:-}" \
      "$VENV/bin/python" -m pip install --no-build-isolation --no-deps --no-cache-dir -v --target "$WORK/site" . \
      >"$WORK/build.log" 2>&1); then
  grep -E "error|Error|FAILED" "$WORK/build.log" | head -n 40 || true
  log "FAIL: the extension did not build (last lines of the log follow)"
  tail -n 40 "$WORK/build.log"
  exit 1
fi
build_s=$(( $(now) - t0 ))
so="$(ls "$WORK"/site/bark_kernels/_C*.so 2>/dev/null || true)"
if [[ -z "$so" ]]; then
  log "FAIL: pip succeeded but bark_kernels/_C*.so is missing (setup.py skipped the extension?):"
  grep "bark_kernels:" "$WORK/build.log" || true
  exit 1
fi
grep -m1 "bark_kernels: building" "$WORK/build.log" | sed 's/^ *//'
kernels=$(grep -c "Compiling entry function" "$WORK/build.log" || true)
max_regs=$(grep -oE "Used [0-9]+ registers" "$WORK/build.log" | awk '{print $2}' | sort -n | tail -n 1)
max_smem=$(grep -oE "[0-9]+ bytes smem" "$WORK/build.log" | awk '{print $1}' | sort -n | tail -n 1)
spills=$(grep -cE "[1-9][0-9]* bytes spill (stores|loads)" "$WORK/build.log" || true)
# compiler diagnostics only (g++ "file:line:col: warning:", nvcc/cudafe "file(line): warning #N"), not setuptools notes
warn_re='(:[0-9]+:[0-9]+: warning|\([0-9]+\): warning|warning #[0-9]+)'
warnings=$(grep -cE "$warn_re" "$WORK/build.log" || true)
log "built in ${build_s} s: $(du -h "$so" | cut -f1) $(basename "$so"); ptxas: $kernels kernel entries," \
    "max ${max_regs:-?} registers, max ${max_smem:-0} bytes static smem, $spills with spills; $warnings compiler warnings"
if (( warnings > 0 )); then
  log "WARNING: compiler warnings:"; grep -E "$warn_re" "$WORK/build.log" | head -n 30
fi
if (( spills > 0 )); then
  log "WARNING: register spills:"; grep -B2 -E "[1-9][0-9]* bytes spill" "$WORK/build.log" | head -n 30
fi

# 4. load it and check the registration (no GPU needed)
t0=$(now)
(cd "$WORK" && PYTHONPATH="$WORK/site" "$VENV/bin/python" - "$WORK/src/csrc/bindings.cpp" "$WORK/site") <<'EOF'
import re
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

bindings, site = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
import bark_kernels._C as ext  # RTLD_NOW: an unresolved symbol fails here

assert Path(ext.__file__).resolve().is_relative_to(site), ext.__file__
from bark_kernels.backends import cuda

expected = {}
for call in re.findall(r"m\.def\((.*?)\);", bindings.read_text(), flags=re.S):
    schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call))
    expected[schema.split("(", 1)[0]] = f"bark_kernels_cuda::{schema}"
assert set(expected) == set(cuda.FAKES) == set(cuda.OPS), (sorted(expected), sorted(cuda.FAKES))
ops = torch.ops.bark_kernels_cuda
for name, schema in expected.items():
    got = str(getattr(ops, name).default._schema)
    assert got == schema, f"{name}: registered {got!r}, bindings.cpp says {schema!r}"
print(f"  schemas: {len(expected)} ops registered by the extension, equal to csrc/bindings.cpp")

reason = cuda.availability()  # loads the extension through the backend and registers the fakes
if torch.cuda.is_available():
    assert reason is None, reason
    print("  availability: available (a GPU is present: run tests/test_cuda_backend.py for the kernels themselves)")
else:
    assert reason == "no CUDA device (torch.cuda.is_available() is False)", reason
    print(f"  availability: {reason}")

with FakeTensorMode():
    dev = "cuda"
    q = torch.empty(2, 5, 3, 64, dtype=torch.float16, device=dev)  # (B, Sq, H, D)
    k = torch.empty(2, 9, 3, 64, dtype=torch.float16, device=dev)  # (B, Sk, H, D)
    out = ops.attention(q, k, k, True, 0.125)
    assert out.shape == q.shape and out.device.type == "cuda" and out.dtype == q.dtype
    packed_q = torch.empty(11, 3, 64, dtype=torch.bfloat16, device=dev)  # (total_q, H, D)
    packed_k = torch.empty(13, 3, 64, dtype=torch.bfloat16, device=dev)  # (total_k, H, D)
    cu = torch.zeros(3, dtype=torch.int32, device=dev)
    out = ops.attention_varlen(packed_q, packed_k, packed_k, cu, cu, 7, 8, False, 0.125)
    assert out.shape == (11, 3, 64) and out.dtype == torch.bfloat16
    cache = torch.empty(2, 32, 3, 64, dtype=torch.float16, device=dev)  # (B, S_max, H, D)
    lens = torch.zeros(2, dtype=torch.int32, device=dev)
    assert ops.attention_with_kvcache(q, cache, cache.clone(), q, q, lens, True, 0.125).shape == q.shape
    assert ops.attention_with_kvcache(q, cache, cache.clone(), None, None, lens, True, 0.125).shape == q.shape
    x, idx = torch.empty(10, 6, device=dev), torch.empty(4, dtype=torch.int64, device=dev)
    assert ops.gather_rows(x, idx).shape == (4, 6)
    assert ops.scatter_rows(x[:4], idx, 10).shape == (10, 6)
print("  fakes: output shapes, dtypes and devices right for all 5 ops on CUDA fake tensors")


class DecodeStep(torch.nn.Module):
    def forward(self, q, k_cache, v_cache, k_new, v_new, cache_seqlens):
        out = ops.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens, True, 0.25)
        return ops.attention(q, k_cache, v_cache, False, 0.25) + out


with FakeTensorMode():
    q = torch.empty(2, 1, 2, 64, dtype=torch.float16, device="cuda")  # (B, 1, H, D)
    k_cache = torch.empty(2, 16, 2, 64, dtype=torch.float16, device="cuda")  # (B, S_max, H, D)
    args = (q, k_cache, torch.empty_like(k_cache), q.clone(), q.clone(), torch.zeros(2, dtype=torch.int32, device="cuda"))
exported = torch.export.export(DecodeStep(), args).run_decompositions()
mutated = exported.graph_signature.user_inputs_to_mutate
assert sorted(mutated.values()) == ["k_cache", "v_cache"], mutated
code = exported.graph_module.code
assert "auto_functionalized" in code and "bark_kernels_cuda.attention.default" in code, code
print("  export: decode step functionalized (auto_functionalized), k_cache and v_cache kept as mutated inputs")
EOF
log "import and registration checks passed in $(( $(now) - t0 )) s"

# 5. the on-demand build (bark_kernels._jit.build_cuda_extension) from the source tree, in a fresh process
if [[ "$JIT" == 1 ]]; then
  t0=$(now)
  (cd "$WORK" && PYTHONPATH="$WORK/src" TORCH_EXTENSIONS_DIR="$WORK/jit" BARK_KERNELS_CUDA_JIT=1 \
     BARK_KERNELS_CUDA_ARCHS="$JIT_ARCHS" "$VENV/bin/python" - "$WORK/src") >"$WORK/jit.log" 2>&1 <<'EOF' || { tail -n 40 "$WORK/jit.log"; log "FAIL: JIT build"; exit 1; }
import sys
from pathlib import Path

import torch

import importlib.util
import os

import bark_kernels
from bark_kernels import _jit
from bark_kernels.backends import cuda

assert Path(bark_kernels.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), bark_kernels.__file__
assert importlib.util.find_spec("bark_kernels._C") is None, "bark_kernels._C is importable: the JIT would not run"
reason = cuda.availability()  # BARK_KERNELS_CUDA_JIT=1: builds csrc/ now, loads it with torch.ops.load_library
assert reason is None or reason.startswith("no CUDA device"), reason
built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / _jit.JIT_NAME / f"{_jit.JIT_NAME}.so"
loaded = {Path(p).resolve() for p in torch.ops.loaded_libraries}
assert built.exists() and built.resolve() in loaded, (built, sorted(map(str, loaded)))
assert str(torch.ops.bark_kernels_cuda.attention.default._schema).startswith("bark_kernels_cuda::attention(")
print("JIT OK:", built, reason)
EOF
  log "JIT build (sm_$JIT_ARCHS) and load passed in $(( $(now) - t0 )) s"
fi

log "OK in $(( $(now) - t_start )) s (torch $TORCH_DESC, archs $ARCHS)"
