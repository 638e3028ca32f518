"""An offline synthetic world: shapes with exact masks, captions, and downstream splits with a
spurious background correlation (the setting FVG-PT is about).

Everything is deterministic in a seed. Images are 64×64: one shape of a random colour, size,
position and rotation on a background texture drawn in two colours. The first half of the
shape classes are base classes, the second half new ones.
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
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
          "orange": (240, 140, 30), "purple": (140, 60, 190), "pink": (240, 130, 190), "brown": (130, 80, 40),
          "black": (20, 20, 20), "white": (240, 240, 240), "gray": (128, 128, 128), "cyan": (40, 200, 210)}
SIZE = 64


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
                 bg_colors: tuple[str, str] | None = None, color: str | None = None) -> Scene:
    names = list(COLORS)
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    texture_name = texture_name or TEXTURES[rng.integers(len(TEXTURES))]
    if bg_colors is None:
        i, j = rng.choice(len(names), 2, replace=False)
        bg_colors = (names[i], names[j])
    if color is None:
        choices = [c for c in names if c not in bg_colors]
        color = choices[rng.integers(len(choices))]
    r = float(rng.uniform(0.2, 0.34)) * SIZE
    cx, cy = rng.uniform(r, SIZE - r, size=2)
    # rotation stays within ±20° so that square and diamond, cross and letter X remain different shapes
    return Scene(shape, color, texture_name, tuple(bg_colors), float(cx), float(cy), r, float(rng.uniform(-0.35, 0.35)))


def render(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The image and its exact mask: the shape's pixels are exactly the mask's foreground."""
    mask = shape_mask(scene.shape, scene.cx, scene.cy, scene.radius, scene.angle)
    bg = texture(scene.texture, scene.bg_colors, rng)
    fg = np.asarray(mask)[..., None] > 127
    img = np.where(fg, np.array(COLORS[scene.color], np.uint8), bg)
    return Image.fromarray(img.astype(np.uint8)), mask


CAPTIONS = (
    "a photo of a {shape}.",
    "a {shape}.",
    "a {color} {shape}.",
    "a {shape} on a {texture} background.",
    "a {color} {shape} on a {texture} background.",
    "a {color} {shape} on a {bg0} and {bg1} {texture} background.",
)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    template = CAPTIONS[rng.integers(len(CAPTIONS))]
    return template.format(shape=scene.shape, color=scene.color, texture=scene.texture,
                           bg0=scene.bg_colors[0], bg1=scene.bg_colors[1])


def class_background(label: int) -> tuple[str, tuple[str, str]]:
    """The background a base class is tied to in the spurious split: its own texture and colour pair."""
    names = list(COLORS)
    return TEXTURES[label % len(TEXTURES)], (names[(2 * label) % len(names)], names[(2 * label + 5) % len(names)])


def write_downstream(root: Path, *, spurious: bool = True, shots: int = 16, on_own_background: int = 14,
                     val_per_class: int = 8, test_per_class: int = 30, classes: tuple[str, ...] = SHAPES,
                     seed: int = 0) -> tuple[Path, Path, Path]:
    """A downstream dataset in the generic split-file layout (images/, masks/, split.json), with
    each image's drawn attributes in scenes.json.

    The train split has exactly `shots` images per class (so few-shot sampling keeps them all).
    With `spurious`, `on_own_background` of them for each base class sit on that class's own
    background (`class_background`); every other image, and all of val and test, get random
    backgrounds. `spurious=False` is the clean variant.
    """
    if spurious and not 0 <= on_own_background <= shots:
        raise ValueError(f"on_own_background={on_own_background} must lie in 0..shots ({shots})")
    rng = np.random.default_rng(seed)
    base = set(range(math.ceil(len(classes) / 2)))
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    scenes: dict[str, dict] = {}
    for label, shape in enumerate(classes):
        for split_name, count in (("train", shots), ("val", val_per_class), ("test", test_per_class)):
            for i in range(count):
                tied = spurious and split_name == "train" and label in base and i < on_own_background
                tex, colors = class_background(label) if tied else (None, None)
                scene = sample_scene(rng, shape=shape, texture_name=tex, bg_colors=colors)
                img, mask = render(scene, rng)
                rel = f"{shape.replace(' ', '_')}/{split_name}_{i:03d}.png"
                for folder, im in (("images", img), ("masks", mask)):
                    (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    im.save(root / folder / rel)
                split[split_name].append([rel, label, shape])
                scenes[rel] = {"shape": shape, "color": scene.color, "texture": scene.texture,
                               "background": list(scene.bg_colors), "own_background": tied}
    (root / "split.json").write_text(json.dumps(split))
    (root / "scenes.json").write_text(json.dumps(scenes))
    return root / "split.json", root / "images", root / "masks"
