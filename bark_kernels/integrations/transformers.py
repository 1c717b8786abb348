"""transformers' own ``BarkModel`` on the bark_kernels dispatcher: ``attn_implementation="triton"``.

Importing this module imports transformers. ``register()`` (``bark_kernels.register_transformers()``) does three things
for every name in :data:`IMPLEMENTATIONS`:

1. ``AttentionInterface.register(name, ...)``: transformers validates ``attn_implementation`` against this table, so
   ``from_pretrained(..., attn_implementation="triton")`` and ``BarkModel(config)`` accept the name. Bark itself never
   calls the function registered there (it picks its attention module from ``BARK_ATTENTION_CLASSES``); other models
   that are given one of our names get a clear ``NotImplementedError`` instead of a silent wrong answer.
2. ``AttentionMaskInterface.register(name, padding_mask)``: without a mask function transformers drops the attention
   mask of a custom implementation silently. Ours hands the attention module the 2-D padding mask (batch, kv_len) as
   booleans, or None when nothing is padded.
3. ``BARK_ATTENTION_CLASSES[name] = <subclass of BarkSelfAttention>``: same parameters and buffers (``att_proj``,
   ``out_proj``, the causal ``bias`` buffer), so checkpoints load unchanged; only ``forward`` differs and calls
   ``bark_kernels.attention`` (no padding) or ``unpad_input`` -> ``attention_varlen`` -> ``pad_input`` (padding).

Cache semantics are transformers': the module appends the new keys/values to the ``Cache`` object it is given
(``DynamicCache``, as ``BarkCausalModel`` creates) and attends over everything the cache returns, causal bottom-right,
so a decode step (1 query, past + 1 keys) runs through the same dispatcher as the prefill. Caches that return more
keys than past + new (static caches) are refused with an error rather than attended to blindly.

Supported: transformers >= 4.54 (Bark on ``Cache`` objects), tested with 4.57, 5.17 and 5.24. In 4.x Bark builds
its own (batch, 1, 1, kv_len) additive padding mask; the module turns it back into the boolean padding mask. Older
versions (tuple caches) and versions whose Bark no longer has ``BARK_ATTENTION_CLASSES`` get a ``RuntimeError``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import threading
import weakref

import torch
import transformers

from .. import interface as bk
from .. import registry
from .._versions import version_tuple
from ..backends import eager as eager_backend

logger = logging.getLogger("bark_kernels")

# attn_implementation name -> bark_kernels backend (None: the dispatcher's choice, BARK_KERNELS_BACKEND included).
# No name may contain "flash" (transformers routes those to its own flash-attn path) or "sdpa"/"flex_attention"
# (transformers runs its own availability checks on those and rejects Bark).
IMPLEMENTATIONS: dict[str, str | None] = {
    "triton": "triton",
    "bark_cuda": "cuda",
    "bark_torch": "sdpa",
    "bark_eager": "eager",
    "bark_kernels": None,
}

MIN_VERSION = (4, 54)  # the first Bark on Cache objects (4.53 and older pass tuples of past keys/values)
TESTED_VERSIONS = ("4.57", "5.17", "5.24")

_lock = threading.Lock()
_state: dict = {"bark_module": None, "classes": {}}
_logged: set = set()


def _bark_module():
    """transformers' Bark modeling module, as imported now (a reload gives a new one)."""
    return importlib.import_module("transformers.models.bark.modeling_bark")


def _interfaces():
    """(AttentionInterface, AttentionMaskInterface or None): the tables transformers validates and builds masks from."""
    from transformers.modeling_utils import AttentionInterface

    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # older 4.x: Bark builds its masks itself, there is nothing to register
        AttentionMaskInterface = None
    return AttentionInterface, AttentionMaskInterface


