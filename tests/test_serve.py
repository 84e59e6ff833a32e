"""`layerviz serve`: the API contract, batching that does not change scores, 422s, 503s, drain, metrics, and the
open-loop load generator (against a slow fake server). httpx drives the app in process on tiny models."""

import asyncio
import json
import threading
import time
from dataclasses import asdict, fields

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI

from layerviz import cli, load_model
from layerviz.data import CandidateConfig, build_candidates, load
from layerviz.scoring import Request, ScoringConfig
from layerviz.serving.batching import Batcher, Overloaded
from layerviz.serving.loadtest import closed_loop, poisson_schedule, run_point, summarize
from layerviz.serving.serve import (
    RECORD,
    Recommender,
    ServeConfig,
    create_app,
    request_from_body,
    scoring_record,
)
from layerviz.settings import field_docs

HIST = ["Heat (1995)", "Casino (1995)", "Toy Story (1995)"]
CANDS = ["Jumanji (1995)", "Balto (1995)", "Sabrina (1995)", "Nixon (1995)", "GoldenEye (1995)"]


@pytest.fixture(scope="module")
def prep():
    return load("synthetic-movies", report=None)


def _rec(spec="tiny-llama3", prep=None, calibration="pmi"):
    model, tok = load_model(spec, device="cpu")
    cands = None if prep is None else build_candidates(prep, CandidateConfig(4, "uniform", None, "test", 0))
    return Recommender(model, tok, ScoringConfig("likelihood", "movies", 8, calibration=calibration), spec,
                       prep=prep, candidates=cands)


def _post_all(app: FastAPI, bodies: list[dict], path="/rank") -> list[httpx.Response]:
    """POST every body at once (concurrently) to the app in process."""
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
            return await asyncio.gather(*(c.post(path, json=b) for b in bodies))
    return asyncio.run(go())


def _get(app: FastAPI, path: str) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
            return await c.get(path)
    return asyncio.run(go())


def test_rank_contract_and_openapi():
    rec = _rec()
    app = create_app(rec, ServeConfig(max_wait_ms=0))
    (r,) = _post_all(app, [{"history": HIST, "candidates": CANDS}])
    assert r.status_code == 200
    body = r.json()
    alone = rec.score([Request(HIST, CANDS)])[0]
    np.testing.assert_allclose(body["scores"], alone, rtol=0, atol=1e-5)
    assert sorted(body["order"]) == list(range(len(CANDS)))
    assert np.all(np.diff(np.array(body["scores"])[body["order"]]) <= 0)  # best first
    assert body["ranking"] == [CANDS[i] for i in body["order"]] and body["model"] == "tiny-llama3"
    spec = _get(app, "/openapi.json").json()
    assert {"/rank", "/health", "/metrics"} <= set(spec["paths"]) and "post" in spec["paths"]["/rank"]
    schema = spec["components"]["schemas"]
    assert {"history", "candidates", "user", "dataset"} <= set(schema["RankRequest"]["properties"])
    assert {"scores", "order", "ranking"} <= set(schema["RankResponse"]["required"])
    assert "swagger" in _get(app, "/docs").text.lower()
    health = _get(app, "/health").json()
    assert health["status"] == "ok" and health["layers"] == 32 and health["calibration"] == "pmi"


@pytest.mark.parametrize("spec", ["tiny-llama3", "tiny-gemma3"])
def test_batched_scores_equal_scores_alone(spec):
    rec = _rec(spec)
    rng = np.random.default_rng(0)
    pool = HIST + CANDS + ["Clueless (1995)", "Othello (1995)", "Persuasion (1995)", "Babe (1995)"]
    reqs = [Request(list(rng.choice(pool, int(rng.integers(1, 6)), replace=False)),
                    list(rng.choice(pool, int(rng.integers(2, 8)), replace=False))) for _ in range(6)]
    app = create_app(rec, ServeConfig(max_batch=6, max_wait_ms=500))
    out = _post_all(app, [{"history": r.history, "candidates": r.candidates} for r in reqs])
    assert [o.status_code for o in out] == [200] * 6
    assert max(o.json()["batch_size"] for o in out) > 1  # they did share a call
    for o, r in zip(out, reqs, strict=True):
        np.testing.assert_allclose(o.json()["scores"], rec.score([r])[0], rtol=0, atol=1e-5)


BAD = [
    ({"candidates": CANDS}, "history"),
    ({"history": [], "candidates": CANDS}, "history"),
    ({"history": HIST}, "candidates"),
    ({"history": HIST, "candidates": []}, "candidates"),
    ({"history": HIST, "candidates": ["Heat", 3]}, "candidates"),
    ({"history": [None], "candidates": CANDS}, "history"),
    ({"history": HIST, "candidates": [""]}, "candidates"),
    ({"history": HIST, "candidates": [f"movie {i}" for i in range(7)]}, "candidates"),
    ({"history": HIST * 3, "candidates": CANDS}, "history"),
    ({"history": HIST, "candidates": ["x" * 41]}, "candidates"),
    ({"histroy": HIST, "candidates": CANDS}, "histroy"),
    ({"history": "Heat (1995)", "candidates": CANDS}, "history"),
    ({"user": "nobody", "dataset": "synthetic-movies"}, "user"),
    ({"user": "1", "dataset": "ml-1m"}, "dataset"),
    ({"user": "1", "dataset": "synthetic-movies", "history": HIST}, "history"),
]


