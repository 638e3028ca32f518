"""The FVG-PT equations as pure functions on tensors (docs/method.md); equation numbers are the paper's.

Everything here reads features or logits, never pixels, and holds no state: the heads (`heads.py`), the
engine and the evaluation call these functions rather than restate them, and the tests check each one
against hand-computed values.

Conventions:

* a *distribution* argument has shape (B, C) and sums to one over the last axis;
* per-sample statistics return shape (B,); losses return a scalar (mean over the batch);
* logs are taken with `torch.xlogy` (0·log 0 = 0) and a floor of `EPS` on the second
  argument, so every statistic is finite for one-hot, uniform and extreme-logit inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12


def clip_logits(img: Tensor, txt: Tensor, scale: float | Tensor) -> Tensor:
    """CLIP logits (docs/method.md#notation, eq. 11): `s · n(img) @ n(txt)ᵀ`, shape (B, C)."""
    return scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T


def backbone_logits(img: Tensor, txt: Tensor, scale: float | Tensor) -> Tensor:
    """Backbone logits z(x) = `s · v @ n(txt)ᵀ` for the image vector v a backbone scores with.

    v is n(f(x)) for every backbone but MMRL, whose base-class logits use the fused vector
    α·n(f_cls) + (1 − α)·n(f_rep), shorter than 1 (`training.backbone_images` builds v).
    """
    return scale * img @ F.normalize(txt, dim=-1).T


def entropy(p: Tensor) -> Tensor:
    """`H(p) = −Σ p log p` over the last axis (eqs. 5, 13), shape (B,)."""
    return -torch.xlogy(p, p).sum(-1)


def prob_cosine(p: Tensor, q: Tensor) -> Tensor:
    """`cos(p, q)` of two probability vectors (eqs. 5, 13), shape (B,)."""
    return F.cosine_similarity(p, q, dim=-1, eps=EPS)


def _kl_from_log(p: Tensor, log_q: Tensor) -> Tensor:
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


def kl_div(p: Tensor, q: Tensor) -> Tensor:
    """`KL(p ‖ q) = Σ p (log p − log q)` summed over classes (D3), shape (B,)."""
    return _kl_from_log(p, q.clamp_min(EPS).log())


def frg_target(z_full: Tensor, z_fg: Tensor, y: Tensor, margin: float = 0.0) -> Tensor:
    """FRG target (eq. 3 with the release's margin δ): `r* = 1[CE(z_fg, y) + δ < CE(z_full, y)]`, shape (B,)."""
    ce_full = F.cross_entropy(z_full, y, reduction="none")
    ce_fg = F.cross_entropy(z_fg, y, reduction="none")
    return (ce_fg + margin < ce_full).to(z_full.dtype)


def usable_foreground(area: Tensor, area_min: float = 0.02, area_max: float = 0.98) -> Tensor:
    """The area gate: 1 where `area_min ≤ A(m) ≤ area_max` (a usable foreground view), else 0; shape (B,).

    Our reading of the release's `RDBOOST_AREA_MIN/MAX`: outside the range r* = 0 and r = 0 in L_dist.
    """
    area = area.reshape(-1)
    return ((area >= area_min) & (area <= area_max)).to(area.dtype)


def roc_auc(scores: Tensor, labels: Tensor) -> float | None:
    """Area under the ROC curve of `scores` against binary `labels` (ties count one half); None if one class is absent."""
    scores, labels = scores.reshape(-1).double(), labels.reshape(-1) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).double().sum() if pos.numel() * neg.numel() <= 4_000_000 else None
    if greater is None:  # rank formula (average ranks for ties) when the pairwise table would be large
        order = torch.cat([pos, neg])
        ranks = _average_ranks(order)
        return float((ranks[: pos.numel()].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (n_pos * n_neg))


def _average_ranks(x: Tensor) -> Tensor:
    sorted_x, order = torch.sort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    unique, inverse = torch.unique_consecutive(sorted_x, return_inverse=True)
    sums = torch.zeros(unique.numel(), dtype=x.dtype).index_add_(0, inverse, ranks[order])
    counts = torch.zeros(unique.numel(), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    ranks[order] = (sums / counts)[inverse]
    return ranks


def distill_loss(r: Tensor, p_fg: Tensor, p_full: Tensor, log_q: Tensor,
                 detach_r: bool = True) -> Tensor:
    """L_dist (eq. 9), mean over the batch of `r·KL(p_fg‖q) + (1−r)·KL(p_full‖q)`.

    The student enters as log-probabilities `log_q = log_softmax(z_FDC/τ)`: taking the log of
    clamped probabilities would zero the gradient of every class whose probability underflows,
    which at CLIP's logit scale happens early in training. With `detach_r` (D2) no gradient reaches r.
    """
    r = r.reshape(-1)
    if detach_r:
        r = r.detach()
    return (r * _kl_from_log(p_fg, log_q) + (1 - r) * _kl_from_log(p_full, log_q)).mean()


def distill_weight_coefficients(r_source: str, gated: bool, r_without_frg: str) -> tuple[float, float, float]:
    """(a, b, c) of the distillation weight `r = usable · (a·σ(q) + b·r* + c)` (eq. 9 and its controls).

    `r_source` "full" gives r = 0 (always the full view), "fg" r = 1; "frg" gives the gate's σ(q) when there is a
    gate (`gated`), else `r_without_frg`: "one" (r = 1), "target" (r = r*) or "half" (r = 0.5)."""
    if r_source == "full":
        return 0.0, 0.0, 0.0
    if r_source == "fg":
        return 0.0, 0.0, 1.0
    if gated:
        return 1.0, 0.0, 0.0
    return {"one": (0.0, 0.0, 1.0), "target": (0.0, 1.0, 0.0), "half": (0.0, 0.0, 0.5)}[r_without_frg]


def pc_logits(z_bb: Tensor, z_clip: Tensor, b: Tensor) -> Tensor:
    """Calibrated logits (eq. 12): `z_PC = (1 − b)·z_bb + b·z_clip`, b of shape (B,) or (B, 1)."""
    if b.dim() == 1:
        b = b.unsqueeze(-1)
    if b.dim() != 2 or b.shape[-1] != 1:
        raise ValueError(f"b has shape {tuple(b.shape)}; pass one weight per sample, shape (B,) or (B, 1)")
    return (1 - b) * z_bb + b * z_clip


def pc_loss(z_pc: Tensor, y: Tensor, p_clip: Tensor, tau: float) -> Tensor:
    """L_PC (eq. 15): `CE(z_PC, y) + mean KL(p_clip ‖ softmax(z_PC/τ))`."""
    return F.cross_entropy(z_pc, y) + _kl_from_log(p_clip, (z_pc / tau).log_softmax(-1)).mean()


def foreground_shift(z_full: Tensor, z_fg: Tensor, tau: float) -> Tensor:
    """Foreground shift index D_fg (App. A): mean over the batch of `KL(p_full ‖ p_fg)`."""
    log_fg = (z_fg / tau).log_softmax(-1)
    return _kl_from_log((z_full / tau).softmax(-1), log_fg).mean()


def harmonic_mean(b: float | Tensor, n: float | Tensor) -> float | Tensor:
    """HM = 2bn / (b + n) (docs/method.md#protocols), 0 when both are 0. Floats in, float out."""
    if not isinstance(b, Tensor) and not isinstance(n, Tensor):
        return 0.0 if b + n == 0 else 2 * b * n / (b + n)
    b, n = torch.as_tensor(b), torch.as_tensor(n)
    total = b + n
    return torch.where(total == 0, torch.zeros_like(total), 2 * b * n / torch.where(total == 0, 1, total))
