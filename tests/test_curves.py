"""Per-epoch curves, epoch selection without the test split, paired reports, and grids that survive interruption."""
import csv
import io
import json
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fvgpt_cache.cli.main import app
from fvgpt_cache.engine import TrainingStopped
from fvgpt_cache.grids import expand, parse_params, run_grid
from fvgpt_cache.records import RunRecord, Selection
from fvgpt_cache.reports import aggregate, ablation_tables, curves_csv, load_records, paired_tables, to_csv
from fvgpt_cache.runs import run_training
from fvgpt_cache.store import Cache
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig

SMALL = dict(num_classes=6, shots=8, views=2, dim=32, test_per_class=10)
runner = CliRunner()


@pytest.fixture()
def syn(tmp_path):
    return write_feature_cache(tmp_path / "syn.h5", **SMALL)


def test_every_epoch_is_recorded_and_the_last_point_is_the_reported_run(syn):
    rec = run_training(syn, TrainConfig(epochs=4), save=False)
    hist = rec.history
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    for h in hist:
        assert {"test_base", "test_new", "test_hm", "r_mean", "frg_auc", "b_mean_new", "total", "dist"} <= set(h)
        assert "val_hm" not in h, "the validation split is evaluated only when an epoch is chosen by it"
    last = hist[-1]
    assert last["selected"] and not any(h["selected"] for h in hist[:-1])
    assert {k: last[f"test_{k}"] for k in ("base", "new", "hm")} == rec.metrics["fvgpt"]
    # two views per image: the epoch's training views are the diagnostics' augmented views
    assert last["r_mean"] == pytest.approx(rec.diagnostics["train"]["r_mean"], abs=1e-6)
    assert last["frg_auc"] == pytest.approx(rec.diagnostics["train"]["frg_auc"], abs=1e-9)
    assert last["b_mean_new"] == pytest.approx(rec.diagnostics["b_mean_new"], abs=1e-3)  # stored as float16
    assert rec.selection == Selection(rule="last", epoch=3, val=None,
                                      last_epoch_test={k: last[f"test_{k}"] for k in ("base", "new", "hm")})


def test_switched_off_modules_are_scored_as_their_heads_predict(syn):
    """Without PC new classes go through the adapted head; without FDC the base branch is the backbone."""
    for cfg in (TrainConfig(epochs=2, use_pc=False), TrainConfig(epochs=2, use_fdc=False),
                TrainConfig(epochs=2, classes="all")):
        rec = run_training(syn, cfg, save=False)
        last = rec.history[-1]
        key = ("all",) if cfg.classes == "all" else ("base", "new", "hm")
        assert {k: last[f"test_{k}"] for k in key} == {k: rec.metrics["fvgpt"][k] for k in key}, cfg
        if not cfg.use_pc:
            assert last["b_mean_new"] is None


def test_select_val_never_reads_test_labels_before_it_has_chosen(syn, monkeypatch):
    """The test split's labels raise until the monitor has chosen the epoch (the poisoned-label check)."""
    from fvgpt_cache.engine.monitor import Monitor

    chosen = []
    original_select, original_labels = Monitor.selected_epoch, Cache.labels

    def select(self, k):
        chosen.append(k)
        return original_select(self, k)

    def labels(self, split):
        if split == "test" and not chosen:
            raise AssertionError("test labels read before the epoch was chosen")
        return original_labels(self, split)

    monkeypatch.setattr(Monitor, "selected_epoch", select)
    monkeypatch.setattr(Cache, "labels", labels)
    rec = run_training(syn, TrainConfig(epochs=4, select="val"), save=False)
    sel = rec.selection
    hist = rec.history
    best = max(h["val_hm"] for h in hist)
    assert sel.rule == "val" and hist[sel.epoch]["val_hm"] == best
    assert sel.epoch == min(h["epoch"] for h in hist if h["val_hm"] == best), "the first best epoch"
    assert {k: hist[sel.epoch][f"test_{k}"] for k in ("base", "new", "hm")} == rec.metrics["fvgpt"]
    assert sel.last_epoch_test == {k: hist[-1][f"test_{k}"] for k in ("base", "new", "hm")}
    monkeypatch.setattr(Cache, "labels", original_labels)
    grid = run_grid(expand([syn], [1], {"select": ["val"]}, TrainConfig(epochs=4)), syn.parent / "g")
    assert grid[0].metrics == rec.metrics and grid[0].selection == sel


