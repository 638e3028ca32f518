"""An offline synthetic world where context misleads: shapes with exact masks, each class living
in its own habitat (a background texture in two colours) next to a small companion object.

Everything is deterministic in a seed. Images are 64×64. A scene is one main shape (the class,
the only foreground of the mask) of a random colour, size, position and small rotation, on a
background texture, and optionally a smaller *companion* shape beside it. Every class c has a
habitat `HABITATS[c]` and a companion class `COMPANIONS[c]`; in the world's *natural* mixture
(pretraining captions and the downstream train split alike) most images of c show c's context
(its habitat and companion), some the context of another class, some none. A model pretrained
on that world learns, as CLIP does from the web (the paper's Fig. 1: cows on grass), to read
the context as well as the object. Downstream test splits:

* `natural`: the same mixture as training (the i.i.d. setting of the paper's benchmarks);
* `clean`: no context at all (random background, no companion): only the shape tells the class;
* `counterfactual`: every image of class c shows the context of its partner `swap_partner(c)`
  (classes paired 0↔1, 2↔3, … within base and within new), so the context points confidently
  at another class of the same class set; the shape is unchanged.

The train and val splits depend only on the seed, not on the test split, so one backbone trained
on any of the three datasets serves all three. Downstream shapes are larger than in pretraining
scenes (`DOWNSTREAM_RADIUS` vs `RADIUS`), like the object-centric datasets of the paper. The first half of the shape classes are base
classes, the second half new ones.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon", "pentagon", "heart",
          "ellipse", "rectangle", "trapezoid", "semicircle", "crescent", "arrow", "octagon", "letter L",
          "letter T", "letter X")
TEXTURES = ("plain", "striped", "checkered", "dotted", "noisy", "gradient", "grid", "wavy")
# No colour lies near black (the pixel-mode mask fill) or near a normalisation mean (the
# normalised-mode fill: 0.5 grey of the world model, OpenAI's (123, 117, 104)); a test checks it.
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
          "orange": (240, 140, 30), "purple": (140, 60, 190), "pink": (240, 130, 190), "brown": (140, 70, 20),
          "white": (240, 240, 240), "cyan": (40, 200, 210), "navy": (30, 30, 130), "lime": (160, 235, 50)}
MASK_FILLS = {"black": (0, 0, 0), "grey (0.5 mean)": (128, 128, 128), "OpenAI mean": (123, 117, 104)}
SIZE = 64
SPLITS = ("natural", "clean", "counterfactual")
# the natural mixture: own context, another class's context, no context
NATURAL_MIX = (0.6, 0.2, 0.2)
RADIUS = (0.2, 0.32)  # the main shape's radius, as a fraction of the image side (pretraining scenes)
# downstream datasets are object-centric, like the paper's benchmarks: the object fills more of the frame
DOWNSTREAM_RADIUS = (0.27, 0.37)


def _habitats() -> tuple[tuple[str, tuple[str, str]], ...]:
    names = list(COLORS)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    order = np.random.default_rng(2024).permutation(len(pairs))
    return tuple((TEXTURES[c % len(TEXTURES)], pairs[order[c]]) for c in range(len(SHAPES)))


HABITATS = _habitats()
# the companion of class c is a small shape of class c + 7 (never c itself, never c's swap partner)
COMPANIONS = tuple(SHAPES[(c + 7) % len(SHAPES)] for c in range(len(SHAPES)))


def swap_partner(label: int, n_classes: int = len(SHAPES)) -> int:
    """The class whose context a counterfactual image of `label` shows: pairs 0↔1, 2↔3, … inside the
    base half and inside the new half (a class without a partner in its half keeps the next class's)."""
    n_base = math.ceil(n_classes / 2)
    lo, hi = (0, n_base) if label < n_base else (n_base, n_classes)
    partner = lo + ((label - lo) ^ 1)
    return partner if partner < hi else (lo if label - lo > 0 else label)


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    texture: str
    bg_colors: tuple[str, str]
    cx: float
    cy: float
    radius: float
    angle: float
    companion: str | None = None  # shape of the small companion object, None for no companion
    companion_color: str | None = None
    companion_xy: tuple[float, float] = (0.0, 0.0)
    companion_radius: float = 0.0
    context: int | None = None  # the class whose habitat and companion are drawn, None for a random background


def _regular(n: int, cx, cy, r, angle, offset=0.0):
    return [(cx + r * math.cos(2 * math.pi * k / n + angle + offset), cy + r * math.sin(2 * math.pi * k / n + angle + offset))
            for k in range(n)]


def _rotate(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _boxes(cx, cy, r, parts):
    """Polygons of axis-aligned boxes given in units of r around the centre."""
    return [[(cx + x0 * r, cy + y0 * r), (cx + x1 * r, cy + y0 * r), (cx + x1 * r, cy + y1 * r), (cx + x0 * r, cy + y1 * r)]
            for x0, y0, x1, y1 in parts]


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int = SIZE) -> Image.Image:
    """The exact binary mask (mode 'L', 0/255) of one shape; the image uses the same mask to paint it."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    fill = lambda pts: d.polygon(_rotate(pts, cx, cy, angle), fill=255)  # noqa: E731
    erase = lambda pts: d.polygon(_rotate(pts, cx, cy, angle), fill=0)  # noqa: E731
    circle = lambda rr, ox=0.0, oy=0.0, n=48: [(cx + ox + rr * math.cos(2 * math.pi * k / n),  # noqa: E731
                                                 cy + oy + rr * math.sin(2 * math.pi * k / n)) for k in range(n)]
    if shape == "circle":
        fill(circle(r))
    elif shape == "ring":
        fill(circle(r))
        erase(circle(r * 0.55))
    elif shape == "ellipse":
        fill([(cx + r * math.cos(t), cy + 0.55 * r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)])
    elif shape == "semicircle":
        fill([(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.linspace(0, math.pi, 25)])
    elif shape == "crescent":
        fill(circle(r))
        erase(circle(r * 0.85, ox=r * 0.45))
    elif shape == "heart":
        fill(circle(r * 0.5, ox=-r * 0.45, oy=-r * 0.25))
        fill(circle(r * 0.5, ox=r * 0.45, oy=-r * 0.25))
        fill([(cx - r * 0.93, cy - r * 0.1), (cx + r * 0.93, cy - r * 0.1), (cx, cy + r)])
    elif shape in ("square", "diamond"):
        fill(_regular(4, cx, cy, r, 0.0, math.pi / 4 if shape == "square" else 0.0))
    elif shape == "triangle":
        fill(_regular(3, cx, cy, r, 0.0, -math.pi / 2))
    elif shape in ("pentagon", "hexagon", "octagon"):
        fill(_regular({"pentagon": 5, "hexagon": 6, "octagon": 8}[shape], cx, cy, r, 0.0, -math.pi / 2))
    elif shape == "star":
        fill([(cx + (r if k % 2 == 0 else 0.42 * r) * math.cos(math.pi * k / 5 - math.pi / 2),
               cy + (r if k % 2 == 0 else 0.42 * r) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)])
    elif shape == "rectangle":
        fill(_boxes(cx, cy, r, [(-1, -0.45, 1, 0.45)])[0])
    elif shape == "trapezoid":
        fill([(cx - r, cy + 0.6 * r), (cx + r, cy + 0.6 * r), (cx + 0.45 * r, cy - 0.6 * r), (cx - 0.45 * r, cy - 0.6 * r)])
    elif shape == "arrow":
        fill([(cx - r, cy - 0.25 * r), (cx + 0.2 * r, cy - 0.25 * r), (cx + 0.2 * r, cy - 0.7 * r), (cx + r, cy),
              (cx + 0.2 * r, cy + 0.7 * r), (cx + 0.2 * r, cy + 0.25 * r), (cx - r, cy + 0.25 * r)])
    else:
        parts = {"cross": [(-1, -0.3, 1, 0.3), (-0.3, -1, 0.3, 1)],
                 "letter L": [(-0.6, -1, -0.1, 1), (-0.6, 0.5, 0.7, 1)],
                 "letter T": [(-0.9, -1, 0.9, -0.5), (-0.25, -1, 0.25, 1)]}.get(shape)
        if parts is not None:
            for box in _boxes(cx, cy, r, parts):
                fill(box)
        else:  # letter X: two rotated bars
            for a in (math.pi / 4, -math.pi / 4):
                d.polygon(_rotate(_boxes(cx, cy, r, [(-1, -0.22, 1, 0.22)])[0], cx, cy, angle + a), fill=255)
    return m


def texture(kind: str, colors: tuple[str, str], rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) uint8 background of one texture in two named colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = float(rng.integers(5, 11))
    phase = float(rng.uniform(0, period))
    if kind == "plain":
        t = np.zeros((size, size), np.float32)
    elif kind == "striped":
        t = (((xx + yy + phase) // period) % 2)
    elif kind == "checkered":
        t = ((((xx + phase) // period) + ((yy + phase) // period)) % 2)
    elif kind == "dotted":
        t = ((((xx + phase) % period) - period / 2) ** 2 + (((yy + phase) % period) - period / 2) ** 2) < (period / 3.2) ** 2
    elif kind == "noisy":
        t = rng.random((size, size)) > 0.5
    elif kind == "gradient":
        t = xx / (size - 1) if rng.random() < 0.5 else yy / (size - 1)
    elif kind == "grid":
        t = (((xx + phase) % period) < 1.5) | (((yy + phase) % period) < 1.5)
    elif kind == "wavy":
        t = (np.sin((yy + 3 * np.sin(xx / period * 2)) / period * math.pi) > 0)
    else:
        raise ValueError(f"unknown texture {kind!r}; textures: {', '.join(TEXTURES)}")
    t = np.asarray(t, np.float32)[..., None]
    a, b = (np.array(COLORS[c], np.float32) for c in colors)
    return (a * (1 - t) + b * t).astype(np.uint8)


def sample_scene(rng: np.random.Generator, shape: str | None = None, texture_name: str | None = None,
                 bg_colors: tuple[str, str] | None = None, color: str | None = None,
                 context: int | None = None, companion: str | None = None,
                 radius: tuple[float, float] = RADIUS) -> Scene:
    """One scene. `context=k` draws class k's habitat and companion (unless texture, colours or
    companion are given); `context=None` a random background and, unless given, no companion."""
    names = list(COLORS)
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    if context is not None:
        tex, colors = HABITATS[context]
        texture_name, bg_colors = texture_name or tex, bg_colors or colors
        companion = companion or COMPANIONS[context]
    texture_name = texture_name or TEXTURES[rng.integers(len(TEXTURES))]
    if bg_colors is None:
        i, j = rng.choice(len(names), 2, replace=False)
        bg_colors = (names[i], names[j])
    if color is None:
        choices = [c for c in names if c not in bg_colors]
        color = choices[rng.integers(len(choices))]
    r = float(rng.uniform(*radius)) * SIZE
    angle = float(rng.uniform(-0.35, 0.35))  # within ±20°: square/diamond and cross/letter X stay apart
    if companion is None:
        cx, cy = rng.uniform(r, SIZE - r, size=2)
        return Scene(shape, color, texture_name, tuple(bg_colors), float(cx), float(cy), r, angle, context=context)
    cr = float(rng.uniform(0.1, 0.13)) * SIZE
    for _ in range(1000):  # the companion stands beside the main shape, never on it
        cx, cy = rng.uniform(r, SIZE - r, size=2)
        px, py = rng.uniform(cr, SIZE - cr, size=2)
        if math.hypot(px - cx, py - cy) > r + cr + 1:
            break
    else:
        raise ValueError(f"no room for a companion beside a shape of radius {r:.1f}px; use a smaller radius range")
    choices = [c for c in names if c not in bg_colors and c != color]
    ccolor = choices[rng.integers(len(choices))]
    return Scene(shape, color, texture_name, tuple(bg_colors), float(cx), float(cy), r, angle, companion, ccolor,
                 (float(px), float(py)), cr, context)


def sample_natural(rng: np.random.Generator, label: int, kind: str | None = None,
                   mix: tuple[float, float, float] = NATURAL_MIX, classes: int = len(SHAPES),
                   radius: tuple[float, float] = RADIUS) -> Scene:
    """A scene of class `label` from the natural mixture: its own context, another class's, or none.
    `kind` ("own", "other", "none") fixes the branch instead of drawing it."""
    if kind is None:
        kind = ("own", "other", "none")[int(rng.choice(3, p=np.asarray(mix) / sum(mix)))]
    if kind == "own":
        context = label
    elif kind == "other":
        context = int((label + 1 + rng.integers(classes - 1)) % classes)
    elif kind == "none":
        context = None
    else:
        raise ValueError(f"context kind {kind!r}: choose own, other or none")
    return sample_scene(rng, shape=SHAPES[label], context=context, radius=radius)


def render(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The image and its exact mask: the main shape's pixels are exactly the mask's foreground
    (the companion is drawn first and never overlaps it, and no other pixel has its colour)."""
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.radius, scene.angle)
    img = texture(scene.texture, scene.bg_colors, rng)
    if scene.companion is not None:
        px, py = scene.companion_xy
        comp = np.asarray(shape_mask(scene.companion, px, py, scene.companion_radius, 0.0))[..., None] > 127
        img = np.where(comp, np.array(COLORS[scene.companion_color], np.uint8), img)
    fg = np.asarray(mask)[..., None] > 127
    img = np.where(fg, np.array(COLORS[scene.color], np.uint8), img)
    return Image.fromarray(img.astype(np.uint8)), mask


