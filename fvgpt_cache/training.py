"""Training FVG-PT heads from a cache (docs/training.md): configuration, data preparation, schedule, the loop.

The defaults are the release's CoOp setting (`presets.py` has the other backbones'): 10 epochs,
batch 4, SGD (momentum 0.9, weight decay 5e-4), lr 0.0035, cosine schedule after one constant
warm-up epoch at 1e-5 (Dassl's ConstantWarmupScheduler), τ_d = 2, λ_d = 10, λ_frg = λ_pc = 1.
Each epoch trains on one augmented stored view per image (`view_schedule`), as the release
draws a new random resized crop every epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .feature_checks import image_warnings, text_warnings
from .heads import FVGPTHead, LAYER_CHOICES, R_SOURCES, R_WITHOUT_FRG
from .indicators import BRG_INDICATORS, FRG_INDICATORS, indicator_names, registered_fingerprints
from .loss_terms import check_loss_weights, loss_terms
from .parameters import (Rule, all_parameters, check_rules, declare_dataclass, lookup, param, plugin_parameters,
                         unknown_parameter)
from .methods import backbone_methods, find_backbone_method
from .presets import choose_preset, method_of
from .store import EXTRACTED_FG, NO_MASK, Cache, CacheError, image_key

CLASS_SETS = ("base", "all")
OPTIMIZERS = ("sgd", "adamw")
SELECTIONS = ("last", "val")  # the epoch a run reports: the last, or the best on the validation split
ZERO_SHOT = "clip"
DEVICES = ("auto", "cpu", "cuda")
AREA_GATE_FIX = "release: 0.02, 0.98; 0 and 1 turn the gate off"


def _indicator_choices(kind: str):
    return lambda: indicator_names(kind)


@dataclass
class TrainConfig:
    """Every option of one FVG-PT training run; names match the CLI and grid parameters.

    Each field is declared once, with `param` (default, help, range or choices; the kind comes from
    the annotation): validation (`validate`), the text form of --set/--param/grid files
    (`parse_value`), the CLI's `fvgpt-cache params` and docs/parameters.md all read `PARAMETERS`.
    Relations between fields are the named `RULES` below the class. Plug-in parameters
    (`parameters.register_parameter`) live in `extra`.
    """

    backbone: str | None = param(None, "Text-feature group of the cache the heads build on (clip = zero-shot "
                                       "CLIP); none: the cache's only tuned backbone.")
    classes: str = param("base", "Class set trained on: base (the base-to-new protocol) or all (the "
                                 "cross-dataset source).", choices=CLASS_SETS)
    seed: int = param(1, "Seeds the head's initialisation, the batch order, the view choice and the data "
                         "subset.", low=0)
    epochs: int = param(10, "Training epochs.", low=1)
    batch_size: int = param(4, "Images per batch.", low=1)
    lr: float = param(0.0035, "Learning rate after the warm-up (cosine schedule).", low=0, low_open=True)
    optimizer: str = param("sgd", "Optimiser of the heads.", choices=OPTIMIZERS)
    momentum: float = param(0.9, "SGD momentum (AdamW ignores it).", low=0)
    weight_decay: float = param(5e-4, "Weight decay.", low=0)
    warmup_epochs: int = param(1, "Epochs at the constant warm-up learning rate before the cosine schedule.", low=0)
    warmup_lr: float = param(1e-5, "Learning rate of the warm-up epochs.", low=0)
    drop_last: bool = param(True, "Drop the last incomplete batch of an epoch (Dassl).")
    lambda_d: float = param(10.0, "Weight λ_d of the distillation loss L_dist.", low=0)
    lambda_frg: float = param(1.0, "Weight λ_frg of the FRG loss.", low=0)
    lambda_pc: float = param(1.0, "Weight λ_pc of the PC loss (the release's --lambda_new).", low=0)
    tau: float = param(2.0, "Temperature τ of the distillation, the indicators and PC's KL.", low=0, low_open=True)
    data_fraction: float = param(1.0, "Fraction of each class's training images used (Fig. 9).", low=0, high=1,
                                 low_open=True)
    # modules and their shapes (Tables 3, 4, 5, 6, 13)
    use_frg: bool = param(True, "Foreground Reliability Gate (FRG).")
    use_fdc: bool = param(True, "Foreground Distillation Compensation (FDC, the base branch).")
    use_pc: bool = param(True, "Prior Calibration with the Backbone Reliability Gate (PC, the new branch).")
    fdc_visual: bool = param(True, "FDC's image adapter (Table 13).")
    fdc_textual: bool = param(True, "FDC's text adapter (Table 13).")
    fdc_hidden: int = param(64, "Hidden width of the FDC adapters (Table 4).", low=1)
    gate_hidden: int = param(32, "Hidden width of the FRG and BRG gates (Table 4).", low=1)
    fdc_layers: int = param(2, "Linear layers of each FDC adapter.", choices=LAYER_CHOICES, fix="Table 5")
    frg_layers: int = param(2, "Linear layers of the FRG gate.", choices=LAYER_CHOICES, fix="Table 5")
    brg_layers: int = param(2, "Linear layers of the BRG gate.", choices=LAYER_CHOICES, fix="Table 5")
    frg_indicators: tuple[str, ...] = param(FRG_INDICATORS, "Indicators the FRG reads (Table 6).",
                                            choices=_indicator_choices("frg"))
    brg_indicators: tuple[str, ...] = param(BRG_INDICATORS, "Indicators the BRG reads (Table 6).",
                                            choices=_indicator_choices("brg"))
    # losses (Table 12)
    loss_frg: bool = param(True, "The FRG loss term (Table 12).")
    loss_dist: bool = param(True, "The distillation loss term L_dist (Table 12).")
    loss_ce_fdc: bool = param(True, "The cross-entropy of the FDC logits (Table 12).")
    loss_ce_pc: bool = param(True, "The cross-entropy of the PC logits (Table 12).")
    loss_kl_pc: bool = param(True, "PC's KL to zero-shot CLIP (Table 12).")
    # the release's constants (train.py): FDC init, FRG margin, area gate
    fdc_init_scale: float = param(1e-3, "Scale of the last adapter layer's initial weight (0: exact zero init).",
                                  low=0)
    frg_margin: float = param(0.0, "Margin δ of the FRG target r* = 1[CE(fg) + δ < CE(full)].", low=0)
    area_min: float = param(0.02, "Smallest foreground area of a usable foreground view (the area gate).",
                            low=0, high=1, fix=AREA_GATE_FIX)
    area_max: float = param(0.98, "Largest foreground area of a usable foreground view (the area gate).",
                            low=0, high=1, fix=AREA_GATE_FIX)
    # where r comes from (frg; controls: full, fg), decisions D1, D2 and what r is without FRG
    r_source: str = param("frg", "Where the distillation weight r comes from: the gate (frg), or the controls "
                                 "full (r = 0) and fg (r = 1).", choices=R_SOURCES)
    use_scale: bool = param(True, "z_FDC carries the logit scale (decision D1).")
    detach_r: bool = param(True, "No gradient of L_dist reaches r (decision D2).")
    r_without_frg: str = param("one", "r when FRG is off and r_source=frg: one, the target r*, or half.",
                               choices=R_WITHOUT_FRG)
    # which epoch's head a run reports: the last (the protocol) or the best on the validation split
    select: str = param("last", "The epoch a run reports: the last (the protocol) or the best on the validation "
                                "split.", choices=SELECTIONS, fix="no option selects on the test split")
    # the mask source of the foreground views: the cache's own ("extracted") or one added with add-masks
    fg_source: str = param(EXTRACTED_FG, "Mask source of the foreground views: extracted (the views extract "
                                         "wrote) or one added with add-masks.")
    device: str = param("auto", "Device of the training.", choices=DEVICES)
    # values of plug-in parameters (`parameters.register_parameter`), by name
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Check (and normalise) every declared value, the plug-in values and the `RULES`."""
        for name, p in PARAMETERS.items():
            setattr(self, name, p.check(getattr(self, name)))
        plugins = plugin_parameters()
        for name in self.extra:
            if name not in plugins:
                raise unknown_parameter(name)
        checked = {name: plugins[name].check(value) for name, value in self.extra.items()}
        self.extra = {name: v for name, v in checked.items() if v != plugins[name].default}  # unset = default
        check_rules(RULES, self.get)
        check_loss_weights(self.loss_weights(), self.use_fdc, self.use_frg, self.use_pc)
        return self

    def get(self, name: str):
        """A field's value, or a plug-in parameter's (its default when unset)."""
        if name in PARAMETERS:
            return getattr(self, name)
        p = lookup(name)
        return self.extra.get(name, p.default)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A configuration from parameter names and values (fields, and plug-in names into `extra`); not validated."""
        values = dict(values)
        extra = dict(values.pop("extra", None) or {})
        plugins = plugin_parameters()
        unknown = [k for k in values if k not in PARAMETERS and k not in plugins]
        if unknown:
            raise unknown_parameter(unknown[0])
        extra.update({k: v for k, v in values.items() if k in plugins})
        return cls(**{k: v for k, v in values.items() if k in PARAMETERS}, extra=extra)

    def head_kwargs(self) -> dict:
        keys = ("fdc_hidden", "gate_hidden", "fdc_layers", "frg_layers", "brg_layers", "frg_indicators",
                "brg_indicators", "use_frg", "use_fdc", "use_pc", "fdc_visual", "fdc_textual", "tau",
                "use_scale", "detach_r", "r_without_frg", "fdc_init_scale", "r_source", "frg_margin",
                "area_min", "area_max")
        return {k: getattr(self, k) for k in keys}

    def loss_flags(self) -> dict:
        """Keyword arguments of `FVGPTHead.losses_from` besides λ_d: the other weights, the term switches and the
        weights of the registered loss terms this configuration uses."""
        return {**{k: getattr(self, k) for k in ("lambda_frg", "lambda_pc", "loss_frg", "loss_dist", "loss_ce_fdc",
                                                 "loss_ce_pc", "loss_kl_pc")}, "loss_weights": self.loss_weights()}

    def loss_weights(self) -> dict[str, float]:
        """The registered loss terms this configuration weights (λ ≠ 0), by term name."""
        return {name: self.get(term.weight) for name, term in loss_terms().items() if self.get(term.weight)}

    def plugin_fingerprints(self) -> dict[str, str]:
        """The code fingerprints of the registered indicators and loss terms this configuration uses (empty for
        the paper's own): `runs.run_id` hashes them, so a run of edited plug-in code is a new run."""
        terms = loss_terms()
        return {**registered_fingerprints(self.frg_indicators, self.brg_indicators),
                **{f"loss:{name}": terms[name].fingerprint for name in self.loss_weights()}}

    def to_dict(self) -> dict:
        """Every field (names as lists), then each plug-in value that differs from its default; run ids hash this."""
        d = {name: p.to_json(getattr(self, name)) for name, p in PARAMETERS.items()}
        plugins = plugin_parameters()
        for name in sorted(self.extra):
            p = plugins.get(name)
            if p is None or self.extra[name] != p.default:
                d[name] = p.to_json(self.extra[name]) if p else self.extra[name]
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return list(PARAMETERS)

    @classmethod
    def parameter_names(cls) -> list[str]:
        """The fields' names and the registered plug-in parameters'."""
        return list(all_parameters())


PARAMETERS = declare_dataclass(TrainConfig, undeclared=("extra",))
# relations between fields; `validate` checks them after every field is valid on its own
RULES = (
    Rule("warmup_shorter_than_training", ("warmup_epochs", "epochs"), lambda get: get("warmup_epochs") < get("epochs"),
         "use 0 ≤ warmup_epochs < epochs"),
    Rule("area_range", ("area_min", "area_max"), lambda get: get("area_min") <= get("area_max"),
         f"use area_min ≤ area_max ({AREA_GATE_FIX})"),
)


def lr_at_epoch(epoch: int, cfg: TrainConfig) -> float:
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs), stepped per epoch.

    Epochs before `warmup_epochs` use `warmup_lr`; epoch e after them uses the cosine value at
    t = e − warmup_epochs, so the first real epoch runs at the full lr.
    """
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    t = epoch - cfg.warmup_epochs
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t / cfg.epochs))


def pick_backbone(cache: Cache, backbone: str | None) -> str:
    groups = cache.text_groups
    tuned = [g for g in groups if g != ZERO_SHOT and not g.startswith(ZERO_SHOT + "_")]
    if backbone is None:
        if len(tuned) == 1:
            return tuned[0]
        if not tuned:
            raise CacheError(
                f"{cache.path} has no tuned backbone text features (it has {groups}); pass --backbone clip to "
                "put FVG-PT on zero-shot CLIP, or write a backbone into the cache first"
            )
        raise CacheError(f"{cache.path} has several backbones {tuned}; choose one with --backbone")
    if backbone not in groups:
        raise CacheError(f"{cache.path} has no backbone {backbone!r}; it has {groups}{_how_to_write(cache, backbone)}")
    return backbone


def _how_to_write(cache: Cache, backbone: str) -> str:
    method = find_backbone_method(backbone)
    return f". {method.how_to_write(cache.path)}" if method is not None and method.hint else ""


def backbone_image_encoder(cache: Cache, backbone: str) -> str:
    """Image features a backbone reads: CLIP's for CLIP-family backbones (CoOp, KgCoOp, ...), its own otherwise."""
    if backbone == ZERO_SHOT or backbone.startswith(ZERO_SHOT + "_"):
        return "clip"
    return str(cache.text_provenance(backbone).get("image_encoder", "clip"))