def test_every_bad_input_gets_a_422_naming_the_field_and_serving_goes_on(prep):
    app = create_app(_rec(prep=prep), ServeConfig(max_candidates=6, max_history=8, max_title_chars=40))
    out = _post_all(app, [b for b, _ in BAD] + [{"history": HIST, "candidates": CANDS}])
    for (body, field), r in zip(BAD, out, strict=False):
        assert r.status_code == 422, (body, r.text)
        assert any(field in d["loc"] for d in r.json()["detail"]), (field, r.json())
    assert out[-1].status_code == 200
    metrics = _get(app, "/metrics").text
    assert f'layerviz_requests_total{{status="422"}} {float(len(BAD))}' in metrics
    assert 'layerviz_requests_total{status="200"} 1.0' in metrics
    assert "layerviz_batch_size_count" in metrics and "layerviz_queue_depth" in metrics
    assert "layerviz_request_seconds_bucket" in metrics


def test_a_stored_user_is_ranked_on_its_history_and_candidates(prep):
    rec = _rec(prep=prep)
    user = next(iter(rec.candidates))
    (r,) = _post_all(create_app(rec), [{"user": user, "dataset": "synthetic-movies"}])
    want = Request(rec.histories[user], rec.candidates[user])
    assert r.status_code == 200 and len(want.candidates) == 5
    np.testing.assert_allclose(r.json()["scores"], rec.score([want])[0], rtol=0, atol=1e-5)
    body = type("B", (), {"user": int(user), "history": None, "candidates": ["a", "b"], "dataset": "synthetic-movies"})
    assert request_from_body(rec, body).candidates == ["a", "b"] and request_from_body(rec, body).history == want.history


class Slow:
    """A fake recommender whose score takes ``seconds`` per call (scores: the candidates' lengths)."""

    name, scoring, record, dataset, histories = "slow", ScoringConfig(), {}, None, {}

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, []

    def score(self, requests):
        self.calls.append(len(requests))
        time.sleep(self.seconds)
        return [np.array([float(len(c)) for c in r.candidates]) for r in requests]

    def info(self):
        return {"model": self.name}


def test_overload_gets_503_with_retry_after_and_the_next_request_is_served():
    app = create_app(Slow(0.2), ServeConfig(max_batch=1, queue_size=2, max_wait_ms=0))
    out = _post_all(app, [{"history": HIST, "candidates": CANDS}] * 8)
    codes = [r.status_code for r in out]
    assert codes.count(503) >= 4 and codes.count(200) >= 2, codes
    shed = next(r for r in out if r.status_code == 503)
    assert int(shed.headers["Retry-After"]) >= 1 and "queue is full" in shed.json()["detail"]
    (again,) = _post_all(app, [{"history": HIST, "candidates": ["a", "bbb"]}])
    assert again.status_code == 200 and again.json()["ranking"] == ["bbb", "a"]


def test_a_failing_request_fails_alone():
    def fn(items):
        if "boom" in items:
            raise RuntimeError("boom")
        return [i.upper() for i in items]

    async def go():
        b = Batcher(fn, max_batch=4, max_wait_ms=50)
        out = await asyncio.gather(*(b.submit(x) for x in ["a", "boom", "c"]), return_exceptions=True)
        await b.drain()
        return out

    a, boom, c = asyncio.run(go())
    assert (a, c) == ("A", "C") and isinstance(boom, RuntimeError)
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(fn, max_batch=0)
    assert Overloaded(3).retry_after == 3


def test_shutdown_drains_requests_in_flight():
    import uvicorn  # the real server: its shutdown is what drains

    slow = Slow(0.6)
    server = uvicorn.Server(uvicorn.Config(create_app(slow, ServeConfig()), host="127.0.0.1", port=0,
                                           log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    result = {}
    client = threading.Thread(target=lambda: result.update(r=httpx.post(
        f"http://127.0.0.1:{port}/rank", json={"history": HIST, "candidates": ["a", "bb"]}, timeout=10)))
    client.start()
    while not slow.calls:  # the request is being scored
        time.sleep(0.01)
    server.should_exit = True  # what SIGTERM / Ctrl-C do
    client.join(10)
    thread.join(10)
    assert result["r"].status_code == 200 and result["r"].json()["ranking"] == ["bb", "a"]
    assert not thread.is_alive()


def test_what_the_model_records_decides_its_scoring(tmp_path):
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "layerviz_finetune.json").write_text(json.dumps({"config": {"objective": "rank", "dataset": "ml-1m",
                                                                       "max_title_tokens": 12}}))
    rec = scoring_record(str(ft), None)
    assert (rec["scorer"], rec["calibration"], rec["max_title_tokens"]) == ("likelihood", "none", 12)
    run = tmp_path / "adapt"
    (run / "compact").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"config": {"calibration": "auto", "dataset": "ml-100k"}}))
    (run / "summary.json").write_text(json.dumps({"calibration": "pmi"}))
    assert scoring_record(None, str(run / "compact"))["calibration"] == "pmi"
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / RECORD).write_text(json.dumps({"scorer": "yesno", "calibration": "none"}))
    assert scoring_record(str(tmp_path / "export"), None)["scorer"] == "yesno"
    assert scoring_record("smollm2-135m", None) == {}


