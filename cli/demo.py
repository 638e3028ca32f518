"""`demo`: the offline world demo and the smoke test."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import _pct, app, console, fail, split_progress
from .extract import print_inspection
from .train import print_results


@app.command()
def demo(
    out: Path = typer.Option(Path("cache/demo"), help="Folder for the demo's data, caches and runs."),
    smoke: bool = typer.Option(False, help="Seconds-long smoke test with a random tiny CLIP instead of the world model."),
    test_per_class: int = typer.Option(30, help="Test images per class of the world demo."),
):
    """Offline: the synthetic world with its shipped tiny CLIP, zero-shot vs CoOp vs FVG-PT on a spurious and a clean split."""
    from fvgpt_cache.demo import run_smoke_demo, run_world_demo

    console.rule("[bold]fvgpt-cache demo")
    try:
        if smoke:
            import torch

            # the smoke model is tiny: one thread is as fast, and on a busy machine two threads
            # spinning against other processes made this 4-5x slower
            torch.set_num_threads(1)
            console.print("[bold yellow]Smoke test: a tiny CLIP with RANDOM weights (seeded) on synthetic shapes. "
                          "Its numbers only show that the pipeline runs.[/]")
            with split_progress() as update:
                report, results = run_smoke_demo(out, progress=update)
            print_inspection(report)
            print_results(results)
            return
        console.print("The synthetic world: 20 shape classes (10 base, 10 new) on textured backgrounds, and the tiny "
                      "CLIP pretrained on it that ships with fvgpt-cache. In the [bold]spurious[/] split most training "
                      "images of each base class sit on that class's own background; val, test and the [bold]clean[/] "
                      "split use random backgrounds. The numbers below are what the methods really do here.")
        with split_progress() as update:
            results = run_world_demo(out, test_per_class=test_per_class, progress=update)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    table = Table(title="world demo: CoOp → FVG-PT (test split, %)")
    for col in ("split", "method", "Base", "New", "HM"):
        table.add_column(col, justify="left" if col in ("split", "method") else "right")
    for variant, rec in results.items():
        for key, label in (("zeroshot", "zero-shot CLIP"), ("backbone", "CoOp"), ("fvgpt", "CoOp + FVG-PT")):
            m = rec["metrics"][key]
            table.add_row(variant, label, _pct(m["base"]), _pct(m["new"]), _pct(m["hm"]))
    console.print(table)
    for variant, rec in results.items():
        shift = rec["foreground_shift"]
        console.print(f"{variant}: D_fg CoOp {shift['backbone']:.3f} → FVG-PT {shift['fvgpt']:.3f}; run folder {rec['run_dir']}")


if __name__ == "__main__":
    app()

