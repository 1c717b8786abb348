"""bark.generation: end-to-end generate against transformers' BarkModel.generate on a tiny random checkpoint (greedy:
the same audio; seeded sampling: the same audio too), on every attention backend that runs here; each row of a
ragged batch equals that row generated alone; edge cases and argument errors."""

from __future__ import annotations

import pytest
import torch

import bark
import bark_kernels as bk
from bark.generation import generate_tokens, split_generate_kwargs
from bark_kernels import registry
from bark_kernels.testing import MODEL_RTOL, TOKEN_TIE_RTOL

transformers = pytest.importorskip("transformers")
import bark_tiny  # noqa: E402
from bark_tiny import rel_err  # noqa: E402
from token_diff import TokenTrace, token_mismatch_report  # noqa: E402

RTOL = MODEL_RTOL[torch.float32]
SEMANTIC_TOKENS = 30  # -> 90 coarse tokens (2 coarse windows of 60) -> 45 frames (2 fine windows with a preset)
SEMANTIC_TOKENS_INTERPRETED = 6  # Triton under the interpreter costs ~0.1 s per kernel launch: keep it short
BACKENDS = [name for name in bk.available_backends()
            if registry.why_not(name, "attention_with_kvcache", torch.device("cpu"), torch.float32, 16) is None]


def _interpreted(backend: str) -> bool:
    """Whether this backend runs under Triton's CPU interpreter here (the parity tests run on CPU tensors)."""
    return backend == "triton" and not torch.cuda.is_available()


def _tokens_for(backend: str) -> int:
    return SEMANTIC_TOKENS_INTERPRETED if _interpreted(backend) else SEMANTIC_TOKENS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bark_gen")
    hf = bark_tiny.save_tiny_bark(path, seed=3, hidden_size=32, num_layers=2, num_heads=2)
    return path, hf


@pytest.fixture(scope="module")
def models(checkpoint):
    path, _ = checkpoint
    return {name: bark.BarkModel.from_pretrained(path, attn_implementation=name) for name in BACKENDS}


CASES = {
    "batch1": dict(batch=1, lengths=[12], preset=False),
    "batch2-preset": dict(batch=2, lengths=[12, 30], preset=True),
}


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' greedy audio for (case, semantic tokens), computed once each."""
    _, hf = checkpoint
    cache = {}

    def get(name, tokens):
        if (name, tokens) not in cache:
            case = CASES[name]
            ids, mask = bark_tiny.random_text_ids(case["batch"], case["lengths"], seed=1)
            preset = bark_tiny.as_torch_preset(bark_tiny.random_voice_preset(0)) if case["preset"] else None
            with torch.no_grad():
                audio = hf.generate(input_ids=ids, attention_mask=mask, history_prompt=preset,
                                    semantic_max_new_tokens=tokens, do_sample=False)
            cache[(name, tokens)] = (ids, mask, preset, audio)
        return cache[(name, tokens)]

    return get


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_audio_matches_transformers(models, reference, backend, case):
    tokens = _tokens_for(backend)
    ids, mask, preset, ref = reference(case, tokens)
    model = models[backend]
    audio = model.generate(ids, attention_mask=mask, history_prompt=preset, semantic_max_new_tokens=tokens,
                           do_sample=False)
    assert audio.shape == ref.shape, f"{backend}/{case}: audio {tuple(audio.shape)} vs transformers {tuple(ref.shape)}"
    assert ref.abs().max() > 0
    assert rel_err(audio, ref) <= RTOL, f"{backend}/{case}: relative error {rel_err(audio, ref):.2e}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", [pytest.param(b, marks=[pytest.mark.slow] if _interpreted(b) else [])
                                     for b in BACKENDS])  # the interpreter is slow: triton's run under -m slow
def test_greedy_generation_repeats_and_reports_lengths(models, reference, backend, case):
    tokens = _tokens_for(backend)
    ids, mask, preset, ref = reference(case, tokens)
    model = models[backend]
    audio = model.generate(ids, attention_mask=mask, history_prompt=preset, semantic_max_new_tokens=tokens,
                           do_sample=False)
    audio2, lengths = model.generate(ids, attention_mask=mask, history_prompt=preset, return_output_lengths=True,
                                     semantic_max_new_tokens=tokens)
    assert torch.equal(audio2, audio), "greedy generation is not deterministic"
    assert lengths == [ref.shape[1]] * ref.shape[0]


