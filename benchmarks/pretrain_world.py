"""Pretrain the tiny CLIP of the synthetic world (fvgpt_cache.world) with open_clip's CLIP and loss.

A small ModifiedResNet image tower (64 px) and a 3-layer text transformer learn from generated
captioned images; half of every batch are hard negatives (pairs with the same background and
colour but different shapes). Reproducible from --seed; checkpoints every --save-every steps and
resumes from the last one. `--export` writes the shipped files: fp16 weights with the token
rows the world never uses set to zero (they compress to nothing), and the model config.

    python benchmarks/pretrain_world.py --steps 6000 --out cache/world-pretrain
    python benchmarks/pretrain_world.py --out cache/world-pretrain --export fvgpt_cache/assets
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer

from fvgpt_cache.world import CAPTIONS, COLORS, SHAPES, TEXTURES, caption, render, sample_scene

MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def to_tensor(images) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def batch(rng: np.random.Generator, size: int) -> tuple[list, list[str]]:
    """Half random scenes, half hard-negative pairs (same background and colour, other shapes)."""
    images, texts = [], []
    for _ in range(size // 2):
        scene = sample_scene(rng)
        img, _ = render(scene, rng)
        images.append(img)
        texts.append(caption(scene, rng))
    while len(images) < size:
        first = sample_scene(rng)
        other = SHAPES[(SHAPES.index(first.shape) + 1 + rng.integers(len(SHAPES) - 1)) % len(SHAPES)]
        for shape in (first.shape, other):
            scene = sample_scene(rng, shape=shape, texture_name=first.texture, bg_colors=first.bg_colors,
                                 color=first.color)
            img, _ = render(scene, rng)
            images.append(img)
            texts.append(caption(scene, rng))
    return images[:size], texts[:size]


@torch.no_grad()
def zero_shot(model, tokenizer, per_class: int = 20, seed: int = 12345) -> dict:
    """10-way zero-shot accuracy on base (first 10 shapes) and new (last 10) with 'a photo of a {}.'."""
    model.eval()
    rng = np.random.default_rng(seed)
    out = {}
    for name, classes in (("base", SHAPES[:10]), ("new", SHAPES[10:])):
        text = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in classes])), dim=-1)
        correct = total = 0
        for label, shape in enumerate(classes):
            imgs = [render(sample_scene(rng, shape=shape), rng)[0] for _ in range(per_class)]
            feats = F.normalize(model.encode_image(to_tensor(imgs)), dim=-1)
            correct += int(((feats @ text.T).argmax(-1) == label).sum())
            total += per_class
        out[name] = 100 * correct / total
    model.train()
    return out


def world_vocabulary(tokenizer: SimpleTokenizer) -> list[int]:
    """Token ids any world caption or CoOp-style prompt can use (shapes, colours, textures, templates)."""
    words = set()
    for template in (*CAPTIONS, "a photo of a {shape}.", "X X X X {shape}.", "{shape} texture."):
        for shape in SHAPES:
            for color in COLORS:
                for tex in TEXTURES:
                    words.add(template.format(shape=shape, color=color, texture=tex, bg0=color, bg1=color))
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
    (folder / "world-clip-training.json").write_text(json.dumps({**meta, "curve": curve}, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--out", type=Path, default=Path("cache/world-pretrain"))
    ap.add_argument("--export", type=Path, default=None, help="write the shipped files from the last checkpoint")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    compact = CompactTokenizer(SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"]))
    train_cfg = {**MODEL_CFG, "text_cfg": {**MODEL_CFG["text_cfg"], "vocab_size": len(compact.vocab) + 1}}
    model = CLIP(**train_cfg)
    tokenizer = compact
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
        print(f"resumed at step {step}")
    if args.export:
        export(model, compact, args.export, curve,
               {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "seconds": elapsed,
                "command": f"python benchmarks/pretrain_world.py --steps {step} --batch-size {args.batch_size} "
                           f"--lr {args.lr} --seed {args.seed}"})
        print(f"exported step {step} to {args.export}")
        return
    model.train()
    start = time.perf_counter()
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])  # data depends only on (seed, step): resumes reproduce
        images, texts = batch(rng, args.batch_size)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(step / args.steps, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            img_f, txt_f, scale = model(to_tensor(images), tokenizer(texts))
            loss = loss_fn(img_f.float(), txt_f.float(), scale.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            acc = zero_shot(model, tokenizer)
            now = elapsed + time.perf_counter() - start
            curve.append({"step": step, "loss": round(float(loss.detach()), 4), "seconds": round(now, 1), **acc})
            print(json.dumps(curve[-1]), flush=True)
        if step % args.save_every == 0 or step == args.steps:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "elapsed": elapsed + time.perf_counter() - start, "curve": json.dumps(curve)},
                       args.out / "last.tmp")
            (args.out / "last.tmp").replace(ckpt_path)


if __name__ == "__main__":
    main()
