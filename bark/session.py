"""Prepared decode sessions: plan once, run many.

A :class:`DecodeSession` is what one stage of one ``generate`` call needs to decode a fixed batch of rows with one of
Bark's causal sub-models (semantic or coarse), prepared once:

* the KV cache, ``(layers, batch, max_seqlen, heads, head_dim)``, allocated up front, with per-row lengths on the
  device (and on the host);
* the attention op, resolved and validated once (backend, device, dtype, head_dim): a step calls the backend's
  ``attention_with_kvcache`` directly, with no validation, registry lookup or environment read per layer;
* the token head(s): callables ``head(hidden (B, C)) -> next tokens (B,)`` that own their static buffers (logits
  processing, sampling, the finished mask, the token record); a stage with alternating codebooks has one head per
  codebook, a *variant* of the step;
* the step itself, ``step(variant)``: embeddings of the current tokens -> every layer (in-place cache append) -> final
  norm -> ``head[variant]`` -> the next tokens, written into the session's static token buffer. It reads nothing back
  from the device.

How a step runs (``mode``):

* ``"eager"``: the step function called from Python. On a CPU with the ``sdpa`` backend the session attends with
  host-known lengths: rows of equal length attend together to the used prefix of the cache; otherwise each row
  attends alone to its own prefix (no mask), and rows whose tokens are not needed (``set_live``) not at all. Prompts
  are prefilled one row at a time. The cache is then heads first, (B, H, S_max, D) per layer: each (row, head)'s
  keys one contiguous block, which SDPA's CPU kernel reads twice as fast as the backend ops' (B, S_max, H, D). On a
  CPU the compute-bound prefill and the memory-bound reads of the cached keys and values gain nothing from a batch
  (a batch of 8 prefills slower than 8 rows one by one: the activations leave the cache), so only the weight reads
  of a step are shared; and each row's attention is then the very call it gets when decoded alone;
* ``"graph"`` (CUDA): each variant is warmed up (every Triton kernel compiled) and captured once as a CUDA graph, then
  replayed: one launch per step;
* ``"compile"``: the step through ``torch.compile(fullgraph=True)``, and on CUDA captured as a graph after that;
* ``"fused"``: the step as the fused Triton decode kernels (bark_kernels.backends.triton.decode): the embeddings, five
  launches per layer (LN 1 + q/k/v projection + cache append; split-K attention with its combine inside; output
  projection + residual; LN 2 + MLP input projection + GELU; MLP output projection + residual), then the head: for
  the heads that describe themselves with ``fused_spec()`` (Bark's heads with transformers' recipe: greedy, or
  sampling with temperature/top-k/top-p by the exponential race) the final LayerNorm + lm-head slice and one kernel
  for the logits processing, the draw and the bookkeeping (one torch op draws the random numbers when sampling);
  any other head runs as its own torch ops after the fused layers (logged once). On CUDA captured as one CUDA graph
  per variant (PDL on sm_90+), on CPU run eagerly under Triton's interpreter (tests);
* ``"auto"``: ``"graph"`` on CUDA, ``"eager"`` elsewhere (measured fastest: see docs/decode.md; ``fused`` becomes
  the CUDA default only once a GPU run measures it faster).

The fullgraph compile of a step is also the CPU proof that a step is capturable: it traces only when nothing in it
branches on device values or syncs with the host.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from bark_kernels import registry

from .kv_cache import KVCache

__all__ = ["DecodeSession", "DECODE_MODES", "FusedHeadSpec", "resolve_mode", "resolve_decode_attention"]

DECODE_MODES = ("auto", "eager", "graph", "compile", "fused")
WARMUP_STEPS = 2  # steps each variant runs before its capture (the heads' records need this much slack)

Head = Callable[[torch.Tensor], torch.Tensor]

logger = logging.getLogger("bark")


def resolve_mode(mode: str, device: torch.device) -> str:
    """'auto' -> the default for ``device``; checks the name and that 'graph' has a CUDA device."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode_mode: expected one of {list(DECODE_MODES)}, got {mode!r}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise ValueError(f"decode_mode: 'graph' captures CUDA graphs and needs a CUDA device, the model is on "
                         f"{device.type}; use 'eager' or 'compile' (or 'auto')")
    if mode == "fused":
        reason = _fused_device_problem(device)
        if reason is not None:
            raise ValueError(f"decode_mode: 'fused' runs the fused Triton decode kernels, which cannot run on "
                             f"{device.type} here ({reason}); use 'auto', 'eager' or 'compile'")
    return mode