def check_supported() -> None:
    """Raise ``RuntimeError`` naming the problem when this transformers cannot take our Bark attention."""
    version = transformers.__version__
    if version_tuple(version) < MIN_VERSION:
        raise RuntimeError(
            f"transformers {version} is not supported by bark_kernels' transformers integration: it needs transformers "
            f">= {'.'.join(map(str, MIN_VERSION))} (tested with {', '.join(TESTED_VERSIONS)}). Upgrade transformers, "
            f"or use bark_kernels' own Bark model (package `bark`)."
        )
    problems = []
    try:
        interfaces = _interfaces()
    except ImportError as exc:
        interfaces = ()
        problems.append(f"transformers.modeling_utils.AttentionInterface is missing ({exc})")
    modeling_bark = _bark_module()
    classes = getattr(modeling_bark, "BARK_ATTENTION_CLASSES", None)
    if not isinstance(classes, dict):
        problems.append("transformers.models.bark.modeling_bark.BARK_ATTENTION_CLASSES (a dict) is missing")
    base = getattr(modeling_bark, "BarkSelfAttention", None)
    if base is None:
        problems.append("transformers.models.bark.modeling_bark.BarkSelfAttention is missing")
    else:
        params = list(inspect.signature(base.__init__).parameters)
        if params[:4] != ["self", "config", "is_causal", "layer_idx"]:
            problems.append(f"BarkSelfAttention.__init__ takes {params}, expected (self, config, is_causal, layer_idx)")
        forward_params = set(inspect.signature(base.forward).parameters)
        if not forward_params & {"cache", "past_key_values"}:
            problems.append(f"BarkSelfAttention.forward takes {sorted(forward_params)}, expected a cache argument")
    if not hasattr(modeling_bark, "DynamicCache"):
        problems.append("Bark does not use transformers' Cache objects (tuple caches are not supported)")
    for owner in interfaces:
        if owner is not None and not callable(getattr(owner, "register", None)):
            problems.append(f"{owner.__name__}.register is missing")
    if version_tuple(version) >= (5, 0) and len(interfaces) == 2 and interfaces[1] is None:
        problems.append("transformers.masking_utils.AttentionMaskInterface is missing (padding masks would be lost)")
    if problems:
        raise RuntimeError(
            f"transformers {version} is not supported by bark_kernels' transformers integration "
            f"(tested with {', '.join(TESTED_VERSIONS)}): " + "; ".join(problems)
        )


# ----------------------------------------------------------------------------------------------------------------------
# what transformers calls


