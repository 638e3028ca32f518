import importlib.util
from pathlib import Path

import numpy as np
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer

from fvgpt_cache.world import COLORS, SHAPES

_spec = importlib.util.spec_from_file_location("pretrain_world", Path(__file__).parents[1] / "benchmarks" / "pretrain_world.py")
pretrain_world = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain_world)


def test_isolated_shapes_stand_alone_on_one_plain_colour_far_from_theirs():
    rng = np.random.default_rng(5)
    for _ in range(20):
        image, text = pretrain_world.isolated(rng)
        pixels = np.asarray(image).reshape(-1, 3).astype(int)
        colours = np.unique(pixels, axis=0)
        assert len(colours) == 2, "an isolated shape shows exactly its colour and the background's"
        shape_colour = [c for c in colours if tuple(c) in COLORS.values()]
        assert shape_colour, colours
        assert any(f" {shape}." in text for shape in SHAPES), text
        background = [c for c in colours if not (c == shape_colour[0]).all()][0]
        assert np.abs(background - shape_colour[0]).sum() > 120


def test_continued_pretraining_starts_from_the_exported_weights(tmp_path):
    compact = pretrain_world.CompactTokenizer(SimpleTokenizer(context_length=32))
    cfg = {**pretrain_world.MODEL_CFG,
           "text_cfg": {**pretrain_world.MODEL_CFG["text_cfg"], "vocab_size": len(compact.vocab) + 1}}
    torch.manual_seed(0)
    trained = CLIP(**cfg)
    pretrain_world.export(trained, compact, tmp_path, [], {})
    torch.manual_seed(1)
    resumed = CLIP(**cfg)
    pretrain_world.init_from(resumed, compact, tmp_path / "world-clip.pt")
    for name, value in trained.state_dict().items():
        if name == "token_embedding.weight":
            value = value[1:]  # the padding row is not exported
            got = resumed.state_dict()[name][1:]
        else:
            got = resumed.state_dict()[name]
        expected = value.half().float() if value.is_floating_point() else value  # exported in fp16
        torch.testing.assert_close(got, expected, msg=name)
