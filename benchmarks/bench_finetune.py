"""The `rank` objective with the shared history against the naive version, on the same batch.

Shared (what `layerviz finetune` runs): each example's history prompt is encoded once and its
KV cache expanded over the positive and the negatives; gradients flow through the shared prefix.
Naive: the history repeated in front of every candidate, one padded batch per example. Both
compute the loss from the title tokens' log-probs only, so the ratio isolates history sharing.
Each variant runs forward+backward on the same LoRA model and the same batch of examples (the naive
one as a single padded batch of every example's candidates), interleaved (ABAB...) after a warm-up;
the ratio is the median per-round speedup.

Run: .venv/bin/python benchmarks/bench_finetune.py [--model smollm2-135m --history-len 10 --negatives 7]
Goal (issue #13): >= 3x examples per second, identical loss values within float tolerance.
"""

import argparse
import json
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def _setup(args):
    from layerviz import data, load_model
    from layerviz.data.prompts import Prompt, PromptConfig
    from layerviz.finetune import prepare_trainable
    from layerviz.settings import FinetuneConfig
    from layerviz.training import Schedule, training_windows

    model, tok = load_model(args.model, device="cpu")
    prep = data.load(args.dataset, config=data.PrepConfig(history_len=args.history_len), report=None)
    cfg = FinetuneConfig(model=args.model, train_negatives=args.negatives, history_len=args.history_len,
                         batch_size=args.examples, max_title_tokens=args.max_title_tokens)
    inner, _, params = prepare_trainable(model, cfg)
    sched = Schedule(prep, training_windows(prep, args.history_len), cfg.seed, cfg.batch_size, cfg.train_negatives)
    text = Prompt(tok, PromptConfig(prep.domain, args.max_title_tokens))
    return cfg, inner, params, prep.titles(), sched, text


def _args(titles, examples):
    """(histories, positives, negatives) title lists of a batch of training examples."""
    return ([[titles[i] for i in e["history"]] for e in examples], [titles[e["target"]] for e in examples],
            [[titles[i] for i in e["negatives"]] for e in examples])


def _peak_mb(variant: str, args) -> float:
    """Peak RSS growth (MB) of one round of ``variant`` in this fresh process, over the RSS after set-up."""
    from layerviz.training import rank_loss, rank_loss_naive

    _, inner, _, titles, sched, text = _setup(args)
    fn = rank_loss if variant == "shared" else rank_loss_naive
    import gc

    import psutil

    gc.collect()
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def watch():  # ru_maxrss is useless here: loading the model peaks higher than one step
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=watch)
    t.start()
    fn(inner, text, *_args(titles, sched.examples(1))).backward()
    stop.set()
    t.join()
    return (peak[0] - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="synthetic-electronics")
    ap.add_argument("--examples", type=int, default=4, help="examples per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--negatives", type=int, default=7)
    ap.add_argument("--history-len", type=int, default=10)
    ap.add_argument("--max-title-tokens", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()

    import torch

    from layerviz.training import rank_loss, rank_loss_naive

    cfg, inner, params, titles, sched, text = _setup(args)

    def run(fn, examples) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        loss = fn(inner, text, *_args(titles, examples))
        loss.backward()
        for p in params:
            p.grad = None
        return time.perf_counter() - t0, [float(loss.detach())]

    def tokens(e) -> tuple[int, int]:
        prefix = len(text.likelihood_prefix([titles[i] for i in e["history"]]))
        cand = [len(text.title_ids(titles[i])) for i in [e["target"], *e["negatives"]]]
        return len(cand) * prefix + sum(cand), prefix + sum(c + 1 for c in cand)

    run(rank_loss, sched.examples(0)), run(rank_loss_naive, sched.examples(0))  # warm-up
    ratios, diffs, t_shared, t_naive, tok_naive, tok_shared, n = [], [], 0.0, 0.0, 0, 0, 0
    for r in range(args.rounds):
        ex = sched.examples(r + 1)
        ts, ls = run(rank_loss, ex)
        tn, ln = run(rank_loss_naive, ex)
        ratios.append(tn / ts)
        diffs += [abs(a - b) for a, b in zip(ls, ln, strict=True)]
        t_shared, t_naive, n = t_shared + ts, t_naive + tn, n + len(ex)
        for e in ex:
            a, b = tokens(e)
            tok_naive, tok_shared = tok_naive + a, tok_shared + b
    speedup = float(np.median(ratios))
    print(f"{args.model} on CPU ({torch.get_num_threads()} threads), LoRA r={cfg.lora_r} on "
          f"{', '.join(cfg.target_modules)}; {n} examples of history {args.history_len}, 1+{args.negatives} candidates")
    print(f"{'variant':<10}{'examples/s':>12}{'tokens/example':>16}")
    print(f"{'naive':<10}{n / t_naive:>12.2f}{tok_naive / n:>16.0f}")
    print(f"{'shared':<10}{n / t_shared:>12.2f}{tok_shared / n:>16.0f}")
    print(f"token bound {tok_naive / tok_shared:.2f}x; per-round speedups "
          f"{', '.join(f'{x:.2f}' for x in ratios)}; max |loss diff| {max(diffs):.1e}")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        peak = {v: pool.submit(_peak_mb, v, args).result() for v in ("shared", "naive")}
    print("peak memory of one batch's forward+backward (MB of RSS above the loaded model, each in a fresh process): "
          + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
    print(f"speedup {speedup:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"speedup": speedup, "max_loss_diff": max(diffs), "peak_mb": peak,
                       "bound": tok_naive / tok_shared, "examples_per_s": {"shared": n / t_shared,
                                                                            "naive": n / t_naive}}, f, indent=2)


if __name__ == "__main__":
    main()
