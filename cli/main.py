"""The `fvgpt-cache` command line: parse options, show progress, call the library."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

app = typer.Typer(help="FVG-PT heads trained from cached CLIP features.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True, soft_wrap=True)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "… img/s", style="progress.data.speed")


@contextmanager
def split_progress():
    """A rich progress bar per split; yields the callback the library calls after each batch."""
    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                  TimeRemainingColumn(), console=err, transient=False) as bar:
        def update(split: str, done: int, total: int) -> None:
            if split not in tasks:
                tasks[split] = bar.add_task(split, total=total, completed=done)
            bar.update(tasks[split], completed=done)
        yield update


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@app.command()
def extract(
    data: Optional[Path] = typer.Option(None, "--data", help="Data root holding the named dataset folder."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="One of the eleven CoOp datasets, e.g. oxford_pets."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Generic dataset: CoOp-style split JSON."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Generic dataset: folder the split paths are relative to."),
    mask_root: Optional[Path] = typer.Option(None, "--mask-root", help="Folder mirroring the image folder with masks."),
    model: str = typer.Option("ViT-B-16", help="open_clip model name, or the path of an open_clip config JSON."),
    pretrained: str = typer.Option("openai", help="open_clip tag, local checkpoint file, or 'none' (random, seeded)."),
    quick_gelu: str = typer.Option("auto", help="auto|on|off. auto: on for OpenAI weights."),
    shots: str = typer.Option("16", help="Images per class for train (val gets min(K,4)); 0 or 'all' keeps all."),
    seed: int = typer.Option(1, help="Few-shot sampling seed (Dassl), also seeds the augmented views."),
    train_views: int = typer.Option(1, help="Views per training image: view 0 is the test-time crop, others augmented."),
    template: Optional[str] = typer.Option(None, help="Text template with {} for the class name (default: the dataset's)."),
    batch_size: int = typer.Option(64, help="Images per encoder batch."),
    workers: int = typer.Option(2, help="DataLoader worker processes for decoding."),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
    missing_mask: str = typer.Option("error", help="error|full|skip for an image without a mask."),
    bad_image: str = typer.Option("error", help="error|skip for an unreadable image."),
    fg_mode: str = typer.Option("pixel", help="pixel (x*m before normalisation, black background) or normalized (DAPT)."),
    dtype: str = typer.Option("float16", help="Storage dtype of image features: float16|float32."),
    out: Optional[Path] = typer.Option(None, help="Output .h5 (default: cache/<dataset>/<model>/shots<K>_seed<S>.h5)."),
    resume: bool = typer.Option(True, help="Continue an interrupted extraction of the same output."),
    force: bool = typer.Option(False, help="Overwrite an existing complete cache."),
):
    """Extract CLIP features of full images and foreground views into an HDF5 cache."""
    from fvgpt_cache.data import generic_dataset, parse_shots
    from fvgpt_cache.datasets import load_dataset
    from fvgpt_cache.extraction import ExtractOptions, default_output
    from fvgpt_cache.extraction import extract as run_extract
    from fvgpt_cache.models import load_clip

    try:
        k = parse_shots(shots)
        if dataset and split_file:
            fail("give either --dataset (with --data) or --split-file (with --image-root), not both")
        if dataset:
            if data is None:
                fail("--dataset needs --data ROOT, the folder that contains the dataset's folder")
            ds = load_dataset(dataset, data, mask_root)
        elif split_file:
            if image_root is None:
                fail("--split-file needs --image-root DIR, the folder the split's paths are relative to")
            ds = generic_dataset(split_file, image_root, mask_root, template=template or "a photo of a {}.")
        else:
            fail("say which data to read: --data ROOT --dataset NAME, or --split-file FILE --image-root DIR")
        options = ExtractOptions(shots=k, seed=seed, train_views=train_views, batch_size=batch_size, workers=workers,
                                 device=device, missing_mask=missing_mask, bad_image=bad_image, fg_mode=fg_mode,
                                 template=template, store_dtype=dtype, resume=resume, force=force)
        options.validate()
        out = out or default_output(ds.name, model, pretrained, k, seed, train_views)
        loaded = load_clip(model, pretrained, quick_gelu=quick_gelu)
        if loaded.provenance["random_init"]:
            err.print("[bold yellow]warning:[/] --pretrained none: the model has random weights (seeded); "
                      "its features are only a smoke test")
        with split_progress() as update:
            summary = run_extract(ds, loaded, out, options, progress=update)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    console.print(f"wrote [bold]{summary.out}[/]: " + ", ".join(f"{s} {n}" for s, n in summary.counts.items())
                  + f" in {summary.seconds:.1f}s ({summary.images_per_second:.1f} img/s)")
    if summary.resumed_rows:
        console.print(f"resumed: {summary.resumed_rows} rows were already done")
    for split, items in summary.skipped.items():
        for item in items:
            console.print(f"[yellow]skipped[/] {split}: {item['path']} ({item['reason']})")
    if summary.full_masks:
        console.print(f"[yellow]{len(summary.full_masks)} image(s) had no mask and use the whole image[/]")
    empty = sum(summary.empty_masks.values())
    if empty:
        console.print(f"{empty} sample(s) have an empty foreground (A = 0) in at least one view")


def print_inspection(report: dict) -> None:
    prov = report["provenance"]
    console.print(f"[bold]{report['path']}[/]")
    info = Table(show_header=False, box=None)
    for key in ("dataset", "model", "pretrained", "quick_gelu", "shots", "seed", "views", "template", "fg_mode",
                "mask_root", "store_dtype", "open_clip_version", "torch_version", "created"):
        info.add_row(key, str(prov.get(key)))
    info.add_row("logit_scale", f"{report['logit_scale']:.3f}")
    info.add_row("classes", f"{report['classes']['count']} ({len(report['classes']['base'])} base, "
                            f"{len(report['classes']['new'])} new): {', '.join(report['classes']['names'][:8])}"
                            + (" …" if report["classes"]["count"] > 8 else ""))
    console.print(info)
    def fmt(feat: dict) -> str:
        return "×".join(map(str, feat["shape"])) + " " + feat["dtype"].replace("float", "f")

    table = Table(title="splits (features: N×V×D dtype)")
    for col in ("split", "N", "classes", "per class", "full", "fg", "mean A", "empty", "skipped"):
        table.add_column(col)
    for split, e in report["splits"].items():
        feats = e["features"]
        table.add_row(split, str(e["samples"]), str(e["classes_present"]), f"{e['per_class_min']}–{e['per_class_max']}",
                      fmt(feats["full"]), fmt(feats["fg"]),
                      "-" if e["mask_area_mean"] is None else f"{e['mask_area_mean']:.3f}",
                      str(e["empty_mask_views"]), str(e["skipped"]))
    console.print(table)
    for name, t in report["text"].items():
        console.print(f"text/{name}: {t['shape']} {t['dtype']}" + (f"  template {t['template']!r}" if "template" in t else ""))
    if report["problems"]:
        for p in report["problems"]:
            console.print(f"[yellow]problem:[/] {p}")
    else:
        console.print("[green]no problems found[/]")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A cache file written by `fvgpt-cache extract`."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Show provenance, classes, splits, shapes, mask statistics and problems of a cache."""
    from fvgpt_cache.inspection import inspect_cache

    try:
        report = inspect_cache(path)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_inspection(report)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_results(record: dict) -> None:
    m = record["metrics"]
    all_classes = record["config"]["classes"] == "all"
    title = f"{record['dataset']} · backbone {record['backbone']} · seed {record['seed']}"
    table = Table(title=title)
    cols = ("method", "All") if all_classes else ("method", "Base", "New", "HM", "ΔHM vs backbone")
    for c in cols:
        table.add_column(c, justify="right" if c != "method" else "left")
    names = {"zeroshot": "zero-shot CLIP", "backbone": f"backbone ({record['backbone']})", "fvgpt": "+ FVG-PT"}
    for key in ("zeroshot", "backbone", "fvgpt"):
        row = m[key]
        if all_classes:
            table.add_row(names[key], _pct(row["all"]))
        else:
            delta = row["hm"] - m["backbone"]["hm"] if row["hm"] is not None and m["backbone"]["hm"] is not None else None
            table.add_row(names[key], _pct(row["base"]), _pct(row["new"]), _pct(row["hm"]),
                          "" if key == "backbone" or delta is None else f"{delta:+.2f}")
    console.print(table)
    shift = record.get("foreground_shift") or {}
    if shift.get("backbone") is not None:
        console.print(f"foreground shift D_fg (base test, lower = more foreground): backbone {shift['backbone']:.4f}, "
                      f"FVG-PT {shift['fvgpt']:.4f}")
    if record.get("cross_dataset"):
        cross = Table(title="cross-dataset (PC branch, all target classes)")
        for c in ("target", "images", "zero-shot", "backbone", "FVG-PT"):
            cross.add_column(c)
        for t in record["cross_dataset"]:
            cross.add_row(str(t["dataset"]), str(t["test_images"]), _pct(t["zeroshot"]), _pct(t["backbone"]), _pct(t["fvgpt"]))
        console.print(cross)
    sec = record["seconds"]
    console.print(f"{record['head_parameters']:,} head parameters · {record['train_images']} training images × "
                  f"{record['views']} views · trained in {sec['train']:.2f}s · run folder {record['run_dir']}")


