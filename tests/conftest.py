import functools

import pytest
import torch

from layerviz import load_model

TINY = ["tiny-llama3", "tiny-qwen3", "tiny-gemma3"]
TINY_LAYERS = {"tiny-llama3": 32, "tiny-qwen3": 36, "tiny-gemma3": 18}


@functools.cache
def _load(spec: str):
    return load_model(spec, device="cpu")


@pytest.fixture(params=TINY)
def tiny(request):
    """(preset name, model, tokenizer) for every tiny family; the model is shared, do not mutate it."""
    model, tok = _load(request.param)
    return request.param, model, tok


@pytest.fixture(scope="session")
def smollm2():
    """Real pretrained SmolLM2-135M (served from the dequantized cache after the first load)."""
    return _load("smollm2-135m")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
