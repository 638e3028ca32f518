"""The eleven CoOp datasets by name: folder layout, split files and CLIP templates (docs/datasets.md#the-eleven-datasets).

The readers mirror CoOp's ``datasets/*.py``: ten datasets read a ``split_zhou_*.json`` file,
``fgvc_aircraft`` reads the FGVC text files and ``imagenet`` lists its image folders. Every
reader returns the full splits; few-shot sampling happens later (``data.fewshot_splits``).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .data import SPLITS, Dataset, Sample, classnames_from_samples, read_split_json, sha256_of


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset lives under the data root and how it is read.

    ``image_dir`` is relative to the dataset folder ("" = the folder itself). ``split_file`` is
    the file whose presence identifies the dataset folder. ``num_classes`` is the class count of
    the full public release; it is informational, not enforced, so partial copies still load.
    """

    folder: str
    image_dir: str
    split_file: str
    num_classes: int
    template: str
    layout: str = "json"


DATASETS: dict[str, DatasetInfo] = {
    "imagenet": DatasetInfo("imagenet", "images", "classnames.txt", 1000, "a photo of a {}.", "imagenet"),
    "caltech101": DatasetInfo("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100,
                              "a photo of a {}."),
    "oxford_pets": DatasetInfo("oxford_pets", "images", "split_zhou_OxfordPets.json", 37,
                               "a photo of a {}, a type of pet."),
    "stanford_cars": DatasetInfo("stanford_cars", "", "split_zhou_StanfordCars.json", 196, "a photo of a {}."),
    "oxford_flowers": DatasetInfo("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102,
                                  "a photo of a {}, a type of flower."),
    "food101": DatasetInfo("food-101", "images", "split_zhou_Food101.json", 101, "a photo of {}, a type of food."),
    "fgvc_aircraft": DatasetInfo("fgvc_aircraft", "images", "variants.txt", 100,
                                 "a photo of a {}, a type of aircraft.", "aircraft"),
    "sun397": DatasetInfo("sun397", "SUN397", "split_zhou_SUN397.json", 397, "a photo of a {}."),
    "dtd": DatasetInfo("dtd", "images", "split_zhou_DescribableTextures.json", 47, "{} texture."),
    "eurosat": DatasetInfo("eurosat", "2750", "split_zhou_EuroSAT.json", 10, "a centered satellite photo of {}."),
    "ucf101": DatasetInfo("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", 101,
                          "a photo of a person doing {}."),
}

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG")
AIRCRAFT_SPLIT_FILES = {split: f"images_variant_{split}.txt" for split in SPLITS}
IMAGENET_VAL_NOTE = (
    "val is empty: CoOp's ImageNet sets val = test (images/val) and few-shot samples train only; "
    "an empty val keeps the val few-shot draw from consuming test images"
)


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None


def template_for(name: str) -> str:
    """The dataset's hand-written CLIP template, e.g. ``"{} texture."`` for dtd."""
    return dataset_info(name).template


def resolve_dataset_dir(name: str, root: Path) -> Path:
    """The first of ``root/<folder>``, ``root/<folder>/<folder>``, ``root`` holding the split file."""
    info = dataset_info(name)
    root = Path(root)
    tried = list(dict.fromkeys([root / info.folder, root / info.folder / info.folder, root]))
    for candidate in tried:
        if (candidate / info.split_file).is_file():
            return candidate
    listing = "\n".join(f"  {p / info.split_file}" for p in tried)
    raise FileNotFoundError(
        f"dataset {name!r}: {info.split_file} not found; tried:\n{listing}\n"
        f"pass --data as the folder that contains {info.folder}/ "
        f"(so that <data>/{info.folder}/{info.split_file} exists)"
    )


def find_mask(mask_root: Path, relpath: str) -> Path | None:
    """The mask mirroring ``relpath`` under ``mask_root``: the image's own extension first, then
    .png, .jpg, .jpeg, .PNG, .JPG; None when there is none."""
    base = Path(mask_root) / relpath
    for candidate in dict.fromkeys([base, *(base.with_suffix(s) for s in MASK_SUFFIXES)]):
        if candidate.is_file():
            return candidate
    return None


