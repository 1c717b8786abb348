"""Per-row random streams (``generate_tokens(..., row_seeds=[...])``): a seeded sampled row gives the same tokens
whatever batch it is in and wherever in it; the streams are Exp(1) draws that sample the right distribution; the draw is
a function of (seed, stage, step, index) alone; the step stays free of host reads and compiles whole."""

from __future__ import annotations

import math

import pytest
import torch

import bark
from bark import session as bark_session
from bark.generation import (SamplingParams, _RowNoise, _SemanticHead, _TokenRecord, exponential_race,
                             generate_tokens, row_exponentials)

pytest.importorskip("transformers")
import bark_tiny  # noqa: E402

SAMPLED = dict(do_sample=True, semantic_temperature=0.9, coarse_temperature=0.9, fine_temperature=0.6,
               semantic_max_new_tokens=14)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_row_seeds")
    bark_tiny.save_tiny_bark(path, seed=3, hidden_size=32, num_layers=2, num_heads=2)
    model = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
    weight = model.semantic.lm_head.weight
    direction = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0)) * weight.std()
    with torch.no_grad():
        weight[10_000] = 2.2 * direction  # rows end at different steps
    return model


def _rows(tokens, stage):
    return [t.tolist() for t in tokens[stage]]


def test_a_seeded_row_is_the_same_in_any_batch_and_place(model):
    ids, mask = bark_tiny.random_text_ids(4, [12, 30, 7, 21], seed=1)
    voice = bark_tiny.as_torch_preset(bark_tiny.random_voice_preset(0))
    presets = [voice, None, voice, None]
    seeds = [5, 6, 7, 2**63 - 1]
    batch = generate_tokens(model, ids, mask, history_prompt=presets, row_seeds=seeds, **SAMPLED)
    for b in range(4):  # alone
        alone = generate_tokens(model, ids[b:b + 1], mask[b:b + 1], history_prompt=[presets[b]],
                                row_seeds=[seeds[b]], **SAMPLED)
        for stage in ("semantic", "coarse", "fine"):
            assert torch.equal(alone[stage][0], batch[stage][b]), (b, stage)
    order = [2, 0, 3, 1]  # another place, with other neighbours
    moved = generate_tokens(model, ids[order], mask[order], history_prompt=[presets[i] for i in order],
                            row_seeds=[seeds[i] for i in order], **SAMPLED)
    for place, b in enumerate(order):
        for stage in ("semantic", "coarse", "fine"):
            assert torch.equal(moved[stage][place], batch[stage][b]), (b, stage)
    assert any(len(t) for t in batch["semantic"]) and any(t.shape[-1] for t in batch["fine"])
    other = generate_tokens(model, ids, mask, history_prompt=presets, row_seeds=[s + 1 for s in seeds[:3]] + [0],
                            **SAMPLED)
    assert _rows(other, "coarse") != _rows(batch, "coarse")  # the seed matters


def test_row_exponentials_are_keyed_and_exp1():
    seeds = torch.tensor([0, 1, 2**40 + 1, 2**63 - 1])
    a = row_exponentials(seeds, "semantic", 3, 5000)
    assert a.shape == (4, 5000) and a.dtype == torch.float32 and bool((a > 0).all()) and bool(torch.isfinite(a).all())
    assert torch.equal(a[2], row_exponentials(seeds[2:3], "semantic", 3, 5000)[0])  # a row alone: the same draws
    assert torch.equal(a, row_exponentials(seeds, "semantic", torch.tensor(3), 5000))
    for other in (row_exponentials(seeds, "coarse", 3, 5000), row_exponentials(seeds, "semantic", 4, 5000)):
        assert not bool(torch.isclose(a, other).all(dim=1).any())  # another stage or step: other numbers
    assert abs(a.mean().item() - 1.0) < 0.03 and abs(a.var().item() - 1.0) < 0.08  # Exp(1): mean 1, var 1
    # the race samples the distribution: 20000 draws of a 4-way distribution (one row per seed)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    noise = row_exponentials(torch.arange(n), "fine", 0, 4)
    counts = torch.bincount(exponential_race(probs.expand(n, 4), noise=noise), minlength=4).float()
    chi2 = (((counts - n * probs) ** 2) / (n * probs)).sum().item()
    assert chi2 < 16.3, (counts, chi2)  # p = 0.001 for 3 degrees of freedom


def test_row_seeds_errors(model):
    ids, mask = bark_tiny.random_text_ids(2, [5, 6], seed=1)
    cases = [(dict(row_seeds=[1]), ValueError, "one seed per row"),
             (dict(row_seeds=[1, -1]), ValueError, r"row_seeds\[1\]"),
             (dict(row_seeds=[1, 2.5]), ValueError, r"row_seeds\[1\]"),
             (dict(row_seeds=7), TypeError, "row_seeds"),
             (dict(row_seeds=[1, 2], generator=torch.Generator()), ValueError, "row_seeds and generator")]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            generate_tokens(model, ids, mask, semantic_max_new_tokens=2, do_sample=True, **kwargs)


def _head_session(model, mode, **kw):
    semantic = model.semantic
    gen = model.generation_config
    record = _TokenRecord(2, 16, gen.semantic_config.semantic_pad_token, model.device)
    noise = _RowNoise(2, model.device)
    noise.seeds.copy_(torch.tensor([3, 9]))
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    head = _SemanticHead(semantic, record, gen, params, None, 0, None, None, noise)
    session = bark_session.DecodeSession(semantic, 2, 40, [head], mode, **kw)
    embeds = torch.randn(2, 9, semantic.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return session, record, embeds


def test_a_row_seeded_step_compiles_whole_and_reads_nothing_back(model, monkeypatch):
    runs = {}
    for mode in ("eager", "compile"):
        session, record, embeds = _head_session(model, mode, compile_backend="eager")  # dynamo: fullgraph
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        session.prefill(embeds)
        for _ in range(10):
            session.step()
        if mode == "compile":  # one graph, the draw inside it (no eager pick, no recompile per step)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
        runs[mode] = record.tokens.clone()
    assert torch.equal(runs["eager"], runs["compile"])
    from bark_kernels.backends import _common

    # as tests/test_session.py: the CPU ops trim the cache with a read of CPU lengths; take the device path (no read)
    monkeypatch.setattr(_common, "used_cache_length", lambda cache_seqlens, seqlen_new, max_seqlen: max_seqlen)
    session, record, embeds = _head_session(model, "compile", compile_backend="eager")
    session.mode = "eager"  # the device-lengths step, called directly (the one CUDA captures)
    session.prefill(embeds)
    with bark_session.no_host_reads():
        for _ in range(3):
            session.step()
    assert not math.isnan(record.tokens.float().sum().item())
