import hashlib
import json
import math

import numpy as np
import pytest
import torch

from fvgpt_cache.world import (
    COLORS, COMPANIONS, HABITATS, MASK_FILLS, SHAPES, SPLITS, TEXTURES, render, sample_natural, sample_scene,
    shape_mask, swap_partner, write_downstream,
)


@pytest.mark.parametrize("texture", [t for t in TEXTURES if t != "gradient"])
def test_masks_match_the_drawn_pixels_exactly(texture):
    rng = np.random.default_rng(3)
    for label, shape in enumerate(SHAPES):
        for context in (None, (label + 3) % len(SHAPES)):
            scene = sample_scene(rng, shape=shape, texture_name=texture, context=context)
            img, mask = render(scene, rng)
            painted = (np.asarray(img) == np.array(COLORS[scene.color])).all(-1)
            m = np.asarray(mask) > 127
            assert m.any() and m.mean() < 0.6, shape
            np.testing.assert_array_equal(painted, m, err_msg=f"{shape} on {texture}, context {context}")
            if context is not None:  # the companion is drawn, visible, and outside the mask
                companion = (np.asarray(img) == np.array(COLORS[scene.companion_color])).all(-1)
                assert companion.sum() > 20 and not (companion & m).any()


def test_no_colour_is_near_a_mask_fill():
    for name, rgb in COLORS.items():
        for fill_name, fill in MASK_FILLS.items():
            assert math.dist(rgb, fill) > 60, (name, fill_name)


def test_shapes_differ_from_each_other():
    masks = {s: np.asarray(shape_mask(s, 32, 32, 20, 0.0)) > 127 for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).mean() > 0.02, (a, b)


@pytest.mark.parametrize("n", [20, 6, 7])
def test_swap_partners_pair_classes_inside_base_and_inside_new(n):
    n_base = math.ceil(n / 2)
    for c in range(n):
        p = swap_partner(c, n)
        assert p != c and (p < n_base) == (c < n_base)
    if n % 2 == 0 and n_base % 2 == 0:
        assert all(swap_partner(swap_partner(c, n), n) == c for c in range(n))
    assert len(set(HABITATS)) == len(SHAPES)
    assert all(COMPANIONS[c] != SHAPES[c] and COMPANIONS[swap_partner(c)] != SHAPES[c] for c in range(len(SHAPES)))


def test_natural_scenes_follow_their_context():
    rng = np.random.default_rng(0)
    own = sample_natural(rng, 4, "own")
    assert (own.texture, own.bg_colors, own.companion) == (*HABITATS[4], COMPANIONS[4])
    other = sample_natural(rng, 4, "other")
    assert other.context != 4 and other.companion == COMPANIONS[other.context]
    none = sample_natural(rng, 4, "none")
    assert none.context is None and none.companion is None
    with pytest.raises(ValueError, match="context kind"):
        sample_natural(rng, 4, "elsewhere")


@pytest.mark.slow
def test_downstream_splits_share_train_and_the_counterfactual_split_swaps(tmp_path):
    kw = dict(shots=5, val_per_class=1, test_per_class=3, seed=5)
    files = {s: write_downstream(tmp_path / s, s, **kw) for s in SPLITS}
    again = write_downstream(tmp_path / "again", "counterfactual", **kw)
    splits = {s: json.loads(f[0].read_text()) for s, f in files.items()}
    scenes = {s: json.loads((tmp_path / s / "scenes.json").read_text()) for s in SPLITS}
    assert json.loads(again[0].read_text()) == splits["counterfactual"]
    assert len(splits["natural"]["train"]) == 5 * len(SHAPES) and len(splits["natural"]["test"]) == 3 * len(SHAPES)
    for part in ("train", "val"):  # identical images in the three datasets
        for rel, _, _ in splits["natural"][part]:
            for s in ("clean", "counterfactual"):
                assert (files[s][1] / rel).read_bytes() == (files["natural"][1] / rel).read_bytes()
                assert (files[s][2] / rel).read_bytes() == (files["natural"][2] / rel).read_bytes()
    kinds = [scenes["natural"][rel]["kind"] for rel, label, _ in splits["natural"]["train"] if label == 0]
    assert kinds == ["own"] * 3 + ["other"] + ["none"]
    for rel, label, shape in splits["counterfactual"]["test"]:
        partner = swap_partner(label)
        sc = scenes["counterfactual"][rel]
        assert sc["shape"] == shape and sc["context"] == SHAPES[partner] != shape
        assert (sc["texture"], tuple(sc["background"]), sc["companion"]) == (*HABITATS[partner], COMPANIONS[partner])
    for rel, label, shape in splits["clean"]["test"]:
        assert scenes["clean"][rel]["context"] is None and scenes["clean"][rel]["companion"] is None
    # the same shapes are drawn in the same places of the image: only the context differs
    mask_cf = files["counterfactual"][2] / splits["counterfactual"]["test"][0][0]
    assert mask_cf.exists()
    with pytest.raises(ValueError, match="split"):
        write_downstream(tmp_path / "x", "spurious", **kw)


def test_shipped_world_model_loads_offline_with_its_hash_recorded():
    import torch.nn.functional as F

    from fvgpt_cache.demo import load_world_model, world_model_files
    from fvgpt_cache.extraction import encode_images
    from fvgpt_cache.views import ViewMaker

    config, weights = world_model_files()
    assert weights.stat().st_size <= 15 * 2**20
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    loaded = load_world_model()
    assert loaded.provenance["random_init"] is False and loaded.preprocess["size"] == 64
    assert loaded.provenance["pretrained_sha256"] == sha
    assert json.loads((weights.parent / "world-clip-training.json").read_text())["sha256"] == sha
    rng = np.random.default_rng(77)
    maker = ViewMaker(loaded.preprocess)
    with torch.no_grad():
        text = F.normalize(loaded.model.encode_text(loaded.tokenizer([f"a photo of a {s}." for s in SHAPES])), dim=-1)
    correct = 0
    for label, shape in enumerate(SHAPES):
        for _ in range(5):
            img, mask = render(sample_scene(rng, shape=shape), rng)  # clean: no context
            full, _, _ = maker(img, mask, "eval")
            feat = encode_images(loaded.model, full[None], torch.device("cpu"))
            correct += int((feat @ text.T).argmax() == label)
    assert correct / 100 > 0.3, f"20-way zero-shot accuracy {correct}% on clean images is near chance (5%)"
