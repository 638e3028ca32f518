"""`grid` and `report`: many runs at once, and their tables."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.markup import escape

from ..ablations import ABLATIONS
from .common import app, console, err, fail, narrow_table, resumable


@app.command()
def grid(
    caches: list[Path] = typer.Argument(..., help="One or more caches of one model (shell globs work: cache/*/*.h5)."),
    param: list[str] = typer.Option([], "--param", help="NAME=V1,V2,… ; the grid is the Cartesian product."),
    preset: Optional[str] = typer.Option(None, help="An ablation of the paper: " + "|".join(ABLATIONS)
                                         + "|paper (all of its tables at once)."),
    preset_of: str = typer.Option("auto", help="Training preset per cache: auto (from the backbone's method and the "
                                               "dataset), none, or coop|kgcoop|promptsrc|mmrl|clip."),
    grid_file: Optional[Path] = typer.Option(None, "--grid-file", help="TOML with [params], optional [base], seeds, preset."),
    seeds: str = typer.Option("1", help="Seeds: a list, a range or both, e.g. 1,2,3 or 1-50 or 1-5,8."),
    backbone: Optional[str] = typer.Option(None, help="Text-feature group to build on (clip = zero-shot CLIP), as in "
                                                      "train; default: the only tuned one. Same as --set backbone=NAME."),
    settings: list[str] = typer.Option([], "--set", help="Fixed TrainConfig field for every run, KEY=VALUE."),
    eval_cache: list[Path] = typer.Option([], "--eval-cache", help="Caches to evaluate the PC branch on (cross-dataset)."),
    out: Path = typer.Option(Path("cache/grids/grid"), help="Run folder; results stream to OUT/results.jsonl."),
    resume: bool = typer.Option(True, help="Skip runs already in OUT/results.jsonl whose caches still hold what they "
                                           "read (others are set aside in OUT/stale/); --no-resume sets all aside."),
    batched: bool = typer.Option(True, help="Train runs that share a group (cache, classes, backbone, batch size, "
                                            "device, FDC depth) together."),
    save_heads: bool = typer.Option(False, help="Also write each run's head.pt under OUT/runs/."),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
    tensorboard: Optional[Path] = typer.Option(None, help="Also write each run's per-epoch scalars here (TensorBoard)."),
):
    """Train a grid of FVG-PT configurations over caches and seeds, batched across configurations.

    Each run is written to OUT/results.jsonl as soon as it is done; SIGTERM (e.g. SLURM pre-emption)
    finishes the current epoch, keeps every finished run and exits with status 143: rerun the same
    command to resume."""
    from fvgpt_cache.engine import TrainingStopped
    from fvgpt_cache.grids import (
        check_caches, check_grid, expand, merge_params, parse_params, parse_seeds, read_grid_file, run_grid,
    )
    from fvgpt_cache.training import parse_value

    resumable()
    params, base = {}, {}
    seed_list = parse_seeds(seeds)
    if grid_file:
        params, extra = read_grid_file(grid_file)
        base = extra.get("base", {})
        preset = preset or extra.get("preset")
        if "seeds" in extra:
            seed_list = parse_seeds(",".join(map(str, extra["seeds"])))
    params = merge_params(params, parse_params(param), (str(grid_file), "--param"))
    for item in settings:
        key, eq, value = item.partition("=")
        if not eq:
            fail(f"--set {item!r}: write KEY=VALUE")
        if key.strip() in base:
            fail(f"--set {key.strip()} is given twice (or also in the grid file's [base]); set it once")
        base[key.strip()] = parse_value(key.strip(), value)
    if backbone is not None:
        if "backbone" in base and base["backbone"] != backbone:
            fail(f"--backbone {backbone} and --set backbone={base['backbone']} disagree; give one")
        base["backbone"] = parse_value("backbone", backbone)
    for warning in check_grid(params, base, preset):
        err.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
    check_caches(caches, eval_cache)
    runs = expand(caches, seed_list, params, {"device": device, **base}, preset, preset_of, list(eval_cache))
    console.print(f"{len(runs)} runs ({len(caches)} cache(s) × {len(seed_list)} seed(s) × configurations) → "
                  f"{escape(str(out))}/results.jsonl")
    used = sorted({(r.preset or {}).get("preset", {}).get("name", "none") if (r.preset or {}).get("preset") else "none"
                   for r in runs})
    console.print(f"training preset(s): {', '.join(used)}")
    for w in sorted({w for r in runs for w in (r.preset or {}).get("warnings", [])}):
        err.print(f"[bold yellow]warning:[/] {escape(w)}")
    if tensorboard:
        from fvgpt_cache.tensorboard import check_available

        check_available()
    stop = stop_on_sigterm()
    written: list[dict] = []

    def on_record(record: dict) -> None:
        written.append(record)
        if tensorboard:
            from fvgpt_cache.tensorboard import write_run

            write_run(tensorboard, record)

    with Progress(TextColumn("grid"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"), TimeRemainingColumn(),
                  console=err) as bar:
        task = bar.add_task("grid", total=len(runs))
        try:
            records = run_grid(runs, out, resume=resume, batched=batched, save_heads=save_heads,
                               eval_caches=list(eval_cache), log=lambda message: bar.console.print(message),
                               progress=lambda done, total: bar.update(task, completed=done),
                               should_stop=stop, on_record=on_record)
        except TrainingStopped:
            bar.stop()
            err.print(f"stopped by SIGTERM: {len(written)} run(s) finished and written to {escape(str(out))}/"
                      "results.jsonl; rerun the same command to resume")
            raise typer.Exit(code=143) from None
    for w in sorted({w for r in records for w in r.warnings}):
        err.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False)
    console.print(f"{len(records)} new run(s); {len(runs) - len(records)} were already done. "
                  f"Summarise with: fvgpt-cache report {out}")


def stop_on_sigterm():
    """A `should_stop` that turns true once the process receives SIGTERM (the default handler would end
    it mid-epoch); the grid then stops after the current epoch, every finished run written."""
    import signal

    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    return lambda: bool(received)


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help="results.jsonl / results.json files or folders holding them."),
    fmt: str = typer.Option("console", "--format", help="console|markdown|csv|json|latex"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to a file instead of the console."),
    compare: Optional[str] = typer.Option(None, help="'paper' puts the paper's Tables 1/2 beside your runs."),
    plot: Optional[str] = typer.Option(None, help="Plot a one-parameter sweep of this TrainConfig field (needs matplotlib)."),
    plot_out: Path = typer.Option(Path("sweep.png"), help="Plot file, .png or .svg."),
    curves: Optional[str] = typer.Option(None, help="Plot Base/New/HM against epoch, one line per value of this "
                                                    "TrainConfig field, a band for the seed spread (needs matplotlib)."),
    curves_out: Path = typer.Option(Path("curves.png"), help="Curves plot file, .png or .svg."),
    ci: str = typer.Option("t", help="Confidence interval of seed means: t (Student) or bootstrap (percentile)."),
    vs: Optional[str] = typer.Option(None, help="Compare every configuration with this one seed by seed (paired "
                                                "t-test): backbone, default or KEY=VALUE[,KEY=VALUE], e.g. lambda_d=10."),
):
    """Aggregate runs over seeds and datasets into the paper's table layouts."""
    from fvgpt_cache import reports

    formats = {"markdown": reports.to_markdown, "csv": reports.to_csv, "json": reports.to_json, "latex": reports.to_latex,
               "curves": reports.curves_csv}
    if fmt not in ("console", *formats):
        fail(f"--format {fmt!r}: choose console, markdown, csv, json, latex or curves (per-epoch CSV)")
    if compare not in (None, "paper"):
        fail(f"--compare {compare!r}: only 'paper' is known")
    if ci not in reports.CI_METHODS:
        fail(f"--ci {ci!r}: choose t or bootstrap")
    records = reports.load_records(results)
    summary = reports.aggregate(records, ci)
    ablations = reports.ablation_tables(records) + reports.mask_source_tables(records)
    if vs:
        ablations = [*reports.paired_tables(summary, vs), *ablations]
    if curves:
        path = reports.plot_curves(records, curves, curves_out)
        console.print(f"wrote {escape(str(path))}")
    if plot:
        averaged = reports.averaged_over(records, plot)
        path = reports.plot_sweep(reports.sweep(records, plot), plot, plot_out, averaged)
        if averaged:
            err.print(f"[bold yellow]warning:[/] each point of the {plot} plot averages runs that differ in "
                      f"{escape(reports.describe_averaged(averaged))} (written under the plot too); plot a report of "
                      "fewer runs to separate them", highlight=False)
        console.print(f"wrote {escape(str(path))}")
    paper = compare == "paper"
    if fmt == "console":
        print_report(summary, paper, ablations)
        console.print(f"{len(records)} run(s) in {len(summary)} group(s) of comparable runs; Base/New are seed means ± "
                      f"sample std, HM is the HM of the means; 95% CI: {reports.CI_NAMES[ci]} interval of the seed mean "
                      "(for HM: of the per-seed HMs' mean)")
        for w in reports.interval_warnings(summary):
            err.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False)
        return
    if fmt == "curves":
        text = reports.curves_csv(records)
    else:
        text = formats[fmt](summary, paper, ablations) if fmt in ("markdown", "latex") else formats[fmt](summary)
    if output:
        output.write_text(text)
        console.print(f"wrote {escape(str(output))}" + (" (LaTeX: needs \\usepackage{booktabs})" if fmt == "latex" else ""))
    else:
        print(text)


def print_report(summary: dict, compare_paper: bool = False, extra=()) -> None:
    """The report's tables in a layout that fits an 80-column terminal (no wrapped rows, no cut numbers)."""
    from fvgpt_cache.reports import console_tables

    for title, header, body, kinds in console_tables(summary, compare_paper, extra):
        console.print(f"\n[bold]{escape(title)}[/]")  # a line of its own: as wide as the terminal, not the table
        table = narrow_table()
        for i, name in enumerate(header):
            # numbers never wrap; only an overlong dataset name folds onto a second line
            table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i > 0,
                             overflow="fold" if i == 0 else "ellipsis")
        for row, kind in zip(body, kinds):
            style = "bold" if kind == "dataset" else ("dim" if kind in ("paper", "ci") else None)
            table.add_row(*map(escape, row), style=style)
        console.print(table)
