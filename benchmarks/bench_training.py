"""One FVG-PT run: our engine vs. a plain eager PyTorch loop of the same math vs. re-encoding images.

Data: a synthetic cache shaped like a real dataset (100 classes → 50 base × 16 shots × 11 views,
D = 512, 25 test images per class), the default configuration (10 epochs, batch 4 → 2,000 steps).

* engine: `engine.train_head` (the stacked engine with hand-written gradients, a group of one);
* engine, autograd: the same engine with every loss term's gradient from autograd over the same stacked
  forward (`backward="autograd"`); the ratio to the engine is what autograd would cost as the one path;
* engine + curves: the same with the per-epoch evaluation every run does (`engine.monitor`: test
  predictions, validation scores and gate statistics at the end of each of the 10 epochs); the
  ratio to the engine alone is the curves' cost (the goal: at most 1.10);
* eager: the textbook loop over the same data and schedule — `FVGPTHead.losses_from` on each batch,
  `loss.backward()`, `torch.optim.SGD` (momentum 0.9, weight decay 5e-4, fused where available);
  this is the reference the engine's gradients are tested against;
* products: the floor of any implementation in PyTorch on this machine: the step's 13 matrix products
  alone (`bench_grid.bare_bmm_gflops`, same shapes, no other work), timed over as many steps;
* images: the paper's pipeline runs the frozen ViT-B/16 on the full and the foreground view of every
  image of every step (batch 4 → 8 images per step); its per-step time is measured on
  `--encode-steps` steps (random weights) and multiplied by the number of steps.

Engine and eager runs alternate, `--runs` times each; the medians are compared.

    python benchmarks/bench_training.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_grid import MonitorClock, bare_bmm_gflops, step_flops
from fvgpt_cache.evaluation import curve_data
from fvgpt_cache.store import open_cache
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.engine import train_head
from fvgpt_cache.training import TrainConfig, build_head, epoch_batches, lr_at_epoch, prepare, view_schedule


def eager_loop(data, cfg: TrainConfig) -> float:
    """The same training with autograd and torch.optim; returns seconds."""
    start = time.perf_counter()
    head = build_head(data.full.shape[-1], cfg)
    n, views = data.full.shape[:2]
    flat = lambda t: t.flatten(0, 1)  # noqa: E731
    frozen = head.frozen(flat(data.full), flat(data.fg), flat(data.clip), flat(data.area),
                         data.y.repeat_interleave(views), data.txt_bb, data.txt_clip, data.scale)
    params = [p for p in head.parameters()]
    try:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    schedule = view_schedule(n, views, cfg.epochs, cfg.seed)
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at_epoch(epoch, cfg)
        for idx in epoch_batches(n, cfg, gen):
            rows = idx * views + schedule[epoch, idx]
            loss = head.losses_from({k: v[rows] for k, v in frozen.items()}, data.txt_bb, data.scale, cfg.lambda_d,
                                    **cfg.loss_flags())["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--views", type=int, default=11)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--encode-steps", type=int, default=3)
    ap.add_argument("--model", default="ViT-B-16")
    args = ap.parse_args(argv)

    cfg = TrainConfig(device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cache = open_cache(write_feature_cache(Path(tmp) / "bench.h5", num_classes=args.classes, shots=args.shots,
                                               views=args.views, dim=args.dim, test_per_class=25))
        data = prepare(cache, cfg)
        curve = curve_data(cache, data.meta["backbone"], cfg.classes)
        train_head(data, TrainConfig(epochs=2, device="cpu"))  # warm-up
        train_head(data, TrainConfig(epochs=2, device="cpu"), curve=curve)
        eager_loop(data, TrainConfig(epochs=2))
        train_head(data, TrainConfig(epochs=2, device="cpu"), backward="autograd")
        engine, autograd, curves, eager, shares = [], [], [], [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            train_head(data, cfg)
            engine.append(time.perf_counter() - start)
            start = time.perf_counter()
            train_head(data, cfg, backward="autograd")
            autograd.append(time.perf_counter() - start)
            with MonitorClock() as clock:
                start = time.perf_counter()
                train_head(data, cfg, curve=curve)
                curves.append(time.perf_counter() - start)
            shares.append(clock.seconds / curves[-1])
            eager.append(eager_loop(data, cfg))
    n_images = len(data.y)
    steps = cfg.epochs * (n_images // cfg.batch_size)
    result = {"train_images": n_images, "views": args.views, "dim": args.dim, "steps": steps,
              "torch_threads": torch.get_num_threads(),
              "engine_seconds": [round(t, 3) for t in engine], "eager_seconds": [round(t, 3) for t in eager],
              "engine_ms_per_step": round(1000 * statistics.median(engine) / steps, 3),
              "engine_autograd_seconds": [round(t, 3) for t in autograd],
              "ratio_autograd_vs_manual": round(statistics.median(autograd) / statistics.median(engine), 3),
              "engine_with_curves_seconds": [round(t, 3) for t in curves],
              "ratio_curves_vs_engine": round(statistics.median(curves) / statistics.median(engine), 3),
              "curves_share_of_run": round(statistics.median(shares), 3),
              "ratio_engine_vs_eager": round(statistics.median(engine) / statistics.median(eager), 3)}
    classes = len(data.txt_bb)
    flops = step_flops(1, cfg.batch_size, classes, args.dim, cfg.fdc_hidden)
    floor = steps * flops / (1e9 * bare_bmm_gflops(1, cfg.batch_size, classes, args.dim, cfg.fdc_hidden, steps=steps))
    result.update(products_seconds=round(floor, 3),
                  ratio_products_vs_eager=round(floor / statistics.median(eager), 3))

    if args.encode_steps:
        from fvgpt_cache.extraction import encode_images
        from fvgpt_cache.models import load_clip

        loaded = load_clip(args.model, "none")
        size = loaded.preprocess["size"]
        pixels = torch.randn(2 * cfg.batch_size, 3, size, size)  # full + foreground view of one batch
        encode_images(loaded.model, pixels, torch.device("cpu"))
        start = time.perf_counter()
        for _ in range(args.encode_steps):
            encode_images(loaded.model, pixels, torch.device("cpu"))
        per_step = (time.perf_counter() - start) / args.encode_steps
        result.update(encoder_seconds_per_step=round(per_step, 3),
                      image_based_seconds_estimated=round(per_step * steps, 1),
                      ratio_image_vs_engine=round(per_step * steps / statistics.median(engine), 1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
