"""Serving under load: the full and the compact recommender behind `layerviz serve`, open-loop, side by side.

Each configuration runs as its own `layerviz serve` process on 127.0.0.1:
  full      the fine-tuned model (dynamic batching, --max-batch)
  full-b1   the same with --max-batch 1 (what batching buys)
  compact   k = L/4 kept layers with their trained adapters (`layerviz adapt` output)
  folded    the same kept layers with fold adapters (closed form), exported as a plain HF checkpoint
Requests are real test users' histories and 1 + negatives candidates (the model's recorded protocol). Load is
open-loop (layerviz.serving.loadtest): Poisson arrivals at each offered rate, latency timed from the scheduled send, so
queueing counts. The sweep is interleaved: at each step every configuration still standing runs once, at the step's
multiple of its own unloaded rate, with the same arrival schedule (scaled). A point passes when p99 <= the objective (2 x the full model's unloaded p99) and at most
1% of requests fail or are shed; a configuration leaves the sweep after two failing points, and each one's
maximum rate is then refined by bisection. Also: every configuration at half the full model's maximum rate,
server memory (RSS) over the run and over a long run, the time bound of k = L/4 measured on this workload,
and one point cross-checked with Locust (its constant_throughput users). Prints a table; writes --json and
--figure (shown in notebooks/05_efficiency.ipynb).

    .venv/bin/python benchmarks/bench_serve.py --json docs/serve_bench.json --figure docs/serve_latency.png

Needs a finished demo (`make demo`: the fine-tuned SmolLM2 and its compact model), or --model/--compact.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
import torch

from layerviz import bench, plots, store
from layerviz.compression.adapters import train_adapters
from layerviz.compression.compact import build_compact, load_compact
from layerviz.compression.config import AdapterTrainConfig
from layerviz.data import CandidateConfig, candidates_for, load
from layerviz.data.prompts import build_probes
from layerviz.evaluate import requests_for
from layerviz.models import load_model
from layerviz.scoring import Request, ScoringConfig, score
from layerviz.serving.loadtest import closed_loop, failed, run_point, summarize
from layerviz.serving.serve import (
    RECORD,
    ServeConfig,
    recorded_settings,
    scoring_config,
    scoring_record,
)
from layerviz.settings import Settings

DEMO = Path("results/demo-study/smollm2-135m/ml-1m")


class Server:
    """One `layerviz serve` process on a free 127.0.0.1 port."""

    def __init__(self, name: str, flags: list[str], log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.name, self.url = name, f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "layerviz", "serve", *flags, "--port", str(self.port),
                                      "--log-level", "warning", "--dataset", "none"], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "LAYERVIZ_PROGRESS": "0"})

    def wait(self, timeout: float = 600) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited ({self.proc.returncode}); see {self.log.name}")
            try:
                return httpx.get(self.url + "/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(1)
        raise TimeoutError(f"{self.name} server not up after {timeout} s")

    def batches(self) -> tuple[float, float]:
        """(requests, scorer calls) so far, from the server's /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        got = dict(re.findall(r"^layerviz_batch_size_(sum|count) ([0-9.e+]+)$", text, flags=re.M))
        return float(got.get("sum", 0)), float(got.get("count", 0))

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> int:
        self.proc.send_signal(2)  # SIGINT: uvicorn drains, then exits 0
        rc = self.proc.wait(60)
        self.log.close()
        return rc


def payloads(prep, settings: Settings, users: int, seed: int) -> list[dict]:
    """Real test users' (history, candidates) under the model's recorded protocol, seeded."""
    cands, _ = candidates_for(prep, CandidateConfig(settings.negatives, "uniform", users, "test", seed),
                              settings.candidates_dir)
    return [{"history": r.history, "candidates": r.candidates} for r in requests_for(prep, cands, "test")]


