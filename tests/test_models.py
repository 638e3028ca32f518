import json

import pytest
import torch

from fvgpt_cache import models
from fvgpt_cache.models import WeightsError, is_torchscript_archive, load_clip


def _features(loaded, seed=0):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return loaded.model.encode_image(x)


def test_random_init_is_seeded_and_marked(tiny_config):
    a, b, c = (load_clip(str(tiny_config), "none", seed=s) for s in (0, 0, 1))
    assert torch.equal(_features(a), _features(b))
    assert not torch.allclose(_features(a), _features(c))
    assert a.provenance["random_init"] is True and a.provenance["pretrained"] == "none"
    assert a.preprocess["size"] == 32 and a.preprocess["resize_mode"] == "shortest"


def test_local_state_dict_checkpoint_loads_with_hash(tmp_path, tiny_config):
    src = load_clip(str(tiny_config), "none", seed=3)
    ckpt = tmp_path / "weights.pt"
    torch.save(src.model.state_dict(), ckpt)
    loaded = load_clip(str(tiny_config), str(ckpt), seed=0)
    assert torch.equal(_features(loaded), _features(src))
    assert loaded.provenance["random_init"] is False
    assert len(loaded.provenance["pretrained_sha256"]) == 64
    assert loaded.provenance["quick_gelu"] is False


@pytest.mark.slow
def test_torchscript_archive_loads_and_switches_on_quick_gelu(tmp_path, tiny_config):
    src = load_clip(str(tiny_config), "none", seed=3, quick_gelu="on")
    archive = tmp_path / "openai-style.pt"
    torch.jit.save(torch.jit.script(src.model), str(archive))
    plain = tmp_path / "plain.pt"
    torch.save(src.model.state_dict(), plain)
    assert is_torchscript_archive(archive) and not is_torchscript_archive(plain)
    loaded = load_clip(str(tiny_config), str(archive))
    assert loaded.provenance["quick_gelu"] is True
    assert torch.equal(_features(loaded), _features(src))
    # the same weights without QuickGELU give other features: the pitfall the auto rule avoids
    assert not torch.allclose(_features(load_clip(str(tiny_config), str(plain))), _features(src))


def test_wrong_shaped_checkpoint_fails(tmp_path, tiny_config):
    bad = json.loads(tiny_config.read_text())
    bad["embed_dim"] = 16
    other = tmp_path / "other.json"
    other.write_text(json.dumps(bad))
    ckpt = tmp_path / "w.pt"
    torch.save(load_clip(str(other), "none").model.state_dict(), ckpt)
    with pytest.raises(WeightsError, match=r"w\.pt: expected .*found a state dict that does not fit tiny-clip: size mismatch"):
        load_clip(str(tiny_config), str(ckpt))


def test_bad_model_and_tag_messages(tiny_config):
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", "none")
    with pytest.raises(ValueError, match="neither a file nor a tag of ViT-B-16"):
        load_clip("ViT-B-16", "no-such-tag")
    with pytest.raises(ValueError, match="local checkpoint file or 'none'"):
        load_clip(str(tiny_config), "openai")
    with pytest.raises(ValueError, match="quick_gelu must be"):
        load_clip(str(tiny_config), "none", quick_gelu="maybe")


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network, an empty weights cache, and any download attempt is a test failure."""
    import open_clip

    calls = []

    def unreachable(url, timeout=3.0):
        calls.append(url)
        return False

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(models, "reachable", unreachable)
    monkeypatch.setattr(models, "_hub_cache_dir", lambda cache_dir: str(tmp_path / "hub"))
    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", no_download)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", no_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


@pytest.mark.parametrize("hub_offline", [False, True])
def test_offline_default_weights_fail_at_once_with_one_message(offline, monkeypatch, tmp_path, hub_offline):
    from typer.testing import CliRunner

    from conftest import write_generic_dataset
    from fvgpt_cache.cli.main import app

    if hub_offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    split, images, masks = write_generic_dataset(tmp_path / "data", per_class=(1, 1, 1))
    res = CliRunner().invoke(app, ["extract", "--split-file", str(split), "--image-root", str(images),
                                   "--mask-root", str(masks), "--shots", "all", "--out", str(tmp_path / "c.h5")])
    # (the model and weights are the defaults: ViT-B-16, openai)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert 1 <= len(lines) <= 5 and "Traceback" not in res.output, res.output
    text = " ".join(lines)
    assert "'openai' weights of ViT-B-16" in text and "--pretrained FILE" in text
    assert str(tmp_path / "hub") in text, "names the folder where open_clip caches weights"
    assert ("HF_HUB_OFFLINE is set" in text) == hub_offline
    assert len(offline) == (0 if hub_offline else 1), "at most one reachability check, no retries"
    assert not (tmp_path / "c.h5.partial").exists()


def test_cached_tag_weights_are_used_without_asking_the_server(offline, monkeypatch):
    seen = {}

    def fake_create_model(name, pretrained=None, **kwargs):
        from huggingface_hub import constants

        seen["offline"] = constants.HF_HUB_OFFLINE
        raise RuntimeError("stop here")

    monkeypatch.setattr(models, "tag_weights_source", lambda *a: {"kind": "hub", "where": "r", "url": "https://x",
                                                                  "folder": "f", "cached": "/some/cached/file"})
    monkeypatch.setattr(models.open_clip, "create_model", fake_create_model)
    with pytest.raises(RuntimeError, match="stop here"):
        load_clip("ViT-B-16", "openai")
    assert seen["offline"] is True and offline == ["https://x"]


def test_pickle_as_weights_is_one_paragraph_naming_the_file(tmp_path, tiny_config, generic_data):
    import datetime
    import pickle

    from typer.testing import CliRunner

    from fvgpt_cache.cli.main import app

    bad = tmp_path / "model.pkl"
    bad.write_bytes(pickle.dumps({"weights": [1, 2, 3], "saved": datetime.date(2024, 1, 1)}))
    split, images, masks = map(str, generic_data)
    res = CliRunner().invoke(app, ["extract", "--split-file", split, "--image-root", images, "--model", str(tiny_config),
                                   "--pretrained", str(bad), "--shots", "2"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert str(bad) in res.output and "expected an open_clip checkpoint" in res.output and "found a Python pickle" in res.output
    res = CliRunner().invoke(app, ["--debug", "extract", "--split-file", split, "--image-root", images, "--model",
                                   str(tiny_config), "--pretrained", str(bad), "--shots", "2"])
    assert res.exit_code == 2 and "Traceback" in res.output, "--debug shows it"


def test_non_checkpoint_files_are_described(tmp_path, tiny_config):
    cases = {"empty.pt": (b"", "an empty file"), "notes.pt": (b"some notes\n", "a text file"),
             "c.pt": (b"\x89HDF\r\n\x1a\n" + bytes(8), "an HDF5 file")}
    for name, (data, found) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError, match=f"{name}: expected .*; found {found}"):
            load_clip(str(tiny_config), str(tmp_path / name))
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="holds no state dict of tensors"):
        load_clip(str(tiny_config), str(tmp_path / "list.pt"))
