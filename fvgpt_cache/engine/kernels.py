"""The optimiser kernels the engine steps with: torch's fused SGD / AdamW where this torch has them for
the device, plain tensor operations where it does not.

`torch._fused_sgd_` and `torch._fused_adamw_` are private: older builds lack them, and some builds
have them for CUDA only. Like nanoGPT's `configure_optimizers` (which asks whether AdamW takes
`fused=`), the engine asks once per device type: the kernel must exist and must run on two tiny
tensors of that device. Otherwise it steps with the public fallbacks below, which compute the same
update (torch.optim's SGD with coupled weight decay and AdamW, as the fused kernels do) one tensor
at a time; `tests/test_gpu_ready.py` compares the two.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

_PROBED: dict[tuple[str, str], bool] = {}
_HAS_THRESHOLD_BACKWARD = hasattr(torch.ops.aten, "threshold_backward")


def _probe(kind: str, device: torch.device) -> bool:
    p, g = torch.zeros(2, device=device), torch.ones(2, device=device)
    try:
        if kind == "sgd":
            torch._fused_sgd_([p], [g], [], weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0, nesterov=False,
                              maximize=False, is_first_step=False)
            return bool(torch.allclose(p, torch.full_like(p, -0.1)))
        m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.ones((), device=device)
        torch._fused_adamw_([p], [g], [m], [v], [], [step], amsgrad=False, lr=0.1, beta1=0.9, beta2=0.999,
                            weight_decay=0.0, eps=1e-8, maximize=False)
        return bool(torch.isfinite(p).all() and (p < 0).all())
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def fused_available(kind: str, device: torch.device) -> bool:
    """Whether torch's fused `kind` ('sgd' | 'adamw') kernel exists and runs on `device` (asked once per type)."""
    key = (kind, device.type)
    if key not in _PROBED:
        _PROBED[key] = _probe(kind, device)
    return _PROBED[key]


def sgd_step(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float, weight_decay: float,
             momentum: float, fused: bool) -> None:
    """p ← p − lr·b, b ← μ·b + (g + λ·p) (b starts at zero, so its first value is the first gradient, as in torch)."""
    if fused:
        torch._fused_sgd_(params, grads, bufs if momentum else [], weight_decay=weight_decay, momentum=momentum, lr=lr,
                          dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
        return
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g if weight_decay == 0 else g.add(p, alpha=weight_decay)
        if momentum:
            d = bufs[i].mul_(momentum).add_(d)
        p.add_(d, alpha=-lr)


def adamw_step(params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor], steps: list[Tensor],
               step_per_tensor: list[Tensor], *, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float, fused: bool) -> None:
    """torch.optim.AdamW's update; `steps` (one 0-d tensor per configuration) are counted up here first,
    `step_per_tensor` gives each parameter tensor its configuration's count."""
    if hasattr(torch, "_foreach_add_"):
        torch._foreach_add_(steps, 1)  # one launch for every configuration
    else:
        for s in steps:
            s.add_(1)
    if fused:
        torch._fused_adamw_(params, grads, m, v, [], step_per_tensor, amsgrad=False, lr=lr, beta1=betas[0],
                            beta2=betas[1], weight_decay=weight_decay, eps=eps, maximize=False)
        return
    b1, b2 = betas
    for p, g, mi, vi, step in zip(params, grads, m, v, step_per_tensor):
        p.mul_(1 - lr * weight_decay)
        mi.lerp_(g, 1 - b1)
        vi.mul_(b2).addcmul_(g, g, value=1 - b2)
        bias1 = 1 - torch.pow(b1, step)  # tensors: no host sync for the step count
        bias2_sqrt = torch.sqrt(1 - torch.pow(b2, step))
        p.sub_(mi / (vi.sqrt() / bias2_sqrt + eps) * (lr / bias1))


def relu_backward(dh: Tensor, h: Tensor) -> Tensor:
    """The ReLU's gradient gate given its output h: aten's threshold_backward where present."""
    if _HAS_THRESHOLD_BACKWARD:
        return torch.ops.aten.threshold_backward(dh, h, 0)
    return dh * (h > 0)



# What the engine's float32 products are: full IEEE float32 (no TF32, no bfloat16 passes), whatever the
# environment set; recorded in the first epoch of every run's history.
NUMERICS = {"float32_matmul": "ieee", "tf32": False}


def _precision_settings() -> list[tuple[object, str, object]]:
    """(owner, attribute, full-float32 value) of each switch that lets float32 products round lower.

    torch ≥ 2.9 has per-backend `fp32_precision` switches and refuses to mix them with the older
    `allow_tf32` / `set_float32_matmul_precision` ones (an error once both were used), so only the
    newer ones are touched where they exist; they also report a TF32 switched on the old way."""
    backends = torch.backends
    if "fp32_precision" in dir(backends.cuda.matmul) or hasattr(backends, "fp32_precision"):
        return [(backends.cuda.matmul, "fp32_precision", "ieee"), (backends.cudnn.conv, "fp32_precision", "ieee"),
                (backends.mkldnn.matmul, "fp32_precision", "ieee")]
    return [(backends.cuda.matmul, "allow_tf32", False), (backends.cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def float32_numerics():
    """The engine's matrix products in full float32 for the duration (`NUMERICS`), the caller's settings after.

    Some container images turn TF32 on (`NVIDIA_TF32_OVERRIDE`, `allow_tf32`); TF32 keeps 10 mantissa
    bits, which moves results by more than the engine-vs-reference tolerances and makes them depend on
    the GPU generation."""
    settings = _precision_settings()
    before = [getattr(owner, name) for owner, name, _ in settings]
    legacy = settings[0][1] == "allow_tf32"
    precision = torch.get_float32_matmul_precision() if legacy else None
    for owner, name, value in settings:
        setattr(owner, name, value)
    if legacy:
        torch.set_float32_matmul_precision("highest")
    try:
        yield dict(NUMERICS)
    finally:
        for (owner, name, _), value in zip(settings, before):
            setattr(owner, name, value)
        if legacy:
            torch.set_float32_matmul_precision(precision)


def float32_settings() -> dict[str, str]:
    """The environment's float32 product settings, by name (what `float32_numerics` overrides while training)."""
    names = {id(torch.backends.cuda.matmul): "cuda.matmul", id(torch.backends.cudnn): "cudnn",
             id(getattr(torch.backends.cudnn, "conv", None)): "cudnn.conv",
             id(getattr(torch.backends.mkldnn, "matmul", None)): "mkldnn.matmul"}
    return {f"{names.get(id(owner), type(owner).__name__)}.{name}": str(getattr(owner, name))
            for owner, name, _ in _precision_settings()}
