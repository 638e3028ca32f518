"""FVG-PT heads on cached features (docs/method.md): the learnable parts, wired from the equations.

The modules hold only the learnable parts (two gates, two adapters) and wire together the pure functions
of `equations.py`, the indicators of `indicators.py` and the registered loss terms of `loss_terms.py`.
Everything reads features, never pixels. Equation numbers are the paper's.

Decisions (docs/decisions.md) that show up as options: D1 `use_scale` (z_FDC carries the logit scale),
D2 `detach_r` (r is a constant inside L_dist), D3 KL(target ‖ student), D4 indicators are
computed from the frozen backbone under `torch.no_grad()` and are not normalised.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .equations import (
    _kl_from_log, backbone_logits, clip_logits, distill_loss, distill_weight_coefficients, frg_target, pc_logits,
    usable_foreground,
)
from .indicators import BRG_INDICATORS, FRG_INDICATORS, brg_indicators, frg_indicators
from .loss_terms import _LOSS_TERMS, StepTensors, check_loss_weights

R_WITHOUT_FRG = ("one", "target", "half")
R_SOURCES = ("frg", "full", "fg")
LAYER_CHOICES = (1, 2, 3)


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
