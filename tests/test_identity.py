"""A cache has an identity: results are keyed by the content they were computed from, never by a path.

Covers: content fingerprints and what a run's inputs are; grid resume that sets stale records
aside; the grid's lock; backbone folders that never collide; the report's refusal to pool runs of
different content; degenerate features named; missing images and weights reported up front.
"""
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import h5py
import numpy as np
import pytest
from conftest import lock_held_elsewhere, write_generic_dataset
from typer.testing import CliRunner

from fvgpt_cache.backbones import claim_backbone_dir, default_backbone_dir
from fvgpt_cache.cli.main import app
from fvgpt_cache.data import generic_dataset
from fvgpt_cache.extraction import ExtractionError, ExtractOptions, extract
from fvgpt_cache.feature_checks import image_warnings, text_warnings, token_warnings
from fvgpt_cache.grids import expand, parse_params, run_grid
from fvgpt_cache.records import RunRecord
from fvgpt_cache.reports import aggregate, load_records, to_markdown
from fvgpt_cache.runs import run_training
from fvgpt_cache.store import CacheError, open_cache, partial_path, write_text_group
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig

SMALL = dict(num_classes=6, shots=8, views=2, dim=32, test_per_class=10)
FAST = TrainConfig(epochs=2)
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


# --- fingerprints -----------------------------------------------------------------------------

def test_fingerprint_follows_content_not_path(tmp_path):
    a = write_feature_cache(tmp_path / "a.h5", **SMALL)
    b = tmp_path / "elsewhere" / "b.h5"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    other = write_feature_cache(tmp_path / "c.h5", **SMALL, seed=1)
    ca, cb, cc = open_cache(a), open_cache(b), open_cache(other)
    assert len(ca.fingerprint) == 64 and ca.fingerprint == cb.fingerprint != cc.fingerprint
    assert ca.input_fingerprint("synthetic_bb") == cb.input_fingerprint("synthetic_bb")
    # the stored digests are the digests of the bytes: recomputing them from scratch agrees
    with h5py.File(a, "r") as f:
        stored = {k: f[k].attrs["sha256"] for k in ("text/clip", "image/clip/train/full", "samples/test/label")}
    from fvgpt_cache.store import _dataset_digest
    with h5py.File(a, "r") as f:
        assert {k: _dataset_digest(f[k]) for k in stored} == stored


def test_a_run_reads_its_backbone_not_the_others(tmp_path):
    path = write_feature_cache(tmp_path / "a.h5", **SMALL)
    cache = open_cache(path)
    before_bb, before_clip, whole = (cache.input_fingerprint("synthetic_bb"), cache.input_fingerprint("clip"),
                                     cache.fingerprint)
    write_text_group(path, "other_bb", np.random.default_rng(0).normal(size=(6, 32)), {"method": "test"})
    cache = open_cache(path)
    assert cache.fingerprint != whole, "the file's content changed"
    assert cache.input_fingerprint("synthetic_bb") == before_bb, "another backbone is not an input of this one's runs"
    assert cache.input_fingerprint("clip") == before_clip
    write_text_group(path, "synthetic_bb", np.random.default_rng(1).normal(size=(6, 32)), {"method": "test"})
    assert open_cache(path).input_fingerprint("synthetic_bb") != before_bb
    assert open_cache(path).input_fingerprint("clip") == before_clip


def test_a_cache_without_digests_still_has_a_fingerprint(tmp_path):
    """Caches written before digests existed: the fingerprint is computed from the bytes, equal to a sealed one's."""
    path = write_feature_cache(tmp_path / "a.h5", **SMALL)
    sealed = open_cache(path).fingerprint
    old = tmp_path / "old.h5"
    shutil.copyfile(path, old)
    with h5py.File(old, "r+") as f:
        del f.attrs["content_sha256"]
        f.visititems(lambda k, v: v.attrs.__delitem__("sha256") if isinstance(v, h5py.Dataset) else None)
    assert open_cache(old).fingerprint == sealed


