"""Every notebook: stripped, tagged, parameters that exist, and executes headlessly (papermill)."""

import json
from pathlib import Path

import papermill as pm
import pytest
import yaml

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
CI_PARAMS = yaml.safe_load((NB_DIR / "ci_params.yaml").read_text())


def test_every_notebook_has_ci_params():
    assert NOTEBOOKS and {p.name for p in NOTEBOOKS} == set(CI_PARAMS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_stripped_and_tagged(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs (nbstripout)"
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]) == 1
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ci_overrides_name_real_parameters(path):
    known = set(pm.inspect_notebook(str(path)))
    assert set(CI_PARAMS[path.name]) <= known
    assert {"SMOKE", "USE_CACHE", "RESULTS_DIR", "FIGURES_DIR", "DEVICE", "MODEL"} <= known


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_with_smoke_parameters(path, tmp_path):
    params = dict(CI_PARAMS[path.name], RESULTS_DIR=str(tmp_path / "results"),
                  FIGURES_DIR=str(tmp_path / "figures"))
    pm.execute_notebook(str(path), str(tmp_path / path.name), parameters=params, kernel_name="python3",
                        language="python", cwd=str(NB_DIR), progress_bar=False)
    figures = list((tmp_path / "figures").glob("*.png"))
    assert figures and all(f.with_suffix(".pdf").exists() for f in figures)
