"""Loading an open_clip model: a built-in name or a config JSON, with a tag, a local file or no weights.

`load_clip` is the one entry point. It returns the model in eval mode, its tokenizer, its
preprocessing settings and a provenance record. The known pitfalls are handled here:

* OpenAI weights were trained with QuickGELU. open_clip's plain `ViT-B-16` config uses GELU and
  only warns when given the `openai` tag; a local OpenAI file loaded into it silently loses
  accuracy. `quick_gelu="auto"` turns QuickGELU on for the `openai` tag, for OpenAI JIT archives
  and for any local file whose SHA-256 is one of OpenAI's published checkpoints.
* OpenAI's released `.pt` files are TorchScript archives, not state dicts: they are opened with
  `torch.jit.load` (no pickle) and rebuilt as a regular open_clip model.
* Everything else is read with `weights_only=True`; a file that is not a checkpoint is refused
  with a `WeightsError` that says what was expected and what the file is.
* A download tag is only handed to open_clip when its weights are cached or the server answers:
  offline, the command stops at once with one message instead of minutes of hub retries.
* Weights and configs shipped inside the package are recorded by package-relative name
  (`fvgpt_cache/assets/world-clip.pt`) plus SHA-256, so caches survive a reinstall.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import socket
import warnings
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.model import CLIP, build_model_from_openai_state_dict
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
from open_clip.tokenizer import SimpleTokenizer

from .data import sha256_of

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
SUPPORTED_RESIZE_MODES = ("shortest", "squash")
PACKAGE = "fvgpt_cache"
EXPECTED_WEIGHTS = ("an open_clip checkpoint or state dict (torch.save, read with weights_only=True), "
                    "a .safetensors file, or an OpenAI TorchScript archive")


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file, what was expected and what it is."""


class WeightsUnavailable(RuntimeError):
    """Weights named by a download tag are not on this machine and cannot be downloaded now."""


def package_root() -> Path:
    return Path(str(resources.files(PACKAGE)))


def package_name(path: Path) -> str | None:
    """`fvgpt_cache/assets/x.pt` for a file inside the installed package, else None."""
    try:
        rel = Path(path).resolve().relative_to(package_root().resolve())
    except ValueError:
        return None
    return f"{PACKAGE}/{rel.as_posix()}"


def package_file(name: str) -> Path | None:
    """The installed file a package-relative name (`fvgpt_cache/assets/x.pt`) stands for, if it exists."""
    prefix = PACKAGE + "/"
    if not str(name).startswith(prefix):
        return None
    path = package_root() / str(name)[len(prefix):]
    return path if path.is_file() else None


def local_path(name: str | None) -> Path | None:
    """A file given by path, or by package-relative name; None for tags and missing files."""
    if not name:
        return None
    return package_file(name) or (Path(name) if Path(name).is_file() else None)


def file_record(path: Path) -> str:
    """How provenance names a file: package-relative inside the package, absolute elsewhere."""
    return package_name(path) or str(Path(path).resolve())


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


def describe_file(path: Path) -> str:
    """What a file looks like from its first bytes, in words for an error message."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    size = Path(path).stat().st_size
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save's format)"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (an fvgpt-cache cache?)"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "an image"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 8 < int.from_bytes(head[:8], "little") < size:
        return "a safetensors file"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON or other text file"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return f"a file of unknown format (first bytes {head[:8].hex(' ')})"


def _first_line(exc: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " …"


def _state_dict_mismatch(exc: RuntimeError) -> str:
    """torch's multi-line load_state_dict error, condensed: counts and the first names."""
    text = str(exc)
    parts = []
    for label, pattern in (("missing keys", r"Missing key\(s\) in state_dict: ([^\n]*)"),
                           ("unexpected keys", r"Unexpected key\(s\) in state_dict: ([^\n]*)")):
        match = re.search(pattern, text)
        if match:
            keys = re.findall(r'"([^"]+)"', match.group(1))
            parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape (\S+ ?\S*) from checkpoint, "
                       r"the shape in current model is (\S+ ?\S*)\.", text)
    if sizes:
        name, got, want = sizes[0]
        parts.append(f"size mismatch for {len(sizes)} tensor(s), e.g. {name}: {got} in the file, {want} in the model")
    return "; ".join(parts) or _first_line(exc)


