"""bark.model / bark.model_fine: logits of each sub-model against transformers' BarkModel (fp32, same weights), on
every attention backend that runs on this machine; prefill/decode with the static KV cache against full forwards."""

from __future__ import annotations

import pytest
import torch

import bark
import bark_kernels as bk
from bark.kv_cache import KVCache
from bark_kernels import registry
from bark_kernels.testing import MODEL_RTOL

transformers = pytest.importorskip("transformers")
import bark_tiny  # noqa: E402
from bark_tiny import rel_err  # noqa: E402

RTOL = MODEL_RTOL[torch.float32]


def cpu_backends(head_dim: int = 16) -> list[str]:
    """bark_kernels backends that can serve fp32 attention on CPU in this process (triton runs interpreted)."""
    return [name for name in bk.available_backends()
            if registry.why_not(name, "attention", torch.device("cpu"), torch.float32, head_dim) is None]


BACKENDS = cpu_backends()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bark")
    hf = bark_tiny.save_tiny_bark(path, seed=1, hidden_size=32, num_layers=2, num_heads=2)
    ours = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
    return hf, ours


def test_backends_listed():
    assert "eager" in BACKENDS and "sdpa" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_semantic_and_coarse_logits_match_transformers(tiny, backend):
    hf, ours = tiny
    gen = torch.Generator().manual_seed(0)
    for name, vocab in (("semantic", 129_600), ("coarse_acoustics", 12_096)):
        ids = torch.randint(0, vocab, (2, 41), generator=gen)
        model = getattr(ours, name)
        model.attn_backend = backend
        try:
            with torch.no_grad():
                out = model(ids)
                ref = getattr(hf, name)(ids).logits
        finally:
            model.attn_backend = "eager"
        assert out.shape == ref.shape == (2, 41, model.config.output_vocab_size)
        assert rel_err(out, ref) <= RTOL, f"{name} on {backend}: relative error {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_logits_match_transformers(tiny, backend):
    hf, ours = tiny
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1025, (2, 33, 8), generator=gen)
    ours.fine_acoustics.attn_backend = backend
    try:
        for codebook_idx in range(1, 8):
            with torch.no_grad():
                out = ours.fine_acoustics(codebook_idx, ids)
                ref = hf.fine_acoustics(codebook_idx, ids).logits
            assert out.shape == ref.shape == (2, 33, 1056)
            err = rel_err(out, ref)
            assert err <= RTOL, f"codebook {codebook_idx} on {backend}: relative error {err:.2e}"
    finally:
        ours.fine_acoustics.attn_backend = "eager"


