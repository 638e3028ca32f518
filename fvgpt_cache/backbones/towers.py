"""The pieces of open_clip's CLIP towers that PromptSRC's and MMRL's forwards put together differently.

The official code runs OpenAI's CLIP, whose transformers are sequence-first (L, N, width); open_clip's
are batch-first (N, L, width), so the official `x[a:b]` over tokens is `x[:, a:b]` here. The blocks
themselves are open_clip's own `ResidualAttentionBlock`s, called one at a time, so the prompted
forwards use exactly the weights, activation (GELU or QuickGELU) and attention of the cache's model.
"""
from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from ..prompts import check_prompt_model


def check_vit_clip(model: nn.Module, method: str) -> None:
    """Refuse models the prompted forwards cannot run: they need open_clip's ViT image tower with a
    class token and its built-in text transformer (argmax pooling at the end token)."""
    check_prompt_model(model)
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"{method} prompts a ViT image encoder; the cache's model has a {type(visual).__name__} image "
                         "tower. Use a cache extracted with a ViT model (the official checkpoints use ViT-B/16)")
    if visual.attn_pool is not None or visual.pool_type != "tok" or not visual.transformer.batch_first \
            or visual.proj is None:
        raise ValueError(f"{method}: the cache's ViT pools with {visual.pool_type!r}"
                         f"{' and an attentional pooler' if visual.attn_pool is not None else ''}"
                         f"{' and has no projection' if visual.proj is None else ''}; only OpenAI-style ViTs (class-token "
                         "pooling, projected) are supported")
    if getattr(model, "text_pool_type", "argmax") != "argmax" or not model.transformer.batch_first:
        raise ValueError(f"{method}: the cache's text tower does not pool at the end token (argmax); only OpenAI-style "
                         "CLIP text towers are supported")


def patch_tokens(visual: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1 + P, width): class token and patch embeddings plus positional embeddings, before `ln_pre`."""
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    return x + visual.positional_embedding.to(x.dtype)


def image_head(visual: VisionTransformer, token: torch.Tensor) -> torch.Tensor:
    """`ln_post` then the projection: CLIP's image feature from the class token (B, width)."""
    x = visual.ln_post(token)
    return x @ visual.proj if visual.proj is not None else x


def text_head(model: nn.Module, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """`ln_final` on all tokens, the token at `eot` of each row, then the text projection."""
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def causal_mask(length: int, like: torch.Tensor) -> torch.Tensor:
    """CLIP's additive causal mask (−inf above the diagonal) for `length` tokens."""
    return torch.full((length, length), float("-inf"), device=like.device, dtype=like.dtype).triu_(1)


def expand_tokens(tokens: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """(n, width) learned tokens as (batch, n, width) in `like`'s dtype and device."""
    return tokens.to(device=like.device, dtype=like.dtype).unsqueeze(0).expand(batch, -1, -1)
