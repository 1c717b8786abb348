"""The CUDA kernels of csrc/, executed on the CPU: csrc/emulation/ compiles the real kernel sources with the host
compiler, one OS thread per CUDA thread, real barriers for __syncthreads and warp collectives, and the warp-level PTX
instructions (mma.sync m16n8k16, ldmatrix.x4.trans) emulated from the PTX ISA's fragment layouts. Outputs are
compared with the float64 reference under the shared tolerance table, like the GPU parity suite.

What this checks without a GPU: the kernels' index math (tiles, fragments, P re-packing, masks, tails, strides,
varlen offsets, split-K ranges and combine, the cache append), barrier placement (divergent __syncthreads fail), the
alignment of vector loads, and (with the AddressSanitizer build, -m slow) out-of-bounds global accesses.
What it cannot check: the hardware itself (whether the PTX layouts used by emu.h are the hardware's, timing,
races between threads that the emulator happens to order, real shared-memory banking).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

import bark_kernels as bk
from bark_kernels.testing import (
    assert_close_to_reference,
    reference_attention,
    reference_attention_varlen,
    reference_attention_with_kvcache,
)

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}
KERNEL_FILES = ("flash_fwd", "kvcache", "rows")
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(([^;]*)\);", re.S)

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++) to build the emulation harness")


def _build(out_dir: Path, sanitize: bool) -> Path:
    """Compile the harness (kernel launches rewritten to emu::launch); cached by the sources' hash."""
    sources = {name: (CSRC / f"{name}.cu").read_text() for name in KERNEL_FILES}
    deps = [CSRC / "common.cuh", CSRC / "bark_kernels.h", *sorted((CSRC / "emulation").iterdir())]
    digest = hashlib.sha256()
    for text in list(sources.values()) + [p.read_bytes().decode() for p in deps]:
        digest.update(text.encode())
    digest.update(b"asan" if sanitize else b"plain")
    exe = out_dir / f"harness-{digest.hexdigest()[:16]}"
    if exe.exists():
        return exe
    work = out_dir / f"src-{digest.hexdigest()[:16]}"
    work.mkdir(parents=True, exist_ok=True)
    cpp = []
    for name, text in sources.items():
        rewritten, count = _LAUNCH.subn(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)}, {m.group(3)});", text)
        assert count > 0, f"no kernel launch found in {name}.cu"
        (work / f"{name}.cpp").write_text(rewritten)
        cpp.append(str(work / f"{name}.cpp"))
    flags = ["-std=c++20", "-O1", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", "-pthread",
             "-DBARK_KERNELS_HOST_EMULATION", f"-I{CSRC / 'emulation'}", f"-I{CSRC}", "-include", "emu.h"]
    if sanitize:
        flags += ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    cmd = [CXX, *flags, *cpp, str(CSRC / "emulation" / "harness.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"harness build failed:\n{res.stderr[-6000:]}"
    return exe


def _cache_dir() -> Path:
    """Built harnesses, keyed by the sources' hash (reused across runs): BARK_KERNELS_EMU_CACHE or the temp dir."""
    default = Path(tempfile.gettempdir()) / f"bark_kernels_emu-{os.getuid()}"
    return Path(os.environ.get("BARK_KERNELS_EMU_CACHE", default))


@pytest.fixture(scope="module")
def harness():
    return _build(_cache_dir(), sanitize=False)


@pytest.fixture(scope="module")
def harness_asan():
    return _build(_cache_dir(), sanitize=True)


class Run:
    """One harness call: tensors go in as their whole storage + offset + strides, outputs come back."""

    def __init__(self, exe: Path, tmp: Path, op: str):
        self.exe, self.dir, self.lines = exe, tmp, [f"op {op}"]
        self.dir.mkdir(parents=True, exist_ok=True)

    def param(self, key, *values):
        self.lines.append(f"{key} " + " ".join(repr(float(v)) if isinstance(v, float) else str(int(v))
                                                 for v in values))

    def tensor(self, name, t: torch.Tensor, strided=True):
        storage = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())  # the whole storage, 1-D
        (self.dir / f"{name}.bin").write_bytes(storage.view(torch.uint8).numpy().tobytes())
        if strided:
            self.param(f"{name}_off", t.storage_offset())
            strides = t.stride()
            self.param(f"{name}_strides", *((0,) + strides[:2] if t.dim() == 3 else strides[:3]))

    def run(self) -> subprocess.CompletedProcess:
        (self.dir / "params.txt").write_text("\n".join(self.lines) + "\n")
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0")  # the harness never frees: fine
        return subprocess.run([str(self.exe), str(self.dir)], capture_output=True, text=True, timeout=600, env=env)

    def output(self, name, dtype, shape):
        raw = bytearray((self.dir / f"{name}.out.bin").read_bytes())
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


def _check_ok(res):
    assert res.returncode == 0, f"harness failed ({res.returncode}):\n{res.stderr[-4000:]}"


def _randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def emulated_attention(exe, tmp, q, k, v, causal, softmax_scale, cu_seqlens_q=None, cu_seqlens_k=None,
                       max_seqlen_q=None, max_seqlen_k=None):
    r = Run(exe, tmp, "flash")
    for name, t in (("q", q), ("k", k), ("v", v)):
        r.tensor(name, t)
    out = torch.empty(q.shape, dtype=q.dtype)
    r.param("o_numel", out.numel())
    r.param("o_strides", *((0,) + out.stride()[:2] if out.dim() == 3 else out.stride()[:3]))
    r.param("dtype", DTYPE_CODE[q.dtype])
    r.param("nheads", q.shape[-2])
    r.param("head_dim", q.shape[-1])
    if cu_seqlens_q is not None:
        r.param("varlen", 1)
        r.tensor("cu_seqlens_q", cu_seqlens_q, strided=False)
        r.tensor("cu_seqlens_k", cu_seqlens_k, strided=False)
        r.param("batch", cu_seqlens_q.numel() - 1)
        r.param("seqlen_q", max_seqlen_q)
        r.param("seqlen_k", max_seqlen_k)
    else:
        r.param("batch", q.shape[0])
        r.param("seqlen_q", q.shape[1])
        r.param("seqlen_k", k.shape[1])
    r.param("scale", softmax_scale)
    r.param("causal", int(causal))
    res = r.run()
    _check_ok(res)
    return r.output("o", q.dtype, q.shape)


def _check_attention(exe, tmp, q, k, v, causal, softmax_scale=None, name=""):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = emulated_attention(exe, tmp, q, k, v, causal, scale)
    assert not torch.isnan(out).any(), f"{name}: unwritten (NaN sentinel) or NaN outputs"
    ref = reference_attention(q, k, v, causal=causal, softmax_scale=scale)
    baseline = bk.attention(q, k, v, causal=causal, softmax_scale=scale, backend="eager")
    assert_close_to_reference(out, ref, baseline, q.dtype, name=f"emulated cuda attention {name}")
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if causal and seqlen_q > seqlen_k:
        assert torch.count_nonzero(out[:, : seqlen_q - seqlen_k]) == 0
    return out


# ----------------------------------------------------------------------------------------------------------------------
# flash forward


SLOW = pytest.mark.slow  # the full matrix; the default run keeps a representative subset (the build costs ~20 s)


def _cases(default, rest):
    return list(default) + [pytest.param(*c if isinstance(c, tuple) else (c,), marks=SLOW) for c in rest]


@pytest.mark.parametrize("dtype,causal,seqlen_q,seqlen_k", _cases(
    [(torch.float16, True, 129, 7), (torch.bfloat16, False, 7, 129), (torch.float16, True, 7, 129)],
    [(dt, c, sq, sk) for dt in (torch.float16, torch.bfloat16) for c in (True, False)
     for sq, sk in ((1, 1), (7, 129), (129, 7), (65, 66))
     if (dt, c, sq, sk) not in ((torch.float16, True, 129, 7), (torch.bfloat16, False, 7, 129),
                                (torch.float16, True, 7, 129))]))
def test_flash_forward_shapes(harness, tmp_path, dtype, causal, seqlen_q, seqlen_k):
    q = _randn(1, seqlen_q, 2, 64, dtype=dtype, seed=1)
    k = _randn(1, seqlen_k, 2, 64, dtype=dtype, seed=2)
    v = _randn(1, seqlen_k, 2, 64, dtype=dtype, seed=3)
    _check_attention(harness, tmp_path, q, k, v, causal, name=f"Sq={seqlen_q} Sk={seqlen_k}")


@pytest.mark.parametrize("head_dim", _cases([128], [16, 32, 96]))
def test_flash_forward_head_dims(harness, tmp_path, head_dim):
    q = _randn(2, 70, 1, head_dim, dtype=torch.float16, seed=4)
    k = _randn(2, 90, 1, head_dim, dtype=torch.float16, seed=5)
    v = _randn(2, 90, 1, head_dim, dtype=torch.float16, seed=6)
    _check_attention(harness, tmp_path, q, k, v, True, softmax_scale=0.3, name=f"D={head_dim}")


def test_flash_forward_fused_and_unaligned_views(harness, tmp_path):
    qkv = _randn(2, 80, 3 * 2 * 64, dtype=torch.bfloat16, seed=7)
    q, k, v = qkv.view(2, 80, 3, 2, 64).unbind(2)  # (B, T, H, D) views, row stride 3*H*D
    _check_attention(harness, tmp_path / "fused", q, k, v, True, name="fused qkv")
    base = _randn(1, 75, 2, 65, dtype=torch.float16, seed=8)  # odd strides: scalar-load path
    _check_attention(harness, tmp_path / "odd", base[..., 1:], base[:, 5:, :, 1:], base[:, 3:73, :, :64], False,
                     name="unaligned views")


@pytest.mark.parametrize("causal", _cases([True], [False]))
def test_flash_forward_varlen(harness, tmp_path, causal):
    lens_q, lens_k = [1, 70, 0, 5], [9, 64, 3, 130]
    dtype = torch.float16
    q = _randn(sum(lens_q), 2, 64, dtype=dtype, seed=9)
    k = _randn(sum(lens_k), 2, 64, dtype=dtype, seed=10)
    v = _randn(sum(lens_k), 2, 64, dtype=dtype, seed=11)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    out = emulated_attention(harness, tmp_path, q, k, v, causal, 0.125, cu_q, cu_k, max(lens_q), max(lens_k))
    assert not torch.isnan(out).any()
    ref = reference_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, softmax_scale=0.125)
    baseline = bk.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                   softmax_scale=0.125, backend="eager")
    assert_close_to_reference(out, ref, baseline, dtype, name="emulated cuda varlen")


