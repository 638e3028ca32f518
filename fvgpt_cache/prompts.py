"""Prompt learning on open_clip's text tower: CoOp's prompt learner, spliced into `CLIP.encode_text`.

CoOp (Zhou et al., 2022) replaces the words of a hand-written prompt by learned context vectors.
For a class name it tokenises the placeholder prompt ``"X X X X {name}."`` (n_ctx times ``X``),
embeds it with CLIP's token embedding, keeps the start token (prefix) and everything after the
placeholders (class tokens, ``.``, end token, padding: suffix) as frozen tensors, and puts the
context vectors between them. The end-token position, where CLIP pools the text feature, is the
same as in the placeholder prompt because every placeholder is exactly one token.

Three layouts (CoOp's ``CLASS_TOKEN_POSITION``):

* ``end``:    [SOS] [ctx_1 … ctx_n] [class tokens] [.] [EOS]
* ``front``:  [SOS] [class tokens] [ctx_1 … ctx_n] [.] [EOS]
* ``middle``: [SOS] [ctx_1 … ctx_⌊n/2⌋] [class tokens] [ctx_⌊n/2⌋+1 … ctx_n] [.] [EOS]

Only open_clip ``CLIP`` models with the built-in text transformer are supported; models with a
Hugging Face or other custom text tower (``CustomTextCLIP``) are refused.

Differences from CoOp's code, all deliberate: ``n_ctx`` of an initialisation text is its number
of tokens (CoOp counts words, which breaks for a word of several tokens), and a class-specific
context initialised from words starts as one copy of those words per class (CoOp silently
ignores CSC when CTX_INIT is given).
"""
from __future__ import annotations

from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

CLASS_TOKEN_POSITIONS = ("end", "front", "middle")
PLACEHOLDER = "X"


def check_prompt_model(model: nn.Module) -> None:
    """Refuse models whose text tower is not open_clip's built-in transformer."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    if not isinstance(model, open_clip.model.CLIP) or any(not hasattr(model, k) for k in needed):
        raise ValueError(
            f"prompt learning needs an open_clip CLIP model with the built-in text transformer; got "
            f"{type(model).__name__} (CustomTextCLIP / Hugging Face text towers are not supported). "
            "Use a model such as ViT-B-16, ViT-B-32 or RN50"
        )


def text_width(model: nn.Module) -> int:
    """Width of the token embeddings, i.e. of one context vector (512 for ViT-B/16)."""
    return int(model.token_embedding.weight.shape[1])


def encode_text_embeddings(model: nn.Module, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The rest of open_clip's `CLIP.encode_text` after `token_embedding`; unnormalised (C, D).

    `embeddings` is (C, L, width) (the token embeddings, possibly with learned vectors spliced
    in), `tokens` the (C, L) token ids used to find the pooling position.
    """
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype)
    x = x + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        if isinstance(model.text_projection, nn.Linear):
            x = model.text_projection(x)
        else:
            x = x @ model.text_projection
    return x


def _clean(name: str) -> str:
    return name.replace("_", " ")


def count_tokens(tokenizer, text: str) -> int:
    """Number of BPE tokens of `text` (without start/end tokens)."""
    if hasattr(tokenizer, "encode"):
        return len(tokenizer.encode(text))
    ids = tokenizer([text])[0]
    nonzero = (ids != 0).nonzero()
    return int(nonzero[-1]) - 1 if len(nonzero) else 0


def placeholder_tokens(model: nn.Module, tokenizer, classnames: Sequence[str], n_ctx: int) -> tuple[torch.Tensor, list[int]]:
    """Token ids of CoOp's placeholder prompts ``"X … X {name}."`` and each class name's token count."""
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
    names = [_clean(c) for c in classnames]
    prefix = " ".join([PLACEHOLDER] * n_ctx)
    name_lens = [count_tokens(tokenizer, n) for n in names]
    context_length = int(model.positional_embedding.shape[0])
    for name, n in zip(names, name_lens):
        needed = 1 + n_ctx + n + 2  # SOS, ctx, name, '.', EOS
        if needed > context_length:
            raise ValueError(
                f"class name {name!r} ({n} tokens) with {n_ctx} context tokens needs {needed} positions; the text "
                f"encoder has {context_length}. Shorten the class name or use fewer context tokens"
            )
    tokens = tokenizer([f"{prefix} {n}." for n in names])
    return tokens, name_lens


