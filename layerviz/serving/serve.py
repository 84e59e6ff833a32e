"""``layerviz serve``: a full or compact recommender behind HTTP (FastAPI on uvicorn).

* ``POST /rank`` takes ``{history: [titles], candidates: [titles]}`` (or ``{user, dataset}``: that test user's
  stored history and seeded candidate list) and returns the candidates' scores and their order, best first.
  The scorer, calibration and title length are those recorded with the model (its fine-tuning manifest, or the
  adapter run that made the compact model); flags override them, and ``GET /health`` says which were used.
* Requests that arrive close together are scored in one packed call (``batching.Batcher``: ``max_batch``,
  ``max_wait_ms``); a score does not depend on what it was batched with (tested).
* Bad input gets a 422 that names the field; a full queue (``queue_size``) gets a 503 with ``Retry-After``;
  shutdown (Ctrl-C, SIGTERM) stops accepting and finishes the requests in flight (``drain_seconds``).
* ``GET /metrics``: Prometheus text (requests by status, latency histogram, batch sizes, queue depth).
  ``GET /docs`` and ``/openapi.json``: the API, as FastAPI generates it.
"""

# no `from __future__ import annotations`: FastAPI and pydantic read the request model, built per server with its
# limits, from the annotations at runtime
import json
import os
import signal
from contextlib import asynccontextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints

from layerviz import arch
from layerviz.compression.compact import load_compact
from layerviz.data import CandidateConfig, candidates_for, load
from layerviz.data.prompts import prompt_text
from layerviz.evaluate import calibration_config, calibration_to_use
from layerviz.models import FINETUNE_MANIFEST, load_model
from layerviz.scoring import SCORERS, ScoringConfig, score
from layerviz.scoring import Request as ScoreRequest
from layerviz.serving.batching import Batcher, Overloaded
from layerviz.serving.config import ServeConfig
from layerviz.settings import CALIBRATIONS, SHARED, Settings

RECORD = "layerviz_record.json"
"""What an exported compact checkpoint records about how it scores (written by `layerviz adapt --export`)."""


# ----------------------------------------------------------------------------- what the model records


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def scoring_record(model: str | None, compact: str | None) -> dict:
    """The settings recorded with a model: the adapter run's config (compact), the fine-tuning config, or an
    exported checkpoint's record; ``scorer``/``calibration`` added where the record implies them; {} if none."""
    if compact is not None:
        run = _json(Path(compact).parent / "manifest.json")
        if run is not None and "config" in run:  # the adapter run: its config, and the calibration it resolved
            summary = _json(Path(compact).parent / "summary.json") or {}
            return {"scorer": "likelihood", **run["config"], "calibration": summary.get("calibration"),
                    "source": str(Path(compact).parent / "manifest.json")}
        model = model or compact_base(compact)
    if model is None or not Path(model).is_dir():
        return {}
    if (rec := _json(Path(model) / RECORD)) is not None:
        return {**rec, "source": str(Path(model) / RECORD)}
    if (ft := _json(Path(model) / FINETUNE_MANIFEST)) is not None:
        c = ft.get("config", {})
        # the fine-tuning validated with calibration none (its task loss ranks raw scores)
        return {**c, "scorer": "yesno" if c.get("objective") == "yesno" else "likelihood", "calibration": "none",
                "source": str(Path(model) / FINETUNE_MANIFEST)}
    return {}


def compact_base(compact: str) -> str | None:
    """The base model a compact folder records (its source), or None."""
    return ((_json(Path(compact) / "compact.json") or {}).get("base") or {}).get("source")


def record_for(config) -> dict:
    """The record ``scoring_record`` reads back, from a run's config (an AdaptConfig or any Settings)."""
    keys = set(SHARED) | {"scorer", "calibration"}
    return {"scorer": getattr(config, "scorer", "likelihood"),
            **{f.name: getattr(config, f.name) for f in fields(config) if f.name in keys}}


def recorded_settings(rec: dict) -> Settings:
    """The shared settings (protocol, candidates, seed) of a record; defaults where it has none."""
    return Settings(**{k: v for k, v in rec.items() if k in SHARED})


# ----------------------------------------------------------------------------- the recommender


class Recommender:
    """A model, its tokenizer and scoring, and the stored test users of one dataset."""

    def __init__(self, model, tokenizer, scoring: ScoringConfig, name: str, record: dict | None = None,
                 prep=None, candidates=None):
        self.model, self.tokenizer, self.scoring, self.name = model, tokenizer, scoring, name
        self.record = record or {}
        self.dataset = None if prep is None else prep.name
        self.histories, self.candidates = {}, {}
        if prep is not None:
            titles = prep.titles()
            self.histories = {str(u): [titles[i] for i in h] for u, h in prep.histories("test").items()}
            if candidates is not None:
                self.candidates = {str(u): [titles[i] for i in c]
                                   for u, c in zip(candidates["user_id"], candidates["candidates"], strict=True)}

    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        """One packed scorer call for all ``requests`` -> one score array per request."""
        return score(self.model, self.tokenizer, requests, self.scoring, desc="serving")

    def info(self) -> dict:
        layers = arch.num_layers(self.model)
        base = getattr(self.model, "n_base_layers", layers)
        return {"model": self.name, "layers": layers, "base_layers": base, "scorer": self.scoring.scorer,
                "calibration": self.scoring.calibration, "max_title_tokens": self.scoring.max_title_tokens,
                "domain": self.scoring.domain, "dataset": self.dataset, "stored_users": len(self.histories),
                "recorded_in": self.record.get("source"), "calibration_choice": self.record.get("calibration_choice")}


