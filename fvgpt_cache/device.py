"""The torch device a command runs on, and moving a caller's model there and back."""
from __future__ import annotations

import contextlib

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU; `cuda` without a GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: choose auto, cpu or cuda")
    return torch.device(device)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def moved_to(module: torch.nn.Module, device: torch.device):
    """`module` on `device` for the duration of the block, then back on the device it came from.

    A pass that is given a caller's model (extraction, backbone training and imports) runs it where
    the options say and leaves it where it was, so the caller's later CPU tensors still meet a CPU model."""
    before = module_device(module)
    module.to(device)
    try:
        yield module
    finally:
        module.to(before)
