"""PromptSRC (Khattak et al., ICCV 2023): independent deep vision and language prompts, imported
from the official checkpoints (muzairkhattak/PromptSRC, `trainers/promptsrc.py`, `clip/model.py`).

What the official code computes (its `IVLP` design), on open_clip's batch-first towers:

* text: the prompt of class c is the tokenisation of ``"{prefix} {name}."`` with prefix = CTX_INIT
  ("a photo of a") when n_ctx ≤ 4, else ``"X … X"`` (n_ctx times); the dataset's template is never
  used. `prompt_learner.ctx` replaces the token embeddings at positions 1…n_ctx (after SOS). Before
  text block i = 1…depth−1, `text_encoder.transformer.resblocks.<i>.VPT_shallow` replaces positions
  1…n_ctx of the running sequence. The feature is `ln_final`, the end token, the text projection.
* image: `image_encoder.VPT` (n_ctx tokens) is appended after the positional embedding and before
  `ln_pre`; before vision block i = 1…depth−1 the last n_ctx tokens are replaced by
  `image_encoder.transformer.resblocks.<i>.VPT_shallow`. The feature is `ln_post` of the class
  token and the projection.
* The official forward casts every vision prompt and every deep text prompt with `.half()` before
  use, in every precision mode; the first-layer text context is used in the model's dtype. The
  import rounds those tensors to fp16 the same way and computes in the cache model's dtype.
* What the file holds: Dassl saves the model's whole `state_dict` after the last epoch; PromptSRC
  has by then loaded its Gaussian-weighted prompt aggregate (GPA) into the model, so the last
  epoch's file holds the aggregated prompts under the ordinary keys (earlier epochs hold raw
  prompts). The aggregate is taken over every state-dict entry, so the frozen CLIP copies in the
  file are weighted sums in fp16: close to, never bit-equal to, the cache's CLIP.

Depth and n_ctx are read per branch from the keys and shapes: depth = 1 + the number of
`VPT_shallow` tensors of that tower (9/9 in the base-to-new configs, 3/3 cross-dataset).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import methods
from .checkpoints import check_against_model, refuse_other_method
from .towers import causal_mask, check_vit_clip, expand_tokens, image_head, patch_tokens, text_head

DEFAULT_CTX_INIT = "a photo of a"  # cfg.TRAINER.PROMPTSRC.CTX_INIT in every official config
CTX_KEY = "prompt_learner.ctx"
VPT_KEY = "image_encoder.VPT"
_DEEP = re.compile(r"(image_encoder|text_encoder)\.transformer\.resblocks\.(\d+)\.VPT_shallow")
# checkpoint prefix → open_clip prefix of the frozen CLIP weights the file carries
FROZEN_KEYS = {"image_encoder.": "visual.", "prompt_learner.ZS_image_encoder.": "visual.", "text_encoder.": "",
               "logit_scale": "logit_scale"}
_LEARNED = ("prompt_learner.", VPT_KEY)


@dataclass
class PromptSRCPrompts:
    """The learned tensors of one PromptSRC model, float32 (vision and deep text prompts fp16-rounded)."""

    ctx: torch.Tensor  # (n_ctx_text, text width): the first text layer's context
    text_deep: list[torch.Tensor] = field(default_factory=list)  # text blocks 1 … depth_text − 1
    vision: torch.Tensor | None = None  # (n_ctx_vision, vision width), appended before ln_pre
    vision_deep: list[torch.Tensor] = field(default_factory=list)  # vision blocks 1 … depth_vision − 1
    ctx_init: str | None = DEFAULT_CTX_INIT

    @property
    def n_ctx_text(self) -> int:
        return int(self.ctx.shape[0])

    @property
    def n_ctx_vision(self) -> int:
        return 0 if self.vision is None else int(self.vision.shape[0])

    @property
    def depth_text(self) -> int:
        return 1 + len(self.text_deep)

    @property
    def depth_vision(self) -> int:
        return 0 if self.vision is None else 1 + len(self.vision_deep)

    @property
    def prompt_prefix(self) -> str:
        """The words the class prompts start with (the official VLPromptLearner's `prompt_prefix`)."""
        if self.ctx_init and self.n_ctx_text <= 4:
            return self.ctx_init.replace("_", " ")
        return " ".join(["X"] * self.n_ctx_text)

    def to(self, device) -> "PromptSRCPrompts":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptSRCPrompts(move(self.ctx), [move(t) for t in self.text_deep], move(self.vision),
                                [move(t) for t in self.vision_deep], self.ctx_init)


def promptsrc_image_features(model: nn.Module, pixels: torch.Tensor, prompts: PromptSRCPrompts) -> torch.Tensor:
    """PromptSRC's prompted image features (B, D), unnormalised."""
    visual = model.visual
    x = patch_tokens(visual, pixels)
    n = prompts.n_ctx_vision
    if prompts.vision is not None:
        x = torch.cat([x, expand_tokens(prompts.vision, x.shape[0], x)], dim=1)
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i < prompts.depth_vision:
            x = torch.cat([x[:, :-n], expand_tokens(prompts.vision_deep[i - 1], x.shape[0], x)], dim=1)
        x = block(x)
    return image_head(visual, x[:, 0])


def promptsrc_text_features(model: nn.Module, tokens: torch.Tensor, prompts: PromptSRCPrompts) -> torch.Tensor:
    """PromptSRC's prompted text features (C, D) of the class prompts `tokens`, unnormalised."""
    tokens = tokens.to(model.token_embedding.weight.device)
    emb = model.token_embedding(tokens)
    n, c = prompts.n_ctx_text, tokens.shape[0]
    x = torch.cat([emb[:, :1], expand_tokens(prompts.ctx, c, emb), emb[:, 1 + n:]], dim=1)
    x = x + model.positional_embedding.to(x.dtype)
    mask = model.attn_mask if model.attn_mask is not None else causal_mask(x.shape[1], x)
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i < prompts.depth_text:
            x = torch.cat([x[:, :1], expand_tokens(prompts.text_deep[i - 1], c, x), x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=mask)
    return text_head(model, x, tokens.argmax(dim=-1))


def _deep_prompts(state: dict, tower: str, n_layers: int, first: torch.Tensor | None, path: str) -> list[torch.Tensor]:
    found = {int(m.group(2)): k for k in state if (m := _DEEP.fullmatch(k)) and m.group(1) == tower}
    if not found:
        return []
    label = "vision" if tower == "image_encoder" else "text"
    for i in sorted(found):
        if i >= n_layers:
            raise ValueError(f"{path}: {found[i]} prompts {label} block {i}, but the cache's model has {n_layers} "
                             f"{label} blocks: the checkpoint was trained for a deeper model; use the cache of that model")
    expected = list(range(1, 1 + len(found)))
    if sorted(found) != expected:
        raise ValueError(f"{path}: the {label} deep prompts are for blocks {sorted(found)}; PromptSRC prompts blocks "
                         f"1…depth−1 without gaps, so this is not a PromptSRC checkpoint")
    if first is None:
        raise ValueError(f"{path}: {found[1]} exists but {VPT_KEY} does not; not a PromptSRC checkpoint")
    for i in expected:
        t = state[found[i]]
        if tuple(t.shape) != tuple(first.shape):
            raise ValueError(f"{path}: {found[i]} has shape {tuple(t.shape)} but the first-layer {label} prompt has "
                             f"{tuple(first.shape)}; the prompts of one tower share their shape")
    return [state[found[i]] for i in expected]


def _finite(t: torch.Tensor, key: str, path: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise ValueError(f"{path}: {key} has dtype {t.dtype}; learned prompts are floating point")
    if not torch.isfinite(t).all():
        raise ValueError(f"{path}: {key} has non-finite values (NaN/inf); training diverged, use another checkpoint")
    return t


def _half(t: torch.Tensor) -> torch.Tensor:
    """The official forward's `.half()` on vision and deep text prompts."""
    return t.half().float()


def read_promptsrc(state: dict, model: nn.Module, path: str, ctx_init: str | None = DEFAULT_CTX_INIT) -> PromptSRCPrompts:
    """The learned prompts of a PromptSRC state dict, checked against the cache's model.

    Refused, naming the key: another method's checkpoint; a prompt or frozen weight whose width
    differs from the model's (the key and both shapes); prompts for blocks the model does not have
    or frozen weights of another depth; frozen weights of other CLIP weights.
    """
    check_vit_clip(model, "PromptSRC")
    refuse_other_method(state, methods.PROMPTSRC.name, path, CTX_KEY)
    if CTX_KEY not in state:
        raise ValueError(f"{path} has PromptSRC vision prompts but no {CTX_KEY}; the checkpoint is incomplete")
    width_t = int(model.token_embedding.weight.shape[1])
    width_v = int(model.visual.conv1.weight.shape[0])
    ctx = _finite(state[CTX_KEY], CTX_KEY, path)
    if ctx.dim() != 2 or ctx.shape[1] != width_t:
        raise ValueError(f"{path}: {CTX_KEY} has shape {tuple(ctx.shape)} but the cache's model needs (n_ctx, {width_t}) "
                         f"(token_embedding.weight {tuple(model.token_embedding.weight.shape)}): the checkpoint was trained "
                         "for another CLIP model; use the cache of that model")
    vision = state.get(VPT_KEY)
    if vision is not None:
        _finite(vision, VPT_KEY, path)
        if vision.dim() != 2 or vision.shape[1] != width_v:
            raise ValueError(f"{path}: {VPT_KEY} has shape {tuple(vision.shape)} but the cache's model needs "
                             f"(n_ctx, {width_v}) (visual.conv1.weight {tuple(model.visual.conv1.weight.shape)}): the "
                             "checkpoint was trained for another CLIP model; use the cache of that model")
    text_deep = _deep_prompts(state, "text_encoder", len(model.transformer.resblocks), ctx, path)
    vision_deep = _deep_prompts(state, "image_encoder", len(model.visual.transformer.resblocks), vision, path)
    frozen = {k: v for k, v in state.items() if not k.startswith(_LEARNED) and not _DEEP.fullmatch(k)}
    check_against_model(frozen, model, FROZEN_KEYS, path)
    return PromptSRCPrompts(
        ctx=ctx.float(),
        text_deep=[_half(_finite(t, "text deep prompt", path)) for t in text_deep],
        vision=None if vision is None else _half(vision),
        vision_deep=[_half(_finite(t, "vision deep prompt", path)) for t in vision_deep],
        ctx_init=ctx_init or None,
    )


class PromptSRC:
    """The importer's view of a PromptSRC checkpoint: features of images and classes, and what it records."""

    method = methods.PROMPTSRC.name
    label = "PromptSRC"
    outputs = ("",)

    def __init__(self, prompts: PromptSRCPrompts, stored_prompts: torch.Tensor | None):
        self.prompts = prompts
        self.stored_prompts = stored_prompts

    @classmethod
    def from_state(cls, state: dict, model: nn.Module, path: str, *, ctx_init: str | None = DEFAULT_CTX_INIT,
                   **unused) -> "PromptSRC":
        prompts = read_promptsrc(state, model, path, ctx_init)
        prefix, suffix = state.get("prompt_learner.token_prefix"), state.get("prompt_learner.token_suffix")
        stored = None
        if prefix is not None and suffix is not None and prefix.shape[0] == suffix.shape[0]:
            n = prompts.n_ctx_text
            gap = torch.zeros(prefix.shape[0], n, prefix.shape[-1], dtype=prefix.dtype)
            stored = torch.cat([prefix, gap, suffix], dim=1)  # the context positions are never compared
        return cls(prompts, stored)

    def to(self, device) -> "PromptSRC":
        self.prompts = self.prompts.to(device)
        return self

    def prompt_texts(self, classnames, template: str | None = None) -> list[str]:
        """The class prompts; PromptSRC never uses the dataset's template."""
        return [f"{self.prompts.prompt_prefix} {c.replace('_', ' ')}." for c in classnames]

    @property
    def context_positions(self) -> slice:
        """Token positions of the learned context, which the stored class prompts do not hold."""
        return slice(1, 1 + self.prompts.n_ctx_text)

    def image_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return promptsrc_image_features(model, pixels, self.prompts)

    def text_features(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return promptsrc_text_features(model, tokens, self.prompts)

    def settings(self) -> dict:
        p = self.prompts
        return {"n_ctx_text": p.n_ctx_text, "n_ctx_vision": p.n_ctx_vision, "prompt_depth_text": p.depth_text,
                "prompt_depth_vision": p.depth_vision, "ctx_init": p.ctx_init, "class_prompt": f"{p.prompt_prefix} {{}}.",
                "prompt_rounding": "vision and deep text prompts rounded to fp16 (the official forward's .half())"}
