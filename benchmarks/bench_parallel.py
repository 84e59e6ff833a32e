"""The evaluation stage in 2 processes x 1 thread (torchrun, gloo) against 1 process x 1 thread, same users.

Each run is a fresh launch of this script's worker: it loads the model, warms up on two users, then
times one ``TaskEvaluator`` pass (each process scores its share of the users, the scores are gathered)
between barriers. The runs alternate (1, 2, 1, 2, ...) and the speedup is the median of per-round
ratios; the per-user ranks of every parallel run must equal the single process's.

Run: .venv/bin/python benchmarks/bench_parallel.py [--model smollm2-135m --users 40 --rounds 2]
Goal (issue #16): speedup >= 1.7x with identical per-user ranks, on this 2-core machine.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def worker(args) -> None:
    import torch

    from layerviz import data, load_model, parallel
    from layerviz.data import CandidateConfig, candidates_for
    from layerviz.evaluate import TaskEvaluator

    torch.set_num_threads(1)
    parallel.init("cpu")
    model, tok = load_model(args.model, device="cpu")
    prep = data.load(args.dataset, config=data.PrepConfig(history_len=args.history_len), report=None)
    cache = Path(args.out).parent / "candidates"
    cands, _ = candidates_for(prep, CandidateConfig(args.negatives, "uniform", args.users, "test", 0), cache)
    ev = TaskEvaluator(prep, cands, tok, split="test", max_title_tokens=args.max_title_tokens, calibration="none")
    warm = TaskEvaluator(prep, cands.head(2 * parallel.world_size()), tok, split="test",
                         max_title_tokens=args.max_title_tokens, calibration="none")
    warm.metrics(model)
    parallel.barrier()
    t0 = time.perf_counter()
    per_user = ev.metrics(model)
    parallel.barrier()
    seconds = time.perf_counter() - t0
    if parallel.is_main():  # MRR is 1 / the positive's (pessimistic) rank: equal MRR, equal ranks
        Path(args.out).write_text(json.dumps({"seconds": seconds, "ndcg": per_user["ndcg@10"].tolist(),
                                              "mrr": per_user["mrr"].tolist(), "world": parallel.world_size(),
                                              "users": len(per_user)}))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, args, out: Path) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--model", args.model, "--users",
          str(args.users), "--dataset", args.dataset, "--negatives", str(args.negatives), "--history-len",
          str(args.history_len), "--max-title-tokens", str(args.max_title_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS="1", LAYERVIZ_PROGRESS="0")
    cmd = [sys.executable, *me] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(_port()), *me]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="synthetic-electronics")
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--negatives", type=int, default=19)
    ap.add_argument("--history-len", type=int, default=5)
    ap.add_argument("--max-title-tokens", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write {speedup, same_ranks} here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    ratios, same, diff = [], True, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            one = launch(1, args, Path(tmp) / f"one{r}.json")
            many = launch(args.processes, args, Path(tmp) / f"many{r}.json")
            ratios.append(one["seconds"] / many["seconds"])
            a, b = np.array(one["ndcg"]), np.array(many["ndcg"])
            same &= np.array_equal(np.array(one["mrr"]), np.array(many["mrr"])) and np.allclose(a, b, rtol=0, atol=1e-12)
            diff = max(diff, float(np.abs(a - b).max()))
            print(f"round {r + 1}: 1 process {one['seconds']:.2f} s, {args.processes} processes "
                  f"{many['seconds']:.2f} s ({one['users']} users), ratio {ratios[-1]:.2f}", flush=True)
    speedup = float(np.median(ratios))
    print(f"{args.model}, {args.users} users x 1+{args.negatives}, history {args.history_len}: "
          f"{args.processes} processes x 1 thread vs 1 x 1; identical per-user ranks (MRR, NDCG@10): {same} "
          f"(max |NDCG diff| {diff:.1e})")
    print(f"speedup {speedup:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"speedup": speedup, "same_ranks": bool(same), "rounds": ratios}))


if __name__ == "__main__":
    main()
