"""``StudyResult``: what a study measured, as tidy long DataFrames with documented columns.

The runner collects every stage's outputs into one ``StudyResult``; the tables, the notebooks and
the widgets read its fields (never the stage folders or nested dicts). Every frame has a ``model``
column (the spec of the config's ``models``); those about data have a ``dataset`` column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from layerviz import metrics
from layerviz.study.config import StudyConfig

FINE_TUNED, ZERO_SHOT = "fine-tuned", "zero-shot"
"""Values of the ``base`` column: which recommender a row measures."""


def cold_set(dataset: str) -> str:
    """The ``dataset`` value of rows measured on a dataset's cold-start test set."""
    return f"{dataset} (cold start)"


@dataclass
class StudyResult:
    """Everything one study measured. Variants in ``per_user``:

    ``full`` (all layers), ``select:<strategy>`` (that selection, layers dropped), ``drop_lower_third``,
    ``reference_mapped`` (the plan's list mapped by depth), ``popularity``, ``zeroshot`` (the pretrained
    LM when the study fine-tunes), ``adapters:<stage>`` (the primary selection after adapter stage
    ``drop``/``stage1``/``stage2``; on the transfer dataset: B's own selection), ``transfer:plain`` and
    ``transfer:adapters`` (the main dataset's selection, without and with its adapters, on the transfer dataset), ``sasrec``
    (the classical sequential recommender); on ``cold_set(dataset)``: ``compact:plain`` and
    ``compact:adapters`` (the primary selection without and with its adapters).
    """

    config: StudyConfig
    per_user: pd.DataFrame
    """model, dataset, variant, user (position in the candidate lists), metric, value: test users."""
    variants: pd.DataFrame
    """model, dataset, variant, k, layers: the layers each evaluated variant keeps."""
    importance: pd.DataFrame
    """model, dataset, base, layer, depth_fraction, layer_type, criterion, value, normalized."""
    validity: pd.DataFrame
    """model, dataset, base, criterion, ground_truth, spearman, ci_low, ci_high (against the ablation)."""
    selections: pd.DataFrame
    """model, dataset, strategy, n_layers, k, layers, score, lower, middle, upper, criterion, stop, calibration."""
    traces: pd.DataFrame
    """model, dataset, strategy, step, k, layers, score, seconds: each subset a selection scored."""
    curves: pd.DataFrame
    """model, dataset, strategy, k, layers, score: validation NDCG@10 of each strategy at k' = 1..k."""
    adapters: pd.DataFrame
    """model, dataset, stage, val_mse, ndcg@10, retention, retention_low, retention_high, ... (per stage)."""
    adapter_summary: pd.DataFrame
    """model, dataset, layers, k, n_layers, full_ndcg@10, adapter_params, flops_pct, train_seconds, ..."""
    placement: pd.DataFrame
    """model, dataset, gap, prev, next, skipped, kind, rank, reason, params: one row per adapter gap."""
    adapter_curves: pd.DataFrame
    """model, dataset, stage, gap, epoch, train_mse, val_mse: adapter training."""
    bench: pd.DataFrame
    """model, config, k, adapters, prefill_ms, speedup, bound, latency_ms, qps, peak_mb, memory_ratio, ..."""
    calibration: pd.DataFrame
    """model, dataset, base, choice, valid_ndcg@10: the likelihood calibration each recommender scores with."""
    finetune: pd.DataFrame
    """model, steps, best_step, examples, seconds, stopped, valid_ndcg@10_before/after, ...: one row per model."""
    finetune_curves: pd.DataFrame
    """model, step, seconds, train_loss, lr, valid_ndcg@10."""
    users: pd.DataFrame = field(default_factory=pd.DataFrame)
    """dataset, user (position in the candidate lists), user_id, positive, slice (head/torso/tail/cold)."""
    sasrec: pd.DataFrame = field(default_factory=pd.DataFrame)
    """dataset, epochs, best_epoch, valid_ndcg@10, seconds, stopped, ...: SASRec's training, per dataset."""
    heal_variants: pd.DataFrame = field(default_factory=pd.DataFrame)
    """model, variant, selection, k, stage, ndcg@10, retention (+ CI), retention_control (+ CI), top1, kendall_tau,
    val_mse, and the run's summary (objective, heal_mode, valid_ndcg@10, layers, ...): RQ3's comparison."""
    heal_variants_per_user: pd.DataFrame = field(default_factory=pd.DataFrame)
    """model, user, selection, k, variant, stage, ndcg@10: test NDCG@10 per user of each variant's final stage and
    of plain dropping (RQ3's paired comparisons)."""
    heal_curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    """model, dataset, step, seconds, loss, task/distill/mse/cosine terms, valid_ndcg@10: the adapters stage's
    healing."""
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    """The study's tables (headline, thirds, variants, cross_model, cross_domain, hypotheses, finetune)."""

    @property
    def models(self) -> list[str]:
        return list(self.config.models)

    @property
    def base(self) -> str:
        """The recommender the study analyses: fine-tuned when the config fine-tunes, else zero-shot."""
        return FINE_TUNED if self.config.finetune else ZERO_SHOT

    def values(self, model: str, variant: str, metric: str = "ndcg@10", dataset: str | None = None) -> pd.Series:
        """Per-user values of one variant (in user order); empty when it was not measured."""
        d = dataset or self.config.dataset
        pu = self.per_user
        rows = pu[(pu.model == model) & (pu.dataset == d) & (pu.variant == variant) & (pu.metric == metric)]
        return rows.sort_values("user")["value"].reset_index(drop=True)

    def has(self, model: str, variant: str, dataset: str | None = None) -> bool:
        return len(self.values(model, variant, "ndcg@10", dataset)) > 0

    def profile(self, model: str, criterion: str = "fused", base: str | None = None) -> np.ndarray:
        """Per-layer importance values of one criterion on the main dataset (the analysed base unless ``base``)."""
        t = self.importance_table(model, base)
        return t[t.criterion == criterion].sort_values("layer")["value"].to_numpy()

    def importance_table(self, model: str, base: str | None = None, dataset: str | None = None) -> pd.DataFrame:
        """One model's tidy importance table (layer, criterion, value, normalized, ...)."""
        t = self.importance
        t = t[(t.model == model) & (t.dataset == (dataset or self.config.dataset)) & (t.base == (base or self.base))]
        return t.drop(columns=["model", "dataset", "base"]).reset_index(drop=True)

    def selection(self, model: str, strategy: str | None = None, dataset: str | None = None) -> pd.Series:
        """One selection row (layers, k, n_layers, ...); the primary strategy on the main dataset by default."""
        s = self.selections
        row = s[(s.model == model) & (s.dataset == (dataset or self.config.dataset))
                & (s.strategy == (strategy or self.config.primary))]
        return row.iloc[0]

    def layers(self, model: str) -> int:
        """The model's layer count L."""
        return int(self.selection(model)["n_layers"])

    def rows(self, frame: str, model: str, dataset: str | None = None) -> pd.DataFrame:
        """One model's (and dataset's) rows of a frame, without those two columns."""
        f = getattr(self, frame)
        keep = f.model == model
        if "dataset" in f:
            keep &= f.dataset == (dataset or self.config.dataset)
        return f[keep].drop(columns=[c for c in ("model", "dataset") if c in f]).reset_index(drop=True)

    def summary(self, model: str, dataset: str | None = None) -> pd.Series:
        """The adapter run's summary (layers, k, n_layers, full_ndcg@10, overheads, ...)."""
        return self.rows("adapter_summary", model, dataset).iloc[0]

    def finetune_seconds(self, model: str) -> float | None:
        """How long fine-tuning the recommender took (None when the study does not fine-tune)."""
        ft = self.finetune
        row = ft[ft["model"] == model] if len(ft) and "model" in ft else ft.iloc[0:0]
        return float(row["seconds"].iloc[0]) if len(row) else None

    def chance(self, metric: str = "ndcg@10") -> float:
        """Expected ``metric`` of a random ranking of 1 + negatives candidates."""
        return metrics.chance(self.config.negatives + 1)[metric]


