"""Evaluation on the test split (docs/method.md#inference, docs/method.md#protocols).

Base accuracy: argmax over base classes of z_FDC from the full image. New accuracy: argmax over
new classes of z_PC. The backbone alone and zero-shot CLIP are scored on the same images. The
foreground shift index D_fg is reported on base test images for the backbone and for FDC.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .equations import backbone_logits, clip_logits, foreground_shift, harmonic_mean, roc_auc
from .heads import FVGPTHead
from .store import EXTRACTED_FG, NO_MASK, Cache, CacheError
from .training import ZERO_SHOT, backbone_image_encoder, backbone_images


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float | None:
    """Top-1 accuracy in percent; None for an empty set."""
    if y.numel() == 0:
        return None
    return float((logits.argmax(-1) == y).float().mean() * 100)


def _bnh(base: float | None, new: float | None) -> dict:
    hm = harmonic_mean(base, new) if base is not None and new is not None else None
    return {"base": base, "new": new, "hm": hm}


class EvalSet:
    """Test features of one cache for one backbone, with helpers to restrict to a class subset."""

    def __init__(self, cache: Cache, backbone: str):
        if "test" not in cache.splits or len(cache.labels("test")) == 0:
            raise CacheError(f"{cache.path} has no test images to evaluate on")
        if backbone not in cache.text_groups:
            raise CacheError(f"{cache.path} has no text features for backbone {backbone!r} (it has "
                             f"{cache.text_groups}); write the same backbone into that cache first")
        encoder = backbone_image_encoder(cache, backbone)
        self.labels = cache.labels("test")
        self.full = backbone_images(cache, backbone, "test", "full", "base")[:, 0]
        self.fg = backbone_images(cache, backbone, "test", "fg", "base")[:, 0]
        self.full_new = backbone_images(cache, backbone, "test", "full", "new")[:, 0]
        self.area = cache.areas("test")[:, 0]
        self.clip = self.full_new if encoder == "clip" else F.normalize(cache.image("test", "full", "clip")[:, 0], dim=-1)
        self.txt_bb, self.txt_clip = cache.text(backbone), cache.text(ZERO_SHOT)
        if self.txt_bb.shape != self.txt_clip.shape:
            raise CacheError(f"{cache.path}: backbone {backbone!r} has text features of shape "
                             f"{tuple(self.txt_bb.shape)}, CLIP {tuple(self.txt_clip.shape)}; rewrite the backbone")
        self.scale = cache.logit_scale

    def subset(self, class_ids: np.ndarray):
        """Rows whose label is in `class_ids`, labels as positions in it, and the class text rows."""
        ids = torch.as_tensor(class_ids)
        position = torch.full((len(self.txt_bb),), -1, dtype=torch.long)
        position[ids] = torch.arange(len(ids))
        rows = position[self.labels] >= 0
        return rows, position[self.labels[rows]], self.txt_bb[ids], self.txt_clip[ids]


@torch.no_grad()
def _scores(head: FVGPTHead, ts: EvalSet, class_ids: np.ndarray, branch: str) -> dict:
    rows, y, txt_bb, txt_clip = ts.subset(class_ids)
    full, clip = (ts.full if branch == "base" else ts.full_new)[rows], ts.clip[rows]
    if branch == "base":
        z = head.predict_base(full, txt_bb, ts.scale)
    else:
        z = head.predict_new(full, clip, txt_bb, txt_clip, ts.scale)
    return {
        "fvgpt": accuracy(z, y),
        "backbone": accuracy(backbone_logits(full, txt_bb, ts.scale), y),
        "zeroshot": accuracy(clip_logits(clip, txt_clip, ts.scale), y),
        "n": int(y.numel()),
    }


@torch.no_grad()
def foreground_shifts(head: FVGPTHead, ts: EvalSet, class_ids: np.ndarray, tau: float) -> dict:
    """D_fg = mean KL(p_full ‖ p_fg) on test images of `class_ids`, for the backbone and for FDC."""
    rows, _, txt_bb, _ = ts.subset(class_ids)
    if not rows.any():
        return {"backbone": None, "fvgpt": None}
    full, fg = ts.full[rows], ts.fg[rows]
    out = {"backbone": float(foreground_shift(backbone_logits(full, txt_bb, ts.scale),
                                              backbone_logits(fg, txt_bb, ts.scale), tau))}
    out["fvgpt"] = (float(foreground_shift(head.predict_base(full, txt_bb, ts.scale),
                                           head.predict_base(fg, txt_bb, ts.scale), tau))
                    if head.fdc is not None else out["backbone"])
    return out


def evaluate(head: FVGPTHead, cache: Cache, backbone: str, classes: str = "base", ts: EvalSet | None = None) -> dict:
    """Metrics of a trained head on its own cache's test split (`ts`: its EvalSet, if already read)."""
    ts = ts or EvalSet(cache, backbone)
    if classes == "all":
        every = np.arange(len(cache.classnames))
        s = _scores(head, ts, every, "base")
        metrics = {k: {"base": None, "new": None, "hm": None, "all": s[k]} for k in ("fvgpt", "backbone", "zeroshot")}
        return {"metrics": metrics, "test_images": {"all": s["n"]},
                "foreground_shift": foreground_shifts(head, ts, every, head.tau)}
    b = _scores(head, ts, cache.base, "base")
    n = _scores(head, ts, cache.new, "new")
    metrics = {k: _bnh(b[k], n[k]) for k in ("fvgpt", "backbone", "zeroshot")}
    return {"metrics": metrics, "test_images": {"base": b["n"], "new": n["n"]},
            "foreground_shift": foreground_shifts(head, ts, cache.base, head.tau)}


