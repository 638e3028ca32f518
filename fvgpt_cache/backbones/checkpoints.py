"""Reading checkpoints written by the official prompt-learning code (Dassl's layout), safely.

Files are read with `torch.load(weights_only=True)`. Dassl also pickles its optimiser and
scheduler objects into checkpoints; those classes are replaced by inert stand-ins, never executed.
"""
from __future__ import annotations

import collections
import pickle
import re
import zipfile
from pathlib import Path

import torch

# State-dict entries of CoOp / KgCoOp prompt learners that do not take part in the text features:
# CoOp's frozen token embeddings (recomputed here from the class names) and KgCoOp's unused
# `bias_vectors` and `meta_net` (defined but never called in its forward pass, and not trained).
IGNORED_KEYS = ("token_prefix", "token_suffix", "token_midfix", "bias_vectors", "meta_net.linear1.weight",
                "meta_net.linear1.bias")


def save_coop_checkpoint(directory: str | Path, ctx: torch.Tensor, epoch: int) -> Path:
    """Write `<directory>/prompt_learner/model.pth.tar-<epoch>` as Dassl does (`state_dict` with `ctx`, `epoch`)."""
    path = Path(directory) / "prompt_learner" / f"model.pth.tar-{int(epoch)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": collections.OrderedDict(ctx=ctx.detach().cpu().clone()), "epoch": int(epoch)}, path)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a CoOp output folder: `prompt_learner/model-best.pth.tar`, else the last epoch."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    tried = []
    for folder in (path / "prompt_learner", path):
        if not folder.is_dir():
            continue
        best = folder / "model-best.pth.tar"
        tried.append(str(best))
        if best.is_file():
            return best
        epochs = [(int(m.group(1)), f) for f in folder.iterdir() if (m := re.fullmatch(r"model\.pth\.tar-(\d+)", f.name))]
        tried.append(str(folder / "model.pth.tar-<epoch>"))
        if epochs:
            return max(epochs)[1]
    raise FileNotFoundError(f"no CoOp checkpoint in {path}; looked for {', '.join(tried) or 'a prompt_learner folder'}")


def _plain_dict(*args, **kwargs) -> dict:
    return {}


def _stub(name: str) -> type:
    """A do-nothing stand-in for a class pickled into a training checkpoint (optimiser, scheduler)."""
    module, _, qual = name.rpartition(".")

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    return type(qual or name, (), {"__new__": __new__, "__init__": __init__, "__setstate__": __setstate__,
                                   "__module__": "fvgpt_cache.stub." + module})


def _short(exc: Exception) -> str:
    """The informative part of torch's long weights_only error messages."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    return (match.group(1) if match else text.splitlines()[0] if text else type(exc).__name__).strip()


def _torch_load(path: Path):
    """`torch.load(weights_only=True)`; Dassl checkpoints also pickle the optimiser and the scheduler
    objects, which the safe loader refuses, so those classes are replaced by inert stand-ins (no code
    of theirs runs) and the file is read again, still with `weights_only=True`."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = _short(exc)
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({first}); CoOp/KgCoOp checkpoints are "
                             "files written by torch.save, e.g. prompt_learner/model.pth.tar-<epoch>") from exc
    except Exception as exc:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {_short(exc)})") from exc
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:
        raise ValueError(f"{path} cannot be read with weights_only=True ({first}); re-save its state_dict") from exc
    real = {"builtins.dict": dict, "collections.defaultdict": _plain_dict, "collections.OrderedDict": collections.OrderedDict}
    allowed = [(real.get(n) or _stub(n), n) for n in names]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} cannot be read with weights_only=True ({_short(exc)}); load it yourself and save "
                         "{'state_dict': {'ctx': ctx}} with torch.save") from exc


