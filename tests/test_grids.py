import json

import pytest

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


def _close_histories(a, b, tol=1e-4):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert ea.keys() == eb.keys()
        for k in ea:
            assert ea[k] == pytest.approx(eb[k], abs=tol, rel=tol), k


@pytest.mark.parametrize("params", [
    ["lambda_d=1,10", "lr=0.001,0.0035", "data_fraction=0.5,1"],
    ["loss_frg=true,false", "use_pc=true,false", "detach_r=false"],
    ["use_frg=false", "r_without_frg=one,target", "frg_indicators=dH,cos+area"],
])
def test_grid_equals_single_runs(syn, tmp_path, params):
    runs = expand([syn], [1, 2], parse_params(params), FAST)
    records = {r["run_id"]: r for r in run_grid(runs, tmp_path / "grid")}
    assert len(records) == len(runs)
    for run in runs:
        single = run_training(syn, run.config, save=False)
        grid = records[run.run_id]
        assert grid["params"] == run.params
        assert grid["metrics"] == single["metrics"], run.params
        _close_histories(grid["history"], single["history"], tol=1e-3)  # vmapped sums drift; see issue 13


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


def test_presets_are_valid_configurations(syn):
    for name in PRESETS:
        runs = expand([syn], [1], {}, FAST, preset=name)
        assert len(runs) == len({r.run_id for r in runs}) >= 2


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
