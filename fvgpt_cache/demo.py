"""The offline demos.

`run_world_demo` (the default of `fvgpt-cache demo`): the synthetic world (`world.py`) with the tiny
CLIP pretrained on it and shipped in the package. One training set (the world's natural mixture:
most shapes in their own class's context) and two test splits, one cache each: `clean` (no
context) and `counterfactual` (every shape in its partner class's context); `splits=` adds
`natural` (the training mixture). CoOp is trained once on the shared training set and written
into every cache; then, for each seed, CoOp + FVG-PT with the default settings and the control that distils towards
the full view instead of the foreground (`r_source=full`) train on every cache through
`grids.run_grid`, so each FVG-PT number equals `fvgpt-cache train CACHE --backbone coop --seed S`.

`run_smoke_demo` (`fvgpt-cache demo --smoke`): the same pipeline with a tiny random CLIP on a
few classes and images, seconds only; its numbers show that the pipeline runs, nothing else.
"""
from __future__ import annotations

import json
import statistics
from importlib import resources
from pathlib import Path
from typing import Callable

from .backbones import BackboneConfig, save_coop_checkpoint, train_backbone, write_backbone
from .data import generic_dataset
from .extraction import ExtractOptions, extract
from .grids import expand, run_grid
from .equations import harmonic_mean
from .methods import COOP
from .models import LoadedModel, load_clip
from .store import CacheError, open_cache

SMOKE_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
WORLD_TEMPLATE = "a photo of a {}."
DEMO_SEEDS = (1, 2, 3)
# the demo's test splits (the benchmark adds `natural`, the training distribution, to keep the demo under a minute)
DEMO_SPLITS = ("clean", "counterfactual")
# what the demo trains on every cache: the method with its defaults, and the control
VARIANTS = {"fvgpt": "frg", "control_full": "full"}  # r_source of each
METHOD_KEYS = ("zeroshot", "backbone", "fvgpt", "control_full")


def world_model_files() -> tuple[Path, Path]:
    """The shipped world CLIP: (config JSON, fp16 weights)."""
    assets = resources.files("fvgpt_cache").joinpath("assets")
    config, weights = Path(str(assets.joinpath("world-clip.json"))), Path(str(assets.joinpath("world-clip.pt")))
    if not (config.is_file() and weights.is_file()):
        raise FileNotFoundError(f"the shipped world model is missing ({config}, {weights}); reinstall fvgpt-cache "
                                "or train it with benchmarks/pretrain_world.py --export fvgpt_cache/assets")
    return config, weights


def load_world_model() -> LoadedModel:
    config, weights = world_model_files()
    return load_clip(str(config), str(weights))


def world_caches(root: Path, loaded: LoadedModel, *, splits=None, classes=None, seed: int = 1, shots: int = 16,
                 val_per_class: int = 4, test_per_class: int = 30, train_views: int | None = None,
                 coop_seed: int = 1, mix: tuple[float, float, float] | None = None,
                 radius: tuple[float, float] | None = None, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Path]:
    """Draw the world's datasets (one per test split, sharing train and val), extract each once into
    `root/world-<split>.h5`, train CoOp once (`coop_seed`) on the shared training set and write it
    as `/text/coop` into every cache. `mix` and `radius` override the world's downstream defaults.
    Returns {split: cache path}."""
    from .world import SHAPES, SPLITS, write_downstream

    splits = tuple(splits or SPLITS)
    classes = tuple(classes or SHAPES)
    caches: dict[str, Path] = {}
    options = {} if train_views is None else {"train_views": train_views}
    draw = {k: tuple(v) for k, v in (("mix", mix), ("radius", radius)) if v is not None}
    for split in splits:
        files = write_downstream(root / "data" / split, split, shots=shots, val_per_class=val_per_class,
                                 test_per_class=test_per_class, classes=classes, seed=seed, **draw)
        dataset = generic_dataset(*files, template=WORLD_TEMPLATE)
        dataset.name = f"world-{split}"
        summary = extract(dataset, loaded, root / f"world-{split}.h5",
                          ExtractOptions(shots=0, seed=seed, workers=0, force=True, device="cpu", **options),
                          progress=progress)
        caches[split] = summary.out
    coop = BackboneConfig(method=COOP.name, seed=coop_seed, device="cpu")
    result = train_backbone(caches[splits[0]], coop, loaded=loaded)  # train and val are the same in every cache
    checkpoint = save_coop_checkpoint(root / COOP.name, result.ctx, coop.epochs)
    for cache in caches.values():
        write_backbone(cache, COOP.name, result.ctx, coop, loaded, checkpoint=checkpoint)
    return caches


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _bnh_mean(rows: list[dict]) -> dict:
    """Mean Base and New over seeds and the HM of the means (docs/method.md#protocols)."""
    base, new = _mean([r["base"] for r in rows]), _mean([r["new"] for r in rows])
    return {"base": base, "new": new, "hm": harmonic_mean(base, new) if base is not None and new is not None else None}


