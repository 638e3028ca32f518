"""PromptSRC and MMRL checkpoints imported into a cache (issue 12).

The checkpoints are written here in the official key layout (the state-dict names of the official
`CustomCLIP` models, Dassl's checkpoint dict with its pickled scheduler and optimiser, mixed dtypes),
for a tiny open_clip ViT deep enough for the prompt depths. The reference forwards below are written
from the official code (sequence-first, OpenAI-CLIP style blocks built from
`F.multi_head_attention_forward`), independently of `fvgpt_cache.backbones`.
"""
import collections
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_generic_dataset
from typer.testing import CliRunner

from fvgpt_cache.backbones import (ImportOptions, MMRLRepresentation, PromptSRCPrompts, find_checkpoint, import_backbone,
                                   import_partial, mmrl_image_features, promptsrc_image_features)
from fvgpt_cache.backbones.checkpoints import load_state_dict
from fvgpt_cache.cli.main import app
from fvgpt_cache.data import generic_dataset
from fvgpt_cache.evaluation import EvalSet
from fvgpt_cache.extraction import ExtractOptions, extract
from fvgpt_cache.equations import backbone_logits
from fvgpt_cache.models import load_clip
from fvgpt_cache.store import CacheError, open_cache
from fvgpt_cache.training import backbone_images
from fvgpt_cache.views import Box, ViewMaker

DEEP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 6, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 6},
}
CTX_INIT = "a photo of a"
FP16_SUFFIXES = ("conv1.weight", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight",
                 "c_fc.bias", "c_proj.weight", "c_proj.bias", "proj", "text_projection")



def _config(tmp_path_factory, name, **changes):
    cfg = json.loads(json.dumps(DEEP_CONFIG))
    for key, value in changes.items():
        tower, field = key.split("__")
        cfg[tower][field] = value
    path = tmp_path_factory.mktemp("cfg") / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return load_clip(str(_config(tmp_path_factory, "deep-clip")), "none", seed=0)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, deep):
    root = tmp_path_factory.mktemp("imp")
    ds = generic_dataset(*write_generic_dataset(root / "data"))
    return extract(ds, deep, root / "c.h5", ExtractOptions(shots=4, seed=1, workers=0, batch_size=8, train_views=3,
                                                          store_dtype="float32")).out


@pytest.fixture()
def cache(extracted, tmp_path):
    return shutil.copy(extracted, tmp_path / "c.h5")


# ---------------------------------------------------------------- checkpoints in the official layout


