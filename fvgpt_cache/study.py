"""A whole study from one plan file: extract → backbones → FVG-PT grids → report, resumable and shared.

A plan (TOML, `load_plan`) names the data, the model, the datasets, seeds, shots, backbones and what
to train; `build_jobs` turns it into jobs with explicit outputs under the plan's `out` folder and
their dependencies. Each job calls the library (extraction, backbone training or import, grids,
reports) and, when it ends, writes a status file `out/jobs/<job>.json` (done, failed or skipped,
with the job's settings) and keeps its log in `out/logs/<job>.log`. The files on the shared disk
are the whole coordination:

* a rerun skips every job whose status says done with the same settings (a job done with other
  settings is refused by name before anything runs); an interrupted job resumes through the
  resume of its own step (extraction's partial file, the grid's results.jsonl);
* a failing job is recorded with its error, its dependants are skipped, the rest goes on;
* `shard=(i, n)` runs a deterministic share: the caches (a dataset, a seed, a crop scale) are
  dealt round robin and every job of a cache goes to its shard, so two shards never write one file;
  the report is written by whichever process finds every other job finished;
* under torchrun (`distributed.current_job()`), image passes (extraction, PromptSRC/MMRL imports)
  run on every rank together as `extract` does, then the caches' head jobs (CoOp/KgCoOp training,
  grids) are taken from a queue one cache at a time by whichever rank is free; with
  `image_passes="per-rank"` a rank takes whole caches, image passes included.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .ablations import ABLATIONS
from .datasets import DATASETS, dataset_info

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKBONES = ("coop", "kgcoop", "promptsrc", "mmrl")
TRAINED = ("coop", "kgcoop")  # learned here from the cache
IMPORTED = ("promptsrc", "mmrl")  # official checkpoints, imported with one more pass over the images
TRAIN_ITEMS = ("table1", "table2", "paper", *ABLATIONS)
CROSS_SOURCE = "imagenet"  # Table 2: trained on every ImageNet class, evaluated on the other datasets
MASK_METHODS_NOT_YET = "generating masks from a method is not available in this version; give a folder of masks"
DEFAULT_RRC = (0.08, 1.0)

# The plan's keys: table → {key: (type check, description)}; anything else is refused by name.
KEYS: dict[str, dict[str, tuple[type | tuple, str]]] = {
    "": {"out": (str, "output folder"), "model": (dict, "[model]"), "data": (dict, "[data]"),
         "dataset": (list, "[[dataset]]"), "study": (dict, "[study]"), "checkpoints": (dict, "[checkpoints]"),
         "extract": (dict, "[extract]"), "backbone": (dict, "[backbone]"), "train": (dict, "[train]"),
         "report": (dict, "[report]")},
    "model": {"name": (str, "open_clip name or config JSON"), "pretrained": (str, "tag, file or none"),
              "quick_gelu": (str, "auto|on|off")},
    "data": {"root": (str, "folder holding the dataset folders"), "masks": (str, "mask folder (or method)")},
    "dataset": {"name": (str, "dataset name"), "split_file": (str, "split JSON"), "image_root": (str, "image folder"),
                "mask_root": (str, "mask folder"), "template": (str, "class template with {}")},
    "study": {"seeds": (list, "list of integers"), "shots": (int, "images per class"),
              "backbones": (list, f"subset of {BACKBONES}"), "train": (list, "table1, table2, ablation presets"),
              "rrc_scale": ((str, list), "'preset' or [min, max]"), "device": (str, "auto|cpu|cuda")},
    "checkpoints": {**{m: (str, "checkpoint root") for m in ("coop", "kgcoop", "promptsrc", "mmrl")},
                    **{f"{m}_cross": (str, "cross-dataset checkpoints (ImageNet, all classes)")
                       for m in ("coop", "kgcoop", "promptsrc", "mmrl")}},
    "extract": {"train_views": (int, ""), "batch_size": (int, ""), "workers": (int, ""), "missing_mask": (str, ""),
                "bad_image": (str, ""), "mask_size_mismatch": (str, ""), "fg_mode": (str, ""), "dtype": (str, "")},
    "backbone": {"epochs": (int, "CoOp/KgCoOp epochs (default: the paper's per dataset)"), "lr": (float, ""),
                 "batch_size": (int, ""), "n_ctx": (int, ""), "warmup_epochs": (int, "")},
    "report": {"compare": (str, "paper or none")},
}


class PlanError(ValueError):
    """A plan file that cannot be run as written: the message names the file, the key and the fix."""


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    split_file: Path | None = None
    image_root: Path | None = None
    mask_root: Path | None = None
    template: str | None = None

    @property
    def named(self) -> bool:
        return self.split_file is None


@dataclass
class Plan:
    path: Path
    out: Path
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    quick_gelu: str = "auto"
    data_root: Path | None = None
    masks: Path | None = None
    datasets: list[DatasetEntry] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    shots: int = 16
    backbones: list[str] = field(default_factory=lambda: ["coop"])
    train: list[str] = field(default_factory=lambda: ["table1"])
    rrc_scale: str | tuple[float, float] = "preset"
    device: str = "auto"
    checkpoints: dict[str, str] = field(default_factory=dict)
    extract: dict = field(default_factory=dict)
    backbone: dict = field(default_factory=dict)
    train_settings: dict = field(default_factory=dict)
    compare: str | None = "paper"

    def rrc_for(self, backbone: str) -> tuple[float, float]:
        """The crop scale of the training views a backbone's FVG-PT runs need (its release config's, by default)."""
        if self.rrc_scale != "preset":
            return tuple(self.rrc_scale)
        from .presets import PRESETS

        return tuple(PRESETS[backbone].rrc_scale)


TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}


def _where(path: Path, table: str) -> str:
    return f"{path} [{table}]" if table else str(path)


def _check_keys(path: Path, table: str, raw: dict) -> None:
    known = KEYS[table]
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PlanError(f"{_where(path, table)}: unknown key {key!r}{hint}; valid keys: {', '.join(known)}")
        kind = known[key][0]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            names = " or ".join(TYPE_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise PlanError(f"{_where(path, table)}: {key} = {value!r} should be {names}"
                            + (f" ({known[key][1]})" if known[key][1] else ""))


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base / p


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file; relative paths are taken from the plan file's folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"plan file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"cannot read plan file {path}: {exc}") from None
    _check_keys(path, "", raw)
    for table in ("model", "data", "study", "checkpoints", "extract", "backbone", "report"):
        _check_keys(path, table, raw.get(table, {}))
    if "out" not in raw:
        raise PlanError(f"{path}: no `out = \"FOLDER\"`: say where the study writes its caches, runs and report")
    here = path.resolve().parent
    plan = Plan(path=path, out=_resolve(here, raw["out"]))
    model = raw.get("model", {})
    plan.model = model.get("name", plan.model)
    if plan.model.endswith(".json"):
        plan.model = str(_resolve(here, plan.model))
    plan.pretrained = model.get("pretrained", plan.pretrained)
    if plan.pretrained not in ("none", "None", "") and ("/" in plan.pretrained or plan.pretrained.endswith((".pt", ".bin", ".safetensors"))):
        plan.pretrained = str(_resolve(here, plan.pretrained))
    plan.quick_gelu = model.get("quick_gelu", plan.quick_gelu)
    if plan.quick_gelu not in ("auto", "on", "off"):
        raise PlanError(f"{path} [model]: quick_gelu = {plan.quick_gelu!r}; choose auto, on or off")
    data = raw.get("data", {})
    plan.data_root = _resolve(here, data.get("root"))
    masks = data.get("masks")
    if masks is not None:
        if "/" not in masks and not _resolve(here, masks).exists():
            raise PlanError(f"{path} [data]: masks = {masks!r} is not a folder; {MASK_METHODS_NOT_YET} "
                            "(or leave `masks` out to use each dataset folder's mask/ of the FVG-PT release)")
        plan.masks = _resolve(here, masks)
    plan.datasets = _datasets(path, raw.get("dataset", []), plan.data_root or here)
    if any(d.named for d in plan.datasets) and plan.data_root is None:
        raise PlanError(f"{path} [data]: no root; the named datasets ({', '.join(d.name for d in plan.datasets if d.named)}) "
                        "are read from `root = \"FOLDER\"`, the folder holding their folders")
    _study(path, raw.get("study", {}), plan)
    ckpts = raw.get("checkpoints", {})
    for method in IMPORTED:
        if method in plan.backbones and method not in ckpts:
            raise PlanError(f"{path} [study]: backbones include {method}, whose checkpoints are imported: add "
                            f"[checkpoints] {method} = \"ROOT\" (laid out ROOT/<dataset>/seed<S>/…, or a pattern with "
                            "{dataset} and {seed})")
    if "table2" in plan.train:
        names = [d.name for d in plan.datasets]
        if CROSS_SOURCE not in names or len(names) < 2:
            raise PlanError(f"{path} [study]: train has table2 (cross-dataset: trained on every ImageNet class, "
                            "evaluated on the other datasets), which needs imagenet and at least one other dataset "
                            f"in [[dataset]]; the plan has {', '.join(names)}")
        for method in IMPORTED:  # CoOp/KgCoOp are trained on all ImageNet classes unless <method>_cross is given
            if method in plan.backbones and f"{method}_cross" not in ckpts:
                raise PlanError(f"{path} [checkpoints]: table2 with {method} needs {method}_cross = \"ROOT\", its "
                                "official cross-dataset checkpoints (trained on all ImageNet classes), laid out "
                                "ROOT/seed<S>/… or a pattern with {seed}")
    plan.checkpoints = {m: str(_resolve(here, v)) for m, v in ckpts.items()}
    plan.extract = _extract_options(path, raw.get("extract", {}))
    plan.backbone = dict(raw.get("backbone", {}))
    plan.train_settings = _train_settings(path, raw.get("train", {}))
    compare = raw.get("report", {}).get("compare", "paper")
    if compare not in ("paper", "none"):
        raise PlanError(f"{path} [report]: compare = {compare!r}; choose paper or none")
    plan.compare = None if compare == "none" else compare
    return plan


def _datasets(path: Path, items: list, root: Path) -> list[DatasetEntry]:
    if not items:
        raise PlanError(f"{path}: no [[dataset]]; add one table per dataset (name = \"oxford_pets\"), or name = \"all\" "
                        "for the eleven")
    out: list[DatasetEntry] = []
    for i, item in enumerate(items):
        where = f"[[dataset]] #{i + 1}"
        if not isinstance(item, dict):
            raise PlanError(f"{path} {where}: write a table per dataset")
        for key, value in item.items():
            if key not in KEYS["dataset"]:
                close = difflib.get_close_matches(key, list(KEYS["dataset"]), n=1)
                raise PlanError(f"{path} {where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                + f"; valid keys: {', '.join(KEYS['dataset'])}")
            if not isinstance(value, str):
                raise PlanError(f"{path} {where}: {key} = {value!r} should be a string")
        name = item.get("name")
        if not name:
            raise PlanError(f"{path} {where}: no name; give one of the eleven ({', '.join(DATASETS)}), all, or a name "
                            "with split_file and image_root")
        if "split_file" in item or "image_root" in item:
            if not ("split_file" in item and "image_root" in item):
                raise PlanError(f"{path} {where} ({name}): a split-file dataset needs both split_file and image_root")
            from .data import check_dataset_name

            try:
                check_dataset_name(name)
            except ValueError as exc:
                raise PlanError(f"{path} {where}: {exc}") from None
            out.append(DatasetEntry(name, _resolve(root, item["split_file"]), _resolve(root, item["image_root"]),
                                    _resolve(root, item.get("mask_root")), item.get("template")))
            continue
        extra = sorted(set(item) - {"name"})
        if extra:
            raise PlanError(f"{path} {where} ({name}): {', '.join(extra)} are for split-file datasets; the eleven "
                            "are read from [data] root and masks")
        names = list(DATASETS) if name == "all" else [name]
        for n in names:
            try:
                dataset_info(n)
            except ValueError as exc:
                raise PlanError(f"{path} {where}: {exc}; or give split_file and image_root for another dataset") from None
            out.append(DatasetEntry(n))
    seen = set()
    for d in out:
        if d.name in seen:
            raise PlanError(f"{path}: dataset {d.name!r} is listed twice (\"all\" includes the eleven)")
        seen.add(d.name)
    return out


def _study(path: Path, raw: dict, plan: Plan) -> None:
    where = f"{path} [study]"
    seeds = raw.get("seeds", plan.seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        raise PlanError(f"{where}: seeds = {seeds!r}; give distinct integers, e.g. [1, 2, 3]")
    plan.seeds = list(seeds)
    plan.shots = raw.get("shots", plan.shots)
    if plan.shots < 0:
        raise PlanError(f"{where}: shots = {plan.shots}; give images per class (0 keeps all)")
    backbones = raw.get("backbones", plan.backbones)
    bad = [b for b in backbones if b not in BACKBONES]
    if bad or not backbones or len(set(backbones)) != len(backbones):
        raise PlanError(f"{where}: backbones = {backbones!r}; choose distinct names from {', '.join(BACKBONES)}")
    plan.backbones = list(backbones)
    train = raw.get("train", plan.train)
    for item in train:
        if item not in TRAIN_ITEMS:
            close = difflib.get_close_matches(str(item), TRAIN_ITEMS, n=1)
            raise PlanError(f"{where}: train item {item!r} is unknown" + (f" (did you mean {close[0]!r}?)" if close else "")
                            + f"; choose from {', '.join(TRAIN_ITEMS)}")
    if not train or len(set(train)) != len(train):
        raise PlanError(f"{where}: train = {train!r}; list what to train once each, e.g. [\"table1\"]")
    if "paper" in train and any(t in ABLATIONS for t in train):
        raise PlanError(f"{where}: train has 'paper' (every ablation) and single ablations; keep one")
    plan.train = list(train)
    scale = raw.get("rrc_scale", "preset")
    if scale != "preset":
        if isinstance(scale, str):
            try:
                scale = [float(v) for v in scale.split(",")]
            except ValueError:
                scale = None
        if not (isinstance(scale, list) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)
                and 0 < scale[0] <= scale[1] <= 1):
            raise PlanError(f"{where}: rrc_scale = {raw['rrc_scale']!r}; write \"preset\" (each backbone's release "
                            "config) or [MIN, MAX] with 0 < MIN ≤ MAX ≤ 1")
        scale = (float(scale[0]), float(scale[1]))
    plan.rrc_scale = scale
    plan.device = raw.get("device", plan.device)
    if plan.device not in ("auto", "cpu", "cuda"):
        raise PlanError(f"{where}: device = {plan.device!r}; choose auto, cpu or cuda")


def _extract_options(path: Path, raw: dict) -> dict:
    from .extraction import ExtractOptions

    options = {"train_views": 11, "batch_size": 64, "workers": 2, "missing_mask": "error", "bad_image": "error",
               "mask_size_mismatch": "resize", "fg_mode": "normalized", "dtype": "float16", **raw}
    try:
        ExtractOptions(**{("store_dtype" if k == "dtype" else k): v for k, v in options.items()}).validate()
    except ValueError as exc:
        raise PlanError(f"{path} [extract]: {exc}") from None
    return options


def _train_settings(path: Path, raw: dict) -> dict:
    from .training import TrainConfig, parse_value

    fixed = {"backbone", "seed", "classes", "device"}
    out = {}
    for key, value in raw.items():
        if key in fixed:
            raise PlanError(f"{path} [train]: {key} is set by the plan ([study] backbones, seeds, device); remove it")
        if key not in TrainConfig.field_names():
            close = difflib.get_close_matches(key, TrainConfig.field_names(), n=1)
            raise PlanError(f"{path} [train]: unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                            + "; [train] takes TrainConfig fields (see `fvgpt-cache train --help`)")
        text = ("true" if value else "false") if isinstance(value, bool) else \
            "+".join(map(str, value)) if isinstance(value, list) else str(value)
        try:
            out[key] = parse_value(key, text)
        except ValueError as exc:
            raise PlanError(f"{path} [train]: {exc}") from None
    return out


# ------------------------------------------------------------------------------------------ jobs

@dataclass
class StudyJob:
    """One step of the study: `kind` extract|import|backbone|grid|report, on one cache (`unit`)."""

    id: str
    kind: str
    unit: str
    spec: dict
    deps: list[str] = field(default_factory=list)

    @property
    def collective(self) -> bool:
        """Image passes: under torchrun every rank takes part."""
        return self.kind in ("extract", "import")

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rrc_tag(scale: tuple[float, float]) -> str:
    return "" if tuple(scale) == DEFAULT_RRC else f"_rrc{scale[0]:g}-{scale[1]:g}"


def cache_path(plan: Plan, dataset: str, seed: int, scale: tuple[float, float]) -> Path:
    shots = f"shots{plan.shots}" if plan.shots > 0 else "allshots"
    return plan.out / "caches" / dataset / f"{shots}_seed{seed}{_rrc_tag(scale)}.h5"


def checkpoint_for(plan: Plan, method: str, dataset: str, seed: int, cross: bool = False) -> Path:
    """The official checkpoint of (dataset, seed): ROOT/<dataset>/seed<S>, or ROOT's {dataset}/{seed} pattern;
    cross-dataset ones (`<method>_cross`): ROOT/seed<S> or the pattern."""
    root = plan.checkpoints[f"{method}_cross" if cross else method]
    if "{dataset}" in root or "{seed}" in root:
        return Path(root.replace("{dataset}", dataset).replace("{seed}", str(seed)))
    return Path(root) / f"seed{seed}" if cross else Path(root) / dataset / f"seed{seed}"


def build_jobs(plan: Plan) -> list[StudyJob]:
    """Every job of the plan in dependency order, with explicit outputs under `plan.out`."""
    jobs: list[StudyJob] = []
    model = {"model": plan.model, "pretrained": plan.pretrained, "quick_gelu": plan.quick_gelu}
    grids = []
    for d in plan.datasets:
        for seed in plan.seeds:
            scales = list(dict.fromkeys(plan.rrc_for(b) for b in plan.backbones))
            for scale in scales:
                cache = cache_path(plan, d.name, seed, scale)
                unit = str(cache.relative_to(plan.out / "caches").with_suffix(""))
                ex = StudyJob(f"extract/{unit}", "extract", unit, {
                    "dataset": d.name, "split_file": str(d.split_file) if d.split_file else None,
                    "image_root": str(d.image_root) if d.image_root else None,
                    "mask_root": str(d.mask_root) if d.mask_root else None, "template": d.template,
                    "data_root": str(plan.data_root) if d.named else None,
                    "masks": str(plan.masks) if (d.named and plan.masks) else None,
                    "shots": plan.shots, "seed": seed, "rrc_scale": list(scale), **model,
                    "options": plan.extract, "device": plan.device, "out": str(cache)})
                jobs.append(ex)
                for b in (b for b in plan.backbones if plan.rrc_for(b) == scale):
                    # PromptSRC/MMRL: imported; CoOp/KgCoOp: trained here, or loaded from [checkpoints] when given
                    kind = "import" if b in IMPORTED else "load" if b in plan.checkpoints else "backbone"
                    bid = f"{kind}/{b}/{unit}"
                    spec = {"cache": str(cache), "method": b, "seed": seed, "device": plan.device}
                    if kind == "import":
                        spec["checkpoint"] = str(checkpoint_for(plan, b, d.name, seed))
                        spec["options"] = {k: plan.extract[k] for k in ("batch_size", "workers", "train_views")}
                    elif kind == "load":
                        spec.update(name=b, checkpoint=str(checkpoint_for(plan, b, d.name, seed)))
                    else:
                        spec["options"] = plan.backbone
                        spec["out"] = str(plan.out / "backbones" / f"{unit}-{b}")
                    jobs.append(StudyJob(bid, kind, unit, spec, [ex.id]))
                    for item in (t for t in plan.train if t != "table2"):
                        gid = f"grid/{item}/{b}/{unit}"
                        grids.append(StudyJob(gid, "grid", unit, {
                            "cache": str(cache), "backbone": b, "seed": seed, "preset": None if item == "table1" else item,
                            "settings": plan.train_settings, "device": plan.device,
                            "out": str(plan.out / "runs" / item / b / unit)}, [bid]))
    jobs.extend(grids)
    if "table2" in plan.train:
        cross = cross_jobs(plan)
        jobs.extend(cross)
        grids += [j for j in cross if j.kind == "grid"]
    jobs.append(StudyJob("report", "report", "", {"grids": [g.spec["out"] for g in grids], "compare": plan.compare,
                                                  "out": str(plan.out / "report")}, [g.id for g in grids]))
    return jobs


def cross_jobs(plan: Plan) -> list[StudyJob]:
    """Table 2 per backbone and seed: the backbone on every ImageNet class (CoOp/KgCoOp trained, PromptSRC/MMRL
    imported from their cross-dataset checkpoints) as `<method>_all` in the ImageNet cache and in every target
    cache, then one FVG-PT run on all ImageNet classes evaluated on the targets.

    These jobs write into caches of other datasets, so they run once every job of those caches has finished
    (`unit` is empty: a tail job, see `run_study`)."""
    jobs = []
    for b in plan.backbones:
        scale, name = plan.rrc_for(b), f"{b}_all"
        for seed in plan.seeds:
            def unit_of(dataset: str) -> tuple[Path, str]:
                cache = cache_path(plan, dataset, seed, scale)
                return cache, str(cache.relative_to(plan.out / "caches").with_suffix(""))

            source, src_unit = unit_of(CROSS_SOURCE)
            targets = [unit_of(d.name) for d in plan.datasets if d.name != CROSS_SOURCE]
            common = {"method": b, "name": name, "seed": seed, "device": plan.device}
            writes = []
            if b in TRAINED:
                # trained like any head job of the ImageNet cache (in parallel over seeds), written into no cache
                # (or given: [checkpoints] <method>_cross); the tail writes the context into every cache
                given = f"{b}_cross" in plan.checkpoints
                ckpt = checkpoint_for(plan, b, CROSS_SOURCE, seed, cross=True) if given else \
                    plan.out / "backbones" / f"{src_unit}-{name}"
                first = []
                if not given:
                    first = [StudyJob(f"cross/backbone/{b}/{src_unit}", "backbone", src_unit, {
                        **common, "cache": str(source), "classes": "all", "options": plan.backbone, "out": str(ckpt),
                        "write": False}, [f"extract/{src_unit}"])]
                    jobs += first
                writes += [StudyJob(f"cross/load/{b}/{u}", "load", "", {**common, "cache": str(c), "checkpoint": str(ckpt)},
                                    [*(t.id for t in first), f"extract/{u}"]) for c, u in [(source, src_unit), *targets]]
            else:
                ckpt = checkpoint_for(plan, b, CROSS_SOURCE, seed, cross=True)
                options = {k: plan.extract[k] for k in ("batch_size", "workers", "train_views")}
                # the class prompts a checkpoint stores are the source's: compared on the source only
                writes += [StudyJob(f"cross/import/{b}/{u}", "import", "", {
                    **common, "cache": str(c), "checkpoint": str(ckpt), "options": options,
                    "prompt_check": u == src_unit}, [f"extract/{u}"]) for c, u in [(source, src_unit), *targets]]
            jobs += writes
            jobs.append(StudyJob(f"grid/table2/{b}/{src_unit}", "grid", "", {
                "cache": str(source), "backbone": name, "seed": seed, "preset": None, "classes": "all",
                "eval_caches": [str(c) for c, _ in targets], "settings": plan.train_settings, "device": plan.device,
                "out": str(plan.out / "runs" / "table2" / b / src_unit)}, [w.id for w in writes]))
    return jobs


def units_of(jobs: list[StudyJob]) -> list[str]:
    return list(dict.fromkeys(j.unit for j in jobs if j.unit))


def largest_first(units: list[str]) -> list[str]:
    """Caches by their dataset's class count, largest first (ImageNet's take longest), plan order among equals:
    the order in which shards are dealt and the torchrun queue hands them out."""
    def size(unit: str) -> int:
        name = unit.split("/")[0]
        return DATASETS[name].num_classes if name in DATASETS else 0

    return sorted(units, key=lambda u: -size(u))


def shard_units(jobs: list[StudyJob], shard: tuple[int, int] | None) -> set[str]:
    """The caches a shard owns: the k-th cache, largest first, goes to shard k mod N."""
    units = largest_first(units_of(jobs))
    if shard is None:
        return set(units)
    i, n = shard
    return {u for k, u in enumerate(units) if k % n == i}


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: write I/N, e.g. 0/4 (shards are numbered from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: I must be in 0…N-1 and N ≥ 1 (SLURM: --shard $SLURM_ARRAY_TASK_ID/N)")
    return i, n


# ---------------------------------------------------------------------------------------- status

FINAL = ("done", "failed", "skipped")


def status_path(plan: Plan, job: StudyJob) -> Path:
    return plan.out / "jobs" / f"{job.id}.json"


def log_path(plan: Plan, job: StudyJob) -> Path:
    return plan.out / "logs" / f"{job.id}.log"


def read_status(plan: Plan, job: StudyJob) -> dict | None:
    p = status_path(plan, job)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None  # cut by a crash while written: the job counts as not done


def write_status(plan: Plan, job: StudyJob, state: str, **extra) -> dict:
    record = {"job": job.id, "state": state, "fingerprint": job.fingerprint, "spec": job.spec,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
              "rank": int(os.environ.get("RANK", "0")), **extra}
    p = status_path(plan, job)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, p)
    return record


def check_settings(plan: Plan, jobs: list[StudyJob]) -> None:
    """Refuse a plan whose jobs were done before with other settings (their outputs would be mixed in)."""
    clashes = []
    for j in jobs:
        st = read_status(plan, j)
        if st and st["state"] == "done" and st["fingerprint"] != j.fingerprint and j.kind != "report":
            old, new = st.get("spec", {}), j.spec
            diff = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            clashes.append(f"{j.id} ({'; '.join(diff[:3])})")
    if clashes:
        raise PlanError(f"{len(clashes)} job(s) of this plan were done with other settings under {plan.out}: "
                        + ", ".join(clashes[:5]) + (" …" if len(clashes) > 5 else "")
                        + ". Their outputs would be mixed with the new settings' results: choose another `out`, or "
                          "remove those jobs' outputs and their files under jobs/")


# ------------------------------------------------------------------------------------- execution

def _load_dataset(spec: dict):
    from .data import generic_dataset
    from .datasets import load_dataset

    if spec["split_file"]:
        return generic_dataset(Path(spec["split_file"]), Path(spec["image_root"]),
                               Path(spec["mask_root"]) if spec["mask_root"] else None,
                               template=spec["template"] or "a photo of a {}.", name=spec["dataset"])
    masks = None
    if spec["masks"]:
        masks = Path(spec["masks"]) / dataset_info(spec["dataset"]).folder
    return load_dataset(spec["dataset"], Path(spec["data_root"]), masks)


def extract_options_for(spec: dict):
    from .extraction import ExtractOptions
    from .views import AugmentConfig

    o = spec["options"]
    return ExtractOptions(shots=spec["shots"], seed=spec["seed"], train_views=o["train_views"],
                          batch_size=o["batch_size"], workers=o["workers"], device=spec["device"],
                          missing_mask=o["missing_mask"], bad_image=o["bad_image"],
                          mask_size_mismatch=o["mask_size_mismatch"], fg_mode=o["fg_mode"],
                          template=spec["template"], store_dtype=o["dtype"],
                          augment=AugmentConfig(scale=tuple(spec["rrc_scale"])))


def _found_cache(spec: dict) -> bool:
    """A complete cache already at the job's output (a crash after it was written, before its status)."""
    from .store import open_cache

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
    from .models import load_clip

    key = (spec["model"], spec["pretrained"], spec["quick_gelu"])
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_clip(spec["model"], spec["pretrained"], quick_gelu=spec["quick_gelu"])
    return _MODELS[key]


