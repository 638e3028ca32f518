"""CLIP's prompt ensembling (80 or 7 ImageNet templates) as a zero-shot baseline text group."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from ..extraction import encode_texts
from ..models import LoadedModel, open_clip_version
from ..store import open_cache, write_text_group
from .cache_model import model_of, model_record

TEMPLATE_SETS = {"imagenet80": tuple(OPENAI_IMAGENET_TEMPLATES), "imagenet7": tuple(SIMPLE_IMAGENET_TEMPLATES)}


def _fill(template, classname: str) -> str:
    name = classname.replace("_", " ")
    return template(name) if callable(template) else str(template).format(name)


@torch.no_grad()
def ensemble_text_features(loaded: LoadedModel, classnames: Sequence[str], templates: Sequence,
                           device: str | torch.device | None = None) -> torch.Tensor:
    """CLIP's prompt ensembling: mean of the normalised features over templates, re-normalised (C, D).

    A template is a string with `{}` or a callable of the class name (open_clip's lists).
    """
    if not templates:
        raise ValueError("give at least one template")
    total = None  # computed where the model is (`device`, when given, must be the model's device)
    for t in templates:
        feats = encode_texts(loaded, [_fill(t, c) for c in classnames], device)
        total = feats if total is None else total + feats
    return F.normalize(total / len(templates), dim=-1)


def write_ensemble(cache_path: str | Path, template_set: str = "imagenet80", pretrained: str | None = None,
                   name: str | None = None, device: str | torch.device = "cpu",
                   loaded: LoadedModel | None = None) -> dict:
    """Write `/text/<name>` (default `clip_<template_set>`) with CLIP's ensemble over a template set."""
    if template_set not in TEMPLATE_SETS:
        raise ValueError(f"template_set={template_set!r}: choose one of {sorted(TEMPLATE_SETS)}")
    cache = open_cache(cache_path)
    loaded = model_of(cache, loaded, pretrained, device)
    templates = TEMPLATE_SETS[template_set]
    feats = ensemble_text_features(loaded, cache.classnames, templates, loaded.model.token_embedding.weight.device)
    name = name or f"clip_{template_set}"
    prov = {"method": "clip_ensemble", "template_set": template_set, "templates": len(templates),
            "example": _fill(templates[0], "{}"), "image_encoder": "clip", "clip_model": model_record(loaded),
            "open_clip_version": open_clip_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text_group(cache.path, name, feats, prov)
    return {"name": name, "template_set": template_set, "templates": len(templates), "shape": list(feats.shape)}