def resolve_mask_root(dataset_dir: Path, image_dir: str, probe: str | None, mask_root: Path | None = None) -> Path | None:
    """The folder whose relative paths mirror the image folder's.

    Candidates are ``base`` and ``base/<image_dir>``, where ``base`` is ``mask_root`` if given,
    else ``<dataset_dir>/mask``. The first candidate holding the mask of ``probe`` wins; failing
    that, the first existing candidate; with no mask folder at all, None.
    """
    if mask_root is not None:
        base = Path(mask_root)
        if not base.is_dir():
            raise FileNotFoundError(f"mask root not found: {base}; pass a folder mirroring the image folder")
    else:
        base = Path(dataset_dir) / "mask"
    candidates = [c for c in dict.fromkeys([base, base / image_dir]) if c.is_dir()]
    if probe is not None:
        for candidate in candidates:
            if find_mask(candidate, probe) is not None:
                return candidate
    return candidates[0] if candidates else None


@dataclass
class _Read:
    splits: dict[str, list[Sample]]
    classnames: list[str]
    split_file: Path
    split_sha256: str
    extra: dict


def _read_json(dataset_dir: Path, info: DatasetInfo) -> _Read:
    split_file = dataset_dir / info.split_file
    splits = read_split_json(split_file)
    return _Read(splits, classnames_from_samples(*splits.values()), split_file, sha256_of(split_file), {})


def _id_and_name(path: Path, lineno: int, line: str) -> tuple[str, str]:
    """CoOp's ``line.split(" ")`` → first token, the rest joined by single spaces."""
    key, _, name = line.partition(" ")
    if not key or not name:
        raise ValueError(f"{path}:{lineno}: {line!r}; expected '<id> <name>'")
    return key, name


def _nonblank_lines(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(i, line.strip()) for i, line in enumerate(lines, 1) if line.strip()]


def _read_aircraft(dataset_dir: Path, info: DatasetInfo) -> _Read:
    """FGVC-Aircraft as CoOp reads it: labels follow variants.txt line order, images are
    ``<imageid>.jpg``. ``split_file`` is variants.txt; ``split_sha256`` is the SHA-256 of the
    lines ``"<file> <sha256>\\n"`` for variants.txt and images_variant_{train,val,test}.txt, in
    that order, so it changes when any of the four files does (per-file hashes in ``extra``)."""
    variants_file = dataset_dir / info.split_file
    classnames = [line for _, line in _nonblank_lines(variants_file)]
    label_of = {name: label for label, name in enumerate(classnames)}
    if len(label_of) != len(classnames):
        dupes = sorted({n for n in classnames if classnames.count(n) > 1})
        raise ValueError(f"{variants_file}: variants listed twice: {dupes}; each variant must appear once")
    files = {"variants": variants_file}
    splits: dict[str, list[Sample]] = {}
    for split, fname in AIRCRAFT_SPLIT_FILES.items():
        path = files[split] = dataset_dir / fname
        if not path.is_file():
            raise FileNotFoundError(f"fgvc_aircraft: {path} not found; it must sit next to {variants_file.name}")
        samples = []
        for lineno, line in _nonblank_lines(path):
            image_id, variant = _id_and_name(path, lineno, line)
            if variant not in label_of:
                raise ValueError(f"{path}:{lineno}: variant {variant!r} is not in {variants_file}")
            samples.append(Sample(f"{image_id}.jpg", label_of[variant], variant))
        splits[split] = samples
    hashes = {path.name: sha256_of(path) for path in files.values()}
    combined = hashlib.sha256("".join(f"{n} {h}\n" for n, h in hashes.items()).encode()).hexdigest()
    return _Read(splits, classnames, variants_file, combined, {"split_files_sha256": hashes})


