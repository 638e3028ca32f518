"""The one loop over the images that every pass shares (extraction, backbone imports), on one
process or on many under torchrun.

A pass fills the rows of a `.partial` HDF5 file whose `/progress/<split>/status` says which rows
are still PENDING. Rows are cut into batches on a fixed grid: batch b of a split is rows
[b·B, (b+1)·B), and a batch encodes those of its rows that are pending. The batches, and so the
features, therefore depend neither on the number of processes nor on which process takes a
batch, and an interrupted pass resumes with the very batches a complete one would have run.

One process writes each finished batch into the partial file and flushes it. Under torchrun,
rank r takes the r-th, (r+N)-th, … batch that still has work and appends it to its own shard
`<partial>.shard<r>` (HDF5 has no safe concurrent writers), recording after each batch which rows
it holds; rank 0, which alone holds the output's lock, folds every shard into the partial file
when all ranks are done, and also at the start of every run, with any number of processes
(one included). So a pass interrupted with N processes resumes with any other N and loses no
finished batch.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from .distributed import Job
from .store import CacheError, exclusive_lock, progress_key
from .workers import worker_init

PENDING, DONE, SKIPPED = 0, 1, 2
SHARD_FORMAT = "fvgpt-cache-shard"


@dataclass
class BatchWrites:
    """What one finished batch writes: `rows` it handled, and (dataset of the partial file, rows, values)
    triples (a skipped row gets its status and reason, not features)."""

    split: str
    rows: np.ndarray
    writes: list[tuple[str, np.ndarray, np.ndarray]]


@dataclass
class PassPlan:
    """What rank 0 found in the partial file (after folding old shards in) and tells every rank."""

    fingerprint: str
    status: dict[str, np.ndarray]
    layout: dict[str, tuple[str, tuple[int, ...]]]
    world_sizes: list[int]

    @property
    def resumed(self) -> int:
        return int(sum((s != PENDING).sum() for s in self.status.values()))


@dataclass
class PassReport:
    """How the pass went: rows already done before it, and per rank the rows it encoded and its seconds."""

    resumed: int
    world_sizes: list[int]
    seconds: float
    ranks: list[dict] = field(default_factory=list)


def grid_batches(status: dict[str, np.ndarray], batch_size: int) -> list[tuple[str, np.ndarray]]:
    """Every batch of the fixed grid that still has pending rows, in order: (split, its pending rows)."""
    batches = []
    for split, st in status.items():
        for start in range(0, len(st), batch_size):
            rows = start + np.flatnonzero(st[start:start + batch_size] == PENDING)
            if len(rows):
                batches.append((split, rows))
    return batches


def _collate(items: list[dict]) -> list[dict]:
    return items


def run_view_pass(batches: list[tuple[str, np.ndarray]], dataset_for: Callable[[str, np.ndarray], TorchDataset],
                  handle_batch: Callable[[str, list[dict]], None], *, workers: int,
                  after_batch: Callable[[str, int], None] | None = None, stop_after_batches: int | None = None,
                  pin_memory: bool = False) -> int:
    """Load each batch's rows with `dataset_for(split, rows)` and hand them to `handle_batch(split, items)`.

    One DataLoader per split (its workers decode ahead of the encoder); `after_batch(split, n)` runs
    after each batch; `stop_after_batches` simulates an interruption (KeyboardInterrupt) after that
    many batches; `pin_memory` (for a CUDA encoder) has the loader copy each batch to page-locked memory
    so its transfer to the GPU is asynchronous. Returns the number of batches handled.
    """
    handled = 0
    for split, group in itertools.groupby(batches, key=lambda b: b[0]):
        parts = [rows for _, rows in group]
        edges = np.cumsum([0] + [len(p) for p in parts])
        sampler = [list(range(a, b)) for a, b in zip(edges[:-1], edges[1:])]
        loader = DataLoader(dataset_for(split, np.concatenate(parts)), batch_sampler=sampler, num_workers=workers,
                            collate_fn=_collate, persistent_workers=False, pin_memory=pin_memory,
                            worker_init_fn=worker_init() if workers > 0 else None)
        for items in loader:
            if stop_after_batches is not None and handled >= stop_after_batches:
                raise KeyboardInterrupt(f"stopped after {handled} batches (simulated interruption)")
            handle_batch(split, items)
            handled += 1
            if after_batch:
                after_batch(split, len(items))
    return handled


def _runs(rows: np.ndarray):
    """(i, j) positions such that rows[i:j] are consecutive row numbers."""
    edges = [0, *(np.flatnonzero(np.diff(rows) != 1) + 1).tolist(), len(rows)]
    return zip(edges[:-1], edges[1:])


def write_rows(f: h5py.File, writes: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Write values into rows of the partial file's datasets (as slices; the status last)."""
    for key, rows, values in sorted(writes, key=lambda w: w[0].endswith("/status")):
        ds = f[key]
        for i, j in _runs(rows):
            ds[int(rows[i]):int(rows[i]) + (j - i)] = values[i:j]


