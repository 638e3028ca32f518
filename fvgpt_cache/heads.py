"""FVG-PT heads on cached features (docs/method.md): the equations as pure functions, thin modules on top.

Everything here reads features, never pixels. The functions take tensors and return tensors;
the modules only hold the learnable parts (two gates, two adapters) and wire the functions
together. Equation numbers are the paper's.

Conventions:

* a *distribution* argument has shape (B, C) and sums to one over the last axis;
* per-sample statistics return shape (B,); losses return a scalar (mean over the batch);
* logs are taken with `torch.xlogy` (0·log 0 = 0) and a floor of `EPS` on the second
  argument, so every statistic is finite for one-hot, uniform and extreme-logit inputs.

Decisions (docs/decisions.md) that show up as options: D1 `use_scale` (z_FDC carries the logit scale),
D2 `detach_r` (r is a constant inside L_dist), D3 KL(target ‖ student), D4 indicators are
computed from the frozen backbone under `torch.no_grad()` and are not normalised.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-12
# the paper's indicators (eqs. 5, 13): the built-in entries of the indicator registry and the default inputs of the gates
FRG_INDICATORS = ("dH", "cos", "area")
BRG_INDICATORS = ("H_bb", "H_clip", "cos")
R_WITHOUT_FRG = ("one", "target", "half")
R_SOURCES = ("frg", "full", "fg")
LAYER_CHOICES = (1, 2, 3)


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

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


def _check_names(use: Sequence[str], gate: str) -> tuple[str, ...]:
    known = indicator_names(gate)
    what = gate.upper()
    use = (use,) if isinstance(use, str) else tuple(use)
    unknown = [u for u in use if u not in known]
    if unknown:
        raise ValueError(f"unknown {what} indicator(s) {unknown}; choose from {list(known)} (or register one with "
                         "fvgpt_cache.register_indicator)")
    if not use:
        raise ValueError(f"{what} indicators are empty; pick at least one of {list(known)}")
    if len(set(use)) != len(use):
        raise ValueError(f"{what} indicators {list(use)} repeat a name; list each at most once")
    return use


# ---------------------------------------------------------------------------------------------
# Reliability indicators: a registry (one entry per indicator)
# ---------------------------------------------------------------------------------------------

GATES = ("frg", "brg")


@dataclass
class IndicatorInputs:
    """What an indicator reads: frozen logits of a batch of views (N, C), the temperature τ and, for FRG, the
    foreground view's logits and its mask area. Probabilities at τ are computed on first use."""

    tau: float
    z_full: Tensor  # the backbone's logits of the full view (FRG: base classes; BRG: the classes scored)
    z_fg: Tensor | None = None  # FRG: the backbone's logits of the foreground view
    area: Tensor | None = None  # FRG: A(m), (N,)
    z_clip: Tensor | None = None  # BRG: zero-shot CLIP's logits

    @cached_property
    def p_full(self) -> Tensor:
        return (self.z_full / self.tau).softmax(-1)

    @cached_property
    def p_fg(self) -> Tensor:
        return (self.z_fg / self.tau).softmax(-1)

    @cached_property
    def p_clip(self) -> Tensor:
        return (self.z_clip / self.tau).softmax(-1)


@dataclass(frozen=True)
class Indicator:
    """One reliability indicator: `fn(IndicatorInputs) -> (N,)`, an input column of the FRG or the BRG gate."""

    name: str
    gate: str
    fn: Callable[[IndicatorInputs], Tensor]
    help: str = ""


_INDICATORS: dict[tuple[str, str], Indicator] = {}


def register_indicator(name: str, gate: str, fn: Callable[[IndicatorInputs], Tensor] | None = None, *,
                       help: str = "", replace: bool = False):
    """Register `fn` as indicator `name` of gate "frg" or "brg" (usable in `frg_indicators` / `brg_indicators`).

    `fn(inputs: IndicatorInputs) -> Tensor (N,)` must depend on frozen features only: it is computed once per
    training view (and for BRG once per test image) before training, not in the step. Works as a decorator
    when `fn` is omitted. A name already registered for that gate is refused unless `replace=True`."""
    if gate not in GATES:
        raise ValueError(f"gate={gate!r}; an indicator feeds the 'frg' or the 'brg' gate")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"indicator name {name!r}: use a Python identifier (it is written in grid files and CLI options)")

    def add(f: Callable[[IndicatorInputs], Tensor]):
        if (gate, name) in _INDICATORS and not replace:
            raise ValueError(f"{gate.upper()} indicator {name!r} is already registered; pick another name or pass "
                             "replace=True")
        _INDICATORS[(gate, name)] = Indicator(name, gate, f, help or (f.__doc__ or "").strip().split("\n")[0])
        return f

    return add if fn is None else add(fn)