def backbone_images(cache: Cache, backbone: str, split: str, kind: str = "full", branch: str = "base") -> torch.Tensor:
    """(N, V, D) float32 image vectors v whose backbone logits are `s · v · n(g)ᵀ` (`equations.backbone_logits`).

    v = n(f(x)) from the backbone's image group; a group that also stores representation
    features (`<kind>_rep`, MMRL) scores base classes with α·n(f_cls) + (1 − α)·n(f_rep), α from
    the backbone's provenance, and new classes (`branch="new"`) with the class token alone.
    """
    if branch not in ("base", "new"):
        raise ValueError(f"branch={branch!r}: choose base or new")
    encoder = backbone_image_encoder(cache, backbone)
    if encoder != "clip" and not cache.has_image(split, kind, encoder):
        method = cache.text_provenance(backbone).get("method", backbone)
        raise CacheError(f"{cache.path} has the text features of backbone {backbone!r} but not its image features "
                         f"/image/{encoder}/{split}/{kind}; write both with `fvgpt-cache backbone import {cache.path} "
                         f"--method {method} --checkpoint PATH --name {backbone} --force`")
    v = F.normalize(cache.image(split, kind, encoder), dim=-1)
    if branch == "base" and encoder != "clip" and cache.has_image(split, f"{kind}_rep", encoder):
        alpha = float(cache.text_provenance(backbone)["alpha"])
        v = alpha * v + (1 - alpha) * F.normalize(cache.image(split, f"{kind}_rep", encoder), dim=-1)
    return v


