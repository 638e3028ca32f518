"""The offline demos.

`run_world_demo` (the default of `fvgpt-cache demo`): the synthetic world (`world.py`) with the tiny
CLIP pretrained on it and shipped in the package. For a spurious split (most training images of
each base class on that class's own background) and a clean split it extracts features, trains
CoOp, trains FVG-PT on CoOp, and returns zero-shot / CoOp / FVG-PT Base/New/HM for both.

`run_smoke_demo` (`fvgpt-cache demo --smoke`): a tiny random CLIP on simple shapes, seconds only;
its numbers show that the pipeline runs, nothing else.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Callable

from .backbones import BackboneConfig, save_coop_checkpoint, train_backbone, write_backbone
from .data import generic_dataset
from .extraction import ExtractOptions, extract
from .inspection import inspect_cache
from .models import LoadedModel, load_clip
from .runs import run_training
from .training import TrainConfig

SMOKE_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
WORLD_TEMPLATE = "a photo of a {}."


def world_model_files() -> tuple[Path, Path]:
    """The shipped world CLIP: (config JSON, fp16 weights)."""
    assets = resources.files("fvgpt_cache").joinpath("assets")
    config, weights = Path(str(assets.joinpath("world-clip.json"))), Path(str(assets.joinpath("world-clip.pt")))
    if not (config.is_file() and weights.is_file()):
        raise FileNotFoundError(f"the shipped world model is missing ({config}, {weights}); reinstall fvgpt-cache "
                                "or train it with benchmarks/pretrain_world.py --export fvgpt_cache/assets")
    return config, weights


def load_world_model() -> LoadedModel:
    config, weights = world_model_files()
    return load_clip(str(config), str(weights))


def _pipeline(loaded: LoadedModel, dataset, root: Path, seed: int, train_views: int, epochs: int,
              progress: Callable[[str, int, int], None] | None) -> dict:
    summary = extract(dataset, loaded, root / f"{dataset.name}.h5",
                      ExtractOptions(shots=0, seed=seed, train_views=train_views, workers=0, force=True),
                      progress=progress)
    coop = BackboneConfig(method="coop", seed=seed, device="cpu", epochs=epochs)
    backbone = train_backbone(summary.out, coop, loaded=loaded)
    write_backbone(summary.out, "coop", backbone.ctx, coop, loaded,
                   checkpoint=save_coop_checkpoint(root / f"{dataset.name}-coop", backbone.ctx, coop.epochs))
    return run_training(summary.out, TrainConfig(backbone="coop", seed=seed, epochs=epochs),
                        out_dir=root / f"{dataset.name}-run")


def run_world_demo(root: Path = Path("cache/demo"), seed: int = 1, shots: int = 16, on_own_background: int = 14,
                   val_per_class: int = 8, test_per_class: int = 30, train_views: int = 4, epochs: int = 10,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict]:
    """{"spurious": results, "clean": results}, each the results record of FVG-PT on CoOp."""
    from .world import write_downstream

    loaded = load_world_model()
    out = {}
    for variant in ("spurious", "clean"):
        data_root = root / f"world-{variant}"
        split, images, masks = write_downstream(data_root, spurious=variant == "spurious", shots=shots,
                                                on_own_background=on_own_background, val_per_class=val_per_class,
                                                test_per_class=test_per_class, seed=seed)
        dataset = generic_dataset(split, images, masks, template=WORLD_TEMPLATE)
        dataset.name = f"world-{variant}"
        out[variant] = _pipeline(loaded, dataset, root, seed, train_views, epochs, progress)
    return out


def run_smoke_demo(root: Path = Path("cache/demo-smoke"), progress: Callable[[str, int, int], None] | None = None,
                   per_class: tuple[int, int, int] = (16, 4, 10), seed: int = 1) -> tuple[dict, dict]:
    """Random tiny CLIP on simple shapes: extraction → inspection → CoOp → FVG-PT. Returns (inspection, results)."""
    from .world import SHAPES, write_downstream

    root.mkdir(parents=True, exist_ok=True)
    shots, val, test = per_class
    split_file, image_root, mask_root = write_downstream(root / "data", spurious=False, shots=shots, val_per_class=val,
                                                         test_per_class=test, classes=SHAPES[:6], seed=0)
    config = root / "smoke-clip.json"
    config.write_text(json.dumps(SMOKE_MODEL, indent=1))
    loaded = load_clip(str(config), "none", seed=0)
    dataset = generic_dataset(split_file, image_root, mask_root, template=WORLD_TEMPLATE)
    dataset.name = "smoke-shapes"
    results = _pipeline(loaded, dataset, root, seed, 2, 10, progress)
    return inspect_cache(results["cache"]), results
