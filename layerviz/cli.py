"""The ``layerviz`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from dataclasses import MISSING, asdict, fields
from importlib import import_module

import yaml

# Commands import what they need when they run (torch and transformers take seconds to load), so that
# `layerviz --help` and `layerviz CMD --help` answer at once. A config command's flags come from its config
# dataclass: only that command's module is imported, and only when that command is given.
CONFIG_COMMANDS = {
    "evaluate": ("layerviz.settings", "EvalConfig", "score a model's recommendations on fixed candidate lists"),
    "importance": ("layerviz.compression.config", "ImportanceConfig", "RQ1: per-layer importance, ablation and validity"),
    "select": ("layerviz.compression.config", "SelectConfig", "RQ2: choose layers with one strategy"),
    "adapt": ("layerviz.compression.config", "AdaptConfig", "RQ3: build a compact model from kept layers, train its "
              "adapters, measure retention"),
    "bench": ("layerviz.settings", "BenchConfig", "RQ4: latency, throughput, peak memory of full vs compact models, "
              "and the FLOP bound"),
    "finetune": ("layerviz.settings", "FinetuneConfig", "fine-tune the LLM recommender (LoRA or full) on the "
                 "training split"),
    "serve": ("layerviz.serving.config", "ServeConfig", "serve a full or compact recommender over HTTP (POST /rank, "
              "/health, /metrics, /docs) with dynamic batching"),
}
OTHER_COMMANDS = {
    "models": "list model presets: layers, width, parameters, offline?",
    "run": "run (or resume) a whole study from a YAML config, e.g. configs/demo.yaml",
    "report": "execute every notebook with papermill into reports/ and regenerate figures/",
    "data": "datasets: list, download, synthetic, stats",
}

def _cmd_models(args: argparse.Namespace) -> int:
    from layerviz.models import presets_table  # heavy: loaded when the command runs

    table = presets_table()
    print(table.to_string(index=False))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from layerviz.evaluate import run_evaluate  # heavy: loaded when the command runs

    run_evaluate(_config(args), out=args.out)
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from layerviz.data.download import download  # heavy: loaded when the command runs

    for path in download(args.name, args.dest):
        print(path)
    return 0


def _cmd_data_synthetic(args: argparse.Namespace) -> int:
    from layerviz.data.bundled import synthetic_dir  # heavy: loaded when the command runs
    from layerviz.data.synthetic import generate  # heavy: loaded when the command runs

    print(generate(args.out or synthetic_dir()))
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from layerviz.data import PrepConfig, load  # heavy: loaded when the command runs

    load(args.dataset, args.format, PrepConfig(args.positive_threshold, args.kcore, title_field=args.title_field,
                                               cold_items=args.cold_items))
    return 0


def _cmd_data_list(args: argparse.Namespace) -> int:
    from layerviz.data import PrepConfig, catalog  # heavy: loaded when the command runs

    with pd_options():
        print(catalog(PrepConfig()).to_string(index=False))
    print("\ncounts after the default protocol (rating >= 4, 5-core); real data's terms apply to every use")
    return 0


def _cmd_importance(args: argparse.Namespace) -> int:
    import shutil  # with the command's other imports

    import pandas as pd  # heavy: loaded when the command runs

    from layerviz.compression.importance import (  # heavy: loaded when the command runs
        layers_by_criterion,
        run_importance,
    )

    cfg = _config(args)
    res = run_importance(cfg, use_cache=not args.no_cache)
    table = layers_by_criterion(res.table, "normalized")
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
        how = ("fitted on the probe prompts; its loss-ablation validity is cross-fitted"
               if cfg.fusion_weights == "fit" else "fixed")
        print("\nfused = " + " + ".join(f"{w:g}*{c}" for c, w in res.fusion_weights.items()) + f" ({how})")
    print(f"\nwrote {res.folder}/importance.parquet, validity.parquet, per_sample.npz, fusion.json, manifest.json")
    if args.out:
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


def _cmd_select(args: argparse.Namespace) -> int:
    from layerviz import store  # heavy: loaded when the command runs
    from layerviz.compression.selection import run_select  # heavy: loaded when the command runs

    cfg = _config(args)
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


def _cmd_adapt(args: argparse.Namespace) -> int:
    from layerviz.compression.retention import run_adapt  # heavy: loaded when the command runs

    cfg = _config(args)
    res = run_adapt(cfg, out=args.out, use_cache=not args.no_cache)
    s = res["summary"]
    print(f"\ncompact {s['model']}: kept {s['k']} of {s['n_layers']} layers {s['layers']}; objective {s['objective']}, "
          f"healing {s['heal_mode']}; validation NDCG@10 {s['valid_ndcg@10']:.4f}")
    print(f"  adapters: {s['adapter_params']:,} parameters = {s['params_pct_of_base']:.3f}% of the base, "
          f"{s['params_pct_of_kept_layers']:.2f}% of the kept layers; {s['flops_pct']:.3f}% FLOPs per token")
    print(f"  full model NDCG@10 {s['full_ndcg@10']:.4f}, chance {s['chance_ndcg@10']:.4f}; "
          f"training {s['train_seconds']:.1f} s")
    if "control_ndcg@10" in s:
        print(f"  control (the full model trained for as long): NDCG@10 {s['control_ndcg@10']:.4f}")
    cols = ["stage", "ndcg@10", "retention", "retention_low", "retention_high", "retention_control", "top1",
            "kendall_tau", "val_mse"]
    print(res["retention"][[c for c in cols if c in res["retention"]]].to_string(index=False,
                                                                                float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {res['folder']}")
    if args.export:
        from layerviz.compression.compact import load_compact  # heavy: loaded when the command runs
        from layerviz.models import load_model  # (as above)

        base, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
        from layerviz.serving.serve import RECORD, record_for  # (as above)
        from layerviz.store import write_json  # (as above)

        compact = load_compact(res["folder"] / "compact", base=base)
        folder = compact.export_hf(args.export, tokenizer=tok)
        write_json(folder / RECORD, {**record_for(cfg), "calibration": s["calibration"]})  # how `serve` scores it
        print(f"exported {folder} (loads with AutoModelForCausalLM.from_pretrained, no layerviz needed; "
              f"`layerviz serve --model {folder}` serves it)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from layerviz.bench import run_bench  # heavy: loaded when the command runs

    df = run_bench(_config(args), out=args.out)
    cols = ["config", "k", "prefill_ms", "speedup", "speedup_iqr", "bound", "measured_over_bound", "above_bound",
            "latency_ms", "qps", "peak_mb", "memory_ratio"]
    print(df[[c for c in cols if c in df]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        print(f"wrote {args.out}/bench.csv, bench.parquet")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from layerviz.serving.serve import serve  # heavy: loaded when the command runs

    serve(_config(args))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from layerviz.finetune import finetune  # heavy: loaded when the command runs

    res = finetune(_config(args), out=args.out, overwrite=args.overwrite)
    s = res.summary
    print(f"\nvalidation NDCG@10 ({s['eval_users']} users, calibration none): before {s['valid_ndcg@10_before']:.4f}, "
          f"after {s['valid_ndcg@10_after']:.4f} (best step {s['best_step']} of {s['steps']}; {s['stopped']})")
    print(res.curves.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"next: layerviz evaluate --model {args.out} --dataset {args.dataset} ...")
    return 0


# ----------------------------------------------------------------------------- flags from the config dataclasses


def _mapping(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: give a mapping, e.g. '{{rank: 8, force: linear}}'")
    return value


def _kind(tp) -> str:
    """'list', 'dict' or 'other' for a field's type (its annotation's text)."""
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp)
    return "list" if text.startswith("list") else "dict" if text.startswith("dict") else "other"


def _config_command(sub, name: str, func, extra=()) -> None:
    """A subcommand whose flags are its config class's fields (``_add_fields``), the fields' docstrings as help.

    Lists take comma- or space-separated values (--ks 4,8 or --ks 4 8); mappings take YAML
    (--policy '{rank: 8}'); a boolean that defaults to true is turned off with --no-NAME.
    """
    from layerviz.settings import field_docs  # with the config class, only for the command given

    module, cls_name, help = CONFIG_COMMANDS[name]
    cls = getattr(import_module(module), cls_name)
    p = sub.add_parser(name, help=help, description=(cls.__doc__ or "").strip(), config_class=cls,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = field_docs(cls)
    for a in p._actions:
        if a.dest not in docs or not a.option_strings or a.option_strings[0].startswith("--no"):
            continue
        a.help = docs.get(a.dest, " ")
        if a.dest == "fusion_weights":
            a.type = _fusion_arg
    for flags, kwargs in extra:
        p.add_argument(*flags, **kwargs)
    p.set_defaults(func=func, config_class=cls)


def _config(args: argparse.Namespace):
    """The command's config dataclass from the parsed flags (lists split on commas and converted)."""
    cls = args.config_class
    values = {}
    for f in fields(cls):
        v = getattr(args, f.name)
        if _kind(f.type) == "list" and isinstance(v, list) and v and isinstance(v[0], str):
            item = int if "int" in str(f.type) else str
            try:
                v = [item(x) for tok in v for x in tok.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--{f.name.replace('_', '-')}: {' '.join(getattr(args, f.name))!r} must be "
                                 f"{item.__name__}s, comma- or space-separated (e.g. 0,3,7)") from None
        values[f.name] = v
    return cls(**values)


