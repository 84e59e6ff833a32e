"""Every selection strategy at the same k on the same model, data and evaluator, side by side.

Prints, per strategy: evaluations, wall time, the evaluator's score of the final selection,
and its validation NDCG@10. Then the cost of evaluating a k-layer subset relative to the
full model, with the fixed embedding/head/scoring cost (the intercept of a linear fit of
time against k) reported separately.

Run: .venv/bin/python benchmarks/bench_selection.py [--model smollm2-135m --k 8 --users 8]
Goal (issue #5): subset cost within 1.2x of k/L once fixed costs are set aside.
"""

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--task-users", type=int, default=32)
    ap.add_argument("--evaluator", default="hidden_mse", choices=["hidden_mse", "fidelity", "task"])
    ap.add_argument("--history-len", type=int, default=10)
    ap.add_argument("--importance-samples", type=int, default=32)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()

    from pathlib import Path

    from layerviz import arch, load_model
    from layerviz.compression import selection as sel
    from layerviz.compression.config import ImportanceConfig
    from layerviz.compression.importance import run_importance
    from layerviz.data import CandidateConfig, PrepConfig, candidates_for, load
    from layerviz.data.prompts import build_probes
    from layerviz.evaluate import FidelityEvaluator, TaskEvaluator

    model, tok = load_model(args.model, device="cpu")
    L = arch.num_layers(model)
    prep = load("synthetic-electronics", config=PrepConfig(history_len=args.history_len), report=None)
    cdir = Path(args.results_dir) / "candidates"
    cands, _ = candidates_for(prep, CandidateConfig(19, "uniform", args.users, "valid", 0), cdir)
    tcands, _ = candidates_for(prep, CandidateConfig(19, "uniform", args.task_users, "valid", 0), cdir)
    task = TaskEvaluator(prep, tcands, tok, split="valid")
    if args.evaluator == "task":
        ev = TaskEvaluator(prep, cands, tok, split="valid")
    else:
        ev = FidelityEvaluator(model, prep, cands, tok, "kl" if args.evaluator == "fidelity" else "hidden_mse")
    imp = run_importance(ImportanceConfig(model=args.model, samples=args.importance_samples, ablation=False,
                                          history_len=args.history_len, results_dir=args.results_dir),
                         model, tok, report=None).table
    cal = build_probes(prep, tok, 16)
    full_task = float(np.mean(task(model)))
    print(f"{args.model}: L={L}, k={args.k}, evaluator={args.evaluator} ({args.users} users), "
          f"task NDCG@10 on {args.task_users} validation users (1+19); full model {full_task:.4f}")
    print(f"{'strategy':<26}{'evals':>6}{'wall s':>9}{'score':>11}{'NDCG@10':>9}  layers")
    runs = [("importance_greedy(fused)", "importance_greedy", {"criterion": "fused"}),
            ("importance_greedy(BI)", "importance_greedy", {"criterion": "block_influence"}),
            ("top_k(BI, ShortGPT)", "top_k", {"criterion": "block_influence"}),
            ("forward_greedy", "forward_greedy", {}), ("backward_greedy", "backward_greedy", {}),
            ("contiguous_block", "contiguous_block", {}), ("first_k", "first_k", {}),
            ("last_k", "last_k", {}), ("uniform", "uniform", {})]
    runs += [(f"random(seed={s})", "random", {"seed": s}) for s in range(3)]
    for name, strategy, kw in runs:
        t0 = time.perf_counter()
        s = sel.select(strategy, model, ev, k=args.k, importance=imp, calibration=cal, **kw)
        wall = time.perf_counter() - t0
        with arch.keep_layers(model, s.layers):
            nd = float(np.mean(task(model)))
        print(f"{name:<26}{len(s.trace):>6}{wall:>9.1f}{s.score:>11.4g}{nd:>9.4f}  {s.layers}")

    print("\ncost of one task evaluation of a k-layer subset (median of 3):")
    times = {}
    for k in sorted({1, args.k, L // 2, L}):
        layers = list(range(k))
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            with arch.keep_layers(model, layers):
                task(model)
            ts.append(time.perf_counter() - t0)
        times[k] = float(np.median(ts))
    ks = np.array(sorted(times))
    slope, fixed = np.polyfit(ks, [times[k] for k in ks], 1)
    for k in ks:
        frac = (times[k] - fixed) / (times[L] - fixed)
        print(f"  k={k:>2}: {times[k]:6.2f} s = {times[k] / times[L]:.3f} of full; layer part "
              f"{frac:.3f} vs k/L {k / L:.3f} -> {frac / (k / L):.2f}x")
    print(f"  fixed cost (embedding, head, scoring overhead; fit intercept): {fixed:.2f} s "
          f"= {fixed / times[L]:.1%} of a full evaluation")


if __name__ == "__main__":
    main()