@dataclass
class TrainData:
    """Training tensors for one class set, labels re-indexed to positions in `class_ids`."""

    class_ids: np.ndarray
    full: torch.Tensor  # (N, V, D) backbone image features
    fg: torch.Tensor  # (N, V, D)
    clip: torch.Tensor  # (N, V, D) zero-shot CLIP image features
    area: torch.Tensor  # (N, V)
    y: torch.Tensor  # (N,)
    txt_bb: torch.Tensor  # (C, D)
    txt_clip: torch.Tensor  # (C, D)
    scale: float
    meta: dict = field(default_factory=dict)
    # every mask source a group of configurations reads: name → (fg (N, V, D), area (N, V)); fg/area above
    # are the first configuration's source
    sources: dict = field(default_factory=dict)

    def subset(self, images: np.ndarray) -> "TrainData":
        """The same data restricted to some training images (a run's `data_fraction` subset)."""
        if len(images) == len(self.y):
            return self
        idx = torch.as_tensor(images, dtype=torch.long)
        return TrainData(self.class_ids, self.full[idx], self.fg[idx], self.clip[idx], self.area[idx], self.y[idx],
                         self.txt_bb, self.txt_clip, self.scale, {**self.meta, "train_images": int(len(idx))},
                         {k: (fg[idx], a[idx]) for k, (fg, a) in self.sources.items()})

    def source(self, name: str) -> "TrainData":
        """The same data with the foreground views of mask source `name` (one this data was prepared with)."""
        if name == self.meta.get("fg_source", EXTRACTED_FG):
            return self
        fg, area = self.sources[name]
        return TrainData(self.class_ids, self.full, fg, self.clip, area, self.y, self.txt_bb, self.txt_clip,
                         self.scale, {**self.meta, "fg_source": name}, self.sources)


