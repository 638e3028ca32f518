"""MMRL (Guo et al., CVPR 2025): a shared representation space whose tokens enter both towers,
imported from the official checkpoints (yunncheng/MMRL, `trainers/mmrl.py`, `clip/model_mmrl.py`).

What the official code computes, on open_clip's batch-first towers:

* `representation_learner.compound_rep_tokens` (n_rep × REP_DIM; REP_DIM 512, 2048 for EuroSAT)
  is mapped for the k-th representation layer by `…compound_rep_tokens_r2vproj.<k>` (vision) and
  `…_r2tproj.<k>` (text), each `nn.Linear(REP_DIM, width)`, and cast to the model's dtype.
* Representation layers are numbered from 1 (block i is layer i + 1). Before the first one the n_rep
  tokens are inserted right after the class token (vision) / the start token (text); before each
  later one they replace those n_rep positions. Vision tokens enter after `ln_pre`.
* Text: the dataset's template ("a photo of a {}." …, the cache's own), no learned context. From
  the first representation layer on, the causal mask covers the grown sequence; the feature is
  taken at the end token's position shifted by n_rep.
* Image: the class-token feature f_cls = `ln_post(x_cls) @ proj`; the representation feature f_rep
  = the mean over the n_rep tokens of `ln_post(token)`, times `image_encoder.proj_rep`.
* Logits: `100 · n(f_cls) · n(g)` and `100 · n(f_rep) · n(g)`; at test time the base classes of
  base-to-new (and the source of cross-dataset) use α · the first + (1 − α) · the second (α =
  TRAINER.MMRL.ALPHA = 0.7, not stored in the checkpoint), new classes (and cross-dataset targets)
  the class-token logits alone.

The checkpoint stores K projections but not REP_LAYERS: the default is the last K blocks (6…12 of
ViT-B/16's 12 for K = 7, the official configs); `rep_layers` overrides it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .. import methods
from .checkpoints import check_against_model, refuse_other_method
from .towers import causal_mask, check_vit_clip, expand_tokens, image_head, patch_tokens, text_head

DEFAULT_ALPHA = 0.7  # cfg.TRAINER.MMRL.ALPHA in every official config
REP_KEY = "representation_learner.compound_rep_tokens"
PROJ_REP_KEY = "image_encoder.proj_rep"
PROMPTS_KEY = "prompt_embeddings"
_PROJ = re.compile(r"representation_learner\.compound_rep_tokens_r2([vt])proj\.(\d+)\.(weight|bias)")
FROZEN_KEYS = {"image_encoder.": "visual.", "text_encoder.": ""}
_LEARNED = ("representation_learner.", PROJ_REP_KEY, PROMPTS_KEY)


@dataclass
class MMRLRepresentation:
    """The learned tensors of one MMRL model, float32, with the layers its tokens enter (1-based)."""

    tokens: torch.Tensor  # (n_rep, REP_DIM)
    to_vision: list[tuple[torch.Tensor, torch.Tensor]]  # K × (weight (vision width, REP_DIM), bias)
    to_text: list[tuple[torch.Tensor, torch.Tensor]]  # K × (weight (text width, REP_DIM), bias)
    proj_rep: torch.Tensor  # (vision width, D)
    rep_layers: tuple[int, ...]
    token_dtype: torch.dtype = torch.float32  # the official `.type(self.dtype)` of the mapped tokens

    @property
    def n_rep(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def rep_dim(self) -> int:
        return int(self.tokens.shape[1])

    def _mapped(self, linears) -> list[torch.Tensor]:
        return [(self.tokens @ w.T + b).to(self.token_dtype).float() for w, b in linears]

    def vision_tokens(self) -> list[torch.Tensor]:
        """The (n_rep, vision width) tokens of each representation layer."""
        return self._mapped(self.to_vision)

    def text_tokens(self) -> list[torch.Tensor]:
        """The (n_rep, text width) tokens of each representation layer."""
        return self._mapped(self.to_text)

    def to(self, device) -> "MMRLRepresentation":
        pairs = lambda ps: [(w.to(device), b.to(device)) for w, b in ps]  # noqa: E731
        return MMRLRepresentation(self.tokens.to(device), pairs(self.to_vision), pairs(self.to_text),
                                  self.proj_rep.to(device), self.rep_layers, self.token_dtype)


def _insert(x: torch.Tensor, tokens: torch.Tensor, first: bool) -> torch.Tensor:
    """Put the representation tokens after the first token: inserted at the first representation layer,
    replacing the previous layer's ones afterwards."""
    n = tokens.shape[0]
    rest = x[:, 1:] if first else x[:, 1 + n:]
    return torch.cat([x[:, :1], expand_tokens(tokens, x.shape[0], x), rest], dim=1)


