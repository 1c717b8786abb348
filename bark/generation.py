"""Bark generation: text ids -> semantic tokens -> coarse codes -> fine codes -> 24 kHz audio.

Same inputs, keyword arguments and outputs as transformers' ``BarkModel.generate`` (v5), and for greedy decoding the
same tokens and the same audio. The logits pipeline is transformers' too (suppressed tokens / alternating codebooks,
the EOS prioritizer, temperature, top-k (50 by default when sampling), top-p, log-softmax, then argmax or
``torch.multinomial``), so seeded sampling draws from the same distributions.

Beyond the reference, every row of a batch is generated as if it were alone:

* ``history_prompt`` may be one voice preset for the batch or a list with one preset (or None) per row;
* a row stops where its own semantic EOS says (rows that finished are dropped from the batch, checked every
  ``sync_every`` decode steps), its coarse and fine stages run to its own length only, and its audio is decoded
  alone and zero-padded: no garbage tail, no compute on finished rows;
* coarse windows whose rows hold different history lengths are prefilled packed through ``attention_varlen``;
  decode steps use per-row cache lengths;
* a text whose semantic stage ends at once gives zero-length audio instead of an error.

Prefill and decode are separate functions of the model (``prefill``/``prefill_varlen``/``decode_step``); a decode step
reads nothing back from the device. Known quirks of the reference kept on purpose: the semantic ``min_eos_p`` of
generation_config.json is ignored (only the keyword counts), and the fine stage samples whenever its temperature is not
1.0 / None, whatever ``do_sample`` says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .config import BarkGenerationConfig

__all__ = ["generate", "generate_tokens", "SamplingParams", "TokenChoices", "split_generate_kwargs"]

logger = logging.getLogger(__name__)

_STAGE_KEYS = {
    "semantic": {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "min_eos_p"},
    "coarse": {"do_sample", "temperature", "top_k", "top_p"},
    "fine": {"temperature"},
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


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float | None = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @classmethod
    def resolve(cls, stage: str, defaults, overrides: Mapping) -> SamplingParams:
        def pick(name):
            return overrides[name] if name in overrides else getattr(defaults, name)

        params = cls(bool(pick("do_sample")), pick("temperature"), pick("top_k"), pick("top_p"))
        if params.do_sample:
            t = params.temperature
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
                raise ValueError(f"{stage}_temperature: expected a float > 0 when sampling, got {t!r}")
            k = params.top_k
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
                raise ValueError(f"{stage}_top_k: expected an int >= 0 (0 = off), got {k!r}")
            p = params.top_p
            if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
                raise ValueError(f"{stage}_top_p: expected a float in (0, 1], got {p!r}")
        return params


@dataclass(frozen=True)
class TokenChoices:
    """One step's token choices, handed to the ``observer`` of :func:`generate_tokens` and of the stage functions (for
    tests and diagnostics: with no observer nothing extra is computed and nothing is read back). Tensors are on the
    model's device and must not be modified.

    ``stage`` is "semantic", "coarse" or "fine"; ``step`` orders a stage's steps: semantic (t,), coarse (first token
    of the window, t), fine (window, codebook). The N choices of one step are made at once, each from its row of
    ``scores`` (N, V) float32 (-inf where not allowed; greedy decoding takes the argmax): ``tokens`` (N,) long, for
    batch row ``rows[i]`` at ``positions[i]`` of that row's output (semantic and coarse: the token index; fine: the
    frame, in codebook ``step[1]``). ``valid[i]`` is False where the choice is thrown away (semantic rows that already
    ended; fine frames a window keeps from the previous one).
    """

    stage: str
    step: tuple[int, ...]
    rows: torch.Tensor  # (N,) long
    positions: torch.Tensor  # (N,) long
    scores: torch.Tensor  # (N, V) float32
    tokens: torch.Tensor  # (N,) long
    valid: torch.Tensor  # (N,) bool


Observer = Callable[[TokenChoices], None]


def select_tokens(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None):
    """scores (B, V) float32 with -inf where not allowed -> next tokens (B,) long. No host sync.

    transformers' order: temperature, top-k, top-p, log-softmax, then argmax or multinomial sampling.
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
        return sample_one(scores.softmax(dim=-1), generator)
    return torch.argmax(scores, dim=-1)


