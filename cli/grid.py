"""`grid` and `report`: many runs at once, and their tables."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .common import app, console, err, fail


@app.command()
def grid(
    caches: list[Path] = typer.Argument(..., help="One or more caches (shell globs work: cache/*/*.h5)."),
    param: list[str] = typer.Option([], "--param", help="NAME=V1,V2,… ; the grid is the Cartesian product."),
    preset: Optional[str] = typer.Option(None, help="components|losses|indicators|depth|width|lambda|data-fraction|"
                                                    "fdc-branches|epochs|foreground-control"),
    preset_of: str = typer.Option("auto", help="Training preset per cache: auto (from the backbone's method and the "
                                               "dataset), none, or coop|kgcoop|promptsrc|mmrl|clip."),
    grid_file: Optional[Path] = typer.Option(None, "--grid-file", help="TOML with [params], optional [base], seeds, preset."),
    seeds: str = typer.Option("1", help="Comma-separated seeds, e.g. 1,2,3."),
    settings: list[str] = typer.Option([], "--set", help="Fixed TrainConfig field for every run, KEY=VALUE."),
    eval_cache: list[Path] = typer.Option([], "--eval-cache", help="Caches to evaluate the PC branch on (cross-dataset)."),
    out: Path = typer.Option(Path("cache/grids/grid"), help="Run folder; results stream to OUT/results.jsonl."),
    resume: bool = typer.Option(True, help="Skip runs already in OUT/results.jsonl."),
    batched: bool = typer.Option(True, help="Train configurations that share shapes together (vmap)."),
    save_heads: bool = typer.Option(False, help="Also write each run's head.pt under OUT/runs/."),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
):
    """Train a grid of FVG-PT configurations over caches and seeds, batched across configurations."""
    from fvgpt_cache.grids import expand, parse_params, read_grid_file, run_grid
    from fvgpt_cache.training import parse_value

    try:
        params, base = {}, {}
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        if grid_file:
            params, extra = read_grid_file(grid_file)
            base = extra.get("base", {})
            preset = preset or extra.get("preset")
            seed_list = [int(x) for x in extra.get("seeds", seed_list)]
        params.update(parse_params(param))
        for item in settings:
            key, _, value = item.partition("=")
            base[key.strip()] = parse_value(key.strip(), value)
        runs = expand(caches, seed_list, params, {"device": device, **base}, preset, preset_of)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    console.print(f"{len(runs)} runs ({len(caches)} cache(s) × {len(seed_list)} seed(s) × configurations) → {out}/results.jsonl")
    used = sorted({(r.preset or {}).get("preset", {}).get("name", "none") if (r.preset or {}).get("preset") else "none"
                   for r in runs})
    console.print(f"training preset(s): {', '.join(used)}")
    for w in sorted({w for r in runs for w in (r.preset or {}).get("warnings", [])}):
        err.print(f"[bold yellow]warning:[/] {w}")
    try:
        with Progress(TextColumn("grid"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"), TimeRemainingColumn(),
                      console=err) as bar:
            task = bar.add_task("grid", total=len(runs))
            records = run_grid(runs, out, resume=resume, batched=batched, save_heads=save_heads,
                               eval_caches=list(eval_cache), log=lambda message: bar.console.print(message),
                               progress=lambda done, total: bar.update(task, completed=done))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    console.print(f"{len(records)} new run(s); {len(runs) - len(records)} were already done. "
                  f"Summarise with: fvgpt-cache report {out}")


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help="results.jsonl / results.json files or folders holding them."),
    fmt: str = typer.Option("console", "--format", help="console|markdown|csv|json|latex"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to a file instead of the console."),
    compare: Optional[str] = typer.Option(None, help="'paper' puts the paper's Tables 1/2 beside your runs."),
    plot: Optional[str] = typer.Option(None, help="Plot a one-parameter sweep of this TrainConfig field (needs matplotlib)."),
    plot_out: Path = typer.Option(Path("sweep.png"), help="Plot file, .png or .svg."),
):
    """Aggregate runs over seeds and datasets into the paper's table layouts."""
    from fvgpt_cache import reports

    formats = {"markdown": reports.to_markdown, "csv": reports.to_csv, "json": reports.to_json, "latex": reports.to_latex}
    if fmt not in ("console", *formats):
        fail(f"--format {fmt!r}: choose console, markdown, csv, json or latex")
    if compare not in (None, "paper"):
        fail(f"--compare {compare!r}: only 'paper' is known")
    try:
        records = reports.load_records(results)
        summary = reports.aggregate(records)
        ablations = reports.ablation_tables(records)
        if plot:
            path = reports.plot_sweep(reports.sweep(records, plot), plot, plot_out)
            console.print(f"wrote {path}")
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    paper = compare == "paper"
    if fmt == "console":
        for title, header, body in reports.tables(summary, paper, ablations):
            if header[0] == "Dataset":  # fold each method's B, N, HM into one column to fit a terminal
                backbone = header[4].rsplit(" ", 1)[0]
                header = ["Dataset", "CLIP B / N / HM", f"{backbone} B / N / HM", "+FVG-PT B / N / HM", "ΔHM"]
                body = [[r[0], *(" / ".join(c for c in r[i:i + 3] if c) for i in (1, 4, 7)), r[10]] for r in body]
            t = Table(title=title)
            for i, h in enumerate(header):
                t.add_column(h, justify="left" if i == 0 else "right")
            for row in body:
                t.add_row(*row)
            console.print(t)
        console.print(f"{len(records)} run(s); Base/New are seed means ± sample std, HM is the HM of the means")
        return
    text = formats[fmt](summary, paper, ablations) if fmt in ("markdown", "latex") else formats[fmt](summary)
    if output:
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        print(text)