@app.command()
def train(
    cache: Path = typer.Argument(..., help="Cache written by `fvgpt-cache extract`."),
    backbone: Optional[str] = typer.Option(None, help="Text-feature group to build on (clip = zero-shot CLIP); default: the only tuned one."),
    classes: str = typer.Option("base", help="base (base-to-new protocol) or all (cross-dataset source)."),
    lambda_d: float = typer.Option(10.0, "--lambda-d", help="Weight of the distillation loss λ_d."),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(4),
    lr: float = typer.Option(0.0035),
    seed: int = typer.Option(1, help="Seeds head initialisation, shuffling and view choice."),
    frg: bool = typer.Option(True, "--frg/--no-frg", help="Foreground Reliability Gate."),
    fdc: bool = typer.Option(True, "--fdc/--no-fdc", help="Foreground Distillation Compensation (base branch)."),
    pc: bool = typer.Option(True, "--pc/--no-pc", help="Prior Calibration with the Backbone Reliability Gate (new branch)."),
    loss_frg: bool = typer.Option(True, "--loss-frg/--no-loss-frg"),
    loss_dist: bool = typer.Option(True, "--loss-dist/--no-loss-dist"),
    loss_ce_fdc: bool = typer.Option(True, "--loss-ce-fdc/--no-loss-ce-fdc"),
    loss_ce_pc: bool = typer.Option(True, "--loss-ce-pc/--no-loss-ce-pc"),
    loss_kl_pc: bool = typer.Option(True, "--loss-kl-pc/--no-loss-kl-pc"),
    settings: list[str] = typer.Option([], "--set", help="Any other TrainConfig field as KEY=VALUE, e.g. --set fdc_hidden=128."),
    eval_cache: list[Path] = typer.Option([], "--eval-cache", help="Other caches (same model) to evaluate the PC branch on."),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: cache/runs/<cache>-<backbone>-seed<S>-<id>)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results JSON instead of the table."),
):
    """Train the FVG-PT heads on base classes from a cache and evaluate Base/New/HM."""
    from fvgpt_cache.runs import run_training
    from fvgpt_cache.training import TrainConfig, config_with, parse_value

    try:
        overrides = {}
        for item in settings:
            if "=" not in item:
                fail(f"--set {item!r}: write KEY=VALUE")
            key, value = item.split("=", 1)
            overrides[key.strip()] = parse_value(key.strip(), value)
        cfg = config_with(TrainConfig(
            backbone=backbone, classes=classes, lambda_d=lambda_d, epochs=epochs, batch_size=batch_size, lr=lr,
            seed=seed, use_frg=frg, use_fdc=fdc, use_pc=pc, loss_frg=loss_frg, loss_dist=loss_dist,
            loss_ce_fdc=loss_ce_fdc, loss_ce_pc=loss_ce_pc, loss_kl_pc=loss_kl_pc, device=device), **overrides)
        if as_json:
            record = run_training(cache, cfg, out, eval_cache)
        else:
            with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                          TimeRemainingColumn(), console=err, transient=True) as bar:
                task = bar.add_task("train", total=cfg.epochs, loss="")
                record = run_training(cache, cfg, out, eval_cache, progress=lambda e, n, h: bar.update(
                    task, completed=e, loss=f"loss {h.get('total', 0):.3f}"))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(record, indent=1))
    else:
        print_results(record)


