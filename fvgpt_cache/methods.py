"""The backbone methods FVG-PT builds on, one registry entry each (docs/backbones.md#adding-a-backbone-method).

A backbone method is everything the toolkit knows about one way of tuning CLIP: its name (what a
cache's backbone provenance says in `method`), the column the paper reports it under, which image
features it reads (CLIP's, or its own written next to its text features), how it gets into a cache
(trained here from the cached features, imported from an official checkpoint, or zero-shot), its
FVG-PT training presets and the rule that picks one by dataset and protocol, its importer, the hint
printed when a cache lacks it, and what its official checkpoints look like.

Modelled on timm's `register_model`: `register_backbone_method` adds an entry (and returns it),
`backbone_method(name)` looks one up, `backbone_methods()` lists them in registration order. Every
other module asks the registry instead of spelling method names, so a method registered from a
notebook or a test is accepted by presets, reports, the study plan and the CLI without an edit
elsewhere. This module imports no torch code: an importer is a dotted path resolved on use.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

RELEASE = "JREion/FVG-PT configs/trainers/"
IMAGE_ENCODERS = ("clip", "own")  # CLIP's image features, or the method's own (written with its text features)
WRITTEN = ("trained", "imported", "zero-shot")  # how a method's features get into a cache
CLASS_PROTOCOLS = ("base", "all")  # base-to-new, and all classes (the cross-dataset source)

# How to write a method into a cache, for the built-ins ({cache}: the cache's path, {method}: the name)
TRAIN_HINT = ("Train it with `fvgpt-cache backbone train {cache} --method {method}` or import a checkpoint "
              "with `fvgpt-cache backbone load {cache} --method {method} --checkpoint PATH`")
IMPORT_HINT = ("Import the official {method} checkpoint with `fvgpt-cache backbone import {cache} --method "
               "{method} --checkpoint PATH`")


@dataclass(frozen=True)
class Preset:
    """`TrainConfig` overrides from one release config file (docs/training.md#presets).

    `datasets` and `classes` say where the preset applies (empty / None: everywhere); among the
    presets of a method that apply, the most specific one is chosen (`BackboneMethod.preset_for`).
    They are selection rules, not settings, so `to_dict` (what a run records) leaves them out.
    """

    name: str
    source: str
    settings: dict = field(default_factory=dict)
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    datasets: tuple[str, ...] = ()
    classes: str | None = None

    def __post_init__(self):
        datasets = (self.datasets,) if isinstance(self.datasets, str) else self.datasets
        object.__setattr__(self, "datasets", tuple(str(d).lower() for d in datasets))
        if self.classes is not None and self.classes not in CLASS_PROTOCOLS:
            raise ValueError(f"preset {self.name!r}: classes={self.classes!r}; choose one of {CLASS_PROTOCOLS} "
                             "or None (every protocol)")

    def applies(self, dataset: str | None, classes: str) -> bool:
        return ((not self.datasets or (dataset or "").lower() in self.datasets)
                and (self.classes is None or self.classes == classes))

    @property
    def specificity(self) -> int:
        return bool(self.datasets) + (self.classes is not None)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "settings": dict(self.settings),
                "rrc_scale": list(self.rrc_scale)}


@dataclass(frozen=True)
class BackboneMethod:
    """One backbone method (module docstring). Only `name` and `label` are required.

    name: what a backbone group's provenance records as `method`, and the default group name.
    label: the paper's column for it (the key of its numbers in the paper's tables).
    image_encoder: "clip" (it reads CLIP's cached image features) or "own" (it writes its own).
    written: "trained" here from the cache, "imported" from an official checkpoint, or "zero-shot".
    presets: its FVG-PT training presets; `preset_for` picks one by dataset and protocol.
    importer: "module:attribute" of the class that reads its official checkpoint (`from_state`).
    hint: how to write it into a cache, printed when a cache lacks it ({cache}, {method} filled in).
    official_code: where its official code lives (recorded with imported features).
    checkpoint_folders: the folders Dassl writes its checkpoints to, inside an output folder.
    prefer_best_checkpoint: in a folder, take `model-best.pth.tar` over the latest epoch.
    checkpoint_key: a test on a state-dict key that its checkpoints have; `checkpoint_key_shared`
        when other prompt learners' checkpoints have it too (CoOp's `ctx`), so it is tried last.
    """

    name: str
    label: str
    image_encoder: str = "clip"
    written: str = "trained"
    presets: tuple[Preset, ...] = ()
    importer: str | None = None
    hint: str = ""
    official_code: str = ""
    checkpoint_folders: tuple[str, ...] = ()
    prefer_best_checkpoint: bool = False
    checkpoint_key: Callable[[str], bool] | None = None
    checkpoint_key_shared: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name in ("auto", "none"):
            raise ValueError(f"backbone method name {self.name!r}: use a non-empty name without '/' other than "
                             "auto and none (those are --preset-of choices)")
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"backbone method {self.name!r}: give a label (the paper's column for it, e.g. 'CoOp')")
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"backbone method {self.name!r}: image_encoder={self.image_encoder!r}; choose one of "
                             f"{IMAGE_ENCODERS}")
        if self.written not in WRITTEN:
            raise ValueError(f"backbone method {self.name!r}: written={self.written!r}; choose one of {WRITTEN}")
        object.__setattr__(self, "presets", tuple(self.presets))
        if not all(isinstance(p, Preset) for p in self.presets):
            raise ValueError(f"backbone method {self.name!r}: presets must be a tuple of Preset")
        names = [p.name for p in self.presets]
        if len(set(names)) != len(names):
            raise ValueError(f"backbone method {self.name!r}: preset names {names} repeat")
        if self.importer is not None and ":" not in self.importer:
            raise ValueError(f"backbone method {self.name!r}: importer={self.importer!r}; write it as "
                             "'package.module:attribute'")

    def preset_for(self, dataset: str | None, classes: str = "base") -> Preset | None:
        """The most specific preset that applies to `dataset` and `classes` (ties: the first declared)."""
        candidates = [p for p in self.presets if p.applies(dataset, classes)]
        return max(candidates, key=lambda p: p.specificity) if candidates else None

    def load_importer(self):
        """The importer class (`importer`), imported now; a clear error for a method that has none."""
        if self.importer is None:
            raise ValueError(f"backbone method {self.name!r} ({self.written}) has no importer; methods imported from "
                             f"official checkpoints: {', '.join(backbone_method_names('imported'))}")
        module, _, attr = self.importer.partition(":")
        return getattr(importlib.import_module(module), attr)

    def how_to_write(self, cache) -> str:
        """`hint` filled in for a cache (its path)."""
        return self.hint.format(cache=cache, method=self.name)


_REGISTRY: dict[str, BackboneMethod] = {}


def register_backbone_method(method: BackboneMethod, *, replace: bool = False) -> BackboneMethod:
    """Add `method` to the registry (a duplicate name is refused unless `replace`); returns it."""
    if not isinstance(method, BackboneMethod):
        raise TypeError(f"register a BackboneMethod, not {type(method).__name__}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a backbone method named {method.name!r} is already registered; pass replace=True to "
                         "replace it, or choose another name")
    taken = {p.name: m.name for m in _REGISTRY.values() if m.name != method.name for p in m.presets}
    clash = [p.name for p in method.presets if p.name in taken]
    if clash:
        raise ValueError(f"backbone method {method.name!r}: preset name(s) {clash} belong to "
                         f"{sorted({taken[c] for c in clash})}; preset names are unique across methods")
    _REGISTRY[method.name] = method
    return method


def unregister_backbone_method(name: str) -> BackboneMethod:
    """Remove a registered method (for tests and notebooks); returns it."""
    backbone_method(name)
    return _REGISTRY.pop(name)


@contextlib.contextmanager
def registered_backbone_method(method: BackboneMethod, *, replace: bool = False) -> Iterator[BackboneMethod]:
    """Register `method` for a `with` block, then restore what was there before."""
    before = _REGISTRY.get(method.name)
    register_backbone_method(method, replace=replace)
    try:
        yield method
    finally:
        if before is None:
            _REGISTRY.pop(method.name, None)
        else:
            _REGISTRY[method.name] = before


def backbone_methods(written: str | None = None) -> tuple[BackboneMethod, ...]:
    """The registered methods in registration order; `written` keeps those written that way."""
    if written is not None and written not in WRITTEN:
        raise ValueError(f"written={written!r}: choose one of {WRITTEN}")
    return tuple(m for m in _REGISTRY.values() if written is None or m.written == written)


def backbone_method_names(written: str | None = None) -> tuple[str, ...]:
    return tuple(m.name for m in backbone_methods(written))


def backbone_method(name: str) -> BackboneMethod:
    """The registered method `name`; a ValueError listing the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backbone method {name!r}; registered: {', '.join(_REGISTRY)} "
                         "(add one with fvgpt_cache.methods.register_backbone_method)") from None


