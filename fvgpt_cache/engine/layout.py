"""The padded layout of a group: where each configuration's parameters sit in the stacked tensors."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..heads import FVGPTHead
from ..training import TrainConfig
from .table import gate_columns


@dataclass
class Block:
    name: str
    shape: tuple[int, ...]  # without the leading K
    offset: int = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Layout:
    """Padded shapes of a group and the flat buffers that hold parameters, gradients and states.

    The two gates share one block-diagonal MLP, "gate": its inputs are the FRG indicators of `columns[0]` and
    then the BRG indicators of `columns[1]` (every indicator a configuration of the group uses,
    `table.gate_columns`), hidden units [0, H) belong to FRG and [H, 2H) to BRG, output 0 is q_FRG and
    output 1 is q_BRG. The blocks between the two gates are frozen at zero, so the gates stay
    independent while a step runs one small MLP instead of two. A narrowed group keeps its parent's
    `columns`, since it reads its parent's statistics table."""

    def __init__(self, dim: int, cfgs: list[TrainConfig], device: torch.device,
                 columns: tuple[tuple[str, ...], tuple[str, ...]] | None = None):
        self.k, self.dim, self.device = len(cfgs), dim, device
        self.columns = columns if columns is not None else gate_columns(cfgs)
        self.gate_offset = (0, len(self.columns[0]))  # the first gate-MLP input column of FRG and of BRG
        self.fdc_depth = cfgs[0].fdc_layers
        self.fdc_hidden = max(c.fdc_hidden for c in cfgs)
        self.gate_depth = max(max(c.frg_layers, c.brg_layers) for c in cfgs)
        one_layer = any(min(c.frg_layers, c.brg_layers) == 1 for c in cfgs) and self.gate_depth > 1
        widest = max(len(c) for c in self.columns)  # a 1-layer gate embeds its inputs in its hidden units
        self.gate_hidden = max([c.gate_hidden for c in cfgs] + ([widest] if one_layer else []))
        fdc_dims = [dim] + [self.fdc_hidden] * (self.fdc_depth - 1) + [dim]
        gate_dims = [sum(len(c) for c in self.columns)] + [2 * self.gate_hidden] * (self.gate_depth - 1) + [2]
        self.dims = {"fdc_img": fdc_dims, "fdc_txt": fdc_dims, "gate": gate_dims}
        self.blocks: dict[str, Block] = {}
        offset = 0
        for module, dims in self.dims.items():
            for i in range(len(dims) - 1):
                for kind, shape in (("w", (dims[i + 1], dims[i])), ("b", (dims[i + 1],))):
                    block = Block(f"{module}.{i}.{kind}", shape, offset)
                    self.blocks[block.name] = block
                    offset += self.k * block.size
        self.numel = offset

    def gate_units(self, gate: int, layer: int, n: int | None = None) -> slice:
        """The outputs of padded gate layer `layer` that belong to gate 0 (FRG) or 1 (BRG): their first n."""
        if layer == self.gate_depth - 1:
            return slice(gate, gate + 1)
        start = gate * self.gate_hidden
        return slice(start, start + (self.gate_hidden if n is None else n))

    def relu_switches(self) -> Tensor:
        """All-on switches (K, depth − 1, 2H) of the ReLU after each hidden unit of the gate MLP, for `scatter`."""
        return torch.ones(self.k, max(self.gate_depth - 1, 1), 2 * self.gate_hidden)

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Contiguous (K, *shape) views of each parameter into a flat buffer."""
        return {n: flat[b.offset:b.offset + self.k * b.size].view(self.k, *b.shape) for n, b in self.blocks.items()}

    def rows(self, flat: Tensor) -> dict[str, Tensor]:
        """(K, size) views of each block: one row per configuration, for per-configuration factors."""
        return {n: flat[b.offset:b.offset + self.k * b.size].view(self.k, b.size) for n, b in self.blocks.items()}

    def layers(self, views: dict[str, Tensor], module: str) -> list[tuple[Tensor, Tensor]]:
        return [(views[f"{module}.{i}.w"], views[f"{module}.{i}.b"]) for i in range(len(self.dims[module]) - 1)]


def _linears(seq: nn.Sequential | None) -> list[nn.Linear]:
    return [] if seq is None else [m for m in seq if isinstance(m, nn.Linear)]


def _gate_slots(layout: Layout, depth: int):
    """For a gate of `depth` real layers: per padded layer, ("real", j) or ("identity" | "embed", None)."""
    if depth == layout.gate_depth:
        return [("real", j) for j in range(depth)]
    if depth == 2:  # 2 real layers in a 3-layer structure: identity in the middle
        return [("real", 0), ("identity", None), ("real", 1)]
    return [("embed", None)] + [("identity", None)] * (layout.gate_depth - 2) + [("real", 0)]


def _gates(layout: Layout, head: FVGPTHead, cfg: TrainConfig):
    """(0 for FRG | 1 for BRG, the gate, its padded slots, the gate MLP's input columns of its indicators)."""
    for g, (gate, depth, names) in enumerate(((head.frg, cfg.frg_layers, head.frg_names),
                                              (head.brg, cfg.brg_layers, head.brg_names))):
        if gate is not None:
            known, first = layout.columns[g], layout.gate_offset[g]
            yield g, gate, _gate_slots(layout, depth), [first + known.index(n) for n in names]


def _placements(layout: Layout, head: FVGPTHead, cfg: TrainConfig):
    """Where each real parameter of a head sits in the padded stacks: (block, rows, columns or None, parameter)."""
    for module, adapter in (("fdc_img", head.fdc and head.fdc.image), ("fdc_txt", head.fdc and head.fdc.text)):
        for i, lin in enumerate(_linears(adapter.mlp if adapter is not None else None)):
            out, inp = lin.weight.shape
            yield f"{module}.{i}.w", slice(0, out), list(range(inp)), lin.weight
            yield f"{module}.{i}.b", slice(0, out), None, lin.bias
    for g, gate, slots, cols in _gates(layout, head, cfg):
        lins = _linears(gate.mlp)
        for i, (kind, j) in enumerate(slots):
            if kind != "real":
                continue
            out, inp = lins[j].weight.shape
            if i == 0:
                in_cols = cols
            elif slots[0][0] == "embed":  # the embedding put indicator c on hidden unit c of this gate
                in_cols = [g * layout.gate_hidden + c - layout.gate_offset[g] for c in cols]
            else:
                units = layout.gate_units(g, i - 1, inp)
                in_cols = list(range(units.start, units.stop))
            yield f"gate.{i}.w", layout.gate_units(g, i, out), in_cols, lins[j].weight
            yield f"gate.{i}.b", layout.gate_units(g, i, out), None, lins[j].bias


def put(layout: Layout, k: int, head: FVGPTHead, cfg: TrainConfig, views: dict[str, Tensor],
         value: float | None = None) -> None:
    """Write configuration k's real parameters (or `value` at their places) into the padded stacks `views`."""
    for name, rows, cols, param in _placements(layout, head, cfg):
        src = param.detach().to(views[name].device) if value is None else value
        if cols is None:
            views[name][k, rows] = src
        else:
            views[name][k, rows][:, cols] = src


def scatter(layout: Layout, k: int, head: FVGPTHead, cfg: TrainConfig, params: dict[str, Tensor],
            mask: dict[str, Tensor], acts: Tensor) -> None:
    """Put configuration k's head into the padded stacks; mark its trainable entries in `mask`; set up
    the frozen layers (identity, input embedding) and the activation switches (K, depth − 1, 2H) of a
    shallower gate."""
    put(layout, k, head, cfg, params)
    put(layout, k, head, cfg, mask, value=1.0)
    h = layout.gate_hidden
    for g, gate, slots, cols in _gates(layout, head, cfg):
        units = layout.gate_units(g, 0)
        for i, (kind, _) in enumerate(slots):
            if i < len(slots) - 1:  # a 1-layer gate (embedding first) is linear: no ReLU anywhere
                acts[k, i, units] = 0.0 if slots[0][0] == "embed" else 1.0
            if kind == "identity":
                params[f"gate.{i}.w"][k, units, units] = torch.eye(h)
            elif kind == "embed":
                for c in cols:
                    params[f"gate.{i}.w"][k, g * h + c - layout.gate_offset[g], c] = 1.0


def gather(layout: Layout, k: int, head: FVGPTHead, cfg: TrainConfig, params: dict[str, Tensor]) -> FVGPTHead:
    """The inverse of `scatter`: configuration k's trained values back into its own head."""
    with torch.no_grad():
        for name, rows, cols, param in _placements(layout, head, cfg):
            param.copy_(params[name][k, rows] if cols is None else params[name][k, rows][:, cols])
    return head


