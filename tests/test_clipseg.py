"""`masks --method clipseg`: the pipeline with a tiny random CLIPSeg (no weights), and the errors without weights.

Slow: importing transformers alone takes seconds."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fvgpt_cache.clipseg import ClipSeg, ClipSegUnavailable, load_clipseg, open_clip_tokenizer
from fvgpt_cache.data import generic_dataset
from fvgpt_cache.masks import MaskOptions, _ImageRows, write_masks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_clipseg():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPSegConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16, extract_layers=(0, 1), reduce_dim=16, decoder_intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.CLIPSegForImageSegmentation(cfg).eval()
    pp = {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear", "resize_mode": "squash"}
    return ClipSeg(model, open_clip_tokenizer(), pp, {"method": "clipseg", "model": "tiny random CLIPSeg"})


def test_clipseg_masks_are_the_model_probabilities_thresholded_at_the_image_size(tmp_path, generic_data, tiny_clipseg):
    split, images, _ = generic_data
    ds = generic_dataset(split, images)
    out = tmp_path / "cs"
    summary = write_masks(ds, None, out, MaskOptions(method="clipseg", splits=("train",), workers=0, batch_size=5,
                                                     device="cpu"), segmenter=tiny_clipseg)
    assert summary.counts == {"train": 24}
    meta = json.loads((out / "masks.json").read_text())
    assert meta["settings"]["method"] == "clipseg" and meta["settings"]["threshold"] == 0.5
    assert meta["settings"]["map"] is None
    # one image by hand: the model's sigmoid(logits) for its prompt, resized to the image, ≥ 0.5
    sample = ds.splits["train"][7]
    item = _ImageRows([{"relpath": sample.relpath, "index": 0}], images, tiny_clipseg.preprocess)[0]
    text = f"The {ds.classnames[sample.label].replace('_', ' ')} in the middle."
    ids, mask = tiny_clipseg.tokenize([text])
    with torch.no_grad():
        logits = tiny_clipseg.model(input_ids=ids, attention_mask=mask, pixel_values=item["pixels"][None]).logits
    prob = logits.reshape(1, 1, *logits.shape[-2:]).sigmoid()
    w, h = item["size"]
    expected = torch.nn.functional.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0, 0] >= 0.5
    got = np.asarray(Image.open(out / sample.relpath.replace(".jpg", ".png"))) > 127
    assert got.shape == (h, w) and np.array_equal(got, expected.numpy())


def test_missing_clipseg_weights_and_folders_are_named(tmp_path, monkeypatch, generic_data):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("fvgpt_cache.models.reachable", lambda url, timeout=3.0: False)
    with pytest.raises(ClipSegUnavailable, match="not in the Hugging Face cache.*--pretrained"):
        load_clipseg(None)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_clipseg(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipSegUnavailable, match="holds no CLIPSeg model"):
        load_clipseg(str(tmp_path / "empty"))
    from typer.testing import CliRunner

    from fvgpt_cache.cli.main import app

    split, images, _ = generic_data
    res = CliRunner().invoke(app, ["masks", "--split-file", str(split), "--image-root", str(images), "--out",
                                   str(tmp_path / "m"), "--method", "clipseg"])
    assert res.exit_code == 2 and "error:" in res.output and "huggingface-cli download" in res.output
