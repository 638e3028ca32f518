"""`masks`: foreground masks from the CLIP image encoder (or CLIPSeg) into a mask folder `extract` reads."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .common import DIST_TIMEOUT_HELP, app, console, err, fail, resumable, split_progress


@app.command()
def masks(
    data: Optional[Path] = typer.Option(None, "--data", help="Data root holding the named dataset folder."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="One of the eleven CoOp datasets, e.g. oxford_pets."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Generic dataset: CoOp-style split JSON."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Generic dataset: folder the split paths are relative to."),
    name: Optional[str] = typer.Option(None, "--name", help="Generic dataset: its name (default: the image root's folder name)."),
    out: Path = typer.Option(..., "--out", help="Mask folder to write (it mirrors the image folder; pass it to extract --mask-root)."),
    method: str = typer.Option("gradcam", help="gradcam: gradient maps of the CLIP image encoder; clipseg: CLIPSeg "
                                               "(pip install 'fvgpt-cache[masks]')."),
    model: str = typer.Option("ViT-B-16", help="gradcam: open_clip model name or config JSON (the cache's model)."),
    pretrained: Optional[str] = typer.Option(None, help="gradcam: open_clip tag or local checkpoint (default openai); "
                                                        "clipseg: a local folder with CLIPSeg weights (default "
                                                        "CIDAS/clipseg-rd64-refined from the Hugging Face cache)."),
    quick_gelu: str = typer.Option("auto", help="auto|on|off. auto: on for OpenAI weights."),
    prompt: Optional[str] = typer.Option(None, help="Prompt with {} for the class name (default: the paper's Table 9 "
                                                    "prompt of the dataset, 'The {} in the middle.' for others)."),
    splits: str = typer.Option("train,val,test", help="Splits to mask; val/test masks serve diagnostics only "
                                                      "(FVG-PT's inference reads full views alone)."),
    shots: str = typer.Option("all", help="Mask every image ('all') or only the few-shot draw of --shots K --seed S "
                                          "that extract takes."),
    seed: int = typer.Option(1, help="Few-shot seed (with --shots K)."),
    map_kind: str = typer.Option("gradcam++", "--map", help="gradcam: gradcam|gradcam++|saliency."),
    layer: Optional[str] = typer.Option(None, help="gradcam/gradcam++: module of the image tower (default: layer2 of a "
                                                   "ResNet, the second-to-last block of a ViT)."),
    smooth: float = typer.Option(0.16, help="saliency: box-filter side as a fraction of the model's input side."),
    threshold: Optional[float] = typer.Option(None, help="Foreground where the normalised map is >= T (default: the "
                                                         "map's best on the synthetic world; clipseg 0.5)."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    workers: int = typer.Option(2, help="DataLoader worker processes for decoding."),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
    bad_image: str = typer.Option("error", help="error|skip for an unreadable image (skipped ones get no mask and "
                                                "are listed in masks.json)."),
    force: bool = typer.Option(False, help="Rewrite every mask, also in a folder written with other settings."),
    preview: Optional[Path] = typer.Option(None, help="Also write a contact sheet PNG of images with their masks."),
    preview_count: int = typer.Option(32, help="Images on the contact sheet."),
    dist_timeout: float = typer.Option(300.0, help=DIST_TIMEOUT_HELP),
):
    """Write foreground masks (white on black PNGs, the image's relative path and size) for extract --mask-root.

    Under torchrun every process takes its share of the batches (one process per GPU)."""
    from fvgpt_cache import (
        MapSettings, MaskOptions, contact_sheet, current_job, generic_dataset, load_dataset, mask_rows, parse_shots,
        preview_relpaths, write_masks,
    )

    resumable()
    job = current_job(dist_timeout)
    lead = job.rank == 0
    if dataset and split_file:
        fail("give either --dataset (with --data) or --split-file (with --image-root), not both")
    if dataset and name:
        fail(f"--name is for generic datasets (--split-file); --dataset {dataset} keeps its name (and its Table 9 "
             "prompt)")
    if dataset:
        if data is None:
            fail("--dataset needs --data ROOT, the folder that contains the dataset's folder")
        ds = load_dataset(dataset, data)
    elif split_file:
        if image_root is None:
            fail("--split-file needs --image-root DIR, the folder the split's paths are relative to")
        ds = generic_dataset(split_file, image_root, name=name)
    else:
        fail("say which data to read: --data ROOT --dataset NAME, or --split-file FILE --image-root DIR")
    wanted = tuple(s.strip() for s in splits.split(",") if s.strip())
    options = MaskOptions(method=method, settings=MapSettings(map=map_kind, layer=layer, smooth=smooth,
                                                              threshold=threshold),
                          prompt=prompt, splits=wanted, shots=parse_shots(shots), seed=seed, batch_size=batch_size,
                          workers=workers, device=device, bad_image=bad_image, force=force).validate()
    loaded = segmenter = None
    if method == "gradcam":
        from fvgpt_cache import load_clip

        loaded = load_clip(model, pretrained or "openai", quick_gelu=quick_gelu)
        if loaded.provenance["random_init"] and lead:
            err.print("[bold yellow]warning:[/] --pretrained none: random weights; the masks are noise")
    else:
        from fvgpt_cache import load_clipseg

        segmenter = load_clipseg(pretrained)
    with split_progress() if lead else contextlib.nullcontext() as update:
        summary = write_masks(ds, loaded, out, options, progress=update, segmenter=segmenter, job=job)
    sheet = None
    if preview is not None and lead:
        rows = mask_rows(ds, options)
        left_out = {s["path"] for s in summary.skipped}
        for split in rows:
            rows[split] = [r for r in rows[split] if r["relpath"] not in left_out]
        sheet = contact_sheet(ds.image_root, out, preview_relpaths(rows, preview_count), preview)
    if not lead:
        return
    counts = ", ".join(f"{s} {n}" for s, n in summary.counts.items())
    rate = f" ({summary.seconds_per_image * 1000:.1f} ms/image)" if summary.seconds_per_image else ""
    console.print(f"wrote [bold]{escape(str(summary.out))}[/]: {counts}; {summary.written} new, {summary.resumed} kept "
                  f"from an earlier run{rate}")
    if summary.mean_area is not None:
        console.print(f"mean foreground area {summary.mean_area:.3f}; {len(summary.empty)} empty and "
                      f"{len(summary.full)} full mask(s) (listed in masks.json)")
    for item in summary.skipped:
        console.print(f"[yellow]skipped[/] {item['split']}: {escape(item['path'])} ({escape(item['reason'])})")
    if sheet is not None:
        console.print(f"preview: {escape(str(sheet))}")
    console.print(f"use it with: fvgpt-cache extract … --mask-root {escape(str(summary.out))}")


@app.command("add-masks")
def add_masks(
    cache: Path = typer.Argument(..., help="A cache written by `fvgpt-cache extract`."),
    name: str = typer.Option(..., "--name", help="Name of the mask source (e.g. gradcam, clipseg, release); train on "
                                                 "it with --set fg_source=NAME ('none', all-ones masks, is built in)."),
    mask_root: Path = typer.Option(..., "--mask-root", help="Mask folder mirroring the image folder (e.g. written by "
                                                            "`fvgpt-cache masks`)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="The cache's image folder, if it moved."),
    pretrained: Optional[str] = typer.Option(None, help="The cache's CLIP weights, if the recorded file moved."),
    missing_mask: str = typer.Option("error", help="error|full for a cached image without a mask in --mask-root."),
    batch_size: int = typer.Option(64, help="Images per encoder batch."),
    workers: int = typer.Option(2, help="DataLoader worker processes for decoding."),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
    resume: bool = typer.Option(True, help="Continue an interrupted run of the same command."),
    force: bool = typer.Option(False, help="Replace a mask source of that name."),
):
    """Add the foreground views of another mask source to a cache (full views are not re-encoded)."""
    from fvgpt_cache import SourceOptions, add_foreground_source, current_job

    resumable()
    job = current_job()
    options = SourceOptions(image_root=str(image_root) if image_root else None, pretrained=pretrained,
                            missing_mask=missing_mask, batch_size=batch_size, workers=workers, device=device,
                            resume=resume, force=force)
    lead = job.rank == 0
    with split_progress() if lead else contextlib.nullcontext() as update:
        summary = add_foreground_source(cache, name, mask_root, options, progress=update, job=job)
    if job.rank != 0:
        return
    train = summary.stats.get("train") or {}
    area = "-" if train.get("mean_area") is None else f"{train['mean_area']:.3f}"
    empty = "-" if train.get("empty_share") is None else f"{100 * train['empty_share']:.1f} %"
    console.print(f"added mask source [bold]{escape(summary.name)}[/] to {escape(str(cache))}: "
                  + ", ".join(f"{s} {n}" for s, n in summary.counts.items())
                  + f"; train mean area {area}, empty masks {empty} ({summary.seconds:.1f}s)")
    if summary.provenance.get("missing_masks_full"):
        console.print(f"[yellow]{len(summary.provenance['missing_masks_full'])} image(s) had no mask and use the "
                      "whole image[/]")
    console.print(f"train on it: fvgpt-cache train {escape(str(cache))} --set fg_source={escape(summary.name)}; "
                  f"compare sources: fvgpt-cache grid {escape(str(cache))} --preset masks")
