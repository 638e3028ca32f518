"""The one pass over the images: CLIP features of full and foreground views into an HDF5 store.

Crash safety: work goes to `<out>.partial`, each finished batch is flushed with its rows marked
done in `/progress/<split>`, and the file is renamed to `<out>` only when every split is
complete. Rerunning the same command resumes from the partial file; the settings are compared
first so a partial file written with other settings is never continued by mistake. Under
torchrun the ranks share the batches and write shards that rank 0 folds into the partial file
(`passes`); the result is the same file.

The loop over the images (`passes.run_pass`), the decoding of an image with its mask into views
(`ViewDataset`, whose view plan says which geometry and box each view gets) and the encoder call
(`encode_views`) are shared with later passes over a cache (`backbones.image_pass`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from .data import SPLITS, Dataset, base_new_split, fewshot_splits, short_classes
from .datasets import find_mask
from .device import module_device, moved_to, one_cpu_thread
from .distributed import Job, current_job
from .extraction_plan import ExtractionPlan, plan_extraction
from .models import LoadedModel
from .passes import DONE, PENDING, SKIPPED, BatchWrites, PassReport, run_pass
from .feature_checks import cache_warnings, token_warnings
from .store import (BASE_CLASSES, CLASS_NAMES, FORMAT, FORMAT_VERSION, NEW_CLASSES, PROGRESS, CacheError, check_partial,
                    image_key, open_cache, partial_path, progress_key, sample_key, seal, text_key)
from .views import FG_MODES, NO_BOX, AugmentConfig, Box, ViewMaker, binarize_mask, draw_box, fit_mask, view_generator

MISSING_MASK_POLICIES = ("error", "full", "skip")
BAD_IMAGE_POLICIES = ("error", "skip")
MASK_SIZE_POLICIES = ("resize", "error", "skip")
DEFAULT_TRAIN_VIEWS = 11  # view 0 (deterministic) + one augmented view per epoch of the paper's 10
# Policies that only decide what happens to one bad row: a rerun may change them and still resume.
ROW_POLICIES = ("bad_image_policy", "mask_size_policy")
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_ENCODE_BATCH = 256  # images per encoder forward (a batch of 64 images × 11 views × 2 is 1,408)


class ExtractionError(RuntimeError):
    """Extraction stopped on bad input; the partial file is kept so a rerun resumes."""


@dataclass
class ExtractOptions:
    shots: int = 16
    seed: int = 1
    train_views: int = DEFAULT_TRAIN_VIEWS
    batch_size: int | str = 64  # images per batch, or "auto" (`extraction_plan`)
    workers: int = 2
    device: str = "auto"
    missing_mask: str = "error"
    bad_image: str = "error"
    mask_size_mismatch: str = "resize"
    fg_mode: str = "normalized"
    template: str | None = None
    store_dtype: str = "float16"
    precision: str = "auto"  # the encoder's autocast: auto (fp16 on CUDA, fp32 on the CPU), fp32, fp16, bf16
    encode_batch: int = DEFAULT_ENCODE_BATCH  # images (views) per encoder forward
    resume: bool = True
    force: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        checks = [
            ("missing_mask", self.missing_mask, MISSING_MASK_POLICIES),
            ("bad_image", self.bad_image, BAD_IMAGE_POLICIES),
            ("mask_size_mismatch", self.mask_size_mismatch, MASK_SIZE_POLICIES),
            ("fg_mode", self.fg_mode, FG_MODES),
            ("store_dtype", self.store_dtype, tuple(STORE_DTYPES)),
            ("device", self.device, ("auto", "cpu", "cuda")),
            ("precision", self.precision, PRECISIONS),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.train_views < 1:
            raise ValueError(f"train_views must be >= 1, got {self.train_views}")
        if self.batch_size != "auto" and (isinstance(self.batch_size, str) or self.batch_size < 1):
            raise ValueError(f"batch_size must be >= 1 or 'auto', got {self.batch_size!r}")
        if self.encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1, got {self.encode_batch}")


@dataclass
class ExtractSummary:
    out: Path
    counts: dict[str, int]
    skipped: dict[str, list[dict]]
    full_masks: list[str]
    resized_masks: list[str]
    empty_masks: dict[str, int]
    resumed_rows: int
    seconds: float
    images_per_second: float
    short_classes: dict[str, list[dict]] = field(default_factory=dict)
    world_size: int = 1
    ranks: list[dict] = field(default_factory=list)  # per rank: rows it encoded and the seconds of its pass
    warnings: list[str] = field(default_factory=list)  # features that cannot tell classes apart (feature_checks)
    plan: dict = field(default_factory=dict)  # `extraction_plan.ExtractionPlan`: batch size, memory per batch


def default_output(dataset: str, model: str, pretrained: str | None, shots: int, seed: int, views: int,
                   root: Path = Path("cache")) -> Path:
    model_tag = Path(model).stem if model.endswith(".json") else model
    is_file = pretrained and ("/" in pretrained or os.sep in pretrained or Path(pretrained).is_file())
    weights = Path(pretrained).stem if is_file else (pretrained or "none")
    shot_tag = f"shots{shots}" if shots > 0 else "allshots"
    view_tag = f"_views{views}" if views != DEFAULT_TRAIN_VIEWS else ""
    return root / dataset / f"{model_tag}-{weights}" / f"{shot_tag}_seed{seed}{view_tag}.h5"


def class_prompt(template: str, classname: str) -> str:
    return template.format(classname.replace("_", " "))


@torch.no_grad()
def encode_texts(loaded: LoadedModel, texts: list[str], device: torch.device | None = None,
                 batch_size: int = 256) -> torch.Tensor:
    """L2-normalised CLIP text features of `texts`, float32 on the CPU; computed where the model is unless
    `device` says otherwise (the model must then already be there); on one CPU thread whatever the process's
    setting (`device.one_cpu_thread`), so one process and N torchrun ranks get the same bits."""
    device = module_device(loaded.model) if device is None else torch.device(device)
    out = []
    with one_cpu_thread(device):
        for i in range(0, len(texts), batch_size):
            tokens = loaded.tokenizer(texts[i:i + batch_size]).to(device)
            out.append(F.normalize(loaded.model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


class ViewDataset(TorchDataset):
    """Decodes each image (and its mask) once and returns all of its views with their boxes.

    `plan(row, img)` gives each view's geometry and box (see `views.ViewMaker`): extraction draws
    them (`DrawnViews`), later passes over a cache read the stored ones. A row's `mask` is a mask
    file, or None for an all-ones mask. An item holds uint8 `pixels` (V, 3, S, S) and a bool `mask`
    (V, 1, S, S) (`encode_views` normalises them where the encoder runs). Items report unusable
    input instead of raising, so the pass decides (skip, or stop with the file named).
    """

    def __init__(self, rows: list[dict], image_root: Path, maker: ViewMaker, plan: Callable, mask_size_policy: str = "resize"):
        self.rows, self.image_root, self.maker, self.plan = rows, image_root, maker, plan
        self.mask_size_policy = mask_size_policy

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        path = self.image_root / row["relpath"]
        fail = {"index": row["index"], "ok": False}
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as exc:  # any decoder failure means the file is unusable
            return {**fail, "error": f"cannot read image {path}: {exc}"}
        resized = False
        if row["mask"] is None:
            mask = Image.new("L", img.size, 255)
        else:
            try:
                with Image.open(row["mask"]) as m:
                    mask = binarize_mask(m)
            except Exception as exc:
                return {**fail, "fatal": True, "error": f"cannot read mask {row['mask']} (for image {path}): {exc}; "
                                                        "regenerate or replace that mask file"}
            if mask.size != img.size:
                message = (f"mask {row['mask']} is {mask.size[0]}x{mask.size[1]} but image {path} is "
                           f"{img.size[0]}x{img.size[1]}")
                if self.mask_size_policy == "error":
                    return {**fail, "fatal": True, "error": message + "; regenerate the mask at the image's size, or "
                                                                      "pass --mask-size-mismatch resize (the release's loader) or skip"}
                if self.mask_size_policy == "skip":
                    return {**fail, "skip": True, "error": message + " (--mask-size-mismatch skip)"}
                mask, resized = fit_mask(mask, img.size), True
        pixels, masks, areas, boxes = [], [], [], []
        for kind, box in self.plan(row, img):
            p, m, area = self.maker.pixels(img, mask, kind, box)
            pixels.append(p)
            masks.append(m)
            areas.append(area)
            boxes.append(NO_BOX if box is None else box.as_row())
        # uint8 pixels and a bool mask per view: the encoding process normalises them on its device
        return {"index": row["index"], "ok": True, "pixels": torch.stack(pixels), "mask": torch.stack(masks),
                "area": torch.tensor(areas, dtype=torch.float32), "box": torch.tensor(boxes, dtype=torch.int32),
                "mask_resized": resized}


@dataclass(frozen=True)
class DrawnViews:
    """Extraction's views: train view 0 is Dassl's training transform without augmentation (squash),
    train views 1…V−1 random resized crops + flips drawn from `view_generator`; val and test use
    the test transform."""

    split_index: int
    views: int
    seed: int
    augment: AugmentConfig

    def __call__(self, row: dict, img: Image.Image) -> list[tuple[str, Box | None]]:
        if SPLITS[self.split_index] != "train":
            return [("eval", None)] * self.views
        return [("squash", None)] + [
            ("box", draw_box(img.width, img.height, self.augment, view_generator(self.seed, self.split_index, row["index"], v)))
            for v in range(1, self.views)
        ]


def _resolve_masks(dataset: Dataset, samples: dict[str, list], policy: str):
    """Attach a mask path to each sample; apply the missing-mask policy. Returns rows, full-mask list, skipped."""
    rows: dict[str, list[dict]] = {}
    missing: list[str] = []
    skipped: dict[str, list[dict]] = {s: [] for s in SPLITS}
    full_masks: list[str] = []
    for split in SPLITS:
        rows[split] = []
        for s in samples[split]:
            mask = find_mask(dataset.mask_root, s.relpath) if dataset.mask_root is not None else None
            if mask is None:
                missing.append(s.relpath)
                if policy == "skip":
                    skipped[split].append({"path": s.relpath, "reason": "missing mask"})
                    continue
                if policy == "full":
                    full_masks.append(s.relpath)
            rows[split].append({"relpath": s.relpath, "label": s.label, "mask": mask})
    if missing and policy == "error":
        where = f"under {dataset.mask_root}" if dataset.mask_root else "(no mask folder was found or given)"
        examples = ", ".join(missing[:5])
        raise ExtractionError(
            f"{len(missing)} image(s) have no mask {where}, e.g. {examples}. Point --mask-root at the folder that "
            "mirrors the image folder, or pass --missing-mask full (use the whole image, recorded in provenance) "
            "or --missing-mask skip (leave those images out, listed in the cache)"
        )
    return rows, full_masks, skipped


def check_images_exist(dataset: Dataset, samples: dict[str, list], policy: str) -> list[str]:
    """Every image of the draw, looked for before the first batch. Under `--bad-image error` missing ones
    stop the run here (nothing written); under `skip` they are returned and left to the pass, which
    skips and lists them like any unreadable image."""
    missing = [f"{split}: {s.relpath}" for split in SPLITS for s in samples[split]
               if not (Path(dataset.image_root) / s.relpath).is_file()]
    if missing and policy == "error":
        examples = "; ".join(missing[:5])
        raise ExtractionError(
            f"{len(missing)} image(s) of the split are not under {dataset.image_root}, e.g. {examples}. Fix the paths "
            "(the split file's entries are relative to --image-root), or pass --bad-image skip to leave them out "
            "(listed in the cache). Nothing was written")
    return missing


def _fingerprint(provenance: dict) -> str:
    volatile = ("created", "skipped", "full_mask_images", "resized_masks", "policy_runs", "short_classes", *ROW_POLICIES)
    stable = {k: v for k, v in provenance.items() if k not in volatile}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def check_compute(part: Path, compute: dict) -> None:
    """Refuse to continue a partial file whose rows were computed on another device type or precision."""
    with h5py.File(part, "r") as f:
        before = json.loads(f.attrs.get("compute", "null") or "null")
    if before is not None and before != compute:
        raise CacheError(
            f"{part} was started on {before['device_type']} with --precision {before['precision']}, but this run "
            f"computes on {compute['device_type']} with --precision {compute['precision']}: its rows would mix "
            f"features of two numerics. Rerun with --device {before['device_type']} --precision {before['precision']} "
            "to finish it, or with --no-resume to start over")


def _create_layout(f: h5py.File, rows: dict[str, list[dict]], views: dict[str, int], dim: int, dtype) -> None:
    for split in SPLITS:
        n, v = len(rows[split]), views[split]
        for kind in ("full", "fg"):
            f.create_dataset(image_key("clip", split, kind), shape=(n, v, dim), dtype=dtype,
                             chunks=(min(max(n, 1), 256), v, dim) if n else None)
        f.create_dataset(sample_key(split, "label"), data=np.array([r["label"] for r in rows[split]], dtype=np.int64))
        f.create_dataset(sample_key(split, "path"), data=[r["relpath"] for r in rows[split]],
                         dtype=h5py.string_dtype("utf-8"))
        f.create_dataset(sample_key(split, "area"), shape=(n, v), dtype=np.float32)
        f.create_dataset(sample_key(split, "box"), shape=(n, v, 5), dtype=np.int32)
        f.create_dataset(progress_key(split, "status"), data=np.zeros(n, dtype=np.uint8))
        f.create_dataset(progress_key(split, "mask_resized"), data=np.zeros(n, dtype=np.uint8))
        f.create_dataset(progress_key(split, "error"), data=[""] * n, dtype=h5py.string_dtype("utf-8"))


def _finalize(f: h5py.File, skipped_listed: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], list[str]]:
    """Drop rows skipped during extraction, delete progress; return the full skip list and the resized masks."""
    skipped = {s: list(v) for s, v in skipped_listed.items()}
    resized = []
    for split in SPLITS:
        status = f[progress_key(split, "status")][()]
        keep = status == DONE
        if (status == PENDING).any():
            raise ExtractionError(f"split {split} still has pending rows; rerun to resume")
        paths = f[sample_key(split, "path")][()]
        resized += [f"{split}/{paths[i].decode()}" for i in np.flatnonzero(f[progress_key(split, "mask_resized")][()] & keep)]
        if not keep.all():
            errors = f[progress_key(split, "error")][()]
            for i in np.flatnonzero(~keep):
                skipped[split].append({"path": paths[i].decode(), "reason": errors[i].decode()})
            for key in (image_key("clip", split, "full"), image_key("clip", split, "fg"), sample_key(split, "label"),
                        sample_key(split, "path"), sample_key(split, "area"), sample_key(split, "box")):
                data = f[key][()][keep]
                dtype = f[key].dtype
                del f[key]
                f.create_dataset(key, data=data, dtype=dtype)
    del f[PROGRESS]
    return skipped, resized


def extract(
    dataset: Dataset,
    loaded: LoadedModel,
    out: Path,
    options: ExtractOptions = ExtractOptions(),
    progress: Callable[[str, int, int], None] | None = None,
    stop_after_batches: int | None = None,
    job: Job | None = None,
    on_plan: Callable[[ExtractionPlan], None] | None = None,
) -> ExtractSummary:
    """Write the cache for `dataset` to `out`.

    `progress(split, rows_done, rows_total)` is called after each batch (under torchrun on rank 0,
    with the rows of every rank). `stop_after_batches` simulates an interruption after that many
    batches (tests and benchmarks use it). `job` is the torchrun job this process belongs to
    (default: from the environment, `distributed.current_job`); every rank calls `extract` with the
    same arguments and gets the same summary. `on_plan(plan)` hears the memory plan (batch size,
    memory per batch) before the pass starts; a plan whose queued batches cannot fit in /dev/shm is
    refused then.
    """
    options.validate()
    out = Path(out)
    template = options.template or dataset.template
    if "{}" not in template:
        raise ValueError(f"template {template!r} must contain '{{}}' where the class name goes")
    samples = fewshot_splits(dataset.splits, options.shots, options.seed)
    short = short_classes(dataset.splits, options.shots, dataset.classnames)
    check_images_exist(dataset, samples, options.bad_image)
    rows, full_masks, skipped_missing = _resolve_masks(dataset, samples, options.missing_mask)
    base, new = base_new_split(dataset.num_classes)
    views = {"train": options.train_views, "val": 1, "test": 1}
    job = job or current_job()
    device = job.device(options.device)
    precision = resolve_precision(options.precision, device, options.store_dtype)
    compute = {"device_type": device.type, "precision": precision}
    plan = plan_extraction(batch_size=options.batch_size, views=max(views.values()),
                           image_size=int(loaded.preprocess["size"]), workers=options.workers,
                           encode_batch=options.encode_batch, device=device, precision=precision, model=loaded.model)
    if on_plan:
        on_plan(plan)
    if any("/dev/shm" in problem for problem in plan.problems()):
        raise ExtractionError(plan.problems()[0])
    provenance = {
        **loaded.provenance,
        "dataset": dataset.name,
        "image_root": str(dataset.image_root),
        "split_file": str(dataset.split_file) if dataset.split_file else None,
        "split_sha256": dataset.split_sha256,
        "shots": options.shots,
        "seed": options.seed,
        "views": views,
        "view_geometry": {"train": ["squash"] + ["box"] * (views["train"] - 1), "val": ["eval"], "test": ["eval"]},
        "geometries": {"squash": "Dassl's training transform without random crops: Resize((S, S)) of the whole image",
                       "eval": f"test transform: resize {loaded.preprocess['resize_mode']} side to S, centre crop S",
                       "box": "random resized crop + horizontal flip, box stored in /samples/<split>/box"},
        "augmentation": {"random_resized_crop_scale": list(options.augment.scale),
                         "ratio": list(options.augment.ratio), "hflip_p": options.augment.flip_p,
                         "interpolation": loaded.preprocess["interpolation"], "mask_interpolation": "nearest",
                         "generator": "torch.Generator seeded by (seed, split, sample, view)"},
        "mask_root": str(dataset.mask_root) if dataset.mask_root else None,
        "mask_reading": "RGB, resized to the image with nearest neighbour if sizes differ, mean over RGB > 0.5",
        "missing_mask_policy": options.missing_mask,
        "bad_image_policy": options.bad_image,
        "mask_size_policy": options.mask_size_mismatch,
        "fg_mode": options.fg_mode,
        "template": template,
        "store_dtype": options.store_dtype,
        "compute": compute,  # part of the fingerprint: a partial file is never continued on another device or precision
        "short_classes": short,
        **({"dataset_notes": dataset.extra} if dataset.extra else {}),
    }
    fingerprint = _fingerprint(provenance)
    maker = ViewMaker(loaded.preprocess, options.fg_mode)
    policies = {k: provenance[k] for k in ROW_POLICIES}
    job.start(device)
    model = loaded.model  # moved to `device` for the pass only (`moved_to`): the caller's model stays where it is
    started = time.perf_counter()
    part = partial_path(out)

    def prepare() -> None:  # rank 0, holding the lock
        if out.exists() and not options.force:
            raise CacheError(f"{out} already exists; pass --force to overwrite it or choose another --out")
        if part.exists():
            check_compute(part, compute)
            check_partial(part, fingerprint, "different settings (model, data, shots, seed, views, masks or the "
                                             "missing-mask policy)")
        else:
            text = encode_texts(loaded, [class_prompt(template, c) for c in dataset.classnames], device)
            tmp = part.with_name(part.name + ".new")
            with h5py.File(tmp, "w") as f:
                f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, fingerprint=fingerprint,
                               logit_scale=loaded.logit_scale, compute=json.dumps(compute))
                f.create_dataset(CLASS_NAMES, data=dataset.classnames, dtype=h5py.string_dtype("utf-8"))
                f.create_dataset(BASE_CLASSES, data=np.array(base, dtype=np.int64))
                f.create_dataset(NEW_CLASSES, data=np.array(new, dtype=np.int64))
                f.create_dataset(text_key("clip"), data=text.numpy().astype(np.float32))
                f[text_key("clip")].attrs["template"] = template
                _create_layout(f, rows, views, text.shape[1], STORE_DTYPES[options.store_dtype])
            os.replace(tmp, part)
        with h5py.File(part, "r+") as f:
            runs = json.loads(f.attrs.get("policy_runs", "[]"))
            if not runs or runs[-1] != policies:
                runs.append(policies)
            f.attrs["policy_runs"] = json.dumps(runs)

    def dataset_for(split: str, pending: np.ndarray) -> ViewDataset:
        split_index = SPLITS.index(split)
        todo = [dict(rows[split][i], index=int(i)) for i in pending]
        return ViewDataset(todo, dataset.image_root, maker,
                           DrawnViews(split_index, views[split], options.seed, options.augment),
                           options.mask_size_mismatch)

    def finish(report: PassReport) -> ExtractSummary:  # rank 0, holding the lock, every row done
        with h5py.File(part, "r+") as f:
            skipped, resized = _finalize(f, skipped_missing)
            provenance["skipped"] = skipped
            provenance["full_mask_images"] = full_masks
            provenance["resized_masks"] = resized
            provenance["policy_runs"] = json.loads(f.attrs["policy_runs"])
            if max(report.world_sizes) > 1:  # a single-process cache records nothing about processes
                provenance["world_sizes"] = report.world_sizes
            provenance["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs["provenance"] = json.dumps(provenance)
            for key in ("fingerprint", "policy_runs", "world_sizes", "compute"):
                if key in f.attrs:
                    del f.attrs[key]
            seal(f)
            counts = {s: int(f[sample_key(s, "label")].shape[0]) for s in SPLITS}
            empty = {s: int((f[sample_key(s, "area")][()] == 0).any(axis=1).sum()) if counts[s] else 0 for s in SPLITS}
        os.replace(part, out)
        prompts = [class_prompt(template, c) for c in dataset.classnames]
        warnings = token_warnings(loaded.tokenizer(prompts).numpy(), dataset.classnames) + cache_warnings(open_cache(out))
        seconds = time.perf_counter() - started
        encoded = sum(r["rows"] for r in report.ranks)
        return ExtractSummary(out=out, counts=counts, skipped=skipped, full_masks=full_masks, resized_masks=resized,
                              empty_masks=empty, resumed_rows=report.resumed, seconds=seconds,
                              images_per_second=encoded / seconds if seconds > 0 else 0.0, short_classes=short,
                              world_size=job.world_size, ranks=report.ranks, warnings=warnings, plan=plan.as_dict())

    with moved_to(model, device):
        return run_pass(job, what="extract", lock=out, part=part, splits=list(SPLITS), fingerprint=fingerprint,
                        resume=options.resume, prepare=prepare, dataset_for=dataset_for,
                        encode=lambda split, items: _encode_batch(split, items, model, device, options.bad_image, maker,
                                                                  precision, options.encode_batch,
                                                                  lambda i: rows[split][i]["relpath"]),
                        finish=finish, batch_size=plan.batch_size, workers=options.workers, progress=progress,
                        stop_after_batches=stop_after_batches, pin_memory=device.type == "cuda")


def resolve_precision(precision: str, device: torch.device, store_dtype: str = "float16") -> str:
    """The encoder's compute precision: `auto` is fp16 autocast on CUDA (fp32 when float32 features are
    stored, so they are float32 values) and fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {PRECISIONS}")
    if precision != "auto":
        return precision
    return "fp16" if device.type == "cuda" and store_dtype != "float32" else "fp32"


