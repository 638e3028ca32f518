"""A study's jobs: the graph a plan makes (explicit outputs under `out`), shards, and the status files."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..datasets import DATASETS
from ..methods import backbone_method
from .plan import CROSS_SOURCE, DEFAULT_RRC, Plan, PlanError


@dataclass
class StudyJob:
    """One step of the study: `kind` extract|import|backbone|load|grid|report, on one cache (`unit`; empty for
    Table 2's jobs, which write into several caches, and for the report)."""

    id: str
    kind: str
    unit: str
    spec: dict
    deps: list[str] = field(default_factory=list)

    @property
    def collective(self) -> bool:
        """Image passes: under torchrun every rank takes part."""
        return self.kind in ("extract", "import")

    @property
    def fingerprint(self) -> str:
        """The settings that decide the job's output; decoding workers do not (a rerun may change them)."""
        spec = {k: ({o: v for o, v in val.items() if o not in NOT_IN_FINGERPRINT} if isinstance(val, dict) else val)
                for k, val in self.spec.items()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


NOT_IN_FINGERPRINT = ("workers",)


def _rrc_tag(scale: tuple[float, float]) -> str:
    return "" if tuple(scale) == DEFAULT_RRC else f"_rrc{scale[0]:g}-{scale[1]:g}"


def cache_path(plan: Plan, dataset: str, seed: int, scale: tuple[float, float]) -> Path:
    shots = f"shots{plan.shots}" if plan.shots > 0 else "allshots"
    return plan.out / "caches" / dataset / f"{shots}_seed{seed}{_rrc_tag(scale)}.h5"


def checkpoint_for(plan: Plan, method: str, dataset: str, seed: int, cross: bool = False) -> Path:
    """The official checkpoint of (dataset, seed): ROOT/<dataset>/seed<S>, or ROOT's {dataset}/{seed} pattern;
    cross-dataset ones (`<method>_cross`): ROOT/seed<S> or the pattern."""
    root = plan.checkpoints[f"{method}_cross" if cross else method]
    if "{dataset}" in root or "{seed}" in root:
        return Path(root.replace("{dataset}", dataset).replace("{seed}", str(seed)))
    return Path(root) / f"seed{seed}" if cross else Path(root) / dataset / f"seed{seed}"


def build_jobs(plan: Plan) -> list[StudyJob]:
    """Every job of the plan in dependency order, with explicit outputs under `plan.out`."""
    jobs: list[StudyJob] = []
    model = {"model": plan.model, "pretrained": plan.pretrained, "quick_gelu": plan.quick_gelu}
    grids = []
    for d in plan.datasets:
        for seed in plan.seeds:
            scales = list(dict.fromkeys(plan.rrc_for(b) for b in plan.backbones))
            for scale in scales:
                cache = cache_path(plan, d.name, seed, scale)
                unit = str(cache.relative_to(plan.out / "caches").with_suffix(""))
                ex = StudyJob(f"extract/{unit}", "extract", unit, {
                    "dataset": d.name, "split_file": str(d.split_file) if d.split_file else None,
                    "image_root": str(d.image_root) if d.image_root else None,
                    "mask_root": str(d.mask_root) if d.mask_root else None, "template": d.template,
                    "data_root": str(plan.data_root) if d.named else None,
                    "masks": str(plan.masks) if (d.named and plan.masks) else None,
                    # a mask method: this cache's draw gets its masks first, in a folder of its own
                    **({"mask_method": plan.mask_method, "mask_out": str(plan.out / "masks" / plan.mask_method / unit)}
                       if plan.mask_method else {}),
                    "shots": plan.shots, "seed": seed, "rrc_scale": list(scale), **model,
                    "options": plan.extract, "device": plan.device, "out": str(cache)})
                jobs.append(ex)
                for b in (b for b in plan.backbones if plan.rrc_for(b) == scale):
                    # PromptSRC/MMRL: imported; CoOp/KgCoOp: trained here, or loaded from [checkpoints] when given
                    kind = "import" if backbone_method(b).written == "imported" else "load" if b in plan.checkpoints else "backbone"
                    bid = f"{kind}/{b}/{unit}"
                    spec = {"cache": str(cache), "method": b, "seed": seed, "device": plan.device}
                    if kind == "import":
                        spec["checkpoint"] = str(checkpoint_for(plan, b, d.name, seed))
                        spec["options"] = {k: plan.extract[k] for k in ("batch_size", "workers", "train_views")}
                    elif kind == "load":
                        spec.update(name=b, checkpoint=str(checkpoint_for(plan, b, d.name, seed)))
                    else:
                        spec["options"] = plan.backbone
                        spec["out"] = str(plan.out / "backbones" / f"{unit}-{b}")
                    jobs.append(StudyJob(bid, kind, unit, spec, [ex.id]))
                    for item in (t for t in plan.train if t != "table2"):
                        gid = f"grid/{item}/{b}/{unit}"
                        grids.append(StudyJob(gid, "grid", unit, {
                            "cache": str(cache), "backbone": b, "seed": seed, "preset": None if item == "table1" else item,
                            "settings": plan.train_settings, "device": plan.device,
                            "out": str(plan.out / "runs" / item / b / unit)}, [bid]))
    jobs.extend(grids)
    if "table2" in plan.train:
        cross = cross_jobs(plan)
        jobs.extend(cross)
        grids += [j for j in cross if j.kind == "grid"]
    jobs.append(StudyJob("report", "report", "", {"grids": [g.spec["out"] for g in grids], "compare": plan.compare,
                                                  "out": str(plan.out / "report")}, [g.id for g in grids]))
    return jobs


def cross_jobs(plan: Plan) -> list[StudyJob]:
    """Table 2 per backbone and seed: the backbone on every ImageNet class (CoOp/KgCoOp trained, PromptSRC/MMRL
    imported from their cross-dataset checkpoints) as `<method>_all` in the ImageNet cache and in every target
    cache, then one FVG-PT run on all ImageNet classes evaluated on the targets.

    These jobs write into caches of other datasets, so they run once every job of those caches has finished
    (`unit` is empty: a tail job, see `run_study`)."""
    jobs = []
    for b in plan.backbones:
        scale, name = plan.rrc_for(b), f"{b}_all"
        for seed in plan.seeds:
            def unit_of(dataset: str) -> tuple[Path, str]:
                cache = cache_path(plan, dataset, seed, scale)
                return cache, str(cache.relative_to(plan.out / "caches").with_suffix(""))

            source, src_unit = unit_of(CROSS_SOURCE)
            targets = [unit_of(d.name) for d in plan.datasets if d.name != CROSS_SOURCE]
            common = {"method": b, "name": name, "seed": seed, "device": plan.device}
            writes = []
            if backbone_method(b).written == "trained":
                # trained like any head job of the ImageNet cache (in parallel over seeds), written into no cache
                # (or given: [checkpoints] <method>_cross); the tail writes the context into every cache
                given = f"{b}_cross" in plan.checkpoints
                ckpt = checkpoint_for(plan, b, CROSS_SOURCE, seed, cross=True) if given else \
                    plan.out / "backbones" / f"{src_unit}-{name}"
                first = []
                if not given:
                    first = [StudyJob(f"cross/backbone/{b}/{src_unit}", "backbone", src_unit, {
                        **common, "cache": str(source), "classes": "all", "options": plan.backbone, "out": str(ckpt),
                        "write": False}, [f"extract/{src_unit}"])]
                    jobs += first
                writes += [StudyJob(f"cross/load/{b}/{u}", "load", "", {**common, "cache": str(c), "checkpoint": str(ckpt)},
                                    [*(t.id for t in first), f"extract/{u}"]) for c, u in [(source, src_unit), *targets]]
            else:
                ckpt = checkpoint_for(plan, b, CROSS_SOURCE, seed, cross=True)
                options = {k: plan.extract[k] for k in ("batch_size", "workers", "train_views")}
                # the class prompts a checkpoint stores are the source's: compared on the source only
                writes += [StudyJob(f"cross/import/{b}/{u}", "import", "", {
                    **common, "cache": str(c), "checkpoint": str(ckpt), "options": options,
                    "prompt_check": u == src_unit}, [f"extract/{u}"]) for c, u in [(source, src_unit), *targets]]
            jobs += writes
            jobs.append(StudyJob(f"grid/table2/{b}/{src_unit}", "grid", "", {
                "cache": str(source), "backbone": name, "seed": seed, "preset": None, "classes": "all",
                "eval_caches": [str(c) for c, _ in targets], "settings": plan.train_settings, "device": plan.device,
                "out": str(plan.out / "runs" / "table2" / b / src_unit)}, [w.id for w in writes]))
    return jobs


def units_of(jobs: list[StudyJob]) -> list[str]:
    return list(dict.fromkeys(j.unit for j in jobs if j.unit))


def largest_first(units: list[str]) -> list[str]:
    """Caches by their dataset's class count, largest first (ImageNet's take longest), plan order among equals:
    the order in which shards are dealt and the torchrun queue hands them out."""
    def size(unit: str) -> int:
        name = unit.split("/")[0]
        return DATASETS[name].num_classes if name in DATASETS else 0

    return sorted(units, key=lambda u: -size(u))


def shard_units(jobs: list[StudyJob], shard: tuple[int, int] | None) -> set[str]:
    """The caches a shard owns: the k-th cache, largest first, goes to shard k mod N."""
    units = largest_first(units_of(jobs))
    if shard is None:
        return set(units)
    i, n = shard
    return {u for k, u in enumerate(units) if k % n == i}


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: write I/N, e.g. 0/4 (shards are numbered from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: I must be in 0…N-1 and N ≥ 1 (SLURM: --shard $SLURM_ARRAY_TASK_ID/N)")
    return i, n


FINAL = ("done", "failed", "skipped")


def status_path(plan: Plan, job: StudyJob) -> Path:
    return plan.out / "jobs" / f"{job.id}.json"


def log_path(plan: Plan, job: StudyJob) -> Path:
    return plan.out / "logs" / f"{job.id}.log"


def read_status(plan: Plan, job: StudyJob) -> dict | None:
    p = status_path(plan, job)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None  # cut by a crash while written: the job counts as not done


def write_status(plan: Plan, job: StudyJob, state: str, **extra) -> dict:
    record = {"job": job.id, "state": state, "fingerprint": job.fingerprint, "spec": job.spec,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
              "rank": int(os.environ.get("RANK", "0")), **extra}
    p = status_path(plan, job)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, p)
    return record


def check_settings(plan: Plan, jobs: list[StudyJob]) -> None:
    """Refuse a plan whose jobs were done before with other settings (their outputs would be mixed in)."""
    clashes = []
    for j in jobs:
        st = read_status(plan, j)
        if st and st["state"] == "done" and st["fingerprint"] != j.fingerprint and j.kind != "report":
            old, new = st.get("spec", {}), j.spec
            diff = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            clashes.append(f"{j.id} ({'; '.join(diff[:3])})")
    if clashes:
        raise PlanError(f"{len(clashes)} job(s) of this plan were done with other settings under {plan.out}: "
                        + ", ".join(clashes[:5]) + (" …" if len(clashes) > 5 else "")
                        + ". Their outputs would be mixed with the new settings' results: choose another `out`, or "
                          "remove those jobs' outputs and their files under jobs/")


def results_digest(grid_dirs: list[str]) -> dict:
    """What a report is made from: each grid's results file and its SHA-256."""
    out = {}
    for d in grid_dirs:
        p = Path(d) / "results.jsonl"
        if p.exists():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _is_done(plan: Plan, job: StudyJob, status: dict | None) -> bool:
    if not status or status["state"] != "done":
        return False
    if job.kind == "report":  # a report is current while the results it was made from are unchanged
        return status.get("inputs") == results_digest(job.spec["grids"])
    if status["fingerprint"] != job.fingerprint:
        return False
    output = {"extract": "out", "grid": "out"}.get(job.kind)  # removed since: the job runs again
    return output is None or Path(job.spec[output]).exists()


def finished_since(plan: Plan, jobs: list[StudyJob], started: float) -> int:
    """Jobs whose status file was written after `started` (by any process): the progress of the whole plan."""
    count = 0
    for j in jobs:
        try:
            count += status_path(plan, j).stat().st_mtime >= started
        except FileNotFoundError:
            pass
    return count


STAGES = ("extract", "import", "backbone", "load", "grid", "report")
