"""Bark's causal GPT (the semantic and coarse sub-models) on the bark_kernels dispatcher.

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
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

import bark_kernels as bk

from .config import BarkSubModelConfig
from .kv_cache import KVCache
from .layers import AttendFn, BarkBlock

__all__ = ["BarkCausalModel"]

logger = logging.getLogger(__name__)


def _check_layout(cache: KVCache) -> None:
    if cache.heads_first:
        raise ValueError("cache: a heads-first cache is the CPU decode session's own (prefill_rows and its steps); "
                         "prefill, prefill_varlen and decode_step take the default (B, S, H, D) layout")


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
        _check_layout(cache)
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

    def _ragged_lengths(self, input_embeds: Sequence[torch.Tensor], cache: KVCache) -> list[int]:
        """Each ragged row's length, checked: one cache row per input, at least one position each, all within the
        model's positions and the cache."""
        lengths = [int(e.shape[0]) for e in input_embeds]
        if cache.batch != len(lengths):
            raise ValueError(f"cache: expected batch {len(lengths)} (one row per input), got {cache.batch}")
        if min(lengths) < 1:
            raise ValueError(f"input_embeds: every row needs at least one position, got lengths {lengths}")
        self._check_positions(max(lengths))
        if max(lengths) > cache.max_seqlen:
            raise ValueError(f"cache: {max(lengths)} positions cannot fit max_seqlen {cache.max_seqlen}")
        return lengths

    def prefill_varlen(self, input_embeds: Sequence[torch.Tensor], cache: KVCache) -> torch.Tensor:
        """Ragged rows, each starting at position 0: input_embeds[b] (T_b, C) -> final-normed hidden of each row's
        last position (B, C). Packed without padding through ``bk.attention_varlen``; keys/values of row b go to
        cache rows 0..T_b-1 and its length becomes T_b."""
        _check_layout(cache)
        lengths = self._ragged_lengths(input_embeds, cache)
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
        lengths = self._ragged_lengths(input_embeds, cache)
        backend = self.attn_backend
        last = []
        for row, embeds in enumerate(input_embeds):
            seqlen = lengths[row]
            positions = torch.arange(seqlen, device=embeds.device)
            hidden = embeds[None] + self.position_embeds_layer(positions)[None]  # (1, T_b, C)

            def attend(q, k, v, layer_idx, row=row, seqlen=seqlen):  # (1, T_b, H, D)
                k_cache, v_cache = cache.layer(layer_idx)  # (B, S_max, H, D), or (B, H, S_max, D) heads first
                if cache.heads_first:
                    k_cache[row, :, :seqlen].copy_(k[0].transpose(0, 1))
                    v_cache[row, :, :seqlen].copy_(v[0].transpose(0, 1))
                else:
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
        if input_ids.dim() != 1 or input_ids.shape[0] != cache.batch:
            raise ValueError(f"input_ids: expected shape ({cache.batch},) (one token per cache row), "
                             f"got {tuple(input_ids.shape)}")
        _check_layout(cache)
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