@torch.no_grad()
def _forward(forward: Callable, pixels: torch.Tensor, device: torch.device, precision: str) -> dict[str, torch.Tensor]:
    with torch.autocast(device.type, dtype=AUTOCAST.get(precision, torch.float32), enabled=precision != "fp32"):
        out = forward(pixels.to(device, non_blocking=True))
    out = out if isinstance(out, dict) else {"": out}
    return {k: F.normalize(v.float(), dim=-1) for k, v in out.items()}


@torch.no_grad()
def run_encoder(forward: Callable[[torch.Tensor], torch.Tensor | dict], pixels: torch.Tensor,
                device: torch.device, precision: str = "auto") -> dict[str, torch.Tensor]:
    """L2-normalised float32 CPU outputs of `forward(pixels)` under the `precision` autocast
    (`resolve_precision`; auto: fp16 on CUDA). `forward` returns one feature tensor (named "") or a dict
    of them (MMRL: "" and "_rep")."""
    precision = resolve_precision(precision, device)
    return {k: v.cpu() for k, v in _forward(forward, pixels, device, precision).items()}


def encode_images(model: torch.nn.Module, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """normalize(encode_image(pixels)) in float32, with fp16 autocast on CUDA."""
    return run_encoder(model.encode_image, pixels, device)[""]


@torch.no_grad()
def encode_views(forward, items: list[dict], device: torch.device, maker: ViewMaker, precision: str = "auto",
                 encode_batch: int = DEFAULT_ENCODE_BATCH) -> dict[str, torch.Tensor]:
    """Features of the full and foreground views of decoded items: {name: (2, B, V, D)}, [0] full, [1] fg.

    The items' uint8 pixels go to `device` as they are (from pinned memory when the loader pinned
    them) and are normalised there; the encoder sees at most `encode_batch` images per forward."""
    precision = resolve_precision(precision, device)
    pixels = torch.stack([g["pixels"].to(device, non_blocking=True) for g in items]).flatten(0, 1)  # (B·V, 3, S, S)
    masks = torch.stack([g["mask"].to(device, non_blocking=True) for g in items]).flatten(0, 1)
    b, v = len(items), pixels.shape[0] // max(len(items), 1)
    outs = [_forward(forward, maker.normalize(pixels[i:i + encode_batch], masks[i:i + encode_batch], kind), device,
                     precision)
            for kind in ("full", "fg") for i in range(0, len(pixels), encode_batch)]
    return {k: torch.cat([o[k] for o in outs]).cpu().view(2, b, v, -1) for k in outs[0]}


def check_finite(feats: torch.Tensor, split: str, items: list[dict], path_of: Callable[[int], str],
                 precision: str) -> None:
    """Stop with the batch and the first image named when a feature (2, B, V, D) holds NaN or inf."""
    finite = torch.isfinite(feats).all(-1)  # (2, B, V)
    if bool(finite.all()):
        return
    kind, j, view = (int(i) for i in (~finite).nonzero()[0])
    rows = [item["index"] for item in items]
    hint = {"fp16": "large open_clip models overflow in fp16: rerun with --precision bf16 (or fp32)",
            "bf16": "rerun with --precision fp32"}.get(precision, "check the model's weights")
    raise ExtractionError(
        f"non-finite (NaN or inf) features in the {split} batch of rows {min(rows)}–{max(rows)}: "
        f"{int((~finite).sum())} of {finite.numel()} views, the first {('full', 'fg')[kind]} view {view} of "
        f"{path_of(rows[j])}, computed with --precision {precision}; {hint}. Nothing of this batch was written; "
        "finished batches are kept (a rerun with another precision needs --no-resume)")


def _encode_batch(split: str, items: list[dict], model, device, bad_image: str, maker: ViewMaker, precision: str,
                  encode_batch: int, path_of: Callable[[int], str]) -> BatchWrites:
    rows = np.array([item["index"] for item in items])
    status = np.full(len(items), DONE, dtype=np.uint8)
    good, skipped, reasons = [], [], []
    for j, item in enumerate(items):
        if item["ok"]:
            good.append(j)
        elif not item.get("skip") and (item.get("fatal") or bad_image == "error"):
            hint = "" if item.get("fatal") else " Fix or remove the file, or pass --bad-image skip to leave it out."
            raise ExtractionError(item["error"] + "." + hint + " Rerun the same command afterwards: finished batches are kept.")
        else:
            skipped.append(j)
            reasons.append(item["error"])
            status[j] = SKIPPED
    writes = [(progress_key(split, "status"), rows, status)]
    if skipped:
        writes.append((progress_key(split, "error"), rows[skipped], np.array(reasons, dtype=object)))
    if good:
        kept = [items[j] for j in good]
        feats = encode_views(model.encode_image, kept, device, maker, precision, encode_batch)[""]
        check_finite(feats, split, kept, path_of, precision)
        idx = rows[good]
        writes += [
            (image_key("clip", split, "full"), idx, feats[0].numpy()),
            (image_key("clip", split, "fg"), idx, feats[1].numpy()),
            (sample_key(split, "area"), idx, torch.stack([g["area"] for g in kept]).numpy()),
            (sample_key(split, "box"), idx, torch.stack([g["box"] for g in kept]).numpy()),
            (progress_key(split, "mask_resized"), idx, np.array([g["mask_resized"] for g in kept], dtype=np.uint8)),
        ]
    return BatchWrites(split=split, rows=rows, writes=writes)
