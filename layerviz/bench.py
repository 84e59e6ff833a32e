"""RQ4 efficiency: measured latency, throughput and peak memory of full and compact models, against a FLOP bound.

Every configuration (the full model; compact models at several k, with and without adapters)
is timed in one process, interleaved: each round runs every configuration once (A B C A B C ...),
so drift in clock speed, caches or other load hits them all alike, and each speedup is the median
of per-round ratios to the full model, with its IQR.

* ``prefill``: one forward over ``prefill_batch`` prompts of ``seq_len`` tokens (logits at
  every position). Its full/compact ratio is the measured speedup compared with the bound.
* ``latency``: one query = scoring one user's candidate list with the harness's scorer.
* ``qps``: queries per second over ``qps_queries`` queries scored in one call.
* ``peak memory``: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident set
  (VmHWM, reset after set-up) of a separate process per configuration, with the compact model
  standalone (its own copy of the kept weights) and the base freed, so numbers do not mix.

The bound (``flop_bound``) is the full model's FLOPs per token over the compact model's:
2 FLOPs per weight of every layer run and of the LM head, the attention-score terms (which
depend on the context length), the adapters, and 0 for the embedding lookup. It assumes that every
FLOP takes the same time; ``time_bound`` uses the measured LM-head time instead. A speedup above the
time bound (by more than half its IQR) is flagged ``above_bound``: a timing artefact, never a result.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerviz import arch, passes, store
from layerviz.compression.adapters import Adapter, place_adapters
from layerviz.compression.compact import build_compact
from layerviz.compression.config import AdapterPolicy
from layerviz.data import CandidateConfig, candidates_for, load
from layerviz.evaluate import requests_for
from layerviz.models import load_model, resolve_device
from layerviz.progress import progress
from layerviz.scoring import Request, ScoringConfig, score
from layerviz.settings import BenchConfig

# ----------------------------------------------------------------------------- the bound


def layer_costs(model) -> dict:
    """Parameter counts and attention shapes per layer, from the modules (works on the meta device)."""
    out = {"layer_params": [], "heads": [], "head_dim": [], "window": []}
    cfg = arch.text_config(model)
    types = arch.layer_types(model)
    heads, head_dim = arch.attention_shape(model)
    for layer, kind in zip(arch.layers(model), types, strict=True):
        out["layer_params"].append(sum(p.numel() for p in layer.parameters()))
        out["heads"].append(heads)
        out["head_dim"].append(head_dim)
        out["window"].append(int(getattr(cfg, "sliding_window", 0) or 0) if kind == "sliding_attention" else 0)
    out["head_params"] = arch.lm_head(model).weight.numel()
    out["embedding_params"] = arch.embedding(model).weight.numel()
    return out


def attention_flops(heads: int, head_dim: int, context: int, window: int = 0) -> float:
    """Per-token FLOPs of QK^T and AV, averaged over the positions of a causal prefill of ``context`` tokens."""
    t = np.arange(1, context + 1)
    keys = np.minimum(t, window) if window else t
    return float(4 * heads * head_dim * keys.mean())


def flops_per_token(costs: dict, layers: list[int], context: int, adapter_flops: float = 0.0) -> dict:
    """FLOPs per token of a forward through ``layers`` (+ head, adapters): parts and total."""
    w = 2.0 * sum(costs["layer_params"][i] for i in layers)
    a = sum(attention_flops(costs["heads"][i], costs["head_dim"][i], context, costs["window"][i]) for i in layers)
    parts = {"layers": w, "attention": a, "head": 2.0 * costs["head_params"], "embedding": 0.0,
             "adapters": float(adapter_flops)}
    parts["total"] = sum(parts.values())
    return parts


def time_bound(full_ms: float, head_ms: float, n_layers: int, k: int) -> float:
    """Speedup a model keeping k of n equal layers can reach if the dropped layers' share of the full
    model's *measured* time, all but its LM head, were saved exactly.

    The FLOP bound assumes every FLOP costs the same time; this one takes the LM head's time as measured
    (its matrix product can run at another FLOP rate than the layers' smaller ones) and assumes equal
    layers. Everything but the head counts as layer time, so the bound is, if anything, optimistic.
    """
    body = max(full_ms - head_ms, 0.0)
    return full_ms / max(full_ms - body * (n_layers - k) / n_layers, 1e-12)


def flop_bound(costs: dict, layers: list[int], context: int, adapter_flops: float = 0.0) -> float:
    """Speedup a compact model running ``layers`` can reach at most: full FLOPs / compact FLOPs."""
    n = len(costs["layer_params"])
    full = flops_per_token(costs, list(range(n)), context)["total"]
    return full / flops_per_token(costs, layers, context, adapter_flops)["total"]


def adapter_flops(layers: list[int], n_layers: int, hidden: int, rank: int | None) -> float:
    """FLOPs per token of the default policy's adapters for a selection (no model needed)."""
    return float(sum(Adapter(s.kind, hidden, s.rank, device="meta").flops_per_token()
                     for s in place_adapters(layers, n_layers, AdapterPolicy(rank=rank))))


def layers_for_k(k: int, n_layers: int, selection: list[int] | None = None) -> list[int]:
    """The selection's layers when it has k of them, else k evenly spaced layers (first and last kept)."""
    if selection is not None and len(selection) == k:
        return sorted(selection)
    if not 1 <= k <= n_layers:
        raise ValueError(f"k={k} is out of range for a model with {n_layers} layers (1..{n_layers})")
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, k)})