def sample_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row: probs (B, V) -> (B,) long, the same draw as ``torch.multinomial(probs, 1, generator)``.

    On CPU that is torch.multinomial itself (it validates probs). On a device, torch.multinomial reads two checks
    back to the host (``.item()`` on "no inf/nan/negative" and "no all-zero row"): a sync per token. Its one-sample
    path is argmax(probs / q) with q ~ Exp(1) drawn by ``exponential_`` on a tensor like probs; doing that here
    consumes the same random numbers and gives the same tokens, without the reads.
    """
    if probs.device.type == "cpu":
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return exponential_race(probs, generator)


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """argmax(probs / q), q ~ Exp(1) (B, V): a draw from each row of probs (B, V) -> (B,) long, no host sync."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)  # (B, V)
    return torch.argmax(probs / q, dim=-1)


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


def generate_semantic(model, input_embeds: torch.Tensor, gen: BarkGenerationConfig, params: SamplingParams,
                      max_new_tokens: int, min_eos_p: float | None, sync_every: int = 16,
                      generator: torch.Generator | None = None, observer: Observer | None = None) -> list[torch.Tensor]:
    """Semantic tokens of each row up to (excluding) its EOS: list of B long tensors (n_b,)."""
    cfg = gen.semantic_config
    semantic = model.semantic
    batch, prompt_len, _ = input_embeds.shape
    device = input_embeds.device
    vocab = semantic.config.output_vocab_size
    eos = cfg.eos_token_id
    pad = cfg.semantic_pad_token
    n_allowed = max(cfg.semantic_vocab_size, pad) + 1  # logits computed for ids 0 .. n_allowed-1 only
    if max_new_tokens < 1:
        return [torch.zeros(0, dtype=torch.long, device=device) for _ in range(batch)]
    if prompt_len + max_new_tokens - 1 > semantic.config.block_size:
        raise ValueError(f"semantic_max_new_tokens: {max_new_tokens} new tokens after {prompt_len} prompt positions "
                         f"exceed the semantic model's block_size {semantic.config.block_size}")
    suppressed_inside = None
    if pad > cfg.semantic_vocab_size:
        suppressed_inside = torch.zeros(n_allowed, dtype=torch.bool, device=device)
        suppressed_inside[cfg.semantic_vocab_size:pad] = True

    cache = semantic.new_cache(batch, prompt_len + max_new_tokens - 1)
    tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)  # (B, max_new)
    rows = torch.arange(batch, device=device)  # batch rows still in the cache
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # of the rows in the cache
    hidden = semantic.prefill(input_embeds, cache)  # (B, C)
    for step in range(max_new_tokens):
        logits = semantic.lm_logits(hidden, 0, n_allowed).float()  # (B', n_allowed)
        scores = torch.full((logits.shape[0], vocab), -float("inf"), dtype=torch.float32, device=device)
        scores[:, :n_allowed] = logits
        if suppressed_inside is not None:
            scores[:, :n_allowed].masked_fill_(suppressed_inside, -float("inf"))
        if min_eos_p:
            probs = scores.softmax(dim=-1)
            only_eos = torch.full_like(scores, -float("inf"))
            only_eos[:, eos] = scores[:, eos]
            scores = torch.where((probs[:, eos] > min_eos_p)[:, None], only_eos, scores)
        nxt = select_tokens(scores, params, generator)  # (B',)
        if observer is not None:
            observer(TokenChoices("semantic", (step,), rows, torch.full_like(rows, step), scores, nxt, ~finished))
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens[rows, step] = nxt
        finished = finished | (nxt == eos)
        if step == max_new_tokens - 1:
            break
        if (step + 1) % sync_every == 0:
            done = finished.tolist()  # the only host sync of this loop, every sync_every steps
            if all(done):
                break
            if any(done):
                keep = [i for i, d in enumerate(done) if not d]
                cache.select_rows(keep)
                keep_t = torch.tensor(keep, dtype=torch.long, device=device)
                rows, finished, nxt = rows[keep_t], finished[keep_t], nxt[keep_t]
        hidden = semantic.decode_step(nxt, cache)
    lengths = (tokens != pad).sum(dim=1).tolist()  # tokens before EOS (EOS and what follows are pad)
    return [tokens[b, :n] for b, n in enumerate(lengths)]


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


