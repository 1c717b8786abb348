"""tests/token_diff.py, the cross-run greedy token comparison used by the GPU-vs-CPU token tests: on synthetic choices
(first difference per row, stage order, near-tie against mismatch, passes of many choices, runs that stop lining up,
the report), and on a tiny CPU model (the observer changes nothing and sees every output token; the scores recorded
at a choice are the model's logits over the shared prefix; a perturbed model is reported as a mismatch)."""

from __future__ import annotations

import math

import pytest
import torch
from token_diff import (
    DEFAULT_TIE_RTOL,
    TokenTrace,
    first_differences,
    format_differences,
    margin_of,
    token_mismatch_report,
)

import bark
from bark.generation import TokenChoices, generate_tokens
from bark_kernels.testing import MODEL_RTOL, TOKEN_TIE_RTOL

INF = math.inf


def _event(stage, step, rows, positions, scores, tokens=None, valid=None):
    scores = torch.tensor(scores, dtype=torch.float32)  # (N, V)
    tokens = scores.argmax(-1) if tokens is None else torch.tensor(tokens)
    valid = torch.ones(len(rows), dtype=torch.bool) if valid is None else torch.tensor(valid)
    return TokenChoices(stage, tuple(step), torch.tensor(rows), torch.tensor(positions), scores, tokens, valid)


def _runs(events_ref, events_other):
    ref, other = TokenTrace(), TokenTrace(keep_scores=False)
    for e in events_ref:
        ref(e)
    for e in events_other:
        other(e)
    return ref, other


S0 = [[0.0, 1.0, 0.5, -INF], [2.0, 0.0, 0.0, -INF]]  # two rows of one step: tokens 1 and 0, vocabulary 4
S1_TIE = [[0.3, 0.3 - 1e-7, 0.0, -INF], [1.0, 0.0, 0.5, -INF]]  # row 0: tokens 0 and 1 tied within 1e-7 (of 0.3)
S1_CLEAR = [[0.3, 0.1, 0.0, -INF], [1.0, 0.0, 0.5, -INF]]  # row 0: token 0 ahead of token 1 by 0.2


def test_tie_threshold_comes_from_the_tolerance_table():
    assert DEFAULT_TIE_RTOL == TOKEN_TIE_RTOL[torch.float32]
    assert 0 < DEFAULT_TIE_RTOL <= 1e-3


def test_margin_of():
    scores = torch.tensor([0.5, 2.0, -INF, -1.0])
    assert margin_of(scores, 1, 0) == (1.5, 2.0)
    assert margin_of(scores, 1, 2) == (INF, 2.0)  # the other token was not even allowed
    assert margin_of(scores, 0, 0)[0] == 0.0


def test_identical_runs_have_no_difference():
    events = [_event("semantic", (0,), [0, 1], [0, 0], S0), _event("semantic", (1,), [0, 1], [1, 1], S1_CLEAR)]
    ref, other = _runs(events, events)
    assert first_differences(ref, other) == []
    assert len(ref) == 4 and ref.rows() == [0, 1]
    tokens = {"semantic": [torch.tensor([1, 0]), torch.tensor([0, 0])], "coarse": [torch.zeros(0)] * 2,
              "fine": [torch.zeros(8, 0)] * 2}
    assert token_mismatch_report(tokens, tokens, ref, other) is None


@pytest.mark.parametrize("second_step,near_tie", [(S1_TIE, True), (S1_CLEAR, False)])
def test_first_difference_reports_row_step_tokens_margin_and_verdict(second_step, near_tie):
    ref_events = [_event("semantic", (0,), [0, 1], [0, 0], S0), _event("semantic", (1,), [0, 1], [1, 1], second_step)]
    other_events = [_event("semantic", (0,), [0, 1], [0, 0], S0, tokens=[1, 0]),
                    _event("semantic", (1,), [0, 1], [1, 1], second_step, tokens=[1, 0])]  # row 0 picks token 1
    ref, other = _runs(ref_events, other_events)
    (d,) = first_differences(ref, other)
    assert (d.row, d.stage, d.step, d.position, d.reference_token, d.other_token) == (0, "semantic", (1,), 1, 0, 1)
    assert d.margin == pytest.approx(second_step[0][0] - second_step[0][1], abs=1e-7)
    assert d.scale == pytest.approx(0.3) and d.more == 0 and d.other_margin is None
    assert d.near_tie is near_tie
    report = format_differences([d], ref, "cpu eager", "cuda triton", n_rows=2)
    assert "row 0: semantic token 1: cpu eager chose 0, cuda triton chose 1" in report
    assert f"reference margin {d.margin:.3e}" in report
    assert ("NEAR-TIE" in report) is near_tie and ("MISMATCH" in report) is not near_tie
    assert "in 1 of 2 rows" in report and "closest call of cpu eager over its 4 choices" in report


