"""One script for the day a GPU is lent: LLaMA-3-8B- and Qwen3-8B-shaped models on one CUDA device.

The models are built from their configs with random bf16 weights and their true depths (32 and 36
layers; nothing is downloaded). The tokenizer is the bundled SmolLM2 one (its ids fit both vocabularies),
the data the bundled synthetic electronics set. For each model it measures, side by side in one process:

* ``prefill``: the full model against the compact model at k = L/4 (evenly spaced layers; without and
  with the default rank-64 adapters), interleaved A B C A B C ... after a warm-up; the median per-round
  speedup next to the FLOP bound (``layerviz.bench.flop_bound``). Goal: >= 3.5x for LLaMA-3-8B's shape
  at k = 8 without adapters.
* ``importance``: one ``importance.hook_pass`` (every criterion) against a plain forward+backward of the
  same loss over the same probe prompts (time and peak memory; goals <= 1.5x and <= 1.2x).
* ``scoring``: users per second of ``scoring.score`` at 1+99 candidates.
* ``adapter step``: one training step of the compact model's adapters (MSE to the full model's final
  states, backward, AdamW).
* ``lora step``: one LoRA fine-tuning step with the ``rank`` objective (peft, r = 16).

Peak memory is ``torch.cuda.max_memory_allocated`` during each measurement (NaN on CPU). The table
prints each goal next to its measured value; the whole script should take under 8 minutes on one H200.

Run (layerviz installed from this checkout):
    python benchmarks/gpu_check.py                              # 8B shapes on cuda
    python benchmarks/gpu_check.py --shapes tiny --device cpu   # the same code path on CPU (tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

SHAPES = {"8b": ["llama3-8b", "qwen3-8b"], "tiny": ["tiny-llama3", "tiny-qwen3"]}
PREFILL_GOAL = {"llama3-8b": 3.5}
"""Prefill speedup goals at k = L/4 (issue #16: LLaMA-3-8B's shape at k = 8)."""
IMPORTANCE_TIME_GOAL, IMPORTANCE_MEMORY_GOAL, TOTAL_GOAL_S = 1.5, 1.2, 480.0


def build(preset: str, device: torch.device, dtype: torch.dtype):
    """The preset's architecture at its true depth, random weights, built on ``device``."""
    from transformers import AutoModelForCausalLM

    from layerviz.models import PRESETS

    config = PRESETS[preset].config()
    config.dtype = dtype
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class Peak:
    """Context: peak CUDA memory (MiB) allocated inside the block (NaN on CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20


def timed(fn, device: torch.device) -> float:
    from layerviz.bench import time_once

    return time_once(fn, device)


def compact_layers(n: int) -> list[int]:
    """k = L/4 evenly spaced layers (first and last kept), as the bench picks them without a selection."""
    from layerviz.bench import layers_for_k

    return layers_for_k(max(1, round(n / 4)), n)


def row(model: str, check: str, measured: float, unit: str, goal: str = "", met=None, peak_mb=float("nan"),
        detail: str = "") -> dict:
    return {"model": model, "check": check, "measured": measured, "unit": unit, "goal": goal,
            "met": "" if met is None else ("yes" if met else "NO"), "peak_mb": peak_mb, "detail": detail}


def check_prefill(name, model, tok, prep, args, device) -> list[dict]:
    """Full vs compact (k = L/4, evenly spaced layers; without and with rank-64 adapters) prefill,
    interleaved A B C A B C ...; median per-round speedups next to their FLOP bounds."""
    from layerviz import arch
    from layerviz.bench import adapter_flops, flop_bound, layer_costs
    from layerviz.compression.compact import build_compact
    from layerviz.compression.config import AdapterPolicy

    n, d = arch.num_layers(model), arch.hidden_size(model)
    layers = compact_layers(n)
    k = len(layers)
    targets = {"full": model, "plain": build_compact(model, layers, AdapterPolicy(force="identity")),
               "adapters": build_compact(model, layers, AdapterPolicy(rank=64))}
    ids = torch.randint(0, arch.lm_head(model).out_features, (args.batch, args.seq_len), device=device)
    times = {t: [] for t in targets}
    with torch.no_grad():
        for r in range(args.warmup + args.runs):
            for t, m in targets.items():
                s = timed(lambda m=m: m(input_ids=ids), device)
                if r >= args.warmup:
                    times[t].append(s)
    costs, goal, rows = layer_costs(model), PREFILL_GOAL.get(name), []
    for t in ("plain", "adapters"):
        ratio = np.array(times["full"]) / np.array(times[t])
        speedup, iqr = float(np.median(ratio)), float(np.subtract(*np.percentile(ratio, [75, 25])))
        bound = flop_bound(costs, layers, args.seq_len, adapter_flops(layers, n, d, 64) if t == "adapters" else 0.0)
        g = goal if t == "plain" else None
        rows.append(row(name, f"prefill speedup, k={k} of {n}" + (" + adapters" if t == "adapters" else ""), speedup,
                        "x", f">= {g}x" if g else "", None if g is None else speedup >= g,
                        detail=f"FLOP bound {bound:.2f}x (measured/bound {speedup / bound:.2f}), IQR {iqr:.3f}, "
                               f"full {1e3 * np.median(times['full']):.1f} ms for {args.batch}x{args.seq_len} tokens"))
    return rows


def check_importance(name, model, tok, prep, args, device) -> list[dict]:
    """One hook pass (every criterion) against a plain forward+backward of the same loss and prompts."""
    from layerviz import arch
    from layerviz.compression import importance as imp
    from layerviz.data.prompts import build_probes

    cal = build_probes(prep, tok, n=args.samples, seed=0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def plain():
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        arch.layers(model).requires_grad_(True)
        try:
            for i in range(len(cal.examples)):
                exs, ids, mask, _ = imp.probe_batch(cal, [i], pad, device)
                imp.per_sample_loss(model, cal, exs, ids, mask).mean().backward()
            model.zero_grad(set_to_none=True)
        finally:
            for p, f in flags:
                p.requires_grad_(f)

    hook = lambda: imp.hook_pass(model, cal)  # noqa: E731
    hook(), plain()  # warm-up: kernels, allocator
    with Peak(device) as mp:
        t_plain = timed(plain, device)
    with Peak(device) as mh:
        t_hook = timed(hook, device)
    ratio, mem = t_hook / t_plain, mh.mb / mp.mb
    return [row(name, f"importance pass time vs plain fwd+bwd ({args.samples} prompts)", ratio, "x",
                f"<= {IMPORTANCE_TIME_GOAL}x", ratio <= IMPORTANCE_TIME_GOAL, mh.mb,
                f"{t_hook:.2f} s vs {t_plain:.2f} s"),
            row(name, "importance pass peak memory vs plain", mem, "x", f"<= {IMPORTANCE_MEMORY_GOAL}x",
                None if np.isnan(mem) else mem <= IMPORTANCE_MEMORY_GOAL, mh.mb,
                f"{mh.mb:.0f} MiB vs {mp.mb:.0f} MiB")]


def check_scoring(name, model, tok, prep, args, device) -> list[dict]:
    """Users per second of the harness's likelihood scorer at 1+99 candidates."""
    from layerviz.data import CandidateConfig, candidates_for
    from layerviz.evaluate import requests_for
    from layerviz.scoring import ScoringConfig, score

    cands, _ = candidates_for(prep, CandidateConfig(99, "uniform", args.users, "test", 0), args.cache)
    reqs = requests_for(prep, cands, "test")
    cfg = ScoringConfig(domain=prep.domain, max_title_tokens=args.max_title_tokens)
    score(model, tok, reqs[:1], cfg)  # warm-up
    with Peak(device) as m:
        t = timed(lambda: score(model, tok, reqs, cfg), device)
    return [row(name, f"scoring, 1+99 candidates, history {args.history_len}", len(reqs) / t, "users/s", peak_mb=m.mb,
               detail=f"{len(reqs)} users in {t:.2f} s")]


def check_adapter_step(name, model, tok, prep, args, device) -> list[dict]:
    """One AdamW step of the compact model's adapters on the MSE to the full model's final states."""
    from layerviz import arch
    from layerviz.compression.adapters import final_mse, teacher_states
    from layerviz.compression.compact import build_compact
    from layerviz.compression.config import AdapterPolicy
    from layerviz.data.prompts import build_probes

    n = arch.num_layers(model)
    layers = compact_layers(n)
    compact = build_compact(model, layers, AdapterPolicy(rank=64))
    params = [p for a in compact.adapters() for p in a.parameters()]
    for p in compact.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    cal = build_probes(prep, tok, n=args.samples, seed=0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.no_grad():
        target = teacher_states(model, cal.examples, [n], pad)[n]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = final_mse(compact, cal.examples, target, pad, args.samples, True, grad=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (optimizer state)
    with Peak(device) as m:
        t = timed(step, device)
    return [row(name, f"adapter training step ({len(params)} tensors, {args.samples} prompts)", t, "s", peak_mb=m.mb,
               detail=f"k={len(layers)}, rank 64, {sum(p.numel() for p in params) / 1e6:.1f} M adapter parameters")]


def check_lora_step(name, model, tok, prep, args, device) -> list[dict]:
    """One LoRA (r = 16) fine-tuning step of the rank objective (shared history, 1+7 candidates)."""
    from layerviz.data.prompts import Prompt, PromptConfig
    from layerviz.finetune import prepare_trainable
    from layerviz.settings import FinetuneConfig
    from layerviz.training import Schedule, batch_loss, training_windows

    cfg = FinetuneConfig(model=name, objective="rank", batch_size=args.lora_batch, train_negatives=7,
                         history_len=args.history_len, max_title_tokens=args.max_title_tokens)
    inner, _, params = prepare_trainable(model, cfg)
    sched = Schedule(prep, training_windows(prep, args.history_len), cfg.seed, cfg.batch_size, cfg.train_negatives)
    text = Prompt(tok, PromptConfig(prep.domain, args.max_title_tokens))
    titles = prep.titles()
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int):
        inner.train()
        with autocast:
            loss = batch_loss(inner, text, titles, sched.examples(i), "rank")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up
    with Peak(device) as m:
        t = timed(lambda: step(1), device)
    return [row(name, f"LoRA fine-tuning step (rank, {args.lora_batch} examples x 1+7)", t, "s", peak_mb=m.mb,
               detail=f"LoRA r={cfg.lora_r} on {', '.join(cfg.target_modules)}")]


CHECKS = (check_prefill, check_importance, check_scoring, check_adapter_step, check_lora_step)
"""Run in this order for each model (the LoRA step last: it copies the model)."""


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=10, help="timed prefill rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="prompts per prefill")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=8, help="probe prompts (importance, adapters)")
    ap.add_argument("--users", type=int, default=16, help="users scored at 1+99")
    ap.add_argument("--lora-batch", type=int, default=4)
    ap.add_argument("--history-len", type=int, default=20)
    ap.add_argument("--max-title-tokens", type=int, default=32)
    ap.add_argument("--cache", default="results/candidates", help="where the candidate lists are kept")
    ap.add_argument("--out", default=None, help="also write the table as CSV here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device; use --shapes tiny --device cpu to "
                         "exercise the code path on CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    from layerviz import data
    from layerviz.models import bundled_tokenizer

    tok = bundled_tokenizer()
    prep = data.load("synthetic-electronics", config=data.PrepConfig(history_len=args.history_len), report=None)
    rows, t_start = [], time.perf_counter()
    for preset in SHAPES[args.shapes]:
        t0 = time.perf_counter()
        model = build(preset, device, dtype)
        print(f"{preset}: built on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
        for check in CHECKS:
            got = check(preset, model, tok, prep, args, device)
            rows += got
            for r in got:
                print(f"  {r['check']}: {r['measured']:.3g} {r['unit']} {r['goal']} {r['met']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    total = time.perf_counter() - t_start
    rows.append(row("all", "whole script", total, "s", f"<= {TOTAL_GOAL_S:.0f} s", total <= TOTAL_GOAL_S))
    df = pd.DataFrame(rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}; torch {torch.__version__}; dtype {str(dtype).removeprefix('torch.')}")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        df.to_csv(args.out, index=False)
    return df


if __name__ == "__main__":
    main()
