import numpy as np
import pytest
import torch

from layerviz import bench


@pytest.fixture(scope="module")
def tiny_llama():
    from layerviz import load_model

    return load_model("tiny-llama3", device="cpu")


def test_layer_costs_match_hand_counts(tiny_llama):
    model, _ = tiny_llama
    c = bench.layer_costs(model)
    # hidden 64, 4 query heads and 2 kv heads of 16, MLP 128: q 64*64 + k,v 2*64*32 + o 64*64 + 3*64*128 + 2 norms
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert per_layer == 36992
    assert c["layer_params"] == [per_layer] * 32
    assert c["heads"] == [4] * 32 and c["head_dim"] == [16] * 32 and c["window"] == [0] * 32
    assert c["head_params"] == 64 * 49152


def test_bound_against_a_hand_computed_value(tiny_llama):
    model, _ = tiny_llama
    c = bench.layer_costs(model)
    # context 4: causal keys per position 1..4, mean 2.5; QK^T + AV: 4 * heads * head_dim * 2.5 = 640 per layer
    assert bench.attention_flops(4, 16, 4) == 640
    full = 32 * (2 * 36992 + 640) + 2 * 64 * 49152  # = 8,679,424
    compact = 8 * (2 * 36992 + 640) + 2 * 64 * 49152  # = 6,888,448
    assert bench.flops_per_token(c, list(range(32)), 4)["total"] == full == 8679424
    assert bench.flop_bound(c, list(range(8)), 4) == pytest.approx(full / compact) == pytest.approx(8679424 / 6888448)
    # adapters make the bound smaller by exactly their FLOPs
    assert bench.flop_bound(c, list(range(8)), 4, adapter_flops=1000) == pytest.approx(8679424 / 6889448)


def test_sliding_window_caps_the_attention_term():
    # window 32, context 64: keys 1..32 then 32 for 32 more positions -> mean (528 + 1024) / 64 = 24.25
    assert bench.attention_flops(1, 1, 64, window=32) == pytest.approx(4 * 24.25)


def test_layers_for_k():
    assert bench.layers_for_k(4, 30) == [0, 10, 19, 29]
    assert bench.layers_for_k(2, 30, selection=[5, 3]) == [3, 5]
    assert bench.layers_for_k(3, 30, selection=[5, 3]) == [0, 14, 29]  # the selection has another k
    with pytest.raises(ValueError, match="out of range"):
        bench.layers_for_k(31, 30)


def test_configurations_cover_full_and_each_k_with_and_without_adapters():
    cfgs = bench.configurations(18, bench.BenchConfig(keep=[4, 8, 18, 30]), selection=None)
    assert [c["name"] for c in cfgs] == ["full", "k4", "k4+adapters", "k8", "k8+adapters"]


def test_run_bench_measures_side_by_side_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERVIZ_DEMO_DIR", str(tmp_path / "demo"))
    cfg = bench.BenchConfig(model="tiny-gemma3", keep=[4], runs=2, warmup=0, seq_len=16, prefill_batch=2,
                            qps_queries=1, query_batches=[20], isolate=False, device="cpu",
                            results_dir=str(tmp_path / "results"))
    df = bench.run_bench(cfg, out=tmp_path / "out", report=None)
    assert list(df["config"]) == ["full", "k4", "k4+adapters"]
    full = df.loc[0]
    assert np.allclose(df["speedup"], full["prefill_ms"] / df["prefill_ms"])  # ratios of the same run's timings
    assert np.allclose(df["measured_over_bound"], df["speedup"] / df["bound"])
    assert df.loc[0, "speedup"] == 1 and df.loc[0, "bound"] == pytest.approx(1)
    assert df.loc[2, "bound"] < df.loc[1, "bound"]  # adapters cost FLOPs
    assert (tmp_path / "out" / "bench.csv").exists()


def test_peak_memory_worker_runs_in_its_own_process(tmp_path, monkeypatch):
    """The CPU path: one subprocess per configuration, peak RSS read from the kernel."""
    monkeypatch.setenv("LAYERVIZ_DEMO_DIR", str(tmp_path / "demo"))
    cfg = bench.BenchConfig(model="tiny-llama3", keep=[2], adapters=False, runs=1, warmup=0, seq_len=8,
                            prefill_batch=1, qps_queries=1, query_batches=[20], device="cpu",
                            results_dir=str(tmp_path / "results"))
    df = bench.run_bench(cfg, report=None)
    assert df["isolated"].all() and (df["peak_mb"] > 50).all()
    assert df.loc[1, "memory_ratio"] < 1.2


def test_gpu_bench_script_runs_on_cpu_with_tiny_shapes(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    df = mod.main(["--shapes", "tiny", "--device", "cpu", "--runs", "1", "--seq-len", "16", "--batch", "1"])
    assert set(df["model"]) == {"tiny-llama3", "tiny-qwen3"}
    assert (df["speedup"] > 0).all() and torch.isfinite(torch.tensor(df["bound"].to_numpy())).all()
    assert "measured/bound" in capsys.readouterr().out
