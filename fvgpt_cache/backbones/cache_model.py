"""The CLIP model behind a cache: rebuilt from the cache's provenance and verified against it.

Every backbone command first rebuilds the CLIP model the cache was extracted with
(`model_for_cache`) and checks that it reproduces the cache's zero-shot text features, so learned
prompts can never be paired with other weights than the cached image features came from.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import sha256_of
from ..device import resolve_device
from ..extraction import class_prompt, encode_texts
from ..models import LoadedModel, load_clip, local_path, package_root
from ..prompts import check_prompt_model
from ..store import Cache, CacheError, open_cache

VERIFY_THRESHOLD = 0.999


def _model_argument(prov: dict, tmp: Path) -> str:
    """The `model` argument for `load_clip`: the name, the config JSON, or the JSON rebuilt from provenance."""
    model = prov.get("model")
    if not model.endswith(".json"):
        return model
    path = local_path(model) or Path(model)
    config = prov.get("model_config")
    if path.is_file() and (prov.get("model_config_sha256") in (None, sha256_of(path)) or config is None):
        return str(path)
    if config is None:
        raise CacheError(f"the model config {path} the cache was extracted with is gone and the cache does not record "
                         "its contents; put the config file back at that path")
    rebuilt = tmp / path.name
    rebuilt.write_text(json.dumps(config))
    return str(rebuilt)


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def weights_folders() -> list[Path]:
    """Where a weights file is looked for by its hash: the package's assets and open_clip's caches."""
    folders = [package_root() / "assets", Path(os.path.expanduser("~/.cache/clip"))]
    try:
        from huggingface_hub import constants

        folders.append(Path(constants.HF_HUB_CACHE))
    except (ImportError, AttributeError):
        folders.append(Path(os.path.expanduser("~/.cache/huggingface/hub")))
    return folders


def find_weights(sha256: str, size: int | None = None, folders: list[Path] | None = None) -> Path | None:
    """A file whose SHA-256 is `sha256` in `folders` (default `weights_folders()`), or None.

    Hugging Face's cache stores downloaded files as `blobs/<sha256>`, so those are found by name;
    elsewhere files with a weights suffix (and the recorded size, when known) are hashed.
    """
    for folder in folders if folders is not None else weights_folders():
        if not folder.is_dir():
            continue
        for blob in folder.glob(f"models--*/blobs/{sha256}"):
            if blob.is_file():
                return blob
        for path in sorted(folder.rglob("*")):
            if path.suffix not in WEIGHT_SUFFIXES or not path.is_file() or {"blobs", "snapshots"} & set(path.parts):
                continue
            if (size is None or path.stat().st_size == size) and sha256_of(path) == sha256:
                return path
    return None


def _weights_argument(cache: Cache, pretrained: str | None) -> str | None:
    """The `pretrained` argument that rebuilds the cache's model: a tag, None, or a file with the recorded hash."""
    prov = cache.provenance
    recorded_sha = prov.get("pretrained_sha256")
    if pretrained is not None:
        if str(pretrained).lower() == "none":
            return None
        path = local_path(pretrained)
        if path is not None and recorded_sha and sha256_of(path) != recorded_sha:
            raise CacheError(
                f"{path} (SHA-256 {sha256_of(path)[:12]}…) is not the weights file {cache.path} was extracted with "
                f"(SHA-256 {recorded_sha}, recorded as {prov.get('pretrained_file')}); pass that file"
            )
        return str(path or pretrained)
    if prov.get("random_init") or prov.get("pretrained") in (None, "none"):
        return None
    recorded = prov.get("pretrained_file")
    if not recorded and not recorded_sha:
        return str(prov["pretrained"])  # an open_clip tag
    path = local_path(recorded)
    if path is not None and (not recorded_sha or sha256_of(path) == recorded_sha):
        return str(path)
    if recorded_sha:
        found = find_weights(recorded_sha, prov.get("pretrained_bytes"))
        if found is not None:
            return str(found)
    state = "has changed (its SHA-256 differs)" if path is not None else "is not there any more"
    folders = ", ".join(str(f) for f in weights_folders())
    raise CacheError(
        f"{cache.path} was extracted with the weights file {recorded} (SHA-256 {recorded_sha}), which {state}, and "
        f"no file with that SHA-256 was found in {folders}. Pass the same checkpoint with --pretrained FILE"
    )


