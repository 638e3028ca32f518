"""Foreground masks without an external segmenter: gradient maps of the CLIP image encoder.

For each image the prompt filled with its class name is encoded once; the image's score is the
cosine between its CLIP image feature and that text feature, and a map of where that score comes
from is thresholded into a binary mask. The maps (pure functions on tensors, below):

* `gradcam`: Grad-CAM (Selvaraju et al.): ReLU(Σ_c w_c A_c) with w_c the spatial mean of ∂score/∂A_c,
  for the activations A of one layer of the image tower (a ResNet stage, or the patch tokens of a
  ViT block laid out on their grid);
* `gradcam++`: Grad-CAM++ (Chattopadhay et al.) with its closed-form α under the exponential
  assumption;
* `saliency`: the input gradient |∂score/∂x| (max over the colour channels), smoothed with a box
  filter; no layer.

Maps are upsampled (bilinear) to the model's input side, min-max normalised per image, resized to
the image's own size and binarised as `map ≥ threshold`. Which map, layer, smoothing and threshold
are the defaults was decided by IoU against the synthetic world's exact masks (docs/masks.md).

`write_masks` runs this over a dataset into a folder that mirrors the image folder (the layout
`extract --mask-root` reads): crash-safe (each PNG appears under its final name only when it is
complete), resumable (a rerun skips finished masks), one writer per folder (a lock), provenance in
`masks.json`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .data import SPLITS, Dataset, fewshot_splits
from .distributed import Job, current_job
from .passes import DONE, PENDING, grid_batches, run_view_pass
from .store import CacheError, lock_file

MASK_METHODS = ("gradcam", "clipseg")
MAP_KINDS = ("gradcam", "gradcam++", "saliency")
BAD_IMAGE_POLICIES = ("error", "skip")
# The best threshold of each map on the synthetic world's training images (docs/masks.md); CLIPSeg's
# probability is thresholded at 0.5 unless --threshold says otherwise.
DEFAULT_THRESHOLDS = {"gradcam": 0.2, "gradcam++": 0.4, "saliency": 0.3, "clipseg": 0.5}
PROVENANCE_FILE = "masks.json"
MASKS_FORMAT = "fvgpt-cache-masks"
PARTIAL_SUFFIX = ".partial"

# The paper's Table 9: the SEEM prompts per dataset ([CLASS] written as {}). Four datasets use one
# prompt for every class (fine-grained names a segmenter does not know: cars, pets, flowers, aircraft).
TABLE9_PROMPTS = {
    "imagenet": "The whole {} in the middle.",
    "caltech101": "A huge {}.",
    "food101": "The whole {} in the middle.",
    "stanford_cars": "A huge and whole car.",
    "oxford_pets": "The pet in the middle.",
    "oxford_flowers": "The flower in the middle.",
    "dtd": "The {}.",
    "eurosat": "The satellite {}.",
    "fgvc_aircraft": "The huge airplane in the middle.",
    "sun397": "The {}.",
    "ucf101": "The people with {}.",
}
GENERIC_PROMPT = "The {} in the middle."


class MaskError(RuntimeError):
    """Mask writing stopped on bad input; finished masks are kept so a rerun resumes."""


# ------------------------------------------------------------------------------------ pure maps

def gradcam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of activations and gradients (B, C, h, w): ReLU(Σ_c mean_hw(∂s/∂A_c) · A_c) → (B, h, w)."""
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * acts).sum(dim=1))


def gradcam_pp_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (B, C, h, w) → (B, h, w): α = g² / (2g² + Σ_hw A·g³) (0 where the denominator is 0),
    w_c = Σ_hw α·ReLU(g), map = ReLU(Σ_c w_c A_c)."""
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + (acts * g3).sum(dim=(2, 3), keepdim=True)
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    weights = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
    return F.relu((weights * acts).sum(dim=1))


def box_blur(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over a size×size window (zero padding counted as outside: the mean of the pixels inside), (B, h, w)."""
    if size <= 1:
        return maps
    x = maps.unsqueeze(1)
    pad = size // 2
    total = F.avg_pool2d(F.pad(x, (pad, size - 1 - pad, pad, size - 1 - pad)), size, stride=1, divisor_override=1)
    count = F.avg_pool2d(F.pad(torch.ones_like(x), (pad, size - 1 - pad, pad, size - 1 - pad)), size, stride=1,
                         divisor_override=1)
    return (total / count).squeeze(1)


