import json
import random
import re
from collections import defaultdict

import h5py
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, write_generic_dataset
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from fvgpt_cache.data import Sample, fewshot_splits, generic_dataset
from fvgpt_cache.extraction import ExtractionError, ExtractOptions, extract
from fvgpt_cache.store import CacheError, exclusive_lock, open_cache, partial_path

OPTS = dict(shots=4, seed=1, workers=0, batch_size=5)


def _dataset(generic_data):
    return generic_dataset(*generic_data)


def _eval_preprocess(loaded):
    pp = loaded.preprocess
    return open_clip.image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
                                     interpolation=pp["interpolation"], resize_mode=pp["resize_mode"])


def _open_clip_features(loaded, pixels):
    with torch.no_grad():
        return F.normalize(loaded.model.encode_image(pixels), dim=-1)


def _reference(tiny_model, img, mask, geometry, fg_mode="normalized"):
    """Features of one view computed independently with torchvision and open_clip's encode_image."""
    mean = torch.tensor(tiny_model.preprocess["mean"]).view(3, 1, 1)
    std = torch.tensor(tiny_model.preprocess["std"]).view(3, 1, 1)
    img_v, mask_v = geometry(img), geometry(mask, nearest=True)
    x = T.ToTensor()(img_v)
    m = (T.ToTensor()(mask_v.convert("RGB")).mean(0, keepdim=True) > 0.5).float()
    full = (x - mean) / std
    fg = full * m if fg_mode == "normalized" else (x * m - mean) / std
    return _open_clip_features(tiny_model, torch.stack([full, fg])), m.mean().item()


def _geometries(size, box=None):
    interp = lambda nearest: T.InterpolationMode.NEAREST if nearest else T.InterpolationMode.BICUBIC  # noqa: E731
    return {
        "eval": lambda im, nearest=False: T.CenterCrop(size)(T.Resize(size, interpolation=interp(nearest))(im)),
        "squash": lambda im, nearest=False: T.Resize((size, size), interpolation=interp(nearest))(im),
        "box": lambda im, nearest=False: (lambda c: TF.hflip(c) if box[4] else c)(
            TF.resized_crop(im, int(box[0]), int(box[1]), int(box[2]), int(box[3]), [size, size], interp(nearest))),
    }


@pytest.mark.parametrize("fg_mode", ["normalized", "pixel"])
def test_every_view_equals_an_independent_torchvision_open_clip_forward(tmp_path, generic_data, tiny_model, fg_mode):
    """val/test: open_clip's eval transform; train view 0: Dassl's squash Resize((S, S)); train views 1+:
    the stored random resized crop + flip. Foreground: normalise(x)·m (default) or pixel space."""
    split, image_root, mask_root = generic_data
    cache = open_cache(extract(_dataset(generic_data), tiny_model, tmp_path / "c.h5",
                               ExtractOptions(**OPTS, train_views=3, fg_mode=fg_mode)).out)
    size = tiny_model.preprocess["size"]
    preprocess = _eval_preprocess(tiny_model)
    checked_nonsquare = False
    for split_name in ("train", "test"):
        full, fg = cache.image(split_name, "full"), cache.image(split_name, "fg")
        areas, boxes = cache.areas(split_name), cache.boxes(split_name)
        for i, rel in enumerate(cache.paths(split_name)):
            img = Image.open(image_root / rel).convert("RGB")
            mask = Image.open((mask_root / rel).with_suffix(".png"))
            checked_nonsquare |= img.width != img.height
            kinds = ["eval"] if split_name == "test" else ["squash", "box", "box"]
            for v, kind in enumerate(kinds):
                box = boxes[i, v].tolist()
                assert (box[2] < 0) == (kind != "box")
                ref, area = _reference(tiny_model, img, mask, _geometries(size, box)[kind], fg_mode)
                assert F.cosine_similarity(full[i, v], ref[0], dim=0) > 0.999
                assert F.cosine_similarity(fg[i, v], ref[1], dim=0) > 0.999
                assert areas[i, v].item() == pytest.approx(area)
            if split_name == "test":  # the eval view is exactly open_clip's own preprocessing
                ref_full = _open_clip_features(tiny_model, preprocess(img).unsqueeze(0))[0]
                assert F.cosine_similarity(full[i, 0], ref_full, dim=0) > 0.999
    assert checked_nonsquare, "the squash must be checked on non-square images"
    train = cache.image("train", "full")
    assert not torch.allclose(train[:, 0], train[:, 1]), "augmented view must differ from the deterministic view"
    assert cache.provenance["fg_mode"] == fg_mode


