"""`fvgpt-cache run PLAN.toml`: the whole study from one plan (issue 24).

Datasets are miniature copies of CoOp's real folder layouts (the loaders' own fixtures,
tests/test_datasets.py), the model a tiny open_clip ViT deep enough for PromptSRC's prompt depth,
and the PromptSRC/MMRL checkpoints are written in the official layout ROOT/<dataset>/seed<S>/…
(tests/test_import.py), from the same random weights the plan's model has.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fvgpt_cache.cli.main import app
from fvgpt_cache.data import base_new_split
from fvgpt_cache.datasets import load_dataset
from fvgpt_cache.study import PlanError, build_jobs, load_plan, paper_plan, parse_shard, shard_units

from test_datasets import build
from test_import import DEEP_CONFIG, _save, mmrl_checkpoint, promptsrc_checkpoint

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_plan(folder: Path, *, datasets=("oxford_pets",), seeds=(1,), backbones=("coop",), model="tiny.json",
               checkpoints: dict | None = None, extra: str = "", out: str = "study", train='["table1"]') -> Path:
    ds = "".join(f'[[dataset]]\nname = "{d}"\n' for d in datasets)
    ck = "".join(f'{m} = "{p}"\n' for m, p in (checkpoints or {}).items())
    text = f"""out = "{out}"