def splice(prefix: torch.Tensor, ctx: torch.Tensor, suffix: torch.Tensor, name_lens: Sequence[int],
           position: str = "end") -> torch.Tensor:
    """Assemble CoOp prompts along dim 1.

    prefix (C, 1, *), suffix (C, L−1−n_ctx, *) whose first `name_lens[i]` rows are class i's
    name tokens, ctx (n_ctx, *) generic or (C, n_ctx, *) class-specific. Works for embeddings
    (* = width) and for token ids (no trailing dim) alike.
    """
    n_cls = prefix.shape[0]
    if position not in CLASS_TOKEN_POSITIONS:
        raise ValueError(f"class_token_position {position!r}: choose one of {CLASS_TOKEN_POSITIONS}")
    if ctx.dim() == prefix.dim() - 1:
        ctx = ctx.unsqueeze(0).expand(n_cls, *ctx.shape)
    if ctx.shape[0] != n_cls:
        raise ValueError(f"class-specific context has {ctx.shape[0]} classes but {n_cls} class names were given")
    ctx = ctx.to(prefix.dtype)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1)
    n_ctx = ctx.shape[1]
    half = n_ctx // 2
    rows = []
    for i in range(n_cls):
        k = int(name_lens[i])
        cls_i, rest_i = suffix[i:i + 1, :k], suffix[i:i + 1, k:]
        if position == "front":
            parts = [prefix[i:i + 1], cls_i, ctx[i:i + 1], rest_i]
        else:  # middle
            parts = [prefix[i:i + 1], ctx[i:i + 1, :half], cls_i, ctx[i:i + 1, half:], rest_i]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0)