def _wide_to_long(frame: pd.DataFrame, rename=None) -> list[pd.DataFrame]:
    """Per-user frames with ``variant:metric`` columns -> long pieces (variant, user, metric, value)."""
    out = []
    for col in frame.columns:
        variant, metric = col.rsplit(":", 1) if ":" in col else (col, "ndcg@10")
        variant = (rename or {}).get(variant, variant)
        out.append(pd.DataFrame({"variant": variant, "user": np.arange(len(frame)), "metric": metric,
                                 "value": frame[col].to_numpy(dtype=float)}))
    return out


def _tagged(frame: pd.DataFrame, **tags) -> pd.DataFrame:
    """``frame`` with constant tag columns in front; list cells (parquet reads them as arrays) as lists."""
    cols = {c: [v.tolist() for v in frame[c]] if len(frame) and isinstance(frame[c].iloc[0], np.ndarray)
            else frame[c] for c in frame.columns}
    return pd.DataFrame({**{k: [v] * len(frame) for k, v in tags.items()}, **cols},
                        index=frame.index).reset_index(drop=True)


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _per_user(cfg: StudyConfig, model: str, r: dict) -> list[pd.DataFrame]:
    a, b = cfg.dataset, cfg.transfer_dataset
    adapter_stages = {s: f"adapters:{s}" for s in ("drop", "stage1", "stage2", "heal", "control")}
    sources = [(a, r["evaluation"]["per_user"], None), (a, r["adapters"]["per_user"], adapter_stages)]
    for d, z in r.get("zeroshot", {}).items():
        sources.append((d, z["per_user"], None))
    if "tuned_b" in r:
        sources.append((b, r["tuned_b"]["per_user"], None))
    if "b_adapters" in r:
        sources.append((b, r["b_adapters"]["per_user"], adapter_stages))
    for d, x in r.get("baselines", {}).items():
        sources.append((d, x["per_user"], None))
        if "cold_per_user" in x:
            sources.append((cold_set(d), x["cold_per_user"], None))
    if "cold" in r:
        sources.append((cold_set(a), r["cold"]["per_user"], None))
    if "transfer" in r:
        sources.append((b, r["transfer"]["per_user"], {"a_selection_plain": "transfer:plain",
                                                      "a_selection_adapters": "transfer:adapters"}))
    pieces = [_tagged(p, model=model, dataset=d) for d, frame, ren in sources for p in _wide_to_long(frame, ren)]
    return pieces