# ---------------------------------------------------------------------------------------- shards

def shard_path(part: Path, rank: int) -> Path:
    return part.with_name(f"{part.name}.shard{rank}")


def existing_shards(part: Path) -> list[Path]:
    pattern = re.compile(re.escape(part.name) + r"\.shard\d+")
    if not part.parent.is_dir():
        return []
    return sorted(p for p in part.parent.iterdir() if pattern.fullmatch(p.name))


def _layout(f: h5py.File) -> dict[str, tuple[str, tuple[int, ...]]]:
    layout = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim:
            kind = "str" if h5py.check_string_dtype(obj.dtype) else obj.dtype.str
            layout[name] = (kind, tuple(obj.shape[1:]))
    f.visititems(visit)
    return layout


class ShardWriter:
    """One rank's finished batches: per partial-file dataset, its rows (`rows/<key>`) and values
    (`data/<key>`), appended; the attribute `committed` says how many entries of each are complete,
    `batches` lists (split, first row, last row + 1) of every finished batch."""

    def __init__(self, path: Path, plan: PassPlan, rank: int, world_size: int):
        self.path, self.plan, self.rank, self.world_size = path, plan, rank, world_size
        self.splits = list(plan.status)
        self.f: h5py.File | None = None
        self.committed: dict[str, int] = {}

    def _open(self) -> h5py.File:
        if self.f is None:
            self.f = h5py.File(self.path, "w")
            self.f.attrs.update(format=SHARD_FORMAT, fingerprint=self.plan.fingerprint, rank=self.rank,
                                world_size=self.world_size, committed="{}")
            self.f.create_dataset("batches", shape=(0, 3), maxshape=(None, 3), dtype=np.int64, chunks=(256, 3))
        return self.f

    def _append(self, name: str, values: np.ndarray, kind: str, shape: tuple) -> int:
        f = self._open()
        if name not in f:
            dtype = h5py.string_dtype("utf-8") if kind == "str" else np.dtype(kind)
            f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=True)
        ds = f[name]
        n = ds.shape[0]
        ds.resize(n + len(values), axis=0)
        ds[n:] = values
        return n + len(values)

    def write(self, batch: BatchWrites) -> None:
        lengths = {}
        for key, rows, values in batch.writes:
            kind, shape = self.plan.layout[key]
            self._append(f"rows/{key}", np.asarray(rows, dtype=np.int64), "<i8", ())
            lengths[key] = self._append(f"data/{key}", values, kind, shape)
        record = np.array([[self.splits.index(batch.split), int(batch.rows[0]), int(batch.rows[-1]) + 1]])
        self._append("batches", record, "<i8", (3,))
        self.f.flush()
        self.committed.update(lengths)
        self.f.attrs["committed"] = json.dumps(self.committed)
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def absorb_shard(f: h5py.File, shard: Path, fingerprint: str) -> int:
    """Copy a shard's finished batches into the partial file `f`, flush it, and delete the shard.
    Returns the number of batches it held."""
    try:
        s = h5py.File(shard, "r")
    except OSError as exc:
        raise CacheError(f"cannot read the shard {shard} ({exc}). If a process of an earlier run may still be "
                         "writing it, wait for it to end and rerun; if the file is damaged (a process killed while "
                         "writing), delete it (its batches are recomputed) and rerun") from None
    with s:
        if s.attrs.get("format") != SHARD_FORMAT:
            raise CacheError(f"{shard} is not a shard written by fvgpt-cache; move it away and rerun")
        if s.attrs.get("fingerprint") != fingerprint:
            raise CacheError(f"the shard {shard} was written by a run with other settings than {f.filename}; rerun "
                             "with the original settings to resume both, or with --no-resume to start over")
        committed = json.loads(s.attrs.get("committed", "{}"))
        for key, n in sorted(committed.items(), key=lambda kv: kv[0].endswith("/status")):
            if key not in f or f[key].shape[1:] != s[f"data/{key}"].shape[1:]:
                raise CacheError(f"the shard {shard} holds {key} of shape {s[f'data/{key}'].shape[1:]} per row, which "
                                 f"{f.filename} does not have; rerun with --no-resume to start over")
            rows, data, target = s[f"rows/{key}"][:n], s[f"data/{key}"], f[key]
            if n and (rows.min() < 0 or rows.max() >= target.shape[0]):
                raise CacheError(f"the shard {shard} holds rows outside {key} of {f.filename}; rerun with --no-resume")
            for i, j in _runs(rows):
                target[int(rows[i]):int(rows[i]) + (j - i)] = data[i:j]
        batches = int(s["batches"].shape[0]) if "batches" in s else 0
    f.flush()
    shard.unlink()
    return batches


