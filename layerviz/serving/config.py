"""What `layerviz serve` serves and how: its config (torch-free, so that `layerviz serve --help` answers at once)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """What `layerviz serve` serves and how (the model, its scoring, batching, limits)."""

    model: str | None = None
    """Model: a preset, hub id, fine-tuned folder or exported checkpoint (None: the base recorded by --compact)."""
    compact: str | None = None
    """A compact model folder (`layerviz adapt --out DIR` writes DIR/compact) to serve on --model."""
    host: str = "127.0.0.1"
    """Address to bind (127.0.0.1: this machine only)."""
    port: int = 8000
    """Port to listen on."""
    dataset: str | None = None
    """Stored histories for {user, dataset} requests (None: the dataset recorded with the model; 'none': no
    stored users)."""
    scorer: str | None = None
    """likelihood or yesno (None: as recorded with the model; likelihood if nothing is recorded)."""
    calibration: str | None = None
    """likelihood: 'none', 'pmi' or 'auto' (chosen at start on validation users of --dataset). None: as recorded
    with the model; if nothing is recorded, 'auto' with a dataset and 'none' without."""
    calibration_users: int = 40
    """Validation users on which calibration 'auto' chooses (the study's default)."""
    max_title_tokens: int | None = None
    """Title length in tokens (None: as recorded; 32 if nothing is recorded)."""
    item_noun: str | None = None
    """What the prompts call the items (None: as recorded, else the dataset's; 'products' without either)."""
    max_batch: int = 8
    """Requests scored in one call at most (1: no batching)."""
    max_wait_ms: float = 5.0
    """How long the oldest queued request waits for others to join its batch."""
    queue_size: int = 64
    """Requests waiting at most; beyond that the server answers 503 with Retry-After."""
    max_candidates: int = 100
    """Candidates per request at most (422 beyond)."""
    max_history: int = 50
    """History titles per request at most (422 beyond)."""
    max_title_chars: int = 300
    """Characters per title at most (422 beyond)."""
    drain_seconds: float = 30.0
    """On shutdown, how long requests in flight may take to finish."""
    log_level: str = "info"
    """uvicorn's log level ('warning' drops the line per request, as a load test wants)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    dtype: str | None = None
    """float32, bfloat16 or float16 (None: float32 on CPU, bfloat16 on CUDA)."""
    results_dir: str = "results"
    """Where the seeded candidate lists of stored users are kept (shared with the other commands)."""