def verify_model(cache: Cache, loaded: LoadedModel, n_classes: int = 8, device: str | torch.device | None = None) -> float:
    """Check that `loaded` reproduces the cache's zero-shot text features; returns the lowest cosine.

    The cache's `/text/clip` rows were computed at extraction from the class names and the
    template; a few of them are recomputed and compared (cosine > 0.999), where the model is
    (`device`, when given, must be the model's device).
    """
    template = cache.text_attrs("clip").get("template") or cache.provenance.get("template")
    if not template:
        raise CacheError(f"{cache.path} records no template for its CLIP text features; cannot verify the model")
    names = cache.classnames
    idx = np.unique(np.linspace(0, len(names) - 1, min(n_classes, len(names))).round().astype(int))
    got = encode_texts(loaded, [class_prompt(str(template), names[i]) for i in idx], device)
    ref = F.normalize(cache.text("clip")[idx], dim=-1)
    cos = F.cosine_similarity(got, ref, dim=-1)
    worst = float(cos.min())
    if not worst > VERIFY_THRESHOLD:
        prov = loaded.provenance
        raise CacheError(
            f"{cache.path}: the rebuilt model ({prov.get('model')}, weights {prov.get('pretrained')}) does not reproduce "
            f"the cache's zero-shot text features (lowest cosine {worst:.4f} ≤ {VERIFY_THRESHOLD}, class "
            f"{names[int(idx[int(cos.argmin())])]!r}): the weights differ from the ones the cache was built with. "
            "Pass the checkpoint the cache was extracted from with --pretrained PATH, or re-extract the cache"
        )
    return worst


def model_for_cache(cache: Cache | str | Path, pretrained: str | None = None, device: str | torch.device = "cpu",
                    verify: bool = True) -> LoadedModel:
    """Rebuild the CLIP model `cache` was extracted with, from its provenance, and verify it.

    `pretrained` replaces the recorded weights (a file must then have the recorded SHA-256 when
    one was recorded). The model is frozen and in eval mode.
    """
    cache = open_cache(cache) if not isinstance(cache, Cache) else cache
    prov = cache.provenance
    if not prov.get("model") or prov.get("model") == "synthetic-features":
        raise CacheError(f"{cache.path} holds {prov.get('model') or 'unknown'} features with no CLIP model behind them; "
                         "prompt-learning backbones need a cache extracted from images with `fvgpt-cache extract`")
    device = resolve_device(device) if isinstance(device, str) else device
    quick_gelu = prov.get("quick_gelu")
    with tempfile.TemporaryDirectory() as tmp:
        model_arg = _model_argument(prov, Path(tmp))
        weights = _weights_argument(cache, pretrained)
        loaded = load_clip(model_arg, weights, quick_gelu="auto" if quick_gelu is None else ("on" if quick_gelu else "off"),
                           seed=int(prov.get("init_seed") or 0), device=device)
    loaded.provenance["model"] = prov["model"]  # not the temporary config path it may have been rebuilt from
    check_prompt_model(loaded.model)
    loaded.model.eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    if verify:
        verify_model(cache, loaded, device=device)
    return loaded


def model_of(cache: Cache, loaded: LoadedModel | None, pretrained: str | None, device) -> LoadedModel:
    """The cache's model: rebuilt from provenance, or the one given, checked against the cache."""
    if loaded is None:
        return model_for_cache(cache, pretrained, device)
    verify_model(cache, loaded, device=loaded.model.token_embedding.weight.device)
    return loaded



def model_record(loaded: LoadedModel) -> dict:
    prov = loaded.provenance
    return {k: prov.get(k) for k in ("model", "pretrained", "pretrained_sha256", "quick_gelu", "init_seed")}
