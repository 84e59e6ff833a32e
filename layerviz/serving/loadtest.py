"""An open-loop load generator: requests go out on a seeded Poisson schedule, whatever the server does.

A closed-loop test (send, wait for the answer, send) slows down with the server and so never sees the queue that
real users build ("coordinated omission"). Here every request is sent at its scheduled time, each on its own task,
and its latency is timed from that scheduled time: a request stuck behind others counts its whole wait.
``lag`` (actual send minus scheduled send) shows whether the generator itself kept up.

``run_point(url, payloads, rate, ...)`` -> one row per request; ``summarize(rows)`` -> p50/p95/p99 latency of the
successful requests, the achieved rate, errors, shed (503) and timeouts. Targets are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pandas as pd


def poisson_schedule(rate: float, n: int, seed: int = 0, max_seconds: float | None = None) -> np.ndarray:
    """Send times (s from the start) of up to ``n`` requests at ``rate`` per second, exponential gaps, seeded;
    cut at ``max_seconds``."""
    if rate <= 0 or n < 1:
        raise ValueError(f"rate ({rate}) must be positive and n ({n}) at least 1")
    t = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))
    return t[t <= max_seconds] if max_seconds is not None else t


async def _one(client: httpx.AsyncClient, url: str, payload: dict, scheduled: float, timeout: float) -> dict:
    sent = time.perf_counter()
    try:
        r = await client.post(url, json=payload, timeout=timeout)
        status = str(r.status_code)
    except httpx.TimeoutException:
        status = "timeout"
    except httpx.TransportError as err:
        status = f"error:{type(err).__name__}"
    done = time.perf_counter()
    return {"scheduled": scheduled, "lag": sent - scheduled, "latency": done - scheduled, "service": done - sent,
            "status": status}


async def _open_loop(url: str, payloads: list[dict], schedule: np.ndarray, timeout: float,
                     transport: httpx.AsyncBaseTransport | None) -> list[dict]:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(transport=transport, limits=limits) as client:
        start = time.perf_counter() + 0.05
        tasks = []
        for i, t in enumerate(schedule):
            wait = start + t - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(_one(client, url, payloads[i % len(payloads)], start + t, timeout)))
        rows = await asyncio.gather(*tasks)
    for r in rows:
        r["scheduled"] -= start
    return rows


def run_point(url: str, payloads: list[dict], rate: float, n: int = 200, max_seconds: float | None = 30.0, seed: int = 0,
              timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None) -> pd.DataFrame:
    """Send up to ``n`` requests (those scheduled within ``max_seconds``; None: all n) at ``rate`` per second, open-loop -> one row per
    request: scheduled (s), lag, latency (from the scheduled send), service (from the actual send), status.
    ``payloads`` are cycled; ``transport`` (e.g. ``httpx.ASGITransport(app)``) serves in process."""
    schedule = poisson_schedule(rate, n, seed, max_seconds)
    return pd.DataFrame(asyncio.run(_open_loop(url, payloads, schedule, timeout, transport)))


def summarize(rows: pd.DataFrame, rate: float) -> dict:
    """Latency percentiles (ms, successful requests), achieved rate (successes per second of the run), and
    the count of each failure: shed (503), errors (other statuses and transport errors), timeouts."""
    ok = rows[rows["status"] == "200"]
    lat = ok["latency"].to_numpy() * 1e3
    span = float((rows["scheduled"] + rows["latency"]).max()) if len(rows) else np.nan
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: np.nan)
    return {"offered_rate": rate, "requests": len(rows), "ok": len(ok), "achieved_rate": len(ok) / span if span else 0.0,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "mean_ms": float(lat.mean()) if len(lat) else np.nan,
            "shed": int((rows["status"] == "503").sum()), "timeouts": int((rows["status"] == "timeout").sum()),
            "errors": int((~rows["status"].isin(["200", "503", "timeout"])).sum()),
            "lag_p99_ms": float(np.percentile(rows["lag"], 99) * 1e3) if len(rows) else np.nan}


def failed(s):
    """More than 1% of the requests shed, failed or timed out (a summary dict, or a frame of them row-wise)."""
    return (s["shed"] + s["errors"] + s["timeouts"]) > 0.01 * s["requests"]


def closed_loop(url: str, payloads: list[dict], n: int, timeout: float = 30.0,
                transport: httpx.AsyncBaseTransport | None = None) -> pd.DataFrame:
    """One request at a time (each sent when the previous one is answered): the unloaded latency."""
    async def go() -> list[dict]:
        async with httpx.AsyncClient(transport=transport) as client:
            return [await _one(client, url, payloads[i % len(payloads)], time.perf_counter(), timeout)
                    for i in range(n)]
    return pd.DataFrame(asyncio.run(go()))
