"""Device arguments: one parser for every entry point that takes a device (``bark-kernels check --device``,
``bark-kernels speak --device``, ``bark.BarkModel.from_pretrained(device=)``), so that a bad or unavailable device is
one clear error before any work, never torch's "Torch not compiled with CUDA enabled" assertion halfway through.
"""

from __future__ import annotations

import torch

__all__ = ["DEVICE_TYPES", "parse_device"]

DEVICE_TYPES = ("cpu", "cuda")


def parse_device(value, what: str = "device") -> torch.device:
    """``value`` (a str such as "cpu", "cuda", "cuda:1", a torch.device or a CUDA index) -> torch.device.

    Raises ValueError naming ``what``, what was expected and what came: an unknown device string, a device type other
    than cpu/cuda, CUDA without a CUDA device, a CUDA index past the devices present.
    """
    expected = "cpu, cuda or cuda:N"
    if isinstance(value, bool) or not isinstance(value, (str, torch.device, int)):
        raise ValueError(f"{what}: expected {expected}, got {type(value).__name__} {value!r}")
    try:
        device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{what}: expected {expected}, got {value!r}") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{what}: expected {expected}, got {value!r} (device type {device.type!r} is not supported)")
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise ValueError(f"{what}: expected {expected}, got {value!r} (there is one cpu device)")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"{what}: CUDA was requested but torch sees no CUDA device (got {value!r}; torch "
                         f"{torch.__version__}, {build}); use cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{what}: expected cuda:0 .. cuda:{count - 1}, got {value!r}: only {count} CUDA device(s)")
    return device