def padding_mask(batch_size: int | None = None, q_length: int | None = None, kv_length: int | None = None,
                 q_offset=0, kv_offset=0, mask_function=None, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor | None:
    """transformers' mask function for our names: the 2-D padding mask (batch, kv_length) as bool, or None.

    Bark builds its masks with ``create_bidirectional_mask`` (padding only; the causal part lives in the attention
    module), so a 2-D mask of the keys is all the attention module needs. None means "nothing is padded"; that is
    decided here (one read of the mask) only for a prefill (q_length > 1): a decode step (q_length == 1) gets the mask
    as it is, so that it never synchronises with the device.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask  # None, or a ready-made 4-D mask (the attention module adds it as eager does)
    if kv_length is not None and attention_mask.shape[1] > kv_length:
        attention_mask = attention_mask[:, -kv_length:]  # the mask covers past + new tokens; keep the last kv_length
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask != 0
    if q_length is not None and q_length > 1 and attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


class _PaddedPlan:
    """What every layer of one forward needs to attend over a padded batch, computed once from the padding mask
    and shared by all layers (a forward hands every layer the same mask object).

    ``kind == "decode"`` (one query per row): the keys each row keeps are gathered to the front (``key_order``,
    device-side, a stable sort of the mask) and attended as a KV cache of ``key_lengths`` keys; nothing is read back
    to the host. ``kind == "varlen"`` (several queries): unpad indices, ``cu_seqlens`` and the longest row, for
    ``attention_varlen``; building it reads the mask once (``nonzero`` and the longest row).
    """

    def __init__(self, keep: torch.Tensor, seqlen_q: int):
        batch, seqlen_k = keep.shape
        self.seqlen_q = seqlen_q
        if seqlen_q == 1:
            self.kind = "decode"
            # kept keys first, in their order; the padded ones after them (never attended: past key_lengths)
            self.key_order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # (B, Sk) int64
            self.key_lengths = keep.sum(dim=1, dtype=torch.int32)  # (B,)
            self.query_kept = keep[:, -1].view(batch, 1, 1, 1)  # (B, 1, 1, 1)
            return
        self.kind = "varlen"
        keep_q = keep[:, -seqlen_q:]  # (B, Sq): the queries are the last seqlen_q positions
        self.q_indices, self.cu_seqlens_q, self.max_seqlen_q = _unpad_indices(keep_q)
        if seqlen_q == seqlen_k:
            self.k_indices, self.cu_seqlens_k, self.max_seqlen_k = self.q_indices, self.cu_seqlens_q, self.max_seqlen_q
        else:
            self.k_indices, self.cu_seqlens_k, self.max_seqlen_k = _unpad_indices(keep)


def _unpad_indices(keep: torch.Tensor):
    """bool (B, S) -> (indices int64 (nnz,) into B * S, cu_seqlens int32 (B + 1,), longest row): reads the mask."""
    seqlens = keep.sum(dim=-1, dtype=torch.int32)  # (B,)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()  # (nnz,)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))  # (B + 1,)
    return indices, cu_seqlens, int(seqlens.max()) if keep.shape[0] else 0


_masks = threading.local()


def _mask_entry(mask: torch.Tensor) -> dict:
    """What was derived from this mask object: every layer of a forward gets the same one, so its boolean form and
    its plans are computed by the first layer and reused by the others. ``_version`` makes an in-place change of the
    mask a new mask."""
    last = getattr(_masks, "last", None)
    if last is not None and last["ref"]() is mask and last["version"] == mask._version:
        return last
    entry = {"ref": weakref.ref(mask), "version": mask._version, "keep": None, "plans": {}}
    _masks.last = entry
    return entry


def _gather_rows(x: torch.Tensor, indices: torch.Tensor, backend: str | None) -> torch.Tensor:
    """x (B, S, H, D) -> rows ``indices`` of its (B * S) positions, (nnz, H, D), through the dispatcher's row op."""
    batch, seqlen, nheads, head_dim = x.shape
    _, gather = registry.select("gather_rows", x.device, x.dtype, 1, backend)
    flat = x.reshape(batch * seqlen, nheads * head_dim).contiguous()  # (B * S, H * D)
    return gather(flat, indices).view(-1, nheads, head_dim)  # (nnz, H, D)


def _generic_attention_for(name: str):
    def bark_kernels_generic_attention(module, *args, **kwargs):
        raise NotImplementedError(
            f"attn_implementation={name!r} is registered by bark_kernels for transformers' Bark models only "
            f"(BarkModel, BarkSemanticModel, BarkCoarseModel, BarkFineModel); {type(module).__name__} asked for it. "
            f"Use 'eager' or 'sdpa' for other models."
        )

    bark_kernels_generic_attention._bark_kernels = True
    return bark_kernels_generic_attention


padding_mask._bark_kernels = True


def _log_once(key, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning(message, *args)


def _make_attention_class(base: type) -> type:
    class BarkKernelsSelfAttention(base):
        """Bark's self-attention with the same parameters and buffers, running on the bark_kernels dispatcher."""

        bark_kernels_backend: str | None = None
        bark_kernels_name: str = ""

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            # an explicit backend that cannot serve this head_dim fails now, when the model is built, not at the
            # first forward
            backend = self.bark_kernels_backend
            if backend is not None:
                reason = registry.head_dim_support(backend, self.head_dim)
                if reason is not None:
                    raise ValueError(
                        f"attn_implementation={self.bark_kernels_name!r}: bark_kernels backend {backend!r} cannot "
                        f"serve this model's head_dim {self.head_dim} (hidden_size {self.embed_dim} / num_heads "
                        f"{self.num_heads}): {reason}. Use attn_implementation='bark_kernels' (the dispatcher picks a "
                        f"backend that serves it) or 'triton' (any head_dim up to 256)."
                    )

        def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False, output_attentions=False,
                    past_key_values=None, head_mask=None, **kwargs):
            # transformers 5.24 passes the Cache as `cache=`, 5.17 and 4.5x as `past_key_values=`.
            if cache is None:
                cache = past_key_values
            if head_mask is not None:
                raise NotImplementedError(f"head_mask is not supported by attn_implementation="
                                          f"{self.bark_kernels_name!r}; use attn_implementation='eager'")
            batch, seqlen_q, _ = hidden_states.shape
            qkv = self.att_proj(hidden_states).view(batch, seqlen_q, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, D)
            query, key, value = qkv.unbind(2)  # each (B, T, H, D), strided views of one projection
            if cache is not None:
                past = cache.get_seq_length(self.layer_idx)
                key, value = cache.update(key.transpose(1, 2), value.transpose(1, 2), self.layer_idx)  # (B, H, Sk, D)
                if key.shape[2] != past + seqlen_q:
                    raise NotImplementedError(
                        f"cache: attn_implementation={self.bark_kernels_name!r} supports caches that return the past "
                        f"plus the new keys (DynamicCache, what Bark creates); {type(cache).__name__} returned "
                        f"{key.shape[2]} keys for {past} past + {seqlen_q} new tokens"
                    )
                key, value = key.transpose(1, 2), value.transpose(1, 2)  # (B, Sk, H, D)
            dropout_p = float(self.dropout) if self.training else 0.0
            out, weights = self._bark_kernels_attend(query, key, value, attention_mask, dropout_p, output_attentions)
            out = out.reshape(batch, seqlen_q, self.embed_dim)  # (B, T, H * D)
            out = self.resid_dropout(self.out_proj(out))
            return out, weights

        def _bark_kernels_key_padding(self, mask):
            """A (B, 1, 1, Sk) mask that only masks keys (what Bark builds itself in transformers 4.x: 0 where kept,
            the dtype's minimum where padded; or bool) -> bool (B, Sk). A float mask's values are checked, which
            reads it once (transformers 4.x only: 5.x hands us the boolean mask of :func:`padding_mask`)."""
            keep = mask[:, 0, 0, :]  # (B, Sk)
            if keep.dtype != torch.bool:
                if not keep.is_floating_point():
                    keep = keep != 0
                else:
                    masked = keep <= torch.finfo(keep.dtype).min / 2
                    if not bool(((keep == 0) | masked).all()):
                        raise ValueError(
                            f"attention_mask: attn_implementation={self.bark_kernels_name!r} takes additive "
                            f"(batch, 1, 1, seqlen) masks only as padding masks (0 or the dtype's minimum); got other "
                            f"values. Use attn_implementation='eager' for general masks."
                        )
                    keep = ~masked
            return keep

        def _bark_kernels_keep(self, attention_mask, batch, seqlen_k, device):
            """The padding mask as bool (B, Sk), True where a key is kept, or None; shapes and types checked on the
            host only (no read of the values)."""
            mask = attention_mask
            if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
                mask = self._bark_kernels_key_padding(mask)  # (B, 1, 1, Sk) -> (B, Sk) bool
            if mask is None:
                return None
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                got = f"{mask.dim()}-D {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"attention_mask: attn_implementation={self.bark_kernels_name!r} expects None, a 2-D "
                    f"(batch, seqlen) padding mask or a 4-D (batch, 1, seqlen_q, seqlen_k) mask, got {got}."
                )
            if tuple(mask.shape) != (batch, seqlen_k):
                raise ValueError(f"attention_mask: expected shape ({batch}, {seqlen_k}) (batch, past + new "
                                 f"tokens), got {tuple(mask.shape)}")
            if mask.is_floating_point():
                raise TypeError(f"attention_mask: expected a bool or 0/1 integer padding mask, got {mask.dtype}")
            if mask.dtype != torch.bool:
                mask = mask != 0
            return mask.to(device=device)

        def _bark_kernels_attend(self, query, key, value, attention_mask, dropout_p, output_attentions):
            """query (B, Sq, H, D), key/value (B, Sk, H, D), attention_mask None or bool (B, Sk) -> (B, Sq, H, D)
            and the attention weights (B, H, Sq, Sk) or None."""
            backend = self.bark_kernels_backend
            batch, seqlen_q = query.shape[:2]
            seqlen_k = key.shape[1]
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and \
                    tuple(attention_mask.shape[1:3]) != (1, 1):
                # a ready-made (B, 1, Sq, Sk) mask (assisted decoding builds one, users may pass one): transformers'
                # eager computation, which adds it as it is
                _log_once(("mask4d", self.bark_kernels_name),
                          "bark_kernels: a 4-D attention mask of shape %s: attention runs on transformers' eager "
                          "computation instead of %r", tuple(attention_mask.shape), backend)
                out, weights = eager_backend.transformers_bark_attention(
                    query, key, value, self.is_causal, self.head_dim ** -0.5, attention_mask, self.attn_dropout)
                return out, weights if output_attentions else None
            entry = None
            if isinstance(attention_mask, torch.Tensor):
                entry = _mask_entry(attention_mask)
                if entry["keep"] is None or tuple(entry["keep"].shape) != (batch, seqlen_k):  # host shapes only
                    entry["keep"] = self._bark_kernels_keep(attention_mask, batch, seqlen_k, query.device)
                    entry["plans"] = {}
                keep = entry["keep"]
            else:
                keep = self._bark_kernels_keep(attention_mask, batch, seqlen_k, query.device)
            if output_attentions:
                # transformers' eager attention op for op (its weights, bit for bit), any padding mask, prefill or
                # cached decode: scores (B, H, Sq, Sk) materialised in the model's dtype, as eager does
                _log_once(("weights", self.bark_kernels_name),
                          "bark_kernels: output_attentions=True: attention runs on transformers' eager computation "
                          "(the only one that returns the weights) instead of %r", backend)
                return eager_backend.transformers_bark_attention(query, key, value, self.is_causal,
                                                                 self.head_dim ** -0.5, keep, self.attn_dropout)
            if keep is None:
                out = bk.attention(query, key, value, causal=self.is_causal, dropout_p=dropout_p, backend=backend)
                return out, None
            if dropout_p > 0.0:
                raise NotImplementedError(
                    f"attention dropout (training mode, dropout={dropout_p}) with a padding mask is not supported by "
                    f"attn_implementation={self.bark_kernels_name!r}; call model.eval() or use 'eager'"
                )
            plan = entry["plans"].get(seqlen_q)
            if plan is None:
                plan = entry["plans"][seqlen_q] = _PaddedPlan(keep, seqlen_q)
            if plan.kind == "decode":
                # one query per row: the kept keys gathered to the front are a KV cache of key_lengths keys (the
                # query, the last position, sees all of them); no host sync, no bounds read
                order = plan.key_order[:, :, None, None].expand(key.shape)  # (B, Sk, H, D)
                k_packed, v_packed = key.gather(1, order), value.gather(1, order)  # (B, Sk, H, D) contiguous
                out = bk.attention_with_kvcache(query, k_packed, v_packed, cache_seqlens=plan.key_lengths,
                                                causal=self.is_causal, backend=backend, check_bounds=False)
                return out.masked_fill(~plan.query_kept, 0.0), None  # a padded query gives 0, as in the prefill
            # After unpadding, query rank i of row b sees key ranks <= i + Lk_b - Lq_b, exactly the unpadded keys at
            # positions <= its own: bottom-right causal per sequence is Bark's causal mask with padded keys removed.
            q_unpad = _gather_rows(query, plan.q_indices, backend)  # (nnz_q, H, D)
            k_unpad = _gather_rows(key, plan.k_indices, backend)  # (nnz_k, H, D)
            v_unpad = _gather_rows(value, plan.k_indices, backend)
            out_unpad = bk.attention_varlen(q_unpad, k_unpad, v_unpad, plan.cu_seqlens_q, plan.cu_seqlens_k,
                                            plan.max_seqlen_q, plan.max_seqlen_k, causal=self.is_causal,
                                            backend=backend, check_bounds=False)  # (nnz_q, H, D)
            # Padded query positions come back as zeros (their outputs are never read by unpadded positions).
            out = bk.pad_input(out_unpad, plan.q_indices, batch, seqlen_q, backend=backend, check_bounds=False)
            return out, None  # (B, Sq, H, D)

    BarkKernelsSelfAttention.__qualname__ = BarkKernelsSelfAttention.__name__
    return BarkKernelsSelfAttention