def _pick(flag, rec: dict, key: str, default):
    """The flag if given, else the recorded value (an unresolved 'auto' does not count), else the default."""
    if flag is not None:
        return flag
    return default if rec.get(key) in (None, "auto") else rec[key]


def scoring_config(cfg: ServeConfig, rec: dict, domain: str | None) -> ScoringConfig:
    """The scoring: flags over the record over the defaults ('auto' calibration still to resolve); checked."""
    scorer = _pick(cfg.scorer, rec, "scorer", "likelihood")
    calibration = _pick(cfg.calibration, rec, "calibration", "auto" if domain else "none")
    if scorer not in SCORERS or scorer == "embedding":
        raise ValueError(f"--scorer {scorer!r}: serve ranks with 'likelihood' or 'yesno'")
    if calibration not in CALIBRATIONS or (calibration == "auto" and domain is None):
        raise ValueError(f"--calibration {calibration!r}: use 'none', 'pmi', or 'auto' with a --dataset whose "
                         "validation users choose")
    noun = cfg.item_noun or rec.get("item_noun") or domain or "products"
    prompt_text(noun)  # a bad noun fails now
    return ScoringConfig(scorer, noun, int(_pick(cfg.max_title_tokens, rec, "max_title_tokens", 32)),
                         calibration=calibration)


def load_recommender(cfg: ServeConfig, report=print) -> Recommender:
    """Load the model (and compact model), its recorded scoring, and the stored users' dataset."""
    rec = scoring_record(cfg.model, cfg.compact)
    spec = cfg.model or (compact_base(cfg.compact) if cfg.compact is not None else None)
    if not spec:
        raise ValueError("give --model (a preset, hub id or folder), or a --compact folder that records its base")
    model, tok = load_model(spec, device=cfg.device, dtype=cfg.dtype)
    name = Path(spec).name if Path(spec).exists() else spec
    if cfg.compact is not None:
        model = load_compact(cfg.compact, base=model)
        name = f"{name} compact ({len(model.kept_layers)} of {model.n_base_layers} layers)"
    dataset = cfg.dataset if cfg.dataset is not None else rec.get("dataset")
    settings = recorded_settings({**rec, "dataset": dataset, "results_dir": cfg.results_dir})
    prep = cands = None
    if dataset and dataset != "none":
        prep = load(dataset, config=settings.prep_config(), report=None)
        cands, _ = candidates_for(prep, CandidateConfig(settings.negatives, "uniform", None, "test", settings.seed),
                                  settings.candidates_dir)
    scoring = scoring_config(cfg, rec, None if prep is None else prep.domain)
    if scoring.calibration == "auto":
        scoring.calibration, choice = calibration_to_use(model, tok, prep, calibration_config(
            "auto", cfg.calibration_users, settings.negatives, settings.seed, scoring.max_title_tokens,
            cfg.results_dir, scoring.scorer), report=report)
        rec = {**rec, "calibration_choice": choice}
    if report:
        report(f"serving {name}: {scoring.scorer} scorer, calibration {scoring.calibration}, titles of at most "
               f"{scoring.max_title_tokens} tokens ({rec.get('source') or 'nothing recorded: defaults and flags'})")
    return Recommender(model, tok, scoring, name, rec, prep, cands)


# ----------------------------------------------------------------------------- the HTTP API


class RankResponse(BaseModel):
    """Scores in the candidates' order, and the candidates best first."""

    scores: list[float] = Field(description="one score per candidate, in the order given (higher = better)")
    order: list[int] = Field(description="candidate indices, best first (ties keep the given order)")
    ranking: list[str] = Field(description="candidate titles, best first")
    model: str
    batch_size: int = Field(description="requests scored in the same call as this one")


def _rank_request(cfg: ServeConfig):
    """The /rank body, with this server's limits."""
    title = Annotated[StrictStr, StringConstraints(min_length=1, max_length=cfg.max_title_chars)]

    class RankRequest(BaseModel):
        """A history and candidates to rank; or a stored test user (``user``, ``dataset``), whose seeded
        candidate list is used unless ``candidates`` are given."""

        model_config = ConfigDict(extra="forbid")
        history: Annotated[list[title], Field(min_length=1, max_length=cfg.max_history)] | None = Field(
            None, description="titles the user liked, oldest first")
        candidates: Annotated[list[title], Field(min_length=1, max_length=cfg.max_candidates)] | None = Field(
            None, description="titles to rank")
        user: StrictStr | StrictInt | None = Field(None, description="a test user of the served dataset")
        dataset: StrictStr | None = Field(None, description="the served dataset's name (with user)")

    return RankRequest


