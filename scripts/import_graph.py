"""The import graph of the project's packages (bark_kernels, bark): every import statement between their modules,
at module level or inside a function, read from the source (nothing is imported).

    python scripts/import_graph.py            # one line per module: what it imports; then the verdict
    python scripts/import_graph.py --dot      # Graphviz: python scripts/import_graph.py --dot | dot -Tsvg > g.svg

Exit code 1 when the layering rule is broken: a cycle, or an arrow from bark_kernels (the kernel library) up to bark
(the model). docs/layout.md describes the layers; tests/test_layout.py runs this check.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

PACKAGES = ("bark_kernels", "bark")
ROOT = Path(__file__).resolve().parent.parent


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _targets(name: str, path: Path, node: ast.AST, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    else:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        if node.level:
            base = package[: len(package) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        wanted = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]
    out = []
    for target in wanted:
        while target and target not in known:  # a name inside a module -> the module
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + "."):  # a package's own parents: not an edge
            out.append(target)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its source)."""
    known = modules(root)
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[name].update(_targets(name, path, node, known))
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Arrows from the kernel library to the model package."""
    return sorted((a, b) for a, targets in edges.items() if a.split(".")[0] == "bark_kernels"
                  for b in targets if b.split(".")[0] == "bark")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print the graph in Graphviz's dot language")
    args = parser.parse_args(argv)
    edges = graph()
    if args.dot:
        print("digraph imports {\n  rankdir=BT;\n  node [shape=box, fontsize=10];")
        for name in sorted(edges):
            for target in sorted(edges[name]):
                print(f'  "{name}" -> "{target}";')
        print("}")
    else:
        for name in sorted(edges):
            print(f"{name} -> {', '.join(sorted(edges[name])) or '(nothing of the project)'}")
    bad_cycles, bad_arrows = cycles(edges), upward(edges)
    out = sys.stderr if args.dot else sys.stdout
    for component in bad_cycles:
        print(f"CYCLE: {' <-> '.join(component)}", file=out)
    for a, b in bad_arrows:
        print(f"UPWARD: {a} -> {b} (the kernel library must not import the model package)", file=out)
    if not bad_cycles and not bad_arrows:
        print(f"ok: {len(edges)} modules, {sum(map(len, edges.values()))} imports, no cycle, no arrow from "
              f"bark_kernels to bark", file=out)
    return 1 if bad_cycles or bad_arrows else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
