import csv
import io
import json
import re

import pytest
from conftest import NUMBER, check_80_columns, run_cli, write_generic_dataset
from typer.testing import CliRunner

from fvgpt_cache.cli.main import app
from fvgpt_cache.store import open_cache
from fvgpt_cache.synthetic import write_feature_cache
from test_datasets import build

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_extract_generic_then_inspect_json(tmp_path, generic_data, tiny_config):
    split, images, masks = generic_data
    out = tmp_path / "c.h5"
    res = _run("extract", "--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
               "--pretrained", "none", "--shots", "2", "--seed", "3", "--train-views", "2", "--workers", "0",
               "--out", out)
    assert res.exit_code == 0, res.output
    assert "random weights" in res.output
    res = _run("inspect", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["splits"]["train"]["samples"] == 8
    assert report["splits"]["train"]["features"]["full"]["shape"] == [8, 2, 32]
    assert report["splits"]["val"]["samples"] == 8
    assert report["classes"]["base"] == [0, 1] and report["classes"]["new"] == [2, 3]
    assert report["provenance"]["shots"] == 2 and report["provenance"]["seed"] == 3
    assert any("random weights" in p for p in report["problems"])
    res = _run("extract", "--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
               "--pretrained", "none", "--shots", "2", "--seed", "3", "--train-views", "2", "--workers", "0",
               "--out", out)
    assert res.exit_code == 2 and "--force" in res.output


@pytest.mark.parametrize("name", ["oxford_pets", "fgvc_aircraft", "imagenet"])
def test_extract_named_dataset_with_default_output(tmp_path, tiny_config, name, monkeypatch):
    """The released masks' layout (`<dataset folder>/mask/…`, white here) is found without options, even
    beside a decoy `mask/<image folder>/` of black masks; the cache path, names and template follow the dataset.
    Break used: `datasets.resolve_mask_root` trying `mask/<image folder>` before `mask` (the old check,
    `"mask" in mask_root`, passed on the decoy)."""
    from PIL import Image

    from fvgpt_cache.datasets import DATASETS

    root, names = build(tmp_path / "data", name)
    masks = root / DATASETS[name].folder / "mask"
    for white in [p for p in masks.rglob("*") if p.is_file()]:
        decoy = masks / DATASETS[name].image_dir / white.relative_to(masks)
        decoy.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 0).save(decoy, "PNG" if decoy.suffix == ".png" else "JPEG")
    monkeypatch.chdir(tmp_path)
    res = _run("extract", "--data", root, "--dataset", name, "--model", tiny_config, "--pretrained", "none",
               "--shots", "all", "--workers", "0")
    assert res.exit_code == 0, res.output
    out = tmp_path / "cache" / name / "tiny-clip-none" / "allshots_seed1.h5"
    cache = open_cache(out)
    assert cache.provenance["dataset"] == name and cache.classnames == names
    assert cache.provenance["mask_root"] == str(masks)
    assert not cache.provenance.get("full_mask_images")
    assert all(bool((cache.areas(split) == 1).all()) for split in cache.splits), "the white masks were read"
    assert cache.text_attrs("clip")["template"] == DATASETS[name].template


@pytest.mark.parametrize("args, message", [
    ([], "say which data to read"),
    (["--dataset", "dtd"], "--dataset needs --data"),
    (["--split-file", "x.json"], "--split-file needs --image-root"),
    (["--data", ".", "--dataset", "nope"], "valid"),
    (["--split-file", "x.json", "--image-root", ".", "--shots", "-3"], "--shots"),
])
def test_extract_argument_errors(args, message, tiny_config):
    res = _run("extract", "--model", tiny_config, "--pretrained", "none", *args)
    assert res.exit_code == 2
    assert message in res.output


def test_inspect_refuses_foreign_file(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"nope")
    res = _run("inspect", tmp_path / "x.h5")
    assert res.exit_code == 2 and "not a readable HDF5" in res.output


@pytest.mark.slow
def test_smoke_demo_runs_offline_and_prints_the_schema(tmp_path):
    res = _run("demo", "--smoke", "--json", "--out", tmp_path / "demo")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["seeds"] == [1] and set(summary["splits"]) == {"clean", "counterfactual"}
    for split in summary["splits"]:
        cache = open_cache(tmp_path / "demo" / f"world-{split}.h5")
        assert cache.image("train").shape[:2] == (16, 3) and "coop" in cache.text_groups
    res = _run("demo", "--smoke", "--out", tmp_path / "demo")
    assert res.exit_code == 0, res.output
    assert "RANDOM weights" in res.output and "CoOp + FVG-PT" in res.output and "r_source=full" in res.output