# ----------------------------------------------------------------------------------------------------------------------
# kv cache


def emulated_kvcache(exe, tmp, q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale, num_splits,
                     num_sms=132):
    """Runs append + attention; returns (out, k_cache_after, v_cache_after, num_splits used)."""
    r = Run(exe, tmp, "kvcache")
    r.tensor("q", q)
    r.tensor("k_cache", k_cache)
    r.tensor("v_cache", v_cache)
    if k is not None:
        r.tensor("k_new", k)
        r.tensor("v_new", v)
    r.tensor("cache_seqlens", cache_seqlens, strided=False)
    r.param("o_numel", q.numel())
    r.param("o_strides", *torch.empty(q.shape).stride()[:3])
    batch, seqlen_q, nheads, head_dim = q.shape
    for key, value in (("batch", batch), ("seqlen_q", seqlen_q), ("nheads", nheads), ("head_dim", head_dim),
                       ("max_seqlen", k_cache.shape[1]), ("causal", int(causal)), ("num_splits", num_splits),
                       ("num_sms", num_sms), ("dtype", DTYPE_CODE[q.dtype])):
        r.param(key, value)
    r.param("scale", softmax_scale)
    res = r.run()
    _check_ok(res)
    storage_numel = k_cache.untyped_storage().nbytes() // k_cache.element_size()
    k_after = r.output("k_cache", q.dtype, (storage_numel,))
    v_after = r.output("v_cache", q.dtype, (storage_numel,))
    view = lambda s, like: s.as_strided(like.shape, like.stride(), like.storage_offset())  # noqa: E731
    splits = int(re.search(r"num_splits (\d+)", res.stdout).group(1))
    return r.output("o", q.dtype, q.shape), view(k_after, k_cache), view(v_after, v_cache), k_after, v_after, splits


