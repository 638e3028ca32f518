"""A small synthetic dataset with exact masks: shapes on textured backgrounds (used by `demo`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon")
TEXTURES = ("plain", "stripes", "checker", "dots", "noise", "gradient")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    sides = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}
    if shape == "star":
        pts = [(r if k % 2 == 0 else r * 0.45, math.pi * k / 5) for k in range(10)]
    else:
        n = sides[shape]
        offset = math.pi / 4 if shape == "diamond" else 0.0
        pts = [(r, 2 * math.pi * k / n + offset) for k in range(n)]
    return [(cx + d * math.cos(a + angle), cy + d * math.sin(a + angle)) for d, a in pts]


def draw_shape(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """The binary mask (mode 'L', 0/255) of one shape."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=0)
    elif shape == "cross":
        w = r / 3
        for box in ([cx - r, cy - w, cx + r, cy + w], [cx - w, cy - r, cx + w, cy + r]):
            d.rectangle(box, fill=255)
    else:
        d.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return mask


def texture(kind: str, size: int, colors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 background of one texture kind in two colours."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(4, 10))
    if kind == "plain":
        t = np.zeros((size, size))
    elif kind == "stripes":
        t = ((xx + yy) // period) % 2
    elif kind == "checker":
        t = ((xx // period) + (yy // period)) % 2
    elif kind == "dots":
        t = (((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2) < (period / 3) ** 2
    elif kind == "noise":
        t = rng.random((size, size)) > 0.5
    elif kind == "gradient":
        t = xx / (size - 1)
    else:
        raise ValueError(f"unknown texture {kind!r}; choose from {TEXTURES}")
    t = np.asarray(t, dtype=np.float32)[..., None]
    return (colors[0] * (1 - t) + colors[1] * t).astype(np.uint8)


def render(shape: str, size: int, rng: np.random.Generator, background: str | None = None):
    """One image and its exact mask: a random-coloured shape on a random texture."""
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    mask = draw_shape(shape, size, cx, cy, r, rng.uniform(0, 2 * math.pi))
    bg = texture(background or TEXTURES[rng.integers(len(TEXTURES))], size, rng.integers(0, 256, (2, 3)), rng)
    fg_color = rng.integers(0, 256, 3).astype(np.uint8)
    m = np.asarray(mask)[..., None] > 127
    img = np.where(m, fg_color, bg).astype(np.uint8)
    return Image.fromarray(img), mask


def write_shapes_dataset(root: Path, num_classes: int = 6, per_class: tuple[int, int, int] = (16, 4, 10),
                         size: int = 64, seed: int = 0) -> tuple[Path, Path, Path]:
    """Images, mirrored PNG masks and a CoOp-style split JSON under `root`. Deterministic in `seed`."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be between 2 and {len(SHAPES)}, got {num_classes}")
    rng = np.random.default_rng(seed)
    image_root, mask_root = root / "images", root / "masks"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, shape in enumerate(SHAPES[:num_classes]):
        for split_name, count in zip(split, per_class):
            for i in range(count):
                rel = f"{shape}/{split_name}_{i:03d}.png"
                img, mask = render(shape, size, rng)
                for base, im in ((image_root, img), (mask_root, mask)):
                    (base / rel).parent.mkdir(parents=True, exist_ok=True)
                    im.save(base / rel)
                split[split_name].append([rel, label, shape])
    split_file = root / "split.json"
    split_file.write_text(json.dumps(split))
    return split_file, image_root, mask_root


def write_feature_cache(path: Path, num_classes: int = 10, shots: int = 16, views: int = 2, dim: int = 64,
                        test_per_class: int = 20, seed: int = 0, signal: float = 0.5, background: float = 0.5,
                        noise: float = 0.35, text_noise: float = 0.5, backbone: str | None = "synthetic_bb",
                        logit_scale: float = 100.0) -> Path:
    """A cache of synthetic CLIP-like features, no images (tests and benchmarks that need size fast).

    Like CLIP, image and text features share a modality direction each (g_img, g_txt), so
    image-text cosines sit in a narrow band and logits differ by a few units at scale s = 100.
    Full views: n(g_img + signal·μ_c + background·β + noise·ε); foreground views drop the
    background term β (one of 8 shared background directions). CLIP text: n(g_txt + μ_c +
    text_noise·ε); the optional backbone text group is fitted better (text_noise/2).
    """
    from .data import base_new_split
    from .store import write_cache, write_text_group

    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def eps(*shape):
        return unit(rng.standard_normal(shape))

    g_img, g_txt = eps(dim), eps(dim)
    centres = eps(num_classes, dim)
    backgrounds = eps(8, dim)

    def split(n_per_class: int, v: int):
        labels = np.repeat(np.arange(num_classes), n_per_class)
        mu = signal * centres[labels][:, None, :]
        bg = background * backgrounds[rng.integers(0, len(backgrounds), (labels.size, v))]
        full = unit(g_img + mu + bg + noise * eps(labels.size, v, dim))
        fg = unit(g_img + mu + noise * eps(labels.size, v, dim))
        area = rng.uniform(0.05, 0.9, (labels.size, v)).astype(np.float32)
        return labels, full, fg, area

    base, new = base_new_split(num_classes)
    data = {"train": split(shots, views), "val": split(min(shots, 4), 1), "test": split(test_per_class, 1)}
    text = unit(g_txt + centres + text_noise * eps(num_classes, dim))
    provenance = {"model": "synthetic-features", "pretrained": "none", "random_init": True, "dataset": Path(path).stem,
                  "preprocess": {"size": 0}, "shots": shots, "seed": seed, "views": {"train": views, "val": 1, "test": 1}}
    write_cache(path, classnames=[f"class {c}" for c in range(num_classes)], base=base, new=new, text_clip=text,
                template="a photo of a {}.", images={s: {"full": d[1], "fg": d[2]} for s, d in data.items()},
                labels={s: d[0] for s, d in data.items()}, areas={s: d[3] for s, d in data.items()},
                paths={s: [f"{s}/{i}.png" for i in range(len(d[0]))] for s, d in data.items()},
                provenance=provenance, logit_scale=logit_scale)
    if backbone:
        tuned = unit(g_txt + centres + text_noise / 2 * eps(num_classes, dim))
        write_text_group(path, backbone, tuned, {"method": "synthetic", "seed": seed})
    return Path(path)
