"""Issue 11: what a new user meets in the first hour — results that cannot be silently mixed,
names, warnings, errors and a console that reads right."""
import csv
import io
import json
import re

import h5py
import pytest
from conftest import lock_held_elsewhere, write_generic_dataset
from typer.testing import CliRunner

from fvgpt_cache.cli import common
from fvgpt_cache.cli.main import app
from fvgpt_cache.data import default_dataset_name, read_split_json
from fvgpt_cache.reports import aggregate
from fvgpt_cache.store import open_cache
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig

runner = CliRunner()
NUMBER = re.compile(r"-?\d+\.\d\d")


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def console80():
    """The CLI's consoles at 80 columns, whatever terminal the tests run in."""
    saved = (common.console._width, common.err._width)
    common.console._width = common.err._width = 80
    yield
    common.console._width, common.err._width = saved


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


# ------------------------------------------------------------------ 1. no silent pooling


def test_two_models_of_one_dataset_are_never_pooled(two_models, tmp_path, console80):
    a, b = two_models
    res = _run("grid", a, b, "--seeds", "1,2", "--set", "epochs=2", "--out", tmp_path / "mixed")
    assert res.exit_code == 2 and "different models" in res.output and "model_config_sha256" in res.output
    assert not (tmp_path / "mixed" / "results.jsonl").exists()
    for cache, out in ((a, "ga"), (b, "gb")):
        res = _run("grid", cache, "--seeds", "1,2", "--set", "epochs=2", "--out", tmp_path / "runs" / out)
        assert res.exit_code == 0, res.output
    res = _run("report", tmp_path / "runs", "--format", "csv")
    assert res.exit_code == 0, res.output
    rows = [r for r in csv.DictReader(io.StringIO(res.stdout)) if r["dataset"] == "shapes" and r["method"] == "fvgpt"]
    assert sorted(r["n_seeds"] for r in rows) == ["2", "2"], "two rows of two seeds, not one of four"
    assert len({r["model"] for r in rows}) == 2 and any("D16" in r["model"] for r in rows)
    res = _run("report", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    titles = [line for line in res.output.splitlines() if line.startswith("Base-to-new")]
    assert len(titles) == 2 and all("model" in t for t in titles), res.output
    text = " ".join(res.output.split())
    assert "model ViT-B-16/openai D32" in text and "model small-clip/sha abababab D16" in text


def _rec(seed, b=80.0, n=60.0, prov=None, **config):
    metric = {"base": b, "new": n, "hm": 2 * b * n / (b + n)}
    return {"format": "fvgpt-cache-results", "run_id": f"{seed}-{json.dumps(prov, sort_keys=True)}-{config}",
            "cache": "/c/x.h5", "dataset": "pets", "backbone": "coop", "seed": seed,
            "config": {**TrainConfig(backbone="coop", seed=seed).to_dict(), **config},
            "cache_provenance": prov or {}, "metrics": {m: dict(metric) for m in ("zeroshot", "backbone", "fvgpt")}}


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
            recs.append({**_rec(seed, prov=MODEL_A), "backbone_provenance": bb(epochs, seed)})
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
    (tmp_path / "r" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = _run("report", tmp_path / "r", "--plot", "lambda_d", "--plot-out", tmp_path / "p.png")
    assert res.exit_code == 0, res.output
    assert "averages runs that differ in" in res.output and "use_frg" in res.output and "model" in res.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ 2. dataset names


@pytest.mark.parametrize("root, name", [("pets/images", "pets"), ("my flowers/jpg", "my_flowers"),
                                        ("shapes", "shapes"), ("birds/data/imgs", "birds")])
def test_default_dataset_name_comes_from_the_image_folder(tmp_path, root, name):
    assert default_dataset_name(tmp_path / root) == name


def test_name_reaches_cache_path_provenance_inspect_and_report(tmp_path, tiny_config, monkeypatch):
    split, images, masks = write_generic_dataset(tmp_path / "toys")
    monkeypatch.chdir(tmp_path)
    common_args = ["--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
                   "--pretrained", "none", "--shots", "2", "--train-views", "2", "--workers", "0"]
    res = _run("extract", *common_args, "--name", "toy-shapes")
    assert res.exit_code == 0, res.output
    out = tmp_path / "cache" / "toy-shapes" / "tiny-clip-none" / "shots2_seed1_views2.h5"
    assert open_cache(out).provenance["dataset"] == "toy-shapes"
    res = _run("inspect", out)
    assert res.exit_code == 0 and re.search(r"dataset\s+toy-shapes", res.output), res.output
    res = _run("train", out, "--backbone", "clip", "--epochs", "2", "--json", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    res = _run("report", tmp_path / "run", "--format", "csv")
    assert res.exit_code == 0 and {r["dataset"] for r in csv.DictReader(io.StringIO(res.stdout))} == {"toy-shapes"}
    res = _run("extract", *common_args)  # without --name: the data folder's name (images/ is generic), never "split"
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cache" / "toys" / "tiny-clip-none" / "shots2_seed1_views2.h5").is_file()
    res = _run("extract", *common_args, "--name", "a/b")
    assert res.exit_code == 2 and "--name 'a/b'" in res.output


# ------------------------------------------------------------------ 6. grids take the backbone like train


def test_grid_backbone_option_equals_set_backbone(tmp_path):
    cache = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=4, views=2, dim=16, test_per_class=4)
    from fvgpt_cache.store import write_text_group
    import numpy as np

    write_text_group(cache, "other_bb", np.random.default_rng(0).standard_normal((4, 16)), {"method": "synthetic"})
    res = _run("grid", cache, "--set", "epochs=2", "--out", tmp_path / "none")
    assert res.exit_code == 2 and "choose one with --backbone" in res.output
    assert "--backbone" in _run("grid", "--help").output
    outputs = []
    for args in (["--backbone", "other_bb"], ["--set", "backbone=other_bb"]):
        out = tmp_path / args[0].strip("-")
        res = _run("grid", cache, *args, "--seeds", "1,2", "--set", "epochs=2", "--out", out)
        assert res.exit_code == 0, res.output
        outputs.append([json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()])
    for a, b in zip(*outputs):
        assert a["backbone"] == b["backbone"] == "other_bb" and a["metrics"] == b["metrics"]
    res = _run("grid", cache, "--backbone", "other_bb", "--set", "backbone=synthetic_bb", "--out", tmp_path / "x")
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
    res = _run("grid", cache, *args, "--out", tmp_path / "g")
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "g").exists()


# ------------------------------------------------------------------ 7. results that quietly shrink


def test_short_classes_are_named_in_a_warning_provenance_and_inspect(tmp_path, tiny_config):
    split, images, masks = write_generic_dataset(tmp_path / "data", per_class=(5, 2, 1))
    raw = json.loads(split.read_text())
    raw["train"] = [item for item in raw["train"] if not (item[1] == 2 and item[0].endswith(("_3.jpg", "_4.jpg")))]
    split.write_text(json.dumps(raw))  # green triangle keeps 3 training images, the others 5
    out = tmp_path / "c.h5"
    res = _run("extract", "--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
               "--pretrained", "none", "--shots", "4", "--train-views", "1", "--workers", "0", "--out", out)
    assert res.exit_code == 0, res.output
    assert "green triangle: 3 < 4" in res.output and "val:" in res.output and "2 < 4" in res.output
    assert "red_circle: 5" not in res.output
    short = open_cache(out).provenance["short_classes"]
    assert short["train"] == [{"label": 2, "class": "green triangle", "count": 3, "wanted": 4}]
    assert len(short["val"]) == 4
    res = _run("inspect", out)
    assert "green triangle: 3 < 4" in res.output
    report = json.loads(_run("inspect", out, "--json").stdout)
    assert report["short_classes"] == short


@pytest.mark.parametrize("content, message", [
    ({"train": [["a.jpg", 0, "a"]], "val": []}, "has no 'test' split"),
    ({"train": [], "val": [], "test": [["a.jpg", 0, "a"]]}, "the 'train' split is empty"),
])
def test_split_file_with_a_missing_or_empty_split_names_file_and_split(tmp_path, content, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{message}|{message}"):
        read_split_json(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_split_json(path)


# ------------------------------------------------------------------ 8. console and help


def _check_80_columns(output: str) -> list[str]:
    lines = output.splitlines()
    too_long = [line for line in lines if len(line) > 80]
    assert not too_long, too_long
    assert "…" not in output, "nothing cut"
    return lines


def test_train_output_fits_80_columns(tmp_path, console80):
    cache = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=4, views=2, dim=16, test_per_class=4)
    out = tmp_path / "a-rather-long-run-folder-name-that-a-user-might-choose" / "run"
    res = _run("train", cache, "--epochs", "2", "--out", out)
    assert res.exit_code == 0, res.output
    lines = _check_80_columns(res.output)
    record = json.loads((out / "results.json").read_text())
    for label, key in (("zero-shot CLIP", "zeroshot"), ("backbone (synthetic_bb)", "backbone"), ("+ FVG-PT", "fvgpt")):
        row = [line for line in lines if label in line]
        assert len(row) == 1, (label, res.output)
        m = record["metrics"][key]
        assert NUMBER.findall(row[0])[:3] == [f"{m['base']:.2f}", f"{m['new']:.2f}", f"{m['hm']:.2f}"], row[0]


def test_report_tables_fit_80_columns(tmp_path, console80):
    metric = lambda b, n: {"base": b, "new": n, "hm": 2 * b * n / (b + n)}  # noqa: E731
    recs = []
    for ds in ("oxford_flowers", "fgvc_aircraft", "a_user_dataset_with_a_long_name"):
        for seed in (1, 2, 3):
            rec = _rec(seed, prov=MODEL_A)
            rec.update(dataset=ds, backbone="kgcoop", run_id=f"{ds}-{seed}")
            rec["config"]["backbone"] = "kgcoop"
            rec["metrics"] = {"fvgpt": metric(97.13 + seed, 75.55 - seed), "backbone": metric(100.0 - seed, 10.12 * seed),
                              "zeroshot": metric(72.08, 77.8 + seed)}
            recs.append(rec)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = _run("report", tmp_path / "r", "--compare", "paper")
    assert res.exit_code == 0, res.output
    lines = _check_80_columns(res.output)
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


def test_help_shows_brackets_literally():
    res = _run("grid", "--help")
    assert res.exit_code == 0 and "[params]" in res.output and "[base]" in res.output


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, generic_data, tiny_config, monkeypatch):
    import fvgpt_cache.extraction as extraction

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extraction, "extract", interrupted)
    split, images, masks = generic_data
    res = _run("extract", "--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
               "--pretrained", "none", "--out", tmp_path / "c.h5")
    assert res.exit_code == 130 and "interrupted; rerun the same command to resume" in res.output
    import fvgpt_cache.runs as runs

    monkeypatch.setattr(runs, "run_training", interrupted)
    cache = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=4, views=2, dim=16, test_per_class=4)
    res = _run("train", cache)
    assert res.exit_code == 130 and "interrupted" in res.output and "resume" not in res.output