def unregister_indicator(name: str, gate: str) -> None:
    """Remove a registered indicator (built-in ones too: tests restore them with `register_indicator`)."""
    if _INDICATORS.pop((gate, name), None) is None:
        raise ValueError(f"no {gate.upper()} indicator {name!r} is registered")


def indicator_names(gate: str) -> tuple[str, ...]:
    """The registered indicators of a gate, in registration order (the built-ins first)."""
    return tuple(n for g, n in _INDICATORS if g == gate)


def indicator(name: str, gate: str) -> Indicator:
    _check_names((name,), gate)
    return _INDICATORS[(gate, name)]


def indicators(inputs: IndicatorInputs, use: Sequence[str], gate: str) -> Tensor:
    """The columns `use` of one gate's input (N, len(use)), each a registered indicator of `inputs`."""
    use = _check_names(use, gate)
    columns = []
    for name in use:
        value = _INDICATORS[(gate, name)].fn(inputs)
        if value.shape != inputs.z_full.shape[:1]:
            raise ValueError(f"{gate.upper()} indicator {name!r} returned shape {tuple(value.shape)}; an indicator "
                             f"returns one value per view, shape ({inputs.z_full.shape[0]},)")
        columns.append(value.to(inputs.z_full.dtype))
    return torch.stack(columns, dim=-1)


register_indicator("dH", "frg", lambda s: entropy(s.p_full) - entropy(s.p_fg),
                   help="H(p_full) − H(p_fg): how much the foreground view sharpens the prediction (eq. 5)")
register_indicator("cos", "frg", lambda s: prob_cosine(s.p_full, s.p_fg),
                   help="cos(p_full, p_fg): agreement of the two views' predictions (eq. 5)")
register_indicator("area", "frg", lambda s: s.area.to(s.z_full.dtype).reshape(-1),
                   help="A(m): the foreground mask's area fraction (eq. 5)")
register_indicator("H_bb", "brg", lambda s: entropy(s.p_full), help="H(p_bb): the backbone's entropy (eq. 13)")
register_indicator("H_clip", "brg", lambda s: entropy(s.p_clip), help="H(p_clip): zero-shot CLIP's entropy (eq. 13)")
register_indicator("cos", "brg", lambda s: prob_cosine(s.p_full, s.p_clip),
                   help="cos(p_bb, p_clip): agreement of backbone and CLIP (eq. 13)")


# ---------------------------------------------------------------------------------------------
# Loss terms: a registry for terms beyond the paper's (one entry per term, weighted by its own λ)
# ---------------------------------------------------------------------------------------------

COMPONENTS = ("fdc", "frg", "pc")


@dataclass
class StepTensors:
    """What a loss term reads in one training step. Tensors have the leading shape (B,) in the reference head
    and (K, B) in the engine (K configurations stacked), so a term written over the last axes works in both;
    `tau` broadcasts against (..., B, C). Only `z_fdc`, `log_q`, `q_frg`, `r`, `b` and `z_pc` carry gradients;
    a component that is off leaves its tensors None in the reference head."""

    tau: Tensor | float
    onehot: Tensor  # the labels, one-hot (..., B, C)
    z_full: Tensor  # the frozen backbone's logits of the full view (..., B, C)
    z_clip: Tensor  # zero-shot CLIP's logits (..., B, C)
    p_full: Tensor  # teachers at τ: softmax(z/τ) of the full view, the foreground view, CLIP (..., B, C)
    p_fg: Tensor
    p_clip: Tensor
    r_star: Tensor  # the FRG target r* (0 outside the area gate), (..., B)
    usable: Tensor  # 1 where the view passes the area gate, (..., B)
    z_fdc: Tensor | None = None  # FDC's logits z_FDC (eq. 8), (..., B, C)
    log_q: Tensor | None = None  # log softmax(z_FDC / τ), the distillation student
    q_frg: Tensor | None = None  # the FRG gate's logit, (..., B)
    r: Tensor | None = None  # the distillation weight of eq. 9 (detached when detach_r), (..., B)
    b: Tensor | None = None  # the BRG weight, (..., B)
    z_pc: Tensor | None = None  # the calibrated logits z_PC (eq. 12), (..., B, C)


