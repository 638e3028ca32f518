"""Training settings per backbone, from the FVG-PT release's configs (docs/method.md#hyper-parameters, docs/training.md#presets).

A preset is a set of `TrainConfig` overrides chosen by the backbone's method (read from the
cache's backbone group), the dataset and the protocol (`classes="all"` is the cross-dataset
source). The precedence is: `TrainConfig` defaults (the paper's CoOp setting) < preset < what
the user sets explicitly. Each preset names the release file it comes from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

RELEASE = "JREion/FVG-PT configs/trainers/"
PRESET_CHOICES = ("auto", "none", "coop", "kgcoop", "promptsrc", "mmrl", "clip")


@dataclass(frozen=True)
class Preset:
    name: str
    source: str
    settings: dict = field(default_factory=dict)
    rrc_scale: tuple[float, float] = (0.08, 1.0)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "settings": dict(self.settings),
                "rrc_scale": list(self.rrc_scale)}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("coop", RELEASE + "FVGPT_CoOp/vit_b16_ep10.yaml"),
    Preset("coop-eurosat", RELEASE + "FVGPT_CoOp/vit_b16_ep20.yaml", {"epochs": 20, "lr": 0.002}),
    Preset("kgcoop", RELEASE + "FVGPT_KgCoOp/vit_b16_ep10_ctxv1_bs4_lr35.yaml"),
    Preset("promptsrc", RELEASE + "FVGPT_PromptSRC/vit_b16_c2_ep10_batch32_4+4ctx.yaml",
           {"batch_size": 32, "lr": 0.0025}),
    Preset("promptsrc-cross", RELEASE + "FVGPT_PromptSRC/vit_b16_c2_ep5_batch32_4+4ctx_cross_datasets.yaml",
           {"batch_size": 4, "lr": 0.0035, "epochs": 5}),
    Preset("mmrl", RELEASE + "FVGPT_MMRL/vit_b16.yaml",
           {"optimizer": "adamw", "lr": 0.001, "lambda_d": 5.0}, (0.5, 1.0)),
    Preset("mmrl-cross", RELEASE + "FVGPT_MMRL/vit_b16_cross_datasets.yaml",
           {"optimizer": "adamw", "lr": 0.001, "lambda_d": 5.0, "batch_size": 32, "epochs": 5, "warmup_epochs": 0},
           (0.5, 1.0)),
    # zero-shot CLIP as the backbone: the release has no config of its own; CoOp's is the paper's default
    Preset("clip", RELEASE + "FVGPT_CoOp/vit_b16_ep10.yaml (CoOp's; the release has no zero-shot config)"),
)}


def method_of(backbone: str, provenance: dict) -> str | None:
    """The method a backbone group was made with: clip for zero-shot groups, else its provenance's `method`."""
    if backbone == "clip" or backbone.startswith("clip_"):
        return "clip"
    return provenance.get("method")


def choose_preset(method: str | None, dataset: str | None, classes: str = "base",
                  preset_of: str = "auto") -> Preset | None:
    """The preset for a backbone method, a dataset and a protocol; None for the plain defaults.

    `preset_of`: "auto" (from `method`), "none" (plain `TrainConfig` defaults), or a method name
    to use that method's preset whatever the backbone is.
    """
    if preset_of not in PRESET_CHOICES:
        raise ValueError(f"--preset-of {preset_of!r}: choose one of {', '.join(PRESET_CHOICES)}")
    if preset_of == "none":
        return None
    method = method if preset_of == "auto" else preset_of
    if method == "clip_ensemble":
        method = "clip"
    if method not in ("coop", "kgcoop", "promptsrc", "mmrl", "clip"):
        return None
    cross = classes == "all"
    if method == "coop" and (dataset or "").lower() == "eurosat" and not cross:
        return PRESETS["coop-eurosat"]
    if method in ("promptsrc", "mmrl") and cross:
        return PRESETS[f"{method}-cross"]
    return PRESETS[method]
