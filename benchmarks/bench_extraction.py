"""Extraction throughput vs. the bare image encoder, side by side in one run.

End to end: `fvgpt_cache.extraction.extract` on generated JPEGs with masks (decode, paired
transforms, full + foreground views, encode, HDF5 writes). Bare: the same model's
`encode_image` on pre-built tensors of the same number of views, same batch size and device.
The ratio (extraction images/s ÷ bare images/s) is the share of encoder speed the pipeline
keeps; on a GPU decoding must overlap the encoder (goal ≥ 0.9).

    python benchmarks/bench_extraction.py                      # ViT-B-16, random weights, CPU
    python benchmarks/bench_extraction.py --images 512 --device cuda --pretrained openai
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fvgpt_cache.data import generic_dataset
from fvgpt_cache.device import resolve_device
from fvgpt_cache.extraction import ExtractOptions, encode_images, extract
from fvgpt_cache.models import load_clip


def write_images(root: Path, n: int, classes: int = 4, size=(500, 375), train_every: int = 0) -> tuple[Path, Path, Path]:
    """JPEGs of random pixels with a centred rectangular mask, and a split file. Training images: the first of
    each class (a split file needs one), or every `train_every`-th image when given; the rest are test images."""
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for i in range(n):
        rel = f"c{i % classes}/{i:05d}.jpg"
        img = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = 255
        for base, arr, suffix in ((root / "images", img, ".jpg"), (root / "masks", mask, ".png")):
            path = (base / rel).with_suffix(suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
        train = i % train_every == 1 if train_every else i < classes
        split["train" if train else "test"].append([rel, i % classes, f"class {i % classes}"])
    (root / "split.json").write_text(json.dumps(split))
    return root / "split.json", root / "images", root / "masks"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--pretrained", default="none", help="speed does not depend on the weights")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    loaded = load_clip(args.model, args.pretrained, device=device)
    size = loaded.preprocess["size"]
    with tempfile.TemporaryDirectory() as tmp:
        ds = generic_dataset(*write_images(Path(tmp), args.images))
        # one view per image everywhere (train view 0 only), so both sides encode 2 views per image
        options = ExtractOptions(shots=0, train_views=1, batch_size=args.batch_size, workers=args.workers,
                                 device=str(device))
        # warm-up both paths once (kernel selection, allocator)
        encode_images(loaded.model, torch.randn(2, 3, size, size), device)
        summary = extract(ds, loaded, Path(tmp) / "bench.h5", options)
        end_to_end = args.images / summary.seconds

    pixels = torch.randn(args.batch_size * 2, 3, size, size)  # full + fg views of one batch
    n_batches = -(-args.images // args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n_batches):
        encode_images(loaded.model, pixels, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    bare = n_batches * args.batch_size / (time.perf_counter() - start)

    result = {
        "model": args.model, "device": str(device), "images": args.images, "batch_size": args.batch_size,
        "workers": args.workers, "torch_threads": torch.get_num_threads(),
        "extract_images_per_s": round(end_to_end, 2), "bare_encoder_images_per_s": round(bare, 2),
        "ratio": round(end_to_end / bare, 3),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