def test_seeded_sampling_matches_transformers_and_repeats(checkpoint, models):
    _, hf = checkpoint
    model = models["eager"]
    ids, mask = bark_tiny.random_text_ids(1, [20], seed=4)
    kwargs = dict(semantic_max_new_tokens=25, do_sample=True, temperature=0.8, top_p=0.9, coarse_top_k=40)
    torch.manual_seed(5)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
    torch.manual_seed(5)
    first = model.generate(ids, attention_mask=mask, **kwargs)
    assert first.shape == ref.shape and rel_err(first, ref) <= RTOL
    second = model.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(7), **kwargs)
    third = model.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(second, third)


def _eos_steered_model(path, scale: float):
    """Our model with a semantic EOS row that makes rows stop at different, input-dependent steps."""
    model = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
    weight = model.semantic.lm_head.weight
    direction = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0)) * weight.std()
    with torch.no_grad():
        weight[10_000] = scale * direction
    return model


@pytest.fixture(scope="module")
def ragged_model(checkpoint):
    return _eos_steered_model(checkpoint[0], 2.5)  # rows end after 40, 7 and 16 semantic tokens


def _ragged_inputs():
    ids, mask = bark_tiny.random_text_ids(3, [5, 20, 40], seed=2)
    presets = [bark_tiny.as_torch_preset(bark_tiny.random_voice_preset(s, n_semantic=20 + 30 * s,
                                                                       n_coarse_frames=40 + 25 * s))
               for s in range(2)] + [None]
    return ids, mask, presets


RAGGED = [pytest.param(b, s, id=f"{b}-sync{s}",
                        marks=[pytest.mark.slow] if _interpreted(b) else [])
          for b in BACKENDS for s in ((4, 16) if b == "eager" else (16,))]


@pytest.mark.parametrize("backend,sync_every", RAGGED)
def test_each_row_of_a_ragged_batch_equals_the_row_alone(ragged_model, backend, sync_every):
    model = ragged_model
    model.attn_implementation = backend
    try:
        ids, mask, presets = _ragged_inputs()
        batch = generate_tokens(model, ids, mask, history_prompt=presets, semantic_max_new_tokens=40,
                                sync_every=sync_every)
        sem_lengths = [t.shape[0] for t in batch["semantic"]]
        assert len(set(sem_lengths)) == 3, f"the rows should end at different steps, got {sem_lengths}"
        audio, lengths = model.generate(ids, attention_mask=mask, history_prompt=presets, semantic_max_new_tokens=40,
                                        return_output_lengths=True, sync_every=sync_every)
        for b in range(3):
            alone = generate_tokens(model, ids[b:b + 1], mask[b:b + 1], history_prompt=presets[b],
                                    semantic_max_new_tokens=40)
            for stage in ("semantic", "coarse", "fine"):
                assert torch.equal(batch[stage][b], alone[stage][0]), f"row {b}: {stage} tokens differ from alone"
            alone_audio = model.generate(ids[b:b + 1], attention_mask=mask[b:b + 1], history_prompt=presets[b],
                                         semantic_max_new_tokens=40)
            assert lengths[b] == alone_audio.shape[1] == batch["fine"][b].shape[1] * 320
            assert rel_err(audio[b, :lengths[b]], alone_audio[0]) <= RTOL, f"row {b}: audio differs from alone"
            assert not audio[b, lengths[b]:].any(), f"row {b}: non-zero tail after its end"
    finally:
        model.attn_implementation = "eager"


def test_row_that_ends_at_once_in_a_batch(checkpoint):
    model = _eos_steered_model(checkpoint[0], 3.2)  # rows end after 29, 7 and 0 semantic tokens
    ids, mask, presets = _ragged_inputs()
    audio, lengths = model.generate(ids, attention_mask=mask, history_prompt=presets, semantic_max_new_tokens=40,
                                    return_output_lengths=True)
    assert lengths[2] == 0 and lengths[0] > lengths[1] > 0, lengths
    assert audio.shape == (3, lengths[0]) and not audio[2].any()
    for b in range(2):
        alone = model.generate(ids[b:b + 1], attention_mask=mask[b:b + 1], history_prompt=presets[b],
                               semantic_max_new_tokens=40)
        assert alone.shape[1] == lengths[b] and rel_err(audio[b, :lengths[b]], alone[0]) <= RTOL
    alone = model.generate(ids[2:], attention_mask=mask[2:], history_prompt=presets[2], semantic_max_new_tokens=40)
    assert alone.shape == (1, 0)


