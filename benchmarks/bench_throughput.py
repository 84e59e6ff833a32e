"""The CPU throughput that `layerviz run CONFIG --plan` assumes (`layerviz.study.cost.CPU_TFLOPS`), measured.

A forward of the bundled real models over 1024-token prompts (what packed scoring runs: rows of up to 1024
tokens), fp32, every core: FLOPs from `bench.flops_per_token` (layers, attention and the LM head on every
token) over the median wall time. Prints one line per model and, last, `tflops <x>` (the mean of the models).

    .venv/bin/python benchmarks/bench_throughput.py [--runs 5] [--tokens 1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from layerviz import arch
from layerviz.bench import flops_per_token, layer_costs
from layerviz.models import load_model


def measure(spec: str, tokens: int, runs: int) -> float:
    model, _ = load_model(spec, device="cpu")
    n = arch.num_layers(model)
    ids = torch.randint(0, arch.lm_head(model).out_features, (1, tokens), generator=torch.Generator().manual_seed(0))
    flops = tokens * flops_per_token(layer_costs(model), list(range(n)), tokens)["total"]
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    return flops / float(np.median(times)) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    got = {spec: measure(spec, args.tokens, args.runs) for spec in ("smollm2-135m", "gemma3-270m")}
    for spec, tf in got.items():
        print(f"{spec}: {tf * 1e3:.0f} GFLOP/s ({args.tokens}-token forward, {torch.get_num_threads()} threads)")
    mean = float(np.mean(list(got.values())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tflops": mean, **{f"{k}_tflops": v for k, v in got.items()}}, f)
    print(f"tflops {mean:.3f}")


if __name__ == "__main__":
    main()
