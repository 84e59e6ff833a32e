"""A folded, exported compact model against the in-memory compact model: prefill time and candidate ranks.

The compact model keeps k layers of a real model joined by fold adapters (ReplaceMe's linear map on the MLP output
of the block before each gap), fitted in closed form on probe prompts; ``export_hf`` folds them into
``down_proj`` and writes a plain HF checkpoint, which ``AutoModelForCausalLM.from_pretrained`` loads here without
layerviz. Both score the same test users' candidates (ranks compared) and time the same prefills, interleaved
round by round in this one process (median and IQR over rounds). Prints a table and writes --json.

    .venv/bin/python benchmarks/bench_export.py [--model smollm2-135m] [--layers 0,1,2,11,23,27,29] [--users 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from layerviz import arch
from layerviz.compression.adapters import train_adapters
from layerviz.compression.compact import build_compact
from layerviz.compression.config import AdapterTrainConfig
from layerviz.data import CandidateConfig, PrepConfig, build_candidates, load
from layerviz.data.prompts import build_probes
from layerviz.evaluate import TaskEvaluator
from layerviz.models import load_model
from layerviz.scoring import pad_right


def _prefill_times(models: dict, ids, mask, rounds: int) -> dict[str, list[float]]:
    times = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first round warms up
            for name, m in models.items():
                t0 = time.perf_counter()
                arch.run_decoder(m, ids, mask)
                times[name].append(time.perf_counter() - t0)
    return {k: v[1:] for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--layers", default="0,1,2,11,23,27,29", help="kept layers (default: the demo's SmolLM2 selection)")
    ap.add_argument("--users", type=int, default=20, help="test users whose 1 + 19 candidates both models rank")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4, help="prompts per timed prefill")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok = load_model(args.model, device="cpu")
    prep = load(args.dataset, config=PrepConfig(history_len=5), report=None)
    layers = [int(i) for i in args.layers.split(",")]
    compact = build_compact(model, layers, "fold")
    cal = build_probes(prep, tok, 24, "valid", "likelihood", 12, 0)
    train_adapters(compact, model, cal, AdapterTrainConfig(init="lstsq", stage1_epochs=0, stage2_epochs=0),
                   pad=tok.pad_token_id, report=None)
    with tempfile.TemporaryDirectory() as tmp:
        compact.export_hf(tmp, tokenizer=tok)
        plain = AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
        cands = build_candidates(prep, CandidateConfig(19, "uniform", args.users, "test", 0))
        ev = TaskEvaluator(prep, cands, tok, split="test", max_title_tokens=12, calibration="none")
        s_mem, s_exp = ev.scores(compact), ev.scores(plain)
        ids, mask = pad_right([e.ids for e in cal.examples[:args.batch]], tok.pad_token_id, torch.device("cpu"))
        times = _prefill_times({"in-memory compact": compact, "exported (folded)": plain}, ids, mask, args.rounds)
        params = {"in-memory compact": sum(p.numel() for p in {id(p): p for p in compact.parameters()}.values()),
                  "exported (folded)": sum(p.numel() for p in plain.parameters())}
    same_ranks = bool((np.argsort(-s_mem, 1, kind="stable") == np.argsort(-s_exp, 1, kind="stable")).all())
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {"model": args.model, "layers": layers, "users": args.users, "rounds": args.rounds, "batch": args.batch,
           "identical_ranks": same_ranks, "max_abs_score_diff": float(np.abs(s_mem - s_exp).max()),
           "prefill_ms": {k: 1000 * v for k, v in med.items()},
           "prefill_iqr_ms": {k: 1000 * float(np.subtract(*np.percentile(v, [75, 25]))) for k, v in times.items()},
           "exported_over_in_memory_speed": med["in-memory compact"] / med["exported (folded)"], "params": params}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