@dataclass(frozen=True)
class LossTerm:
    """A loss term: `fn(StepTensors) -> (..., B)` per-sample values, averaged over the batch and added to the
    objective with the weight `lambda_<name>` (a training parameter, 0 = off). `needs`: the components it reads
    ("fdc", "frg", "pc"); a configuration that weights the term must have them on."""

    name: str
    fn: Callable[[StepTensors], Tensor]
    help: str
    needs: tuple[str, ...] = ("fdc",)

    @property
    def weight(self) -> str:
        return f"lambda_{self.name}"


_LOSS_TERMS: dict[str, LossTerm] = {}
BUILTIN_TERMS = ("frg", "ce_fdc", "dist", "acc_fdc", "ce_pc", "kl_pc", "base", "pc", "total")


def register_loss_term(name: str, fn: Callable[[StepTensors], Tensor] | None = None, *, help: str = "",
                       needs: Sequence[str] = ("fdc",)):
    """Register `fn` as loss term `name`, weighted by the new training parameter `lambda_<name>` (default 0: off).

    `fn(t: StepTensors) -> Tensor (..., B)` returns the term of each sample; the engine averages it over the batch
    of every configuration and adds `lambda_<name> ·` that mean to the objective, with gradients from autograd on
    the stacked tensors. Works as a decorator when `fn` is omitted."""
    from .parameters import Parameter, register_parameter

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"loss term name {name!r}: use a Python identifier (its weight is lambda_{name})")
    if name in BUILTIN_TERMS or name in _LOSS_TERMS:
        raise ValueError(f"loss term {name!r} is already a {'built-in' if name in BUILTIN_TERMS else 'registered'} "
                         "term; pick another name (unregister_loss_term removes a registered one)")
    needs = tuple(needs)
    bad = [n for n in needs if n not in COMPONENTS]
    if bad:
        raise ValueError(f"loss term {name!r}: needs={list(needs)} names unknown components {bad}; use {COMPONENTS}")

    def add(f: Callable[[StepTensors], Tensor]):
        text = help or (f.__doc__ or "").strip().split("\n")[0] or f"the registered loss term {name}"
        term = LossTerm(name, f, text, needs)
        register_parameter(Parameter(term.weight, "float", 0.0, f"Weight of the registered loss term {name}: {text}",
                                     low=0))
        _LOSS_TERMS[name] = term
        return f

    return add if fn is None else add(fn)


def unregister_loss_term(name: str) -> None:
    """Remove a registered loss term and its weight parameter."""
    from .parameters import unregister_parameter

    if _LOSS_TERMS.pop(name, None) is None:
        raise ValueError(f"no loss term {name!r} is registered (registered: {sorted(_LOSS_TERMS) or 'none'})")
    unregister_parameter(f"lambda_{name}")


def loss_terms() -> dict[str, LossTerm]:
    """The registered loss terms, by name, in registration order."""
    return dict(_LOSS_TERMS)


def check_loss_weights(weights: dict[str, float], use_fdc: bool, use_frg: bool, use_pc: bool) -> None:
    """Refuse a weighted term whose components are off (`weights`: term name → λ, the non-zero ones)."""
    on = {"fdc": use_fdc, "frg": use_fdc and use_frg, "pc": use_pc}
    for name in weights:
        missing = [c for c in _LOSS_TERMS[name].needs if not on[c]]
        if missing:
            raise ValueError(f"lambda_{name}={weights[name]!r}: the loss term {name} reads {', '.join(missing)}, which "
                             f"this configuration switches off; set lambda_{name}=0 or switch "
                             f"{', '.join('use_' + c for c in missing)} on")


