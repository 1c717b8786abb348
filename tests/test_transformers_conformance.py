"""What transformers' own Bark tests exercise, with our attention against transformers' eager, at their tiny sizes.

transformers' ``tests/models/bark/test_modeling_bark.py`` builds its models with hidden 16 and 2 heads (head_dim 8),
vocabularies of 33 and batches of 3 x 4 tokens with random padding. The same here, for every one of our names that
runs on this machine: generate (greedy, sampling, beam search) through ``GenerationMixin``, batching equivalence, left
padding, continuing from the cache (with padding in the new tokens), save/load, attention weights with a padding mask
(prefill and cached decode), fp16, the padded decode step without a host sync, and the build-time error of an explicit
backend that cannot serve the head_dim. (transformers' own file itself runs with ``scripts/transformers_bark_tests.py``.)
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from conftest import backends_for

from bark_kernels import registry
from bark_kernels.testing import MODEL_RTOL, TOLERANCES

transformers = pytest.importorskip("transformers")
hf_integration = pytest.importorskip("bark_kernels.integrations.transformers")
try:
    hf_integration.check_supported()
except RuntimeError as exc:
    pytest.skip(str(exc), allow_module_level=True)
from transformers.models.bark import modeling_bark  # noqa: E402

# transformers 5.24 names the cache argument `cache` (and its output field), 5.17 `past_key_values`
_CACHE_KW = "cache" if "cache" in inspect.signature(modeling_bark.BarkCausalModel.forward).parameters \
    else "past_key_values"

_BACKEND_OF = {"triton": "triton", "bark_torch": "sdpa"}
IMPLS = [name for name, backend in _BACKEND_OF.items() if backend in backends_for("cpu")]
RTOL = MODEL_RTOL[torch.float32]
VOCAB, HIDDEN, HEADS, LAYERS = 33, 16, 2, 2  # transformers' BarkSemanticModelTester: head_dim 8


def _config(kind="semantic", **extra):
    cls = {"semantic": transformers.BarkSemanticConfig, "fine": transformers.BarkFineConfig}[kind]
    fine = dict(n_codes_total=8, n_codes_given=1) if kind == "fine" else {}
    return cls(input_vocab_size=VOCAB, output_vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS,
               num_heads=HEADS, block_size=64, dropout=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
               pad_token_id=VOCAB - 1, **fine, **extra)


def _pair(impl, kind="semantic", seed=0):
    """(eager model, our model) with the same weights, spread out so that attention is peaked."""
    cls = modeling_bark.BarkCausalModel if kind == "semantic" else modeling_bark.BarkFineModel
    torch.manual_seed(seed)
    eager = cls(_config(kind, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in eager.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    ours = cls(_config(kind, attn_implementation=impl)).eval()
    ours.load_state_dict(eager.state_dict(), strict=True)
    assert all(type(m).__name__.startswith("BarkKernels") for m in ours.modules()
               if isinstance(m, modeling_bark.BarkSelfAttention))
    return eager, ours


def _inputs(batch=3, seqlen=4, seed=1, left=True):
    """ids (B, T) and a padding mask with at least one kept token per row (left padding by default, as generate)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (batch, seqlen), generator=gen)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    if left:
        mask[0, :2] = 0
        mask[2, :1] = 0
    else:
        mask[1, -2:] = 0
    return ids, mask


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_generate_matches_eager(impl, mode):
    eager, ours = _pair(impl)
    ids, mask = _inputs()
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, pad_token_id=VOCAB - 1)
    kwargs.update({"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=0),
                   "beam": dict(do_sample=False, num_beams=2)}[mode])
    with torch.no_grad():
        outs = []
        for model in (eager, ours):
            torch.manual_seed(5)
            outs.append(model.generate(ids, attention_mask=mask, **kwargs))
    assert outs[0].shape == (3, 4 + 5)
    assert torch.equal(outs[0], outs[1]), (mode, outs)