def collect(cfg: StudyConfig, stage_out: dict[str, dict]) -> StudyResult:
    """Every stage's outputs (per model, as the runner gathered them) -> one ``StudyResult``."""
    a, b = cfg.dataset, cfg.transfer_dataset
    tuned = FINE_TUNED if cfg.finetune else ZERO_SHOT
    pu, var, imp, val, sel, tr, cur, ad, summ, pl, adc, bench, cal, ft, ftc, hv, hvu, hc = ([] for _ in range(18))
    for m, r in stage_out.items():
        pu += _per_user(cfg, m, r)
        var.append(_tagged(r["evaluation"]["variants"], model=m, dataset=a))
        for key, d, base in (("importance", a, tuned), ("importance_zeroshot", a, ZERO_SHOT),
                             ("b_importance", b, tuned)):
            if key in r:
                imp.append(_tagged(r[key]["importance"], model=m, dataset=d, base=base))
                val.append(_tagged(r[key]["validity"], model=m, dataset=d, base=base))
        for d, sels in ((a, r["selections"]), (b, {cfg.primary: r["b_selection"]} if "b_selection" in r else {})):
            for strategy, s in sels.items():
                doc = s["selection"]
                sel.append(pd.DataFrame([{
                    "model": m, "dataset": d, "strategy": strategy, "n_layers": doc["n_layers"], "k": doc["k"],
                    "layers": doc["layers"], "score": doc["score"], **doc["thirds"],
                    "criterion": doc.get("criterion"), "stop": doc.get("stop"), "calibration": doc.get("calibration"),
                    "evaluations": doc["evaluations"]}]))
                tr.append(_tagged(s["trace"], model=m, dataset=d, strategy=strategy))
        cur.append(_tagged(r["curves"]["curves"], model=m, dataset=a))
        _adapter_frames(r, m, a, b, ad, summ, pl, adc, hc, hv, hvu)
        bench.append(_tagged(r["bench"]["bench"].rename(columns={"model": "source"}), model=m))
        for d, c in r["calibration"].items():
            cal.append(pd.DataFrame([{"model": m, "dataset": d, "base": tuned, "choice": c["choice"],
                                      "valid_ndcg@10": c["valid_ndcg@10"]}]))
        for d, c in r.get("calibration_zeroshot", {}).items():
            cal.append(pd.DataFrame([{"model": m, "dataset": d, "base": ZERO_SHOT, "choice": c["choice"],
                                      "valid_ndcg@10": c["valid_ndcg@10"]}]))
        if "finetune" in r:
            ft.append(pd.DataFrame([{"model": m, **r["finetune"]["summary"]}]))
            ftc.append(_tagged(r["finetune"]["curves"], model=m))
    users, sas = _reference(stage_out)
    per_user = _concat(pu, ["model", "dataset", "variant", "user", "metric", "value"])
    per_user = per_user.drop_duplicates(["model", "dataset", "variant", "user", "metric"], ignore_index=True)
    return StudyResult(
        cfg, per_user, _concat(var, ["model", "dataset", "variant", "layers", "k"]),
        _concat(imp, ["model", "dataset", "base", "layer", "criterion", "value", "normalized"]),
        _concat(val, ["model", "dataset", "base", "criterion", "ground_truth", "spearman", "ci_low", "ci_high"]),
        _concat(sel, ["model", "dataset", "strategy", "n_layers", "k", "layers"]),
        _concat(tr, ["model", "dataset", "strategy", "step", "k", "layers", "score"]),
        _concat(cur, ["model", "dataset", "strategy", "k", "layers", "score"]),
        _concat(ad, ["model", "dataset", "stage"]), _concat(summ, ["model", "dataset"]),
        _concat(pl, ["model", "dataset", "gap"]), _concat(adc, ["model", "dataset", "stage"]),
        _concat(bench, ["model", "config", "k"]), _concat(cal, ["model", "dataset", "base", "choice"]),
        _concat(ft, ["model"]), _concat(ftc, ["model", "step"]), users, sas,
        _concat(hv, ["model", "variant", "selection", "k", "stage"]),
        _concat(hvu, ["model", "user", "selection", "k", "variant", "stage", "ndcg@10"]),
        _concat(hc, ["model", "dataset", "step"]))


