"""The dry run: what is done and what will run, inputs that are missing, and the time it should take."""
from __future__ import annotations

import time
from pathlib import Path

from ..ablations import ABLATIONS
from ..datasets import dataset_info
from .jobs import STAGES, StudyJob, _is_done, build_jobs, read_status, shard_units
from .plan import Plan
from .runners import _load_dataset, encoded_views


def overview(plan: Plan, shard: tuple[int, int] | None = None) -> dict:
    """Per stage: jobs in the plan, done, failed before, to run by this process, left to other shards."""
    jobs = build_jobs(plan)
    mine = shard_units(jobs, shard)
    rows = {k: {"jobs": 0, "done": 0, "failed": 0, "run": 0, "other shards": 0} for k in STAGES}
    todo = []
    for j in jobs:
        st = read_status(plan, j)
        row = rows[j.kind]
        row["jobs"] += 1
        if _is_done(plan, j, st):
            row["done"] += 1
            continue
        if st and st["state"] in ("failed", "skipped"):
            row["failed"] += 1
        if not j.unit or j.unit in mine:
            row["run"] += 1
            todo.append(j)
        else:
            row["other shards"] += 1
    return {"jobs": jobs, "stages": rows, "todo": todo}


def missing_inputs(plan: Plan, jobs: list[StudyJob]) -> list[str]:
    """Inputs of jobs still to run that are not there: dataset folders, split files, checkpoints."""
    missing = []
    for j in jobs:
        spec = j.spec
        if j.kind == "extract" and spec["seed"] == plan.seeds[0] and spec["rrc_scale"] == list(plan.rrc_for(plan.backbones[0])):
            if spec["split_file"]:
                missing += [f"{spec['dataset']}: {spec[k]}" for k in ("split_file", "image_root") if not Path(spec[k]).exists()]
            else:
                try:
                    from ..datasets import resolve_dataset_dir

                    resolve_dataset_dir(spec["dataset"], Path(spec["data_root"]))
                except FileNotFoundError:
                    missing.append(f"{spec['dataset']}: no {dataset_info(spec['dataset']).folder}/ with its split file "
                                   f"under {spec['data_root']}")
        given = j.kind in ("import", "load") and not Path(spec["checkpoint"]).is_relative_to(plan.out)
        if given and not Path(spec["checkpoint"]).exists():
            missing.append(f"{j.id}: checkpoint {spec['checkpoint']}")
    return missing


def _samples(spec: dict) -> tuple[dict[str, int], int]:
    """Images per split of a cache to be extracted, and its class count."""
    from ..data import fewshot_splits

    ds = _load_dataset(spec)
    return {s: len(v) for s, v in fewshot_splits(ds.splits, spec["shots"], spec["seed"]).items()}, len(ds.classnames)


def measure_rates(plan: Plan, jobs: list[StudyJob], device: str) -> dict:
    """Throughputs for the estimate: from this plan's finished jobs when there are any, else measured now
    (the model's images/s on this device; the engine's seconds per training image and epoch)."""
    rates, how = {}, {}
    done = [read_status(plan, j) for j in jobs]
    done = [s for s in done if s and s["state"] == "done" and not (s.get("info") or {}).get("found")]
    for kind, key in (("extract", "encode"), ("import", "encode")):
        pairs = [(s["info"].get("views_encoded"), s["seconds"]) for s in done if s["job"].startswith(kind + "/")
                 and s["info"].get("views_encoded")]
        if pairs and key not in rates:
            rates[key] = sum(p[0] for p in pairs) / sum(p[1] for p in pairs)
            how[key] = f"{len(pairs)} finished {kind} job(s) of this plan"
    pairs = [(s["info"]["epoch_images"], s["seconds"]) for s in done if s["job"].startswith("grid/")
             and s["info"].get("epoch_images")]
    if pairs:
        rates["head"] = sum(p[1] for p in pairs) / sum(p[0] for p in pairs)
        how["head"] = f"{len(pairs)} finished grid job(s) of this plan"
    pairs = [(s["info"]["epoch_images"], s["seconds"]) for s in done if s["job"].startswith("backbone/")
             and s["info"].get("epoch_images")]
    if pairs:
        rates["backbone"] = sum(p[1] for p in pairs) / sum(p[0] for p in pairs)
        how["backbone"] = f"{len(pairs)} finished backbone job(s) of this plan"
    if "encode" not in rates or "backbone" not in rates:
        try:
            enc, bb = _probe_model(plan, device)
            rates.setdefault("encode", enc)
            how.setdefault("encode", f"measured now: the model's encoder on {device}, random images")
            rates.setdefault("backbone", bb)
            how.setdefault("backbone", "measured now: prompt-learning steps of the model's text tower")
        except Exception as exc:  # noqa: BLE001  (the estimate is then unknown, said so)
            how["encode"] = how.get("encode") or f"cannot measure: {exc}"
    if "head" not in rates:
        rates["head"] = _probe_engine(device)
        how["head"] = f"measured now: one FVG-PT run on synthetic features on {device}"
    return {"rates": rates, "how": how}


