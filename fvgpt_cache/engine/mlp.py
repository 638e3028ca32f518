"""Forward and hand-written backward of K stacked MLPs, and the factor helpers of the loss."""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels import relu_backward


def mlp_forward(x: Tensor, layers: list[tuple[Tensor, Tensor]], act: Tensor | None) -> tuple[Tensor, list[Tensor]]:
    """x (K, N, in) or (N, in) shared; returns the output (K, N, out) and the inputs of each layer.

    `act` (K, depth−1, 1, units), boolean, switches the ReLU of each hidden unit per configuration (None: all on)."""
    inputs = []
    h = x
    for i, (w, b) in enumerate(layers):
        inputs.append(h)
        if h.dim() == 3:
            pre = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        else:  # an input shared by all configurations: one (N, in) @ (in, K·out) product
            k, out = w.shape[:2]
            pre = torch.addmm(b.view(1, -1), h, w.view(k * out, -1).T).view(h.shape[0], k, out).transpose(0, 1)
        if i < len(layers) - 1:
            relu = torch.relu(pre)
            h = relu if act is None else torch.where(act[:, i], relu, pre)
        else:
            h = pre
    return h, inputs


def mlp_backward(d_out: Tensor, layers: list[tuple[Tensor, Tensor]], inputs: list[Tensor], act: Tensor | None,
                 grads: list[tuple[Tensor, Tensor]]) -> None:
    """Writes ∂L/∂W, ∂L/∂b of every layer into `grads` (views of the flat gradient buffer)."""
    d = d_out
    for i in range(len(layers) - 1, -1, -1):
        (w, _), (gw, gb), h = layers[i], grads[i], inputs[i]
        if h.dim() == 3:
            torch.bmm(d.transpose(1, 2), h, out=gw)
        else:  # shared input: one (K·out, N) @ (N, in) product
            torch.mm(d.transpose(1, 2).reshape(-1, h.shape[0]), h, out=gw.view(-1, h.shape[1]))
        torch.sum(d, dim=1, out=gb)
        if i == 0:
            break
        dh = torch.bmm(d, w)
        through = relu_backward(dh, h)  # h = relu(pre): the ReLU's gradient gate
        d = through if act is None else torch.where(act[:, i - 1], through, dh)


def _times(t: Tensor, factor: Tensor | float) -> Tensor | float:
    """t · factor, where a Python-number factor of 1 is skipped and 0 gives 0."""
    if isinstance(factor, float):
        return t if factor == 1.0 else 0.0 if factor == 0.0 else t * factor
    return t * factor


def _sum_terms(*terms, like: Tensor) -> Tensor:
    """The sum of tensor and number terms (zeros skipped); a tensor shaped like `like`."""
    total = None
    for term in terms:
        if isinstance(term, float) and term == 0.0:
            continue
        total = term if total is None else total + term
    if total is None:
        return torch.zeros_like(like)
    return total if isinstance(total, Tensor) else torch.full_like(like, total)


