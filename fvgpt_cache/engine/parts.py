"""How a group is cut into parts (memory, FDC width) and trained; a single run is a group of one."""
from __future__ import annotations

import numpy as np
import torch

from ..device import resolve_device
from ..heads import FVGPTHead
from ..training import TrainConfig, TrainData
from ..evaluation import CurveData
from .group import Group
from .layout import Layout
from .table import variant
from .monitor import Monitor


def memory_estimate(data: TrainData, cfgs: list[TrainConfig]) -> tuple[int, int]:
    """Bytes a group needs at its peak: (shared by all its configurations, added by each configuration).

    Shared: the larger of the two phases of `Group.prepare`: first the image features on the device
    (full, foreground and, unless the backbone is CLIP itself, the CLIP view) with a product's
    temporary and the three logit tables; then the table of frozen statistics of every training row,
    once per variant (τ, FRG margin, area gate, mask source), while it is filled (the full-view features and a
    product's workspace, the logits and one variant's softmax and indicator temporaries, counted as
    nine (rows, C) tables: measured on the CPU, `tests/test_gpu_ready.py`). Per configuration: its padded
    parameters with gradient, mask and optimiser states, and the activations of one step."""
    n, views, dim = data.full.shape
    rows, c, b = n * views, len(data.txt_bb), cfgs[0].batch_size
    layout = Layout(dim, cfgs, torch.device("meta"))  # the padded parameters of one configuration: numel / K
    variants = len({variant(x) for x in cfgs})
    copies = 2 if data.clip is data.full else 3
    table = rows * variants * (dim + 6 * c + 5 + sum(len(g) for g in layout.columns))
    features = rows * dim * (copies + 1) + 3 * rows * c
    filling = table + 2 * rows * dim + 3 * rows * c + 9 * rows * c
    shared = 4 * max(features, filling) + 16 * rows
    h = layout.fdc_hidden
    step = b * (16 * c + 6 * dim + 8 * h) + c * (4 * dim + 4 * h)
    return shared, 4 * (7 * layout.numel // len(cfgs) + step)


def available_memory(device: torch.device) -> int:
    """Free memory of the device in bytes (CUDA: free device memory plus what PyTorch has reserved but not
    allocated; CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":  # an explicit index: older torch refuses a CUDA device without one
        index = device.index if device.index is not None else torch.cuda.current_device()
        # memory PyTorch's caching allocator holds but no tensor uses is free for this process, though the
        # driver counts it as used
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(torch.cuda.mem_get_info(index)[0]) + int(cached)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # no way to ask: assume 8 GiB


def split_for_memory(data: TrainData, cfgs: list[TrainConfig], budget: int) -> list[list[TrainConfig]]:
    """Cut a group into parts that each fit `budget` bytes (at least one configuration per part)."""
    shared, each = memory_estimate(data, cfgs)
    room = max(1, (budget - shared) // max(each, 1))
    return [cfgs[i:i + room] for i in range(0, len(cfgs), room)]


def shape_parts(cfgs: list[TrainConfig]) -> list[list[int]]:
    """Positions of the configurations of each padded shape (FDC width, gate width, gate depth), largest
    first: the parts a group trains in.

    Padding to the largest shape multiplies the work of every configuration (on the paper preset, its
    three 128-wide adapters made the other 96 runs train at twice their width, and its three 3-layer,
    128-wide gates gave every run a 256 × 256 frozen identity layer), while a part costs only a single
    run's per-step overhead; so each shape trains as its own part. Inside a part, FRG and BRG of
    different depths, indicator subsets and everything else still batch with padding."""
    parts: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        parts.setdefault((c.fdc_hidden, c.gate_hidden, max(c.frg_layers, c.brg_layers)), []).append(i)
    return [parts[key] for key in sorted(parts, reverse=True)]


def train_group(data: TrainData, cfgs: list[TrainConfig], device: torch.device, progress=None,
                curve: CurveData | None = None, on_finished=None, should_stop=None, backward: str = "manual"):
    """Train configurations that share a group key together, one part per padded shape (`shape_parts`);
    a single run is a group of one. Results in the order of `cfgs`.

    With `curve` (`evaluation.curve_data` of the cache) every epoch is evaluated (`monitor.Monitor`):
    the histories carry the per-epoch curves, and a configuration with `select = "val"` returns the
    head of its best validation epoch. `on_finished(i, item)` hears configuration i (a position in
    `cfgs`) as soon as it is done; `should_stop` (see `Group.train`) ends training early. `backward`: see `Group`
    ("autograd" takes every term through autograd: the benchmarks' reference)."""
    out: list = [None] * len(cfgs)
    for positions in shape_parts(cfgs):
        part = [cfgs[i] for i in positions]
        monitor = None if curve is None else Monitor(curve, part, device)
        hand_back = None if on_finished is None else (lambda k, item, positions=positions: on_finished(positions[k], item))
        group = Group(data, part, device, backward=backward)
        for i, item in zip(positions, group.train(progress, monitor, hand_back, should_stop)):
            out[i] = item
    return out


def train_head(data: TrainData, cfg: TrainConfig, progress=None, curve: CurveData | None = None,
               backward: str = "manual") -> tuple[FVGPTHead, list[dict], np.ndarray]:
    """Train one head (a group of one); deterministic for a given `cfg.seed`.

    Returns the head, its per-epoch history and the indices of the training images it used
    (all of `data`, or the `data_fraction` subset)."""
    cfg.validate()
    return train_group(data, [cfg], resolve_device(cfg.device), progress, curve, backward=backward)[0]