def test_unexpected_errors_have_no_traceback_unless_debug(tmp_path, monkeypatch):
    import fvgpt_cache.inspection as inspection

    def broken(path, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inspection, "inspect_cache", broken)
    res = _run("inspect", tmp_path / "x.h5")
    assert res.exit_code == 2 and "Traceback" not in res.output and "ZeroDivisionError: a bug" in res.output
    assert "--debug" in res.output
    res = _run("--debug", "inspect", tmp_path / "x.h5")
    assert res.exit_code == 2 and "Traceback" in res.output


# ------------------------------------------------------------------ 10. a crash leaves nothing in the way

KILL_SCRIPT = """
import sys, time
from fvgpt_cache.data import generic_dataset
from fvgpt_cache.extraction import ExtractOptions, extract
from fvgpt_cache.models import load_clip

split, images, masks, config, out = sys.argv[1:]

def slow(split_name, done, total):  # a slow encoder: the workers keep decoding ahead meanwhile
    print("progress", split_name, done, flush=True)
    time.sleep(0.3)

extract(generic_dataset(split, images, masks), load_clip(config, "none"), out,
        ExtractOptions(shots=0, train_views=2, batch_size=2, workers=2), progress=slow)
"""


def _children(pid: int) -> list[int]:
    from pathlib import Path

    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(x) for x in task.read_text().split()]
    return found