def load_context(file: str | Path, expect_width: int, n_classes: int | None = None) -> tuple[torch.Tensor, dict]:
    """Read learned context vectors from a CoOp / KgCoOp checkpoint; returns (ctx float32, info).

    Accepted: Dassl's `{"state_dict": {...}, "epoch": ...}` (also with optimiser and scheduler
    entries), a bare state dict, or a tensor; keys `ctx`, `prompt_learner.ctx`,
    `module.prompt_learner.ctx`, ...; fp16 or fp32; generic (n_ctx, width) or class-specific
    (C, n_ctx, width). `token_prefix` / `token_suffix` (and KgCoOp's unused `bias_vectors`,
    `meta_net.linear1`) are ignored: prompts are rebuilt from the cache's class names. Other
    prompt-learner parameters mean another method (CoCoOp, MaPLe, ...) and are refused.
    """
    path = resolve_checkpoint(file)
    obj = _torch_load(path)
    info: dict = {"file": str(path), "epoch": None}
    if torch.is_tensor(obj):
        state, key = {"ctx": obj}, "ctx"
    else:
        if not isinstance(obj, dict):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict; expected "
                             "{'state_dict': {'ctx': ...}} as CoOp/KgCoOp save it")
        state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict", obj), dict) else obj
        info["epoch"] = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
        keys = [k for k, v in state.items() if isinstance(k, str) and k.split(".")[-1] == "ctx" and torch.is_tensor(v)]
        if not keys:
            found = sorted(str(k) for k in state)
            shown = ", ".join(found[:20]) + (f", … ({len(found)} keys)" if len(found) > 20 else "")
            raise ValueError(
                f"{path} has no context vectors: no 'ctx' entry among its keys [{shown}]. Give the prompt learner "
                "checkpoint CoOp/KgCoOp write (<output>/prompt_learner/model.pth.tar-<epoch> or model-best.pth.tar)"
            )
        if len(keys) > 1:
            raise ValueError(f"{path} has several context entries {keys}; keep one (the prompt learner's) and retry")
        key = keys[0]
        prefix = key[: -len("ctx")]
        siblings = [k[len(prefix):] for k in state if isinstance(k, str) and k.startswith(prefix) and k != key]
        unknown = [k for k in siblings if k not in IGNORED_KEYS]
        if unknown:
            raise ValueError(
                f"{path}: besides the context the prompt learner has parameters {unknown[:10]}; the text features of "
                "that method depend on them (e.g. CoCoOp's meta-net, MaPLe's deep prompts), so it cannot be loaded as a "
                "CoOp/KgCoOp context. Only CoOp and KgCoOp checkpoints are supported"
            )
        info["ignored_keys"] = sorted(siblings)
        info["other_keys"] = sum(1 for k in state if not (isinstance(k, str) and k.startswith(prefix)))
    ctx = state[key]
    info.update(key=key, dtype=str(ctx.dtype).replace("torch.", ""), shape=list(ctx.shape))
    if ctx.dim() not in (2, 3):
        raise ValueError(f"{path}: context {key!r} has shape {tuple(ctx.shape)}; expected (n_ctx, width) for a generic "
                         "context or (classes, n_ctx, width) for a class-specific one")
    if ctx.shape[-1] != expect_width:
        raise ValueError(f"{path}: ctx width {ctx.shape[-1]} but the model's text width is {expect_width}: this context "
                         "was trained for another CLIP model; use the cache of that model (or the matching checkpoint)")
    if ctx.dim() == 3 and n_classes is not None and ctx.shape[0] != n_classes:
        raise ValueError(f"{path}: class-specific context for {ctx.shape[0]} classes, but there are {n_classes} classes; "
                         "it was trained on another class list. Use a generic context, or the cache of that dataset")
    ctx = ctx.detach().float().clone()
    if not torch.isfinite(ctx).all():
        raise ValueError(f"{path}: the context has non-finite values (NaN/inf); training diverged, use another checkpoint")
    info.update(n_ctx=int(ctx.shape[-2]), csc=ctx.dim() == 3)
    return ctx, info
