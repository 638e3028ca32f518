"""The offline demo: a synthetic shapes dataset and a tiny seeded random CLIP, end to end."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .backbones import BackboneConfig, save_coop_checkpoint, train_backbone, write_backbone
from .data import generic_dataset
from .extraction import ExtractOptions, ExtractSummary, extract
from .inspection import inspect_cache
from .models import load_clip
from .runs import run_training
from .training import TrainConfig

DEMO_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
DEMO_TEMPLATE = "a photo of a {}."


def run_demo(root: Path = Path("cache/demo"), progress: Callable[[str, int, int], None] | None = None,
             per_class: tuple[int, int, int] = (16, 4, 10), shots: int = 16,
             seed: int = 1) -> tuple[ExtractSummary, dict, dict]:
    """Data → extraction → inspection → CoOp → FVG-PT on CoOp. Returns (summary, inspection, results)."""
    from .synthetic import write_shapes_dataset

    root.mkdir(parents=True, exist_ok=True)
    split_file, image_root, mask_root = write_shapes_dataset(root / "data", per_class=per_class, seed=0)
    config = root / "demo-clip.json"
    config.write_text(json.dumps(DEMO_MODEL, indent=1))
    loaded = load_clip(str(config), "none", seed=0)
    dataset = generic_dataset(split_file, image_root, mask_root, template=DEMO_TEMPLATE)
    dataset.name = "demo-shapes"
    summary = extract(dataset, loaded, root / "demo-shapes.h5",
                      ExtractOptions(shots=shots, seed=seed, train_views=2, workers=0, force=True), progress=progress)
    report = inspect_cache(summary.out)
    coop = BackboneConfig(method="coop", seed=seed, device="cpu")
    backbone = train_backbone(summary.out, coop, loaded=loaded)
    write_backbone(summary.out, "coop", backbone.ctx, coop, loaded,
                   checkpoint=save_coop_checkpoint(root / "coop", backbone.ctx, coop.epochs))
    results = run_training(summary.out, TrainConfig(backbone="coop", seed=seed), out_dir=root / "run")
    return summary, report, results
