"""transformers' own BarkModel with attn_implementation="triton" (and our other names) against attn_implementation="eager".

Tiny random models that keep Bark's real vocabularies and special token ids (semantic 129600 -> 10048, coarse 12096,
fine 1056 x 8 codebooks, codebook 1024) with small widths, short windows and a tiny EnCodec, so generate runs the
real semantic -> coarse -> fine -> codec pipeline in a few seconds. Weights are re-drawn with a larger spread than
transformers' init so attention is peaked and a wrong mask changes the result.
"""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys

import pytest
import torch
from conftest import backends_for

import bark_kernels
from bark_kernels import registry
from bark_kernels.testing import MODEL_RTOL, TOLERANCES

transformers = pytest.importorskip("transformers")
hf_integration = pytest.importorskip("bark_kernels.integrations.transformers")
try:
    hf_integration.check_supported()
except RuntimeError as exc:  # an installed transformers this integration does not support: nothing to test here
    pytest.skip(str(exc), allow_module_level=True)
from transformers.models.bark import modeling_bark  # noqa: E402
from transformers.models.bark.generation_configuration_bark import (  # noqa: E402
    BarkGenerationConfig,
    BarkSemanticGenerationConfig,
)

RTOL_FP32_MODEL = MODEL_RTOL[torch.float32]  # model-level parity against transformers, from the one table

# Our attn_implementation names whose backend can run on this machine's CPU (triton: under TRITON_INTERPRET=1).
_BACKEND_OF = {"triton": "triton", "bark_torch": "sdpa", "bark_eager": "eager"}
IMPLS = [name for name, backend in _BACKEND_OF.items() if backend in backends_for("cpu")]
assert "bark_torch" in IMPLS and "bark_eager" in IMPLS, IMPLS
GENERATE_IMPLS = [name for name in IMPLS if name != "bark_eager"]  # bark_eager only checks the plumbing, in forwards

HIDDEN, HEADS, LAYERS, BLOCK = 32, 2, 2, 64

# transformers 5.24 names the cache argument `cache`, 5.17 `past_key_values`.
_CACHE_KW = "cache" if "cache" in inspect.signature(modeling_bark.BarkCausalModel.forward).parameters \
    else "past_key_values"


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _sub_config(input_vocab, output_vocab, **extra):
    return dict(block_size=BLOCK, input_vocab_size=input_vocab, output_vocab_size=output_vocab, num_layers=LAYERS,
                num_heads=HEADS, hidden_size=HIDDEN, dropout=0.0, bias=True, **extra)


def _bark_config(**kwargs):
    codec = transformers.EncodecConfig(hidden_size=16, num_filters=4, codebook_size=1024,
                                       target_bandwidths=[1.5, 3.0, 6.0])  # 6 kbps / (75 Hz * 10 bits) = 8 codebooks
    return transformers.BarkConfig(
        semantic_config=_sub_config(129_600, 10_048),
        coarse_acoustics_config=_sub_config(12_096, 12_096),
        fine_acoustics_config=_sub_config(1_056, 1_056, n_codes_total=8, n_codes_given=1),
        codec_config=codec.to_dict(),
        **kwargs,
    )


def _generation_config():
    # Bark's token ids and rates, short windows: prefill 17 semantic positions, coarse windows of 8, fine input 32.
    # BarkModel.generate reads the sub-configs as dicts, as a checkpoint's generation_config.json provides them.
    return transformers.GenerationConfig.from_dict(BarkGenerationConfig(
        semantic_config=dict(max_input_semantic_length=16),
        coarse_acoustics_config=dict(max_coarse_input_length=16, max_coarse_history=20, sliding_window_len=8),
        fine_acoustics_config=dict(max_fine_history_length=16, max_fine_input_length=32),
        codebook_size=1024,
    ).to_dict())


