"""Training settings per backbone, from the FVG-PT release's configs (docs/method.md#hyper-parameters, docs/training.md#presets).

A preset is a set of `TrainConfig` overrides chosen by the backbone's method (read from the
cache's backbone group), the dataset and the protocol (`classes="all"` is the cross-dataset
source). The precedence is: `TrainConfig` defaults (the paper's CoOp setting) < preset < what
the user sets explicitly. Each preset names the release file it comes from; the presets and the
rule that picks among them belong to their method's entry in the registry (`fvgpt_cache.methods`).
"""
from __future__ import annotations

from .methods import CLIP, RELEASE, Preset, backbone_method_names, backbone_methods, find_backbone_method

def preset_choices() -> tuple[str, ...]:
    """What `--preset-of` accepts: auto, none and every registered backbone method (at call time)."""
    return ("auto", "none", *backbone_method_names())


def all_presets() -> dict[str, Preset]:
    """Every registered method's presets by name."""
    return {p.name: p for m in backbone_methods() for p in m.presets}


def method_of(backbone: str, provenance: dict) -> str | None:
    """The method a backbone group was made with: clip for zero-shot groups, else its provenance's `method`."""
    if backbone == CLIP.name or backbone.startswith(CLIP.name + "_"):
        return CLIP.name
    return provenance.get("method")


def choose_preset(method: str | None, dataset: str | None, classes: str = "base",
                  preset_of: str = "auto") -> Preset | None:
    """The preset for a backbone method, a dataset and a protocol; None for the plain defaults.

    `preset_of`: "auto" (from `method`), "none" (plain `TrainConfig` defaults), or a method name
    to use that method's preset whatever the backbone is.
    """
    choices = preset_choices()
    if preset_of not in choices:
        raise ValueError(f"--preset-of {preset_of!r}: choose one of {', '.join(choices)}")
    if preset_of == "none":
        return None
    method = method if preset_of == "auto" else preset_of
    if method == CLIP.name + "_ensemble":  # a template ensemble is zero-shot CLIP (backbones/ensemble.py)
        method = CLIP.name
    entry = find_backbone_method(method)
    return None if entry is None else entry.preset_for(dataset, classes)
