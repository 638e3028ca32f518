"""Reading checkpoints written by the official prompt-learning code (Dassl's layout), safely.

Files are read with `torch.load(weights_only=True)`. Dassl also pickles objects into its
checkpoints: the scheduler's `state_dict()` holds the successor scheduler object (for example
`CosineAnnealingLR` inside `ConstantWarmupScheduler`), and that object holds the optimiser. Those
classes, and only those (`DASSL_PICKLED`), are replaced by inert stand-ins, never executed; a
file that pickles anything else is refused with the class named.
"""
from __future__ import annotations

import collections
import hashlib
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ..data import sha256_of
from ..methods import COOP, backbone_methods, find_backbone_method
from ..store import FINGERPRINT_CHARS, Cache, CacheError

# State-dict entries of CoOp / KgCoOp prompt learners that do not take part in the text features:
# CoOp's frozen token embeddings (recomputed here from the class names) and KgCoOp's unused
# `bias_vectors` and `meta_net` (defined but never called in its forward pass, and not trained).
IGNORED_KEYS = ("token_prefix", "token_suffix", "token_midfix", "bias_vectors", "meta_net.linear1.weight",
                "meta_net.linear1.bias")


BACKBONE_RECORD = "backbone.json"  # what a backbone folder holds and which cache content it was trained from


def default_backbone_dir(cache: Cache, name: str, seed: int, settings: dict,
                         root: Path = Path("cache/backbones")) -> Path:
    """`root/<dataset>/<cache stem>-<name>-seed<S>-<key>`; the key hashes the content the backbone trains
    from (the cache's CLIP features, `Cache.input_fingerprint`) and its settings, so two caches with
    the same file name, or two settings on one cache, never share a folder."""
    key = hashlib.sha256(json.dumps([cache.input_fingerprint("clip"), name, settings], sort_keys=True,
                                    default=str).encode()).hexdigest()[:FINGERPRINT_CHARS]
    dataset = str(cache.provenance.get("dataset") or cache.path.parent.name).replace("/", "_")
    return Path(root) / dataset / f"{cache.path.stem}-{name}-seed{seed}-{key}"


def claim_backbone_dir(folder: Path, cache: Cache, force: bool = False) -> None:
    """Refuse to write into a folder that holds another cache's backbone (or a checkpoint of unknown
    origin) unless `force`; both caches are named."""
    folder = Path(folder)
    if force or not folder.exists():
        return
    record = folder / BACKBONE_RECORD
    mine = cache.input_fingerprint("clip")
    if record.is_file():
        try:
            other = json.loads(record.read_text())
        except (OSError, ValueError):
            other = {}
        theirs = other.get("cache_fingerprint")
        if theirs == mine:
            return
        raise CacheError(f"{folder} holds the backbone of another cache: {other.get('cache', '?')} (content "
                         f"{str(theirs)[:FINGERPRINT_CHARS] if theirs else 'not recorded'}), not {cache.path} (content "
                         f"{mine[:FINGERPRINT_CHARS]}); choose another --out, or pass --force to replace it")
    if any(folder.rglob("model.pth.tar-*")):
        raise CacheError(f"{folder} holds a checkpoint of unknown origin (no {BACKBONE_RECORD}); choose another --out, "
                         f"or pass --force to replace it with the backbone of {cache.path}")


def save_coop_checkpoint(directory: str | Path, ctx: torch.Tensor, epoch: int) -> Path:
    """Write `<directory>/prompt_learner/model.pth.tar-<epoch>` as Dassl does (`state_dict` with `ctx`, `epoch`)."""
    path = Path(directory) / "prompt_learner" / f"model.pth.tar-{int(epoch)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": collections.OrderedDict(ctx=ctx.detach().cpu().clone()), "epoch": int(epoch)}, path)
    return path


POINTER_FILE = "checkpoint"  # Dassl's save_checkpoint writes the name of the last file it saved here


def _epoch_files(folder: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), f) for f in folder.iterdir()
                  if (m := re.fullmatch(r"model\.pth\.tar-(\d+)", f.name)) and f.is_file())


