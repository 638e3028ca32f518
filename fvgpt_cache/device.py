"""The torch device a command runs on, moving a caller's model there and back, and the thread count of
work that must not depend on it."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block on one intra-op thread when `device` is the CPU (elsewhere: unchanged).

    A CPU matrix product may sum in another order with another thread count, so features computed
    with 2 threads can differ in the last bit from those computed with 1. torchrun gives every rank
    one thread while a single process uses all cores; the text features of a cache (encoded once, by
    rank 0) are therefore encoded on one thread in every mode, so one process and N ranks write the
    same bits. The thread count is restored afterwards."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
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


@contextlib.contextmanager
def caller_model_kept(loaded) -> Iterator[None]:
    """A caller's model (`loaded.model`; None: nothing to keep) is back on the device it came on when the
    block ends, whatever the block moved it to (backbone imports, mask sources)."""
    home = None if loaded is None else module_device(loaded.model)
    try:
        yield
    finally:
        if home is not None:
            loaded.model.to(home)