@pytest.mark.parametrize("impl", IMPLS)
def test_batching_equivalence_and_left_padding(impl):
    """A row alone gives what it gives in the padded batch (kept positions), and a left-padded row's last logits equal
    those of the same tokens unpadded; all of it equal to eager's."""
    eager, ours = _pair(impl)
    ids, mask = _inputs(batch=3, seqlen=6)
    with torch.no_grad():
        batch_ours = ours(ids, attention_mask=mask).logits
        batch_eager = eager(ids, attention_mask=mask).logits
        keep = mask.bool()
        assert _rel(batch_ours[keep], batch_eager[keep]) <= RTOL
        for b in range(3):
            kept = ids[b][keep[b]][None]  # the row's tokens without padding, from position 0
            alone = ours(kept).logits[0]  # (T_b, V)
            # left padding shifts positions in Bark (absolute position embeddings): only the unshifted row compares
            if bool(keep[b].all()):
                assert _rel(batch_ours[b], alone) <= RTOL
        row = ids[0][keep[0]][None]
        padded = torch.cat([torch.full((1, 2), VOCAB - 1), row], dim=1)
        padded_mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(row)], dim=1)
        last_ours = ours(padded, attention_mask=padded_mask).logits[:, -1]
        last_eager = eager(padded, attention_mask=padded_mask).logits[:, -1]
    assert _rel(last_ours, last_eager) <= RTOL


@pytest.mark.parametrize("impl", IMPLS)
def test_continue_from_past_key_values(impl):
    """transformers' create_and_check_decoder_model_past_large_inputs: 3 new tokens with random padding in their
    mask, after a padded prefill, equal the whole sequence run at once; and equal eager's."""
    eager, ours = _pair(impl)
    ids, mask = _inputs(batch=3, seqlen=4)
    gen = torch.Generator().manual_seed(3)
    next_ids = torch.randint(0, VOCAB - 1, (3, 3), generator=gen)
    next_mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 1]])
    full_ids, full_mask = torch.cat([ids, next_ids], 1), torch.cat([mask, next_mask], 1)
    results = {}
    with torch.no_grad():
        for name, model in (("eager", eager), ("ours", ours)):
            first = model(ids, attention_mask=mask, use_cache=True)
            cache = getattr(first, _CACHE_KW)
            cont = model(next_ids, attention_mask=full_mask, **{_CACHE_KW: cache}).logits
            whole = model(full_ids, attention_mask=full_mask).logits[:, -3:]
            results[name] = (cont, whole)
    keep = next_mask.bool()
    cont, whole = results["ours"]
    assert _rel(cont[keep], whole[keep]) <= RTOL
    assert _rel(cont[keep], results["eager"][0][keep]) <= RTOL


