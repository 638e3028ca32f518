"""FVG-PT training from the cache vs. the same steps re-encoding images with ViT-B/16.

Cache side: the default configuration (10 epochs, batch 4, …) on a synthetic cache shaped like
a real dataset (100 classes → 50 base × 16 shots × 10 views, D = 512, 2,500 test images),
timed end to end (load, train, evaluate) and for training alone.

Image side: the paper's pipeline must run the frozen ViT-B/16 image encoder on the full and
the foreground view of every image of every step (batch 4 → 8 images per step). Its per-step
time is measured on `--encode-steps` steps (random weights: speed does not depend on them)
and multiplied by the number of optimisation steps of the cache run. The printed ratio is
(estimated) image-based time ÷ measured cache-based time.

    python benchmarks/bench_training.py
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fvgpt_cache.extraction import encode_images
from fvgpt_cache.models import load_clip
from fvgpt_cache.runs import run_training
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--test-per-class", type=int, default=25)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--encode-steps", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-16")
    args = ap.parse_args(argv)

    cfg = TrainConfig()
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_feature_cache(Path(tmp) / "bench.h5", num_classes=args.classes, shots=args.shots,
                                    views=args.views, dim=args.dim, test_per_class=args.test_per_class)
        run_training(cache, TrainConfig(epochs=2), save=False)  # warm-up: imports, allocator
        walls, trains = [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            rec = run_training(cache, cfg, save=False)
            walls.append(time.perf_counter() - start)
            trains.append(rec["seconds"]["train"])
    base_images = rec["train_images"]
    steps = cfg.epochs * (base_images // cfg.batch_size)

    loaded = load_clip(args.model, "none")
    size = loaded.preprocess["size"]
    pixels = torch.randn(2 * cfg.batch_size, 3, size, size)  # full + foreground view of one batch
    encode_images(loaded.model, pixels, torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(args.encode_steps):
        encode_images(loaded.model, pixels, torch.device("cpu"))
    per_step = (time.perf_counter() - start) / args.encode_steps

    best_wall, best_train = min(walls), min(trains)
    result = {
        "train_images": base_images, "views": args.views, "dim": args.dim, "steps": steps,
        "torch_threads": torch.get_num_threads(),
        "cache_run_seconds": [round(w, 3) for w in walls], "cache_train_seconds": [round(t, 3) for t in trains],
        "samples_per_second": round(cfg.epochs * base_images / best_train, 1),
        "encoder_seconds_per_step": round(per_step, 3),
        "image_based_seconds_estimated": round(per_step * steps, 1),
        "ratio_image_vs_cache": round(per_step * steps / best_wall, 1),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
