"""What each kind of job does: one call into the library (extraction, backbones, grids, reports)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from ..datasets import dataset_info
from .jobs import results_digest
from .plan import PlanError


def _load_dataset(spec: dict, mask_root: Path | None = None):
    """The job's dataset; `mask_root` (masks the job wrote) replaces the plan's mask folder."""
    from ..data import generic_dataset
    from ..datasets import load_dataset

    if spec["split_file"]:
        masks = mask_root or (Path(spec["mask_root"]) if spec["mask_root"] else None)
        return generic_dataset(Path(spec["split_file"]), Path(spec["image_root"]), masks,
                               template=spec["template"] or "a photo of a {}.", name=spec["dataset"])
    masks = mask_root
    if masks is None and spec["masks"]:
        masks = Path(spec["masks"]) / dataset_info(spec["dataset"]).folder
    return load_dataset(spec["dataset"], Path(spec["data_root"]), masks)


def write_job_masks(spec: dict, log, job=None) -> Path:
    """`[data] masks = METHOD`: the masks of this cache's few-shot draw (all three splits), written by
    `masks.write_masks` into the job's own folder (resumable like `fvgpt-cache masks`)."""
    from ..masks import MaskOptions, write_masks

    out = Path(spec["mask_out"])
    o = spec["options"]
    options = MaskOptions(method=spec["mask_method"], shots=spec["shots"], seed=spec["seed"],
                          batch_size=o["batch_size"], workers=o["workers"], device=spec["device"],
                          bad_image=o["bad_image"])
    summary = write_masks(_load_dataset(spec), _model(spec), out, options, job=job)
    log(f"wrote {spec['mask_method']} masks to {out}: {summary.counts}")
    return out


def extract_options_for(spec: dict):
    from ..extraction import ExtractOptions
    from ..views import AugmentConfig

    o = spec["options"]
    return ExtractOptions(shots=spec["shots"], seed=spec["seed"], train_views=o["train_views"],
                          batch_size=o["batch_size"], workers=o["workers"], device=spec["device"],
                          missing_mask=o["missing_mask"], bad_image=o["bad_image"],
                          mask_size_mismatch=o["mask_size_mismatch"], fg_mode=o["fg_mode"],
                          template=spec["template"], store_dtype=o["dtype"],
                          augment=AugmentConfig(scale=tuple(spec["rrc_scale"])))


def _found_cache(spec: dict) -> bool:
    """A complete cache already at the job's output (a crash after it was written, before its status)."""
    from ..store import open_cache

    out = Path(spec["out"])
    if not out.exists():
        return False
    prov = open_cache(out).provenance
    want = {"dataset": spec["dataset"], "shots": spec["shots"], "seed": spec["seed"],
            "views": spec["options"]["train_views"]}
    got = {k: prov.get(k) for k in want}
    scale = (prov.get("augmentation") or {}).get("random_resized_crop_scale")
    if got != want or list(scale or []) != list(spec["rrc_scale"]):
        raise PlanError(f"{out} exists but was extracted with other settings ({got}, crop scale {scale}); the plan "
                        f"needs {want}, crop scale {spec['rrc_scale']}: remove it or choose another `out`")
    return True


_MODELS: dict = {}


def _model(spec: dict):
    from ..models import load_clip

    key = (spec["model"], spec["pretrained"], spec["quick_gelu"])
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_clip(spec["model"], spec["pretrained"], quick_gelu=spec["quick_gelu"])
    return _MODELS[key]


def run_extract(spec: dict, log, job=None) -> dict:
    from ..extraction import extract

    if _found_cache(spec):
        log(f"{spec['out']} is already complete")
        return {"found": True}
    ds = _load_dataset(spec, write_job_masks(spec, log, job) if spec.get("mask_method") else None)
    summary = extract(ds, _model(spec), Path(spec["out"]), extract_options_for(spec), job=job)
    log(f"wrote {summary.out}: {summary.counts} in {summary.seconds:.1f}s ({summary.images_per_second:.1f} img/s); "
        f"skipped {sum(len(v) for v in summary.skipped.values())}, resumed rows {summary.resumed_rows}")
    images = sum(summary.counts.values())
    return {"images": images, "seconds": summary.seconds, "images_per_second": summary.images_per_second,
            "views_encoded": encoded_views(summary.counts, spec["options"]["train_views"]) if not summary.resumed_rows
            else None}


def run_import(spec: dict, log, job=None) -> dict:
    from ..backbones import ImportOptions, import_backbone, resolve_checkpoint
    from ..backbones.image_pass import _existing_groups
    from ..store import open_cache

    cache, method = Path(spec["cache"]), spec["method"]
    name = spec.get("name", method)
    if _existing_groups(cache, name):  # imported before its status was written
        prov = open_cache(cache).text_provenance(name)
        ckpt = resolve_checkpoint(spec["checkpoint"], method)
        if prov.get("method") == method and Path(prov.get("checkpoint", "")).resolve() == ckpt.resolve():
            log(f"{cache} already holds /text/{name} from {ckpt}")
            return {"found": True}
    o = spec["options"]
    summary = import_backbone(cache, method, spec["checkpoint"],
                              ImportOptions(name=spec.get("name"), batch_size=o["batch_size"], workers=o["workers"],
                                            device=spec["device"], prompt_check=spec.get("prompt_check", True)),
                              job=job)
    log(f"{method}: {summary.checkpoint} (epoch {summary.epoch}); class prompts: {summary.prompt_check}; "
        f"{sum(summary.counts.values())} images in {summary.seconds:.1f}s")
    return {"images": sum(summary.counts.values()), "seconds": summary.seconds,
            "images_per_second": summary.images_per_second,
            "views_encoded": encoded_views(summary.counts, o["train_views"]) if not summary.resumed_rows else None}