def _frozen_parts(model: nn.Module, tokens: torch.Tensor, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = model.token_embedding.weight.device
    with torch.no_grad():
        emb = model.token_embedding(tokens.to(device))
    return emb[:, :1], emb[:, 1 + n_ctx:]


def _ctx_n(ctx: torch.Tensor) -> int:
    if ctx.dim() not in (2, 3):
        raise ValueError(f"context must be (n_ctx, width) or (classes, n_ctx, width), got shape {tuple(ctx.shape)}")
    return int(ctx.shape[-2])


def prompt_features(model: nn.Module, tokenizer, classnames: Sequence[str], ctx: torch.Tensor,
                    class_token_position: str = "end", batch_size: int | None = 256) -> torch.Tensor:
    """Unnormalised (C, D) text features of CoOp prompts with context `ctx` for any class list.

    A generic ctx (n_ctx, width) works for every class list; a class-specific ctx
    (C, n_ctx, width) needs the class list it was trained for. Gradients flow into `ctx`.
    """
    check_prompt_model(model)
    n_ctx = _ctx_n(ctx)
    if ctx.shape[-1] != text_width(model):
        raise ValueError(f"ctx width {ctx.shape[-1]} but the model's text width is {text_width(model)}: "
                         "this context was trained for another CLIP model")
    if ctx.dim() == 3 and ctx.shape[0] != len(classnames):
        raise ValueError(f"class-specific context has {ctx.shape[0]} classes but {len(classnames)} class names "
                         "were given; a class-specific context only works for the classes it was trained on")
    device = model.token_embedding.weight.device
    ctx = ctx.to(device)
    step = batch_size or len(classnames)
    out = []
    for i in range(0, len(classnames), step):
        names = list(classnames[i:i + step])
        tokens, name_lens = placeholder_tokens(model, tokenizer, names, n_ctx)
        tokens = tokens.to(device)
        prefix, suffix = _frozen_parts(model, tokens, n_ctx)
        part = ctx if ctx.dim() == 2 else ctx[i:i + step]
        out.append(encode_text_embeddings(model, splice(prefix, part, suffix, name_lens, class_token_position), tokens))
    return torch.cat(out)


def init_context(model: nn.Module, tokenizer, n_ctx: int = 4, ctx_init: str | None = None, n_classes: int | None = None,
                 seed: int = 1) -> torch.Tensor:
    """CoOp's context initialisation, float32.

    `ctx_init` text: the token embeddings of its words (n_ctx becomes its token count);
    otherwise N(0, 0.02²) drawn from `seed` without touching the global RNG. `n_classes`
    gives a class-specific context (n_classes, n_ctx, width).
    """
    width = text_width(model)
    if ctx_init:
        text = _clean(ctx_init).strip()
        n = count_tokens(tokenizer, text)
        if n < 1:
            raise ValueError(f"ctx_init {ctx_init!r} has no tokens; give words such as 'a photo of a' or None")
        tokens = tokenizer([text]).to(model.token_embedding.weight.device)
        with torch.no_grad():
            ctx = model.token_embedding(tokens)[0, 1:1 + n].detach().float().cpu().clone()
        if n_classes is not None:
            ctx = ctx.unsqueeze(0).repeat(n_classes, 1, 1)
        return ctx
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
    shape = (n_ctx, width) if n_classes is None else (n_classes, n_ctx, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ctx = torch.empty(shape)
        nn.init.normal_(ctx, std=0.02)
    return ctx


class PromptLearner(nn.Module):
    """CoOp's prompt learner for a fixed class list; `ctx` is its only parameter.

    The CLIP model is held by reference, not as a sub-module: it stays frozen and outside
    `parameters()` / `state_dict()`. The state dict has CoOp's keys (`ctx`, `token_prefix`,
    `token_suffix`).
    """

    def __init__(self, model: nn.Module, tokenizer, classnames: Sequence[str], n_ctx: int = 4,
                 ctx_init: str | None = None, csc: bool = False, class_token_position: str = "end", seed: int = 1,
                 ctx: torch.Tensor | None = None):
        super().__init__()
        check_prompt_model(model)
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class_token_position {class_token_position!r}: choose one of {CLASS_TOKEN_POSITIONS}")
        self.__dict__["clip_model"] = model  # not registered: frozen, not part of the learner's parameters
        self.tokenizer = tokenizer
        self.classnames = list(classnames)
        self.class_token_position = class_token_position
        if ctx is None:
            ctx = init_context(model, tokenizer, n_ctx, ctx_init, len(self.classnames) if csc else None, seed)
        self.ctx = nn.Parameter(ctx.detach().float().clone().to(model.token_embedding.weight.device))
        self.n_ctx = _ctx_n(self.ctx)
        self.csc = self.ctx.dim() == 3
        if self.csc and self.ctx.shape[0] != len(self.classnames):
            raise ValueError(f"class-specific context has {self.ctx.shape[0]} classes, the class list {len(self.classnames)}")
        tokens, self.name_lens = placeholder_tokens(model, tokenizer, self.classnames, self.n_ctx)
        prefix, suffix = _frozen_parts(model, tokens, self.n_ctx)
        self.register_buffer("token_prefix", prefix.detach().clone())
        self.register_buffer("token_suffix", suffix.detach().clone())
        self.register_buffer("tokenized_prompts", tokens.to(prefix.device), persistent=False)

    def prompts(self) -> torch.Tensor:
        """(C, L, width) prompt embeddings."""
        return splice(self.token_prefix, self.ctx, self.token_suffix, self.name_lens, self.class_token_position)

    def forward(self) -> torch.Tensor:
        """(C, D) unnormalised text features of the trained class list."""
        return encode_text_embeddings(self.clip_model, self.prompts(), self.tokenized_prompts)

    def text_features(self, classnames: Sequence[str] | None = None, normalize: bool = False) -> torch.Tensor:
        """Text features of any class list with the learned (generic) context; no retraining."""
        if classnames is None or list(classnames) == self.classnames:
            feats = self()
        else:
            if self.csc:
                raise ValueError("a class-specific context only has vectors for the classes it was trained on; "
                                 "train a generic context (csc=False) to get features of other classes")
            feats = prompt_features(self.clip_model, self.tokenizer, classnames, self.ctx, self.class_token_position)
        return F.normalize(feats, dim=-1) if normalize else feats
