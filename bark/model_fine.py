"""Bark's fine acoustics model: a non-causal GPT over 8 EnCodec codebooks.

Parameter names equal the checkpoint keys under ``fine_acoustics.``::

    input_embeds_layers.{0..7}.weight, position_embeds_layer.weight, layers.{n}.* (as the causal model, LayerNorms
    always with bias), layernorm_final.{weight,bias}, lm_heads.{0..6}.weight

To predict codebook ``i`` (1..7) the model embeds the input codes of codebooks 0..i (each with its own embedding),
sums them, adds position embeddings, runs non-causal attention blocks and applies ``lm_heads[i - n_codes_given]``.
As in transformers' ``tie_weights``, ``lm_heads[j]`` shares its weight with ``input_embeds_layers[j + 1]`` when
``tie_word_embeddings`` (the checkpoints then omit ``lm_heads.*``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import bark_kernels as bk

from .config import BarkFineConfig
from .layers import BarkBlock

__all__ = ["BarkFineModel"]


class BarkFineModel(nn.Module):
    def __init__(self, config: BarkFineConfig, attn_backend: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.attn_backend = attn_backend
        self.input_embeds_layers = nn.ModuleList(
            [nn.Embedding(config.input_vocab_size, config.hidden_size) for _ in range(config.n_codes_total)]
        )
        self.position_embeds_layer = nn.Embedding(config.block_size, config.hidden_size)
        self.layers = nn.ModuleList([BarkBlock(config, causal=False) for _ in range(config.num_layers)])
        self.layernorm_final = nn.LayerNorm(config.hidden_size)
        self.lm_heads = nn.ModuleList(
            [nn.Linear(config.hidden_size, config.output_vocab_size, bias=False)
             for _ in range(config.n_codes_given, config.n_codes_total)]
        )
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """lm_heads[j].weight <- input_embeds_layers[j + 1].weight (the same Parameter), as transformers ties them."""
        for j, head in enumerate(self.lm_heads):
            head.weight = self.input_embeds_layers[j + 1].weight

    def tied_keys(self) -> list[str]:
        """State-dict keys that are aliases of other keys (absent from tied checkpoints)."""
        if not self.config.tie_word_embeddings:
            return []
        return [f"lm_heads.{j}.weight" for j in range(len(self.lm_heads))]

    def _check_codebook(self, codebook_idx: int) -> int:
        cfg = self.config
        if isinstance(codebook_idx, bool) or not isinstance(codebook_idx, int):
            raise TypeError(f"codebook_idx: expected an int, got {type(codebook_idx).__name__}")
        if not cfg.n_codes_given <= codebook_idx < cfg.n_codes_total:
            raise ValueError(f"codebook_idx: expected {cfg.n_codes_given} <= codebook_idx < {cfg.n_codes_total} "
                             f"(codebooks below {cfg.n_codes_given} come from the coarse model), got {codebook_idx}")
        return codebook_idx

    def hidden_states(self, codebook_idx: int, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T, n_codes_total) -> final-normed hidden states (B, T, C) for predicting ``codebook_idx``."""
        codebook_idx = self._check_codebook(codebook_idx)
        cfg = self.config
        if input_ids.dim() != 3 or input_ids.shape[-1] != cfg.n_codes_total:
            raise ValueError(f"input_ids: expected shape (B, T, {cfg.n_codes_total}), got {tuple(input_ids.shape)}")
        seqlen = input_ids.shape[1]
        if seqlen > cfg.block_size:
            raise ValueError(f"input_ids: {seqlen} positions exceed the fine model's block_size {cfg.block_size}")
        # Embeddings of every codebook stacked on a last axis, then summed over codebooks 0..codebook_idx (this
        # order of operations keeps the sum bit-identical to transformers').
        stacked = torch.stack([layer(input_ids[:, :, i]) for i, layer in enumerate(self.input_embeds_layers)],
                              dim=-1)  # (B, T, C, n_codes_total)
        embeds = stacked[..., : codebook_idx + 1].sum(dim=-1)  # (B, T, C)
        positions = torch.arange(seqlen, device=input_ids.device)
        hidden = embeds + self.position_embeds_layer(positions)[None]  # (B, T, C)
        backend = self.attn_backend

        def attend(q, k, v, layer_idx):  # (B, T, H, D) views
            return bk.attention(q, k, v, causal=False, backend=backend)

        for i, block in enumerate(self.layers):
            hidden = block(hidden, attend, i)
        return self.layernorm_final(hidden)

    def lm_logits(self, codebook_idx: int, hidden: torch.Tensor, num_columns: int | None = None) -> torch.Tensor:
        """Logits of the head for ``codebook_idx`` over its first ``num_columns`` vocabulary entries only."""
        weight = self.lm_heads[self._check_codebook(codebook_idx) - self.config.n_codes_given].weight
        if num_columns is not None:
            weight = weight[:num_columns]
        return F.linear(hidden, weight)

    def forward(self, codebook_idx: int, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T, n_codes_total) -> logits (B, T, output_vocab_size) for codebook ``codebook_idx``."""
        return self.lm_logits(codebook_idx, self.hidden_states(codebook_idx, input_ids))
