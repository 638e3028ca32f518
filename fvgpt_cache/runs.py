"""One training run end to end: cache → head → metrics → run folder (results.json + head.pt)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from .engine import train_head
from .evaluation import EvalSet, evaluate, evaluate_transfer, gate_diagnostics
from .heads import FVGPTHead
from .store import EXTRACTED_FG, check_same_model, mask_statistics, open_cache
from .training import TrainConfig, build_head, prepare, stability

RESULTS_FORMAT = "fvgpt-cache-results"
HEAD_FORMAT = "fvgpt-cache-head"


def run_id(cache_path: Path, cfg: TrainConfig) -> str:
    config = cfg.to_dict()
    if config["fg_source"] == EXTRACTED_FG:  # runs from before mask sources existed keep their ids
        del config["fg_source"]
    digest = hashlib.sha256(json.dumps([str(Path(cache_path).resolve()), config], sort_keys=True).encode()).hexdigest()
    return digest[:10]


def default_run_dir(cache_path: Path, cfg: TrainConfig, backbone: str, root: Path = Path("cache/runs")) -> Path:
    return root / f"{cache_path.stem}-{backbone}-seed{cfg.seed}-{run_id(cache_path, cfg)}"


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
    cfg = TrainConfig(**{**json.loads(blob["config"]), "device": "cpu"})
    cfg.frg_indicators, cfg.brg_indicators = tuple(cfg.frg_indicators), tuple(cfg.brg_indicators)
    head = build_head(blob["dim"], cfg)
    try:
        head.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit the head its config describes: {exc}") from exc
    return head.eval(), cfg


def run_training(cache_path: str | Path, cfg: TrainConfig, out_dir: Path | None = None,
                 eval_caches: list[str | Path] = (), progress=None, save: bool = True,
                 preset: dict | None = None) -> dict:
    """Train, evaluate and (with `save`) write one run. `preset` is `training.configure`'s record, if used."""
    cfg.validate()
    t0 = time.perf_counter()
    cache = open_cache(cache_path)
    targets = [open_cache(p) for p in eval_caches]
    check_same_model([cache, *targets])
    data = prepare(cache, cfg)
    cfg_used = TrainConfig(**{**cfg.to_dict(), "backbone": data.meta["backbone"]}).validate()
    t1 = time.perf_counter()
    head, history, images = train_head(data, cfg_used, progress)
    return finish_run(cache, cfg_used, data.subset(images), head, history, {"load": t1 - t0, "train": time.perf_counter() - t1},
                      targets, out_dir, save, preset)


def eval_sets(cache, targets, backbone: str) -> dict:
    """The test features a run is evaluated on, read once (a grid shares them across its runs)."""
    return {"own": EvalSet(cache, backbone), "targets": [EvalSet(t, backbone) for t in targets]}


def finish_run(cache, cfg: TrainConfig, data, head: FVGPTHead, history: list[dict], seconds: dict,
               targets=(), out_dir: Path | None = None, save: bool = True, preset: dict | None = None,
               evalsets: dict | None = None) -> dict:
    """Evaluate a trained head and build (and optionally write) its results record."""
    t2 = time.perf_counter()
    sets = evalsets or eval_sets(cache, targets, cfg.backbone)
    results = evaluate(head, cache, cfg.backbone, cfg.classes, sets["own"])
    results["cross_dataset"] = [evaluate_transfer(head, t, cfg.backbone, ts) for t, ts in zip(targets, sets["targets"])]
    initial = build_head(data.full.shape[-1], cfg)  # the head as its training started (the seed fixes it)
    results["diagnostics"] = gate_diagnostics(head, data, cache, cfg.backbone, cfg.classes, sets["own"], initial)
    results["stability"] = stability(results["diagnostics"]["fdc_fit"], results["diagnostics"]["train"]["backbone_acc"])
    warnings = list(data.meta.get("warnings", [])) + list((preset or {}).get("warnings", []))
    out_dir = Path(out_dir) if out_dir else default_run_dir(cache.path, cfg, cfg.backbone)
    record = {
        "format": RESULTS_FORMAT,
        "version": 1,
        "run_id": run_id(cache.path, cfg),
        "cache": str(cache.path),
        "dataset": cache.provenance.get("dataset"),
        "cache_provenance": cache.provenance,
        "backbone": cfg.backbone,
        "backbone_provenance": cache.text_provenance(cfg.backbone),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "preset": preset,
        "warnings": warnings,
        **results,
        "head_parameters": head.num_parameters(),
        "feature_dim": int(data.full.shape[-1]),
        "train_images": data.meta["train_images"],
        "mask_source": {"name": cfg.fg_source, **mask_statistics(data.area.numpy()),
                        "made_by": cache.fg_source_provenance(cfg.fg_source).get("masks_json")},
        "views": data.meta["views"],
        "seconds": {**seconds, "evaluate": time.perf_counter() - t2},
        "history": history,
        "run_dir": str(out_dir) if save else None,
    }
    if save:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_head(head, cfg, data.full.shape[-1], out_dir / "head.pt")
        (out_dir / "results.json").write_text(json.dumps(record, indent=1))
    return record
