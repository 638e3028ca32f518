"""How often does FVG-PT's FDC branch collapse, and what makes it rare? (issue 10, item 9)

A confound world at the feature level (`synthetic.write_feature_cache(confound=1.05, signal=0.6)`):
20 classes, D = 64, 16 shots, 4 stored views; the full view of class c also carries 1.05 × the
text feature of class c + 1, the foreground view does not (zero-shot backbone ≈ 47 % base). Each
setting is trained with seeds 1–20 through `grid` (the same code path as `train`), and the runs'
collapse flags (`training.stability`) are counted.

    python benchmarks/collapse_study.py --out cache/collapse-study
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from fvgpt_cache.grids import expand, run_grid
from fvgpt_cache.synthetic import write_feature_cache

SETTINGS = {
    "release defaults (FDC init ×1e-3, warm-up 1, lr 0.0035, λ_d 10)": {},
    "FDC init ×0 (exact zero)": {"fdc_init_scale": 0.0},
    "FDC init ×1 (PyTorch default, zero bias)": {"fdc_init_scale": 1.0},
    "lr 0.001": {"lr": 0.001},
    "no warm-up epoch": {"warmup_epochs": 0},
    "λ_d 5": {"lambda_d": 5.0},
    "λ_d 0 (no distillation)": {"lambda_d": 0.0},
    "r_source=full (control)": {"r_source": "full"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("cache/collapse-study"))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--report", type=Path, default=Path("benchmarks/results/collapse-study.md"))
    args = ap.parse_args()
    cache = write_feature_cache(args.out / "confound.h5", num_classes=20, shots=16, views=4, dim=64, confound=1.05,
                                signal=0.6, seed=0)
    seeds = list(range(1, args.seeds + 1))
    lines = ["| setting | collapsed | FVG-PT base (mean ± std) | base of non-collapsed | FRG AUC (train) |", "|---|---|---|---|---|"]
    backbone = None
    for name, overrides in SETTINGS.items():
        runs = expand([cache], seeds, {}, overrides, preset_of="none")
        records = run_grid(runs, args.out / "grid", resume=True)
        if len(records) < len(runs):  # already done earlier: read them back
            from fvgpt_cache.reports import load_records
            ids = {r.run_id for r in runs}
            records = [r for r in load_records([args.out / "grid" / "results.jsonl"]) if r.run_id in ids]
        base = [r.metrics["fvgpt"]["base"] for r in records]
        ok = [r.metrics["fvgpt"]["base"] for r in records if not r.collapsed]
        flagged = sorted(r.seed for r in records if r.collapsed)
        aucs = [r.diagnostics["train"]["frg_auc"] for r in records if r.diagnostics["train"]["frg_auc"] is not None]
        backbone = records[0].metrics["backbone"]["base"]
        lines.append(f"| {name} | {len(flagged)}/{len(records)}{' (seeds ' + ', '.join(map(str, flagged)) + ')' if flagged else ''} "
                     f"| {statistics.mean(base):.1f} ± {statistics.stdev(base):.1f} "
                     f"| {statistics.mean(ok):.1f} | {statistics.mean(aucs):.2f} |" if ok and aucs else
                     f"| {name} | {len(flagged)}/{len(records)} | {statistics.mean(base):.1f} ± {statistics.stdev(base):.1f} | - | - |")
        print(lines[-1], flush=True)
    text = (f"Confound world (20 classes, D = 64, 16 shots, 4 views, confound 1.05, signal 0.6); backbone base "
            f"accuracy {backbone:.1f} %; seeds 1–{args.seeds}; `python benchmarks/collapse_study.py`.\n\n" + "\n".join(lines) + "\n")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
