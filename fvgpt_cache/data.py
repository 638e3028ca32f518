"""Dataset lists, Dassl few-shot sampling and the base/new class split (docs/method.md#few-shot, docs/datasets.md)."""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to the image root, its 0-based label and class name."""

    relpath: str
    label: int
    classname: str


@dataclass
class Dataset:
    """What a reader returns: the full (not yet few-shot) splits of one dataset."""

    name: str
    image_root: Path
    classnames: list[str]
    splits: dict[str, list[Sample]]
    template: str = "a photo of a {}."
    mask_root: Path | None = None
    split_file: Path | None = None
    split_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def classnames_from_samples(*sample_lists: list[Sample]) -> list[str]:
    """Class names in label order, checked to be consistent and gap-free."""
    names: dict[int, str] = {}
    for samples in sample_lists:
        for s in samples:
            if names.setdefault(s.label, s.classname) != s.classname:
                raise ValueError(
                    f"label {s.label} has two class names: {names[s.label]!r} and {s.classname!r}; "
                    "fix the split file so each label has one name"
                )
    if not names:
        raise ValueError("the dataset has no samples")
    if min(names) < 0:
        raise ValueError(f"negative label {min(names)}; labels must be 0-based")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise ValueError(
            f"labels must run 0..{max(names)} without gaps; missing {missing[:10]}; "
            "relabel the split file with consecutive 0-based labels"
        )
    return [names[i] for i in range(len(names))]


def read_split_json(split_file: Path) -> dict[str, list[Sample]]:
    """Read CoOp's split JSON: {"train": [[relpath, label, classname], ...], "val": ..., "test": ...}."""
    split_file = Path(split_file)
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    try:
        raw = json.loads(split_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"split file {split_file} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or not set(SPLITS) & set(raw):
        raise ValueError(f"split file {split_file} must be a JSON object with keys {list(SPLITS)}")
    for split in ("train", "test"):
        if split not in raw:
            raise ValueError(f"split file {split_file} has no {split!r} split (it has {sorted(raw)}); "
                             f"add a {split!r} list of [relpath, label, classname] entries")
        if not raw[split]:
            raise ValueError(f"split file {split_file}: the {split!r} split is empty; FVG-PT needs {split} images")
    out: dict[str, list[Sample]] = {}
    for split in SPLITS:
        items = raw.get(split, [])
        if not isinstance(items, list):
            raise ValueError(f"split file {split_file}: {split!r} must be a list of [relpath, label, classname], "
                             f"got {type(items).__name__}")
        samples = []
        for i, item in enumerate(items):
            if not (isinstance(item, (list, tuple)) and len(item) == 3):
                raise ValueError(
                    f"{split_file}: {split}[{i}] = {item!r}; expected [relpath, label, classname]"
                )
            relpath, label, classname = item
            samples.append(Sample(str(relpath), int(label), str(classname)))
        out[split] = samples
    return out


# Folder names that say nothing about the dataset: the name comes from the folder above them.
GENERIC_FOLDERS = {"images", "image", "imgs", "img", "jpg", "jpgs", "jpeg", "png", "pics", "pictures", "photos",
                   "data", "dataset", "files", "all", "train", "raw"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def default_dataset_name(image_root: Path) -> str:
    """The image root's folder name, or its parent's when the folder's name is generic (images, jpg, …)."""
    folder = Path(image_root).resolve()
    while folder.name.lower() in GENERIC_FOLDERS and folder.parent != folder:
        folder = folder.parent
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", folder.name).strip("._-+")
    return name or "dataset"


def check_dataset_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise ValueError(f"--name {name!r}: use letters, digits and . _ + - (it becomes a folder of the cache path)")
    return name


def generic_dataset(
    split_file: Path, image_root: Path, mask_root: Path | None = None, template: str = "a photo of a {}.",
    name: str | None = None,
) -> Dataset:
    """Any dataset given as a split JSON, an image root and an optional mirrored mask root.

    `name` defaults to the image root's folder name (its parent's for generic folders such as
    `images`), never to the split file's name, which is the same for most users.
    """
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise FileNotFoundError(f"image root not found: {image_root}")
    if mask_root is not None and not Path(mask_root).is_dir():
        raise FileNotFoundError(f"mask root not found: {mask_root}")
    splits = read_split_json(split_file)
    return Dataset(
        name=check_dataset_name(name) if name is not None else default_dataset_name(image_root),
        image_root=image_root,
        classnames=classnames_from_samples(*splits.values()),
        splits=splits,
        template=template,
        mask_root=Path(mask_root) if mask_root is not None else None,
        split_file=Path(split_file),
        split_sha256=sha256_of(Path(split_file)),
    )


def _group_by_label(samples: list[Sample]) -> "OrderedDict[int, list[Sample]]":
    groups: OrderedDict[int, list[Sample]] = OrderedDict()
    for s in samples:
        groups.setdefault(s.label, []).append(s)
    return groups


def _sample_fewshot(rng: random.Random, samples: list[Sample], shots: int) -> list[Sample]:
    out: list[Sample] = []
    for items in _group_by_label(samples).values():
        out.extend(rng.sample(items, shots) if len(items) >= shots else items)
    return out


def fewshot_splits(splits: dict[str, list[Sample]], shots: int, seed: int) -> dict[str, list[Sample]]:
    """Dassl's `generate_fewshot_dataset` as CoOp calls it.

    ``random`` is seeded with ``seed``; train gets ``shots`` per label (all if fewer), then val
    gets ``min(shots, 4)`` from the same random stream; test is untouched. ``shots <= 0`` keeps
    everything. A private ``random.Random`` gives the same stream as the seeded global one.
    """
    if shots <= 0:
        return {k: list(v) for k, v in splits.items()}
    rng = random.Random(seed)
    return {
        "train": _sample_fewshot(rng, splits.get("train", []), shots),
        "val": _sample_fewshot(rng, splits.get("val", []), min(shots, 4)),
        "test": list(splits.get("test", [])),
    }


def short_classes(splits: dict[str, list[Sample]], shots: int, classnames: list[str]) -> dict[str, list[dict]]:
    """Classes with fewer images than the few-shot draw asks for (Dassl then takes all of them).

    {"train": [{"label", "class", "count", "wanted"}, …], "val": […]}; splits without short classes are left out.
    """
    if shots <= 0:
        return {}
    out = {}
    for split, wanted in (("train", shots), ("val", min(shots, 4))):
        items = splits.get(split, [])
        if not items:
            continue
        counts = [0] * len(classnames)
        for s in items:
            counts[s.label] += 1
        short = [{"label": i, "class": classnames[i], "count": n, "wanted": wanted}
                 for i, n in enumerate(counts) if n < wanted]
        if short:
            out[split] = short
    return out


def format_short_classes(short: dict[str, list[dict]], limit: int = 12) -> list[str]:
    """One line per split: 'train: triangle: 5 < 8, star: 0 < 8 (+3 more)'."""
    lines = []
    for split, items in short.items():
        shown = ", ".join(f"{c['class']}: {c['count']} < {c['wanted']}" for c in items[:limit])
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        lines.append(f"{split}: {shown}{more}")
    return lines


def parse_shots(value: str | int) -> int:
    """`--shots 16`, `--shots 0` or `--shots all` (0 and all keep every image)."""
    if isinstance(value, int):
        shots = value
    elif str(value).strip().lower() == "all":
        return 0
    else:
        try:
            shots = int(value)
        except ValueError:
            raise ValueError(f"--shots must be a non-negative integer or 'all', got {value!r}") from None
    if shots < 0:
        raise ValueError(f"--shots must be a non-negative integer or 'all', got {value!r}")
    return shots


def base_new_split(num_classes: int) -> tuple[list[int], list[int]]:
    """Sorted label ids: base is the first ceil(n/2), new the rest (CoOp's subsample_classes)."""
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))
