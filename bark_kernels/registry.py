"""Backend records, availability, capability checks and selection.

A backend is a module under ``bark_kernels.backends`` exposing ``NAME``, ``availability()``, ``supports(op, device,
dtype, head_dim)`` and ``OPS`` (one op table, the same names and signatures for every backend; see
``bark_kernels/backends/__init__.py``). Modules are imported lazily, on first use, so ``import bark_kernels`` stays cheap
and a backend whose dependency is missing costs nothing.

Selection: an explicit ``backend=`` argument > the ``BARK_KERNELS_BACKEND`` environment variable > the automatic order
for the device type. An explicit request (argument or environment) that cannot be served raises
:class:`BackendUnavailableError` naming the reason and the backends that are available. An automatic choice that skips
a preferred backend logs the reason once.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType

import torch

logger = logging.getLogger("bark_kernels")

ENV_BACKEND = "BARK_KERNELS_BACKEND"
MAX_HEAD_DIM = 256  # the largest head_dim the public API takes

OP_NAMES = ("attention", "attention_varlen", "attention_with_kvcache", "gather_rows", "scatter_rows")


ANY_DEVICE = "*"  # in Backend.automatic: every device type


@dataclass(frozen=True)
class Backend:
    """One backend: its name, the module holding its op table, the device types on which the automatic choice may pick
    it, and the optional features it serves."""

    name: str
    module: str
    automatic: tuple[str, ...] = ("cuda",)
    dropout: bool = False  # serves attention(dropout_p > 0)
    attn_weights: bool = False  # serves attention(return_attn_weights=True)
    description: str = ""


# The one table of backends. Its order is the automatic order on every device type. Triton on CPU (interpreter) is
# only used when asked for explicitly.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("triton", "bark_kernels.backends.triton", description="our Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)"),
        Backend("cuda", "bark_kernels.backends.cuda", description="our CUDA C++ extension bark_kernels._C"),
        Backend("flash_attn", "bark_kernels.backends.flash_attn", dropout=True, description="flash-attn >= 2.1"),
        Backend("sdpa", "bark_kernels.backends.sdpa", automatic=(ANY_DEVICE,), dropout=True,
                description="torch scaled_dot_product_attention"),
        Backend("eager", "bark_kernels.backends.eager", automatic=(ANY_DEVICE,), dropout=True, attn_weights=True,
                description="plain PyTorch, the ground truth"),
    )
}


def _automatic_order(device_type: str) -> tuple[str, ...]:
    return tuple(name for name, b in BACKENDS.items() if device_type in b.automatic or ANY_DEVICE in b.automatic)


# The automatic order per device type, derived from BACKENDS; any other device type gets DEFAULT_ORDER.
AUTO_ORDER: dict[str, tuple[str, ...]] = {device_type: _automatic_order(device_type) for device_type in ("cuda", "cpu")}
DEFAULT_ORDER: tuple[str, ...] = _automatic_order(ANY_DEVICE)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve the call."""


_modules: dict[str, ModuleType | str] = {}  # name -> module, or the import error text
_logged: set[tuple] = set()
_selection_cache: dict[tuple, tuple[str, object]] = {}


def _load(name: str) -> ModuleType | str:
    """The backend's module, or a string saying why it could not be imported."""
    if name not in _modules:
        try:
            mod = importlib.import_module(BACKENDS[name].module)
        except Exception as exc:  # an optional dependency missing or broken: the backend is unavailable, not an error
            _modules[name] = f"import of {BACKENDS[name].module} failed: {type(exc).__name__}: {exc}"
        else:
            missing = [op for op in OP_NAMES if op not in getattr(mod, "OPS", {})]
            if missing:
                _modules[name] = f"{BACKENDS[name].module} lacks ops {missing}"
            elif getattr(mod, "NAME", None) != name:
                _modules[name] = f"{BACKENDS[name].module} calls itself {getattr(mod, 'NAME', None)!r}, not {name!r}"
            else:
                _modules[name] = mod
    return _modules[name]


