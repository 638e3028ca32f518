"""Pretrain the tiny CLIP of the synthetic world (fvgpt_cache.world) with open_clip's CLIP and loss.

A small ModifiedResNet image tower (64 px) and a 3-layer text transformer learn from captioned
images drawn from the world's natural mixture (most shapes in their own habitat beside their
companion, some in another class's context, some in none), so the model learns to read the
context as well as the shape, as web-trained CLIP does. Images are augmented with random resized
crops (scale 0.08–1, the views FVG-PT trains on) and flips, so crops are encoded as well as whole
images. A fraction of every batch are hard negatives: pairs in the same context, different shapes.

Reproducible from --seed (the data of a step depends only on (seed, step)); checkpoints every
--save-every steps and resumes from the last one. `--export` writes the shipped files: fp16
weights with the token rows the world never uses set to zero (they compress to nothing), the
model config, and the training curve.

    OMP_NUM_THREADS=1 python benchmarks/pretrain_world.py --steps 4000 --out cache/world-pretrain
    python benchmarks/pretrain_world.py --out cache/world-pretrain --export fvgpt_cache/assets

Variants measured in the README: `--init WEIGHTS` continues from exported weights with a fresh
optimiser, `--isolated P` shows a fraction P of every batch as a shape alone on a plain background,
`--mix OWN,OTHER,NONE` changes the context mixture of the pretraining scenes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer

from fvgpt_cache.world import (
    CAPTIONS, COLORS, NATURAL_MIX, SHAPES, SIZE, SPLITS, TEXTURES, caption, render, sample_natural, sample_scene, swap_partner,
)

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": SIZE, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def to_tensor(images) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def random_resized_crops(x: torch.Tensor, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                         p: float = 1.0) -> torch.Tensor:
    """Random resized crop + horizontal flip of each image of a batch (bilinear), with probability p each."""
    n = x.shape[0]
    area = rng.uniform(*scale, size=n)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), size=n))
    w = np.minimum(np.sqrt(area * aspect), 1.0)
    h = np.minimum(np.sqrt(area / aspect), 1.0)
    cx = rng.uniform(w / 2, 1 - w / 2) * 2 - 1
    cy = rng.uniform(h / 2, 1 - h / 2) * 2 - 1
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    keep = rng.random(n) >= p
    w, h, cx, cy = (np.where(keep, d, v) for v, d in ((w, 1.0), (h, 1.0), (cx, 0.0), (cy, 0.0)))
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.from_numpy(w * np.where(keep, 1.0, flip)).float()
    theta[:, 0, 2] = torch.from_numpy(cx).float()
    theta[:, 1, 1] = torch.from_numpy(h).float()
    theta[:, 1, 2] = torch.from_numpy(cy).float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def isolated(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A shape alone on a plain background of a random RGB colour (web CLIP's product photos), captioned
    by its shape and sometimes its colour. The background is kept away from the shape's colour."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    while True:
        bg = rng.integers(0, 256, size=3)
        if np.abs(bg - np.array(COLORS[color])).sum() > 120:
            break
    scene = sample_scene(rng, shape=shape, texture_name="plain", bg_colors=(color, color), color=color)
    img, mask = render(scene, rng)
    pixels = np.where(np.asarray(mask)[..., None] > 127, np.asarray(img), bg.astype(np.uint8))
    template = ("a photo of a {shape}.", "a {shape}.", "a {color} {shape}.")[rng.integers(3)]
    return Image.fromarray(pixels.astype(np.uint8)), template.format(shape=shape, color=color)


def batch(rng: np.random.Generator, size: int, hard: float, isolated_p: float = 0.0,
          mix: tuple[float, float, float] = NATURAL_MIX) -> tuple[list, list[str]]:
    """Scenes of the natural mixture `mix`; a fraction `hard` of hard-negative pairs (same context, other
    shapes); a fraction `isolated_p` of isolated shapes on plain backgrounds (`isolated`)."""
    images, texts = [], []
    n_isolated = int(round(size * isolated_p))
    for _ in range(n_isolated):
        image, text = isolated(rng)
        images.append(image)
        texts.append(text)
    size -= n_isolated
    n_pairs = int(size * hard) // 2
    for _ in range(size - 2 * n_pairs):
        scene = sample_natural(rng, int(rng.integers(len(SHAPES))), mix=mix)
        images.append(render(scene, rng)[0])
        texts.append(caption(scene, rng))
    for _ in range(n_pairs):
        first = sample_natural(rng, int(rng.integers(len(SHAPES))), mix=mix)
        other = SHAPES[(SHAPES.index(first.shape) + 1 + rng.integers(len(SHAPES) - 1)) % len(SHAPES)]
        for shape in (first.shape, other):
            scene = sample_scene(rng, shape=shape, texture_name=first.texture, bg_colors=first.bg_colors,
                                 companion=first.companion)
            images.append(render(scene, rng)[0])
            texts.append(caption(scene, rng))
    return images, texts


def test_scenes(split: str, label: int, rng: np.random.Generator):
    if split == "clean":
        return sample_scene(rng, shape=SHAPES[label])
    if split == "counterfactual":
        return sample_scene(rng, shape=SHAPES[label], context=swap_partner(label))
    return sample_natural(rng, label)


@torch.no_grad()
def zero_shot(model, tokenizer, per_class: int = 10, seed: int = 12345) -> dict:
    """10-way zero-shot accuracy (%) with 'a photo of a {}.' on base (first 10 shapes) and new (last 10)
    classes, for each test split of the world, and on random resized crops of natural images."""
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in SHAPES])), dim=-1)
    out = {}
    for split in (*SPLITS, "natural crops"):
        rng = np.random.default_rng([seed, len(split)])
        labels = [c for c in range(len(SHAPES)) for _ in range(per_class)]
        x = to_tensor([render(test_scenes(split.split()[0], c, rng), rng)[0] for c in labels])
        if split.endswith("crops"):
            x = random_resized_crops(x, rng)
        sims = F.normalize(model.encode_image(x), dim=-1) @ text.T
        y = torch.tensor(labels)
        for name, lo in (("base", 0), ("new", 10)):
            rows = (y >= lo) & (y < lo + 10)
            pred = sims[rows][:, lo:lo + 10].argmax(-1) + lo
            out[f"{split} {name}"] = round(100 * float((pred == y[rows]).float().mean()), 1)
    model.train()
    return out


def world_vocabulary(tokenizer: SimpleTokenizer) -> list[int]:
    """Token ids any world caption or CoOp-style prompt can use (shapes, colours, textures, templates)."""
    words = set()
    for template in (*CAPTIONS, "a photo of a {shape}.", "X X X X {shape}.", "{shape} texture."):
        for shape in SHAPES:
            for color in COLORS:
                for tex in TEXTURES:
                    words.add(template.format(shape=shape, color=color, texture=tex, bg0=color, bg1=color,
                                              companion=shape))
    ids = set()
    for text in words:
        ids.update(tokenizer.encode(text))
    ids.update([tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]])
    return sorted(ids)


class CompactTokenizer:
    """open_clip's tokenizer with ids mapped onto the world's small vocabulary (training only: the
    exported model has the full 49,408-row table, zero outside the world's tokens)."""

    def __init__(self, tokenizer: SimpleTokenizer):
        self.tokenizer, self.vocab = tokenizer, world_vocabulary(tokenizer)
        self.lookup = torch.full((len(tokenizer.encoder),), -1, dtype=torch.long)
        self.lookup[0] = 0  # padding
        self.lookup[torch.tensor(self.vocab)] = torch.arange(1, len(self.vocab) + 1)

    def __call__(self, texts):
        ids = self.lookup[self.tokenizer(texts)]
        if (ids < 0).any():
            raise ValueError("a caption uses a token outside the world vocabulary")
        return ids


def export(model: CLIP, compact: CompactTokenizer, folder: Path, curve: list[dict], meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    table = torch.zeros(MODEL_CFG["text_cfg"]["vocab_size"], state["token_embedding.weight"].shape[1])
    table[torch.tensor(compact.vocab)] = state["token_embedding.weight"][1:]
    state["token_embedding.weight"] = table
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}, folder / "world-clip.pt")
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD),
                                                         "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "world-clip.json").write_text(json.dumps(config, indent=1))
    sha = hashlib.sha256((folder / "world-clip.pt").read_bytes()).hexdigest()
    (folder / "world-clip-training.json").write_text(json.dumps({**meta, "sha256": sha, "curve": curve}, indent=1))


