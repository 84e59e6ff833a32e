"""Every notebook: stripped, tagged, parameters that exist, and executes headlessly (papermill)."""

import json
from pathlib import Path

import pytest
import yaml

from layerviz.report import NotebookFailed, ReportConfig, declared_parameters, run_report

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
CI_PARAMS = yaml.safe_load((NB_DIR / "ci_params.yaml").read_text())
CI_SECTIONS = {k: v for k, v in CI_PARAMS.items() if k.endswith(".ipynb")}
CI_GLOBAL = {k: v for k, v in CI_PARAMS.items() if k not in CI_SECTIONS}
README = (NB_DIR.parent / "README.md").read_text()


def test_every_notebook_has_ci_params():
    assert NOTEBOOKS and {p.name for p in NOTEBOOKS} == set(CI_SECTIONS)
    assert CI_GLOBAL["SMOKE"] is True and CI_GLOBAL["COMPUTE"] is True
    assert [p.name[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_stripped_and_tagged(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs (nbstripout)"
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]) == 1
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["cells"][0]["cell_type"] == "markdown" and "".join(nb["cells"][0]["source"]).startswith("# ")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ci_overrides_name_real_parameters(path):
    known = declared_parameters(path)
    assert set(CI_SECTIONS[path.name]) | set(CI_GLOBAL) <= known
    assert {"SMOKE", "USE_CACHE", "RESULTS_DIR", "FIGURES_DIR", "DEVICE", "MODEL", "MODELS", "DATASET",
            "CONFIG", "COMPUTE"} <= known


@pytest.fixture(scope="session")
def executed(smoke_study, tmp_path_factory):
    """Every notebook executed once on the session's smoke study (as after `layerviz run`), two kernels at a
    time as `layerviz report` runs them -> (index rows by notebook, figures folder, the failure message or '')."""
    out = tmp_path_factory.mktemp("report")
    cfg = ReportConfig(notebooks=str(NB_DIR), out=str(out / "reports"), figures_dir=str(out / "figures"),
                       results_dir=str(smoke_study.config.results_dir), params=str(NB_DIR / "ci_params.yaml"), jobs=2)
    failure = ""
    try:
        run_report(cfg, report=None)
    except NotebookFailed as e:
        failure = str(e)
    rows = json.loads((out / "reports" / "index.json").read_text())["notebooks"]
    return {r["notebook"]: r for r in rows}, out / "figures", failure


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_with_smoke_parameters(path, executed):
    rows, figures, failure = executed
    row = rows[path.name]
    assert row["status"] == "ok", failure
    pngs = [figures / f for f in row["figures"] if f.endswith(".png")]
    assert pngs and all(f.exists() and f.with_suffix(".pdf").name in row["figures"] for f in pngs)
    executed_nb = json.loads(Path(row["output"]).read_text())
    errors = [o for c in executed_nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # every figure the notebook wrote is listed in the README's figure table (stem without the model suffix)
    for p in pngs:
        stem = p.stem.replace("_tiny-gemma3", "_{model}").replace("_tiny-llama3", "_{model}")
        assert f"`{stem}`" in README, f"README figure table lacks {stem}"


def test_each_notebook_wrote_its_own_figures(executed):
    rows, figures, _ = executed
    made = [f for r in rows.values() for f in r["figures"]]
    assert len(made) == len(set(made)) and sorted(made) == sorted(p.name for p in figures.iterdir())


def test_nbstripout_finds_nothing_to_strip():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", *map(str, NOTEBOOKS)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_are_thin_and_imports_used(path):
    """No code cell over 12 lines; every name a notebook imports is used in it."""
    import ast

    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    long = [len(c["source"]) for c in code if len("".join(c["source"]).splitlines()) > 12]
    assert not long, f"{path.name}: code cells of {long} lines (at most 12)"
    tree = ast.parse("\n".join("".join(c["source"]) for c in code))
    imported = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                for a in n.names if a.name != "*"}  # the parameters cell's star import: its names are parameters
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert imported <= used, f"{path.name} imports {sorted(imported - used)} without using them"