def run_extract(spec: dict, log, job=None) -> dict:
    from .extraction import extract

    if _found_cache(spec):
        log(f"{spec['out']} is already complete")
        return {"found": True}
    ds = _load_dataset(spec)
    summary = extract(ds, _model(spec), Path(spec["out"]), extract_options_for(spec), job=job)
    log(f"wrote {summary.out}: {summary.counts} in {summary.seconds:.1f}s ({summary.images_per_second:.1f} img/s); "
        f"skipped {sum(len(v) for v in summary.skipped.values())}, resumed rows {summary.resumed_rows}")
    images = sum(summary.counts.values())
    return {"images": images, "seconds": summary.seconds, "images_per_second": summary.images_per_second,
            "views_encoded": encoded_views(summary.counts, spec["options"]["train_views"]) if not summary.resumed_rows
            else None}


def run_import(spec: dict, log, job=None) -> dict:
    from .backbones import ImportOptions, import_backbone, resolve_checkpoint
    from .backbones.image_pass import _existing_groups
    from .store import open_cache

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
    from .backbones import BackboneConfig, default_epochs, save_coop_checkpoint, train_backbone, write_backbone
    from .store import open_cache

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
    from .backbones import load_backbone, resolve_checkpoint
    from .data import sha256_of
    from .device import resolve_device
    from .store import open_cache

    cache, name = open_cache(spec["cache"]), spec["name"]
    ckpt = resolve_checkpoint(spec["checkpoint"], spec["method"])
    if name in cache.text_groups and cache.text_provenance(name).get("checkpoint_sha256") == sha256_of(ckpt):
        log(f"{cache.path} already holds /text/{name} from {ckpt}")
        return {"found": True}
    info = load_backbone(cache.path, ckpt, spec["method"], name=name, device=resolve_device(spec["device"]))
    log(f"wrote /text/{name} {info['shape']} into {cache.path} from {ckpt}")
    return {}


