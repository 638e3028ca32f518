import importlib.util
from pathlib import Path

import torch

from fvgpt_cache.records import RunRecord


def _load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(seed, params, collapsed, coop=60.0, fvgpt=62.0):
    return RunRecord(run_id=f"{seed}-{params}", cache="/c/world.h5", backbone="coop", config={},
                     dataset="world-counterfactual", seed=seed, params=params, stability={"collapsed": collapsed},
                     metrics={"backbone": {"base": coop}, "fvgpt": {"base": fvgpt}, "zeroshot": {"base": 61.0}},
                     diagnostics={"train": {"frg_auc": 0.8}})


def test_acceptance_checks_collapse_of_fvgpt_and_its_control_only():
    acceptance = _load("world_ablation").acceptance
    records = [_record(1, {}, False, fvgpt=70.0), _record(1, {"r_source": "full"}, False, fvgpt=66.0),
               _record(1, {"r_source": "fg"}, True)]
    out = acceptance(records, [1])
    assert out["checks"] == {"FVG-PT base >= CoOp base + 5": True, "FVG-PT base >= control (r_source=full) + 3": True,
                             "FRG AUC on training views >= 0.7": True, "no collapsed run of FVG-PT or the control": True}
    assert out["collapsed_r_source_fg"] == ["world-counterfactual seed 1"]
    records[1].stability["collapsed"] = True
    out = acceptance(records, [1])
    assert not out["checks"]["no collapsed run of FVG-PT or the control"] and len(out["collapsed"]) == 1


def test_ridge_recovers_a_linear_map_with_intercept():
    diagnosis = _load("world_diagnosis")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    w, b = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
    fit = diagnosis.ridge(x, x @ w + b, lam=1e-8)
    torch.testing.assert_close(fit[:6], w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fit[6], b, atol=1e-4, rtol=1e-4)