def generate_coarse(model, semantic_tokens: list[torch.Tensor], histories: list[dict | None],
                    gen: BarkGenerationConfig, params: SamplingParams, generator: torch.Generator | None = None,
                    observer: Observer | None = None) -> list[torch.Tensor]:
    """Coarse tokens of each row (interleaved codebooks, coarse-model ids): list of B long tensors (len_b,)."""
    sem_cfg, cfg = gen.semantic_config, gen.coarse_acoustics_config
    coarse = model.coarse_acoustics
    device = model.device
    cb = gen.codebook_size
    vocab = coarse.config.output_vocab_size
    ratio = gen.semantic_to_coarse_ratio
    max_sem_hist = gen.max_semantic_history
    window = cfg.sliding_window_len
    lengths = coarse_lengths([t.shape[0] for t in semantic_tokens], gen)
    hist = [_coarse_history(h, gen, device) for h in histories]
    streams = [torch.cat([hs, t]) for (hs, _), t in zip(hist, semantic_tokens, strict=True)]  # history + semantic tokens
    base = [hs.shape[0] for hs, _ in hist]
    x_coarse = [hc for _, hc in hist]
    generated = [[] for _ in semantic_tokens]
    # codebook n's logits: [semantic_vocab + n * cb, semantic_vocab + (n + 1) * cb); the last one runs to the end.
    bounds = [(sem_cfg.semantic_vocab_size + n * cb,
               sem_cfg.semantic_vocab_size + (n + 1) * cb if n < cfg.n_coarse_codebooks - 1 else vocab)
              for n in range(cfg.n_coarse_codebooks)]
    infer = torch.tensor([cfg.coarse_infer_token], dtype=torch.long, device=device)
    total = 0
    while True:
        active = [b for b, n in enumerate(lengths) if n > total]
        if not active:
            break
        inputs = []
        for b in active:
            idx = base[b] + int(round(total / ratio))
            win = streams[b][max(0, idx - max_sem_hist):][: cfg.max_coarse_input_length]
            win = F.pad(win, (0, cfg.max_coarse_input_length - win.shape[0]), value=cfg.coarse_semantic_pad_token)
            inputs.append(torch.cat([win, infer, x_coarse[b][-cfg.max_coarse_history:]]))
        need = [min(window, lengths[b] - total) for b in active]
        in_lens = [x.shape[0] for x in inputs]
        cache = coarse.new_cache(len(active), max(in_lens) + max(need) - 1)
        if len(set(in_lens)) == 1:
            hidden = coarse.prefill(coarse.embed(torch.stack(inputs)), cache)  # (B', C)
        else:
            hidden = coarse.prefill_varlen([coarse.embed(x) for x in inputs], cache)
        rows = list(range(len(active)))  # positions in `active` of the rows still in the cache
        outs = [[] for _ in active]
        for step in range(max(need)):
            lo, hi = bounds[step % cfg.n_coarse_codebooks]
            scores = torch.full((len(rows), vocab), -float("inf"), dtype=torch.float32, device=device)
            scores[:, lo:hi] = coarse.lm_logits(hidden, lo, hi).float()
            nxt = select_tokens(scores, params, generator)  # (B',)
            if observer is not None:
                batch_rows = torch.tensor([active[r] for r in rows], dtype=torch.long, device=device)
                observer(TokenChoices("coarse", (total, step), batch_rows, torch.full_like(batch_rows, total + step),
                                      scores, nxt, torch.ones_like(batch_rows, dtype=torch.bool)))
            for i, r in enumerate(rows):
                outs[r].append(nxt[i: i + 1])
            if step == max(need) - 1:
                break
            keep = [i for i, r in enumerate(rows) if need[r] > step + 1]
            if len(keep) < len(rows):  # rows whose window is complete leave the batch (host-known, no sync)
                cache.select_rows(keep)
                keep_t = torch.tensor(keep, dtype=torch.long, device=device)
                nxt = nxt[keep_t]
                rows = [rows[i] for i in keep]
            hidden = coarse.decode_step(nxt, cache)
        for r, b in enumerate(active):
            new = torch.cat(outs[r])
            generated[b].append(new)
            x_coarse[b] = torch.cat([x_coarse[b], new])
        total += window
    return [torch.cat(g) if g else torch.zeros(0, dtype=torch.long, device=device) for g in generated]


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


