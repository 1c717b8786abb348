"""The layers Bark's transformers are built from: self-attention on the bark_kernels dispatcher, the MLP and the
pre-norm block, shared by the causal models (bark.model_causal) and the fine model (bark.model_fine).

q, k, v are views of the fused projection, ``att_proj(x).view(..., 3, H, D).unbind(-3)``: never copied. Every
attention call goes through an ``attend(q, k, v, layer_idx)`` function that the model above chooses (dense causal,
varlen, KV-cache decode, non-causal), so the layers know nothing of caches or masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

import bark_kernels as bk
from bark_kernels import registry

from .config import BarkSubModelConfig, attn_backend_name

__all__ = ["AttendFn", "BarkBlock", "BarkMLP", "BarkSelfAttention", "check_backend", "set_attn_implementation"]

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


def set_attn_implementation(modules: Sequence[nn.Module], attn_implementation: str) -> str | None:
    backend = check_backend(attn_backend_name(attn_implementation), [m.config.head_dim for m in modules])
    for module in modules:
        module.attn_backend = backend
    return backend
