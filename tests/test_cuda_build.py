"""The optional CUDA extension's build side, checked without a GPU: setup.py's switches, the nvcc compile check of the
kernels (csrc/*.cu compile with CUDA headers only), the CI script, and the op schemas against the fake (meta)
implementations that torch.compile traces."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bark_kernels import _jit
from bark_kernels.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SCRIPT = ROOT / ".ci" / "compile_cuda.sh"
BUILD_SCRIPT = ROOT / ".ci" / "build_cuda_extension.sh"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA kernels cannot be compile-checked here")


def _load_setup():
    spec = importlib.util.spec_from_file_location("bark_kernels_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": setup() does not run
    return module


# ----------------------------------------------------------------------------------------------------------------------
# build switches


@pytest.mark.parametrize("value,expected", [
    (None, ["80", "90"]),
    ("", ["80", "90"]),
    ("80;90", ["80", "90"]),
    ("8.0, 9.0a", ["80", "90a"]),
    ("sm_90a compute_80 86", ["90a", "80", "86"]),
    ("90;90", ["90"]),
])
def test_parse_cuda_archs(value, expected):
    assert _jit.parse_cuda_archs(value) == expected


@pytest.mark.parametrize("value,match", [("75", "sm_80 or newer"), ("ampere", "expected compute capabilities"),
                                         ("8", "expected compute capabilities"), ("80;9.0.1", "expected")])
def test_parse_cuda_archs_rejects(value, match):
    with pytest.raises(ValueError, match=match) as info:
        _jit.parse_cuda_archs(value)
    assert _jit.ENV_ARCHS in str(info.value)


def test_nvcc_arch_flags_sass_per_arch_and_portable_ptx():
    flags = _jit.nvcc_arch_flags(["80", "90a"])
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                     "-gencode=arch=compute_80,code=compute_80"]
    assert _jit.nvcc_arch_flags(["90a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]


def test_skip_switch():
    assert _jit.cuda_build_skip_reason({_jit.ENV_SKIP: "1"}) == f"{_jit.ENV_SKIP} is set"
    # "0" and "" mean unset: the reason is then exactly the machine's (no CUDA torch, or no toolkit, or None)
    import torch

    for value in ("0", "", " 0 "):
        env = {_jit.ENV_SKIP: value, "PATH": os.environ.get("PATH", "")}
        reason = _jit.cuda_build_skip_reason(env)
        if torch.version.cuda is None:
            assert reason == f"torch {torch.__version__} has no CUDA support", reason
        else:
            assert reason == _jit.find_cuda_home(env)[1], reason


def _fake_toolkit(root: Path, nvcc_script: str = "#!/bin/sh\nexit 0\n") -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(nvcc_script)
    nvcc.chmod(0o755)
    return root


def test_find_cuda_home_takes_a_valid_cuda_home_and_names_a_bad_one(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-x")
    assert _jit.find_cuda_home({"CUDA_HOME": str(toolkit)}) == (str(toolkit), None)
    assert _jit.find_cuda_home({"CUDA_PATH": str(toolkit), "PATH": ""}) == (str(toolkit), None)
    home, reason = _jit.find_cuda_home({"CUDA_HOME": str(tmp_path)})
    assert home is None and f"CUDA_HOME={tmp_path} is not a CUDA toolkit" in reason and "cuda_runtime.h" in reason


def test_find_cuda_home_sees_through_an_nvcc_wrapper_script(tmp_path):
    """/usr/local/bin/nvcc as `exec /usr/local/cuda-13.0/bin/nvcc "$@"` made torch guess CUDA_HOME=/usr/local (no
    cuda_runtime.h there) and the binding failed to compile; the root nvcc reports (--dryrun's TOP) is right."""
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_dir = tmp_path / "local" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\necho "#$ TOP={toolkit}/bin/.." >&2\n')
    wrapper.chmod(0o755)
    assert _jit.find_cuda_home({"PATH": str(wrapper_dir)}) == (str(toolkit.resolve()), None)


def test_use_cuda_home_overrides_torchs_guess(tmp_path, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    toolkit = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))  # restored after the test, like the module attribute below
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local")
    assert _jit.use_cuda_home() == str(toolkit)
    assert cpp_extension.CUDA_HOME == str(toolkit) and os.environ["CUDA_HOME"] == str(toolkit)
    with pytest.raises(RuntimeError, match="is not a CUDA toolkit"):
        _jit.use_cuda_home({"CUDA_HOME": str(tmp_path)})


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA here")
def test_cpu_torch_installs_pure_python_with_a_notice(capsys):
    setup_py = _load_setup()
    assert "has no CUDA support" in _jit.cuda_build_skip_reason({})
    assert setup_py.cuda_extension_kwargs({}) == {}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "installing without the CUDA extension bark_kernels._C" in err


