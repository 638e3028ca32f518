"""A study's plan file: reading and checking it (`load_plan`), and the paper's plan (`paper_plan`)."""
from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..ablations import ABLATIONS
from ..datasets import DATASETS, dataset_info
from ..methods import COOP, PAPER_METHODS, backbone_method, backbone_method_names, backbone_methods

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def study_backbones() -> tuple[str, ...]:
    """The registered backbone methods a study can write into its caches (not zero-shot): trained here from
    the cache, or imported from official checkpoints with one more pass over the images."""
    return tuple(m.name for m in backbone_methods() if m.written != "zero-shot")


TRAIN_ITEMS = ("table1", "table2", "paper", *ABLATIONS)


CROSS_SOURCE = "imagenet"  # Table 2: trained on every ImageNet class, evaluated on the other datasets


# `[data] masks` naming a method: each cache's extract job first writes its draw's masks with it
# (`fvgpt-cache masks`); CLIPSeg needs its weights, so a plan takes its masks as a folder.
PLAN_MASK_METHODS = ("gradcam",)


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
              "backbones": (list, "subset of the study's backbones"), "train": (list, "table1, table2, ablation presets"),
              "rrc_scale": ((str, list), "'preset' or [min, max]"), "device": (str, "auto|cpu|cuda")},
    "checkpoints": {},  # one root per backbone method and its <method>_cross, from the registry: `_known_keys`
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
    mask_method: str | None = None  # masks written by the plan's extract jobs (PLAN_MASK_METHODS)
    datasets: list[DatasetEntry] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    shots: int = 16
    backbones: list[str] = field(default_factory=lambda: [COOP.name])
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
        preset = backbone_method(backbone).preset_for(None)
        return tuple(preset.rrc_scale) if preset is not None else DEFAULT_RRC


TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}


def _where(path: Path, table: str) -> str:
    return f"{path} [{table}]" if table else str(path)


def _known_keys(table: str) -> dict[str, tuple[type | tuple, str]]:
    """A table's keys; those naming backbone methods follow the registry at call time."""
    if table == "study":
        return {**KEYS["study"], "backbones": (list, f"subset of {study_backbones()}")}
    if table == "checkpoints":
        return {**{m: (str, "checkpoint root") for m in study_backbones()},
                **{f"{m}_cross": (str, "cross-dataset checkpoints (ImageNet, all classes)") for m in study_backbones()}}
    return KEYS[table]


def _check_keys(path: Path, table: str, raw: dict) -> None:
    known = _known_keys(table)
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
    if masks in PLAN_MASK_METHODS:
        plan.mask_method = masks
    elif masks is not None:
        if "/" not in masks and not _resolve(here, masks).exists():
            raise PlanError(f"{path} [data]: masks = {masks!r} is neither a folder nor a method the plan can run "
                            f"({', '.join(PLAN_MASK_METHODS)}; CLIPSeg needs its weights: write the folder with "
                            "`fvgpt-cache masks --method clipseg` and name it here), or leave `masks` out to use each "
                            "dataset folder's mask/ of the FVG-PT release")
        plan.masks = _resolve(here, masks)
    plan.datasets = _datasets(path, raw.get("dataset", []), plan.data_root or here)
    if any(d.named for d in plan.datasets) and plan.data_root is None:
        raise PlanError(f"{path} [data]: no root; the named datasets ({', '.join(d.name for d in plan.datasets if d.named)}) "
                        "are read from `root = \"FOLDER\"`, the folder holding their folders")
    _study(path, raw.get("study", {}), plan)
    ckpts = raw.get("checkpoints", {})
    for method in backbone_method_names("imported"):
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
        for method in backbone_method_names("imported"):  # CoOp/KgCoOp are trained on all ImageNet classes unless <method>_cross is given
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
            from ..data import check_dataset_name

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
    choices = study_backbones()
    bad = [b for b in backbones if b not in choices]
    if bad or not backbones or len(set(backbones)) != len(backbones):
        raise PlanError(f"{where}: backbones = {backbones!r}; choose distinct names from {', '.join(choices)}")
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
    from ..extraction import ExtractOptions

    options = {"train_views": 11, "batch_size": 64, "workers": 2, "missing_mask": "error", "bad_image": "error",
               "mask_size_mismatch": "resize", "fg_mode": "normalized", "dtype": "float16", **raw}
    try:
        ExtractOptions(**{("store_dtype" if k == "dtype" else k): v for k, v in options.items()}).validate()
    except ValueError as exc:
        raise PlanError(f"{path} [extract]: {exc}") from None
    return options


def _train_settings(path: Path, raw: dict) -> dict:
    from ..parameters import lookup
    from ..training import TrainConfig

    fixed = {"backbone", "seed", "classes", "device"}
    out = {}
    for key, value in raw.items():
        if key in fixed:
            raise PlanError(f"{path} [train]: {key} is set by the plan ([study] backbones, seeds, device); remove it")
        if key not in TrainConfig.parameter_names():
            close = difflib.get_close_matches(key, TrainConfig.parameter_names(), n=1)
            raise PlanError(f"{path} [train]: unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                            + "; [train] takes training parameters (see `fvgpt-cache params`)")
        try:
            out[key] = lookup(key).coerce(value)
        except ValueError as exc:
            raise PlanError(f"{path} [train]: {exc}") from None
    return out


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
backbones = BACKBONES
train = ["table1", "table2"]     # add ablations by name: components, losses, ... or "paper" for all of them
rrc_scale = "preset"             # each backbone's release config: 0.08-1, MMRL 0.5-1 (MMRL gets caches of its own)
device = "auto"

[checkpoints]                    # the official base-to-new checkpoints, ROOT/<dataset>/seed<S>/...
CHECKPOINTS

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
    imported = [m for m in PAPER_METHODS if backbone_method(m).written == "imported"]
    roots = [f'{m} = "/ckpt/{m}"' for m in imported]
    cross = [f'{m}_cross = "/ckpt/{m}_cross"' for m in imported]
    if cross:
        cross[0] += "   # cross-dataset (all ImageNet classes), ROOT/seed<S>/..."
    return (PAPER_PLAN.replace("backbones = BACKBONES", f"backbones = {json.dumps(list(PAPER_METHODS))}")
            .replace("CHECKPOINTS\n", "".join(line + "\n" for line in roots + cross)))
