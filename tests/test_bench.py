import numpy as np
import pytest
import torch

from layerviz import bench


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
    cfgs = bench.configurations(18, bench.BenchConfig(ks=[4, 8, 18, 30]), selection=None)
    assert [c["name"] for c in cfgs] == ["full", "k4", "k4+adapters", "k8", "k8+adapters"]


def test_a_k_whose_bound_is_below_min_bound_is_skipped_unless_it_is_the_selection(tiny_llama):
    costs = bench.layer_costs(tiny_llama[0])
    n = len(costs["layer_params"])
    cfg = bench.BenchConfig(ks=[2, n - 1], adapters=False, seq_len=16)
    near = bench.flop_bound(costs, bench.layers_for_k(n - 1, n), 16)
    assert 1 < near < bench.flop_bound(costs, bench.layers_for_k(2, n), 16)
    cfg.min_bound = near + 1e-6  # k = n - 1 falls just below it
    assert [c["k"] for c in bench.configurations(n, cfg, None, costs)] == [n, 2]
    assert [c["k"] for c in bench.configurations(n, cfg, list(range(1, n)), costs)] == [n, 2, n - 1]
    cfg.min_bound = near
    assert [c["k"] for c in bench.configurations(n, cfg, None, costs)] == [n, 2, n - 1]


def test_counted_flops_of_a_forward_equal_the_bound_s_count(tiny_llama):
    """The bound's FLOPs per token against torch's own count of a real forward (full and compact)."""
    from torch.utils.flop_counter import FlopCounterMode

    from layerviz import arch

    model, _ = tiny_llama
    costs, t = bench.layer_costs(model), 16
    ids = torch.randint(0, 1000, (2, t))

    def counted(layers):
        with arch.keep_layers(model, layers), torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(input_ids=ids)
        return fc.get_total_flops() / ids.numel()

    def norm_flops(layers):  # the bound counts 2 FLOPs per weight, norms' weights too
        return 2 * sum(p.numel() for i in layers for n, p in arch.layers(model)[i].named_parameters() if "norm" in n)

    for layers in (list(range(32)), [0, 5, 9, 31]):
        want = bench.flops_per_token(costs, layers, t)
        # torch counts every matmul of the layers and the LM head; it has no formula for CPU flash
        # attention, whose QK^T and AV terms are the hand-checked attention_flops above
        assert counted(layers) + norm_flops(layers) + want["attention"] == pytest.approx(want["total"], rel=1e-9)
    full, compact = (counted(x) + norm_flops(x) + bench.flops_per_token(costs, x, t)["attention"]
                     for x in (list(range(32)), [0, 5, 9, 31]))
    assert full / compact == pytest.approx(bench.flop_bound(costs, [0, 5, 9, 31], t), rel=1e-9)


def test_timings_interleave_and_take_per_round_ratios(tiny_llama, monkeypatch):
    """Rounds run every configuration in turn; the speedup is the median of per-round ratios."""

    model, tok = tiny_llama
    order, clock = [], iter([
        99, 99, 99, 99, 99,  # warm-up: LM head, full prefill, full query, compact prefill, compact query
        0.5, 2, 1, 1, 1,  # round 1: prefill ratio 2
        0.5, 6, 1, 2, 1,  # round 2: 3
        0.7, 3, 1, 3, 1,  # round 3: 1
        1, 1])  # throughput: one call each

    def fake_once(fn, device):
        order.append(fn)
        return next(clock)

    monkeypatch.setattr(bench, "time_once", fake_once)
    targets = {"full": model, "k2": bench._build(model, [0, 31], False, None, standalone=False)}
    req = bench.Request(["Lens"], ["Tripod", "Camera"])
    out = bench.timings(targets, tok, req, bench.BenchConfig(runs=3, warmup=1, qps_queries=1))
    assert out["k2"]["speedup"] == 2.0  # median of 2, 3, 1; the ratio of medians would be 3 / 2
    assert out["k2"]["prefill_ms"] == 2000 and out["full"]["prefill_ms"] == 3000
    assert out["k2"]["speedup_iqr"] == pytest.approx(1.0) and out["full"]["speedup"] == 1
    assert out["k2"]["runs"] == 3 and len(order) == 22 and out["full"]["head_ms"] == 500