def _fused_device_problem(device: torch.device) -> str | None:
    """Why the fused decode kernels cannot run on ``device`` at all (any dtype), or None."""
    try:
        from bark_kernels.backends.triton import decode
    except Exception as exc:  # triton missing or broken
        return f"{type(exc).__name__}: {exc}"
    return decode.problem(device, torch.float32, 64)


@dataclass(frozen=True, eq=False)
class FusedHeadSpec:
    """What the fused step's head kernels need to do exactly what a head callable does (a head's ``fused_spec()``;
    transformers' recipe only). Token ids lo..hi-1 are scored (the lm-head rows lo..hi-1 on the final-normed hidden),
    every other id of the ``vocab``-wide score row is -inf. Then: ``suppressed`` (hi - lo,) bool ids -> -inf; with
    ``eos`` (an absolute id, semantic stage): EOS -> -inf while ``col < min_new_tokens``, only EOS left when its
    probability exceeds ``min_eos_p``; argmax, or sampling (temperature, top-k (0: off), top-p (1.0: off), then one
    draw by the exponential race over a (B, vocab) Exp(1) tensor drawn with ``generator``, as torch.multinomial);
    with ``eos``: rows already ``finished`` give ``pad``, then finished |= token == eos. The token goes to
    ``record[:, col]`` and ``col`` += 1."""

    lo: int
    hi: int
    vocab: int
    record: torch.Tensor  # (B, W) long
    col: torch.Tensor  # () long
    finished: torch.Tensor | None = None  # (B,) bool (with eos)
    eos: int | None = None
    pad: int = 0
    suppressed: torch.Tensor | None = None  # (hi - lo,) bool
    min_new_tokens: int = 0
    min_eos_p: float | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None


def resolve_decode_attention(model, device: torch.device, dtype: torch.dtype) -> tuple[str, Callable]:
    """The backend name and its ``attention_with_kvcache`` op for ``model`` (explicit backend or automatic choice):
    validated once here, called directly by every step."""
    return registry.select("attention_with_kvcache", device, dtype, model.config.head_dim, backend=model.attn_backend)