def _add_config_command(sub, name: str) -> None:
    out = (["--out"], {"default": None, "help": "also write the results to this folder"})
    no_cache = (["--no-cache"], {"action": "store_true", "help": "recompute even if cached"})
    finetune_out = [(["--out"], {"required": True, "help": "folder for the fine-tuned model (a plain HF folder)"}),
                    (["--overwrite"], {"action": "store_true", "help": "replace a non-empty --out"})]
    func, extra = {"evaluate": (_cmd_evaluate, [out]), "importance": (_cmd_importance, [out, no_cache]),
                   "select": (_cmd_select, [out]),
                   "adapt": (_cmd_adapt, [out, no_cache, (["--export"], {"default": None, "help": (
                       "also write the compact model as a plain HF checkpoint here (fold adapters folded into "
                       "down_proj; adapters on the residual stream refuse)")})]),
                   "bench": (_cmd_bench, [out]), "finetune": (_cmd_finetune, finetune_out),
                   "serve": (_cmd_serve, [])}[name]
    _config_command(sub, name, func, extra)


def _cmd_run(args: argparse.Namespace) -> int:
    from layerviz.study import StudyConfig, run_study  # heavy: loaded when the command runs

    cfg = StudyConfig.from_yaml(args.config)  # fails here, before any work, on a bad config
    if args.results_dir:
        cfg.results_dir = args.results_dir
    if args.plan:
        return _print_plan(cfg, args.tflops)
    if args.tflops is not None:
        raise ValueError("--tflops sets the throughput of --plan's estimate; add --plan")
    out = run_study(cfg)
    t = out.tables
    with pd_options():
        print("\nheadline:\n" + t["headline"].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print("\nhypotheses:\n" + t["hypotheses"][["model", "claim", "evidence", "value", "ci_low", "ci_high",
                                                   "verdict"]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nwrote {cfg.folder}/headline.csv, headline.tex, thirds.csv, cross_model.csv, cross_domain.csv, "
          "hypotheses.csv")
    return 0


def _print_plan(cfg, tflops: float | None) -> int:
    """``layerviz run CONFIG --plan``: the cost table, nothing run and no weights loaded."""
    if tflops is None and cfg.device != "cpu":
        raise ValueError(f"device {cfg.device!r}: give the throughput you expect with --tflops (e.g. 400 for bf16 on "
                         "an H100/H200); the default is measured for CPU only")
    import pandas as pd  # heavy: loaded when the command runs

    from layerviz.study import by_stage, plan  # heavy: loaded when the command runs

    df = plan(cfg, tflops)
    with pd.option_context("display.width", 250, "display.max_rows", 500):
        print(by_stage(df).to_string(index=False))
    print(f"\npasses: sequences through the model by kind (layerviz.passes); '<=': an upper bound (early stops, "
          f"reused subsets, pmi priors, the bench's k); minutes at {df.attrs['tflops']:g} TFLOP/s "
          f"({'--tflops' if tflops else 'measured for this CPU'}), model loading and memory processes not included")
    return 0


def pd_options():
    import pandas as pd  # heavy: loaded when the command runs

    return pd.option_context("display.max_colwidth", 60, "display.width", 200)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help=OTHER_COMMANDS["run"])
    p.add_argument("config")
    p.add_argument("--results-dir", dest="results_dir", default=None)
    p.add_argument("--plan", action="store_true",
                   help="print what each stage will cost (passes, tokens, FLOPs, time) without running or loading weights")
    p.add_argument("--tflops", type=float, default=None,
                   help="throughput of the --plan estimate in TFLOP/s (default: measured for CPU; required on a GPU)")
    p.set_defaults(func=_cmd_run)


def _cmd_report(args: argparse.Namespace) -> int:
    from layerviz.report import (  # heavy: loaded when the command runs
        NotebookFailed,
        ReportConfig,
        run_report,
        study_folder,
        write_results_doc,
    )

    cfg = ReportConfig(notebooks=args.notebooks, out=args.out, figures_dir=args.figures, results_dir=args.results_dir,
                       params=args.params, only=args.only or [], cell_timeout=args.cell_timeout,
                       **({} if args.jobs is None else {"jobs": args.jobs}))
    try:
        rows = run_report(cfg)
    except NotebookFailed as e:
        print(f"layerviz report: {e}", file=sys.stderr)
        return 1
    folder = study_folder(cfg)
    doc = write_results_doc(folder, args.results_doc) if folder is not None and args.results_doc else None
    if doc:
        print(f"{doc}: the findings of {folder}, generated from its tables")
    figs = sorted({f for r in rows for f in r["figures"]})
    print(f"\n{len(rows)} notebook(s) executed into {cfg.out}/ (index.json); {len(figs)} figure file(s) "
          f"written to {cfg.figures_dir}/")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help=OTHER_COMMANDS["report"])
    p.add_argument("--params", default=None, help="YAML overrides: PARAM: value, or NOTEBOOK: {PARAM: value}")
    p.add_argument("--only", nargs="*", default=None, help="run only notebooks whose name contains one of these")
    p.add_argument("--notebooks", default="notebooks")
    p.add_argument("--out", default="reports")
    p.add_argument("--figures", default="figures")
    p.add_argument("--results-dir", dest="results_dir", default="results")
    p.add_argument("--cell-timeout", dest="cell_timeout", type=int, default=None, help="seconds per cell")
    p.add_argument("--jobs", type=int, default=None, help="notebooks executed at once (default: ReportConfig.jobs)")
    p.add_argument("--results-doc", dest="results_doc", default="docs/results.md",
                   help="write the study's findings here, with the run's commit and date ('' to skip)")
    p.set_defaults(func=_cmd_report)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help=OTHER_COMMANDS["data"])
    dsub = p.add_subparsers(dest="data_command", required=True)
    li = dsub.add_parser("list", help="every named dataset: source, real or synthetic, counts, terms")
    li.set_defaults(func=_cmd_data_list)
    d = dsub.add_parser("download", help="fetch a real dataset (needs internet)")
    d.add_argument("name", help="ml-100k | ml-1m | amazon2023-electronics")
    d.add_argument("--dest", default="data/raw")
    d.set_defaults(func=_cmd_data_download)
    g = dsub.add_parser("synthetic", help="(re)generate the SYNTHETIC test datasets")
    g.add_argument("--out", default=None)
    g.set_defaults(func=_cmd_data_synthetic)
    s = dsub.add_parser("stats", help="read a dataset and print statistics after each protocol step")
    s.add_argument("dataset")
    s.add_argument("--format", default="auto")
    s.add_argument("--positive-threshold", dest="positive_threshold", type=float, default=4.0)
    s.add_argument("--kcore", type=int, default=5)
    s.add_argument("--title-field", dest="title_field", default=None, help="RecBole .item field with the titles")
    s.add_argument("--cold-items", dest="cold_items", type=float, default=0.0)
    s.set_defaults(func=_cmd_data_stats)


