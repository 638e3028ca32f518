"""Running a study: each job once, failures kept local, on one process, shards or torchrun ranks."""
from __future__ import annotations

import contextlib
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .jobs import (FINAL, StudyJob, _is_done, build_jobs, check_settings, largest_first, log_path, read_status,
                   results_digest, shard_units, units_of, write_status)
from .plan import Plan
from .runners import RUNNERS


@dataclass
class Outcome:
    job: str
    kind: str
    state: str  # done | failed | skipped | waiting | running elsewhere
    message: str = ""
    seconds: float = 0.0


class _Log:
    """One log file per job, appended to by every attempt."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = path.open("a")
        self.fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} pid {os.getpid()}\n")

    def __call__(self, message: str) -> None:
        self.fh.write(f"{message}\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def execute(plan: Plan, job: StudyJob, djob=None) -> Outcome:
    """Run one job, record its status and log; errors become a failed outcome (Ctrl-C is not caught).

    One process runs a job at a time: its lock `out/jobs/<job>.lock` (an image pass under torchrun
    is locked by the pass itself, on rank 0). `djob` is the torchrun job of an image pass."""
    from ..store import CacheError, lock_file

    lead = djob is None or djob.rank == 0
    log = _Log(log_path(plan, job)) if lead else (lambda message: None)
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if djob is None or not djob.distributed:
                try:
                    stack.enter_context(lock_file(plan.out / "jobs" / f"{job.id}.lock", f"job {job.id}"))
                except CacheError as exc:
                    return Outcome(job.id, job.kind, "running elsewhere", str(exc))
                if _is_done(plan, job, read_status(plan, job)):  # finished by another process meanwhile
                    return Outcome(job.id, job.kind, "done", "finished by another process")
            inputs = results_digest(job.spec["grids"]) if job.kind == "report" else None
            info = RUNNERS[job.kind](job.spec, log, djob)
            seconds = time.perf_counter() - t0
            if lead:
                write_status(plan, job, "done", seconds=seconds, info=info,
                             **({"inputs": inputs} if inputs is not None else {}))
        return Outcome(job.id, job.kind, "done", "already complete" if info.get("found") else "", seconds)
    except KeyboardInterrupt:
        if lead:
            log("interrupted; rerun the same command to resume")
        raise
    except Exception as exc:  # noqa: BLE001  (a failing job is recorded and the others go on)
        message = str(exc) or type(exc).__name__
        if djob is not None and djob.distributed and djob.failure() is None:
            djob.record_failure(message)  # failed before the pass began: the other ranks must not wait for this one
        if lead:
            log("".join(traceback.format_exc()))
            write_status(plan, job, "failed", error=message, seconds=time.perf_counter() - t0)
        return Outcome(job.id, job.kind, "failed", message, time.perf_counter() - t0)
    finally:
        if lead:
            log.close()


def _skip(plan: Plan, job: StudyJob, reason: str, lead: bool) -> Outcome:
    if lead:
        write_status(plan, job, "skipped", error=reason)
    return Outcome(job.id, job.kind, "skipped", reason)


@dataclass
class StudyResult:
    outcomes: list[Outcome]
    already_done: int
    total: int
    report: Path | None = None

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == "failed"]


def _blocking(plan: Plan, job: StudyJob, by_id: dict[str, StudyJob]) -> str | None:
    """Why a job cannot run now: a dependency failed/skipped ('skip: …') or is not done yet ('wait: …')."""
    for dep in job.deps:
        st = read_status(plan, by_id[dep])
        if st is None or st["state"] not in FINAL or (st["state"] == "done" and not _is_done(plan, by_id[dep], st)):
            return f"wait: {dep} is not finished"
        if st["state"] != "done" and job.kind != "report":
            return f"skip: {dep} {st['state']}"
    if job.kind == "report" and not any(read_status(plan, by_id[d])["state"] == "done" for d in job.deps):
        return "skip: no grid finished"
    if not job.unit and job.kind != "report":  # a tail job writes into caches: every cache's own jobs first
        busy = next((j for j in by_id.values() if j.unit and not _final(plan, j)), None)
        if busy is not None:
            return f"wait: {busy.id} (and maybe others) is not finished"
    return None


def _final(plan: Plan, job: StudyJob) -> bool:
    st = read_status(plan, job)
    return st is not None and (st["state"] in ("failed", "skipped") or _is_done(plan, job, st))


IMAGE_PASSES = ("shared", "per-rank")


def run_study(plan: Plan, *, shard: tuple[int, int] | None = None, djob=None, image_passes: str = "shared",
              on_outcome: Callable[[Outcome], None] | None = None,
              on_start: Callable[[StudyJob], None] | None = None) -> StudyResult:
    """Run every job of this process's share that is not done yet; see the module's docstring.

    `image_passes` under torchrun: "shared" runs each image pass on every rank together; "per-rank"
    gives each rank whole caches, their image passes included (no coordination inside a pass)."""
    from ..distributed import Job, current_job

    if image_passes not in IMAGE_PASSES:
        raise ValueError(f"--image-passes {image_passes!r}: choose {' or '.join(IMAGE_PASSES)}")

    plan.out.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(plan)
    check_settings(plan, jobs)
    by_id = {j.id: j for j in jobs}
    mine = shard_units(jobs, shard)
    djob = djob if djob is not None else current_job()
    lead = djob.rank == 0
    if djob.distributed:
        djob.start(djob.device(plan.device))
    outcomes: list[Outcome] = []
    done_before = {j.id for j in jobs if _is_done(plan, j, read_status(plan, j))}

    def record(o: Outcome) -> None:
        outcomes.append(o)
        if on_outcome:
            on_outcome(o)

    def attempt(j: StudyJob, alone: bool = False) -> None:
        if _is_done(plan, j, read_status(plan, j)):
            return
        block = _blocking(plan, j, by_id)
        if block and block.startswith("skip"):
            record(_skip(plan, j, block[6:], lead or not j.collective))
            return
        if block:
            record(Outcome(j.id, j.kind, "waiting", block[6:]))
            return
        if on_start:
            on_start(j)
        shared = j.collective and djob.distributed and image_passes == "shared" and not alone
        record(execute(plan, j, djob if shared else None if not j.collective else Job()))

    together = djob.distributed and image_passes == "shared"
    # 1. image passes: every rank together, one job after the other
    for j in (j for j in jobs if j.collective and j.unit in mine and (together or not djob.distributed)):
        if djob.distributed:
            todo = _agree(djob, f"{j.id}", not _is_done(plan, j, read_status(plan, j)))
            if not todo:
                continue
            attempt(j)
            _settle(djob, j.id)
        else:
            attempt(j)
    # 2. head jobs, one cache at a time, from a queue every rank takes from
    units = [u for u in largest_first(units_of(jobs)) if u in mine]
    heads = {u: [j for j in jobs if j.unit == u and not (j.collective and (together or not djob.distributed))]
             for u in units}
    if djob.distributed:
        _barrier(djob, "images-done")
        while True:
            k = int(djob.store.add("fvgpt-cache/study/queue", 1)) - 1
            if k >= len(units):
                break
            for j in heads[units[k]]:
                attempt(j)
        _barrier(djob, "heads-done")
    else:
        for u in units:
            for j in heads[u]:
                attempt(j)
    # 3. jobs that write into several caches (Table 2), once every cache's own jobs have finished, on one process;
    #    then the report, once every grid of every shard has finished
    if lead:
        for j in jobs:
            if not j.unit:
                attempt(j, alone=True)
    if djob.distributed and lead:  # the head jobs other ranks ran: their status files say how they went
        seen = {o.job for o in outcomes}
        for j in jobs:
            st = read_status(plan, j)
            if (j.unit in mine or not j.unit) and j.id not in seen and j.id not in done_before and st \
                    and st["state"] in FINAL:
                outcomes.append(Outcome(j.id, j.kind, st["state"], st.get("error", ""), st.get("seconds", 0.0)))
    rep = plan.out / "report" / "report.md"
    return StudyResult(outcomes, len(done_before), len(jobs), rep if rep.exists() else None)


def _barrier(djob, name: str) -> None:
    """Every rank reaches `name` (a store counter), without looking at failures of earlier passes; a rank
    whose heartbeat stops for the job's timeout stops the wait."""
    key = f"fvgpt-cache/study/barrier/{name}"
    djob.store.add(key, 1)
    heard = {r: (djob.beats(r), time.monotonic()) for r in range(djob.world_size)}
    pause = 0.02
    while int(djob.store.add(key, 0)) < djob.world_size:
        now = time.monotonic()
        for r in range(djob.world_size):
            b = djob.beats(r)
            if b != heard[r][0]:
                heard[r] = (b, now)
            elif now - heard[r][1] > djob.timeout:
                raise RuntimeError(f"rank {r} has not been heard from for {djob.timeout:.0f} s (its process or node is "
                                   "gone); rerun the same command to finish the study")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.5)


def _agree(djob, name: str, mine: bool) -> bool:
    """Rank 0's decision, taken by every rank (the ranks must run the same image passes in order)."""
    key = f"fvgpt-cache/study/decide/{name}"
    if djob.rank == 0:
        djob.store.set(key, "1" if mine else "0")
    return djob.store.get(key).decode() == "1"


def _settle(djob, name: str) -> None:
    """After an image pass on every rank: wait for all, forget a failure of that pass, go on together."""
    _barrier(djob, f"{name}/end")
    djob.forget_failure()
    _barrier(djob, f"{name}/clean")
