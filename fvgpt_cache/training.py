"""Training FVG-PT heads from a cache (docs/training.md): configuration, data preparation, schedule, the loop.

The defaults are the release's CoOp setting (`presets.py` has the other backbones'): 10 epochs,
batch 4, SGD (momentum 0.9, weight decay 5e-4), lr 0.0035, cosine schedule after one constant
warm-up epoch at 1e-5 (Dassl's ConstantWarmupScheduler), τ_d = 2, λ_d = 10, λ_frg = λ_pc = 1.
Each epoch trains on one augmented stored view per image (`view_schedule`), as the release
draws a new random resized crop every epoch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from .feature_checks import image_warnings, text_warnings
from .heads import BRG_INDICATORS, FRG_INDICATORS, R_SOURCES, R_WITHOUT_FRG, FVGPTHead
from .methods import backbone_methods, find_backbone_method
from .presets import choose_preset, method_of
from .store import EXTRACTED_FG, NO_MASK, Cache, CacheError, image_key

CLASS_SETS = ("base", "all")
OPTIMIZERS = ("sgd", "adamw")
SELECTIONS = ("last", "val")  # the epoch a run reports: the last, or the best on the validation split
ZERO_SHOT = "clip"


@dataclass
class TrainConfig:
    """Every option of one FVG-PT training run; names match the CLI and grid parameters."""

    backbone: str | None = None
    classes: str = "base"
    seed: int = 1
    epochs: int = 10
    batch_size: int = 4
    lr: float = 0.0035
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    drop_last: bool = True
    lambda_d: float = 10.0
    lambda_frg: float = 1.0
    lambda_pc: float = 1.0
    tau: float = 2.0
    data_fraction: float = 1.0
    # modules and their shapes (Tables 3, 4, 5, 6, 13)
    use_frg: bool = True
    use_fdc: bool = True
    use_pc: bool = True
    fdc_visual: bool = True
    fdc_textual: bool = True
    fdc_hidden: int = 64
    gate_hidden: int = 32
    fdc_layers: int = 2
    frg_layers: int = 2
    brg_layers: int = 2
    frg_indicators: tuple[str, ...] = FRG_INDICATORS
    brg_indicators: tuple[str, ...] = BRG_INDICATORS
    # losses (Table 12)
    loss_frg: bool = True
    loss_dist: bool = True
    loss_ce_fdc: bool = True
    loss_ce_pc: bool = True
    loss_kl_pc: bool = True
    # the release's constants (train.py): FDC init, FRG margin, area gate
    fdc_init_scale: float = 1e-3
    frg_margin: float = 0.0
    area_min: float = 0.02
    area_max: float = 0.98
    # where r comes from (frg; controls: full, fg), decisions D1, D2 and what r is without FRG
    r_source: str = "frg"
    use_scale: bool = True
    detach_r: bool = True
    r_without_frg: str = "one"
    # which epoch's head a run reports: the last (the protocol) or the best on the validation split
    select: str = "last"
    # the mask source of the foreground views: the cache's own ("extracted") or one added with add-masks
    fg_source: str = EXTRACTED_FG
    device: str = "auto"

    def validate(self) -> "TrainConfig":
        def need(ok: bool, name: str, fix: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {fix}")

        need(self.classes in CLASS_SETS, "classes", f"choose one of {CLASS_SETS}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"choose one of {OPTIMIZERS}")
        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "use a positive integer")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "use a positive integer")
        need(self.lr > 0, "lr", "use a positive learning rate")
        need(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", "use 0 ≤ warmup_epochs < epochs")
        need(0 < self.data_fraction <= 1, "data_fraction", "use a fraction in (0, 1]")
        need(self.tau > 0, "tau", "use a positive temperature")
        for name in ("lambda_d", "lambda_frg", "lambda_pc", "fdc_init_scale", "frg_margin"):
            need(getattr(self, name) >= 0, name, "use a non-negative value")
        need(0 <= self.area_min <= self.area_max <= 1, "area_min",
             f"use 0 ≤ area_min ≤ area_max ≤ 1 (area_max={self.area_max}; release: 0.02, 0.98; 0 and 1 turn the gate off)")
        need(self.r_source in R_SOURCES, "r_source", f"choose one of {R_SOURCES}")
        need(self.device in ("auto", "cpu", "cuda"), "device", "choose auto, cpu or cuda")
        for name in ("fdc_layers", "frg_layers", "brg_layers"):
            need(getattr(self, name) in (1, 2, 3), name, "choose 1, 2 or 3 (Table 5)")
        for name in ("fdc_hidden", "gate_hidden"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "use a positive width")
        need(self.r_without_frg in R_WITHOUT_FRG, "r_without_frg", f"choose one of {R_WITHOUT_FRG}")
        need(self.select in SELECTIONS, "select", f"choose one of {SELECTIONS} (no option selects on the test split)")
        need(isinstance(self.fg_source, str) and bool(self.fg_source), "fg_source",
             f"name a mask source of the cache ({EXTRACTED_FG!r}: the foreground views extract wrote)")
        self.frg_indicators = tuple(self.frg_indicators)
        self.brg_indicators = tuple(self.brg_indicators)
        for name, known in (("frg_indicators", FRG_INDICATORS), ("brg_indicators", BRG_INDICATORS)):
            value = getattr(self, name)
            need(bool(value) and set(value) <= set(known) and len(set(value)) == len(value), name,
                 f"use a non-empty subset of {known}, each once")
        return self

    def head_kwargs(self) -> dict:
        keys = ("fdc_hidden", "gate_hidden", "fdc_layers", "frg_layers", "brg_layers", "frg_indicators",
                "brg_indicators", "use_frg", "use_fdc", "use_pc", "fdc_visual", "fdc_textual", "tau",
                "use_scale", "detach_r", "r_without_frg", "fdc_init_scale", "r_source", "frg_margin",
                "area_min", "area_max")
        return {k: getattr(self, k) for k in keys}

    def loss_flags(self) -> dict:
        """Keyword arguments of `FVGPTHead.losses_from` besides λ_d: the other weights and the term switches."""
        return {k: getattr(self, k) for k in ("lambda_frg", "lambda_pc", "loss_frg", "loss_dist", "loss_ce_fdc",
                                              "loss_ce_pc", "loss_kl_pc")}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["frg_indicators"], d["brg_indicators"] = list(self.frg_indicators), list(self.brg_indicators)
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


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
    """(N, V, D) float32 image vectors v whose backbone logits are `s · v · n(g)ᵀ` (`heads.backbone_logits`).

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
    unknown = set(overrides) - set(TrainConfig.field_names())
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)}; valid parameters: {', '.join(TrainConfig.field_names())}")
    backbone = pick_backbone(cache, overrides.get("backbone"))
    method = method_of(backbone, cache.text_provenance(backbone) if backbone in cache.text_groups else {})
    preset = choose_preset(method, cache.provenance.get("dataset"), overrides.get("classes", "base"), preset_of)
    settings = dict(preset.settings) if preset else {}
    preset_only = {**TrainConfig().to_dict(), **settings}
    cfg = TrainConfig(**{**preset_only, **overrides, "backbone": backbone}).validate()
    final = cfg.to_dict()
    run_keys = ("backbone", "seed", "device", "classes")
    info = {"method": method, "preset_of": preset_of, "preset": preset.to_dict() if preset else None,
            "overridden": sorted(k for k in overrides if k not in run_keys and final[k] != preset_only[k]),
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
    """Convert one `key=value` string to the type of TrainConfig's field `name` (CLI --set, grids)."""
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    if name not in kinds:
        raise ValueError(f"unknown parameter {name!r}; valid parameters: {', '.join(sorted(kinds))}")
    kind = str(kinds[name])
    text = text.strip()
    try:
        if kind == "bool":
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "on", "yes")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind.startswith("tuple"):
            return tuple(x for x in text.replace("+", " ").replace(";", " ").split() if x)
        if kind == "str | None":
            return None if text.lower() in ("", "none", "auto") else text
        return text
    except ValueError:
        raise ValueError(f"parameter {name}={text!r} is not a valid {kind}") from None


def config_with(base: TrainConfig, **overrides) -> TrainConfig:
    """`base` with some fields replaced, validated."""
    unknown = set(overrides) - set(TrainConfig.field_names())
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)}; valid parameters: {', '.join(TrainConfig.field_names())}")
    return TrainConfig(**{**base.to_dict(), **overrides}).validate()


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