def init_from(model: CLIP, compact: CompactTokenizer, weights: Path) -> None:
    """Load weights `export` wrote into a training model: the full token table back to the compact one."""
    state = {k: v.float() for k, v in torch.load(weights, map_location="cpu", weights_only=True).items()}
    table = state["token_embedding.weight"]
    state["token_embedding.weight"] = torch.cat([table[:1], table[torch.tensor(compact.vocab)]])
    model.load_state_dict(state)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--hard", type=float, default=0.5, help="fraction of each batch in hard-negative pairs")
    ap.add_argument("--crop-p", type=float, default=0.5, help="fraction of images given a random resized crop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one leaves a core free)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--out", type=Path, default=Path("cache/world-pretrain"))
    ap.add_argument("--export", type=Path, default=None, help="write the shipped files from the last checkpoint")
    ap.add_argument("--export-step", type=int, default=None,
                    help="export the weights snapshot of this evaluated step instead of the last checkpoint")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--isolated", type=float, default=0.0,
                    help="fraction of each batch showing a shape alone on a plain background (product photos)")
    ap.add_argument("--mix", default=None, help="pretraining context mixture own,other,none (default: NATURAL_MIX)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from exported weights (a world-clip.pt) with a fresh optimiser: continued pretraining")
    args = ap.parse_args(argv)

    mix = tuple(float(x) for x in args.mix.split(",")) if args.mix else NATURAL_MIX
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    compact = CompactTokenizer(SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"]))
    train_cfg = {**MODEL_CFG, "text_cfg": {**MODEL_CFG["text_cfg"], "vocab_size": len(compact.vocab) + 1}}
    model = CLIP(**train_cfg)
    if args.init is not None:
        init_from(model, compact, args.init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "last.pt"
    step, curve, elapsed = 0, [], 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
        curve = json.loads(ckpt["curve"])
        print(f"resumed at step {step}", flush=True)
    if args.export:
        if args.export_step is not None:
            snapshot = args.out / f"step{args.export_step}.pt"
            if not snapshot.exists():
                raise SystemExit(f"no snapshot {snapshot}; snapshots exist for the evaluated steps of the curve")
            model.load_state_dict(torch.load(snapshot, map_location="cpu", weights_only=True))
            step = args.export_step
            curve = [c for c in curve if c["step"] <= step]
        export(model, compact, args.export, curve,
               {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "hard": args.hard, "crop_p": args.crop_p,
                "isolated": args.isolated, "mix": list(mix), "init": str(args.init) if args.init else None, "warmup": args.warmup,
                "seed": args.seed, "threads": args.threads, "seconds": elapsed,
                "command": f"python benchmarks/pretrain_world.py --steps {step} --batch-size {args.batch_size} "
                           f"--lr {args.lr} --warmup {args.warmup} --hard {args.hard} --crop-p {args.crop_p} "
                           f"--isolated {args.isolated} --mix {','.join(map(str, mix))} --seed {args.seed}"
                           + (f" --init {args.init}" if args.init else "")})
        print(f"exported step {step} to {args.export}")
        return
    model.train()
    start = time.perf_counter()
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])  # data depends only on (seed, step): resumes reproduce
        images, texts = batch(rng, args.batch_size, args.hard, args.isolated, mix)
        x = random_resized_crops(to_tensor(images), rng, p=args.crop_p)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(step / args.steps, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            img_f, txt_f, scale = model(x, compact(texts))
            loss = loss_fn(img_f.float(), txt_f.float(), scale.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            acc = zero_shot(model, compact)
            now = elapsed + time.perf_counter() - start
            curve.append({"step": step, "loss": round(float(loss.detach()), 4), "seconds": round(now, 1),
                          "logit_scale": round(float(model.logit_scale.detach().exp()), 1), **acc})
            print(json.dumps(curve[-1]), flush=True)
            torch.save(model.state_dict(), args.out / f"step{step}.pt")  # weights only, for --export-step
        if step % args.save_every == 0 or step == args.steps:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "elapsed": elapsed + time.perf_counter() - start, "curve": json.dumps(curve)},
                       args.out / "last.tmp")
            (args.out / "last.tmp").replace(ckpt_path)


if __name__ == "__main__":
    main()
