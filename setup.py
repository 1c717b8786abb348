"""Build script: metadata lives in pyproject.toml; this file adds the optional CUDA extension bark_kernels._C, and the
license (pyproject.toml's `license` is a TOML table for setuptools < 77 and an SPDX string for later ones, which print a
deprecation banner for the table: declared dynamic there, it is set here, accepted by both without a word).

The extension is built when torch (with CUDA) is importable at build time and nvcc is found; otherwise the pure-Python
package is installed and one line says why. Switches (see bark_kernels/_jit.py):
    BARK_KERNELS_SKIP_CUDA_BUILD=1     never build the extension
    BARK_KERNELS_CUDA_ARCHS="80;90"    compute capabilities to compile for
On a GPU machine: pip install --no-build-isolation -e .   (build isolation hides the installed CUDA torch)
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_build_helpers():
    """bark_kernels/_jit.py by path: importing the package would import torch, which may be absent here."""
    spec = importlib.util.spec_from_file_location("_bark_kernels_build", ROOT / "bark_kernels" / "_jit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension_kwargs(env=None) -> dict:
    """setup() keyword arguments: the CUDA extension and its build command, or {} (with a notice) when skipped."""
    helpers = _load_build_helpers()
    env = os.environ if env is None else env
    reason = helpers.cuda_build_skip_reason(env)
    if reason is not None:
        print(f"bark_kernels: installing without the CUDA extension bark_kernels._C ({reason})", file=sys.stderr)
        return {}
    cuda_home = helpers.use_cuda_home(env)  # before torch.utils.cpp_extension fixes its own guess
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = helpers.parse_cuda_archs(env.get(helpers.ENV_ARCHS))
    print(f"bark_kernels: building bark_kernels._C for sm_{', sm_'.join(archs)} with the CUDA toolkit in {cuda_home}",
          file=sys.stderr)
    sources = [os.path.relpath(p, ROOT) for p in helpers.extension_sources(ROOT / "csrc")]
    extension = CUDAExtension(
        name="bark_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": helpers.nvcc_flags(archs)},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


if __name__ == "__main__":
    setup(license="MIT", **cuda_extension_kwargs())
