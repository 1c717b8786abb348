"""Backend selection: explicit > environment > automatic; fallbacks logged once; explicit failures explained."""

import logging

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


def test_cuda_backend_absent_explains_why():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; this checks the CPU-only explanation")
    reason = registry.why_not("cuda", "attention", torch.device("cpu"), torch.float16, 64)
    assert reason  # a non-empty reason, whatever it is


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