@contextlib.contextmanager
def _weights_errors(path: Path, model_name: str):
    """Turn every way a non-checkpoint file fails inside torch/open_clip into one `WeightsError`."""
    found = describe_file(path)

    def refuse(what: str) -> WeightsError:
        return WeightsError(f"--pretrained {path}: expected {EXPECTED_WEIGHTS}; found {what}. "
                            f"Pass a weights file of {model_name}")

    if found in ("an empty file", "an HDF5 file (an fvgpt-cache cache?)", "an image", "a JSON or other text file",
                 "a text file") or found.startswith("a file of unknown format"):
        raise refuse(found)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            yield
    except pickle.UnpicklingError as exc:
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", str(exc), re.S)
        detail = _first_line(detail.group(1) if detail else exc, 120)
        raise refuse(f"{found} that torch.load(weights_only=True) refuses ({detail}): not a torch checkpoint, or "
                     "one that holds Python objects besides tensors") from None
    except RuntimeError as exc:
        if "state_dict" in str(exc) or "size mismatch" in str(exc):
            raise refuse(f"a state dict that does not fit {model_name}: {_state_dict_mismatch(exc)}") from None
        raise refuse(f"{found} that torch cannot read ({_first_line(exc)})") from None
    except (AttributeError, KeyError, TypeError, ValueError, StopIteration, EOFError, OSError) as exc:
        raise refuse(f"{found} that holds no state dict of tensors ({type(exc).__name__}: {_first_line(exc, 120)})") \
            from None
    except Exception as exc:  # safetensors and torch.jit raise their own types for damaged files
        raise refuse(f"{found} that cannot be read ({type(exc).__name__}: {_first_line(exc, 120)})") from None


def _load_local_weights(model: torch.nn.Module, path: Path, model_name: str) -> None:
    with _weights_errors(path, model_name):
        if is_torchscript_archive(path):
            state_dict = _torchscript_state_dict(path)
            wanted = model.state_dict().keys()  # archives also carry buffers such as attn_mask and sizes
            model.load_state_dict({k: v.float() for k, v in state_dict.items() if k in wanted})
        else:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)


def _hub_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):
        return os.path.expanduser("~/.cache/huggingface/hub")


def _hub_files(hub: str) -> tuple[str, list[str]]:
    """(repo id, file names open_clip tries in order) of a pretrained config's `hf_hub` entry."""
    if hub.endswith("/"):
        repo, filename = hub.rstrip("/"), "open_clip_pytorch_model.bin"
    else:
        repo, filename = os.path.split(hub)
    names = [filename]
    if filename == "open_clip_pytorch_model.bin":
        names.insert(0, "open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return repo, names


def _hub_offline_flag() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except ImportError:
        return False


def reachable(url: str, timeout: float = 3.0) -> bool:
    """One TCP connection to the server of `url` (or to the HTTPS proxy when one is set)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY") \
        or os.environ.get("all_proxy")
    target = urlparse(proxy if proxy else url)
    host, port = target.hostname, target.port or (443 if target.scheme in ("https", "") else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline():
    """Make huggingface_hub use its cache without asking the server (no retries) for one call."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = getattr(constants, "HF_HUB_OFFLINE", None)
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def tag_weights_source(model_name: str, tag: str, cache_dir: str | None = None) -> dict:
    """Where open_clip would get a tag's weights: the hub repo or URL, the cache folder, a cached copy."""
    cfg = get_pretrained_cfg(model_name, tag) or {}
    hub = cfg.get("hf_hub", "")
    try:
        import huggingface_hub
    except ImportError:
        huggingface_hub = None
    if hub and huggingface_hub is not None:
        repo, names = _hub_files(hub)
        folder = _hub_cache_dir(cache_dir)
        cached = None
        for name in names:
            hit = huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=folder)
            if isinstance(hit, str) and os.path.isfile(hit):
                cached = hit
                break
        endpoint = getattr(getattr(huggingface_hub, "constants", None), "ENDPOINT", "https://huggingface.co")
        return {"kind": "hub", "where": repo, "url": endpoint, "folder": folder,
                "cached": cached}
    url = cfg.get("url", "")
    folder = cache_dir or os.path.expanduser("~/.cache/clip")
    target = os.path.join(folder, os.path.basename(url)) if url else ""
    return {"kind": "url", "where": url, "url": url, "folder": folder,
            "cached": target if target and os.path.isfile(target) else None}