backbone_app = typer.Typer(help="Backbones in the cache: CoOp/KgCoOp prompt learning, official checkpoints, ensembles.",
                            no_args_is_help=True)
app.add_typer(backbone_app, name="backbone")


@backbone_app.command("train")
def backbone_train(
    cache: Path = typer.Argument(..., help="Cache written by `fvgpt-cache extract`."),
    method: str = typer.Option("coop", help="coop|kgcoop"),
    name: Optional[str] = typer.Option(None, help="Text group to write (default: the method)."),
    epochs: Optional[int] = typer.Option(None, help="Default 10 (CoOp on EuroSAT: 20)."),
    lr: float = typer.Option(0.0035),
    batch_size: int = typer.Option(4),
    n_ctx: int = typer.Option(4, help="Context tokens."),
    ctx_init: str = typer.Option("auto", help="auto (random for CoOp, 'a photo of a' for KgCoOp), none, or words."),
    csc: bool = typer.Option(False, help="Class-specific context (needs --classes all)."),
    class_token_position: str = typer.Option("end", help="end|front|middle"),
    kg_weight: float = typer.Option(2.0, help="KgCoOp's W."),
    classes: str = typer.Option("base", help="base, or all for a cross-dataset source."),
    seed: int = typer.Option(1),
    pretrained: Optional[str] = typer.Option(None, help="Local weights file if the cache's weights must be found again."),
    device: str = typer.Option("auto"),
    out: Optional[Path] = typer.Option(None, help="Checkpoint folder (default cache/backbones/<cache>-<name>-seed<S>)."),
):
    """Learn CoOp/KgCoOp context from the cached features and write /text/<name> for every class."""
    from fvgpt_cache.backbones import BackboneConfig, default_epochs, save_coop_checkpoint, train_backbone, write_backbone
    from fvgpt_cache.store import open_cache

    try:
        c = open_cache(cache)
        cfg = BackboneConfig(method=method, n_ctx=n_ctx, ctx_init=ctx_init, csc=csc,
                             class_token_position=class_token_position,
                             epochs=epochs or default_epochs(c.provenance.get("dataset"), method), lr=lr,
                             batch_size=batch_size, kg_weight=kg_weight, classes=classes, seed=seed, device=device).validate()
        name = name or method
        with Progress(TextColumn(f"{method}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeRemainingColumn(), console=err) as bar:
            task = bar.add_task(method, total=cfg.epochs, info="epochs")
            result = train_backbone(c, cfg, pretrained=pretrained, progress=lambda e, n, h: bar.update(
                task, completed=e, info=f"loss {h['loss']:.3f} acc {h['acc']:.1f}%"))
        folder = out or Path("cache/backbones") / f"{c.path.stem}-{name}-seed{seed}"
        ckpt = save_coop_checkpoint(folder, result.ctx, cfg.epochs)
        write_backbone(c.path, name, result.ctx, cfg, result.loaded, checkpoint=ckpt)
        (folder / "backbone.json").write_text(json.dumps({**result.to_dict(), "cache": str(c.path), "name": name}, indent=1))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    m = result.metrics
    new = "" if m.get("test_acc_new") is None else f", new-class test accuracy {m['test_acc_new']:.2f}%"
    console.print(f"{method}: {'base' if classes == 'base' else 'all'}-class test accuracy {m['test_acc']:.2f}% "
                  f"(before training {m['initial_test_acc']:.2f}%){new}; {result.train_images} images, "
                  f"{result.seconds:.1f}s")
    console.print(f"wrote /text/{name} into {c.path} and the checkpoint {ckpt}")
    console.print(f"next: fvgpt-cache train {c.path} --backbone {name} --lambda-d 10")


@backbone_app.command("load")
def backbone_load(
    cache: Path = typer.Argument(...),
    checkpoint: Path = typer.Option(..., help="A CoOp/KgCoOp checkpoint file, or the output folder holding prompt_learner/."),
    method: str = typer.Option("coop", help="coop|kgcoop"),
    name: Optional[str] = typer.Option(None, help="Text group to write (default: the method)."),
    class_token_position: str = typer.Option("end", help="end|front|middle, as the context was trained."),
    pretrained: Optional[str] = typer.Option(None, help="Local weights file if the cache's weights must be found again."),
    device: str = typer.Option("auto"),
):
    """Import a context trained by the official CoOp/KgCoOp/FVG-PT code and write /text/<name>."""
    from fvgpt_cache.backbones import load_backbone
    from fvgpt_cache.training import resolve_device

    try:
        info = load_backbone(cache, checkpoint, method, name=name, pretrained=pretrained,
                             class_token_position=class_token_position, device=resolve_device(device))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    console.print(f"wrote /text/{info['name']} {info['shape']} from {info['checkpoint']}")


@backbone_app.command("ensemble")
def backbone_ensemble(
    cache: Path = typer.Argument(...),
    templates: str = typer.Option("imagenet80", help="imagenet80 (CLIP's 80 ImageNet templates) or imagenet7."),
    pretrained: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto"),
):
    """Zero-shot CLIP with an ensemble of templates, written as /text/clip_<templates>."""
    from fvgpt_cache.backbones import write_ensemble
    from fvgpt_cache.training import resolve_device

    try:
        info = write_ensemble(cache, templates, pretrained=pretrained, device=resolve_device(device))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    console.print(f"wrote /text/{info['name']} ({info['templates']} templates)")


@app.command()
def baselines(
    cache: Path = typer.Argument(...),
    linear_probe: bool = typer.Option(True, help="Also fit CoOp's linear-probe baseline (C chosen on val)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Base/New/HM of every text group in the cache (zero-shot, ensembles, backbones) and the linear probe."""
    import numpy as np

    from fvgpt_cache.evaluation import EvalSet, accuracy
    from fvgpt_cache.heads import clip_logits, harmonic_mean
    from fvgpt_cache.linear_probe import linear_probe as fit_probe
    from fvgpt_cache.store import open_cache

    try:
        c = open_cache(cache)
        rows = {}
        for group in c.text_groups:
            ts = EvalSet(c, group)
            acc = {}
            for split, ids in (("base", c.base), ("new", c.new)):
                sel, y, txt, _ = ts.subset(np.asarray(ids))
                acc[split] = accuracy(clip_logits(ts.full[sel], txt, ts.scale), y)
            both = acc["base"] is not None and acc["new"] is not None
            rows[group] = {**acc, "hm": harmonic_mean(acc["base"], acc["new"]) if both else None}
        if linear_probe:
            lp = fit_probe(c)
            rows["linear probe"] = {"base": lp["test_acc_base"], "new": None, "hm": None, "C": lp["C"]}
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=f"baselines · {c.provenance.get('dataset')} (test split)")
    for col in ("method", "Base", "New", "HM"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for group, r in rows.items():
        table.add_row(group + (f" (C={r['C']:.3g})" if "C" in r else ""), _pct(r["base"]), _pct(r["new"]), _pct(r["hm"]))
    console.print(table)


@app.command()
def grid(
    caches: list[Path] = typer.Argument(..., help="One or more caches (shell globs work: cache/*/*.h5)."),
    param: list[str] = typer.Option([], "--param", help="NAME=V1,V2,… ; the grid is the Cartesian product."),
    preset: Optional[str] = typer.Option(None, help="components|losses|indicators|depth|width|lambda|data-fraction|fdc-branches|epochs"),
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
    from fvgpt_cache.training import TrainConfig, config_with, parse_value

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
        runs = expand(caches, seed_list, params, config_with(TrainConfig(device=device), **base), preset)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    console.print(f"{len(runs)} runs ({len(caches)} cache(s) × {len(seed_list)} seed(s) × configurations) → {out}/results.jsonl")
    try:
        with Progress(TextColumn("grid"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"), TimeRemainingColumn(),
                      console=err) as bar:
            task = bar.add_task("grid", total=len(runs))
            records = run_grid(runs, out, resume=resume, batched=batched, save_heads=save_heads,
                               eval_caches=list(eval_cache),
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
        if plot:
            path = reports.plot_sweep(reports.sweep(records, plot), plot, plot_out)
            console.print(f"wrote {path}")
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    paper = compare == "paper"
    if fmt == "console":
        for title, header, body in reports.tables(summary, paper):
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
    text = formats[fmt](summary, paper) if fmt in ("markdown", "latex") else formats[fmt](summary)
    if output:
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        print(text)


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