[model]
name = "{model}"
pretrained = "none"
[data]
root = "data"
{ds}
[study]
seeds = [{", ".join(map(str, seeds))}]
shots = 4
backbones = [{", ".join(f'"{b}"' for b in backbones)}]
train = {train}
device = "cpu"
[extract]
train_views = 2
batch_size = 8
workers = 0
[backbone]
epochs = 2
[train]
epochs = 2
""" + (f"[checkpoints]\n{ck}" if ck else "") + extra
    path = folder / "plan.toml"
    path.write_text(text)
    return path


@pytest.fixture()
def tiny_study(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    build(tmp_path / "data", "oxford_pets")
    return tmp_path


# ------------------------------------------------------------------------------------ plan files

ISSUE_PLAN = """
out = "studies/paper"
[model]
name = "ViT-B-16"            # or a config JSON
pretrained = "openai"        # or a local checkpoint
[data]
root = "/data"               # CoOp layouts for the eleven
masks = "/data/masks"
[[dataset]]                  # the eleven by name ...
name = "oxford_pets"
[[dataset]]                  # ... or any split-file dataset
name = "shapes"
split_file = "shapes/split.json"
image_root = "shapes/images"
mask_root = "shapes/masks"
[study]
seeds = [1, 2, 3]
shots = 16
backbones = ["coop", "kgcoop"]   # promptsrc/mmrl need [checkpoints]
train = ["table1"]               # table2, presets by name
[checkpoints]
promptsrc = "/ckpt/promptsrc"
"""


def test_the_issues_example_plan_loads_as_written(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text(ISSUE_PLAN)
    plan = load_plan(path)
    assert plan.out == tmp_path / "studies/paper" and plan.masks == Path("/data/masks")
    assert [d.name for d in plan.datasets] == ["oxford_pets", "shapes"]
    assert plan.datasets[1].split_file == Path("/data/shapes/split.json")
    jobs = build_jobs(plan)
    kinds = [j.kind for j in jobs]
    # 2 datasets × 3 seeds: one cache each (CoOp and KgCoOp share the crop scale), two backbones, two grids
    assert (kinds.count("extract"), kinds.count("backbone"), kinds.count("grid"), kinds.count("report")) == (6, 12, 12, 1)
    outs = [j.spec.get("out") for j in jobs]
    assert all(str(o).startswith(str(plan.out)) for o in outs) and len(set(outs)) == len(outs)
    grid = next(j for j in jobs if j.kind == "grid")
    assert grid.deps == [f"backbone/coop/{grid.unit}"]
    assert next(j for j in jobs if j.id == grid.deps[0]).deps == [f"extract/{grid.unit}"]


def test_the_paper_plan_loads_and_covers_table1(tmp_path):
    path = tmp_path / "paper.toml"
    path.write_text(paper_plan())
    plan = load_plan(path)
    jobs = build_jobs(plan)
    kinds = [j.kind for j in jobs]
    # 11 datasets × 3 seeds; MMRL's caches are cropped 0.5–1 (its release config), the others 0.08–1
    assert kinds.count("extract") == 11 * 3 * 2 and kinds.count("grid") == 11 * 3 * 4 + 4 * 3
    # Table 2 per backbone and seed: CoOp/KgCoOp trained on all ImageNet classes and loaded into the 10 targets,
    # PromptSRC/MMRL cross-dataset checkpoints imported into ImageNet and the 10 targets
    assert kinds.count("import") == 11 * 3 * 2 + 2 * 3 * 11 and kinds.count("backbone") == 11 * 3 * 2 + 2 * 3
    assert kinds.count("load") == 2 * 3 * 11
    train_all = next(j for j in jobs if j.id == "cross/backbone/kgcoop/imagenet/shots16_seed3")
    assert train_all.unit == "imagenet/shots16_seed3", "trained in parallel like the ImageNet cache's other head jobs"
    cross = next(j for j in jobs if j.id == "grid/table2/mmrl/imagenet/shots16_seed2_rrc0.5-1")
    assert cross.spec["classes"] == "all" and len(cross.spec["eval_caches"]) == 10 and cross.unit == ""
    assert "cross/import/mmrl/dtd/shots16_seed2_rrc0.5-1" in cross.deps
    assert next(j for j in jobs if j.id == "cross/import/mmrl/dtd/shots16_seed2_rrc0.5-1").spec["checkpoint"] == \
        "/ckpt/mmrl_cross/seed2"
    mmrl = next(j for j in jobs if j.id.startswith("import/mmrl/"))
    assert mmrl.unit.endswith("_rrc0.5-1") and mmrl.spec["checkpoint"].endswith("seed1")


@pytest.mark.parametrize("edit, needle", [
    ("[study]\nsead = [1]\n", "unknown key 'sead' (did you mean 'seeds'?)"),
    ("[study]\nseeds = [1, 1]\n", "seeds = [1, 1]"),
    ("[study]\nshots = \"16\"\n", "shots = '16' should be an integer"),
    ("[study]\nbackbones = [\"maple\"]\n", "choose distinct names from coop, kgcoop, promptsrc, mmrl"),
    ("[study]\nbackbones = [\"promptsrc\"]\n", "[checkpoints] promptsrc"),
    ("[study]\ntrain = [\"table2\"]\n", "needs imagenet and at least one other dataset"),
    ("[study]\ntrain = [\"component\"]\n", "did you mean 'components'?"),
    ("[[dataset]]\nname = \"oxford_pet\"\n", "unknown dataset 'oxford_pet'"),
    ("[[dataset]]\nname = \"all\"\n[[dataset]]\nname = \"dtd\"\n", "'dtd' is listed twice"),
    ("[data]\nroot = \"d\"\nmasks = \"clipseg\"\n", "CLIPSeg needs its weights"),
    ("[train]\nlambda_d = \"x\"\n", "[train]"),
    ("[train]\nseed = 3\n", "seed is set by the plan"),
    ("[extract]\nbad_image = \"ignore\"\n", "bad_image must be one of"),
    ("[study]\nrrc_scale = [0.5]\n", "rrc_scale"),
])
def test_bad_keys_and_values_are_refused_by_name(tmp_path, edit, needle):
    base = {"out": 'out = "o"\n', "[data]": '[data]\nroot = "d"\n', "[[dataset]]": '[[dataset]]\nname = "dtd"\n'}
    head = edit.split("\n")[0]
    text = "".join(v for k, v in base.items() if k != head) + edit
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(PlanError) as info:
        load_plan(tmp_path / "p.toml")
    assert needle in str(info.value) and "p.toml" in str(info.value)


def test_cli_refuses_a_bad_plan_without_a_traceback(tmp_path):
    (tmp_path / "p.toml").write_text('out = "o"\n[study]\nseeds = "1"\n')
    res = cli("run", tmp_path / "p.toml")
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    assert "seeds = '1' should be a list" in res.output


def test_shards_are_deterministic_disjoint_and_complete(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text(paper_plan())
    jobs = build_jobs(load_plan(path))
    parts = [shard_units(jobs, (i, 3)) for i in range(3)]
    assert set().union(*parts) == shard_units(jobs, None) and sum(map(len, parts)) == len(shard_units(jobs, None))
    assert parts == [shard_units(build_jobs(load_plan(path)), (i, 3)) for i in range(3)]
    for bad in ("2/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_dry_run_of_the_paper_plan_names_missing_inputs(tmp_path):
    (tmp_path / "paper.toml").write_text(paper_plan().replace('root = "/data"', 'root = "data"'))
    (tmp_path / "data").mkdir()
    res = cli("run", tmp_path / "paper.toml", "--dry-run", "--no-estimate")
    assert res.exit_code == 0, res.output
    assert re.search(r"extract\s+66\s+0\s+0\s+66\s+0", res.output) and re.search(r"grid\s+144\s+0\s+0\s+144", res.output)
    assert "missing imagenet: no imagenet/ with its split file" in res.output
    assert "checkpoint /ckpt/promptsrc/oxford_pets/seed1" in res.output.replace("\n", "")
    assert not (tmp_path / "studies").exists(), "a dry run writes nothing"


def test_plan_paper_prints_the_plan(tmp_path):
    res = cli("plan", "--paper", "-o", tmp_path / "paper.toml")
    assert res.exit_code == 0 and load_plan(tmp_path / "paper.toml").backbones == ["coop", "kgcoop", "promptsrc", "mmrl"]


# ------------------------------------------------------------------------------ running a study

def _results(out: Path) -> dict:
    """Every run's numbers (not its timings or absolute paths), by grid and run id."""
    rows = {}
    for f in sorted((out / "runs").rglob("results.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            rows[(str(f.relative_to(out)), r["dataset"], r["backbone"], r["seed"], json.dumps(r["params"]))] = \
                (r["metrics"], r["cross_dataset"], r["head_parameters"])
    return rows


def test_one_small_study_end_to_end_and_a_rerun_has_nothing_to_do(tiny_study):
    """Fast: one dataset, one seed, CoOp; `run` writes the report, the second `run` says nothing to do."""
    plan = write_plan(tiny_study)
    res = cli("run", plan)
    assert res.exit_code == 0, res.output
    out = tiny_study / "study"
    assert (out / "report" / "report.md").exists() and "oxford_pets" in (out / "report" / "report.md").read_text()
    assert (out / "logs" / "extract" / "oxford_pets" / "shots4_seed1.log").exists()
    states = {p.relative_to(out / "jobs").with_suffix("").as_posix(): json.loads(p.read_text())["state"]
              for p in (out / "jobs").rglob("*.json")}
    assert states == {"extract/oxford_pets/shots4_seed1": "done", "backbone/coop/oxford_pets/shots4_seed1": "done",
                      "grid/table1/coop/oxford_pets/shots4_seed1": "done", "report": "done"}
    assert "Base" in res.output and "report:" in res.output
    again = cli("run", plan)
    assert again.exit_code == 0 and "nothing to do: all 4 jobs" in again.output, again.output
    dry = cli("run", plan, "--dry-run", "--no-estimate")
    assert dry.exit_code == 0 and re.search(r"extract\s+1\s+1\s+0\s+0\s+0", dry.output), dry.output
    # more decoding workers change no result: still nothing to do
    plan.write_text(plan.read_text().replace("workers = 0", "workers = 1"))
    assert "nothing to do" in cli("run", plan).output
    # the plan changed under finished jobs: refused by name before anything runs, nothing rewritten
    plan.write_text(plan.read_text().replace("train_views = 2", "train_views = 3"))
    before = (out / "caches" / "oxford_pets" / "shots4_seed1.h5").stat().st_mtime_ns
    changed = cli("run", plan)
    assert changed.exit_code == 2 and "extract/oxford_pets/shots4_seed1" in changed.output
    assert "other settings" in changed.output and "another `out`" in changed.output.replace("\n", " ")
    assert (out / "caches" / "oxford_pets" / "shots4_seed1.h5").stat().st_mtime_ns == before


def test_a_mask_folder_for_the_eleven_has_one_folder_per_dataset(tmp_path):
    from fvgpt_cache.study.runners import _load_dataset

    build(tmp_path / "data", "oxford_pets")
    shutil.move(tmp_path / "data" / "oxford_pets" / "mask", tmp_path / "masks" / "oxford_pets")
    plan_path = write_plan(tmp_path, extra="")
    plan_path.write_text(plan_path.read_text().replace('root = "data"', 'root = "data"\nmasks = "masks"'))
    spec = build_jobs(load_plan(plan_path))[0].spec
    assert _load_dataset(spec).mask_root == tmp_path / "masks" / "oxford_pets"


# ------------------------------------------- the issue's checks: 2 datasets × 2 seeds × 4 backbones (slow)

FULL = dict(datasets=("oxford_pets", "dtd"), seeds=(1, 2), backbones=("coop", "kgcoop", "promptsrc", "mmrl"),
            model="deep.json", checkpoints={"promptsrc": "ckpt/promptsrc", "mmrl": "ckpt/mmrl/{dataset}/seed{seed}"})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """CoOp-layout datasets, a tiny model config, and official-layout PromptSRC/MMRL checkpoints per dataset and seed."""
    from fvgpt_cache.datasets import template_for
    from fvgpt_cache.models import load_clip

    root = tmp_path_factory.mktemp("study")
    (root / "deep.json").write_text(json.dumps(DEEP_CONFIG))
    for name in FULL["datasets"]:
        build(root / "data", name)
    deep = load_clip(str(root / "deep.json"), "none", seed=0)
    for name in FULL["datasets"]:
        classes = load_dataset(name, root / "data").classnames
        base = [classes[i] for i in base_new_split(len(classes))[0]]
        for seed in FULL["seeds"]:
            _save(promptsrc_checkpoint(deep.model, deep.tokenizer, base, seed=seed),
                  root / "ckpt" / "promptsrc" / name / f"seed{seed}" / "VLPromptLearner", 5)
            _save(mmrl_checkpoint(deep.model, deep.tokenizer, base, template_for(name), seed=seed),
                  root / "ckpt" / "mmrl" / name / f"seed{seed}" / "MultiModalRepresentationLearner", 5,
                  optimizer=torch.optim.AdamW)
    return root


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted single-process run of the full plan."""
    plan = write_plan(world, out="ref", **FULL)
    res = cli("run", plan)
    assert res.exit_code == 0, res.output
    return _results(world / "ref"), res.output


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": ""}


@pytest.mark.slow
def test_full_plan_produces_the_report_and_a_rerun_does_nothing(world, reference):
    results, output = reference
    # 2 datasets × 2 seeds × 4 backbones, one table1 run each
    assert len(results) == 16 and {k[2] for k in results} == {"coop", "kgcoop", "promptsrc", "mmrl"}
    md = (world / "ref" / "report" / "report.md").read_text()
    for backbone in ("coop", "kgcoop", "promptsrc", "mmrl"):
        assert f"backbone {backbone}" in md
    assert "(paper)" in md and "job(s) failed" not in output
    again = cli("run", write_plan(world, out="ref", **FULL))
    assert again.exit_code == 0 and "nothing to do: all 41 jobs" in again.output, again.output
    dry = cli("run", write_plan(world, out="ref", **FULL), "--dry-run", "--no-estimate")
    assert dry.exit_code == 0 and re.search(r"grid\s+16\s+16\s+0\s+0\s+0", dry.output), dry.output


@pytest.mark.slow
def test_sigkill_in_the_middle_and_a_rerun_give_the_same_results(world, reference):
    plan = write_plan(world, out="killed", **FULL)
    proc = subprocess.Popen([sys.executable, "-m", "fvgpt_cache.cli.main", "run", str(plan)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = world / "killed" / "jobs" / "import" / "promptsrc"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (world / "killed" / "report").exists()
    res = cli("run", plan)
    assert res.exit_code == 0, res.output
    assert _results(world / "killed") == reference[0]


@pytest.mark.slow
def test_two_shards_and_the_report_equal_one_process(world, reference):
    plan = write_plan(world, out="shards", **FULL)
    first = cli("run", plan, "--shard", "0/2")
    assert first.exit_code == 0, first.output
    assert "wait for other shards" in first.output and not (world / "shards" / "report" / "report.md").exists()
    second = cli("run", plan, "--shard", "1/2")
    assert second.exit_code == 0, second.output
    assert (world / "shards" / "report" / "report.md").exists(), "the last shard to finish writes the report"
    assert _results(world / "shards") == reference[0]
    assert cli("run", plan).output.startswith("nothing to do")


@pytest.mark.slow
@pytest.mark.parametrize("image_passes", ["shared", "per-rank"])
def test_torchrun_two_processes_give_the_results_of_one(world, reference, image_passes):
    out = f"torchrun-{image_passes}"
    plan = write_plan(world, out=out, **FULL)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "fvgpt_cache.cli.main", "run", str(plan), "--dist-timeout", "60", "--image-passes", image_passes]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    assert _results(world / out) == reference[0]
    grids = [json.loads(p.read_text()) for p in (world / out / "jobs" / "grid").rglob("*.json")]
    assert len(grids) == 16 and {g["rank"] for g in grids} == {0, 1}, "head jobs are spread over the ranks"
    extracts = [json.loads(p.read_text()) for p in (world / out / "jobs" / "extract").rglob("*.json")]
    assert {e["rank"] for e in extracts} == ({0} if image_passes == "shared" else {0, 1})
    assert len(list((world / out / "logs").rglob("*.log"))) == 41
    assert re.search(r"grid\s+16\s+0\s+0\s+0\s+0", res.stdout), "rank 0's summary counts every rank's jobs"


@pytest.mark.slow
def test_a_corrupt_image_fails_its_dataset_and_the_others_complete(world):
    data = world / "bad-data"
    shutil.copytree(world / "data", data)
    victim = next((data / "dtd" / "images").rglob("*.jpg"))
    victim.write_bytes(b"not a jpeg")
    plan = write_plan(world, datasets=("oxford_pets", "dtd"), seeds=(1, 2), backbones=("coop",), out="bad",
                      model="deep.json")
    plan.write_text(plan.read_text().replace('root = "data"', 'root = "bad-data"').replace("[extract]\n",
                                                                                             '[extract]\nbad_image = "error"\n'))
    res = cli("run", plan)
    assert res.exit_code == 1, res.output
    assert "failed extract/dtd/shots4_seed1" in res.output.replace("\n", "") or "failed extract/dtd" in res.output
    states = {p.relative_to(world / "bad" / "jobs").with_suffix("").as_posix(): json.loads(p.read_text())
              for p in (world / "bad" / "jobs").rglob("*.json")}
    for seed in (1, 2):
        assert states[f"extract/dtd/shots4_seed{seed}"]["state"] == "failed"
        assert victim.name in states[f"extract/dtd/shots4_seed{seed}"]["error"] or \
            victim.name in (world / "bad" / "logs" / "extract" / "dtd" / f"shots4_seed{seed}.log").read_text()
        assert states[f"grid/table1/coop/dtd/shots4_seed{seed}"]["state"] == "skipped"
        assert states[f"grid/table1/coop/oxford_pets/shots4_seed{seed}"]["state"] == "done"
    results = _results(world / "bad")
    assert {k[1] for k in results} == {"oxford_pets"} and len(results) == 2
    assert "oxford_pets" in (world / "bad" / "report" / "report.md").read_text()


@pytest.mark.slow
def test_under_torchrun_a_failed_image_pass_does_not_stop_the_others(tmp_path):
    """The ranks record the failed extraction, forget the failure together and go on with the next pass."""
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    for name in ("oxford_pets", "dtd"):
        build(tmp_path / "data", name)
    next((tmp_path / "data" / "dtd" / "images").rglob("*.jpg")).write_bytes(b"not a jpeg")
    plan = write_plan(tmp_path, datasets=("dtd", "oxford_pets"), seeds=(1,), backbones=("coop",))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "fvgpt_cache.cli.main", "run", str(plan), "--dist-timeout", "60"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode != 0 and "Root Cause" in res.stderr and "rank      : 0" in res.stderr.split("Root Cause")[1]
    out = tmp_path / "study"
    state = lambda job: json.loads((out / "jobs" / f"{job}.json").read_text())["state"]  # noqa: E731
    assert state("extract/dtd/shots4_seed1") == "failed" and state("grid/table1/coop/dtd/shots4_seed1") == "skipped"
    assert state("extract/oxford_pets/shots4_seed1") == "done" and state("grid/table1/coop/oxford_pets/shots4_seed1") == "done"
    assert "1 job(s) failed" in res.stdout and res.stdout.count("this run") == 1, res.stdout


# ----------------------------------------------------------------------- Table 2: cross-dataset (slow)

@pytest.mark.slow
def test_table2_trains_on_all_imagenet_classes_and_reports_every_target(tmp_path):
    """ImageNet (CoOp's folder layout) → oxford_pets and dtd, one seed, all four backbones, Tables 1 and 2."""
    from fvgpt_cache.datasets import template_for
    from fvgpt_cache.models import load_clip

    (tmp_path / "deep.json").write_text(json.dumps(DEEP_CONFIG))
    names = ("imagenet", "oxford_pets", "dtd")
    for name in names:
        build(tmp_path / "data", name)
    deep = load_clip(str(tmp_path / "deep.json"), "none", seed=0)
    for name in names:
        classes = load_dataset(name, tmp_path / "data").classnames
        base = [classes[i] for i in base_new_split(len(classes))[0]]
        _save(promptsrc_checkpoint(deep.model, deep.tokenizer, base), tmp_path / "ck" / "psrc" / name / "seed1" /
              "VLPromptLearner", 5)
        _save(mmrl_checkpoint(deep.model, deep.tokenizer, base, template_for(name)),
              tmp_path / "ck" / "mmrl" / name / "seed1" / "MultiModalRepresentationLearner", 5, optimizer=torch.optim.AdamW)
        if name == "imagenet":  # the cross-dataset checkpoints: trained on every ImageNet class
            _save(promptsrc_checkpoint(deep.model, deep.tokenizer, classes, seed=7),
                  tmp_path / "ck" / "psrc-x" / "seed1" / "VLPromptLearner", 5)
            _save(mmrl_checkpoint(deep.model, deep.tokenizer, classes, template_for(name), seed=7),
                  tmp_path / "ck" / "mmrl-x" / "seed1" / "MultiModalRepresentationLearner", 5, optimizer=torch.optim.AdamW)
    plan = write_plan(tmp_path, datasets=names, backbones=("coop", "kgcoop", "promptsrc", "mmrl"), model="deep.json",
                      train='["table1", "table2"]',
                      checkpoints={"promptsrc": "ck/psrc", "mmrl": "ck/mmrl", "promptsrc_cross": "ck/psrc-x",
                                   "mmrl_cross": "ck/mmrl-x"})
    res = cli("run", plan)
    assert res.exit_code == 0, res.output
    out = tmp_path / "study"
    for b in ("coop", "kgcoop", "promptsrc", "mmrl"):
        unit = "imagenet/shots4_seed1" + ("_rrc0.5-1" if b == "mmrl" else "")
        [record] = [json.loads(line) for line in (out / "runs" / "table2" / b / unit / "results.jsonl").read_text().splitlines()]
        assert record["config"]["classes"] == "all" and record["backbone"] == f"{b}_all"
        assert [t["dataset"] for t in record["cross_dataset"]] == ["oxford_pets", "dtd"]
        assert all(t["test_images"] == 6 and t["fvgpt"] is not None for t in record["cross_dataset"])
        assert record["backbone_provenance"]["method"] == b
        if b in ("promptsrc", "mmrl"):
            assert record["preset"]["preset"]["name"] == f"{b}-cross"
    md = (out / "report" / "report.md").read_text()
    assert md.count("Cross-dataset") >= 4 and "dtd" in md
    again = cli("run", plan)
    assert again.output.startswith("nothing to do"), again.output


@pytest.mark.slow
def test_coop_checkpoints_given_in_the_plan_are_loaded_instead_of_trained(tiny_study):
    from fvgpt_cache.backbones import save_coop_checkpoint
    from fvgpt_cache.store import open_cache

    ctx = torch.randn(4, TINY["text_cfg"]["width"], generator=torch.Generator().manual_seed(0)) * 0.02
    save_coop_checkpoint(tiny_study / "ck" / "oxford_pets" / "seed1", ctx, 10)
    plan = write_plan(tiny_study, checkpoints={"coop": "ck"})
    jobs = build_jobs(load_plan(plan))
    assert [j.id for j in jobs if j.kind in ("backbone", "load")] == ["load/coop/oxford_pets/shots4_seed1"]
    res = cli("run", plan)
    assert res.exit_code == 0, res.output
    prov = open_cache(tiny_study / "study" / "caches" / "oxford_pets" / "shots4_seed1.h5").text_provenance("coop")
    assert prov["source"] == "checkpoint" and prov["checkpoint"].endswith("model.pth.tar-10")
    assert _results(tiny_study / "study") and not (tiny_study / "study" / "backbones").exists()


def test_a_mask_method_writes_each_caches_masks_before_its_extraction(tiny_study):
    """`[data] masks = "gradcam"`: the extract job writes its draw's masks (masks.json records the method) and
    the cache's foreground views come from them; a method the plan cannot run is refused by name."""
    plan = write_plan(tiny_study)
    plan.write_text(plan.read_text().replace('root = "data"', 'root = "data"\nmasks = "gradcam"'))
    res = cli("run", plan)
    assert res.exit_code == 0, res.output
    out = tiny_study / "study"
    folder = out / "masks" / "gradcam" / "oxford_pets" / "shots4_seed1"
    made = json.loads((folder / "masks.json").read_text())
    assert made["settings"]["method"] == "gradcam" and made["complete"]
    from fvgpt_cache.store import open_cache

    prov = open_cache(out / "caches" / "oxford_pets" / "shots4_seed1.h5").provenance
    assert Path(prov["mask_root"]) == folder
    plan.write_text(plan.read_text().replace('masks = "gradcam"', 'masks = "clipseg"'))
    refused = cli("run", plan, "--dry-run", "--no-estimate")
    assert refused.exit_code == 2 and "CLIPSeg needs its weights" in refused.output.replace("\n", " ")
