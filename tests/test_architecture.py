"""The package's floors (docs/architecture.md): a floor imports only floors below it (or itself), the
import graph of ``tgpq`` has no cycle (deferred imports inside functions count), and ``kernels/``
knows nothing of tgpq or diffusers. Read with ``ast``; nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "tgpq"

# floor of each top-level part of the package; a module may import its own part or a lower floor
FLOORS = {
    "_C": 0, "numerics": 0,
    "recipe": 1, "layout": 1,
    "backends": 2, "kernels": 2,
    "nn": 3,
    "calibration": 4,
    "unet": 5,
    "eval": 6, "metrics": 6,
    "demo": 7, "cli": 7,
    "": 8,  # tgpq/__init__.py: the public API
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str, modules: set | None = None) -> set[str]:
    """Absolute names of every module ``path`` imports (module level and inside functions).

    ``from pkg import x`` counts as importing ``pkg.x`` when that is one of ``modules``, else ``pkg``
    (``x`` is a name in pkg's namespace); without ``modules`` both are listed."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if modules is None:
                    out.update((mod, sub))
                else:
                    out.add(sub if sub in modules else mod)
    return out


def tgpq_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def part_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    """Module -> the tgpq modules it imports, with the implicit import of every parent package below the root."""
    mods = tgpq_modules()
    g = {}
    for name, path in mods.items():
        deps = set()
        for imp in imports_of(path, name, set(mods) | {"tgpq._C", "tgpq.kernels"}):  # compiled / aliased modules
            if not imp.startswith("tgpq.") and imp != "tgpq":
                continue
            if imp == "tgpq" and name != "tgpq":  # `from tgpq import x` / `from . import x` at the top: the API floor
                deps.add("tgpq")
            parts = imp.split(".")
            for k in range(2, len(parts) + 1):  # a.b.c also runs a.b's __init__ (the root's is always run first),
                cand = ".".join(parts[:k])       # unless a.b is a package the importer itself lives in
                if cand in mods and cand != name and not name.startswith(cand + "."):
                    deps.add(cand)
        g[name] = deps
    return g


def test_floors_are_respected():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            a, b = part_of(mod), part_of(dep)
            if a != b and FLOORS[b] > FLOORS[a]:
                bad.append(f"{mod} (floor {FLOORS[a]}) imports {dep} (floor {FLOORS[b]})")
    assert not bad, "imports against the floors:\n" + "\n".join(sorted(bad))


def test_every_part_has_a_floor():
    assert {part_of(m) for m in tgpq_modules()} <= set(FLOORS)


def test_no_import_cycle():
    g = graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_know_nothing_of_tgpq_or_diffusers(path):
    names = imports_of(path, "kernels." + path.stem)
    assert not {n for n in names if n.split(".")[0] in ("tgpq", "diffusers")}


def test_the_checker_sees_deferred_and_relative_imports(tmp_path):
    """The reader itself: a relative import inside a function resolves to its absolute name."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..nn import layers\n    import os\n")
    assert {"tgpq.nn", "tgpq.nn.layers", "os"} <= imports_of(f, "tgpq.unet.m")