def _check_kvcache(exe, tmp, dtype, batch, seqlen_q, nheads, head_dim, max_seqlen, lens, causal, with_new,
                   num_splits, expect_splits=None):
    k_cache = _randn(batch, max_seqlen, nheads, head_dim, dtype=dtype, seed=20)
    v_cache = _randn(batch, max_seqlen, nheads, head_dim, dtype=dtype, seed=21)
    q = _randn(batch, seqlen_q, nheads, head_dim, dtype=dtype, seed=22)
    k = _randn(batch, seqlen_q, nheads, head_dim, dtype=dtype, seed=23) if with_new else None
    v = _randn(batch, seqlen_q, nheads, head_dim, dtype=dtype, seed=24) if with_new else None
    cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    out, k_after, v_after, _, _, splits = emulated_kvcache(exe, tmp, q, k_cache, v_cache, k, v, cache_seqlens,
                                                           causal, scale, num_splits)
    if expect_splits is not None:
        assert splits == expect_splits
    ref, k_expected, v_expected = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal,
                                                                   scale)
    baseline = bk.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=cache_seqlens,
                                         causal=causal, softmax_scale=scale, backend="eager")
    assert torch.equal(k_after, k_expected) and torch.equal(v_after, v_expected)  # appended rows only, bit for bit
    assert not torch.isnan(out).any()
    assert_close_to_reference(out, ref, baseline, dtype, name=f"emulated cuda kvcache Sq={seqlen_q} splits={splits}")
    return splits


