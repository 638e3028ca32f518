"""`extract` and `inspect`: the one pass over the images, and what a cache holds."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import DIST_TIMEOUT_HELP, app, console, err, fail, narrow_table, rank_rates, resumable, split_progress


@app.command()
def extract(
    data: Optional[Path] = typer.Option(None, "--data", help="Data root holding the named dataset folder."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="One of the eleven CoOp datasets, e.g. oxford_pets."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Generic dataset: CoOp-style split JSON."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Generic dataset: folder the split paths are relative to."),
    mask_root: Optional[Path] = typer.Option(None, "--mask-root", help="Folder mirroring the image folder with masks."),
    name: Optional[str] = typer.Option(None, "--name", help="Generic dataset: its name in provenance, the default cache "
                                                          "path and reports (default: the image root's folder name, or "
                                                          "its parent's for generic folders such as images/)."),
    model: str = typer.Option("ViT-B-16", help="open_clip model name, or the path of an open_clip config JSON."),
    pretrained: str = typer.Option("openai", help="open_clip tag, local checkpoint file, or 'none' (random, seeded)."),
    quick_gelu: str = typer.Option("auto", help="auto|on|off. auto: on for OpenAI weights."),
    shots: str = typer.Option("16", help="Images per class for train (val gets min(K,4)); 0 or 'all' keeps all."),
    seed: int = typer.Option(1, help="Few-shot sampling seed (Dassl), also seeds the augmented views."),
    train_views: Optional[int] = typer.Option(None, help="Views per training image: view 0 is Dassl's squash (what CoOp "
                                                         "trains on), views 1..V-1 random resized crop + flip (one per "
                                                         "FVG-PT epoch) [extraction.DEFAULT_TRAIN_VIEWS: 1 + the default "
                                                         "epochs]."),
    rrc_scale: str = typer.Option("0.08,1", help="Scale range of the random resized crop, MIN,MAX (MMRL's configs: 0.5,1)."),
    template: Optional[str] = typer.Option(None, help="Text template with {} for the class name (default: the dataset's)."),
    batch_size: str = typer.Option("64", help="Images per batch (each with all its views), or 'auto': the largest "
                                               "power of two ≤ 256 whose memory fits in half of the free host memory "
                                               "and /dev/shm (see docs/gpu.md)."),
    encode_batch: int = typer.Option(256, help="Images (views) per encoder forward: a batch of 64 images × 11 views "
                                               "× full and foreground is 1,408; lower it if the GPU runs out of memory."),
    workers: int = typer.Option(2, help="DataLoader worker processes for decoding."),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
    precision: str = typer.Option("auto", help="auto|fp32|fp16|bf16: the encoder's autocast. auto: fp16 on CUDA "
                                               "(fp32 with --dtype float32), fp32 on the CPU. Recorded in provenance; "
                                               "large open_clip models want bf16."),
    missing_mask: str = typer.Option("error", help="error|full|skip for an image without a mask."),
    bad_image: str = typer.Option("error", help="error|skip for an unreadable image."),
    mask_size_mismatch: str = typer.Option("resize", help="resize (nearest, as the release's loader)|error|skip for a "
                                                          "mask whose size differs from its image."),
    fg_mode: str = typer.Option("normalized", help="normalized: normalise(x)*m (DAPT, the release; mean-colour "
                                                   "background) or pixel: x*m before normalisation (black background)."),
    dtype: str = typer.Option("float16", help="Storage dtype of image features: float16|float32."),
    out: Optional[Path] = typer.Option(None, help="Output .h5 (default: cache/<dataset>/<model>/shots<K>_seed<S>.h5)."),
    resume: bool = typer.Option(True, help="Continue an interrupted extraction of the same output."),
    force: bool = typer.Option(False, help="Overwrite an existing complete cache."),
    dist_timeout: float = typer.Option(300.0, help=DIST_TIMEOUT_HELP),
):
    """Extract CLIP features of full images and foreground views into an HDF5 cache.

    Under torchrun every process takes its share of the batches (one process per GPU); the file is
    the same as one process writes."""
    from fvgpt_cache import (
        AugmentConfig, ExtractOptions, current_job, default_output, format_short_classes, generic_dataset, load_clip,
        load_dataset, parse_shots, short_classes,
    )
    from fvgpt_cache import extract as run_extract

    resumable()
    job = current_job(dist_timeout)
    lead = job.rank == 0  # under torchrun only rank 0 talks
    k = parse_shots(shots)
    if dataset and name:
        fail(f"--name is for generic datasets (--split-file); --dataset {dataset} keeps its name so reports can "
             "match the paper's rows")
    if dataset and split_file:
        fail("give either --dataset (with --data) or --split-file (with --image-root), not both")
    if dataset:
        if data is None:
            fail("--dataset needs --data ROOT, the folder that contains the dataset's folder")
        ds = load_dataset(dataset, data, mask_root)
    elif split_file:
        if image_root is None:
            fail("--split-file needs --image-root DIR, the folder the split's paths are relative to")
        ds = generic_dataset(split_file, image_root, mask_root, template=template or "a photo of a {}.", name=name)
    else:
        fail("say which data to read: --data ROOT --dataset NAME, or --split-file FILE --image-root DIR")
    views = {} if train_views is None else {"train_views": train_views}  # unset: the library's default
    options = ExtractOptions(shots=k, seed=seed, **views, batch_size=parse_batch_size(batch_size),
                             workers=workers, device=device, precision=precision, encode_batch=encode_batch,
                             missing_mask=missing_mask, bad_image=bad_image,
                             mask_size_mismatch=mask_size_mismatch, fg_mode=fg_mode, template=template,
                             store_dtype=dtype, resume=resume, force=force,
                             augment=AugmentConfig(scale=parse_scale(rrc_scale)))
    options.validate()
    out = out or default_output(ds.name, model, pretrained, k, seed, options.train_views)
    short = format_short_classes(short_classes(ds.splits, k, ds.classnames))
    if short and lead:  # said before the long pass, so it can be stopped
        err.print(f"[bold yellow]warning:[/] fewer images than --shots {k} asks for (all of them are taken; "
                  f"listed in provenance): {escape('; '.join(short))}", highlight=False)
    loaded = load_clip(model, pretrained, quick_gelu=quick_gelu)
    if loaded.provenance["random_init"] and lead:
        err.print("[bold yellow]warning:[/] --pretrained none: the model has random weights (seeded); "
                  "its features are only a smoke test")
    with split_progress() if lead else contextlib.nullcontext() as update:
        summary = run_extract(ds, loaded, out, options, progress=update, job=job,
                              on_plan=show_plan if lead else None)
    if not lead:
        return
    console.print(f"wrote [bold]{escape(str(summary.out))}[/]: " + ", ".join(f"{s} {n}" for s, n in summary.counts.items())
                  + f" samples in {summary.seconds:.1f}s ({summary.images_per_second:.1f} img/s)")
    if summary.world_size > 1:
        console.print(rank_rates(summary.ranks))
    if summary.resumed_rows:
        console.print(f"resumed: {summary.resumed_rows} rows were already done")
    for split, items in summary.skipped.items():
        for item in items:
            console.print(f"[yellow]skipped[/] {split}: {escape(item['path'])} ({escape(item['reason'])})")
    if summary.resized_masks:
        console.print(f"[yellow]{len(summary.resized_masks)} mask(s) had another size than their image and were "
                      "resized (nearest neighbour); listed in the cache's provenance[/]")
    if summary.full_masks:
        console.print(f"[yellow]{len(summary.full_masks)} image(s) had no mask and use the whole image[/]")
    empty = sum(summary.empty_masks.values())
    if empty:
        console.print(f"{empty} sample(s) have an empty foreground (A = 0) in at least one view")
    for w in summary.warnings:
        err.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False)


def parse_batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--batch-size {text!r}: give a number of images or 'auto'") from None


def show_plan(plan) -> None:
    """The memory plan, said before the pass (on stderr: stdout keeps the results)."""
    err.print(escape(plan.describe()), highlight=False, soft_wrap=True)
    for problem in plan.problems():
        err.print(f"[bold yellow]warning:[/] {escape(problem)}", highlight=False, soft_wrap=True)


def parse_scale(text: str) -> tuple[float, float]:
    """`--rrc-scale 0.5,1` → (0.5, 1.0)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--rrc-scale {text!r}: write MIN,MAX, e.g. 0.08,1 or 0.5,1") from None
    return lo, hi


