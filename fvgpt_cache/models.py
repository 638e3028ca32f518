"""Loading an open_clip model: a built-in name or a config JSON, with a tag, a local file or no weights.

`load_clip` is the one entry point. It returns the model in eval mode, its tokenizer, its
preprocessing settings and a provenance record. The known pitfalls are handled here:

* OpenAI weights were trained with QuickGELU. open_clip's plain `ViT-B-16` config uses GELU and
  only warns when given the `openai` tag; a local OpenAI file loaded into it silently loses
  accuracy. `quick_gelu="auto"` turns QuickGELU on for the `openai` tag, for OpenAI JIT archives
  and for any local file whose SHA-256 is one of OpenAI's published checkpoints.
* OpenAI's released `.pt` files are TorchScript archives, not state dicts: they are opened with
  `torch.jit.load` (no pickle) and rebuilt as a regular open_clip model.
* Everything else is read with `weights_only=True`.
"""
from __future__ import annotations

import json
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP, build_model_from_openai_state_dict
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
from open_clip.tokenizer import SimpleTokenizer

from .data import sha256_of

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
SUPPORTED_RESIZE_MODES = ("shortest", "squash")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    preprocess: dict  # size (int), mean, std, interpolation, resize_mode
    provenance: dict

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().item())


def _openai_checkpoint_hashes() -> set[str]:
    """SHA-256 values of OpenAI's checkpoints, read from their download URLs in open_clip."""
    hashes = set()
    for name in open_clip.list_models():
        cfg = get_pretrained_cfg(name, "openai")
        match = re.search(r"/([0-9a-f]{64})/", (cfg or {}).get("url", ""))
        if match:
            hashes.add(match.group(1))
    return hashes


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zips with a `code/` folder; `torch.save` files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n or n.startswith("code/") for n in zf.namelist())


def _square_size(size) -> int:
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square input size {tuple(size)} is not supported; use a square model")
        size = size[0]
    return int(size)


def _preprocess_of(model: torch.nn.Module) -> dict:
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    cfg.setdefault("mean", open_clip.OPENAI_DATASET_MEAN)
    cfg.setdefault("std", open_clip.OPENAI_DATASET_STD)
    cfg.setdefault("interpolation", "bicubic")
    cfg.setdefault("resize_mode", "shortest")
    if cfg["resize_mode"] not in SUPPORTED_RESIZE_MODES:
        raise ValueError(
            f"preprocessing resize_mode {cfg['resize_mode']!r} is not supported; "
            f"supported: {SUPPORTED_RESIZE_MODES}"
        )
    return {
        "size": _square_size(cfg["size"]),
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "interpolation": str(cfg["interpolation"]),
        "resize_mode": str(cfg["resize_mode"]),
    }


def _read_config_json(path: Path) -> tuple[str, dict, dict]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"model config {path} is not valid JSON: {exc}") from exc
    model_cfg = raw.get("model_cfg", raw)
    preprocess_cfg = raw.get("preprocess_cfg", {})
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ValueError(f"model config {path} has no {key!r}; it must be an open_clip model config")
    if model_cfg.get("custom_text") or "hf_model_name" in model_cfg["text_cfg"] or "timm_model_name" in model_cfg["vision_cfg"]:
        raise ValueError(
            f"model config {path}: only open_clip's built-in CLIP towers are supported from a JSON file "
            "(no timm / Hugging Face towers); use a built-in model name instead"
        )
    return path.stem, model_cfg, preprocess_cfg


def _resolve_quick_gelu(quick_gelu: str, model_name: str, pretrained: str, local_file: Path | None) -> bool:
    if quick_gelu not in ("auto", "on", "off"):
        raise ValueError(f"quick_gelu must be 'auto', 'on' or 'off', got {quick_gelu!r}")
    if quick_gelu != "auto":
        return quick_gelu == "on"
    if pretrained == "openai" or model_name.endswith("-quickgelu"):
        return True
    if local_file is not None:
        return is_torchscript_archive(local_file) or sha256_of(local_file) in _openai_checkpoint_hashes()
    return False


def _torchscript_state_dict(path: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, but OpenAI ships such files
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def _load_local_weights(model: torch.nn.Module, path: Path) -> None:
    if is_torchscript_archive(path):
        state_dict = _torchscript_state_dict(path)
        wanted = model.state_dict().keys()  # archives also carry buffers such as attn_mask and sizes
        model.load_state_dict({k: v.float() for k, v in state_dict.items() if k in wanted})
    else:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)