# ----------------------------------------------------------------------------------------------------------------------
# registration


def register(force: bool = False) -> list[str]:
    """Register every name of :data:`IMPLEMENTATIONS` with transformers (see the module docstring). Idempotent."""
    check_supported()
    modeling_bark = _bark_module()
    AttentionInterface, AttentionMaskInterface = _interfaces()
    with _lock:
        table = modeling_bark.BARK_ATTENTION_CLASSES
        done = (_state["bark_module"] is modeling_bark and _state["classes"]
                and all(table.get(name) is cls for name, cls in _state["classes"].items()))
        if done and not force:
            return list(IMPLEMENTATIONS)
        base_class = _make_attention_class(modeling_bark.BarkSelfAttention)
        classes = {}
        for name, backend in IMPLEMENTATIONS.items():
            previous = AttentionInterface._global_mapping.get(name) if hasattr(AttentionInterface, "_global_mapping") \
                else None
            if previous is not None and not getattr(previous, "_bark_kernels", False):
                logger.warning("bark_kernels: attn_implementation=%r was registered by someone else; replacing it", name)
            suffix = "".join(part.capitalize() for part in name.split("_"))
            cls = type(f"BarkKernelsSelfAttention{suffix}", (base_class,),
                       {"bark_kernels_backend": backend, "bark_kernels_name": name, "__module__": __name__})
            AttentionInterface.register(name, _generic_attention_for(name))
            if AttentionMaskInterface is not None:
                AttentionMaskInterface.register(name, padding_mask)
            table[name] = cls
            classes[name] = cls
        _state["bark_module"] = modeling_bark
        _state["classes"] = classes
        logger.debug("bark_kernels: registered attn_implementation %s with transformers %s", list(IMPLEMENTATIONS),
                     transformers.__version__)
        return list(IMPLEMENTATIONS)