def test_extracted_cache_is_sealed_and_inspect_shows_it(tmp_path, tiny_model, generic_data):
    out = tmp_path / "c.h5"
    extract(generic_dataset(*generic_data), tiny_model, out,
            ExtractOptions(shots=2, workers=0, batch_size=8, train_views=2, device="cpu"))
    with h5py.File(out, "r") as f:
        assert all("sha256" in f[k].attrs for k in ("text/clip", "image/clip/train/fg", "samples/train/box"))
        assert "content_sha256" in f.attrs
    res = _run("inspect", out)
    assert res.exit_code == 0 and open_cache(out).fingerprint in res.output
    assert open_cache(out).verify() == []
    with h5py.File(out, "r+") as f:  # another tool changes a value in place
        f["image/clip/test/full"][0, 0, 0] += 1
    assert open_cache(out).verify() == ["image/clip/test/full"]
    res = _run("inspect", out, "--verify")
    assert "no longer match their stored digest" in res.output and "image/clip/test/full" in res.output


# --- grids: stale records, resume by content, one writer ---------------------------------------

def test_grid_retrains_when_the_cache_at_its_path_was_replaced(tmp_path):
    """The issue's silent path: a cache replaced at the same path made the grid say "all done"."""
    path = tmp_path / "c.h5"
    write_feature_cache(path, **SMALL)
    runs = expand([path], [1], parse_params(["lambda_d=1,10"]), FAST)
    first = run_grid(runs, tmp_path / "g")
    assert len(first) == 2 and run_grid(expand([path], [1], parse_params(["lambda_d=1,10"]), FAST), tmp_path / "g") == []
    write_feature_cache(path, **SMALL, seed=7)  # another cache under the same name
    messages = []
    again = run_grid(expand([path], [1], parse_params(["lambda_d=1,10"]), FAST), tmp_path / "g", log=messages.append)
    assert len(again) == 2, "the new content is trained, not taken for done"
    assert any("set aside 2 stale record(s)" in m and "cache content changed" in m for m in messages), messages
    stale = list((tmp_path / "g" / "stale").glob("*.jsonl"))
    assert len(stale) == 1
    kept = [json.loads(x) for x in (tmp_path / "g" / "results.jsonl").read_text().splitlines()]
    aside = [json.loads(x) for x in stale[0].read_text().splitlines()]
    assert {r["run_id"] for r in kept} == {r.run_id for r in again}
    assert {r["run_id"] for r in aside} == {r.run_id for r in first}, "stale records are kept, never deleted"
    assert all("cache content changed" in r["set_aside"] for r in aside)
    assert len(load_records([tmp_path / "g"])) == 2, "report reads the results, not the set-aside records"


