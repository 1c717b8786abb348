"""Build switches of the optional CUDA extension, shared by setup.py and the on-demand (JIT) build.

setup.py loads this file by path (no package import, no torch at import time), so everything here must stay
importable without torch. ``build_cuda_extension()`` compiles csrc/ with ``torch.utils.cpp_extension.load`` for an
editable install (or set ``BARK_KERNELS_CUDA_JIT=1`` and the ``cuda`` backend does it on first use).

Environment:
    BARK_KERNELS_CUDA_ARCHS       compute capabilities to build, default "80;90" (";", "," or spaces; "8.0",
                                  "90a" and "sm_90a" are accepted)
    BARK_KERNELS_SKIP_CUDA_BUILD  "1" (any value but "" and "0"): setup.py installs the pure-Python package
    BARK_KERNELS_CUDA_JIT         "1": the cuda backend builds the extension on first use when it is not installed
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger("bark_kernels")

ENV_ARCHS = "BARK_KERNELS_CUDA_ARCHS"
ENV_SKIP = "BARK_KERNELS_SKIP_CUDA_BUILD"
ENV_JIT = "BARK_KERNELS_CUDA_JIT"
DEFAULT_ARCHS = "80;90"
MIN_ARCH = 80  # mma.sync m16n8k16 with bf16 and ldmatrix need sm_80
JIT_NAME = "bark_kernels_cuda_jit"

_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d)\.?(\d)([a-z]?)$")


def parse_cuda_archs(value: str | None) -> list[str]:
    """'80;90' -> ['80', '90']. None or blank means DEFAULT_ARCHS. Accepts '8.0', '90a', 'sm_90a', 'compute_80'.

    Raises ValueError naming the bad entry for anything else or an architecture below sm_80.
    """
    if value is None or not value.strip():
        value = DEFAULT_ARCHS
    archs: list[str] = []
    for item in re.split(r"[;,\s]+", value.strip()):
        if not item:
            continue
        m = _ARCH_RE.match(item.strip().lower())
        if m is None:
            raise ValueError(f"{ENV_ARCHS}: expected compute capabilities like '80;90' or '8.0 9.0a', got {item!r} "
                             f"in {value!r}")
        arch = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        if int(arch[:2]) < MIN_ARCH:
            raise ValueError(f"{ENV_ARCHS}: the kernels need sm_{MIN_ARCH} or newer (mma.sync bf16), got {item!r}")
        if arch not in archs:
            archs.append(arch)
    return archs


def nvcc_arch_flags(archs: list[str]) -> list[str]:
    """-gencode flags: SASS for every arch, plus PTX of the newest portable one (no 'a' suffix) for newer GPUs."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    portable = [a for a in archs if not a[-1].isalpha()]
    if portable:
        newest = max(portable, key=int)
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def nvcc_flags(archs: list[str]) -> list[str]:
    return ["-O3", "-lineinfo", "--use_fast_math", *nvcc_arch_flags(archs)]


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def extension_sources(csrc: Path | None = None) -> list[str]:
    """csrc/*.cu (sorted) and csrc/bindings.cpp, as paths relative to the repository root when possible."""
    csrc = csrc if csrc is not None else repo_root() / "csrc"
    sources = sorted(csrc.glob("*.cu")) + [csrc / "bindings.cpp"]
    return [str(p) for p in sources]


def env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip() not in ("", "0")


def cuda_build_skip_reason(env: Mapping[str, str] | None = None) -> str | None:
    """None when this machine can build bark_kernels._C, else the one-line reason it is skipped."""
    env = os.environ if env is None else env
    if env_flag(env, ENV_SKIP):
        return f"{ENV_SKIP} is set"
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable at build time ({exc}); build with --no-build-isolation to get the extension"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    _, reason = find_cuda_home(env)
    return reason


def _is_toolkit(path: Path) -> bool:
    """A CUDA toolkit root: bin/nvcc and the runtime headers (torch's c10/cuda headers include cuda_runtime.h)."""
    return (path / "bin" / "nvcc").exists() and (path / "include" / "cuda_runtime.h").exists()


