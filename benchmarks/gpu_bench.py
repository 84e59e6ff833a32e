"""LLaMA-3-8B- and Qwen3-8B-shaped models (random bf16 weights, nothing downloaded) on one CUDA device.

For each model: the full model and compact models at k = 4, 8, 12, 16, without and with the
default rank-64 adapters, measured side by side in one run:
prefill time (batch x seq_len tokens, median and IQR over --runs), throughput in prompts per
second at the best of --qps-batches, and peak memory = the model's own weights + the peak
activation memory of the forward (torch.cuda.max_memory_allocated above the level before it;
compact models share the base's tensors, so their own weights are counted, not the base's).
The FLOP bound (layers + head + attention at seq_len + adapters; embedding 0) comes from
layerviz.bench; the table prints measured/bound.

Run (needs torch + transformers; layerviz from this checkout):
    python benchmarks/gpu_bench.py                 # 8B shapes on cuda, ~3-5 min on one H200
    python benchmarks/gpu_bench.py --shapes tiny --device cpu   # the same code path on CPU (tests)
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


def _build(preset: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from layerviz.models import PRESETS

    config = PRESETS[preset].config()
    config.dtype = dtype
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, runs: int, warmup: int, device) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return np.array(out)


def _own_bytes(model) -> int:
    """Bytes of the tensors a (compact) model runs: kept layers, adapters, embedding, norm, head."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def measure(model, vocab: int, args, device) -> dict:
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), device=device)
    with torch.no_grad():
        t = _time(lambda: model(input_ids=ids), args.runs, args.warmup, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(input_ids=ids)
            _sync(device)
            act = torch.cuda.max_memory_allocated(device) - base
        else:
            act = 0
        best = 0.0
        for b in args.qps_batches:
            x = torch.randint(0, vocab, (b, args.seq_len), device=device)
            tt = _time(lambda x=x: model(input_ids=x), 1, 1, device)[0]
            best = max(best, b / tt)
    return {"prefill_ms": 1e3 * float(np.median(t)), "prefill_iqr_ms": 1e3 * float(np.subtract(*np.percentile(t, [75, 25]))),
            "qps": best, "peak_mb": (_own_bytes(model) + act) / 2**20}


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--keep", default="4,8,12,16")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="prompts per prefill")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--qps-batches", default="1,8,32")
    ap.add_argument("--out", default=None, help="write the table as CSV here")
    args = ap.parse_args(argv)
    args.qps_batches = [int(x) for x in args.qps_batches.split(",")]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    from layerviz import arch
    from layerviz.adapters import AdapterPolicy
    from layerviz.bench import adapter_flops, flop_bound, layer_costs, layers_for_k
    from layerviz.compact import build_compact

    rows = []
    t_start = time.perf_counter()
    for preset in SHAPES[args.shapes]:
        t0 = time.perf_counter()
        model = _build(preset, device, dtype)
        n, d = arch.num_layers(model), arch.hidden_size(model)
        vocab = arch.lm_head(model).out_features
        costs = layer_costs(model)
        print(f"{preset}: built {n} layers on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
        configs = [("full", n, None, False)]
        for k in [int(x) for x in args.keep.split(",")]:
            if k < n:
                configs += [(f"k{k}", k, layers_for_k(k, n), False), (f"k{k}+adapters", k, layers_for_k(k, n), True)]
        for name, k, layers, ad in configs:
            target = model if layers is None else build_compact(
                model, layers, AdapterPolicy() if ad else AdapterPolicy(force="identity"))
            m = measure(target, vocab, args, device)
            flops = adapter_flops(layers, n, d, 64) if ad else 0.0
            rows.append({"model": preset, "config": name, "L": n, "k": k, **m,
                         "bound": flop_bound(costs, layers or list(range(n)), args.seq_len, flops)})
            del target
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    full = df.groupby("model")["prefill_ms"].transform("first")
    full_mem = df.groupby("model")["peak_mb"].transform("first")
    df["speedup"] = full / df["prefill_ms"]
    df["measured/bound"] = df["speedup"] / df["bound"]
    df["memory_ratio"] = df["peak_mb"] / full_mem
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}; batch {args.batch} x {args.seq_len} tokens; total {time.perf_counter() - t_start:.0f} s")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        df.to_csv(args.out, index=False)
    return df


if __name__ == "__main__":
    main()
