"""Miniature copies of the eleven CoOp folder trees, read back through load_dataset."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from fvgpt_cache.data import SPLITS
from fvgpt_cache.datasets import DATASETS, find_mask, load_dataset, template_for

COUNTS = {"train": 4, "val": 2, "test": 2}


@dataclass(frozen=True)
class Layout:
    """A miniature tree: classes as (class name, path key), a relpath pattern, the mask suffix."""

    classes: tuple[tuple[str, str], ...]
    pattern: str
    template: str
    mask_suffix: str = ".png"


# Templates written out from CoOp's dataset configs (docs/datasets.md#the-eleven-datasets), so the test
# checks DATASETS against them, not against itself.
JSON_LAYOUTS = {
    "caltech101": Layout((("accordion", "accordion"), ("face", "Faces_easy"), ("water_lilly", "water_lilly")),
                         "{key}/image_{i:04d}.jpg", "a photo of a {}."),
    "oxford_pets": Layout((("abyssinian", "Abyssinian"), ("american_bulldog", "american_bulldog"),
                           ("yorkshire_terrier", "yorkshire_terrier")),
                          "{key}_{i}.jpg", "a photo of a {}, a type of pet.", ".jpg"),
    "stanford_cars": Layout((("2012 Tesla Model S", "a"), ("AM General Hummer SUV 2000", "b"),
                             ("smart fortwo Convertible 2012", "c")),
                            "cars_{split}/{key}{i:05d}.jpg", "a photo of a {}."),
    "oxford_flowers": Layout((("pink primrose", "a"), ("hard-leaved pocket orchid", "b"), ("canterbury bells", "c")),
                             "image_{key}{i:05d}.jpg", "a photo of a {}, a type of flower.", ".jpg"),
    "food101": Layout((("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("baklava", "baklava")),
                      "{key}/{i}.jpg", "a photo of {}, a type of food."),
    "sun397": Layout((("abbey", "a/abbey"), ("airplane_cabin", "a/airplane_cabin"),
                      ("apartment_building outdoor", "a/apartment_building/outdoor")),
                     "{key}/sun_{i:04d}.jpg", "a photo of a {}.", ".jpg"),
    "dtd": Layout((("banded", "banded"), ("blotchy", "blotchy"), ("braided", "braided")),
                  "{key}/{key}_{i:04d}.jpg", "{} texture."),
    "eurosat": Layout((("Annual Crop Land", "AnnualCrop"), ("Forest", "Forest"),
                       ("Herbaceous Vegetation Land", "HerbaceousVegetation")),
                      "{key}/{key}_{i}.jpg", "a centered satellite photo of {}.", ".jpg"),
    "ucf101": Layout((("Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Apply_Lipstick", "Apply_Lipstick"),
                      ("Archery", "Archery")),
                     "{key}/v_{key}_g{i:02d}_c01.jpg", "a photo of a person doing {}.", ".png"),
}
AIRCRAFT = Layout((("707-320", ""), ("Falcon 2000", ""), ("F/A-18", "")), "{i:07d}.jpg",
                  "a photo of a {}, a type of aircraft.", ".jpg")
IMAGENET = Layout((("tench", "n01440764"), ("great white shark", "n01484850"), ("goldfish", "n01443537")),
                  "{split}/{key}/{key}_{i}.JPEG", "a photo of a {}.", ".png")
ALL_NAMES = [*JSON_LAYOUTS, "fgvc_aircraft", "imagenet"]


def _image(path: Path, color: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (8, 8), (color % 256, 40, 200)).save(path, fmt)


def _mask(mask_root: Path, relpath: str, suffix: str) -> None:
    path = (mask_root / relpath).with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 255).save(path, "PNG" if suffix == ".png" else "JPEG")


def _build_json(ddir: Path, name: str) -> list[str]:
    """Images, masks and split JSON; returns expected class names in label order."""
    layout, info = JSON_LAYOUTS[name], DATASETS[name]
    image_root = ddir / info.image_dir
    split, i = {}, 0
    for s in SPLITS:
        split[s] = []
        for label, (cname, key) in enumerate(layout.classes):
            for _ in range(COUNTS[s]):
                i += 1
                rel = layout.pattern.format(key=key, i=i, split=s)
                _image(image_root / rel, i)
                _mask(ddir / "mask", rel, layout.mask_suffix)
                split[s].append([rel, label, cname])
    (ddir / info.split_file).write_text(json.dumps(split))
    return [c for c, _ in layout.classes]


def _build_aircraft(ddir: Path, name: str) -> list[str]:
    names = [c for c, _ in AIRCRAFT.classes]
    (ddir / "variants.txt").write_text("".join(f"{n}\n" for n in names))
    i = 1000
    for s in SPLITS:
        lines = []
        for cname in names:
            for _ in range(COUNTS[s]):
                i += 1
                rel = AIRCRAFT.pattern.format(i=i)
                _image(ddir / "images" / rel, i)
                _mask(ddir / "mask", rel, AIRCRAFT.mask_suffix)
                lines.append(f"{i:07d} {cname}\n")
        (ddir / f"images_variant_{s}.txt").write_text("".join(lines))
    return names


def _build_imagenet(ddir: Path, name: str) -> list[str]:
    by_wnid = {key: c for c, key in IMAGENET.classes}
    (ddir / "classnames.txt").write_text("".join(f"{k} {c}\n" for k, c in by_wnid.items()) + "n99999999 unused class\n")
    for source, n in (("train", COUNTS["train"]), ("val", COUNTS["test"])):
        for key in by_wnid:
            for i in reversed(range(n)):
                rel = IMAGENET.pattern.format(split=source, key=key, i=i)
                _image(ddir / "images" / rel, i)
                _mask(ddir / "mask", rel, IMAGENET.mask_suffix)
            (ddir / "images" / source / key / ".DS_Store").write_text("")
        (ddir / "images" / source / ".hidden").mkdir()
    return [by_wnid[k] for k in sorted(by_wnid)]


BUILDERS = {**dict.fromkeys(JSON_LAYOUTS, _build_json), "fgvc_aircraft": _build_aircraft, "imagenet": _build_imagenet}
TEMPLATES = {**{n: lay.template for n, lay in JSON_LAYOUTS.items()},
             "fgvc_aircraft": AIRCRAFT.template, "imagenet": IMAGENET.template}


def build(tmp_path: Path, name: str, nested: bool = False) -> tuple[Path, list[str]]:
    folder = DATASETS[name].folder
    ddir = tmp_path / folder / folder if nested else tmp_path / folder
    ddir.mkdir(parents=True)
    return tmp_path, BUILDERS[name](ddir, name)


def test_registry_matches_spec():
    assert sorted(DATASETS) == sorted(ALL_NAMES)
    assert {n: template_for(n) for n in DATASETS} == TEMPLATES


@pytest.mark.parametrize("name", ALL_NAMES)
def test_load_each_layout(tmp_path, name):
    root, classnames = build(tmp_path, name)
    ds = load_dataset(name, root)
    assert ds.name == name
    assert ds.classnames == classnames
    assert ds.template == TEMPLATES[name] == template_for(name)
    expected_val = 0 if name == "imagenet" else COUNTS["val"] * 3
    assert {s: len(ds.splits[s]) for s in SPLITS} == {"train": 12, "val": expected_val, "test": 6}
    assert ds.split_file is not None and ds.split_file.is_file()
    assert len(ds.split_sha256) == 64
    assert ds.mask_root == root / DATASETS[name].folder / "mask"
    for split in SPLITS:
        for s in ds.splits[split]:
            assert (ds.image_root / s.relpath).is_file(), s.relpath
            assert ds.classnames[s.label] == s.classname
            mask = find_mask(ds.mask_root, s.relpath)
            assert mask is not None and mask.stem == Path(s.relpath).stem, s.relpath


def test_imagenet_order_and_val(tmp_path):
    root, _ = build(tmp_path, "imagenet")
    ds = load_dataset("imagenet", root)
    assert ds.extra["val_empty"] is True and ds.splits["val"] == []
    train = [s.relpath for s in ds.splits["train"]]
    assert train[:4] == [f"train/n01440764/n01440764_{i}.JPEG" for i in range(4)]
    assert [s.label for s in ds.splits["test"]] == [0, 0, 1, 1, 2, 2]
    assert all(s.relpath.startswith("val/") for s in ds.splits["test"])


@pytest.mark.parametrize("name", ["caltech101", "food101", "fgvc_aircraft", "imagenet"])
def test_nested_folder_resolves(tmp_path, name):
    root, classnames = build(tmp_path, name, nested=True)
    folder = DATASETS[name].folder
    ds = load_dataset(name, root)
    assert ds.image_root == root / folder / folder / DATASETS[name].image_dir
    assert ds.classnames == classnames
    assert ds.mask_root == root / folder / folder / "mask"


def test_root_may_be_the_dataset_folder(tmp_path):
    root, _ = build(tmp_path, "dtd")
    assert load_dataset("dtd", root / "dtd").image_root == root / "dtd" / "images"


def test_mask_layouts(tmp_path):
    root, _ = build(tmp_path, "food101")
    ddir = root / "food-101"
    (ddir / "mask").rename(tmp_path / "elsewhere")
    assert load_dataset("food101", root).mask_root is None
    assert load_dataset("food101", root, mask_root=tmp_path / "elsewhere").mask_root == tmp_path / "elsewhere"
    (ddir / "mask").mkdir()
    (tmp_path / "elsewhere").rename(ddir / "mask" / "images")
    ds = load_dataset("food101", root)
    assert ds.mask_root == ddir / "mask" / "images"
    assert find_mask(ds.mask_root, ds.splits["train"][0].relpath) is not None
    with pytest.raises(FileNotFoundError, match="mask root not found"):
        load_dataset("food101", root, mask_root=tmp_path / "nope")


def test_find_mask_prefers_own_extension(tmp_path):
    _image(tmp_path / "a" / "x.jpg", 1)
    _image(tmp_path / "a" / "x.png", 2)
    assert find_mask(tmp_path, "a/x.jpg") == tmp_path / "a" / "x.jpg"
    assert find_mask(tmp_path, "a/x.JPEG") == tmp_path / "a" / "x.png"
    assert find_mask(tmp_path, "a/y.jpg") is None


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'") as err:
        load_dataset("cifar10", tmp_path)
    assert all(n in str(err.value) for n in DATASETS)
    with pytest.raises(ValueError, match="valid names"):
        template_for("cifar10")


def test_missing_dataset_names_paths_tried(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("caltech101", tmp_path)
    msg = str(err.value)
    for tried in (tmp_path / "caltech-101", tmp_path / "caltech-101" / "caltech-101", tmp_path):
        assert str(tried / "split_zhou_Caltech101.json") in msg
    assert "--data" in msg


def test_missing_image_folder(tmp_path):
    root, _ = build(tmp_path, "dtd")
    (root / "dtd" / "images").rename(root / "dtd" / "pictures")
    with pytest.raises(FileNotFoundError, match="no image folder"):
        load_dataset("dtd", root)


@pytest.mark.parametrize("edit, message", [
    (lambda sp: sp["train"][0].__setitem__(1, 5), "without gaps"),
    (lambda sp: sp["test"][0].__setitem__(2, "Dog"), "two class names"),
])
def test_bad_split_json(tmp_path, edit, message):
    root, _ = build(tmp_path, "dtd")
    split_file = root / "dtd" / DATASETS["dtd"].split_file
    split = json.loads(split_file.read_text())
    edit(split)
    split_file.write_text(json.dumps(split))
    with pytest.raises(ValueError, match=message):
        load_dataset("dtd", root)


def test_aircraft_unknown_variant(tmp_path):
    root, _ = build(tmp_path, "fgvc_aircraft")
    with open(root / "fgvc_aircraft" / "images_variant_val.txt", "a") as fh:
        fh.write("0000001 Concorde\n")
    with pytest.raises(ValueError, match="'Concorde' is not in"):
        load_dataset("fgvc_aircraft", root)


def test_aircraft_hash_covers_every_split_file(tmp_path):
    root, _ = build(tmp_path, "fgvc_aircraft")
    before = load_dataset("fgvc_aircraft", root).split_sha256
    test_file = root / "fgvc_aircraft" / "images_variant_test.txt"
    test_file.write_text(test_file.read_text().splitlines(keepends=True)[0])
    assert load_dataset("fgvc_aircraft", root).split_sha256 != before


def test_imagenet_inconsistent_folders(tmp_path):
    root, _ = build(tmp_path, "imagenet")
    (root / "imagenet" / "images" / "val" / "n01440764").rename(root / "imagenet" / "images" / "val" / "n00000001")
    with pytest.raises(ValueError, match="same wnid folders"):
        load_dataset("imagenet", root)
