"""`layerviz report`: overrides checked before anything runs, failures named by notebook and cell."""

import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from layerviz import cli
from layerviz.report import (
    NotebookFailed,
    ReportConfig,
    declared_parameters,
    resolve_overrides,
    run_report,
)


def _notebook(path: Path, params: str, *cells: str) -> Path:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [new_markdown_cell("# test"), p, *[new_code_cell(c) for c in cells]]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def folder(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "00_ok.ipynb", 'FIGURES_DIR = "x"\nRESULTS_DIR = "y"\nX = 1',
              "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nfrom layerviz import plots",
              "fig, ax = plt.subplots()\nax.plot([X, X + 1])\nplots.publish(fig, f'ok_x{X}', FIGURES_DIR)")
    _notebook(nbs / "01_bad.ipynb", 'FIGURES_DIR = "x"\nY = 0',
              "a = 1",
              "if Y == 5:\n    raise ValueError('boom: Y was 5')")
    return nbs


def test_overrides_are_resolved_per_notebook_and_checked(folder):
    paths = {p.name: declared_parameters(p) for p in sorted(folder.glob("*.ipynb"))}
    got = resolve_overrides({"X": 2, "01_bad": {"Y": 5}, "FIGURES_DIR": "/f"}, paths)
    assert got == {"00_ok.ipynb": {"X": 2, "FIGURES_DIR": "/f"}, "01_bad.ipynb": {"Y": 5, "FIGURES_DIR": "/f"}}
    with pytest.raises(ValueError, match="no notebook has a parameter 'Z'; known parameters: FIGURES_DIR"):
        resolve_overrides({"Z": 1}, paths)
    with pytest.raises(ValueError, match="01_bad.ipynb has no parameter.*'X'"):
        resolve_overrides({"01_bad.ipynb": {"X": 1}}, paths)
    with pytest.raises(ValueError, match="'02_missing' looks like a notebook name"):
        resolve_overrides({"02_missing": {"X": 1}}, paths)


def test_report_runs_every_notebook_and_names_the_failing_cell(folder, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("X: 2\n01_bad.ipynb:\n  Y: 5\n")
    cfg = ReportConfig(notebooks=str(folder), out=str(tmp_path / "rep"), figures_dir=str(tmp_path / "fig"),
                       results_dir=str(tmp_path / "res"), params=str(params))
    with pytest.raises(NotebookFailed) as e:
        run_report(cfg, report=None)
    msg = str(e.value)
    # cell 4 as the author counts them (markdown, parameters, `a = 1`, the raising cell); papermill's
    # injected-parameters cell is not counted
    assert "01_bad.ipynb: cell 4 (`if Y == 5:`) raised ValueError: boom: Y was 5" in msg
    assert str(tmp_path / "rep" / "01_bad.ipynb") in msg
    # the other notebook ran with its override, wrote its figure where the report said
    assert (tmp_path / "fig" / "ok_x2.png").exists() and (tmp_path / "fig" / "ok_x2.pdf").exists()
    index = json.loads((tmp_path / "rep" / "index.json").read_text())
    status = {r["notebook"]: r["status"] for r in index["notebooks"]}
    assert status == {"00_ok.ipynb": "ok", "01_bad.ipynb": "failed"}
    ok = next(r for r in index["notebooks"] if r["notebook"] == "00_ok.ipynb")
    assert ok["figures"] == ["ok_x2.pdf", "ok_x2.png"]
    assert ok["parameters"]["FIGURES_DIR"] == str((tmp_path / "fig").resolve())
    # rerunning one notebook keeps the other's entry in the index
    params.write_text("X: 3\n")
    run_report(ReportConfig(notebooks=str(folder), out=str(tmp_path / "rep"), figures_dir=str(tmp_path / "fig"),
                            params=str(params), only=["00_ok"]), report=None)
    index = json.loads((tmp_path / "rep" / "index.json").read_text())["notebooks"]
    assert [(r["notebook"], r["status"]) for r in index] == [("00_ok.ipynb", "ok"), ("01_bad.ipynb", "failed")]
    assert index[0]["figures"] == ["ok_x3.pdf", "ok_x3.png"]


def test_cli_report_refuses_a_bad_override_before_running(folder, tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text("SMOKEE: true\n")
    rc = cli.main(["report", "--notebooks", str(folder), "--out", str(tmp_path / "rep"), "--params", str(params)])
    assert rc == 2
    assert "no notebook has a parameter 'SMOKEE'" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()
    rc = cli.main(["report", "--notebooks", str(folder), "--only", "nothing-like-this"])
    assert rc == 2 and "matches none of 00_ok.ipynb, 01_bad.ipynb" in capsys.readouterr().err


def test_results_doc_is_the_runs_findings_under_its_provenance(tmp_path):
    """docs/results.md: the study's findings.md (generated from its tables) headed by the run's commit and date;
    nothing for the smoke study or a study not run yet."""
    from layerviz.report import study_folder, write_results_doc

    study = tmp_path / "results" / "demo-study"
    assert write_results_doc(study, tmp_path / "results.md") is None and not (tmp_path / "results.md").exists()
    study.mkdir(parents=True)
    (study / "findings.md").write_text("# Findings\nNDCG@10 0.450\n")
    (study / "manifest.json").write_text(json.dumps({"commit": "abc123def456", "created": "2026-12-06T12:00:00+00:00",
                                                     "versions": {"layerviz": "0.1.0"}, "config": {"name": "demo-study"}}))
    out = write_results_doc(study, tmp_path / "results.md")
    text = out.read_text()
    assert "commit `abc123def456`, 2026-12-06T12:00:00+00:00" in text and text.endswith("# Findings\nNDCG@10 0.450\n")
    cfg = ReportConfig(notebooks=str(Path(__file__).resolve().parents[1] / "notebooks"), results_dir=str(tmp_path))
    assert study_folder(cfg) == tmp_path / "demo-study"  # the notebooks' CONFIG names the demo study
    assert study_folder(cfg, {"SMOKE": True}) is None
