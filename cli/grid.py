"""`grid` and `report`: many runs at once, and their tables."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.markup import escape

from fvgpt_cache import ABLATIONS

from .choices import preset_of_option
from .common import app, console, err, fail, narrow_table, resumable


@app.command()
def grid(
    caches: list[Path] = typer.Argument(..., help="One or more caches of one model (shell globs work: cache/*/*.h5)."),
    param: list[str] = typer.Option([], "--param", help="NAME=V1,V2,… ; the grid is the Cartesian product. "
                                                       "`fvgpt-cache params` lists the parameters."),
    preset: Optional[str] = typer.Option(None, help="An ablation of the paper: " + "|".join(ABLATIONS)
                                         + "|paper (all of its tables at once)."),
    preset_of: str = preset_of_option("Training preset per cache: auto (from the backbone's method and the dataset)"),
    grid_file: Optional[Path] = typer.Option(None, "--grid-file", help="TOML with [params], optional [base], seeds, preset."),
    seeds: str = typer.Option("1", help="Seeds: a list, a range or both, e.g. 1,2,3 or 1-50 or 1-5,8."),
    backbone: Optional[str] = typer.Option(None, help="Text-feature group to build on (clip = zero-shot CLIP), as in "
                                                      "train; default: the only tuned one. Same as --set backbone=NAME."),
    settings: list[str] = typer.Option([], "--set", help="Fixed training parameter for every run, KEY=VALUE "
                                                         "(`fvgpt-cache params` lists them)."),
    eval_cache: list[Path] = typer.Option([], "--eval-cache", help="Caches to evaluate the PC branch on (cross-dataset)."),
    out: Path = typer.Option(Path("cache/grids/grid"), help="Run folder; results stream to OUT/results.jsonl."),
    resume: bool = typer.Option(True, help="Skip runs already in OUT/results.jsonl whose caches still hold what they "
                                           "read (others are set aside in OUT/stale/); --no-resume sets all aside."),
    batched: bool = typer.Option(True, help="Train runs that share a group (cache, classes, backbone, batch size, "
                                            "device, FDC depth) together."),
    save_heads: bool = typer.Option(False, help="Also write each run's head.pt under OUT/runs/."),
    device: Optional[str] = typer.Option(None, help="auto|cpu|cuda [TrainConfig's]."),
    tensorboard: Optional[Path] = typer.Option(None, help="Also write each run's per-epoch scalars here (TensorBoard)."),
):
    """Train a grid of FVG-PT configurations over caches and seeds, batched across configurations.

    Each run is written to OUT/results.jsonl as soon as it is done; SIGTERM (e.g. SLURM pre-emption)
    finishes the current epoch, keeps every finished run and exits with status 143: rerun the same
    command to resume."""
    from fvgpt_cache import (
        TrainingStopped, check_tensorboard, merge_params, parse_params, parse_seeds, parse_value, plan_grid,
        read_grid_file, write_tensorboard,
    )
    from fvgpt_cache import grid as run_grid

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
    if "device" in base:
        fail("--set device: use --device for device")
    plan = plan_grid(caches, params, seeds=seed_list, base={**({"device": device} if device else {}), **base},
                     preset=preset, preset_of=preset_of, eval_caches=eval_cache)
    for warning in plan.warnings:
        err.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
    console.print(f"{len(plan)} runs ({len(caches)} cache(s) × {len(seed_list)} seed(s) × configurations) → "
                  f"{escape(str(out))}/results.jsonl")
    console.print(f"training preset(s): {', '.join(plan.presets)}")
    for w in plan.preset_warnings:
        err.print(f"[bold yellow]warning:[/] {escape(w)}")
    if tensorboard:
        check_tensorboard()
    stop = stop_on_sigterm()
    written = []

    def on_record(record) -> None:
        written.append(record)
        if tensorboard:
            write_tensorboard(tensorboard, record)

    with Progress(TextColumn("grid"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"), TimeRemainingColumn(),
                  console=err) as bar:
        task = bar.add_task("grid", total=len(plan))
        try:
            records = run_grid(plan, out=out, resume=resume, batched=batched, save_heads=save_heads,
                               log=lambda message: bar.console.print(message),
                               progress=lambda done, total: bar.update(task, completed=done),
                               should_stop=stop, on_record=on_record)
        except TrainingStopped:
            bar.stop()
            err.print(f"stopped by SIGTERM: {len(written)} run(s) finished and written to {escape(str(out))}/"
                      "results.jsonl; rerun the same command to resume")
            raise typer.Exit(code=143) from None
    for w in sorted({w for r in written for w in r.warnings}):
        err.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False)
    console.print(f"{len(written)} new run(s); {len(records) - len(written)} were already done. "
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
    from fvgpt_cache import CI_METHODS, REPORT_FORMATS, describe_averaged
    from fvgpt_cache import report as make_report

    if fmt not in ("console", *REPORT_FORMATS):
        fail(f"--format {fmt!r}: choose console, markdown, csv, json, latex or curves (per-epoch CSV)")
    if compare not in (None, "paper"):
        fail(f"--compare {compare!r}: only 'paper' is known")
    if ci not in CI_METHODS:
        fail(f"--ci {ci!r}: choose t or bootstrap")
    rep = make_report(results, ci=ci, compare=compare, vs=vs)
    if curves:
        path = rep.plot_curves(curves, curves_out)
        console.print(f"wrote {escape(str(path))}")
    if plot:
        path, averaged = rep.plot_sweep(plot, plot_out)
        if averaged:
            err.print(f"[bold yellow]warning:[/] each point of the {plot} plot averages runs that differ in "
                      f"{escape(describe_averaged(averaged))} (written under the plot too); plot a report of "
                      "fewer runs to separate them", highlight=False)
        console.print(f"wrote {escape(str(path))}")
    if fmt == "console":
        print_report(rep)
        console.print(f"{len(rep.records)} run(s) in {len(rep.summary)} group(s) of comparable runs; Base/New are seed "
                      f"means ± sample std, HM is the HM of the means; 95% CI: {rep.ci_name} interval of the seed mean "
                      "(for HM: of the per-seed HMs' mean)")
        for w in rep.warnings:
            err.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False)
        return
    text = rep.render(fmt)
    if output:
        output.write_text(text)
        console.print(f"wrote {escape(str(output))}" + (" (LaTeX: needs \\usepackage{booktabs})" if fmt == "latex" else ""))
    else:
        print(text)


def print_report(rep) -> None:
    """The report's tables (a `fvgpt_cache.Report`) in a layout that fits an 80-column terminal (no wrapped
    rows, no cut numbers)."""
    for title, header, body, kinds in rep.console_tables():
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