def frg_indicators(z_full: Tensor, z_fg: Tensor, area: Tensor, tau: float,
                   use: Sequence[str] = FRG_INDICATORS) -> Tensor:
    """FRG input `u` (eqs. 4–5): columns of `use` in its order, from the registered FRG indicators (built in:
    dH = H(p_full) − H(p_fg), cos = cos(p_full, p_fg), area = A(m); p = softmax(z/τ)). Shape (B, k)."""
    return indicators(IndicatorInputs(tau, z_full, z_fg=z_fg, area=area), use, "frg")


def brg_indicators(z_bb: Tensor, z_clip: Tensor, tau: float,
                   use: Sequence[str] = BRG_INDICATORS) -> Tensor:
    """BRG input `s` (eqs. 13–14): columns of `use` in its order, from the registered BRG indicators (built in:
    H_bb = H(p_full), H_clip = H(p_clip), cos = cos(p_full, p_clip); p = softmax(z/τ)). Shape (B, k)."""
    return indicators(IndicatorInputs(tau, z_bb, z_clip=z_clip), use, "brg")


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


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

def _mlp(d_in: int, hidden: int, d_out: int, layers: int) -> nn.Sequential:
    """`layers` linear layers with a ReLU between two: d_in → hidden → … → hidden → d_out."""
    widths = [d_in, *[hidden] * (layers - 1), d_out]
    mods: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


class GateMLP(nn.Module):
    """Reliability gate (FRG eq. 6 / BRG eq. 13): `σ(MLP(u))` with 1, 2 or 3 linear layers."""

    def __init__(self, in_features: int, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.mlp = _mlp(in_features, hidden, 1, layers)

    def logit(self, u: Tensor) -> Tensor:
        """The gate's logit q, shape (B,)."""
        return self.mlp(u).squeeze(-1)

    def forward(self, u: Tensor) -> Tensor:
        """The gate's trust score σ(q), shape (B,)."""
        return torch.sigmoid(self.logit(u))


class Adapter(nn.Module):
    """Residual bottleneck adapter (eq. 7): `n(x + MLP(x))`; `enabled=False` is `n(x)`, no parameters.

    The adapter starts near the identity as in the release (`RDBOOST_FDC_INIT_SCALE`): the last
    layer's weight is PyTorch's default initialisation multiplied by `init_scale` and its bias is
    zero; `init_scale=0` is an exact zero init (training starts at `n(x)`). Earlier layers keep
    PyTorch's default initialisation."""

    def __init__(self, dim: int, hidden: int = 64, layers: int = 2, enabled: bool = True,
                 init_scale: float = 1e-3):
        super().__init__()
        self.mlp = _mlp(dim, hidden, dim, layers) if enabled else None
        if self.mlp is not None:
            with torch.no_grad():
                self.mlp[-1].weight.mul_(init_scale)
                self.mlp[-1].bias.zero_()

    @property
    def enabled(self) -> bool:
        return self.mlp is not None

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x if self.mlp is None else x + self.mlp(x), dim=-1)


class FDC(nn.Module):
    """Foreground Distillation Compensation (eqs. 7–8): separate image and text adapters.

    `visual` / `textual` switch each adapter (Table 13); `use_scale` (D1) multiplies z_FDC by s."""

    def __init__(self, dim: int, hidden: int = 64, layers: int = 2, visual: bool = True,
                 textual: bool = True, use_scale: bool = True, init_scale: float = 1e-3):
        super().__init__()
        self.image = Adapter(dim, hidden, layers, enabled=visual, init_scale=init_scale)
        self.text = Adapter(dim, hidden, layers, enabled=textual, init_scale=init_scale)
        self.use_scale = use_scale

    def forward(self, img: Tensor, txt: Tensor, scale: float | Tensor) -> Tensor:
        """z_FDC = s · f̃ g̃ᵀ (eq. 8 with D1), shape (B, C)."""
        z = self.image(img) @ self.text(txt).T
        return scale * z if self.use_scale else z


