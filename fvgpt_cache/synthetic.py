"""Synthetic CLIP-like feature caches without images, for tests and benchmarks that need size fast."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_feature_cache(path: Path, num_classes: int = 10, shots: int = 16, views: int = 2, dim: int = 64,
                        test_per_class: int = 20, seed: int = 0, signal: float = 0.5, background: float = 0.5,
                        noise: float = 0.35, text_noise: float = 0.5, backbone: str | None = "synthetic_bb",
                        logit_scale: float = 100.0, confound: float = 0.0) -> Path:
    """A cache of synthetic CLIP-like features, no images (tests and benchmarks that need size fast).

    Like CLIP, image and text features share a modality direction each (g_img, g_txt), so
    image-text cosines sit in a narrow band and logits differ by a few units at scale s = 100.
    Full views: n(g_img + signal·μ_c + background·β + noise·ε); foreground views drop the
    background term β (one of 8 shared background directions). CLIP text: n(g_txt + μ_c +
    text_noise·ε); the optional backbone text group is fitted better (text_noise/2).

    `confound` > 0 makes a confound world: the full view of class c also carries
    `confound ·` the CLIP text feature of a fixed other class (c + 1 mod C), which its
    foreground view does not, so the full view is systematically pulled towards the wrong class.
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
    text = unit(g_txt + centres + text_noise * eps(num_classes, dim))
    partner = text[(np.arange(num_classes) + 1) % num_classes]

    def split(n_per_class: int, v: int):
        labels = np.repeat(np.arange(num_classes), n_per_class)
        mu = signal * centres[labels][:, None, :]
        bg = background * backgrounds[rng.integers(0, len(backgrounds), (labels.size, v))]
        shared = noise * eps(labels.size, v, dim)
        full = unit(g_img + mu + bg + confound * partner[labels][:, None, :] + shared)
        fg = unit(g_img + mu + noise * eps(labels.size, v, dim))
        area = rng.uniform(0.05, 0.9, (labels.size, v)).astype(np.float32)
        return labels, full, fg, area

    base, new = base_new_split(num_classes)
    data = {"train": split(shots, views), "val": split(min(shots, 4), 1), "test": split(test_per_class, 1)}
    provenance = {"model": "synthetic-features", "pretrained": "none", "random_init": True, "dataset": Path(path).stem,
                  "preprocess": {"size": 0}, "shots": shots, "seed": seed, "views": {"train": views, "val": 1, "test": 1},
                  "synthetic": {"signal": signal, "background": background, "noise": noise, "text_noise": text_noise,
                                "confound": confound}}
    write_cache(path, classnames=[f"class {c}" for c in range(num_classes)], base=base, new=new, text_clip=text,
                template="a photo of a {}.", images={s: {"full": d[1], "fg": d[2]} for s, d in data.items()},
                labels={s: d[0] for s, d in data.items()}, areas={s: d[3] for s, d in data.items()},
                paths={s: [f"{s}/{i}.png" for i in range(len(d[0]))] for s, d in data.items()},
                provenance=provenance, logit_scale=logit_scale)
    if backbone:
        tuned = unit(g_txt + centres + text_noise / 2 * eps(num_classes, dim))
        write_text_group(path, backbone, tuned, {"method": "synthetic", "seed": seed})
    return Path(path)