def find_backbone_method(name: str | None) -> BackboneMethod | None:
    """The registered method `name`, or None (an unregistered name, or None)."""
    return _REGISTRY.get(name) if isinstance(name, str) else None


def check_method_handled(name: str, handled: tuple[str, ...], command: str) -> BackboneMethod:
    """The entry of `name` if `command` writes it (`handled`); otherwise a ValueError that lists what `command`
    takes, and says how a registered method is written instead or which methods are registered."""
    if name in handled:
        return backbone_method(name)
    entry = find_backbone_method(name)
    if entry is None:
        raise ValueError(f"method={name!r}: {command} takes {', '.join(handled)}; {name!r} is no registered backbone "
                         f"method (registered: {', '.join(_REGISTRY)})")
    how = entry.how_to_write("CACHE") if entry.hint else f"its features are {entry.written}"
    raise ValueError(f"method={name!r}: {command} takes {', '.join(handled)}; {entry.label} is written another way: {how}")


def _coop_context(key: str) -> bool:
    return key.split(".")[-1] == "ctx"


COOP = register_backbone_method(BackboneMethod(
    "coop", "CoOp", written="trained", hint=TRAIN_HINT,
    presets=(Preset("coop", RELEASE + "FVGPT_CoOp/vit_b16_ep10.yaml"),
             Preset("coop-eurosat", RELEASE + "FVGPT_CoOp/vit_b16_ep20.yaml", {"epochs": 20, "lr": 0.002},
                    datasets=("eurosat",), classes="base")),
    checkpoint_folders=("prompt_learner",), prefer_best_checkpoint=True,
    checkpoint_key=_coop_context, checkpoint_key_shared=True))

