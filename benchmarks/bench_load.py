"""First load (GGUF dequantization) against cached load, for both real pretrained models.

Run: .venv/bin/python benchmarks/bench_load.py [--models smollm2-135m gemma3-270m]
Each model is loaded twice into a fresh, empty cache folder, side by side in one run:
the first load dequantizes the GGUF and writes the safetensors cache, the second reads it.
Goal (issue #2): cached load <= 1/3 of the first.
"""

import argparse
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LAYERVIZ_CACHE"] = cache  # empty: the first load must dequantize
        import torch

        from layerviz import load_model

        load_model("tiny-llama3")  # warm imports so both timings exclude them
        rows = []
        for spec in args.models:
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                model, _ = load_model(spec, device="cpu")
                times.append(time.perf_counter() - t0)
                del model
            rows.append((spec, *times, times[1] / times[0]))
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
        print(f"{'model':<14}{'first load s':>14}{'cached load s':>15}{'cached/first':>14}{'goal <= 0.33':>14}")
        for spec, first, cached, ratio in rows:
            print(f"{spec:<14}{first:>14.1f}{cached:>15.1f}{ratio:>14.3f}{'met' if ratio <= 1 / 3 else 'MISSED':>14}")


if __name__ == "__main__":
    main()
