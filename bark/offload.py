"""CPU offload for small GPUs: Bark's sub-models wait in (pinned) CPU memory and each moves to the GPU only for its
stage, so the GPU holds one sub-model (and its stage's caches) at a time instead of all four.

    with bark.offload.Offloaded(model, "cuda") as gpu_model:     # model may be on the CPU (it should: that is the
        audio = gpu_model.generate(**inputs)                     # point) or on the GPU (it is put back on exit)
    audio = bark.synthesize(model, text, processor=processor, offload=True)   # the same, through long-form

How: :class:`Offloaded` stands in for the model in ``bark.generation.generate``; the first use of a sub-model
(``semantic``, ``coarse_acoustics``, ``fine_acoustics``, ``codec_model``) copies its weights to the GPU and sends
the previous one back. Going back costs nothing: the weights never change, so each parameter just points at its
pinned CPU copy again. The evicted causal model's pooled decode sessions (KV caches, captured CUDA graphs) are
dropped with it, freeing their memory; a later stage builds them again (graph capture included: offload trades speed
for memory). ``generate`` touches the semantic and coarse models once before the semantic stage (their decode weight
layout), so each call copies those two twice: a few tens of milliseconds per call at Bark's sizes.

On a machine without CUDA there is nothing to offload to: :func:`offload_reason` says why and long-form/CLI callers
report it and run the model as it is.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["Offloaded", "offload_reason", "SUBMODELS"]

logger = logging.getLogger(__name__)

SUBMODELS = ("semantic", "coarse_acoustics", "fine_acoustics", "codec_model")


def offload_reason(model, device=None) -> str | None:
    """None when ``Offloaded(model, device)`` can offload, else why it would be a no-op (said to the user)."""
    if device is not None and torch.device(device).type != "cuda":
        return (f"offload: a no-op here; the model computes on {torch.device(device)}, not a GPU, so there is no "
                f"GPU memory to save")
    if not torch.cuda.is_available():
        return "offload: a no-op here; there is no CUDA device, so the model runs on the CPU as it is"
    return None


def _tensors(module: nn.Module):
    """Every (owner module, name, is_parameter) of ``module``'s parameters and buffers, shared ones once."""
    seen: set[int] = set()
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield owner, name, True
        for name, b in owner._buffers.items():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                yield owner, name, False


class Offloaded:
    """``model`` with its sub-models resident on ``device`` one at a time (see the module docstring).

    Use it where the model goes: ``Offloaded(model).generate(...)``, or ``bark.generation.generate(offloaded, ...)``.
    ``device`` defaults to the model's device when that is a GPU, else ``cuda``. Entering sends every sub-model to CPU
    memory (pinned, so copies to the GPU are fast); :meth:`close` (or leaving the ``with`` block) puts every weight
    back where it was when the model was wrapped.
    """

    def __init__(self, model, device=None) -> None:
        reason = offload_reason(model, device)
        if reason is not None:
            raise RuntimeError(reason)
        self.model = model
        self._device = torch.device(device) if device is not None else (
            model.device if model.device.type == "cuda" else torch.device("cuda"))
        if self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._original_device = model.device
        self._homes: dict[str, list] = {}
        self._resident: str | None = None
        self.loads = 0  # sub-model copies to the GPU so far
        for name in SUBMODELS:
            entries = []
            for owner, attr, is_param in _tensors(getattr(model, name)):
                t = owner._parameters[attr] if is_param else owner._buffers[attr]
                home = t.detach().to("cpu").contiguous()
                if torch.cuda.is_available() and not home.is_pinned():
                    home = home.pin_memory()
                if is_param:
                    t.data = home
                else:
                    owner._buffers[attr] = home
                entries.append((owner, attr, is_param, home))
            self._homes[name] = entries
            self._drop_sessions(getattr(model, name))
        if self._original_device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the stand-in ----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the stages compute (generate reads this)."""
        return self._device

    def __getattr__(self, name: str):
        if "model" not in self.__dict__:
            raise AttributeError(name)
        if name not in SUBMODELS:
            return getattr(self.__dict__["model"], name)
        self._bring(name)
        return getattr(self.model, name)

    def generate(self, *args, **kwargs):
        """``bark.generation.generate`` with this stand-in as the model."""
        from .generation import generate

        with torch.no_grad():
            return generate(self, *args, **kwargs)

    # -- moving --------------------------------------------------------------------------------------------------------

    @staticmethod
    def _drop_sessions(module) -> None:
        from . import session

        session._POOLS.pop(module, None)  # caches and captured graphs hold the old device addresses

    def _send_home(self, name: str) -> None:
        for owner, attr, is_param, home in self._homes[name]:
            if is_param:
                owner._parameters[attr].data = home
            else:
                owner._buffers[attr] = home
        self._drop_sessions(getattr(self.model, name))

    def _bring(self, name: str) -> None:
        if self._resident == name:
            return
        if self._resident is not None:
            self._send_home(self._resident)
            self._resident = None
        for owner, attr, is_param, home in self._homes[name]:
            on_device = home.to(self._device, non_blocking=True)
            if is_param:
                owner._parameters[attr].data = on_device
            else:
                owner._buffers[attr] = on_device
        self._resident = name
        self.loads += 1

    def close(self) -> None:
        """Every sub-model back to CPU memory, then (a model wrapped on the GPU) back on the GPU."""
        if self._resident is not None:
            self._send_home(self._resident)
            self._resident = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._original_device.type == "cuda":
            self.model.to(self._original_device)

    def __enter__(self) -> Offloaded:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
