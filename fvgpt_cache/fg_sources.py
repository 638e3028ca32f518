"""Several mask sources in one cache: foreground views of other masks added without re-encoding full views.

A cache holds the foreground views extract wrote from `--mask-root` (the source "extracted"). More
sources go under

    /fg_sources/<name>/clip/<split>    (N, V, D) CLIP features of the foreground views, storage dtype
    /fg_sources/<name>/area/<split>    (N, V) float32 foreground fraction A(m) of each view
    /fg_sources/<name>                 attr provenance (JSON): mask folder, its masks.json, counts

built from the very views the cache stores (the geometry and crop boxes it records; nothing is
redrawn) and the cache's own CLIP, which is first checked to reproduce the cached full views of
the first image of every split. Only foreground views are encoded. Every cache also has the source
`none` built in (`store.NO_MASK`): an all-ones mask, whose foreground view is the full view, A = 1.

The pass is extraction's (`passes.run_pass`): crash-safe and resumable in `<cache>.fg-<name>.partial`,
under torchrun like extract, one writer per cache. The cache file itself changes only in
`write_source_into_cache`, the one function here that writes into an existing cache: a copy with the
new groups replaces it atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from .datasets import find_mask
from .distributed import Job, current_job
from .device import caller_model_kept
from .extraction import STORE_DTYPES, ExtractionError, ViewDataset, check_finite, resolve_precision, run_encoder
from .models import LoadedModel
from .passes import DONE, BatchWrites, PassReport, run_pass
from .store import (EXTRACTED_FG, FG_SOURCES, NO_MASK, CacheError, check_partial, fg_source_key, mask_statistics,
                    open_cache, progress_key, seal)
from .views import Box, ViewMaker

SOURCE_FORMAT = "fvgpt-cache-fg-source"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
CLIP_CHECK_THRESHOLD = 0.99
MISSING_MASK_POLICIES = ("error", "full")


@dataclass
class SourceOptions:
    image_root: str | None = None  # default: the cache's
    pretrained: str | None = None  # the cache's CLIP weights, if the recorded file moved
    missing_mask: str = "error"  # error | full (an all-ones mask, listed in the source's provenance)
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    resume: bool = True
    force: bool = False

    def validate(self) -> "SourceOptions":
        if self.missing_mask not in MISSING_MASK_POLICIES:
            raise ValueError(f"--missing-mask {self.missing_mask!r}: choose one of {', '.join(MISSING_MASK_POLICIES)}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"batch_size={self.batch_size}, workers={self.workers}: use batch_size ≥ 1, workers ≥ 0")
        return self


@dataclass
class SourceSummary:
    name: str
    counts: dict[str, int]
    stats: dict
    resumed_rows: int
    seconds: float
    provenance: dict = field(repr=False, default_factory=dict)


def check_source_name(name: str) -> str:
    if name == EXTRACTED_FG:
        raise ValueError(f"--name {name!r} is the cache's own foreground views (from extract); choose another name")
    if name == NO_MASK:
        raise ValueError(f"--name {name!r} is built into every cache (all-ones masks: the full views); choose another "
                         "name")
    if not NAME_PATTERN.fullmatch(name or ""):
        raise ValueError(f"--name {name!r}: use letters, digits and . _ + - (e.g. gradcam, clipseg, release, none)")
    return name


def source_partial(cache_path: Path, name: str) -> Path:
    return cache_path.with_name(f"{cache_path.name}.fg-{name}.partial")


def write_source_into_cache(cache_path: Path, name: str, features: dict[str, np.ndarray] | Path,
                            areas: dict[str, np.ndarray], provenance: dict) -> None:
    """THE write into an existing cache for mask sources: replace the cache by a copy that also holds
    `/fg_sources/<name>` (features per split, or a partial file holding them; areas per split;
    provenance). The original stays intact until the rename. The caller holds the cache's lock."""
    cache_path = Path(cache_path)
    new = cache_path.with_name(f"{cache_path.name}.fg-{name}.new")
    shutil.copyfile(cache_path, new)
    try:
        with h5py.File(new, "r+") as dst:
            dtype = STORE_DTYPES[json.loads(dst.attrs["provenance"]).get("store_dtype", "float16")]
            if f"{FG_SOURCES}/{name}" in dst:
                del dst[f"{FG_SOURCES}/{name}"]
            group = dst.require_group(f"{FG_SOURCES}/{name}")
            group.attrs["provenance"] = json.dumps(provenance)
            for split, area in areas.items():
                dst.create_dataset(fg_source_key(name, split, "area"), data=np.asarray(area, dtype=np.float32))
            if isinstance(features, dict):
                for split, feats in features.items():
                    dst.create_dataset(fg_source_key(name, split, "clip"), data=np.asarray(feats, dtype=dtype))
            else:
                with h5py.File(features, "r") as src:
                    for split in areas:
                        dst.create_dataset(fg_source_key(name, split, "clip"), data=src[f"fg/{split}"][()])
            seal(dst)  # the new datasets' digests and the cache's new content fingerprint
        os.replace(new, cache_path)
    finally:
        if new.exists():
            new.unlink()