def _nvcc_reported_root(nvcc: str) -> Path | None:
    """The toolkit root nvcc itself reports (``#$ TOP=...`` in ``--dryrun`` output); sees through wrapper scripts."""
    try:
        res = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+?)\s*$", res.stdout + res.stderr, flags=re.M)
    return Path(m.group(1)).resolve() if m else None


def find_cuda_home(env: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(toolkit root, None) or (None, reason). CUDA_HOME / CUDA_PATH when set (they must hold bin/nvcc and
    include/cuda_runtime.h); else the toolkit of the nvcc on PATH, then /usr/local/cuda.

    torch.utils.cpp_extension guesses CUDA_HOME as the parent of nvcc's folder, which is wrong when nvcc is a wrapper
    script or link elsewhere (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, no cuda_runtime.h: the binding then
    fails to compile); ``use_cuda_home`` hands torch the root found here instead.
    """
    env = os.environ if env is None else env
    for name in ("CUDA_HOME", "CUDA_PATH"):
        value = env.get(name, "").strip()
        if value:
            if _is_toolkit(Path(value)):
                return str(Path(value)), None
            return None, f"{name}={value} is not a CUDA toolkit (expected bin/nvcc and include/cuda_runtime.h there)"
    candidates: list[Path] = []
    nvcc = shutil.which("nvcc", path=env.get("PATH", os.environ.get("PATH", os.defpath)))
    if nvcc is not None:
        candidates.append(Path(nvcc).resolve().parent.parent)
        reported = _nvcc_reported_root(nvcc)
        if reported is not None:
            candidates.append(reported)
    candidates.append(Path("/usr/local/cuda"))
    for path in candidates:
        if _is_toolkit(path):
            return str(path), None
    if nvcc is None:
        return None, "nvcc not found (put it on PATH or set CUDA_HOME to the toolkit root holding bin/nvcc)"
    return None, (f"found nvcc at {nvcc} but no CUDA toolkit with include/cuda_runtime.h (looked in "
                  f"{', '.join(str(p) for p in candidates)}); set CUDA_HOME to the toolkit root")


def use_cuda_home(env: Mapping[str, str] | None = None) -> str:
    """Point torch.utils.cpp_extension at the toolkit of ``find_cuda_home`` (before the build starts); returns it.

    Sets CUDA_HOME in os.environ (read when torch.utils.cpp_extension is first imported, and by nvcc subprocesses);
    if that module is already imported with a different guess, its module-level CUDA_HOME is replaced too.
    """
    cuda_home, reason = find_cuda_home(env)
    if cuda_home is None:
        raise RuntimeError(f"cannot build the CUDA extension: {reason}")
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension = sys.modules.get("torch.utils.cpp_extension")
    if cpp_extension is not None and cpp_extension.CUDA_HOME != cuda_home:
        logger.info("bark_kernels: CUDA_HOME %s -> %s for the extension build", cpp_extension.CUDA_HOME, cuda_home)
        cpp_extension.CUDA_HOME = cuda_home
    return cuda_home


def build_cuda_extension(verbose: bool = False, archs: str | None = None) -> None:
    """Compile csrc/ now with torch.utils.cpp_extension.load and load it into this process (ops appear under
    torch.ops.bark_kernels_cuda). Needs the source tree (an editable install), a CUDA torch and nvcc; results are
    cached by torch in TORCH_EXTENSIONS_DIR, so the second call is quick."""
    reason = cuda_build_skip_reason({k: v for k, v in os.environ.items() if k != ENV_SKIP})
    if reason is not None:
        raise RuntimeError(f"cannot build the CUDA extension: {reason}")
    csrc = repo_root() / "csrc"
    if not (csrc / "bindings.cpp").exists():
        raise FileNotFoundError(f"csrc/ not found at {csrc}: the JIT build needs the source tree (pip install -e .)")
    use_cuda_home()
    from torch.utils.cpp_extension import load

    arch_list = parse_cuda_archs(archs if archs is not None else os.environ.get(ENV_ARCHS))
    logger.info("bark_kernels: building the CUDA extension for sm_%s (JIT)", ", sm_".join(arch_list))
    load(
        name=JIT_NAME,
        sources=extension_sources(csrc),
        extra_cflags=["-O3"],
        extra_cuda_cflags=nvcc_flags(arch_list),
        extra_include_paths=[str(csrc)],
        is_python_module=False,
        verbose=verbose,
    )