def mmrl_image_features(model: nn.Module, pixels: torch.Tensor, vision_tokens: list[torch.Tensor],
                        proj_rep: torch.Tensor, rep_layers) -> tuple[torch.Tensor, torch.Tensor]:
    """MMRL's class-token and representation image features (B, D) each, unnormalised."""
    visual = model.visual
    rep_layers = tuple(rep_layers)
    x = visual.ln_pre(patch_tokens(visual, pixels))
    n, k = vision_tokens[0].shape[0], 0
    for layer, block in enumerate(visual.transformer.resblocks, start=1):
        if layer in rep_layers:
            x = _insert(x, vision_tokens[k], layer == rep_layers[0])
            k += 1
        x = block(x)
    rep = visual.ln_post(x[:, 1:1 + n]).mean(dim=1) @ proj_rep.to(x.dtype)
    return image_head(visual, x[:, 0]), rep


def mmrl_text_features(model: nn.Module, tokens: torch.Tensor, text_tokens: list[torch.Tensor], rep_layers) -> torch.Tensor:
    """MMRL's text features (C, D) of the template prompts `tokens`, unnormalised."""
    rep_layers = tuple(rep_layers)
    tokens = tokens.to(model.token_embedding.weight.device)
    x = model.token_embedding(tokens)
    x = x + model.positional_embedding.to(x.dtype)
    mask = model.attn_mask if model.attn_mask is not None else causal_mask(x.shape[1], x)
    n, k = text_tokens[0].shape[0], 0
    for layer, block in enumerate(model.transformer.resblocks, start=1):
        if layer in rep_layers:
            x = _insert(x, text_tokens[k], layer == rep_layers[0])
            k += 1
        if layer >= rep_layers[0]:
            mask = causal_mask(x.shape[1], x)
        x = block(x, attn_mask=mask)
    return text_head(model, x, tokens.argmax(dim=-1) + n)


def default_rep_layers(model: nn.Module, k: int) -> tuple[int, ...]:
    """The last k blocks, numbered from 1 (6…12 for k = 7 on a 12-block ViT-B/16)."""
    depth = len(model.visual.transformer.resblocks)
    if len(model.transformer.resblocks) != depth:
        raise ValueError(f"the cache's model has {depth} vision and {len(model.transformer.resblocks)} text blocks; MMRL "
                         "numbers its representation layers across both towers, so give them with --rep-layers")
    return tuple(range(depth - k + 1, depth + 1))


def _shape_error(path: str, key: str, got: tuple, want: tuple, ours: str) -> ValueError:
    return ValueError(f"{path}: {key} has shape {got} but the cache's model needs {want} ({ours}): the checkpoint was "
                      "trained for another CLIP model; use the cache of that model")


