"""layerviz: which transformer layers does an LLM recommender really need?

``load_model`` and ``PRESETS`` load on first use (PEP 562): importing ``layerviz`` (and so ``layerviz --help``)
does not import torch.
"""

__version__ = "0.1.0"
__all__ = ["PRESETS", "__version__", "load_model"]


def __getattr__(name: str):
    if name in ("PRESETS", "load_model"):
        from layerviz import models  # heavy (torch, transformers): on first use only

        return getattr(models, name)
    raise AttributeError(f"module 'layerviz' has no attribute {name!r}")
