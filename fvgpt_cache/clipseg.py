"""CLIPSeg (Lüddecke & Ecker) through `transformers` for `fvgpt-cache masks --method clipseg`.

An optional extra (`pip install 'fvgpt-cache[masks]'`), imported only when this method is used.
The published `CIDAS/clipseg-rd64-refined` weights are read from the Hugging Face cache or from a
local folder (`--pretrained DIR` holding config.json, the weights, the tokenizer and
preprocessor_config.json); nothing is downloaded unless the Hub answers. The map of an image is
sigmoid(logits) of the prompt filled with its class name, a foreground probability thresholded
at `--threshold` (0.5 by default) without per-image rescaling.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import sha256_of

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
HUB = "https://huggingface.co"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = {2: "bilinear", 3: "bicubic", 0: "nearest"}


class ClipSegUnavailable(RuntimeError):
    """transformers or the CLIPSeg weights are not on this machine."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ClipSegUnavailable("--method clipseg needs the optional extra: pip install 'fvgpt-cache[masks]' "
                                 "(it installs transformers); --method gradcam needs nothing more") from None
    return transformers


@dataclass
class ClipSeg:
    """A CLIPSeg model with its tokenizer (a callable: texts → (input_ids, attention_mask)) and image preprocessing."""

    model: torch.nn.Module
    tokenize: object
    preprocess: dict  # size, mean, std, interpolation (as `models.LoadedModel.preprocess`)
    provenance: dict

    @torch.no_grad()
    def maps(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """pixels (B, 3, S, S) normalised, one prompt per image → (B, S, S) foreground probabilities."""
        device = pixels.device
        ids, mask = self.tokenize(texts)
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixels)
        logits = out.logits.reshape(len(pixels), *out.logits.shape[-2:]).float()
        if logits.shape[-2:] != pixels.shape[-2:]:
            logits = F.interpolate(logits[:, None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return logits.sigmoid()


def hf_tokenizer(tokenizer, context_length: int = 77):
    """A `ClipSeg.tokenize` from a Hugging Face tokenizer."""
    def tokenize(texts: list[str]):
        enc = tokenizer(texts, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    return tokenize


def open_clip_tokenizer(context_length: int = 77):
    """A `ClipSeg.tokenize` with open_clip's CLIP BPE tokenizer (the vocabulary CLIPSeg's text tower uses)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=context_length)

    def tokenize(texts: list[str]):
        ids = tok(texts)
        eot = (ids == tok.eot_token_id).int().argmax(dim=1)
        mask = (torch.arange(ids.shape[1])[None] <= eot[:, None]).long()
        return ids, mask
    return tokenize


def _preprocess(folder: Path, model) -> dict:
    size = int(model.config.vision_config.image_size)
    pp = {"size": size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bilinear",
          "resize_mode": "squash"}
    cfg_file = folder / "preprocessor_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        size_cfg = cfg.get("size", size)
        pp["size"] = int(size_cfg.get("height", size) if isinstance(size_cfg, dict) else size_cfg)
        pp["mean"], pp["std"] = cfg.get("image_mean", pp["mean"]), cfg.get("image_std", pp["std"])
        pp["interpolation"] = RESAMPLE.get(cfg.get("resample", 2), "bilinear")
    return pp


def _weights_file(folder: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_clipseg(pretrained: str | None = None, device: str | torch.device = "cpu") -> ClipSeg:
    """CLIPSeg from a local folder, or the published weights from the Hugging Face cache (or the Hub, if it answers)."""
    transformers = _transformers()
    name = pretrained or DEFAULT_CLIPSEG
    folder = Path(name)
    if not folder.is_dir():
        if pretrained is not None and ("/" not in name or name.startswith((".", "/"))):
            raise FileNotFoundError(f"--pretrained {name}: no such folder; give a folder with CLIPSeg's config.json, "
                                    f"weights and tokenizer, or leave it out for {DEFAULT_CLIPSEG}")
        from huggingface_hub import snapshot_download

        from .models import reachable

        try:
            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001  (not in the cache: try the Hub only if it answers)
            if not reachable(HUB):
                raise ClipSegUnavailable(
                    f"the CLIPSeg weights {name} are not in the Hugging Face cache and {HUB} cannot be reached. On a "
                    f"machine with internet run `huggingface-cli download {name} --local-dir clipseg`, copy the folder "
                    "here and pass --pretrained clipseg") from None
            folder = Path(snapshot_download(name))
    weights = _weights_file(folder)
    if weights is None or not (folder / "config.json").is_file():
        raise ClipSegUnavailable(f"{folder} holds no CLIPSeg model (config.json and model.safetensors or "
                                 "pytorch_model.bin); download the whole model folder")
    model = transformers.CLIPSegForImageSegmentation.from_pretrained(str(folder)).to(device).eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise ClipSegUnavailable(f"{folder} has no usable tokenizer ({exc}); download the whole model folder") from None
    provenance = {"method": "clipseg", "model": "CLIPSegForImageSegmentation", "pretrained": name,
                  "pretrained_sha256": sha256_of(weights), "transformers_version": transformers.__version__}
    return ClipSeg(model, hf_tokenizer(tokenizer, int(model.config.text_config.max_position_embeddings)),
                   _preprocess(folder, model), provenance)
