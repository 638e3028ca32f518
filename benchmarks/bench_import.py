"""Backbone import throughput (PromptSRC, MMRL) vs. the bare image encoder, side by side in one run.

End to end: `fvgpt_cache.backbones.import_backbone` on a cache of generated JPEGs with masks
(checkpoint, model check, text features, the CLIP check of one image per split, then the pass:
decode, the stored views rebuilt, full + foreground, the prompted forward, HDF5 writes; then the
final copy of the cache). Pass: the pass alone (first to last progress call). Prompted: the same
forward on pre-built tensors. Bare: open_clip's
`encode_image` on the same pre-built tensors, same batch size and device. The ratio (import images/s
÷ bare images/s) is the share of encoder speed the import keeps (goal ≥ 0.8). On a busy machine
single timings swing; `--interleave R` also times bare, PromptSRC and MMRL forwards of one batch
in turn R times and reports the medians.

The checkpoints are random tensors of the official shapes for the model (PromptSRC: 4 + 4 context
tokens, depth 9/9; MMRL: 5 tokens, REP_DIM 512, 7 representation layers); speed does not depend on
their values. Run it with OMP_NUM_THREADS=1 when the other core is busy.

    python benchmarks/bench_import.py                     # ViT-B-16, random weights, CPU, 24 images
    python benchmarks/bench_import.py --images 256 --device cuda --pretrained openai
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_extraction import write_images
from fvgpt_cache.backbones import ImportOptions, import_backbone
from fvgpt_cache.methods import backbone_method
from fvgpt_cache.data import generic_dataset
from fvgpt_cache.device import resolve_device
from fvgpt_cache.extraction import ExtractOptions, encode_images, extract, run_encoder
from fvgpt_cache.models import load_clip


def random_checkpoint(method: str, model, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: 0.02 * torch.randn(*shape, generator=g)  # noqa: E731
    wt, wv = model.token_embedding.weight.shape[1], model.visual.conv1.weight.shape[0]
    if method == "promptsrc":
        state = {"prompt_learner.ctx": rnd(4, wt).half(), "image_encoder.VPT": rnd(4, wv)}
        for i in range(1, 9):
            state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = rnd(4, wv)
            state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = rnd(4, wt)
        return state
    state = {"representation_learner.compound_rep_tokens": rnd(5, 512), "image_encoder.proj_rep": rnd(*model.visual.proj.shape)}
    for i in range(7):
        for tower, width in (("v", wv), ("t", wt)):
            state[f"representation_learner.compound_rep_tokens_r2{tower}proj.{i}.weight"] = rnd(width, 512)
            state[f"representation_learner.compound_rep_tokens_r2{tower}proj.{i}.bias"] = rnd(width)
    return state


def timed(fn, n: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--pretrained", default="none", help="speed does not depend on the weights")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", default="promptsrc,mmrl")
    ap.add_argument("--interleave", type=int, default=5, help="rounds of the interleaved forward timing (0: skip)")
    ap.add_argument("--interleave-batch", type=int, default=2)
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    loaded = load_clip(args.model, args.pretrained, device=device)
    model, size = loaded.model, loaded.preprocess["size"]
    pixels = torch.randn(args.batch_size * 2, 3, size, size)  # full + fg views of one batch
    n_batches = -(-args.images // args.batch_size)
    result = {"model": args.model, "device": str(device), "images": args.images, "batch_size": args.batch_size,
              "workers": args.workers, "torch_threads": torch.get_num_threads()}
    encode_images(model, pixels[:2], device)  # warm-up (kernel selection, allocator)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = generic_dataset(*write_images(tmp, args.images))
        cache = extract(ds, loaded, tmp / "bench.h5", ExtractOptions(shots=0, train_views=1,  # 2 views per image
                                                                     batch_size=args.batch_size, workers=args.workers,
                                                                     device=str(device))).out
        bare_rate = lambda: n_batches * args.batch_size / timed(  # noqa: E731
            lambda: encode_images(model, pixels, device), n_batches, device)
        for method in args.methods.split(","):
            path = tmp / f"{method}.pth"
            torch.save({"state_dict": random_checkpoint(method, model), "epoch": 1}, path)
            options = ImportOptions(batch_size=args.batch_size, workers=args.workers, device=str(device))
            before = bare_rate()  # measured right before and after, so a busy machine hits both sides alike
            stamps = []
            summary = import_backbone(cache, method, path, options, loaded=loaded,
                                      progress=lambda *_: stamps.append(time.perf_counter()))
            end_to_end = args.images / summary.seconds
            image_pass = args.images / (stamps[-1] - stamps[0])  # first to last progress call: the pass alone
            backbone = backbone_method(method).load_importer().from_state(torch.load(path, weights_only=True)["state_dict"], model, str(path))
            backbone.to(device)
            forward = lambda b=backbone: run_encoder(lambda x: b.image_features(model, x), pixels, device)  # noqa: E731
            prompted = n_batches * args.batch_size / timed(forward, n_batches, device)
            bare = (before + bare_rate()) / 2
            result[method] = {"import_images_per_s": round(end_to_end, 2), "pass_images_per_s": round(image_pass, 2),
                              "prompted_forward_images_per_s": round(prompted, 2),
                              "bare_encoder_images_per_s": round(bare, 2),
                              "ratio_import_to_bare": round(end_to_end / bare, 3),
                              "ratio_pass_to_bare": round(image_pass / bare, 3),
                              "ratio_prompted_forward_to_bare": round(prompted / bare, 3)}
    if args.interleave:
        x = torch.randn(args.interleave_batch, 3, size, size)
        fns = {"bare": lambda: run_encoder(model.encode_image, x, device)}
        for method in args.methods.split(","):
            backbone = backbone_method(method).load_importer().from_state(random_checkpoint(method, model), model, method).to(device)
            fns[method] = lambda b=backbone: run_encoder(lambda t: b.image_features(model, t), x, device)
        seconds = {k: [] for k in fns}
        for _ in range(args.interleave):
            for k, fn in fns.items():
                seconds[k].append(timed(fn, 1, device))
        median = {k: sorted(v)[len(v) // 2] for k, v in seconds.items()}
        result["interleaved"] = {"batch": args.interleave_batch, "rounds": args.interleave,
                                 "median_seconds": {k: round(v, 3) for k, v in median.items()},
                                 "ratio_to_bare": {k: round(median["bare"] / v, 3) for k, v in median.items() if k != "bare"}}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
