"""Choose the demo's fine-tuning settings on VALIDATION users of real ML-1M (never on test users).

Each candidate setting is one whole `layerviz.finetune` run (its own warm-up and decay schedule), scored by
validation NDCG@10 on the same fixed validation users (1 + 19 candidates); the zero-shot model's validation
NDCG@10 is the 'before' column. Writes docs/finetune_validation.csv (one row per model and setting) and
prints it; configs/demo.yaml takes the best row per model within the demo's budget (``in_budget``).

    .venv/bin/python benchmarks/tune_finetune.py [--models smollm2-135m gemma3-270m] [--users 60] [--grid ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from layerviz.finetune import finetune
from layerviz.settings import FinetuneConfig
from layerviz.store import atomic_write

GRID = [  # (lr, max_steps, batch_size)
    (3e-3, 20, 4), (1e-3, 60, 4), (3e-3, 60, 4), (1e-3, 100, 4),
]
BUDGET_EXAMPLES = 240
"""The demo's budget: at most 60 steps of 4 examples per model (about 3 CPU minutes for SmolLM2 here), so that
`make demo` stays within 30 minutes; a larger setting is measured to show what more training would give."""


def _grid(text: str | None) -> list[tuple[float, int, int]]:
    if not text:
        return GRID
    return [(float(lr), int(steps), int(batch)) for lr, steps, batch in (g.split(":") for g in text.split(","))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--users", type=int, default=60, help="validation users (1 + 19 candidates each)")
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--cold-items", type=float, default=0.0, help="the protocol's cold_items (the demo: 0.1)")
    ap.add_argument("--out", default="docs/finetune_validation.csv")
    ap.add_argument("--grid", default=None, help="lr:steps:batch,... instead of GRID, e.g. 1e-3:60:4,3e-4:60:4")
    ap.add_argument("--append", action="store_true", help="add the rows to an existing --out table")
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for lr, steps, batch in _grid(args.grid):
            cfg = FinetuneConfig(model=model, dataset=args.dataset, history_len=5, max_title_tokens=12,
                                 negatives=19, cold_items=args.cold_items, objective="rank", lr=lr, max_steps=steps, batch_size=batch,
                                 eval_every=steps, eval_users=args.users, results_dir=tempfile.mkdtemp())
            t0 = time.perf_counter()
            res = finetune(cfg, report=None)
            s, last = res.summary, res.curves["valid_ndcg@10"].dropna().iloc[-1]
            rows.append({"model": model, "dataset": args.dataset, "cold_items": args.cold_items, "lr": lr, "max_steps": steps, "batch_size": batch,
                         "examples": steps * batch, "valid_users": args.users,
                         "valid_ndcg@10_zero_shot": s["valid_ndcg@10_before"],
                         "valid_ndcg@10_fine_tuned": float(last), "seconds": time.perf_counter() - t0})
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    table = pd.DataFrame(rows)
    if args.append and Path(args.out).exists():
        table = pd.concat([pd.read_csv(args.out).drop(columns=["in_budget", "chosen"], errors="ignore"), table], ignore_index=True)
    table["in_budget"] = table["examples"] <= BUDGET_EXAMPLES
    budget = table[table["in_budget"]]
    table["chosen"] = table.index.isin(budget.groupby("model")["valid_ndcg@10_fine_tuned"].idxmax())
    atomic_write(Path(args.out), lambda tmp: table.to_csv(tmp, index=False))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