def test_only_the_first_differing_stage_of_a_row_counts_and_rows_are_separate():
    ref_events = [_event("semantic", (0,), [0, 1], [0, 0], S0),
                  _event("coarse", (0, 0), [0, 1], [0, 0], S1_CLEAR)]
    other_events = [_event("semantic", (0,), [0, 1], [0, 0], S0, tokens=[2, 0]),  # row 0 differs in semantic
                    _event("coarse", (0, 0), [0, 1], [0, 0], S1_CLEAR, tokens=[1, 2])]  # ... and both rows in coarse
    ref, other = _runs(ref_events, other_events)
    diffs = first_differences(ref, other)
    assert [(d.row, d.stage, d.reference_token, d.other_token) for d in diffs] == [(0, "semantic", 1, 2),
                                                                                   (1, "coarse", 0, 2)]
    assert not any(d.near_tie for d in diffs)


def test_a_pass_of_many_choices_is_a_tie_only_if_every_differing_choice_is():
    """A fine pass decides many frames at once: one near-tied frame and one clearly different frame is a mismatch;
    choices marked invalid (frames kept from the previous window) are ignored."""
    scores = [[0.3, 0.3 - 1e-7, 0.0], [1.0, 0.2, 0.0], [0.0, 0.0, 5.0]]  # frames 4, 5, 6 of row 0
    ref_events = [_event("fine", (0, 2), [0, 0, 0], [4, 5, 6], scores, valid=[True, True, False])]
    mixed = [_event("fine", (0, 2), [0, 0, 0], [4, 5, 6], scores, tokens=[1, 1, 0], valid=[True, True, False])]
    ties = [_event("fine", (0, 2), [0, 0, 0], [4, 5, 6], scores, tokens=[1, 0, 0], valid=[True, True, False])]
    (d,) = first_differences(*_runs(ref_events, mixed))
    assert (d.stage, d.step, d.position, d.more) == ("fine", (0, 2), 4, 1)
    assert d.relative_margin <= DEFAULT_TIE_RTOL and d.worst_relative_margin == pytest.approx(0.8)
    assert not d.near_tie
    (d,) = first_differences(*_runs(ref_events, ties))
    assert d.more == 0 and d.near_tie
    report = format_differences([d])
    assert "fine window 0, codebook 2, frame 4" in report and "NEAR-TIE" in report


def test_a_token_the_reference_does_not_allow_is_a_mismatch():
    ref, other = _runs([_event("semantic", (0,), [0, 1], [0, 0], S0)],
                       [_event("semantic", (0,), [0, 1], [0, 0], S0, tokens=[3, 0])])
    (d,) = first_differences(ref, other)
    assert d.margin == INF and not d.near_tie


def test_runs_that_stop_lining_up_are_reported_without_a_margin():
    events = [_event("coarse", (0, 0), [0], [0], S0[:1]), _event("coarse", (0, 1), [0], [1], S0[:1])]
    ref, other = _runs(events, events[:1])
    (d,) = first_differences(ref, other)
    assert "1 more choice" in d.note and math.isnan(d.margin) and not d.near_tie
    shifted = [events[0], _event("coarse", (0, 1), [0], [2], S0[:1])]
    (d,) = first_differences(*_runs(events, shifted))
    assert "stop lining up" in d.note
    assert "MISMATCH" in format_differences([d])


def test_the_other_runs_own_margin_is_reported_when_it_kept_scores():
    ref = TokenTrace()
    ref(_event("semantic", (0,), [0], [0], [[1.0, 0.9, 0.0]]))
    other = TokenTrace()
    other(_event("semantic", (0,), [0], [0], [[0.9, 1.0, 0.0]]))  # the other run's logits prefer token 1
    (d,) = first_differences(ref, other)
    assert d.other_margin == pytest.approx(0.1) and d.margin == pytest.approx(0.1)
    assert "own margin for its token" in format_differences([d])


def test_reference_trace_needs_scores():
    with pytest.raises(ValueError, match="keep_scores"):
        first_differences(TokenTrace(keep_scores=False), TokenTrace())


# ----------------------------------------------------------------------------------------------------------------------
# on a tiny model (CPU)

transformers = pytest.importorskip("transformers")
import bark_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bark_token_diff")
    bark_tiny.save_tiny_bark(path, seed=3, hidden_size=32, num_layers=2, num_heads=2)
    model = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
    ids, mask = bark_tiny.random_text_ids(2, [12, 30], seed=1)
    presets = [bark_tiny.as_torch_preset(bark_tiny.random_voice_preset(0)), None]
    return path, model, ids, mask, presets