def grid_runs(spec: dict):
    from .grids import expand

    base = {"device": spec["device"], "backbone": spec["backbone"], "classes": spec.get("classes", "base"),
            **spec["settings"]}
    return expand([Path(spec["cache"])], [spec["seed"]], {}, base, spec["preset"], "auto")


def run_grid_job(spec: dict, log, job=None) -> dict:
    from .grids import run_grid

    runs = grid_runs(spec)
    t0 = time.perf_counter()
    records = run_grid(runs, Path(spec["out"]), log=log, eval_caches=[Path(c) for c in spec.get("eval_caches", [])])
    seconds = time.perf_counter() - t0
    log(f"{len(records)} new run(s), {len(runs) - len(records)} already done, {seconds:.1f}s")
    epochs_images = sum(r["config"]["epochs"] * r["train_images"] for r in records)
    return {"runs": len(runs), "new_runs": len(records), "seconds": seconds, "epoch_images": epochs_images}


def results_digest(grid_dirs: list[str]) -> dict:
    """What a report is made from: each grid's results file and its SHA-256."""
    out = {}
    for d in grid_dirs:
        p = Path(d) / "results.jsonl"
        if p.exists():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_report(spec: dict, log, job=None) -> dict:  # noqa: ARG001  (every runner takes the torchrun job)
    from . import reports

    files = list(results_digest(spec["grids"]))
    if not files:
        raise RuntimeError("no grid has results yet; nothing to report")
    records = reports.load_records(files)
    summary = reports.aggregate(records)
    ablations = reports.ablation_tables(records)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    paper = spec["compare"] == "paper"
    for name, text in (("report.md", reports.to_markdown(summary, paper, ablations)), ("report.csv", reports.to_csv(summary)),
                       ("report.json", reports.to_json(summary))):
        tmp = out / f".{name}.{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    log(f"{len(records)} run(s) from {len(files)} grid(s) → {out}/report.md, report.csv, report.json")
    return {"runs": len(records), "grids": len(files)}


