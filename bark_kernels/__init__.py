"""bark_kernels: attention kernels for Bark behind one dispatcher.

    import bark_kernels as bk
    out = bk.attention(q, k, v, causal=True)              # q (B, Sq, H, D), k/v (B, Sk, H, D)
    out = bk.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    out = bk.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens)

Backends: triton, cuda, flash_attn, sdpa, eager. Choice: ``backend=`` > ``BARK_KERNELS_BACKEND`` > automatic.
"""

from .interface import attention, attention_varlen, attention_with_kvcache, pad_input, unpad_input
from .registry import BackendUnavailableError, available_backends

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "unpad_input",
    "pad_input",
    "available_backends",
    "BackendUnavailableError",
    "__version__",
]

# transformers integration (docs/transformers.md): attn_implementation="triton" in transformers' own BarkModel.
# Lazy: registers once transformers' Bark module is imported; costs nothing when transformers is not installed.
from .integrations import auto_register_transformers as _auto_register_transformers  # noqa: E402
from .integrations import register_transformers as register_transformers  # noqa: E402

__all__.append("register_transformers")
_auto_register_transformers()
