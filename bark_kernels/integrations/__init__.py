"""Integrations of bark_kernels with other libraries. Importing this package imports none of them.

``register_transformers()`` makes transformers' own ``BarkModel`` run its attention on the bark_kernels dispatcher
(``attn_implementation="triton"``, ``"bark_cuda"``, ...; see ``docs/transformers.md``).

``import bark_kernels`` calls :func:`auto_register_transformers`, which is lazy: importing transformers takes seconds,
so it is never imported here. When ``transformers.models.bark.modeling_bark`` is already imported the registration
happens at once; otherwise a one-shot import hook registers right after that module is first imported (which any use
of ``BarkModel`` does, before a model can be built). When transformers is not installed nothing happens at all.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading

logger = logging.getLogger("bark_kernels")

# The module whose import triggers the lazy registration: it defines BARK_ATTENTION_CLASSES.
BARK_MODULE = "transformers.models.bark.modeling_bark"
# Set to "0" to switch the automatic registration off (register_transformers() still works).
ENV_AUTO = "BARK_KERNELS_TRANSFORMERS"

_lock = threading.Lock()
_auto_state = {"hook": None, "error": None}


def register_transformers(*, force: bool = False) -> list[str]:
    """Register bark_kernels' attention implementations with transformers, now; returns the registered names.

    After this call ``BarkModel.from_pretrained(path, attn_implementation="triton")`` (and ``"bark_cuda"``,
    ``"bark_torch"``, ``"bark_eager"``, ``"bark_kernels"``) runs Bark's attention through ``bark_kernels``.
    Idempotent; ``force=True`` registers again (for example after ``importlib.reload`` of transformers' Bark module).

    Raises:
        ImportError: transformers is not installed.
        RuntimeError: this transformers version is not supported (the message names the version and what is).
    """
    from . import transformers as _hf  # imports transformers (seconds, the first time)

    return _hf.register(force=force)


def use_bark_kernels(model, attn_implementation: str = "triton"):
    """Switch an already loaded transformers Bark model to one of our names in place (``"eager"`` switches back)."""
    from . import transformers as _hf

    return _hf.use_bark_kernels(model, attn_implementation)


class _BarkImportHook(importlib.abc.MetaPathFinder):
    """One-shot post-import hook: registers once ``transformers.models.bark.modeling_bark`` has been executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != BARK_MODULE:
            return None
        spec = None
        for finder in sys.meta_path:  # ask the other finders for the real spec
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps the real loader of Bark's module: executes it, then registers. Everything else goes to the real loader."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... (used by inspect and linecache)
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = self._loader  # leave no trace of the hook on the module
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        _remove_hook()
        _register_quietly()


def _remove_hook() -> None:
    with _lock:
        hook = _auto_state["hook"]
        _auto_state["hook"] = None
        if hook is not None and hook in sys.meta_path:
            sys.meta_path.remove(hook)


def _register_quietly() -> None:
    """The automatic path must never break the import of transformers: failures are logged and remembered."""
    try:
        register_transformers()
    except Exception as exc:  # an unsupported version: say so loudly, raise when a name of ours is actually used
        _auto_state["error"] = exc
        logger.warning("bark_kernels: not registering attn_implementation='triton' etc. with transformers: %s", exc)


def auto_register_transformers() -> None:
    """Called by ``import bark_kernels``: register with transformers lazily (see the module docstring)."""
    if os.environ.get(ENV_AUTO, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if BARK_MODULE in sys.modules:
        _register_quietly()
        return
    if "transformers" not in sys.modules and importlib.util.find_spec("transformers") is None:
        return  # not installed: no cost, no hook
    with _lock:
        if _auto_state["hook"] is not None:
            return
        hook = _BarkImportHook()
        _auto_state["hook"] = hook
        sys.meta_path.insert(0, hook)


def auto_registration_error() -> Exception | None:
    """Why the automatic registration did not happen (an unsupported transformers version), or None."""
    return _auto_state["error"]


__all__ = ["register_transformers", "use_bark_kernels", "auto_register_transformers", "auto_registration_error"]