def test_text_that_ends_at_once_gives_empty_audio(models):
    model = models["eager"]
    ids, mask = bark_tiny.random_text_ids(2, [3, 9], seed=5)
    # min_eos_p tiny: the EOS prioritizer forces EOS at the first step (transformers' codec raises here)
    audio, lengths = model.generate(ids, attention_mask=mask, min_eos_p=1e-9, return_output_lengths=True)
    assert audio.shape == (2, 0) and lengths == [0, 0]
    audio = model.generate(ids[:1], attention_mask=mask[:1], semantic_max_new_tokens=0)
    assert audio.shape == (1, 0)


def test_short_input_ids_are_padded_like_full_length(models):
    model = models["eager"]
    ids, mask = bark_tiny.random_text_ids(1, [10], seed=6)
    full = model.generate(ids, attention_mask=mask, semantic_max_new_tokens=8)
    short = model.generate(ids[:, :10], attention_mask=mask[:, :10], semantic_max_new_tokens=8)
    assert torch.equal(full, short)


def test_kwargs_routing_and_errors(models):
    stages = split_generate_kwargs({"temperature": 0.5, "semantic_temperature": 0.9, "coarse_top_k": 3,
                                    "max_new_tokens": 7, "do_sample": True})
    assert stages["semantic"] == {"temperature": 0.9, "max_new_tokens": 7, "do_sample": True}
    assert stages["coarse"] == {"temperature": 0.5, "top_k": 3, "do_sample": True}
    assert stages["fine"] == {"temperature": 0.5}
    model = models["eager"]
    ids, mask = bark_tiny.random_text_ids(2, [3, 9], seed=5)
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(ids, num_beams=2)
    with pytest.raises(TypeError, match="coarse_min_eos_p"):
        model.generate(ids, coarse_min_eos_p=0.2)
    with pytest.raises(ValueError, match="semantic_temperature"):
        model.generate(ids, do_sample=True, semantic_temperature=0.0)
    with pytest.raises(ValueError, match="history_prompt"):
        model.generate(ids, history_prompt=[None])
    with pytest.raises(ValueError, match="coarse_prompt"):
        bad = bark_tiny.random_voice_preset(0)
        bad["coarse_prompt"] = bad["coarse_prompt"][:1]
        model.generate(ids, history_prompt=bad)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="block_size"):
        model.generate(ids, semantic_max_new_tokens=2000)


def _tokens_against_cpu_eager(path, device: str, names: list[str]) -> list[str]:
    """Greedy tokens of each bark_kernels backend in ``names`` on ``device`` (fp32) against the CPU eager run: one
    report per backend whose tokens differ (tests/token_diff.py: per row the stage, the first differing choice, both
    tokens and the CPU reference's margin between them on the shared prefix, called a NEAR-TIE (within
    TOKEN_TIE_RTOL: either token is right in fp32, not a kernel bug) or a MISMATCH)."""
    ids, mask = bark_tiny.random_text_ids(2, [12, 30], seed=1)
    presets = [bark_tiny.as_torch_preset(bark_tiny.random_voice_preset(0)), None]
    cpu = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
    ref_trace = TokenTrace(keep_scores=True)
    ref = generate_tokens(cpu, ids, mask, history_prompt=presets, semantic_max_new_tokens=SEMANTIC_TOKENS,
                          observer=ref_trace)
    implementation = {backend: impl for impl, backend in bark.config.ATTN_IMPLEMENTATIONS.items() if backend}
    reports = []
    for name in names:  # bark_kernels backend names; attn_implementation spells flash_attn "flash_attention_2"
        model = bark.BarkModel.from_pretrained(path, attn_implementation=implementation[name], device=device)
        trace = TokenTrace(keep_scores=True)
        out = generate_tokens(model, ids.to(device), mask.to(device), history_prompt=presets,
                              semantic_max_new_tokens=SEMANTIC_TOKENS, observer=trace)
        report = token_mismatch_report(ref, out, ref_trace, trace, TOKEN_TIE_RTOL[torch.float32],
                                       reference_name="cpu eager", other_name=f"{device} {name}")
        if report is not None:
            reports.append(report)
        audio = model.generate(ids.to(device), attention_mask=mask.to(device), history_prompt=presets,
                               semantic_max_new_tokens=SEMANTIC_TOKENS)
        assert audio.device.type == device and audio.shape[0] == 2
    return reports


