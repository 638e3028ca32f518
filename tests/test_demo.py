"""The world demo: its JSON schema, and its numbers are those of real training runs."""
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fvgpt_cache.cli.main import app
from fvgpt_cache.demo import METHOD_KEYS, run_world_demo, spread, story
from fvgpt_cache.equations import harmonic_mean
from fvgpt_cache.heads import FVGPTHead
from fvgpt_cache.world import SHAPES

SMALL = dict(classes=SHAPES[:6], shots=4, val_per_class=1, test_per_class=8, train_views=3)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, run_world_demo(root, seeds=(1, 2), **SMALL)


def test_demo_json_has_the_issue_schema(small_demo):
    _, summary = small_demo
    assert summary["seeds"] == [1, 2] and set(summary["splits"]) == {"clean", "counterfactual"}
    for entry in summary["splits"].values():
        assert set(entry) == {*METHOD_KEYS, "frg_auc", "foreground_shift", "per_seed"}
        assert set(entry["per_seed"]) == {"1", "2"}
        for key in METHOD_KEYS:
            assert set(entry[key]) == {"base", "new", "hm"}
            seeds = [entry["per_seed"][s][key] for s in ("1", "2")]
            assert entry[key]["base"] == pytest.approx((seeds[0]["base"] + seeds[1]["base"]) / 2)
            assert entry[key]["hm"] == pytest.approx(harmonic_mean(entry[key]["base"], entry[key]["new"]))
            assert 0 <= entry[key]["base"] <= 100
        assert 0 <= entry["frg_auc"] <= 1
        assert set(entry["foreground_shift"]) == {"backbone", "fvgpt", "control_full"}
    assert len(summary["story"]) == 3 and all(s.endswith(".") for s in summary["story"])
    cf = summary["splits"]["counterfactual"]
    assert f"{cf['fvgpt']['base']:.1f}%" in summary["story"][1]
    assert spread(cf, "fvgpt", "base") == pytest.approx(
        abs(cf["per_seed"]["1"]["fvgpt"]["base"] - cf["per_seed"]["2"]["fvgpt"]["base"]) / math.sqrt(2))


def test_demo_numbers_equal_the_train_command(small_demo):
    root, summary = small_demo
    runner = CliRunner()
    for split in ("counterfactual", "clean"):
        cache = root / f"world-{split}.h5"
        for variant, extra in (("fvgpt", []), ("control_full", ["--set", "r_source=full"])):
            res = runner.invoke(app, ["train", str(cache), "--backbone", "coop", "--seed", "2", "--json", *extra,
                                      "--out", str(root / f"check-{split}-{variant}")])
            assert res.exit_code == 0, res.output
            record = json.loads(res.stdout)
            seed2 = summary["splits"][split]["per_seed"]["2"]
            for key in ("base", "new", "hm"):
                assert record["metrics"]["fvgpt"][key] == pytest.approx(seed2[variant][key], abs=1e-6)
                assert record["metrics"]["backbone"][key] == pytest.approx(seed2["backbone"][key], abs=1e-6)
            if variant == "fvgpt":
                assert record["diagnostics"]["train"]["frg_auc"] == pytest.approx(seed2["frg_auc"], abs=1e-6)


@pytest.mark.slow
def test_a_broken_head_gives_other_numbers(small_demo, tmp_path, monkeypatch):
    _, summary = small_demo
    real = FVGPTHead.predict_base
    # a deliberately broken base branch: the logits of the next class
    monkeypatch.setattr(FVGPTHead, "predict_base", lambda self, *a, **k: torch.roll(real(self, *a, **k), 1, dims=-1))
    broken = run_world_demo(tmp_path, seeds=(1, 2), **SMALL)
    for split in summary["splits"]:
        ours, theirs = summary["splits"][split], broken["splits"][split]
        assert theirs["backbone"] == ours["backbone"] and theirs["zeroshot"] == ours["zeroshot"]
    assert any(broken["splits"][s]["fvgpt"]["base"] != summary["splits"][s]["fvgpt"]["base"] for s in summary["splits"])


def test_story_is_written_from_the_numbers():
    def entry(zs, coop, fv, ctrl, auc=0.8, d=(0.5, 0.2)):
        return {"zeroshot": {"base": zs}, "backbone": {"base": coop}, "fvgpt": {"base": fv},
                "control_full": {"base": ctrl}, "frg_auc": auc,
                "foreground_shift": {"backbone": d[0], "fvgpt": d[1], "control_full": d[0]}}

    good = story({"splits": {"clean": entry(80, 82, 84, 83), "counterfactual": entry(40, 45, 60, 50)}})
    assert "45.0% base accuracy, 5.0 points above zero-shot CLIP" in good[0] and "2.0 points above it" in good[0]
    assert good[0].endswith("(82.0% vs 80.0%).")
    cf_hurts = story({"splits": {"clean": entry(80, 82, 84, 83), "counterfactual": entry(60, 50, 58, 51)}})
    assert "10.0 points below zero-shot CLIP" in cf_hurts[0] and "learned to read the context" in cf_hurts[0]
    assert "15.0 points above CoOp" in good[1] and "10.0 points above the control" in good[1]
    assert "comes from the foreground view" in good[1] and "well above chance" in good[2] and "less than" in good[2]
    bad = story({"splits": {"clean": entry(80, 82, 84, 83), "counterfactual": entry(40, 45, 44, 44.5, 0.52, (0.2, 0.3))}})
    assert "1.0 point below CoOp" in bad[1] and "does not show" in bad[1]
    part = story({"splits": {"clean": entry(80, 82, 84, 83), "counterfactual": entry(40, 45, 48, 46)}})
    assert "only part of the gain" in part[1]
    assert "no better than chance" in bad[2] and "more than" in bad[2]