RUNNERS: dict[str, Callable] = {"extract": run_extract, "import": run_import, "backbone": run_backbone,
                                "load": run_load, "grid": run_grid_job, "report": run_report}


# ------------------------------------------------------------------------------------ the driver

@dataclass
class Outcome:
    job: str
    kind: str
    state: str  # done | failed | skipped | waiting | running elsewhere
    message: str = ""
    seconds: float = 0.0


class _Log:
    """One log file per job, appended to by every attempt."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = path.open("a")
        self.fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} pid {os.getpid()}\n")

    def __call__(self, message: str) -> None:
        self.fh.write(f"{message}\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _is_done(plan: Plan, job: StudyJob, status: dict | None) -> bool:
    if not status or status["state"] != "done":
        return False
    if job.kind == "report":  # a report is current while the results it was made from are unchanged
        return status.get("inputs") == results_digest(job.spec["grids"])
    if status["fingerprint"] != job.fingerprint:
        return False
    output = {"extract": "out", "grid": "out"}.get(job.kind)  # removed since: the job runs again
    return output is None or Path(job.spec[output]).exists()


def finished_since(plan: Plan, jobs: list[StudyJob], started: float) -> int:
    """Jobs whose status file was written after `started` (by any process): the progress of the whole plan."""
    count = 0
    for j in jobs:
        try:
            count += status_path(plan, j).stat().st_mtime >= started
        except FileNotFoundError:
            pass
    return count


def execute(plan: Plan, job: StudyJob, djob=None) -> Outcome:
    """Run one job, record its status and log; errors become a failed outcome (Ctrl-C is not caught).

    One process runs a job at a time: its lock `out/jobs/<job>.lock` (an image pass under torchrun
    is locked by the pass itself, on rank 0). `djob` is the torchrun job of an image pass."""
    from .store import CacheError, lock_file

    lead = djob is None or djob.rank == 0
    log = _Log(log_path(plan, job)) if lead else (lambda message: None)
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if djob is None or not djob.distributed:
                try:
                    stack.enter_context(lock_file(plan.out / "jobs" / f"{job.id}.lock", f"job {job.id}"))
                except CacheError as exc:
                    return Outcome(job.id, job.kind, "running elsewhere", str(exc))
                if _is_done(plan, job, read_status(plan, job)):  # finished by another process meanwhile
                    return Outcome(job.id, job.kind, "done", "finished by another process")
            inputs = results_digest(job.spec["grids"]) if job.kind == "report" else None
            info = RUNNERS[job.kind](job.spec, log, djob)
            seconds = time.perf_counter() - t0
            if lead:
                write_status(plan, job, "done", seconds=seconds, info=info,
                             **({"inputs": inputs} if inputs is not None else {}))
        return Outcome(job.id, job.kind, "done", "already complete" if info.get("found") else "", seconds)
    except KeyboardInterrupt:
        if lead:
            log("interrupted; rerun the same command to resume")
        raise
    except Exception as exc:  # noqa: BLE001  (a failing job is recorded and the others go on)
        message = str(exc) or type(exc).__name__
        if djob is not None and djob.distributed and djob.failure() is None:
            djob.record_failure(message)  # failed before the pass began: the other ranks must not wait for this one
        if lead:
            log("".join(traceback.format_exc()))
            write_status(plan, job, "failed", error=message, seconds=time.perf_counter() - t0)
        return Outcome(job.id, job.kind, "failed", message, time.perf_counter() - t0)
    finally:
        if lead:
            log.close()


def _skip(plan: Plan, job: StudyJob, reason: str, lead: bool) -> Outcome:
    if lead:
        write_status(plan, job, "skipped", error=reason)
    return Outcome(job.id, job.kind, "skipped", reason)


@dataclass
class StudyResult:
    outcomes: list[Outcome]
    already_done: int
    total: int
    report: Path | None = None

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == "failed"]


def _blocking(plan: Plan, job: StudyJob, by_id: dict[str, StudyJob]) -> str | None:
    """Why a job cannot run now: a dependency failed/skipped ('skip: …') or is not done yet ('wait: …')."""
    for dep in job.deps:
        st = read_status(plan, by_id[dep])
        if st is None or st["state"] not in FINAL or (st["state"] == "done" and not _is_done(plan, by_id[dep], st)):
            return f"wait: {dep} is not finished"
        if st["state"] != "done" and job.kind != "report":
            return f"skip: {dep} {st['state']}"
    if job.kind == "report" and not any(read_status(plan, by_id[d])["state"] == "done" for d in job.deps):
        return "skip: no grid finished"
    if not job.unit and job.kind != "report":  # a tail job writes into caches: every cache's own jobs first
        busy = next((j for j in by_id.values() if j.unit and not _final(plan, j)), None)
        if busy is not None:
            return f"wait: {busy.id} (and maybe others) is not finished"
    return None


def _final(plan: Plan, job: StudyJob) -> bool:
    st = read_status(plan, job)
    return st is not None and (st["state"] in ("failed", "skipped") or _is_done(plan, job, st))


IMAGE_PASSES = ("shared", "per-rank")


def run_study(plan: Plan, *, shard: tuple[int, int] | None = None, djob=None, image_passes: str = "shared",
              on_outcome: Callable[[Outcome], None] | None = None,
              on_start: Callable[[StudyJob], None] | None = None) -> StudyResult:
    """Run every job of this process's share that is not done yet; see the module's docstring.

    `image_passes` under torchrun: "shared" runs each image pass on every rank together; "per-rank"
    gives each rank whole caches, their image passes included (no coordination inside a pass)."""
    from .distributed import Job, current_job

    if image_passes not in IMAGE_PASSES:
        raise ValueError(f"--image-passes {image_passes!r}: choose {' or '.join(IMAGE_PASSES)}")

    plan.out.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(plan)
    check_settings(plan, jobs)
    by_id = {j.id: j for j in jobs}
    mine = shard_units(jobs, shard)
    djob = djob if djob is not None else current_job()
    lead = djob.rank == 0
    if djob.distributed:
        djob.start(djob.device(plan.device))
    outcomes: list[Outcome] = []
    done_before = {j.id for j in jobs if _is_done(plan, j, read_status(plan, j))}

    def record(o: Outcome) -> None:
        outcomes.append(o)
        if on_outcome:
            on_outcome(o)

    def attempt(j: StudyJob, alone: bool = False) -> None:
        if _is_done(plan, j, read_status(plan, j)):
            return
        block = _blocking(plan, j, by_id)
        if block and block.startswith("skip"):
            record(_skip(plan, j, block[6:], lead or not j.collective))
            return
        if block:
            record(Outcome(j.id, j.kind, "waiting", block[6:]))
            return
        if on_start:
            on_start(j)
        shared = j.collective and djob.distributed and image_passes == "shared" and not alone
        record(execute(plan, j, djob if shared else None if not j.collective else Job()))

    together = djob.distributed and image_passes == "shared"
    # 1. image passes: every rank together, one job after the other
    for j in (j for j in jobs if j.collective and j.unit in mine and (together or not djob.distributed)):
        if djob.distributed:
            todo = _agree(djob, f"{j.id}", not _is_done(plan, j, read_status(plan, j)))
            if not todo:
                continue
            attempt(j)
            _settle(djob, j.id)
        else:
            attempt(j)
    # 2. head jobs, one cache at a time, from a queue every rank takes from
    units = [u for u in largest_first(units_of(jobs)) if u in mine]
    heads = {u: [j for j in jobs if j.unit == u and not (j.collective and (together or not djob.distributed))]
             for u in units}
    if djob.distributed:
        _barrier(djob, "images-done")
        while True:
            k = int(djob.store.add("fvgpt-cache/study/queue", 1)) - 1
            if k >= len(units):
                break
            for j in heads[units[k]]:
                attempt(j)
        _barrier(djob, "heads-done")
    else:
        for u in units:
            for j in heads[u]:
                attempt(j)
    # 3. jobs that write into several caches (Table 2), once every cache's own jobs have finished, on one process;
    #    then the report, once every grid of every shard has finished
    if lead:
        for j in jobs:
            if not j.unit:
                attempt(j, alone=True)
    if djob.distributed and lead:  # the head jobs other ranks ran: their status files say how they went
        seen = {o.job for o in outcomes}
        for j in jobs:
            st = read_status(plan, j)
            if (j.unit in mine or not j.unit) and j.id not in seen and j.id not in done_before and st \
                    and st["state"] in FINAL:
                outcomes.append(Outcome(j.id, j.kind, st["state"], st.get("error", ""), st.get("seconds", 0.0)))
    rep = plan.out / "report" / "report.md"
    return StudyResult(outcomes, len(done_before), len(jobs), rep if rep.exists() else None)


# --------------------------------------------------------------------------- torchrun coordination

def _barrier(djob, name: str) -> None:
    """Every rank reaches `name` (a store counter), without looking at failures of earlier passes; a rank
    whose heartbeat stops for the job's timeout stops the wait."""
    key = f"fvgpt-cache/study/barrier/{name}"
    djob.store.add(key, 1)
    heard = {r: (djob.beats(r), time.monotonic()) for r in range(djob.world_size)}
    pause = 0.02
    while int(djob.store.add(key, 0)) < djob.world_size:
        now = time.monotonic()
        for r in range(djob.world_size):
            b = djob.beats(r)
            if b != heard[r][0]:
                heard[r] = (b, now)
            elif now - heard[r][1] > djob.timeout:
                raise RuntimeError(f"rank {r} has not been heard from for {djob.timeout:.0f} s (its process or node is "
                                   "gone); rerun the same command to finish the study")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.5)


