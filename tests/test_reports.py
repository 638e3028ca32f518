import csv
import io
import json
import sys

import pytest

from fvgpt_cache.reports import (
    aggregate, config_label, load_paper, load_records, plot_sweep, sweep, to_csv, to_json, to_latex, to_markdown,
)
from fvgpt_cache.training import TrainConfig


def record(dataset, seed, fv, bb, zs, backbone="coop", cross=(), **config):
    cfg = {**TrainConfig(backbone=backbone, seed=seed).to_dict(), **config}
    metric = lambda b, n: {"base": b, "new": n, "hm": 2 * b * n / (b + n)}  # noqa: E731
    return {"format": "fvgpt-cache-results", "run_id": f"{dataset}-{seed}-{sorted(config.items())}",
            "cache": f"/c/{dataset}.h5", "dataset": dataset, "backbone": backbone, "seed": seed, "config": cfg,
            "metrics": {"fvgpt": metric(*fv), "backbone": metric(*bb), "zeroshot": metric(*zs)},
            "cross_dataset": list(cross)}


RECORDS = [
    record("dtd", 1, (80, 60), (78, 50), (60, 58)),
    record("dtd", 2, (82, 62), (79, 52), (60, 58)),
    record("dtd", 3, (84, 58), (80, 48), (60, 58)),
    record("eurosat", 1, (90, 70), (88, 45), (55, 65)),
    record("eurosat", 2, (92, 66), (89, 47), (55, 65)),
    record("eurosat", 1, (70, 70), (88, 45), (55, 65), lambda_d=1.0),
]


def hm(b, n):
    return 2 * b * n / (b + n)


def group(summary, **setting):
    """The one group whose setting has these values."""
    found = [g for g in summary.values() if all(g["setting"][k] == v for k, v in setting.items())]
    assert len(found) == 1, (setting, [g["setting"] for g in summary.values()])
    return found[0]


def test_aggregation_math_by_hand():
    summary = aggregate(RECORDS)
    assert sorted((g["setting"]["backbone"], g["setting"]["config"]) for g in summary.values()) == \
        [("coop", "default"), ("coop", "lambda_d=1.0")]
    dtd = group(summary, config="default")["datasets"]["dtd"]["fvgpt"]
    assert dtd["base"] == pytest.approx(82.0) and dtd["new"] == pytest.approx(60.0)
    assert dtd["base_std"] == pytest.approx(2.0) and dtd["new_std"] == pytest.approx(2.0)
    assert dtd["hm"] == pytest.approx(hm(82, 60)), "HM of the seed means"
    per_seed = [hm(80, 60), hm(82, 62), hm(84, 58)]
    mean = sum(per_seed) / 3
    assert dtd["hm_seed_mean"] == pytest.approx(mean)
    assert dtd["hm_seed_std"] == pytest.approx((sum((x - mean) ** 2 for x in per_seed) / 2) ** 0.5)
    assert dtd["n_seeds"] == 3
    avg = group(summary, config="default")["average"]
    assert avg["n_datasets"] == 2
    assert avg["fvgpt"]["base"] == pytest.approx((82 + 91) / 2) and avg["fvgpt"]["new"] == pytest.approx((60 + 68) / 2)
    assert avg["fvgpt"]["hm"] == pytest.approx(hm(86.5, 64))
    assert avg["backbone"]["new"] == pytest.approx((50 + 46) / 2)
    assert group(summary, config="lambda_d=1.0")["average"] is None  # one dataset: no average row


def test_csv_and_json_parse_back():
    summary = aggregate(RECORDS)
    rows = list(csv.DictReader(io.StringIO(to_csv(summary))))
    dtd = next(r for r in rows if r["dataset"] == "dtd" and r["method"] == "fvgpt" and r["config"] == "default")
    assert float(dtd["base"]) == pytest.approx(82.0) and float(dtd["hm"]) == pytest.approx(hm(82, 60), abs=1e-4)
    assert any(r["dataset"] == "average (2)" for r in rows)
    data = json.loads(to_json(summary))
    assert {r["method"] for r in data} == {"zeroshot", "backbone", "fvgpt"}
    assert len(data) == len(rows)