def _download_error(model_name: str, tag: str, exc: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not get the {tag!r} weights of {model_name} ({exc}). This machine may be offline. "
        f"Download the checkpoint elsewhere and pass the file: --pretrained /path/to/{model_name}.pt "
        "(OpenAI's original .pt archive or an open_clip state dict / .safetensors), "
        "or use --pretrained none for a random model (smoke tests only)."
    )


def load_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    *,
    quick_gelu: str = "auto",
    seed: int = 0,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> LoadedModel:
    """Build an open_clip CLIP model.

    model: a built-in open_clip name (`ViT-B-16`) or the path of an open_clip config JSON
        (`{"embed_dim", "vision_cfg", "text_cfg"}` or `{"model_cfg", "preprocess_cfg"}`).
    pretrained: an open_clip tag (`openai`, `laion2b_s34b_b88k`, ...), a local checkpoint file,
        or `none` for a seeded random initialisation.
    """
    pretrained = None if pretrained in (None, "", "none", "None") else str(pretrained)
    local_file = Path(pretrained) if pretrained is not None and Path(pretrained).is_file() else None
    config_path = Path(model) if model.endswith(".json") else None
    prov = {"model": model, "pretrained": pretrained or "none", "random_init": pretrained is None}
    if local_file is not None:
        prov.update(pretrained_file=str(local_file.resolve()), pretrained_sha256=sha256_of(local_file))

    if config_path is not None:
        if not config_path.is_file():
            raise FileNotFoundError(f"model config not found: {config_path}")
        if pretrained is not None and local_file is None:
            raise ValueError(
                f"--pretrained {pretrained!r}: a model given as a config JSON takes a local checkpoint "
                "file or 'none', not a download tag"
            )
        name, model_cfg, preprocess_cfg = _read_config_json(config_path)
        qg = _resolve_quick_gelu(quick_gelu, name, pretrained or "", local_file)
        model_cfg = {**model_cfg, "quick_gelu": qg or model_cfg.get("quick_gelu", False)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = CLIP(**model_cfg)
        if local_file is not None:
            _load_local_weights(net, local_file)
        pp = {"size": model_cfg["vision_cfg"].get("image_size", 224), "mean": open_clip.OPENAI_DATASET_MEAN,
              "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
        pp.update(preprocess_cfg)
        open_clip.set_model_preprocess_cfg(net, pp)
        tokenizer = SimpleTokenizer(context_length=model_cfg["text_cfg"].get("context_length", 77))
        prov.update(model_config=model_cfg, model_config_sha256=sha256_of(config_path), quick_gelu=bool(model_cfg["quick_gelu"]))
    else:
        if model not in open_clip.list_models():
            raise ValueError(
                f"unknown model {model!r}: give an open_clip model name (e.g. ViT-B-16, ViT-B-32, RN50) "
                "or the path of an open_clip model config .json"
            )
        if pretrained is not None and local_file is None and not get_pretrained_cfg(model, pretrained):
            raise ValueError(
                f"--pretrained {pretrained!r} is neither a file nor a tag of {model}; "
                f"tags: {list_pretrained_tags_by_model(model)}, or 'none'"
            )
        qg = _resolve_quick_gelu(quick_gelu, model, pretrained or "", local_file)
        is_jit = local_file is not None and is_torchscript_archive(local_file)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                net = open_clip.create_model(
                    model,
                    pretrained=None if (pretrained is None or is_jit) else pretrained,
                    force_quick_gelu=qg,
                    cache_dir=cache_dir,
                    weights_only=True,
                )
            except RuntimeError as exc:
                if local_file is None and pretrained is not None and "download" in str(exc).lower():
                    raise _download_error(model, pretrained, exc) from exc
                raise
        if is_jit:
            state_dict = _torchscript_state_dict(local_file)
            rebuilt = build_model_from_openai_state_dict(state_dict, quick_gelu=qg)
            rebuilt.float()
            open_clip.set_model_preprocess_cfg(rebuilt, open_clip.get_model_preprocess_cfg(net))
            net = rebuilt
        tokenizer = open_clip.get_tokenizer(model)
        prov.update(quick_gelu=qg)

    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    preprocess = _preprocess_of(net)
    prov.update(
        preprocess=preprocess,
        open_clip_version=open_clip.__version__,
        torch_version=torch.__version__,
        init_seed=seed if pretrained is None else None,
    )
    return LoadedModel(model=net, tokenizer=tokenizer, preprocess=preprocess, provenance=prov)
