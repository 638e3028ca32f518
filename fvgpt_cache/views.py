"""Full and foreground views of one image, with the mask following the image's geometry (docs/method.md#foreground-view, docs/datasets.md#views).

Three geometries, each applied to image and mask alike (the mask always with nearest neighbour):

* `eval`: the model's test transform (resize the short side, centre crop; open_clip's eval
  transform and Dassl's test transform), for val and test, so stored features equal
  `encode_image(preprocess(img))`;
* `squash`: Dassl's training transform without random crops, `Resize((S, S))` of the whole
  image (CoOp and KgCoOp train on it), for view 0 of the train split;
* `box`: random resized crop + horizontal flip (the FVG-PT release's training augmentation),
  drawn from a generator private to (seed, split, sample, view) and returned as a `Box` so the
  cache can store it and any later pass can redraw the exact same view.

Masks are read as the release's Dassl loader reads them (`DatasetWrapperFGPT`): converted to
RGB, resized to the image's size with nearest neighbour when the sizes differ, and binarised as
mean over the RGB channels > 0.5 (of `to_tensor` values). Binarising before or after the
nearest-neighbour geometry gives the same pixels (nearest neighbour only selects pixels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

FG_MODES = ("normalized", "pixel")
_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}
NO_BOX = (-1, -1, -1, -1, 0)  # the stored box of a deterministic view


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: random resized crop (scale, ratio; bicubic) + horizontal flip (docs/method.md#hyper-parameters)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"random resized crop scale {self.scale}: use 0 < min ≤ max ≤ 1, e.g. 0.08,1 (MMRL: 0.5,1)")


@dataclass(frozen=True)
class Box:
    """One augmented view: crop rows top..top+height, columns left..left+width of the image, then flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_row(self) -> tuple[int, int, int, int, int]:
        return (self.top, self.left, self.height, self.width, int(self.flip))

    @classmethod
    def from_row(cls, row) -> "Box | None":
        """The box of a stored row, None for a deterministic view."""
        top, left, height, width, flip = (int(v) for v in row)
        return None if height < 0 else cls(top, left, height, width, bool(flip))


def binarize_mask(mask: Image.Image) -> Image.Image:
    """The release's binarisation: mean over the RGB channels of `to_tensor(mask)` > 0.5. Returns mode 'L' (0/255)."""
    rgb = TF.to_tensor(mask.convert("RGB"))
    fg = rgb.mean(dim=0) > 0.5
    return Image.fromarray(fg.numpy().astype(np.uint8) * 255, mode="L")


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize a mask to the image's (width, height) with nearest neighbour, as the release's loader does."""
    if mask.size == tuple(size):
        return mask
    return TF.resize(mask, [size[1], size[0]], InterpolationMode.NEAREST)


def draw_box(width: int, height: int, aug: AugmentConfig, gen: torch.Generator) -> Box:
    """torchvision's RandomResizedCrop.get_params then RandomHorizontalFlip, from a private generator."""
    area = height * width
    log_ratio = (math.log(aug.ratio[0]), math.log(aug.ratio[1]))
    crop = None
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(aug.scale[0], aug.scale[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            j = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            crop = (i, j, h, w)
            break
    if crop is None:
        in_ratio = width / height
        if in_ratio < min(aug.ratio):
            w, h = width, int(round(width / min(aug.ratio)))
        elif in_ratio > max(aug.ratio):
            h, w = height, int(round(height * max(aug.ratio)))
        else:
            w, h = width, height
        crop = ((height - h) // 2, (width - w) // 2, h, w)
    flip = torch.rand(1, generator=gen).item() < aug.flip_p
    return Box(*crop, flip=flip)


class ViewMaker:
    """Turns a decoded RGB image and its binary mask into normalised full / foreground tensors."""

    def __init__(self, preprocess: dict, fg_mode: str = "normalized"):
        if fg_mode not in FG_MODES:
            raise ValueError(f"fg_mode must be one of {FG_MODES}, got {fg_mode!r}")
        self.size = int(preprocess["size"])
        self.resize_mode = preprocess.get("resize_mode", "shortest")
        self.interp = _INTERP[preprocess.get("interpolation", "bicubic")]
        self.mean = torch.tensor(preprocess["mean"]).view(3, 1, 1)
        self.std = torch.tensor(preprocess["std"]).view(3, 1, 1)
        self.fg_mode = fg_mode

    def geometry(self, img: Image.Image, mask: Image.Image, kind: str, box: Box | None = None):
        """(image, mask) after one of the three geometries (see the module docstring)."""
        size = [self.size, self.size]
        if kind == "squash" or (kind == "eval" and self.resize_mode == "squash"):
            return TF.resize(img, size, self.interp), TF.resize(mask, size, InterpolationMode.NEAREST)
        if kind == "eval":
            img = TF.center_crop(TF.resize(img, self.size, self.interp), self.size)
            mask = TF.center_crop(TF.resize(mask, self.size, InterpolationMode.NEAREST), self.size)
            return img, mask
        if kind != "box" or box is None:
            raise ValueError(f"geometry {kind!r} needs a box" if kind == "box" else f"unknown geometry {kind!r}")
        img = TF.resized_crop(img, box.top, box.left, box.height, box.width, size, self.interp)
        mask = TF.resized_crop(mask, box.top, box.left, box.height, box.width, size, InterpolationMode.NEAREST)
        if box.flip:
            img, mask = TF.hflip(img), TF.hflip(mask)
        return img, mask

    def pixels(self, img: Image.Image, mask: Image.Image, kind: str, box: Box | None = None):
        """(image, mask, area) of one view as a decoding worker sends them: uint8 (3, S, S) pixels, a bool
        (1, S, S) foreground mask and the foreground fraction A(m). Four times smaller than float32 views;
        `normalize` turns them into the encoder's input on the encoding device."""
        img_v, mask_v = self.geometry(img, mask, kind, box)
        pixels = TF.pil_to_tensor(img_v).contiguous()
        m = TF.pil_to_tensor(mask_v) > 127  # to_tensor(mask) > 0.5 on 0…255 values
        return pixels, m, float(m.float().mean().item())

    def normalize(self, pixels: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
        """The encoder's float32 input of uint8 `pixels` (…, 3, S, S) and bool `mask` (…, 1, S, S), on their
        device: the full view, or (kind "fg") the foreground view of `fg_mode`."""
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        x = pixels.float().div_(255)
        if kind == "full":
            return (x - mean) / std
        m = mask.to(x.dtype)
        if self.fg_mode == "normalized":  # DAPT / the release: mask the normalised tensor (mean-colour background)
            return (x - mean) / std * m
        return (x * m - mean) / std  # pixel space before normalisation: black background

    def __call__(self, img: Image.Image, mask: Image.Image, kind: str, box: Box | None = None):
        """(full, fg, area): normalised tensors of one view and the foreground fraction A(m)."""
        pixels, m, area = self.pixels(img, mask, kind, box)
        return self.normalize(pixels, m, "full"), self.normalize(pixels, m, "fg"), area


def view_generator(seed: int, split_index: int, sample_index: int, view: int) -> torch.Generator:
    """A generator that depends only on (seed, split, sample, view): never on batches, workers or ranks."""
    gen = torch.Generator()
    gen.manual_seed((((seed * 1_000_003 + split_index) * 10_000_019 + sample_index) * 101 + view) % (2**63 - 1))
    return gen
