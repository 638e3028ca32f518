"""The optimiser of a group: torch's fused SGD / AdamW over the stacked parameters, one call per setting.

Per-configuration views of the flat parameter, gradient and state buffers are handed to torch's fused kernels
(`kernels.sgd_step`, `kernels.adamw_step`); configurations with equal optimiser settings step together. When
a group narrows (`Group.narrowed`), `carry_over` moves the states of the configurations that go on.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..heads import FVGPTHead
from ..training import TrainConfig
from .kernels import adamw_step, fused_available, sgd_step
from .layout import Layout, gather, put

BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class StackedOptimizer:
    """SGD (momentum, coupled weight decay) or AdamW for each configuration of a group, on its flat buffers.

    `masks` (block name → (K, *shape) 0/1) marks the entries that train; the others (frozen identity and embedding
    layers, unused indicator columns, a switched-off adapter's bias) are put back after every step."""

    def __init__(self, layout: Layout, cfgs: list[TrainConfig], flat: Tensor, grad: Tensor,
                 masks: dict[str, Tensor], device: torch.device):
        self.layout, self.cfgs, self.flat, self.grad, self.k = layout, cfgs, flat, grad, len(cfgs)
        params = layout.views(flat)
        views = [layout.rows(t) for t in (flat, grad)]
        self.kind = [c.optimizer for c in cfgs]
        self.fused = {kind: fused_available(kind, device) for kind in set(self.kind)}  # probed here, not per step
        self.state_flat = {key: torch.zeros_like(flat) if needed in self.kind else None
                           for key, needed in (("buf", "sgd"), ("m", "adamw"), ("v", "adamw"))}
        state = {key: None if t is None else layout.rows(t) for key, t in self.state_flat.items()}
        self.per_config = []
        names = list(layout.blocks)
        for k in range(self.k):
            entry = {"params": [views[0][n][k] for n in names], "grads": [views[1][n][k] for n in names],
                     "step": torch.zeros((), device=device)}
            for key, rows in state.items():
                entry[key] = None if rows is None else [rows[n][k] for n in names]
            self.per_config.append(entry)
        self.state = state
        self.params = params
        self.frozen = {name: (mask, params[name] * (1 - mask)) for name, mask in masks.items()}
        self.groups: dict = {}

    def set_lr(self, lr: list[float]) -> None:
        """The learning rate of each configuration for the coming epoch; configurations with equal
        optimiser settings step together in one fused call (their tensor lists are built here, once)."""
        self.lr = list(lr)
        members: dict[tuple, list[int]] = {}
        for k, c in enumerate(self.cfgs):
            members.setdefault((c.optimizer, self.lr[k], c.weight_decay, c.momentum), []).append(k)
        self.groups = {key: (ks, self._tensor_lists(ks)) for key, ks in members.items()}

    def _tensor_lists(self, members: list[int]) -> dict[str, list[Tensor]]:
        """The optimiser's tensors of `members`, concatenated per kind, as torch's fused kernels take them.

        SGD over every configuration takes the whole flat buffers: one long tensor instead of one per block
        and configuration (AdamW keeps a step count per configuration, so it always takes the blocks)."""
        if len(members) == self.k and self.cfgs[0].optimizer == "sgd":
            flat = {"params": [self.flat], "grads": [self.grad]}
            return {**flat, "buf": [] if self.state_flat["buf"] is None else [self.state_flat["buf"]],
                    "m": [], "v": [], "steps": [], "step_per_tensor": []}
        entries = [self.per_config[k] for k in members]
        out = {key: [t for e in entries for t in e[key]] for key in ("params", "grads")}
        for key in ("buf", "m", "v"):
            out[key] = [] if self.state[key] is None else [t for e in entries for t in e[key]]
        out["steps"] = [e["step"] for e in entries]
        out["step_per_tensor"] = [e["step"] for e in entries for _ in e["params"]]
        return out

    def step(self, on: list[float] | None) -> None:
        """One step of every active configuration, one fused call per set of configurations with equal
        settings; an inactive configuration (its smaller data fraction has no batch left in this epoch; `on[k]`
        is 0) takes no step at all and keeps its states. `on` is a host list (the batch plan is made on the
        host), so choosing the members costs no device sync."""
        for (kind, lr, wd, mom), (members, lists) in self.groups.items():
            if on is not None and not all(on[k] > 0 for k in members):
                members = [k for k in members if on[k] > 0]
                lists = self._tensor_lists(members)
            if not members or lr == 0.0:
                continue
            if kind == "sgd":
                sgd_step(lists["params"], lists["grads"], lists["buf"], lr=lr, weight_decay=wd, momentum=mom,
                         fused=self.fused["sgd"])
            else:
                adamw_step(lists["params"], lists["grads"], lists["m"], lists["v"], lists["steps"],
                           lists["step_per_tensor"], lr=lr, betas=BETAS, eps=ADAM_EPS, weight_decay=wd,
                           fused=self.fused["adamw"])
        for name, (mask, value) in self.frozen.items():
            self.params[name].mul_(mask).add_(value)

    def carry_over(self, old: "StackedOptimizer", keep: list[int], heads: list[FVGPTHead]) -> None:
        """Take the states of `old`'s configurations at positions `keep` (now 0…len(keep)−1 here); `heads` are
        `old`'s heads, used as holders to move each configuration's real entries between the two layouts."""
        for key, flat in old.state_flat.items():
            if flat is None or self.state_flat[key] is None:
                continue
            for j, k in enumerate(keep):
                holder = gather(old.layout, k, copy.deepcopy(heads[k]), old.cfgs[k], old.layout.views(flat))
                put(self.layout, j, holder, self.cfgs[j], self.layout.views(self.state_flat[key]))
        for j, k in enumerate(keep):
            self.per_config[j]["step"].copy_(old.per_config[k]["step"])