def _invalid(field: str, msg: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": "value_error"}])


def request_from_body(rec: Recommender, body) -> ScoreRequest:
    """The scoring request a validated body asks for (a stored user's history looked up); 422 naming the field."""
    if body.user is None:
        for f in ("history", "candidates"):
            if getattr(body, f) is None:
                raise _invalid(f, f"Field required: give {f} (a list of titles), or a stored user with dataset")
        return ScoreRequest(body.history, body.candidates)
    if body.history is not None:
        raise _invalid("history", "give either history or user, not both")
    if rec.dataset is None or body.dataset != rec.dataset:
        raise _invalid("dataset", f"{body.dataset!r} is not served here; stored users: "
                       f"{rec.dataset or 'none (start with --dataset NAME)'}")
    user = str(body.user)
    if user not in rec.histories:
        raise _invalid("user", f"{user!r} is not a test user of {rec.dataset} ({len(rec.histories)} are; e.g. "
                       f"{next(iter(rec.histories))!r})")
    return ScoreRequest(rec.histories[user], body.candidates or rec.candidates[user])


class Metrics:
    """The Prometheus series of one app (its own registry, so apps in one process do not collide)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("layerviz_requests", "POST /rank requests by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("layerviz_request_seconds", "POST /rank latency (arrival to response)",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.batch = Histogram("layerviz_batch_size", "requests per scorer call", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=self.registry)
        self.batch_seconds = Histogram("layerviz_batch_seconds", "scorer call time", registry=self.registry)
        self.queue = Gauge("layerviz_queue_depth", "requests waiting for a batch", registry=self.registry)


def create_app(rec: Recommender, cfg: ServeConfig | None = None) -> FastAPI:
    """The ASGI app serving ``rec`` (run it with uvicorn; ``serve`` does)."""
    cfg = cfg or ServeConfig()
    metrics = Metrics()

    def scored(requests: list[ScoreRequest]) -> list[tuple[np.ndarray, int]]:
        return [(s, len(requests)) for s in rec.score(requests)]

    batcher = Batcher(scored, cfg.max_batch, cfg.max_wait_ms, cfg.queue_size,
                      on_batch=lambda n, s: (metrics.batch.observe(n), metrics.batch_seconds.observe(s)))
    metrics.queue.set_function(batcher.depth)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.drain(cfg.drain_seconds)  # uvicorn has let the requests in flight finish

    app = FastAPI(title="layerviz recommender", version="1", lifespan=lifespan, description=__doc__)
    RankRequest = _rank_request(cfg)
    _routes(app, rec, cfg, batcher, metrics, RankRequest)
    app.state.batcher, app.state.metrics = batcher, metrics
    return app


def _routes(app: FastAPI, rec: Recommender, cfg: ServeConfig, batcher: Batcher, metrics: Metrics, RankRequest):
    @app.middleware("http")
    async def count(request: Request, call_next):
        if request.url.path != "/rank":
            return await call_next(request)
        with metrics.latency.time():
            response = await call_next(request)
        metrics.requests.labels(str(response.status_code)).inc()
        return response

    @app.post("/rank", response_model=RankResponse, responses={503: {"description": "queue full (Retry-After)"}})
    async def rank(body: RankRequest) -> RankResponse:
        req = request_from_body(rec, body)
        try:
            scores, n = await batcher.submit(req)
        except Overloaded as err:
            return JSONResponse({"detail": str(err)}, status_code=503,
                                headers={"Retry-After": str(err.retry_after)})
        order = np.argsort(-scores, kind="stable")
        return RankResponse(scores=scores.tolist(), order=order.tolist(), ranking=[req.candidates[i] for i in order],
                            model=rec.name, batch_size=n)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **rec.info(), "queue_depth": batcher.depth(), "max_batch": cfg.max_batch,
                "max_wait_ms": cfg.max_wait_ms, "queue_size": cfg.queue_size}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def serve(cfg: ServeConfig) -> None:
    """Load the recommender and serve it with uvicorn until interrupted (then drain)."""
    import uvicorn  # the server itself: only when serving

    os.environ.setdefault("LAYERVIZ_PROGRESS", "0")  # no progress bar per batch
    app = create_app(load_recommender(cfg), cfg)
    # uvicorn drains on Ctrl-C, then re-raises the signal to the handler it found: make that one quiet, so a
    # clean shutdown ends without a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, lambda *_: None)
    uvicorn.run(app, host=cfg.host, port=cfg.port, timeout_graceful_shutdown=cfg.drain_seconds,
                log_level=cfg.log_level)