def _agree(djob, name: str, mine: bool) -> bool:
    """Rank 0's decision, taken by every rank (the ranks must run the same image passes in order)."""
    key = f"fvgpt-cache/study/decide/{name}"
    if djob.rank == 0:
        djob.store.set(key, "1" if mine else "0")
    return djob.store.get(key).decode() == "1"


def _settle(djob, name: str) -> None:
    """After an image pass on every rank: wait for all, forget a failure of that pass, go on together."""
    _barrier(djob, f"{name}/end")
    djob.forget_failure()
    _barrier(djob, f"{name}/clean")


# ------------------------------------------------------------------------------- dry run, estimate

STAGES = ("extract", "import", "backbone", "load", "grid", "report")


def overview(plan: Plan, shard: tuple[int, int] | None = None) -> dict:
    """Per stage: jobs in the plan, done, failed before, to run by this process, left to other shards."""
    jobs = build_jobs(plan)
    mine = shard_units(jobs, shard)
    rows = {k: {"jobs": 0, "done": 0, "failed": 0, "run": 0, "other shards": 0} for k in STAGES}
    todo = []
    for j in jobs:
        st = read_status(plan, j)
        row = rows[j.kind]
        row["jobs"] += 1
        if _is_done(plan, j, st):
            row["done"] += 1
            continue
        if st and st["state"] in ("failed", "skipped"):
            row["failed"] += 1
        if not j.unit or j.unit in mine:
            row["run"] += 1
            todo.append(j)
        else:
            row["other shards"] += 1
    return {"jobs": jobs, "stages": rows, "todo": todo}


