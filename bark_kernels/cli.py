"""``bark-kernels``: ``check`` (environment + a numerical self-test of every backend), and the commands other packages
register, such as ``speak`` (text to WAV, from the model package ``bark``).

This library imports nothing from the packages built on it. A package adds a command through the entry-point group
:data:`COMMAND_GROUP` of its distribution's metadata, e.g. in pyproject.toml::

    [project.entry-points."bark_kernels.commands"]
    speak = "bark.cli:speak_main"

The target is a callable ``(argv: list[str]) -> int`` (the exit code), given the arguments after the command name.
Listing the commands reads the installed metadata only; a command's module is imported when that command runs. Entry
points are written by ``pip install`` (``pip install -e .`` for a checkout, as scripts/setup.sh does), so an install
made before a command was declared does not know it: the error then says to install again.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from . import registry, testing
from .interface import attention, attention_varlen, attention_with_kvcache, pad_input, unpad_input


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:  # optional packages
        return f"not importable ({type(exc).__name__})"
    return getattr(module, "__version__", "unknown")


def environment() -> list[tuple[str, str]]:
    import os

    rows = [
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("triton", _version("triton") + (" [interpreter: TRITON_INTERPRET=1]" if os.environ.get("TRITON_INTERPRET") == "1"
                                         else "")),
        ("transformers", _version("transformers")),
        ("flash_attn", _version("flash_attn")),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{props.name}, sm_{props.major}{props.minor}, "
                                      f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"))
    else:
        rows.append(("cuda", "no CUDA device"))
    env_backend = os.environ.get(registry.ENV_BACKEND)
    rows.append((registry.ENV_BACKEND, env_backend or "(unset: automatic)"))
    return rows


def _self_test_one(backend: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, str]]:
    """Run each op once on small inputs; returns (op, error text or '') rows."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    results = []
    # dense causal, Sq != Sk
    q, k, v = rand(2, 33, 2, 64), rand(2, 65, 2, 64), rand(2, 65, 2, 64)
    results.append(("attention", lambda: testing.assert_close_to_reference(
        attention(q, k, v, causal=True, backend=backend), testing.reference_attention(q, k, v, True),
        attention(q, k, v, causal=True, backend="eager"), dtype)))
    # varlen
    qp, kp, vp = rand(18, 2, 64), rand(18, 2, 64), rand(18, 2, 64)
    cu = torch.tensor([0, 1, 18], dtype=torch.int32, device=device)
    results.append(("attention_varlen", lambda: testing.assert_close_to_reference(
        attention_varlen(qp, kp, vp, cu, cu, 17, 17, causal=True, backend=backend),
        testing.reference_attention_varlen(qp, kp, vp, cu, cu, True),
        attention_varlen(qp, kp, vp, cu, cu, 17, 17, causal=True, backend="eager"), dtype)))

    # kv-cache append + decode
    def kvcache():
        k_cache, v_cache = rand(2, 80, 2, 64), rand(2, 80, 2, 64)
        lens = torch.tensor([0, 70], dtype=torch.int32, device=device)
        qd, kd, vd = rand(2, 1, 2, 64), rand(2, 1, 2, 64), rand(2, 1, 2, 64)
        ref, k_exp, v_exp = testing.reference_attention_with_kvcache(qd, k_cache, v_cache, kd, vd, lens)
        base = attention_with_kvcache(qd, k_cache.clone(), v_cache.clone(), kd, vd, cache_seqlens=lens,
                                      backend="eager")
        out = attention_with_kvcache(qd, k_cache, v_cache, kd, vd, cache_seqlens=lens, backend=backend)
        testing.assert_close_to_reference(out, ref, base, dtype)
        if not (torch.equal(k_cache, k_exp) and torch.equal(v_cache, v_exp)):
            raise AssertionError("cache contents differ from the expected append")

    results.append(("attention_with_kvcache", kvcache))

    def padding():
        hidden = rand(2, 5, 8)
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], device=device)
        unpadded, idx, _, _ = unpad_input(hidden, mask, backend=backend)
        if not torch.equal(pad_input(unpadded, idx, 2, 5, backend=backend), hidden * mask[..., None].to(dtype)):
            raise AssertionError("pad_input(unpad_input(x)) != x * mask")

    results.append(("unpad/pad", padding))
    rows = []
    for op, fn in results:
        op_name = {"unpad/pad": "gather_rows"}.get(op, op)
        reason = registry.why_not(backend, op_name, device, dtype, 64)
        if reason is not None:
            rows.append((op, f"skip: {reason}"))
            continue
        try:
            fn()
            rows.append((op, ""))
        except Exception as exc:  # report every failure, keep going
            rows.append((op, f"FAIL: {type(exc).__name__}: {exc}"))
    return rows


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``prog: error: message (--help for usage)``, exit code 2) instead of
    the usage block followed by the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def _env_backend_problems(devices: list[torch.device]) -> list[str]:
    """Why ``BARK_KERNELS_BACKEND`` would make attention calls fail on ``devices`` (empty when unset or usable)."""
    try:
        name = registry.env_backend()
    except ValueError as exc:
        return [str(exc)]
    if name is None:
        return []
    problems = []
    for device in devices:
        if not any(registry.why_not(name, "attention", device, dtype, 64) is None
                   for dtype in (torch.float32, torch.float16, torch.bfloat16)):
            reason = registry.why_not(name, "attention", device, torch.float32, 64)
            problems.append(f"{registry.ENV_BACKEND}={name}: every attention call on {device} would fail: {reason}")
    return problems


