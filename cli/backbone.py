"""`backbone …` and `baselines`: tuned backbones written into a cache, and the baselines it can score."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fvgpt_cache import COOP, KGCOOP, MMRL, PROMPTSRC, backbone_methods

from .common import DIST_TIMEOUT_HELP, _pct, app, console, err, rank_rates, resumable, split_progress

backbone_app = typer.Typer(help="Backbones in the cache: CoOp/KgCoOp prompt learning, official checkpoints "
                                "(CoOp, KgCoOp, PromptSRC, MMRL), ensembles.",
                            rich_markup_mode=None,
                            no_args_is_help=True)
app.add_typer(backbone_app, name="backbone")
TRAINED_HELP = f"{COOP.name}|{KGCOOP.name}: the methods CoOp's prompt learner trains (`backbone methods` lists every one)."


@backbone_app.command("methods")
def backbone_methods_command():
    """The registered backbone methods: paper label, image features, how each is written, presets."""
    table = Table(title="backbone methods")
    for col in ("method", "label", "image features", "written", "presets"):
        table.add_column(col)
    for m in backbone_methods():
        table.add_row(m.name, m.label, "CLIP's" if m.image_encoder == "clip" else "its own", m.written,
                      ", ".join(p.name for p in m.presets) or "-")
    console.print(table)


@backbone_app.command("train")
def backbone_train(
    cache: Path = typer.Argument(..., help="Cache written by `fvgpt-cache extract`."),
    method: str = typer.Option(COOP.name, help=TRAINED_HELP),
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
    out: Optional[Path] = typer.Option(None, help="Checkpoint folder (default cache/backbones/<dataset>/<cache>-<name>-"
                                                  "seed<S>-<key of the cache's content and the settings>)."),
    force: bool = typer.Option(False, help="Write into --out even if it holds another cache's backbone."),
):
    """Learn CoOp/KgCoOp context from the cached features and write /text/<name> for every class."""
    from fvgpt_cache import (
        BACKBONE_RECORD, BackboneConfig, claim_backbone_dir, default_backbone_dir, default_epochs, save_coop_checkpoint,
        train_backbone, write_backbone,
    )
    from fvgpt_cache import open_cache

    c = open_cache(cache)
    cfg = BackboneConfig(method=method, n_ctx=n_ctx, ctx_init=ctx_init, csc=csc,
                         class_token_position=class_token_position,
                         epochs=epochs or default_epochs(c.provenance.get("dataset"), method), lr=lr,
                         batch_size=batch_size, kg_weight=kg_weight, classes=classes, seed=seed, device=device).validate()
    name = name or method
    folder = out or default_backbone_dir(c, name, seed, {k: v for k, v in cfg.to_dict().items() if k != "device"})
    claim_backbone_dir(folder, c, force)
    with Progress(TextColumn(f"{method}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task(method, total=cfg.epochs, info="epochs")
        result = train_backbone(c, cfg, pretrained=pretrained, progress=lambda e, n, h: bar.update(
            task, completed=e, info=f"loss {h['loss']:.3f} acc {h['acc']:.1f}%"))
    source = {"cache": str(c.path), "cache_fingerprint": c.input_fingerprint("clip"), "name": name}
    ckpt = save_coop_checkpoint(folder, result.ctx, cfg.epochs)
    (folder / BACKBONE_RECORD).write_text(json.dumps({**result.to_dict(), **source}, indent=1))
    write_backbone(c.path, name, result.ctx, cfg, result.loaded, checkpoint=ckpt)
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
    method: str = typer.Option(COOP.name, help=TRAINED_HELP),
    name: Optional[str] = typer.Option(None, help="Text group to write (default: the method)."),
    class_token_position: str = typer.Option("end", help="end|front|middle, as the context was trained."),
    pretrained: Optional[str] = typer.Option(None, help="Local weights file if the cache's weights must be found again."),
    device: str = typer.Option("auto"),
):
    """Import a context trained by the official CoOp/KgCoOp/FVG-PT code and write /text/<name>."""
    from fvgpt_cache import load_backbone, resolve_device

    info = load_backbone(cache, checkpoint, method, name=name, pretrained=pretrained,
                         class_token_position=class_token_position, device=resolve_device(device))
    console.print(f"wrote /text/{info['name']} {info['shape']} from {info['checkpoint']}")


@backbone_app.command("import")
def backbone_import(
    cache: Path = typer.Argument(..., help="Cache written by `fvgpt-cache extract`."),
    method: str = typer.Option(..., help="A backbone method imported from its official checkpoint: "
                                         f"{PROMPTSRC.name}|{MMRL.name} (`fvgpt-cache backbone methods` lists them)."),
    checkpoint: Path = typer.Option(..., help="The official checkpoint file (…/VLPromptLearner/model.pth.tar-<epoch>, "
                                              "…/MultiModalRepresentationLearner/model.pth.tar-<epoch>) or the output "
                                              "folder holding it (latest epoch)."),
    name: Optional[str] = typer.Option(None, help="Groups to write: /text/NAME and /image/NAME/… (default: the method)."),
    alpha: Optional[float] = typer.Option(None, help="MMRL: base-class fusion weight α (default 0.7, the official value)."),
    rep_layers: Optional[str] = typer.Option(None, help="MMRL: representation layers numbered from 1, e.g. 6,7,8,9,10,11,12 "
                                                        "(default: the last K blocks, K = the checkpoint's projections)."),
    ctx_init: str = typer.Option("a photo of a", help="PromptSRC: the CTX_INIT the checkpoint was trained with."),
    template: Optional[str] = typer.Option(None, help="MMRL: class template (default: the cache's)."),
    prompt_check: bool = typer.Option(True, "--prompt-check/--no-prompt-check",
                                      help="Compare the class prompts stored in the checkpoint with the cache's classes."),
    image_root: Optional[Path] = typer.Option(None, help="Image folder, if it moved since extraction."),
    mask_root: Optional[Path] = typer.Option(None, help="Mask folder, if it moved since extraction."),
    pretrained: Optional[str] = typer.Option(None, help="The cache's CLIP weights file, if it moved."),
    batch_size: int = typer.Option(64),
    workers: int = typer.Option(2),
    device: str = typer.Option("auto"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted import."),
    force: bool = typer.Option(False, help="Replace existing groups of that name."),
    dist_timeout: float = typer.Option(300.0, help=DIST_TIMEOUT_HELP),
):
    """Import a PromptSRC or MMRL checkpoint: its text features and one pass over every cached view.

    Under torchrun every process takes its share of the batches (one process per GPU)."""
    from fvgpt_cache import ImportOptions, current_job, import_backbone

    resumable()

    job = current_job(dist_timeout)
    lead = job.rank == 0
    layers = None
    if rep_layers is not None:
        try:
            layers = tuple(int(x) for x in rep_layers.replace(" ", "").split(",") if x)
        except ValueError:
            raise ValueError(f"--rep-layers {rep_layers!r}: give layer numbers separated by commas, "
                             "e.g. 6,7,8,9,10,11,12") from None
    options = ImportOptions(name=name, alpha=alpha, rep_layers=layers, ctx_init=ctx_init, template=template,
                            prompt_check=prompt_check, image_root=str(image_root) if image_root else None,
                            mask_root=str(mask_root) if mask_root else None, pretrained=pretrained,
                            batch_size=batch_size, workers=workers, device=device, resume=resume, force=force)
    with split_progress() if lead else contextlib.nullcontext() as update:
        summary = import_backbone(cache, method, checkpoint, options, progress=update, job=job)
    if not lead:
        return
    images = sum(summary.counts.values())
    resumed = f", {summary.resumed_rows} resumed" if summary.resumed_rows else ""
    console.print(f"{method}: {summary.checkpoint} (epoch {summary.epoch}); class prompts: {summary.prompt_check}")
    console.print(f"wrote {', '.join('/' + g for g in summary.groups)} into {cache} ({images} images{resumed}, "
                  f"{summary.seconds:.1f}s)")
    if summary.world_size > 1:
        console.print(rank_rates(summary.ranks))
    console.print(f"next: fvgpt-cache train {cache} --backbone {summary.name}")


@backbone_app.command("ensemble")
def backbone_ensemble(
    cache: Path = typer.Argument(...),
    templates: str = typer.Option("imagenet80", help="imagenet80 (CLIP's 80 ImageNet templates) or imagenet7."),
    pretrained: Optional[str] = typer.Option(None),
    device: str = typer.Option("auto"),
):
    """Zero-shot CLIP with an ensemble of templates, written as /text/clip_<templates>."""
    from fvgpt_cache import resolve_device, write_ensemble

    info = write_ensemble(cache, templates, pretrained=pretrained, device=resolve_device(device))
    console.print(f"wrote /text/{info['name']} ({info['templates']} templates)")


@app.command()
def baselines(
    cache: Path = typer.Argument(...),
    linear_probe: bool = typer.Option(True, help="Also fit CoOp's linear-probe baseline (C chosen on val)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Base/New/HM of every text group in the cache (zero-shot, ensembles, backbones) and the linear probe."""
    from fvgpt_cache import baselines as baseline_rows
    from fvgpt_cache import open_cache

    c = open_cache(cache)
    rows = baseline_rows(c, linear_probe)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=f"baselines · {c.provenance.get('dataset')} (test split)")
    for col in ("method", "Base", "New", "HM"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for group, r in rows.items():
        table.add_row(group + (f" (C={r['C']:.3g})" if "C" in r else ""), _pct(r["base"]), _pct(r["new"]), _pct(r["hm"]))
    console.print(table)