def saliency_map(pixel_grads: torch.Tensor, smooth: int) -> torch.Tensor:
    """Input-gradient saliency (B, 3, H, W) → (B, H, W): max over channels of |∂s/∂x|, box-filtered."""
    return box_blur(pixel_grads.abs().amax(dim=1), smooth)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = (hi - lo).view(-1, *[1] * (maps.dim() - 1))
    scaled = (maps - lo.view_as(span)) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.zeros_like(maps))


def mask_iou(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """IoU per image of boolean masks (B, H, W); two empty masks agree perfectly (1)."""
    pred, true = pred.flatten(1).bool(), true.flatten(1).bool()
    inter = (pred & true).sum(1).float()
    union = (pred | true).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def centred_box(height: int, width: int, area: float) -> torch.Tensor:
    """A centred box covering `area` of an image (the aspect of the image), as a bool (H, W) mask."""
    side = float(np.sqrt(max(area, 0.0)))
    h, w = round(side * height), round(side * width)
    out = torch.zeros(height, width, dtype=torch.bool)
    top, left = (height - h) // 2, (width - w) // 2
    out[top:top + h, left:left + w] = True
    return out


# ------------------------------------------------------------------------------------ prompts

def default_prompt(dataset_name: str | None) -> str:
    """Table 9's prompt for one of the eleven datasets, `GENERIC_PROMPT` for any other."""
    return TABLE9_PROMPTS.get(dataset_name or "", GENERIC_PROMPT)


def check_prompt(prompt: str, dataset_name: str | None, classnames: list[str], tokenizer=None,
                 context_length: int | None = None) -> list[str]:
    """The prompt of every class, or a ValueError that names the prompt or the class it cannot take.

    A prompt without `{}` (the same text for every class) is accepted only for a dataset whose Table 9
    prompt has none (stanford_cars, oxford_pets, oxford_flowers, fgvc_aircraft)."""
    fixed_ok = "{}" not in TABLE9_PROMPTS.get(dataset_name or "", "{}")
    if "{}" not in prompt and not fixed_ok:
        raise ValueError(f"--prompt {prompt!r} has no '{{}}' for the class name; write e.g. 'The {{}} in the middle.' "
                         "(a prompt without the class name is Table 9's choice only for cars, pets, flowers and aircraft)")
    try:
        texts = [prompt.format(c.replace("_", " ")) if "{}" in prompt else prompt.format() for c in classnames]
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"--prompt {prompt!r} cannot be filled ({exc}); use exactly one '{{}}' and no other braces") from None
    for name, text in zip(classnames, texts):
        if not name.strip():
            raise ValueError("a class name is empty; fix the split file so every label has a name")
        if tokenizer is not None and context_length is not None:
            tokens = tokenizer.encode(text) if hasattr(tokenizer, "encode") else None
            if tokens is not None and len(tokens) + 2 > context_length:
                raise ValueError(f"the prompt for class {name!r} ({text!r}) is {len(tokens) + 2} tokens, more than the "
                                 f"text encoder's {context_length}; shorten the prompt or the class name")
    return texts


# ------------------------------------------------------------------------------------ the mapper

def tower_kind(visual: torch.nn.Module) -> str:
    """'vit' for open_clip's VisionTransformer, 'resnet' for its ModifiedResNet; anything else is refused."""
    name = type(visual).__name__
    if name == "VisionTransformer":
        return "vit"
    if name == "ModifiedResNet":
        return "resnet"
    raise ValueError(f"gradient masks support open_clip's ViT and ResNet image towers, not {name}; use --method clipseg")


def default_layer(visual: torch.nn.Module) -> str:
    """The Grad-CAM layer when none is given: `layer2` of a ResNet (measured, docs/masks.md); the
    second-to-last block of a ViT (the last block's patch outputs never reach the class token)."""
    if tower_kind(visual) == "resnet":
        return "layer2"
    blocks = len(visual.transformer.resblocks)
    return f"transformer.resblocks.{max(blocks - 2, 0)}"


