"""Importing a backbone that changes CLIP's image encoder (PromptSRC, MMRL): one more pass over the
very views the cache holds.

The pass re-reads the cached images and masks and rebuilds every stored view from what the cache
records: the geometry of each view (`view_geometry` in its provenance), the crop boxes of the
augmented views (`/samples/<split>/box`), the foreground mode and the mask reading. Nothing is
redrawn. Before the pass, the first image of every split is encoded with the cache's CLIP and
compared with the cached CLIP features (same images, same preprocessing); during it, every view's
foreground area is compared with the cached A(m) (same masks). The loop is extraction's
(`passes.run_pass`), so the import is crash-safe the same way and runs under torchrun the same way:
the features go to `<cache>.<name>.partial` batch by batch (under torchrun to one shard per rank,
folded in by rank 0), a rerun of the same command resumes it with any number of processes (its
settings are compared first), a second writer of the cache is refused, and only when every split
is done is the cache replaced, atomically, by a copy that holds the new groups:

    /text/<name>                      (C, D) float32, L2-normalised, attr provenance (JSON)
    /image/<name>/<split>/full, fg    (N, V, D) the cache's storage dtype, L2-normalised
    /image/<name>/<split>/full_rep, fg_rep    MMRL only: the representation feature n(f_rep)

`training.backbone_images` reads them (the image group is named by the text provenance's
`image_encoder`; MMRL's base-class vector is α·n(f_cls) + (1 − α)·n(f_rep), α from `alpha`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import find_mask
from ..device import caller_model_kept, one_cpu_thread
from ..distributed import Job, current_job
from ..extraction import (
    STORE_DTYPES, ExtractionError, ViewDataset, check_compute, check_finite, encode_views, resolve_precision,
)
from ..methods import MMRL as MMRL_METHOD, PROMPTSRC, backbone_method, backbone_method_names, backbone_methods
from ..passes import DONE, BatchWrites, PassReport, run_pass
from ..models import LoadedModel
from ..store import IMAGE, Cache, CacheError, check_partial, image_key, open_cache, progress_key, text_key, write_text_group
from ..views import Box, ViewMaker
from .cache_model import model_of, model_record
from .checkpoints import load_state_dict
from .mmrl import DEFAULT_ALPHA
from .promptsrc import DEFAULT_CTX_INIT

IMPORT_FORMAT = "fvgpt-cache-import"
CLIP_CHECK_THRESHOLD = 0.99  # cosine to the cached CLIP features (stored in fp16, maybe encoded on a GPU)
PROMPT_CHECK_THRESHOLD = 0.99  # cosine of the checkpoint's frozen token embeddings to the model's (fp16 in the file)
AREA_TOLERANCE = 1e-6


@dataclass
class ImportOptions:
    """Options of `import_backbone`; method-specific ones are refused for the other method."""

    name: str | None = None  # the groups to write (default: the method)
    alpha: float | None = None  # MMRL: base-class fusion weight (official 0.7)
    rep_layers: tuple[int, ...] | None = None  # MMRL: representation layers, numbered from 1 (default: last K)
    ctx_init: str | None = DEFAULT_CTX_INIT  # PromptSRC: CTX_INIT of the training config
    template: str | None = None  # MMRL: class template (default: the cache's)
    prompt_check: bool = True  # compare the class prompts stored in the checkpoint with the cache's classes
    image_root: str | None = None  # default: the cache's
    mask_root: str | None = None  # default: the cache's
    pretrained: str | None = None  # the cache's CLIP weights, if the recorded file moved
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    resume: bool = True
    force: bool = False

    def validate(self, method: str) -> "ImportOptions":
        imported = backbone_method_names("imported")
        if method not in imported:
            trained = "/".join(m.label for m in backbone_methods("trained"))
            raise ValueError(f"method={method!r}: choose one of {imported} ({trained} contexts are imported "
                             "with `fvgpt-cache backbone load`)")
        if self.name is not None and (not self.name or "/" in self.name or self.name == "clip"
                                      or self.name.startswith("clip_")):
            raise ValueError(f"name={self.name!r}: choose a group name without '/' that is not clip or clip_*")
        if method != MMRL_METHOD.name and (self.alpha is not None or self.rep_layers is not None):
            raise ValueError("--alpha and --rep-layers are MMRL options; PromptSRC has no fusion and no representation layers")
        if method != MMRL_METHOD.name and self.template is not None:
            raise ValueError("--template is an MMRL option; PromptSRC's class prompts are '<ctx-init> {class}.'")
        if method != PROMPTSRC.name and self.ctx_init != DEFAULT_CTX_INIT:
            raise ValueError("--ctx-init is a PromptSRC option; MMRL has no learned text context")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha}: use a fusion weight in [0, 1] (MMRL's official value is {DEFAULT_ALPHA})")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"batch_size={self.batch_size}, workers={self.workers}: use batch_size ≥ 1, workers ≥ 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: choose auto, cpu or cuda")
        return self


@dataclass
class ImportSummary:
    name: str
    method: str
    checkpoint: str
    epoch: int | None
    counts: dict[str, int]
    groups: list[str]
    resumed_rows: int
    seconds: float
    images_per_second: float
    prompt_check: str
    provenance: dict = field(repr=False, default_factory=dict)
    world_size: int = 1
    ranks: list[dict] = field(default_factory=list)  # per rank: rows it encoded and the seconds of its pass


def import_partial(cache_path: Path, name: str) -> Path:
    return cache_path.with_name(f"{cache_path.name}.{name}.partial")


def stored_views(row: dict, img) -> list[tuple[str, Box | None]]:
    """The view plan of a later pass: the geometry and box the cache stores for each view."""
    return row["views"]


def _existing_groups(path: Path, name: str) -> list[str]:
    with h5py.File(path, "r") as f:
        return [k for k in (text_key(name), image_key(name)) if k in f]


def _root(given: str | None, recorded: str | None, what: str, option: str, cache: Cache) -> Path | None:
    root = given or recorded
    if root is None:
        return None
    root = Path(root)
    if not root.is_dir():
        where = "given" if given else f"recorded in {cache.path}"
        raise FileNotFoundError(f"the {what} folder {root} ({where}) is not there; pass {option} DIR, the folder the "
                                "cache's paths are relative to")
    return root


def plan_rows(cache: Cache, image_root: Path, mask_root: Path | None) -> dict[str, list[dict]]:
    """Every cached row of every split with its mask file and its stored views, in the cache's order."""
    prov = cache.provenance
    geometry = prov.get("view_geometry")
    if not geometry:
        raise CacheError(f"{cache.path} does not record the geometry of its views (view_geometry); it was written by an "
                         "older fvgpt-cache: re-extract it so its views can be rebuilt")
    full_masks = set(prov.get("full_mask_images") or [])
    rows: dict[str, list[dict]] = {}
    missing = []
    for split in cache.splits:
        paths, boxes, kinds = cache.paths(split), cache.boxes(split).numpy(), geometry.get(split)
        if not kinds or len(kinds) != boxes.shape[1]:
            raise CacheError(f"{cache.path}: split {split} has {boxes.shape[1]} views but its recorded geometry is "
                             f"{kinds}; the file is inconsistent, re-extract it")
        rows[split] = []
        for i, rel in enumerate(paths):
            views = [(kind, Box.from_row(boxes[i, v])) for v, kind in enumerate(kinds)]
            bad = [v for v, (kind, box) in enumerate(views) if (kind == "box") != (box is not None)]
            if bad:
                raise CacheError(f"{cache.path}: view {bad[0]} of {split} image {rel} is a {kinds[bad[0]]!r} view but its "
                                 f"stored box is {boxes[i, bad[0]].tolist()}; the file is inconsistent, re-extract it")
            mask = None
            if rel not in full_masks:  # images extracted with an all-ones mask keep it (--missing-mask full)
                mask = find_mask(mask_root, rel) if mask_root is not None else None
                if mask is None:
                    missing.append(f"{split}/{rel}")
            rows[split].append({"relpath": rel, "mask": mask, "views": views, "index": i})
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} cached image(s) have no mask under {mask_root}, e.g. {', '.join(missing[:5])}; the cache was "
            "extracted with masks for them. Pass --mask-root DIR, the mask folder the cache was extracted with"
        )
    return rows


