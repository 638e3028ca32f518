"""The paper's component ablation (Table 3) and λ_d sweep (Fig. 4b) on the synthetic world, 3 seeds.

For each seed and each split variant (spurious, clean) this draws the downstream data with that
seed, extracts it with the shipped world CLIP, trains CoOp, then runs the `components` and `lambda`
presets of `fvgpt-cache grid` on the CoOp backbone, and writes the reports (Markdown) next to the
results. Everything is offline and runs on a CPU.

    python benchmarks/world_ablation.py --out cache/world-ablation
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fvgpt_cache.backbones import BackboneConfig, save_coop_checkpoint, train_backbone, write_backbone
from fvgpt_cache.data import generic_dataset
from fvgpt_cache.demo import WORLD_TEMPLATE, load_world_model
from fvgpt_cache.extraction import ExtractOptions, extract
from fvgpt_cache.grids import expand, run_grid
from fvgpt_cache.models import load_clip
from fvgpt_cache.reports import aggregate, load_records, to_markdown
from fvgpt_cache.training import TrainConfig
from fvgpt_cache.world import write_downstream


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("cache/world-ablation"))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--train-views", type=int, default=4)
    ap.add_argument("--test-per-class", type=int, default=30)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a folder with world-clip.json/.pt exported by pretrain_world.py (default: the shipped one)")
    args = ap.parse_args(argv)

    loaded = (load_clip(str(args.model_dir / "world-clip.json"), str(args.model_dir / "world-clip.pt"))
              if args.model_dir else load_world_model())
    seeds = [int(s) for s in args.seeds.split(",")]
    caches: dict[str, list[Path]] = {"spurious": [], "clean": []}
    for variant in caches:
        for seed in seeds:
            name = f"world-{variant}-seed{seed}"
            cache = args.out / "caches" / f"{name}.h5"
            if not cache.exists():
                split, images, masks = write_downstream(args.out / "data" / name, spurious=variant == "spurious",
                                                        test_per_class=args.test_per_class, seed=seed)
                ds = generic_dataset(split, images, masks, template=WORLD_TEMPLATE)
                ds.name = f"world-{variant}"
                extract(ds, loaded, cache, ExtractOptions(shots=0, seed=seed, train_views=args.train_views, workers=0))
                coop = BackboneConfig(method="coop", seed=seed, device="cpu")
                result = train_backbone(cache, coop, loaded=loaded)
                write_backbone(cache, "coop", result.ctx, coop, loaded,
                               checkpoint=save_coop_checkpoint(args.out / "coop" / name, result.ctx, coop.epochs))
            caches[variant].append(cache)

    summary = {}
    for preset in ("components", "lambda"):
        folder = args.out / preset
        for variant, paths in caches.items():
            # the seed of a run must match the seed its cache was drawn with
            runs = [r for p, seed in zip(paths, seeds)
                    for r in expand([p], [seed], {}, TrainConfig(backbone="coop"), preset=preset)]
            run_grid(runs, folder / variant)
        records = load_records([folder])
        (folder / "report.md").write_text(to_markdown(aggregate(records)))
        summary[preset] = str(folder / "report.md")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
