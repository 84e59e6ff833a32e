"""``layerviz report``: execute every numbered notebook with papermill into ``reports/``.

The notebooks write the paper figures to ``figures/`` (their ``FIGURES_DIR``) and read the study cache
from ``results/`` (``RESULTS_DIR``); both are passed as absolute paths, so the report works from any
working directory. Overrides come from a YAML file: a top-level key naming a notebook (``02_rq2_...`` or
its file name) holds that notebook's parameters; any other key is a parameter applied to every notebook
that declares it. An override that names no real parameter is refused before anything runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import yaml

from layerviz import notebook_params, store


class NotebookFailed(RuntimeError):
    """One or more notebooks raised; the message names each notebook and cell."""


@dataclass
class ReportConfig:
    notebooks: str = "notebooks"
    """Folder holding the numbered notebooks (``NN_name.ipynb``)."""
    out: str = "reports"
    """Executed notebooks go here (with their outputs), plus ``index.json``."""
    figures_dir: str = "figures"
    """Passed to every notebook as FIGURES_DIR."""
    results_dir: str = "results"
    """Passed to every notebook as RESULTS_DIR (the ``layerviz run`` cache)."""
    params: str | None = None
    """YAML file of overrides (see the module docstring)."""
    only: list[str] = field(default_factory=list)
    """Run only notebooks whose file name contains one of these strings (default: all)."""
    kernel: str = "python3"
    cell_timeout: int | None = None
    """Seconds one cell may run (None: no limit)."""
    jobs: int = 2
    """Notebooks executed at once, each in its own kernel (mostly single-threaded Python: on 2 cores the six
    notebooks of ``make demo`` took 2 min 18 s one at a time)."""


def notebooks_in(folder: str | Path, only: list[str] | None = None) -> list[Path]:
    paths = sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    if only:
        chosen = [p for p in paths if any(s in p.name for s in only)]
        if not chosen:
            raise ValueError(f"--only {only} matches none of {', '.join(p.name for p in paths)}")
        paths = chosen
    return paths


def declared_parameters(path: Path) -> set[str]:
    """The parameters a notebook declares: its parameters cell's assignments, and every name of
    ``layerviz.notebook_params`` when the cell imports them all (as every numbered notebook does)."""
    import papermill as pm  # heavy import, needed only to execute notebooks

    cells = json.loads(Path(path).read_text())["cells"]
    cell = "".join(next((c["source"] for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), []))
    shared = set(notebook_params.__all__) if "from layerviz.notebook_params import *" in cell else set()
    return set(pm.inspect_notebook(str(path))) | shared


def resolve_overrides(raw: dict | None, declared: dict[str, set[str]], where: str = "overrides") -> dict[str, dict]:
    """Notebook name -> parameters, from a mapping of per-notebook sections and global parameters.

    ``declared`` maps each notebook's file name to its parameters (:func:`declared_parameters`).
    """
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: give a mapping of parameters, or of notebook names to parameters")
    by_stem = {Path(name).stem: name for name in declared}
    out: dict[str, dict] = {name: {} for name in declared}
    sections = {k: v for k, v in raw.items() if k in declared or k in by_stem}
    for key in raw:
        if key not in sections and re.match(r"^\d\d_|.*\.ipynb$", str(key)):
            raise ValueError(f"{where}: {key!r} looks like a notebook name but is not one of "
                             f"{', '.join(declared)}")
    glob = {k: v for k, v in raw.items() if k not in sections}
    for key in glob:
        if not any(key in d for d in declared.values()):
            known = sorted(set().union(*declared.values()))
            raise ValueError(f"{where}: no notebook has a parameter {key!r}; known parameters: {', '.join(known)}")
    for name, d in declared.items():
        out[name].update({k: v for k, v in glob.items() if k in d})
    for key, section in sections.items():
        name = by_stem.get(key, key)
        if not isinstance(section, dict):
            raise ValueError(f"{where}: {key}: give a mapping of parameter names to values")
        bad = sorted(set(section) - declared[name])
        if bad:
            raise ValueError(f"{where}: {name} has no parameter(s) {', '.join(map(repr, bad))}; its parameters: "
                             f"{', '.join(sorted(declared[name]))}")
        out[name].update(section)
    return out


def _failure(path: Path, executed: Path, err) -> str:
    """Name the notebook and the cell (numbered as in the committed notebook, from 1) that raised."""
    idx = err.cell_index
    source_line = next((ln for ln in str(err.source).splitlines() if ln.strip()), "")
    try:  # papermill inserts an injected-parameters cell; count cells as the author sees them
        cells = json.loads(executed.read_text())["cells"]
        idx -= sum("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in cells[:err.cell_index])
    except (OSError, ValueError, KeyError):
        pass
    return (f"{path.name}: cell {idx + 1} (`{source_line.strip()[:80]}`) raised {err.ename}: {err.evalue}\n"
            f"    the partly executed notebook, with the traceback, is {executed}")


def _execute(path: str, executed: str, params: dict, kernel: str, timeout: int | None) -> tuple[str | None, float]:
    """Run one notebook (in a worker process) -> (None, or the failure naming its cell; seconds)."""
    import papermill as pm  # heavy import, needed only to execute notebooks
    from papermill.exceptions import PapermillExecutionError  # (papermill, as above)

    t0 = time.time()
    try:
        pm.execute_notebook(path, executed, parameters=params, kernel_name=kernel, language="python",
                            cwd=str(Path(path).parent.resolve()), progress_bar=False, execution_timeout=timeout)
    except PapermillExecutionError as e:
        return _failure(Path(path), Path(executed), e), time.time() - t0
    return None, time.time() - t0


def run_report(cfg: ReportConfig, report=print) -> list[dict]:
    """Execute the notebooks (``cfg.jobs`` at once); write ``index.json``; raise :class:`NotebookFailed`
    naming each failure.

    Every notebook runs even when an earlier one fails, so one report lists every broken cell. Each
    notebook writes its figures into a folder of its own, moved into ``figures_dir`` when it ends, so the
    index lists each notebook's figures even when notebooks run side by side.
    """
    if cfg.jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {cfg.jobs}")
    every = notebooks_in(cfg.notebooks)
    paths = notebooks_in(cfg.notebooks, cfg.only)
    raw = None
    if cfg.params:
        p = Path(cfg.params)
        if not p.exists():
            raise FileNotFoundError(f"no parameter file {p}; see notebooks/ci_params.yaml for the format")
        raw = yaml.safe_load(p.read_text())
    declared = {p.name: declared_parameters(p) for p in every}
    overrides = resolve_overrides(raw, declared, where=str(cfg.params or "overrides"))  # checks every section
    out, figures = Path(cfg.out), Path(cfg.figures_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    jobs = {}
    with ProcessPoolExecutor(max_workers=min(cfg.jobs, len(paths)), mp_context=get_context("spawn")) as pool:
        for path in paths:
            own = figures / f".report-{path.stem}"
            shutil.rmtree(own, ignore_errors=True)
            own.mkdir()
            params = {k: v for k, v in (("RESULTS_DIR", str(Path(cfg.results_dir).resolve())),
                                        ("FIGURES_DIR", str(own))) if k in declared[path.name]}
            params.update(overrides[path.name])
            jobs[path] = (pool.submit(_execute, str(path), str(out / path.name), params, cfg.kernel,
                                      cfg.cell_timeout), params, own)
        rows, failures = [], []
        for i, (path, (job, params, own)) in enumerate(jobs.items(), 1):
            error, seconds = job.result()
            made = sorted(f.name for f in own.iterdir() if f.suffix in (".png", ".pdf"))
            for name in made:
                os.replace(own / name, figures / name)
            shutil.rmtree(own, ignore_errors=True)
            params = {**params, "FIGURES_DIR": str(figures)} if "FIGURES_DIR" in params else params
            rows.append({"notebook": path.name, "status": "failed" if error else "ok",
                         "seconds": round(seconds, 1), "output": str(out / path.name), "figures": made,
                         "parameters": params, "error": error})
            if error:
                failures.append(error)
            if report:
                report(f"[{i}/{len(paths)}] {path.name}: " + (f"FAILED: {error}" if error else
                       f"ok in {seconds:.0f} s; {len(made)} figure file(s)"))
    index = out / "index.json"  # a partial run (--only) keeps the other notebooks' last entries
    kept = json.loads(index.read_text())["notebooks"] if index.exists() else []
    ran = {r["notebook"] for r in rows}
    merged = sorted([r for r in kept if r["notebook"] not in ran] + rows, key=lambda r: r["notebook"])
    store.write_json(index, {"notebooks": merged, "versions": store.versions()})
    if failures:
        raise NotebookFailed(f"{len(failures)} of {len(paths)} notebook(s) failed:\n" + "\n".join(failures))
    return rows


def study_folder(cfg: ReportConfig, overrides: dict | None = None) -> Path | None:
    """The results folder of the study the notebooks read (their CONFIG, or the one ``overrides`` or
    ``cfg.params``' global parameters give), or None for the smoke study."""
    if overrides is None and cfg.params:
        raw = yaml.safe_load(Path(cfg.params).read_text()) or {}
        overrides = {k: v for k, v in raw.items() if not isinstance(v, dict)}  # sections are per notebook
    params = notebook_params.with_defaults(overrides or {})
    if params["SMOKE"]:
        return None
    config = Path(cfg.notebooks) / params["CONFIG"]  # CONFIG is relative to the notebooks
    raw = yaml.safe_load(config.read_text()) if config.exists() else {}
    return Path(cfg.results_dir) / (raw or {}).get("name", "study")


def write_results_doc(folder: Path, out: str | Path) -> Path | None:
    """``out``: the study's findings.md under a header naming the run (commit, date, config) -> ``out``, or None
    when the study has no findings yet. Numbers are never typed: they come from the run's tables."""
    findings, manifest = folder / "findings.md", folder / "manifest.json"
    if not findings.exists() or not manifest.exists():
        return None
    run = json.loads(manifest.read_text())
    head = (f"<!-- generated by `layerviz report` from {folder.as_posix()}/findings.md: edit the study, not this -->\n"
            f"Run: commit `{run.get('commit') or 'unknown'}`, {run['created']}, layerviz "
            f"{run['versions'].get('layerviz')}, config name `{run['config'].get('name')}`.\n\n")
    store.atomic_write(out, lambda tmp: Path(tmp).write_text(head + findings.read_text()))
    return Path(out)