def check_clip_reproduced(cache: Cache, loaded: LoadedModel, rows: dict[str, list[dict]], image_root: Path,
                          maker: ViewMaker, device: torch.device) -> float:
    """Encode every view of the first image of each split with the cache's CLIP and compare with the cached
    features: proves the images, the preprocessing and the masks are the ones the cache holds."""
    worst = 1.0
    for split, split_rows in rows.items():
        if not split_rows:
            continue
        item = ViewDataset(split_rows[:1], image_root, maker, stored_views)[0]
        if not item["ok"]:
            raise ExtractionError(item["error"] + "; the cache holds this image, pass --image-root/--mask-root with the "
                                                  "folders it was extracted from")
        feats = encode_views(loaded.model.encode_image, [item], device, maker)[""]
        for k, kind in enumerate(("full", "fg")):
            cached = F.normalize(cache.image(split, kind, "clip")[0], dim=-1)
            cos = F.cosine_similarity(feats[k, 0], cached, dim=-1)
            worst = min(worst, float(cos.min()))
            if float(cos.min()) < CLIP_CHECK_THRESHOLD:
                v = int(cos.argmin())
                what = "image" if kind == "full" else "image or mask"
                raise CacheError(
                    f"view {v} ({kind}) of {split} image {split_rows[0]['relpath']} under {image_root} does not reproduce "
                    f"the cache's CLIP features (cosine {float(cos.min()):.4f} < {CLIP_CHECK_THRESHOLD}): the {what} "
                    "differs from the one the cache was extracted from. Pass --image-root / --mask-root with the "
                    "original folders"
                )
    return worst