def use_bark_kernels(model, attn_implementation: str = "triton"):
    """Switch an already built or loaded Bark model (``BarkModel`` or one of its sub-models) to ``attn_implementation``
    in place, and return it. transformers' ``model.set_attn_implementation`` cannot do this for Bark (it only warns).

    Every ``BarkSelfAttention`` module gets the registered class of that name (same parameters and buffers, nothing is
    copied), and the configs get the name, so padding masks are built for it. ``"eager"`` switches back.
    """
    register()
    table = _bark_module().BARK_ATTENTION_CLASSES
    allowed = ["eager", *IMPLEMENTATIONS]
    if attn_implementation not in allowed:
        raise ValueError(f"attn_implementation: expected one of {allowed}, got {attn_implementation!r}")
    base = _bark_module().BarkSelfAttention
    attention_modules = [m for m in model.modules() if isinstance(m, base)]
    if not attention_modules:
        raise ValueError(f"model: expected a transformers Bark model (BarkModel, BarkSemanticModel, BarkCoarseModel or "
                         f"BarkFineModel), got {type(model).__name__} without Bark attention modules")
    backend = IMPLEMENTATIONS.get(attn_implementation)
    for head_dim in sorted({m.head_dim for m in attention_modules}) if backend is not None else ():
        reason = registry.head_dim_support(backend, head_dim)
        if reason is not None:
            raise ValueError(f"attn_implementation={attn_implementation!r}: bark_kernels backend {backend!r} cannot "
                             f"serve this model's head_dim {head_dim}: {reason}")
    for module in attention_modules:
        module.__class__ = table[attn_implementation]
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_attn_implementation") and not isinstance(module, base):  # the sub-models' configs
            config._attn_implementation = attn_implementation
    return model