class DecodeSession:
    """A fixed batch of rows decoded with one causal sub-model (semantic or coarse); see the module docstring.

    ``heads``: one callable per step variant, ``head(hidden (B, C) final-normed) -> next tokens (B,) long``; it may
    update state of its own (in place, on the device). ``generators``: the torch.Generators the heads sample with
    (their states are saved before and restored after warm-up and capture, which run the heads).
    """

    def __init__(self, model, batch: int, max_seqlen: int, heads: Sequence[Head], mode: str = "auto",
                 generators: Sequence[torch.Generator] = (), compile_backend: str = "inductor") -> None:
        weight = model.lm_head.weight
        self.model = model
        self.device, self.dtype = weight.device, weight.dtype
        self.batch = batch
        self.mode = resolve_mode(mode, self.device)
        cfg = model.config
        if max_seqlen > cfg.block_size:
            raise ValueError(f"max_seqlen: {max_seqlen} positions exceed the model's block_size {cfg.block_size}")
        self.max_seqlen = max_seqlen
        self.backend, self._op = resolve_decode_attention(model, self.device, self.dtype)
        self.softmax_scale = cfg.head_dim ** -0.5
        self.heads = list(heads)
        self.generators = [g for g in generators if g is not None]
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,) input of the next step
        # CPU + sdpa: attend with host-known lengths (see _attend_host) on a heads-first cache; every other case: the
        # backend op on the device lengths (static shapes, capturable)
        self._set_host_lengths(self.device.type == "cpu" and self.backend == "sdpa" and self.mode == "eager")
        self._host_ctx: tuple | None = None
        self._live: list[int] | None = None  # host mode: the rows whose next tokens are used (None: every row)
        self._runners: dict[int, Callable[[], None]] = {}
        self._graph_pool = None
        self.compile_backend = compile_backend
        self.fallback: str | None = None  # why a capture fell back to eager, if it did
        self.steps_run = 0
        self._fused: _FusedLayers | None = None
        self.fused_heads: dict[int, str | None] = {}  # fused mode: per variant, why its head runs unfused (None: fused)
        if self.mode == "fused":
            from bark_kernels.backends.triton import decode

            reason = decode.problem(self.device, self.dtype, cfg.head_dim)
            if reason is not None:
                raise ValueError(f"decode_mode: 'fused' cannot run the {type(model).__name__} in {self.dtype} on "
                                 f"{self.device.type}: {reason}")

    def _set_host_lengths(self, host: bool) -> None:
        """The attention path and the cache it needs: host lengths on a heads-first cache (B, H, S_max, D) per layer,
        whose (row, head) blocks SDPA's CPU kernel reads twice as fast; else the backend op's (B, S_max, H, D)."""
        cfg = self.model.config
        self.host_lengths = host
        self.cache = KVCache(cfg.num_layers, self.batch, self.max_seqlen, cfg.num_heads, cfg.head_dim, self.dtype,
                             self.device, heads_first=host)
        self._k_layers = [self.cache.k[i] for i in range(cfg.num_layers)]  # per-layer views
        self._v_layers = [self.cache.v[i] for i in range(cfg.num_layers)]
        self._attend = self._attend_host if host else self._attend_device

    # -- the step ------------------------------------------------------------------------------------------------------

    def _attend_device(self, q, k, v, layer: int) -> torch.Tensor:
        """(B, 1, H, D) views -> (B, 1, H, D); appends k/v at each row's length (device lengths, in place)."""
        return self._op(q, self._k_layers[layer], self._v_layers[layer], k, v, self.cache.seqlens, True,
                        self.softmax_scale)

    def set_live(self, rows: Sequence[int] | None) -> None:
        """Host mode only: the rows whose next tokens will be used (None: all). The others (semantic rows that ended,
        coarse rows whose window is complete or that have no window) skip attention until the next prefill: their
        keys/values are not appended and their tokens are garbage, which the stages throw away (pad, or never read).
        On a CPU a decode step reads every row's cached keys/values from memory, so a row that is only kept for the
        static batch would cost as much as a live one. Elsewhere (static shapes, device lengths) nothing changes."""
        self._live = None if rows is None or len(rows) == self.batch else sorted(int(r) for r in rows)

    def _prepare_host_step(self) -> None:
        """Once per step (host mode): where each row appends and what it may see, shared by every layer. Rows of
        equal length, all live: one batched attention; otherwise each live row attends alone to its own prefix
        (no mask, no keys past it, nothing for rows that are not live: the same call as that row decoded alone)."""
        lengths = self.cache.host_seqlens
        longest = max(lengths)
        if self._live is None and min(lengths) == longest:
            self._host_ctx = (longest, None)
            return
        live = list(range(self.batch)) if self._live is None else self._live
        self._host_ctx = (None, [(b, lengths[b] + 1) for b in live])

    def _attend_host(self, q, k, v, layer: int) -> torch.Tensor:
        """CPU + sdpa: append at host-known positions and attend to the used prefix of the cache only."""
        uniform, per_row = self._host_ctx
        k_cache, v_cache = self._k_layers[layer], self._v_layers[layer]  # (B, H, S_max, D): heads first
        if uniform is not None:
            k_cache[:, :, uniform] = k[:, 0]  # (B, H, D)
            v_cache[:, :, uniform] = v[:, 0]
            used = uniform + 1
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :, :used], v_cache[:, :, :used],
                                                 scale=self.softmax_scale)  # (B, H, 1, D)
            return out.transpose(1, 2)  # (B, 1, H, D)
        out = q.new_zeros(q.shape[0], q.shape[2], 1, q.shape[3])  # (B, H, 1, D): rows not live stay 0
        for b, used in per_row:
            k_cache[b, :, used - 1] = k[b, 0]  # (H, D)
            v_cache[b, :, used - 1] = v[b, 0]
            out[b:b + 1] = F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k_cache[b:b + 1, :, :used],
                                                          v_cache[b:b + 1, :, :used],
                                                          scale=self.softmax_scale)  # (1, H, 1, D)
        return out.transpose(1, 2)  # (B, 1, H, D)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at each row's position -> final-normed hidden (B, C); every layer appends to the cache."""
        m = self.model
        seqlens = self.cache.seqlens
        hidden = m.input_embeds_layer(tokens) + m.position_embeds_layer(seqlens.long())  # (B, C)
        hidden = hidden[:, None]  # (B, 1, C)
        for i, block in enumerate(m.layers):
            hidden = block(hidden, self._attend, i)
        seqlens.add_(1)
        return m.layernorm_final(hidden[:, 0])  # (B, C)

    def _step_fn(self, variant: int) -> Callable[[], None]:
        head = self.heads[variant]

        def step() -> None:
            nxt = head(self._decode(self.tokens))  # (B,)
            self.tokens.copy_(nxt)

        return _own_code(step)

    def _fused_step_fn(self, variant: int) -> Callable[[], None]:
        """The fused step (mode 'fused'): 1 + 5 per layer launches, then the fused head (2 launches, + 1 torch op
        drawing the random numbers when sampling) or, for a head without a fused form, the head's own ops."""
        if self._fused is None:
            self._fused = _FusedLayers(self.model, self.batch, self.cache)
        layers, head = self._fused, self.heads[variant]
        spec = head.fused_spec() if hasattr(head, "fused_spec") else "the head has no fused_spec()"
        if isinstance(spec, FusedHeadSpec):
            self.fused_heads[variant] = None
            pick = _FusedPick(self.model, layers, spec, self.tokens, self.cache.seqlens)

            def step() -> None:
                layers.run(self.tokens)
                pick.run(layers.x)

            return _own_code(step)
        if variant not in self.fused_heads:
            logger.info("bark: fused decode of the %s: the head of variant %d runs as torch ops after the fused "
                        "layers (%s)", type(self.model).__name__, variant, spec)
        self.fused_heads[variant] = spec
        lnf = self.model.layernorm_final

        def step_unfused_head() -> None:
            layers.run(self.tokens)
            hidden = F.layer_norm(layers.x, lnf.normalized_shape, lnf.weight, lnf.bias, lnf.eps)  # (B, C)
            self.cache.seqlens.add_(1)
            self.tokens.copy_(head(hidden))

        return _own_code(step_unfused_head)

    # -- running -------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_embeds, variant: int = 0) -> torch.Tensor:
        """Prompt -> the first new token of each row (B,), into ``self.tokens``.

        ``input_embeds``: (B, T, C) for rows of equal length, or a list of B tensors (T_b, C) (packed through
        varlen attention). Resets the cache lengths; the head of ``variant`` picks the token."""
        if self.mode != "eager" and not self._runners:
            self.prepare()
        m = self.model
        self._live = None
        if self.host_lengths:  # CPU: one row at a time (module docstring)
            hidden = m.prefill_rows(list(input_embeds), self.cache)
        elif isinstance(input_embeds, torch.Tensor):
            hidden = m.prefill(input_embeds, self.cache)
        else:
            hidden = m.prefill_varlen(list(input_embeds), self.cache)
        self.tokens.copy_(self.heads[variant](hidden))
        return self.tokens

    @torch.no_grad()
    def step(self, variant: int = 0) -> torch.Tensor:
        """One decode step of every row: ``self.tokens`` -> the next tokens (returned; the same static tensor)."""
        cache = self.cache
        cache.check_room(1)
        if self.host_lengths:
            self._prepare_host_step()
        runner = self._runners.get(variant)
        if runner is None:
            runner = self._runners[variant] = self._make_runner(variant)
        runner()
        cache.host_seqlens = [n + 1 for n in cache.host_seqlens]
        self.steps_run += 1
        return self.tokens

    def _make_runner(self, variant: int) -> Callable[[], None]:
        fn = self._fused_step_fn(variant) if self.mode == "fused" else self._step_fn(variant)
        if self.mode == "eager":
            return fn
        if self.mode == "compile":
            fn = self._compiled(variant)
        if self.device.type != "cuda":
            return fn
        try:
            return self._capture(fn)
        except Exception as exc:  # keep generating, say why (tests assert there is no fallback)
            self.fallback = f"{type(exc).__name__}: {exc}"
            logger.warning("bark: CUDA-graph capture of the %s step failed (%s); running it eagerly",
                           type(self.model).__name__, self.fallback)
            return fn

    def _compiled(self, variant: int) -> Callable[[], None]:
        """The step through torch.compile(fullgraph=True). A head that samples with an explicit torch.Generator
        (which dynamo cannot trace) has its pick (the draw) run outside the compiled part."""
        head = self.heads[variant]
        options = dict(fullgraph=True, dynamic=False, backend=self.compile_backend)
        if not getattr(head, "eager_pick", False):
            return torch.compile(self._step_fn(variant), **options)
        forward = torch.compile(_own_code(lambda: head.scores(self._decode(self.tokens))), **options)

        def step() -> None:
            self.tokens.copy_(head.pick(forward()))

        return step

    @torch.no_grad()
    def prepare(self) -> None:
        """Build every variant's runner now (CUDA: warm up, compile, capture), before any real state exists: warm-up
        runs steps on the empty cache; lengths, token state and generator states are restored afterwards."""
        if self.mode == "eager":
            return
        sampling = any(getattr(getattr(h, "params", None), "do_sample", True) for h in self.heads)
        saved = [g.get_state() for g in self.generators] if sampling else []
        cuda_rng = torch.cuda.get_rng_state(self.device) if sampling and self.device.type == "cuda" else None
        cpu_rng = torch.get_rng_state() if sampling else None
        snapshot = self._snapshot_heads()
        try:
            for variant in range(len(self.heads)):
                if variant not in self._runners:
                    self._restore_heads(snapshot)
                    self.cache.set_lengths([0] * self.batch)
                    self._runners[variant] = self._make_runner(variant)
        finally:
            try:  # warm-up drew random numbers: give them back, so sampling draws what eager steps would
                for g, state in zip(self.generators, saved):
                    g.set_state(state)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, self.device)
                if cpu_rng is not None:
                    torch.set_rng_state(cpu_rng)
            except RuntimeError as exc:  # sampled tokens then differ from an eager run's; say so
                logger.warning("bark: could not restore the random generators after capture (%s): sampled tokens "
                               "will differ from decode_mode='eager'", exc)
            self._restore_heads(snapshot)
            self.cache.set_lengths([0] * self.batch)
            self.tokens.zero_()

    def _snapshot_heads(self) -> list:
        return [h.snapshot() if hasattr(h, "snapshot") else None for h in self.heads]

    def _restore_heads(self, snapshot: list) -> None:
        for h, s in zip(self.heads, snapshot, strict=True):
            if s is not None:
                h.restore(s)

    def _capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Warm ``fn`` up and capture it as a CUDA graph (the heads' generators registered with it, so replays draw
        fresh numbers); returns the replay."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return _capture_graph(fn, self.device, self._graph_pool, lambda: self.cache.set_lengths([0] * self.batch),
                              [g for g in self.generators if g.device.type == "cuda"])


