"""Rules of the code's shape that a reviewer would otherwise check by hand; the package order is the README's."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "layerviz"


def _modules():
    return sorted(PKG.rglob("*.py"))


def test_no_private_name_is_imported_across_modules():
    bad = [f"{p.relative_to(PKG)}:{n.lineno}" for p in _modules() for n in ast.walk(ast.parse(p.read_text()))
           if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("layerviz")
           and any(a.name.startswith("_") for a in n.names)]
    assert bad == []


def test_imports_inside_functions_say_why():
    """Kept only to avoid a heavy import or a cycle, with a comment saying which."""
    bad = []
    for p in _modules():
        lines = p.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for n in ast.walk(fn):
                    if isinstance(n, ast.Import | ast.ImportFrom) and "#" not in lines[n.lineno - 1]:
                        bad.append(f"{p.relative_to(PKG)}:{n.lineno}")
    assert bad == []


def test_functions_are_short():
    """No function anywhere in the package over 60 lines (a class with methods is the way to split one)."""
    long = [f"{p.relative_to(PKG)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for p in _modules() for fn in ast.walk(ast.parse(p.read_text()))
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and fn.end_lineno - fn.lineno + 1 > 60]
    assert long == []


def test_study_files_are_small():
    """study/: no file over 350 lines (a stage, a table or a claim each stays easy to find)."""
    big = [p.name for p in sorted((PKG / "study").glob("*.py")) if len(p.read_text().splitlines()) > 350]
    assert big == []


def rooms(readme: str) -> list[list[str]]:
    """The README's package tree, bottom to top: each room's names ('data/' for a package)."""
    block = re.search(r"## How the code is laid out\n+```\n(.*?)```", readme, flags=re.S).group(1)
    out = []
    for line in block.splitlines()[1:]:
        entry = re.sub(r"^[├└]─ ", "", line).split("  ")[0]
        out.append(entry.split())
    return out


ROOMS = rooms((ROOT / "README.md").read_text())


def _name(p: Path) -> str:
    parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in _modules()}


def _imports(p: Path) -> set[str]:
    """The layerviz modules ``p`` imports."""
    out = set()
    for n in ast.walk(ast.parse(p.read_text())):
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("layerviz"):  # a submodule, or a name
            out |= {f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in MODULES else n.module for a in n.names}
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("layerviz")}
    return out - {_name(p)}


def _top(module: str) -> str:
    """'layerviz.compression.heal' -> 'compression/', 'layerviz.arch' -> 'arch'."""
    parts = module.split(".")
    return parts[1] + ("/" if (PKG / parts[1]).is_dir() else "")


def _room(module: str) -> int:
    top = _top(module)
    return next(i for i, names in enumerate(ROOMS) if top in names)


def test_the_readme_tree_names_every_module_and_package_once():
    tree = [n for room in ROOMS for n in room]
    actual = {_top(m) for m in MODULES if m != "layerviz"}
    assert sorted(tree) == sorted(actual), "README's tree and layerviz/ differ"


def test_no_module_imports_from_above_or_sideways():
    """Down only; within a room, a package's modules import their own package and top-level modules each other,
    but no two packages of one room import each other (sideways)."""
    graph = {m: _imports(p) for m, p in MODULES.items() if m != "layerviz"}
    bad = []
    for m, deps in graph.items():
        for d in deps - {"layerviz"}:
            if _room(d) > _room(m):
                bad.append(f"{m} -> {d} (from above)")
            elif _room(d) == _room(m) and _top(d) != _top(m) and (_top(d).endswith("/") or _top(m).endswith("/")):
                bad.append(f"{m} -> {d} (sideways)")
    assert bad == []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:  # depth-first: a grey node met again closes a cycle
        state[m] = 1
        for d in graph.get(m, ()):
            assert state.get(d) != 1, " -> ".join([*path, m, d])
            if d in graph and d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_layout_check_can_fail():
    """An import from above is caught: serve (room of serving/) is above scoring."""
    assert _room("layerviz.serving.serve") > _room("layerviz.scoring")
    assert _room("layerviz.compression.heal") > _room("layerviz.training") > _room("layerviz.data.prompts")


def test_packages_reach_siblings_only_through_public_modules():
    """A module outside a package imports none of its underscore modules."""
    bad = [f"{m} -> {d}" for m, p in MODULES.items() for d in _imports(p)
           if any(part.startswith("_") and part != "__init__" for part in d.split(".")[1:]) and
           _top(d) != _top(m)]
    assert bad == []
