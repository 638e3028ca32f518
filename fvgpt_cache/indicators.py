"""Reliability indicators: the inputs of the FRG and BRG gates, one registry entry each (eqs. 4–5, 13–14).

An indicator is a function of a view's frozen logits (`IndicatorInputs`) returning one value per view. The
paper's six are registered here; `register_indicator` adds more (docs/extending.md). Training computes every
indicator a group uses once per view before the first step; evaluation computes the BRG ones per test image.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .equations import entropy, prob_cosine
from .plugins import code_fingerprint

# the paper's indicators (eqs. 5, 13): the built-in entries and the default inputs of the gates
FRG_INDICATORS = ("dH", "cos", "area")
BRG_INDICATORS = ("H_bb", "H_clip", "cos")


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
    fingerprint: str = ""  # `plugins.code_fingerprint` of `fn`: a run id covers it for a registered indicator


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
        _INDICATORS[(gate, name)] = Indicator(name, gate, f, help or (f.__doc__ or "").strip().split("\n")[0],
                                              code_fingerprint(f))
        return f

    return add if fn is None else add(fn)


def unregister_indicator(name: str, gate: str) -> None:
    """Remove a registered indicator (built-in ones too: tests restore them with `register_indicator`)."""
    if _INDICATORS.pop((gate, name), None) is None:
        raise ValueError(f"no {gate.upper()} indicator {name!r} is registered")


def indicator_names(gate: str) -> tuple[str, ...]:
    """The registered indicators of a gate, in registration order (the built-ins first)."""
    return tuple(n for g, n in _INDICATORS if g == gate)


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


BUILT_IN = frozenset(_INDICATORS)  # (gate, name) of the paper's six, registered above


def registered_fingerprints(frg: Sequence[str], brg: Sequence[str]) -> dict[str, str]:
    """{"indicator:<gate>:<name>": code fingerprint} of the registered (not built-in) indicators among these."""
    return {f"indicator:{gate}:{name}": _INDICATORS[(gate, name)].fingerprint
            for gate, names in (("frg", frg), ("brg", brg)) for name in names
            if (gate, name) not in BUILT_IN and (gate, name) in _INDICATORS}
