"""Tuned backbones from a cache: CoOp and KgCoOp prompt learning, official checkpoints, prompt ensembles.

CoOp and KgCoOp leave CLIP's image encoder untouched, so their image features are the cached
CLIP features and only the text side has to be computed: the learned context vectors go
through CLIP's text encoder for every class name (SPEC §1, §3 "Backbones"). Results are written
as `/text/<name>` groups of the cache, which `fvgpt-cache train --backbone <name>` then uses.

* `train_backbone` learns the context from the cached view-0 (test-time crop) training features;
  the text encoder runs at every step, the CLIP model stays frozen.
* `load_backbone` reads a context trained elsewhere (CoOp / KgCoOp checkpoints in Dassl's
  layout) and writes its class features.
* `write_ensemble` writes CLIP's prompt-ensemble text features (80 or 7 ImageNet templates).

Every one of them first rebuilds the CLIP model the cache was extracted with (`model_for_cache`)
and checks that it reproduces the cache's zero-shot text features, so a context can never be
paired with other weights than the cached image features came from.
"""
from __future__ import annotations

import collections
import json
import pickle
import re
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from .data import sha256_of
from .evaluation import accuracy
from .extraction import class_prompt, encode_texts
from .models import LoadedModel, load_clip
from .prompts import CLASS_TOKEN_POSITIONS, PromptLearner, check_prompt_model, prompt_features, text_width
from .store import Cache, CacheError, open_cache, write_text_group
from .training import CLASS_SETS, class_set, lr_at_epoch, resolve_device

METHODS = ("coop", "kgcoop")
KGCOOP_CTX_INIT = "a photo of a"
TEMPLATE_SETS = {"imagenet80": tuple(OPENAI_IMAGENET_TEMPLATES), "imagenet7": tuple(SIMPLE_IMAGENET_TEMPLATES)}
VERIFY_THRESHOLD = 0.999
# State-dict entries of CoOp / KgCoOp prompt learners that do not take part in the text features:
# CoOp's frozen token embeddings (recomputed here from the class names) and KgCoOp's unused
# `bias_vectors` and `meta_net` (defined but never called in its forward pass, and not trained).
IGNORED_KEYS = ("token_prefix", "token_suffix", "token_midfix", "bias_vectors", "meta_net.linear1.weight",
                "meta_net.linear1.bias")


def default_epochs(dataset: str | None, method: str) -> int:
    """The paper's epochs: 10, except CoOp on EuroSAT (20; SPEC §3, paper App. C.4)."""
    return 20 if (dataset or "").lower() == "eurosat" and method == "coop" else 10