@pytest.mark.slow
def test_backbone_commands_then_train_on_coop(tmp_path, generic_data, tiny_config):
    split, images, masks = generic_data
    cache = tmp_path / "c.h5"
    res = _run("extract", "--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
               "--pretrained", "none", "--shots", "4", "--workers", "0", "--out", cache)
    assert res.exit_code == 0, res.output
    res = _run("backbone", "train", cache, "--method", "coop", "--epochs", "2", "--out", tmp_path / "coop")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "coop" / "prompt_learner" / "model.pth.tar-2").is_file()
    res = _run("backbone", "load", cache, "--checkpoint", tmp_path / "coop", "--name", "coop_again")
    assert res.exit_code == 0, res.output
    c = open_cache(cache)
    assert c.text("coop").shape == c.text("coop_again").shape == (4, 32)
    assert (c.text("coop") - c.text("coop_again")).abs().max() < 1e-6
    res = _run("backbone", "ensemble", cache, "--templates", "imagenet7")
    assert res.exit_code == 0 and "clip_imagenet7" in open_cache(cache).text_groups
    res = _run("baselines", cache, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert set(rows) == {"clip", "clip_imagenet7", "coop", "coop_again", "linear probe"}
    assert rows["coop"] == rows["coop_again"]
    res = _run("train", cache, "--backbone", "coop", "--epochs", "2", "--json", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["backbone"] == "coop"
    res = _run("backbone", "load", cache, "--checkpoint", tmp_path / "nothing.pt")
    assert res.exit_code == 2 and "checkpoint not found" in res.output


@pytest.mark.slow
def test_name_reaches_cache_path_provenance_inspect_and_report(tmp_path, tiny_config, monkeypatch):
    split, images, masks = write_generic_dataset(tmp_path / "toys")
    monkeypatch.chdir(tmp_path)
    common_args = ["--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
                   "--pretrained", "none", "--shots", "2", "--train-views", "2", "--workers", "0"]
    res = run_cli("extract", *common_args, "--name", "toy-shapes")
    assert res.exit_code == 0, res.output
    out = tmp_path / "cache" / "toy-shapes" / "tiny-clip-none" / "shots2_seed1_views2.h5"
    assert open_cache(out).provenance["dataset"] == "toy-shapes"
    res = run_cli("inspect", out)
    assert res.exit_code == 0 and re.search(r"dataset\s+toy-shapes", res.output), res.output
    res = run_cli("train", out, "--backbone", "clip", "--epochs", "2", "--json", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    res = run_cli("report", tmp_path / "run", "--format", "csv")
    assert res.exit_code == 0 and {r["dataset"] for r in csv.DictReader(io.StringIO(res.stdout))} == {"toy-shapes"}
    res = run_cli("extract", *common_args)  # without --name: the data folder's name (images/ is generic), never "split"
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cache" / "toys" / "tiny-clip-none" / "shots2_seed1_views2.h5").is_file()
    res = run_cli("extract", *common_args, "--name", "a/b")
    assert res.exit_code == 2 and "--name 'a/b'" in res.output


def test_train_output_fits_80_columns(tmp_path, console80):
    cache = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=4, views=2, dim=16, test_per_class=4)
    out = tmp_path / "a-rather-long-run-folder-name-that-a-user-might-choose" / "run"
    res = run_cli("train", cache, "--epochs", "2", "--out", out)
    assert res.exit_code == 0, res.output
    lines = check_80_columns(res.output)
    record = json.loads((out / "results.json").read_text())
    for label, key in (("zero-shot CLIP", "zeroshot"), ("backbone (synthetic_bb)", "backbone"), ("+ FVG-PT", "fvgpt")):
        row = [line for line in lines if label in line]
        assert len(row) == 1, (label, res.output)
        m = record["metrics"][key]
        assert NUMBER.findall(row[0])[:3] == [f"{m['base']:.2f}", f"{m['new']:.2f}", f"{m['hm']:.2f}"], row[0]


def test_help_shows_brackets_literally():
    res = run_cli("grid", "--help")
    assert res.exit_code == 0 and "[params]" in res.output and "[base]" in res.output


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, generic_data, tiny_config, monkeypatch):
    import fvgpt_cache  # the CLI calls the library through the public API

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fvgpt_cache, "extract", interrupted)
    split, images, masks = generic_data
    res = run_cli("extract", "--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
               "--pretrained", "none", "--out", tmp_path / "c.h5")
    assert res.exit_code == 130 and "interrupted; rerun the same command to resume" in res.output
    monkeypatch.setattr(fvgpt_cache, "train", interrupted)
    cache = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=4, views=2, dim=16, test_per_class=4)
    res = run_cli("train", cache)
    assert res.exit_code == 130 and "interrupted" in res.output and "resume" not in res.output


def test_unexpected_errors_have_no_traceback_unless_debug(tmp_path, monkeypatch):
    import fvgpt_cache  # the CLI calls the library through the public API

    def broken(path, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(fvgpt_cache, "inspect_cache", broken)
    res = run_cli("inspect", tmp_path / "x.h5")
    assert res.exit_code == 2 and "Traceback" not in res.output and "ZeroDivisionError: a bug" in res.output
    assert "--debug" in res.output
    res = run_cli("--debug", "inspect", tmp_path / "x.h5")
    assert res.exit_code == 2 and "Traceback" in res.output


@pytest.mark.parametrize("args, said", [
    (["rnu"], "No such command 'rnu'"),
    (["trian"], "Did you mean 'train'?"),
    (["train", "--lamda-d", "1", "x.h5"], "No such option: --lamda-d"),
])
def test_a_mistyped_command_or_option_is_the_users_error_not_ours(args, said):
    """click's own usage message with its close matches and the --help hint, never "an unexpected error".
    Break used: the group's handler re-raising only `click.ClickException` (typer 0.2x raises its own
    copy's exceptions, typer._click), so the typo was reported as our bug."""
    res = run_cli(*args)
    assert res.exit_code == 2 and said in res.output, res.output
    assert "--help" in res.output and "unexpected" not in res.output and "error: " not in res.output


def test_commands_leave_error_handling_to_the_group():
    """One handler (cli/common.py's HandledGroup) turns exceptions into the `error:` paragraph; no command
    wraps its body in its own `except … fail()`.
    Break used: put back `except (ValueError, FileNotFoundError, RuntimeError) as exc: fail(str(exc))` in a command."""
    import re
    from pathlib import Path

    cli = Path(__file__).resolve().parents[1] / "cli"
    wrapped = [f"{p.name}:{n}" for p in cli.glob("*.py") if p.name != "common.py"
               for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"except .*(Error|Exception).* as \w+:", line)]
    assert not wrapped, wrapped
