"""The CPU-runnable kernel cases of the suite through pytest-benchmark (not part of the default ``pytest`` run).

    pytest benchmarks --benchmark-enable                      # time them (pyproject's addopts disable benchmarks)
    pytest benchmarks --benchmark-enable --benchmark-json=out.json

The cases are those of ``python -m benchmarks --mode cpu`` (bark-small heads, head_dim 64, fp32, CPU shape subsets);
each benchmark first checks its provider's output against the float64 reference with the project's tolerance rule.
Triton is not benchmarked on CPU: under TRITON_INTERPRET its timings are meaningless.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import kernels

DEVICE = torch.device("cpu")
PLAN = kernels.cpu_plan(quick=False)
ATTN_PROVIDERS = ("bk:sdpa", "bk:eager", "torch-sdpa:flash", "torch-sdpa:math", "torch-sdpa:auto")


def _gen():
    return torch.Generator().manual_seed(0)


def _bench(benchmark, case: kernels.Case, provider: str):
    call = case.calls[provider]
    if isinstance(call, str):
        pytest.skip(f"{provider}: {call}")
    out = call()
    if case.check is not None:
        figs = case.check(provider, out)
        assert figs["correct"]["value"], f"{case.name} {provider}: {figs}"
    benchmark.extra_info.update({k: v for k, v in case.params.items() if isinstance(v, (int, float, str, bool))})
    if case.flops is not None:
        benchmark.extra_info["flops"] = case.flops
    if case.bytes_for is not None:
        benchmark.extra_info["bytes"] = case.bytes_for(provider)
    benchmark(call)


@pytest.mark.parametrize("provider", ATTN_PROVIDERS)
@pytest.mark.parametrize("seqlen,causal", [(257, True), (1024, True), (1024, False)])
def test_prefill(benchmark, provider, seqlen, causal):
    case = kernels.prefill_case("bark-small", 1, seqlen, causal, torch.float32, DEVICE, PLAN, _gen())
    benchmark.group = f"prefill S={seqlen} {'causal' if causal else 'non-causal'}"
    _bench(benchmark, case, provider)


@pytest.mark.parametrize("provider", ATTN_PROVIDERS)
@pytest.mark.parametrize("batch,cache_len", [(1, 1024), (8, 1024)])
def test_decode(benchmark, provider, batch, cache_len):
    case = kernels.decode_case("bark-small", batch, cache_len, torch.float32, DEVICE, PLAN, _gen())
    benchmark.group = f"decode B={batch} L={cache_len}"
    _bench(benchmark, case, provider)


@pytest.mark.parametrize("provider", ATTN_PROVIDERS)
def test_varlen(benchmark, provider):
    case = kernels.varlen_case("bark-small", PLAN.varlen_packs[0], torch.float32, DEVICE, PLAN, _gen())
    benchmark.group = "varlen"
    _bench(benchmark, case, provider)


@pytest.mark.parametrize("provider", ("bk:sdpa", "bk:eager", "torch:index_select", "torch:index_copy"))
@pytest.mark.parametrize("op", ("unpad", "pad"))
def test_unpad_pad(benchmark, op, provider):
    cases = {c.section: c for c in kernels.unpad_pad_cases("bark-small", 8, 1024, torch.float32, DEVICE, PLAN,
                                                           _gen())}
    case = cases[op]
    if provider not in case.calls:
        pytest.skip(f"{provider} is not a provider of {op}")
    benchmark.group = op
    _bench(benchmark, case, provider)
