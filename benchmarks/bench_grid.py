"""A 64-configuration grid on one cache: batched across configurations vs. one run after another.

Both sides train the same configurations (λ_d × seeds, the default model otherwise) on the same
synthetic cache shaped like a real dataset (50 base classes × 16 shots × 10 views, D = 512) and
evaluate them; the sequential side calls the same `run_training` a single `fvgpt-cache train`
uses. Prints wall times, the ratio and configurations per second.

    python benchmarks/bench_grid.py                     # full comparison, about 6 minutes on 2 cores
    python benchmarks/bench_grid.py --sequential-sample 8   # time 8 sequential runs and extrapolate
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fvgpt_cache.grids import expand, parse_params, run_grid
from fvgpt_cache.runs import run_training
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lambdas", default="0.1,0.5,1,2,5,10,15,20,25,30,40,50,60,70,80,100")
    ap.add_argument("--seeds", default="1,2,3,4")
    ap.add_argument("--sequential-sample", type=int, default=0, help="time only this many sequential runs (0 = all)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cache = write_feature_cache(Path(tmp) / "bench.h5", num_classes=100, shots=16, views=10, dim=512,
                                    test_per_class=25)
        runs = expand([cache], [int(s) for s in args.seeds.split(",")], parse_params([f"lambda_d={args.lambdas}"]),
                      TrainConfig())
        run_training(cache, TrainConfig(epochs=2), save=False)  # warm-up: imports, allocator

        start = time.perf_counter()
        run_grid(runs, Path(tmp) / "grid")
        batched = time.perf_counter() - start

        sample = runs[: args.sequential_sample] if args.sequential_sample else runs
        start = time.perf_counter()
        for run in sample:
            run_training(cache, run.config, save=False)
        sequential = (time.perf_counter() - start) * len(runs) / len(sample)

    result = {
        "configurations": len(runs), "torch_threads": torch.get_num_threads(),
        "batched_seconds": round(batched, 1),
        "sequential_seconds": round(sequential, 1),
        "sequential_measured_runs": len(sample),
        "ratio": round(sequential / batched, 2),
        "configurations_per_second_batched": round(len(runs) / batched, 3),
        "configurations_per_second_sequential": round(len(runs) / sequential, 3),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
