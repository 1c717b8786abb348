"""Backend selection: explicit > environment > automatic; fallbacks logged once; explicit failures explained."""

import logging
import os
import platform

import pytest
import torch

import bark_kernels as bk
from bark_kernels import registry


def test_eager_and_sdpa_always_available():
    names = bk.available_backends()
    assert "eager" in names and "sdpa" in names


def test_automatic_order_on_cpu_picks_sdpa():
    name, _ = registry.select("attention", torch.device("cpu"), torch.float32, 64)
    assert name == "sdpa"


def test_env_overrides_automatic(monkeypatch):
    monkeypatch.setenv("BARK_KERNELS_BACKEND", "eager")
    assert registry.select("attention", torch.device("cpu"), torch.float32, 64)[0] == "eager"
    monkeypatch.setenv("BARK_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"BARK_KERNELS_BACKEND=: expected one of .* got 'nonsense'"):
        registry.select("attention", torch.device("cpu"), torch.float32, 64)


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv("BARK_KERNELS_BACKEND", "eager")
    assert registry.select("attention", torch.device("cpu"), torch.float32, 64, backend="sdpa")[0] == "sdpa"


def test_explicit_backend_that_cannot_serve_raises_with_reason():
    q = k = v = torch.randn(1, 3, 2, 16)
    with pytest.raises(bk.BackendUnavailableError, match=r"backend 'sdpa' .* returning attention weights is not "
                                                         r"supported\. Available backends: \["):
        bk.attention(q, k, v, return_attn_weights=True, backend="sdpa")
    if registry.availability("flash_attn") is not None:
        with pytest.raises(bk.BackendUnavailableError, match=r"backend 'flash_attn' .*flash-attn"):
            bk.attention(q, k, v, backend="flash_attn")


def test_cuda_backend_explains_why_it_cannot_serve_cpu_tensors():
    """On every machine the reason is the one that applies: the backend unavailable (the extension not built, or no
    CUDA device: its availability reason), or available and refusing CPU tensors (naming the device type)."""
    reason = registry.why_not("cuda", "attention", torch.device("cpu"), torch.float16, 64)
    unavailable = registry.availability("cuda")
    if unavailable is not None:
        assert reason == unavailable and unavailable.strip(), reason
    else:
        assert reason == "runs on CUDA devices only, got device type 'cpu'", reason


def test_triton_backend_is_available_where_the_suite_expects_it():
    """The parity suites list only available backends (helpers.grid), so a Triton that fails to load would drop out of
    them silently. Triton is a dependency on Linux: usable there on CUDA natively and on CPU under the interpreter
    (tests/conftest.py switches it on when there is no CUDA device)."""
    if platform.system() != "Linux":
        pytest.skip(f"triton is a dependency on Linux only; this is {platform.system()}")
    assert registry.availability("triton") is None, registry.availability("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert registry.why_not("triton", "attention_with_kvcache", device, torch.float32, 64) is None


@pytest.mark.gpu
def test_cuda_extension_is_loaded_on_a_cuda_machine():
    """On a CUDA machine the cuda backend's GPU tests (tests/test_cuda_backend.py, the cuda rows of the parity suites)
    skip when bark_kernels._C is unavailable; this makes that state a failure unless the build was skipped on purpose
    (BARK_KERNELS_SKIP_CUDA_BUILD=1), so a failed build cannot hide behind a hundred skips."""
    from bark_kernels import _jit

    if _jit.env_flag(os.environ, _jit.ENV_SKIP):
        pytest.skip(f"{_jit.ENV_SKIP} is set: the CUDA extension was not built on purpose")
    reason = registry.availability("cuda")
    assert reason is None, (f"CUDA is available but the cuda backend is not: {reason}. Build the extension "
                            f"(pip install --no-build-isolation --no-deps -e .) or set {_jit.ENV_SKIP}=1")


def test_fallback_is_logged_once(caplog):
    q = k = v = torch.randn(1, 3, 2, 16)
    with caplog.at_level(logging.WARNING, logger="bark_kernels"):
        for _ in range(3):
            bk.attention(q, k, v, return_attn_weights=True)
    records = [r for r in caplog.records if "ran on 'eager'" in r.getMessage()]
    assert len(records) == 1
    assert "sdpa: returning attention weights is not supported" in records[0].getMessage()


def test_describe_lists_every_backend_with_reason():
    rows = registry.describe()
    assert [r["name"] for r in rows] == list(registry.BACKENDS)
    for row in rows:
        assert row["available"] or row["reason"]
