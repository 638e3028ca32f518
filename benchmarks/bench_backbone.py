"""CoOp step time from the cache vs. from images, same model, batch and device.

From the cache a CoOp step runs the text encoder over every class prompt (forward and backward
through the learned context) and reads the batch's image features. From images it must also
run the frozen image encoder on the batch. Both are timed here side by side on random-weight
ViT-B/16 (speed does not depend on the weights); the ratio is images ÷ cache.

    python benchmarks/bench_backbone.py --classes 50 --batch-size 4 --steps 3
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from fvgpt_cache.device import resolve_device
from fvgpt_cache.extraction import encode_images
from fvgpt_cache.models import load_clip
from fvgpt_cache.prompts import PromptLearner


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--classes", type=int, default=50, help="base classes in the prompt batch")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    loaded = load_clip(args.model, "none", device=device)
    model = loaded.model
    names = [f"class number {i}" for i in range(args.classes)]
    learner = PromptLearner(model, loaded.tokenizer, names, n_ctx=4).to(device)
    opt = torch.optim.SGD([learner.ctx], lr=0.0035, momentum=0.9)
    dim = model.text_projection.shape[1]
    size = loaded.preprocess["size"]
    cached = F.normalize(torch.randn(args.batch_size, dim, device=device), dim=-1)
    pixels = torch.randn(args.batch_size, 3, size, size)
    y = torch.randint(0, args.classes, (args.batch_size,), device=device)

    def step(from_images: bool) -> None:
        img = encode_images(model, pixels, device).to(device) if from_images else cached
        logits = 100 * img @ F.normalize(learner(), dim=-1).T
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()

    def timed(from_images: bool) -> float:
        step(from_images)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(from_images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    cache_s, image_s = timed(False), timed(True)
    result = {"model": args.model, "device": str(device), "classes": args.classes, "batch_size": args.batch_size,
              "seconds_per_step_from_cache": round(cache_s, 3), "seconds_per_step_from_images": round(image_s, 3),
              "ratio": round(image_s / cache_s, 2)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
