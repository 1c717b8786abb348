"""Which way imports go (docs/layout.md): no cycle between the project's modules; ``bark_kernels`` imports nothing
from ``bark`` and no development tooling (``tools/``), on the way in (``import bark_kernels``) and when the Triton
backend is loaded; the tooling's modules are gone from the package; bark's modules stand in the layers docs/layout.md
draws, each importing only from layers below it. The graph is read from the source by scripts/import_graph.py
(imports inside functions count too: a function-level import does not hide a cycle).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


# bark's layers, bottom to top (docs/layout.md): a module imports only from lower layers.
BARK_LAYERS = [
    {"bark.config", "bark.kv_cache", "bark.text", "bark.wav", "bark.hub"},
    {"bark.codec", "bark.layers", "bark.session", "bark.processor", "bark.suno_checkpoint"},
    {"bark.loading", "bark.model_causal", "bark.model_fine", "bark.generation"},
    {"bark.model", "bark.offload", "bark.voice"},
    {"bark.longform", "bark.options"},
    {"bark.engine"},
    {"bark", "bark.cli.progress", "bark.cli.setup", "bark.serve.audio", "bark.serve.page"},
    {"bark.cli.longform", "bark.serve.app", "bark.bulk.table", "bark.bulk.progress"},
    {"bark.cli.speak", "bark.serve", "bark.bulk.manifest"},
    {"bark.bulk.worker", "bark.cli.serve"},
    {"bark.bulk.local", "bark.bulk.ray_engine"},
    {"bark.bulk.synthesize"},
    {"bark.bulk"},
    {"bark.cli.batch"},
    {"bark.cli"},
]


@pytest.fixture(scope="module")
def import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("import_graph", module)
    spec.loader.exec_module(module)
    return module


def test_no_cycle_and_no_arrow_from_the_kernel_library_to_the_model(import_graph):
    edges = import_graph.graph(ROOT)
    assert "bark_kernels.registry" in edges and "bark.model" in edges and len(edges) > 30
    assert import_graph.cycles(edges) == []
    assert import_graph.upward(edges) == []


def test_bark_modules_import_only_from_lower_layers(import_graph):
    edges = import_graph.graph(ROOT)
    rank = {name: i for i, layer in enumerate(BARK_LAYERS) for name in layer}
    bark_modules = {name for name in edges if name.split(".")[0] == "bark"}
    assert bark_modules == set(rank), "a bark module is missing from the layer table (or the table names a gone one)"
    wrong = [(a, b) for a in sorted(bark_modules) for b in sorted(edges[a])
             if b in rank and rank[b] >= rank[a]]
    assert wrong == [], f"imports that do not point down: {wrong}"
    assert {b for b in edges["bark.config"] if b.startswith("bark")} == set(), "bark.config must be a leaf"


def test_the_checker_finds_cycles_and_upward_arrows(import_graph):
    """The check can fail: a made-up graph with a three-module cycle and an arrow up."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "bark_kernels.x": {"bark.y"}, "bark.y": set()}
    assert import_graph.cycles(edges) == [["a", "b", "c"]]
    assert import_graph.upward(edges) == [("bark_kernels.x", "bark.y")]
    assert import_graph.cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_count(import_graph, tmp_path):
    """An import inside a function is an edge like any other (it would otherwise hide a cycle)."""
    for package in ("bark", "bark_kernels"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "bark" / "m.py").write_text("def f():\n    from . import n\n")
    (tmp_path / "bark" / "n.py").write_text("from .m import f\n")
    (tmp_path / "bark_kernels" / "k.py").write_text("def g():\n    import bark.m\n")
    edges = import_graph.graph(tmp_path)
    assert edges["bark.m"] == {"bark.n"} and edges["bark.n"] == {"bark.m"}
    assert import_graph.cycles(edges) == [["bark.m", "bark.n"]]
    assert import_graph.upward(edges) == [("bark_kernels.k", "bark.m")]
