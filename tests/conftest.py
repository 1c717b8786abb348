"""Test configuration shared by every test file.

On a machine without CUDA the Triton kernels run under Triton's interpreter on CPU tensors. The interpreter must be
switched on before triton is first imported, so it happens here, before any test module imports bark_kernels; then the
development tool tools/triton_interpreter.py makes the interpreter run our kernels right (exact bfloat16, loop bounds
on triton <= 3.6 with NumPy >= 2.4). The library never applies it itself: without it the backend refuses bf16.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CPU tests use tiny shapes: intra-op threads only add contention (on a loaded 2-core machine, tiny decode steps
    # ran ~40x slower with 2 threads than with 1).
    torch.set_num_threads(1)
    from bark_kernels.backends.triton._env import interpreter_enabled

    try:
        import triton  # noqa: F401
    except ImportError:  # the triton backend reports itself unavailable, and its tests skip
        pass
    else:
        if interpreter_enabled():
            from tools import triton_interpreter

            triton_interpreter.apply()  # logs a warning when bf16 cannot be made right (the backend then refuses it)
elif int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # pytest-xdist workers on a CUDA machine: each would start one torch thread per core for its CPU references
    # (16 workers x 16 threads on the 16-core GPU machine); give each its share of the cores instead.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def backends_for(device: str) -> list[str]:
    """The bark_kernels backends that can run on ``device`` in this process ('cpu' or 'cuda')."""
    from bark_kernels import registry

    names = []
    for name in registry.BACKENDS:
        if registry.availability(name) is not None:
            continue
        if registry.why_not(name, "attention", torch.device(device), torch.float32, 64) is None or \
                registry.why_not(name, "attention", torch.device(device), torch.float16, 64) is None:
            names.append(name)
    return names


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    """No test inherits a backend choice from the environment; each starts with fresh selection caches."""
    monkeypatch.delenv("BARK_KERNELS_BACKEND", raising=False)
    from bark_kernels import registry

    registry._selection_cache.clear()
    registry._logged.clear()
    yield