def time_bounds(model, tok, k: int, bodies: list[dict], scoring: ScoringConfig, rounds: int = 5) -> dict:
    """Speedup bounds of keeping k layers: bench.time_bound (prefill, measured LM-head time) and the same idea on
    this workload: a 1-layer model's scoring time gives the fixed cost, the rest is split over equal layers."""
    n = model.config.num_hidden_layers
    one = build_compact(model, [n - 1])
    reqs = [Request(b["history"], b["candidates"]) for b in bodies[:8]]
    t = {"full": [], "one": []}
    for r in range(rounds + 1):
        for name, m in (("full", model), ("one", one)):
            t0 = time.perf_counter()
            score(m, tok, reqs, scoring)
            if r:
                t[name].append(time.perf_counter() - t0)
    full, first = float(np.median(t["full"])), float(np.median(t["one"]))
    layer = (full - first) / (n - 1)
    pre = bench.timings({"full": model}, tok, None, bench.BenchConfig(runs=rounds, seq_len=128))["full"]
    return {"k": k, "n_layers": n, "workload_ms": 1e3 * full, "fixed_ms": 1e3 * (first - layer),
            "workload_bound": full / (first - layer + k * layer),
            "prefill_time_bound": bench.time_bound(pre["prefill_ms"], pre["head_ms"], n, k)}


def folded_export(model, tok, layers: list[int], prep, settings: Settings, rec: dict, out: Path) -> Path:
    """The kept layers with fold adapters fitted in closed form, exported as a plain checkpoint."""
    compact = build_compact(model, layers, "fold")
    cal = build_probes(prep, tok, 24, "valid", "likelihood", settings.max_title_tokens, settings.seed)
    train_adapters(compact, model, cal, AdapterTrainConfig(init="lstsq", stage1_epochs=0, stage2_epochs=0),
                   pad=tok.pad_token_id, report=None)
    folder = compact.export_hf(out, tokenizer=tok, overwrite=True)
    store.write_json(folder / RECORD, {k: v for k, v in rec.items() if k != "source"})
    return folder


# ----------------------------------------------------------------------------- the sweep


def passes(s: dict, objective_ms: float) -> bool:
    return s["p99_ms"] <= objective_ms and not failed(s)


class Sweep:
    """Points measured so far, one row per (config, offered rate)."""

    def __init__(self, servers: dict[str, Server], bodies: list[dict], args):
        self.servers, self.bodies, self.args, self.rows = servers, bodies, args, []

    def point(self, name: str, rate: float, seed: int, seconds: float | None = None, phase: str = "sweep",
              cap: float | None = None) -> dict:
        # at least min_requests per point (a low rate runs longer, up to max_point_seconds), so that p99 rests on
        # more than a handful
        seconds = max(seconds or self.args.seconds, min(self.args.min_requests / rate, cap or self.args.max_point_seconds))
        n = min(self.args.max_requests, math.ceil(rate * seconds))
        srv = self.servers[name]
        before = srv.batches()
        rows = run_point(srv.url + "/rank", self.bodies, rate, n=n, max_seconds=None, seed=seed, timeout=30)
        after = srv.batches()
        mean_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
        s = {"config": name, "phase": phase, **summarize(rows, rate), "mean_batch": mean_batch, "rss_mb": srv.rss_mb()}
        self.rows.append(s)
        print(f"  {name:8s} {rate:7.2f}/s: p50 {s['p50_ms']:7.0f}  p99 {s['p99_ms']:7.0f} ms  achieved "
              f"{s['achieved_rate']:6.2f}/s  shed {s['shed']:3d}  errors {s['errors'] + s['timeouts']:3d}  "
              f"(n {s['requests']}, batch {s['mean_batch']:.2f}, RSS {s['rss_mb']:.0f} MB)", flush=True)
        return s

    def grid(self, rates: dict[str, list[float]], stop_ms: float) -> None:
        """Step i runs each configuration still standing at its i-th rate, in turn (the same arrival schedule,
        scaled); two points past ``stop_ms`` (a looser objective than the primary one, so that the curve goes on
        past the knee) end a configuration's sweep."""
        fails = dict.fromkeys(rates, 0)
        for i in range(max(len(r) for r in rates.values())):
            for name in [n for n in rates if fails[n] < 2 and i < len(rates[n])]:
                fails[name] += not passes(self.point(name, rates[name][i], self.args.seed + i), stop_ms)

    def refine(self, names: list[str], objective_ms: float, steps: int) -> None:
        """Bisect (geometrically) between each one's highest passing rate and the next failing one."""
        for step in range(steps):
            for name in names:
                lo, hi = self.bracket(name, objective_ms)
                if lo and hi:
                    self.point(name, math.sqrt(lo * hi), self.args.seed + 100 + step, phase="refine")

    def bracket(self, name: str, objective_ms: float) -> tuple[float | None, float | None]:
        pts = [r for r in self.rows if r["config"] == name and r["phase"] in ("sweep", "refine")]
        ok = [r["offered_rate"] for r in pts if passes(r, objective_ms)]
        lo = max(ok) if ok else None
        bad = [r["offered_rate"] for r in pts if not passes(r, objective_ms) and (lo is None or r["offered_rate"] > lo)]
        return lo, (min(bad) if bad else None)