def test_select_val_needs_a_validation_split(tmp_path):
    from fvgpt_cache.store import write_cache, open_cache

    path = write_feature_cache(tmp_path / "c.h5", **SMALL)
    cache = open_cache(path)
    import numpy as np

    no_val = tmp_path / "noval.h5"
    images = {s: {k: cache.image(s, k).numpy() for k in ("full", "fg")} for s in ("train", "test")}
    write_cache(no_val, classnames=cache.classnames, base=cache.base, new=cache.new, text_clip=cache.text().numpy(),
                template="{}", images=images, labels={s: cache.labels(s).numpy() for s in images},
                areas={s: cache.areas(s).numpy() for s in images}, paths={s: cache.paths(s) for s in images},
                provenance=cache.provenance, logit_scale=cache.logit_scale)
    with pytest.raises(ValueError, match="select='val' needs a validation split"):
        run_training(no_val, TrainConfig(epochs=2, select="val", backbone="clip"), save=False)
    assert np.isfinite(run_training(no_val, TrainConfig(epochs=2, backbone="clip"), save=False).metrics["fvgpt"]["hm"])


@pytest.mark.slow
def test_grid_curves_equal_the_single_runs(syn, tmp_path):
    runs = expand([syn], [1, 2], parse_params(["lambda_d=1,10", "epochs=2,3"]), TrainConfig())
    records = {r.run_id: r for r in run_grid(runs, tmp_path / "g")}
    for run in runs:
        single = run_training(syn, run.config, save=False).history
        grid = records[run.run_id].history
        assert len(grid) == len(single) == run.config.epochs
        for a, b in zip(grid, single):
            exact = {k: v for k, v in a.items() if k.startswith("test_") or k in ("selected", "epoch")}
            assert exact == {k: b[k] for k in exact}, run.params
            for k in ("r_mean", "frg_auc", "b_mean_new", "total"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, run.params)


def test_an_interrupted_grid_resumes_with_the_unfinished_runs_only(syn, tmp_path):
    params = parse_params(["epochs=2,4", "lambda_d=1,10"])
    runs = expand([syn], [1, 2], params, TrainConfig())
    asked = []

    def stop_after_two_epochs():
        asked.append(1)
        return len(asked) >= 2  # SIGTERM arrives during the third epoch of the group

    with pytest.raises(TrainingStopped):
        run_grid(runs, tmp_path / "g", should_stop=stop_after_two_epochs)
    written = load_records([tmp_path / "g"])
    assert sorted(r.config["epochs"] for r in written) == [2, 2, 2, 2], "the 2-epoch runs were written at once"
    trained = []
    run_grid(runs, tmp_path / "g", on_record=trained.append)
    assert sorted(r.config["epochs"] for r in trained) == [4, 4, 4, 4], "only the unfinished runs train again"
    run_grid(runs, tmp_path / "fresh")
    assert to_csv(aggregate(load_records([tmp_path / "g"]))) == to_csv(aggregate(load_records([tmp_path / "fresh"])))


