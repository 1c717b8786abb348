"""Bark's causal GPT (semantic and coarse sub-models) on the bark_kernels dispatcher, and the whole ``BarkModel``.

Parameter names equal the Hugging Face checkpoint keys under ``semantic.`` and ``coarse_acoustics.``::

    input_embeds_layer.weight, position_embeds_layer.weight,
    layers.{n}.layernorm_1.{weight,bias}, layers.{n}.attn.att_proj.{weight,bias}, layers.{n}.attn.out_proj.{weight,bias},
    layers.{n}.layernorm_2.{weight,bias}, layers.{n}.mlp.in_proj.{weight,bias}, layers.{n}.mlp.out_proj.{weight,bias},
    layernorm_final.{weight,bias}, lm_head.weight            (biases only when config.bias)

Inference only (no dropout, no training). Every attention goes through bark_kernels:

* ``forward``: whole sequences, dense causal ``bk.attention`` (the logits-parity path);
* ``prefill``: dense causal ``bk.attention`` for rows of equal length, or ``bk.attention_varlen`` for ragged rows,
  writing keys/values into a :class:`~bark.kv_cache.KVCache`;
* ``decode_step``: one token per row through ``bk.attention_with_kvcache`` (in-place append, per-row lengths,
  ``check_bounds=False``: the cache tracks lengths on the host, so the step never synchronises).

q, k, v are views of the fused projection, ``att_proj(x).view(..., 3, H, D).unbind(-3)``: never copied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

import bark_kernels as bk

from .config import BarkSubModelConfig, attn_backend_name
from .kv_cache import KVCache

__all__ = ["BarkModel", "BarkBlock", "BarkCausalModel", "BarkSelfAttention", "BarkMLP", "check_backend"]

logger = logging.getLogger(__name__)

# attend(q, k, v, layer_idx) -> out, with q/k/v (..., H, D) views of the fused projection.
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def check_backend(backend: str | None, head_dims: Sequence[int] = ()) -> str | None:
    """Fail early, naming what is available, when an explicitly requested backend cannot run in this process or
    cannot serve one of the model's ``head_dims`` (checked when the model is built, not at its first forward)."""
    if backend is not None and backend not in bk.available_backends():
        raise ValueError(
            f"attn_implementation: the bark_kernels backend {backend!r} is not available in this process "
            f"(available: {bk.available_backends()}); use attn_implementation='auto' to let the dispatcher choose"
        )
    if backend is not None:
        from bark_kernels import registry

        for head_dim in sorted(set(head_dims)):
            reason = registry.head_dim_support(backend, head_dim)
            if reason is not None:
                raise ValueError(
                    f"attn_implementation: the bark_kernels backend {backend!r} cannot serve this model's head_dim "
                    f"{head_dim}: {reason}; use attn_implementation='auto' (the dispatcher picks a backend that "
                    f"serves it) or 'triton' (any head_dim up to 256)"
                )
    return backend


class BarkSelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (``att_proj``) and ``out_proj``."""

    def __init__(self, config: BarkSubModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.att_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor, attend: AttendFn, layer_idx: int) -> torch.Tensor:
        """x (..., C) -> (..., C); ``attend`` gets q, k, v of shape (..., H, D) (strided views)."""
        lead = x.shape[:-1]
        qkv = self.att_proj(x).view(*lead, 3, self.num_heads, self.head_dim)  # (..., 3, H, D)
        q, k, v = qkv.unbind(-3)  # each (..., H, D)
        out = attend(q, k, v, layer_idx)  # (..., H, D)
        return self.out_proj(out.reshape(*lead, self.num_heads * self.head_dim))  # (..., C)


class BarkMLP(nn.Module):
    def __init__(self, config: BarkSubModelConfig) -> None:
        super().__init__()
        self.in_proj = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=config.bias)
        self.out_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.in_proj(x)))


class BarkBlock(nn.Module):
    """Pre-LayerNorm transformer block. Causal blocks have LayerNorm biases only when config.bias (as Bark's
    autoregressive models); the fine model's non-causal blocks always have them."""

    def __init__(self, config: BarkSubModelConfig, causal: bool) -> None:
        super().__init__()
        ln_bias = config.bias if causal else True
        self.layernorm_1 = nn.LayerNorm(config.hidden_size, bias=ln_bias)
        self.attn = BarkSelfAttention(config)
        self.layernorm_2 = nn.LayerNorm(config.hidden_size, bias=ln_bias)
        self.mlp = BarkMLP(config)

    def forward(self, x: torch.Tensor, attend: AttendFn, layer_idx: int) -> torch.Tensor:
        x = x + self.attn(self.layernorm_1(x), attend, layer_idx)
        return x + self.mlp(self.layernorm_2(x))


