"""The house rules, checked on the source: data flows one way between the top-level folders,
the kernels and sharding are leaves, no module import cycle hides behind a function-local import,
and no hand-written module grows past 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("_pb2.py", "_pb2_grpc.py")
# Top-level parts in import order: a part may import only parts before it. The root modules
# (`llm.py`, the package `__init__`) wire everything together and sit with the command line.
ORDER = [
    "cpu_kernels",
    "pallas_kernels",
    "sharding",
    "runtime",
    "checkpoints",
    "data",
    "llm",
    "serve",
    "evals",
    "bench",
    "cli",
]
LEAVES = ("cpu_kernels", "pallas_kernels", "sharding", "data")


def sources() -> list[Path]:
    skip = {"tests", ".venv", ".ci-venv", ".git", "build"}
    return sorted(
        p
        for p in ROOT.rglob("*.py")
        if not skip & set(p.relative_to(ROOT).parts) and not p.name.endswith(GENERATED)
    )


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["xlaserve", *parts])


def imports(path: Path, modules) -> set[str]:
    """Every xlaserve module this file imports, at module level or inside a function
    (`from package import module` counts as the module; `from module import name` as the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xlaserve"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in sources()}
    edges = {}
    for name, path in modules.items():
        # a module's own parent packages are imported before it anyway: no edge
        edges[name] = {t for t in imports(path, modules) if t != "xlaserve" and not name.startswith(f"{t}.")}
        edges[name].discard(name)
    return edges


def test_parts_import_only_parts_below_them():
    bad = []
    for module, targets in graph().items():
        src = part(module)
        if src == "__init__":
            continue
        for t in targets:
            dst = part(t)
            if dst != src and (src in LEAVES or ORDER.index(dst) > ORDER.index(src)):
                bad.append(f"{module} imports {t}")
    assert not bad, "imports against the one-way flow:\n" + "\n".join(sorted(bad))


def test_no_module_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_hand_written_module_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in sources() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
