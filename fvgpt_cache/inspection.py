"""A summary of one cache file: provenance, classes, splits, shapes, mask statistics and problems."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .data import format_short_classes
from .feature_checks import cache_warnings
from .store import IMAGE, TEXT, image_key, open_cache, sample_key, text_key


def inspect_cache(path: str | Path, verify: bool = False) -> dict:
    """The summary; `verify` also re-hashes every dataset against its stored digest."""
    cache = open_cache(path)
    prov = cache.provenance
    report: dict = {
        "path": str(cache.path),
        "fingerprint": cache.fingerprint,
        "provenance": prov,
        "logit_scale": cache.logit_scale,
        "classes": {"count": len(cache.classnames), "names": cache.classnames,
                    "base": cache.base.tolist(), "new": cache.new.tolist()},
        "masks": {"resized": len(prov.get("resized_masks") or []), "full": len(prov.get("full_mask_images") or []),
                  "size_policy": prov.get("mask_size_policy"), "resized_list": prov.get("resized_masks") or []},
        "short_classes": prov.get("short_classes") or {},
        "text": {},
        "splits": {},
        "problems": [],
    }
    problems = report["problems"]
    if prov.get("random_init"):
        problems.append("the model has random weights: its features are only good for smoke tests")
    for line in format_short_classes(prov.get("short_classes") or {}):
        problems.append(f"fewer images than the few-shot draw asks for (all were taken) in {line}")
    problems += cache_warnings(cache)
    if verify:
        changed = cache.verify()
        report["verified"] = not changed
        if changed:
            problems.append(f"{len(changed)} dataset(s) no longer match their stored digest (changed in place by "
                            f"another tool): {', '.join(changed[:5])}; results keyed to this cache cannot be trusted, "
                            "re-extract it")
    if prov.get("full_mask_images"):
        problems.append(f"{len(prov['full_mask_images'])} image(s) had no mask and use the whole image as foreground")
    with h5py.File(cache.path, "r") as f:
        for name, ds in f[TEXT].items():
            arr = ds[()].astype(np.float32)
            report["text"][name] = {"shape": list(ds.shape), "dtype": str(ds.dtype), **dict(_json_attrs(ds.attrs))}
            _check_features(arr, text_key(name), problems)
            if arr.shape[0] != len(cache.classnames):
                problems.append(f"{text_key(name)} has {arr.shape[0]} rows for {len(cache.classnames)} classes")
        for split in cache.splits:
            labels = f[sample_key(split, "label")][()]
            area = f[sample_key(split, "area")][()]
            entry = {
                "samples": int(labels.shape[0]),
                "classes_present": int(np.unique(labels).size),
                "per_class_min": int(np.bincount(labels).min()) if labels.size else 0,
                "per_class_max": int(np.bincount(labels).max()) if labels.size else 0,
                "mask_area_mean": float(area.mean()) if area.size else None,
                "empty_mask_views": int((area == 0).sum()),
                "skipped": len(prov.get("skipped", {}).get(split, [])),
                "features": {},
            }
            for encoder in f[IMAGE]:  # clip, and the groups of imported backbones (PromptSRC, MMRL)
                if split not in f[image_key(encoder)]:
                    continue
                for kind, ds in f[image_key(encoder, split)].items():
                    entry["features"][kind if encoder == "clip" else f"{encoder}/{kind}"] = {
                        "shape": list(ds.shape), "dtype": str(ds.dtype)}
                    _check_features(ds[()].astype(np.float32), image_key(encoder, split, kind), problems)
            if labels.size and labels.max() >= len(cache.classnames):
                problems.append(f"{split} has label {labels.max()} but only {len(cache.classnames)} classes")
            report["splits"][split] = entry
        for name in f["fg_sources"] if "fg_sources" in f else []:  # mask sources added with add-masks
            for split in f[f"fg_sources/{name}/clip"]:
                _check_features(f[f"fg_sources/{name}/clip/{split}"][()].astype(np.float32),
                                f"fg_sources/{name}/clip/{split}", problems)
    report["fg_sources"] = {}
    for name in cache.fg_sources[2:]:  # after the built-in "extracted" and "none"
        src = cache.fg_source_provenance(name)
        report["fg_sources"][name] = {"mask_root": src.get("mask_root"), "stats": src.get("stats"),
                                      "method": (src.get("masks_json") or {}).get("method")}
    return report


def _json_attrs(attrs) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items() if k != "provenance"}


def _check_features(arr: np.ndarray, name: str, problems: list[str]) -> None:
    if arr.size == 0:
        return
    if not np.isfinite(arr).all():
        problems.append(f"{name} contains NaN or inf values")
        return
    norms = np.linalg.norm(arr, axis=-1)
    if np.abs(norms - 1).max() > 1e-2:
        problems.append(f"{name} is not L2-normalised (norms {norms.min():.3f}..{norms.max():.3f})")
