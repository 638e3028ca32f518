"""Features that cannot tell classes apart: named before anyone trains on them.

A model whose class text features are (nearly) identical gives every method the same accuracy,
the share of one class among the test images, and nothing else says why. These pure functions
return warnings (each says what to do); `extract`, `inspect` and `train` print them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .store import image_key, text_key

# Two classes whose text features have a cosine above this are indistinguishable to a CLIP head
# (at the logit scale 100 the difference is below 0.1 logit).
NEAR_IDENTICAL_COSINE = 0.999
# A singular value below this share of the largest one counts as zero for the rank.
RANK_TOLERANCE = 1e-4
# Image features whose spread over images is below this are the same vector for every image.
CONSTANT_SPREAD = 1e-4
SHOW = 3  # how many offending pairs a warning names

FIX_TEXT = ("use another model (a tiny or randomly initialised one often cannot), or another class template "
            "(--template)")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_warnings(text: np.ndarray, classnames: Sequence[str], group: str = "clip") -> list[str]:
    """Warnings for class text features (C, D) that cannot separate the classes: pairs with cosine
    above NEAR_IDENTICAL_COSINE, and a rank below the number of classes (when C ≤ D)."""
    t = _unit(text)
    c = t.shape[0]
    if c < 2:
        return []
    sim = t @ t.T
    np.fill_diagonal(sim, -np.inf)
    i, j = np.nonzero(np.triu(sim > NEAR_IDENTICAL_COSINE, k=1))
    out = []
    if i.size:
        pairs = ", ".join(f"{classnames[a]!r}/{classnames[b]!r} ({sim[a, b]:.4f})" for a, b in list(zip(i, j))[:SHOW])
        more = f" and {i.size - SHOW} more" if i.size > SHOW else ""
        out.append(f"{text_key(group)}: {i.size} pair(s) of classes have (nearly) identical text features (cosine > "
                   f"{NEAR_IDENTICAL_COSINE}): {pairs}{more}; no head can tell them apart. {FIX_TEXT}")
    if c <= t.shape[1]:
        s = np.linalg.svd(t, compute_uv=False)
        rank = int((s > RANK_TOLERANCE * s[0]).sum())
        if rank < c:
            out.append(f"{text_key(group)}: the {c} class text features span only {rank} dimension(s) (rank-deficient): "
                       f"some classes are mixtures of others. {FIX_TEXT}")
    return out


def image_warnings(features: np.ndarray, name: str) -> list[str]:
    """A warning when image features (N, ..., D) are the same vector for every image."""
    x = np.asarray(features, dtype=np.float64).reshape(-1, np.shape(features)[-1])
    if x.shape[0] < 2:
        return []
    if float(x.std(axis=0).max()) < CONSTANT_SPREAD:
        return [f"{name}: every image has the same features (spread < {CONSTANT_SPREAD}); the image encoder ignores "
                "its input: check the model's weights and the images"]
    return []


def token_warnings(tokens: np.ndarray, classnames: Sequence[str]) -> list[str]:
    """A warning when the tokenizer gives two different class prompts the same token ids (rows of
    `tokens`): the model's vocabulary cannot tell those class names apart."""
    seen: dict[bytes, int] = {}
    same = []
    for k, row in enumerate(np.asarray(tokens)):
        key = row.tobytes()
        if key in seen and classnames[seen[key]] != classnames[k]:
            same.append((seen[key], k))
        seen.setdefault(key, k)
    if not same:
        return []
    pairs = ", ".join(f"{classnames[a]!r}/{classnames[b]!r}" for a, b in same[:SHOW])
    return [f"the tokenizer turns {len(same)} pair(s) of class prompts into the same tokens: {pairs}; the model's "
            f"vocabulary cannot tell those class names apart. {FIX_TEXT}"]


def cache_warnings(cache, backbone: str | None = None) -> list[str]:
    """The checks above on a cache: CLIP's text features, a backbone's, and the stored training images."""
    out = text_warnings(cache.text("clip").numpy(), cache.classnames, "clip")
    if backbone not in (None, "clip") and backbone in cache.text_groups:
        out += text_warnings(cache.text(backbone).numpy(), cache.classnames, backbone)
    for split in cache.splits:
        if cache.has_image(split, "full"):
            out += image_warnings(cache.image(split, "full").numpy(), image_key("clip", split, "full"))
    return out
