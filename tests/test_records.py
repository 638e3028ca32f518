"""RunRecord: one class reads and writes results records; versions 1, 2 and 3 load, a future version is refused."""
import json

import pytest

from fvgpt_cache.grids import read_results
from fvgpt_cache.records import SCHEMA_VERSION, MaskSource, RecordError, RunInput, RunRecord, Selection
from fvgpt_cache.reports import aggregate, load_records, to_csv
from fvgpt_cache.training import TrainConfig

METRICS = {"zeroshot": {"base": 60.0, "new": 58.0, "hm": 58.98305084745763},
           "backbone": {"base": 78.0, "new": 50.0, "hm": 60.9375},
           "fvgpt": {"base": 80.0, "new": 60.0, "hm": 68.57142857142857}}


def v1_record(seed=1) -> dict:
    """A results.json as the first version of `runs.py` wrote it (no inputs, no preset, no diagnostics)."""
    return {"format": "fvgpt-cache-results", "version": 1, "run_id": f"0123456789abcde{seed}",
            "cache": "/data/dtd.h5", "dataset": "dtd", "cache_provenance": {"model": "ViT-B-16", "shots": 16},
            "backbone": "coop", "seed": seed, "config": {"lambda_d": 10.0, "epochs": 10, "seed": seed},
            "metrics": METRICS, "test_images": {"base": 30, "new": 30},
            "foreground_shift": {"backbone": 0.1, "fvgpt": 0.05}, "cross_dataset": [],
            "head_parameters": 1234, "train_images": 24, "views": 11,
            "seconds": {"load": 0.1, "train": 1.0, "evaluate": 0.2},
            "history": [{"epoch": 0, "total": 1.5}], "run_dir": "/runs/a"}


def v2_record(seed=1) -> dict:
    """A results.json as version 2 wrote it: inputs, selection, mask source, diagnostics, per-epoch curves."""
    return {**v1_record(seed), "version": 2,
            "inputs": [{"role": "train", "path": "/data/dtd.h5", "fingerprint": "ab" * 32}],
            "backbone_provenance": {"method": "coop"}, "preset": None, "warnings": ["few views"],
            "diagnostics": {"train": {"r_mean": 0.4}}, "stability": {"collapsed": False, "checked": True},
            "feature_dim": 512,
            "mask_source": {"name": "extracted", "images": 24, "mean_area": 0.4, "empty_share": 0.0,
                            "full_share": 0.1, "made_by": None},
            "selection": {"rule": "last", "epoch": 9, "val": None, "last_epoch_test": {"base": 80.0}},
            "history": [{"epoch": 0, "total": 1.5, "selected": True}]}


def test_round_trip_writes_version_3_and_reads_it_back_equal():
    rec = RunRecord.from_json(v2_record())
    assert isinstance(rec.selection, Selection) and rec.selection.epoch == 9
    assert isinstance(rec.mask_source, MaskSource) and rec.mask_source.mean_area == 0.4
    assert rec.inputs == [RunInput("train", "/data/dtd.h5", "ab" * 32)]
    out = rec.to_json()
    assert out["format"] == "fvgpt-cache-results" and out["version"] == SCHEMA_VERSION == 3
    assert "params" not in out and "set_aside" not in out, "grid-only keys stay out of a single run's record"
    again = RunRecord.from_json(json.dumps(out))
    assert again == rec
    assert again.to_json() == out
    # every key the old writer wrote is kept, with the same value
    assert {k: v for k, v in out.items() if k != "version"} == {k: v for k, v in v2_record().items() if k != "version"}
    grid = rec.replace(params={"lambda_d": 1.0}, ablations=[["components", "(1) FDC"]])
    assert RunRecord.from_json(grid.dumps()) == grid


def test_a_version_1_record_loads_with_defaults():
    rec = RunRecord.from_json(v1_record())
    assert rec.inputs == [] and rec.train_fingerprint is None
    assert rec.selection is None and rec.mask_source is None and rec.diagnostics is None
    assert rec.warnings == [] and not rec.collapsed and rec.params is None
    assert rec.metrics == METRICS and rec.views == 11


def test_old_records_from_files_report_like_new_ones(tmp_path):
    """A folder with a version-1 results.json and a version-2 grid file reads through one class."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(v1_record(1), indent=1))
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "results.jsonl").write_text(json.dumps(v2_record(2)) + "\n")
    records = load_records([tmp_path])
    assert sorted(r.seed for r in records) == [1, 2] and all(isinstance(r, RunRecord) for r in records)
    assert [r.seed for r in read_results(tmp_path / "grid" / "results.jsonl")] == [2]
    again = tmp_path / "again"
    again.mkdir()
    (again / "results.jsonl").write_text("".join(r.dumps() + "\n" for r in records))
    assert to_csv(aggregate(load_records([again]))) == to_csv(aggregate(records))


def test_a_future_version_is_refused_naming_the_file_and_version(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**v2_record(), "version": 4}))
    with pytest.raises(RecordError, match=rf"{path}: results schema version 4 is newer .*upgrade fvgpt-cache"):
        load_records([path])
    lines = tmp_path / "results.jsonl"
    lines.write_text(json.dumps(v2_record()) + "\n" + json.dumps({**v2_record(2), "version": 7}) + "\n")
    with pytest.raises(RecordError, match=rf"{lines}, line 2: results schema version 7"):
        read_results(lines)
    with pytest.raises(RecordError, match="version None"):
        RunRecord.from_json({k: v for k, v in v2_record().items() if k != "version"})


def test_a_missing_required_key_is_named_with_the_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({k: v for k, v in v1_record().items() if k != "metrics"}))
    with pytest.raises(RecordError, match=rf"{path}: the results record \(version 1\) has no 'metrics'"):
        load_records([path])
    path.write_text(json.dumps({**v2_record(), "seed": "one"}))
    with pytest.raises(RecordError, match=rf"{path}: 'seed' is str \(one\), expected int"):
        load_records([path])
    path.write_text(json.dumps({**v2_record(), "loss_terms": []}))
    with pytest.raises(RecordError, match="unknown key.*'loss_terms'"):
        load_records([path])
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(RecordError, match="does not hold fvgpt-cache results"):
        load_records([path])


def test_records_carry_a_full_config_and_train_fingerprint():
    rec = RunRecord.from_json({**v2_record(), "config": TrainConfig(seed=1).to_dict()})
    assert rec.train_fingerprint == "ab" * 32 and rec.config["seed"] == 1
