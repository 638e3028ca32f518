"""`train`: one FVG-PT run from a cache, and the results table."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .choices import preset_of_option
from .common import _pct, app, console, err, fail

if TYPE_CHECKING:
    from fvgpt_cache import RunRecord


def _num(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def print_preset(record: RunRecord) -> None:
    preset = record.preset or {}
    p = preset.get("preset")
    if p:
        changed = f"; you overrode {', '.join(preset['overridden'])}" if preset.get("overridden") else ""
        console.print(f"preset [bold]{p['name']}[/] ({p['source']}){changed}")
    elif preset.get("preset_of") == "none":
        console.print("preset none: the plain defaults")
    for w in record.warnings:
        err.print(f"[bold yellow]warning:[/] {w}")


def print_diagnostics(record: RunRecord) -> None:
    """The gates' behaviour and the stability check, one short line each."""
    d = record.diagnostics or {}
    tr, te = d.get("train") or {}, d.get("test_base") or {}
    if tr.get("r_mean") is not None:
        flat = "" if d.get("frg_learned") in (True, None) else "  [bold yellow]FRG learned nothing (AUC ≈ 0.5)[/]"
        console.print(f"FRG train: r*=1 {_num(tr['r_star_share'])}, mean r {_num(tr['r_mean'])}, "
                      f"AUC {_num(tr['frg_auc'])}, area-cut {_num(tr['area_cut_share'])}; "
                      f"test AUC {_num(te.get('frg_auc'))}{flat}")
    if d.get("b_mean_base") is not None or d.get("b_mean_new") is not None:
        console.print(f"BRG mean b: base {_num(d.get('b_mean_base'))}, new {_num(d.get('b_mean_new'))}")
    st = record.stability or {}
    if st.get("collapsed"):
        console.print(f"[bold red]collapsed:[/] FDC train acc {st['acc_fdc_start']:.1f} → {st['acc_fdc_end']:.1f}%, "
                      f"CE {_num(st.get('ce_fdc_start'), '.3f')} → {_num(st.get('ce_fdc_end'), '.3f')} "
                      f"({st['reason']}); see the README on stability")


def print_results(record: RunRecord) -> None:
    m = record.metrics
    all_classes = record.config["classes"] == "all"
    title = f"{record.dataset} · backbone {record.backbone} · seed {record.seed}"
    table = Table(title=title)
    cols = ("method", "All") if all_classes else ("method", "Base", "New", "HM", "ΔHM vs backbone")
    for c in cols:
        # fits 80 columns: numbers never wrap or shrink; a long backbone name is cut instead
        table.add_column(c, justify="right" if c != "method" else "left", no_wrap=True,
                         **({"max_width": 28, "overflow": "ellipsis"} if c == "method" else {}))
    names = {"zeroshot": "zero-shot CLIP", "backbone": f"backbone ({record.backbone})", "fvgpt": "+ FVG-PT"}
    for key in ("zeroshot", "backbone", "fvgpt"):
        row = m[key]
        if all_classes:
            table.add_row(names[key], _pct(row["all"]))
        else:
            delta = row["hm"] - m["backbone"]["hm"] if row["hm"] is not None and m["backbone"]["hm"] is not None else None
            table.add_row(names[key], _pct(row["base"]), _pct(row["new"]), _pct(row["hm"]),
                          "" if key == "backbone" or delta is None else f"{delta:+.2f}")
    console.print(table)
    shift = record.foreground_shift or {}
    if shift.get("backbone") is not None:
        console.print(f"foreground shift D_fg (base test, lower = more foreground): backbone {shift['backbone']:.4f}, "
                      f"FVG-PT {shift['fvgpt']:.4f}")
    if record.cross_dataset:
        cross = Table(title="cross-dataset (PC branch, all target classes)")
        for c in ("target", "images", "zero-shot", "backbone", "FVG-PT"):
            cross.add_column(c, no_wrap=True, **({"max_width": 28, "overflow": "ellipsis"} if c == "target" else {}))
        for t in record.cross_dataset:
            cross.add_row(str(t["dataset"]), str(t["test_images"]), _pct(t["zeroshot"]), _pct(t["backbone"]), _pct(t["fvgpt"]))
        console.print(cross)
    print_diagnostics(record)
    sel = record.selection
    if sel and sel.rule == "val":
        val, last = sel.val or {}, sel.last_epoch_test
        score = f"validation {'HM' if 'hm' in val else 'accuracy'} {_num(val.get('hm', val.get('all')))}"
        console.print(f"reported epoch {sel.epoch + 1} of {len(record.history)}, chosen by {score}; at the last "
                      f"epoch the test numbers were " + ", ".join(f"{k} {_num(v)}" for k, v in last.items()))
    sec = record.seconds
    console.print(f"{record.head_parameters:,} head parameters · {record.train_images} training images × "
                  f"{record.views} views · trained in {sec['train']:.2f}s · run folder {record.run_dir}")