@pytest.fixture(scope="module")
def eager_model():
    torch.manual_seed(0)
    model = transformers.BarkModel(_bark_config(attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("codec_model."):
                continue
            if p.dim() >= 2:  # embeddings, projections, heads: peaked attention, spread-out logits
                p.normal_(0.0, 0.25)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
        for layer in model.codec_model.quantizer.layers:  # HF initialises codebooks to zeros: make them random
            layer.codebook.embed.normal_()
    model.generation_config = _generation_config()
    return model


_twins: dict = {}


def _twin(eager_model, impl):
    """The same weights under attn_implementation=impl (strict load: same parameters and buffers); built once."""
    key = (id(eager_model), impl)
    if key not in _twins:
        model = transformers.BarkModel(_bark_config(attn_implementation=impl)).eval()
        model.load_state_dict(eager_model.state_dict(), strict=True)
        model.generation_config = eager_model.generation_config
        _twins[key] = model
    return _twins[key]


def _bark_attention_modules(model):
    return [m for m in model.modules() if isinstance(m, modeling_bark.BarkSelfAttention)]


class _DispatchLog:
    """Wraps registry.select: records (op, backend, Sq, Sk) of every attention call that reaches a backend op."""

    def __init__(self, monkeypatch):
        self.calls = []
        real_select = registry.select

        def select(op, device, dtype, head_dim, backend=None, **kw):
            name, fn = real_select(op, device, dtype, head_dim, backend, **kw)

            def logged(*args, **kwargs):
                q, k = args[0], args[1]
                self.calls.append((op, name, q.shape[-3] if q.dim() == 4 else None, k.shape[-3] if k.dim() == 4
                                   else None))
                return fn(*args, **kwargs)

            return name, logged

        monkeypatch.setattr(registry, "select", select)

    def ops(self, op):
        return [c for c in self.calls if c[0] == op]


# ----------------------------------------------------------------------------------------------------------------------
# registration and loading


def test_registered_names_and_modules(eager_model):
    assert set(hf_integration.IMPLEMENTATIONS) <= set(modeling_bark.BARK_ATTENTION_CLASSES)
    for name in hf_integration.IMPLEMENTATIONS:
        assert "flash" not in name and "sdpa" not in name, name
        assert name in transformers.AttentionInterface._global_mapping
        assert name in transformers.masking_utils.AttentionMaskInterface._global_mapping
    model = _twin(eager_model, "triton")
    mods = _bark_attention_modules(model)
    assert len(mods) == 3 * LAYERS
    assert all(m.bark_kernels_backend == "triton" for m in mods)
    assert sum(m.is_causal for m in mods) == 2 * LAYERS  # semantic, coarse causal; fine not
    assert bark_kernels.register_transformers() == list(hf_integration.IMPLEMENTATIONS)  # idempotent


def test_from_pretrained_and_config(eager_model, tmp_path):
    # save a twin that keeps its default generation config (saving a BarkGenerationConfig fails validation in 5.24)
    saved = transformers.BarkModel(_bark_config(attn_implementation="eager"))
    saved.load_state_dict(eager_model.state_dict(), strict=True)
    saved.save_pretrained(tmp_path)
    model = transformers.BarkModel.from_pretrained(tmp_path, attn_implementation="triton")
    assert model.config._attn_implementation == "triton"
    assert model.semantic.config._attn_implementation == "triton"
    mods = _bark_attention_modules(model)
    assert mods and all(m.bark_kernels_name == "triton" for m in mods)
    ref = eager_model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key
    config = _bark_config()
    config._attn_implementation = "bark_cuda"  # building does not need CUDA; running does
    built = transformers.BarkModel(config)
    assert all(m.bark_kernels_backend == "cuda" for m in _bark_attention_modules(built))


def test_use_bark_kernels_switches_a_loaded_model(eager_model):
    model = copy.deepcopy(eager_model)
    ids = torch.randint(0, 10_048, (2, 9), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = eager_model.semantic(ids, attention_mask=mask, use_cache=False).logits
        assert bark_kernels.integrations.use_bark_kernels(model, "bark_torch") is model  # the light wrapper
        assert {type(m).__name__ for m in _bark_attention_modules(model)} == {"BarkKernelsSelfAttentionBarkTorch"}
        assert model.semantic.config._attn_implementation == "bark_torch"
        out = model.semantic(ids, attention_mask=mask, use_cache=False).logits
        assert _rel_err(out[mask.bool()], ref[mask.bool()]) <= RTOL_FP32_MODEL
        hf_integration.use_bark_kernels(model, "eager")
        assert {type(m) for m in _bark_attention_modules(model)} == {modeling_bark.BarkSelfAttention}
    with pytest.raises(ValueError, match="attn_implementation"):
        hf_integration.use_bark_kernels(model, "flash_attention_2")


def test_lazy_registration_in_a_fresh_process():
    code = (
        "import sys, bark_kernels\n"
        "assert 'transformers' not in sys.modules, 'import bark_kernels imported transformers'\n"
        "from transformers.models.bark import modeling_bark as mb\n"
        "assert 'triton' in mb.BARK_ATTENTION_CLASSES, list(mb.BARK_ATTENTION_CLASSES)\n"
        "assert mb.__loader__.__class__.__name__ != '_RegisteringLoader'\n"
        "assert not any(type(h).__name__ == '_BarkImportHook' for h in sys.meta_path)\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_immediate_registration_and_env_switch(monkeypatch):
    """Bark's module already imported: auto registration happens at once; BARK_KERNELS_TRANSFORMERS=0 switches it off."""
    from bark_kernels import integrations

    table = modeling_bark.BARK_ATTENTION_CLASSES
    before = table["triton"]
    del table["triton"]
    monkeypatch.setenv(integrations.ENV_AUTO, "0")
    integrations.auto_register_transformers()
    assert "triton" not in table
    monkeypatch.setenv(integrations.ENV_AUTO, "1")
    integrations.auto_register_transformers()
    assert table["triton"] is not before and issubclass(table["triton"], modeling_bark.BarkSelfAttention)
    assert integrations.auto_registration_error() is None
    _twins.clear()  # twins built with the previous classes would still work; rebuild anyway


def test_unsupported_version_is_a_clear_error(monkeypatch):
    # the transformers module object the integration reads (transformers re-creates its top-level module in
    # sys.modules on some imports, so the test module's own reference may be another object)
    monkeypatch.setattr(hf_integration.transformers, "__version__", "4.46.3")
    with pytest.raises(RuntimeError, match=r"transformers 4\.46\.3 is not supported.*>= 4\.54"):
        bark_kernels.register_transformers(force=True)


def test_other_models_refuse_our_names():
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    config._attn_implementation = "triton"
    model = transformers.GPT2Model(config).eval()
    with pytest.raises(NotImplementedError, match="Bark models only"):
        model(torch.zeros(1, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------------
# numerics against eager


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_causal_forward_matches_eager(eager_model, impl, monkeypatch):
    model = _twin(eager_model, impl)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 10_048, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    log = _DispatchLog(monkeypatch)
    with torch.no_grad():
        ref = eager_model.semantic(input_ids, attention_mask=mask, use_cache=False).logits
        out = model.semantic(input_ids, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()
    assert _rel_err(out[keep], ref[keep]) <= RTOL_FP32_MODEL
    varlen = log.ops("attention_varlen")
    assert len(varlen) == LAYERS and all(c[1] == _BACKEND_OF[impl] for c in varlen), log.calls
    assert not log.ops("attention")  # the mask was not dropped: every layer took the varlen path


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_prefill_then_decode_with_cache_matches_eager(eager_model, impl, monkeypatch):
    model = _twin(eager_model, impl)
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 12_096, (2, 10), generator=gen)
    next_ids = torch.randint(0, 12_096, (2, 1), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding, as a batched prompt would have
    mask_next = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    log = _DispatchLog(monkeypatch)
    results = []
    with torch.no_grad():
        for m in (eager_model, model):
            first = m.coarse_acoustics(input_ids, attention_mask=mask, use_cache=True)
            cache = getattr(first, _CACHE_KW)
            second = m.coarse_acoustics(next_ids, attention_mask=mask_next, use_cache=True, **{_CACHE_KW: cache})
            results.append((first.logits, second.logits))
    keep = mask.bool()
    assert _rel_err(results[1][0][keep], results[0][0][keep]) <= RTOL_FP32_MODEL
    assert _rel_err(results[1][1], results[0][1]) <= RTOL_FP32_MODEL
    # the mask was kept in both: the prefill took the varlen path in every layer, the decode step (one query) the
    # KV-cache path over the kept keys (no host sync), every layer
    assert len(log.ops("attention_varlen")) == LAYERS, log.calls
    decode = log.ops("attention_with_kvcache")
    assert len(decode) == LAYERS and all(c[1] == _BACKEND_OF[impl] for c in decode), log.calls
    assert not log.ops("attention"), log.calls


@pytest.mark.parametrize("impl", IMPLS)
def test_fine_model_noncausal_forward_matches_eager(eager_model, impl, monkeypatch):
    model = _twin(eager_model, impl)
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 1_056, (2, 24, 8), generator=gen)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 17:] = 0
    log = _DispatchLog(monkeypatch)
    with torch.no_grad():
        for codebook_idx in (1, 5):
            ref = eager_model.fine_acoustics(codebook_idx, input_ids).logits
            out = model.fine_acoustics(codebook_idx, input_ids).logits
            assert _rel_err(out, ref) <= RTOL_FP32_MODEL
        ref = eager_model.fine_acoustics(3, input_ids, attention_mask=mask).logits
        out = model.fine_acoustics(3, input_ids, attention_mask=mask).logits
    keep = mask.bool()
    assert _rel_err(out[keep], ref[keep]) <= RTOL_FP32_MODEL
    dense = log.ops("attention")
    assert len(dense) == 2 * LAYERS and all(c[1] == _BACKEND_OF[impl] for c in dense), log.calls
    assert len(log.ops("attention_varlen")) == LAYERS


@pytest.mark.parametrize("impl", GENERATE_IMPLS)
def test_generate_matches_eager_and_decode_runs_on_our_kernels(eager_model, impl, monkeypatch):
    model = _twin(eager_model, impl)
    input_ids = torch.randint(1_000, 20_000, (1, 16), generator=torch.Generator().manual_seed(4))  # 16 text tokens
    kwargs = dict(semantic_max_new_tokens=4)
    with torch.no_grad():
        torch.manual_seed(0)
        ref_audio = eager_model.generate(input_ids, **kwargs)
        log = _DispatchLog(monkeypatch)
        torch.manual_seed(0)
        audio = model.generate(input_ids, **kwargs)
    assert ref_audio.shape == audio.shape and ref_audio.shape[-1] > 0
    assert torch.equal(audio, ref_audio)  # same tokens all the way down -> the very same audio
    # A cached decode step is (Sq=1, Sk=past+1): through `attention` without a mask (transformers 5.24 passes none),
    # through `attention_with_kvcache` over the kept keys when a mask comes with it (5.17 passes one of ones).
    attention = log.ops("attention") + log.ops("attention_with_kvcache")
    assert attention and all(c[1] == _BACKEND_OF[impl] for c in attention)
    decode_steps = [c for c in attention if c[2] == 1 and c[3] > 1]
    prefills = [c for c in attention if c[0] == "attention" and c[2] > 1 and c[2] == c[3]]
    assert len(decode_steps) >= 2 * LAYERS, attention  # semantic and coarse decode steps, every layer
    assert len(decode_steps) % LAYERS == 0 and len(prefills) % LAYERS == 0
    assert len(decode_steps) + len(prefills) == len(log.calls)  # nothing else reached a backend


@pytest.mark.parametrize("impl", GENERATE_IMPLS)
def test_semantic_decode_count(eager_model, impl, monkeypatch):
    """Every generated token after the first is one decode step per layer through the dispatcher."""
    model = _twin(eager_model, impl)
    config = BarkSemanticGenerationConfig(**model.generation_config.semantic_config)
    input_ids = torch.randint(1_000, 20_000, (1, 16), generator=torch.Generator().manual_seed(5))
    log = _DispatchLog(monkeypatch)
    with torch.no_grad():
        out = model.semantic.generate(input_ids, semantic_generation_config=config, max_new_tokens=5)
        ref = eager_model.semantic.generate(input_ids, semantic_generation_config=config, max_new_tokens=5)
    assert torch.equal(out, ref)
    n_new = out.shape[1]
    calls = log.ops("attention") + log.ops("attention_with_kvcache")  # a decode step with a mask: the latter (5.17)
    prefill = [c for c in calls if c[2] == 17]
    decode = [c for c in calls if c[2] == 1]
    assert len(prefill) == LAYERS
    assert len(decode) == LAYERS * (n_new - 1)
    assert sorted({c[3] for c in decode}) == list(range(18, 17 + n_new))  # Sk grows by one per step
    assert len(log.calls) == len(prefill) + len(decode)


def test_output_attentions_match_eager(eager_model):
    model = _twin(eager_model, "bark_torch")
    input_ids = torch.randint(0, 10_048, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = eager_model.semantic(input_ids, use_cache=False, output_attentions=True)
        out = model.semantic(input_ids, use_cache=False, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == LAYERS
    for got, want in zip(out.attentions, ref.attentions, strict=True):
        assert got.shape == want.shape == (2, HEADS, 7, 7)
        assert _rel_err(got, want) <= RTOL_FP32_MODEL
    assert _rel_err(out.logits, ref.logits) <= RTOL_FP32_MODEL
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():  # with a padding mask too: transformers' eager computation, the very same weights
        ref = eager_model.semantic(input_ids, attention_mask=mask, use_cache=False, output_attentions=True)
        out = model.semantic(input_ids, attention_mask=mask, use_cache=False, output_attentions=True)
    for got, want in zip(out.attentions, ref.attentions, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(out.logits, ref.logits)


def test_four_d_mask_is_eagers_and_static_cache_is_refused(eager_model):
    """A ready-made 4-D mask (assisted decoding builds one) is added as transformers' eager adds it: the same logits;
    masks of other ranks and static caches are refused."""
    model = _twin(eager_model, "bark_torch")
    input_ids = torch.randint(0, 10_048, (1, 6))
    mask_4d = torch.zeros(1, 1, 6, 6)
    mask_4d[..., :2] = torch.finfo(torch.float32).min  # the first two keys hidden from every query
    with torch.no_grad():
        out = model.semantic(input_ids, attention_mask=mask_4d, use_cache=False).logits
        ref = eager_model.semantic(input_ids, attention_mask=mask_4d, use_cache=False).logits
    assert torch.equal(out, ref)
    with torch.no_grad(), pytest.raises(ValueError, match="attention_mask"):
        model.semantic(input_ids, attention_mask=torch.ones(1, 1, 6, dtype=torch.bool), use_cache=False)
    cache = transformers.StaticCache(config=model.semantic.config, max_cache_len=32)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="DynamicCache"):
        model.semantic(input_ids, use_cache=True, **{_CACHE_KW: cache})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["triton", "bark_cuda"])
def test_cuda_fp16_forwards_within_twice_eager_error(eager_model, impl):
    """On the GPU in fp16: our kernels' error against an fp64 eager model is at most the table's ratio times the
    error of eager fp16 (plus its floor), for a padded causal prefill, a cached decode step and the fine model."""
    backend = hf_integration.IMPLEMENTATIONS[impl]
    reason = registry.why_not(backend, "attention", torch.device("cuda"), torch.float16, HIDDEN // HEADS)
    if reason is not None:
        pytest.skip(f"{impl}: backend {backend!r} cannot run here: {reason}")
    tol = TOLERANCES[torch.float16]
    ref64 = copy.deepcopy(eager_model).to("cuda", torch.float64)
    eager16 = copy.deepcopy(eager_model).to("cuda", torch.float16)
    ours16 = copy.deepcopy(_twin(eager_model, impl)).to("cuda", torch.float16)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 10_048, (2, 12), generator=gen).cuda()
    next_ids = torch.randint(0, 10_048, (2, 1), generator=gen).cuda()
    fine_ids = torch.randint(0, 1_056, (2, 24, 8), generator=gen).cuda()
    mask = torch.ones(2, 12, dtype=torch.long, device="cuda")
    mask[0, :5] = 0
    keep = mask.bool()

    def run(m):
        with torch.no_grad():
            padded = m.semantic(ids, attention_mask=mask, use_cache=False).logits[keep]
            first = m.coarse_acoustics(ids, use_cache=True)
            step = m.coarse_acoustics(next_ids, use_cache=True, **{_CACHE_KW: getattr(first, _CACHE_KW)}).logits
            fine = m.fine_acoustics(2, fine_ids).logits
        return padded, first.logits, step, fine

    for name, want, base, got in zip(("padded prefill", "prefill", "decode step", "fine"), run(ref64), run(eager16),
                                     run(ours16), strict=True):
        err_eager, err_ours = _rel_err(base, want), _rel_err(got, want)
        assert err_ours <= tol.ratio * err_eager + tol.floor, (name, err_ours, err_eager)