# ----------------------------------------------------------------------------- measuring one configuration


def with_k(cfg: BenchConfig, k: int) -> BenchConfig:
    """``cfg`` that also measures k (with adapters too, where any k is measured with them)."""
    adapter_k = None if cfg.adapter_k is None else sorted(set(cfg.adapter_k) | {k})
    return replace(cfg, ks=sorted(set(cfg.ks) | {k}), adapter_k=adapter_k)


def _reset_peak(device: torch.device) -> bool:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _read_peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_once(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, CUDA work included (synchronized before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _iqr(x) -> float:
    return float(np.subtract(*np.percentile(x, [75, 25])))


def _prefill_ids(model, cfg: BenchConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, arch.lm_head(model).out_features, (cfg.prefill_batch, cfg.seq_len), generator=gen)
    return ids.to(arch.input_device(model))


def timings(targets: dict, tokenizer, request, cfg: BenchConfig) -> dict[str, dict]:
    """Prefill and query times of every configuration, interleaved (A B C A B C ...) in one process.

    Each of ``warmup + runs`` rounds runs every configuration once, so drift (clock, cache, other
    load) hits them all alike; the speedups are the medians of per-round ratios to the first
    configuration (the full model), with their IQR. Each round also times the full model's LM head
    alone on the prefill's shape (``head_ms``, for ``time_bound``). Throughput: ``qps_queries``
    queries in one call.
    """
    names = list(targets)
    full = targets[names[0]]
    dev, ids = arch.input_device(full), _prefill_ids(full, cfg)
    sc = ScoringConfig(max_title_tokens=cfg.max_title_tokens)
    t = {n: {"prefill": [], "latency": []} for n in names}
    hidden = torch.randn(*ids.shape, arch.hidden_size(full), generator=torch.Generator().manual_seed(cfg.seed))
    hidden, head = hidden.to(dev, arch.embedding(full).weight.dtype), []
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
        for rnd in progress(range(cfg.warmup + cfg.runs), desc="bench rounds", unit="round"):
            h = time_once(lambda: arch.logits(full, hidden), dev)  # the LM head alone, as the prefill runs it
            if rnd >= cfg.warmup:
                head.append(h)
            for n in names:
                passes.count("prefill", len(ids))
                pre = time_once(lambda n=n: targets[n](input_ids=ids), dev)
                lat = time_once(lambda n=n: score(targets[n], tokenizer, [request], sc), dev) if request else np.nan
                if rnd >= cfg.warmup:
                    t[n]["prefill"].append(pre)
                    t[n]["latency"].append(lat)
    out = {}
    for n in names:
        pre, lat = np.array(t[n]["prefill"]), np.array(t[n]["latency"])
        ratio = np.array(t[names[0]]["prefill"]) / pre
        out[n] = {"prefill_ms": 1e3 * float(np.median(pre)), "prefill_iqr_ms": 1e3 * _iqr(pre),
                  "speedup": float(np.median(ratio)), "speedup_iqr": _iqr(ratio), "runs": len(pre),
                  "head_ms": 1e3 * float(np.median(head))}
        if request is not None:
            lat_ratio = np.array(t[names[0]]["latency"]) / lat
            q = time_once(lambda n=n: score(targets[n], tokenizer, [request] * cfg.qps_queries, sc), dev)
            out[n].update(latency_ms=1e3 * float(np.median(lat)), latency_iqr_ms=1e3 * _iqr(lat),
                          latency_speedup=float(np.median(lat_ratio)), qps=cfg.qps_queries / q)
    return out


def peak_memory(model, tokenizer, request, cfg: BenchConfig) -> float:
    """Peak memory (MiB) of one prefill and one query: CUDA allocator peak, or VmHWM of this process on CPU."""
    dev = arch.input_device(model)
    tracked = _reset_peak(dev)
    passes.count("prefill", cfg.prefill_batch)
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
        model(input_ids=_prefill_ids(model, cfg))
        if request is not None:
            score(model, tokenizer, [request], ScoringConfig(max_title_tokens=cfg.max_title_tokens))
    return _read_peak_mb(dev) if tracked else float("nan")


def _build(model, layers: list[int] | None, adapters: bool, rank: int | None, standalone: bool):
    if layers is None:
        return model
    policy = AdapterPolicy(rank=rank) if adapters else AdapterPolicy(force="identity")
    return build_compact(model, layers, policy, share=not standalone)


def _worker(spec: dict) -> dict:
    """One configuration's peak memory in this process: load, build standalone, free the base, measure."""

    cfg = BenchConfig(**spec["config"])
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    target = _build(model, spec["layers"], spec["adapters"], cfg.rank, standalone=True)
    if target is not model:
        del model
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed base weights back to the OS
    except OSError:
        pass
    req = Request(**spec["request"]) if spec.get("request") else None
    return {"peak_mb": peak_memory(target, tok, req, cfg)}


def _isolated(spec: dict, threads: int | None = None) -> dict:
    env = dict(os.environ, LAYERVIZ_PROGRESS="0", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    r = subprocess.run([sys.executable, "-m", "layerviz.bench", "--worker"], input=json.dumps(spec),
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"bench worker for {spec['name']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def configurations(n_layers: int, cfg: BenchConfig, selection: list[int] | None, costs: dict | None = None) -> list[dict]:
    """The full model, then every k < L (with a FLOP bound of at least ``cfg.min_bound``, given ``costs``; the
    selection's k always) without and (optionally) with adapters."""
    out = [{"name": "full", "k": n_layers, "layers": None, "adapters": False}]
    for k in sorted(set(cfg.ks)):
        if k >= n_layers:
            continue
        layers = layers_for_k(k, n_layers, selection)
        if costs is not None and (selection is None or k != len(selection)) and \
                flop_bound(costs, layers, cfg.seq_len) < cfg.min_bound:
            continue
        with_ad = cfg.adapters and (cfg.adapter_k is None or k in cfg.adapter_k)
        for ad in ([False, True] if with_ad else [False]):
            out.append({"name": f"k{k}{'+adapters' if ad else ''}", "k": k, "layers": layers, "adapters": ad})
    return out


def run_bench(cfg: BenchConfig, out: str | Path | None = None, model=None, tokenizer=None, report=print) -> pd.DataFrame:
    """Measure every configuration side by side -> one row each (times in ms, memory in MiB, ratios to full)."""
    dev = resolve_device(cfg.device)
    prep = load(cfg.dataset, "auto", cfg.prep_config(), report=None)
    cands, _ = candidates_for(prep, CandidateConfig(cfg.negatives, "uniform", 1, "test", cfg.seed),
                              Path(cfg.results_dir) / "candidates")
    request = requests_for(prep, cands, "test")[0]
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    n = arch.num_layers(model)
    selection = None
    if cfg.selection:
        path = Path(cfg.selection)
        selection = json.loads((path / "selection.json" if path.is_dir() else path).read_text())["layers"]
    costs = layer_costs(model)
    isolate = cfg.isolate and dev.type == "cpu"
    configs = configurations(n, cfg, selection, costs)
    targets = {c["name"]: _build(model, c["layers"], c["adapters"], cfg.rank, standalone=False) for c in configs}
    times = timings(targets, tokenizer, request, cfg)
    if isolate:  # each configuration in a process of its own, memory_jobs of them at once
        jobs = max(1, cfg.memory_jobs)
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ThreadPoolExecutor(jobs) as pool:
            peaks = list(progress(pool.map(lambda c: _isolated({**c, "config": asdict(cfg), "request": asdict(request)},
                                                               threads)["peak_mb"], configs),
                                  total=len(configs), desc="bench memory", unit="config"))
    else:
        peaks = [peak_memory(targets[c["name"]], tokenizer, request, cfg) for c in configs]
    rows = []
    for c, peak in zip(configs, peaks, strict=True):
        m = {**times[c["name"]], "peak_mb": peak}
        layers = c["layers"] if c["layers"] is not None else list(range(n))
        ad_flops = adapter_flops(layers, n, arch.hidden_size(model), cfg.rank) if c["adapters"] else 0.0
        rows.append({"model": cfg.model, "config": c["name"], "L": n, "k": c["k"], "adapters": c["adapters"],
                     "layers": layers, **m, "bound": flop_bound(costs, layers, cfg.seq_len, ad_flops),
                     "time_bound": time_bound(times["full"]["prefill_ms"], times["full"]["head_ms"], n, len(layers))})
        if report:
            report(f"  {c['name']:>14}: prefill {m['prefill_ms']:.1f} ms (speedup {m['speedup']:.2f}x, IQR "
                   f"{m['speedup_iqr']:.2f}), peak {m['peak_mb']:.0f} MiB"
                   + (f", query {m['latency_ms']:.0f} ms, {m['qps']:.2f} q/s" if "latency_ms" in m else ""))
    df = pd.DataFrame(rows)
    full = df.iloc[0]
    df["measured_over_bound"] = df["speedup"] / df["bound"]
    # a compact model cannot beat the time bound: above it, the timing is wrong, not the model fast
    df["above_bound"] = df["speedup"] - df["speedup_iqr"] / 2 > df["time_bound"]
    df["memory_ratio"] = df["peak_mb"] / full["peak_mb"]
    df["device"] = str(dev)
    df["isolated"] = isolate
    if out is not None:
        store.write_parquet(Path(out) / "bench.parquet", df)
        store.atomic_write(Path(out) / "bench.csv", lambda tmp: df.drop(columns=["layers"]).to_csv(tmp, index=False))
    return df


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker(json.loads(sys.stdin.read()))))
