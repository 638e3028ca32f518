"""How much memory an extraction batch takes, and `--batch-size auto`.

A batch of B images with V views travels from the decoding workers to the encoding process as
uint8 pixels (3 bytes per pixel) and a bool mask (1 byte per pixel) per view: 4·S² bytes per view at
the model's input size S. Each DataLoader worker keeps up to `PREFETCH` finished batches in shared
memory (`/dev/shm`) until the encoder takes them. The encoding process holds the batch it works
on (and a page-locked copy of it when it feeds a GPU) and, when it encodes on the CPU, one encoder
micro-batch (`--encode-batch` images) of float32 inputs and activations.

`--batch-size auto` takes the largest power of two up to `AUTO_MAX` whose host memory and shared
memory each fit in `AUTO_SHARE` of what is available to this process now (MemAvailable, capped
by the cgroup's limit; the free space of /dev/shm). Features do not depend on the batch size: it
only sets how many images share a write to the file.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PREFETCH = 2  # DataLoader's prefetch_factor: finished batches a worker may hold
WORKER_DECODE = 64 << 20  # assumed working set of a worker decoding one photo (a 12-megapixel RGB image is 36 MB)
AUTO_MAX = 256
AUTO_SHARE = 0.5


@dataclass
class ExtractionPlan:
    device: str
    precision: str
    batch_size: int
    views: int  # per image, the largest split's (train)
    image_size: int
    encode_batch: int
    workers: int
    batch_bytes: int  # one decoded batch as it travels (uint8 pixels and masks)
    shared_bytes: int  # /dev/shm the workers' queued batches need at most
    host_bytes: int  # host memory of the encoding process and its workers for one batch
    encoder_bytes: int  # activations of one encoder micro-batch (host on the CPU, device memory on CUDA)
    host_available: int
    shared_available: int | None  # free /dev/shm; None when it cannot be read
    batch_rule: str = "given"
    processes_per_node: int = 1  # torchrun's LOCAL_WORLD_SIZE: processes that share this node's memory and /dev/shm

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        gb = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"  # noqa: E731
        node = f" per process, × {self.processes_per_node} processes on this node" if self.processes_per_node > 1 else ""
        shm = "" if self.workers == 0 else (
            f"; /dev/shm {gb(self.shared_bytes)} for {self.workers} worker(s) × {PREFETCH} queued batches{node}"
            + ("" if self.shared_available is None else f" (free {gb(self.shared_available)})"))
        where = "device memory" if self.device == "cuda" else "host memory"
        return (f"plan: {self.device}, precision {self.precision}, batch {self.batch_size} images × {self.views} views "
                f"({self.batch_rule}), encoder {self.encode_batch} images per forward, {self.workers} worker(s); "
                f"memory per batch: {gb(self.batch_bytes)} of pixels, host {gb(self.host_bytes)} "
                f"(available {gb(self.host_available)}){shm}; encoder activations {gb(self.encoder_bytes)} of {where}")

    def problems(self) -> list[str]:
        """What will not fit, said before the pass starts."""
        out = []
        shared, host = self.shared_bytes * self.processes_per_node, self.host_bytes * self.processes_per_node
        if self.shared_available is not None and self.workers and shared > self.shared_available:
            out.append(f"the workers' queued batches need {shared / 2**30:.2f} GiB of /dev/shm but "
                       f"{self.shared_available / 2**30:.2f} GiB are free: lower --batch-size or --workers, or give "
                       "the container more shared memory (docker --shm-size, a larger /dev/shm on SLURM)")
        if host > self.host_available:
            out.append(f"a batch needs about {host / 2**30:.2f} GiB of host memory but "
                       f"{self.host_available / 2**30:.2f} GiB are available: lower --batch-size, --workers or "
                       "--encode-batch (or pass --batch-size auto)")
        return out


def host_memory_available() -> int:
    """Memory this process can still take: the kernel's MemAvailable, capped by its cgroup's free limit."""
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            room = int(limit) - used
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available if available is not None else 8 << 30  # no way to ask: assume 8 GiB


def shared_memory_available(path: str = "/dev/shm") -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def encoder_activation_bytes(model: torch.nn.Module, images: int, size: int, precision: str) -> int:
    """Peak activations of the image encoder for `images` inputs (no autograd): for an open_clip ViT, a
    block's residual stream, its qkv and MLP hidden activations and one attention matrix per head;
    for another encoder, eight float32 copies of its input. Plus the float32 inputs (full and normalised)."""
    element = 4 if precision == "fp32" else 2
    inputs = 2 * images * 3 * size * size * 4
    visual = getattr(model, "visual", None)
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(visual, "grid_size"):
        tokens = int(visual.grid_size[0]) * int(visual.grid_size[1]) + 1
        width = int(transformer.width)
        heads = int(getattr(transformer.resblocks[0].attn, "num_heads", max(width // 64, 1)))
        per_image = tokens * width * (2 + 3 + 4) + heads * tokens * tokens  # residual+ln, qkv, MLP hidden; attention
        return inputs + images * per_image * element
    return inputs + images * 8 * 3 * size * size * 4


def plan_extraction(*, batch_size: int | str, views: int, image_size: int, workers: int, encode_batch: int,
                    device: torch.device, precision: str, model: torch.nn.Module) -> ExtractionPlan:
    """The memory plan of an extraction; `batch_size="auto"` picks one (module docstring).

    Under torchrun every process of a node plans for its share (LOCAL_WORLD_SIZE), and `auto` is
    refused: the ranks must cut the same batches, and free memory differs between nodes."""
    host_available, shared_available = host_memory_available(), shared_memory_available()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if batch_size == "auto" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("--batch-size auto is for one process: under torchrun every rank must cut the same batches. "
                         "Run the command once without torchrun and with --batch-size auto to see the size it picks "
                         "(the plan line), then give that number divided by the processes per node")

    def plan(b: int, rule: str) -> ExtractionPlan:
        batch = b * views * 4 * image_size * image_size
        chunk = min(encode_batch, 2 * b * views)
        encoder = encoder_activation_bytes(model, chunk, image_size, precision)
        host = batch * (2 if device.type == "cuda" else 1) + workers * WORKER_DECODE
        if workers == 0:
            host += WORKER_DECODE  # the encoding process decodes itself
        if device.type != "cuda":
            host += encoder
        return ExtractionPlan(device=device.type, precision=precision, batch_size=b, views=views, image_size=image_size,
                              encode_batch=encode_batch, workers=workers, batch_bytes=batch,
                              shared_bytes=workers * PREFETCH * batch, host_bytes=host, encoder_bytes=encoder,
                              host_available=host_available, shared_available=shared_available, batch_rule=rule,
                              processes_per_node=per_node)

    if batch_size != "auto":
        return plan(int(batch_size), "given")
    b = AUTO_MAX
    while True:
        p = plan(b, f"auto: the largest power of two ≤ {AUTO_MAX} within {AUTO_SHARE:.0%} of free host and shared memory")
        fits = p.host_bytes <= AUTO_SHARE * host_available and (
            shared_available is None or workers == 0 or p.shared_bytes <= AUTO_SHARE * shared_available)
        if fits or b == 1:
            if not fits:
                raise ValueError("--batch-size auto: not even one image per batch fits: " + "; ".join(p.problems() or [
                    f"it needs {p.host_bytes / 2**30:.2f} GiB of host memory and {p.shared_bytes / 2**30:.2f} GiB of "
                    "/dev/shm, more than half of what is free; free memory, or lower --workers / --encode-batch"]))
            return p
        b //= 2