def evaluate_transfer(head: FVGPTHead, target: Cache, backbone: str, ts: EvalSet | None = None) -> dict:
    """Cross-dataset: the PC branch over all classes of another cache (same model, Table 2)."""
    s = _scores(head, ts or EvalSet(target, backbone), np.arange(len(target.classnames)), "new")
    return {"dataset": target.provenance.get("dataset"), "cache": str(target.path), "test_images": s.pop("n"), **s}


AUC_FLAT = 0.05  # |AUC − 0.5| below this: the gate did not learn to tell r* = 1 from r* = 0


def gate_summary(r: torch.Tensor | None, r_star: torch.Tensor, usable: torch.Tensor) -> dict:
    """What FRG learned on a set of views: share of r* = 1, mean r, AUC of r against r* and the share
    of views the area gate cuts. The AUC is taken on the views the area gate keeps (on cut views
    r* = 0 by rule and the gate sees A(m), so they would only measure the rule); `frg_auc_all` on all."""
    keep = usable > 0.5
    out = {"views": int(r_star.numel()), "r_star_share": float(r_star.float().mean()) if r_star.numel() else None,
           "area_cut_share": float(1 - usable.float().mean()) if usable.numel() else None,
           "r_mean": None, "frg_auc": None, "frg_auc_all": None}
    if r is not None and r.numel():
        out.update(r_mean=float(r.mean()), frg_auc=roc_auc(r[keep], r_star[keep]), frg_auc_all=roc_auc(r, r_star))
    return out


@torch.no_grad()
def fdc_fit(head: FVGPTHead, frozen: dict, txt_bb: torch.Tensor, scale: float) -> dict | None:
    """The FDC branch's accuracy (%) and cross-entropy on a set of views (None without FDC)."""
    if head.fdc is None:
        return None
    z = head.predict_base(frozen["img_bb"], txt_bb, scale)
    return {"acc": accuracy(z, frozen["y"]), "ce": float(torch.nn.functional.cross_entropy(z, frozen["y"]))}


@torch.no_grad()
def gate_diagnostics(head: FVGPTHead, data, cache: Cache, backbone: str, classes: str = "base",
                     ts: EvalSet | None = None, initial: FVGPTHead | None = None) -> dict:
    """What the gates learned: FRG on the training views used for training (`data`, a TrainData) and on
    base test images; BRG's mean b on base and on new test images; and (`initial`: the head as
    training started) the FDC branch's fit on those training views at the start and at the end."""
    views = data.full.shape[1]
    aug = slice(1, None) if views > 1 else slice(0, 1)
    flat = lambda t: t[:, aug].flatten(0, 1)  # noqa: E731
    n_aug = data.full[:, aug].shape[1]
    train = head.frozen(flat(data.full), flat(data.fg), flat(data.clip), flat(data.area),
                        data.y.repeat_interleave(n_aug), data.txt_bb, data.txt_clip, data.scale)
    out = {"train": gate_summary(head.gates(train).get("r"), train["r_star"], train["usable"])}
    out["train"]["backbone_acc"] = accuracy(train["z_full"], train["y"])
    end = fdc_fit(head, train, data.txt_bb, data.scale)
    out["fdc_fit"] = None if end is None or initial is None else \
        {"start": fdc_fit(initial, train, data.txt_bb, data.scale), "end": end}
    ts = ts or EvalSet(cache, backbone)
    base_ids = cache.base if classes == "base" else np.arange(len(cache.classnames))
    rows, y, txt_bb, txt_clip = ts.subset(base_ids)
    fg, area = ts.fg, ts.area
    source = data.meta.get("fg_source", EXTRACTED_FG)
    if source == NO_MASK:
        fg, area = ts.full, torch.ones_like(ts.area)
    elif source != EXTRACTED_FG:  # the run's mask source on the test images too
        fg, area = cache.foreground("test", source)
        fg, area = F.normalize(fg[:, 0], dim=-1), area[:, 0]
    test = head.frozen(ts.full[rows], fg[rows], ts.clip[rows], area[rows], y, txt_bb, txt_clip, ts.scale)
    gates = head.gates(test)
    out["test_base"] = gate_summary(gates.get("r"), test["r_star"], test["usable"])
    for name, ids in (("base", base_ids), ("new", cache.new if classes == "base" else np.zeros(0, dtype=np.int64))):
        rows, _, txt_bb, txt_clip = ts.subset(ids)
        b = head.new_gate(ts.full_new[rows], ts.clip[rows], txt_bb, txt_clip, ts.scale)[2] if rows.any() else None
        out[f"b_mean_{name}"] = float(b.mean()) if b is not None and b.numel() else None
    auc = out["train"]["frg_auc"]
    out["frg_learned"] = None if auc is None else abs(auc - 0.5) >= AUC_FLAT
    return out