def test_paired_report_against_a_configuration_and_the_backbone(syn, tmp_path):
    runs = expand([syn], [1, 2, 3], parse_params(["lambda_d=1,10"]), TrainConfig(epochs=2))
    run_grid(runs, tmp_path / "g")
    records = load_records([tmp_path / "g"])
    summary = aggregate(records)
    (title, header, body), = paired_tables(summary, "lambda_d=10")
    assert header[:3] == ["Dataset", "vs", "n"] and body[0][1] == "epochs=2, lambda_d=1.0" and body[0][2] == "3"
    by_seed = {r.seed: r for r in records if r.config["lambda_d"] == 1.0}
    ref = {r.seed: r for r in records if r.config["lambda_d"] == 10.0}
    d = [by_seed[s].metrics["fvgpt"]["base"] - ref[s].metrics["fvgpt"]["base"] for s in (1, 2, 3)]
    assert body[0][3] == f"{sum(d) / 3:+.2f}"
    assert len(paired_tables(summary, "backbone")) == 2, "one table per configuration group"
    with pytest.raises(ValueError, match="no configuration in these results matches"):
        paired_tables(summary, "lambda_d=7")
    res = runner.invoke(app, ["report", str(tmp_path / "g"), "--vs", "lambda_d=10", "--ci", "bootstrap"])
    assert res.exit_code == 0, res.output
    assert "Paired vs epochs=2 (+FVG-PT" in res.output and "percentile bootstrap" in res.output
    assert "95% CI +FVG-PT" in res.output


@pytest.mark.slow
def test_ablation_rows_show_the_interval_of_their_paired_difference(syn, tmp_path):
    run_grid(expand([syn], [1, 2, 3], {}, TrainConfig(epochs=2), preset="components"), tmp_path / "g")
    (title, header, body), = ablation_tables(load_records([tmp_path / "g"]))
    assert header[4:6] == ["ΔHM", "95% CI"]
    full = next(r for r in body if r[0] == "(5) FRG+FDC+PC")
    assert full[5] == "", "the full model is the reference"
    assert all(r[5].startswith("±") for r in body if r is not full)


@pytest.mark.slow
def test_curve_exports_and_plot(syn, tmp_path):
    run_grid(expand([syn], [1, 2], parse_params(["lambda_d=1,10"]), TrainConfig(epochs=3)), tmp_path / "g")
    records = load_records([tmp_path / "g"])
    rows = list(csv.DictReader(io.StringIO(curves_csv(records))))
    assert len(rows) == 4 * 3 and {r["epoch"] for r in rows} == {"0", "1", "2"}
    assert {r["config.lambda_d"] for r in rows} == {"1.0", "10.0"}
    res = runner.invoke(app, ["report", str(tmp_path / "g"), "--curves", "lambda_d", "--curves-out",
                              str(tmp_path / "c.png"), "--format", "curves", "-o", str(tmp_path / "c.csv")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "c.csv").read_text().count("\n") == 13


def test_tensorboard_scalars(syn, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = runner.invoke(app, ["train", str(syn), "--epochs", "3", "--out", str(tmp_path / "run"),
                              "--tensorboard", str(tmp_path / "tb")])
    assert res.exit_code == 0, res.output
    (folder,) = [p for p in (tmp_path / "tb").rglob("*") if p.is_dir() and any(p.glob("events.*"))]
    acc = EventAccumulator(str(folder))
    acc.Reload()
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    hm = [e.value for e in acc.Scalars("test/hm")]
    assert hm == pytest.approx([h["test_hm"] for h in record["history"]])
    assert {"gates/r_mean", "loss/total", "lr"} <= set(acc.Tags()["scalars"])
    from fvgpt_cache.tensorboard import write_run

    assert write_run(tmp_path / "tb", RunRecord.from_json(record)) == folder and len(list(folder.glob("events.*"))) == 1, "not appended twice"


@pytest.mark.slow
def test_sigterm_finishes_the_epoch_keeps_finished_runs_and_says_how_to_resume(syn, tmp_path):
    out = tmp_path / "g"
    cmd = [sys.executable, "-m", "fvgpt_cache.cli.main", "grid", str(syn), "--seeds", "1-6", "--param",
           "epochs=2,400", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not (out / "results.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "rerun the same command to resume" in stderr
    assert len(load_records([out])) == 6, "the six 2-epoch runs are kept"
