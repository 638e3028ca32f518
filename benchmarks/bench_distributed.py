"""Extraction with 1 and 2 processes under torchrun on this machine's CPUs, side by side.

Each process runs with one thread (`OMP_NUM_THREADS=1`, `--workers 0`: it decodes and encodes
itself), so N processes use N cores. The same generated JPEGs (500×375, masks; half of them
train images with one view, half test images) are extracted with `python -m torch.distributed.run --standalone --nproc-per-node=N`, alternating N = 1 and
N = 2 for `--rounds` rounds (other jobs share the machine: alternating spreads their load over
both). Two numbers per run:

- pass: images per second of the pass itself (all rows ÷ the slowest rank's pass time, what
  `extract` prints as "total"), the part that scales;
- command: images per second of the whole command (start-up, importing torch, building the model
  in every process, the rendezvous, writing the file), which a real dataset amortises.

The files written with 1 and 2 processes are compared dataset by dataset (they must be equal).

    python benchmarks/bench_distributed.py                       # ViT-B-16, random weights, 32 images
    python benchmarks/bench_distributed.py --images 64 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from bench_extraction import write_images  # run as a script: benchmarks/ is on sys.path


def worker(args) -> None:
    """One rank (or the single process): extract and, on rank 0, print the per-rank pass times as JSON."""
    import torch

    torch.set_num_threads(1)
    from fvgpt_cache.data import generic_dataset
    from fvgpt_cache.extraction import ExtractOptions, extract
    from fvgpt_cache.models import load_clip

    data = Path(args.data)
    ds = generic_dataset(data / "split.json", data / "images", data / "masks")
    loaded = load_clip(args.model, "none")
    options = ExtractOptions(shots=0, train_views=1, batch_size=args.batch_size, workers=0, device="cpu")
    summary = extract(ds, loaded, Path(args.out), options)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"ranks": summary.ranks, "counts": summary.counts}), flush=True)


def run(nproc: int, data: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
           "--worker", "--data", str(data), "--out", str(out), "--model", args.model,
           "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if res.returncode != 0:
        raise SystemExit(f"{nproc} process(es) failed:\n{res.stderr[-3000:]}")
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    rows = sum(r["rows"] for r in result["ranks"])
    return {"pass": rows / max(r["seconds"] for r in result["ranks"]), "command": rows / wall,
            "per_rank": [round(r["rows"] / r["seconds"], 2) for r in result["ranks"]]}


def same_file(a: Path, b: Path) -> bool:
    def contents(path):
        out = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        return out
    x, y = contents(a), contents(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}

    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "data", args.images, train_every=2)  # half train (one view), half test
        for r in range(args.rounds):
            for nproc in (1, 2):
                out = tmp / f"n{nproc}_r{r}.h5"
                runs[nproc].append(run(nproc, tmp / "data", out, args))
                print(f"round {r + 1}, {nproc} process(es): {runs[nproc][-1]}", file=sys.stderr, flush=True)
        identical = same_file(tmp / "n1_r0.h5", tmp / "n2_r0.h5")
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("pass", "command")} for n, v in runs.items()}
    result = {
        "model": args.model, "images": args.images, "batch_size": args.batch_size, "rounds": args.rounds,
        "threads_per_process": 1, "cpus": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "pass_images_per_s": {n: round(m["pass"], 3) for n, m in med.items()},
        "command_images_per_s": {n: round(m["command"], 3) for n, m in med.items()},
        "pass_ratio_2_to_1": round(med[2]["pass"] / med[1]["pass"], 3),
        "command_ratio_2_to_1": round(med[2]["command"] / med[1]["command"], 3),
        "per_rank_images_per_s_2_processes": [x["per_rank"] for x in runs[2]],
        "files_identical": identical,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
