"""Grids: one batched group vs. the same runs one by one, arithmetic efficiency, and scaling.

Three measurements, each side by side in one process (training only; evaluation is the same
per run either way and is reported separately); `mixed` and `dense` also time the same group with every
gradient from autograd over the same stacked forward (`backward="autograd"`): `autograd_vs_manual` is what
autograd would cost as the engine's one path (the rule: adopt it at ≤ 1.25×):

1. `mixed`: a small cache (20 classes → 10 base × 8 shots × 4 views, D = 128) and 128
   configurations that differ in indicators, lr, FRG on/off, gate depth, FDC width, data fraction
   and epochs: the grid's group vs. `train_head` for each configuration in turn (goal ≥ 10×).
2. `dense`: the default cache shape (100 classes → 50 base × 16 shots × 11 views, D = 512) and
   64 configurations (16 λ_d × 4 seeds): the group vs. one by one (goal ≥ 4×), and the group's
   effective GFLOP/s against a bare stacked `bmm` loop of the same shapes (goal ≥ 70 %).
4. `curves`: the per-epoch evaluation's share of a 16-configuration group on the default cache shape
   (the monitor's own seconds inside the same run; the goal: at most 10 %).
3. `scaling`: time per step of a group of K = 1, 8, 64, 256 default configurations (50 base
   classes), and of K = 8 with 50, 500 and 1000 classes (the cross-dataset ImageNet source).

    python benchmarks/bench_grid.py                 # everything (several minutes on 2 cores)
    python benchmarks/bench_grid.py --only mixed    # one part
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from fvgpt_cache.store import open_cache
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.engine import train_group, train_head
from fvgpt_cache.engine.monitor import Monitor
from fvgpt_cache.evaluation import curve_data
from fvgpt_cache.training import TrainConfig, config_with, prepare


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def group_seconds(data, cfgs, backward: str = "manual") -> float:
    """The grid's path: `train_group` (one part per FDC width)."""
    return timed(lambda: train_group(data, cfgs, torch.device("cpu"), backward=backward))


