"""Which way imports go: ``bark_kernels`` imports nothing from ``bark`` and no development tooling (``tools/``), on the
way in (``import bark_kernels``) and when the Triton backend is loaded; the tooling's modules are gone from the package.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bark_kernels"
TOOLING = ("_interpreter_bf16", "_interpreter_compat", "_aot_check", "_bench")


def _imported(env: dict) -> list[str]:
    """The modules in sys.modules after importing bark_kernels, its CLI and the Triton backend (a fresh process)."""
    code = ("import json, sys; import bark_kernels, bark_kernels.cli; import bark_kernels.backends.triton; "
            "print(json.dumps(sorted(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _unwanted(modules: list[str]) -> list[str]:
    return [m for m in modules if m in ("bark", "tools") or m.startswith(("bark.", "tools."))
            or m.rsplit(".", 1)[-1] in TOOLING or "triton_interpreter" in m]


def test_importing_the_library_loads_no_model_and_no_tooling():
    """As on a GPU (interpreter off) and as on CPU under the interpreter: neither path pulls in bark or tools/."""
    for interpret in ("0", "1"):
        env = dict(os.environ, TRITON_INTERPRET=interpret)
        assert _unwanted(_imported(env)) == [], f"TRITON_INTERPRET={interpret}"


def test_no_source_file_of_the_library_imports_bark_or_tools():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in ("bark", "tools")]
    assert offenders == []


def test_tooling_modules_left_the_package():
    present = [str(p.relative_to(ROOT)) for name in TOOLING for p in PACKAGE.rglob(f"{name}.py")]
    assert present == []
    assert (ROOT / "tools" / "triton_interpreter.py").is_file() and (ROOT / "tools" / "aot_check.py").is_file()


def test_interpreter_without_the_tool_refuses_bf16_and_names_it():
    """The bare interpreter computes bf16 on raw uint16 bits: the backend must refuse it, not return wrong values. fp32
    is right without the tool (where the interpreter's loop bounds work at all, which the backend also checks)."""
    code = ("import torch, bark_kernels.backends.triton as t; from triton.runtime import interpreter as i; "
            "cpu = torch.device('cpu'); print(t.supports('attention', cpu, torch.bfloat16, 64)); "
            "print(t._loop_bounds_problem(i)); print(t.supports('attention', cpu, torch.float32, 64))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    bf16, loop_bounds, fp32 = run.stdout.strip().splitlines()[-3:]
    assert "would compute wrong values" in bf16 or "cannot run loops" in bf16, bf16
    assert "tools/triton_interpreter.py" in bf16
    assert fp32 == loop_bounds  # None where the loops work, else that reason
