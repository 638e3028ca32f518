import json

import numpy as np
import pytest
import torch

from fvgpt_cache.world import (
    COLORS, SHAPES, TEXTURES, class_background, render, sample_scene, shape_mask, write_downstream,
)


@pytest.mark.parametrize("texture", [t for t in TEXTURES if t != "gradient"])
def test_masks_match_the_drawn_pixels_exactly(texture):
    rng = np.random.default_rng(3)
    for shape in SHAPES:
        scene = sample_scene(rng, shape=shape, texture_name=texture)
        img, mask = render(scene, rng)
        painted = (np.asarray(img) == np.array(COLORS[scene.color])).all(-1)
        m = np.asarray(mask) > 127
        assert m.any() and m.mean() < 0.6, shape
        np.testing.assert_array_equal(painted, m, err_msg=f"{shape} on {texture}")


def test_shapes_differ_from_each_other():
    masks = {s: np.asarray(shape_mask(s, 32, 32, 20, 0.0)) > 127 for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).mean() > 0.02, (a, b)


def test_downstream_is_deterministic_and_spurious(tmp_path):
    a = write_downstream(tmp_path / "a", shots=4, on_own_background=3, val_per_class=1, test_per_class=1, seed=5)
    b = write_downstream(tmp_path / "b", shots=4, on_own_background=3, val_per_class=1, test_per_class=1, seed=5)
    split = json.loads(a[0].read_text())
    assert split == json.loads(b[0].read_text())
    assert len(split["train"]) == 4 * len(SHAPES) and len(split["test"]) == len(SHAPES)
    for rel, _, _ in split["train"][:8]:
        assert (a[1] / rel).read_bytes() == (b[1] / rel).read_bytes()
        assert (a[2] / rel).read_bytes() == (b[2] / rel).read_bytes()
    scenes = json.loads((tmp_path / "a" / "scenes.json").read_text())
    for rel, label, _ in split["train"]:
        own = scenes[rel]["own_background"]
        tex, colors = class_background(label)
        if own:
            assert label < 10 and scenes[rel]["texture"] == tex and scenes[rel]["background"] == list(colors)
    own_counts = [sum(scenes[r]["own_background"] for r, lab, _ in split["train"] if lab == c) for c in range(20)]
    assert own_counts == [3] * 10 + [0] * 10
    assert not any(scenes[r]["own_background"] for r, _, _ in split["test"] + split["val"])
    clean = write_downstream(tmp_path / "c", spurious=False, shots=4, val_per_class=1, test_per_class=1, seed=5)
    assert not any(s["own_background"] for s in json.loads((tmp_path / "c" / "scenes.json").read_text()).values())
    assert clean[0].exists()


def test_shipped_world_model_loads_offline_and_knows_the_shapes():
    import torch.nn.functional as F

    from fvgpt_cache.demo import load_world_model
    from fvgpt_cache.extraction import encode_images
    from fvgpt_cache.views import ViewMaker

    loaded = load_world_model()
    assert loaded.provenance["random_init"] is False and loaded.preprocess["size"] == 64
    rng = np.random.default_rng(77)
    maker = ViewMaker(loaded.preprocess)
    with torch.no_grad():
        text = F.normalize(loaded.model.encode_text(loaded.tokenizer([f"a photo of a {s}." for s in SHAPES])), dim=-1)
    correct = 0
    for label, shape in enumerate(SHAPES):
        for _ in range(5):
            img, mask = render(sample_scene(rng, shape=shape), rng)
            full, _, _ = maker(img, mask, "eval")
            feat = encode_images(loaded.model, full[None], torch.device("cpu"))
            correct += int((feat @ text.T).argmax() == label)
    assert correct / 100 > 0.3, f"20-way zero-shot accuracy {correct}% is near chance (5%)"


def test_world_demo_end_to_end_small(tmp_path):
    from fvgpt_cache.demo import run_world_demo

    results = run_world_demo(tmp_path, shots=4, on_own_background=3, val_per_class=1, test_per_class=2,
                             train_views=1, epochs=2)
    assert set(results) == {"spurious", "clean"}
    for rec in results.values():
        assert rec["backbone"] == "coop" and rec["test_images"] == {"base": 20, "new": 20}
        for method in ("zeroshot", "backbone", "fvgpt"):
            assert 0 <= rec["metrics"][method]["hm"] <= 100