def test_markdown_has_the_expected_rows_and_columns():
    md = to_markdown(aggregate(RECORDS))
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Dataset", "CLIP B", "CLIP N", "CLIP HM", "coop B", "coop N", "coop HM", "+FVG-PT B",
                      "+FVG-PT N", "+FVG-PT HM", "ΔHM", "Seeds"]
    first_table = md.split("###")[1]
    body = [line for line in first_table.splitlines() if line.startswith("| ") and "Dataset" not in line]
    assert [row.split("|")[1].strip() for row in body] == ["dtd", "eurosat", "Average over 2"]
    assert "82.00 ± 2.00" in md
    assert f"{hm(82, 60) - hm(79, 50):+.2f}" in md


def test_compare_paper_adds_reference_rows():
    paper = load_paper()
    assert paper["table1_base_to_new"]["average"]["CoOp+FVG-PT"] == {"base": 82.4, "new": 73.62, "hm": 77.76}
    assert paper["table2_cross_dataset"]["KgCoOp"]["eurosat"] == 41.41
    for ds, rows in paper["table1_base_to_new"].items():  # the reference data is self-consistent
        for r in rows.values():
            assert hm(r["base"], r["new"]) == pytest.approx(r["hm"], abs=0.011), ds
    md = to_markdown(aggregate(RECORDS), compare_paper=True)
    assert "| dtd (paper) |" in md and "78.24 | 48.67 | 60.01" in md
    assert "| average (paper) |" in md


def test_cross_dataset_table_and_latex():
    cross = [{"dataset": "dtd", "fvgpt": 45.0, "backbone": 43.0, "zeroshot": 44.0, "test_images": 10}]
    recs = []
    for seed, src in ((1, 72.0), (2, 73.0)):
        rec = record("imagenet", seed, (1, 1), (1, 1), (1, 1), cross=cross, classes="all")
        for m in ("fvgpt", "backbone", "zeroshot"):
            rec["metrics"][m] = {"base": None, "new": None, "hm": None, "all": src}
        recs.append(rec)
    md = to_markdown(aggregate(recs), compare_paper=True)
    assert "Cross-dataset" in md and "| +FVG-PT | 72.50 | 45.00 | 45.00 |" in md
    assert "| CoOp+FVG-PT (paper) | 72.09 | 65.72 |" in md
    tex = to_latex(aggregate(RECORDS))
    assert r"\begin{tabular}" in tex and r"82.00 $\pm$ 2.00" in tex


def test_load_records_from_files_and_folders(tmp_path):
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "results.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:3]) + "\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(RECORDS[3]))
    assert len(load_records([tmp_path])) == 4
    assert len(load_records([tmp_path / "grid" / "results.jsonl", tmp_path / "grid"])) == 3  # no duplicates
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="does not hold fvgpt-cache results"):
        load_records([tmp_path / "bad.json"])
    with pytest.raises(FileNotFoundError, match="results not found"):
        load_records([tmp_path / "missing.jsonl"])


def test_config_label_names_only_changed_settings():
    assert config_label(TrainConfig(seed=3, backbone="x").to_dict()) == "default"
    assert config_label({**TrainConfig().to_dict(), "lambda_d": 5.0, "frg_indicators": ["dH"]}) == \
        "frg_indicators=dH, lambda_d=5.0"


def test_sweep_and_plot(tmp_path, monkeypatch):
    recs = [record("dtd", s, (80 + v, 60), (78, 50), (60, 58), lambda_d=v) for v in (1.0, 10.0) for s in (1, 2)]
    recs += [record("eurosat", 1, (90, 70 + v), (88, 45), (55, 65), lambda_d=v) for v in (1.0, 10.0)]
    data = sweep(recs, "lambda_d")
    assert data["dtd"][10.0]["base"] == pytest.approx(90) and data["dtd"][1.0]["hm"] == pytest.approx(hm(81, 60))
    assert data["average"][1.0]["base"] == pytest.approx((81 + 90) / 2)
    with pytest.raises(ValueError, match="unknown parameter 'lamda'"):
        sweep(recs, "lamda")
    out = plot_sweep(data, "lambda_d", tmp_path / "sweep.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=r"pip install 'fvgpt-cache\[plot\]'"):
        plot_sweep(data, "lambda_d", tmp_path / "x.svg")


def test_report_counts_collapsed_seeds(tmp_path):
    from fvgpt_cache.reports import aggregate, to_markdown
    recs = [record("syn", s, (80, 70), (78, 60), (70, 70)) for s in (1, 2, 3)]
    recs[1]["stability"] = {"collapsed": True}
    summary = aggregate(recs)
    (g,) = summary.values()
    assert g["datasets"]["syn"]["fvgpt"]["collapsed_seeds"] == [2]
    assert "syn (collapsed: seed 2)" in to_markdown(summary)