def _subparser(**kwargs) -> argparse.ArgumentParser:
    """The subcommands' parser class: a config command's (``config_class``) has one flag per dataclass field."""
    cls = kwargs.pop("config_class", None)
    parser = argparse.ArgumentParser(**kwargs)
    if cls is not None:
        _add_fields(parser, cls)
    return parser


def _bool(text: str) -> bool:
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: give true or false")


SCALARS = {"int": int, "float": float, "str": str, "bool": _bool}


def _add_fields(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of ``cls``, named --field_name and --field-name, as transformers' HfArgumentParser
    names them (without importing transformers: `--help` stays instant). A boolean takes an optional value and
    one that defaults to true also --no-NAME; lists take one or more values; mappings take YAML."""
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        names = [f"--{f.name}", *([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])]
        kind, text = _kind(f.type), str(f.type).replace(" | None", "")
        if text == "bool":
            parser.add_argument(*names, type=_bool, nargs="?", const=True, default=default, dest=f.name)
            if default is True:
                parser.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                                    dest=f.name)
        elif kind == "list":
            parser.add_argument(*names, nargs="+", type=str, default=default, dest=f.name)
        else:
            parser.add_argument(*names, type=_mapping if kind == "dict" else SCALARS.get(text, str), default=default,
                                dest=f.name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``command`` (default: every one) gets its full parser, the others only their help
    line, so that answering one command imports only what that command needs."""
    parser = argparse.ArgumentParser(
        prog="layerviz", description="Which transformer layers does an LLM recommender need?"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_subparser)
    builders = {"models": _add_models, "run": _add_run, "report": _add_report, "data": _add_data,
                **{name: lambda s, name=name: _add_config_command(s, name) for name in CONFIG_COMMANDS}}
    for name in ["models", *CONFIG_COMMANDS, "run", "report", "data"]:
        if command is None or command == name:
            builders[name](sub)
        else:
            sub.add_parser(name, help=CONFIG_COMMANDS[name][2] if name in CONFIG_COMMANDS else OTHER_COMMANDS[name])
    return parser


def _add_models(sub) -> None:
    sub.add_parser("models", help=OTHER_COMMANDS["models"]).set_defaults(func=_cmd_models)


def _one_writer(args: argparse.Namespace) -> None:  # under torchrun: parallel is loaded already
    from layerviz import parallel  # heavy (torch.distributed), as in main
    """Several processes: rank 0 prints and writes ``--out``; the others print nothing and write into a
    private folder. A benchmark is refused: it times one process, and others would disturb it."""
    if args.command == "bench":
        raise ValueError("`layerviz bench` times one process; launch it without torchrun / accelerate launch "
                         "(`layerviz run` benches on rank 0 alone)")
    if not parallel.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
        if getattr(args, "out", None):
            args.out = tempfile.mkdtemp(prefix=f"layerviz-rank{parallel.rank()}-")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    given = next((a for a in argv if not a.startswith("-")), None)  # the command (options come after it)
    args = build_parser(given if given in CONFIG_COMMANDS or given in OTHER_COMMANDS else "").parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from layerviz import parallel  # heavy (torch.distributed): after the arguments parsed

    try:
        if parallel.init():  # under torchrun / accelerate launch: join the process group (a no-op otherwise)
            _one_writer(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, RuntimeError) as e:
        print(f"layerviz {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