def print_inspection(report: dict) -> None:
    prov = report["provenance"]
    from fvgpt_cache import format_short_classes, text_key

    console.print(f"[bold]{escape(report['path'])}[/]")
    console.print(f"content {report['fingerprint']}", highlight=False, soft_wrap=True)  # SHA-256: what results key on
    info = Table(show_header=False, box=None)
    for key in ("dataset", "model", "pretrained", "pretrained_sha256", "quick_gelu", "shots", "seed", "views",
                "template", "fg_mode", "mask_root", "store_dtype", "compute", "open_clip_version", "torch_version",
                "created"):
        if key != "pretrained_sha256" or prov.get(key):
            info.add_row("weights sha256" if key == "pretrained_sha256" else key, escape(str(prov.get(key))))
    for line in format_short_classes(report.get("short_classes") or {}):
        info.add_row("short classes", escape(line))
    aug = prov.get("augmentation") or {}
    info.add_row("rrc scale", str(aug.get("random_resized_crop_scale")))
    masks = report["masks"]
    info.add_row("masks", f"{masks['resized']} resized to their image, {masks['full']} missing (whole image used); "
                          f"policy {masks['size_policy']}")
    info.add_row("logit_scale", f"{report['logit_scale']:.3f}")
    info.add_row("classes", f"{report['classes']['count']} ({len(report['classes']['base'])} base, "
                            f"{len(report['classes']['new'])} new): {', '.join(report['classes']['names'][:8])}"
                            + (" …" if report["classes"]["count"] > 8 else ""))
    console.print(info)
    def fmt(feat: dict) -> str:
        return "×".join(map(str, feat["shape"])) + " " + feat["dtype"].replace("float", "f")

    table = narrow_table("splits: samples, features of full and fg views (N×V×D dtype), mean foreground area, "
                         "views with an empty mask, samples skipped")
    for col in ("split", "samples", "classes", "per class", "features", "mean A", "empty views", "skipped"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("split", "features") else "right")
    for split, e in report["splits"].items():
        feats = e["features"]
        shape = fmt(feats["full"]) if fmt(feats["full"]) == fmt(feats["fg"]) else f"{fmt(feats['full'])} / {fmt(feats['fg'])}"
        table.add_row(split, str(e["samples"]), str(e["classes_present"]), f"{e['per_class_min']}–{e['per_class_max']}",
                      shape, "-" if e["mask_area_mean"] is None else f"{e['mask_area_mean']:.3f}",
                      str(e["empty_mask_views"]), str(e["skipped"]))
    console.print(table)
    for name, src in report.get("fg_sources", {}).items():
        train = (src.get("stats") or {}).get("train") or {}
        area = "-" if train.get("mean_area") is None else f"{train['mean_area']:.3f}"
        console.print(f"mask source {escape(name)}: train mean area {area}, {escape(str(src.get('method') or 'masks'))} "
                      f"from {escape(str(src.get('mask_root')))}")
    for name, t in report["text"].items():
        console.print(f"{text_key(name)}: {t['shape']} {t['dtype']}" + (f"  template {t['template']!r}" if "template" in t else ""))
    if report["problems"]:
        for p in report["problems"]:
            console.print(f"[yellow]problem:[/] {escape(p)}")
    else:
        console.print("[green]no problems found[/]")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A cache file written by `fvgpt-cache extract`."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    verify: bool = typer.Option(False, help="Also re-hash every dataset and compare it with its stored digest."),
):
    """Show provenance, classes, splits, shapes, mask statistics and problems of a cache."""
    from fvgpt_cache import inspect_cache

    report = inspect_cache(path, verify=verify)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_inspection(report)