class FVGPTHead(nn.Module):
    """FVG-PT on cached features: FRG + FDC for base classes, PC (BRG) for new classes.

    Submodules `frg`, `fdc`, `brg` are None when switched off. `frg` exists only together with
    `fdc`, since nothing but the FDC distillation reads r. FDC+FRG and BRG share no parameters.

    The distillation weight r of a view (eq. 9) comes from `r_source`: "frg" (the gate, default),
    "full" (r = 0: always distil towards the full view, the control for "is it the foreground or
    the anchoring?") or "fg" (r = 1). Without FRG and with `r_source="frg"`, r is
    `r_without_frg`: "one" (distil towards the foreground view), "target" (the hard target r*) or
    "half". Whatever the source, a view outside the area gate `[area_min, area_max]` has r = 0 and
    r* = 0 (not a usable foreground view); `area_min=0, area_max=1` turns the gate off.

    Backbone and CLIP features are frozen inputs: all logits derived from them, the indicators,
    r* and the teacher distributions are computed under `torch.no_grad()` (D4). Inputs are
    cast to the parameters' dtype, so float16 caches can be fed as they are.

    The arguments are trusted, not checked: they are `TrainConfig` fields, declared and validated
    once in `training` (`training.build_head` validates the configuration before building).
    """

    def __init__(self, dim: int, fdc_hidden: int = 64, gate_hidden: int = 32, fdc_layers: int = 2,
                 frg_layers: int = 2, brg_layers: int = 2,
                 frg_indicators: Sequence[str] = FRG_INDICATORS,
                 brg_indicators: Sequence[str] = BRG_INDICATORS,
                 use_frg: bool = True, use_fdc: bool = True, use_pc: bool = True,
                 fdc_visual: bool = True, fdc_textual: bool = True, tau: float = 2.0,
                 use_scale: bool = True, detach_r: bool = True, r_without_frg: str = "one",
                 fdc_init_scale: float = 1e-3, r_source: str = "frg", frg_margin: float = 0.0,
                 area_min: float = 0.02, area_max: float = 0.98):
        super().__init__()
        self.frg_names, self.brg_names = tuple(frg_indicators), tuple(brg_indicators)
        self.tau = float(tau)
        self.detach_r = detach_r
        self.r_without_frg = r_without_frg
        self.r_source = r_source
        self.frg_margin = float(frg_margin)
        self.area_range = (float(area_min), float(area_max))
        self.fdc = (FDC(dim, fdc_hidden, fdc_layers, fdc_visual, fdc_textual, use_scale, fdc_init_scale)
                    if use_fdc else None)
        self.frg = GateMLP(len(self.frg_names), gate_hidden, frg_layers) if use_fdc and use_frg else None
        self.brg = GateMLP(len(self.brg_names), gate_hidden, brg_layers) if use_pc else None

    def _dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.parameters()), torch.float32)

    def _cast(self, *xs: Tensor) -> list[Tensor]:
        dtype = self._dtype()
        return [x.to(dtype) for x in xs]

    def frozen(self, img_bb: Tensor, img_bb_fg: Tensor, img_clip: Tensor, area: Tensor, y: Tensor,
               txt_bb: Tensor, txt_clip: Tensor, scale: float | Tensor) -> dict[str, Tensor]:
        """Everything the losses need that depends only on frozen features (D4), per sample.

        Training computes this once for every stored view and indexes it per batch; the result
        is the same as computing it inside each step.
        """
        img_bb, img_bb_fg, img_clip, area, txt_bb, txt_clip = self._cast(
            img_bb, img_bb_fg, img_clip, area, txt_bb, txt_clip)
        with torch.no_grad():
            z_full = backbone_logits(img_bb, txt_bb, scale)
            z_fg = backbone_logits(img_bb_fg, txt_bb, scale)
            z_clip = clip_logits(img_clip, txt_clip, scale)
            usable = usable_foreground(area, *self.area_range)
            out = {
                "img_bb": img_bb, "y": y, "z_full": z_full, "z_clip": z_clip,
                "p_full": (z_full / self.tau).softmax(-1), "p_fg": (z_fg / self.tau).softmax(-1),
                "p_clip": (z_clip / self.tau).softmax(-1), "usable": usable,
                "r_star": frg_target(z_full, z_fg, y, self.frg_margin) * usable,
                "v": brg_indicators(z_full, z_clip, self.tau, self.brg_names),
            }
            if self.frg is not None:
                out["u"] = frg_indicators(z_full, z_fg, area, self.tau, self.frg_names)
        return out

    def losses(self, img_bb: Tensor, img_bb_fg: Tensor, img_clip: Tensor, area: Tensor, y: Tensor,
               txt_bb: Tensor, txt_clip: Tensor, scale: float | Tensor, lambda_d: float = 10.0,
               **kwargs) -> dict[str, Tensor]:
        """Training losses on one batch of base-class samples (eqs. 3–15).

        img_bb, img_bb_fg: backbone image vectors of the full image and its foreground view (B, D);
        img_clip: zero-shot CLIP features of the full image (B, D); area: A(m) (B,);
        y: labels (B,) indexing the rows of txt_bb / txt_clip, the base-class text features (Cb, D).
        Other keyword arguments are those of `losses_from`.
        """
        frozen = self.frozen(img_bb, img_bb_fg, img_clip, area, y, txt_bb, txt_clip, scale)
        return self.losses_from(frozen, txt_bb, scale, lambda_d, **kwargs)

    def distill_weight(self, frozen: dict[str, Tensor], q: Tensor | None) -> Tensor:
        """r of eq. 9 for each sample (see the class docstring), zero outside the area gate."""
        a, b, c = distill_weight_coefficients(self.r_source, q is not None, self.r_without_frg)
        r_star = frozen["r_star"]
        r = b * r_star + c if q is None else a * torch.sigmoid(q) + b * r_star + c
        return r * frozen["usable"]

    def losses_from(self, frozen: dict[str, Tensor], txt_bb: Tensor, scale: float | Tensor,
                    lambda_d: float = 10.0, *, lambda_frg: float = 1.0, lambda_pc: float = 1.0,
                    loss_frg: bool = True, loss_dist: bool = True, loss_ce_fdc: bool = True,
                    loss_ce_pc: bool = True, loss_kl_pc: bool = True,
                    loss_weights: dict[str, float] | None = None) -> dict[str, Tensor]:
        """The losses from `frozen` statistics of a batch (see `frozen`).

        L = CE(z_FDC) + λ_frg·L_FRG + λ_d·L_dist + λ_pc·L_PC (weights of the release's train.py).
        The `loss_*` flags switch single terms off (Table 12); with `loss_frg=False` the gate is
        still read, so r comes from an FRG that nothing trains (the literal Table 12 ablation).
        Returns the terms that are on — "frg", "dist" (unweighted), "ce_fdc" and their weighted
        sum "base" when FDC is on; "ce_pc", "kl_pc" and "pc" (unweighted) when PC is on — the
        objective "total" = base + λ_pc·pc, and "acc_fdc", the FDC branch's batch accuracy (%).
        `loss_weights` (registered term name → λ, `register_loss_term`) adds λ · the batch mean of each such term to
        "total" and returns the mean under the term's name.
        """
        (txt_bb,) = self._cast(txt_bb)
        img_bb, y = frozen["img_bb"], frozen["y"]
        out: dict[str, Tensor] = {}
        total = img_bb.new_zeros(())
        step: dict[str, Tensor | None] = {}
        if self.fdc is not None:
            base = img_bb.new_zeros(())
            q = self.frg.logit(frozen["u"]) if self.frg is not None else None
            if q is not None and loss_frg:
                out["frg"] = F.binary_cross_entropy_with_logits(q, frozen["r_star"])
                base = base + lambda_frg * out["frg"]
            z_fdc = self.fdc(img_bb, txt_bb, scale)
            log_q = (z_fdc / self.tau).log_softmax(-1)
            r = self.distill_weight(frozen, q)
            step.update(z_fdc=z_fdc, log_q=log_q, q_frg=q, r=r.detach() if self.detach_r else r)
            if loss_ce_fdc:
                out["ce_fdc"] = F.cross_entropy(z_fdc, y)
                base = base + out["ce_fdc"]
            if loss_dist:
                out["dist"] = distill_loss(r, frozen["p_fg"], frozen["p_full"], log_q, self.detach_r)
                base = base + lambda_d * out["dist"]
            out["base"] = base
            out["acc_fdc"] = (z_fdc.detach().argmax(-1) == y).to(img_bb.dtype).mean() * 100
            total = total + base
        if self.brg is not None:
            b = self.brg(frozen["v"])
            z_pc = pc_logits(frozen["z_full"], frozen["z_clip"], b)
            step.update(b=b, z_pc=z_pc)
            pc = img_bb.new_zeros(())
            if loss_ce_pc:
                out["ce_pc"] = F.cross_entropy(z_pc, y)
                pc = pc + out["ce_pc"]
            if loss_kl_pc:
                out["kl_pc"] = _kl_from_log(frozen["p_clip"], (z_pc / self.tau).log_softmax(-1)).mean()
                pc = pc + out["kl_pc"]
            out["pc"] = pc
            total = total + lambda_pc * pc
        weights = {name: w for name, w in (loss_weights or {}).items() if w}
        if weights:
            check_loss_weights(weights, self.fdc is not None, self.frg is not None, self.brg is not None)
            t = StepTensors(tau=self.tau, onehot=F.one_hot(y, frozen["z_full"].shape[-1]).to(img_bb.dtype),
                            z_full=frozen["z_full"], z_clip=frozen["z_clip"], p_full=frozen["p_full"],
                            p_fg=frozen["p_fg"], p_clip=frozen["p_clip"], r_star=frozen["r_star"],
                            usable=frozen["usable"], **step)
            for name, w in weights.items():
                out[name] = _LOSS_TERMS[name].fn(t).mean()
                total = total + w * out[name]
        out["total"] = total
        return out

    @torch.no_grad()
    def gates(self, frozen: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the gates output on frozen statistics: r (FRG, before the area gate), b (BRG), per sample."""
        out = {}
        if self.frg is not None:
            out["r"] = torch.sigmoid(self.frg.logit(frozen["u"]))
        if self.brg is not None:
            out["b"] = self.brg(frozen["v"])
        return out

    def predict_base(self, img_bb: Tensor, txt_bb: Tensor, scale: float | Tensor) -> Tensor:
        """Base branch (Fig. 3a): z_FDC from the full image; backbone logits when FDC is off."""
        img_bb, txt_bb = self._cast(img_bb, txt_bb)
        if self.fdc is None:
            return backbone_logits(img_bb, txt_bb, scale)
        return self.fdc(img_bb, txt_bb, scale)

    def new_gate(self, img_bb: Tensor, img_clip: Tensor, txt_bb: Tensor, txt_clip: Tensor,
                 scale: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z_bb, z_clip, b) of the new branch; b is None without PC."""
        img_bb, img_clip, txt_bb, txt_clip = self._cast(img_bb, img_clip, txt_bb, txt_clip)
        with torch.no_grad():
            z_bb = backbone_logits(img_bb, txt_bb, scale)
            z_clip = clip_logits(img_clip, txt_clip, scale)
            v = brg_indicators(z_bb, z_clip, self.tau, self.brg_names)
        return z_bb, z_clip, (self.brg(v) if self.brg is not None else None)

    def predict_new(self, img_bb: Tensor, img_clip: Tensor, txt_bb: Tensor, txt_clip: Tensor,
                    scale: float | Tensor) -> Tensor:
        """New branch (Fig. 3b): z_PC (eq. 12), which never calls FDC.

        Without PC there is no decoupled new branch, so new classes go through the one adapted
        head: z_FDC when FDC is on (this is what Table 3 rows (1) and (3) measure: new accuracy
        falls below the backbone's), else the backbone logits.
        """
        if self.brg is None:
            return self.predict_base(img_bb, txt_bb, scale)
        z_bb, z_clip, b = self.new_gate(img_bb, img_clip, txt_bb, txt_clip, scale)
        return pc_logits(z_bb, z_clip, b)

    def num_parameters(self, part: str | None = None) -> int:
        """Learnable parameters of the head, or of one part: "frg", "fdc" or "brg"."""
        if part is None:
            module: nn.Module | None = self
        elif part in ("frg", "fdc", "brg"):
            module = getattr(self, part)
        else:
            raise ValueError(f"part={part!r}; choose 'frg', 'fdc', 'brg' or None for the whole head")
        return 0 if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)