def read_mmrl(state: dict, model: nn.Module, path: str, rep_layers=None) -> tuple[MMRLRepresentation, str]:
    """The learned tensors of an MMRL state dict, checked against the cache's model; returns them and
    where the representation layers came from ("last K blocks" or "option")."""
    check_vit_clip(model, "MMRL")
    refuse_other_method(state, methods.MMRL.name, path, REP_KEY)
    tokens = state[REP_KEY]
    if tokens.dim() != 2 or not tokens.is_floating_point() or not torch.isfinite(tokens).all():
        raise ValueError(f"{path}: {REP_KEY} must be a finite (n_rep, REP_DIM) float tensor, got {tuple(tokens.shape)} "
                         f"{tokens.dtype}")
    rep_dim = int(tokens.shape[1])
    width = {"v": int(model.visual.conv1.weight.shape[0]), "t": int(model.token_embedding.weight.shape[1])}
    projs: dict[str, dict[int, dict[str, torch.Tensor]]] = {"v": {}, "t": {}}
    for key, value in state.items():
        if m := _PROJ.fullmatch(key):
            projs[m.group(1)].setdefault(int(m.group(2)), {})[m.group(3)] = value
    k = len(projs["v"])
    if k == 0 or sorted(projs["v"]) != list(range(k)) or sorted(projs["t"]) != list(range(k)):
        raise ValueError(f"{path}: MMRL needs the projections …r2vproj.<k> and …r2tproj.<k> for k = 0…K−1; found "
                         f"vision {sorted(projs['v'])}, text {sorted(projs['t'])}")
    linears = {}
    for tower, name in (("v", "r2vproj"), ("t", "r2tproj")):
        linears[tower] = []
        for i in range(k):
            key = f"representation_learner.compound_rep_tokens_{name}.{i}"
            w, b = projs[tower][i].get("weight"), projs[tower][i].get("bias")
            if w is None or b is None:
                raise ValueError(f"{path}: {key} needs a weight and a bias")
            want = (width[tower], rep_dim)
            if tuple(w.shape) != want:
                ours = "visual.conv1.weight " + str(tuple(model.visual.conv1.weight.shape)) if tower == "v" else \
                    "token_embedding.weight " + str(tuple(model.token_embedding.weight.shape))
                raise _shape_error(path, key + ".weight", tuple(w.shape), want, ours)
            if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
                raise ValueError(f"{path}: {key} has non-finite values; training diverged, use another checkpoint")
            linears[tower].append((w.float(), b.float()))
    proj_rep = state.get(PROJ_REP_KEY)
    if proj_rep is None:
        raise ValueError(f"{path} has no {PROJ_REP_KEY} (MMRL's learned projection of the representation feature)")
    if tuple(proj_rep.shape) != tuple(model.visual.proj.shape):
        raise _shape_error(path, PROJ_REP_KEY, tuple(proj_rep.shape), tuple(model.visual.proj.shape),
                           f"visual.proj {tuple(model.visual.proj.shape)}")
    depths = {"vision": len(model.visual.transformer.resblocks), "text": len(model.transformer.resblocks)}
    if rep_layers is None:
        if k > min(depths.values()):
            raise ValueError(f"{path}: {k} representation layers (…r2vproj.0…{k - 1}) but the cache's model has "
                             f"{depths['vision']} vision and {depths['text']} text blocks: the checkpoint was trained for "
                             "a deeper model; use the cache of that model")
        layers, source = default_rep_layers(model, k), f"last {k} blocks (default)"
    else:
        layers, source = tuple(int(x) for x in rep_layers), "option --rep-layers"
        if len(layers) != k:
            raise ValueError(f"--rep-layers gives {len(layers)} layers but the checkpoint has {k} projections "
                             f"(…r2vproj.0…{k - 1}); give exactly {k}")
        if list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] > min(depths.values()):
            raise ValueError(f"--rep-layers {list(layers)}: give increasing layer numbers from 1 to "
                             f"{min(depths.values())} (the blocks of the cache's model, numbered from 1)")
    frozen = {key: v for key, v in state.items() if not key.startswith(_LEARNED)}
    check_against_model(frozen, model, FROZEN_KEYS, path)
    rep = MMRLRepresentation(tokens=tokens.float(), to_vision=linears["v"], to_text=linears["t"],
                             proj_rep=proj_rep.float(), rep_layers=layers,
                             token_dtype=torch.float16 if tokens.dtype == torch.float16 else torch.float32)
    return rep, source


class MMRL:
    """The importer's view of an MMRL checkpoint: features of images and classes, and what it records."""

    method = methods.MMRL.name
    label = "MMRL"
    outputs = ("", "_rep")

    def __init__(self, rep: MMRLRepresentation, source: str, alpha: float, stored_prompts: torch.Tensor | None):
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha={alpha}: MMRL's fusion weight must lie in [0, 1] (official 0.7)")
        self.rep, self.rep_layers_source, self.alpha = rep, source, float(alpha)
        self.stored_prompts = stored_prompts
        self._vision, self._text = rep.vision_tokens(), rep.text_tokens()

    @classmethod
    def from_state(cls, state: dict, model: nn.Module, path: str, *, rep_layers=None, alpha: float | None = None,
                   **unused) -> "MMRL":
        rep, source = read_mmrl(state, model, path, rep_layers)
        return cls(rep, source, DEFAULT_ALPHA if alpha is None else alpha, state.get(PROMPTS_KEY))

    def to(self, device) -> "MMRL":
        self.rep = self.rep.to(device)
        self._vision = [t.to(device) for t in self._vision]
        self._text = [t.to(device) for t in self._text]
        return self

    def prompt_texts(self, classnames, template: str | None = None) -> list[str]:
        """The class prompts: the dataset's template, no learned context."""
        if not template or "{}" not in template:
            raise ValueError(f"MMRL's class prompts use the dataset's template; got {template!r}")
        return [template.format(c.replace("_", " ")) for c in classnames]

    @property
    def context_positions(self) -> slice:
        return slice(0, 0)  # no learned context: every position of the stored prompts is compared

    def image_features(self, model: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        cls, rep = mmrl_image_features(model, pixels, self._vision, self.rep.proj_rep, self.rep.rep_layers)
        return {"": cls, "_rep": rep}

    def text_features(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return mmrl_text_features(model, tokens, self._text, self.rep.rep_layers)

    def settings(self) -> dict:
        return {"alpha": self.alpha, "n_rep_tokens": self.rep.n_rep, "rep_dim": self.rep.rep_dim,
                "rep_layers": list(self.rep.rep_layers), "rep_layers_source": self.rep_layers_source,
                "rep_token_dtype": str(self.rep.token_dtype).replace("torch.", ""),
                "official_logit_scale": 100.0,
                "logits": "base classes: s·(α·n(f_cls) + (1−α)·n(f_rep))·n(g); new classes: s·n(f_cls)·n(g)"}