def _apply_checkout_interpreter_tool() -> str:
    """``check --interpret`` run from a source checkout applies its development tool tools/triton_interpreter.py (exact
    bfloat16, loop bounds on old interpreters), loaded from the file: the library never imports it. Without it (an
    installed package) the triton backend refuses what the bare interpreter would get wrong. Returns the report line."""
    import importlib.util
    from pathlib import Path

    from .backends.triton._env import TOOL

    path = Path(__file__).resolve().parent.parent / TOOL
    if not path.is_file():
        return f"not applied: no {TOOL} here (not a source checkout); the triton backend refuses what it would get wrong"
    try:
        module = sys.modules.get("tools.triton_interpreter")
        if module is None or Path(module.__file__).resolve() != path:
            spec = importlib.util.spec_from_file_location("_bark_kernels_checkout_triton_interpreter", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        reason = module.apply()
    except Exception as exc:  # triton missing or broken: the backend's availability says so below
        return f"not applied: {type(exc).__name__}: {exc}"
    return f"{TOOL} applied" + ("" if reason is None else f" (bfloat16 stays refused: {reason})")


def check(argv: list[str] | None = None) -> int:
    from .devices import parse_device

    parser = OneLineArgumentParser(prog="bark-kernels check", description="Environment and backend self-test.")
    parser.add_argument("--device", action="append",
                        help="device(s) to test: cpu, cuda or cuda:N (default: cpu, and cuda if present)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the Triton backend on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed the error (or the help)
        return int(exit_.code) if isinstance(exit_.code, int) else 2
    try:
        devices = [parse_device(name, "--device") for name in (args.device or [])]
    except ValueError as exc:
        print(f"bark-kernels check: error: {exc}", file=sys.stderr)
        return 2
    if args.interpret:
        import os

        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("bark-kernels check: error: --interpret: triton was imported before the interpreter could be "
                  "switched on", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    rows = environment()
    if args.interpret:
        rows.append(("interpreter fix", _apply_checkout_interpreter_tool()))
    print("bark-kernels check")
    for key, value in rows:
        print(f"  {key:<22} {value}")
    print("backends:")
    for row in registry.describe():
        state = "available" if row["available"] else f"unavailable: {row['reason']}"
        print(f"  {row['name']:<11} {state}")
    devices = devices or [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    failures = 0
    env_problems = _env_backend_problems(devices)
    for problem in env_problems:
        print(f"  FAIL: {problem}")
    failures += len(env_problems)
    print("self-test (max error vs float64 reference within the tolerance table):")
    for device in devices:
        device_name = str(device)
        dtypes = [torch.float16, torch.bfloat16, torch.float32]
        for name in registry.BACKENDS:
            if registry.availability(name) is not None:
                continue
            for dtype in dtypes:
                reason = registry.why_not(name, "attention", device, dtype, 64)
                if reason is not None:
                    print(f"  {device_name:<5} {name:<11} {str(dtype)[6:]:<9} skip: {reason}")
                    continue
                start = time.perf_counter()
                rows = _self_test_one(name, device, dtype)
                elapsed = time.perf_counter() - start
                bad = [r for r in rows if r[1].startswith("FAIL")]
                failures += len(bad)
                status = "ok" if not bad else "FAILED"
                print(f"  {device_name:<5} {name:<11} {str(dtype)[6:]:<9} {status} ({len(rows)} ops, {elapsed:.2f}s)")
                for op, text in rows:
                    if text:
                        print(f"      {op}: {text}")
    print("check passed" if failures == 0 else f"check FAILED: {failures} failure(s)")
    return 0 if failures == 0 else 1


COMMAND_GROUP = "bark_kernels.commands"
BUILTIN_COMMANDS = {"check": "environment + backend self-test"}


def registered_commands() -> dict:
    """Command name -> ``importlib.metadata.EntryPoint`` of the group :data:`COMMAND_GROUP`, from the installed
    metadata (nothing is imported). A name registered twice (two installs on the path) keeps the first one found."""
    from importlib.metadata import entry_points

    commands = {}
    for entry in entry_points(group=COMMAND_GROUP):
        if entry.name not in BUILTIN_COMMANDS:
            commands.setdefault(entry.name, entry)
    return commands


def _usage(commands: dict) -> str:
    names = [*BUILTIN_COMMANDS, *sorted(commands)]
    lines = [f"usage: bark-kernels {{{','.join(names)}}} ..."]
    lines += [f"  {name:<7} {text}" for name, text in BUILTIN_COMMANDS.items()]
    lines += [f"  {name:<7} from {commands[name].value} ({name} --help for its options)" for name in sorted(commands)]
    if not commands:
        lines.append(_no_commands_hint())
    return "\n".join(lines)


def _no_commands_hint() -> str:
    return (f"(no command is registered in the entry-point group {COMMAND_GROUP!r}: bark-kernels is not installed, or "
            "its installed metadata predates the commands; install it again: `bash scripts/setup.sh` or `pip install "
            "-e .` in the checkout, which also registers `speak` of the model package)")


def _run_registered(command: str, entry, rest: list[str]) -> int:
    try:
        command_main = entry.load()
    except Exception as exc:  # the providing package is broken or half-installed: one line, not a traceback
        print(f"bark-kernels: error: command {command!r} ({entry.value}, entry-point group {COMMAND_GROUP!r}) cannot "
              f"be loaded: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return command_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = registered_commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(commands), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "check":
            return check(rest)
        if command in commands:
            return _run_registered(command, commands[command], rest)
    except KeyboardInterrupt:
        print(f"bark-kernels {command}: interrupted", file=sys.stderr)
        return 130
    names = [*BUILTIN_COMMANDS, *sorted(commands)]
    expected = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    hint = "" if commands else " " + _no_commands_hint()
    print(f"bark-kernels: error: unknown command {command!r} (expected {expected}; --help for usage){hint}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