def test_setup_builds_every_kernel_file():
    sources = [Path(s).name for s in _jit.extension_sources(CSRC)]
    assert sources == sorted(p.name for p in CSRC.glob("*.cu")) + ["bindings.cpp"]
    assert {"flash_fwd.cu", "kvcache.cu", "rows.cu"} <= set(sources)


def test_kernel_files_include_only_cuda_headers():
    allowed = {"cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "cstdint", "stdint.h", "common.cuh", "bark_kernels.h"}
    for path in list(CSRC.glob("*.cu")) + list(CSRC.glob("*.cuh")) + [CSRC / "bark_kernels.h"]:
        includes = set(re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text()))
        assert includes <= allowed, f"{path.name} includes {includes - allowed}"


# ----------------------------------------------------------------------------------------------------------------------
# nvcc


def _nvcc(src: Path, arch: str, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [NVCC, "-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v", f"-arch=sm_{arch}", f"-I{CSRC}", "-c",
           str(src), "-o", str(tmp_path / (src.stem + ".o"))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@needs_nvcc
def test_nvcc_compiles_rows_kernel(tmp_path):
    res = _nvcc(CSRC / "rows.cu", "80", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "gather_rows_kernel" in res.stderr and "Used" in res.stderr  # -Xptxas -v reports every kernel


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("name", sorted(p.name for p in CSRC.glob("*.cu")))
def test_nvcc_compiles_kernel_without_spills(name, tmp_path):
    res = _nvcc(CSRC / name, "80", tmp_path)
    assert res.returncode == 0, res.stderr
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    assert spills and all(int(n) == 0 for n in spills), res.stderr


@needs_nvcc
def test_ci_script_fails_on_a_compile_error(tmp_path):
    (tmp_path / "broken.cu").write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    env = dict(os.environ, CSRC_DIR=str(tmp_path), ARCHS="80", SKIP_BINDING_CHECK="1")
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0
    assert "FAIL: " in res.stdout and "undefined_name" in res.stdout


def test_ci_script_skips_without_nvcc():
    env = dict(os.environ, NVCC="/nonexistent/nvcc")
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0
    assert "SKIP: nvcc not found" in res.stdout


@pytest.mark.slow
@needs_nvcc
def test_ci_script_passes_on_csrc():
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "bytes spill stores" in res.stdout and "bindings.cpp: OK" in res.stdout


# ----------------------------------------------------------------------------------------------------------------------
# the real extension build against a CUDA torch (a separate venv; opt-in: several GB and a minute or more)


@pytest.mark.slow
@needs_nvcc
@pytest.mark.skipif(os.environ.get("TORCH_CUDA_WHEEL_CHECK") != "1",
                    reason="set TORCH_CUDA_WHEEL_CHECK=1: builds bark_kernels._C against a CUDA torch in a separate "
                           "venv (VENV, default $TMPDIR/cudatorch; ~5.5 GB the first time)")
def test_extension_builds_links_loads_and_registers_against_cuda_torch():
    res = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=3600)
    out = res.stdout
    assert res.returncode == 0, out[-6000:] + res.stderr[-3000:]
    assert "build_cuda_extension: OK in" in out and "SKIP" not in out
    assert re.search(r"ptxas: [1-9]\d* kernel entries, .* 0 with spills; 0 compiler warnings", out), out
    assert "schemas: 5 ops registered by the extension, equal to csrc/bindings.cpp" in out
    assert "fakes: output shapes, dtypes and devices right for all 5 ops" in out
    assert "k_cache and v_cache kept as mutated inputs" in out
    assert ("availability: no CUDA device" in out) != torch.cuda.is_available()
    assert re.search(r"JIT build \(sm_\S+\) and load passed", out) or os.environ.get("JIT") == "0", out


# ----------------------------------------------------------------------------------------------------------------------
# op schemas (csrc/bindings.cpp) against the fake implementations (bark_kernels/backends/cuda.py)


def binding_schemas() -> dict[str, str]:
    """name -> schema string of every m.def(...) in csrc/bindings.cpp (adjacent C string literals joined)."""
    text = (CSRC / "bindings.cpp").read_text()
    schemas = {}
    for call in re.findall(r"m\.def\((.*?)\);", text, flags=re.S):
        schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call))
        schemas[schema.split("(", 1)[0]] = schema
    return schemas