def autograd_ratio(data, cfgs, repeats: int = 2) -> dict:
    """Manual and autograd gradients on the same group, alternating; the ratio of the medians."""
    manual, autograd = [], []
    for _ in range(repeats):
        manual.append(group_seconds(data, cfgs))
        autograd.append(group_seconds(data, cfgs, "autograd"))
    m, a = sorted(manual)[len(manual) // 2], sorted(autograd)[len(autograd) // 2]
    return {"manual_seconds": round(m, 2), "autograd_seconds": round(a, 2), "autograd_vs_manual": round(a / m, 2)}


def sequential_seconds(data, cfgs, sample: int) -> float:
    chosen = cfgs[:: max(1, len(cfgs) // sample)][:sample] if sample else cfgs
    return timed(lambda: [train_head(data, c) for c in chosen]) * len(cfgs) / len(chosen)


def mixed_configs(n: int = 128) -> list[TrainConfig]:
    knobs = {
        "frg_indicators": [("dH", "cos", "area"), ("cos", "area")],
        "lr": [0.0035, 0.001],
        "use_frg": [True, False],
        "frg_layers": [1, 2],
        "fdc_hidden": [32, 64],
        "data_fraction": [1.0, 0.5],
        "epochs": [10, 5],
    }
    combos = list(itertools.product(*knobs.values()))
    return [TrainConfig(seed=i % 3 + 1, **dict(zip(knobs, c))) for i, c in enumerate(combos[:n])]


def dense_configs() -> list[TrainConfig]:
    """64 default configurations: 16 λ_d × 4 seeds."""
    lambdas = (0.1, 0.5, 1, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 100)
    return [TrainConfig(lambda_d=v, seed=s) for v in lambdas for s in (1, 2, 3, 4)]


def step_flops(k: int, b: int, c: int, d: int, h: int) -> float:
    """FLOPs of the matrix products of one step (forward and hand-written backward), all K configurations."""
    adapter = lambda rows: 2 * rows * d * h * 5  # noqa: E731  2 layers forward + dW1, dW2, dh backward
    cos = 2 * b * c * d * 3  # z and its two gradients
    return k * (adapter(c) + adapter(b) + cos)


def bare_bmm_gflops(k: int, b: int, c: int, d: int, h: int, steps: int) -> float:
    """GFLOP/s of the same 13 matrix products per step as a bare stacked bmm loop (no other work)."""
    w1, w2 = torch.randn(k, h, d), torch.randn(k, d, h)
    inputs = [(torch.randn(k, rows, d), torch.randn(k, rows, d)) for rows in (c, b)]  # text / image: x, ∂L/∂out
    f, g, dcos = torch.randn(k, b, d), torch.randn(k, c, d), torch.randn(k, b, c)

    def step():
        for x, dout in inputs:
            hid = torch.bmm(x, w1.transpose(1, 2))
            torch.bmm(hid, w2.transpose(1, 2))
            torch.bmm(dout.transpose(1, 2), hid)  # ∂W2
            dh = torch.bmm(dout, w2)
            torch.bmm(dh.transpose(1, 2), x)  # ∂W1
        torch.bmm(f, g.transpose(1, 2))
        torch.bmm(dcos, g)
        torch.bmm(dcos.transpose(1, 2), f)

    step()
    seconds = timed(lambda: [step() for _ in range(steps)])
    return steps * step_flops(k, b, c, d, h) / seconds / 1e9


class MonitorClock:
    """Seconds spent inside the monitor (observe + finish) while it is installed: the curves' own share of a
    run, measured inside the same run (robust to a machine that other work slows down)."""

    def __init__(self):
        self.seconds = 0.0
        self.saved = {name: getattr(Monitor, name) for name in ("observe", "finish")}

    def __enter__(self):
        for name, fn in self.saved.items():
            def timed(*args, _fn=fn, **kwargs):
                start = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
            setattr(Monitor, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(Monitor, name, fn)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("mixed", "dense", "scaling", "curves", "backward"))
    ap.add_argument("--sequential-sample", type=int, default=16, help="time this many one-by-one runs, extrapolate")
    args = ap.parse_args(argv)
    result: dict = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only == "backward":  # only the autograd-vs-manual ratios: single run, 128 mixed, 64 dense
            small = prepare(open_cache(write_feature_cache(Path(tmp) / "small.h5", num_classes=20, shots=8, views=4,
                                                           dim=128)), TrainConfig())
            dense = prepare(open_cache(write_feature_cache(Path(tmp) / "dense.h5", num_classes=100, shots=16,
                                                           views=11, dim=512)), TrainConfig())
            group_seconds(small, mixed_configs()[:4])  # warm-up
            result["backward"] = {
                "single_run": autograd_ratio(dense, [TrainConfig()], repeats=3),
                "mixed_128": autograd_ratio(small, mixed_configs()),
                "dense_64": autograd_ratio(dense, dense_configs(), repeats=1)}
            print(json.dumps(result, indent=1))
            return result
        if args.only in (None, "mixed"):
            data = prepare(open_cache(write_feature_cache(Path(tmp) / "small.h5", num_classes=20, shots=8, views=4,
                                                          dim=128)), TrainConfig())
            cfgs = mixed_configs()
            group_seconds(data, cfgs[:4])  # warm-up
            batched = group_seconds(data, cfgs)
            one_by_one = sequential_seconds(data, cfgs, args.sequential_sample)
            result["mixed"] = {"configurations": len(cfgs), "group_seconds": round(batched, 2),
                               "one_by_one_seconds": round(one_by_one, 2), "ratio": round(one_by_one / batched, 1),
                               "runs_per_second": round(len(cfgs) / batched, 1),
                               "backward": autograd_ratio(data, cfgs)}
            print(json.dumps(result["mixed"]), flush=True)
        if args.only in (None, "dense"):
            data = prepare(open_cache(write_feature_cache(Path(tmp) / "dense.h5", num_classes=100, shots=16, views=11,
                                                          dim=512)), TrainConfig())
            cfgs = dense_configs()
            batched = group_seconds(data, cfgs)
            one_by_one = sequential_seconds(data, cfgs, args.sequential_sample // 4)
            steps = 10 * (len(data.y) // 4)
            flops = steps * step_flops(len(cfgs), 4, 50, 512, 64)
            bare = bare_bmm_gflops(len(cfgs), 4, 50, 512, 64, steps=50)
            result["dense"] = {"configurations": len(cfgs), "group_seconds": round(batched, 1),
                               "one_by_one_seconds": round(one_by_one, 1), "ratio": round(one_by_one / batched, 2),
                               "runs_per_second": round(len(cfgs) / batched, 3),
                               "group_gflops": round(flops / batched / 1e9, 1), "bare_bmm_gflops": round(bare, 1),
                               "efficiency": round(flops / batched / 1e9 / bare, 2),
                               "backward": autograd_ratio(data, cfgs, repeats=1)}
            print(json.dumps(result["dense"]), flush=True)
        if args.only in (None, "curves"):
            cache = open_cache(write_feature_cache(Path(tmp) / "curves.h5", num_classes=100, shots=16, views=11,
                                                   dim=512, test_per_class=25))
            data, curve = prepare(cache, TrainConfig()), curve_data(cache, "synthetic_bb", "base")
            cfgs = [TrainConfig(lambda_d=v, seed=s) for v in (1, 5, 10, 20) for s in (1, 2, 3, 4)]
            with MonitorClock() as clock:
                seconds = timed(lambda: train_group(data, cfgs, torch.device("cpu"), curve=curve))
            result["curves"] = {"configurations": len(cfgs), "group_seconds": round(seconds, 1),
                                "monitor_seconds": round(clock.seconds, 2),
                                "curves_share_of_group": round(clock.seconds / seconds, 3)}
            print(json.dumps(result["curves"]), flush=True)
        if args.only in (None, "scaling"):
            rows = []
            for classes, k in [(100, 1), (100, 8), (100, 64), (100, 256), (1000, 8), (2000, 8)]:
                cache = write_feature_cache(Path(tmp) / f"s{classes}.h5", num_classes=classes, shots=4, views=2,
                                            dim=512, test_per_class=1)
                data = prepare(open_cache(cache), TrainConfig())
                cfgs = [config_with(TrainConfig(seed=i + 1), epochs=2) for i in range(k)]
                seconds = group_seconds(data, cfgs)
                steps = 2 * (len(data.y) // 4)
                rows.append({"base_classes": classes // 2, "configurations": k,
                             "ms_per_step": round(1000 * seconds / steps, 2),
                             "ms_per_step_per_configuration": round(1000 * seconds / steps / k, 3)})
                print(json.dumps(rows[-1]), flush=True)
            result["scaling"] = rows
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