@dataclass
class MapSettings:
    """How a gradient map is made and binarised (defaults: the best IoU on the synthetic world, docs/masks.md)."""

    map: str = "gradcam++"
    layer: str | None = None  # gradcam / gradcam++: a submodule of model.visual; None = `default_layer`
    smooth: float = 0.16  # saliency: box-filter side as a fraction of the model's input side
    threshold: float | None = None  # on the per-image min-max normalised map; None = the map's DEFAULT_THRESHOLDS

    def validate(self) -> "MapSettings":
        if self.map not in MAP_KINDS:
            raise ValueError(f"--map {self.map!r}: choose one of {', '.join(MAP_KINDS)}")
        if not 0 <= self.smooth < 1:
            raise ValueError(f"--smooth {self.smooth}: a fraction of the input side in [0, 1)")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ValueError(f"--threshold {self.threshold}: a value in (0, 1) of the normalised map")
        return self


class GradientMapper:
    """Maps of one open_clip model: `maps(pixels, text)` → (B, S, S) in [0, 1] at the model's input side."""

    def __init__(self, model: torch.nn.Module, settings: MapSettings):
        self.model, self.settings = model, settings.validate()
        self.visual = model.visual
        self.kind = tower_kind(self.visual)
        self.layer = settings.layer or default_layer(self.visual)
        if settings.map != "saliency":
            modules = dict(self.visual.named_modules())
            if self.layer not in modules:
                choices = [n for n in modules if n.startswith(("layer", "transformer.resblocks.")) and n.count(".") <= 2
                           and "." not in n.replace("transformer.resblocks.", "")]
                raise ValueError(f"--layer {self.layer!r} is not a module of the image tower; choose one of "
                                 f"{', '.join(choices)}")
            self.module = modules[self.layer]

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """A ViT block's output (B, T, C) or (T, B, C) → its patch tokens on their grid (B, C, h, w)."""
        if not getattr(self.visual.transformer, "batch_first", True):
            tokens = tokens.transpose(0, 1)
        h, w = self.visual.grid_size
        patches = tokens[:, -h * w:, :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def maps(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) normalised, text (B, D) unit text features → (B, S, S) maps in [0, 1]."""
        s = self.settings
        captured = {}
        handle = None
        if s.map != "saliency":
            handle = self.module.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
        try:
            with torch.enable_grad():
                x = pixels.detach().requires_grad_(True)
                feats = F.normalize(self.model.encode_image(x).float(), dim=-1)
                score = (feats * text.to(feats.dtype)).sum(-1)
                if s.map == "saliency":
                    (g,) = torch.autograd.grad(score.sum(), [x])
                    side = pixels.shape[-1]
                    size = max(1, round(s.smooth * side)) | 1 if s.smooth > 0 else 1
                    m = saliency_map(g.float(), size)
                else:
                    act = captured["a"]
                    (g,) = torch.autograd.grad(score.sum(), [act])
                    if self.kind == "vit":
                        act, g = self._grid(act), self._grid(g)
                    fn = gradcam_map if s.map == "gradcam" else gradcam_pp_map
                    m = fn(act.detach().float(), g.float())
                    m = F.interpolate(m.unsqueeze(1), size=pixels.shape[-2:], mode="bilinear",
                                      align_corners=False).squeeze(1)
        finally:
            if handle is not None:
                handle.remove()
        return normalize_maps(m.detach())


def binarize(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean masks of normalised maps: map ≥ threshold."""
    return maps >= threshold


def to_image_size(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One (S, S) map resized (bilinear) to an image's (width, height) → (height, width)."""
    w, h = size
    return F.interpolate(maps[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]


# ------------------------------------------------------------------------------------ the pass

@dataclass
class MaskOptions:
    method: str = "gradcam"
    settings: MapSettings = field(default_factory=MapSettings)
    prompt: str | None = None  # None: Table 9's for the eleven datasets, GENERIC_PROMPT otherwise
    splits: tuple[str, ...] = SPLITS
    shots: int = 0  # 0: every image of the splits; K: the few-shot draw `extract --shots K --seed S` takes
    seed: int = 1
    batch_size: int = 32
    workers: int = 2
    device: str = "auto"
    bad_image: str = "error"
    force: bool = False

    def validate(self) -> "MaskOptions":
        if self.method not in MASK_METHODS:
            raise ValueError(f"--method {self.method!r}: choose one of {', '.join(MASK_METHODS)}")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"--splits {','.join(self.splits)}: choose from {', '.join(SPLITS)}")
        if self.bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"--bad-image {self.bad_image!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: use a positive integer")
        if self.settings.threshold is None:  # the method's (and map's) default, on a copy of the settings
            default = DEFAULT_THRESHOLDS["clipseg" if self.method == "clipseg" else self.settings.map]
            self.settings = replace(self.settings, threshold=default)
        self.settings.validate()
        return self


@dataclass
class MaskSummary:
    out: Path
    counts: dict[str, int]
    written: int
    resumed: int
    skipped: list[dict]
    empty: list[str]
    full: list[str]
    mean_area: float | None
    seconds: float
    seconds_per_image: float | None


def mask_relpath(relpath: str) -> str:
    """Where the mask of an image goes under the mask folder: its relative path with the suffix .png."""
    return Path(relpath).with_suffix(".png").as_posix()


def _atomic_png(mask: np.ndarray, path: Path) -> None:
    """Write a 0/255 mask as PNG so that `path` is either absent or complete (a temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    with open(tmp, "wb") as fh:
        Image.fromarray(mask, mode="L").save(fh, format="PNG")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _remove_leftovers(out: Path) -> int:
    """Delete temporary files of an interrupted run (they never carry a final name)."""
    n = 0
    for tmp in out.rglob(f".*{PARTIAL_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


class _ImageRows(TorchDataset):
    """Decodes images, squashes them to the model's input (the whole image, so every pixel gets a mask value)."""

    def __init__(self, rows: list[dict], image_root: Path, preprocess: dict):
        self.rows, self.image_root = rows, image_root
        self.side = int(preprocess["size"])
        self.interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                       "nearest": InterpolationMode.NEAREST}[preprocess.get("interpolation", "bicubic")]
        self.mean = torch.tensor(preprocess["mean"]).view(3, 1, 1)
        self.std = torch.tensor(preprocess["std"]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        path = self.image_root / row["relpath"]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as exc:  # any decoder failure means the file is unusable
            return {"index": row["index"], "ok": False, "error": f"cannot read image {path}: {exc}"}
        x = TF.to_tensor(TF.resize(img, [self.side, self.side], self.interp))
        return {"index": row["index"], "ok": True, "pixels": (x - self.mean) / self.std, "size": img.size}


def _settings_record(options: MaskOptions, dataset: Dataset, provenance: dict, prompt: str, layer: str | None) -> dict:
    s = options.settings
    record = {
        "format": MASKS_FORMAT,
        "method": options.method,
        "map": s.map if options.method == "gradcam" else None,
        "layer": layer if options.method == "gradcam" and s.map != "saliency" else None,
        "smooth": s.smooth if options.method == "gradcam" and s.map == "saliency" else None,
        "threshold": s.threshold,
        "prompt": prompt,
        "model": provenance.get("model"),
        "pretrained": provenance.get("pretrained"),
        "pretrained_sha256": provenance.get("pretrained_sha256"),
        "model_config_sha256": provenance.get("model_config_sha256"),
        "dataset": dataset.name,
        "split_sha256": dataset.split_sha256,
        "shots": options.shots,
        "seed": options.seed if options.shots > 0 else None,
        "geometry": "the whole image squashed to the model's input side; the map resized (bilinear) to the image",
        "binarisation": "per-image min-max normalised map >= threshold; white (255) foreground on black",
    }
    return record


def _fingerprint(record: dict) -> str:
    """What decides the pixels of a mask; which images are masked (--shots, --seed, --splits) does not."""
    stable = {k: v for k, v in record.items() if k not in ("shots", "seed")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def mask_rows(dataset: Dataset, options: MaskOptions) -> dict[str, list[dict]]:
    """The images to mask per split (every image, or the few-shot draw), each relpath once."""
    samples = fewshot_splits(dataset.splits, options.shots, options.seed) if options.shots > 0 else dataset.splits
    seen: dict[str, str] = {}
    rows: dict[str, list[dict]] = {}
    for split in options.splits:
        rows[split] = []
        for s in samples.get(split, []):
            target = mask_relpath(s.relpath)
            if target in seen:
                if seen[target] == s.relpath:
                    continue  # the same image in two splits: one mask
                raise MaskError(f"images {seen[target]} and {s.relpath} would share the mask file {target}; rename one")
            seen[target] = s.relpath
            rows[split].append({"relpath": s.relpath, "label": s.label, "mask": target})
    return rows


def write_masks(dataset: Dataset, loaded, out: Path, options: MaskOptions | None = None,
                progress: Callable[[str, int, int], None] | None = None,
                stop_after_batches: int | None = None, segmenter=None, job: Job | None = None) -> MaskSummary:
    """Write a mask PNG per image of `options.splits` under `out` (the image's relative path, suffix .png,
    the image's size) and `out/masks.json`.

    `loaded` is the open_clip model (`models.LoadedModel`) for `--method gradcam`; `segmenter` a
    ready `clipseg.ClipSeg` for `--method clipseg`. A rerun resumes (finished PNGs are kept) when
    its settings equal the folder's; other settings are refused unless `force`, which rewrites every
    mask. `stop_after_batches` simulates an interruption (tests). Under torchrun (`job`, default from the
    environment) every rank calls this with the same arguments: the ranks share the batches on the same fixed
    grid as one process, rank 0 holds the lock and writes masks.json; every rank returns the same summary."""
    options = (options or MaskOptions()).validate()
    out = Path(out)
    prompt = options.prompt or default_prompt(dataset.name)
    if options.method == "gradcam":
        tokenizer = loaded.tokenizer
        context = getattr(tokenizer, "context_length", None)
        texts = check_prompt(prompt, dataset.name, dataset.classnames, getattr(tokenizer, "tokenizer", tokenizer), context)
        mapper = GradientMapper(loaded.model, options.settings)
        provenance, layer, preprocess = loaded.provenance, mapper.layer, loaded.preprocess
    else:
        if segmenter is None:
            raise ValueError("--method clipseg needs a segmenter (fvgpt_cache.clipseg.load_clipseg)")
        texts = check_prompt(prompt, dataset.name, dataset.classnames)
        provenance, layer, preprocess = segmenter.provenance, None, segmenter.preprocess
    rows = mask_rows(dataset, options)
    record = _settings_record(options, dataset, provenance, prompt, layer)
    fingerprint = _fingerprint(record)
    job = job or current_job()
    device = job.device(options.device)
    job.start(device)
    started = time.perf_counter()
    skipped: list[dict] = []
    text_cache: dict[int, torch.Tensor] = {}
    if options.method == "clipseg":
        segmenter.model.to(device)
    if options.method == "gradcam":
        loaded.model.to(device)
        from .extraction import encode_texts
        text_all = encode_texts(loaded, texts, device)
        text_cache = {i: text_all[i] for i in range(len(texts))}

    def dataset_for(split: str, pending: np.ndarray) -> _ImageRows:
        return _ImageRows([dict(rows[split][i], index=int(i)) for i in pending], dataset.image_root, preprocess)

    def handle(split: str, items: list[dict]) -> None:
        good = []
        for item in items:
            if item["ok"]:
                good.append(item)
            elif options.bad_image == "skip":
                skipped.append({"split": split, "path": rows[split][item["index"]]["relpath"], "reason": item["error"]})
            else:
                raise MaskError(item["error"] + ". Fix or remove the file, or pass --bad-image skip to leave it "
                                "out. Rerun the same command afterwards: finished masks are kept.")
        if not good:
            return
        pixels = torch.stack([g["pixels"] for g in good]).to(device)
        labels = [rows[split][g["index"]]["label"] for g in good]
        if options.method == "gradcam":
            text = torch.stack([text_cache[y] for y in labels]).to(device)
            maps = mapper.maps(pixels, text).cpu()
        else:
            maps = segmenter.maps(pixels, [texts[y] for y in labels]).cpu()
        for g, m in zip(good, maps):
            mask = binarize(to_image_size(m, g["size"]), options.settings.threshold)
            _atomic_png(mask.numpy().astype(np.uint8) * 255, out / rows[split][g["index"]]["mask"])

    def run(batches, show) -> None:
        """This process's batches; `show(split, n)` after each."""
        run_view_pass(batches, dataset_for, handle, workers=options.workers, after_batch=show,
                      stop_after_batches=stop_after_batches)

    def finish(status, all_skipped: list[dict], world: int) -> MaskSummary:  # the lock holder, every mask written
        resumed = int(sum((st == DONE).sum() for st in status.values()))
        written = int(sum(len(st) for st in status.values())) - resumed - len(all_skipped)
        summary = _summarize(out, rows, all_skipped, written, resumed, time.perf_counter() - started)
        meta = {"fingerprint": fingerprint, "settings": record, "complete": True, "counts": summary.counts,
                "written_this_run": written, "resumed": resumed, "skipped": all_skipped, "empty_masks": summary.empty,
                "full_masks": summary.full, "mean_area": summary.mean_area,
                "seconds_per_image": summary.seconds_per_image, "device": str(device),
                **({"processes": world} if world > 1 else {}), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = out / (PROVENANCE_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out / PROVENANCE_FILE)
        return summary

    lock = lambda: lock_file(out / ".masks.lock", f"the mask folder {out}")  # noqa: E731
    prepare = lambda: _prepare_folder(out, options, record, fingerprint, rows)  # noqa: E731
    if not job.distributed:
        with lock():
            status = prepare()
            done = {s: int((st == DONE).sum()) for s, st in status.items()}

            def show(split: str, n: int) -> None:
                done[split] += n
                if progress:
                    progress(split, done[split], len(status[split]))

            for split in status:
                show(split, 0)
            run(grid_batches(status, options.batch_size), show)
            return finish(status, skipped, 1)
    return _run_ranks(job, lock, prepare, run, finish, skipped, options.batch_size, progress)


def _prepare_folder(out: Path, options: MaskOptions, record: dict, fingerprint: str,
                    rows: dict[str, list[dict]]) -> dict[str, np.ndarray]:
    """Under the folder's lock: refuse a folder of other settings, clean up a killed run, mark the folder
    as being written; returns which masks are still to do (PENDING) per split."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / PROVENANCE_FILE
    if meta_path.exists() and not options.force:
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MaskError(f"{meta_path} is unreadable ({exc}); move it away or pass --force to rewrite the folder")
        if old.get("fingerprint") != fingerprint:
            changed = sorted(k for k in record if k not in ("shots", "seed")
                             and old.get("settings", {}).get(k) != record[k])
            raise MaskError(f"{out} holds masks made with other settings ({', '.join(changed)} differ); "
                            "choose another --out, or pass --force to rewrite every mask")
    elif not meta_path.exists() and not options.force:
        if any(p.name != ".masks.lock" for p in out.iterdir()):
            raise MaskError(f"{out} is not empty and has no {PROVENANCE_FILE}: it is not a mask folder written by "
                            "fvgpt-cache; choose another --out (or pass --force to write into it)")
    _remove_leftovers(out)
    meta_path.write_text(json.dumps({"fingerprint": fingerprint, "settings": record, "complete": False}, indent=1))
    if options.force:
        return {s: np.full(len(r), PENDING, dtype=np.uint8) for s, r in rows.items()}
    return {s: np.array([DONE if (out / r["mask"]).is_file() else PENDING for r in rs], dtype=np.uint8)
            for s, rs in rows.items()}


def _run_ranks(job, lock, prepare, run, finish, skipped: list[dict], batch_size: int, progress) -> MaskSummary:
    """One rank of a torchrun job: rank 0 holds the folder's lock and plans; every rank writes the masks of its
    share of the batches (each PNG is its own file, so no shards are needed); rank 0 writes masks.json."""
    from .passes import _portable

    coord = job.coordinator("masks")
    rank, world = job.rank, job.world_size
    with coord.guard(), contextlib.ExitStack() as held:
        if rank == 0:
            try:
                held.enter_context(lock())
                status = prepare()
            except Exception as exc:
                coord.put("plan", ("error", *_portable(exc)))
                raise
            coord.put("plan", ("ok", status))
        else:
            coord.wait(["plan"], [0], "rank 0 prepared the mask folder")
            state, *value = coord.take("plan")
            if state == "error":
                cls, message = value
                raise cls(message)
            (status,) = value
        done = {s: int((st == DONE).sum()) for s, st in status.items()}

        def show(split: str, n: int) -> None:
            total = coord.add(f"rows/{split}", n)
            if progress and rank == 0:
                progress(split, done[split] + total, len(status[split]))
            coord.check()

        for split in status:
            show(split, 0)
        run(grid_batches(status, batch_size)[rank::world], show)
        coord.put(f"finished/{rank}", skipped)
        if rank != 0:
            coord.wait(["result"], [0], "rank 0 wrote masks.json")
            return coord.take("result")
        everyone = list(range(world))
        coord.wait([f"finished/{r}" for r in everyone], everyone, "the ranks finished their masks")
        summary = finish(status, [item for r in everyone for item in coord.take(f"finished/{r}")], world)
        coord.put("result", summary)
        return summary


def _summarize(out: Path, rows: dict[str, list[dict]], skipped: list[dict], written: int, resumed: int,
               seconds: float) -> MaskSummary:
    """Counts, empty and full masks and the mean foreground area, read back from the written PNGs."""
    left_out = {(s["split"], s["path"]) for s in skipped}
    counts, empty, full, areas = {}, [], [], []
    for split, rs in rows.items():
        counts[split] = 0
        for r in rs:
            if (split, r["relpath"]) in left_out:
                continue
            with Image.open(out / r["mask"]) as im:
                fg = np.asarray(im) > 127
            counts[split] += 1
            area = float(fg.mean())
            areas.append(area)
            if area == 0:
                empty.append(r["mask"])
            elif area == 1:
                full.append(r["mask"])
    return MaskSummary(out=out, counts=counts, written=written, resumed=resumed, skipped=skipped, empty=empty, full=full,
                       mean_area=float(np.mean(areas)) if areas else None, seconds=seconds,
                       seconds_per_image=seconds / written if written else None)


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG as a bool (H, W) array, binarised as extraction reads masks (mean over RGB > 0.5)."""
    from .views import binarize_mask

    with Image.open(path) as im:
        return np.asarray(binarize_mask(im)) > 127


def contact_sheet(image_root: Path, mask_root: Path, relpaths: list[str], path: Path, columns: int = 8,
                  cell: int = 128) -> Path:
    """A PNG grid of images with their masks overlaid (background dimmed, foreground tinted red), so a
    person can judge the masks at a glance. `relpaths` are image paths; masks are read from `mask_root`."""
    if not relpaths:
        raise ValueError("no masks to show in the preview")
    columns = min(columns, len(relpaths))
    rows = -(-len(relpaths) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for i, rel in enumerate(relpaths):
        with Image.open(Path(image_root) / rel) as im:
            img = np.asarray(im.convert("RGB").resize((cell, cell), Image.BILINEAR), dtype=np.float32)
        fg = read_mask(Path(mask_root) / mask_relpath(rel))
        fg = np.asarray(Image.fromarray(fg.astype(np.uint8) * 255).resize((cell, cell), Image.NEAREST)) > 127
        tint = img * 0.6 + np.array([255.0, 0.0, 0.0]) * 0.4
        shown = np.where(fg[..., None], tint, img * 0.3)
        sheet.paste(Image.fromarray(shown.clip(0, 255).astype(np.uint8)), ((i % columns) * cell, (i // columns) * cell))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def preview_relpaths(rows: dict[str, list[dict]], count: int) -> list[str]:
    """`count` images spread evenly over the masked images (train first), one per class where possible."""
    items = [r for split in rows for r in rows[split]]
    if not items or count <= 0:
        return []
    by_label: dict[int, list[dict]] = {}
    for r in items:
        by_label.setdefault(r["label"], []).append(r)
    chosen, depth = [], 0
    while len(chosen) < min(count, len(items)):
        for label in sorted(by_label):
            if depth < len(by_label[label]) and len(chosen) < count:
                chosen.append(by_label[label][depth]["relpath"])
        depth += 1
    return chosen
