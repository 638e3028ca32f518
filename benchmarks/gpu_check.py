"""Everything a first CUDA session should see, in one run (about 5 minutes on one GPU).

    python benchmarks/gpu_check.py                  # on the GPU; "no CUDA device" (exit 0) without one
    python benchmarks/gpu_check.py --cpu            # the same checks on the CPU, small (CI runs this)
    python benchmarks/gpu_check.py --out gpu.json   # where the JSON of results goes

Checks, each recorded with its numbers and `ok`:

1. `versions`: torch, CUDA, cuDNN, torchvision, open_clip, the GPU, the TF32 / float32 matmul
   settings of the environment, and whether torch's fused SGD / AdamW run on the device.
2. `train` and `grid`: one run and a mixed grid on a 50-class, D = 512 synthetic cache, on the CPU
   and on the device side by side (seconds of each, taken in this one process), with metrics equal
   within one test image.
3. `extraction`: images per second at --workers 2 and 8, with the peak GPU memory; every stored
   feature finite.
4. `large_model`: ViT-L/14-336 (random weights: no download) encoding one batch of 64 images × 11
   views, full and foreground, through --encode-batch; peak GPU memory.
5. `resume_refused`: a `.partial` started on the CPU is refused on CUDA (with --cpu: one started at
   fp32 is refused at bf16).
6. `suite`: the test suite with FVGPT_TEST_DEVICE=cuda (skipped with --cpu: CI runs the suite).

Exit status 1 when a check fails. The machine's other load moves the seconds, not the verdicts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def versions(device: torch.device) -> dict:
    import torchvision

    from fvgpt_cache.engine import kernels
    from fvgpt_cache.models import open_clip_version

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
           "open_clip": open_clip_version(), "cuda": torch.version.cuda, "device": str(device),
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "float32_settings": kernels.float32_settings(),
           "engine_numerics": kernels.NUMERICS,
           "fused_sgd": kernels.fused_available("sgd", device), "fused_adamw": kernels.fused_available("adamw", device),
           "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                   bf16_supported=torch.cuda.is_bf16_supported())
    return {"ok": True, **out}


def _accuracies(record) -> dict:
    m = record.metrics["fvgpt"]
    return {k: m[k] for k in ("base", "new") if m.get(k) is not None}


def _equal_within_one_image(a: dict, b: dict, images: dict) -> tuple[bool, dict]:
    gaps = {k: abs(a[k] - b[k]) for k in a}
    one = {k: 100.0 / images[k] for k in a}  # accuracies are percentages
    return all(gaps[k] <= one[k] + 1e-9 for k in a), {"gaps": gaps, "one_image": one}


def check_training(device: torch.device, work: Path, small: bool) -> dict:
    from fvgpt_cache.grids import expand, run_grid
    from fvgpt_cache.runs import run_training
    from fvgpt_cache.synthetic import write_feature_cache
    from fvgpt_cache.training import TrainConfig

    cache = write_feature_cache(work / "c50.h5", num_classes=50, shots=8 if small else 16, views=3 if small else 11,
                                dim=512, test_per_class=10 if small else 20, signal=0.25, noise=0.6)  # far from 100 %
    epochs = 2 if small else 10
    out: dict = {"cache": {"classes": 50, "dim": 512, "shots": 8 if small else 16, "views": 3 if small else 11},
                 "epochs": epochs}
    single = {}
    for where in ("cpu", device.type):
        cfg = TrainConfig(seed=1, epochs=epochs, device=where)
        start = time.perf_counter()
        record = run_training(cache, cfg, save=False)
        single[where] = {"seconds": time.perf_counter() - start, "train_seconds": record.seconds["train"],
                         "acc": _accuracies(record), "images": record.test_images}
    ok, detail = _equal_within_one_image(single["cpu"]["acc"], single[device.type]["acc"], single["cpu"]["images"])
    out["train"] = {"ok": ok, **detail, "cpu": single["cpu"], device.type: single[device.type],
                    "cpu_over_device": single["cpu"]["train_seconds"] / single[device.type]["train_seconds"]}
    params = {"lr": [0.0035, 0.001], "use_frg": [True, False], "fdc_hidden": [32, 64]}
    grids = {}
    for where in ("cpu", device.type):
        runs = expand([cache], [1] if small else [1, 2], params, {"epochs": epochs, "device": where})
        start = time.perf_counter()
        records = run_grid(runs, work / f"grid-{where}", resume=False)
        grids[where] = {"seconds": time.perf_counter() - start, "runs": len(records),
                        "acc": {r.run_id: _accuracies(r) for r in records},
                        "images": records[0].test_images}
    verdicts = [_equal_within_one_image(grids["cpu"]["acc"][k], grids[device.type]["acc"][k], grids["cpu"]["images"])[0]
                for k in grids["cpu"]["acc"]]
    out["grid"] = {"ok": all(verdicts) and len(verdicts) == grids[device.type]["runs"], "runs": len(verdicts),
                   "cpu_seconds": grids["cpu"]["seconds"], f"{device.type}_seconds": grids[device.type]["seconds"],
                   "cpu_over_device": grids["cpu"]["seconds"] / grids[device.type]["seconds"],
                   "runs_equal_within_one_image": sum(verdicts)}
    return out


def write_images(root: Path, classes: int, per_split=(6, 2, 3), size=(160, 120)) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for label in range(classes):
        name = f"class_{label}"
        for split_name, count in zip(split, per_split):
            for i in range(count):
                rel = f"{name}/{split_name}_{i}.jpg"
                w, h = size
                img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
                mask = np.zeros((h, w), dtype=np.uint8)
                mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
                for path, arr in ((root / "images" / rel, img), (root / "masks" / Path(rel).with_suffix(".png"), mask)):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(path)
                split[split_name].append([rel, label, name])
    (root / "split.json").write_text(json.dumps(split))
    return root / "split.json", root / "images", root / "masks"


def _model(device: torch.device, work: Path, name: str):
    from fvgpt_cache.models import load_clip

    if device.type == "cpu":  # --cpu: the tests' tiny CLIP, so the check stays short
        config = work / "tiny-clip.json"
        config.write_text(json.dumps(TINY_CLIP))
        return load_clip(str(config), "none")
    return load_clip(name, "none")  # random weights of the real architecture: no download


def _all_finite(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        found = []
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and name.startswith("image/") else None)
        return bool(found) and all(np.isfinite(f[name][()]).all() for name in found)


def check_extraction(device: torch.device, work: Path, small: bool) -> dict:
    from fvgpt_cache.data import generic_dataset
    from fvgpt_cache.extraction import ExtractOptions, extract

    ds = generic_dataset(*write_images(work / "data", classes=4 if small else 10, per_split=(4, 1, 2) if small else (16, 2, 8)))
    loaded = _model(device, work, "ViT-B-16")
    views = 3 if small else 11
    out = {"model": loaded.provenance["model"], "views": views, "runs": {}}
    finite = True
    for workers in (2, 8):
        reset_peak(device)
        path = work / f"extract-w{workers}.h5"
        summary = extract(ds, loaded, path, ExtractOptions(shots=0, train_views=views, workers=workers,
                                                           batch_size=8 if small else 32, device=device.type))
        finite = finite and _all_finite(path)
        out["runs"][f"workers_{workers}"] = {"images_per_second": summary.images_per_second, "seconds": summary.seconds,
                                             "peak_gpu_memory_mib": (peak_memory(device) or 0) / 2**20 or None,
                                             "plan": summary.plan}
    out["all_features_finite"] = finite
    out["ok"] = finite
    return out


def check_large_model(device: torch.device, work: Path) -> dict:
    from fvgpt_cache.extraction import DEFAULT_ENCODE_BATCH, encode_views
    from fvgpt_cache.views import ViewMaker

    loaded = _model(device, work, "ViT-L-14-336")
    loaded.model.to(device)
    size = int(loaded.preprocess["size"])
    gen = torch.Generator().manual_seed(0)
    items = [{"pixels": torch.randint(0, 256, (11, 3, size, size), dtype=torch.uint8, generator=gen),
              "mask": torch.rand(11, 1, size, size, generator=gen) > 0.5} for _ in range(64)]
    reset_peak(device)
    start = time.perf_counter()
    feats = encode_views(loaded.model.encode_image, items, device, ViewMaker(loaded.preprocess), "auto",
                         DEFAULT_ENCODE_BATCH)[""]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    finite = bool(torch.isfinite(feats).all())
    return {"ok": finite and tuple(feats.shape[:3]) == (2, 64, 11), "model": loaded.provenance["model"],
            "images": 2 * 64 * 11, "encode_batch": DEFAULT_ENCODE_BATCH, "seconds": seconds,
            "images_per_second": 2 * 64 * 11 / seconds, "peak_gpu_memory_mib": (peak_memory(device) or 0) / 2**20 or None,
            "finite": finite}


def check_resume_refused(device: torch.device, work: Path) -> dict:
    from fvgpt_cache.data import generic_dataset
    from fvgpt_cache.extraction import ExtractOptions, extract
    from fvgpt_cache.store import CacheError

    ds = generic_dataset(*write_images(work / "resume-data", classes=3, per_split=(4, 1, 1), size=(64, 48)))
    loaded = _model(torch.device("cpu"), work, "ViT-B-16") if device.type == "cpu" else _model(device, work, "ViT-B-16")
    out = work / "resume.h5"
    opts = dict(shots=0, train_views=2, workers=0, batch_size=4)
    try:
        extract(ds, loaded, out, ExtractOptions(**opts, device="cpu"), stop_after_batches=1)
    except KeyboardInterrupt:
        pass
    second = dict(device="cuda") if device.type == "cuda" else dict(device="cpu", precision="bf16")
    try:
        extract(ds, loaded, out, ExtractOptions(**opts, **second))
    except CacheError as exc:
        return {"ok": "was started on cpu" in str(exc), "message": str(exc), "resumed_with": second}
    return {"ok": False, "message": "the partial file was resumed", "resumed_with": second}


def check_suite(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"ok": True, "skipped": "--cpu: CI runs the suite itself"}
    env = {**os.environ, "FVGPT_TEST_DEVICE": "cuda"}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1800)
    tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
    return {"ok": res.returncode == 0, "seconds": time.perf_counter() - start, "tail": tail}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the same checks on the CPU, small (CI)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON of results")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (python benchmarks/gpu_check.py --cpu runs the checks on the CPU)")
        return 0
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    results: dict = {"device": str(device), "small": args.cpu, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        steps = [("versions", lambda: versions(device)),
                 ("training", lambda: check_training(device, work, args.cpu)),
                 ("extraction", lambda: check_extraction(device, work, args.cpu)),
                 ("large_model", lambda: check_large_model(device, work)),
                 ("resume_refused", lambda: check_resume_refused(device, work)),
                 ("suite", lambda: check_suite(device))]
        for name, step in steps:
            t0 = time.perf_counter()
            try:
                results[name] = step()
            except Exception as exc:  # noqa: BLE001  (a failed check is a result, and the others still run)
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            results[name]["check_seconds"] = round(time.perf_counter() - t0, 2)
            if name == "training":  # two checks in one: say each
                results["train"], results["grid"] = results[name].pop("train", {"ok": False}), results[name].pop("grid", {"ok": False})
                results[name]["ok"] = results["train"]["ok"] and results["grid"]["ok"]
            print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['check_seconds']} s)", flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["ok"] = all(v["ok"] for v in results.values() if isinstance(v, dict) and "ok" in v)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"{'all checks passed' if results['ok'] else 'SOME CHECKS FAILED'} in {results['seconds']} s; wrote {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