def run_backbone(spec: dict, log, job=None) -> dict:
    from ..backbones import BackboneConfig, default_epochs, save_coop_checkpoint, train_backbone, write_backbone
    from ..store import open_cache

    cache = open_cache(spec["cache"])
    method, o = spec["method"], spec["options"]
    name = spec.get("name", method)
    cfg = BackboneConfig(method=method, seed=spec["seed"], device=spec["device"], classes=spec.get("classes", "base"),
                         epochs=o.get("epochs") or default_epochs(cache.provenance.get("dataset"), method),
                         **{k: o[k] for k in ("lr", "batch_size", "n_ctx", "warmup_epochs") if k in o}).validate()
    folder, write = Path(spec["out"]), spec.get("write", True)
    record = folder / "backbone.json"
    if write and name in cache.text_groups and cache.text_provenance(name).get("options") == cfg.to_dict():
        log(f"{cache.path} already holds /text/{name} trained with these settings")
        return {"found": True}
    if not write and record.exists() and json.loads(record.read_text()).get("config") == cfg.to_dict():
        log(f"{folder} already holds a context trained with these settings")
        return {"found": True}
    result = train_backbone(cache, cfg, progress=lambda e, n, h: log(f"epoch {e}/{n}: loss {h['loss']:.4f}"))
    ckpt = save_coop_checkpoint(folder, result.ctx, cfg.epochs)
    if write:
        write_backbone(cache.path, name, result.ctx, cfg, result.loaded, checkpoint=ckpt)
    record.write_text(json.dumps({**result.to_dict(), "cache": str(cache.path), "name": name}, indent=1))
    m = result.metrics
    log(f"{method}: test accuracy {m['test_acc']:.2f}% (before {m['initial_test_acc']:.2f}%); {result.seconds:.1f}s")
    return {"seconds": result.seconds, "images": result.train_images, "epochs": cfg.epochs,
            "epoch_images": cfg.epochs * result.train_images}


def run_load(spec: dict, log, job=None) -> dict:
    """A CoOp/KgCoOp context trained on the source, written into a target cache (Table 2)."""
    from ..backbones import load_backbone, resolve_checkpoint
    from ..data import sha256_of
    from ..device import resolve_device
    from ..store import open_cache

    cache, name = open_cache(spec["cache"]), spec["name"]
    ckpt = resolve_checkpoint(spec["checkpoint"], spec["method"])
    if name in cache.text_groups and cache.text_provenance(name).get("checkpoint_sha256") == sha256_of(ckpt):
        log(f"{cache.path} already holds /text/{name} from {ckpt}")
        return {"found": True}
    info = load_backbone(cache.path, ckpt, spec["method"], name=name, device=resolve_device(spec["device"]))
    log(f"wrote /text/{name} {info['shape']} into {cache.path} from {ckpt}")
    return {}


def grid_runs(spec: dict):
    from ..grids import expand

    base = {"device": spec["device"], "backbone": spec["backbone"], "classes": spec.get("classes", "base"),
            **spec["settings"]}
    return expand([Path(spec["cache"])], [spec["seed"]], {}, base, spec["preset"], "auto")


def run_grid_job(spec: dict, log, job=None) -> dict:
    from ..grids import run_grid

    runs = grid_runs(spec)
    t0 = time.perf_counter()
    records = run_grid(runs, Path(spec["out"]), log=log, eval_caches=[Path(c) for c in spec.get("eval_caches", [])])
    seconds = time.perf_counter() - t0
    log(f"{len(records)} new run(s), {len(runs) - len(records)} already done, {seconds:.1f}s")
    epochs_images = sum(r.config["epochs"] * r.train_images for r in records)
    return {"runs": len(runs), "new_runs": len(records), "seconds": seconds, "epoch_images": epochs_images}


def run_report(spec: dict, log, job=None) -> dict:  # noqa: ARG001  (every runner takes the torchrun job)
    from ..api import report

    files = list(results_digest(spec["grids"]))
    if not files:
        raise RuntimeError("no grid has results yet; nothing to report")
    rep = report(files, compare="paper" if spec["compare"] == "paper" else None)  # as `fvgpt-cache report` makes it
    records = rep.records
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.md", rep.to_markdown()), ("report.csv", rep.to_csv()), ("report.json", rep.to_json())):
        tmp = out / f".{name}.{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    log(f"{len(records)} run(s) from {len(files)} grid(s) → {out}/report.md, report.csv, report.json")
    return {"runs": len(records), "grids": len(files)}


RUNNERS: dict[str, Callable] = {"extract": run_extract, "import": run_import, "backbone": run_backbone,
                                "load": run_load, "grid": run_grid_job, "report": run_report}


def encoded_views(samples: dict[str, int], views: int) -> int:
    """Images the encoder sees for a cache: full + foreground view of every stored view."""
    return 2 * sum(n * (views if split == "train" else 1) for split, n in samples.items())