class _FusedLayers:
    """The fused step's embeddings and layers on static buffers: ``run(tokens)`` leaves the last layer's residual
    stream in ``x`` (B, C), every layer's key/value appended to the cache at each row's length (lengths unchanged)."""

    def __init__(self, model, batch: int, cache: KVCache) -> None:
        from bark_kernels.backends.triton import decode

        self.ops = decode
        cfg = model.config
        weight = model.lm_head.weight
        dev, dtype, width = weight.device, weight.dtype, cfg.hidden_size
        self.model, self.cache = model, cache
        self.x = torch.zeros(batch, width, dtype=dtype, device=dev)  # (B, C) residual stream
        self.q = torch.zeros(batch, width, dtype=dtype, device=dev)  # (B, H * D)
        self.attn = torch.zeros(batch, width, dtype=dtype, device=dev)  # (B, H * D)
        self.h = torch.zeros(batch, model.layers[0].mlp.in_proj.weight.shape[0], dtype=dtype, device=dev)  # (B, 4C)
        self.nheads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.softmax_scale = cfg.head_dim ** -0.5
        self.k_layers = [cache.k[i] for i in range(cfg.num_layers)]  # (B, S_max, H, D) views
        self.v_layers = [cache.v[i] for i in range(cfg.num_layers)]
        self.set_num_splits(decode.attention_splits(batch, cfg.num_heads, cache.max_seqlen, cfg.head_dim, dev))

        def detached(p):
            return None if p is None else p.detach()

        self.layers = [tuple(detached(p) for p in (
            b.layernorm_1.weight, b.layernorm_1.bias, b.attn.att_proj.weight, b.attn.att_proj.bias,
            b.attn.out_proj.weight, b.attn.out_proj.bias, b.layernorm_2.weight, b.layernorm_2.bias,
            b.mlp.in_proj.weight, b.mlp.in_proj.bias, b.mlp.out_proj.weight, b.mlp.out_proj.bias))
            + (b.layernorm_1.eps, b.layernorm_2.eps) for b in model.layers]
        self.wte = model.input_embeds_layer.weight.detach()
        self.wpe = model.position_embeds_layer.weight.detach()

    def set_num_splits(self, num_splits: int) -> None:
        """How many programs share each (row, head)'s keys in the attention kernel (set from the shapes; tests)."""
        rows = self.x.shape[0] * self.nheads
        dev = self.x.device
        self.acc_ws = torch.zeros(num_splits, rows, self.ops.head_dim_pad(self.head_dim), dtype=torch.float32,
                                  device=dev)  # (S, B * H, D_PAD)
        self.m_ws = torch.zeros(num_splits, rows, dtype=torch.float32, device=dev)  # (S, B * H)
        self.l_ws = torch.zeros(num_splits, rows, dtype=torch.float32, device=dev)
        self.counter = torch.zeros(rows, dtype=torch.int32, device=dev)  # (B * H,) zero between launches

    def run(self, tokens: torch.Tensor) -> None:
        ops, x, q, attn, h, seqlens = self.ops, self.x, self.q, self.attn, self.h, self.cache.seqlens
        ops.fused_embed(tokens, seqlens, self.wte, self.wpe, x)
        for i, (ln1_w, ln1_b, qkv_w, qkv_b, o_w, o_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b, eps1, eps2) \
                in enumerate(self.layers):
            k_cache, v_cache = self.k_layers[i], self.v_layers[i]
            ops.fused_ln_qkv(x, ln1_w, ln1_b, qkv_w, qkv_b, seqlens, q, k_cache, v_cache, eps1)
            ops.fused_attention(q, k_cache, v_cache, seqlens, attn, self.acc_ws, self.m_ws, self.l_ws, self.counter,
                                self.softmax_scale)
            ops.fused_linear_residual(attn, o_w, o_b, x)
            ops.fused_ln_linear(x, ln2_w, ln2_b, fc1_w, fc1_b, h, eps2, True)
            ops.fused_linear_residual(h, fc2_w, fc2_b, x)