PROBE_CLASSES = 50


def _probe_model(plan: Plan, device: str) -> tuple[float, float]:
    """Images per second of the encoder, and seconds per (training image · epoch) of CoOp on PROBE_CLASSES
    classes (a CoOp step encodes every base class's prompt)."""
    import torch

    from ..backbones.coop import backbone_features
    from ..device import resolve_device
    from ..models import load_clip

    dev = resolve_device(device)
    loaded = load_clip(plan.model, plan.pretrained, quick_gelu=plan.quick_gelu, device=dev)
    size = loaded.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(16, 3, size, size, device=dev)
    with torch.no_grad():
        loaded.model.encode_image(x)
        t0 = time.perf_counter()
        for _ in range(2):
            loaded.model.encode_image(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        enc = 32 / (time.perf_counter() - t0)
    width = loaded.model.token_embedding.weight.shape[1]
    ctx = torch.zeros(4, width, device=dev, requires_grad=True)
    names = [f"class {i}" for i in range(PROBE_CLASSES)]
    t0 = time.perf_counter()
    backbone_features(loaded, names, ctx, "end")
    step = time.perf_counter() - t0  # forward only, no grad tape kept: a lower bound of a training step
    return enc, 3 * step / 4  # a step (≈ 3 forwards) per batch of 4 images


def _probe_engine(device: str) -> float:
    import tempfile

    from ..grids import expand, run_grid
    from ..synthetic import write_feature_cache

    with tempfile.TemporaryDirectory() as tmp:
        cache = write_feature_cache(Path(tmp) / "probe.h5", num_classes=10, shots=16, views=3, dim=512)
        runs = expand([cache], [1], {}, {"device": device, "epochs": 2}, None, "none")
        t0 = time.perf_counter()
        run_grid(runs, Path(tmp) / "grid")
        seconds = time.perf_counter() - t0
    return seconds / (2 * 5 * 16)  # 5 base classes × 16 shots × 2 epochs


def estimate(plan: Plan, todo: list[StudyJob], rates: dict) -> dict:
    """Seconds per stage for the jobs still to run on one process (a lower bound: decoding, loading and
    evaluation are not in the measured rates unless they come from finished jobs)."""
    r = rates["rates"]
    seconds = {k: 0.0 for k in STAGES}
    unknown = []
    sizes: dict[str, tuple] = {}
    all_jobs = build_jobs(plan)
    extracts = {x.spec["out"]: x for x in all_jobs if x.kind == "extract"}
    for j in todo:
        if j.kind in ("report", "load"):  # seconds at most
            continue
        unit = extracts[j.spec["cache"] if j.kind != "extract" else j.spec["out"]].unit  # Table 2's jobs have none
        if unit not in sizes:
            try:
                sizes[unit] = _samples(extracts[cache_path_of(plan, unit)].spec)
            except Exception as exc:  # noqa: BLE001
                sizes[unit] = ({}, 0)
                unknown.append(f"{unit}: {exc}")
        n, classes = sizes[unit]
        if not n:
            continue
        views = plan.extract["train_views"]
        if j.kind in ("extract", "import"):
            if "encode" in r:
                seconds[j.kind] += encoded_views(n, views) / r["encode"]
        elif j.kind == "backbone":
            from ..backbones import default_epochs

            epochs = plan.backbone.get("epochs") or default_epochs(unit.split("/")[0], j.spec["method"])
            share = 1 if j.spec.get("classes") == "all" else 0.5  # images and classes it trains on
            if "backbone" in r:
                seconds["backbone"] += epochs * n.get("train", 0) * share * r["backbone"] * classes * share / PROBE_CLASSES
        elif j.kind == "grid":
            try:
                runs = len(_ablation_rows(j.spec["preset"]))
            except KeyError:
                runs = 1
            epochs = plan.train_settings.get("epochs", 10)
            share = 1 if j.spec.get("classes") == "all" else 0.5
            seconds["grid"] += runs * epochs * n.get("train", 0) * share * r["head"]
    return {"seconds": seconds, "total": sum(seconds.values()), "unknown": unknown}


def cache_path_of(plan: Plan, unit: str) -> str:
    return str(plan.out / "caches" / f"{unit}.h5")


def _ablation_rows(preset: str | None) -> list:
    from ..ablations import PAPER

    if preset is None:
        return [None]
    names = PAPER if preset == "paper" else (preset,)
    return [row for n in names for row in ABLATIONS[n][1]]