@dataclass
class BackboneConfig:
    """Options of one prompt-learning run (SPEC §3 "Backbones"; CoOp/KgCoOp with Dassl's optimiser).

    `ctx_init`: "auto" means CoOp's random N(0, 0.02²) context for coop and "a photo of a" for
    kgcoop; None (or "" / "none") forces random initialisation; any other text initialises the
    context from the token embeddings of its words (n_ctx becomes its token count).
    """

    method: str = "coop"
    n_ctx: int = 4
    ctx_init: str | None = "auto"
    csc: bool = False
    class_token_position: str = "end"
    epochs: int = 10
    batch_size: int = 4
    lr: float = 0.0035
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    drop_last: bool = True
    kg_weight: float = 2.0
    classes: str = "base"
    seed: int = 1
    device: str = "auto"

    @property
    def init_text(self) -> str | None:
        """The context initialisation text after resolving "auto" (None: random)."""
        if self.ctx_init == "auto":
            return KGCOOP_CTX_INIT if self.method == "kgcoop" else None
        if self.ctx_init is None or str(self.ctx_init).strip().lower() in ("", "none", "random"):
            return None
        return str(self.ctx_init)

    def validate(self) -> "BackboneConfig":
        def need(ok: bool, name: str, fix: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {fix}")

        need(self.method in METHODS, "method", f"choose one of {METHODS}")
        need(isinstance(self.n_ctx, int) and self.n_ctx >= 1, "n_ctx", "use a positive number of context tokens")
        need(self.class_token_position in CLASS_TOKEN_POSITIONS, "class_token_position",
             f"choose one of {CLASS_TOKEN_POSITIONS}")
        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "use a positive integer")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "use a positive integer")
        need(self.lr > 0, "lr", "use a positive learning rate")
        need(0 <= self.momentum < 1, "momentum", "use a momentum in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "use a non-negative weight decay")
        need(isinstance(self.warmup_epochs, int) and 0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
             "use 0 ≤ warmup_epochs < epochs")
        need(self.warmup_lr > 0, "warmup_lr", "use a positive warm-up learning rate")
        need(self.kg_weight >= 0, "kg_weight", "use a non-negative weight W")
        need(self.classes in CLASS_SETS, "classes", f"choose one of {CLASS_SETS}")
        need(self.device in ("auto", "cpu", "cuda"), "device", "choose auto, cpu or cuda")
        need(not (self.csc and self.classes == "base"), "csc",
             "a class-specific context has no vectors for new classes, so it cannot give base-to-new features; "
             "use csc=False (generic context) or classes='all'")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# The model of a cache


def _model_argument(prov: dict, tmp: Path) -> str:
    """The `model` argument for `load_clip`: the name, the config JSON, or the JSON rebuilt from provenance."""
    model = prov.get("model")
    if not model.endswith(".json"):
        return model
    path = Path(model)
    config = prov.get("model_config")
    if path.is_file() and (prov.get("model_config_sha256") in (None, sha256_of(path)) or config is None):
        return str(path)
    if config is None:
        raise CacheError(f"the model config {path} the cache was extracted with is gone and the cache does not record "
                         "its contents; put the config file back at that path")
    rebuilt = tmp / path.name
    rebuilt.write_text(json.dumps(config))
    return str(rebuilt)


def _weights_argument(cache: Cache, pretrained: str | None) -> str | None:
    prov = cache.provenance
    recorded_sha = prov.get("pretrained_sha256")
    if pretrained is not None:
        if str(pretrained).lower() == "none":
            return None
        path = Path(pretrained)
        if path.is_file() and recorded_sha and sha256_of(path) != recorded_sha:
            raise CacheError(
                f"{path} (SHA-256 {sha256_of(path)[:12]}…) is not the weights file {cache.path} was extracted with "
                f"(SHA-256 {recorded_sha[:12]}…, {prov.get('pretrained_file')}); pass that file"
            )
        return str(pretrained)
    if prov.get("random_init") or prov.get("pretrained") in (None, "none"):
        return None
    file = prov.get("pretrained_file")
    if file:
        path = Path(file)
        if not path.is_file():
            raise CacheError(
                f"{cache.path} was extracted with the weights file {file}, which is not there any more; pass the "
                f"same checkpoint with --pretrained PATH (its SHA-256 must be {recorded_sha})"
            )
        if recorded_sha and sha256_of(path) != recorded_sha:
            raise CacheError(f"the weights file {file} changed since {cache.path} was extracted (SHA-256 differs); "
                             "pass the original checkpoint with --pretrained PATH")
        return str(path)
    return str(prov["pretrained"])


def verify_model(cache: Cache, loaded: LoadedModel, n_classes: int = 8, device: str | torch.device = "cpu") -> float:
    """Check that `loaded` reproduces the cache's zero-shot text features; returns the lowest cosine.

    The cache's `/text/clip` rows were computed at extraction from the class names and the
    template; a few of them are recomputed and compared (cosine > 0.999).
    """
    template = cache.text_attrs("clip").get("template") or cache.provenance.get("template")
    if not template:
        raise CacheError(f"{cache.path} records no template for its CLIP text features; cannot verify the model")
    names = cache.classnames
    idx = np.unique(np.linspace(0, len(names) - 1, min(n_classes, len(names))).round().astype(int))
    got = encode_texts(loaded, [class_prompt(str(template), names[i]) for i in idx], torch.device(device))
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


def _model_of(cache: Cache, loaded: LoadedModel | None, pretrained: str | None, device) -> LoadedModel:
    """The cache's model: rebuilt from provenance, or the one given, checked against the cache."""
    if loaded is None:
        return model_for_cache(cache, pretrained, device)
    verify_model(cache, loaded, device=loaded.model.token_embedding.weight.device)
    return loaded


# --------------------------------------------------------------------------------------------
# Training


def kgcoop_loss_term(prompt_feats: torch.Tensor, clip_feats: torch.Tensor) -> torch.Tensor:
    """KgCoOp's knowledge-guided term `1 − mean_c cos(g_ctx(t_c), g_clip(t_c))`; inputs need not be normalised."""
    if prompt_feats.shape != clip_feats.shape:
        raise ValueError(f"prompt features {tuple(prompt_feats.shape)} and CLIP features {tuple(clip_feats.shape)} differ in shape")
    a = F.normalize(prompt_feats.float(), dim=-1)
    b = F.normalize(clip_feats.float().to(a.device), dim=-1)
    return 1.0 - (a * b).sum(-1).mean()


@dataclass
class BackboneResult:
    """What `train_backbone` returns; accuracies in percent."""

    ctx: torch.Tensor
    history: list[dict]
    metrics: dict
    class_ids: np.ndarray
    config: dict
    seconds: float
    train_images: int
    loaded: LoadedModel | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"ctx_shape": list(self.ctx.shape), "history": self.history, "metrics": self.metrics,
                "class_ids": [int(c) for c in self.class_ids], "config": self.config, "seconds": self.seconds,
                "train_images": self.train_images}