CAPTIONS = (
    "a photo of a {shape}.",
    "a {shape}.",
    "a {color} {shape}.",
    "a {shape} on a {texture} background.",
    "a {color} {shape} on a {texture} background.",
    "a {color} {shape} on a {bg0} and {bg1} {texture} background.",
    "a {shape} with a small {companion}.",
)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming the main shape and sometimes its colour, background or companion."""
    templates = CAPTIONS if scene.companion is not None else CAPTIONS[:-1]
    template = templates[rng.integers(len(templates))]
    return template.format(shape=scene.shape, color=scene.color, texture=scene.texture,
                           bg0=scene.bg_colors[0], bg1=scene.bg_colors[1], companion=scene.companion)


def _counts(n: int, mix: tuple[float, float, float]) -> list[str]:
    """Exactly round(p·n) images of each context kind (the rest go to "none"), in a fixed order."""
    own = round(mix[0] / sum(mix) * n)
    other = min(n - own, round(mix[1] / sum(mix) * n))
    return ["own"] * own + ["other"] * other + ["none"] * (n - own - other)


def write_downstream(root: Path, split: str = "natural", *, shots: int = 16, val_per_class: int = 8,
                     test_per_class: int = 30, classes: tuple[str, ...] = SHAPES, seed: int = 0,
                     mix: tuple[float, float, float] = NATURAL_MIX,
                     radius: tuple[float, float] = DOWNSTREAM_RADIUS) -> tuple[Path, Path, Path]:
    """A downstream dataset in the generic split-file layout (images/, masks/, split.json), with
    each image's drawn attributes in scenes.json.

    train (exactly `shots` per class, so few-shot sampling keeps them all) and val follow the
    natural mixture in exact proportions and depend only on `seed`; the test split is `split`:
    natural, clean (no context) or counterfactual (the swap partner's context). Shapes are drawn
    with `radius` (default `DOWNSTREAM_RADIUS`, larger than in pretraining captions).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    if not set(classes) <= set(SHAPES):
        raise ValueError(f"unknown classes {sorted(set(classes) - set(SHAPES))}; shapes: {', '.join(SHAPES)}")
    ids = [SHAPES.index(c) for c in classes]
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    scenes: dict[str, dict] = {}
    for part, count in (("train", shots), ("val", val_per_class), ("test", test_per_class)):
        # train and val never depend on the test split: the three datasets share them
        rng = np.random.default_rng([seed, ("train", "val", "test").index(part), SPLITS.index(split) if part == "test" else 0])
        for label, shape in enumerate(classes):
            kinds = _counts(count, mix) if part != "test" or split == "natural" else [split] * count
            for i, kind in enumerate(kinds):
                if kind == "clean":
                    scene = sample_scene(rng, shape=shape, radius=radius)
                elif kind == "counterfactual":
                    scene = sample_scene(rng, shape=shape, context=ids[swap_partner(label, len(classes))], radius=radius)
                else:
                    scene = sample_natural(rng, ids[label], kind, radius=radius)
                img, mask = render(scene, rng)
                rel = f"{shape.replace(' ', '_')}/{part}_{i:03d}.png"
                for folder, im in (("images", img), ("masks", mask)):
                    (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    im.save(root / folder / rel)
                out[part].append([rel, label, shape])
                scenes[rel] = {"shape": shape, "color": scene.color, "texture": scene.texture,
                               "background": list(scene.bg_colors), "companion": scene.companion,
                               "context": None if scene.context is None else SHAPES[scene.context],
                               "kind": kind}
    (root / "split.json").write_text(json.dumps(out))
    (root / "scenes.json").write_text(json.dumps(scenes))
    return root / "split.json", root / "images", root / "masks"