def test_time_bound_is_what_saving_the_dropped_layers_time_would_give():
    # full 1000 ms of which the head 200: dropping 24 of 32 equal layers saves 0.75 * 800 = 600 ms
    assert bench.time_bound(1000, 200, 32, 8) == pytest.approx(1000 / 400)
    assert bench.time_bound(1000, 200, 32, 32) == 1 and bench.time_bound(1000, 0, 10, 5) == pytest.approx(2)
    # a head that is faster per FLOP than the layers lifts the time bound above the FLOP bound:
    # FLOPs per token 8 layers x 1 + head 2 (head 20%); time: head 10% of 1000 ms
    costs = {"layer_params": [0.5] * 8, "heads": [0] * 8, "head_dim": [0] * 8, "window": [0] * 8, "head_params": 1}
    assert bench.flop_bound(costs, [0, 1], 4) == pytest.approx(10 / 4)
    lifted = bench.time_bound(1000, 100, 8, 2)
    assert lifted == pytest.approx(1000 / 325) and lifted > bench.flop_bound(costs, [0, 1], 4)


def test_run_bench_measures_side_by_side_in_process(tmp_path, monkeypatch):
    cfg = bench.BenchConfig(model="tiny-gemma3", ks=[4], runs=3, warmup=0, seq_len=16, prefill_batch=2,
                            qps_queries=1, isolate=False, device="cpu", results_dir=str(tmp_path / "results"))
    df = bench.run_bench(cfg, out=tmp_path / "out", report=None)
    assert list(df["config"]) == ["full", "k4", "k4+adapters"]
    assert np.allclose(df["measured_over_bound"], df["speedup"] / df["bound"])
    assert df.loc[0, "speedup"] == 1 and df.loc[0, "bound"] == pytest.approx(1) and df.loc[0, "speedup_iqr"] == 0
    assert (df["runs"] == 3).all() and (df["qps"] > 0).all()
    assert df["above_bound"].tolist() == (df["speedup"] - df["speedup_iqr"] / 2 > df["time_bound"]).tolist()
    assert df.loc[0, "time_bound"] == pytest.approx(1) and (df.loc[1:, "time_bound"] > 1).all()
    assert df.loc[2, "bound"] < df.loc[1, "bound"]  # adapters cost FLOPs
    assert (tmp_path / "out" / "bench.csv").exists()


def test_peak_memory_worker_runs_in_its_own_process(tmp_path, monkeypatch):
    """The CPU path: one subprocess per configuration, peak RSS read from the kernel."""
    cfg = bench.BenchConfig(model="tiny-llama3", ks=[2], adapters=False, runs=1, warmup=0, seq_len=8,
                            prefill_batch=1, qps_queries=1, device="cpu",
                            results_dir=str(tmp_path / "results"))
    df = bench.run_bench(cfg, report=None)
    assert df["isolated"].all() and (df["peak_mb"] > 50).all()
    assert df.loc[1, "memory_ratio"] < 1.2


def test_gpu_check_script_runs_on_cpu_with_tiny_shapes(capsys, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    df = mod.main(["--shapes", "tiny", "--device", "cpu", "--runs", "1", "--warmup", "0", "--seq-len", "16",
                   "--batch", "1", "--samples", "2", "--users", "2", "--lora-batch", "1", "--history-len", "3",
                   "--max-title-tokens", "6", "--cache", str(tmp_path), "--out", str(tmp_path / "check.csv")])
    assert set(df["model"]) == {"tiny-llama3", "tiny-qwen3", "all"}
    per_model = df[df["model"] != "all"].groupby("model")["check"].apply(list)
    for checks in per_model:  # every check ran for both shapes, in order
        assert [c.split(" ")[0].rstrip(",") for c in checks] == ["prefill", "prefill", "importance", "importance", "scoring", "adapter",
                                                    "LoRA"]
    memory = df["check"].str.contains("peak memory")  # CUDA's allocator peak: NaN on CPU
    assert (df.loc[~memory, "measured"] > 0).all() and df.loc[memory, "measured"].isna().all()
    prefill = df[df["check"].str.startswith("prefill")]
    assert list(prefill["check"]) == ["prefill speedup, k=8 of 32", "prefill speedup, k=8 of 32 + adapters",
                                      "prefill speedup, k=9 of 36", "prefill speedup, k=9 of 36 + adapters"]
    assert prefill["detail"].str.contains("FLOP bound").all()
    assert df.loc[df["check"] == "whole script", "goal"].item() == "<= 480 s"
    assert (tmp_path / "check.csv").exists() and "whole script" in capsys.readouterr().out