def missing_inputs(plan: Plan, jobs: list[StudyJob]) -> list[str]:
    """Inputs of jobs still to run that are not there: dataset folders, split files, checkpoints."""
    missing = []
    for j in jobs:
        spec = j.spec
        if j.kind == "extract" and spec["seed"] == plan.seeds[0] and spec["rrc_scale"] == list(plan.rrc_for(plan.backbones[0])):
            if spec["split_file"]:
                missing += [f"{spec['dataset']}: {spec[k]}" for k in ("split_file", "image_root") if not Path(spec[k]).exists()]
            else:
                try:
                    from .datasets import resolve_dataset_dir

                    resolve_dataset_dir(spec["dataset"], Path(spec["data_root"]))
                except FileNotFoundError:
                    missing.append(f"{spec['dataset']}: no {dataset_info(spec['dataset']).folder}/ with its split file "
                                   f"under {spec['data_root']}")
        given = j.kind in ("import", "load") and not Path(spec["checkpoint"]).is_relative_to(plan.out)
        if given and not Path(spec["checkpoint"]).exists():
            missing.append(f"{j.id}: checkpoint {spec['checkpoint']}")
    return missing


def encoded_views(samples: dict[str, int], views: int) -> int:
    """Images the encoder sees for a cache: full + foreground view of every stored view."""
    return 2 * sum(n * (views if split == "train" else 1) for split, n in samples.items())