def test_squash_differs_from_the_centre_crop_on_a_non_square_image(tiny_model):
    from fvgpt_cache.views import ViewMaker

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))
    mask = Image.new("L", img.size, 255)
    maker = ViewMaker(tiny_model.preprocess)
    squash, _, _ = maker(img, mask, "squash")
    size = tiny_model.preprocess["size"]
    ref = T.Normalize(tiny_model.preprocess["mean"], tiny_model.preprocess["std"])(
        T.ToTensor()(T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)(img)))
    assert torch.equal(squash, ref)
    centre, _, _ = maker(img, mask, "eval")
    assert not torch.allclose(squash, centre)


def test_normalized_foreground_is_normalised_image_times_mask_by_hand(tiny_model):
    from fvgpt_cache.views import ViewMaker

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    m = np.zeros((32, 32), np.uint8)
    m[4:20, 8:30] = 255
    full, fg, area = ViewMaker(tiny_model.preprocess)(img, Image.fromarray(m), "eval")
    mean = torch.tensor(tiny_model.preprocess["mean"]).view(3, 1, 1)
    std = torch.tensor(tiny_model.preprocess["std"]).view(3, 1, 1)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    by_hand = (x - mean) / std * torch.from_numpy(m > 0).float()
    assert torch.allclose(fg, by_hand, atol=1e-6)
    assert torch.allclose(full, (x - mean) / std, atol=1e-6)
    assert area == pytest.approx(16 * 22 / 32 / 32)


def test_grey_rgb_mask_is_binarised_by_channel_mean():
    from fvgpt_cache.views import binarize_mask

    # channel means 0.6, 0.4, 0.502 (128/255) and 0.498 (127/255): > 0.5 is foreground
    px = np.array([[[255, 255, 0], [0, 0, 255], [128, 128, 128], [127, 127, 127]]], dtype=np.uint8)
    got = np.asarray(binarize_mask(Image.fromarray(px)))
    assert got.tolist() == [[255, 0, 255, 0]]
    # the first channel alone would have said otherwise for the first two pixels' colours
    px2 = np.array([[[255, 0, 0], [0, 255, 255]]], dtype=np.uint8)
    assert np.asarray(binarize_mask(Image.fromarray(px2))).tolist() == [[0, 255]]


def test_text_features_equal_open_clip_encode_text(tmp_path, generic_data, tiny_model):
    cache = open_cache(extract(_dataset(generic_data), tiny_model, tmp_path / "c.h5",
                               ExtractOptions(**OPTS, template="a photo of a {}, a shape.")).out)
    texts = [f"a photo of a {c.replace('_', ' ')}, a shape." for c in cache.classnames]
    with torch.no_grad():
        ref = F.normalize(tiny_model.model.encode_text(tiny_model.tokenizer(texts)), dim=-1)
    assert torch.allclose(cache.text("clip"), ref, atol=1e-6)
    assert cache.text_attrs("clip")["template"] == "a photo of a {}, a shape."
    assert cache.logit_scale == pytest.approx(tiny_model.model.logit_scale.exp().item())


def _dassl_reference(train, val, shots, seed):
    """Dassl's generate_fewshot_dataset as CoOp calls it, written against the global `random`."""
    random.seed(seed)

    def sample(source, k):
        tracker = defaultdict(list)
        for item in source:
            tracker[item.label].append(item)
        out = []
        for items in tracker.values():
            out.extend(random.sample(items, k) if len(items) >= k else items)
        return out

    return sample(train, shots), sample(val, min(shots, 4))


@pytest.mark.parametrize("seed", [1, 2, 3, 17])
@pytest.mark.parametrize("shots", [1, 4, 16])
def test_fewshot_equals_dassl(seed, shots):
    rng = random.Random(99)
    train = [Sample(f"tr{i}.jpg", lab, f"c{lab}") for i, lab in enumerate(rng.choices(range(7), k=200))]
    train += [Sample("rare.jpg", 7, "c7")]  # fewer images than shots: all are kept
    val = [Sample(f"va{i}.jpg", lab, f"c{lab}") for i, lab in enumerate(rng.choices(range(8), k=60))]
    got = fewshot_splits({"train": train, "val": val, "test": val}, shots, seed)
    ref_train, ref_val = _dassl_reference(train, val, shots, seed)
    assert got["train"] == ref_train
    assert got["val"] == ref_val
    assert got["test"] == val


def test_fewshot_zero_keeps_everything():
    train = [Sample(f"{i}.jpg", i % 3, f"c{i % 3}") for i in range(10)]
    assert fewshot_splits({"train": train, "val": [], "test": []}, 0, 1)["train"] == train