def find_checkpoint(path: str | Path, method: str = COOP.name, prefer_best: bool | None = None) -> tuple[Path, str]:
    """The checkpoint file `path` means, and how it was chosen.

    `path` is a file, a method's checkpoint folder (`prompt_learner/`, `VLPromptLearner/`, ...) or
    the output folder holding it. In a folder: CoOp/KgCoOp take `model-best.pth.tar` when present
    (`prefer_best`), otherwise every method takes the highest epoch `model.pth.tar-<N>`, then the
    file Dassl's `checkpoint` pointer names, then `model-best.pth.tar`.
    """
    path = Path(path)
    if path.is_file():
        return path, "given file"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # the folder Dassl writes a method's checkpoints to: the name its trainer registers the model under
    entry = find_backbone_method(method)
    names = entry.checkpoint_folders if entry is not None and entry.checkpoint_folders else ("prompt_learner",)
    prefer_best = bool(entry and entry.prefer_best_checkpoint) if prefer_best is None else prefer_best
    tried = []
    for folder in (*(path / n for n in names), path):
        if not folder.is_dir():
            continue
        best = folder / "model-best.pth.tar"
        if prefer_best and best.is_file():
            return best, "model-best.pth.tar"
        epochs = _epoch_files(folder)
        tried.append(str(folder / "model.pth.tar-<epoch>"))
        if epochs:
            return epochs[-1][1], f"latest epoch {epochs[-1][0]} of {[e for e, _ in epochs]}"
        pointer = folder / POINTER_FILE
        if pointer.is_file():
            named = folder / pointer.read_text().strip()
            tried.append(f"{pointer} -> {named.name}")
            if named.is_file():
                return named, f"named by {pointer.name}"
        tried.append(str(best))
        if best.is_file():
            return best, "model-best.pth.tar"
    others = sorted({f"{d}/" for m in backbone_methods() for d in m.checkpoint_folders
                     if d not in names and (path / d).is_dir()})
    hint = (f" It holds {', '.join(others)}, the checkpoint folder of another method; pass the matching --method."
            if others else f" Expected {' or '.join(f'{n}/' for n in names)} inside the output folder.")
    raise FileNotFoundError(f"no {method} checkpoint in {path}; looked for {', '.join(tried) or 'a checkpoint folder'}."
                            + hint)


def resolve_checkpoint(path: str | Path, method: str = COOP.name) -> Path:
    """A checkpoint file, or an output folder: see `find_checkpoint`."""
    return find_checkpoint(path, method)[0]


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


# The objects Dassl's checkpoints pickle besides tensors: the successor inside its warm-up
# scheduler (the schedulers `build_lr_scheduler` makes), the optimiser that scheduler holds (the
# optimisers `build_optimizer` makes), Dassl's own warm-up wrappers, and the containers of their state.
DASSL_PICKLED = (
    "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
    "dassl.optim.lr_scheduler.ConstantWarmupScheduler", "dassl.optim.lr_scheduler.LinearWarmupScheduler",
    "torch.optim.sgd.SGD", "torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.rmsprop.RMSprop",
    "dassl.optim.radam.RAdam",
)
_CONTAINERS = {"builtins.dict": dict, "collections.defaultdict": _plain_dict, "collections.OrderedDict": collections.OrderedDict}