@pytest.mark.parametrize("seqlen_q,causal,num_splits", _cases(
    [(1, True, 3), (3, True, 1)],
    [(sq, c, n) for sq in (1, 3) for c in (True, False) for n in (1, 3) if (sq, c, n) not in ((1, True, 3), (3, True, 1))]))
def test_kvcache_decode(harness, tmp_path, seqlen_q, causal, num_splits):
    _check_kvcache(harness, tmp_path, torch.bfloat16, batch=3, seqlen_q=seqlen_q, nheads=2, head_dim=64,
                   max_seqlen=200, lens=[0, 70, 200 - seqlen_q], causal=causal, with_new=True, num_splits=num_splits)


def test_kvcache_read_only_and_short_rows(harness, tmp_path):
    """k=v=None; a row shorter than Sq under causal masking has query rows that see nothing (output 0)."""
    _check_kvcache(harness, tmp_path, torch.float16, batch=2, seqlen_q=5, nheads=1, head_dim=64, max_seqlen=100,
                   lens=[2, 99], causal=True, with_new=False, num_splits=2)


def test_kvcache_long_query_block_uses_flash_path(harness, tmp_path):
    """Sq = 17 > 16: append, then the tensor-core kernel with per-row key counts (seqused_k)."""
    _check_kvcache(harness, tmp_path, torch.float16, batch=2, seqlen_q=17, nheads=2, head_dim=64, max_seqlen=150,
                   lens=[0, 100], causal=True, with_new=True, num_splits=1)


@SLOW
def test_kvcache_heuristic_splits_and_head_dims(harness, tmp_path):
    splits = _check_kvcache(harness, tmp_path / "a", torch.float16, batch=1, seqlen_q=1, nheads=2, head_dim=128,
                            max_seqlen=600, lens=[517], causal=True, with_new=True, num_splits=0)
    assert splits == 5  # min(ceil(2 * 132 / 2), ceil(600 / 128)) on a 132-SM GPU
    _check_kvcache(harness, tmp_path / "b", torch.bfloat16, batch=2, seqlen_q=4, nheads=1, head_dim=32,
                   max_seqlen=90, lens=[40, 7], causal=True, with_new=True, num_splits=2)


def test_kvcache_strided_caches_leave_neighbours_untouched(harness, tmp_path):
    """Caches as views of a (layers, 2, B, S, H, D) buffer: only the appended rows of this layer change."""
    dtype, batch, max_seqlen, nheads, head_dim = torch.float16, 2, 40, 2, 64
    buf = _randn(2, 2, batch, max_seqlen, nheads, head_dim, dtype=dtype, seed=30)
    k_cache, v_cache = buf[1, 0], buf[1, 1]
    qkv = _randn(batch, 1, 3 * nheads * head_dim, dtype=dtype, seed=31)
    q, k, v = qkv.view(batch, 1, 3, nheads, head_dim).unbind(2)
    lens = torch.tensor([39, 0], dtype=torch.int32)
    out, k_after, v_after, k_storage, _, _ = emulated_kvcache(harness, tmp_path, q, k_cache, v_cache, k, v, lens,
                                                              True, 0.125, 2)
    ref, k_expected, v_expected = reference_attention_with_kvcache(q, k_cache, v_cache, k, v, lens, True, 0.125)
    assert torch.equal(k_after, k_expected) and torch.equal(v_after, v_expected)
    assert torch.equal(k_storage.view(buf.shape)[0], buf[0])  # the other layer, bit for bit
    baseline = bk.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=lens,
                                         softmax_scale=0.125, backend="eager")
    assert_close_to_reference(out, ref, baseline, dtype, name="emulated cuda kvcache strided")


# ----------------------------------------------------------------------------------------------------------------------
# gather / scatter