def _plan(cache, image_root: Path, mask_root: Path, policy: str) -> tuple[dict[str, list[dict]], list[str]]:
    """Every cached row with its mask under `mask_root` and the views the cache stores."""
    geometry = cache.provenance.get("view_geometry")
    if not geometry:
        raise CacheError(f"{cache.path} does not record the geometry of its views; re-extract it so its views can be "
                         "rebuilt")
    rows: dict[str, list[dict]] = {}
    missing: list[str] = []
    for split in cache.splits:
        paths, boxes, kinds = cache.paths(split), cache.boxes(split).numpy(), geometry[split]
        rows[split] = []
        for i, rel in enumerate(paths):
            mask = find_mask(mask_root, rel)
            if mask is None:
                missing.append(f"{split}/{rel}")
            views = [(kind, Box.from_row(boxes[i, v])) for v, kind in enumerate(kinds)]
            rows[split].append({"relpath": rel, "mask": mask, "views": views, "index": i})
    if missing and policy == "error":
        raise FileNotFoundError(
            f"{len(missing)} cached image(s) have no mask under {mask_root}, e.g. {', '.join(missing[:5])}. Write them "
            "with `fvgpt-cache masks` (same --splits as the cache), or pass --missing-mask full to use the whole image "
            "for those (listed in the source's provenance)")
    return rows, missing


def _check_full_views(cache, loaded: LoadedModel, rows, image_root: Path, maker: ViewMaker, device,
                      precision: str) -> float:
    """The cache's CLIP on the first image of every split reproduces its cached full views (the same
    images, preprocessing and model), so the new foreground views sit next to the right full views."""
    worst = 1.0
    for split, split_rows in rows.items():
        if not split_rows:
            continue
        item = ViewDataset(split_rows[:1], image_root, maker, lambda row, img: row["views"])[0]
        if not item["ok"]:
            raise ExtractionError(item["error"] + "; pass --image-root with the folder the cache was extracted from")
        feats = run_encoder(loaded.model.encode_image, maker.normalize(item["pixels"], item["mask"], "full"), device,
                            precision)[""]
        cos = F.cosine_similarity(feats, F.normalize(cache.image(split, "full", "clip")[0], dim=-1), dim=-1)
        worst = min(worst, float(cos.min()))
        if float(cos.min()) < CLIP_CHECK_THRESHOLD:
            raise CacheError(f"{split} image {split_rows[0]['relpath']} under {image_root} does not reproduce the "
                             f"cache's full-view features (cosine {float(cos.min()):.4f}); pass --image-root with the "
                             "original images")
    return worst


def add_foreground_source(cache_path: str | Path, name: str, mask_root: str | Path,
                          options: SourceOptions | None = None, loaded: LoadedModel | None = None,
                          progress: Callable[[str, int, int], None] | None = None,
                          stop_after_batches: int | None = None, job: Job | None = None) -> SourceSummary:
    """Add the mask source `name` to a cache: the foreground views of the masks under `mask_root`
    See the module docstring. A caller's model (`loaded`) is left on the device it came on."""
    with caller_model_kept(loaded):
        return _add_foreground_source(cache_path, name, mask_root, options, loaded, progress, stop_after_batches, job)