def _torch_load(path: Path):
    """`torch.load(weights_only=True)`. A Dassl checkpoint also pickles its scheduler and optimiser
    objects, which the safe loader refuses; the pickled classes are listed first, exactly those in
    `DASSL_PICKLED` are replaced by inert stand-ins (no code of theirs runs) and the file is read,
    still with `weights_only=True`. Any other pickled class is refused by name."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    names = []
    if zipfile.is_zipfile(path):  # torch.save's format: list the pickled classes first, then read the file once
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {_short(exc)})") from exc
    if not names:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({_short(exc)}); checkpoints of the official "
                             "code are files written by torch.save, e.g. <output>/<learner folder>/model.pth.tar-<epoch>"
                             ) from exc
        except Exception as exc:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {_short(exc)})") from exc
    unknown = [n for n in names if n not in _CONTAINERS and n not in DASSL_PICKLED]
    if unknown:
        raise ValueError(
            f"{path} pickles {', '.join(unknown)}, which is not one of the optimiser and scheduler classes Dassl "
            "stores in its checkpoints; it is not read (weights_only=True). Load it yourself in a trusted environment "
            "and save only its tensors: torch.save({'state_dict': checkpoint['state_dict']}, path)"
        )
    allowed = [(_CONTAINERS.get(n) or _stub(n), n) for n in names]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} cannot be read with weights_only=True ({_short(exc)}); load it yourself and save "
                         "its state_dict with torch.save") from exc


def load_state_dict(file: str | Path, method: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a Dassl checkpoint (`{"state_dict", "epoch", "optimizer", "scheduler", ...}`) and
    facts about the file: path, how it was chosen, SHA-256, epoch, dtypes. `module.` prefixes
    (DataParallel) are dropped. `file` may be an output folder (see `find_checkpoint`)."""
    path, choice = find_checkpoint(file, method)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict; expected Dassl's "
                         "{'state_dict': ..., 'epoch': ...}")
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict of tensors")
    tensors = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()
               if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors under 'state_dict'; give the checkpoint the official trainer wrote")
    epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    dtypes = collections.Counter(str(v.dtype).replace("torch.", "") for v in tensors.values())
    info = {"file": str(path.resolve()), "choice": choice, "sha256": sha256_of(path), "epoch": epoch,
            "dtypes": dict(sorted(dtypes.items())), "keys": len(tensors)}
    return tensors, info


def check_against_model(state: dict[str, torch.Tensor], model: torch.nn.Module, key_map: dict[str, str],
                        path: str, tolerance: float = 0.05) -> int:
    """Compare the frozen CLIP weights a checkpoint carries with the cache's model; returns how many were compared.

    `key_map` maps a checkpoint prefix to the open_clip prefix it stands for (`image_encoder.` →
    `visual.`). A checkpoint key without a counterpart in the model, or with another shape, is
    refused naming the key and both shapes; so is a model block the checkpoint lacks (another
    depth), and weights that differ by more than `tolerance` (relative L2) from the model's (the
    checkpoint was trained on other CLIP weights). The official checkpoints store these weights in
    fp16, and PromptSRC's as a sum of its epoch-weighted averages, so values are never compared bit
    for bit.
    """
    ours = model.state_dict()
    pairs = []
    seen_blocks: dict[str, set[int]] = {}
    for key, value in state.items():
        prefix = next((p for p in key_map if key.startswith(p)), None)
        if prefix is None:
            continue
        name = key_map[prefix] + key[len(prefix):]
        block = re.match(r"(.*transformer\.resblocks\.)(\d+)\.", name)
        if block:
            seen_blocks.setdefault(block.group(1), set()).add(int(block.group(2)))
        if name not in ours:
            raise ValueError(_mismatch(path, key, tuple(value.shape), name, None, ours))
        if tuple(ours[name].shape) != tuple(value.shape):
            raise ValueError(_mismatch(path, key, tuple(value.shape), name, tuple(ours[name].shape), ours))
        pairs.append((key, value, ours[name]))
    for stem, have in seen_blocks.items():
        depth = 1 + max(int(m.group(1)) for k in ours if (m := re.match(re.escape(stem) + r"(\d+)\.", k)))
        missing = sorted(set(range(depth)) - have)
        if missing:
            theirs = next(p for p, q in key_map.items() if stem.startswith(q))
            raise ValueError(f"{path}: the cache's model has {depth} blocks in {stem[:-1]} but the checkpoint has "
                             f"{len(have)} ({theirs}… has no block {missing[0]}): it was trained for a model of another "
                             "depth; use the cache of that model")
    for key, value, ref in pairs:
        ref = ref.detach().float().cpu()
        diff = float((value.float() - ref).norm() / (ref.norm() + 1e-6))
        if diff > tolerance and float(ref.norm()) > 0:
            raise ValueError(
                f"{path}: the frozen CLIP weights in the checkpoint differ from the cache's model at {key} (relative "
                f"difference {diff:.3f}): the checkpoint was trained on other CLIP weights than the cache was extracted "
                "with. Use a cache extracted with the CLIP model the checkpoint was trained on (OpenAI ViT-B/16 for "
                "the official configs)"
            )
    return len(pairs)


