"""The cost plan as tables: per stage (``by_stage``, what ``--plan`` prints), and against what a run
recorded in its stages' done.json (``recorded``, ``against_run``, ``minutes``)."""

from __future__ import annotations

import json

import pandas as pd

from layerviz.passes import KINDS
from layerviz.study.config import StudyConfig


def by_stage(df: pd.DataFrame) -> pd.DataFrame:
    """One row per stage: passes by kind ('<=' where an upper bound), TFLOPs and minutes, then per-model and
    whole-run totals."""
    kinds = [k for k in KINDS if k in set(df["kind"])]
    rows = []

    def row(name: str, part: pd.DataFrame) -> dict:
        out = {"stage": name}
        for kind in kinds:
            sel = part[part["kind"] == kind]
            out[kind] = "" if sel.empty else ("" if sel["exact"].all() else "<=") + f"{int(sel['passes'].sum()):,}"
        out["TFLOP"] = round(part["flops"].sum() / 1e12, 2)
        out["minutes"] = round(part["seconds"].sum() / 60, 1)
        return out

    for model, part in df.groupby("model", sort=False):
        rows += [row(stage, s) for stage, s in part.groupby("stage", sort=False)]
        rows.append(row(f"total {model}", part))
    rows.append(row("total", df))
    return pd.DataFrame(rows)


def recorded_passes(cfg: StudyConfig) -> pd.DataFrame:
    """The passes every finished stage of a study recorded in its done.json -> stage, kind, passes, seconds
    (the stage's wall time, on every row of the stage)."""
    rows = []
    for done in sorted(cfg.folder.rglob("done.json")):
        doc = json.loads(done.read_text())
        stage = done.parent.relative_to(cfg.folder).as_posix()
        for kind, n in (doc.get("passes") or {"": 0}).items():
            rows.append({"stage": stage, "kind": kind, "passes": n, "seconds": doc.get("seconds", float("nan"))})
    return pd.DataFrame(rows, columns=["stage", "kind", "passes", "seconds"])


def against_run(planned: pd.DataFrame, run: pd.DataFrame) -> pd.DataFrame:
    """Planned against recorded passes per stage and kind: ``holds`` is equality where the plan is exact
    and recorded <= planned where it is a bound; a stage planned but not run (or run but not planned)
    shows 0 on the missing side."""
    p = planned.groupby(["stage", "kind"], sort=False).agg(planned=("passes", "sum"), exact=("exact", "all"))
    r = run[run["kind"] != ""].groupby(["stage", "kind"]).agg(recorded=("passes", "sum"))
    out = p.join(r, how="outer").reset_index()
    out["planned"] = out["planned"].fillna(0).astype(int)
    out["recorded"] = out["recorded"].fillna(0).astype(int)
    out["exact"] = out["exact"].fillna(True).astype(bool)
    out["holds"] = (out["recorded"] == out["planned"]) | (~out["exact"] & (out["recorded"] <= out["planned"]))
    return out


def minutes(planned: pd.DataFrame, run: pd.DataFrame) -> pd.DataFrame:
    """Planned and recorded minutes per model and step (a stage's last name: finetune, select-top_k, ...,
    summed over datasets) -> model, step, planned, recorded."""
    def step(stage: pd.Series) -> pd.Series:
        return stage.str.rsplit("/", n=1).str[-1]

    p = planned.assign(step=step(planned["stage"])).groupby(["model", "step"], sort=False)["seconds"].sum() / 60
    first = run.drop_duplicates("stage")  # seconds are per stage, repeated on each kind's row
    stages = planned.drop_duplicates("stage").set_index("stage")["model"]
    r = first[first["stage"].isin(stages.index)]
    r = r.assign(model=r["stage"].map(stages), step=step(r["stage"])).groupby(["model", "step"])["seconds"].sum() / 60
    out = pd.DataFrame({"planned": p}).join(pd.DataFrame({"recorded": r}), how="left").reset_index()
    return out