# ---------------------------------------------------------------------------------------- the pass

def _prepare(part: Path, splits: list[str], resume: bool, prepare: Callable[[], None], world_size: int) -> PassPlan:
    """Rank 0 under the lock: the partial file made or checked (`prepare`), old shards folded in."""
    if not resume:
        for path in [part, *existing_shards(part)]:
            path.unlink(missing_ok=True)
    prepare()
    with h5py.File(part, "r+") as f:
        fingerprint = f.attrs["fingerprint"]
        for shard in existing_shards(part):
            absorb_shard(f, shard, fingerprint)
        sizes = json.loads(f.attrs.get("world_sizes", "[]")) + [world_size]
        f.attrs["world_sizes"] = json.dumps(sizes)
        status = {s: f[progress_key(s)][()] for s in splits}
        return PassPlan(fingerprint=str(fingerprint), status=status, layout=_layout(f), world_sizes=sizes)


def _check_done(f: h5py.File, part: Path, splits: list[str]) -> None:
    left = {s: int((f[progress_key(s)][()] == PENDING).sum()) for s in splits}
    if any(left.values()):
        raise RuntimeError(f"{part} still has pending rows ({left}); rerun the same command to finish them")


def _portable(exc: BaseException) -> tuple[type, str]:
    """An error that rank 0 hit before the pass, re-raised with the same message on every rank."""
    cls = type(exc)
    if not issubclass(cls, (ValueError, OSError, RuntimeError)):
        cls = RuntimeError
    try:
        cls(str(exc))
    except Exception:  # noqa: BLE001  (an exception class that wants other arguments)
        cls = RuntimeError
    return cls, str(exc)


def run_pass(job: Job, *, what: str, lock: Path, part: Path, splits: list[str], fingerprint: str, resume: bool,
             prepare: Callable[[], None], dataset_for: Callable[[str, np.ndarray], TorchDataset],
             encode: Callable[[str, list[dict]], BatchWrites], finish: Callable[[PassReport], object], batch_size: int,
             workers: int, progress: Callable[[str, int, int], None] | None = None,
             stop_after_batches: int | None = None, pin_memory: bool = False):
    """Run a pass over the pending rows of `part` (see the module docstring) and return `finish(report)`.

    `prepare()` runs on rank 0 under the lock of `lock` and leaves a partial file whose settings
    match (`fingerprint`); `encode(split, items)` turns a decoded batch into the writes of its rows;
    `finish(report)` runs on rank 0 under the lock once every row is done, and what it returns is
    returned on every rank. `progress(split, rows_done, rows_total)` is called on rank 0 after each
    batch with the rows of the whole job.
    """
    args = dict(what=what, lock=lock, part=part, splits=splits, fingerprint=fingerprint, resume=resume,
                prepare=prepare, dataset_for=dataset_for, encode=encode, finish=finish, batch_size=batch_size,
                workers=workers, progress=progress, stop_after_batches=stop_after_batches, pin_memory=pin_memory)
    return _run_ranks(job, **args) if job.distributed else _run_alone(**args)


