"""The statistics table of a group: every frozen per-row quantity a step reads, computed once.

One table row per training row (image × stored view) and *variant* (a distinct τ, FRG margin, area gate and
mask source), so that a step reads all it needs with one index. Every value comes from the pure functions
of `fvgpt_cache.equations` (logits, entropies, r*, the area gate) and the registered indicators of
`fvgpt_cache.indicators`: the engine restates none.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..equations import backbone_logits, clip_logits, entropy, frg_target, usable_foreground
from ..indicators import GATES, brg_indicators, frg_indicators, indicator_names
from ..training import TrainConfig, TrainData


def variant(cfg: TrainConfig) -> tuple:
    """What a configuration's rows of frozen statistics depend on besides the data: τ, the FRG margin, the area gate
    and the mask source of its foreground views."""
    return (cfg.tau, cfg.frg_margin, cfg.area_min, cfg.area_max, cfg.fg_source)


def gate_columns(cfgs: list[TrainConfig]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The indicators the gate MLP of a group reads: per gate (FRG, BRG), every indicator one of the configurations
    uses, in the registry's order. A configuration's unused columns get zero, frozen weights."""
    return tuple(tuple(n for n in indicator_names(g) if any(n in getattr(c, f"{g}_indicators") for c in cfgs))
                 for g in GATES)


class StatisticsTable:
    """The frozen statistics of a group's training rows, per variant, in one (variants · rows, width) tensor.

    Columns (`cols`, name → width): the backbone image vector x, z_full, z_clip − z_full, the one-hot label,
    the teachers p_full, p_fg, p_clip at τ and their negative entropies, the gate MLP's input (the FRG columns
    of `columns[0]`, then the BRG columns of `columns[1]`), r* and the area gate's verdict. The table is
    allocated once and filled in place (no per-variant pieces, no concatenation)."""

    def __init__(self, data: TrainData, cfgs: list[TrainConfig], device: torch.device,
                 columns: tuple[tuple[str, ...], tuple[str, ...]]):
        views = data.full.shape[1]
        flat = lambda t: t.flatten(0, 1).to(device, torch.float32)  # noqa: E731
        x = flat(data.full)
        x_clip = x if data.clip is data.full else flat(data.clip)  # the CLIP view is the backbone's own when it is CLIP
        y = data.y.repeat_interleave(views).to(device)
        self.txt = data.txt_bb.to(device, torch.float32)
        txt_clip = data.txt_clip.to(device, torch.float32)
        s = data.scale
        n, C, D = x.shape[0], self.txt.shape[0], x.shape[1]
        frg_cols, brg_cols = columns
        self.columns, self.rows, self.n_classes = columns, n, C
        self.cols = {"x": D, "z_full": C, "z_diff": C, "onehot": C, "p_full": C, "p_fg": C, "p_clip": C,
                     "nh_full": 1, "nh_fg": 1, "nh_clip": 1, "gate_in": len(frg_cols) + len(brg_cols), "r_star": 1,
                     "usable": 1}
        self.variants = sorted(set(variant(c) for c in cfgs))
        with torch.no_grad():
            z_full = backbone_logits(x, self.txt, s)
            z_clip = clip_logits(x_clip, txt_clip, s)
            del x_clip  # only its logits are needed from here on
            self.table = torch.empty(len(self.variants) * n, sum(self.cols.values()), device=device)
            fg: dict[str, tuple[Tensor, Tensor]] = {}  # per mask source: z_fg and the areas (shared by its variants)
            for i, (tau, margin, lo, hi, source) in enumerate(self.variants):
                if source not in fg:
                    src = data.source(source)
                    fg[source] = (backbone_logits(flat(src.fg), self.txt, s), flat(src.area))
                z_fg, area = fg[source]
                col = self.split(self.table[i * n:(i + 1) * n])
                col["x"].copy_(x)
                col["z_full"].copy_(z_full)
                col["z_diff"].copy_(z_clip - z_full)
                col["onehot"].zero_().scatter_(1, y[:, None], 1.0)
                for name, z in (("full", z_full), ("fg", z_fg), ("clip", z_clip)):
                    p = (z / tau).softmax(-1)
                    col[f"p_{name}"].copy_(p)
                    col[f"nh_{name}"].copy_(-entropy(p)[:, None])
                    del p
                col["gate_in"][:, :len(frg_cols)].copy_(frg_indicators(z_full, z_fg, area, tau, frg_cols))
                col["gate_in"][:, len(frg_cols):].copy_(brg_indicators(z_full, z_clip, tau, brg_cols))
                usable = usable_foreground(area, lo, hi)
                col["r_star"].copy_((frg_target(z_full, z_fg, y, margin) * usable)[:, None])
                col["usable"].copy_(usable[:, None])

    def split(self, rows: Tensor) -> dict[str, Tensor]:
        """Views of each column of some table rows (..., width)."""
        return dict(zip(self.cols, rows.split(list(self.cols.values()), dim=-1)))

    def offsets(self, cfgs: list[TrainConfig], device: torch.device) -> Tensor:
        """(K, 1) where each configuration's variant starts in the table."""
        return torch.tensor([self.variants.index(variant(c)) * self.rows for c in cfgs], device=device).view(-1, 1)

    def start(self, name: str) -> int:
        """The first column of `name`."""
        names = list(self.cols)
        return sum(self.cols[n] for n in names[:names.index(name)])
