"""Single hook pass (all criteria) vs a plain forward+backward vs the naive approach.

Each method runs in its own subprocess over the same calibration batches, so peak RSS
(CPU) or torch.cuda.max_memory_allocated (CUDA) of one cannot contaminate another.
  plain : forward + backward of the same loss, nothing extra (gradients kept, as usual)
  single: layerviz.compression.importance.hook_pass, every criterion in one pass
  naive : output_attentions=True + output_hidden_states=True (eager attention), gradients
          kept and squared afterwards

Run: .venv/bin/python benchmarks/bench_importance.py [--model smollm2-135m --samples 16]
Goals (issue #4): single <= 1.5x plain wall time and <= 1.2x plain peak memory.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def worker(method: str, model_name: str, samples: int, history: int) -> dict:
    import resource

    import torch

    from layerviz import arch, data, load_model
    from layerviz.compression import importance as imp
    from layerviz.data.prompts import build_probes

    model, tok = load_model(model_name)
    dev = arch.input_device(model)
    prep = data.load("synthetic-electronics", config=data.PrepConfig(history_len=history), report=None)
    cal = build_probes(prep, tok, n=samples)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "single":
        imp.hook_pass(model, cal)
    else:
        model.config._attn_implementation = "eager" if method == "naive" else model.config._attn_implementation
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in arch.layers(model):
            layer.requires_grad_(True)
        for i in range(len(cal.examples)):
            exs, ids, mask, _ = imp.probe_batch(cal, [i], 0, dev)
            if method == "plain":
                imp.per_sample_loss(model, cal, exs, ids, mask).mean().backward()
            else:
                out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
                e = exs[0]
                pos = torch.arange(len(e.ids) - e.n_target - 1, len(e.ids) - 1, device=dev)
                logp = out.logits[0, pos].float().log_softmax(-1)
                (-logp.gather(1, ids[0, pos + 1][:, None]).mean()).backward()
                _ = [float((p.grad.float() ** 2).sum()) for p in model.parameters() if p.grad is not None]
                _ = [(-(a * a.clamp_min(1e-30).log()).sum(-1)).mean().item() for a in out.attentions]
                del out
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"method": method, "seconds": seconds, "peak_bytes": peak,
            "peak_above_load": peak - (0 if dev.type == "cuda" else base_rss * 1024), "device": dev.type}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--history-len", type=int, default=20)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.samples, args.history_len)))
        return
    rows = {}
    env = dict(os.environ, LAYERVIZ_PROGRESS="0")
    for method in ["plain", "single", "naive"]:
        out = subprocess.run([sys.executable, __file__, "--worker", method, "--model", args.model,
                              "--samples", str(args.samples), "--history-len", str(args.history_len)],
                             capture_output=True, text=True, env=env, check=True)
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
    dev = rows["plain"]["device"]
    mem = "peak RSS" if dev == "cpu" else "max_memory_allocated"
    print(f"{args.model} on {dev}, {args.samples} probe prompts (batch 1), history {args.history_len}")
    print(f"{'method':<8}{'wall s':>9}{'x plain':>9}{mem + ' MB':>22}{'x plain':>9}{'above load MB':>15}{'x plain':>9}")
    p = rows["plain"]
    for m, r in rows.items():
        print(f"{m:<8}{r['seconds']:>9.2f}{r['seconds'] / p['seconds']:>9.2f}{r['peak_bytes'] / 2**20:>22.0f}"
              f"{r['peak_bytes'] / p['peak_bytes']:>9.2f}{r['peak_above_load'] / 2**20:>15.0f}"
              f"{r['peak_above_load'] / max(1, p['peak_above_load']):>9.2f}")
    s = rows["single"]
    print(f"goals: time {s['seconds'] / p['seconds']:.2f}x <= 1.5x: {'met' if s['seconds'] <= 1.5 * p['seconds'] else 'MISSED'}; "
          f"memory {s['peak_bytes'] / p['peak_bytes']:.2f}x <= 1.2x: {'met' if s['peak_bytes'] <= 1.2 * p['peak_bytes'] else 'MISSED'}")


if __name__ == "__main__":
    main()