def test_schemas_cover_the_op_table():
    from bark_kernels import registry

    assert set(binding_schemas()) == set(registry.OP_NAMES) == set(cuda_backend.FAKES) == set(cuda_backend.OPS)


_TEST_NS = "bark_kernels_cuda_schema_test"
_test_lib = None


def _test_namespace():
    """The binding's schemas defined from Python in a test namespace, with the backend's fakes and, for running
    without the extension, CPU kernels from the eager backend."""
    global _test_lib
    if _test_lib is not None:
        return getattr(torch.ops, _TEST_NS)
    from bark_kernels.backends import eager

    lib = torch.library.Library(_TEST_NS, "DEF")
    for schema in binding_schemas().values():
        lib.define(schema)
    cuda_backend.register_fakes(_TEST_NS, lib=lib)
    for name in cuda_backend.OPS:
        fn = eager.OPS[name]

        def impl(*args, _fn=fn, **kwargs):
            out = _fn(*args, **kwargs)
            return out.contiguous() if out.data_ptr() in {a.data_ptr() for a in args if torch.is_tensor(a)} else out

        lib.impl(name, impl, "CPU")
    _test_lib = lib
    return getattr(torch.ops, _TEST_NS)


def test_kvcache_schema_marks_the_caches_as_mutated():
    ops = _test_namespace()
    args = {a.name: a for a in ops.attention_with_kvcache.default._schema.arguments}
    assert args["k_cache"].alias_info.is_write and args["v_cache"].alias_info.is_write
    assert args["q"].alias_info is None and args["k"].alias_info is None


def test_fakes_give_output_shapes_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = _test_namespace()
    with FakeTensorMode():
        q = torch.empty(2, 5, 3, 64, dtype=torch.float16)
        k = torch.empty(2, 9, 3, 64, dtype=torch.float16)
        assert ops.attention(q, k, k, True, 0.125).shape == (2, 5, 3, 64)
        packed_q, packed_k = torch.empty(11, 3, 64, dtype=torch.bfloat16), torch.empty(13, 3, 64, dtype=torch.bfloat16)
        cu = torch.zeros(3, dtype=torch.int32)
        out = ops.attention_varlen(packed_q, packed_k, packed_k, cu, cu, 7, 8, False, 0.125)
        assert out.shape == (11, 3, 64) and out.dtype == torch.bfloat16
        cache = torch.empty(2, 32, 3, 64, dtype=torch.float16)
        lens = torch.zeros(2, dtype=torch.int32)
        assert ops.attention_with_kvcache(q, cache, cache.clone(), q, q, lens, True, 0.125).shape == (2, 5, 3, 64)
        assert ops.attention_with_kvcache(q, cache, cache.clone(), None, None, lens, True, 0.125).shape == q.shape
        x, idx = torch.empty(10, 6, dtype=torch.float32), torch.empty(4, dtype=torch.int64)
        assert ops.gather_rows(x, idx).shape == (4, 6)
        assert ops.scatter_rows(x[:4], idx, 10).shape == (10, 6)


def test_torch_compile_traces_the_ops_and_keeps_the_in_place_append():
    """fullgraph torch.compile through the fakes; the cache append (Tensor(a!)) must survive functionalization."""
    ops = _test_namespace()
    gen = torch.Generator().manual_seed(0)
    batch, max_seqlen, nheads, head_dim = 2, 16, 2, 16
    q = torch.randn(batch, 1, nheads, head_dim, generator=gen)
    k_new, v_new = torch.randn_like(q), torch.randn_like(q)
    k_cache = torch.randn(batch, max_seqlen, nheads, head_dim, generator=gen)
    v_cache = torch.randn_like(k_cache)
    lens = torch.tensor([3, 7], dtype=torch.int32)

    def step(q, k_cache, v_cache, k_new, v_new, lens):
        out = ops.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, lens, True, 0.25)
        return ops.attention(q, k_cache, v_cache, False, 0.25) + out

    expected_caches = (k_cache.clone(), v_cache.clone())
    expected = step(q, *expected_caches, k_new, v_new, lens)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(q, k_cache, v_cache, k_new, v_new, lens)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(k_cache, expected_caches[0])  # appended in place by the compiled graph
    torch.testing.assert_close(v_cache, expected_caches[1])
    assert torch.equal(k_cache[0, 3, :, :], k_new[0, 0]) and torch.equal(k_cache[1, 7], k_new[1, 0])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