def memory_run(srv: Server, bodies: list[dict], rate: float, seconds: float, seed: int) -> dict:
    """A long open-loop run at ``rate`` with the server's RSS sampled every 2 s: growth and slope."""
    samples, done = [], threading.Event()

    def sample():
        t0 = time.time()
        while not done.is_set():
            samples.append((time.time() - t0, srv.rss_mb()))
            done.wait(2)

    th = threading.Thread(target=sample)
    th.start()
    rows = run_point(srv.url + "/rank", bodies, rate, n=math.ceil(rate * seconds), max_seconds=None, seed=seed)
    done.set()
    th.join()
    t, mb = np.array(samples).T
    half = t >= t[-1] / 2
    return {"config": srv.name, "rate": rate, "seconds": seconds, **summarize(rows, rate), "rss_start_mb": mb[0],
            "rss_end_mb": mb[-1], "rss_max_mb": mb.max(), "slope_mb_per_min_second_half": 60 * np.polyfit(
                t[half], mb[half], 1)[0] if half.sum() > 2 else np.nan, "samples": len(mb)}


def locust_point(srv: Server, bodies: list[dict], rate: float, seconds: float, work: Path) -> dict:
    """The same point through Locust: constant_throughput users (each at most 0.5 requests/s) adding up to
    ``rate``; its own percentiles (from the actual send: closed-loop per user)."""
    if importlib.util.find_spec("locust") is None:  # not imported here: it monkey-patches the process (gevent)
        return {"skipped": "locust is not installed: `make bench-serve` (or pip install '.[bench]') installs it"}
    users = max(1, round(rate / 0.5))
    (work / "payloads.json").write_text(json.dumps(bodies))
    env = {**os.environ, "LAYERVIZ_PAYLOADS": str(work / "payloads.json"), "LAYERVIZ_USER_RATE": str(rate / users)}
    cmd = [sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile_serve.py")), "--headless",
           "-u", str(users), "-r", str(max(1.0, rate)), "--run-time", f"{int(seconds)}s", "--host", srv.url,
           "--csv", str(work / "locust"), "--only-summary", "--stop-timeout", "30"]
    subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    stats = pd.read_csv(work / "locust_stats.csv")
    row = stats[stats["Name"] == "/rank"].iloc[0]
    return {"offered_rate": rate, "users": users, "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]), "achieved_rate": float(row["Requests/s"]),
            "p50_ms": float(row["50%"]), "p95_ms": float(row["95%"]), "p99_ms": float(row["99%"])}


