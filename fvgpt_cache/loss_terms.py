"""Loss terms beyond the paper's: a registry, one entry per term, each weighted by its own λ parameter.

A term is a function of the step's tensors (`StepTensors`) returning one value per sample; registering it
declares the training parameter `lambda_<term>` (default 0: off). The reference head (`heads.FVGPTHead.losses_from`)
and the engine (`engine.step`) both read this registry; docs/extending.md shows one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from .plugins import code_fingerprint

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
    fingerprint: str = ""  # `plugins.code_fingerprint` of `fn`: a run id covers it when the run weights the term

    @property
    def weight(self) -> str:
        return f"lambda_{self.name}"


_LOSS_TERMS: dict[str, LossTerm] = {}
# what a run's history logs of the built-in objective (`heads.FVGPTHead.losses_from`), in its order
BUILTIN_TERMS = ("frg", "ce_fdc", "dist", "base", "acc_fdc", "ce_pc", "kl_pc", "pc", "total")


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
        term = LossTerm(name, f, text, needs, code_fingerprint(f))
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
