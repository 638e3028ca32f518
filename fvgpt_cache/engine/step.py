"""One training step of a group: the stacked forward of K configurations and the gradients of their losses.

The built-in loss terms (eqs. 3–15) have hand-written gradients (`manual_backward`, checked against autograd
of `heads.FVGPTHead.losses_from` in tests/test_engine.py); autograd over the same stacked forward costs
1.5–1.9× more per step and 1.41× on a 64-configuration grid (benchmarks/bench_grid.py --only backward,
docs/decisions.md). Registered loss terms (`loss_terms.register_loss_term`) run through autograd on the same
stacked tensors and add their gradients; `backward="autograd"` takes every term through autograd (the
reference the benchmarks and tests compare with).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..equations import distill_weight_coefficients
from ..loss_terms import StepTensors, loss_terms
from ..training import TrainConfig
from .mlp import _sum_terms, _times, mlp_backward, mlp_forward

TERMS = ("frg", "ce_fdc", "dist", "acc_fdc", "ce_pc", "kl_pc")
BACKWARDS = ("manual", "autograd")


@dataclass
class LossFactors:
    """Per-configuration scalars of the loss. Each is a float32 (K, 1) tensor, kept as a Python number when every
    configuration has the same value (then ×1 and +0·x are skipped): the same float32 numbers either way, so a
    configuration computes the same bits alone or in a group.

    `weights`: the weight of each term in the objective (0 where the term is switched off), on the CPU;
    `f2` / `f3`: the factors of (K, B) / (K, B, C) tensors the step uses, on the device."""

    weights: dict[str, Tensor]
    f2: dict[str, Tensor | float]
    f3: dict[str, Tensor | float]
    plugins: dict[str, Tensor]  # registered loss terms some configuration weights: name → λ per configuration (K, 1)
    plugin_weights: Tensor | None = None  # (len(plugins), K) on the device: the step's objective reads it
    builtin_weights: Tensor | None = None  # (len(TERMS), K) on the device (`backward="autograd"`)

    @classmethod
    def of(cls, cfgs: list[TrainConfig], scale: float, device: torch.device) -> "LossFactors":
        def col(values) -> Tensor:  # on the CPU: whether a factor is uniform is decided without a device sync
            return torch.tensor([float(v) for v in values]).view(-1, 1)

        has_fdc = [c.use_fdc for c in cfgs]
        has_frg = [c.use_fdc and c.use_frg for c in cfgs]
        w = {
            "ce_fdc": col(f and c.loss_ce_fdc for f, c in zip(has_fdc, cfgs)),
            "dist": col(c.lambda_d if f and c.loss_dist else 0 for f, c in zip(has_fdc, cfgs)),
            "frg": col(c.lambda_frg if f and c.loss_frg else 0 for f, c in zip(has_frg, cfgs)),
            "ce_pc": col(c.use_pc and c.loss_ce_pc for c in cfgs),
            "kl_pc": col(c.use_pc and c.loss_kl_pc for c in cfgs),
            "lambda_pc": col(c.lambda_pc for c in cfgs),
        }
        tau = col(c.tau for c in cfgs)
        scale_on = col(c.use_scale for c in cfgs)
        # r = usable · (a·σ(q) + b·r* + c)
        r_a, r_b, r_c = (col(v) for v in zip(*(distill_weight_coefficients(c.r_source, frg, c.r_without_frg)
                                               for c, frg in zip(cfgs, has_frg))))
        factors = {
            "r_a": r_a, "r_b": r_b, "r_c": r_c, "frg": w["frg"],
            # ∂L/∂q_FRG through r when r is not detached: λ_d · usable · σ'(q) · (KL_fg − KL_full)
            "r_grad": col(not c.detach_r for c in cfgs) * r_a * w["dist"],
            "r_live": col(not c.detach_r for c in cfgs),  # 1 where r is not detached (the autograd path reads it)
            "scale": scale_on * scale + (1 - scale_on), "tau": tau, "ce_fdc": w["ce_fdc"],
            "dist_tau": w["dist"] / tau, "ce_pc": w["lambda_pc"] * w["ce_pc"],
            "kl_pc_tau": w["lambda_pc"] * w["kl_pc"] / tau,
        }
        uniform = lambda t: float(t[0]) if bool((t == t[0]).all()) else t.to(device)  # noqa: E731
        f2 = {k: uniform(v) for k, v in factors.items()}
        f3 = {k: v if isinstance(v, float) else v.unsqueeze(-1) for k, v in f2.items()}
        plugins = {name: col(c.get(term.weight) for c in cfgs) for name, term in loss_terms().items()}
        plugins = {name: lam for name, lam in plugins.items() if bool((lam != 0).any())}
        out = cls(w, f2, f3, plugins)
        # copied to the device once here, so that a step reads them without a host-to-device copy
        out.plugin_weights = torch.cat(list(plugins.values()), 1).T.to(device) if plugins else None
        out.builtin_weights = out.term_weights().to(device)
        return out

    @property
    def term_names(self) -> tuple[str, ...]:
        """The rows of a step's terms: the built-in `TERMS`, then the registered terms this group weights."""
        return TERMS + tuple(self.plugins)

    def weighted_terms(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """base = CE_FDC + λ_frg·L_FRG + λ_d·L_dist, pc = CE_PC + KL_PC, total = base + λ_pc·pc (switched terms
        count 0). Linear in the terms, so epoch means of the terms give the epoch means of these."""
        w = {k: v.squeeze(-1).to(terms["frg"].device) for k, v in self.weights.items()}
        base = w["ce_fdc"] * terms["ce_fdc"] + w["frg"] * terms["frg"] + w["dist"] * terms["dist"]
        pc = w["ce_pc"] * terms["ce_pc"] + w["kl_pc"] * terms["kl_pc"]
        total = base + w["lambda_pc"] * pc
        for name, lam in self.plugins.items():
            total = total + lam.squeeze(-1).to(terms[name].device) * terms[name]
        return {"base": base, "pc": pc, "total": total}

    def term_weights(self) -> Tensor:
        """(len(TERMS), K): the weight of each built-in term in the objective (acc_fdc: 0), on the CPU."""
        w = self.weights
        per_term = {"frg": w["frg"], "ce_fdc": w["ce_fdc"], "dist": w["dist"], "acc_fdc": torch.zeros_like(w["frg"]),
                    "ce_pc": w["lambda_pc"] * w["ce_pc"], "kl_pc": w["lambda_pc"] * w["kl_pc"]}
        return torch.cat([per_term[t] for t in TERMS], dim=1).T


def forward(col: dict[str, Tensor], layers: dict, txt: Tensor, acts: Tensor | None,
            f: LossFactors) -> dict[str, Tensor]:
    """The stacked forward of one batch: per-row loss terms (`TERMS`, each (K, B)) and the step's tensors.

    `col`: the batch's columns of the statistics table (K, B, ·); `layers`: the stacked parameters per module.
    Under autograd, r carries the FRG gate's gradient only for configurations that do not detach it (D2)."""
    f2, f3 = f.f2, f.f3
    x, onehot = col["x"], col["onehot"]
    r_star, usable = col["r_star"].squeeze(-1), col["usable"].squeeze(-1)
    out: dict[str, Tensor] = {}
    # FDC (eqs. 7-8): cos(e, t) of the adapted vectors e = x + A(x), t = T + A_T(T), normalised in the logits
    a_img, out["in_img"] = mlp_forward(x, layers["fdc_img"], None)
    e = x + a_img
    a_txt, out["in_txt"] = mlp_forward(txt, layers["fdc_txt"], None)
    t = txt + a_txt
    n_e, n_t = e.norm(dim=-1, keepdim=True), t.norm(dim=-1, keepdim=True)
    norms = n_e * n_t.transpose(1, 2)  # (K, B, C)
    cos = torch.bmm(e, t.transpose(1, 2)) / norms
    z = _times(cos, f3["scale"])
    logp = z.log_softmax(-1)
    logp_y = (logp * onehot).sum(-1)
    out["ce_fdc"] = -logp_y
    out["acc_fdc"] = (logp_y >= logp.amax(-1)).to(logp.dtype).detach()  # a fraction; ×100 per epoch
    logq = (z / f3["tau"]).log_softmax(-1)
    # the two gates in one MLP: FRG (eqs. 3-6) and BRG (eq. 13)
    q, out["in_gate"] = mlp_forward(col["gate_in"], layers["gate"], acts)
    q_frg, q_brg = q[..., 0], q[..., 1]
    sig = torch.sigmoid(q_frg)
    out["frg"] = F.binary_cross_entropy_with_logits(q_frg, r_star, reduction="none")
    sig_r = sig.detach()
    if torch.is_grad_enabled():
        sig_r = _sum_terms(_times(sig - sig_r, f2["r_live"]), sig_r, like=sig)  # value σ(q); gradient where live
    r = usable * _sum_terms(_times(sig_r, f2["r_a"]), _times(r_star, f2["r_b"]), f2["r_c"], like=sig)
    kl_fg = col["nh_fg"].squeeze(-1) - (col["p_fg"] * logq).sum(-1)
    kl_full = col["nh_full"].squeeze(-1) - (col["p_full"] * logq).sum(-1)
    out["dist"] = torch.addcmul(kl_full, r, kl_fg - kl_full)
    # PC with BRG (eqs. 11-15)
    b = torch.sigmoid(q_brg)
    z_pc = torch.addcmul(col["z_full"], b.unsqueeze(-1), col["z_diff"])
    lp_pc = z_pc.log_softmax(-1)
    lq_pc = (z_pc / f3["tau"]).log_softmax(-1)
    out["ce_pc"] = -(lp_pc * onehot).sum(-1)
    out["kl_pc"] = col["nh_clip"].squeeze(-1) - (col["p_clip"] * lq_pc).sum(-1)
    out.update(e=e, t=t, n_e=n_e, n_t=n_t, norms=norms, cos=cos, z=z, logp=logp, logq=logq, q_frg=q_frg, sig=sig,
               r=r, kl_gap=kl_fg - kl_full, b=b, z_pc=z_pc, lp_pc=lp_pc, lq_pc=lq_pc)
    return out


@torch.no_grad()
def manual_backward(fw: dict[str, Tensor], col: dict[str, Tensor], weight: Tensor, layers: dict, grads: dict,
                    acts: Tensor | None, f: LossFactors) -> None:
    """The gradients of the built-in terms' objective (`LossFactors.term_weights` · the batch means of `TERMS`),
    written into `grads` (views of the flat gradient buffer)."""
    f2, f3 = f.f2, f.f3
    onehot, p_full, p_fg, p_clip = col["onehot"], col["p_full"], col["p_fg"], col["p_clip"]
    r_star, usable = col["r_star"].squeeze(-1), col["usable"].squeeze(-1)
    e, t, n_e, n_t, norms, cos = fw["e"], fw["t"], fw["n_e"], fw["n_t"], fw["norms"], fw["cos"]
    sig, r, b = fw["sig"], fw["r"], fw["b"]
    wb = weight.unsqueeze(-1)
    teacher = torch.lerp(p_full, p_fg, r.unsqueeze(-1))
    dz = _sum_terms(_times(fw["logp"].exp() - onehot, f3["ce_fdc"]),
                    _times(fw["logq"].exp() - teacher, f3["dist_tau"]), like=fw["logp"]) * wb
    # ∂cos/∂e_b = t_c / (|e_b| |t_c|) − cos_bc · e_b / |e_b|², and likewise for t_c
    dcos = _times(dz, f3["scale"])
    dcos_n = dcos / norms
    dcos_cos = dcos * cos
    de = torch.baddbmm(e * (dcos_cos.sum(-1, keepdim=True) / n_e.square()), dcos_n, t, beta=-1)
    dt = torch.baddbmm(t * (dcos_cos.sum(1).unsqueeze(-1) / n_t.square()), dcos_n.transpose(1, 2), e, beta=-1)
    mlp_backward(de, layers["fdc_img"], fw["in_img"], None, grads["fdc_img"])
    mlp_backward(dt, layers["fdc_txt"], fw["in_txt"], None, grads["fdc_txt"])
    dq_frg = _times(sig - r_star, f2["frg"])
    if not (isinstance(f2["r_grad"], float) and f2["r_grad"] == 0.0):
        dq_frg = dq_frg + _times(usable * sig * (1 - sig) * fw["kl_gap"], f2["r_grad"])
    dz_pc = _sum_terms(_times(fw["lp_pc"].exp() - onehot, f3["ce_pc"]),
                       _times(fw["lq_pc"].exp() - p_clip, f3["kl_pc_tau"]), like=fw["lp_pc"]) * wb
    dq_brg = (dz_pc * col["z_diff"]).sum(-1) * b * (1 - b)
    mlp_backward(torch.stack([dq_frg * weight, dq_brg], -1), layers["gate"], fw["in_gate"], acts, grads["gate"])


def step_tensors(fw: dict[str, Tensor], col: dict[str, Tensor], f: LossFactors) -> StepTensors:
    """What a registered loss term reads (`loss_terms.StepTensors`), from the stacked forward: (K, B, ·) tensors."""
    return StepTensors(tau=f.f3["tau"], onehot=col["onehot"], z_full=col["z_full"],
                       z_clip=col["z_full"] + col["z_diff"], p_full=col["p_full"], p_fg=col["p_fg"],
                       p_clip=col["p_clip"], r_star=col["r_star"].squeeze(-1),
                       usable=col["usable"].squeeze(-1), z_fdc=fw["z"], log_q=fw["logq"], q_frg=fw["q_frg"],
                       r=fw["r"], b=fw["b"], z_pc=fw["z_pc"])


def plugin_terms(fw: dict[str, Tensor], col: dict[str, Tensor], weight: Tensor, f: LossFactors) -> Tensor:
    """(len(f.plugins), K): the batch mean of each registered term the group weights, with its autograd graph."""
    t = step_tensors(fw, col, f)
    terms = loss_terms()
    return torch.stack([(terms[name].fn(t) * weight).sum(-1) for name in f.plugins])