@pytest.mark.parametrize("impl", IMPLS)
def test_save_and_load(impl, tmp_path):
    eager, ours = _pair(impl)
    ours.save_pretrained(tmp_path)
    loaded = modeling_bark.BarkCausalModel.from_pretrained(tmp_path, attn_implementation=impl).eval()
    assert loaded.config._attn_implementation == impl
    ids, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_weights_with_padding_mask_equal_eager(impl):
    """output_attentions=True with a padding mask, prefill and a cached decode step (causal) and the fine model
    (not causal): the weights and outputs are transformers' eager ones, bit for bit."""
    eager, ours = _pair(impl)
    ids, mask = _inputs(batch=3, seqlen=5)
    step = torch.randint(0, VOCAB - 1, (3, 1), generator=torch.Generator().manual_seed(4))
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        runs = []
        for model in (eager, ours):
            first = model(ids, attention_mask=mask, use_cache=True, output_attentions=True)
            cache = getattr(first, _CACHE_KW)
            second = model(step, attention_mask=step_mask, output_attentions=True, **{_CACHE_KW: cache})
            runs.append((first, second))
    for want, got in zip(runs[0], runs[1], strict=True):
        assert len(got.attentions) == LAYERS
        for w, g in zip(want.attentions, got.attentions, strict=True):
            assert torch.equal(g, w)
        assert torch.equal(got.logits, want.logits)
    fine_eager, fine_ours = _pair(impl, kind="fine")
    fine_ids = torch.randint(0, VOCAB - 1, (3, 5, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = fine_eager(2, fine_ids, attention_mask=mask, output_attentions=True)
        got = fine_ours(2, fine_ids, attention_mask=mask, output_attentions=True)
    for w, g in zip(want.attentions, got.attentions, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_within_twice_eager_error_and_generates(impl):
    """fp16: our logits' error against an fp64 run is at most the table's ratio times eager fp16's (plus its floor),
    padded prefill and decode step; fp16 generate runs (transformers' test_generate_fp16)."""
    eager, ours = _pair(impl)
    ref64 = modeling_bark.BarkCausalModel(_config(attn_implementation="eager")).eval()
    ref64.load_state_dict(eager.state_dict())
    ref64, eager16, ours16 = ref64.double(), eager.half(), ours.half()
    ids, mask = _inputs(batch=3, seqlen=6)
    keep = mask.bool()
    tol = TOLERANCES[torch.float16]
    with torch.no_grad():
        want, base, got = (m(ids, attention_mask=mask).logits[keep] for m in (ref64, eager16, ours16))
        assert _rel(got, want) <= tol.ratio * _rel(base, want) + tol.floor
        out = ours16.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                              pad_token_id=VOCAB - 1)
    assert out.shape == (3, 9)


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_decode_step_makes_no_host_sync(impl, monkeypatch):
    """A cached decode step of a left-padded batch reads nothing back to the host (no item/tolist/bool/int/float):
    the kept keys are gathered on the device and attended as a KV cache, with no bounds read."""
    from bark.session import no_host_reads
    from bark_kernels.backends import _common

    # the sdpa/eager ops trim a CPU cache with one read of its lengths; on a device they do not: take that path
    monkeypatch.setattr(_common, "used_cache_length", lambda cache_seqlens, seqlen_new, max_seqlen: max_seqlen)
    eager, ours = _pair(impl)
    ids, mask = _inputs(batch=3, seqlen=5)
    step = torch.randint(0, VOCAB - 1, (3, 1), generator=torch.Generator().manual_seed(6))
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = []
        for model in (eager, ours):
            first = model(ids, attention_mask=mask, use_cache=True)  # the prefill may read the mask once
            cache = getattr(first, _CACHE_KW)
            if model is ours:
                with no_host_reads():
                    logits.append(model(step, attention_mask=step_mask, **{_CACHE_KW: cache}).logits)
            else:
                logits.append(model(step, attention_mask=step_mask, **{_CACHE_KW: cache}).logits)
    assert _rel(logits[1], logits[0]) <= RTOL


def test_explicit_backend_that_cannot_serve_the_head_dim_fails_when_built():
    """bark_cuda (CUDA kernels for head_dim 16, 32, 64, 96, 128) asked for a head_dim 8 model: a clear error when the
    model is built, not at its first forward; the automatic name builds (the dispatcher picks a backend)."""
    with pytest.raises(ValueError, match=r"bark_cuda.*head_dim 8.*supported: \[16, 32, 64, 96, 128\]"):
        modeling_bark.BarkCausalModel(_config(attn_implementation="bark_cuda"))
    modeling_bark.BarkCausalModel(_config(attn_implementation="bark_kernels"))
    modeling_bark.BarkCausalModel(_config(attn_implementation="triton"))


def test_bark_model_explicit_backend_head_dim_fails_when_built(monkeypatch):
    import bark
    import bark_kernels as bk

    config = bark.bark_small_config()
    for sub in (config.semantic_config, config.coarse_acoustics_config, config.fine_acoustics_config):
        sub.hidden_size, sub.num_heads, sub.num_layers = 16, 2, 1  # head_dim 8
    monkeypatch.setattr(bk, "available_backends", lambda: ["triton", "cuda", "sdpa", "eager"])  # as on a GPU
    with pytest.raises(ValueError, match=r"'cuda' cannot serve this model's head_dim 8"):
        bark.BarkModel(config, attn_implementation="cuda")
    with torch.device("meta"):
        assert bark.BarkModel(config, attn_implementation="triton").attn_backend == "triton"


def test_dispatcher_skips_cuda_for_a_head_dim_it_lacks_and_logs_why(monkeypatch, caplog):
    from bark_kernels.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "availability", lambda: None)
    monkeypatch.setitem(registry.AUTO_ORDER, "cuda", ("cuda", "sdpa", "eager"))
    with caplog.at_level(logging.WARNING, logger="bark_kernels"):
        name, _ = registry.select("attention_with_kvcache", torch.device("cuda"), torch.float16, 40)
    assert name == "sdpa"
    assert "cuda: head_dim 40 is not supported (supported: [16, 32, 64, 96, 128])" in caplog.text


@pytest.mark.parametrize("impl", IMPLS[:1])
def test_unpad_plan_is_built_once_per_forward(impl, monkeypatch):
    """The padding mask's boolean form, unpad indices and cu_seqlens are computed by the first layer of a forward and
    reused by the others (every layer gets the same mask object); a new forward builds its own."""
    built = []
    real = hf_integration._PaddedPlan

    class CountingPlan(real):
        def __init__(self, keep, seqlen_q):
            built.append(seqlen_q)
            super().__init__(keep, seqlen_q)

    monkeypatch.setattr(hf_integration, "_PaddedPlan", CountingPlan)
    _, ours = _pair(impl)
    ids, mask = _inputs(batch=3, seqlen=5)
    with torch.no_grad():
        first = ours(ids, attention_mask=mask, use_cache=True)
        step = torch.zeros(3, 1, dtype=torch.long)
        ours(step, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
             **{_CACHE_KW: getattr(first, _CACHE_KW)})
    assert built == [5, 1]  # LAYERS layers each time, one plan per forward


def _harness():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "transformers_bark_tests.py"
    spec = importlib.util.spec_from_file_location("transformers_bark_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_compares_junit_runs(tmp_path):
    """scripts/transformers_bark_tests.py --compare: the tests that pass with eager and not with ours."""
    harness = _harness()

    def junit(name, cases):
        body = "".join(f'<testcase classname="t.C" name="{n}">{inner}</testcase>' for n, inner in cases.items())
        path = tmp_path / name
        path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
        return str(path)

    eager = junit("eager.xml", {"a": "", "b": "", "c": '<skipped message="x"/>', "d": '<failure message="x"/>'})
    ours = junit("ours.xml", {"a": "", "b": '<failure message="y"/>', "c": "", "d": ""})
    assert harness.counts(harness.junit_outcomes(eager)) == {"passed": 2, "failed": 1, "error": 0, "skipped": 1}
    assert harness.compare(eager, ours) == ["t.C::b"]
    assert harness.compare(ours, eager) == ["t.C::c", "t.C::d"]


def test_harness_plugin_forces_our_attention_on_default_built_bark_models(monkeypatch):
    """The plugin's switch, as transformers' test file gets it: a Bark model built without attn_implementation gets
    ours; one asked for "eager" by name keeps eager (and gets ours with BARK_HF_FORCE_EXPLICIT=1)."""
    import types

    from transformers import modeling_utils

    harness = _harness()
    original = modeling_utils.PreTrainedModel.get_correct_attn_implementation
    for explicit in ("0", "1"):
        monkeypatch.setattr(modeling_utils.PreTrainedModel, "get_correct_attn_implementation", original)  # restored
        monkeypatch.setenv(harness.ENV_IMPL, "bark_torch")
        monkeypatch.setenv(harness.ENV_EXPLICIT, explicit)
        config = types.SimpleNamespace()
        harness.pytest_configure(config)
        assert config._bark_hf_forced.startswith("bark_torch")
        default = modeling_bark.BarkCausalModel(_config())
        named = modeling_bark.BarkCausalModel._from_config(_config(), attn_implementation="eager")
        assert default.config._attn_implementation == "bark_torch"
        assert type(default.layers[0].attn).__name__ == "BarkKernelsSelfAttentionBarkTorch"
        assert named.config._attn_implementation == ("bark_torch" if explicit == "1" else "eager")
    codec = transformers.EncodecModel(transformers.EncodecConfig(hidden_size=16, num_filters=4))
    assert codec.config._attn_implementation != "bark_torch"  # other models are left alone


def test_switching_a_built_model_checks_the_head_dim():
    eager, _ = _pair(IMPLS[0])
    with pytest.raises(ValueError, match=r"'bark_cuda'.*head_dim 8"):
        hf_integration.use_bark_kernels(eager, "bark_cuda")
    assert all(type(m) is modeling_bark.BarkSelfAttention for m in eager.modules()
               if isinstance(m, modeling_bark.BarkSelfAttention))  # nothing switched
    hf_integration.use_bark_kernels(eager, "triton")
