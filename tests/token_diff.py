"""Greedy token runs compared choice by choice, telling a near-tie from a real difference (test support).

Two greedy runs of ``bark.generation.generate_tokens`` -- a reference (the CPU eager model) and another (a CUDA
backend, say) -- each record every token choice with a :class:`TokenTrace` observer. :func:`first_differences` walks
each batch row's choices in the order they were made, stage after stage, and stops at the first choice where the runs
disagree. Up to that choice both runs made the same choices from the same inputs (same text, same voice preset, the
same earlier tokens), so the scores the reference recorded there are the reference model's logits teacher-forced on
the prefix both runs share: no second forward pass is needed to get them (tests/test_token_diff.py checks this against
a separate forward over the prefix). Later choices of that row are conditioned on different tokens and not compared.

The reference margin at the differing choice, score(reference token) - score(other token) (a difference of logits,
equal to the difference of log-probabilities the greedy argmax compares), tells the two cases apart: below
``TOKEN_TIE_RTOL`` x the largest |score| of that choice both tokens are right within fp32 rounding (a near-tie, not a
kernel bug); above it the reference clearly prefers its token and the other run computed something else.

Only meaningful for greedy runs (with sampling the draw, not the argmax, picks the token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bark_kernels.testing import TOKEN_TIE_RTOL

STAGES = ("semantic", "coarse", "fine")
DEFAULT_TIE_RTOL = TOKEN_TIE_RTOL[torch.float32]


@dataclass(frozen=True)
class Choice:
    """One recorded token choice of one batch row."""

    step: tuple[int, ...]  # the stage's step (see bark.generation.TokenChoices)
    position: int  # token index (semantic, coarse) or frame (fine) in the row's output
    token: int
    scores: torch.Tensor | None  # (V,) float32 on the CPU, when the trace keeps scores


class TokenTrace:
    """Observer for ``generate_tokens(..., observer=trace)``: keeps every valid choice of each (row, stage), in the
    order made, on the CPU. ``keep_scores=False`` keeps only the tokens (enough for a run that is not the reference)."""

    def __init__(self, keep_scores: bool = True):
        self.keep_scores = keep_scores
        self.choices: dict[tuple[int, str], list[Choice]] = {}

    def __call__(self, event) -> None:
        valid = event.valid.detach().cpu()
        rows = event.rows.detach().cpu().tolist()
        positions = event.positions.detach().cpu().tolist()
        tokens = event.tokens.detach().cpu().tolist()
        scores = event.scores.detach().float().cpu() if self.keep_scores else None
        for i in torch.nonzero(valid).flatten().tolist():
            self.choices.setdefault((rows[i], event.stage), []).append(
                Choice(tuple(event.step), positions[i], tokens[i], None if scores is None else scores[i]))

    def rows(self) -> list[int]:
        return sorted({row for row, _ in self.choices})

    def of(self, row: int, stage: str) -> list[Choice]:
        return self.choices.get((row, stage), [])

    def __len__(self) -> int:
        return sum(len(c) for c in self.choices.values())

    def closest_call(self) -> tuple[float, int, str, Choice] | None:
        """The choice whose top-two scores were closest, relative to the largest |score| there: (relative gap, row,
        stage, choice); None without scores. How near to a tie this run came anywhere, for the report."""
        best = None
        for (row, stage), choices in self.choices.items():
            for choice in choices:
                if choice.scores is None:
                    return None
                finite = choice.scores[torch.isfinite(choice.scores)]
                if finite.numel() < 2:
                    continue
                top = torch.topk(finite, 2).values
                gap = float(top[0] - top[1]) / max(float(finite.abs().max()), 1e-30)
                if best is None or gap < best[0]:
                    best = (gap, row, stage, choice)
        return best


def margin_of(scores: torch.Tensor, preferred: int, other: int) -> tuple[float, float]:
    """(scores[preferred] - scores[other], largest finite |score|). The margin is +inf when ``other`` is not allowed
    (-inf) and ``preferred`` is."""
    finite = scores[torch.isfinite(scores)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    a, b = float(scores[preferred]), float(scores[other])
    if math.isinf(a) or math.isinf(b):
        margin = math.inf if a > b else -math.inf if a < b else 0.0
    else:
        margin = a - b
    return margin, scale


@dataclass(frozen=True)
class Difference:
    """The first choice where one row of two runs differs (or why the runs cannot be compared further)."""

    row: int
    stage: str
    step: tuple[int, ...]
    position: int
    reference_token: int
    other_token: int
    margin: float  # reference run: score(its token) - score(the other run's token) at that choice
    scale: float  # the largest finite |score| of the reference at that choice
    other_margin: float | None  # other run: score(its token) - score(the reference's token), when it kept scores
    more: int  # further choices of the same step that differ too (fine: other frames of that pass)
    worst_relative_margin: float  # the largest margin / scale among all differing choices of that step
    tie_rtol: float
    note: str = ""  # set when the runs' choices could not be lined up (no margin then)

    @property
    def relative_margin(self) -> float:
        return self.margin / self.scale if self.scale > 0 else math.inf

    @property
    def near_tie(self) -> bool:
        """Every differing choice of that step is within the tie threshold."""
        return not self.note and self.worst_relative_margin <= self.tie_rtol


def _relative(choice: Choice, other_token: int) -> float:
    margin, scale = margin_of(choice.scores, choice.token, other_token)
    return margin / scale if scale > 0 else math.inf


def first_differences(reference: TokenTrace, other: TokenTrace, tie_rtol: float = DEFAULT_TIE_RTOL,
                      rows: list[int] | None = None) -> list[Difference]:
    """The first differing choice of every row where the runs differ (an empty list when every choice agrees). The
    reference trace must keep its scores."""
    if not reference.keep_scores:
        raise ValueError("reference: the reference trace must keep its scores (TokenTrace(keep_scores=True))")
    out = []
    for row in rows if rows is not None else sorted(set(reference.rows()) | set(other.rows())):
        for stage in STAGES:
            diff = _first_difference(row, stage, reference.of(row, stage), other.of(row, stage), tie_rtol)
            if diff is not None:
                out.append(diff)
                break  # later stages of this row are conditioned on different tokens
    return out


def _first_difference(row: int, stage: str, ref: list[Choice], oth: list[Choice], tie_rtol: float) -> Difference | None:
    for i, (a, b) in enumerate(zip(ref, oth, strict=False)):
        if (a.step, a.position) != (b.step, b.position):
            return _unaligned(row, stage, a, f"the runs' choices stop lining up at choice {i} of this stage "
                                             f"(reference: step {a.step} position {a.position}, other: step {b.step} "
                                             f"position {b.position}) although every earlier token agrees", tie_rtol)
        if a.token == b.token:
            continue
        margin, scale = margin_of(a.scores, a.token, b.token)
        other_margin = margin_of(b.scores, b.token, a.token)[0] if b.scores is not None else None
        # the other choices of the same step were made from the same inputs: all of them count for the verdict
        same_step = [(c, d) for c, d in zip(ref[i:], oth[i:], strict=False) if c.step == a.step and d.step == a.step]
        differing = [(c, d) for c, d in same_step if c.token != d.token]
        worst = max(_relative(c, d.token) for c, d in differing)
        return Difference(row, stage, a.step, a.position, a.token, b.token, margin, scale, other_margin,
                          len(differing) - 1, worst, tie_rtol)
    if len(ref) != len(oth):
        longer, which = (ref, "reference") if len(ref) > len(oth) else (oth, "other")
        extra = longer[min(len(ref), len(oth))]
        return _unaligned(row, stage, extra, f"every token both runs chose agrees, but the {which} run made "
                                             f"{abs(len(ref) - len(oth))} more choice(s) in this stage", tie_rtol)
    return None


def _unaligned(row: int, stage: str, at: Choice, note: str, tie_rtol: float) -> Difference:
    return Difference(row, stage, at.step, at.position, -1, -1, math.nan, math.nan, None, 0, math.nan, tie_rtol, note)


def describe_choice(stage: str, step: tuple[int, ...], position: int) -> str:
    if stage == "semantic":
        return f"semantic token {position}"
    if stage == "coarse":
        return f"coarse token {position} (window from token {step[0]})"
    if stage == "fine":
        return f"fine window {step[0]}, codebook {step[1]}, frame {position}"
    return f"{stage} step {step}, position {position}"


def format_differences(differences: list[Difference], reference: TokenTrace | None = None,
                       reference_name: str = "reference", other_name: str = "other", n_rows: int | None = None) -> str:
    """A report with one line per differing row: stage, row, first differing choice, both tokens, the reference
    margin and the verdict (NEAR-TIE or MISMATCH); then how close the reference run came to a tie anywhere."""
    if not differences:
        return f"{other_name} chose the tokens of {reference_name} in every row"
    rows = f" in {len(differences)} of {n_rows} rows" if n_rows is not None else ""
    lines = [f"{other_name} chose other tokens than {reference_name}{rows} (the first differing choice of each row; "
             f"its later choices depend on it):"]
    for d in differences:
        where = f"  row {d.row}: {describe_choice(d.stage, d.step, d.position)}"
        if d.note:
            lines.append(f"{where}: {d.note} -> MISMATCH")
            continue
        text = (f"{where}: {reference_name} chose {d.reference_token}, {other_name} chose {d.other_token}; "
                f"reference margin {d.margin:.3e} = {d.relative_margin:.2e} x max|score| {d.scale:.3g}")
        if d.other_margin is not None:
            text += f" ({other_name}'s own margin for its token: {d.other_margin:.3e})"
        if d.more:
            text += (f"; {d.more} more choice(s) of this step differ, the largest reference margin among them "
                     f"{d.worst_relative_margin:.2e} x max|score|")
        if d.near_tie:
            text += (f" -> NEAR-TIE (reference margin <= {d.tie_rtol:g} x max|score|, TOKEN_TIE_RTOL): both tokens "
                     f"are right within fp32 rounding; not a kernel bug")
        else:
            text += (f" -> MISMATCH (reference margin > {d.tie_rtol:g} x max|score|, TOKEN_TIE_RTOL): more than fp32 "
                     f"rounding explains; {other_name} computed different logits (a kernel or model bug)")
        lines.append(text)
    if reference is not None:
        closest = reference.closest_call()
        if closest is not None:
            gap, row, stage, choice = closest
            lines.append(f"closest call of {reference_name} over its {len(reference)} choices: top-two gap "
                         f"{gap:.2e} x max|score| at row {row}, {describe_choice(stage, choice.step, choice.position)}")
    return "\n".join(lines)


def token_mismatch_report(reference_tokens: dict, other_tokens: dict, reference: TokenTrace, other: TokenTrace,
                          tie_rtol: float = DEFAULT_TIE_RTOL, reference_name: str = "reference",
                          other_name: str = "other") -> str | None:
    """None when both runs' stage outputs (generate_tokens' dicts) are equal; else the report of
    :func:`format_differences`, which says for each differing row whether it is a near-tie or a mismatch."""
    n_rows = len(reference_tokens["semantic"])
    differing_rows = [b for b in range(n_rows) for stage in STAGES
                      if not torch.equal(other_tokens[stage][b].cpu(), reference_tokens[stage][b].cpu())]
    if not differing_rows:
        return None
    differing_rows = sorted(set(differing_rows))
    differences = first_differences(reference, other, tie_rtol, rows=differing_rows)
    found = {d.row for d in differences}
    report = format_differences(differences, reference, reference_name, other_name, n_rows)
    unexplained = [b for b in differing_rows if b not in found]
    if unexplained:
        report += (f"\nrows {unexplained}: the outputs differ but every recorded choice agrees (a choice the observer "
                   f"did not see?)")
    return report