def _contents(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
    return out


def test_interrupted_extraction_resumes_to_identical_contents(tmp_path, generic_data, tiny_model):
    ds = _dataset(generic_data)
    opts = ExtractOptions(**OPTS, train_views=3)
    ref = extract(ds, tiny_model, tmp_path / "ref.h5", opts).out
    out = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(ds, tiny_model, out, opts, stop_after_batches=5)
    assert not out.exists() and partial_path(out).exists()
    with pytest.raises(CacheError, match="unfinished|resume"):
        open_cache(out)
    summary = extract(ds, tiny_model, out, opts)
    assert summary.resumed_rows == 16 + 5  # train is 4 batches (5+5+5+1), then one val batch
    assert not partial_path(out).exists()
    a, b = _contents(ref), _contents(out)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_partial_with_other_settings_is_not_continued(tmp_path, generic_data, tiny_model):
    ds = _dataset(generic_data)
    out = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(ds, tiny_model, out, ExtractOptions(**OPTS), stop_after_batches=1)
    with pytest.raises(CacheError, match="different settings"):
        extract(ds, tiny_model, out, ExtractOptions(**{**OPTS, "seed": 2}))
    extract(ds, tiny_model, out, ExtractOptions(**{**OPTS, "seed": 2}, resume=False))
    assert open_cache(out).provenance["seed"] == 2


def test_existing_cache_needs_force_and_second_writer_is_refused(tmp_path, generic_data, tiny_model):
    """Without --force an existing cache is refused and left as it was; with --force it is replaced by exactly
    what a fresh extraction with the new settings writes.
    Break used: `extract` keeping an existing output under --force (`os.replace(part, out)` skipped when `out`
    exists): the old check only saw that --force did not raise."""
    ds = _dataset(generic_data)
    out = tmp_path / "c.h5"
    extract(ds, tiny_model, out, ExtractOptions(**OPTS))
    first = _contents(out)
    with pytest.raises(CacheError, match="--force"):
        extract(ds, tiny_model, out, ExtractOptions(**OPTS))
    assert all(np.array_equal(v, first[k]) for k, v in _contents(out).items())
    other = {**OPTS, "seed": 2}
    extract(ds, tiny_model, out, ExtractOptions(**other, force=True))
    extract(ds, tiny_model, tmp_path / "fresh.h5", ExtractOptions(**other))
    forced, fresh = _contents(out), _contents(tmp_path / "fresh.h5")
    assert open_cache(out).provenance["seed"] == 2 and forced.keys() == fresh.keys()
    assert all(np.array_equal(forced[k], fresh[k]) for k in fresh)
    assert not np.array_equal(forced["samples/train/path"], first["samples/train/path"]), "another few-shot draw"
    assert not partial_path(out).exists()
    with exclusive_lock(out):
        with pytest.raises(CacheError, match="this process is already writing"):
            extract(ds, tiny_model, out, ExtractOptions(**OPTS, force=True))


@pytest.mark.slow
def test_missing_mask_policies(tmp_path, generic_data, tiny_model):
    split, image_root, mask_root = generic_data
    victim = "blue_square/test_0.png"
    (mask_root / victim).unlink()
    ds = _dataset(generic_data)
    with pytest.raises(ExtractionError, match="blue_square/test_0.jpg.*--missing-mask"):
        extract(ds, tiny_model, tmp_path / "e.h5", ExtractOptions(**OPTS))
    full = open_cache(extract(ds, tiny_model, tmp_path / "f.h5", ExtractOptions(**OPTS, missing_mask="full")).out)
    assert full.provenance["full_mask_images"] == ["blue_square/test_0.jpg"]
    i = full.paths("test").index("blue_square/test_0.jpg")
    assert full.areas("test")[i, 0] == 1.0
    assert torch.allclose(full.image("test", "fg")[i], full.image("test", "full")[i])
    skip = open_cache(extract(ds, tiny_model, tmp_path / "s.h5", ExtractOptions(**OPTS, missing_mask="skip")).out)
    assert "blue_square/test_0.jpg" not in skip.paths("test")
    assert len(skip.paths("test")) == len(full.paths("test")) - 1
    assert skip.provenance["skipped"]["test"] == [{"path": "blue_square/test_0.jpg", "reason": "missing mask"}]


def test_bad_image_policies(tmp_path, generic_data, tiny_model):
    split, image_root, mask_root = generic_data
    (image_root / "red_circle/test_1.jpg").write_bytes(b"not a jpeg at all")
    ds = _dataset(generic_data)
    out = tmp_path / "e.h5"
    with pytest.raises(ExtractionError, match="red_circle/test_1.jpg.*--bad-image skip"):
        extract(ds, tiny_model, out, ExtractOptions(**OPTS))
    assert partial_path(out).exists(), "finished batches must be kept for a resume"
    summary = extract(ds, tiny_model, out, ExtractOptions(**OPTS, bad_image="skip"))
    assert summary.resumed_rows > 0, "switching the policy must resume, not restart"
    cache = open_cache(summary.out)
    assert "red_circle/test_1.jpg" not in cache.paths("test")
    assert len(cache.paths("test")) == 11 and cache.labels("test").shape == (11,)
    (reason,) = cache.provenance["skipped"]["test"]
    assert reason["path"] == "red_circle/test_1.jpg" and "cannot read image" in reason["reason"]
    assert cache.image("test", "full").shape[0] == 11


@pytest.mark.slow
def test_missized_mask_is_resized_and_counted_refused_under_error_and_skipped_under_skip(tmp_path, generic_data, tiny_model):
    split, image_root, mask_root = generic_data
    w, h = Image.open(image_root / "green_triangle/test_0.jpg").size
    small = np.zeros((10, 8), np.uint8)
    small[2:7, 1:5] = 255
    Image.fromarray(small).save(mask_root / "green_triangle/test_0.png")
    ds = _dataset(generic_data)
    out = tmp_path / "a.h5"
    with pytest.raises(ExtractionError, match=r"green_triangle/test_0.png is 8x10 but image .* --mask-size-mismatch resize"):
        extract(ds, tiny_model, out, ExtractOptions(**OPTS, mask_size_mismatch="error"))
    assert partial_path(out).exists()
    # rerunning with only the policy changed continues the same partial file
    summary = extract(ds, tiny_model, out, ExtractOptions(**OPTS))
    assert summary.resumed_rows > 0
    assert summary.resized_masks == ["test/green_triangle/test_0.jpg"]
    cache = open_cache(out)
    assert cache.provenance["resized_masks"] == ["test/green_triangle/test_0.jpg"]
    assert [r["mask_size_policy"] for r in cache.provenance["policy_runs"]] == ["error", "resize"]
    i = cache.paths("test").index("green_triangle/test_0.jpg")
    by_hand = Image.fromarray(small).resize((w, h), Image.NEAREST)
    ref, area = _reference(tiny_model, Image.open(image_root / "green_triangle/test_0.jpg").convert("RGB"), by_hand,
                           _geometries(tiny_model.preprocess["size"])["eval"])
    assert F.cosine_similarity(cache.image("test", "fg")[i, 0], ref[1], dim=0) > 0.999
    assert cache.areas("test")[i, 0].item() == pytest.approx(area)
    from fvgpt_cache.inspection import inspect_cache
    assert inspect_cache(out)["masks"]["resized"] == 1
    skipped = open_cache(extract(ds, tiny_model, tmp_path / "s.h5", ExtractOptions(**OPTS, mask_size_mismatch="skip")).out)
    assert "green_triangle/test_0.jpg" not in skipped.paths("test")
    assert "--mask-size-mismatch skip" in skipped.provenance["skipped"]["test"][0]["reason"]


def test_unreadable_mask_fails_with_the_file_named(tmp_path, generic_data, tiny_model):
    split, image_root, mask_root = generic_data
    (mask_root / "green_triangle/test_0.png").write_bytes(b"garbage")
    with pytest.raises(ExtractionError, match=r"cannot read mask .*green_triangle/test_0.png"):
        extract(_dataset(generic_data), tiny_model, tmp_path / "b.h5", ExtractOptions(**OPTS, bad_image="skip"))


def test_empty_mask_is_valid_with_zero_area(tmp_path, generic_data, tiny_model):
    split, image_root, mask_root = generic_data
    w, h = Image.open(image_root / "yellow_star/test_0.jpg").size
    Image.new("L", (w, h), 0).save(mask_root / "yellow_star/test_0.png")
    summary = extract(_dataset(generic_data), tiny_model, tmp_path / "c.h5", ExtractOptions(**OPTS))
    cache = open_cache(summary.out)
    i = cache.paths("test").index("yellow_star/test_0.jpg")
    assert cache.areas("test")[i, 0] == 0.0
    assert summary.empty_masks["test"] >= 1


@pytest.mark.slow
def test_augmented_views_are_deterministic(tmp_path, generic_data, tiny_model):
    ds = _dataset(generic_data)
    a = open_cache(extract(ds, tiny_model, tmp_path / "a.h5", ExtractOptions(**OPTS, train_views=3)).out)
    b = open_cache(extract(ds, tiny_model, tmp_path / "b.h5", ExtractOptions(**{**OPTS, "batch_size": 3}, train_views=3)).out)
    assert torch.allclose(a.image("train", "fg"), b.image("train", "fg"), atol=1e-3)
    assert torch.equal(a.areas("train"), b.areas("train"))


def test_reader_refuses_foreign_and_future_files(tmp_path, generic_data, tiny_model):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(CacheError, match="not an fvgpt-cache store"):
        open_cache(foreign)
    out = extract(_dataset(generic_data), tiny_model, tmp_path / "c.h5", ExtractOptions(**OPTS)).out
    with h5py.File(out, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(CacheError, match="format version 99"):
        open_cache(out)
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        open_cache(tmp_path / "junk.h5")


def test_short_classes_are_named_in_a_warning_provenance_and_inspect(tmp_path, tiny_config):
    split, images, masks = write_generic_dataset(tmp_path / "data", per_class=(5, 2, 1))
    raw = json.loads(split.read_text())
    raw["train"] = [item for item in raw["train"] if not (item[1] == 2 and item[0].endswith(("_3.jpg", "_4.jpg")))]
    split.write_text(json.dumps(raw))  # green triangle keeps 3 training images, the others 5
    out = tmp_path / "c.h5"
    res = run_cli("extract", "--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
               "--pretrained", "none", "--shots", "4", "--train-views", "1", "--workers", "0", "--out", out)
    assert res.exit_code == 0, res.output
    assert "green triangle: 3 < 4" in res.output and "val:" in res.output and "2 < 4" in res.output
    assert "red_circle: 5" not in res.output
    short = open_cache(out).provenance["short_classes"]
    assert short["train"] == [{"label": 2, "class": "green triangle", "count": 3, "wanted": 4}]
    assert len(short["val"]) == 4
    res = run_cli("inspect", out)
    assert "green triangle: 3 < 4" in res.output
    report = json.loads(run_cli("inspect", out, "--json").stdout)
    assert report["short_classes"] == short


# ------------------------------------------------------------------ a crash leaves nothing in the way

KILL_SCRIPT = """
import sys, time
from fvgpt_cache.data import generic_dataset
from fvgpt_cache.extraction import ExtractOptions, extract
from fvgpt_cache.models import load_clip

split, images, masks, config, out = sys.argv[1:]

def slow(split_name, done, total):  # a slow encoder: the workers keep decoding ahead meanwhile
    print("progress", split_name, done, flush=True)
    time.sleep(0.3)

extract(generic_dataset(split, images, masks), load_clip(config, "none"), out,
        ExtractOptions(shots=0, train_views=2, batch_size=2, workers=2), progress=slow)
"""


def _children(pid: int) -> list[int]:
    from pathlib import Path

    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(x) for x in task.read_text().split()]
    return found


@pytest.mark.slow
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_extraction_killed_with_sigkill_is_resumed_by_an_immediate_rerun(tmp_path, tiny_config):
    import os
    import signal
    import subprocess
    import sys
    import time

    split, images, masks = write_generic_dataset(tmp_path / "toys", per_class=(6, 2, 2))
    out = tmp_path / "c.h5"
    args = [str(split), str(images), str(masks), str(tiny_config), str(out)]
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = []
    try:
        for line in proc.stdout:
            workers = _children(proc.pid) or workers
            if line.startswith("progress train") and int(line.split()[2]) >= 4 and workers:
                break
        assert workers, "the DataLoader workers were running"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "c.h5.partial").exists() and not out.exists()
    from fvgpt_cache.store import exclusive_lock

    with exclusive_lock(out):  # at once: the lock died with the process that took it, whatever its workers do
        pass
    for _ in range(40):  # the workers die with their parent (PR_SET_PDEATHSIG) instead of lingering for seconds
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")
                 and "zombie" not in open(f"/proc/{pid}/status").read().lower()]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, "DataLoader workers outlived their killed parent"
    res = subprocess.run([sys.executable, "-m", "fvgpt_cache.cli.main", "extract", "--split-file", split,
                          "--image-root", images, "--mask-root", masks, "--model", tiny_config, "--pretrained", "none",
                          "--shots", "all", "--train-views", "2", "--batch-size", "2", "--workers", "2", "--out", out],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr + res.stdout
    done = re.search(r"resumed: (\d+) rows were already done", res.stdout)
    assert done and int(done.group(1)) >= 4, res.stdout
    assert open_cache(out).image("train").shape[:2] == (24, 2)