@pytest.mark.parametrize("row_bytes,x_shift,out_shift", _cases([(7, 1, 3)], [(64, 0, 0), (12, 0, 4)]))
def test_gather_scatter_rows(harness, tmp_path, row_bytes, x_shift, out_shift):
    """16-, 4- and 1-byte copy paths; out-of-range indices give zero rows (gather) or are skipped (scatter)."""
    n_rows, gen = 9, torch.Generator().manual_seed(40)
    x = torch.randint(0, 256, (n_rows * row_bytes + x_shift,), dtype=torch.uint8, generator=gen)
    rows = x[x_shift:].view(n_rows, row_bytes)
    indices = torch.tensor([3, 0, 8, 8, 5, -1, 9], dtype=torch.int64)
    r = Run(harness, tmp_path / "g", "gather")
    r.tensor("x", x, strided=False)
    r.tensor("indices", indices, strided=False)
    for key, value in (("nnz", len(indices)), ("n_rows", n_rows), ("row_bytes", row_bytes), ("x_shift", x_shift),
                       ("out_shift", out_shift)):
        r.param(key, value)
    _check_ok(r.run())
    got = r.output("out", torch.uint8, (len(indices), row_bytes))
    expected = torch.stack([rows[i] if 0 <= i < n_rows else torch.zeros(row_bytes, dtype=torch.uint8)
                            for i in indices.tolist()])
    assert torch.equal(got, expected)

    unique = torch.tensor([4, 1, 7, 12, -3], dtype=torch.int64)
    src = rows[:5]
    r = Run(harness, tmp_path / "s", "scatter")
    r.tensor("x", torch.cat([torch.zeros(x_shift, dtype=torch.uint8), src.reshape(-1)]), strided=False)
    r.tensor("indices", unique, strided=False)
    for key, value in (("nnz", 5), ("n_rows", n_rows), ("row_bytes", row_bytes), ("x_shift", x_shift),
                       ("out_shift", out_shift)):
        r.param(key, value)
    _check_ok(r.run())
    got = r.output("out", torch.uint8, (n_rows, row_bytes))
    expected = torch.zeros(n_rows, row_bytes, dtype=torch.uint8)
    for j, i in enumerate(unique.tolist()):
        if 0 <= i < n_rows:
            expected[i] = src[j]
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------------------------------
# the emulator's own checks fire


def test_emulator_reports_a_divergent_barrier(tmp_path):
    """A kernel where one warp skips __syncthreads must fail, not pass silently."""
    (tmp_path / "bad.cpp").write_text(
        "__global__ void k(int* x) { if (threadIdx.x < 32) return; __syncthreads(); x[threadIdx.x] = 1; }\n"
        "cudaError_t cudaGetLastError() { return cudaSuccess; }\n"
        "const char* cudaGetErrorString(cudaError_t) { return \"\"; }\n"
        "int main() { int x[64] = {}; ::emu::launch(k, dim3(1), dim3(64), 0, nullptr, x);\n"
        "  return emu::g_error.load() ? 3 : 0; }\n")
    exe = tmp_path / "bad"
    res = subprocess.run([CXX, "-std=c++20", "-pthread", f"-I{CSRC / 'emulation'}", "-include", "emu.h",
                          str(tmp_path / "bad.cpp"), "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert subprocess.run([str(exe)], timeout=60).returncode == 3


# ----------------------------------------------------------------------------------------------------------------------
# AddressSanitizer + UBSan build: out-of-bounds global accesses, misaligned vector accesses


@pytest.mark.slow
def test_kernels_under_address_sanitizer(harness_asan, tmp_path):
    q = _randn(1, 67, 2, 64, dtype=torch.float16, seed=50)
    k = _randn(1, 131, 2, 64, dtype=torch.float16, seed=51)
    _check_attention(harness_asan, tmp_path / "a", q, k, k.clone(), True, name="asan causal")
    base = _randn(1, 75, 2, 65, dtype=torch.bfloat16, seed=52)
    _check_attention(harness_asan, tmp_path / "b", base[..., 1:], base[:, 5:, :, 1:], base[:, 3:73, :, :64], False,
                     name="asan unaligned")
    _check_kvcache(harness_asan, tmp_path / "c", torch.float16, batch=2, seqlen_q=3, nheads=2, head_dim=64,
                   max_seqlen=70, lens=[0, 67], causal=True, with_new=True, num_splits=3)
    _check_kvcache(harness_asan, tmp_path / "d", torch.bfloat16, batch=1, seqlen_q=17, nheads=1, head_dim=128,
                   max_seqlen=17, lens=[0], causal=True, with_new=True, num_splits=1)