def generate_fine(model, coarse_tokens: list[torch.Tensor], histories: list[dict | None], gen: BarkGenerationConfig,
                  temperature: float | None, generator: torch.Generator | None = None,
                  observer: Observer | None = None) -> list[torch.Tensor]:
    """Codes of all codebooks of each row: list of B long tensors (n_fine_codebooks, frames_b)."""
    sem_cfg, c_cfg, cfg = gen.semantic_config, gen.coarse_acoustics_config, gen.fine_acoustics_config
    fine = model.fine_acoustics
    device = model.device
    cb = gen.codebook_size
    n_coarse, n_fine = c_cfg.n_coarse_codebooks, cfg.n_fine_codebooks
    win, hist_max = cfg.max_fine_input_length, cfg.max_fine_history_length
    greedy = temperature is None or temperature == 1.0
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
        for n_inner in range(n_coarse, n_fine):
            hidden = fine.hidden_states(n_inner, window)  # (B', win, C)
            if greedy:
                logits = fine.lm_logits(n_inner, hidden[:, rel_min:], cb)  # (B', win - rel_min, cb)
                preds = torch.argmax(logits, dim=-1)
            else:
                logits = fine.lm_logits(n_inner, hidden, cb) / temperature  # (B', win, cb)
                probs = logits.softmax(dim=-1)
                if len(set(rels)) == 1:  # one draw for the whole batch, as transformers
                    flat = probs[:, rel_min:].reshape(-1, cb)
                    preds = torch.multinomial(flat, 1, generator=generator).view(len(active), -1)
                else:
                    preds = torch.stack([
                        F.pad(torch.multinomial(probs[i, rel:], 1, generator=generator).view(-1), (rel - rel_min, 0))
                        for i, rel in enumerate(rels)])
            if observer is not None:
                _observe_fine(observer, n_outer, n_inner, active_rows, active, starts, rel_min, win,
                              logits[:, logits.shape[1] - preds.shape[1]:], preds, keep_old)
            old = window[:, rel_min:, n_inner]
            window[:, rel_min:, n_inner] = torch.where(keep_old, old, preds)
        for r, fill, rel, w in zip(active, fills, rels, window, strict=True):
            r["buf"][fill: fill + (win - rel), n_coarse:] = w[rel:, n_coarse:]
    out = []
    for r in rows:
        codes = r["buf"][r["n_hist"]: r["n_hist"] + r["frames"]]  # (frames, n_fine)
        out.append(codes.transpose(0, 1).contiguous())  # (n_fine, frames)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# stage 4: codec, and the whole pipeline