def _adapter_frames(r: dict, m: str, a: str, b: str, ad, summ, pl, adc, hc, hv, hvu) -> None:
    """One model's adapters stages (both domains) and RQ3 variants, appended to the collect lists."""
    for d, key in ((a, "adapters"), (b, "b_adapters")):
        if key in r:
            x = r[key]
            ad.append(_tagged(x["retention"], model=m, dataset=d))
            summ.append(pd.DataFrame([{**x["summary"], "model": m, "dataset": d}]))
            pl.append(_tagged(x["placement"], model=m, dataset=d))
            adc.append(_tagged(x["curve"], model=m, dataset=d))
            if "heal_curve" in x:
                hc.append(_tagged(x["heal_curve"], model=m, dataset=d))
    if "heal_variants" in r:
        hv.append(_tagged(r["heal_variants"]["retention"].merge(
            r["heal_variants"]["summary"], on=["variant", "selection", "k"]), model=m))
        hvu.append(_variants_long(r["heal_variants"]["per_user"], m))


def _variants_long(frame: pd.DataFrame, model: str) -> pd.DataFrame:
    """RQ3's per-user frame (columns 'selection|k|variant|stage') -> long rows."""
    rows = [pd.DataFrame({"model": model, "user": np.arange(len(frame)), "selection": sel, "k": int(k),
                          "variant": variant, "stage": stage, "ndcg@10": frame[col].to_numpy(dtype=float)})
            for col in frame.columns for sel, k, variant, stage in [col.split("|")]]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _reference(stage_out: dict[str, dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The model-free baselines stages' users (with slices) and SASRec records, once per dataset."""
    users, sas = {}, {}
    for r in stage_out.values():
        for d, x in r.get("baselines", {}).items():
            users[d] = _tagged(x["users"], dataset=d).assign(user=np.arange(len(x["users"])))
            sas[d] = pd.DataFrame([{"dataset": d, **{k: v for k, v in x["sasrec"].items() if k != "config"}}])
    return (_concat(list(users.values()), ["dataset", "user", "user_id", "positive", "slice"]),
            _concat(list(sas.values()), ["dataset"]))