def test_same_content_elsewhere_counts_as_done_and_other_runs_in_the_folder_are_kept(tmp_path):
    a = write_feature_cache(tmp_path / "a.h5", **SMALL)
    runs = expand([a], [1], {}, FAST)
    run_grid(runs, tmp_path / "g")
    moved = tmp_path / "moved" / "a.h5"
    moved.parent.mkdir()
    shutil.copyfile(a, moved)
    assert run_grid(expand([moved], [1], {}, FAST), tmp_path / "g") == [], "keyed by content, not path"
    other = write_feature_cache(tmp_path / "b.h5", **SMALL, seed=3)
    run_grid(expand([other], [1], {}, FAST), tmp_path / "g")
    assert len((tmp_path / "g" / "results.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "g" / "stale").exists()


def test_no_resume_sets_everything_aside(tmp_path):
    a = write_feature_cache(tmp_path / "a.h5", **SMALL)
    runs = expand([a], [1], {}, FAST)
    run_grid(runs, tmp_path / "g")
    assert len(run_grid(runs, tmp_path / "g", resume=False)) == 1
    assert len(next((tmp_path / "g" / "stale").glob("*.jsonl")).read_text().splitlines()) == 1


def test_a_second_grid_on_the_same_out_is_refused_with_the_holders_pid(tmp_path):
    a = write_feature_cache(tmp_path / "a.h5", **SMALL)
    out = tmp_path / "g"
    out.mkdir()
    with lock_held_elsewhere(out / "grid") as holder:
        with pytest.raises(CacheError, match=f"held by PID {holder.pid}"):
            run_grid(expand([a], [1], {}, FAST), out)
        res = _run("grid", a, "--set", "epochs=2", "--out", out)
        assert res.exit_code == 2 and f"PID {holder.pid}" in res.output
    assert len(run_grid(expand([a], [1], {}, FAST), out)) == 1, "the lock dies with its holder"


@pytest.mark.slow
def test_a_grid_killed_with_sigkill_leaves_the_folder_to_the_next_grid(tmp_path):
    a = write_feature_cache(tmp_path / "a.h5", num_classes=6, shots=8, views=2, dim=32, test_per_class=10)
    out = tmp_path / "g"
    code = ("import sys, time\nfrom fvgpt_cache.grids import expand, run_grid\nfrom fvgpt_cache.training import TrainConfig\n"
            "runs = expand([sys.argv[1]], list(range(1, 40)), {}, TrainConfig(epochs=50))\n"
            "run_grid(runs, sys.argv[2], progress=lambda d, t: print('progress', d, flush=True))\n")
    first = subprocess.Popen([sys.executable, "-c", code, str(a), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().startswith("progress")
        with pytest.raises(CacheError, match=f"PID {first.pid}"):
            run_grid(expand([a], [1], {}, FAST), out)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert len(run_grid(expand([a], [1], {}, FAST), out)) == 1


# --- single runs ------------------------------------------------------------------------------

def test_train_refuses_an_out_folder_of_another_run(tmp_path):
    a = write_feature_cache(tmp_path / "a.h5", **SMALL)
    run_training(a, TrainConfig(epochs=2), tmp_path / "run")
    run_training(a, TrainConfig(epochs=2), tmp_path / "run")  # the same run may rewrite its own folder
    before = (tmp_path / "run" / "results.json").read_text()
    with pytest.raises(ValueError, match="already holds the results of another run"):
        run_training(a, TrainConfig(epochs=2, lambda_d=1.0), tmp_path / "run")
    assert (tmp_path / "run" / "results.json").read_text() == before


def test_default_run_folders_differ_for_different_content(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folder is under ./cache/runs
    a = tmp_path / "c.h5"
    write_feature_cache(a, **SMALL)
    first = run_training(a, TrainConfig(epochs=2))
    write_feature_cache(a, **SMALL, seed=5)
    second = run_training(a, TrainConfig(epochs=2))
    assert first.run_id != second.run_id and first.run_dir != second.run_dir
    assert first.inputs[0].path == second.inputs[0].path
    assert json.loads((tmp_path / first.run_dir / "results.json").read_text())["run_id"] == first.run_id


# --- backbone folders -------------------------------------------------------------------------

def test_two_caches_of_one_file_name_never_share_a_backbone_folder(tmp_path):
    a = write_feature_cache(tmp_path / "m1" / "shots16_seed1.h5", **SMALL)
    b = write_feature_cache(tmp_path / "m2" / "shots16_seed1.h5", **SMALL, seed=2)
    ca, cb = open_cache(a), open_cache(b)
    settings = {"lr": 0.0035}
    da, db = default_backbone_dir(ca, "coop", 1, settings), default_backbone_dir(cb, "coop", 1, settings)
    assert da != db
    assert default_backbone_dir(ca, "coop", 1, {"lr": 0.002}) != da, "other settings, other folder"
    assert default_backbone_dir(ca, "coop", 1, settings) == da, "deterministic"


@pytest.mark.slow
def test_a_folder_holding_another_caches_backbone_is_refused_unless_forced(tmp_path, tiny_model, generic_data):
    out_a, out_b = tmp_path / "a" / "shots2_seed1.h5", tmp_path / "b" / "shots2_seed1.h5"
    ds = generic_dataset(*generic_data)
    extract(ds, tiny_model, out_a, ExtractOptions(shots=2, workers=0, batch_size=8, train_views=1, device="cpu"))
    extract(ds, tiny_model, out_b, ExtractOptions(shots=3, workers=0, batch_size=8, train_views=1, device="cpu"))
    folder = tmp_path / "coop"
    res = _run("backbone", "train", out_a, "--epochs", "2", "--out", folder, "--device", "cpu")
    assert res.exit_code == 0, res.output
    checkpoint = folder / "prompt_learner" / "model.pth.tar-2"
    before = checkpoint.read_bytes()
    res = _run("backbone", "train", out_b, "--epochs", "2", "--out", folder, "--device", "cpu")
    assert res.exit_code == 2 and str(out_a) in res.output and str(out_b) in res.output
    assert checkpoint.read_bytes() == before, "the first model is intact"
    assert "coop" not in open_cache(out_b).text_groups, "nothing was written into the second cache"
    res = _run("backbone", "train", out_b, "--epochs", "2", "--out", folder, "--device", "cpu", "--force")
    assert res.exit_code == 0, res.output
    with pytest.raises(CacheError, match="unknown origin"):
        (tmp_path / "bare" / "prompt_learner").mkdir(parents=True)
        (tmp_path / "bare" / "prompt_learner" / "model.pth.tar-3").write_bytes(b"x")
        claim_backbone_dir(tmp_path / "bare", open_cache(out_a))


# --- reports ----------------------------------------------------------------------------------

def test_report_refuses_to_pool_two_contents_under_one_seed(tmp_path):
    a, b = tmp_path / "x" / "c.h5", tmp_path / "y" / "c.h5"
    write_feature_cache(a, **SMALL)
    write_feature_cache(b, **SMALL, seed=9)
    run_grid(expand([a], [1], {}, FAST), tmp_path / "g1")
    run_grid(expand([b], [1], {}, FAST), tmp_path / "g2")
    records = load_records([tmp_path / "g1", tmp_path / "g2"])
    assert len(records) == 2
    with pytest.raises(ValueError, match="seed 1 .* different content .* pooled under one name"):
        aggregate(records)
    res = _run("report", tmp_path / "g1", tmp_path / "g2")
    assert res.exit_code == 2 and "different content" in res.output


def test_tables_print_seed_counts_and_a_zero_spread(tmp_path):
    a = write_feature_cache(tmp_path / "c.h5", **SMALL)
    b = write_feature_cache(tmp_path / "d.h5", **SMALL, seed=4)
    records = run_grid(expand([a], [1], {}, FAST), tmp_path / "g")
    rec = records[0]
    twin = RunRecord.from_json(rec.to_json()).replace(  # a second seed with the very same numbers: spread 0
        seed=2, run_id="other", inputs=[replace(rec.inputs[0], fingerprint=open_cache(b).input_fingerprint(rec.backbone))])
    md = to_markdown(aggregate([rec, twin]))
    header, *rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert header.split("|")[-2].strip() == "Seeds"
    assert rows[0].split("|")[-2].strip() == "2"
    assert "± 0.00" in md


# --- degenerate features ----------------------------------------------------------------------

def test_feature_checks_by_hand():
    t = np.eye(4, 8)
    assert text_warnings(t, list("abcd")) == []
    t[3] = t[2] + 1e-3 * np.eye(8)[5]  # class d is class c
    (warning,) = text_warnings(t, list("abcd"))
    assert "1 pair(s)" in warning and "'c'/'d'" in warning
    rank = text_warnings(np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0.0]]), list("abc"))
    assert len(rank) == 1 and "span only 2 dimension(s)" in rank[0]
    assert image_warnings(np.ones((5, 2, 4)), "x") and not image_warnings(np.eye(4), "x")
    assert token_warnings(np.array([[1, 2], [1, 3], [1, 2]]), ["a", "b", "c"])[0].count("'a'/'c'") == 1
    assert token_warnings(np.array([[1, 2], [1, 2]]), ["a", "a"]) == []  # the same name twice is not ambiguous


@pytest.mark.slow
def test_identical_text_features_warn_in_extract_inspect_and_train(tmp_path, tiny_model, generic_data):
    import torch

    loaded = tiny_model
    original = loaded.model.encode_text
    loaded.model.encode_text = lambda tokens, **kw: original(torch.zeros_like(tokens[:1])).expand(len(tokens), -1)
    try:
        out = tmp_path / "same.h5"
        summary = extract(generic_dataset(*generic_data), loaded, out,
                          ExtractOptions(shots=2, workers=0, batch_size=8, train_views=1, device="cpu"))
    finally:
        loaded.model.encode_text = original
    assert any("identical text features" in w for w in summary.warnings)
    res = _run("inspect", out)
    assert "identical text features" in res.output.replace("\n", " ")
    res = _run("train", out, "--backbone", "clip", "--epochs", "2", "--device", "cpu", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "identical text features" in res.output.replace("\n", " ")


# --- errors up front --------------------------------------------------------------------------

def test_a_missing_image_is_reported_before_any_batch_and_leaves_no_partial(tmp_path, tiny_model):
    split_file, images, masks = write_generic_dataset(tmp_path / "data")
    split = json.loads(split_file.read_text())
    split["test"][1][0] = "red_circle/tset_1.jpg"  # a typo in the split file
    split_file.write_text(json.dumps(split))
    out = tmp_path / "c.h5"
    calls = []
    with pytest.raises(ExtractionError, match=r"1 image\(s\) of the split are not under .*tset_1.jpg.*--bad-image skip"):
        extract(generic_dataset(split_file, images, masks), tiny_model, out,
                ExtractOptions(shots=0, workers=0, batch_size=4, train_views=1, device="cpu"),
                progress=lambda *a: calls.append(a))
    assert calls == [] and not out.exists() and not partial_path(out).exists()
    summary = extract(generic_dataset(split_file, images, masks), tiny_model, out,
                      ExtractOptions(shots=0, workers=0, batch_size=4, train_views=1, device="cpu", bad_image="skip",
                                     missing_mask="full"))
    assert [s["path"] for s in summary.skipped["test"]] == ["red_circle/tset_1.jpg"]


def test_a_mistyped_weights_file_says_not_found(tmp_path, tiny_config, generic_data):
    split_file, images, masks = generic_data
    res = _run("extract", "--split-file", split_file, "--image-root", images, "--model", tiny_config,
               "--pretrained", tmp_path / "world-clp.pt")
    assert res.exit_code == 2
    assert "weights file not found" in res.output and "world-clp.pt" in res.output


def test_the_smoke_demo_never_replaces_the_world_demo(tmp_path, tiny_model, generic_data):
    from fvgpt_cache.demo import run_smoke_demo

    real = tmp_path / "demo" / "world-clean.h5"
    extract(generic_dataset(*generic_data), tiny_model, real,
            ExtractOptions(shots=1, workers=0, batch_size=8, train_views=1, device="cpu"))
    with h5py.File(real, "r+") as f:  # make it look like a cache of the real (pretrained) world model
        prov = json.loads(f.attrs["provenance"])
        f.attrs["provenance"] = json.dumps({**prov, "random_init": False})
    before = real.read_bytes()
    with pytest.raises(ValueError, match="holds the world demo's caches"):
        run_smoke_demo(tmp_path / "demo")
    assert real.read_bytes() == before


def test_an_added_mask_source_is_an_input_only_of_the_runs_that_use_it(tmp_path):
    from fvgpt_cache.store import fg_source_key, seal

    path = write_feature_cache(tmp_path / "a.h5", **SMALL)
    before = open_cache(path).input_fingerprint("synthetic_bb")
    with h5py.File(path, "r+") as f:
        for split in ("train", "test"):
            n, v = f[f"samples/{split}/area"].shape
            f.create_dataset(fg_source_key("gradcam", split, "area"), data=np.full((n, v), 0.5, dtype=np.float32))
        seal(f)
    cache = open_cache(path)
    assert cache.input_fingerprint("synthetic_bb") == before, "runs on the extracted masks did not read the new source"
    assert cache.input_fingerprint("synthetic_bb", "gradcam") != before


def test_evaluation_caches_are_inputs_of_a_run(tmp_path):
    """A run's id covers its evaluation caches: runs expanded without them are keyed anew by `run_grid`."""
    a = write_feature_cache(tmp_path / "a.h5", **SMALL)
    b = write_feature_cache(tmp_path / "b.h5", **SMALL, seed=3)
    plain = expand([a], [1], {}, FAST)
    keyed = expand([a], [1], {}, FAST, eval_caches=[b])
    assert plain[0].run_id != keyed[0].run_id
    (rec,) = run_grid(plain, tmp_path / "g", eval_caches=[b])
    assert rec.run_id == keyed[0].run_id and [i.role for i in rec.inputs] == ["train", "eval"]
    assert run_grid(keyed, tmp_path / "g", eval_caches=[b]) == [], "the same run, done"
