"""Harness scorers against the naive baseline, side by side on the same candidates.

Naive: one prompt per candidate through plain ``model(input_ids).logits`` (full vocabulary
at every position, no KV cache). Harness: history prefix encoded once per user, its KV
cache shared by length-sorted candidate batches, only the needed LM-head rows.

Run: .venv/bin/python benchmarks/bench_scoring.py [--model smollm2-135m --users 4 --negatives 19]
Goal (issue #3): >= 5x the naive baseline on smollm2-135m on CPU, with identical ranks.
"""

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--negatives", type=int, default=19)
    ap.add_argument("--history-len", type=int, default=20)
    args = ap.parse_args()

    import torch

    from layerviz import data, load_model
    from layerviz.evaluate import requests_for
    from layerviz.scoring import ScoringConfig, score, score_naive

    model, tok = load_model(args.model, device="cpu")
    prep = data.load(args.dataset, config=data.PrepConfig(history_len=args.history_len), report=None)
    cands = data.build_candidates(prep, data.CandidateConfig(negatives=args.negatives, users=args.users))
    reqs = requests_for(prep, cands, "test")
    score(model, tok, reqs[:1], ScoringConfig(calibration="none"))  # warm-up
    print(f"{args.model} on CPU ({torch.get_num_threads()} threads), {len(reqs)} users x "
          f"{args.negatives + 1} candidates, history {args.history_len} titles")
    print(f"{'scorer':<22}{'naive s/user':>13}{'harness s/user':>15}{'speedup':>9}{'max |diff|':>12}{'same ranks':>11}")
    for scorer, cal in [("likelihood", "none"), ("likelihood", "pmi"), ("yesno", "none")]:
        cfg = ScoringConfig(scorer=scorer, calibration=cal, domain=prep.domain)
        t0 = time.perf_counter()
        naive = [score_naive(model, tok, r, cfg) for r in reqs]
        t_naive = (time.perf_counter() - t0) / len(reqs)
        if cal == "pmi":  # priors are cached per model: time them from scratch too
            from layerviz import scoring

            scoring._PRIOR_CACHE.pop(model, None)
        t0 = time.perf_counter()
        fast = score(model, tok, reqs, cfg)
        t_fast = (time.perf_counter() - t0) / len(reqs)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(naive, fast, strict=True))
        same = all((np.argsort(-a, kind="stable") == np.argsort(-b, kind="stable")).all()
                   for a, b in zip(naive, fast, strict=True))
        name = f"{scorer}" + (f" ({cal})" if scorer == "likelihood" else "")
        print(f"{name:<22}{t_naive:>13.2f}{t_fast:>15.2f}{t_naive / t_fast:>8.1f}x{diff:>12.1e}{str(same):>11}")


if __name__ == "__main__":
    main()