def _samples(spec: dict) -> tuple[dict[str, int], int]:
    """Images per split of a cache to be extracted, and its class count."""
    from .data import fewshot_splits

    ds = _load_dataset(spec)
    return {s: len(v) for s, v in fewshot_splits(ds.splits, spec["shots"], spec["seed"]).items()}, len(ds.classnames)


def measure_rates(plan: Plan, jobs: list[StudyJob], device: str) -> dict:
    """Throughputs for the estimate: from this plan's finished jobs when there are any, else measured now
    (the model's images/s on this device; the engine's seconds per training image and epoch)."""
    rates, how = {}, {}
    done = [read_status(plan, j) for j in jobs]
    done = [s for s in done if s and s["state"] == "done" and not (s.get("info") or {}).get("found")]
    for kind, key in (("extract", "encode"), ("import", "encode")):
        pairs = [(s["info"].get("views_encoded"), s["seconds"]) for s in done if s["job"].startswith(kind + "/")
                 and s["info"].get("views_encoded")]
        if pairs and key not in rates:
            rates[key] = sum(p[0] for p in pairs) / sum(p[1] for p in pairs)
            how[key] = f"{len(pairs)} finished {kind} job(s) of this plan"
    pairs = [(s["info"]["epoch_images"], s["seconds"]) for s in done if s["job"].startswith("grid/")
             and s["info"].get("epoch_images")]
    if pairs:
        rates["head"] = sum(p[1] for p in pairs) / sum(p[0] for p in pairs)
        how["head"] = f"{len(pairs)} finished grid job(s) of this plan"
    pairs = [(s["info"]["epoch_images"], s["seconds"]) for s in done if s["job"].startswith("backbone/")
             and s["info"].get("epoch_images")]
    if pairs:
        rates["backbone"] = sum(p[1] for p in pairs) / sum(p[0] for p in pairs)
        how["backbone"] = f"{len(pairs)} finished backbone job(s) of this plan"
    if "encode" not in rates or "backbone" not in rates:
        try:
            enc, bb = _probe_model(plan, device)
            rates.setdefault("encode", enc)
            how.setdefault("encode", f"measured now: the model's encoder on {device}, random images")
            rates.setdefault("backbone", bb)
            how.setdefault("backbone", "measured now: prompt-learning steps of the model's text tower")
        except Exception as exc:  # noqa: BLE001  (the estimate is then unknown, said so)
            how["encode"] = how.get("encode") or f"cannot measure: {exc}"
    if "head" not in rates:
        rates["head"] = _probe_engine(device)
        how["head"] = f"measured now: one FVG-PT run on synthetic features on {device}"
    return {"rates": rates, "how": how}