def test_second_writer_is_refused_with_the_pid_holding_the_lock(tmp_path):
    from fvgpt_cache.store import CacheError, exclusive_lock

    out = tmp_path / "c.h5"
    with lock_held_elsewhere(out) as holder:
        with pytest.raises(CacheError, match=f"another process is already writing .*held by PID {holder.pid}"):
            with exclusive_lock(out):
                pass
    with exclusive_lock(out):  # the kernel dropped the killed holder's lock
        pass


@pytest.mark.slow
@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_extraction_killed_with_sigkill_is_resumed_by_an_immediate_rerun(tmp_path, tiny_config):
    import os
    import signal
    import subprocess
    import sys
    import time

    split, images, masks = write_generic_dataset(tmp_path / "toys", per_class=(6, 2, 2))
    out = tmp_path / "c.h5"
    args = [str(split), str(images), str(masks), str(tiny_config), str(out)]
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = []
    try:
        for line in proc.stdout:
            workers = _children(proc.pid) or workers
            if line.startswith("progress train") and int(line.split()[2]) >= 4 and workers:
                break
        assert workers, "the DataLoader workers were running"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "c.h5.partial").exists() and not out.exists()
    from fvgpt_cache.store import exclusive_lock

    with exclusive_lock(out):  # at once: the lock died with the process that took it, whatever its workers do
        pass
    for _ in range(40):  # the workers die with their parent (PR_SET_PDEATHSIG) instead of lingering for seconds
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")
                 and "zombie" not in open(f"/proc/{pid}/status").read().lower()]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, "DataLoader workers outlived their killed parent"
    res = subprocess.run([sys.executable, "-m", "fvgpt_cache.cli.main", "extract", "--split-file", split,
                          "--image-root", images, "--mask-root", masks, "--model", tiny_config, "--pretrained", "none",
                          "--shots", "all", "--train-views", "2", "--batch-size", "2", "--workers", "2", "--out", out],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr + res.stdout
    done = re.search(r"resumed: (\d+) rows were already done", res.stdout)
    assert done and int(done.group(1)) >= 4, res.stdout
    assert open_cache(out).image("train").shape[:2] == (24, 2)


def test_ablation_tables_do_not_pool_two_models():
    from fvgpt_cache.reports import ablation_tables

    recs = []
    for prov, base in ((MODEL_A, 80.0), (MODEL_B, 60.0)):
        for seed in (1, 2):
            for label, overrides in (("(5) FRG+FDC+PC", {}), ("(2) PC", {"use_fdc": False})):
                rec = _rec(seed, base, prov=prov, **overrides)
                rec["ablations"] = [["components", label]]
                rec["run_id"] += label
                recs.append(rec)
    tables = ablation_tables(recs)
    assert len(tables) == 2
    titles = [t[0] for t in tables]
    assert any("ViT-B-16/openai" in t for t in titles) and any("small-clip" in t for t in titles)
    for _, header, body in tables:
        assert [row[header.index("seeds")] for row in body] == ["2", "2"]
    assert sorted(body[0][1] for _, _, body in tables) == ["60.00", "80.00"]


def test_every_subpackage_is_declared_for_installation():
    """pyproject.toml lists packages explicitly (cli/ installs as fvgpt_cache.cli): a new subpackage
    missing there would work in an editable checkout and be absent from `pip install .`."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    declared = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "fvgpt_cache").rglob("__init__.py")}
    assert found | {"fvgpt_cache.cli"} == declared
