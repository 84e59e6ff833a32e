import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config

import layerviz.models as lm
from layerviz import arch, load_model
from layerviz.models import PRESETS, ModelNotAvailable, resolve_device, resolve_dtype


def test_preset_layer_counts_match_official_configs():
    assert PRESETS["qwen3-8b"].num_layers == 36
    assert PRESETS["llama3-8b"].num_layers == 32
    assert PRESETS["smollm2-135m"].num_layers == 30
    assert PRESETS["gemma3-270m"].num_layers == 18
    # the published sizes: LLaMA-3-8B 8.03B, Qwen3-8B 8.19B
    assert round(lm.count_parameters(PRESETS["llama3-8b"].config()) / 1e9, 2) == 8.03
    assert round(lm.count_parameters(PRESETS["qwen3-8b"].config()) / 1e9, 2) == 8.19


def test_cli_models_lists_every_preset():
    out = subprocess.run([sys.executable, "-m", "layerviz.cli", "models"], capture_output=True,
                         text=True, check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == set(PRESETS)
    assert rows["qwen3-8b"][2] == "36" and rows["llama3-8b"][2] == "32"
    assert rows["smollm2-135m"][2] == "30" and rows["gemma3-270m"][2] == "18"


def test_device_and_dtype_defaults():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_unknown_preset_says_what_to_do():
    with pytest.raises(ModelNotAvailable, match="Presets: .*smollm2-135m"):
        load_model("smollm3-1b")


def test_missing_local_path_says_what_to_do(tmp_path):
    with pytest.raises(ModelNotAvailable, match="no such path"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_env_var_pointing_nowhere(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERVIZ_LLAMA3_8B", str(tmp_path / "missing"))
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load_model("llama3-8b")


def test_hub_model_offline_points_at_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty HF cache
    monkeypatch.delenv("LAYERVIZ_QWEN3_8B", raising=False)
    with pytest.raises(ModelNotAvailable, match="LAYERVIZ_QWEN3_8B=DIR"):
        load_model("qwen3-8b")


def test_unsupported_local_architecture(tmp_path):
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="'gpt2'.*Supported model types"):
        load_model(str(tmp_path))


def test_local_folder_via_preset_env_var(monkeypatch, tmp_path):
    """llama3-8b resolves to a local folder given by its environment variable."""
    model, tok = load_model("tiny-llama3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setenv("LAYERVIZ_LLAMA3_8B", str(tmp_path))
    loaded, _ = load_model("llama3-8b", device="cpu")
    assert arch.num_layers(loaded) == 32
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_tiny_presets_are_seeded():
    a, _ = load_model("tiny-qwen3", seed=1)
    b, _ = load_model("tiny-qwen3", seed=1)
    c, _ = load_model("tiny-qwen3", seed=2)
    w = lambda m: arch.layers(m)[3].mlp.up_proj.weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))


def test_gguf_cache_is_keyed_by_content(monkeypatch, tmp_path):
    """Dequantize once per file content: a changed file is never served from a stale cache."""
    monkeypatch.setenv("LAYERVIZ_CACHE", str(tmp_path / "cache"))
    calls = []
    tiny, tok = load_model("tiny-gemma3")

    def fake_dequantize(path):
        calls.append(path)
        return tiny, tok

    monkeypatch.setattr(lm, "_dequantize_gguf", fake_dequantize)
    src = tmp_path / "toy.gguf"
    src.write_bytes(b"version one")
    load_model(str(src))
    load_model(str(src))
    assert len(calls) == 1
    src.write_bytes(b"version two")
    load_model(str(src))
    assert len(calls) == 2
    assert len(list((tmp_path / "cache" / "dequantized").iterdir())) == 2
    # a half-written cache folder (no manifest) is never served: it is dequantized again and replaced
    src.write_bytes(b"version three")
    half = lm.gguf_cache_dir(src.stem, lm.sha256_file(src))
    half.mkdir(parents=True)
    (half / "config.json").write_text('{"model_type": ')  # what a crash mid-write would leave
    model, _ = load_model(str(src))
    assert len(calls) == 3 and (half / "layerviz_manifest.json").exists()
    assert arch.num_layers(model) == arch.num_layers(tiny)
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache" / "dequantized").iterdir())


@pytest.mark.slow
def test_smollm2_dequantized_cache_roundtrip(monkeypatch, tmp_path):
    """First load dequantizes; the second is served from the cache with identical weights."""
    monkeypatch.setenv("LAYERVIZ_CACHE", str(tmp_path))
    calls = []
    real = lm._dequantize_gguf
    monkeypatch.setattr(lm, "_dequantize_gguf", lambda p: calls.append(p) or real(p))
    first, _ = load_model("smollm2-135m")
    second, _ = load_model("smollm2-135m")
    assert len(calls) == 1
    sd1, sd2 = first.state_dict(), second.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    cached = next((tmp_path / "dequantized").iterdir())
    manifest = json.loads((cached / "layerviz_manifest.json").read_text())
    assert manifest["sha256"] == lm.sha256_file(lm._smollm2_gguf())
    assert cached.name.endswith(manifest["sha256"][:16])
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())


@pytest.mark.slow
def test_smollm2_is_real_and_knows_paris(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert arch.num_layers(model) == 30 and arch.hidden_size(model) == 576
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LAYERVIZ_SKIP_GEMMA") == "1", reason="LAYERVIZ_SKIP_GEMMA=1")
def test_gemma3_is_real_and_sane():
    from tests.conftest import _load

    model, tok = _load("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert arch.num_layers(model) == 18 and arch.family(model) == "gemma3"
    assert arch.layer_types(model).count("full_attention") == 3
    ids = tok("Monday, Tuesday,", return_tensors="pt")
    with torch.no_grad():
        top = model(**ids, logits_to_keep=1).logits[0, -1].topk(3).indices
    assert "Wednesday" in [tok.decode(i).strip() for i in top]