# ---------------------------------------------------------------------------------------------
# Per-epoch curves: what the engine's monitor needs, read once per cache and backbone.
# Test labels are not part of it: the monitor predicts, and the predictions are scored by
# `score_predictions` after training, so no epoch can be chosen on the test split.


@dataclass
class CurveSplit:
    """Image vectors of one split for the monitor: base-branch `full`, new-branch `full_new` (MMRL
    scores new classes with the class token alone), zero-shot CLIP's `clip`; `labels` only for val."""

    full: torch.Tensor
    full_new: torch.Tensor
    clip: torch.Tensor
    labels: torch.Tensor | None = None


@dataclass
class CurveData:
    """Everything per-epoch evaluation reads: the class sets, every class's text features, the test
    split without labels, the validation split with them (None when the cache has none)."""

    classes: str
    base: np.ndarray
    new: np.ndarray
    txt_bb: torch.Tensor
    txt_clip: torch.Tensor
    scale: float
    test: CurveSplit
    val: CurveSplit | None
    read_test_labels: Callable[[], torch.Tensor]  # called once training is over


def _curve_split(cache: Cache, backbone: str, split: str, labelled: bool) -> CurveSplit | None:
    if split not in cache.splits or not cache.has_image(split, "full") or cache.image(split, "full").shape[0] == 0:
        return None
    full = backbone_images(cache, backbone, split, "full", "base")[:, 0]
    encoder = backbone_image_encoder(cache, backbone)
    full_new = full if encoder == "clip" else backbone_images(cache, backbone, split, "full", "new")[:, 0]
    clip = full_new if encoder == "clip" else F.normalize(cache.image(split, "full", "clip")[:, 0], dim=-1)
    return CurveSplit(full, full_new, clip, cache.labels(split) if labelled else None)


def curve_data(cache: Cache, backbone: str, classes: str = "base") -> CurveData:
    """The monitor's inputs for runs on `cache` with `backbone`; reads no test label."""
    test = _curve_split(cache, backbone, "test", labelled=False)
    if test is None:
        raise CacheError(f"{cache.path} has no test images to evaluate on")
    return CurveData(classes=classes, base=np.asarray(cache.base), new=np.asarray(cache.new),
                     txt_bb=cache.text(backbone), txt_clip=cache.text(ZERO_SHOT), scale=cache.logit_scale,
                     test=test, val=_curve_split(cache, backbone, "val", labelled=True),
                     read_test_labels=lambda: cache.labels("test"))


def score_predictions(pred: dict[str, torch.Tensor], labels: torch.Tensor, curve: CurveData) -> dict:
    """Accuracies (%) of predicted class ids: `pred["base"]` scored on images of base classes, `pred["new"]`
    on new ones (HM of the two), or `pred["all"]` on every image; `b_mean_new` from `pred["b"]`."""
    out = {}
    if curve.classes == "all":
        out["all"] = float((pred["all"] == labels).float().mean() * 100) if labels.numel() else None
    else:
        for name, ids in (("base", curve.base), ("new", curve.new)):
            rows = torch.isin(labels, torch.as_tensor(ids))
            out[name] = float((pred[name][rows] == labels[rows]).float().mean() * 100) if rows.any() else None
        both = out["base"] is not None and out["new"] is not None
        out["hm"] = harmonic_mean(out["base"], out["new"]) if both else None
        if pred.get("b") is not None:
            rows = torch.isin(labels, torch.as_tensor(curve.new))
            b = pred["b"][rows].float()
            out["b_mean_new"] = float(b.mean()) if rows.any() and not bool(b.isnan().any()) else None  # NaN: no PC
    return out