def unloaded(srv: Server, bodies: list[dict], n: int) -> dict:
    closed_loop(srv.url + "/rank", bodies, 3)  # warm-up
    lat = closed_loop(srv.url + "/rank", bodies, n)["latency"].to_numpy() * 1e3
    return {"n": n, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def open_top(points: pd.DataFrame, name: str, objective_ms: float) -> bool:
    """Whether ``name`` met the objective at every rate of its sweep (its knee lies above them)."""
    pts = points[(points["config"] == name) & points["phase"].isin(["sweep", "refine"])]
    return all(passes(r, objective_ms) for r in pts.to_dict("records"))


def goals(out: dict, bounds: dict) -> list[dict]:
    """The issue's three goals, each with its measured value and verdict (the folded model's ratio beside, and
    batching's gain at saturation)."""
    max_rate, points = out["max_rate"], pd.DataFrame(out["points"])
    p99 = points.query("phase == 'half'").set_index("config")["p99_ms"]
    sat = points.query("phase == 'saturation'").set_index("config")["achieved_rate"]
    out_rows = []
    # full met the objective at no rate tried: its max rate is below the lowest, the ratio above this bound; a
    # compact model that met it at every rate tried has a max rate above the highest: the ratio is a lower bound
    full, note = (max_rate["full"], "") if max_rate["full"] else (out["lowest_rate_tried"]["full"], " (lower bound)")
    for name in [n for n in ("compact", "folded") if n in max_rate]:
        ratio, top = max_rate[name] / full, open_top(points, name, out["objective_ms"])
        out_rows += [{"goal": f"{name} max rate >= 0.8 x {b} ({bounds[b]:.2f}) x full's"
                      f"{' (lower bound: met at every rate tried)' if top else note}", "value": ratio,
                      "target": 0.8 * bounds[b], "met": bool(ratio >= 0.8 * bounds[b])}
                     for b in ("prefill_time_bound", "workload_bound")]
    out_rows.append({"goal": "compact p99 < full p99 at half the full model's max rate", "value": p99["compact"],
                     "target": p99["full"], "met": bool(p99["compact"] < p99["full"])})
    both = [(k, v["full"] / v["full-b1"]) for k, v in out.get("max_rate_by_objective", {}).items()
            if v.get("full") and v.get("full-b1")]
    if both:  # the tightest objective at which both have a max rate
        out_rows.append({"goal": f"batching raises the full model's max rate (over max batch 1), {both[0][0]} "
                         "objective", "value": both[0][1], "target": 1.0, "met": bool(both[0][1] > 1)})
    out_rows.append({"goal": "batching raises the full model's saturation throughput (over max batch 1)",
                     "value": sat["full"] / sat["full-b1"], "target": 1.0, "met": bool(sat["full"] > sat["full-b1"])})
    return out_rows


def _paths(args) -> tuple[str, str]:
    model, compact = args.model or str(DEMO / "finetune/model"), args.compact or str(DEMO / "adapters/adapt/compact")
    for what, p in (("--model", model), ("--compact", compact)):
        if not Path(p).exists():
            raise SystemExit(f"{what} {p} does not exist: run `make demo` first (it fine-tunes SmolLM2 on ML-1M and "
                             "builds its compact model), or pass --model FINETUNED_DIR --compact COMPACT_DIR")
    return model, compact


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help=f"fine-tuned model folder (default {DEMO}/finetune/model)")
    ap.add_argument("--compact", default=None, help=f"compact model folder (default {DEMO}/adapters/adapt/compact)")
    ap.add_argument("--users", type=int, default=200, help="test users whose requests are sent (cycled)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20, help="length of each load point")
    ap.add_argument("--max-requests", type=int, default=400, help="requests per point at most")
    ap.add_argument("--min-requests", type=int, default=40, help="requests per point at least (runs longer)")
    ap.add_argument("--max-point-seconds", type=float, default=120, help="a low-rate point runs at most this long")
    ap.add_argument("--mults", default="0.1,0.15,0.22,0.33,0.5,0.75,1,1.4",
                    help="compact models' offered rates, in units of each one's unloaded rate (1 / its unloaded p50)")
    ap.add_argument("--mults-full", default="0.06,0.09,0.13,0.19,0.28,0.4,0.6,0.85",
                    help="the full model's (its own unit)")
    ap.add_argument("--mults-b1", default="0.28,0.4,0.6,0.85",
                    help="max batch 1's: where batching can matter (at lower rates batches hold ~1 request)")
    ap.add_argument("--stop-mult", type=float, default=4.0,
                    help="a sweep ends after two points with p99 over this x the objective (or > 1%% shed)")
    ap.add_argument("--saturation", type=float, default=1.5, help="the saturation point, in the full model's unit")
    ap.add_argument("--saturation-seconds", type=float, default=40)
    ap.add_argument("--objective-mult", type=float, default=2.0, help="p99 objective = this x full's unloaded p99")
    ap.add_argument("--refine", type=int, default=0, help="bisection steps for each maximum rate")
    ap.add_argument("--unloaded", type=int, default=30, help="requests, one at a time, for the unloaded latency")
    ap.add_argument("--long-seconds", type=float, default=60, help="the memory run's length")
    ap.add_argument("--locust-seconds", type=float, default=30)
    ap.add_argument("--no-folded", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--figure", default=None, help="PNG path (a PDF is written beside it)")
    ap.add_argument("--markdown", default=None, help="write the tables as markdown here (docs/serve_bench.md)")
    ap.add_argument("--render", default=None, help="a finished run's JSON: write --markdown/--figure from it only")
    return ap.parse_args()


def measure(servers: dict[str, Server], bodies: list[dict], args, work: Path) -> dict:
    """Unloaded latency, the interleaved sweep, refinement, the half-rate point, memory and the Locust point."""
    names = list(servers)
    base = {n: unloaded(s, bodies, args.unloaded) for n, s in servers.items()}
    objective = args.objective_mult * base["full"]["p99_ms"]
    unit = {n: 1e3 / b["p50_ms"] for n, b in base.items()}  # each one's unloaded rate: its sweep's unit
    print(f"unloaded: {base}\np99 objective {objective:.0f} ms; rate units {unit}", flush=True)
    sweep = Sweep(servers, bodies, args)
    mults = {"full": args.mults_full, "full-b1": args.mults_b1, "compact": args.mults, "folded": args.mults}
    sweep.grid({n: [unit[n] * float(m) for m in mults[n].split(",")] for n in names}, args.stop_mult * objective)
    sweep.refine(names, objective, args.refine)
    max_rate = {n: sweep.bracket(n, objective)[0] or 0.0 for n in names}
    by_objective = {f"{m:g}x": {n: sweep.bracket(n, m / args.objective_mult * objective)[0] or 0.0 for n in names}
                    for m in (2, 3, 5)}  # the same points judged at looser objectives (x full's unloaded p99)
    lowest = {n: min(r["offered_rate"] for r in sweep.rows if r["config"] == n) for n in names}
    for n in ("full", "full-b1"):  # what batching buys at saturation, whatever the latency
        sweep.point(n, args.saturation * unit["full"], args.seed + 500, seconds=args.saturation_seconds,
                    phase="saturation")
    # half the full model's max rate (half the lowest rate tried, if none met the objective)
    half = 0.5 * (max_rate["full"] or unit["full"] * float(args.mults.split(",")[0]))
    for n in [n for n in names if n != "full-b1"]:
        sweep.point(n, half, args.seed + 200, phase="half", cap=90)
    busy = 0.5 * (max_rate["compact"] or half)  # the compact model at half its own max rate: enough requests
    memory = memory_run(servers["compact"], bodies, busy, args.long_seconds, args.seed + 300)
    ours = sweep.point("compact", busy, args.seed + 400, seconds=args.locust_seconds, phase="locust-pair")
    loc = locust_point(servers["compact"], bodies, busy, args.locust_seconds, work)
    return {"unloaded": base, "objective_ms": objective, "rate_units": unit, "max_rate": max_rate,
            "max_rate_by_objective": by_objective, "lowest_rate_tried": lowest,
            "points": sweep.rows, "memory_long_run": memory, "locust": {"locust": loc, "layerviz": ours}}


def main() -> None:
    args = _args()
    if args.render:  # tables, goals and figure again from a finished run's JSON, nothing measured
        result = json.loads(Path(args.render).read_text())
        return report({**result, "goals": goals(result, result["bounds"])}, args)
    os.environ["LAYERVIZ_PROGRESS"] = "0"
    model, compact = _paths(args)
    torch.manual_seed(args.seed)
    rec = scoring_record(model, None)
    settings = recorded_settings(rec)
    prep = load(settings.dataset, config=settings.prep_config(), report=None)
    bodies = payloads(prep, settings, args.users, args.seed)
    full, tok = load_model(model, device="cpu")
    layers = load_compact(compact, base=full).kept_layers
    bounds = time_bounds(full, tok, len(layers), bodies, scoring_config(ServeConfig(), rec, prep.domain))
    print(f"time bounds of k = {bounds['k']} of {bounds['n_layers']}: {bounds}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    flags = {"full": ["--model", model], "full-b1": ["--model", model, "--max-batch", "1"],
             "compact": ["--model", model, "--compact", compact]}
    if not args.no_folded:
        flags["folded"] = ["--model", str(folded_export(full, tok, layers, prep, settings, rec, work / "folded"))]
    del full  # the servers load their own
    flags = {n: f + ([] if "--max-batch" in f else ["--max-batch", str(args.max_batch)]) for n, f in flags.items()}
    servers = {n: Server(n, f, work / f"{n}.log") for n, f in flags.items()}
    try:
        health = {n: s.wait() for n, s in servers.items()}
        out = measure(servers, bodies, args, work)
    finally:
        exits = {n: s.stop() for n, s in servers.items()}
    result = {"data": f"{rec.get('dataset')} (real), {len(bodies)} test users, 1 + {rec.get('negatives')} candidates",
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
              f"{torch.get_num_threads()}", "args": vars(args), "bounds": bounds, "health": health,
              "exit_codes_after_drain": exits, **out, "goals": goals(out, bounds)}
    report(result, args)
    shutil.rmtree(work, ignore_errors=True)


def render(result: dict) -> str:
    """docs/serve_bench.md: the run's tables, written from its JSON (no number typed by hand)."""
    pts = pd.DataFrame(result["points"])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    table = lambda df: df.round(3).to_markdown(index=False, floatfmt=".6g")  # noqa: E731
    b, mem, loc = result["bounds"], result["memory_long_run"], result["locust"]
    lines = [f"# Serving under open-loop load (generated by `benchmarks/bench_serve.py` from {result['json']})", "",
             f"Data: {result['data']}. Machine: {result['machine']}. p99 objective: {result['objective_ms']:.0f} ms "
             f"(2 x the full model's unloaded p99). Time bound of k = {b['k']} of {b['n_layers']}: "
             f"{b['prefill_time_bound']:.2f}x (prefill, measured LM-head time), {b['workload_bound']:.2f}x "
             f"(this workload: fixed cost {b['fixed_ms']:.0f} of {b['workload_ms']:.0f} ms per 8 requests).", "",
             "![p50 and p99 latency against the offered rate](serve_latency.png)", "",
             "## Goals", "", table(pd.DataFrame(result["goals"])), "",
             "## Maximum rate under the p99 objective (requests/s)", "",
             "The same points judged at looser objectives (x the full model's unloaded p99), and each one's lowest "
             "rate tried:", "", table(pd.DataFrame(result.get("max_rate_by_objective", {})).T.rename_axis(
                 "objective").reset_index()), "",
             f"Lowest rate tried: {({k: round(v, 3) for k, v in result.get('lowest_rate_tried', {}).items()})}.", "",
             table(pd.DataFrame([{"config": k, "max_rate": v, "unloaded_p50_ms": result["unloaded"][k]["p50_ms"],
                                  "unloaded_p99_ms": result["unloaded"][k]["p99_ms"],
                                  "peak_achieved_rate": pts.loc[pts["config"] == k, "achieved_rate"].max(),
                                  "knee": "above every rate tried" if open_top(pts, k, result["objective_ms"])
                                  else "bracketed"}
                                 for k, v in result["max_rate"].items()])), "",
             "`peak_achieved_rate`: the most successful requests per second any point reached (saturation "
             "throughput, whatever its latency).", "",
             "## Every point", "", "`mean_batch`: requests per scorer call during the point (from /metrics).", "",
             table(pts[[c for c in ("config", "phase", "offered_rate", "achieved_rate", "p50_ms", "p95_ms", "p99_ms",
                                    "shed", "errors", "timeouts", "requests", "mean_batch", "rss_mb") if c in pts]]), "",
             "## Cross-check with Locust (same server, same offered rate)", "",
             "Locust's `constant_throughput` users each send at most one request per 1/rate seconds and wait for "
             "its answer: their arrivals are spread evenly, not Poisson, and a slow answer delays the next send. "
             "Its percentiles are timed from the actual send. Where the two differ, the difference is the queueing "
             "that Poisson bursts cause and that a closed loop does not see.", "",
             table(pd.DataFrame([{"tool": "layerviz.serving.loadtest (open-loop)", **{k: loc["layerviz"][k] for k in (
                 "offered_rate", "requests", "achieved_rate", "p50_ms", "p95_ms", "p99_ms")}},
                 {"tool": "locust (constant_throughput users)", **{k: loc["locust"].get(k) for k in (
                     "offered_rate", "requests", "achieved_rate", "p50_ms", "p95_ms", "p99_ms")}}])), "",
             "## Server memory over a long run", "",
             f"{mem['config']} at {fmt(mem['rate'])} requests/s for {mem['seconds']:.0f} s ({mem['requests']} "
             f"requests, {mem['samples']} RSS samples): {mem['rss_start_mb']:.0f} MB at the start, "
             f"{mem['rss_end_mb']:.0f} MB at the end, {mem['rss_max_mb']:.0f} MB at most; slope over the second "
             f"half {fmt(mem['slope_mb_per_min_second_half'])} MB/min. Exit codes after draining (SIGINT): "
             f"{result['exit_codes_after_drain']}.", ""]
    return "\n".join(lines)


def report(result: dict, args) -> None:
    """Print the table and goals; write --json, --markdown and --figure."""
    points = pd.DataFrame(result["points"])
    cols = ["config", "phase", "offered_rate", "achieved_rate", "p50_ms", "p95_ms", "p99_ms", "shed", "errors",
            "timeouts", "requests", "rss_mb"]
    print(points[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"max rate under p99 <= {result['objective_ms']:.0f} ms: {result['max_rate']}")
    print(pd.DataFrame(result["goals"]).to_string(index=False))
    if args.json and not args.render:
        store.write_json(Path(args.json), result)
    if args.markdown:
        text = render({**result, "json": args.json or args.render})
        store.atomic_write(Path(args.markdown), lambda tmp: Path(tmp).write_text(text))
    if args.figure:
        sweep = points[points["phase"].isin(["sweep", "refine"])]
        fig = plots.serve_latency(sweep, result["objective_ms"], result["max_rate"],
                                  title=f"{result['data']}\n{int(sweep['requests'].min())}-"
                                  f"{int(sweep['requests'].max())} requests per point; {result['machine']}")
        fig.savefig(args.figure, dpi=150)
        fig.savefig(Path(args.figure).with_suffix(".pdf"))


if __name__ == "__main__":
    main()