def _unavailable(model_name: str, tag: str, source: dict, reason: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"the {tag!r} weights of {model_name} are not here and cannot be downloaded: {reason}. Pass the file with "
        f"--pretrained FILE (OpenAI .pt, open_clip checkpoint or .safetensors) or fetch it once with network into "
        f"open_clip's cache, {source['folder']} ({source['where']})"
    )


@contextlib.contextmanager
def _tag_download_guard(model_name: str, tag: str, cache_dir: str | None):
    """Stop at once when a tag's weights are neither cached nor downloadable; quiet hub retries when cached."""
    source = tag_weights_source(model_name, tag, cache_dir)
    offline = _hub_offline_flag()
    if source["cached"]:
        if offline or (source["kind"] == "hub" and not reachable(source["url"])):
            with _hub_offline():
                yield
        else:
            yield
        return
    if offline and source["kind"] == "hub":
        raise _unavailable(model_name, tag, source, "HF_HUB_OFFLINE is set")
    if not reachable(source["url"]):
        host = urlparse(source["url"]).hostname or source["url"]
        note = " (and HF_HUB_OFFLINE is set)" if offline else ""
        raise _unavailable(model_name, tag, source, f"{host} is unreachable{note}")
    yield


def _download_error(model_name: str, tag: str, exc: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not get the {tag!r} weights of {model_name} ({_first_line(exc)}). "
        f"Download the checkpoint elsewhere and pass the file: --pretrained /path/to/{model_name}.pt "
        "(OpenAI's original .pt archive or an open_clip state dict / .safetensors), "
        "or use --pretrained none for a random model (smoke tests only)."
    )


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")


def looks_like_a_file(name: str) -> bool:
    """A --pretrained value meant as a path (a folder separator or a weights suffix), not an open_clip tag."""
    if name.startswith("hf-hub:"):
        return False
    return "/" in name or os.sep in name or name.startswith("~") or name.lower().endswith(WEIGHT_SUFFIXES)
def open_clip_version() -> str:
    """The installed open_clip_torch release (open_clip itself has `__version__` only since its 2.2x releases)."""
    from importlib.metadata import version

    return getattr(open_clip, "__version__", None) or version("open_clip_torch")


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
    local_file = local_path(pretrained)
    if pretrained is not None and local_file is None and looks_like_a_file(pretrained):
        raise FileNotFoundError(f"--pretrained {pretrained}: weights file not found (looked at "
                                f"{Path(pretrained).expanduser().resolve()}); check the path")
    config_path = (local_path(model) or Path(model)) if model.endswith(".json") else None
    prov = {"model": package_name(config_path) or model if config_path and config_path.is_file() else model,
            "pretrained": pretrained or "none", "random_init": pretrained is None}
    if local_file is not None:
        prov.update(pretrained=package_name(local_file) or pretrained, pretrained_file=file_record(local_file),
                    pretrained_sha256=sha256_of(local_file), pretrained_bytes=local_file.stat().st_size)

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
            _load_local_weights(net, local_file, name)
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
        tag = pretrained if pretrained is not None and local_file is None else None
        if tag:
            guard = _tag_download_guard(model, tag, cache_dir)
        elif local_file is not None:
            guard = _weights_errors(local_file, model)
        else:
            guard = contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), guard:
            torch.manual_seed(seed)
            try:
                net = open_clip.create_model(
                    model,
                    pretrained=None if (pretrained is None or is_jit) else str(local_file or pretrained),
                    force_quick_gelu=qg,
                    cache_dir=cache_dir,
                    weights_only=True,
                )
            except (RuntimeError, FileNotFoundError) as exc:
                if tag is not None and "download" in str(exc).lower():
                    raise _download_error(model, tag, exc) from exc
                raise
            if is_jit:
                rebuilt = build_model_from_openai_state_dict(_torchscript_state_dict(local_file), quick_gelu=qg)
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
        open_clip_version=open_clip_version(),
        torch_version=torch.__version__,
        init_seed=seed if pretrained is None else None,
    )
    return LoadedModel(model=net, tokenizer=tokenizer, preprocess=preprocess, provenance=prov)
