import json
import os
import subprocess
import sys

import pytest
import torch

from fvgpt_cache.models import is_torchscript_archive, load_clip


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
    with pytest.raises(RuntimeError, match="size mismatch"):
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


def test_offline_download_failure_says_how_to_pass_a_file():
    code = "from fvgpt_cache.models import load_clip\nload_clip('ViT-B-16', 'openai')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    assert "--pretrained /path/to/ViT-B-16.pt" in res.stderr
