import csv
import io
import json
import sys

import h5py
import pytest
from conftest import NUMBER, check_80_columns, run_cli

from fvgpt_cache.reports import (
    aggregate, config_label, load_paper, load_records, plot_sweep, sweep, to_csv, to_json, to_latex, to_markdown,
)
from fvgpt_cache.records import RunRecord
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig


def record(dataset, seed, fv, bb, zs, backbone="coop", cross=(), **config):
    cfg = {**TrainConfig(backbone=backbone, seed=seed).to_dict(), **config}
    metric = lambda b, n: {"base": b, "new": n, "hm": 2 * b * n / (b + n)}  # noqa: E731
    return RunRecord(run_id=f"{dataset}-{seed}-{sorted(config.items())}", cache=f"/c/{dataset}.h5", dataset=dataset,
                     backbone=backbone, seed=seed, config=cfg,
                     metrics={"fvgpt": metric(*fv), "backbone": metric(*bb), "zeroshot": metric(*zs)},
                     cross_dataset=list(cross))


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
            rec.metrics[m] = {"base": None, "new": None, "hm": None, "all": src}
        recs.append(rec)
    md = to_markdown(aggregate(recs), compare_paper=True)
    assert "Cross-dataset" in md and "| +FVG-PT | 72.50 | 45.00 | 45.00 |" in md
    assert "| CoOp+FVG-PT (paper) | 72.09 | 65.72 |" in md
    tex = to_latex(aggregate(RECORDS))
    assert r"\begin{tabular}" in tex and r"82.00 $\pm$ 2.00" in tex