def spread(entry: dict, method: str, key: str) -> float | None:
    """Sample standard deviation over seeds of one number of a split entry (None for one seed)."""
    values = [r[method][key] for r in entry["per_seed"].values()]
    return statistics.stdev(values) if len(values) > 1 and None not in values else None


def summarize(records: dict[str, dict[int, dict[str, RunRecord]]], seeds) -> dict:
    """The demo's JSON from run records {split: {seed: {variant: results record}}}:
    {"splits": {split: {zeroshot|backbone|fvgpt|control_full: {base, new, hm}, "frg_auc",
    "foreground_shift", "per_seed": {seed: the same for one seed}}}, "seeds": [...]}."""
    out = {"splits": {}, "seeds": list(seeds)}
    for split, by_seed in records.items():
        per_seed = {}
        for seed in seeds:
            fvgpt, control = by_seed[seed]["fvgpt"], by_seed[seed]["control_full"]
            metrics = {"zeroshot": fvgpt.metrics["zeroshot"], "backbone": fvgpt.metrics["backbone"],
                       "fvgpt": fvgpt.metrics["fvgpt"], "control_full": control.metrics["fvgpt"]}
            per_seed[str(seed)] = {
                **{k: {x: metrics[k][x] for x in ("base", "new", "hm")} for k in METHOD_KEYS},
                "frg_auc": fvgpt.diagnostics["train"]["frg_auc"],
                "foreground_shift": {"backbone": fvgpt.foreground_shift["backbone"],
                                     "fvgpt": fvgpt.foreground_shift["fvgpt"],
                                     "control_full": control.foreground_shift["fvgpt"]},
            }
        rows = list(per_seed.values())
        entry = {k: _bnh_mean([r[k] for r in rows]) for k in METHOD_KEYS}
        entry["frg_auc"] = _mean([r["frg_auc"] for r in rows])
        entry["foreground_shift"] = {k: _mean([r["foreground_shift"][k] for r in rows])
                                     for k in ("backbone", "fvgpt", "control_full")}
        entry["per_seed"] = per_seed
        out["splits"][split] = entry
    return out


def run_details(records: dict[str, dict[int, dict[str, RunRecord]]]) -> dict:
    """Per split and seed: run ids and collapse flags of FVG-PT and the control."""
    return {split: {str(seed): {variant: {"run_id": rec.run_id, "collapsed": rec.collapsed}
                                for variant, rec in runs.items()}
                    for seed, runs in by_seed.items()}
            for split, by_seed in records.items()}


def _pts(x: float) -> str:
    """"3.2 points above" / "1.0 point below": a difference in words."""
    return f"{abs(x):.1f} point{'s' if round(abs(x), 1) != 1 else ''} {'above' if x >= 0 else 'below'}"