def _listdir_nohidden(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


def _read_imagenet(dataset_dir: Path, info: DatasetInfo) -> _Read:
    """ImageNet as CoOp reads it, with two documented departures.

    Labels follow the sorted wnid folders of ``images/train`` (CoOp: ``listdir_nohidden(sort=True)``)
    and names come from classnames.txt (``<wnid> <name with spaces>``). Train lists
    ``images/train``, test lists ``images/val``. Departures: file names inside a class folder are
    sorted (CoOp's unsorted ``os.listdir`` order depends on the filesystem, which would make the
    few-shot draw irreproducible), and val is empty instead of a copy of test (see
    ``extra["val_note"]``). ``split_sha256`` is the SHA-256 of classnames.txt;
    ``extra["listing_sha256"]`` hashes the listed relpaths and labels.
    """
    names_file = dataset_dir / info.split_file
    name_of = dict(_id_and_name(names_file, n, line) for n, line in _nonblank_lines(names_file))
    image_root = dataset_dir / info.image_dir
    folders: dict[str, list[str]] = {}
    for split in ("train", "val"):
        split_dir = image_root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"imagenet: {split_dir} not found; expected images/train/<wnid>/ and images/val/<wnid>/")
        folders[split] = [w for w in _listdir_nohidden(split_dir) if (split_dir / w).is_dir()]
    if folders["train"] != folders["val"]:
        only = sorted(set(folders["train"]) ^ set(folders["val"]))
        raise ValueError(f"imagenet: images/train and images/val must hold the same wnid folders; differing: {only[:10]}")
    unnamed = [w for w in folders["train"] if w not in name_of]
    if unnamed:
        raise ValueError(f"imagenet: wnid folders missing from {names_file}: {unnamed[:10]}; add a line '<wnid> <name>'")
    classnames = [name_of[w] for w in folders["train"]]
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for split, source in (("train", "train"), ("test", "val")):
        for label, wnid in enumerate(folders[source]):
            for fname in _listdir_nohidden(image_root / source / wnid):
                splits[split].append(Sample(f"{source}/{wnid}/{fname}", label, classnames[label]))
    listing = "".join(f"{s.relpath} {s.label}\n" for split in SPLITS for s in splits[split])
    extra = {
        "val_empty": True,
        "val_note": IMAGENET_VAL_NOTE,
        "listing_sha256": hashlib.sha256(listing.encode()).hexdigest(),
    }
    return _Read(splits, classnames, names_file, sha256_of(names_file), extra)


READERS: dict[str, Callable[[Path, DatasetInfo], _Read]] = {
    "json": _read_json,
    "aircraft": _read_aircraft,
    "imagenet": _read_imagenet,
}


def load_dataset(name: str, root: Path, mask_root: Path | None = None) -> Dataset:
    """Read one of ``DATASETS`` from the data root (the folder containing ``<folder>/``).

    Returns the full train/val/test splits, class names in label order (underscores kept), the
    CLIP template, the split file and its SHA-256 (see the imagenet and fgvc_aircraft readers
    for their split files and hashes) and the mask root (see ``resolve_mask_root``; None when the
    dataset has no mask folder).
    """
    info = dataset_info(name)
    dataset_dir = resolve_dataset_dir(name, root)
    image_root = dataset_dir / info.image_dir
    if not image_root.is_dir():
        raise FileNotFoundError(
            f"dataset {name!r}: found {dataset_dir / info.split_file} but no image folder {image_root}"
        )
    read = READERS[info.layout](dataset_dir, info)
    probe = next((s.relpath for split in SPLITS for s in read.splits.get(split, [])), None)
    return Dataset(
        name=name,
        image_root=image_root,
        classnames=read.classnames,
        splits=read.splits,
        template=info.template,
        mask_root=resolve_mask_root(dataset_dir, info.image_dir, probe, mask_root),
        split_file=read.split_file,
        split_sha256=read.split_sha256,
        extra=read.extra,
    )