def class_set(cache: Cache, classes: str) -> np.ndarray:
    return cache.base if classes == "base" else np.arange(len(cache.classnames))


def subsample_per_class(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices keeping ceil(fraction · n_c) images of each class, drawn with `seed` (Fig. 9)."""
    if fraction >= 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.permutation(idx)[: math.ceil(fraction * len(idx))])
    return np.sort(np.array(keep, dtype=np.int64))


def foreground_views(cache: Cache, backbone: str, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fg (N, V, D), area (N, V)) of the training split from one mask source, as the backbone reads them."""
    if source == EXTRACTED_FG:
        return backbone_images(cache, backbone, "train", "fg"), cache.areas("train")
    if source == NO_MASK:  # all-ones masks: the foreground view is the full view
        full = backbone_images(cache, backbone, "train", "full")
        return full, torch.ones(full.shape[:2])
    encoder = backbone_image_encoder(cache, backbone)
    if encoder != "clip":
        raise CacheError(f"fg_source={source!r}: added mask sources hold CLIP's foreground features, but backbone "
                         f"{backbone!r} reads its own image encoder {encoder!r}; use fg_source={EXTRACTED_FG!r} or a "
                         f"CLIP-family backbone ({', '.join(m.name for m in backbone_methods() if m.image_encoder == 'clip')})")
    fg, area = cache.foreground("train", source)
    return F.normalize(fg, dim=-1), area


def prepare(cache: Cache, cfg: TrainConfig, fg_sources=()) -> TrainData:
    """The training tensors of `cfg`; `fg_sources` names further mask sources to load (a group's)."""
    backbone = pick_backbone(cache, cfg.backbone)
    encoder = backbone_image_encoder(cache, backbone)
    class_ids = class_set(cache, cfg.classes)
    labels = cache.labels("train").numpy()
    position = np.full(len(cache.classnames), -1)
    position[class_ids] = np.arange(len(class_ids))
    rows = np.flatnonzero(position[labels] >= 0)
    if rows.size == 0:
        raise CacheError(f"{cache.path} has no training images of the {cfg.classes} classes")
    full = backbone_images(cache, backbone, "train", "full")[rows]
    sources = {}
    for name in dict.fromkeys([cfg.fg_source, *fg_sources]):
        fg, area = foreground_views(cache, backbone, name)
        sources[name] = (fg[rows], area[rows])
    txt_bb, txt_clip = cache.text(backbone)[class_ids], cache.text(ZERO_SHOT)[class_ids]
    names = [cache.classnames[c] for c in class_ids]
    warnings = view_warnings(int(full.shape[1])) + text_warnings(txt_clip.numpy(), names, ZERO_SHOT) + \
        (text_warnings(txt_bb.numpy(), names, backbone) if backbone != ZERO_SHOT else []) + \
        image_warnings(full.numpy(), image_key(encoder, "train", "full"))
    return TrainData(
        class_ids=class_ids,
        full=full,
        fg=sources[cfg.fg_source][0],
        clip=full if encoder == "clip" else cache.image("train", "full", "clip")[rows],
        area=sources[cfg.fg_source][1],
        y=torch.from_numpy(position[labels[rows]]),
        txt_bb=txt_bb,
        txt_clip=txt_clip,
        scale=cache.logit_scale,
        meta={"backbone": backbone, "image_encoder": encoder, "train_images": int(rows.size),
              "views": int(full.shape[1]), "warnings": warnings, "fg_source": cfg.fg_source},
        sources=sources,
    )


def view_warnings(views: int) -> list[str]:
    if views > 1:
        return []
    return ["the cache holds no augmented training views (extracted with --train-views 1): every epoch trains on "
            "view 0, unlike the release, which draws a new random resized crop each epoch; re-extract with the "
            "default --train-views 11"]


def configure(cache: Cache, overrides: dict, preset_of: str = "auto") -> tuple[TrainConfig, dict]:
    """The run's TrainConfig: defaults < the backbone's preset < `overrides` (what the user set).

    Returns the config and a record of the preset: its name, source file and settings, which of
    them the user overrode, and warnings (a cache whose augmentation differs from the preset's).
    """
    for name in overrides:
        lookup(name)  # an unknown name is refused before the cache is read
    backbone = pick_backbone(cache, overrides.get("backbone"))
    method = method_of(backbone, cache.text_provenance(backbone) if backbone in cache.text_groups else {})
    preset = choose_preset(method, cache.provenance.get("dataset"), overrides.get("classes", TrainConfig.classes),
                           preset_of)
    settings = dict(preset.settings) if preset else {}
    preset_only = {**TrainConfig().to_dict(), **settings}
    cfg = TrainConfig.from_dict({**preset_only, **overrides, "backbone": backbone}).validate()
    final = cfg.to_dict()  # a plug-in value equal to its default is in neither dictionary
    run_keys = ("backbone", "seed", "device", "classes")
    info = {"method": method, "preset_of": preset_of, "preset": preset.to_dict() if preset else None,
            "overridden": sorted(k for k in overrides if k not in run_keys and final.get(k) != preset_only.get(k)),
            "warnings": []}
    if preset is None and preset_of == "auto":
        info["warnings"].append(f"no preset for the backbone method {method!r}: the plain defaults (CoOp's) are used")
    scale = (cache.provenance.get("augmentation") or {}).get("random_resized_crop_scale")
    if preset is not None and scale is not None and tuple(scale) != tuple(preset.rrc_scale):
        info["warnings"].append(
            f"the cache's training views were cropped with scale {tuple(scale)}, the {preset.name} preset's release "
            f"config uses {tuple(preset.rrc_scale)}; re-extract with --rrc-scale {preset.rrc_scale[0]},{preset.rrc_scale[1]} "
            "to match it")
    return cfg, info


def build_head(dim: int, cfg: TrainConfig) -> FVGPTHead:
    """The head of `cfg` (validated here: `FVGPTHead` trusts its arguments), initialised from `cfg.seed`."""
    cfg.validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return FVGPTHead(dim, **cfg.head_kwargs())


def view_schedule(n: int, views: int, epochs: int, seed: int) -> torch.Tensor:
    """(epochs, n) stored view of each image in each epoch: an augmented view (1…V−1), walking a
    seeded per-image permutation so that no view repeats before all were used; view 0 when the
    cache holds no augmented views. Independent of batch size and shuffling."""
    if views <= 1:
        return torch.zeros(epochs, n, dtype=torch.long)
    aug = views - 1
    out = torch.empty(epochs, n, dtype=torch.long)
    for cycle in range(math.ceil(epochs / aug)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + cycle)
        perm = torch.rand(n, aug, generator=gen).argsort(dim=1) + 1  # (n, aug), a permutation per image
        first = cycle * aug
        take = min(aug, epochs - first)
        out[first:first + take] = perm[:, :take].T
    return out


def epoch_batches(n: int, cfg: TrainConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch: a shuffled order cut into batches of `batch_size` (the last incomplete one dropped as Dassl does)."""
    order = torch.randperm(n, generator=gen)
    stop = n - n % cfg.batch_size if cfg.drop_last and n >= cfg.batch_size else n
    return [order[i:i + cfg.batch_size] for i in range(0, stop, cfg.batch_size)]


def parse_value(name: str, text: str):
    """The value of one `key=value` string of a TrainConfig field or plug-in parameter (CLI --set, grids), checked."""
    return lookup(name).parse(text)


def config_with(base: TrainConfig, **overrides) -> TrainConfig:
    """`base` with some parameters (fields or plug-ins) replaced, validated."""
    return TrainConfig.from_dict({**base.to_dict(), **overrides}).validate()


COLLAPSE_DROP = 5.0  # points of FDC training accuracy lost between the start and the end of training
COLLAPSE_CE_RISE = 0.10  # relative rise of its cross-entropy on the same views


def stability(fit: dict | None, backbone_acc: float | None = None, drop: float = COLLAPSE_DROP) -> dict:
    """Did the FDC branch collapse? `fit` holds its accuracy (%) and cross-entropy on the training views
    at the start of training ("start": the initial head, ≈ the backbone thanks to the near-identity
    init) and at the end ("end"), on the same views. A collapsed run ends more than `drop` points
    below the better of its start and the backbone's own accuracy on those views, or with a CE more
    than 10 % above its start."""
    out = {"collapsed": False, "checked": False, "drop_threshold": drop}
    if not fit:
        return out
    start, end = fit["start"], fit["end"]
    reference = max(start["acc"], backbone_acc if backbone_acc is not None else -math.inf)
    out.update(checked=True, acc_fdc_start=start["acc"], acc_fdc_end=end["acc"], acc_backbone=backbone_acc,
               ce_fdc_start=start["ce"], ce_fdc_end=end["ce"])
    worse_acc = end["acc"] < reference - drop
    worse_ce = end["ce"] > start["ce"] * (1 + COLLAPSE_CE_RISE)
    out["collapsed"] = bool(worse_acc or worse_ce)
    out["reason"] = ", ".join(r for r, on in (("accuracy fell", worse_acc), ("cross-entropy rose", worse_ce)) if on) or None
    return out
