"""One job on many processes: torchrun's environment, the process group's store, and stopping together.

`torchrun` (or `python -m torch.distributed.run`) starts one process per GPU and tells each its
`RANK`, `WORLD_SIZE` and `LOCAL_RANK`; without it (or with `WORLD_SIZE=1`) this module is a
single-process `Job` that coordinates nothing. The ranks of a pass talk only through the key-value
store of their process group (no collectives, so nothing can block on a rank that is gone):
rank 0 publishes what it decided, every rank publishes its progress and whether it failed, and a
heartbeat thread in every rank lets the others notice a rank that died or lost its node within
`timeout` seconds instead of waiting forever.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import pickle
import signal
import threading
import time

import torch

from .device import resolve_device

DEFAULT_TIMEOUT = 300.0  # seconds without a heartbeat before a rank counts as gone
EXIT_WAIT = 15.0  # the first rank to fail waits this long at most for the others to report its failure
EXIT_GRACE = 10.0  # the others wait (at most) this long after it left: torchrun stops them and names it the root cause
KEY = "fvgpt-cache/"


class JobFailed(RuntimeError):
    """Another rank of the job failed (or is gone); the message names it and its error."""


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"WORLD_SIZE is set but {name} is not: start the job with torchrun, which sets RANK, "
                             "LOCAL_RANK and WORLD_SIZE for every process")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


class Job:
    """The processes that run one command together: this process is `rank` of `world_size`."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, timeout: float = DEFAULT_TIMEOUT,
                 store=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} is outside 0…{world_size - 1} (WORLD_SIZE={world_size})")
        if timeout <= 0:
            raise ValueError(f"--dist-timeout {timeout}: give a positive number of seconds")
        self.rank, self.world_size, self.local_rank, self.timeout = rank, world_size, local_rank, float(timeout)
        self.store = store  # given: ranks that share a store without a process group (tests run them as threads)
        self.backend: str | None = None
        self._passes = 0
        self._failing = False
        self._first_failure = False
        self._beating = threading.Event()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str) -> torch.device:
        """`--device` for this rank: under torchrun a CUDA device is the GPU numbered LOCAL_RANK."""
        device = resolve_device(requested)
        if not self.distributed or device.type != "cuda":
            return device
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ValueError(f"LOCAL_RANK {self.local_rank} but torch sees {count} GPU(s) on this node: give torchrun "
                             f"--nproc-per-node {count} (one process per GPU), or --device cpu")
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def start(self, device: torch.device) -> None:
        """Join the process group (NCCL on CUDA, gloo on the CPU) once per process; nothing for one process."""
        if not self.distributed or self.store is not None:
            return
        import torch.distributed as dist

        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=self.timeout))
        elif dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(f"a process group of {dist.get_world_size()} processes is already set up, but the "
                               f"environment says rank {self.rank} of {self.world_size}")
        self.backend = dist.get_backend()
        from torch.distributed import distributed_c10d

        self.store = distributed_c10d._get_default_store()  # the group's own key-value store (not public API)
        atexit.register(self._shutdown)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.store.add(self._beat_key(self.rank), 1)
        threading.Thread(target=self._heartbeat, name="fvgpt-cache heartbeat", daemon=True).start()

    def coordinator(self, what: str) -> "Coordinator":
        """The keys of one pass (every rank runs the same passes in the same order)."""
        self._passes += 1
        return Coordinator(self, f"{KEY}{self._passes}/{what}/")

    # ------------------------------------------------------------------ liveness and shutdown
    def _beat_key(self, rank: int) -> str:
        return f"{KEY}beat/{rank}"

    def _heartbeat(self) -> None:
        interval = min(max(self.timeout / 10, 0.5), 10.0)
        while not self._beating.wait(interval):
            try:
                self.store.add(self._beat_key(self.rank), 1)
            except Exception:  # noqa: BLE001  (the store went away: the job is ending)
                return

    def beats(self, rank: int) -> int:
        return int(self.store.add(self._beat_key(rank), 0))

    def _failure_record(self) -> tuple[str, str, str] | None:
        key = f"{KEY}failed"
        if self.store is None or not self.store.check([key]):
            return None
        rank, kind, message = self.store.get(key).decode().split("\n", 2)
        return rank, kind, message

    def failure(self) -> str | None:
        """'rank R failed: …' once any rank of the job has failed, else None."""
        record = self._failure_record()
        return None if record is None else f"rank {record[0]} failed: {record[2]}"

    def record_failure(self, message: str, interrupted: bool = False) -> None:
        """Tell the other ranks that this one stops (the first failure of the job is the one reported).

        The first rank to fail with an error waits at exit for the others to report it; an interrupted
        rank does not, since the others are being stopped too (SIGTERM from torchrun or the scheduler)."""
        self._failing = True
        record = f"{self.rank}\n{'interrupt' if interrupted else 'error'}\n{message}"
        with contextlib.suppress(Exception):
            first = self.store.compare_set(f"{KEY}failed", "", record).decode() == record
            self._first_failure = first and not interrupted

    def forget_failure(self) -> None:
        """Let the next pass start clean after a failed one. Call it only once every rank has left that
        pass (a study runs on after one failed dataset); rank 0 removes the job's failure record."""
        self._failing = self._first_failure = False
        if self.rank == 0 and self.store is not None:
            with contextlib.suppress(Exception):
                self.store.delete_key(f"{KEY}failed")

    def _on_sigterm(self, signum, frame):
        # torchrun sends SIGTERM to every worker when one fails or the job is pre-empted; an exception
        # (not the default instant death) lets the shard files close cleanly.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        record = None
        with contextlib.suppress(Exception):
            record = self._failure_record()
        if record and record[1] == "error" and not self._failing:
            raise JobFailed(f"rank {record[0]} failed: {record[2]}")
        raise KeyboardInterrupt("terminated (SIGTERM)")

    def _shutdown(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._beating.set()
        if self._failing and self.store is not None:
            # When the first rank to fail with an error exits, torchrun stops the others at once (and
            # reports the first to exit as the root cause): it leaves only once they have said why they
            # stop, and they leave after it. Interrupted jobs (every rank is being stopped) just leave.
            with contextlib.suppress(Exception):
                deadline = time.monotonic() + min(self.timeout, EXIT_WAIT)
                record = self._failure_record()
                if self._first_failure:
                    self.store.add(f"{KEY}exits", 1)
                    while self.store.add(f"{KEY}exits", 0) < self.world_size and time.monotonic() < deadline:
                        time.sleep(0.05)
                    self.store.set(f"{KEY}first-left", "1")
                elif record and record[1] == "error":
                    self.store.add(f"{KEY}exits", 1)
                    while not self.store.check([f"{KEY}first-left"]) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    time.sleep(EXIT_GRACE)
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


class Coordinator:
    """What the ranks of one pass tell each other: rank 0's decisions, progress, finished work, failures."""

    def __init__(self, job: Job, prefix: str):
        self.job, self.prefix = job, prefix
        self.rank, self.world_size = job.rank, job.world_size

    def put(self, key: str, value) -> None:
        self.job.store.set(self.prefix + key, pickle.dumps(value))

    def take(self, key: str):
        return pickle.loads(self.job.store.get(self.prefix + key))

    def has(self, key: str) -> bool:
        return bool(self.job.store.check([self.prefix + key]))

    def add(self, key: str, amount: int) -> int:
        return int(self.job.store.add(self.prefix + key, amount))

    def check(self) -> None:
        """Raise `JobFailed` if another rank failed (called between batches)."""
        failure = self.job.failure()
        if failure:
            raise JobFailed(failure)

    def wait(self, keys: list[str], ranks: list[int], what: str, on_poll=None) -> None:
        """Wait until every key exists (key i is published by rank ranks[i]), stopping with `JobFailed`
        when a rank fails or has sent no heartbeat for `timeout` seconds."""
        heard = {r: (self.job.beats(r), time.monotonic()) for r in set(ranks)}
        pause = 0.02
        while True:
            missing = [(k, r) for k, r in zip(keys, ranks) if not self.has(k)]
            if not missing:
                return
            self.check()
            now = time.monotonic()
            for _, r in missing:
                beats = self.job.beats(r)
                if beats != heard[r][0]:
                    heard[r] = (beats, now)
                elif now - heard[r][1] > self.job.timeout:
                    message = (f"rank {r} has not been heard from for {self.job.timeout:.0f} s while {what} (its "
                               "process or node is gone); the job stops. Rerun the same command to resume: finished "
                               "batches are kept")
                    self.job.record_failure(message)
                    raise JobFailed(message)
            if on_poll:
                on_poll()
            time.sleep(pause)
            pause = min(pause * 1.5, 0.5)

    @contextlib.contextmanager
    def guard(self):
        """Any error of this rank inside the block stops the others (they report 'rank R failed: …')."""
        try:
            yield self
        except JobFailed:
            self.job._failing = True
            raise
        except BaseException as exc:
            message = str(exc) or type(exc).__name__
            interrupted = isinstance(exc, KeyboardInterrupt)
            if interrupted:
                message = f"interrupted ({exc})" if str(exc) else "interrupted"
            self.job.record_failure(message, interrupted)
            raise


_JOB: Job | None = None


def current_job(timeout: float | None = None) -> Job:
    """This process's job, from torchrun's environment (`WORLD_SIZE` > 1); a single-process job otherwise."""
    global _JOB
    if _JOB is None:
        world = _env_int("WORLD_SIZE", 1)
        if world < 1:
            raise ValueError(f"WORLD_SIZE={world}: it must be at least 1")
        if world == 1:
            _JOB = Job(timeout=timeout or DEFAULT_TIMEOUT)
        else:
            _JOB = Job(rank=_env_int("RANK"), world_size=world, local_rank=_env_int("LOCAL_RANK", 0),
                       timeout=timeout or DEFAULT_TIMEOUT)
    elif timeout is not None and _JOB.store is None:
        if timeout <= 0:
            raise ValueError(f"--dist-timeout {timeout}: give a positive number of seconds")
        _JOB.timeout = float(timeout)
    return _JOB
