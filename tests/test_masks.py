"""`fvgpt-cache masks`: gradient maps against hand computations, the mask folder read back by extract,
resuming, locking, prompts and errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fvgpt_cache.data import generic_dataset
from fvgpt_cache.extraction import ExtractOptions, extract
from fvgpt_cache.masks import (
    GradientMapper, MapSettings, MaskError, MaskOptions, box_blur, centred_box, check_prompt, default_prompt,
    gradcam_map, gradcam_pp_map, mask_iou, normalize_maps, read_mask, write_masks,
)
from fvgpt_cache.store import CacheError, open_cache
from conftest import lock_held_elsewhere

RESNET_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FAST = dict(workers=0, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    from fvgpt_cache.models import load_clip

    path = tmp_path_factory.mktemp("rn") / "tiny-rn.json"
    path.write_text(json.dumps(RESNET_CONFIG))
    return load_clip(str(path), "none", seed=0)


def test_gradcam_of_a_hand_example():
    acts = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, -1.0]]]])  # (1, 2, 2, 2)
    grads = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-2.0, 0.0], [2.0, 4.0]]]])
    # weights: channel 0 mean 1, channel 1 mean 1 → 1·A0 + 1·A1 = [[1, 3], [3, 3]]
    assert torch.equal(gradcam_map(acts, grads), torch.tensor([[[1.0, 3.0], [3.0, 3.0]]]))
    # Grad-CAM++ channel 0: g = 1, Σ A·g³ = 10 → α = 1/12, w = 4/12; channel 1: g² = (4, 0, 4, 16), g³ = (−8, 0, 8, 64),
    # Σ A·g³ = 0·(−8) + 1·0 + 0·8 + (−1)·64 = −64 → α = g²/(2g² − 64): (4/−56, 0, 4/−56, 16/−32); w = Σ α·ReLU(g) =
    # 0 + 0 + (−4/56)·2 + (−0.5)·4 = −1/7 − 2
    w0, w1 = 4 / 12, -1 / 7 - 2
    expected = F.relu(w0 * acts[0, 0] + w1 * acts[0, 1])
    assert torch.allclose(gradcam_pp_map(acts, grads)[0], expected)


def test_box_blur_normalise_iou_and_centred_box_by_hand():
    m = torch.zeros(1, 3, 3)
    m[0, 1, 1] = 9.0
    blurred = box_blur(m, 3)
    assert blurred[0, 1, 1] == 1.0 and blurred[0, 0, 0] == 9.0 / 4  # corner window holds 4 pixels
    assert torch.equal(normalize_maps(torch.full((2, 2, 2), 3.0)), torch.zeros(2, 2, 2))
    assert torch.allclose(normalize_maps(torch.tensor([[[1.0, 3.0]]])), torch.tensor([[[0.0, 1.0]]]))
    a = torch.tensor([[[True, True, False, False]]])
    b = torch.tensor([[[False, True, True, False]]])
    assert mask_iou(a, b).item() == pytest.approx(1 / 3)
    assert mask_iou(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.bool)).item() == 1
    box = centred_box(10, 10, 0.36)
    assert box.sum() == 36 and box[2:8, 2:8].all()


def _hand_resnet_cam(model, pixels, text, pp: bool):
    """Grad-CAM at layer2 by running the ResNet tower by hand, split at layer2's output."""
    v = model.visual
    with torch.enable_grad():
        x = pixels.clone()
        x = v.act1(v.bn1(v.conv1(x)))
        x = v.act2(v.bn2(v.conv2(x)))
        x = v.avgpool(v.act3(v.bn3(v.conv3(x))))
        a = v.layer2(v.layer1(x)).detach().requires_grad_(True)
        feats = v.attnpool(v.layer4(v.layer3(a)))
        score = (F.normalize(feats, dim=-1) * text).sum(-1)
        (g,) = torch.autograd.grad(score.sum(), [a])
    cams = []
    for i in range(len(pixels)):  # per image, per channel, written out
        acc = torch.zeros(a.shape[2:])
        for c in range(a.shape[1]):
            gc, ac = g[i, c], a[i, c].detach()
            if pp:
                g2, g3 = gc ** 2, gc ** 3
                den = 2 * g2 + (ac * g3).sum()
                alpha = torch.where(den != 0, g2 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(g2))
                w = (alpha * gc.clamp(min=0)).sum()
            else:
                w = gc.mean()
            acc += w * ac
        cams.append(acc.clamp(min=0))
    cam = torch.stack(cams)
    cam = F.interpolate(cam[:, None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.flatten(1).min(1).values.view(-1, 1, 1)
    hi = cam.flatten(1).max(1).values.view(-1, 1, 1)
    return torch.where(hi > lo, (cam - lo) / (hi - lo), torch.zeros_like(cam))  # a constant map: all zeros


@pytest.mark.parametrize("kind", ["gradcam", "gradcam++"])
def test_gradcam_on_a_tiny_resnet_equals_a_hand_computed_gradcam(tiny_resnet, kind):
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    text = F.normalize(torch.randn(3, 32), dim=-1)
    maps = GradientMapper(tiny_resnet.model, MapSettings(map=kind, layer="layer2")).maps(pixels, text)
    hand = _hand_resnet_cam(tiny_resnet.model, pixels, text, pp=kind == "gradcam++")
    assert maps.shape == (3, 32, 32)
    assert torch.allclose(maps, hand, atol=1e-5)
    assert (maps.flatten(1).amax(1) == 1).sum() >= 2  # not a comparison of empty maps
    assert all(p.grad is None for p in tiny_resnet.model.parameters())  # weights stay untouched


def test_vit_gradcam_reads_the_patch_grid_of_a_block(tiny_model):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    text = F.normalize(torch.randn(2, 32), dim=-1)
    mapper = GradientMapper(tiny_model.model, MapSettings(map="gradcam"))
    assert mapper.layer == "transformer.resblocks.0"  # 2 blocks: the one before the last
    # by hand: the block's output tokens (B, 1 + 16, C), patch tokens on the 4×4 grid
    captured = {}
    block = tiny_model.model.visual.transformer.resblocks[0]
    handle = block.register_forward_hook(lambda m, i, o: captured.__setitem__("t", o))
    with torch.enable_grad():
        feats = tiny_model.model.encode_image(pixels.clone().requires_grad_(True))
        score = (F.normalize(feats, dim=-1) * text).sum(-1)
        (g,) = torch.autograd.grad(score.sum(), [captured["t"]])
    handle.remove()
    t = captured["t"].detach()
    patches, gp = t[:, 1:, :], g[:, 1:, :]  # (B, 16, C)
    cam = F.relu(((gp.mean(1, keepdim=True)) * patches).sum(-1)).view(2, 4, 4)
    cam = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(mapper.maps(pixels, text), normalize_maps(cam), atol=1e-5)
    with pytest.raises(ValueError, match="not a module"):
        GradientMapper(tiny_model.model, MapSettings(map="gradcam", layer="layer9"))


def test_table9_prompts_and_prompt_errors():
    assert default_prompt("oxford_pets") == "The pet in the middle."
    assert default_prompt("eurosat") == "The satellite {}."
    assert default_prompt("my_birds") == "The {} in the middle."
    assert check_prompt("The satellite {}.", "eurosat", ["Annual_Crop"]) == ["The satellite Annual Crop."]
    assert check_prompt("The dog in the middle.", "oxford_pets", ["a", "b"]) == ["The dog in the middle."] * 2
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        check_prompt("The bird.", "my_birds", ["a"])
    with pytest.raises(ValueError, match="cannot be filled"):
        check_prompt("The {} {name}.", None, ["a"])
    from open_clip.tokenizer import SimpleTokenizer

    with pytest.raises(ValueError, match="class 'very long"):
        check_prompt("The {}.", None, ["ok", "very long " * 20], SimpleTokenizer(context_length=32), 32)


def _options(**kw):
    return MaskOptions(**{**FAST, **kw})


def _pngs(folder):
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def test_masks_layout_is_read_by_extract_as_hand_written_masks_with_the_same_pixels(tmp_path, generic_data, tiny_model):
    split, images, _ = generic_data
    ds = generic_dataset(split, images)
    out = tmp_path / "gc"
    summary = write_masks(ds, tiny_model, out, _options())
    assert summary.counts == {"train": 24, "val": 12, "test": 12}
    meta = json.loads((out / "masks.json").read_text())
    assert meta["complete"] and meta["settings"]["prompt"] == "The {} in the middle."
    assert meta["settings"]["map"] == "gradcam++" and meta["counts"] == summary.counts
    for s in ds.splits["train"][:3]:  # the image's relative path with .png, the image's size, 0/255
        mask = Image.open(out / s.relpath.replace(".jpg", ".png"))
        assert mask.mode == "L" and mask.size == Image.open(images / s.relpath).size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    # hand-written masks with the same pixels: RGB, next to nothing else, white (250) on black (3)
    hand = tmp_path / "hand"
    for rel, arr in _pngs(out).items():
        (hand / rel).parent.mkdir(parents=True, exist_ok=True)
        rgb = np.where(arr[..., None] > 127, 250, 3).astype(np.uint8).repeat(3, axis=2)
        Image.fromarray(rgb, mode="RGB").save(hand / rel)
    opts = ExtractOptions(shots=2, seed=1, workers=0, batch_size=8, train_views=2, device="cpu")
    a = open_cache(extract(generic_dataset(split, images, out), tiny_model, tmp_path / "a.h5", opts).out)
    b = open_cache(extract(generic_dataset(split, images, hand), tiny_model, tmp_path / "b.h5", opts).out)
    for s in ("train", "test"):
        assert torch.equal(a.image(s, "fg"), b.image(s, "fg")) and torch.equal(a.areas(s), b.areas(s))
        assert not torch.equal(a.image(s, "fg"), a.image(s, "full"))


def test_interrupted_run_resumes_to_the_same_masks_and_other_settings_are_refused(tmp_path, generic_data, tiny_model):
    split, images, _ = generic_data
    ds = generic_dataset(split, images)
    whole = tmp_path / "whole"
    write_masks(ds, tiny_model, whole, _options(splits=("train",)))
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        write_masks(ds, tiny_model, part, _options(splits=("train",)), stop_after_batches=2)
    assert len(_pngs(part)) == 8 and not json.loads((part / "masks.json").read_text())["complete"]
    summary = write_masks(ds, tiny_model, part, _options(splits=("train",)))
    assert summary.resumed == 8 and summary.written == 16
    a, b = _pngs(whole), _pngs(part)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(MaskError, match="threshold differ"):
        write_masks(ds, tiny_model, part, _options(splits=("train",), settings=MapSettings(threshold=0.5)))
    with lock_held_elsewhere(part / ".masks"):
        with pytest.raises(CacheError, match="another process is already writing the mask folder"):
            write_masks(ds, tiny_model, part, _options(splits=("train",)))


def test_bad_image_stops_with_its_name_or_is_skipped_and_listed(tmp_path, generic_data, tiny_model):
    split, images, _ = generic_data
    ds = generic_dataset(split, images)
    broken = ds.splits["train"][5].relpath
    (images / broken).write_bytes(b"not an image")
    with pytest.raises(MaskError, match=broken.split("/")[-1]):
        write_masks(ds, tiny_model, tmp_path / "m", _options(splits=("train",)))
    summary = write_masks(ds, tiny_model, tmp_path / "m", _options(splits=("train",), bad_image="skip"))
    assert summary.counts["train"] == 23 and summary.skipped[0]["path"] == broken
    assert json.loads((tmp_path / "m" / "masks.json").read_text())["skipped"][0]["path"] == broken


def test_cli_masks_writes_a_preview_and_refuses_bad_input_without_traceback(tmp_path, generic_data, tiny_config):
    from typer.testing import CliRunner

    from fvgpt_cache.cli.main import app

    split, images, _ = generic_data
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    base = ("masks", "--split-file", split, "--image-root", images, "--model", tiny_config, "--pretrained", "none",
            "--workers", "0", "--device", "cpu")
    res = run(*base, "--out", tmp_path / "m", "--splits", "train", "--shots", "2", "--preview", tmp_path / "s.png",
              "--preview-count", "4")
    assert res.exit_code == 0, res.output
    assert "train 8" in res.output and Image.open(tmp_path / "s.png").size == (4 * 128, 128)
    res = run(*base, "--out", tmp_path / "m2", "--prompt", "A bird.")
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    res = run(*base, "--out", tmp_path / "m3", "--splits", "train,holdout")
    assert res.exit_code == 2 and "--splits" in res.output


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_pngs(tmp_path, generic_data, tiny_config):
    split, images, _ = generic_data
    args = [sys.executable, "-m", "fvgpt_cache.cli.main", "masks", "--split-file", str(split), "--image-root",
            str(images), "--model", str(tiny_config), "--pretrained", "none", "--workers", "0", "--device", "cpu",
            "--batch-size", "1", "--splits", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.rglob("*.png"))) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(list(killed.rglob("*.png")))
    assert 6 <= before < 24
    for png in killed.rglob("*.png"):  # every PNG under its final name is complete
        Image.open(png).load()
    subprocess.run(args + ["--out", str(killed)], check=True, env=env, capture_output=True)
    assert not list(killed.rglob("*.partial"))
    a, b = _pngs(tmp_path / "whole"), _pngs(killed)
    assert len(a) == 24 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((killed / "masks.json").read_text())["resumed"] == before


@pytest.mark.slow
def test_world_clip_masks_beat_the_trivial_baselines_on_held_out_world_images(tmp_path):
    """The held-out check: world images drawn here (not those the defaults were chosen on), the shipped
    world CLIP, the command's defaults; IoU against the exact masks and the two trivial baselines."""
    from fvgpt_cache.demo import load_world_model
    from fvgpt_cache.world import write_downstream

    split, images, exact = write_downstream(tmp_path / "w", "clean", shots=4, val_per_class=1, test_per_class=1, seed=7)
    ds = generic_dataset(split, images)
    write_masks(ds, load_world_model(), tmp_path / "gc", _options(splits=("train",), batch_size=32))
    rels = [s.relpath for s in ds.splits["train"]]
    true = torch.stack([torch.from_numpy(read_mask(exact / r)) for r in rels])
    pred = torch.stack([torch.from_numpy(read_mask(tmp_path / "gc" / r)) for r in rels])
    area = float(true.float().mean((1, 2)).median())
    ours = mask_iou(pred, true).mean().item()
    whole = mask_iou(torch.ones_like(true), true).mean().item()
    box = mask_iou(centred_box(*true.shape[1:], area).expand_as(true), true).mean().item()
    assert ours > box + 0.05 and ours > whole + 0.1, (ours, box, whole)


def test_two_ranks_write_the_masks_of_one_process(tmp_path, generic_data, tiny_config):
    from fvgpt_cache.models import load_clip
    from test_distributed import run_ranks

    split, images, _ = generic_data
    ds = generic_dataset(split, images)
    models = [load_clip(str(tiny_config), "none", seed=0) for _ in range(2)]  # one per rank: hooks are per module
    one = write_masks(ds, models[0], tmp_path / "one", _options(splits=("train",)))
    results, errors = run_ranks(2, lambda job: write_masks(ds, models[job.rank], tmp_path / "two",
                                                           _options(splits=("train",)), job=job))
    assert errors == [None, None], errors
    assert results[0].counts == results[1].counts == one.counts and results[0].written == 24
    a, b = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "two" / "masks.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_torchrun_two_processes_write_the_masks_of_one_process(tmp_path, generic_data, tiny_config):
    from test_distributed import _torchrun

    split, images, _ = generic_data
    args = ["masks", "--split-file", split, "--image-root", images, "--model", tiny_config, "--pretrained", "none",
            "--workers", "0", "--device", "cpu", "--batch-size", "4", "--splits", "train", "--dist-timeout", "60"]
    res = _torchrun(1, "-m", "fvgpt_cache.cli.main", *args, "--out", tmp_path / "one")
    assert res.returncode == 0, res.stderr + res.stdout
    res = _torchrun(2, "-m", "fvgpt_cache.cli.main", *args, "--out", tmp_path / "two")
    assert res.returncode == 0, res.stderr + res.stdout
    assert res.stdout.count("wrote ") == 1, "only rank 0 reports"
    a, b = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert len(a) == 24 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "two" / "masks.json").read_text())["processes"] == 2