def _add_foreground_source(cache_path, name, mask_root, options, loaded, progress, stop_after_batches, job):
    options = (options or SourceOptions()).validate()
    started = time.perf_counter()
    name = check_source_name(name)
    cache = open_cache(cache_path)
    if name in cache.fg_sources and not options.force:
        raise CacheError(f"{cache.path} already has the mask source {name!r}; pass --force to replace it")
    if mask_root is None:
        raise ValueError(f"mask source {name!r} needs --mask-root DIR, the mask folder")
    mask_root = Path(mask_root)
    if not mask_root.is_dir():
        raise FileNotFoundError(f"mask folder not found: {mask_root}")
    prov = cache.provenance
    image_root = Path(options.image_root or prov.get("image_root") or "")
    if not image_root.is_dir():
        raise FileNotFoundError(f"the image folder {image_root} is not there; pass --image-root DIR, the folder the "
                                "cache's paths are relative to")
    from .backbones.cache_model import model_of, model_record

    job = job or current_job()
    device = job.device(options.device)
    job.start(device)
    loaded = model_of(cache, loaded, options.pretrained, device)
    model = loaded.model.to(device).eval()
    rows, missing = _plan(cache, image_root, mask_root, options.missing_mask)
    maker = ViewMaker(loaded.preprocess, prov.get("fg_mode", "normalized"))
    # the cache's own numerics (extraction records them), so the new foreground views match its full views
    precision = resolve_precision((prov.get("compute") or {}).get("precision", "auto"), device, prov.get("store_dtype", "float16"))
    clip_cosine = _check_full_views(cache, loaded, rows, image_root, maker, device, precision)
    masks_json = mask_root / "masks.json"
    made_by = json.loads(masks_json.read_text()).get("settings") if masks_json.is_file() else None
    store_dtype = prov.get("store_dtype", "float16")
    views = {s: int(cache.boxes(s).shape[1]) for s in rows}
    dim = int(cache.text("clip").shape[1])
    cache_id = hashlib.sha256(json.dumps(prov, sort_keys=True).encode()).hexdigest()
    mask_ids = {s: [str(r["mask"]) for r in rs] for s, rs in rows.items()}
    fingerprint = hashlib.sha256(json.dumps({"cache": cache_id, "name": name, "masks": mask_ids, "made_by": made_by},
                                            sort_keys=True).encode()).hexdigest()
    part = source_partial(cache.path, name)

    def prepare() -> None:  # rank 0, holding the cache's lock
        if name in open_cache(cache.path).fg_sources and not options.force:
            raise CacheError(f"{cache.path} got the mask source {name!r} meanwhile; pass --force to replace it")
        if part.exists():
            check_partial(part, fingerprint, "another mask folder or another cache")
            return
        tmp = part.with_name(part.name + ".new")
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=SOURCE_FORMAT, fingerprint=fingerprint)
            for split, split_rows in rows.items():
                n, v = len(split_rows), views[split]
                f.create_dataset(f"fg/{split}", shape=(n, v, dim), dtype=STORE_DTYPES[store_dtype],
                                 chunks=(min(max(n, 1), 256), v, dim) if n else None)
                f.create_dataset(f"area/{split}", shape=(n, v), dtype=np.float32)
                f.create_dataset(progress_key(split), data=np.zeros(n, dtype=np.uint8))
        os.replace(tmp, part)

    def dataset_for(split: str, pending: np.ndarray) -> ViewDataset:
        return ViewDataset([rows[split][i] for i in pending], image_root, maker, lambda row, img: row["views"])

    def encode(split: str, items: list[dict]) -> BatchWrites:
        for item in items:
            if not item["ok"]:
                raise ExtractionError(f"{item['error']}. The cache holds this image, so the source needs it: restore "
                                      "the file or the mask and rerun the same command; finished batches are kept")
        idx = np.array([item["index"] for item in items])
        pixels = torch.stack([item["pixels"] for item in items])  # (B, V, 3, S, S) uint8
        b, v = pixels.shape[:2]
        fg = maker.normalize(pixels.flatten(0, 1).to(device), torch.stack([item["mask"] for item in items]).flatten(0, 1)
                             .to(device), "fg")  # the foreground views only
        feats = run_encoder(model.encode_image, fg, device, precision)[""].view(b, v, -1)
        check_finite(torch.stack([feats, feats]), split, items, lambda i: rows[split][i]["relpath"], precision)
        return BatchWrites(split=split, rows=idx, writes=[
            (f"fg/{split}", idx, feats.numpy()),
            (f"area/{split}", idx, torch.stack([item["area"] for item in items]).numpy()),
            (progress_key(split), idx, np.full(len(idx), DONE, dtype=np.uint8)),
        ])

    def finish(report: PassReport) -> dict:  # rank 0, holding the lock, every row done
        with h5py.File(part, "r") as f:
            areas = {s: f[f"area/{s}"][()] for s in rows}
        provenance = {
            "name": name, "mask_root": str(mask_root.resolve()), "masks_json": made_by,
            "image_root": str(image_root), "missing_masks_full": missing, "clip_model": model_record(loaded),
            "clip_check_min_cosine": round(clip_cosine, 5), "fg_mode": prov.get("fg_mode"),
            "stats": {s: mask_statistics(a) for s, a in areas.items()},
            **({"world_sizes": report.world_sizes} if max(report.world_sizes) > 1 else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_source_into_cache(cache.path, name, part, areas, provenance)
        part.unlink()
        return {"provenance": provenance, "resumed": report.resumed}

    result = run_pass(job, what=f"mask source {name}", lock=cache.path, part=part, splits=list(rows),
                      fingerprint=fingerprint, resume=options.resume, prepare=prepare, dataset_for=dataset_for,
                      encode=encode, finish=finish, batch_size=options.batch_size, workers=options.workers,
                      progress=progress, stop_after_batches=stop_after_batches)
    provenance = result["provenance"]
    return SourceSummary(name=name, counts={s: len(r) for s, r in rows.items()}, stats=provenance["stats"],
                         resumed_rows=result["resumed"], seconds=time.perf_counter() - started, provenance=provenance)
