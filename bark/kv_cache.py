"""A static, preallocated KV cache with per-row lengths for Bark's causal models.

Keys and values of every layer live in one tensor each, (num_layers, batch, max_seqlen, nheads, headdim); layer l's
cache is the contiguous view ``k[l]`` of shape (batch, max_seqlen, nheads, headdim), the layout of
``bark_kernels.attention_with_kvcache``. ``heads_first=True`` stores (num_layers, batch, nheads, max_seqlen, headdim)
instead: each (row, head)'s keys are then one contiguous block, which a CPU decode step's SDPA reads twice as fast
(bark.session's host path, the only user: measured 1.7 vs 3.5 ms per layer for 8 rows x 520 positions x 12 heads on
one EPYC thread, docs/decode.md); the bark_kernels ops take only the default layout. ``seqlens`` (int32, on the
device) says how many positions each row holds; a copy of it is kept on the host so that bounds are checked and
positions are known without reading the device. A decode step appends in place and advances both; nothing grows with
``torch.cat`` and nothing synchronises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["KVCache"]


class KVCache:
    """Preallocated keys/values for ``num_layers`` layers of ``batch`` rows, up to ``max_seqlen`` positions each."""

    def __init__(self, num_layers: int, batch: int, max_seqlen: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, heads_first: bool = False) -> None:
        for name, value in (("num_layers", num_layers), ("batch", batch), ("max_seqlen", max_seqlen),
                            ("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        self.heads_first = bool(heads_first)
        shape = ((num_layers, batch, num_heads, max_seqlen, head_dim) if self.heads_first  # (L, B, H, S_max, D)
                 else (num_layers, batch, max_seqlen, num_heads, head_dim))  # (L, B, S_max, H, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)  # (B,) positions held per row
        self.host_seqlens = [0] * batch
        self.max_seqlen = max_seqlen

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each (B, S_max, H, D) (heads first: (B, H, S_max, D)), contiguous views
        written in place."""
        return self.k[index], self.v[index]

    def check_room(self, new_tokens: int) -> None:
        """Raise before an append of ``new_tokens`` positions would overflow a row (host-side check, no sync)."""
        longest = max(self.host_seqlens) if self.host_seqlens else 0
        if longest + new_tokens > self.max_seqlen:
            raise ValueError(
                f"KV cache overflow: a row holds {longest} positions, appending {new_tokens} exceeds max_seqlen "
                f"{self.max_seqlen}"
            )

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Set every row's length (after a prefill that wrote rows 0..lengths[b]-1)."""
        lengths = [int(n) for n in lengths]
        if len(lengths) != self.batch or any(n < 0 or n > self.max_seqlen for n in lengths):
            raise ValueError(f"lengths: expected {self.batch} values in [0, {self.max_seqlen}], got {lengths}")
        self.host_seqlens = lengths
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32), non_blocking=True)

    def advance(self, new_tokens: int = 1) -> None:
        """Every row gained ``new_tokens`` positions (in place on the device, no sync)."""
        self.seqlens.add_(new_tokens)
        self.host_seqlens = [n + new_tokens for n in self.host_seqlens]

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only batch rows ``rows`` (in that order): used to drop finished rows. Copies the kept rows once."""
        rows = [int(r) for r in rows]
        index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        self.k = self.k.index_select(1, index)  # (L, B', ...)
        self.v = self.v.index_select(1, index)
        self.seqlens = self.seqlens.index_select(0, index)
        self.host_seqlens = [self.host_seqlens[r] for r in rows]