@torch.no_grad()
def check_class_prompts(backbone, loaded: LoadedModel, tokens: torch.Tensor, texts: list[str], cache: Cache,
                        path: str) -> str:
    """Compare the class prompts the checkpoint stores (frozen token embeddings of the classes it was
    trained on) with the ones built from the cache's class names; refuse a mismatch."""
    stored = backbone.stored_prompts
    if stored is None:
        return "not possible: the checkpoint stores no class prompts"
    n = int(stored.shape[0])
    if n == len(cache.base):
        ids, label = np.asarray(cache.base), "base"
    elif n == len(cache.classnames):
        ids, label = np.arange(len(cache.classnames)), "all"
    else:
        return (f"not compared: the checkpoint was trained on {n} classes, the cache has {len(cache.classnames)} "
                f"({len(cache.base)} base)")
    model = loaded.model
    expected = model.token_embedding(tokens[ids].to(model.token_embedding.weight.device)).float().cpu()
    stored = stored.float()
    if stored.shape[1:] != expected.shape[1:]:
        raise ValueError(f"{path}: the stored class prompts have shape {tuple(stored.shape)}, the cache's model builds "
                         f"{tuple(expected.shape)}: the checkpoint was trained for another CLIP model")
    cos = F.cosine_similarity(stored, expected, dim=-1)  # (n, L)
    position = torch.arange(cos.shape[1])
    eot = tokens[ids].argmax(dim=-1, keepdim=True)
    ctx = backbone.context_positions
    compared = (position <= eot) & ~((position >= ctx.start) & (position < ctx.stop))
    bad = compared & (cos < PROMPT_CHECK_THRESHOLD)
    if bad.any():
        row, pos = (int(v) for v in bad.nonzero()[0])
        name = cache.classnames[int(ids[row])]
        raise ValueError(
            f"{path}: the class prompts stored in the checkpoint differ from the ones built from the cache's class "
            f"names: {label} class #{row} {name!r} ({texts[int(ids[row])]!r}) differs at token {pos} (cosine "
            f"{float(cos[row, pos]):.3f}). The checkpoint was trained with another prompt (PromptSRC: --ctx-init; MMRL: "
            "--template), other class names or class order, or on another dataset. If that is intended (a "
            "cross-dataset source), pass --no-prompt-check"
        )
    return f"matched the {n} {label} classes"


