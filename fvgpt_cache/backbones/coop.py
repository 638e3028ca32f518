"""CoOp and KgCoOp: prompt learning on the text side, trained from the cached image features.

CoOp and KgCoOp leave CLIP's image encoder untouched, so their image features are the cached
CLIP features and only the text side has to be computed: the learned context vectors go
through CLIP's text encoder for every class name (docs/method.md#backbone-training). Results are written
as `/text/<name>` groups of the cache, which `fvgpt-cache train --backbone <name>` then uses.

* `train_backbone` learns the context from the cached view-0 training features;
  the text encoder runs at every step, the CLIP model stays frozen.
* `load_backbone` reads a context trained elsewhere (CoOp / KgCoOp checkpoints in Dassl's
  layout) and writes its class features.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import sha256_of
from ..device import module_device, resolve_device
from ..evaluation import accuracy
from ..methods import COOP, KGCOOP, check_method_handled
from ..models import LoadedModel
from ..prompts import CLASS_TOKEN_POSITIONS, PromptLearner, prompt_features, text_width
from ..store import Cache, CacheError, open_cache, write_text_group
from ..training import CLASS_SETS, class_set, lr_at_epoch
from .cache_model import model_of, model_record
from .checkpoints import load_context, resolve_checkpoint

METHODS = (COOP.name, KGCOOP.name)  # the methods CoOp's prompt learner trains here
KGCOOP_CTX_INIT = "a photo of a"


def default_epochs(dataset: str | None, method: str) -> int:
    """The paper's epochs: 10, except CoOp on EuroSAT (20; docs/method.md#backbone-training, paper App. C.4)."""
    return 20 if (dataset or "").lower() == "eurosat" and method == COOP.name else 10


@dataclass
class BackboneConfig:
    """Options of one prompt-learning run (docs/method.md#backbone-training; CoOp/KgCoOp with Dassl's optimiser).

    `ctx_init`: "auto" means CoOp's random N(0, 0.02²) context for coop and "a photo of a" for
    kgcoop; None (or "" / "none") forces random initialisation; any other text initialises the
    context from the token embeddings of its words (n_ctx becomes its token count).
    """

    method: str = COOP.name
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
            return KGCOOP_CTX_INIT if self.method == KGCOOP.name else None
        if self.ctx_init is None or str(self.ctx_init).strip().lower() in ("", "none", "random"):
            return None
        return str(self.ctx_init)

    def validate(self) -> "BackboneConfig":
        def need(ok: bool, name: str, fix: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {fix}")

        check_method_handled(self.method, METHODS, "CoOp's prompt learner (backbone train)")
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
    """`_fit_backbone` (below); a `loaded` model given by the caller trains on `cfg.device` and is moved back after."""
    home = None if loaded is None else module_device(loaded.model)
    try:
        return _fit_backbone(cache, cfg, progress, loaded, pretrained)
    finally:
        if home is not None:
            loaded.model.to(home)


def _fit_backbone(cache: Cache | str | Path, cfg: BackboneConfig, progress: Callable[[int, int, dict], None] | None = None,
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
    loaded = model_of(cache, loaded, pretrained, device)
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
        sums: dict[str, torch.Tensor] = {}  # summed on the device: no host sync inside the epoch
        batches = 0
        for i in range(0, stop, cfg.batch_size):
            idx = order[i:i + cfg.batch_size].to(device)
            feats = learner()
            logits = scale * img[idx] @ F.normalize(feats, dim=-1).T
            ce = F.cross_entropy(logits, y[idx])
            loss = ce
            if cfg.method == KGCOOP.name:
                kg = kgcoop_loss_term(feats, clip_txt)
                loss = ce + cfg.kg_weight * kg
                sums["kg"] = sums.get("kg", 0) + kg.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] = sums.get("loss", 0) + loss.detach()
            sums["ce"] = sums.get("ce", 0) + ce.detach()
            sums["acc"] = sums.get("acc", 0) + (logits.argmax(-1) == y[idx]).float().mean() * 100
            batches += 1
        means = torch.stack(list(sums.values())).div(max(batches, 1)).tolist() if sums else []  # one sync per epoch
        history.append({"epoch": epoch, "lr": lr, **dict(zip(sums, means))})
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
                ctx_shape=list(ctx.shape), image_encoder="clip", clip_model=model_record(loaded),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if checkpoint is not None:
        prov.update(checkpoint=str(Path(checkpoint).resolve()), checkpoint_sha256=sha256_of(Path(checkpoint)))
    write_text_group(cache.path, name, feats, prov)
    return feats



def load_backbone(cache_path: str | Path, checkpoint: str | Path, method: str, name: str | None = None,
                  pretrained: str | None = None, class_token_position: str = "end",
                  device: str | torch.device = "cpu", loaded: LoadedModel | None = None) -> dict:
    """Write `/text/<name or method>` from a CoOp / KgCoOp checkpoint trained elsewhere; returns a summary."""
    check_method_handled(method, METHODS, "a CoOp-style context checkpoint (backbone load)")
    if class_token_position not in CLASS_TOKEN_POSITIONS:
        raise ValueError(f"class_token_position={class_token_position!r}: choose one of {CLASS_TOKEN_POSITIONS}")
    cache = open_cache(cache_path)
    loaded = model_of(cache, loaded, pretrained, device)
    ckpt = resolve_checkpoint(checkpoint)
    ctx, info = load_context(ckpt, text_width(loaded.model))
    _check_csc_classes(ctx, cache, str(ckpt))
    name = name or method
    meta = {"method": method, "source": "checkpoint", "epoch": info.get("epoch"), "checkpoint_key": info["key"],
            "checkpoint_dtype": info["dtype"]}
    feats = write_backbone(cache.path, name, ctx, meta, loaded, class_token_position=class_token_position, checkpoint=ckpt)
    return {**info, "name": name, "method": method, "checkpoint": str(ckpt), "ctx_shape": list(ctx.shape),
            "shape": list(feats.shape)}