def availability(name: str) -> str | None:
    """None when backend ``name`` is usable in this process, else the reason it is not."""
    _check_name(name)
    mod = _load(name)
    if isinstance(mod, str):
        return mod
    return mod.availability()


def available_backends() -> list[str]:
    """Names of the backends usable in this process (on some device), in a stable order."""
    return [name for name in BACKENDS if availability(name) is None]


def env_backend() -> str | None:
    """The backend named by ``BARK_KERNELS_BACKEND`` (None when unset or empty). Raises ValueError when it names no
    backend, so that a typo is reported before any work (``select`` would only find it at the first attention call)."""
    value = os.environ.get(ENV_BACKEND)
    if value is None or not value.strip():
        return None
    if value.strip() not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}: expected one of {list(BACKENDS)} (or unset: automatic choice), "
                         f"got {value!r}")
    return value.strip()


def _check_name(name: object) -> None:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {name!r}")


def why_not(name: str, op: str, device: torch.device, dtype: torch.dtype, head_dim: int,
            dropout: bool = False, attn_weights: bool = False) -> str | None:
    """None when backend ``name`` can serve this call, else the reason it cannot."""
    reason = availability(name)
    if reason is not None:
        return reason
    record = BACKENDS[name]
    if dropout and not record.dropout:
        return "dropout_p > 0 is not supported"
    if attn_weights and not record.attn_weights:
        return "returning attention weights is not supported"
    mod = _load(name)
    return mod.supports(op, device, dtype, head_dim)


def head_dim_support(name: str, head_dim: int) -> str | None:
    """None when backend ``name`` serves attention with ``head_dim`` on some device and dtype, else the reason. Needs
    no tensor: models check their head_dim with it when they are built. Availability (a missing extension, no GPU)
    is not judged here: :func:`why_not` says that at the call."""
    _check_name(name)
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim!r}"
    mod = _load(name)
    if isinstance(mod, str):
        return None
    check = getattr(mod, "supports_head_dim", None)
    return None if check is None else check(head_dim)


def select(op: str, device: torch.device, dtype: torch.dtype, head_dim: int, backend: str | None = None,
           dropout: bool = False, attn_weights: bool = False):
    """Pick the backend for one call; returns ``(name, op_function)``."""
    requested = backend
    source = "backend="
    if requested is None:
        env = os.environ.get(ENV_BACKEND)
        if env:
            requested, source = env.strip(), f"{ENV_BACKEND}="
    key = (op, device.type, dtype, head_dim, requested, dropout, attn_weights)
    hit = _selection_cache.get(key)
    if hit is not None:
        return hit
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{source}: expected one of {list(BACKENDS)}, got {requested!r}")
        reason = why_not(requested, op, device, dtype, head_dim, dropout, attn_weights)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {requested!r} (from {source}) cannot run {op} on {device.type} {dtype} head_dim={head_dim}: "
                f"{reason}. Available backends: {available_backends()}"
            )
        chosen = requested
    else:
        skipped = []
        chosen = None
        for name in AUTO_ORDER.get(device.type, DEFAULT_ORDER):
            reason = why_not(name, op, device, dtype, head_dim, dropout, attn_weights)
            if reason is None:
                chosen = name
                break
            skipped.append(f"{name}: {reason}")
        if chosen is None:
            raise BackendUnavailableError(
                f"no backend can run {op} on {device.type} {dtype} head_dim={head_dim}: " + "; ".join(skipped)
            )
        if skipped:
            log_key = (op, device.type, dtype, head_dim, chosen)
            if log_key not in _logged:
                _logged.add(log_key)
                logger.warning("bark_kernels: %s on %s %s head_dim=%d ran on %r (skipped %s)",
                               op, device.type, dtype, head_dim, chosen, "; ".join(skipped))
    result = (chosen, _load(chosen).OPS[op])
    _selection_cache[key] = result
    return result


def describe() -> list[dict]:
    """One row per backend: name, description, available, reason (for ``bark-kernels check``)."""
    rows = []
    for name, record in BACKENDS.items():
        reason = availability(name)
        rows.append({"name": name, "description": record.description, "available": reason is None,
                     "reason": reason or ""})
    return rows