def _dassl(state: dict, epoch: int, optimizer=torch.optim.SGD) -> dict:
    """Dassl's checkpoint dict: the scheduler's state_dict holds the successor object, which holds the optimiser."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = optimizer([p], lr=0.002)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    sched = {"successor": successor, "warmup_epoch": 1, "cons_lr": 1e-5, "base_lrs": [0.002], "last_epoch": epoch}
    return {"state_dict": collections.OrderedDict(state), "epoch": epoch, "optimizer": opt.state_dict(),
            "scheduler": sched, "val_result": None}


def _frozen(module: torch.nn.Module, prefix: str, gpa: bool = False) -> dict:
    """CLIP weights as the official models hold them: linear/conv/attention weights fp16 (convert_weights), the rest
    fp32; with `gpa`, PromptSRC's Gaussian-weighted sum over epochs (weights summing to one, in the tensor's dtype)."""
    out = {}
    weights = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1])
    for k, v in module.state_dict().items():
        v = v.detach().clone()
        v = v.half() if k.endswith(FP16_SUFFIXES) else v.float()
        if gpa:
            v = sum(w.to(v.dtype) * v for w in weights)
        out[prefix + k] = v
    return out


def _text_frozen(model) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("transformer.") or k in ("positional_embedding", "ln_final.weight", "ln_final.bias",
                                                  "text_projection"):
            out["text_encoder." + k] = v.half() if k.endswith(FP16_SUFFIXES) else v.float()
    return out


def _embed(model, tokenizer, texts):
    with torch.no_grad():
        return model.token_embedding(tokenizer(texts))


def promptsrc_checkpoint(model, tokenizer, classnames, *, n_ctx=4, n_ctx_v=4, depth_t=3, depth_v=3, seed=0, zero=False,
                         dtype=None, frozen=True) -> dict:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.zeros(shape) if zero else 0.3 * torch.randn(*shape, generator=g)  # noqa: E731
    width_t, width_v = model.token_embedding.weight.shape[1], model.visual.conv1.weight.shape[0]
    prompts = [f"{CTX_INIT} {c.replace('_', ' ')}." for c in classnames]
    emb = _embed(model, tokenizer, prompts)
    ctx = emb[0, 1:1 + n_ctx] + rnd(n_ctx, width_t)
    state = {"prompt_learner.ctx": ctx.half(),  # the learner is built in CLIP's fp16
             "prompt_learner.token_prefix": emb[:, :1].half(), "prompt_learner.token_suffix": emb[:, 1 + n_ctx:].half(),
             "image_encoder.VPT": rnd(n_ctx_v, width_v)}
    for i in range(1, depth_v):
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = rnd(n_ctx_v, width_v)
    for i in range(1, depth_t):
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = rnd(n_ctx, width_t)
    if frozen:
        state.update(_frozen(model.visual, "image_encoder.", gpa=True))
        state.update(_frozen(model.visual, "prompt_learner.ZS_image_encoder.", gpa=True))
        state.update(_text_frozen(model))
        state["logit_scale"] = model.logit_scale.detach().clone()
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return state


def mmrl_checkpoint(model, tokenizer, classnames, template, *, n_rep=3, rep_dim=48, k=3, seed=1, zero=False,
                    dtype=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.zeros(shape) if zero else 0.5 * torch.randn(*shape, generator=g)  # noqa: E731
    width_t, width_v = model.token_embedding.weight.shape[1], model.visual.conv1.weight.shape[0]
    state = {"representation_learner.compound_rep_tokens": rnd(n_rep, rep_dim)}
    for i in range(k):
        state[f"representation_learner.compound_rep_tokens_r2vproj.{i}.weight"] = rnd(width_v, rep_dim)
        state[f"representation_learner.compound_rep_tokens_r2vproj.{i}.bias"] = rnd(width_v)
        state[f"representation_learner.compound_rep_tokens_r2tproj.{i}.weight"] = rnd(width_t, rep_dim)
        state[f"representation_learner.compound_rep_tokens_r2tproj.{i}.bias"] = rnd(width_t)
    state["prompt_embeddings"] = _embed(model, tokenizer, [template.format(c.replace("_", " ")) for c in classnames])
    state.update({k: v.float() for k, v in _frozen(model.visual, "image_encoder.").items()})  # PREC amp: fp32
    state["image_encoder.proj_rep"] = 0.1 * torch.randn(*model.visual.proj.shape, generator=g)
    state.update({k: v.float() for k, v in _text_frozen(model).items()})
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return state


def _save(state, folder, epoch=10, optimizer=torch.optim.SGD):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model.pth.tar-{epoch}"
    torch.save(_dassl(state, epoch, optimizer), path)
    return path


def _base_names(c):
    return [c.classnames[i] for i in c.base]


# ---------------------------------------------------------------- the official forwards, written independently


def official_block(block, x, mask=None):
    """OpenAI CLIP's ResidualAttentionBlock on sequence-first x (L, N, width), from the block's weights."""
    attn = block.attn
    h = block.ln_1(x)
    a, _ = F.multi_head_attention_forward(h, h, h, attn.embed_dim, attn.num_heads, attn.in_proj_weight,
                                          attn.in_proj_bias, None, None, False, 0.0, attn.out_proj.weight,
                                          attn.out_proj.bias, training=False, need_weights=False, attn_mask=mask)
    x = x + a
    return x + block.mlp(block.ln_2(x))


def _mask(n):
    return torch.empty(n, n).fill_(float("-inf")).triu_(1)


def _vit_input(v, pixels):
    x = v.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    return x + v.positional_embedding


@torch.no_grad()
def ref_promptsrc_image(model, pixels, state):
    v, b = model.visual, pixels.shape[0]
    vpt = state["image_encoder.VPT"].half().float()
    n = vpt.shape[0]
    x = torch.cat([_vit_input(v, pixels), vpt.expand(b, -1, -1)], dim=1)
    x = v.ln_pre(x).permute(1, 0, 2)
    for i, blk in enumerate(v.transformer.resblocks):
        key = f"image_encoder.transformer.resblocks.{i}.VPT_shallow"
        if key in state:
            deep = state[key].half().float().expand(b, -1, -1).permute(1, 0, 2)
            x = torch.cat([x[:x.shape[0] - n], deep], dim=0)
        x = official_block(blk, x)
    x = x.permute(1, 0, 2)
    return v.ln_post(x[:, 0, :]) @ v.proj


@torch.no_grad()
def ref_promptsrc_text(model, tokenizer, classnames, state):
    ctx = state["prompt_learner.ctx"].float()
    n = ctx.shape[0]
    tokens = tokenizer([f"{CTX_INIT} {c.replace('_', ' ')}." for c in classnames])
    emb = model.token_embedding(tokens)
    x = torch.cat([emb[:, :1], ctx.expand(len(classnames), -1, -1), emb[:, 1 + n:]], dim=1)
    x = (x + model.positional_embedding).permute(1, 0, 2)
    for i, blk in enumerate(model.transformer.resblocks):
        key = f"text_encoder.transformer.resblocks.{i}.VPT_shallow"
        if key in state:
            deep = state[key].half().float().expand(x.shape[1], -1, -1).permute(1, 0, 2)
            x = torch.cat([x[:1], deep, x[1 + n:]], dim=0)
        x = official_block(blk, x, _mask(77))
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def _rep_tokens(state, tower):
    t = state["representation_learner.compound_rep_tokens"].float()
    k = len([x for x in state if x.startswith(f"representation_learner.compound_rep_tokens_r2{tower}proj.")]) // 2
    return [F.linear(t, state[f"representation_learner.compound_rep_tokens_r2{tower}proj.{i}.weight"].float(),
                     state[f"representation_learner.compound_rep_tokens_r2{tower}proj.{i}.bias"].float())
            for i in range(k)]


@torch.no_grad()
def ref_mmrl_image(model, pixels, state, layers):
    v, b = model.visual, pixels.shape[0]
    toks = _rep_tokens(state, "v")
    n = toks[0].shape[0]
    x = v.ln_pre(_vit_input(v, pixels)).permute(1, 0, 2)
    counter = 0
    for layer, blk in enumerate(v.transformer.resblocks, start=1):
        if layer in layers:
            suffix = x[1:] if layer == layers[0] else x[1 + n:]
            x = torch.cat([x[:1], toks[counter].expand(b, -1, -1).permute(1, 0, 2), suffix], dim=0)
            counter += 1
        x = official_block(blk, x)
    x = x.permute(1, 0, 2)
    rep = v.ln_post(x[:, 1:1 + n, :]).mean(dim=1) @ state["image_encoder.proj_rep"].float()
    return v.ln_post(x[:, 0, :]) @ v.proj, rep


@torch.no_grad()
def ref_mmrl_text(model, tokenizer, classnames, template, state, layers):
    toks = _rep_tokens(state, "t")
    n = toks[0].shape[0]
    tokens = tokenizer([template.format(c.replace("_", " ")) for c in classnames])
    x = (model.token_embedding(tokens) + model.positional_embedding).permute(1, 0, 2)
    mask, counter = _mask(77), 0
    for layer, blk in enumerate(model.transformer.resblocks, start=1):
        if layer in layers:
            suffix = x[1:] if layer == layers[0] else x[1 + n:]
            x = torch.cat([x[:1], toks[counter].expand(x.shape[1], -1, -1).permute(1, 0, 2), suffix], dim=0)
            counter += 1
        if layer >= layers[0]:
            mask = _mask(x.shape[0])
        x = official_block(blk, x, mask)
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1) + n] @ model.text_projection


def _views(c, deep, split):
    """(N, V, 2, 3, S, S) full and foreground pixels of every stored view, rebuilt from the stored boxes."""
    from PIL import Image

    from fvgpt_cache.datasets import find_mask
    from fvgpt_cache.views import binarize_mask
    prov = c.provenance
    maker = ViewMaker(deep.preprocess, prov["fg_mode"])
    out = []
    boxes = c.boxes(split)
    for i, rel in enumerate(c.paths(split)):
        img = Image.open(f"{prov['image_root']}/{rel}").convert("RGB")
        mask = binarize_mask(Image.open(find_mask(prov["mask_root"], rel)))
        views = []
        for v, kind in enumerate(prov["view_geometry"][split]):
            full, fg, _ = maker(img, mask, kind, Box.from_row(boxes[i, v]))
            views.append(torch.stack([full, fg]))
        out.append(torch.stack(views))
    return torch.stack(out)


def _min_cos(a, b):
    return float(F.cosine_similarity(F.normalize(a, dim=-1), F.normalize(b, dim=-1), dim=-1).min())


# ---------------------------------------------------------------- tests


def test_promptsrc_import_equals_the_official_forward(cache, deep, tmp_path):
    c = open_cache(cache)
    state = promptsrc_checkpoint(deep.model, deep.tokenizer, _base_names(c))
    assert state["prompt_learner.ctx"].dtype == torch.float16 and state["image_encoder.VPT"].dtype == torch.float32
    path = _save(state, tmp_path / "out" / "VLPromptLearner", epoch=20)
    summary = import_backbone(cache, "promptsrc", tmp_path / "out", ImportOptions(workers=0, batch_size=5), loaded=deep)
    assert summary.checkpoint == str(path.resolve()) and summary.epoch == 20
    assert summary.prompt_check == "matched the 2 base classes"
    c = open_cache(cache)
    for split in ("train", "test"):
        pixels = _views(c, deep, split)
        for k, kind in enumerate(("full", "fg")):
            ref = ref_promptsrc_image(deep.model, pixels[:, :, k].flatten(0, 1), state).view(*pixels.shape[:2], -1)
            got = c.image(split, kind, "promptsrc")
            assert _min_cos(got, ref) >= 0.9999, (split, kind)
            assert _min_cos(got, c.image(split, kind, "clip")) < 0.99  # the prompts change the features
    assert _min_cos(c.text("promptsrc"), ref_promptsrc_text(deep.model, deep.tokenizer, c.classnames, state)) >= 0.9999
    prov = c.text_provenance("promptsrc")
    assert prov["method"] == "promptsrc" and prov["image_encoder"] == "promptsrc"
    assert prov["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (prov["prompt_depth_text"], prov["prompt_depth_vision"], prov["n_ctx_text"], prov["n_ctx_vision"]) == (3, 3, 4, 4)
    assert prov["class_prompt"] == "a photo of a {}." and prov["checkpoint_dtypes"]["float16"] > 0
    # training and evaluation read the backbone's own image features
    assert torch.allclose(backbone_images(c, "promptsrc", "test", "full"), c.image("test", "full", "promptsrc"), atol=1e-6)


def test_mmrl_import_equals_the_official_forward_and_its_logits(cache, deep, tmp_path):
    c = open_cache(cache)
    template = c.text_attrs("clip")["template"]
    state = mmrl_checkpoint(deep.model, deep.tokenizer, _base_names(c), template)
    _save(state, tmp_path / "out" / "MultiModalRepresentationLearner", epoch=5, optimizer=torch.optim.AdamW)
    summary = import_backbone(cache, "mmrl", tmp_path / "out", ImportOptions(workers=0, batch_size=8), loaded=deep)
    layers = (4, 5, 6)  # the last K = 3 of the 6 blocks
    c = open_cache(cache)
    prov = c.text_provenance("mmrl")
    assert prov["rep_layers"] == list(layers) and prov["alpha"] == 0.7 and prov["rep_dim"] == 48
    assert summary.prompt_check == "matched the 2 base classes"
    pixels = _views(c, deep, "test")
    cls, rep = ref_mmrl_image(deep.model, pixels[:, 0, 0], state, layers)
    assert _min_cos(c.image("test", "full", "mmrl")[:, 0], cls) >= 0.9999
    assert _min_cos(c.image("test", "full_rep", "mmrl")[:, 0], rep) >= 0.9999
    pixels = _views(c, deep, "train")
    cls, rep = ref_mmrl_image(deep.model, pixels[:, :, 1].flatten(0, 1), state, layers)
    assert _min_cos(c.image("train", "fg", "mmrl").flatten(0, 1), cls) >= 0.9999
    assert _min_cos(c.image("train", "fg_rep", "mmrl").flatten(0, 1), rep) >= 0.9999
    text = ref_mmrl_text(deep.model, deep.tokenizer, c.classnames, template, state, layers)
    assert _min_cos(c.text("mmrl"), text) >= 0.9999

    # MMRL's own logits: base classes α·cls + (1 − α)·rep logits, new classes the class token's
    s, g = c.logit_scale, F.normalize(text, dim=-1)
    pixels = _views(c, deep, "test")[:, 0, 0]
    cls, rep = ref_mmrl_image(deep.model, pixels, state, layers)
    fused = 0.7 * s * F.normalize(cls, dim=-1) @ g.T + 0.3 * s * F.normalize(rep, dim=-1) @ g.T
    plain = s * F.normalize(cls, dim=-1) @ g.T
    ts = EvalSet(c, "mmrl")
    got_base = backbone_logits(ts.full, ts.txt_bb, ts.scale)
    got_new = backbone_logits(ts.full_new, ts.txt_bb, ts.scale)
    assert torch.allclose(got_base, fused, atol=1e-3 * s) and torch.allclose(got_new, plain, atol=1e-3 * s)
    assert not torch.allclose(got_base, plain, atol=1e-2 * s)  # the two branches really differ
    assert ts.full.norm(dim=-1).max() < 1 - 1e-4  # the fused vector is not renormalised


@pytest.mark.parametrize("method", ["promptsrc", "mmrl"])
def test_zero_prompts_are_not_a_no_op(deep, method):
    model = deep.model
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.encode_image(pixels)
        if method == "promptsrc":
            # without prompts the decomposed forward is exactly open_clip's encode_image
            none = promptsrc_image_features(model, pixels, PromptSRCPrompts(ctx=torch.zeros(4, 64), vision=None))
            assert torch.allclose(none, plain, atol=1e-5)
            zeros = PromptSRCPrompts(ctx=torch.zeros(4, 64), vision=torch.zeros(4, 64),
                                     vision_deep=[torch.zeros(4, 64)] * 2)
            got = promptsrc_image_features(model, pixels, zeros)
        else:
            rep = MMRLRepresentation(tokens=torch.zeros(3, 48), to_vision=[(torch.zeros(64, 48), torch.zeros(64))] * 3,
                                     to_text=[(torch.zeros(64, 48), torch.zeros(64))] * 3,
                                     proj_rep=torch.zeros(64, 32), rep_layers=(4, 5, 6))
            got, _ = mmrl_image_features(model, pixels, rep.vision_tokens(), rep.proj_rep, rep.rep_layers)
    # zero tokens still take part in attention (keys and values of their own), so the features move
    assert _min_cos(got, plain) < 0.999


def _bytes(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("change, needle", [
    ({"vision_cfg__width": 32, "vision_cfg__head_width": 32}, r"image_encoder\.VPT has shape \(4, 32\) but the cache's model needs \(n_ctx, 64\)"),
    ({"text_cfg__width": 32}, r"prompt_learner\.ctx has shape \(4, 32\) but the cache's model needs \(n_ctx, 64\)"),
    ({"vision_cfg__layers": 8}, r"image_encoder\.transformer\.resblocks\.6\.\S+ \(shape .*\) has no counterpart .* 6 blocks"),
    ({"text_cfg__layers": 4}, r"has 6 blocks in transformer\.resblocks but the checkpoint has 4"),
    ({}, r"frozen CLIP weights in the checkpoint differ from the cache's model at image_encoder\.class_embedding"),
])
def test_promptsrc_of_another_width_or_depth_is_refused_by_key_and_nothing_is_written(cache, deep, tmp_path_factory,
                                                                                     tmp_path, change, needle):
    other = load_clip(str(_config(tmp_path_factory, "other", **change)), "none", seed=1)
    c = open_cache(cache)
    path = _save(promptsrc_checkpoint(other.model, other.tokenizer, _base_names(c)), tmp_path / "ck")
    before = _bytes(cache)
    with pytest.raises(ValueError, match=needle) as err:
        import_backbone(cache, "promptsrc", path, ImportOptions(workers=0), loaded=deep)
    assert str(path) in str(err.value)
    assert _bytes(cache) == before and not import_partial(c.path, "promptsrc").exists()


def test_mmrl_of_another_width_or_depth_is_refused_by_key(cache, deep, tmp_path_factory, tmp_path):
    c = open_cache(cache)
    other = load_clip(str(_config(tmp_path_factory, "narrow", vision_cfg__width=32, vision_cfg__head_width=32)), "none", seed=1)
    state = mmrl_checkpoint(other.model, other.tokenizer, _base_names(c), "a photo of a {}.")
    with pytest.raises(ValueError, match=r"r2vproj\.0\.weight has shape \(32, 48\) but the cache's model needs \(64, 48\)"):
        import_backbone(cache, "mmrl", _save(state, tmp_path / "a"), ImportOptions(workers=0), loaded=deep)
    # more representation layers than the model has blocks
    state = mmrl_checkpoint(deep.model, deep.tokenizer, _base_names(c), "a photo of a {}.", k=7)
    with pytest.raises(ValueError, match=r"7 representation layers .* 6 vision and 6 text blocks"):
        import_backbone(cache, "mmrl", _save(state, tmp_path / "b"), ImportOptions(workers=0), loaded=deep)
    # prompts of PromptSRC deeper than the model, without frozen weights to compare
    state = promptsrc_checkpoint(deep.model, deep.tokenizer, _base_names(c), depth_v=9, frozen=False)
    with pytest.raises(ValueError, match=r"resblocks\.6\.VPT_shallow prompts vision block 6, but the cache's model has 6"):
        import_backbone(cache, "promptsrc", _save(state, tmp_path / "c"), ImportOptions(workers=0), loaded=deep)
    assert set(open_cache(cache).text_groups) == {"clip"}


def test_a_checkpoint_of_another_method_is_refused_naming_the_key(cache, deep, tmp_path):
    c = open_cache(cache)
    mmrl = _save(mmrl_checkpoint(deep.model, deep.tokenizer, _base_names(c), "a photo of a {}."), tmp_path / "m")
    with pytest.raises(ValueError, match=r"is a MMRL checkpoint \(it has representation_learner\.compound_rep_tokens\), "
                                         r"not PromptSRC .*pass --method mmrl"):
        import_backbone(cache, "promptsrc", mmrl, ImportOptions(workers=0), loaded=deep)
    coop = _save({"prompt_learner.ctx": torch.zeros(4, 64)}, tmp_path / "c")
    with pytest.raises(ValueError, match=r"CoOp/KgCoOp checkpoint .*backbone load"):
        import_backbone(cache, "mmrl", coop, ImportOptions(workers=0), loaded=deep)
    # a PromptSRC output folder given for MMRL
    _save(promptsrc_checkpoint(deep.model, deep.tokenizer, _base_names(c)), tmp_path / "out" / "VLPromptLearner")
    with pytest.raises(FileNotFoundError, match=r"holds VLPromptLearner/.*pass the matching --method"):
        import_backbone(cache, "mmrl", tmp_path / "out", ImportOptions(workers=0), loaded=deep)


def test_checkpoint_folders_dtypes_and_pointer_file(cache, deep, tmp_path):
    c = open_cache(cache)
    names = _base_names(c)
    folder = tmp_path / "run" / "MultiModalPromptLearner"  # MMRL's older folder name
    state = mmrl_checkpoint(deep.model, deep.tokenizer, names, c.text_attrs("clip")["template"], dtype=torch.float16)
    for epoch in (2, 10, 5):
        _save(state, folder, epoch=epoch, optimizer=torch.optim.AdamW)
    path, why = find_checkpoint(tmp_path / "run", "mmrl")
    assert path.name == "model.pth.tar-10" and why.startswith("latest epoch 10")  # by number, not by name
    tensors, info = load_state_dict(tmp_path / "run", "mmrl")
    assert info["dtypes"] == {"float16": len(tensors)} and info["epoch"] == 10
    summary = import_backbone(cache, "mmrl", tmp_path / "run", ImportOptions(workers=0, batch_size=16), loaded=deep)
    assert summary.epoch == 10 and open_cache(cache).text_provenance("mmrl")["rep_token_dtype"] == "float16"
    only = tmp_path / "ptr" / "VLPromptLearner"
    only.mkdir(parents=True)
    state = promptsrc_checkpoint(deep.model, deep.tokenizer, names, dtype=torch.float16)  # PREC fp16 throughout
    torch.save(_dassl(state, 7), only / "model-last.pth.tar")
    (only / "checkpoint").write_text("model-last.pth.tar\n")
    assert find_checkpoint(tmp_path / "ptr", "promptsrc") == (only / "model-last.pth.tar", "named by checkpoint")
    summary = import_backbone(cache, "promptsrc", tmp_path / "ptr", ImportOptions(workers=0, batch_size=16), loaded=deep)
    assert summary.epoch == 7 and open_cache(cache).text_provenance("promptsrc")["checkpoint_choice"] == "named by checkpoint"


class Unlisted:
    """A class no Dassl checkpoint pickles."""


def test_only_dassls_pickled_classes_are_allowed(tmp_path):
    path = _save({"prompt_learner.ctx": torch.zeros(4, 64)}, tmp_path / "ok")
    assert set(load_state_dict(path, "promptsrc")[0]) == {"prompt_learner.ctx"}
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Unlisted()}, bad)
    with pytest.raises(ValueError, match=r"pickles test_import\.Unlisted, which is not one of the optimiser and scheduler"):
        load_state_dict(bad, "promptsrc")


@pytest.mark.slow
def test_class_prompts_that_differ_are_refused_unless_asked(cache, deep, tmp_path):
    c = open_cache(cache)
    wrong = list(reversed(_base_names(c)))  # other class order
    path = _save(promptsrc_checkpoint(deep.model, deep.tokenizer, wrong), tmp_path / "a")
    with pytest.raises(ValueError, match=r"base class #0 .* differs at token 5 .*--no-prompt-check"):
        import_backbone(cache, "promptsrc", path, ImportOptions(workers=0), loaded=deep)
    with pytest.raises(ValueError, match=r"--ctx-init"):
        import_backbone(cache, "promptsrc", path, ImportOptions(workers=0, ctx_init="a photo of"), loaded=deep)
    summary = import_backbone(cache, "promptsrc", path, ImportOptions(workers=0, batch_size=16, prompt_check=False),
                              loaded=deep)
    assert summary.prompt_check.startswith("skipped")
    template = c.text_attrs("clip")["template"]
    mmrl = _save(mmrl_checkpoint(deep.model, deep.tokenizer, _base_names(c), "a blurry photo of a {}."), tmp_path / "b")
    with pytest.raises(ValueError, match=r"--template"):
        import_backbone(cache, "mmrl", mmrl, ImportOptions(workers=0), loaded=deep)
    assert template != "a blurry photo of a {}."
    summary = import_backbone(cache, "mmrl", mmrl, ImportOptions(workers=0, batch_size=16, name="mmrl_blurry",
                                                                template="a blurry photo of a {}."), loaded=deep)
    assert summary.prompt_check == "matched the 2 base classes"


@pytest.mark.slow
def test_interrupted_import_resumes_to_identical_features(cache, deep, tmp_path):
    c = open_cache(cache)
    path = _save(mmrl_checkpoint(deep.model, deep.tokenizer, _base_names(c), c.text_attrs("clip")["template"]),
                 tmp_path / "ck")
    reference = shutil.copy(cache, tmp_path / "ref.h5")
    import_backbone(reference, "mmrl", path, ImportOptions(workers=0, batch_size=4), loaded=deep)
    before = _bytes(cache)
    with pytest.raises(KeyboardInterrupt):
        import_backbone(cache, "mmrl", path, ImportOptions(workers=0, batch_size=4), stop_after_batches=3,
                        loaded=deep)
    assert _bytes(cache) == before and import_partial(c.path, "mmrl").exists()
    with pytest.raises(CacheError, match="another checkpoint, other settings"):
        import_backbone(cache, "mmrl", path, ImportOptions(workers=0, batch_size=4, rep_layers=(1, 2, 3)),
                        loaded=deep)
    summary = import_backbone(cache, "mmrl", path, ImportOptions(workers=0, batch_size=4, alpha=0.5), loaded=deep)
    assert summary.resumed_rows == 12 and not import_partial(c.path, "mmrl").exists()
    a, b = open_cache(reference), open_cache(cache)
    for split in ("train", "val", "test"):
        for kind in ("full", "fg", "full_rep", "fg_rep"):
            assert torch.equal(a.image(split, kind, "mmrl"), b.image(split, kind, "mmrl")), (split, kind)
    assert torch.equal(a.text("mmrl"), b.text("mmrl")) and b.text_provenance("mmrl")["alpha"] == 0.5
    with pytest.raises(CacheError, match="already has text/mmrl, image/mmrl; pass --force"):
        import_backbone(cache, "mmrl", path, ImportOptions(workers=0), loaded=deep)


def test_changed_masks_or_images_are_refused(cache, deep, tmp_path):
    c = open_cache(cache)
    path = _save(promptsrc_checkpoint(deep.model, deep.tokenizer, _base_names(c)), tmp_path / "ck")
    masks = tmp_path / "masks"
    shutil.copytree(c.provenance["mask_root"], masks)
    rel = c.paths("val")[1]
    target = next(masks.glob(rel.rsplit(".", 1)[0] + ".*"))
    from PIL import Image
    Image.new("L", Image.open(target).size, 255).save(target)
    with pytest.raises(RuntimeError, match=f"val image {rel}: its foreground area is 1.0000 but the cache stores"):
        import_backbone(cache, "promptsrc", path, ImportOptions(workers=0, mask_root=str(masks)), loaded=deep)
    images = tmp_path / "images"
    shutil.copytree(c.provenance["image_root"], images)
    first = images / c.paths("train")[0]
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 128).save(first)
    with pytest.raises(CacheError, match="does not reproduce the cache's CLIP features"):
        import_backbone(cache, "promptsrc", path, ImportOptions(workers=0, image_root=str(images)), loaded=deep)
    with pytest.raises(FileNotFoundError, match="Pass --mask-root DIR"):
        import_backbone(cache, "promptsrc", path, ImportOptions(workers=0, mask_root=str(tmp_path)), loaded=deep)


@pytest.mark.slow
def test_cli_imports_both_and_trains_on_them(tmp_path, tmp_path_factory, deep):
    """extract → backbone import (folder, older MMRL folder name) → baselines → train, on a generated dataset."""
    run = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    split, images, masks = write_generic_dataset(tmp_path / "data")
    cache = tmp_path / "c.h5"
    res = run("extract", "--split-file", split, "--image-root", images, "--mask-root", masks, "--model",
              _config(tmp_path_factory, "cli-clip"), "--pretrained", "none", "--shots", "4", "--train-views", "3",
              "--workers", "0", "--out", cache)
    assert res.exit_code == 0, res.output
    res = run("train", cache, "--backbone", "mmrl", "--epochs", "2")
    assert res.exit_code == 2 and "fvgpt-cache backbone import" in res.output and "--method mmrl" in res.output
    c = open_cache(cache)
    _save(promptsrc_checkpoint(deep.model, deep.tokenizer, _base_names(c)), tmp_path / "psrc" / "VLPromptLearner", 20)
    _save(mmrl_checkpoint(deep.model, deep.tokenizer, _base_names(c), c.text_attrs("clip")["template"]),
          tmp_path / "mmrl" / "MultiModalPromptLearner", 5, optimizer=torch.optim.AdamW)
    res = run("backbone", "import", cache, "--method", "promptsrc", "--checkpoint", tmp_path / "psrc", "--workers", "0")
    assert res.exit_code == 0, res.output
    assert "matched the 2 base classes" in res.output and "train" in res.output
    res = run("backbone", "import", cache, "--method", "mmrl", "--checkpoint", tmp_path / "mmrl", "--workers", "0",
              "--alpha", "0.6", "--rep-layers", "4,5,6")
    assert res.exit_code == 0, res.output
    res = run("backbone", "import", cache, "--method", "promptsrc", "--checkpoint", tmp_path / "mmrl", "--name", "p2")
    assert res.exit_code == 2 and "MultiModalPromptLearner/" in res.output
    res = run("backbone", "import", cache, "--method", "promptsrc", "--checkpoint", tmp_path / "psrc", "--alpha", "0.5")
    assert res.exit_code == 2 and "MMRL options" in res.output
    c = open_cache(cache)
    assert {"promptsrc", "mmrl"} <= set(c.text_groups) and c.text_provenance("mmrl")["alpha"] == 0.6
    assert c.has_image("train", "fg_rep", "mmrl") and not c.has_image("train", "fg_rep", "promptsrc")
    res = run("baselines", cache, "--json", "--no-linear-probe")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert set(rows) == {"clip", "promptsrc", "mmrl"} and all(rows[k]["hm"] is not None for k in rows)
    for backbone in ("promptsrc", "mmrl"):
        res = run("train", cache, "--backbone", backbone, "--epochs", "2", "--json", "--out", tmp_path / backbone)
        assert res.exit_code == 0, res.output
        record = json.loads(res.stdout)
        assert record["backbone"] == backbone and record["metrics"]["backbone"]["base"] == rows[backbone]["base"]
    res = run("grid", cache, "--set", "backbone=mmrl", "--set", "epochs=2", "--param", "lambda_d=5,10",
              "--out", tmp_path / "grid")
    assert res.exit_code == 0, res.output
    res = run("report", tmp_path / "grid", "--format", "json", "--compare", "paper")
    assert res.exit_code == 0, res.output
    assert {r["backbone"] for r in json.loads(res.stdout)} == {"mmrl"}