def test_the_serve_command_parses_into_its_config():
    assert field_docs(ServeConfig).keys() >= {f.name for f in fields(ServeConfig)}
    args = cli.build_parser().parse_args(["serve"])
    assert asdict(cli._config(args)) == asdict(ServeConfig())
    args = cli.build_parser().parse_args(["serve", "--model", "m", "--max-batch", "4", "--port", "9001"])
    assert (cli._config(args).max_batch, cli._config(args).port) == (4, 9001)


# ----------------------------------------------------------------------------- the load generator


def test_the_poisson_schedule_is_seeded_with_the_offered_rate():
    s = poisson_schedule(50.0, 4000, seed=1)
    assert np.all(np.diff(s) > 0) and abs(4000 / s[-1] - 50) < 3
    assert np.array_equal(s, poisson_schedule(50.0, 4000, seed=1))
    assert poisson_schedule(50.0, 4000, seed=1, max_seconds=2.0).max() <= 2.0


def _serial_app(seconds: float) -> FastAPI:
    """A fake server that answers one request at a time, each taking ``seconds``."""
    app, lock = FastAPI(), asyncio.Lock()

    @app.post("/rank")
    async def rank() -> dict:
        async with lock:
            await asyncio.sleep(seconds)
        return {"ok": True}

    return app


def test_the_load_is_open_loop_and_latency_counts_the_queue():
    """20 requests at 100/s on a server that takes 50 ms each, one at a time: they go out on schedule, and the
    last ones wait ~0.8 s. A closed-loop client would have measured ~50 ms for every request."""
    t = httpx.ASGITransport(_serial_app(0.05))
    rows = run_point("http://test/rank", [{}], rate=100.0, n=20, seed=0, transport=t)
    assert len(rows) == 20 and (rows["status"] == "200").all()
    assert rows["lag"].max() < 0.03  # sent when scheduled, not when the previous answer came
    span = rows["scheduled"].max()
    assert rows["latency"].max() > 20 * 0.05 - span - 0.05  # the queue is in the latency
    s = summarize(rows, 100.0)
    assert s["p99_ms"] > 500 and s["p50_ms"] > 150 and s["ok"] == 20 and s["shed"] == s["errors"] == 0
    closed = closed_loop("http://test/rank", [{}], 5, transport=t)
    assert closed["latency"].max() < 0.2  # what coordinated omission would report


def test_summarize_counts_each_outcome():
    rows = pd.DataFrame({"scheduled": [0.0, 0.1, 0.2, 0.3], "lag": [0.0] * 4, "latency": [0.1, 0.2, 0.3, 0.4],
                         "service": [0.1] * 4, "status": ["200", "503", "timeout", "500"]})
    s = summarize(rows, 10.0)
    assert (s["ok"], s["shed"], s["timeouts"], s["errors"]) == (1, 1, 1, 1) and s["p50_ms"] == pytest.approx(100)
    assert s["achieved_rate"] == pytest.approx(1 / 0.7)


@pytest.mark.slow
def test_the_readme_serve_command_starts_and_curl_gets_a_ranking(tmp_path):
    """README's `layerviz serve` line (real SmolLM2, real ML-1M) and its curl line, as written, on another port."""
    import re
    import shlex
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "layerviz serve" in b)
    serve_line, curl_line = (line for line in block.replace("\\\n", " ").splitlines() if line.strip())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    argv = shlex.split(serve_line.split(" #")[0])
    argv = [str(Path(sys.executable).with_name("layerviz")), *argv[1:]]
    argv[argv.index("--port") + 1] = port
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(1)
        assert proc.poll() is None, proc.stdout.read()
        assert health["dataset"] == "ml-1m" and health["calibration_choice"]["users"] == 40
        curl = shlex.split(curl_line.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
        if shutil.which("curl"):
            body = json.loads(subprocess.run(curl, capture_output=True, text=True, timeout=120).stdout)
        else:  # the same request through httpx
            body = httpx.post("http://" + curl[2], json=json.loads(curl[curl.index("-d") + 1]), timeout=120).json()
        sent = json.loads(curl[curl.index("-d") + 1])
        assert sorted(body["ranking"]) == sorted(sent["candidates"]) and len(body["scores"]) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0  # drained and exited cleanly