def test_load_records_from_files_and_folders(tmp_path):
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "results.jsonl").write_text("\n".join(r.dumps() for r in RECORDS[:3]) + "\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(RECORDS[3].dumps())
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
    recs[1].stability = {"collapsed": True}
    summary = aggregate(recs)
    (g,) = summary.values()
    assert g["datasets"]["syn"]["fvgpt"]["collapsed_seeds"] == [2]
    assert "syn (collapsed: seed 2)" in to_markdown(summary)


# ------------------------------------------------------------------ no silent pooling

def _set_provenance(path, **update):
    with h5py.File(path, "r+") as f:
        prov = json.loads(f.attrs["provenance"])
        prov.update(update)
        f.attrs["provenance"] = json.dumps(prov)


MODEL_A = dict(model="ViT-B-16", pretrained="openai", pretrained_sha256=None, model_config_sha256=None, quick_gelu=True,
               random_init=False)
MODEL_B = dict(model="/data/small-clip.json", pretrained="/w/small.pt", pretrained_sha256="ab" * 32,
               model_config_sha256="cd" * 32, quick_gelu=False, random_init=False)


@pytest.fixture()
def two_models(tmp_path):
    """One dataset name ('shapes') extracted with two models: D = 32 and D = 16."""
    a = write_feature_cache(tmp_path / "a" / "shapes.h5", num_classes=4, shots=4, views=2, dim=32, test_per_class=4)
    b = write_feature_cache(tmp_path / "b" / "shapes.h5", num_classes=4, shots=4, views=2, dim=16, test_per_class=4,
                            seed=1)
    _set_provenance(a, dataset="shapes", **MODEL_A)
    _set_provenance(b, dataset="shapes", **MODEL_B)
    return a, b


def test_two_models_of_one_dataset_are_never_pooled(two_models, tmp_path, console80):
    a, b = two_models
    res = run_cli("grid", a, b, "--seeds", "1,2", "--set", "epochs=2", "--out", tmp_path / "mixed")
    assert res.exit_code == 2 and "different models" in res.output and "model_config_sha256" in res.output
    assert not (tmp_path / "mixed" / "results.jsonl").exists()
    for cache, out in ((a, "ga"), (b, "gb")):
        res = run_cli("grid", cache, "--seeds", "1,2", "--set", "epochs=2", "--out", tmp_path / "runs" / out)
        assert res.exit_code == 0, res.output
    res = run_cli("report", tmp_path / "runs", "--format", "csv")
    assert res.exit_code == 0, res.output
    rows = [r for r in csv.DictReader(io.StringIO(res.stdout)) if r["dataset"] == "shapes" and r["method"] == "fvgpt"]
    assert sorted(r["n_seeds"] for r in rows) == ["2", "2"], "two rows of two seeds, not one of four"
    assert len({r["model"] for r in rows}) == 2 and any("D16" in r["model"] for r in rows)
    res = run_cli("report", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    titles = [line for line in res.output.splitlines() if line.startswith("Base-to-new")]
    assert len(titles) == 2 and all("model" in t for t in titles), res.output
    text = " ".join(res.output.split())
    assert "model ViT-B-16/openai D32" in text and "model small-clip/sha abababab D16" in text


def _rec(seed, b=80.0, n=60.0, prov=None, **config):
    metric = {"base": b, "new": n, "hm": 2 * b * n / (b + n)}
    return RunRecord(run_id=f"{seed}-{json.dumps(prov, sort_keys=True)}-{config}", cache="/c/x.h5", dataset="pets",
                     backbone="coop", seed=seed, config={**TrainConfig(backbone="coop", seed=seed).to_dict(), **config},
                     cache_provenance=prov or {}, metrics={m: dict(metric) for m in ("zeroshot", "backbone", "fvgpt")})


@pytest.mark.parametrize("field, one, other, shown", [
    ("shots", 16, 4, "shots"),
    ("fg_mode", "normalized", "pixel", "fg"),
    ("views", {"train": 11}, {"train": 2}, "views"),
    ("augmentation", {"random_resized_crop_scale": [0.08, 1.0]}, {"random_resized_crop_scale": [0.5, 1.0]}, "rrc"),
    ("pretrained_sha256", "11" * 32, "22" * 32, "model"),
])
def test_runs_that_differ_in_one_cache_setting_form_separate_groups(field, one, other, shown):
    base = {**MODEL_B, "shots": 16, "views": {"train": 11}, "fg_mode": "normalized",
            "augmentation": {"random_resized_crop_scale": [0.08, 1.0]}}
    recs = [_rec(s, 80 + s, prov={**base, field: one}) for s in (1, 2)]
    recs += [_rec(s, 60 + s, prov={**base, field: other}) for s in (1, 2)]
    summary = aggregate(recs)
    assert len(summary) == 2
    for g in summary.values():
        assert g["datasets"]["pets"]["fvgpt"]["n_seeds"] == 2
        assert f" · {shown} " in g["title"], g["title"]
    assert sorted(g["datasets"]["pets"]["fvgpt"]["base"] for g in summary.values()) == [61.5, 81.5]


def test_backbones_of_another_setup_and_configs_are_separate_but_seeds_pool():
    bb = lambda epochs, seed: {"method": "coop", "seed": seed, "options": {"epochs": epochs, "seed": seed},  # noqa: E731
                               "checkpoint": f"/ck/{seed}", "created": "now"}
    recs = []
    for epochs in (10, 20):
        for seed in (1, 2, 3):
            recs.append(_rec(seed, prov=MODEL_A).replace(backbone_provenance=bb(epochs, seed)))
    recs.append(_rec(1, prov=MODEL_A, lambda_d=1.0))
    summary = aggregate(recs)
    sizes = sorted(g["datasets"]["pets"]["fvgpt"]["n_seeds"] for g in summary.values())
    assert sizes == [1, 3, 3], "the backbone's seed and checkpoint do not split rows; its epochs and λ_d do"
    titles = " | ".join(g["title"] for g in summary.values())
    assert "options.epochs=10" in titles and "options.epochs=20" in titles and "lambda_d=1.0" in titles
    assert {len(v) for g in summary.values() for v in g["runs"].values()} == {1, 3}  # records kept per row


def test_plot_names_what_each_point_averages(tmp_path):
    from fvgpt_cache.reports import averaged_over, describe_averaged

    recs = [_rec(s, prov=MODEL_A, lambda_d=v) for s in (1, 2) for v in (1.0, 10.0)]
    assert averaged_over(recs, "lambda_d") == {}
    recs += [_rec(3, prov=MODEL_B, lambda_d=v, use_frg=False) for v in (1.0, 10.0)]
    averaged = averaged_over(recs, "lambda_d")
    assert set(averaged) == {"model", "use_frg"}
    assert "use_frg (2: false, true)" in describe_averaged(averaged)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.jsonl").write_text("".join(r.dumps() + "\n" for r in recs))
    res = run_cli("report", tmp_path / "r", "--plot", "lambda_d", "--plot-out", tmp_path / "p.png")
    assert res.exit_code == 0, res.output
    assert "averages runs that differ in" in res.output and "use_frg" in res.output and "model" in res.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_ablation_tables_do_not_pool_two_models():
    from fvgpt_cache.reports import ablation_tables

    recs = []
    for prov, base in ((MODEL_A, 80.0), (MODEL_B, 60.0)):
        for seed in (1, 2):
            for label, overrides in (("(5) FRG+FDC+PC", {}), ("(2) PC", {"use_fdc": False})):
                rec = _rec(seed, base, prov=prov, **overrides)
                rec.ablations = [["components", label]]
                rec.run_id += label
                recs.append(rec)
    tables = ablation_tables(recs)
    assert len(tables) == 2
    titles = [t[0] for t in tables]
    assert any("ViT-B-16/openai" in t for t in titles) and any("small-clip" in t for t in titles)
    for _, header, body in tables:
        assert [row[header.index("seeds")] for row in body] == ["2", "2"]
    assert sorted(body[0][1] for _, _, body in tables) == ["60.00", "80.00"]


# ------------------------------------------------------------------ 80 columns


def test_report_tables_fit_80_columns(tmp_path, console80):
    metric = lambda b, n: {"base": b, "new": n, "hm": 2 * b * n / (b + n)}  # noqa: E731
    recs = []
    for ds in ("oxford_flowers", "fgvc_aircraft", "a_user_dataset_with_a_long_name"):
        for seed in (1, 2, 3):
            rec = _rec(seed, prov=MODEL_A)
            rec = rec.replace(dataset=ds, backbone="kgcoop", run_id=f"{ds}-{seed}")
            rec.config["backbone"] = "kgcoop"
            rec.metrics = {"fvgpt": metric(97.13 + seed, 75.55 - seed), "backbone": metric(100.0 - seed, 10.12 * seed),
                           "zeroshot": metric(72.08, 77.8 + seed)}
            recs.append(rec)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.jsonl").write_text("".join(r.dumps() + "\n" for r in recs))
    res = run_cli("report", tmp_path / "r", "--compare", "paper")
    assert res.exit_code == 0, res.output
    lines = check_80_columns(res.output)
    summary = aggregate(recs)
    (g,) = summary.values()
    for ds, methods in g["datasets"].items():
        header = [i for i, line in enumerate(lines) if line.lstrip().startswith(ds)]
        assert len(header) == 1, ds
        for offset, m in enumerate(("zeroshot", "backbone", "fvgpt"), start=1):
            s = methods[m]
            row = lines[header[0] + offset]
            # three seeds: the spread is printed even when it is 0.00 (zero-shot CLIP's base accuracy here)
            want = [f"{s['base']:.2f}", f"{s['base_std']:.2f}", f"{s['new']:.2f}", f"{s['new_std']:.2f}", f"{s['hm']:.2f}"]
            assert NUMBER.findall(row)[:len(want)] == want, row
    from fvgpt_cache.reports import load_paper

    paper = load_paper()["table1_base_to_new"]["oxford_flowers"]["KgCoOp+FVG-PT"]
    want = f"{paper['base']:.2f} {paper['new']:.2f} {paper['hm']:.2f}"
    assert any("+FVG-PT (paper)" in line and want in " ".join(line.split()) for line in lines), "one line each"