KGCOOP = register_backbone_method(BackboneMethod(
    "kgcoop", "KgCoOp", written="trained", hint=TRAIN_HINT,
    presets=(Preset("kgcoop", RELEASE + "FVGPT_KgCoOp/vit_b16_ep10_ctxv1_bs4_lr35.yaml"),),
    checkpoint_folders=("prompt_learner",), prefer_best_checkpoint=True,
    checkpoint_key=_coop_context, checkpoint_key_shared=True))

PROMPTSRC = register_backbone_method(BackboneMethod(
    "promptsrc", "PromptSRC", image_encoder="own", written="imported", hint=IMPORT_HINT,
    presets=(Preset("promptsrc", RELEASE + "FVGPT_PromptSRC/vit_b16_c2_ep10_batch32_4+4ctx.yaml",
                    {"batch_size": 32, "lr": 0.0025}),
             Preset("promptsrc-cross", RELEASE + "FVGPT_PromptSRC/vit_b16_c2_ep5_batch32_4+4ctx_cross_datasets.yaml",
                    {"batch_size": 4, "lr": 0.0035, "epochs": 5}, classes="all")),
    importer="fvgpt_cache.backbones.promptsrc:PromptSRC",
    official_code="github.com/muzairkhattak/PromptSRC trainers/promptsrc.py, clip/model.py (IVLP)",
    checkpoint_folders=("VLPromptLearner",),
    checkpoint_key=lambda k: k == "image_encoder.VPT" or k.endswith(".VPT_shallow")))

# MMRL's releases before June 2025 registered its learner as "MultiModalPromptLearner".
MMRL = register_backbone_method(BackboneMethod(
    "mmrl", "MMRL", image_encoder="own", written="imported", hint=IMPORT_HINT,
    presets=(Preset("mmrl", RELEASE + "FVGPT_MMRL/vit_b16.yaml",
                    {"optimizer": "adamw", "lr": 0.001, "lambda_d": 5.0}, (0.5, 1.0)),
             Preset("mmrl-cross", RELEASE + "FVGPT_MMRL/vit_b16_cross_datasets.yaml",
                    {"optimizer": "adamw", "lr": 0.001, "lambda_d": 5.0, "batch_size": 32, "epochs": 5,
                     "warmup_epochs": 0}, (0.5, 1.0), classes="all")),
    importer="fvgpt_cache.backbones.mmrl:MMRL",
    official_code="github.com/yunncheng/MMRL trainers/mmrl.py, clip/model_mmrl.py",
    checkpoint_folders=("MultiModalRepresentationLearner", "MultiModalPromptLearner"),
    checkpoint_key=lambda k: k.startswith("representation_learner.compound_rep_tokens")))

# zero-shot CLIP as the backbone: the release has no config of its own; CoOp's is the paper's default
CLIP = register_backbone_method(BackboneMethod(
    "clip", "CLIP", written="zero-shot",
    presets=(Preset("clip", RELEASE + "FVGPT_CoOp/vit_b16_ep10.yaml (CoOp's; the release has no zero-shot config)"),)))

# the backbones the paper reports FVG-PT on (its Tables 1 and 2), in its order
PAPER_METHODS = (COOP.name, KGCOOP.name, PROMPTSRC.name, MMRL.name)