class BarkCausalModel(nn.Module):
    """GPT-style causal model (Bark's semantic and coarse sub-models).

    ``attn_backend`` is the bark_kernels backend name (None: the dispatcher's automatic choice); set it through
    ``BarkModel.attn_implementation`` or directly.
    """

    def __init__(self, config: BarkSubModelConfig, attn_backend: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.attn_backend = attn_backend
        self.input_embeds_layer = nn.Embedding(config.input_vocab_size, config.hidden_size)
        self.position_embeds_layer = nn.Embedding(config.block_size, config.hidden_size)
        self.layers = nn.ModuleList([BarkBlock(config, causal=True) for _ in range(config.num_layers)])
        self.layernorm_final = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.lm_head = nn.Linear(config.hidden_size, config.output_vocab_size, bias=False)

    # -- helpers ------------------------------------------------------------------------------------------------------

    def _run_layers(self, hidden: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        for i, block in enumerate(self.layers):
            hidden = block(hidden, attend, i)
        return hidden

    def _check_positions(self, needed: int) -> None:
        if needed > self.config.block_size:
            raise ValueError(
                f"sequence too long: {needed} positions needed, the model's block_size is {self.config.block_size}"
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (..., C) of input_ids (...)."""
        return self.input_embeds_layer(input_ids)

    def lm_logits(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Logits of output vocabulary entries start..stop-1 only: hidden (..., C) final-normed -> (..., stop-start)."""
        weight = self.lm_head.weight if (start == 0 and stop is None) else self.lm_head.weight[start:stop]
        return F.linear(hidden, weight)

    # -- whole sequences (no cache) -----------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None, input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position: input_ids (B, T) or input_embeds (B, T, C) -> (B, T, output_vocab_size)."""
        if (input_ids is None) == (input_embeds is None):
            raise ValueError("forward: pass exactly one of input_ids (B, T) and input_embeds (B, T, C)")
        if input_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids: expected shape (B, T), got {tuple(input_ids.shape)}")
            input_embeds = self.embed(input_ids)  # (B, T, C)
        seqlen = input_embeds.shape[1]
        self._check_positions(seqlen)
        positions = torch.arange(seqlen, device=input_embeds.device)
        hidden = input_embeds + self.position_embeds_layer(positions)[None]  # (B, T, C)
        backend = self.attn_backend

        def attend(q, k, v, layer_idx):
            return bk.attention(q, k, v, causal=True, backend=backend)

        hidden = self.layernorm_final(self._run_layers(hidden, attend))
        return self.lm_head(hidden)

    # -- prefill ------------------------------------------------------------------------------------------------------

    def prefill(self, input_embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Rows of equal length T starting at position 0: input_embeds (B, T, C) -> final-normed hidden of the last
        position (B, C). Keys/values go to cache rows 0..T-1; the cache's lengths become T."""
        batch, seqlen, _ = input_embeds.shape
        if cache.batch != batch:
            raise ValueError(f"cache: expected batch {batch} (the batch of input_embeds), got {cache.batch}")
        self._check_positions(seqlen)
        if seqlen > cache.max_seqlen:
            raise ValueError(f"cache: {seqlen} positions cannot fit max_seqlen {cache.max_seqlen}")
        positions = torch.arange(seqlen, device=input_embeds.device)
        hidden = input_embeds + self.position_embeds_layer(positions)[None]  # (B, T, C)
        backend = self.attn_backend

        def attend(q, k, v, layer_idx):
            k_cache, v_cache = cache.layer(layer_idx)  # (B, S_max, H, D)
            k_cache[:, :seqlen].copy_(k)
            v_cache[:, :seqlen].copy_(v)
            return bk.attention(q, k, v, causal=True, backend=backend)

        hidden = self._run_layers(hidden, attend)
        cache.set_lengths([seqlen] * batch)
        return self.layernorm_final(hidden[:, -1])  # (B, C)

    def prefill_varlen(self, input_embeds: Sequence[torch.Tensor], cache: KVCache) -> torch.Tensor:
        """Ragged rows, each starting at position 0: input_embeds[b] (T_b, C) -> final-normed hidden of each row's
        last position (B, C). Packed without padding through ``bk.attention_varlen``; keys/values of row b go to
        cache rows 0..T_b-1 and its length becomes T_b."""
        lengths = [int(e.shape[0]) for e in input_embeds]
        batch = len(lengths)
        if cache.batch != batch:
            raise ValueError(f"cache: expected batch {batch} (one row per input), got {cache.batch}")
        if min(lengths) < 1:
            raise ValueError(f"input_embeds: every row needs at least one position, got lengths {lengths}")
        self._check_positions(max(lengths))
        if max(lengths) > cache.max_seqlen:
            raise ValueError(f"cache: {max(lengths)} positions cannot fit max_seqlen {cache.max_seqlen}")
        device = input_embeds[0].device
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])  # (total,)
        rows = torch.cat([torch.full((n,), b, device=device, dtype=torch.long) for b, n in enumerate(lengths)])
        hidden = torch.cat(list(input_embeds), dim=0) + self.position_embeds_layer(positions)  # (total, C)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)  # (B + 1,)
        max_seqlen = max(lengths)
        backend = self.attn_backend

        def attend(q, k, v, layer_idx):  # q, k, v (total, H, D)
            k_cache, v_cache = cache.layer(layer_idx)  # (B, S_max, H, D)
            k_cache.index_put_((rows, positions), k)
            v_cache.index_put_((rows, positions), v)
            return bk.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                       backend=backend, check_bounds=False)

        hidden = self._run_layers(hidden, attend)
        cache.set_lengths(lengths)
        last = cu_seqlens[1:].long() - 1  # (B,) packed index of each row's last position
        return self.layernorm_final(hidden.index_select(0, last))  # (B, C)

    def prefill_rows(self, input_embeds: Sequence[torch.Tensor], cache: KVCache) -> torch.Tensor:
        """Rows prefilled one at a time, each as :meth:`prefill` of that row alone (batch 1, dense causal attention):
        input_embeds[b] (T_b, C) -> final-normed hidden of each row's last position (B, C); keys/values of row b go
        to cache rows 0..T_b-1 and its length becomes T_b. What a CPU runs (bark.session): a batched prefill is
        compute-bound and slower there than its rows one by one, and a packed ragged one pads every row to the
        longest."""
        lengths = [int(e.shape[0]) for e in input_embeds]
        if cache.batch != len(lengths):
            raise ValueError(f"cache: expected batch {len(lengths)} (one row per input), got {cache.batch}")
        if min(lengths) < 1:
            raise ValueError(f"input_embeds: every row needs at least one position, got lengths {lengths}")
        self._check_positions(max(lengths))
        if max(lengths) > cache.max_seqlen:
            raise ValueError(f"cache: {max(lengths)} positions cannot fit max_seqlen {cache.max_seqlen}")
        backend = self.attn_backend
        last = []
        for row, embeds in enumerate(input_embeds):
            seqlen = lengths[row]
            positions = torch.arange(seqlen, device=embeds.device)
            hidden = embeds[None] + self.position_embeds_layer(positions)[None]  # (1, T_b, C)

            def attend(q, k, v, layer_idx, row=row, seqlen=seqlen):  # (1, T_b, H, D)
                k_cache, v_cache = cache.layer(layer_idx)  # (B, S_max, H, D)
                k_cache[row, :seqlen].copy_(k[0])
                v_cache[row, :seqlen].copy_(v[0])
                return bk.attention(q, k, v, causal=True, backend=backend)

            last.append(self._run_layers(hidden, attend)[0, -1])  # (C,)
        cache.set_lengths(lengths)
        return self.layernorm_final(torch.stack(last))  # (B, C)

    # -- decode -------------------------------------------------------------------------------------------------------

    def decode_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row: input_ids (B,) -> final-normed hidden (B, C). Row b's token takes position
        cache.seqlens[b]; its key/value are appended in place and the cache advances by one. No host sync."""
        batch = input_ids.shape[0]
        cache.check_room(1)
        if max(cache.host_seqlens) + 1 > self.config.block_size:
            raise ValueError(f"sequence too long: position {max(cache.host_seqlens)} is past the model's block_size "
                             f"{self.config.block_size}")
        positions = cache.seqlens.long()  # (B,)
        hidden = self.embed(input_ids) + self.position_embeds_layer(positions)  # (B, C)
        hidden = hidden[:, None]  # (B, 1, C)
        backend = self.attn_backend
        seqlens = cache.seqlens

        def attend(q, k, v, layer_idx):  # (B, 1, H, D)
            k_cache, v_cache = cache.layer(layer_idx)
            return bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                             backend=backend, check_bounds=False)

        hidden = self._run_layers(hidden, attend)
        cache.advance(1)
        assert hidden.shape[0] == batch
        return self.layernorm_final(hidden[:, 0])  # (B, C)

    def decode_layout_linears(self) -> list[nn.Linear]:
        """The Linear layers whose weights a CPU decode step reads faster stored transposed: those with more outputs
        than inputs (fused q/k/v projection, MLP input projection, lm head). Measured on the project's CPU machines
        (docs/decode.md): batch-1 ``F.linear`` streams such a weight ~30-50% faster from (in, out) storage."""
        layers = [lin for block in self.layers for lin in (block.attn.att_proj, block.mlp.in_proj)]
        return layers + [self.lm_head]

    def set_decode_layout(self, transposed: bool) -> None:
        """Store the weights of :meth:`decode_layout_linears` transposed in memory (``transposed=True``: a
        ``(out, in)`` view of ``(in, out)`` contiguous storage; same values, same shapes, other strides) or
        contiguous again. generate does this itself: transposed on a CPU, contiguous elsewhere. Idempotent."""
        with torch.no_grad():
            for lin in self.decode_layout_linears():
                w = lin.weight
                if transposed and w.is_contiguous() and w.dim() == 2 and w.shape[0] > 1 and w.shape[1] > 1:
                    w.data = w.data.t().contiguous().t()
                elif not transposed and not w.is_contiguous():
                    w.data = w.data.contiguous()

    def new_cache(self, batch: int, max_seqlen: int) -> KVCache:
        weight = self.lm_head.weight
        return KVCache(self.config.num_layers, batch, max_seqlen, self.config.num_heads, self.config.head_dim,
                       weight.dtype, weight.device)


def set_attn_implementation(modules: Sequence[nn.Module], attn_implementation: str) -> str | None:
    backend = check_backend(attn_backend_name(attn_implementation), [m.config.head_dim for m in modules])
    for module in modules:
        module.attn_backend = backend
    return backend


class BarkModel(nn.Module):
    """The whole Bark text-to-speech model: semantic -> coarse -> fine -> EnCodec decoder.

    Sub-module names equal the checkpoint's top-level prefixes (``semantic``, ``coarse_acoustics``,
    ``fine_acoustics``, ``codec_model``). ``attn_implementation`` picks the bark_kernels backend for every attention
    call: "auto" (the dispatcher's choice), "triton", "cuda", "flash_attention_2", "sdpa" or "eager".
    """

    def __init__(self, config=None, attn_implementation: str = "auto") -> None:
        super().__init__()
        from .codec import EncodecDecoder
        from .config import BarkConfig, bark_small_config
        from .model_fine import BarkFineModel

        if config is None:
            config = bark_small_config()
        if not isinstance(config, BarkConfig):
            raise TypeError(f"config: expected a bark.BarkConfig (e.g. bark.bark_small_config()), "
                            f"got {type(config).__name__}")
        self.config = config
        self.semantic = BarkCausalModel(config.semantic_config)
        self.coarse_acoustics = BarkCausalModel(config.coarse_acoustics_config)
        self.fine_acoustics = BarkFineModel(config.fine_acoustics_config)
        self.codec_model = EncodecDecoder(config.codec_config)
        self.generation_config = config.generation_config
        self._attn_implementation = "auto"
        self.attn_implementation = attn_implementation
        self.eval()

    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        set_attn_implementation([self.semantic, self.coarse_acoustics, self.fine_acoustics], value)
        self._attn_implementation = value

    @property
    def attn_backend(self) -> str | None:
        """The bark_kernels backend name passed to every attention call (None: automatic)."""
        return self.semantic.attn_backend

    @property
    def device(self) -> torch.device:
        return self.semantic.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.semantic.lm_head.weight.dtype

    @property
    def sampling_rate(self) -> int:
        return self.generation_config.sample_rate

    @classmethod
    def from_pretrained(cls, path_or_repo_id, attn_implementation: str = "auto", dtype=None, device=None,
                        revision: str | None = None) -> BarkModel:
        """Load a Hugging Face Bark checkpoint (directory or repo id); see :func:`bark.loading.load_bark_model`."""
        from .loading import load_bark_model

        return load_bark_model(path_or_repo_id, attn_implementation=attn_implementation, dtype=dtype, device=device,
                               revision=revision)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, history_prompt=None,
                 return_output_lengths: bool = False, **kwargs):
        """Text ids -> 24 kHz audio, as transformers' ``BarkModel.generate``; see :func:`bark.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, attention_mask=attention_mask, history_prompt=history_prompt,
                        return_output_lengths=return_output_lengths, **kwargs)
