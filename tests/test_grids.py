import json

import pytest
from conftest import run_cli, assert_close_history

from fvgpt_cache.grids import PRESETS, expand, parse_params, read_grid_file, run_grid
from fvgpt_cache.reports import aggregate, load_records, to_csv
from fvgpt_cache.runs import run_training
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig

SMALL = dict(num_classes=6, shots=8, views=2, dim=32, test_per_class=10)
FAST = TrainConfig(epochs=3)


@pytest.fixture()
def syn(tmp_path):
    return write_feature_cache(tmp_path / "syn.h5", **SMALL)


def _same_metrics(a, b, device, images=30):
    """Equal on the CPU (a configuration computes the same bits in any group); on a GPU, where cuBLAS may
    choose other kernels for another number of configurations, within one test image."""
    if device.type == "cpu":
        assert a == b
        return
    for method in a:
        for part in a[method]:
            if a[method][part] is not None:
                assert abs(a[method][part] - b[method][part]) <= 100 / images + 1e-9, (method, part)


def _close_histories(a, b, tol=1e-4):
    assert_close_history(a, b, tol)


@pytest.mark.parametrize("params", [
    pytest.param(["lambda_d=1,10", "lr=0.001,0.0035", "data_fraction=0.5,1"], marks=pytest.mark.slow),
    pytest.param(["loss_frg=true,false", "use_pc=true,false", "detach_r=false"], marks=pytest.mark.slow),
    ["use_frg=false", "r_without_frg=one,target", "frg_indicators=dH,cos+area"],
])
def test_grid_equals_single_runs(syn, tmp_path, params, test_device):
    runs = expand([syn], [1, 2], parse_params(params), FAST)
    records = {r.run_id: r for r in run_grid(runs, tmp_path / "grid")}
    assert len(records) == len(runs)
    for run in runs:
        single = run_training(syn, run.config, save=False)
        grid = records[run.run_id]
        assert grid.params == run.params
        _same_metrics(grid.metrics, single.metrics, test_device)
        _close_histories(grid.history, single.history, tol=1e-5)