def _run_alone(*, what, lock, part, splits, fingerprint, resume, prepare, dataset_for, encode, finish, batch_size,
               workers, progress, stop_after_batches, pin_memory):
    """One process: the batches go straight into the partial file (old shards are folded in first)."""
    with exclusive_lock(lock):
        plan = _prepare(part, splits, resume, prepare, 1)
        done = {s: int((st != PENDING).sum()) for s, st in plan.status.items()}
        started = time.perf_counter()
        with h5py.File(part, "r+") as f:
            def handle(split: str, items: list[dict]) -> None:
                write_rows(f, encode(split, items).writes)
                f.flush()

            def after(split: str, n: int) -> None:
                done[split] += n
                if progress:
                    progress(split, done[split], len(plan.status[split]))

            if progress:
                for s in splits:
                    progress(s, done[s], len(plan.status[s]))
            run_view_pass(grid_batches(plan.status, batch_size), dataset_for, handle, workers=workers,
                          after_batch=after, stop_after_batches=stop_after_batches, pin_memory=pin_memory)
            _check_done(f, part, splits)
        seconds = time.perf_counter() - started
        encoded = int(sum(done.values())) - plan.resumed
        return finish(PassReport(resumed=plan.resumed, world_sizes=plan.world_sizes, seconds=seconds,
                                 ranks=[{"rank": 0, "rows": encoded, "seconds": seconds}]))


def _run_ranks(job: Job, *, what, lock, part, splits, fingerprint, resume, prepare, dataset_for, encode, finish,
               batch_size, workers, progress, stop_after_batches, pin_memory):
    """One rank of a torchrun job: its share of the batches into its shard; rank 0 locks, plans and assembles."""
    coord = job.coordinator(what)
    rank, world = job.rank, job.world_size
    with coord.guard(), contextlib.ExitStack() as held:
        coord.put(f"fingerprint/{rank}", fingerprint)
        if rank == 0:
            try:
                held.enter_context(exclusive_lock(lock))
                everyone = list(range(world))
                coord.wait([f"fingerprint/{r}" for r in everyone], everyone, "starting")
                for r in everyone:
                    if coord.take(f"fingerprint/{r}") != fingerprint:
                        raise ValueError(f"rank {r} computed other settings than rank 0 (its data, model, masks or "
                                         "options differ): every rank must run the same command on the same files")
                plan = _prepare(part, splits, resume, prepare, world)
            except Exception as exc:
                coord.put("plan", ("error", *_portable(exc)))
                raise
            coord.put("plan", ("ok", plan))
        else:
            coord.wait(["plan"], [0], "rank 0 prepared the pass")
            state, *value = coord.take("plan")
            if state == "error":
                cls, message = value
                raise cls(message)
            (plan,) = value

        done = {s: int((st != PENDING).sum()) for s, st in plan.status.items()}

        def show() -> None:
            if progress and rank == 0:
                for s in splits:
                    progress(s, done[s] + coord.add(f"rows/{s}", 0), len(plan.status[s]))

        show()
        started = time.perf_counter()
        encoded = 0
        shard = ShardWriter(shard_path(part, rank), plan, rank, world)
        try:
            def handle(split: str, items: list[dict]) -> None:
                shard.write(encode(split, items))

            def after(split: str, n: int) -> None:
                nonlocal encoded
                encoded += n
                coord.add(f"rows/{split}", n)
                show()
                coord.check()

            coord.check()
            mine = grid_batches(plan.status, batch_size)[rank::world]
            run_view_pass(mine, dataset_for, handle, workers=workers, after_batch=after,
                          stop_after_batches=stop_after_batches, pin_memory=pin_memory)
        finally:
            shard.close()
        coord.put(f"finished/{rank}", {"rank": rank, "rows": encoded, "seconds": time.perf_counter() - started})
        if rank != 0:
            coord.wait(["result"], [0], "rank 0 assembled the file")
            return coord.take("result")
        everyone = list(range(world))
        coord.wait([f"finished/{r}" for r in everyone], everyone, "the ranks finished their batches", on_poll=show)
        show()
        report = PassReport(resumed=plan.resumed, world_sizes=plan.world_sizes, seconds=time.perf_counter() - started,
                            ranks=[coord.take(f"finished/{r}") for r in everyone])
        with h5py.File(part, "r+") as f:
            for path in existing_shards(part):
                absorb_shard(f, path, plan.fingerprint)
            _check_done(f, part, splits)
        result = finish(report)
        coord.put("result", result)
        return result

