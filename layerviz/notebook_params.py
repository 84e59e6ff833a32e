"""The notebooks' parameters, in one place: each notebook's parameters cell is
``from layerviz.notebook_params import *``, and papermill (``layerviz report --params FILE``) overrides any of
these names after it. Paths are relative to notebooks/, where the notebooks run."""

CONFIG = "../configs/demo.yaml"
"""The study that ``layerviz run CONFIG`` executed; the notebooks read its finished stages."""
MODELS = None
"""Model presets / hub ids / paths instead of the config's (e.g. ["llama3-8b", "qwen3-8b"])."""
DATASET = None
"""The main dataset instead of the config's (a named dataset or a folder of official files)."""
OVERRIDES: dict = {}
"""Any other study setting, e.g. {"eval_users": 200, "select_users": 32}."""
MODEL = None
"""Show one model of the study (None: every model)."""
SMOKE = False
"""A toy study on tiny random models instead of CONFIG (CI)."""
COMPUTE = False
"""Compute the stages that are missing. False (the default): the notebook only reads, and a missing stage
raises an error that prints the ``layerviz run`` command that computes it. CI's smoke run passes True."""
USE_CACHE = True
"""Reuse finished stages; False recomputes every stage (needs COMPUTE)."""
RESULTS_DIR = "../results"
"""Where ``layerviz run`` wrote the study (RESULTS_DIR/<study name>/)."""
FIGURES_DIR = "../figures"
"""Where the notebooks save their PDF+PNG figures."""
DEVICE = None
"""None: the config's device ("cpu", "cuda", "auto")."""
TFLOPS = None
"""05_efficiency: throughput of the cost plan's time (None: measured for CPU; on a GPU give it)."""

SERVE_BENCH = "../docs/serve_bench.json"
"""05_efficiency: the serving load test's JSON (`benchmarks/bench_serve.py --json`)."""

__all__ = ["COMPUTE", "CONFIG", "DATASET", "DEVICE", "FIGURES_DIR", "MODEL", "MODELS", "OVERRIDES", "RESULTS_DIR",
           "SERVE_BENCH", "SMOKE", "TFLOPS", "USE_CACHE"]


def with_defaults(given: dict) -> dict:
    """Every parameter: ``given``'s value where it has one (a notebook's ``globals()``, overrides), else the default."""
    defaults = globals()
    return {name: given.get(name, defaults[name]) for name in __all__}
