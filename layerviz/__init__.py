"""layerviz: which transformer layers does an LLM recommender really need?"""

__version__ = "0.1.0"

from layerviz.models import PRESETS, load_model  # noqa: E402

__all__ = ["PRESETS", "__version__", "load_model"]