@app.command()
def train(
    cache: Path = typer.Argument(..., help="Cache written by `fvgpt-cache extract`."),
    backbone: Optional[str] = typer.Option(None, help="Text-feature group to build on (clip = zero-shot CLIP); default: the only tuned one."),
    classes: Optional[str] = typer.Option(None, help="base (base-to-new protocol) or all (cross-dataset source) "
                                                     "[TrainConfig's]."),
    preset_of: str = preset_of_option("Training preset: auto (from the backbone's method and the dataset)"),
    lambda_d: Optional[float] = typer.Option(None, "--lambda-d", help="Weight λ_d of the distillation loss [preset's]."),
    lambda_new: Optional[float] = typer.Option(None, "--lambda-new", help="Weight λ_pc of the PC loss (the release's "
                                                                          "--lambda_new; --set lambda_pc) [preset's]."),
    epochs: Optional[int] = typer.Option(None, help="[preset's]"),
    batch_size: Optional[int] = typer.Option(None, help="[preset's]"),
    lr: Optional[float] = typer.Option(None, help="[preset's]"),
    seed: Optional[int] = typer.Option(None, help="Seeds head initialisation, shuffling and view choice [TrainConfig's]."),
    frg: Optional[bool] = typer.Option(None, "--frg/--no-frg", help="Foreground Reliability Gate (use_frg)."),
    fdc: Optional[bool] = typer.Option(None, "--fdc/--no-fdc", help="Foreground Distillation Compensation, the base "
                                                                   "branch (use_fdc)."),
    pc: Optional[bool] = typer.Option(None, "--pc/--no-pc", help="Prior Calibration with the Backbone Reliability "
                                                                "Gate, the new branch (use_pc)."),
    loss_frg: Optional[bool] = typer.Option(None, "--loss-frg/--no-loss-frg"),
    loss_dist: Optional[bool] = typer.Option(None, "--loss-dist/--no-loss-dist"),
    loss_ce_fdc: Optional[bool] = typer.Option(None, "--loss-ce-fdc/--no-loss-ce-fdc"),
    loss_ce_pc: Optional[bool] = typer.Option(None, "--loss-ce-pc/--no-loss-ce-pc"),
    loss_kl_pc: Optional[bool] = typer.Option(None, "--loss-kl-pc/--no-loss-kl-pc"),
    settings: list[str] = typer.Option([], "--set", help="Any other training parameter as KEY=VALUE, e.g. --set "
                                                         "fdc_hidden=128; `fvgpt-cache params` lists them all."),
    eval_cache: list[Path] = typer.Option([], "--eval-cache", help="Other caches (same model) to evaluate the PC branch on."),
    device: Optional[str] = typer.Option(None, help="auto|cpu|cuda [TrainConfig's]."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: cache/runs/<cache>-<backbone>-seed<S>-<id>)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results JSON instead of the table."),
    select: Optional[str] = typer.Option(None, help="The epoch to report: last (the protocol) or val (best on the "
                                                     "few-shot validation split; the test split is never used to "
                                                     "choose) [TrainConfig's]."),
    tensorboard: Optional[Path] = typer.Option(None, help="Also write the run's per-epoch scalars here (TensorBoard)."),
):
    """Train the FVG-PT heads on base classes from a cache and evaluate Base/New/HM.

    Settings come from the TrainConfig defaults, then the backbone's preset (the release's config for
    CoOp, KgCoOp, PromptSRC, MMRL; EuroSAT and cross-dataset variants), then what you pass here.
    """
    from fvgpt_cache import check_tensorboard, parse_value, write_tensorboard
    from fvgpt_cache import train as train_run

    if tensorboard:
        check_tensorboard()
    explicit = {"classes": classes, "seed": seed, "device": device, "select": select, "backbone": backbone,
                "lambda_d": lambda_d, "lambda_pc": lambda_new, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                "use_frg": frg, "use_fdc": fdc, "use_pc": pc, "loss_frg": loss_frg, "loss_dist": loss_dist,
                "loss_ce_fdc": loss_ce_fdc, "loss_ce_pc": loss_ce_pc, "loss_kl_pc": loss_kl_pc}
    overrides = {k: v for k, v in explicit.items() if v is not None}  # unset: the preset's, else TrainConfig's
    for item in settings:
        if "=" not in item:
            fail(f"--set {item!r}: write KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(key.strip(), value)
    if as_json:
        record = train_run(cache, eval_caches=eval_cache, out=out, save=True, preset_of=preset_of, **overrides)
    else:
        with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task("train", total=None, loss="")
            record = train_run(cache, eval_caches=eval_cache, out=out, save=True, preset_of=preset_of,
                               progress=lambda e, n, h: bar.update(task, completed=e, total=n,
                                                                   loss=f"loss {h.get('total', 0):.3f}"), **overrides)
    if tensorboard:
        console.print(f"TensorBoard scalars: {write_tensorboard(tensorboard, record)}")
    if as_json:
        print(record.dumps(indent=1))
    else:
        print_preset(record)
        print_results(record)