@torch.no_grad()
def _text_features(backbone, model, tokens: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with one_cpu_thread(next(model.parameters()).device):  # the same bits from one process and from N ranks (see there)
        parts = [backbone.text_features(model, tokens[i:i + batch]).float() for i in range(0, len(tokens), batch)]
    return F.normalize(torch.cat(parts), dim=-1).cpu()


def _fingerprint(method: str, name: str, cache: Cache, ckpt: dict, settings: dict, rows: dict, store_dtype: str) -> str:
    cache_id = hashlib.sha256(json.dumps(cache.provenance, sort_keys=True).encode()).hexdigest()
    stable = {"method": method, "name": name, "checkpoint_sha256": ckpt["sha256"], "cache": cache_id,
              "settings": {k: v for k, v in settings.items() if k != "alpha"},  # alpha changes no stored feature
              "rows": {s: len(r) for s, r in rows.items()}, "store_dtype": store_dtype}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def _create_partial(part: Path, fingerprint: str, name: str, rows: dict, views: dict, outputs, dim: int, dtype) -> None:
    tmp = part.with_name(part.name + ".new")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(format=IMPORT_FORMAT, fingerprint=fingerprint)
        for split, split_rows in rows.items():
            n, v = len(split_rows), views[split]
            for kind in ("full", "fg"):
                for suffix in outputs:
                    f.create_dataset(image_key(name, split, kind + suffix), shape=(n, v, dim), dtype=dtype,
                                     chunks=(min(max(n, 1), 256), v, dim) if n else None)
            f.create_dataset(progress_key(split, "status"), data=np.zeros(n, dtype=np.uint8))
    os.replace(tmp, part)


def _merge(cache_path: Path, part: Path, name: str, text: torch.Tensor, provenance: dict) -> None:
    """Replace the cache by a copy that also holds the new groups (the original stays intact until the rename)."""
    new = cache_path.with_name(f"{cache_path.name}.{name}.new")
    shutil.copyfile(cache_path, new)
    try:
        with h5py.File(new, "r+") as dst, h5py.File(part, "r") as src:
            for key in (text_key(name), image_key(name)):
                if key in dst:
                    del dst[key]
            src.copy(src[image_key(name)], dst.require_group(IMAGE), name=name)
        write_text_group(new, name, text, provenance)
        os.replace(new, cache_path)
    finally:
        if new.exists():
            new.unlink()
    part.unlink()


def import_backbone(cache_path: str | Path, method: str, checkpoint: str | Path,
                    options: ImportOptions | None = None,
                    progress: Callable[[str, int, int], None] | None = None,
                    stop_after_batches: int | None = None, loaded: LoadedModel | None = None,
                    job: Job | None = None) -> ImportSummary:
    """Write `/text/<name>` and `/image/<name>/…` from a PromptSRC or MMRL checkpoint (module docstring);
    a `loaded` model given by the caller runs on the options' device and is moved back afterwards."""
    with caller_model_kept(loaded):
        return _import_backbone(cache_path, method, checkpoint, options, progress, stop_after_batches, loaded, job)


def _import_backbone(cache_path: str | Path, method: str, checkpoint: str | Path,
                     options: ImportOptions | None = None,
                     progress: Callable[[str, int, int], None] | None = None,
                     stop_after_batches: int | None = None, loaded: LoadedModel | None = None,
                     job: Job | None = None) -> ImportSummary:
    """Write `/text/<name>` and `/image/<name>/…` from a PromptSRC or MMRL checkpoint (module docstring).

    Everything that can be refused (checkpoint of another method, width or depth; class prompts
    that differ; images or masks that are gone or changed) is refused before anything is written.
    `progress(split, rows_done, rows_total)` is called after each batch (under torchrun on rank 0,
    for the whole job); `stop_after_batches` simulates an interruption (tests). `job`: the torchrun
    job (default: from the environment); every rank calls this with the same arguments.
    """
    options = (options or ImportOptions()).validate(method)
    started = time.perf_counter()
    cache = open_cache(cache_path)
    name = options.name or method
    if _existing_groups(cache.path, name) and not options.force:
        raise CacheError(f"{cache.path} already has {', '.join(_existing_groups(cache.path, name))}; pass --force to "
                         "replace them or --name to write other groups")
    prov = cache.provenance
    store_dtype = prov.get("store_dtype", "float16")
    job = job or current_job()
    device = job.device(options.device)
    job.start(device)
    loaded = model_of(cache, loaded, options.pretrained, device)
    model = loaded.model.to(device).eval()

    state, ckpt = load_state_dict(checkpoint, method)
    importer = backbone_method(method).load_importer()
    backbone = importer.from_state(state, model, ckpt["file"], ctx_init=options.ctx_init,
                                   rep_layers=options.rep_layers, alpha=options.alpha)
    del state
    backbone.to(device)
    template = options.template or cache.text_attrs("clip").get("template") or prov.get("template")
    texts = backbone.prompt_texts(cache.classnames, template)
    tokens = loaded.tokenizer(texts)
    prompt_check = (check_class_prompts(backbone, loaded, tokens, texts, cache, ckpt["file"]) if options.prompt_check
                    else "skipped (--no-prompt-check)")
    text = _text_features(backbone, model, tokens)

    image_root = _root(options.image_root, prov.get("image_root"), "image", "--image-root", cache)
    if image_root is None:
        raise CacheError(f"{cache.path} records no image folder; pass --image-root DIR")
    mask_root = _root(options.mask_root, prov.get("mask_root"), "mask", "--mask-root", cache) \
        if (options.mask_root or prov.get("mask_root")) else None
    rows = plan_rows(cache, image_root, mask_root)
    maker = ViewMaker(loaded.preprocess, prov.get("fg_mode", "normalized"))
    clip_cosine = check_clip_reproduced(cache, loaded, rows, image_root, maker, device)

    settings = backbone.settings()
    if method == MMRL_METHOD.name:
        settings["template"] = template
    precision = resolve_precision("auto", device, store_dtype)
    settings["compute"] = {"device_type": device.type, "precision": precision}  # in the fingerprint and provenance
    fingerprint = _fingerprint(method, name, cache, ckpt, settings, rows, store_dtype)
    views = {s: len(r[0]["views"]) if r else int(cache.boxes(s).shape[1]) for s, r in rows.items()}
    areas = {s: cache.areas(s).numpy() for s in rows}
    groups = [image_key(name, s, k + x) for s in rows for k in ("full", "fg") for x in backbone.outputs]
    forward = lambda pixels: backbone.image_features(model, pixels)  # noqa: E731

    part = import_partial(cache.path, name)

    def prepare() -> None:  # rank 0, holding the lock
        if _existing_groups(cache.path, name) and not options.force:
            raise CacheError(f"{cache.path} got {name!r} groups meanwhile; pass --force to replace them")
        if part.exists():
            check_compute(part, settings["compute"])
            check_partial(part, fingerprint, "another checkpoint, other settings or another cache")
        else:
            _create_partial(part, fingerprint, name, rows, views, backbone.outputs, text.shape[1], STORE_DTYPES[store_dtype])
            with h5py.File(part, "r+") as f:
                f.attrs["compute"] = json.dumps(settings["compute"])

    def dataset_for(split: str, pending: np.ndarray) -> ViewDataset:
        return ViewDataset([rows[split][i] for i in pending], image_root, maker, stored_views)

    def encode(split: str, items: list[dict]) -> BatchWrites:
        for item in items:
            if not item["ok"]:
                raise ExtractionError(
                    f"{item['error']}. The cache holds this image, so the import needs it: restore the file "
                    "(or pass --image-root / --mask-root) and rerun the same command; finished batches are kept")
        idx = np.array([item["index"] for item in items])
        got = torch.stack([item["area"] for item in items]).numpy()
        diff = np.abs(got - areas[split][idx])
        if diff.max() > AREA_TOLERANCE:
            j, v = np.unravel_index(int(diff.argmax()), diff.shape)
            row = rows[split][int(idx[j])]
            raise ExtractionError(
                f"view {v} of {split} image {row['relpath']}: its foreground area is {got[j, v]:.4f} but the cache "
                f"stores {areas[split][idx[j], v]:.4f}; the mask {row['mask'] or '(all ones)'} (or the image) is "
                "not the one the cache was extracted with. Pass --mask-root / --image-root with the original folders")
        writes = []
        for suffix, feats in encode_views(forward, items, device, maker, precision).items():
            check_finite(feats, split, items, lambda i: rows[split][i]["relpath"], precision)
            writes.append((image_key(name, split, "full" + suffix), idx, feats[0].numpy()))
            writes.append((image_key(name, split, "fg" + suffix), idx, feats[1].numpy()))
        writes.append((progress_key(split, "status"), idx, np.full(len(idx), DONE, dtype=np.uint8)))
        return BatchWrites(split=split, rows=idx, writes=writes)

    def finish(report: PassReport) -> dict:  # rank 0, holding the lock, every row done
        provenance = {
            "method": method, "image_encoder": name, "official_code": backbone_method(method).official_code,
            "checkpoint": ckpt["file"], "checkpoint_sha256": ckpt["sha256"], "checkpoint_choice": ckpt["choice"],
            "epoch": ckpt["epoch"], "checkpoint_dtypes": ckpt["dtypes"], **settings,
            "class_prompts_example": texts[0] if texts else None, "prompt_check": prompt_check,
            "image_groups": groups, "clip_model": model_record(loaded), "clip_check_min_cosine": round(clip_cosine, 5),
            "image_root": str(image_root), "mask_root": str(mask_root) if mask_root else None,
            "views": {s: views[s] for s in rows}, "fg_mode": prov.get("fg_mode"), "store_dtype": store_dtype,
            **({"world_sizes": report.world_sizes} if max(report.world_sizes) > 1 else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _merge(cache.path, part, name, text, provenance)
        return {"provenance": provenance, "resumed": report.resumed, "ranks": report.ranks}

    result = run_pass(job, what=f"import {name}", lock=cache.path, part=part, splits=list(rows), fingerprint=fingerprint,
                      resume=options.resume, prepare=prepare, dataset_for=dataset_for, encode=encode, finish=finish,
                      batch_size=options.batch_size, workers=options.workers, progress=progress,
                      stop_after_batches=stop_after_batches, pin_memory=device.type == "cuda")
    provenance, resumed = result["provenance"], result["resumed"]
    seconds = time.perf_counter() - started
    counts = {s: len(r) for s, r in rows.items()}
    encoded = sum(r["rows"] for r in result["ranks"])
    return ImportSummary(name=name, method=method, checkpoint=ckpt["file"], epoch=ckpt["epoch"], counts=counts,
                         groups=[text_key(name), *groups], resumed_rows=resumed, seconds=seconds,
                         images_per_second=encoded / seconds if seconds > 0 else 0.0,
                         prompt_check=prompt_check, provenance=provenance, world_size=job.world_size,
                         ranks=result["ranks"])
