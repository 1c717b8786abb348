"""Backends: one op table each, the same names and signatures everywhere.

A backend module exposes::

    NAME: str
    def availability() -> str | None      # None when usable in this process, else the reason
    def supports(op, device, dtype, head_dim) -> str | None   # None when it can serve that call, else the reason
    OPS: dict[str, callable]

with these ops. Inputs arrive validated by ``bark_kernels.interface`` (same dtype and device, consistent shapes, last
stride 1, int32 ``cu_seqlens``/``cache_seqlens`` on the device, no cache overflow); ``softmax_scale`` is a float:

- ``attention(q, k, v, causal, softmax_scale) -> out``: q (B, Sq, H, D), k/v (B, Sk, H, D), out (B, Sq, H, D).
- ``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale)``:
  q (total_q, H, D), k/v (total_k, H, D) -> (total_q, H, D).
- ``attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal, softmax_scale)``: q (B, Sq, H, D),
  caches (B, S_max, H, D); k/v (B, Sq, H, D) or None, appended in place at rows cache_seqlens[b] + i; -> (B, Sq, H, D).
- ``gather_rows(x (N, F), indices (nnz,) int64) -> (nnz, F)`` and
  ``scatter_rows(x (nnz, F), indices (nnz,) int64, n) -> (n, F)`` with zeros where no row is scattered.

Causal masks are aligned bottom-right (query i sees key j <= i + Lk - Lq); a query row that sees no key returns 0.
"""
