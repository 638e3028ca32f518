"""Why FDC takes so little of the foreground view's advantage on the synthetic world: measurements.

Reads the caches `benchmarks/world_ablation.py` wrote (`--out`, one folder per seed) and, on the
counterfactual split's base classes, measures

* the teacher: CoOp's accuracy on the full and the foreground view of the training images, view 0
  (Dassl's squash) and the random resized crops, by the image's context (own / other / none), and
  on the test images;
* what a student *could* learn from these training images: a ridge map from full-view features to
  foreground-view features fit on the training views (all of them; the own-context images only; as
  many other/none-context images), scored by CoOp's accuracy on the mapped test features, against
  the same map fit on the test images themselves (an oracle: what a linear map can reach at all);
* FDC itself under variations that isolate one cause each (diagnosis only, not the release's
  settings): a perfect gate (r = r*), the teacher of the whole image instead of the crop's, training on view 0 only, and
  30 epochs instead of 10.

    OMP_NUM_THREADS=1 python benchmarks/world_diagnosis.py --out cache/world-ablation
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fvgpt_cache.engine import train_head
from fvgpt_cache.evaluation import evaluate
from fvgpt_cache.store import open_cache
from fvgpt_cache.training import TrainData, configure, prepare

KINDS = ("own", "other", "none")


def accuracy(z: torch.Tensor, y: torch.Tensor) -> float:
    return float((z.argmax(-1) == y).float().mean() * 100)


def ridge(x: torch.Tensor, target: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """(D+1, D) least-squares map with an intercept row and an L2 penalty `lam`."""
    xa = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    w = torch.linalg.solve(xa.T @ xa + lam * torch.eye(xa.shape[1], dtype=xa.dtype), xa.T @ target.double())
    return w.float()


def mapped(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.cat([x, torch.ones(len(x), 1)], 1) @ w, dim=-1)


def same_view(data: TrainData, teacher_only: bool) -> TrainData:
    """Every stored view replaced by view 0: for the teacher (fg, area) only, or for everything."""
    v = data.full.shape[1]
    first = lambda t: t[:, :1].expand(-1, v, *t.shape[2:]).clone()  # noqa: E731
    return TrainData(data.class_ids, data.full if teacher_only else first(data.full), first(data.fg),
                     data.clip if teacher_only else first(data.clip), first(data.area), data.y,
                     data.txt_bb, data.txt_clip, data.scale, data.meta)


def diagnose(cache_path: Path, scenes_path: Path, seed: int) -> dict:
    cache = open_cache(cache_path)
    cfg, _ = configure(cache, {"backbone": "coop", "seed": seed})
    data = prepare(cache, cfg)
    text = F.normalize(data.txt_bb, dim=-1)
    scenes = json.loads(scenes_path.read_text())
    train_paths = np.array(cache.paths("train"))[np.isin(cache.labels("train").numpy(), data.class_ids)]
    kinds = np.array([scenes[p]["kind"] for p in train_paths])

    labels = cache.labels("test")
    position = torch.full((len(cache.classnames),), -1)
    position[torch.as_tensor(data.class_ids)] = torch.arange(len(data.class_ids))
    rows = position[labels] >= 0
    y_test = position[labels[rows]]
    full_test = F.normalize(cache.image("test", "full")[rows, 0], dim=-1)
    fg_test = F.normalize(cache.image("test", "fg")[rows, 0], dim=-1)

    out: dict = {"test": {"full": accuracy(full_test @ text.T, y_test), "fg": accuracy(fg_test @ text.T, y_test)}}
    y = data.y[:, None].expand(-1, data.full.shape[1])
    right_full = (data.full @ text.T).argmax(-1) == y
    right_fg = (data.fg @ text.T).argmax(-1) == y
    for kind in (*KINDS, "all"):
        sel = torch.as_tensor(kinds == kind) if kind != "all" else torch.ones(len(kinds), dtype=torch.bool)
        out[f"train {kind}"] = {"images": int(sel.sum()),
                                "view0 full": float(right_full[sel, 0].float().mean() * 100),
                                "view0 fg": float(right_fg[sel, 0].float().mean() * 100),
                                "crops full": float(right_full[sel, 1:].float().mean() * 100),
                                "crops fg": float(right_fg[sel, 1:].float().mean() * 100)}

    dim = data.full.shape[-1]
    own = torch.as_tensor(kinds == "own")
    counter = ~own
    as_many_own = torch.zeros_like(own)
    as_many_own[torch.nonzero(own).squeeze(1)[: int(counter.sum())]] = True
    fits = {"all training views": torch.ones_like(own), "own-context images": own,
            "other/none-context images": counter, "as many own-context images": as_many_own}
    out["ridge"] = {name: accuracy(mapped(full_test, ridge(data.full[sel].reshape(-1, dim),
                                                           data.fg[sel].reshape(-1, dim))) @ text.T, y_test)
                    for name, sel in fits.items()}
    out["ridge"]["oracle: fit on the test images"] = accuracy(mapped(full_test, ridge(full_test, fg_test)) @ text.T, y_test)

    variants = {"FVG-PT (defaults)": ({}, None), "control r_source=full": ({"r_source": "full"}, None),
                "r_source=fg": ({"r_source": "fg"}, None),
                "r = r* (the gate's own target, no FRG)": ({"use_frg": False, "r_without_frg": "target"}, None),
                "FVG-PT, teacher = whole image's fg": ({}, True), "r_source=fg, teacher = whole image's fg": ({"r_source": "fg"}, True),
                "FVG-PT, view 0 only": ({}, False), "r_source=fg, view 0 only": ({"r_source": "fg"}, False),
                "FVG-PT, 30 epochs": ({"epochs": 30}, None), "r_source=fg, 30 epochs": ({"r_source": "fg", "epochs": 30}, None)}
    out["fdc"] = {}
    for name, (overrides, teacher_only) in variants.items():
        run_cfg, _ = configure(cache, {"backbone": "coop", "seed": seed, **overrides})
        run_data = prepare(cache, run_cfg)
        if teacher_only is not None:
            run_data = same_view(run_data, teacher_only)
        head, _, _ = train_head(run_data, run_cfg)
        out["fdc"][name] = evaluate(head, cache, "coop")["metrics"]["fvgpt"]["base"]
    out["fdc"]["CoOp"] = out["test"]["full"]
    return out


def to_markdown(results: dict[int, dict]) -> str:
    seeds = sorted(results)
    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    cells = lambda get: " | ".join(f"{get(results[s]):.1f}" for s in seeds)  # noqa: E731
    head = "| | mean | " + " | ".join(f"seed {s}" for s in seeds) + " |\n|---|---|" + "---|" * len(seeds) + "\n"
    row = lambda name, get: f"| {name} | {mean([get(results[s]) for s in seeds]):.1f} | {cells(get)} |\n"  # noqa: E731
    text = "# Why FDC takes little of the foreground's advantage (counterfactual split, base classes, %)\n\n"
    text += "## The teacher: CoOp's accuracy on the full and the foreground view\n\n" + head
    text += row("test images, full view", lambda r: r["test"]["full"]) + row("test images, foreground view", lambda r: r["test"]["fg"])
    for kind in (*KINDS, "all"):
        for key in ("view0 full", "view0 fg", "crops full", "crops fg"):
            text += row(f"training, {kind} context, {key}", lambda r, k=kind, q=key: r[f"train {k}"][q])
    text += "\n## What a linear student can learn: CoOp on test features mapped full → foreground by ridge\n\n" + head
    for name in results[seeds[0]]["ridge"]:
        text += row(f"fit on {name}", lambda r, n=name: r["ridge"][n])
    text += "\n## FDC under variations (base accuracy; variations are diagnoses, not the release's settings)\n\n" + head
    for name in results[seeds[0]]["fdc"]:
        text += row(name, lambda r, n=name: r["fdc"][n])
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("cache/world-ablation"), help="world_ablation.py's --out folder")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/world-diagnosis.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        folder = args.out / f"seed{seed}"
        cache, scenes = folder / "world-counterfactual.h5", folder / "data" / "counterfactual" / "scenes.json"
        if not cache.exists() or not scenes.exists():
            raise SystemExit(f"{cache} or {scenes} is missing; run benchmarks/world_ablation.py --out {args.out} first")
        results[seed] = diagnose(cache, scenes, seed)
    report = to_markdown(results)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
