"""Models spread over devices by accelerate (load_model(device_map=...)) give the undispatched results.

On this CPU-only machine the map offloads some layers and the LM head to disk (accelerate keeps their
weights on the meta device and loads them at each forward), which exercises the same hooks that move
activations between GPUs. The comparisons are exact: the same weights run the same arithmetic.
"""

import numpy as np
import pytest
import torch

from layerviz import arch, data, load_model
from layerviz.compression import importance as imp
from layerviz.compression.compact import build_compact
from layerviz.compression.config import AdapterPolicy
from layerviz.data import CandidateConfig, candidates_for
from layerviz.data.prompts import build_probes
from layerviz.evaluate import requests_for
from layerviz.models import check_device_map
from layerviz.scoring import ScoringConfig, score

SPECS = ["tiny-llama3", "tiny-gemma3"]


def _map(model, offload: bool) -> dict:
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
          "lm_head": "disk" if offload else "cpu"}
    for i in range(arch.num_layers(model)):
        dm[f"model.layers.{i}"] = "disk" if offload and i % 3 == 1 else "cpu"
    return dm


@pytest.fixture(scope="module")
def prep():
    return data.load("synthetic-electronics", config=data.PrepConfig(history_len=3), report=None)


@pytest.fixture(scope="module", params=SPECS)
def pair(request, tmp_path_factory):
    """(plain model, the same weights dispatched with offloaded layers and head, tokenizer)."""
    plain, tok = load_model(request.param, device="cpu")
    dispatched, _ = load_model(request.param, device_map=_map(plain, offload=True),
                               offload_folder=str(tmp_path_factory.mktemp("offload")))
    return plain, dispatched, tok


def test_offloaded_weights_are_on_meta_and_inputs_go_to_the_execution_device(pair):
    plain, dispatched, _ = pair
    tied = arch.lm_head(plain).weight is arch.embedding(plain).weight  # tiny-gemma3: the head is the embedding
    assert arch.lm_head(dispatched).weight.is_meta != tied and arch.layers(dispatched)[1].mlp.up_proj.weight.is_meta
    assert arch.input_device(dispatched) == torch.device("cpu")
    assert arch.offloaded_layers(dispatched) == list(range(1, arch.num_layers(plain), 3))
    assert arch.offloaded_layers(plain) == []
    with arch.materialized(arch.lm_head(dispatched)) as head:
        assert torch.equal(head.weight, arch.lm_head(plain).weight)
    assert arch.lm_head(dispatched).weight.is_meta != tied  # offloaded again


def test_scores_keep_skip_and_compact_equal_the_undispatched_model(pair, prep, tmp_path):
    plain, dispatched, tok = pair
    cands, _ = candidates_for(prep, CandidateConfig(9, "uniform", 3, "test", 0), tmp_path)
    reqs, cfg = requests_for(prep, cands, "test"), ScoringConfig(max_title_tokens=6, calibration="pmi")
    for a, b in zip(score(plain, tok, reqs, cfg), score(dispatched, tok, reqs, cfg), strict=True):
        np.testing.assert_array_equal(a, b)
    keep = [0, 1, 4, 7]
    with arch.keep_layers(plain, keep), arch.keep_layers(dispatched, keep):
        assert score(plain, tok, reqs[:1], cfg)[0].tolist() == score(dispatched, tok, reqs[:1], cfg)[0].tolist()
    with arch.skip_layers(plain, [1, 2]), arch.skip_layers(dispatched, [1, 2]):
        assert score(plain, tok, reqs[:1], cfg)[0].tolist() == score(dispatched, tok, reqs[:1], cfg)[0].tolist()
    cal = build_probes(prep, tok, n=3, max_title_tokens=6)
    c1, c2 = (build_compact(m, keep, AdapterPolicy(rank=4), seed=0) for m in (plain, dispatched))
    np.testing.assert_array_equal(imp.probe_losses(c1, cal), imp.probe_losses(c2, cal))


def test_importance_pass_on_offloaded_layers(pair, prep):
    plain, dispatched, tok = pair
    cal = build_probes(prep, tok, n=3, max_title_tokens=6)
    a, b = imp.hook_pass(plain, cal, fisher=False), imp.hook_pass(dispatched, cal, fisher=False)
    assert set(a) == set(b) and "attn_entropy" in a and "block_influence" in a
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=0, err_msg=k)
    with pytest.raises(ValueError, match=r"offloaded by accelerate.*fisher=False"):
        imp.hook_pass(dispatched, cal)


def test_fisher_through_dispatch_hooks_without_offload(prep):
    plain, tok = load_model("tiny-qwen3", device="cpu")
    hooked, _ = load_model("tiny-qwen3", device_map=_map(plain, offload=False))
    assert arch._align_hook(arch.layers(hooked)[0]) is not None and arch.offloaded_layers(hooked) == []
    cal = build_probes(prep, tok, n=2, max_title_tokens=6)
    a, b = imp.hook_pass(plain, cal), imp.hook_pass(hooked, cal)
    np.testing.assert_allclose(a["fisher_sum"], b["fisher_sum"], rtol=1e-6)
    assert (a["fisher_sum"] > 0).all()


def test_auto_map_on_a_cpu_machine_loads_and_scores(prep, tmp_path):
    model, tok = load_model("tiny-llama3", device_map="auto")
    assert set(model.hf_device_map.values()) <= {"cpu", 0, "disk"} and arch.input_device(model).type in ("cpu", "cuda")
    cands, _ = candidates_for(prep, CandidateConfig(4, "uniform", 1, "test", 0), tmp_path)
    reqs, scfg = requests_for(prep, cands, "test"), ScoringConfig(max_title_tokens=6)
    plain, _ = load_model("tiny-llama3", device="cpu")  # the same weights, on one device: the same scores
    np.testing.assert_allclose(score(model, tok, reqs, scfg)[0], score(plain, tok, reqs, scfg)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device_map, max_memory, message", [
    ({"model.layers.0": "cuda:7"}, None, r"device_map\['model.layers.0'\] = 'cuda:7'.*no such device.*use one of cpu, disk"),
    ({"lm_head": 5}, None, r"device_map\['lm_head'\] = 5.*no such device"),
    ({"lm_head": "gpu0"}, None, r"'gpu0' is not a device"),
    ("everywhere", None, r"device_map='everywhere' is neither one of auto"),
    ({}, None, r"non-empty"),
    ("auto", {"cuda:3": "10GiB"}, r"max_memory key.*cuda:3.*no such device"),
])
def test_bad_device_maps_are_refused_before_loading(device_map, max_memory, message):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has the devices the test names as missing")
    with pytest.raises(ValueError, match=message):
        check_device_map(device_map, max_memory)
    with pytest.raises(ValueError, match=message):
        load_model("tiny-llama3", device_map=device_map, max_memory=max_memory)


def test_a_map_on_cuda_gets_the_cuda_default_dtype(monkeypatch):
    """dtype None is bf16 where the map puts modules on a GPU: named ones, or a strategy on a CUDA machine
    (accelerate fills the GPUs first); fp32 where it keeps them on the CPU or disk."""
    from layerviz.models import map_uses_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert map_uses_cuda("auto", None) and map_uses_cuda({"model.layers.0": 0}, None)
    assert not map_uses_cuda("auto", {"cpu": "4GiB"}) and not map_uses_cuda({"model.layers.0": "cpu"}, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not map_uses_cuda("auto", None) and map_uses_cuda("auto", {"cuda:0": "70GiB", "cpu": "100GiB"})