def _mismatch(path: str, key: str, shape: tuple, name: str, ours_shape: tuple | None, ours: dict) -> str:
    if ours_shape is not None:
        return (f"{path}: {key} has shape {shape} in the checkpoint but {name} of the cache's model has shape "
                f"{ours_shape}: the checkpoint was trained for another CLIP model (other width); use the cache of that model")
    block = re.match(r"(.*transformer\.resblocks\.)(\d+)\.", name)
    if block:
        depth = 1 + max((int(m.group(1)) for k in ours if (m := re.match(re.escape(block.group(1)) + r"(\d+)\.", k))),
                        default=-1)
        return (f"{path}: {key} (shape {shape}) has no counterpart {name} in the cache's model, which has {depth} blocks "
                f"in {block.group(1)[:-1]}: the checkpoint was trained for a model of another depth; use the cache of "
                "that model")
    return (f"{path}: {key} (shape {shape}) has no counterpart {name} in the cache's model: the checkpoint was trained "
            "for another kind of CLIP model")


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


# Methods whose checkpoints are recognised to refuse them by name, but that cannot be loaded: (label, key test)
UNSUPPORTED_CHECKPOINTS = {"maple": ("MaPLe", lambda k: "compound_prompts" in k),
                           "cocoop": ("CoCoOp", lambda k: "meta_net.linear2" in k)}


def _checkpoint_tests() -> list[tuple[str, object]]:
    """(method, key test) in the order they are tried: registered methods' own keys, the unsupported methods',
    then keys other prompt learners share (CoOp's `ctx`)."""
    registered = [m for m in backbone_methods() if m.checkpoint_key is not None]
    return ([(m.name, m.checkpoint_key) for m in registered if not m.checkpoint_key_shared]
            + [(name, test) for name, (_, test) in UNSUPPORTED_CHECKPOINTS.items()]
            + [(m.name, m.checkpoint_key) for m in registered if m.checkpoint_key_shared])


def identify_method(state: dict) -> tuple[str | None, str | None]:
    """Which official method wrote a state dict, by a key only that method has: (method, key). Methods that
    share a key (CoOp and KgCoOp) are told as the first registered of them."""
    keys = sorted(state)
    for method, test in _checkpoint_tests():
        hit = next((k for k in keys if test(k)), None)
        if hit is not None:
            return method, hit
    return None, None


def _checkpoint_family(method: str) -> list:
    """The registered methods whose checkpoints share `method`'s key (CoOp and KgCoOp); [] if unregistered."""
    entry = find_backbone_method(method)
    if entry is None or entry.checkpoint_key is None:
        return [entry] if entry is not None else []
    return [m for m in backbone_methods() if m.checkpoint_key is entry.checkpoint_key]


def _checkpoint_label(method: str) -> str:
    family = _checkpoint_family(method)
    if family:
        return "/".join(m.label for m in family)
    return UNSUPPORTED_CHECKPOINTS[method][0] if method in UNSUPPORTED_CHECKPOINTS else method


def refuse_other_method(state: dict, method: str, path: str, needed_key: str) -> None:
    """Refuse a checkpoint of another method than `method` (or of none we know), naming the key that tells."""
    found, key = identify_method(state)
    if found == method:
        return
    entry = find_backbone_method(found)
    if entry is not None and entry.written == "imported":
        fix = f"pass --method {found}"
    elif entry is not None:
        names = "|".join(m.name for m in _checkpoint_family(found))
        fix = f"a {_checkpoint_label(found)} context is imported with `fvgpt-cache backbone load --method {names}`"
    elif found is not None:
        fix = f"{_checkpoint_label(found)} is not supported"
    else:
        shown = ", ".join(sorted(state)[:8]) + (", …" if len(state) > 8 else "")
        raise ValueError(f"{path} has no {needed_key}; its keys are [{shown}]. Give the checkpoint the official "
                         f"{_checkpoint_label(method)} trainer wrote")
    raise ValueError(f"{path} is a {_checkpoint_label(found)} checkpoint (it has {key}), not {_checkpoint_label(method)} "
                     f"(no {needed_key}); {fix}")
