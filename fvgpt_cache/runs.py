"""One training run end to end: cache → head → metrics → run folder (results.json + head.pt)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from .engine import train_head
from .evaluation import EvalSet, curve_data, evaluate, evaluate_transfer, gate_diagnostics
from .heads import FVGPTHead
from .records import MaskSource, RunInput, RunRecord, Selection, read_record
from .store import EXTRACTED_FG, Cache, check_same_model, mask_statistics, open_cache
from .training import TrainConfig, build_head, config_with, prepare, stability

HEAD_FORMAT = "fvgpt-cache-head"


def run_inputs(cache: Cache, backbone: str, targets=(), fg_source: str = EXTRACTED_FG) -> list[RunInput]:
    """What a run reads, by content: the training cache (with its mask source) and every evaluation cache,
    each with the fingerprint of the datasets the run uses (`Cache.input_fingerprint`) and its path."""
    return [RunInput(role, str(Path(c.path).resolve()),
                     c.input_fingerprint(backbone, fg_source if role == "train" else EXTRACTED_FG))
            for role, c in [("train", cache), *(("eval", t) for t in targets)]]


def run_id(inputs: list[RunInput], cfg: TrainConfig) -> str:
    """The key of a result: its configuration, the content of what it read (not the files' paths) and the code of
    the registered plug-ins it used (none for the paper's own indicators and losses, which leave the key as it was)."""
    key = [[(i.role, i.fingerprint) for i in inputs], cfg.to_dict()]
    plugins = cfg.plugin_fingerprints()
    if plugins:
        key.append(plugins)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def run_slot(paths: list[str], config: dict) -> str:
    """Where a result would sit by what was asked (cache paths and configuration), whatever the caches
    held: two records in one slot with different `run_id`s were computed from different contents."""
    return json.dumps([list(paths), config], sort_keys=True)


def record_slot(record: RunRecord) -> str:
    """`run_slot` of a results record (records written before inputs were recorded: its cache path)."""
    paths = [i.path for i in record.inputs] if record.inputs else [str(Path(record.cache).resolve())]
    return run_slot(paths, {**TrainConfig().to_dict(), **record.config})  # fields added since take their defaults


def default_run_dir(cache_path: Path, cfg: TrainConfig, backbone: str, rid: str,
                    root: Path = Path("cache/runs")) -> Path:
    return root / f"{Path(cache_path).stem}-{backbone}-seed{cfg.seed}-{rid}"


def save_head(head: FVGPTHead, cfg: TrainConfig, dim: int, path: Path) -> None:
    """Tensors and plain values only, so `torch.load(..., weights_only=True)` reads it back."""
    torch.save({"format": HEAD_FORMAT, "dim": dim, "config": json.dumps(cfg.to_dict()),
                "state_dict": head.state_dict()}, path)


def load_head(path: Path, dim: int | None = None) -> tuple[FVGPTHead, TrainConfig]:
    """Rebuild a saved head; refuse files of another kind or of the wrong feature width."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path} is not an fvgpt-cache head checkpoint (no format={HEAD_FORMAT!r})")
    if dim is not None and blob["dim"] != dim:
        raise ValueError(f"{path} was trained on {blob['dim']}-d features but the cache has {dim}-d features; "
                         "use a cache extracted with the same model")
    cfg = TrainConfig.from_dict({**json.loads(blob["config"]), "device": "cpu"})
    head = build_head(blob["dim"], cfg)  # validates cfg
    try:
        head.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit the head its config describes: {exc}") from exc
    return head.eval(), cfg


def run_training(cache_path: str | Path, cfg: TrainConfig, out_dir: Path | None = None,
                 eval_caches: list[str | Path] = (), progress=None, save: bool = True,
                 preset: dict | None = None) -> RunRecord:
    """Train, evaluate and (with `save`) write one run. `preset` is `training.configure`'s record, if used."""
    cfg.validate()
    t0 = time.perf_counter()
    cache = open_cache(cache_path)
    targets = [open_cache(p) for p in eval_caches]
    check_same_model([cache, *targets])
    data = prepare(cache, cfg)
    cfg_used = config_with(cfg, backbone=data.meta["backbone"])
    if save and out_dir is not None:
        check_run_dir(Path(out_dir), run_id(run_inputs(cache, cfg_used.backbone, targets, cfg_used.fg_source), cfg_used))
    t1 = time.perf_counter()
    head, history, images = train_head(data, cfg_used, progress, curve=curve_data(cache, cfg_used.backbone, cfg_used.classes))
    return finish_run(cache, cfg_used, data.subset(images), head, history, {"load": t1 - t0, "train": time.perf_counter() - t1},
                      targets, out_dir, save, preset)


CURVE_METRICS = ("base", "new", "hm", "all")


def selection(cfg: TrainConfig, history: list[dict]) -> Selection | None:
    """Which epoch the run reports and why: `rule` (last | val), `epoch`, the validation numbers at that
    epoch and the test numbers of FVG-PT at the last epoch (from the curve), so both are recorded."""
    chosen = [h for h in history if h.get("selected")]
    if not chosen:
        return None  # trained without curves
    pick, last = chosen[0], history[-1]
    return Selection(rule=cfg.select, epoch=pick["epoch"],
                     val={m: pick[f"val_{m}"] for m in CURVE_METRICS if f"val_{m}" in pick} or None,
                     last_epoch_test={m: last[f"test_{m}"] for m in CURVE_METRICS if f"test_{m}" in last})


def check_run_dir(out_dir: Path, rid: str) -> None:
    """Refuse a run folder that holds another run's results (a rerun of the same run may rewrite its own)."""
    existing = out_dir / "results.json"
    if existing.is_file():
        try:
            other = read_record(existing).run_id
        except ValueError:  # unreadable, or not a results record this code reads: not this run's
            other = None
        if other != rid:
            raise ValueError(f"{out_dir} already holds the results of another run ({other or 'unreadable'}; this run is "
                             f"{rid}); choose another --out, or move that folder away first")


def eval_sets(cache, targets, backbone: str) -> dict:
    """The test features a run is evaluated on, read once (a grid shares them across its runs)."""
    return {"own": EvalSet(cache, backbone), "targets": [EvalSet(t, backbone) for t in targets]}


def finish_run(cache, cfg: TrainConfig, data, head: FVGPTHead, history: list[dict], seconds: dict,
               targets=(), out_dir: Path | None = None, save: bool = True, preset: dict | None = None,
               evalsets: dict | None = None) -> RunRecord:
    """Evaluate a trained head and build (and optionally write) its results record."""
    t2 = time.perf_counter()
    sets = evalsets or eval_sets(cache, targets, cfg.backbone)
    results = evaluate(head, cache, cfg.backbone, cfg.classes, sets["own"])
    results["cross_dataset"] = [evaluate_transfer(head, t, cfg.backbone, ts) for t, ts in zip(targets, sets["targets"])]
    initial = build_head(data.full.shape[-1], cfg)  # the head as its training started (the seed fixes it)
    results["diagnostics"] = gate_diagnostics(head, data, cache, cfg.backbone, cfg.classes, sets["own"], initial)
    results["stability"] = stability(results["diagnostics"]["fdc_fit"], results["diagnostics"]["train"]["backbone_acc"])
    warnings = list(data.meta.get("warnings", [])) + list((preset or {}).get("warnings", []))
    inputs = run_inputs(cache, cfg.backbone, targets, cfg.fg_source)
    rid = run_id(inputs, cfg)
    out_dir = Path(out_dir) if out_dir else default_run_dir(cache.path, cfg, cfg.backbone, rid)
    record = RunRecord(
        run_id=rid,
        cache=str(cache.path),
        inputs=inputs,
        dataset=cache.provenance.get("dataset"),
        cache_provenance=cache.provenance,
        backbone=cfg.backbone,
        backbone_provenance=cache.text_provenance(cfg.backbone),
        seed=cfg.seed,
        config=cfg.to_dict(),
        plugins=cfg.plugin_fingerprints() or None,
        preset=preset,
        warnings=warnings,
        **results,
        head_parameters=head.num_parameters(),
        feature_dim=int(data.full.shape[-1]),
        train_images=data.meta["train_images"],
        mask_source=MaskSource(name=cfg.fg_source, **mask_statistics(data.area.numpy()),
                               made_by=cache.fg_source_provenance(cfg.fg_source).get("masks_json")),
        views=data.meta["views"],
        seconds={**seconds, "evaluate": time.perf_counter() - t2},
        selection=selection(cfg, history),
        history=history,
        run_dir=str(out_dir) if save else None,
    )
    if save:
        check_run_dir(out_dir, rid)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_head(head, cfg, data.full.shape[-1], out_dir / "head.pt")
        (out_dir / "results.json").write_text(record.dumps(indent=1))
    return record
