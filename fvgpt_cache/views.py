"""Full and foreground views of one image, with the mask following the image's geometry (SPEC §2, §3).

The deterministic view reproduces open_clip's eval transform (resize, centre crop, to-tensor,
normalise) on PIL images, so stored features equal `encode_image(preprocess(img))`. Augmented
views use random resized crop + horizontal flip with parameters drawn once and applied to both
image and mask; the mask is always resampled with nearest neighbour.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

MASK_THRESHOLD = 127
FG_MODES = ("pixel", "normalized")
_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}


@dataclass(frozen=True)
class AugmentConfig:
    """SPEC §3 train-time augmentation: random resized crop (scale 0.08–1, bicubic) + h-flip."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5


def binarize_mask(mask: Image.Image) -> Image.Image:
    """White foreground on black: foreground where the first channel is > 127. Returns mode 'L' (0/255)."""
    first = np.asarray(mask if mask.mode in ("1", "L", "LA", "RGB", "RGBA") else mask.convert("RGB"))
    if first.ndim == 3:
        first = first[..., 0]
    if first.dtype == bool:
        first = first.astype(np.uint8) * 255
    return Image.fromarray(np.where(first > MASK_THRESHOLD, 255, 0).astype(np.uint8), mode="L")


def _crop_params(width: int, height: int, aug: AugmentConfig, gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from a private generator."""
    area = height * width
    log_ratio = (math.log(aug.ratio[0]), math.log(aug.ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(aug.scale[0], aug.scale[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            j = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(aug.ratio):
        w, h = width, int(round(width / min(aug.ratio)))
    elif in_ratio > max(aug.ratio):
        h, w = height, int(round(height * max(aug.ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ViewMaker:
    """Turns a decoded RGB image and its binary mask into normalised full / foreground tensors."""

    def __init__(self, preprocess: dict, augment: AugmentConfig = AugmentConfig(), fg_mode: str = "pixel"):
        if fg_mode not in FG_MODES:
            raise ValueError(f"fg_mode must be one of {FG_MODES}, got {fg_mode!r}")
        self.size = int(preprocess["size"])
        self.resize_mode = preprocess.get("resize_mode", "shortest")
        self.interp = _INTERP[preprocess.get("interpolation", "bicubic")]
        self.mean = torch.tensor(preprocess["mean"]).view(3, 1, 1)
        self.std = torch.tensor(preprocess["std"]).view(3, 1, 1)
        self.augment = augment
        self.fg_mode = fg_mode

    def _eval_geometry(self, img: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        if self.resize_mode == "squash":
            size = [self.size, self.size]
            return (TF.resize(img, size, self.interp), TF.resize(mask, size, InterpolationMode.NEAREST))
        img = TF.center_crop(TF.resize(img, self.size, self.interp), self.size)
        mask = TF.center_crop(TF.resize(mask, self.size, InterpolationMode.NEAREST), self.size)
        return img, mask

    def _aug_geometry(self, img, mask, gen: torch.Generator):
        i, j, h, w = _crop_params(img.width, img.height, self.augment, gen)
        size = [self.size, self.size]
        img = TF.resized_crop(img, i, j, h, w, size, self.interp)
        mask = TF.resized_crop(mask, i, j, h, w, size, InterpolationMode.NEAREST)
        if torch.rand(1, generator=gen).item() < self.augment.flip_p:
            img, mask = TF.hflip(img), TF.hflip(mask)
        return img, mask

    def __call__(self, img: Image.Image, mask: Image.Image, view: int, gen: torch.Generator | None = None):
        """Return (full, fg, area) for view 0 (test-time crop) or an augmented view (needs `gen`)."""
        if view == 0:
            img_v, mask_v = self._eval_geometry(img, mask)
        else:
            img_v, mask_v = self._aug_geometry(img, mask, gen)
        x = TF.to_tensor(img_v)
        m = (TF.to_tensor(mask_v) > 0.5).to(x.dtype)
        full = (x - self.mean) / self.std
        if self.fg_mode == "pixel":
            fg = (x * m - self.mean) / self.std
        else:  # DAPT: mask the normalised tensor, background becomes the mean colour
            fg = full * m
        return full, fg, float(m.mean().item())


def view_generator(seed: int, split_index: int, sample_index: int, view: int) -> torch.Generator:
    """A generator that depends only on (seed, split, sample, view), so resumed runs redraw the same crops."""
    gen = torch.Generator()
    gen.manual_seed((((seed * 1_000_003 + split_index) * 10_000_019 + sample_index) * 101 + view) % (2**63 - 1))
    return gen