def test_observer_changes_nothing_and_sees_every_output_token(tiny):
    _, model, ids, mask, presets = tiny
    plain = generate_tokens(model, ids, mask, history_prompt=presets, semantic_max_new_tokens=12)
    trace = TokenTrace()
    observed = generate_tokens(model, ids, mask, history_prompt=presets, semantic_max_new_tokens=12, observer=trace)
    eos = model.generation_config.semantic_config.eos_token_id
    for b in range(2):
        for stage in ("semantic", "coarse", "fine"):
            assert torch.equal(plain[stage][b], observed[stage][b]), (b, stage)
        semantic = [c.token for c in trace.of(b, "semantic")]
        assert semantic[:len(plain["semantic"][b])] == plain["semantic"][b].tolist()
        assert len(semantic) == len(plain["semantic"][b]) or semantic[-1] == eos  # ended by EOS or by the limit
        assert [c.token for c in trace.of(b, "coarse")] == plain["coarse"][b].tolist()
        fine = plain["fine"][b].clone()  # (n_fine, frames): replay the recorded choices, the last write wins
        n_coarse = model.generation_config.coarse_acoustics_config.n_coarse_codebooks
        fine[n_coarse:] = -1
        for c in trace.of(b, "fine"):
            if c.position < fine.shape[1]:
                fine[c.step[1], c.position] = c.token
        assert torch.equal(fine, plain["fine"][b])
        for c in trace.of(b, "semantic") + trace.of(b, "coarse") + trace.of(b, "fine"):
            assert int(torch.argmax(c.scores)) == c.token  # greedy: the recorded scores are what the choice used


def test_recorded_scores_are_the_logits_over_the_shared_prefix(tiny):
    """Teacher forcing: a separate forward of the reference model over the prompt and the first t tokens gives the
    scores the trace recorded at choice t (so the margin at a first difference needs no second run)."""
    from bark.generation import semantic_input_embeds

    _, model, ids, mask, _ = tiny
    trace = TokenTrace()
    out = generate_tokens(model, ids[1:], mask[1:], semantic_max_new_tokens=12, observer=trace)
    cfg = model.generation_config.semantic_config
    n_allowed = max(cfg.semantic_vocab_size, cfg.semantic_pad_token) + 1
    tokens = out["semantic"][0]
    assert tokens.shape[0] >= 6
    prompt = semantic_input_embeds(model, ids[1:], mask[1:], [None], model.generation_config)  # (1, P, C)
    semantic = model.semantic
    for t in (0, 5):
        with torch.no_grad():
            x = torch.cat([prompt, semantic.embed(tokens[:t])[None]], dim=1)  # (1, P + t, C)
            cache = semantic.new_cache(1, x.shape[1])
            logits = semantic.lm_logits(semantic.prefill(x, cache), 0, n_allowed)[0]  # (n_allowed,)
        recorded = trace.of(0, "semantic")[t].scores[:n_allowed]
        finite = torch.isfinite(recorded)
        assert bark_tiny.rel_err(recorded[finite], logits[finite]) <= MODEL_RTOL[torch.float32], t


def test_a_perturbed_model_is_reported_as_a_mismatch_at_its_first_different_choice(tiny):
    path, model, ids, mask, presets = tiny
    ref_trace = TokenTrace()
    ref = generate_tokens(model, ids, mask, history_prompt=presets, semantic_max_new_tokens=12, observer=ref_trace)
    # make the runner-up of row 1's fourth semantic choice win there, by a clear margin
    choice = ref_trace.of(1, "semantic")[3]
    runner_up = int(torch.topk(choice.scores, 2).indices[1])
    bias = 0.5 * float(choice.scores[torch.isfinite(choice.scores)].abs().max())
    other_model = bark.BarkModel.from_pretrained(path, attn_implementation="sdpa")  # another backend, too
    original = other_model.semantic.lm_logits

    def lm_logits(hidden, lo, hi):
        logits = original(hidden, lo, hi).clone()
        logits[..., runner_up - lo] += bias
        return logits

    other_model.semantic.lm_logits = lm_logits
    other_trace = TokenTrace()
    other = generate_tokens(other_model, ids, mask, history_prompt=presets, semantic_max_new_tokens=12,
                            observer=other_trace)
    report = token_mismatch_report(ref, other, ref_trace, other_trace, reference_name="eager",
                                   other_name="sdpa+bias")
    assert report is not None
    diffs = first_differences(ref_trace, other_trace)
    assert diffs and all(d.stage == "semantic" and not d.near_tie for d in diffs)
    d = next(d for d in diffs if d.row == 1)
    assert d.position <= 3 and d.other_token == runner_up
    expected = ref_trace.of(1, "semantic")[d.position].scores
    assert d.margin == pytest.approx(float(expected[d.reference_token] - expected[runner_up]))
    assert "row 1: semantic token" in report and "MISMATCH" in report and "NEAR-TIE" not in report