class _FusedPick:
    """The fused head of one variant: final LayerNorm + lm-head rows lo..hi-1 (float32 logits), then the pick kernel
    (logits processing, argmax or the exponential race, record, finished mask, lengths + 1, col + 1)."""

    def __init__(self, model, layers: _FusedLayers, spec: FusedHeadSpec, tokens: torch.Tensor,
                 seqlens: torch.Tensor) -> None:
        self.ops, self.spec, self.tokens, self.seqlens = layers.ops, spec, tokens, seqlens
        batch, dev = tokens.shape[0], tokens.device
        lnf = model.layernorm_final
        self.lnf_w = lnf.weight.detach()
        self.lnf_b = None if lnf.bias is None else lnf.bias.detach()
        self.eps = lnf.eps
        self.w = model.lm_head.weight.detach()[spec.lo:spec.hi]  # (n, C) view
        self.logits = torch.zeros(batch, spec.hi - spec.lo, dtype=torch.float32, device=dev)  # (B, n)
        self.exp_q = torch.zeros(batch, spec.vocab, dtype=torch.float32, device=dev) if spec.do_sample else None
        self.finished = spec.finished if spec.finished is not None else torch.zeros(batch, dtype=torch.bool,
                                                                                     device=dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
        self.eos = -1 if spec.eos is None else spec.eos - spec.lo
        self.min_eos_p = float(spec.min_eos_p or 0.0)

    def run(self, x: torch.Tensor) -> None:
        spec = self.spec
        if self.exp_q is not None:  # the random numbers torch.multinomial would draw for a (B, vocab) row
            self.exp_q.exponential_(1, generator=spec.generator)
        self.ops.fused_ln_linear(x, self.lnf_w, self.lnf_b, self.w, None, self.logits, self.eps, False)
        self.ops.fused_pick(self.logits, self.exp_q, spec.suppressed, self.finished, spec.record, spec.col,
                            self.tokens, self.seqlens, self.counter, spec.lo, self.eos, spec.pad, spec.min_new_tokens,
                            self.min_eos_p, spec.do_sample, spec.temperature, spec.top_k, spec.top_p)


def _own_code(fn: Callable) -> Callable:
    """A copy of closure ``fn`` with a code object of its own. torch.compile caches compiled code per code object, up
    to a recompile limit; every session compiles its own step (its own tensors), so each gets its own code object
    instead of using up a limit shared by all sessions of the process."""
    global _code_serial
    _code_serial += 1
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{_code_serial}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


_code_serial = 0

# Sessions kept per model for reuse by later generate calls with the same shapes and settings (their caches,
# buffers, compiled code and CUDA graphs); weakly keyed, so a model's sessions go with it.
_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
POOL_SIZE = 4  # sessions kept per model (least recently used dropped first)


def pooled(model, key: tuple, build: Callable[[], object]):
    """The object pooled for (model, key), built by ``build()`` when absent. ``key`` must include everything the
    object depends on; the model's parameter addresses are added here (a moved or re-cast model gets new sessions:
    a captured graph holds raw device addresses)."""
    pool = _POOLS.setdefault(model, collections.OrderedDict())
    weight = next(model.parameters())
    full_key = key + (weight.data_ptr(), weight.dtype, weight.device, model.layers[0].attn.att_proj.weight.data_ptr())
    item = pool.get(full_key)
    if item is None:
        item = build()
        pool[full_key] = item
        while len(pool) > POOL_SIZE:
            pool.popitem(last=False)
    else:
        pool.move_to_end(full_key)
    return item


class FinePasses:
    """The fine stage's greedy passes on static shapes: one window buffer (B, win, n_codes) and a keep mask (B, win)
    filled per window; ``run(n)`` predicts codebook ``n`` at every position of every row (full-window logits, as
    transformers computes them) and writes it where ``keep`` is False. On CUDA with ``mode='graph'`` each codebook's
    pass is warmed up and captured once, then replayed."""

    def __init__(self, fine, batch: int, win: int, n_codes: int, codebooks: Sequence[int], codebook_size: int,
                 fill: int, mode: str) -> None:
        weight = next(fine.parameters())
        self.fine, self.device = fine, weight.device
        self.mode = resolve_mode(mode, self.device)
        self.window = torch.full((batch, win, n_codes), fill, dtype=torch.long, device=self.device)
        self.keep = torch.ones(batch, win, dtype=torch.bool, device=self.device)
        self.codebook_size = codebook_size
        # a CPU runs each row's pass alone, and only for ``rows`` (those with a window this time): batched passes are
        # compute-bound there and slower than their rows one by one (bark.session's module docstring)
        self.per_row = self.device.type == "cpu" and self.mode == "eager"
        self.rows: Sequence[int] = range(batch)
        self.fallback: str | None = None
        self._runners: dict[int, Callable[[], None]] = {}
        if self.mode == "graph":
            pool = torch.cuda.graph_pool_handle()
            saved = self.window.clone()
            for n in codebooks:
                try:
                    self._runners[n] = _capture_graph(self._pass_fn(n), self.device, pool, lambda: None)
                except Exception as exc:  # keep generating, say why (tests assert there is no fallback)
                    self.fallback = f"{type(exc).__name__}: {exc}"
                    logger.warning("bark: CUDA-graph capture of the fine pass failed (%s); running it eagerly",
                                   self.fallback)
                    self._runners = {}
                    break
            self.window.copy_(saved)

    def _pass_fn(self, n: int) -> Callable[[], None]:
        fine, window, keep, cb = self.fine, self.window, self.keep, self.codebook_size

        def run() -> None:
            hidden = fine.hidden_states(n, window)  # (B, win, C)
            preds = torch.argmax(fine.lm_logits(n, hidden, cb), dim=-1)  # (B, win)
            window[:, :, n] = torch.where(keep, window[:, :, n], preds)

        def run_rows() -> None:
            for b in self.rows:
                hidden = fine.hidden_states(n, window[b:b + 1])  # (1, win, C)
                preds = torch.argmax(fine.lm_logits(n, hidden, cb), dim=-1)  # (1, win)
                window[b, :, n] = torch.where(keep[b], window[b, :, n], preds[0])

        return run_rows if self.per_row else run

    @torch.no_grad()
    def run(self, n: int) -> None:
        runner = self._runners.get(n)
        if runner is None:
            runner = self._pass_fn(n)
        runner()


def _capture_graph(fn: Callable[[], None], device: torch.device, pool, reset: Callable[[], None],
                   generators: Sequence[torch.Generator] = ()) -> Callable[[], None]:
    """Warm ``fn`` up on a side stream (every kernel compiled, workspaces allocated), then capture it as a CUDA graph in
    ``pool``; ``reset()`` runs before each warm-up call and before the capture; ``generators`` (CUDA) are registered
    with the graph. Returns the replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(WARMUP_STEPS):
            reset()
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    for g in generators:
        register = getattr(graph, "register_generator_state", None)
        if register is None:
            raise RuntimeError("decode_mode 'graph' with a torch.Generator needs torch >= 2.5 "
                               "(CUDAGraph.register_generator_state); use decode_mode='eager'")
        register(g)
    reset()
    with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay


@contextlib.contextmanager
def no_host_reads():
    """Raise on any tensor read-back to the host (item, tolist, bool, int, float) inside the block (tests)."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def forbidden(*args, **kwargs):
        raise AssertionError("host read inside a decode step")

    try:
        for n in names:
            setattr(torch.Tensor, n, forbidden)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