def _rows_of(cache: Cache, split: str, class_ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """Rows of `split` whose label is in `class_ids`, and their labels as positions in it."""
    if split not in cache.splits:
        return np.zeros(0, dtype=np.int64), torch.zeros(0, dtype=torch.long)
    labels = cache.labels(split).numpy()
    position = np.full(len(cache.classnames), -1)
    position[class_ids] = np.arange(len(class_ids))
    rows = np.flatnonzero(position[labels] >= 0)
    return rows, torch.from_numpy(position[labels[rows]]).long()


def _view0(cache: Cache, split: str, rows: np.ndarray) -> torch.Tensor:
    if rows.size == 0:
        return torch.zeros(0, cache.text("clip").shape[1])
    return F.normalize(cache.image(split, "full")[rows, 0], dim=-1)


def _acc(img: torch.Tensor, txt: torch.Tensor, y: torch.Tensor) -> float | None:
    return accuracy(img @ F.normalize(txt, dim=-1).T, y) if y.numel() else None


def train_backbone(cache: Cache | str | Path, cfg: BackboneConfig, progress: Callable[[int, int, dict], None] | None = None,
                   loaded: LoadedModel | None = None, pretrained: str | None = None) -> BackboneResult:
    """Learn CoOp / KgCoOp context vectors from the cached view-0 full-image training features.

    logits = s · n(f(x)) n(g_ctx(t_c))ᵀ with s the cache's logit scale; loss CE (+ W · the KgCoOp
    term against `/text/clip` of the same classes). SGD with Dassl's constant warm-up + cosine
    schedule stepped per epoch; batches shuffled by a generator seeded with `cfg.seed`; the last
    incomplete batch is dropped when there are at least `batch_size` images (Dassl).
    `progress(epoch, epochs, record)` is called after each epoch.
    """
    cfg.validate()
    cache = open_cache(cache) if not isinstance(cache, Cache) else cache
    device = resolve_device(cfg.device)
    loaded = _model_of(cache, loaded, pretrained, device)
    model = loaded.model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    started = time.perf_counter()

    class_ids = class_set(cache, cfg.classes)
    names = [cache.classnames[i] for i in class_ids]
    rows, y = _rows_of(cache, "train", class_ids)
    if rows.size == 0:
        raise CacheError(f"{cache.path} has no training images of the {cfg.classes} classes")
    img = _view0(cache, "train", rows).to(device)
    y = y.to(device)
    clip_txt = cache.text("clip")[class_ids].to(device)
    test_rows, test_y = _rows_of(cache, "test", class_ids)
    test_img = _view0(cache, "test", test_rows).to(device)
    test_y = test_y.to(device)
    scale = cache.logit_scale

    learner = PromptLearner(model, loaded.tokenizer, names, n_ctx=cfg.n_ctx, ctx_init=cfg.init_text, csc=cfg.csc,
                            class_token_position=cfg.class_token_position, seed=cfg.seed).to(device)
    with torch.no_grad():
        txt0 = learner()
        initial = {"train_acc": _acc(img, txt0, y), "test_acc": _acc(test_img, txt0, test_y)}
    optimizer = torch.optim.SGD([learner.ctx], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = rows.size
    stop = n - n % cfg.batch_size if cfg.drop_last and n >= cfg.batch_size else n
    history = []
    for epoch in range(cfg.epochs):
        lr = lr_at_epoch(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=gen)
        sums = collections.defaultdict(float)
        batches = 0
        for i in range(0, stop, cfg.batch_size):
            idx = order[i:i + cfg.batch_size].to(device)
            feats = learner()
            logits = scale * img[idx] @ F.normalize(feats, dim=-1).T
            ce = F.cross_entropy(logits, y[idx])
            loss = ce
            if cfg.method == "kgcoop":
                kg = kgcoop_loss_term(feats, clip_txt)
                loss = ce + cfg.kg_weight * kg
                sums["kg"] += float(kg.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += float(loss.detach())
            sums["ce"] += float(ce.detach())
            sums["acc"] += float((logits.argmax(-1) == y[idx]).float().mean() * 100)
            batches += 1
        history.append({"epoch": epoch, "lr": lr, **{k: v / max(batches, 1) for k, v in sums.items()}})
        if progress:
            progress(epoch + 1, cfg.epochs, history[-1])

    with torch.no_grad():
        txt = learner()
        metrics = {"train_acc": _acc(img, txt, y), "test_acc": _acc(test_img, txt, test_y), "test_acc_new": None,
                   "initial_train_acc": initial["train_acc"], "initial_test_acc": initial["test_acc"],
                   "scope": cfg.classes}
        if cfg.classes == "base" and not learner.csc and len(cache.new):
            new_rows, new_y = _rows_of(cache, "test", cache.new)
            if new_rows.size:
                new_txt = learner.text_features([cache.classnames[i] for i in cache.new])
                metrics["test_acc_new"] = _acc(_view0(cache, "test", new_rows).to(device), new_txt, new_y.to(device))
    return BackboneResult(ctx=learner.ctx.detach().float().cpu().clone(), history=history, metrics=metrics,
                          class_ids=class_ids, config=cfg.to_dict(), seconds=time.perf_counter() - started,
                          train_images=int(n), loaded=loaded)


# --------------------------------------------------------------------------------------------
# Writing class features into the cache


def _model_record(loaded: LoadedModel) -> dict:
    prov = loaded.provenance
    return {k: prov.get(k) for k in ("model", "pretrained", "pretrained_sha256", "quick_gelu", "init_seed")}


@torch.no_grad()
def backbone_features(loaded: LoadedModel, classnames: Sequence[str], ctx: torch.Tensor,
                      class_token_position: str = "end") -> torch.Tensor:
    """L2-normalised (C, D) float32 features of every class with context `ctx` (CPU)."""
    feats = prompt_features(loaded.model, loaded.tokenizer, classnames, ctx, class_token_position)
    return F.normalize(feats.float(), dim=-1).cpu()


def _check_csc_classes(ctx: torch.Tensor, cache: Cache, source: str) -> None:
    if ctx.dim() != 3 or ctx.shape[0] == len(cache.classnames):
        return
    if ctx.shape[0] == len(cache.base):
        raise CacheError(
            f"{source}: the class-specific context has vectors for the {ctx.shape[0]} base classes only; a class-specific "
            f"context (CoOp's CSC) has no generic part, so it cannot give features of the {len(cache.new)} new classes of "
            f"{cache.path}. Use a generic context (trained with CSC off), or a class-specific context trained on all "
            f"{len(cache.classnames)} classes"
        )
    raise CacheError(f"{source}: the class-specific context is for {ctx.shape[0]} classes but {cache.path} has "
                     f"{len(cache.classnames)}; it was trained on another class list")


def write_backbone(cache_path: str | Path, name: str, ctx: torch.Tensor, meta: BackboneConfig | dict,
                   loaded: LoadedModel, *, class_token_position: str | None = None,
                   checkpoint: str | Path | None = None) -> torch.Tensor:
    """Write `/text/<name>`: the features of EVERY class of the cache with context `ctx`.

    `meta` is the run's BackboneConfig or a provenance dict with at least `method`. Returns the
    written (C, D) features.
    """
    cache = open_cache(cache_path)
    if isinstance(meta, BackboneConfig):
        prov = {"method": meta.method, "options": meta.to_dict(), "seed": meta.seed, "epochs": meta.epochs,
                "ctx_init_resolved": meta.init_text}
        position = class_token_position or meta.class_token_position
    else:
        prov = dict(meta)
        if "method" not in prov:
            raise ValueError("the provenance of a backbone needs a 'method' entry (coop, kgcoop, ...)")
        position = class_token_position or prov.get("class_token_position") or \
            prov.get("options", {}).get("class_token_position", "end")
    ctx = ctx.detach().float().cpu()
    if ctx.shape[-1] != text_width(loaded.model):
        raise ValueError(f"ctx width {ctx.shape[-1]} but the model's text width is {text_width(loaded.model)}: "
                         "this context was trained for another CLIP model")
    _check_csc_classes(ctx, cache, f"backbone {name!r}")
    feats = backbone_features(loaded, cache.classnames, ctx, position)
    prov.update(n_ctx=int(ctx.shape[-2]), csc=ctx.dim() == 3, class_token_position=position,
                ctx_shape=list(ctx.shape), image_encoder="clip", clip_model=_model_record(loaded),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if checkpoint is not None:
        prov.update(checkpoint=str(Path(checkpoint).resolve()), checkpoint_sha256=sha256_of(Path(checkpoint)))
    write_text_group(cache.path, name, feats, prov)
    return feats


# --------------------------------------------------------------------------------------------
# Checkpoints in CoOp's (Dassl's) layout


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


def load_backbone(cache_path: str | Path, checkpoint: str | Path, method: str, name: str | None = None,
                  pretrained: str | None = None, class_token_position: str = "end",
                  device: str | torch.device = "cpu", loaded: LoadedModel | None = None) -> dict:
    """Write `/text/<name or method>` from a CoOp / KgCoOp checkpoint trained elsewhere; returns a summary."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {METHODS} (other methods change more than the context)")
    if class_token_position not in CLASS_TOKEN_POSITIONS:
        raise ValueError(f"class_token_position={class_token_position!r}: choose one of {CLASS_TOKEN_POSITIONS}")
    cache = open_cache(cache_path)
    loaded = _model_of(cache, loaded, pretrained, device)
    ckpt = resolve_checkpoint(checkpoint)
    ctx, info = load_context(ckpt, text_width(loaded.model))
    _check_csc_classes(ctx, cache, str(ckpt))
    name = name or method
    meta = {"method": method, "source": "checkpoint", "epoch": info.get("epoch"), "checkpoint_key": info["key"],
            "checkpoint_dtype": info["dtype"]}
    feats = write_backbone(cache.path, name, ctx, meta, loaded, class_token_position=class_token_position, checkpoint=ckpt)
    return {**info, "name": name, "method": method, "checkpoint": str(ckpt), "ctx_shape": list(ctx.shape),
            "shape": list(feats.shape)}


# --------------------------------------------------------------------------------------------
# CLIP's prompt ensembling


def _fill(template, classname: str) -> str:
    name = classname.replace("_", " ")
    return template(name) if callable(template) else str(template).format(name)


@torch.no_grad()
def ensemble_text_features(loaded: LoadedModel, classnames: Sequence[str], templates: Sequence,
                           device: str | torch.device = "cpu") -> torch.Tensor:
    """CLIP's prompt ensembling: mean of the normalised features over templates, re-normalised (C, D).

    A template is a string with `{}` or a callable of the class name (open_clip's lists).
    """
    if not templates:
        raise ValueError("give at least one template")
    device = torch.device(device) if isinstance(device, str) else device
    total = None
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
    loaded = _model_of(cache, loaded, pretrained, device)
    templates = TEMPLATE_SETS[template_set]
    feats = ensemble_text_features(loaded, cache.classnames, templates, loaded.model.token_embedding.weight.device)
    name = name or f"clip_{template_set}"
    prov = {"method": "clip_ensemble", "template_set": template_set, "templates": len(templates),
            "example": _fill(templates[0], "{}"), "image_encoder": "clip", "clip_model": _model_record(loaded),
            "open_clip_version": open_clip.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text_group(cache.path, name, feats, prov)
    return {"name": name, "template_set": template_set, "templates": len(templates), "shape": list(feats.shape)}
