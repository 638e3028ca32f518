"""`run` and `plan`: a whole study from a plan file, on one process, under torchrun, or as SLURM shards."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .common import DIST_TIMEOUT_HELP, app, console, err, fail, narrow_table, resumable

SOME_FAILED = 1


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_overview(plan, view: dict, shard, rates: dict | None, guess: dict | None) -> None:
    from fvgpt_cache import study

    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    console.print(f"plan [bold]{escape(str(plan.path))}[/] → {escape(str(plan.out))}{where}: "
                  f"{len(plan.datasets)} dataset(s) × {len(plan.seeds)} seed(s), backbones {', '.join(plan.backbones)}, "
                  f"train {', '.join(plan.train)}")
    table = narrow_table()
    cols = ["stage", "jobs", "done", "failed before", "to run", "other shards"] + (["estimate"] if guess else [])
    for c in cols:
        table.add_column(c, justify="left" if c == "stage" else "right", no_wrap=True)
    for k in study.STAGES:
        r = view["stages"][k]
        row = [k, str(r["jobs"]), str(r["done"]), str(r["failed"]), str(r["run"]), str(r["other shards"])]
        if guess:
            row.append(_duration(guess["seconds"][k]) if r["run"] and k != "report" else "")
        table.add_row(*row)
    console.print(table)
    if guess:
        console.print(f"estimated time on one process: {_duration(guess['total'])} (a lower bound: image decoding "
                      "and evaluation are only counted when the rates come from finished jobs)")
        for key, how in rates["how"].items():
            rate = rates["rates"].get(key)
            shown = {"encode": lambda v: f"{v:.1f} img/s", "head": lambda v: f"{v * 1e3:.3f} ms per image·epoch",
                     "backbone": lambda v: f"{v * 1e3:.2f} ms per image·epoch"}[key]
            console.print(f"  {key}: {shown(rate) if rate is not None else 'unknown'} ({escape(how)})")
        for line in guess["unknown"]:
            console.print(f"[yellow]cannot size[/] {escape(line)}")


@app.command()
def run(
    plan_file: Path = typer.Argument(..., metavar="PLAN.toml", help="The study's plan (see `fvgpt-cache plan --paper`)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the jobs (per stage: done, to run) and an estimated "
                                                         "time from measured throughputs; run nothing."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: run the I-th of N deterministic shares (SLURM "
                                                              "arrays: $SLURM_ARRAY_TASK_ID/N); the report is written "
                                                              "by the last shard to finish."),
    estimate: bool = typer.Option(True, "--estimate/--no-estimate", help="With --dry-run: measure throughputs for "
                                                                         "the estimate (loads the model)."),
    image_passes: str = typer.Option("shared", help="torchrun: shared (each extraction/import on every rank "
                                                      "together) or per-rank (a rank takes whole caches)."),
    dist_timeout: float = typer.Option(300.0, help=DIST_TIMEOUT_HELP),
):
    """Run a whole study: extract → backbones → FVG-PT grids → report; a rerun does only what is left.

    Under torchrun, image passes use every rank and head jobs are spread over the ranks."""
    from fvgpt_cache import current_job, study

    resumable()
    if image_passes not in study.IMAGE_PASSES:
        fail(f"--image-passes {image_passes!r}: choose {' or '.join(study.IMAGE_PASSES)}")
    plan = study.load_plan(plan_file)
    part = study.parse_shard(shard) if shard else None
    if dry_run:
        view = study.overview(plan, part)
        study.check_settings(plan, view["jobs"])
        rates = guess = None
        if estimate:
            rates = study.measure_rates(plan, view["jobs"], plan.device)
            guess = study.estimate(plan, view["todo"], rates)
        print_overview(plan, view, part, rates, guess)
        missing = study.missing_inputs(plan, view["todo"])
        for line in missing[:20]:
            console.print(f"[yellow]missing[/] {escape(line)}", highlight=False)
        if len(missing) > 20:
            console.print(f"… and {len(missing) - 20} more inputs are missing")
        return
    djob = current_job(dist_timeout)
    lead = djob.rank == 0
    view = study.overview(plan, part)
    todo = sum(r["run"] for r in view["stages"].values())
    if todo == 0:
        if lead:
            console.print(f"nothing to do: all {len(view['jobs'])} jobs of {escape(str(plan_file))} are done "
                          f"(report: {escape(str(plan.out / 'report' / 'report.md'))})")
        return
    if lead:
        print_overview(plan, view, part, None, None)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("jobs"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=not lead) as bar:
        task = bar.add_task("study", total=todo)
        started_at = time.time()

        def started(j):
            bar.update(task, description=j.id)

        def ended(o):  # every process's finished jobs count (their status files), not only this one's
            bar.update(task, completed=study.finished_since(plan, view["todo"], started_at))
            if o.state == "failed" and lead:
                bar.console.print(f"[bold red]failed[/] {escape(o.job)}: {escape(o.message)}", highlight=False)

        result = study.run_study(plan, shard=part, djob=djob, image_passes=image_passes, on_start=started,
                                 on_outcome=ended)
    if not lead:  # rank 0 says how it went, and its exit status is the job's (an early non-zero exit here
        return    # would make torchrun stop rank 0 before it printed the summary)
    print_summary(plan, result)
    if result.failed:
        raise typer.Exit(code=SOME_FAILED)


def print_summary(plan, result) -> None:
    from fvgpt_cache import study

    states = ("done", "failed", "skipped", "waiting", "running elsewhere")
    counts = {k: dict.fromkeys(states, 0) for k in study.STAGES}
    for o in result.outcomes:
        counts[o.kind][o.state] += 1
    table = narrow_table("this run")
    for c in ("stage", *states):
        table.add_column(c, justify="left" if c == "stage" else "right", no_wrap=True)
    for k in study.STAGES:
        table.add_row(k, *(str(counts[k][s]) for s in states))
    console.print(table)
    by_id = {j.id: j for j in study.build_jobs(plan)}
    for o in result.outcomes:
        if o.state in ("failed", "skipped", "running elsewhere"):
            log = f" (log {study.log_path(plan, by_id[o.job])})" if o.state == "failed" else ""
            console.print(f"[{'red' if o.state == 'failed' else 'yellow'}]{o.state}[/] {escape(o.job)}: "
                          f"{escape(o.message)}{escape(log)}", highlight=False)
    waiting = [o for o in result.outcomes if o.state == "waiting"]
    if waiting:
        console.print(f"{len(waiting)} job(s) wait for other shards or ranks (the report is written by the last to "
                      "finish, or by rerunning the plan without --shard)")
    report = next((o for o in result.outcomes if o.job == "report" and o.state == "done"), None)
    if report and result.report:
        _print_report(plan)
    if result.failed:
        console.print(f"[bold red]{len(result.failed)} job(s) failed[/]; fix the cause and rerun the same command: "
                      "finished jobs are kept")


def _print_report(plan) -> None:
    from fvgpt_cache import report as make_report
    from fvgpt_cache import study

    from .grid import print_report

    job = next(j for j in study.build_jobs(plan) if j.id == "report")
    rep = make_report(list(study.results_digest(job.spec["grids"])), compare="paper" if plan.compare == "paper" else None)
    print_report(rep)
    console.print(f"report: {escape(str(plan.out / 'report'))}/report.md, report.csv, report.json "
                  f"({len(rep.records)} runs)")


@app.command("plan")
def plan_command(
    paper: bool = typer.Option(False, "--paper", help="Print the plan that reproduces the paper's Tables 1 and 2."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to a file instead of printing."),
):
    """Write a study plan for `fvgpt-cache run` (edit the paths, then run it)."""
    from fvgpt_cache import study

    if not paper:
        fail("say which plan: --paper (the paper's Tables 1 and 2: the eleven datasets, 3 seeds, 4 backbones)")
    text = study.paper_plan()
    if output:
        output.write_text(text)
        err.print(f"wrote {escape(str(output))}; edit its paths, then: fvgpt-cache run {escape(str(output))} --dry-run")
    else:
        print(text, end="")