def test_grid_resumes_and_streams_jsonl(syn, tmp_path):
    runs = expand([syn], [1, 2, 3], parse_params(["lambda_d=1,10"]), FAST)
    first = run_grid(runs[:2], tmp_path / "g")
    lines = (tmp_path / "g" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    with (tmp_path / "g" / "results.jsonl").open("a") as fh:
        fh.write('{"run_id": "cut-off')  # an interrupted write is ignored and that run redone
    calls = []
    rest = run_grid(runs, tmp_path / "g", progress=lambda done, total: calls.append((done, total)))
    assert len(rest) == len(runs) - 2, "finished runs are skipped"
    assert calls[0] == (2, 6) and calls[-1] == (6, 6)
    ids = [json.loads(line)["run_id"] for line in (tmp_path / "g" / "results.jsonl").read_text().splitlines()
           if line.startswith('{"format"')]
    assert sorted(ids) == sorted(r.run_id for r in runs)
    assert run_grid(runs, tmp_path / "g") == []
    run_grid(runs, tmp_path / "fresh")  # the same grid without interruption gives the same final report
    resumed, fresh = (to_csv(aggregate(load_records([tmp_path / d]))) for d in ("g", "fresh"))
    assert resumed == fresh and len(first) == 2


def test_bad_parameters_fail_before_training(syn):
    with pytest.raises(ValueError, match="unknown parameter 'lambda'.*lambda_d"):
        parse_params(["lambda=1,2"])
    with pytest.raises(ValueError, match=r"parameter epochs='ten' is not a valid int"):
        parse_params(["epochs=ten"])
    with pytest.raises(ValueError, match="frg_layers=5"):
        expand([syn], [1], parse_params(["frg_layers=2,5"]), FAST)
    with pytest.raises(ValueError, match="unknown preset 'tables'.*components"):
        expand([syn], [1], {}, FAST, preset="tables")


# What each table of the paper varies, written out from the paper (Tables 3-6, 12, 13, 15, Figs. 4(b), 9)
# rather than read from ablations.py: each row's settings that differ from the full model with the defaults.
FRG_ALL, BRG_ALL = ("dH", "cos", "area"), ("H_bb", "H_clip", "cos")
PAPER_ROWS = {
    "components": {"(1) FDC": {"use_frg": False, "use_pc": False}, "(2) PC": {"use_fdc": False},
                   "(3) FRG+FDC": {"use_pc": False}, "(4) FDC+PC": {"use_frg": False}, "(5) FRG+FDC+PC": {}},
    "width": {"FDC 16": {"fdc_hidden": 16}, "FDC 32": {"fdc_hidden": 32}, "FDC 64": {}, "FDC 128": {"fdc_hidden": 128},
              "gates 16": {"gate_hidden": 16}, "gates 64": {"gate_hidden": 64}, "gates 128": {"gate_hidden": 128}},
    "depth": {"1 layer": {"frg_layers": 1, "brg_layers": 1}, "2 layers": {},
              "3 layers": {"frg_layers": 3, "brg_layers": 3}},
    "indicators": {"FRG w/o ΔH": {"frg_indicators": ["cos", "area"]}, "FRG w/o cos": {"frg_indicators": ["dH", "area"]},
                   "FRG w/o A(m)": {"frg_indicators": ["dH", "cos"]}, "BRG w/o entropies": {"brg_indicators": ["cos"]},
                   "BRG w/o cos": {"brg_indicators": ["H_bb", "H_clip"]}, "all indicators": {}},
    "losses": {"w/o L_FRG": {"loss_frg": False}, "w/o CE_FDC": {"loss_ce_fdc": False},
               "w/o L_dist": {"loss_dist": False}, "w/o CE_PC": {"loss_ce_pc": False},
               "w/o KL_PC": {"loss_kl_pc": False}, "all losses": {}},
    "fdc-branches": {"visual + textual": {}, "visual only": {"fdc_textual": False}},
    "epochs": {"10 epochs": {}, "15 epochs": {"epochs": 15}, "20 epochs": {"epochs": 20}},
    "lambda": {"λ_d = 0.1": {"lambda_d": 0.1}, "λ_d = 1": {"lambda_d": 1.0}, "λ_d = 5": {"lambda_d": 5.0},
               "λ_d = 10": {}, "λ_d = 20": {"lambda_d": 20.0}},
    "data-fraction": {"25% of the shots": {"data_fraction": 0.25}, "50% of the shots": {"data_fraction": 0.5},
                      "75% of the shots": {"data_fraction": 0.75}, "100% of the shots": {}},
    "foreground-control": {"r from FRG (FVG-PT)": {}, "r = 0: full view": {"r_source": "full"},
                           "r = 1: foreground": {"r_source": "fg"}},
}


def _rows(runs, full: dict) -> dict:
    """{table: {row label: the run's settings that differ from the full model}}."""
    rows: dict = {}
    for run in runs:
        cfg = json.loads(json.dumps(run.config.to_dict()))
        diff = {k: v for k, v in cfg.items() if v != full[k]}
        for table, label in run.ablations:
            assert label not in rows.setdefault(table, {}), (table, label)
            rows[table][label] = diff
    return rows


def test_presets_are_valid_configurations(syn):
    """Each preset trains exactly the paper's rows, each row differing from the full model in the paper's settings
    only; `paper` is all nine tables with every distinct configuration once (the full model serves them all).
    Break used: rows (3) and (4) of Table 3 swapped in ablations.py (both still valid, distinct configurations)."""
    assert set(PRESETS) == {*PAPER_ROWS, "paper", "masks"}
    masks = expand([syn], [1], {}, TrainConfig(), preset="masks")  # one row per mask source of the cache
    assert sorted(r.config.fg_source for r in masks) == ["extracted", "none"]
    (plain,) = expand([syn], [1], {}, TrainConfig())
    full = json.loads(json.dumps(plain.config.to_dict()))
    assert full["frg_indicators"] == list(FRG_ALL) and full["brg_indicators"] == list(BRG_ALL)
    for name, want in PAPER_ROWS.items():
        runs = expand([syn], [1], {}, TrainConfig(), preset=name)
        assert _rows(runs, full) == {name: want}, name
        assert len(runs) == len({r.run_id for r in runs}) == len(want)
    paper = expand([syn], [1], {}, TrainConfig(), preset="paper")
    tables = [t for t in PAPER_ROWS if t != "foreground-control"]
    assert _rows(paper, full) == {t: PAPER_ROWS[t] for t in tables}
    distinct = {json.dumps(rows, sort_keys=True) for t in tables for rows in PAPER_ROWS[t].values()}
    assert len(paper) == len(distinct)
    (whole,) = [r for r in paper if r.run_id == plain.run_id]
    assert len(whole.ablations) == 9, "the full model is trained once and is a row of all nine tables"


def test_grid_file_toml(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('seeds = [1, 2]\npreset = "depth"\n[params]\nlambda_d = [1, 10]\nuse_frg = [true, false]\n'
                    'frg_indicators = [["dH", "cos"], "area"]\n[base]\nepochs = 5\n')
    params, extra = read_grid_file(path)
    assert params == {"lambda_d": [1.0, 10.0], "use_frg": [True, False], "frg_indicators": [("dH", "cos"), ("area",)]}
    assert extra == {"base": {"epochs": 5}, "seeds": [1, 2], "preset": "depth"}


def test_grid_and_report_commands(syn, tmp_path):
    from typer.testing import CliRunner

    from fvgpt_cache.cli.main import app

    runner = CliRunner()
    out = tmp_path / "g"
    res = runner.invoke(app, ["grid", str(syn), "--param", "lambda_d=1,10", "--seeds", "1,2", "--set", "epochs=2",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    res = runner.invoke(app, ["grid", str(syn), "--param", "lambda_d=1,10", "--seeds", "1,2", "--set", "epochs=2",
                              "--out", str(out)])
    assert res.exit_code == 0 and "0 new run(s); 4 were already done" in res.output
    res = runner.invoke(app, ["grid", str(syn), "--param", "lamda=1", "--out", str(out)])
    assert res.exit_code == 2 and "unknown parameter 'lamda'" in res.output
    res = runner.invoke(app, ["report", str(out), "--format", "csv", "--output", str(tmp_path / "r.csv")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.csv").read_text().startswith("backbone,config,dataset,method")
    res = runner.invoke(app, ["report", str(out), "--format", "markdown"])
    assert res.exit_code == 0 and "epochs=2, lambda_d=1.0" in res.output
    res = runner.invoke(app, ["report", str(out), "--format", "xml"])
    assert res.exit_code == 2 and "choose console" in res.output


MIXED = [
    {},
    {"frg_indicators": ("area", "dH"), "lr": 0.002, "data_fraction": 0.5},
    {"frg_layers": 1, "brg_layers": 3, "gate_hidden": 8, "epochs": 2},
    {"fdc_hidden": 16, "use_frg": False, "r_without_frg": "target", "optimizer": "adamw", "lr": 0.001},
    {"use_pc": False, "loss_dist": False, "warmup_epochs": 0, "weight_decay": 0.0, "fdc_hidden": 96, "epochs": 2},
    {"use_fdc": False, "brg_indicators": ("cos",), "momentum": 0.5},
    {"fdc_textual": False, "tau": 1.0, "detach_r": False, "lambda_frg": 2.0, "frg_margin": 0.1, "epochs": 2},
    {"r_source": "full", "area_min": 0.3, "use_scale": False, "drop_last": False, "data_fraction": 0.7},
    {"frg_layers": 3, "brg_layers": 2, "loss_frg": False, "lambda_pc": 0.5, "fdc_init_scale": 0.0},
]


@pytest.mark.slow
def test_mixed_grid_is_one_group_and_each_row_equals_its_single_run(tmp_path):
    from fvgpt_cache.grids import group_key

    syn = write_feature_cache(tmp_path / "syn.h5", **{**SMALL, "views": 3})
    runs = []
    for i, variant in enumerate(MIXED):
        runs += expand([syn], [i + 1], {}, {**FAST.to_dict(), **variant})
    assert len({group_key(r) for r in runs}) == 1, "every knob here must batch into one group"
    records = {r.run_id: r for r in run_grid(runs, tmp_path / "grid")}
    for run in runs:
        single = run_training(syn, run.config, save=False)
        grid = records[run.run_id]
        assert grid.head_parameters == single.head_parameters
        assert grid.train_images == single.train_images
        for method in ("fvgpt", "backbone", "zeroshot"):
            for part in ("base", "new"):
                # accuracies within one test image (a near-tie may flip when sums run in another order)
                assert abs(grid.metrics[method][part] - single.metrics[method][part]) <= 100 / 30 + 1e-9, run.params
        _close_histories(grid.history, single.history, tol=1e-5)


def test_padded_units_of_a_narrower_configuration_stay_exactly_zero(tmp_path):
    import torch

    from fvgpt_cache.engine import Group
    from fvgpt_cache.store import open_cache
    from fvgpt_cache.training import config_with, prepare

    syn = write_feature_cache(tmp_path / "syn.h5", **SMALL)
    wide = config_with(FAST, fdc_hidden=32, gate_hidden=16, frg_layers=3)
    narrow = config_with(FAST, fdc_hidden=8, gate_hidden=4, seed=2, frg_indicators=("cos",))
    data = prepare(open_cache(syn), FAST)
    group = Group(data, [wide, narrow], torch.device("cpu"))
    before = {n: v[1].clone() for n, v in group.params.items()}
    group.train()
    p = group.params
    assert torch.count_nonzero(p["fdc_img.0.w"][1, 8:]) == 0 and torch.count_nonzero(p["fdc_img.1.w"][1, :, 8:]) == 0
    assert torch.count_nonzero(p["fdc_txt.0.b"][1, 8:]) == 0
    # the gates share one block-diagonal MLP (hidden 16 per gate): FRG units 0-15, BRG units 16-31
    w0, w1, w2 = p["gate.0.w"], p["gate.1.w"], p["gate.2.w"]
    assert torch.count_nonzero(w0[1, 20:]) == 0 and torch.count_nonzero(w2[1, :, 20:]) == 0  # BRG width 4 of 16
    assert torch.count_nonzero(w0[1, 4:16]) == 0  # FRG width 4 of 16
    # the narrow FRG has 2 layers in a 3-layer structure: its middle layer stays the frozen identity
    assert torch.equal(w1[1, :16, :16], before["gate.1.w"][:16, :16]) and torch.equal(w1[1, :16, :16], torch.eye(16))
    # its unused indicator columns (dH, area) stay zero
    assert torch.count_nonzero(w0[1][:, [0, 2]]) == 0
    # nothing connects the two gates, in either configuration
    for k in (0, 1):
        assert torch.count_nonzero(w0[k, :16, 3:]) == 0 and torch.count_nonzero(w0[k, 16:, :3]) == 0
        assert torch.count_nonzero(w1[k, :16, 16:]) == 0 and torch.count_nonzero(w1[k, 16:, :16]) == 0
        assert torch.count_nonzero(w2[k, 0, 16:]) == 0 and torch.count_nonzero(w2[k, 1, :16]) == 0
    assert not torch.equal(p["fdc_img.0.w"][1, :8], before["fdc_img.0.w"][:8])  # while its real units train


def test_paper_preset_is_one_group_with_the_full_model_once_per_seed(syn):
    from fvgpt_cache.ablations import ABLATIONS, PAPER
    from fvgpt_cache.grids import group_key

    runs = expand([syn], [1, 2, 3], {}, FAST, preset="paper")
    assert len({group_key(r) for r in runs}) == 1
    rows = sum(len(ABLATIONS[name][1]) for name in PAPER)
    full = [r for r in runs if ["components", "(5) FRG+FDC+PC"] in r.ablations]
    assert len(full) == 3, "the full model is trained once per seed"
    # it serves every table that has the full model as a row (all but none: each table includes the default)
    assert {a for a, _ in full[0].ablations} == {"components", "width", "indicators", "losses", "depth",
                                                 "fdc-branches", "lambda", "data-fraction"}
    assert len(runs) < 3 * rows and all(r.ablations for r in runs)


@pytest.mark.slow
def test_paper_preset_end_to_end_prints_each_table_in_the_paper_layout(tmp_path):
    from typer.testing import CliRunner

    from fvgpt_cache.cli.main import app
    from fvgpt_cache.reports import ablation_tables

    syn = write_feature_cache(tmp_path / "syn.h5", **{**SMALL, "shots": 4})
    out = CliRunner().invoke(app, ["grid", str(syn), "--preset", "paper", "--seeds", "1,2", "--set", "epochs=2",
                                   "--out", str(tmp_path / "g")])
    assert out.exit_code == 0, out.output
    records = load_records([tmp_path / "g"])
    tables = {t[0].split(" · ")[0]: t for t in ablation_tables(records)}
    assert "Table 3: components" in tables and "Table 12: losses" in tables and "Fig. 9: training data" in tables
    title, header, body = tables["Table 3: components"]
    assert [r[0] for r in body] == ["(1) FDC", "(2) PC", "(3) FRG+FDC", "(4) FDC+PC", "(5) FRG+FDC+PC"]
    full = next(r for r in records if ["components", "(5) FRG+FDC+PC"] in r.ablations and r.seed == 1)
    other = next(r for r in records if ["components", "(5) FRG+FDC+PC"] in r.ablations and r.seed == 2)
    mean_base = (full.metrics["fvgpt"]["base"] + other.metrics["fvgpt"]["base"]) / 2
    assert body[4][1] == f"{mean_base:.2f}" and body[4][4] == body[4][5] == "" and body[4][6] == "2"  # no Δ, no CI: the full row
    text = CliRunner().invoke(app, ["report", str(tmp_path / "g"), "--format", "markdown"]).output
    assert "### Table 5: gate depth" in text and "| 3 layers |" in text


def test_a_group_too_big_for_the_budget_trains_in_parts_with_the_same_results(syn, tmp_path, test_device):
    from fvgpt_cache.engine import memory_estimate
    from fvgpt_cache.store import open_cache
    from fvgpt_cache.training import prepare

    runs = expand([syn], [1, 2, 3], parse_params(["lambda_d=1,10"]), FAST)
    data = prepare(open_cache(syn), runs[0].config)
    shared, each = memory_estimate(data, [r.config for r in runs])
    messages = []
    small = run_grid(runs, tmp_path / "small", memory_budget=shared + 2 * each, log=messages.append)
    assert "trained in 3 parts" in messages[0] and "MB shared" in messages[0]
    whole = {r.run_id: r for r in run_grid(runs, tmp_path / "whole")}
    for rec in small:
        _same_metrics(rec.metrics, whole[rec.run_id].metrics, test_device)
        _close_histories(rec.history, whole[rec.run_id].history, tol=1e-5)


@pytest.mark.slow
def test_training_modules_do_not_import_open_clip_or_torchvision():
    import subprocess
    import sys

    code = ("import sys; import fvgpt_cache.training, fvgpt_cache.grids, fvgpt_cache.reports, fvgpt_cache.runs, "
            "fvgpt_cache.engine; bad = [m for m in ('open_clip', 'torchvision', 'timm', 'fvgpt_cache.extraction') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------ grids take the backbone like train


def test_grid_backbone_option_equals_set_backbone(tmp_path):
    cache = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=4, views=2, dim=16, test_per_class=4)
    from fvgpt_cache.store import write_text_group
    import numpy as np

    write_text_group(cache, "other_bb", np.random.default_rng(0).standard_normal((4, 16)), {"method": "synthetic"})
    res = run_cli("grid", cache, "--set", "epochs=2", "--out", tmp_path / "none")
    assert res.exit_code == 2 and "choose one with --backbone" in res.output
    assert "--backbone" in run_cli("grid", "--help").output
    outputs = []
    for args in (["--backbone", "other_bb"], ["--set", "backbone=other_bb"]):
        out = tmp_path / args[0].strip("-")
        res = run_cli("grid", cache, *args, "--seeds", "1,2", "--set", "epochs=2", "--out", out)
        assert res.exit_code == 0, res.output
        outputs.append([json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()])
    for a, b in zip(*outputs):
        assert a["backbone"] == b["backbone"] == "other_bb" and a["metrics"] == b["metrics"]
    res = run_cli("grid", cache, "--backbone", "other_bb", "--set", "backbone=synthetic_bb", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "disagree" in res.output


@pytest.mark.parametrize("args, message", [
    (["--param", "lambda_d=1,,10"], "--param 'lambda_d=1,,10': empty value"),
    (["--param", "lambda_d=1,1.0"], "--param lambda_d: the value 1.0 is given twice"),
    (["--param", "lambda_d=1", "--param", "lambda_d=10"], "--param lambda_d is given twice"),
    (["--param", "seed=1,2"], "use --seeds for seed"),
    (["--seeds", "1,,2"], "--seeds '1,,2': empty entry"),
    (["--seeds", "1,1"], "a seed is given twice"),
    (["--param", "lambda_d=1,10", "--set", "lambda_d=5"], "lambda_d is both fixed"),
    (["--preset", "lambda", "--param", "lambda_d=1,10"], "preset 'lambda' varies lambda_d in its rows"),
    (["--preset", "lambda", "--set", "lambda_d=5"], "preset 'lambda' varies lambda_d; a --set of it would have no"),
    (["--set", "epochs"], "--set 'epochs': write KEY=VALUE"),
])
def test_grid_refuses_ambiguous_parameters_by_name(tmp_path, args, message):
    cache = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=4, views=2, dim=16, test_per_class=4)
    res = run_cli("grid", cache, *args, "--out", tmp_path / "g")
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "g").exists()