@pytest.mark.gpu
def test_gpu_backends_give_the_cpu_tokens(checkpoint):
    """On CUDA (fp32, TF32 off), every backend that serves the decode op gives the tokens of the CPU eager run. All
    backends run before the test fails, so one GPU session reports on each; a near-tie is reported as such."""
    names = [n for n in bk.available_backends()
             if registry.why_not(n, "attention_with_kvcache", torch.device("cuda"), torch.float32, 16) is None]
    assert names, "no bark_kernels backend serves fp32 on CUDA"
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reports = _tokens_against_cpu_eager(checkpoint[0], "cuda", names)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert not reports, "\n".join(reports)


def test_cross_backend_token_comparison_runs_on_cpu(checkpoint):
    """The GPU test's comparison (traces, report) on CPU, sdpa against eager, so that its code runs in CI too."""
    assert _tokens_against_cpu_eager(checkpoint[0], "cpu", ["sdpa"]) == []


def test_real_window_sizes_match_transformers(tmp_path):
    """Bark's real windows (fine 1024 frames, stride 512; coarse history 630): more than 1024 frames with a preset, so
    both the coarse history trimming and two fine windows run (eager-speed backend only: a few seconds)."""
    hf = bark_tiny.save_tiny_bark(tmp_path, seed=4, max_fine_input_length=1024, max_fine_history_length=512)
    ours = bark.BarkModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    ids, mask = bark_tiny.random_text_ids(1, [25], seed=8)
    preset = bark_tiny.as_torch_preset(bark_tiny.random_voice_preset(3, n_semantic=300, n_coarse_frames=700))
    kwargs = dict(history_prompt=preset, semantic_max_new_tokens=360, do_sample=False)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
    audio = ours.generate(ids, attention_mask=mask, **kwargs)
    assert ref.shape[1] > 1024 * 320 // 2
    assert audio.shape == ref.shape and rel_err(audio, ref) <= RTOL


def test_device_sampling_draws_what_torch_multinomial_draws():
    """sample_one's device path (argmax(probs / Exp(1)), no host sync) consumes the same random numbers and draws
    the same tokens as torch.multinomial(probs, 1): checked on CPU, where both run, with masked (zero) entries and a
    row with one allowed token; the generator ends in the same state, so later draws stay aligned too."""
    from bark.generation import exponential_race, sample_one

    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randn(5, 700, generator=g) * 3  # (B, V)
        scores[:, 400:] = -float("inf")
        scores[0, 1:] = -float("inf")  # one allowed token
        probs = scores.softmax(dim=-1)
        g_ref, g_ours = torch.Generator().manual_seed(100 + seed), torch.Generator().manual_seed(100 + seed)
        ref = torch.multinomial(probs, 1, generator=g_ref).squeeze(1)
        out = exponential_race(probs, g_ours)
        assert out.dtype == torch.long and torch.equal(out, ref), f"seed {seed}: {out.tolist()} != {ref.tolist()}"
        assert out[0] == 0
        assert torch.equal(g_ref.get_state(), g_ours.get_state())
        assert torch.equal(sample_one(probs, torch.Generator().manual_seed(100 + seed)), ref)
    torch.manual_seed(9)
    ref = torch.multinomial(probs, 1).squeeze(1)
    torch.manual_seed(9)
    assert torch.equal(exponential_race(probs), ref)  # the global RNG when no generator is given


@pytest.mark.gpu
def test_sampling_on_cuda_reads_nothing_back():
    """On CUDA, select_tokens with sampling (temperature, top-k, top-p) runs without a host sync and draws what
    torch.multinomial draws from the same generator state."""
    from bark.generation import SamplingParams, exponential_race, select_tokens

    device = torch.device("cuda")
    scores = torch.randn(4, 10_048, device=device, generator=torch.Generator(device).manual_seed(0)) * 4
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
    select_tokens(scores, params, torch.Generator(device).manual_seed(1))  # warm-up (lazy CUDA initialisation)
    gens = [torch.Generator(device).manual_seed(2) for _ in range(2)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = select_tokens(scores, params, gens[0])
        probs = scores.softmax(dim=-1)
        drawn = exponential_race(probs, gens[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (4,) and tokens.device.type == "cuda"
    assert torch.equal(drawn, torch.multinomial(probs, 1, generator=torch.Generator(device).manual_seed(2)).squeeze(1))
