"""A whole study (`fvgpt-cache run PLAN.toml`) with 1 process and with 2 under torchrun, side by side.

Two ways of using 2 processes are compared: `--image-passes shared` (each extraction/import on both
ranks together) and `--image-passes per-rank` (each rank takes whole caches, image passes included).

The plan is the tests' tiny plan (tests/test_study.py): miniature copies of CoOp's folder layouts,
a tiny random open_clip ViT (6 blocks, width 64), official-layout PromptSRC/MMRL checkpoints made
from the same weights, 2 seeds, all four backbones; every job of it (extractions, imports,
CoOp/KgCoOp training, FVG-PT grids, the report). Each run starts from an empty output folder;
the three variants alternate for `--rounds` rounds (other jobs on the machine spread over both), each
process on one thread (`OMP_NUM_THREADS=1`). The per-run results of the two are compared (they must
be equal). Printed as JSON: wall time of every run, medians and their ratio, and the working time
(first job's start to last job's end, from the status files: without start-up and shutdown).

    python benchmarks/bench_study.py                      # 2 datasets, 2 rounds
    python benchmarks/bench_study.py --datasets oxford_pets dtd eurosat --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))


def make_world(root: Path, datasets: list[str], seeds: list[int]) -> None:
    import torch

    from test_datasets import build
    from test_import import DEEP_CONFIG, _save, mmrl_checkpoint, promptsrc_checkpoint

    from fvgpt_cache.data import base_new_split
    from fvgpt_cache.datasets import load_dataset, template_for
    from fvgpt_cache.models import load_clip

    (root / "deep.json").write_text(json.dumps(DEEP_CONFIG))
    for name in datasets:
        build(root / "data", name)
    deep = load_clip(str(root / "deep.json"), "none", seed=0)
    for name in datasets:
        classes = load_dataset(name, root / "data").classnames
        base = [classes[i] for i in base_new_split(len(classes))[0]]
        for seed in seeds:
            _save(promptsrc_checkpoint(deep.model, deep.tokenizer, base, seed=seed),
                  root / "ckpt" / "promptsrc" / name / f"seed{seed}" / "VLPromptLearner", 5)
            _save(mmrl_checkpoint(deep.model, deep.tokenizer, base, template_for(name), seed=seed),
                  root / "ckpt" / "mmrl" / name / f"seed{seed}" / "MultiModalRepresentationLearner", 5,
                  optimizer=torch.optim.AdamW)


VARIANTS = {"1 process": (1, "shared"), "2 processes, shared image passes": (2, "shared"),
            "2 processes, per-rank image passes": (2, "per-rank")}


def run(nproc: int, plan: Path, image_passes: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cli = ["-m", "fvgpt_cache.cli.main", "run", str(plan), "--image-passes", image_passes]
    cmd = [sys.executable, *cli] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cli]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}\n{res.stdout[-3000:]}")
    return seconds


def working_seconds(out: Path) -> float:
    """From the start of the first job to the end of the last (status files: end time and seconds of each job):
    the part of the wall time that more processes can shorten, without start-up and shutdown."""
    ends = []
    for f in (out / "jobs").rglob("*.json"):
        ends.append((f.stat().st_mtime, json.loads(f.read_text()).get("seconds", 0.0)))
    return max(e for e, _ in ends) - min(e - s for e, s in ends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["oxford_pets", "dtd"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from test_study import _results, write_plan

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_world(root, args.datasets, args.seeds)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        working: dict[str, list[float]] = {v: [] for v in VARIANTS}
        results = {}
        for r in range(args.rounds):
            for k, (variant, (nproc, passes)) in enumerate(VARIANTS.items()):
                out = f"out{k}"
                shutil.rmtree(root / out, ignore_errors=True)
                plan = write_plan(root, datasets=tuple(args.datasets), seeds=tuple(args.seeds),
                                  backbones=("coop", "kgcoop", "promptsrc", "mmrl"), model="deep.json", out=out,
                                  checkpoints={"promptsrc": "ckpt/promptsrc", "mmrl": "ckpt/mmrl"})
                times[variant].append(run(nproc, plan, passes))
                working[variant].append(working_seconds(root / out))
                results[variant] = _results(root / out)
        jobs = len(list((root / "out0" / "jobs").rglob("*.json")))
    medians = {v: statistics.median(t) for v, t in times.items()}
    one = medians["1 process"]
    print(json.dumps({"datasets": args.datasets, "seeds": args.seeds, "jobs": jobs, "runs": len(results["1 process"]),
                      "seconds": times, "median_seconds": {v: round(m, 2) for v, m in medians.items()},
                      "speedup_vs_1_process": {v: round(one / m, 2) for v, m in medians.items()},
                      "working_seconds": working,
                      "working_speedup_vs_1_process": {
                          v: round(statistics.median(working["1 process"]) / statistics.median(w), 2)
                          for v, w in working.items()},
                      "same_results": all(r == results["1 process"] for r in results.values())}, indent=1))


if __name__ == "__main__":
    main()