PROBE_CLASSES = 50


def _probe_model(plan: Plan, device: str) -> tuple[float, float]:
    """Images per second of the encoder, and seconds per (training image · epoch) of CoOp on PROBE_CLASSES
    classes (a CoOp step encodes every base class's prompt)."""
    import torch

    from .backbones.coop import backbone_features
    from .device import resolve_device
    from .models import load_clip

    dev = resolve_device(device)
    loaded = load_clip(plan.model, plan.pretrained, quick_gelu=plan.quick_gelu, device=dev)
    size = loaded.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(16, 3, size, size, device=dev)
    with torch.no_grad():
        loaded.model.encode_image(x)
        t0 = time.perf_counter()
        for _ in range(2):
            loaded.model.encode_image(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        enc = 32 / (time.perf_counter() - t0)
    width = loaded.model.token_embedding.weight.shape[1]
    ctx = torch.zeros(4, width, device=dev, requires_grad=True)
    names = [f"class {i}" for i in range(PROBE_CLASSES)]
    t0 = time.perf_counter()
    backbone_features(loaded, names, ctx, "end")
    step = time.perf_counter() - t0  # forward only, no grad tape kept: a lower bound of a training step
    return enc, 3 * step / 4  # a step (≈ 3 forwards) per batch of 4 images


def _probe_engine(device: str) -> float:
    import tempfile

    from .grids import expand, run_grid
    from .synthetic import write_feature_cache

    with tempfile.TemporaryDirectory() as tmp:
        cache = write_feature_cache(Path(tmp) / "probe.h5", num_classes=10, shots=16, views=3, dim=512)
        runs = expand([cache], [1], {}, {"device": device, "epochs": 2}, None, "none")
        t0 = time.perf_counter()
        run_grid(runs, Path(tmp) / "grid")
        seconds = time.perf_counter() - t0
    return seconds / (2 * 5 * 16)  # 5 base classes × 16 shots × 2 epochs


def estimate(plan: Plan, todo: list[StudyJob], rates: dict) -> dict:
    """Seconds per stage for the jobs still to run on one process (a lower bound: decoding, loading and
    evaluation are not in the measured rates unless they come from finished jobs)."""
    r = rates["rates"]
    seconds = {k: 0.0 for k in STAGES}
    unknown = []
    sizes: dict[str, tuple] = {}
    all_jobs = build_jobs(plan)
    extracts = {x.spec["out"]: x for x in all_jobs if x.kind == "extract"}
    for j in todo:
        if j.kind in ("report", "load"):  # seconds at most
            continue
        unit = extracts[j.spec["cache"] if j.kind != "extract" else j.spec["out"]].unit  # Table 2's jobs have none
        if unit not in sizes:
            try:
                sizes[unit] = _samples(extracts[cache_path_of(plan, unit)].spec)
            except Exception as exc:  # noqa: BLE001
                sizes[unit] = ({}, 0)
                unknown.append(f"{unit}: {exc}")
        n, classes = sizes[unit]
        if not n:
            continue
        views = plan.extract["train_views"]
        if j.kind in ("extract", "import"):
            if "encode" in r:
                seconds[j.kind] += encoded_views(n, views) / r["encode"]
        elif j.kind == "backbone":
            from .backbones import default_epochs

            epochs = plan.backbone.get("epochs") or default_epochs(unit.split("/")[0], j.spec["method"])
            share = 1 if j.spec.get("classes") == "all" else 0.5  # images and classes it trains on
            if "backbone" in r:
                seconds["backbone"] += epochs * n.get("train", 0) * share * r["backbone"] * classes * share / PROBE_CLASSES
        elif j.kind == "grid":
            try:
                runs = len(_ablation_rows(j.spec["preset"]))
            except KeyError:
                runs = 1
            epochs = plan.train_settings.get("epochs", 10)
            share = 1 if j.spec.get("classes") == "all" else 0.5
            seconds["grid"] += runs * epochs * n.get("train", 0) * share * r["head"]
    return {"seconds": seconds, "total": sum(seconds.values()), "unknown": unknown}


def cache_path_of(plan: Plan, unit: str) -> str:
    return str(plan.out / "caches" / f"{unit}.h5")


def _ablation_rows(preset: str | None) -> list:
    from .ablations import PAPER

    if preset is None:
        return [None]
    names = PAPER if preset == "paper" else (preset,)
    return [row for n in names for row in ABLATIONS[n][1]]


PAPER_PLAN = '''# The plan that reproduces the paper's Tables 1 (base-to-new, 11 datasets x 3 seeds x 4 backbones)
# and 2 (cross-dataset: ImageNet, all classes -> the other 10 datasets). Edit the paths, then: fvgpt-cache run paper.toml --dry-run
# Relative paths are read from this file's folder.
out = "studies/paper"

[model]
name = "ViT-B-16"
pretrained = "openai"            # or the path of the OpenAI ViT-B-16 weights file

[data]
root = "/data"                   # CoOp's layouts: /data/oxford_pets, /data/imagenet, ...
# masks = "/data/masks"          # default: each dataset folder's mask/ (the FVG-PT release's layout)

[[dataset]]
name = "all"                     # the eleven

[study]
seeds = [1, 2, 3]
shots = 16
backbones = ["coop", "kgcoop", "promptsrc", "mmrl"]
train = ["table1", "table2"]     # add ablations by name: components, losses, ... or "paper" for all of them
rrc_scale = "preset"             # each backbone's release config: 0.08-1, MMRL 0.5-1 (MMRL gets caches of its own)
device = "auto"

[checkpoints]                    # the official base-to-new checkpoints, ROOT/<dataset>/seed<S>/...
promptsrc = "/ckpt/promptsrc"
mmrl = "/ckpt/mmrl"
promptsrc_cross = "/ckpt/promptsrc_cross"   # cross-dataset (all ImageNet classes), ROOT/seed<S>/...
mmrl_cross = "/ckpt/mmrl_cross"

[extract]
train_views = 11                 # view 0 + one augmented view per epoch
batch_size = 64
workers = 8
bad_image = "error"
missing_mask = "error"

[report]
compare = "paper"                # the paper's Table 1 rows beside yours
'''


def paper_plan() -> str:
    """The text of `fvgpt-cache plan --paper` (it loads as it is, see tests)."""
    return PAPER_PLAN
