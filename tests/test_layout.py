"""Rules of the code's shape that a reviewer would otherwise check by hand."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "layerviz"


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

TIERS = [
    ["arch", "batching", "depth", "errors", "loadtest", "metrics", "parallel", "passes", "progress"],
    ["models", "store"],
    ["data"],
    ["sasrec", "scoring", "settings"],
    ["evaluate"],
    ["adapters", "importance"],
    ["compact", "selection"],
    ["adapt", "bench", "finetune", "heal", "serve"],
    ["notebook_params", "plots", "report", "widgets"],
    ["study"],
    ["__main__", "cli"],
]
"""The package's rooms, bottom to top, as README's diagram draws them: a module imports only from its own
tier or below (and, within a tier, without a cycle)."""


def _name(p: Path) -> str:
    parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p) for p in _modules()}


def _imports(p: Path) -> set[str]:
    """The layerviz modules ``p`` imports anywhere but in its ``if __name__ == "__main__"`` block."""
    tree = ast.parse(p.read_text())
    script = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    skip = {id(x) for blk in script for x in ast.walk(blk)}
    out = set()
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("layerviz"):  # a submodule, or a name
            out |= {f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in MODULES else n.module for a in n.names}
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("layerviz")}
    return out - {_name(p)}


def _tier(module: str) -> int:
    room = module.split(".")[1]
    return next(i for i, names in enumerate(TIERS) if room in names)


def test_every_module_has_a_tier():
    rooms = {_name(p).split(".")[1] for p in _modules() if _name(p) != "layerviz"}
    assert rooms == {r for t in TIERS for r in t}


def test_no_module_imports_from_above():
    graph = {_name(p): _imports(p) for p in _modules() if _name(p) != "layerviz"}
    up = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if d != "layerviz" and _tier(d) > _tier(m)]
    assert up == []
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