def story(summary: dict) -> list[str]:
    """Three plain sentences on what the numbers show, written from the numbers."""
    splits = summary["splits"]
    cf = splits.get("counterfactual")
    reference = splits.get("clean") or splits.get("natural")
    if cf is None or reference is None:
        return []
    ref_name = "clean" if "clean" in splits else "natural"
    cf_gap = cf["backbone"]["base"] - cf["zeroshot"]["base"]
    ref_gap = reference["backbone"]["base"] - reference["zeroshot"]["base"]
    first = (f"On counterfactual images, where each shape stands in another class's context, CoOp reaches "
             f"{cf['backbone']['base']:.1f}% base accuracy, {_pts(cf_gap)} zero-shot CLIP "
             f"({cf['zeroshot']['base']:.1f}%), while on {ref_name} images it is {_pts(ref_gap)} it "
             f"({reference['backbone']['base']:.1f}% vs {reference['zeroshot']['base']:.1f}%)"
             + (": tuned on images whose context matches their class, CoOp learned to read the context."
                if cf_gap < ref_gap - 2 else "."))
    gain = cf["fvgpt"]["base"] - cf["backbone"]["base"]
    over_control = cf["fvgpt"]["base"] - cf["control_full"]["base"]
    second = (f"On counterfactual base images CoOp + FVG-PT reaches {cf['fvgpt']['base']:.1f}%, "
              f"{_pts(gain)} CoOp, and {_pts(over_control)} the control that distils towards the full image "
              f"instead of the foreground ({cf['control_full']['base']:.1f}%), so "
              + ("the gain comes from the foreground view, not from anchoring to the backbone."
                 if over_control >= 3 and gain > 0 else
                 "only part of the gain is the foreground view's; the rest is distilling back to the backbone."
                 if over_control > 0 and gain > 0 else
                 "this run does not show a gain that only the foreground view brings."))
    auc, shift = cf["frg_auc"], cf["foreground_shift"]
    quality = ("no better than" if auc is None or auc < 0.6 else "above" if auc < 0.7 else "well above")
    auc_text = "n/a" if auc is None else f"{auc:.2f}"
    diff = shift["fvgpt"] - shift["backbone"]
    compare = "as much as" if abs(diff) < 5e-4 else "less than" if diff < 0 else "more than"
    third = (f"The foreground gate ranks training views whose foreground view is the better teacher with AUC "
             f"{auc_text} ({quality} chance, 0.5), and FVG-PT's predictions on counterfactual base images change "
             f"{compare} CoOp's when the context is masked away (D_fg {shift['fvgpt']:.3f} vs "
             f"{shift['backbone']:.3f}; lower means more foreground).")
    return [first, second, third]


def run_world_demo(root: Path = Path("cache/demo"), seeds=DEMO_SEEDS, loaded: LoadedModel | None = None,
                   progress: Callable[[str, int, int], None] | None = None, **world) -> dict:
    """Caches once per split, then FVG-PT (defaults) and the control for every seed on every cache.
    Returns the summary (`summarize`) with `story`, `caches` and `runs` (ids, collapse flags)
    added; also written to `root/demo.json`."""
    root = Path(root)
    loaded = loaded or load_world_model()
    caches = world_caches(root, loaded, progress=progress, **{"splits": DEMO_SPLITS, **world})
    runs, where = [], {}
    for split, cache in caches.items():
        # the same configuration `fvgpt-cache train CACHE --backbone coop --seed S` builds, and its control
        for run in expand([cache], list(seeds), {"r_source": [VARIANTS[v] for v in VARIANTS]}, {"backbone": COOP.name}):
            runs.append(run)
            where[run.run_id] = (split, run.config.seed, next(v for v, r in VARIANTS.items() if r == run.config.r_source))
    records: dict[str, dict[int, dict]] = {split: {s: {} for s in seeds} for split in caches}
    for rec in run_grid(runs, root / "runs", resume=False):
        split, seed, variant = where[rec.run_id]
        records[split][seed][variant] = rec
    summary = summarize(records, seeds)
    full = {**summary, "story": story(summary), "caches": {split: str(path) for split, path in caches.items()},
            "runs": run_details(records)}
    (root / "demo.json").write_text(json.dumps(full, indent=1))
    return full


def _refuse_real_demo(root: Path) -> None:
    """The smoke test's random model must never replace the world demo's caches (or their runs)."""
    for cache in sorted(root.glob("world-*.h5")):
        try:
            random_init = open_cache(cache).provenance.get("random_init")
        except CacheError:
            continue
        if not random_init:
            raise ValueError(f"{root} holds the world demo's caches ({cache.name}, extracted with the shipped world "
                             "CLIP); the smoke test would replace them with random-model caches. Give the smoke test "
                             "its own folder (its default is cache/demo-smoke)")


def run_smoke_demo(root: Path = Path("cache/demo-smoke"), progress: Callable[[str, int, int], None] | None = None) -> dict:
    """The world demo's whole pipeline with a random tiny CLIP on 4 classes and a few images, one seed."""
    from .world import SHAPES

    root = Path(root)
    _refuse_real_demo(root)
    root.mkdir(parents=True, exist_ok=True)
    config = root / "smoke-clip.json"
    config.write_text(json.dumps(SMOKE_MODEL, indent=1))
    loaded = load_clip(str(config), "none", seed=0)
    return run_world_demo(root, seeds=(1,), loaded=loaded, progress=progress,
                          classes=SHAPES[:4], shots=4, val_per_class=1, test_per_class=3, train_views=3)