def decode_audio(model, fine_codes: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Audio (B, max_samples), zero-padded, and each row's length in samples. Rows of equal length are decoded
    together (as transformers does); otherwise each row alone (the LSTM must not see another row's padding)."""
    codec = model.codec_model
    frames = [c.shape[1] for c in fine_codes]
    hop = codec.hop_length
    dtype = codec.quantizer.layers[0].codebook.embed.dtype
    batch = len(fine_codes)
    if batch and len(set(frames)) == 1 and frames[0] > 0:
        audio = codec.decode(torch.stack(fine_codes), check_values=False)[:, 0]  # (B, T * hop)
        return audio, [audio.shape[1]] * batch
    pieces = [codec.decode(c[None], check_values=False)[0, 0] if c.shape[1] > 0
              else torch.zeros(0, dtype=dtype, device=c.device) for c in fine_codes]
    lengths = [p.shape[0] for p in pieces]
    audio = torch.zeros(batch, max(lengths, default=0), dtype=dtype, device=model.device)
    for b, p in enumerate(pieces):
        audio[b, : p.shape[0]] = p
    assert all(n == f * hop for n, f in zip(lengths, frames, strict=True))
    return audio, lengths


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, history_prompt=None,
             return_output_lengths: bool = False, sync_every: int = 16, generator: torch.Generator | None = None,
             **kwargs):
    """Text token ids (B, T) -> audio (B, samples) [, lengths (list of B ints) when return_output_lengths].

    kwargs as transformers: do_sample, temperature, top_k, top_p, min_eos_p, max_new_tokens (semantic), each optionally
    prefixed with semantic_/coarse_/fine_. ``history_prompt``: a voice preset dict, or a list with one per row.
    ``generator`` (ours): a torch.Generator for sampling (default: torch's global RNG, seed with torch.manual_seed).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] < 1:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a tensor of shape (batch, seqlen) with batch >= 1, got {got}")
    if input_ids.is_floating_point():
        raise TypeError(f"input_ids: expected integer token ids, got {input_ids.dtype}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (that of input_ids), got {got}")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every: expected an int >= 1, got {sync_every!r}")
    gen = model.generation_config
    min_eos_p_plain = kwargs.pop("min_eos_p", None)
    stages = split_generate_kwargs(kwargs)
    sem_kw, coarse_kw, fine_kw = stages["semantic"], stages["coarse"], stages["fine"]
    min_eos_p = sem_kw.get("min_eos_p", min_eos_p_plain)
    if min_eos_p is not None and not (isinstance(min_eos_p, (int, float)) and min_eos_p > 0):
        raise ValueError(f"min_eos_p: expected a float > 0 or None, got {min_eos_p!r}")
    max_new = sem_kw.get("max_new_tokens", gen.semantic_config.max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"semantic_max_new_tokens: expected an int >= 0, got {max_new!r}")
    sem_params = SamplingParams.resolve("semantic", gen.semantic_config, sem_kw)
    coarse_params = SamplingParams.resolve("coarse", gen.coarse_acoustics_config, coarse_kw)
    fine_temperature = fine_kw.get("temperature", gen.fine_acoustics_config.temperature)

    batch = input_ids.shape[0]
    histories = _normalize_histories(history_prompt, batch, gen, model.device)
    embeds = semantic_input_embeds(model, input_ids, attention_mask, histories, gen)
    semantic_tokens = generate_semantic(model, embeds, gen, sem_params, max_new, min_eos_p, sync_every, generator)
    coarse_tokens = generate_coarse(model, semantic_tokens, histories, gen, coarse_params, generator)
    fine_codes = generate_fine(model, coarse_tokens, histories, gen, fine_temperature, generator)
    audio, lengths = decode_audio(model, fine_codes)
    if return_output_lengths:
        return audio, lengths
    return audio


def generate_tokens(model, input_ids, attention_mask=None, history_prompt=None, observer: Observer | None = None,
                    **kwargs) -> dict:
    """Like :func:`generate` but returns every stage's tokens (for tests and benchmarks): semantic (list of (n_b,)),
    coarse (list of (len_b,)), fine (list of (n_fine, frames_b)). ``observer``, when given, is called with the
    :class:`TokenChoices` of every step, in the order the choices are made."""
    gen = model.generation_config
    with torch.no_grad():
        min_eos_p_plain = kwargs.pop("min_eos_p", None)
        sync_every = kwargs.pop("sync_every", 16)
        generator = kwargs.pop("generator", None)
        stages = split_generate_kwargs(kwargs)
        sem_kw = stages["semantic"]
        min_eos_p = sem_kw.get("min_eos_p", min_eos_p_plain)
        max_new = sem_kw.get("max_new_tokens", gen.semantic_config.max_new_tokens)
        histories = _normalize_histories(history_prompt, input_ids.shape[0], gen, model.device)
        embeds = semantic_input_embeds(model, input_ids, attention_mask, histories, gen)
        sem = generate_semantic(model, embeds, gen, SamplingParams.resolve("semantic", gen.semantic_config, sem_kw),
                                max_new, min_eos_p, sync_every, generator, observer)
        coarse = generate_coarse(model, sem, histories, gen,
                                 SamplingParams.resolve("coarse", gen.coarse_acoustics_config, stages["coarse"]),
                                 generator, observer)
        fine = generate_fine(model, coarse, histories, gen,
                             stages["fine"].get("temperature", gen.fine_acoustics_config.temperature), generator,
                             observer)
    return {"semantic": sem, "coarse": coarse, "fine": fine}
