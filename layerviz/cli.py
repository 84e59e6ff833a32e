"""The ``layerviz`` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def _cmd_models(args: argparse.Namespace) -> int:
    from layerviz.models import presets_table

    table = presets_table()
    print(table.to_string(index=False))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from layerviz.evaluate import EvalConfig, run

    fields = {k: v for k, v in vars(args).items() if k in EvalConfig.__dataclass_fields__}
    run(EvalConfig(**fields), out=args.out)
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from layerviz.data.download import download

    for path in download(args.name, args.dest):
        print(path)
    return 0


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from layerviz.data.bundled import demo_dir
    from layerviz.data.demo import generate

    print(generate(args.out or demo_dir()))
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from layerviz.data import PrepConfig, load

    load(args.dataset, args.format, PrepConfig(args.positive_threshold, args.kcore))
    return 0


def _add_evaluate(sub) -> None:
    from layerviz.evaluate import EvalConfig

    d = EvalConfig()
    p = sub.add_parser("evaluate", help="score a model's recommendations on fixed candidate lists")
    p.add_argument("--model", default=d.model, help="preset, hub id, local folder or .gguf file")
    p.add_argument("--dataset", default=d.dataset, help="demo | demo-electronics | demo-movies | folder | file")
    p.add_argument("--format", default=d.format, help="dataset format (default: detect)")
    p.add_argument("--scorer", default=d.scorer, choices=["likelihood", "yesno", "embedding"])
    p.add_argument("--calibration", default=d.calibration, choices=["auto", "pmi", "none"],
                   help="likelihood scorer: subtract the no-history title log-prob (pmi) or not (none); auto "
                        "picks the better on validation users")
    p.add_argument("--calibration-users", dest="calibration_users", type=int, default=d.calibration_users,
                   help="validation users for --calibration auto")
    p.add_argument("--negatives", type=int, default=d.negatives, help="negatives per user (99 or 19)")
    p.add_argument("--sampler", default=d.sampler, choices=["uniform", "popularity"])
    p.add_argument("--users", type=int, default=d.users, help="users to evaluate (seeded sample)")
    p.add_argument("--split", default=d.split, choices=["test", "valid"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--positive-threshold", dest="positive_threshold", type=float, default=d.positive_threshold)
    p.add_argument("--kcore", type=int, default=d.kcore)
    p.add_argument("--history-len", dest="history_len", type=int, default=d.history_len)
    p.add_argument("--max-title-tokens", dest="max_title_tokens", type=int, default=d.max_title_tokens)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=d.batch_size)
    p.add_argument("--full-ranking", dest="full_ranking", action="store_true",
                   help="embedding scorer: also rank all items")
    p.add_argument("--candidates-dir", dest="candidates_dir", default=d.candidates_dir)
    p.add_argument("--out", default=None, help="folder for metrics.json, ranks.parquet, manifest.json")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_importance(args: argparse.Namespace) -> int:
    import pandas as pd

    from layerviz.importance import ImportanceConfig, run_importance, wide

    fields = {k: v for k, v in vars(args).items() if k in ImportanceConfig.__dataclass_fields__ and v is not None}
    if args.no_ablation:
        fields["ablation"] = False
    res = run_importance(ImportanceConfig(**fields), use_cache=not args.no_cache)
    table = wide(res.table, "normalized")
    cols = [c for c in ["fisher_sum", "attn_entropy", "attn_item_mass", "block_influence", "angular_distance",
                        "norm_ratio", "kurtosis", "ablation_ndcg", "ablation_loss", "fused"] if c in table]
    pd.set_option("display.width", 200)
    print("\nnormalized importance (1 = most important layer by that criterion):")
    print(table[cols].round(2).to_string())
    if len(res.validity):
        print("\nvalidity: Spearman correlation with the single-layer ablation ground truth (95% bootstrap CI)")
        v = res.validity.copy()
        v["spearman"] = v.apply(lambda r: f"{r.spearman:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]", axis=1)
        print(v.pivot(index="criterion", columns="ground_truth", values="spearman").to_string())
    if res.fusion_weights:
        how = ("fitted on the calibration examples; its loss-ablation validity is cross-fitted"
               if fields.get("fusion_weights") == "fit" else "fixed")
        print("\nfused = " + " + ".join(f"{w:g}*{c}" for c, w in res.fusion_weights.items()) + f" ({how})")
    print(f"\nwrote {res.folder}/importance.parquet, validity.parquet, per_sample.npz, fusion.json, manifest.json")
    if args.out:
        import shutil

        shutil.copytree(res.folder, args.out, dirs_exist_ok=True)
        print(f"copied to {args.out}")
    return 0


def _fusion_arg(text: str):
    if text == "fit":
        return text
    try:
        return {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use 'fit' or criterion=weight,... "
                                         "(e.g. fisher_sum=1,block_influence=2)") from None


def _add_importance(sub) -> None:
    p = sub.add_parser("importance", help="RQ1: per-layer importance, ablation and validity")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="demo")
    p.add_argument("--format", default=None)
    p.add_argument("--samples", type=int, default=None, help="calibration examples (default 128)")
    p.add_argument("--loss", choices=["likelihood", "yesno"], default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--history-len", dest="history_len", type=int, default=None)
    p.add_argument("--normalization", choices=["minmax", "rank"], default=None)
    p.add_argument("--fusion-weights", dest="fusion_weights", default=None, type=_fusion_arg,
                   help="fused score weights: 'fit' (fitted on the validation calibration examples against the "
                        "loss ablation) or criterion=weight,... (default: fisher_sum, block_influence, "
                        "attn_item_mass equally)")
    p.add_argument("--ablation-users", dest="ablation_users", type=int, default=None)
    p.add_argument("--no-ablation", action="store_true", help="skip the ablation ground truth")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--results-dir", dest="results_dir", default=None, help="cache root (default results/)")
    p.add_argument("--no-cache", action="store_true", help="recompute even if cached")
    p.add_argument("--out", default=None, help="also copy the result files here")
    p.set_defaults(func=_cmd_importance)


def _cmd_select(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from layerviz import store
    from layerviz.selection import SelectConfig, run_select

    fields = {k: v for k, v in vars(args).items() if k in SelectConfig.__dataclass_fields__ and v is not None}
    # the importance run that orders the layers: same settings as `layerviz importance` to reuse its cache
    fields["importance"] = {k: v for k, v in (("samples", args.importance_samples),
                                              ("ablation_users", args.importance_ablation_users)) if v is not None}
    cfg = SelectConfig(**fields)
    s, ctx = run_select(cfg)
    t = s.thirds()
    print(f"\n{s.strategy}: kept {len(s.layers)} of {s.n_layers} layers: {s.layers}")
    print(f"  depth thirds: lower {t['lower']}, middle {t['middle']}, upper {t['upper']}")
    print(f"  {cfg.evaluator} score {s.score:.4f} (full model {ctx['full_score']:.4f}); "
          f"validation NDCG@10 {ctx['task_ndcg@10']:.4f} vs full {ctx['full_task_ndcg@10']:.4f}, "
          f"chance {ctx['chance_ndcg@10']:.4f}; {len(s.trace)} evaluations")
    if args.out:
        store.write_json(f"{args.out}/selection.json", {**s.to_json(), **ctx, "config": asdict(cfg)})
        store.write_parquet(f"{args.out}/trace.parquet", s.trace)
        print(f"wrote {args.out}/selection.json, trace.parquet")
    return 0


def _add_select(sub) -> None:
    from layerviz.selection import STRATEGIES

    p = sub.add_parser("select", help="RQ2: choose layers with one strategy")
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--strategy", choices=STRATEGIES, default=None)
    p.add_argument("--criterion", default=None, help="importance criterion, or auto (default): the most valid against the loss ablation")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--evaluator", choices=["task", "fidelity", "hidden_mse"], default=None)
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--reference", default=None, help="reference key, e.g. llama3-8b")
    p.add_argument("--importance-samples", dest="importance_samples", type=int, default=None,
                   help="calibration samples of the importance run that orders the layers")
    p.add_argument("--importance-ablation-users", dest="importance_ablation_users", type=int, default=None)
    p.add_argument("--history-len", dest="history_len", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--results-dir", dest="results_dir", default=None)
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_select)


def _cmd_adapt(args: argparse.Namespace) -> int:
    from layerviz.compact import AdaptConfig, run_adapt

    fields = {k: v for k, v in vars(args).items() if k in AdaptConfig.__dataclass_fields__ and v is not None}
    if args.layers is not None:
        try:
            fields["layers"] = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers must be comma-separated integers like 0,3,7, got {args.layers!r}") from None
    fields["policy"] = {k: v for k, v in (("rank", args.rank), ("force", args.adapter)) if v is not None}
    if args.full_rank:
        fields["policy"]["rank"] = None
    fields["train"] = {k: v for k, v in (("init", args.init), ("stage1_epochs", args.stage1_epochs),
                                         ("stage2_epochs", args.stage2_epochs), ("lr", args.lr),
                                         ("reg", args.reg)) if v is not None}
    res = run_adapt(AdaptConfig(**fields), out=args.out, use_cache=not args.no_cache)
    s = res["summary"]
    print(f"\ncompact {s['model']}: kept {s['k']} of {s['n_layers']} layers {s['layers']}")
    print(f"  adapters: {s['adapter_params']:,} parameters = {s['params_pct_of_base']:.3f}% of the base, "
          f"{s['params_pct_of_kept_layers']:.2f}% of the kept layers; {s['flops_pct']:.3f}% FLOPs per token")
    print(f"  full model NDCG@10 {s['full_ndcg@10']:.4f}, chance {s['chance_ndcg@10']:.4f}; "
          f"training {s['train_seconds']:.1f} s")
    print(res["retention"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {res['folder']}")
    return 0


def _add_adapt(sub) -> None:
    from layerviz.adapters import KINDS

    p = sub.add_parser("adapt", help="RQ3: build a compact model from kept layers, train its adapters, measure retention")
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--layers", default=None, help="kept layers, comma-separated (e.g. 0,1,3,11,20,21,23,29)")
    p.add_argument("--selection", default=None, help="selection.json (or its folder) from `layerviz select --out`")
    p.add_argument("--adapter", choices=KINDS, default=None, help="one adapter type for every gap (default: the policy)")
    p.add_argument("--rank", type=int, default=None, help="adapter rank (default 64)")
    p.add_argument("--full-rank", dest="full_rank", action="store_true", help="full-rank adapters")
    p.add_argument("--init", choices=["identity", "lstsq"], default=None)
    p.add_argument("--stage1-epochs", dest="stage1_epochs", type=int, default=None)
    p.add_argument("--stage2-epochs", dest="stage2_epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--reg", type=float, default=None, help="lambda of the distance-to-identity penalty")
    p.add_argument("--samples", type=int, default=None, help="calibration prompts (default 64)")
    p.add_argument("--users", type=int, default=None, help="test users for retention (default 100)")
    p.add_argument("--negatives", type=int, default=None)
    p.add_argument("--history-len", dest="history_len", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--results-dir", dest="results_dir", default=None)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", default=None, help="folder for the compact model and its tables")
    p.set_defaults(func=_cmd_adapt)


def _cmd_bench(args: argparse.Namespace) -> int:
    from layerviz.bench import BenchConfig, run_bench

    fields = {k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__ and v is not None}
    if args.keep is not None:
        fields["keep"] = [int(x) for x in args.keep.split(",") if x.strip()]
    if args.no_adapters:
        fields["adapters"] = False
    df = run_bench(BenchConfig(**fields), out=args.out)
    cols = ["config", "k", "prefill_ms", "speedup", "bound", "measured_over_bound", "latency_ms", "qps",
            "peak_mb", "memory_ratio"]
    print(df[[c for c in cols if c in df]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        print(f"wrote {args.out}/bench.csv, bench.parquet")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="RQ4: latency, throughput, peak memory of full vs compact models, and the FLOP bound")
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--keep", default=None, help="values of k, comma-separated (default 4,8,12,16)")
    p.add_argument("--selection", default=None, help="selection.json: its layers are used at its k")
    p.add_argument("--no-adapters", dest="no_adapters", action="store_true", help="skip the with-adapter variants")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None)
    p.add_argument("--prefill-batch", dest="prefill_batch", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_bench)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from layerviz.finetune import FinetuneConfig, finetune

    fields = {k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__ and v is not None}
    if args.target_modules is not None:
        fields["target_modules"] = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    res = finetune(FinetuneConfig(**fields), out=args.out, overwrite=args.overwrite)
    s = res.summary
    print(f"\nvalidation NDCG@10 ({s['eval_users']} users, calibration none): before {s['valid_ndcg@10_before']:.4f}, "
          f"after {s['valid_ndcg@10_after']:.4f} (best step {s['best_step']} of {s['steps']}; {s['stopped']})")
    print(res.curves.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"next: layerviz evaluate --model {args.out} --dataset {args.dataset} ...")
    return 0


def _add_finetune(sub) -> None:
    from layerviz.finetune import OBJECTIVES, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune the LLM recommender (LoRA or full) on the training split")
    p.add_argument("--model", default=d.model, help="base: preset, hub id, local folder or .gguf file")
    p.add_argument("--dataset", default=d.dataset, help="bundled name, dataset folder or reviews file")
    p.add_argument("--format", default=None)
    p.add_argument("--objective", default=d.objective, choices=OBJECTIVES)
    p.add_argument("--full", action="store_true", default=None, help="full fine-tuning instead of LoRA")
    p.add_argument("--lora-r", dest="lora_r", type=int, default=None, help=f"LoRA rank (default {d.lora_r})")
    p.add_argument("--lora-alpha", dest="lora_alpha", type=int, default=None, help=f"default {d.lora_alpha}")
    p.add_argument("--lora-dropout", dest="lora_dropout", type=float, default=None)
    p.add_argument("--target-modules", dest="target_modules", default=None,
                   help="comma-separated Linear names in each layer, or all-linear (default: q,k,v,o,gate,up,down)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 LoRA, 3e-5 full)")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=None)
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=None)
    p.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, default=None)
    p.add_argument("--negatives", type=int, default=None, help=f"per example, rank/yesno (default {d.negatives})")
    p.add_argument("--max-steps", dest="max_steps", type=int, default=None, help=f"default {d.max_steps}")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-seconds", dest="max_seconds", type=float, default=None, help="time budget")
    p.add_argument("--eval-every", dest="eval_every", type=int, default=None, help=f"default {d.eval_every}")
    p.add_argument("--eval-users", dest="eval_users", type=int, default=None, help=f"default {d.eval_users}")
    p.add_argument("--patience", type=int, default=None, help="evaluations without improvement before stopping")
    p.add_argument("--history-len", dest="history_len", type=int, default=None, help=f"default {d.history_len}")
    p.add_argument("--max-title-tokens", dest="max_title_tokens", type=int, default=None)
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", required=True, help="folder for the fine-tuned model (a plain HF folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_finetune)


def _cmd_run(args: argparse.Namespace) -> int:
    from layerviz.study import StudyConfig, run_study

    cfg = StudyConfig.from_yaml(args.config)  # fails here, before any work, on a bad config
    if args.results_dir:
        cfg.results_dir = args.results_dir
    out = run_study(cfg)
    t = out.tables
    with pd_options():
        print("\nheadline:\n" + t["headline"].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print("\nhypotheses:\n" + t["hypotheses"][["model", "claim", "evidence", "value", "ci_low", "ci_high",
                                                   "verdict"]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nwrote {cfg.folder}/headline.csv, headline.tex, thirds.csv, cross_model.csv, cross_domain.csv, "
          "hypotheses.csv")
    return 0


def pd_options():
    import pandas as pd

    return pd.option_context("display.max_colwidth", 60, "display.width", 200)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run (or resume) a whole study from a YAML config, e.g. configs/demo.yaml")
    p.add_argument("config")
    p.add_argument("--results-dir", dest="results_dir", default=None)
    p.set_defaults(func=_cmd_run)


def _cmd_report(args: argparse.Namespace) -> int:
    from layerviz.report import NotebookFailed, ReportConfig, run_report

    cfg = ReportConfig(notebooks=args.notebooks, out=args.out, figures_dir=args.figures, results_dir=args.results_dir,
                       params=args.params, only=args.only or [], cell_timeout=args.cell_timeout)
    try:
        rows = run_report(cfg)
    except NotebookFailed as e:
        print(f"layerviz report: {e}", file=sys.stderr)
        return 1
    figs = sorted({f for r in rows for f in r["figures"]})
    print(f"\n{len(rows)} notebook(s) executed into {cfg.out}/ (index.json); {len(figs)} figure file(s) "
          f"written to {cfg.figures_dir}/")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="execute every notebook with papermill into reports/ and regenerate figures/")
    p.add_argument("--params", default=None, help="YAML overrides: PARAM: value, or NOTEBOOK: {PARAM: value}")
    p.add_argument("--only", nargs="*", default=None, help="run only notebooks whose name contains one of these")
    p.add_argument("--notebooks", default="notebooks")
    p.add_argument("--out", default="reports")
    p.add_argument("--figures", default="figures")
    p.add_argument("--results-dir", dest="results_dir", default="results")
    p.add_argument("--cell-timeout", dest="cell_timeout", type=int, default=None, help="seconds per cell")
    p.set_defaults(func=_cmd_report)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets: download, demo, stats")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("download", help="fetch a real dataset (needs internet)")
    d.add_argument("name", help="ml-100k | ml-1m | amazon2023-electronics")
    d.add_argument("--dest", default="data/raw")
    d.set_defaults(func=_cmd_data_download)
    g = dsub.add_parser("demo", help="(re)generate the bundled synthetic demo data")
    g.add_argument("--out", default=None)
    g.set_defaults(func=_cmd_data_demo)
    s = dsub.add_parser("stats", help="read a dataset and print statistics after each protocol step")
    s.add_argument("dataset")
    s.add_argument("--format", default="auto")
    s.add_argument("--positive-threshold", dest="positive_threshold", type=float, default=4.0)
    s.add_argument("--kcore", type=int, default=5)
    s.set_defaults(func=_cmd_data_stats)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerviz", description="Which transformer layers does an LLM recommender need?"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list model presets: layers, width, parameters, offline?")
    p.set_defaults(func=_cmd_models)
    _add_evaluate(sub)
    _add_importance(sub)
    _add_select(sub)
    _add_adapt(sub)
    _add_bench(sub)
    _add_finetune(sub)
    _add_run(sub)
    _add_report(sub)
    _add_data(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, RuntimeError) as e:
        print(f"layerviz {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