def test_fine_heads_tied_to_embeddings_1_to_7(tiny):
    _, ours = tiny
    fine = ours.fine_acoustics
    for j, head in enumerate(fine.lm_heads):
        assert head.weight is fine.input_embeds_layers[j + 1].weight
    with pytest.raises(ValueError, match="codebook_idx"):
        fine(0, torch.zeros(1, 4, 8, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_then_decode_equals_full_forward(tiny, backend):
    """Dense prefill + decode steps through the static cache give the full forward's last-position logits."""
    _, ours = tiny
    model = ours.coarse_acoustics
    model.attn_backend = backend
    try:
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(0, 12_096, (2, 20), generator=gen)
        with torch.no_grad():
            full = model(ids)  # (2, 20, V)
            cache = model.new_cache(batch=2, max_seqlen=24)
            hidden = model.prefill(model.embed(ids[:, :16]), cache)
            assert cache.host_seqlens == [16, 16]
            assert rel_err(model.lm_logits(hidden), full[:, 15]) <= RTOL
            for t in range(16, 20):
                hidden = model.decode_step(ids[:, t], cache)
                assert rel_err(model.lm_logits(hidden), full[:, t]) <= RTOL, f"decode position {t}"
            assert cache.seqlens.tolist() == [20, 20] and cache.host_seqlens == [20, 20]
            # logits of a vocabulary slice only: the same numbers as the full head's columns
            assert rel_err(model.lm_logits(hidden, 10_000, 11_024), full[:, 19, 10_000:11_024]) <= RTOL
    finally:
        model.attn_backend = "eager"


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_prefill_and_ragged_decode_equal_each_row_alone(tiny, backend):
    _, ours = tiny
    model = ours.semantic
    model.attn_backend = backend
    try:
        gen = torch.Generator().manual_seed(3)
        rows = [torch.randint(0, 129_600, (n,), generator=gen) for n in (7, 12, 3)]
        nxt = torch.randint(0, 10_000, (3, 2), generator=gen)
        with torch.no_grad():
            cache = model.new_cache(batch=3, max_seqlen=16)
            hidden = model.prefill_varlen([model.embed(r) for r in rows], cache)
            first = model.lm_logits(hidden)
            second = model.lm_logits(model.decode_step(nxt[:, 0], cache))
            assert cache.host_seqlens == [8, 13, 4]
            third = model.lm_logits(model.decode_step(nxt[:, 1], cache))
            for b, r in enumerate(rows):
                full = model(torch.cat([r, nxt[b]])[None])[0]  # (T_b + 2, V)
                n = r.shape[0]
                assert rel_err(first[b], full[n - 1]) <= RTOL, f"row {b} prefill"
                assert rel_err(second[b], full[n]) <= RTOL, f"row {b} decode 1"
                assert rel_err(third[b], full[n + 1]) <= RTOL, f"row {b} decode 2"
    finally:
        model.attn_backend = "eager"


def test_kv_cache_bookkeeping():
    cache = KVCache(2, 3, 5, 2, 4, torch.float32, "cpu")
    assert cache.layer(1)[0].shape == (3, 5, 2, 4) and cache.layer(1)[0].is_contiguous()
    cache.set_lengths([1, 4, 2])
    cache.advance()
    assert cache.seqlens.tolist() == [2, 5, 3] and cache.host_seqlens == [2, 5, 3]
    with pytest.raises(ValueError, match="overflow"):
        cache.check_room(1)
    cache.k[:, 2].fill_(7.0)
    cache.select_rows([2, 0])
    assert cache.batch == 2 and cache.host_seqlens == [3, 2] and cache.seqlens.tolist() == [3, 2]
    assert bool((cache.k[:, 0] == 7.0).all()) and not bool((cache.k[:, 1] == 7.0).any())
    with pytest.raises(ValueError, match="lengths"):
        cache.set_lengths([1, 2, 3])
    heads = KVCache(2, 3, 5, 2, 4, torch.float32, "cpu", heads_first=True)
    assert heads.heads_first and heads.layer(1)[0].shape == (3, 2, 5, 4) and heads.layer(1)[0].is_contiguous()
    heads.k[:, 2].fill_(7.0)
    heads.select_rows([2])
    assert heads.batch == 1 and bool((heads.k == 7.0).all())


def test_heads_first_cache_holds_what_the_default_one_does(tiny):
    """prefill_rows (the CPU session's prefill) writes the same keys and values into a heads-first cache, transposed;
    the batch ops refuse that layout with a clear error instead of writing it wrong."""
    _, ours = tiny
    semantic = ours.semantic
    ragged = [torch.randn(n, semantic.config.hidden_size, generator=torch.Generator().manual_seed(n)) for n in (3, 6)]
    cfg = semantic.config
    default = semantic.new_cache(2, 8)
    heads = KVCache(cfg.num_layers, 2, 8, cfg.num_heads, cfg.head_dim, torch.float32, "cpu", heads_first=True)
    with torch.no_grad():
        a = semantic.prefill_rows(ragged, default)
        b = semantic.prefill_rows(ragged, heads)
    assert torch.equal(a, b) and heads.host_seqlens == default.host_seqlens == [3, 6]
    assert torch.equal(heads.k.transpose(2, 3), default.k) and torch.equal(heads.v.transpose(2, 3), default.v)
    with pytest.raises(ValueError, match="heads-first"):
        semantic.prefill(ragged[0][None], heads)
    with pytest.raises(ValueError, match="heads-first"):
        semantic.decode_step(torch.zeros(2, dtype=torch.long), heads)


def test_attn_implementation_mapping(tiny):
    _, ours = tiny
    cfg = ours.config
    assert bark.config.attn_backend_name("flash_attention_2") == "flash_attn"
    assert bark.config.attn_backend_name("auto") is None
    with pytest.raises(ValueError, match="attn_implementation"):
        bark.config.attn_backend_name("xformers")
    ours.attn_implementation = "sdpa"
    try:
        assert ours.attn_backend == "sdpa"
        assert ours.semantic.attn_backend == ours.coarse_acoustics.attn_backend == ours.fine_acoustics.attn_backend
    finally:
        ours.attn_implementation = "eager"
    missing = [n for n in ("cuda", "flash_attention_2") if bark.config.attn_backend_name(n) not in bk.available_backends()]
    for name in missing:
        with pytest.raises(ValueError, match="not available"):
            ours.attn_implementation = name
    assert ours.attn_implementation == "eager" and cfg is ours.config


def test_real_shapes_configs():
    small, large = bark.bark_small_config(), bark.bark_config()
    assert (small.semantic_config.hidden_size, small.semantic_config.num_layers) == (768, 12)
    assert (large.semantic_config.hidden_size, large.semantic_config.num_layers) == (1024, 24)
    for cfg in (small, large):
        assert cfg.semantic_config.input_vocab_size == 129_600 and cfg.semantic_config.output_vocab_size == 10_048
        assert cfg.coarse_acoustics_config.output_vocab_size == 12_096
        assert cfg.fine_acoustics_config.output_vocab_size == 1056
        assert cfg.codec_config.num_quantizers >= 8
    with torch.device("meta"):
        model = bark.BarkModel(small)
    assert model.semantic.layers[0].attn.att_proj.weight.shape == (3 * 768, 768)
    assert model.fine_acoustics.lm_heads[6].weight is model.fine_acoustics.input_embeds_layers[7].weight


def test_config_rejects_inconsistent_token_ids():
    with pytest.raises(ValueError, match="text_pad_token"):
        bark.BarkConfig(semantic_config=dict(input_vocab_size=10_048, output_vocab_size=10_048))
    with pytest.raises(ValueError, match="divisible"):
        bark.BarkSemanticConfig(hidden_size=30, num_heads=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_reads_nothing_back_from_the_device(tiny, backend, monkeypatch):
    """A decode step must be capturable as a CUDA graph: no .item()/.tolist()/bool()/int() on tensors inside.

    The one read the sdpa/eager backends allow themselves is bounded to CPU tensors (where it costs no device sync):
    ``used_cache_length``. It is replaced here by what it does for a device tensor (test below), so that every other
    read still fails this test."""
    from bark_kernels.backends import _common

    _, ours = tiny
    monkeypatch.setattr(_common, "used_cache_length", lambda cache_seqlens, seqlen_new, max_seqlen: max_seqlen)
    model = ours.coarse_acoustics
    model.attn_backend = backend
    try:
        with torch.no_grad():
            cache = model.new_cache(batch=2, max_seqlen=12)
            model.prefill_varlen([model.embed(torch.arange(5)), model.embed(torch.arange(8))], cache)
            ids = torch.tensor([3, 4])

            def forbidden(*args, **kwargs):
                raise AssertionError("host sync inside a decode step")

            for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
                monkeypatch.setattr(torch.Tensor, name, forbidden)
            hidden = model.decode_step(ids, cache)
            hidden = model.decode_step(ids, cache)
            monkeypatch.undo()
        assert cache.host_seqlens == [7, 10] and cache.seqlens.tolist() == [7, 10]
        assert hidden.shape == (2, model.config.hidden_size)
    finally:
        monkeypatch.undo()
        model.attn_backend = "eager"


def test_used_cache_length_reads_only_cpu_tensors():
    """The sdpa/eager decode shortcut: on CPU it trims the cache to the longest row; on any other device (meta here,
    standing in for CUDA) it must not read the tensor and returns the whole cache."""
    from bark_kernels.backends import _common

    lens = torch.tensor([3, 7], dtype=torch.int32)
    assert _common.used_cache_length(lens, 1, 12) == 8
    assert _common.used_cache_length(lens, 0, 5) == 5
    assert _common.used_cache_length(lens.to("meta"), 1, 12) == 12


@pytest.mark.gpu
def test_decode_step_on_cuda_does_not_synchronize(tiny):
    """On CUDA, decode steps of every backend that serves the decode op run under torch's sync debug mode "error":
    no op inside them waits for the device (item/tolist, nonzero, masked indexing, blocking copies...). The first
    step runs outside it (Triton compiles on first use)."""
    import copy

    _, ours = tiny
    device = torch.device("cuda")
    model = copy.deepcopy(ours.coarse_acoustics).to(device)
    names = [n for n in bk.available_backends()
             if registry.why_not(n, "attention_with_kvcache", device, torch.float32, model.config.head_dim) is None]
    assert names, "no bark_kernels backend serves the decode op on CUDA in fp32"
    for name in names:
        model.attn_backend = name
        with torch.no_grad():
            cache = model.new_cache(batch=2, max_seqlen=16)
            model.prefill_varlen([model.embed(torch.arange(5, device=device)),
                                  model.embed(torch.arange(8, device=device))], cache)
            ids = torch.tensor([3, 4], device=device)
            model.decode_step(ids, cache)  # compile / lazy initialisation
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                hidden = model.decode_step(ids, cache)
                hidden = model.decode_step(ids, cache)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert cache.host_seqlens == [8, 11] and cache.seqlens.tolist() == [8, 11], name
        assert hidden.shape == (2, model.config.hidden_size) and torch.isfinite(hidden).all(), name
