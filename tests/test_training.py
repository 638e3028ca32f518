import json
import math

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fvgpt_cache.cli.main import app
from fvgpt_cache.evaluation import EvalSet, accuracy, evaluate
from fvgpt_cache.equations import clip_logits
from fvgpt_cache.heads import FVGPTHead
from fvgpt_cache.runs import load_head, run_training
from fvgpt_cache.store import CacheError, open_cache, write_text_group
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig, config_with, lr_at_epoch, parse_value, subsample_per_class

SMALL = dict(num_classes=6, shots=8, views=2, dim=32, test_per_class=10)


@pytest.fixture()
def syn(tmp_path):
    return write_feature_cache(tmp_path / "syn.h5", **SMALL)


def test_lr_schedule_matches_dassl_constant_warmup_then_cosine():
    cfg = TrainConfig()
    assert lr_at_epoch(0, cfg) == 1e-5
    assert lr_at_epoch(1, cfg) == pytest.approx(0.0035)
    assert lr_at_epoch(2, cfg) == pytest.approx(0.5 * 0.0035 * (1 + math.cos(math.pi / 10)))
    assert lr_at_epoch(9, cfg) == pytest.approx(0.5 * 0.0035 * (1 + math.cos(math.pi * 8 / 10)))


def test_same_seed_same_numbers_other_seed_other_weights(syn, tmp_path):
    a = run_training(syn, TrainConfig(seed=1), tmp_path / "a")
    b = run_training(syn, TrainConfig(seed=1), tmp_path / "b")
    run_training(syn, TrainConfig(seed=2), tmp_path / "c")
    assert a.metrics == b.metrics and a.history == b.history
    wa, wb, wc = (torch.load(tmp_path / x / "head.pt", weights_only=True)["state_dict"] for x in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_results_json_schema_and_head_reload(syn, tmp_path):
    rec = run_training(syn, TrainConfig(), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("fvgpt", "backbone", "zeroshot"):
        assert set(saved["metrics"][key]) == {"base", "new", "hm"}
        b, n, hm = (saved["metrics"][key][k] for k in ("base", "new", "hm"))
        assert hm == pytest.approx(2 * b * n / (b + n))
    assert saved["backbone"] == "synthetic_bb" and saved["seed"] == 1
    assert saved["config"]["lambda_d"] == 10.0 and saved["cache_provenance"]["model"] == "synthetic-features"
    d, h = 32, 64
    assert saved["head_parameters"] == 2 * (d * h + h + h * d + d) + 2 * (3 * 32 + 32 + 32 + 1)
    assert saved["train_images"] == 3 * 8 and saved["views"] == 2
    head, cfg = load_head(tmp_path / "run" / "head.pt", dim=32)
    again = evaluate(head, open_cache(syn), cfg.backbone, cfg.classes)
    assert again["metrics"] == rec.metrics


def test_inference_routing_base_via_fdc_new_via_pc(syn, tmp_path):
    cache = open_cache(syn)
    rec = run_training(syn, TrainConfig(epochs=3), tmp_path / "run")
    head, _ = load_head(tmp_path / "run" / "head.pt")
    ts = EvalSet(cache, "synthetic_bb")
    rows, y, txt_bb, txt_clip = ts.subset(cache.base)
    with torch.no_grad():
        assert rec.metrics["fvgpt"]["base"] == pytest.approx(accuracy(head.fdc(ts.full[rows], txt_bb, ts.scale), y))
    rows, y, txt_bb, txt_clip = ts.subset(cache.new)
    with torch.no_grad():
        z_pc = head.predict_new(ts.full[rows], ts.clip[rows], txt_bb, txt_clip, ts.scale)
    assert rec.metrics["fvgpt"]["new"] == pytest.approx(accuracy(z_pc, y))
    assert rec.metrics["backbone"]["new"] == pytest.approx(accuracy(clip_logits(ts.full[rows], txt_bb, ts.scale), y))
    with torch.no_grad():  # the new branch never calls FDC
        for p in head.fdc.parameters():
            p.fill_(float("nan"))
    assert evaluate(head, cache, "synthetic_bb")["metrics"]["fvgpt"]["new"] == rec.metrics["fvgpt"]["new"]


def test_no_mask_is_needed_at_test_time(syn, tmp_path):
    rec = run_training(syn, TrainConfig(epochs=3), tmp_path / "run")
    with h5py.File(syn, "r+") as f:
        f["image/clip/test/fg"][...] = np.nan
    head, cfg = load_head(tmp_path / "run" / "head.pt")
    assert evaluate(head, open_cache(syn), cfg.backbone)["metrics"] == rec.metrics


def test_modules_off_fall_back_to_the_backbone(syn):
    rec = run_training(syn, TrainConfig(use_fdc=False, use_pc=False, epochs=2), save=False)
    assert rec.metrics["fvgpt"] == rec.metrics["backbone"]
    assert rec.head_parameters == 0


def test_backbone_choice_and_refusals(syn, tmp_path):
    cache = open_cache(syn)
    assert run_training(syn, TrainConfig(epochs=2), save=False).backbone == "synthetic_bb"
    write_text_group(syn, "other_bb", cache.text("clip").numpy(), {"method": "test"})
    with pytest.raises(CacheError, match=r"several backbones \['other_bb', 'synthetic_bb'\]"):
        run_training(syn, TrainConfig(epochs=2), save=False)
    with pytest.raises(CacheError, match="no backbone 'coop'"):
        run_training(syn, TrainConfig(epochs=2, backbone="coop"), save=False)
    with pytest.raises(CacheError, match="shape"):
        write_text_group(syn, "bad", np.ones((3, 32)), {})
    other = write_feature_cache(tmp_path / "other.h5", **{**SMALL, "dim": 16})
    with h5py.File(other, "r+") as f:
        prov = json.loads(f.attrs["provenance"])
        f.attrs["provenance"] = json.dumps({**prov, "model": "another-model"})
    with pytest.raises(CacheError, match="different models"):
        run_training(syn, TrainConfig(epochs=2, backbone="synthetic_bb"), eval_caches=[other], save=False)


def test_head_checkpoint_refusals(syn, tmp_path):
    run_training(syn, TrainConfig(epochs=2), tmp_path / "run")
    with pytest.raises(ValueError, match="trained on 32-d features but the cache has 512-d"):
        load_head(tmp_path / "run" / "head.pt", dim=512)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an fvgpt-cache head checkpoint"):
        load_head(tmp_path / "x.pt")
    blob = torch.load(tmp_path / "run" / "head.pt", weights_only=True)
    blob["state_dict"]["fdc.image.mlp.0.weight"] = torch.zeros(5, 5)
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_head(tmp_path / "bad.pt")


def test_cross_dataset_all_classes_then_targets(tmp_path):
    src = write_feature_cache(tmp_path / "src.h5", **SMALL, seed=0)
    tgt = write_feature_cache(tmp_path / "tgt.h5", **{**SMALL, "num_classes": 4}, seed=5)
    rec = run_training(src, TrainConfig(classes="all", epochs=2), save=False, eval_caches=[tgt])
    assert rec.metrics["fvgpt"]["base"] is None and rec.metrics["fvgpt"]["all"] is not None
    assert rec.train_images == 6 * 8
    (t,) = rec.cross_dataset
    assert t["test_images"] == 40 and set(t) >= {"fvgpt", "backbone", "zeroshot"}


def test_data_fraction_keeps_ceil_per_class():
    labels = np.repeat(np.arange(3), [4, 5, 7])
    keep = subsample_per_class(labels, 0.5, seed=1)
    assert np.bincount(labels[keep]).tolist() == [2, 3, 4]
    assert keep.tolist() == sorted(keep.tolist())


def test_parse_and_validate_parameters():
    assert parse_value("use_frg", "off") is False
    assert parse_value("frg_indicators", "dH+area") == ("dH", "area")
    with pytest.raises(ValueError, match="unknown parameter 'lamda_d'.*lambda_d"):
        parse_value("lamda_d", "3")
    with pytest.raises(ValueError, match="epochs=0"):
        config_with(TrainConfig(), epochs=0)
    with pytest.raises(ValueError, match=r"frg_indicators=\('dH', 'size'\): use a non-empty subset"):
        config_with(TrainConfig(), frg_indicators=("dH", "size"))
    with pytest.raises(ValueError, match="frg_layers=4"):
        config_with(TrainConfig(), frg_layers=4)


def test_param_count_for_vit_b16_width():
    assert FVGPTHead(512).num_parameters() == 132_546


def test_train_command_table_and_json(syn, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(syn), "--lambda-d", "5", "--epochs", "2", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "+ FVG-PT" in res.output and "zero-shot CLIP" in res.output and "D_fg" in res.output
    res = runner.invoke(app, ["train", str(syn), "--epochs", "2", "--no-frg", "--set", "fdc_hidden=8", "--json",
                              "--out", str(tmp_path / "j")])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["config"]["use_frg"] is False and rec["config"]["fdc_hidden"] == 8
    res = runner.invoke(app, ["train", str(syn), "--set", "nope=1"])
    assert res.exit_code == 2 and "unknown parameter 'nope'" in res.output


# --- issue 10: presets, augmented views, diagnostics, stability ------------------------------------

def _with_backbone(path, method, dataset="syn", **extra):
    """A synthetic cache whose backbone group says it was made with `method` (and a dataset name)."""
    p = write_feature_cache(path, **SMALL, backbone=None)
    with h5py.File(p, "r+") as f:
        prov = json.loads(f.attrs["provenance"])
        prov.update(dataset=dataset, augmentation={"random_resized_crop_scale": list(extra.get("scale", (0.08, 1.0)))})
        f.attrs["provenance"] = json.dumps(prov)
    cache = open_cache(p)
    write_text_group(p, method, cache.text("clip"), {"method": method})
    return open_cache(p)


@pytest.mark.parametrize("method, dataset, classes, name, expect", [
    ("coop", "oxford_pets", "base", "coop", {"epochs": 10, "lr": 0.0035, "batch_size": 4, "optimizer": "sgd"}),
    ("coop", "eurosat", "base", "coop-eurosat", {"epochs": 20, "lr": 0.002}),
    ("kgcoop", "eurosat", "base", "kgcoop", {"epochs": 10, "lr": 0.0035}),
    ("promptsrc", "dtd", "base", "promptsrc", {"batch_size": 32, "lr": 0.0025, "epochs": 10}),
    ("promptsrc", "imagenet", "all", "promptsrc-cross", {"batch_size": 4, "lr": 0.0035, "epochs": 5}),
    ("mmrl", "dtd", "base", "mmrl", {"optimizer": "adamw", "lr": 0.001, "lambda_d": 5.0, "batch_size": 4}),
    ("mmrl", "imagenet", "all", "mmrl-cross", {"batch_size": 32, "epochs": 5, "warmup_epochs": 0, "lambda_d": 5.0}),
])
def test_preset_follows_the_backbone_method_dataset_and_protocol(tmp_path, method, dataset, classes, name, expect):
    from fvgpt_cache.training import configure

    cache = _with_backbone(tmp_path / "c.h5", method, dataset)
    cfg, info = configure(cache, {"classes": classes})
    assert info["preset"]["name"] == name and info["preset"]["source"].startswith("JREion/FVG-PT configs/trainers/FVGPT_")
    assert {k: getattr(cfg, k) for k in expect} == expect
    explicit, info = configure(cache, {"classes": classes, "lr": 0.01, "epochs": 3})
    assert explicit.lr == 0.01 and explicit.epochs == 3  # an explicit option beats the preset
    assert info["overridden"] == ["epochs", "lr"]
    plain, info = configure(cache, {"classes": classes}, preset_of="none")
    assert info["preset"] is None and plain.lr == TrainConfig().lr and plain.epochs == 10


def test_zero_shot_clip_backbone_uses_coops_preset_and_mmrl_warns_about_the_crop_scale(tmp_path):
    from fvgpt_cache.training import configure

    cache = _with_backbone(tmp_path / "c.h5", "mmrl", "dtd")
    cfg, info = configure(cache, {"backbone": "clip"})
    assert info["preset"]["name"] == "clip" and cfg.lr == 0.0035
    _, info = configure(cache, {"backbone": "mmrl"})
    assert any("--rrc-scale 0.5,1.0" in w for w in info["warnings"])
    cache = _with_backbone(tmp_path / "d.h5", "mmrl", "dtd", scale=(0.5, 1.0))
    assert configure(cache, {})[1]["warnings"] == []


def test_train_cli_records_the_preset_and_lambda_new(tmp_path):
    cache = _with_backbone(tmp_path / "c.h5", "promptsrc", "dtd")
    out = CliRunner().invoke(app, ["train", str(cache.path), "--json", "--out", str(tmp_path / "r"), "--epochs", "2",
                                   "--lambda-new", "0.5"])
    assert out.exit_code == 0, out.output
    rec = json.loads(out.output)
    assert rec["preset"]["preset"]["name"] == "promptsrc" and rec["preset"]["overridden"] == ["epochs", "lambda_pc"]
    assert rec["config"]["batch_size"] == 32 and rec["config"]["epochs"] == 2 and rec["config"]["lambda_pc"] == 0.5
    table = CliRunner().invoke(app, ["train", str(cache.path), "--out", str(tmp_path / "r2"), "--epochs", "2"])
    assert "preset promptsrc (JREion/FVG-PT configs/trainers/FVGPT_PromptSRC" in table.output.replace("\n", "")


def test_view_schedule_walks_a_permutation_of_the_augmented_views():
    from fvgpt_cache.training import view_schedule

    s = view_schedule(n=7, views=5, epochs=10, seed=3)
    assert s.shape == (10, 7) and s.min() >= 1 and s.max() <= 4
    for i in range(7):
        for cycle in (s[0:4, i], s[4:8, i]):  # every cycle of 4 epochs uses each augmented view once
            assert sorted(cycle.tolist()) == [1, 2, 3, 4]
    assert torch.equal(s, view_schedule(7, 5, 10, 3)) and not torch.equal(s, view_schedule(7, 5, 10, 4))
    assert (s[:, 0] != s[:, 1]).any()  # images walk different permutations
    assert torch.equal(view_schedule(3, 1, 4, 1), torch.zeros(4, 3, dtype=torch.long))


def test_a_cache_without_augmented_views_trains_with_a_warning(tmp_path):
    one = write_feature_cache(tmp_path / "one.h5", **{**SMALL, "views": 1})
    rec = run_training(one, TrainConfig(epochs=2), save=False)
    assert any("no augmented training views" in w for w in rec.warnings)
    two = run_training(write_feature_cache(tmp_path / "two.h5", **SMALL), TrainConfig(epochs=2), save=False)
    assert two.warnings == []


def test_gate_summary_on_a_hand_built_case():
    from fvgpt_cache.evaluation import gate_summary

    r = torch.tensor([0.9, 0.8, 0.3, 0.2, 0.7, 0.95])
    r_star = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    usable = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # the last two views are cut by the area gate
    s = gate_summary(r, r_star, usable)
    # usable views: positives 0.9, 0.3; negatives 0.8, 0.2 → pairs won 0.9>0.8, 0.9>0.2, 0.3>0.2 = 3 of 4
    assert s["frg_auc"] == pytest.approx(0.75)
    # all views: negatives also 0.7, 0.95 → 0.9 beats 0.8, 0.2, 0.7; 0.3 beats 0.2 → 4 of 8
    assert s["frg_auc_all"] == pytest.approx(0.5)
    assert s["r_star_share"] == pytest.approx(2 / 6) and s["area_cut_share"] == pytest.approx(2 / 6)
    assert s["r_mean"] == pytest.approx(float(r.mean()))


def test_run_reports_gate_diagnostics(syn, tmp_path):
    """The training diagnostics are those of the trained head on the augmented training views, recomputed here by
    hand from the cache: r* = 1[CE(z_fg) < CE(z_full)] inside the area gate, the mean r, the AUC of r against r*
    counted over pairs, the share the area gate cuts.
    Break used: `evaluation.gate_diagnostics` reading view 0 (the squash) instead of the augmented views; the old
    range checks (and the view count, the same with 2 stored views) passed."""
    from fvgpt_cache.runs import load_head
    from fvgpt_cache.store import open_cache
    from fvgpt_cache.training import build_head, prepare

    rec = run_training(syn, TrainConfig(epochs=3), out_dir=tmp_path / "run")
    d = rec.diagnostics
    assert d["train"]["views"] == 3 * 8 * 1  # the augmented views (1 of 2 stored) of the 24 training images
    for part in ("train", "test_base"):
        assert 0 <= d[part]["r_star_share"] <= 1 and 0 < d[part]["r_mean"] < 1
    assert 0 <= d["b_mean_base"] <= 1 and 0 <= d["b_mean_new"] <= 1
    head, cfg = load_head(tmp_path / "run" / "head.pt")
    data = prepare(open_cache(syn), cfg)
    full, fg, clip, area = (x[:, 1].double() for x in (data.full, data.fg, data.clip, data.area))
    txt = torch.nn.functional.normalize(data.txt_bb.double(), dim=-1)
    ce = lambda v: torch.nn.functional.cross_entropy(data.scale * v @ txt.T, data.y, reduction="none")  # noqa: E731
    usable = (area >= 0.02) & (area <= 0.98)
    r_star = (ce(fg) < ce(full)) & usable
    assert 0 < r_star.sum() < usable.sum(), "both kinds of view occur, so the AUC means something"
    assert d["train"]["r_star_share"] == pytest.approx(float(r_star.double().mean()), abs=1e-9)
    assert d["train"]["area_cut_share"] == pytest.approx(float(1 - usable.double().mean()), abs=1e-9)
    frozen = head.frozen(full.float(), fg.float(), clip.float(), area.float(), data.y, data.txt_bb, data.txt_clip,
                         data.scale)
    r = head.gates(frozen)["r"].double()
    assert d["train"]["r_mean"] == pytest.approx(float(r.mean()), abs=1e-6)
    pos, neg = r[r_star], r[usable & ~r_star]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert d["train"]["frg_auc"] == pytest.approx(float(wins.mean()), abs=1e-9)
    assert d["frg_learned"] == (abs(float(wins.mean()) - 0.5) >= 0.05)
    start = build_head(data.full.shape[-1], cfg).gates(head.frozen(full.float(), fg.float(), clip.float(), area.float(),
                                                                   data.y, data.txt_bb, data.txt_clip, data.scale))["r"]
    assert abs(float(start.mean()) - d["train"]["r_mean"]) > 1e-4, "the trained gate, not the initial one"
    no_frg = run_training(syn, TrainConfig(epochs=2, use_frg=False), save=False).diagnostics
    assert no_frg["train"]["r_mean"] is None and no_frg["frg_learned"] is None


def test_collapse_flag_on_hand_made_fits():
    from fvgpt_cache.training import stability

    def fit(start, end):
        return {"start": {"acc": start[0], "ce": start[1]}, "end": {"acc": end[0], "ce": end[1]}}

    assert stability(fit((47.0, 1.30), (88.0, 0.50)))["collapsed"] is False  # healthy
    s = stability(fit((47.0, 1.30), (21.0, 1.52)))
    assert s["collapsed"] is True and s["reason"] == "accuracy fell, cross-entropy rose"
    assert stability(fit((50.0, 1.10), (49.0, 1.40)))["reason"] == "cross-entropy rose"
    assert stability(fit((73.8, 0.748), (78.1, 0.787)))["collapsed"] is False  # a CE 5 % higher is not a collapse
    assert stability(None)["checked"] is False  # no FDC branch
    # ending below the backbone's own accuracy on its training views by more than 5 points is flagged
    assert stability(fit((47.0, 2.0), (45.0, 1.9)), backbone_acc=52.0)["collapsed"] is True
    assert stability(fit((47.0, 2.0), (48.0, 1.9)), backbone_acc=52.0)["collapsed"] is False


@pytest.mark.slow
def test_a_real_collapse_is_flagged_and_a_healthy_run_is_not(tmp_path):
    """On the confound world of the collapse study, seed 4 collapses with the release's lr, not with lr 0.001."""
    from fvgpt_cache.synthetic import write_feature_cache as write

    cache = write(tmp_path / "confound.h5", num_classes=20, shots=16, views=4, dim=64, confound=1.05, signal=0.6)
    bad = run_training(cache, TrainConfig(seed=4), save=False)
    good = run_training(cache, TrainConfig(seed=4, lr=0.001), save=False)
    assert bad.stability["collapsed"] is True and good.stability["collapsed"] is False
    assert bad.stability["acc_fdc_end"] < bad.stability["acc_fdc_start"]
