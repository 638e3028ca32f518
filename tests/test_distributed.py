"""Extraction and `backbone import` on many processes (issue 15).

The fast tests run the ranks of a job as threads of this process that share one key-value store
(`torch.distributed.HashStore`), which exercises everything but the process group: the batch
split, the shards, rank 0's lock and assembly, failures and resumes with another number of
processes. The slow tests start real jobs with torchrun (2 CPU processes, gloo).
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest
import torch.distributed as dist
from conftest import lock_held_elsewhere, write_generic_dataset
from typer.testing import CliRunner

from fvgpt_cache.cli.main import app
from fvgpt_cache.data import generic_dataset
from fvgpt_cache.distributed import Job, JobFailed
from fvgpt_cache.extraction import ExtractionError, ExtractOptions, extract
from fvgpt_cache.passes import grid_batches
from fvgpt_cache.store import CacheError, exclusive_lock, open_cache, partial_path

OPTS = dict(shots=4, seed=1, workers=0, batch_size=4, train_views=3)


def _assert_same_import(one, two, group: str) -> None:
    """An import run by one process and by two wrote the same file, save for when and by how many."""
    a, b = _contents(one), _contents(two)
    assert a.keys() == b.keys()
    for key in a.keys() - {"attrs", "provenance"}:
        assert np.array_equal(a[key], b[key]), key
    pa, pb = open_cache(one).text_provenance(group), open_cache(two).text_provenance(group)
    assert pb.pop("world_sizes") == [2] and pa.pop("created") and pb.pop("created")
    assert pa == pb


def _contents(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        out["attrs"] = {k: v for k, v in f.attrs.items() if k != "provenance"}
        out["provenance"] = json.loads(f.attrs["provenance"])
    return out


def assert_same_cache(reference, path, world_sizes):
    """Equal dataset by dataset; provenance equal apart from the creation time and the recorded world sizes."""
    a, b = _contents(reference), _contents(path)
    pa, pb = a.pop("provenance"), b.pop("provenance")
    assert a.keys() == b.keys()
    for key in a:
        if key == "attrs":
            assert a[key].keys() == b[key].keys() and all(np.array_equal(a[key][k], b[key][k]) for k in a[key])
        else:
            assert np.array_equal(a[key], b[key]), key
    assert pb.pop("world_sizes", None) == world_sizes
    assert "world_sizes" not in pa
    pa.pop("created"), pb.pop("created")
    assert pa == pb


def _shards(out):
    return sorted(out.parent.glob(out.name + ".partial.shard*"))


def run_ranks(world: int, fn, timeout: float = 20.0):
    """fn(job) on `world` threads that share one store, as the ranks of one job; returns (results, errors).

    Threads have no heartbeat: a rank that fails before it joins the pass is noticed after `timeout`."""
    store = dist.HashStore()
    results, errors = [None] * world, [None] * world

    def rank(r):
        try:
            results[r] = fn(Job(rank=r, world_size=world, timeout=timeout, store=store))
        except BaseException as exc:  # noqa: BLE001  (a rank's KeyboardInterrupt too)
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * timeout)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return results, errors


@pytest.fixture()
def dataset(generic_data):
    return generic_dataset(*generic_data)


@pytest.fixture()
def reference(tmp_path, dataset, tiny_model):
    return extract(dataset, tiny_model, tmp_path / "ref.h5", ExtractOptions(**OPTS)).out


def test_batches_are_cut_on_one_grid_whatever_the_processes(tmp_path):
    status = {"train": np.zeros(10, np.uint8), "val": np.zeros(0, np.uint8), "test": np.zeros(5, np.uint8)}
    cut = [(s, r.tolist()) for s, r in grid_batches(status, 4)]
    assert cut == [("train", [0, 1, 2, 3]), ("train", [4, 5, 6, 7]), ("train", [8, 9]), ("test", [0, 1, 2, 3]),
                   ("test", [4])]
    status["train"][[4, 5, 6, 7, 9]] = 1  # a resume: done batches drop out, the others keep their rows
    assert [(s, r.tolist()) for s, r in grid_batches(status, 4)] == [
        ("train", [0, 1, 2, 3]), ("train", [8]), ("test", [0, 1, 2, 3]), ("test", [4])]
    for world in (1, 2, 3, 5):
        taken = [b for r in range(world) for b in grid_batches(status, 4)[r::world]]
        assert sorted((s, tuple(r)) for s, r in taken) == sorted((s, tuple(r)) for s, r in grid_batches(status, 4))


@pytest.mark.slow
def test_two_ranks_write_the_file_of_one_process(tmp_path, dataset, tiny_model, reference):
    out = tmp_path / "two.h5"
    results, errors = run_ranks(2, lambda job: extract(dataset, tiny_model, out, ExtractOptions(**OPTS), job=job))
    assert errors == [None, None]
    assert_same_cache(reference, out, [2])
    assert not partial_path(out).exists() and not _shards(out)
    summary = results[0]
    assert results[1].counts == summary.counts == {"train": 16, "val": 12, "test": 12}
    assert summary.world_size == 2 and [r["rank"] for r in summary.ranks] == [0, 1]
    assert sum(r["rows"] for r in summary.ranks) == 40 and all(r["rows"] > 0 for r in summary.ranks)


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2), (2, 3)])
@pytest.mark.slow
def test_a_job_interrupted_with_n_processes_resumes_with_any_other_n(tmp_path, dataset, tiny_model, reference,
                                                                     first, second):
    out = tmp_path / "c.h5"
    if first == 1:
        with pytest.raises(KeyboardInterrupt):
            extract(dataset, tiny_model, out, ExtractOptions(**OPTS), stop_after_batches=3)
    else:  # rank 1 is interrupted after two batches; the others stop with its reason
        _, errors = run_ranks(first, lambda job: extract(dataset, tiny_model, out, ExtractOptions(**OPTS), job=job,
                                                         stop_after_batches=2 if job.rank == 1 else None))
        assert isinstance(errors[1], KeyboardInterrupt)
        assert all(isinstance(e, JobFailed) and "rank 1 failed: interrupted" in str(e) for e in errors[:1] + errors[2:])
        assert len(_shards(out)) == first, "every rank keeps its finished batches"
    assert not out.exists() and partial_path(out).exists()
    if second == 1:
        summary = extract(dataset, tiny_model, out, ExtractOptions(**OPTS))
    else:
        results, errors = run_ranks(second, lambda job: extract(dataset, tiny_model, out, ExtractOptions(**OPTS), job=job))
        assert errors == [None] * second
        summary = results[0]
    assert summary.resumed_rows >= 8 and summary.resumed_rows % 4 == 0  # whole batches of 4 rows were kept
    assert not partial_path(out).exists() and not _shards(out)
    sizes = [first, second]
    assert_same_cache(reference, out, sizes if max(sizes) > 1 else None)


def test_a_failing_rank_stops_the_others_with_its_error_and_a_rerun_finishes(tmp_path, generic_data, dataset,
                                                                            tiny_model, reference):
    split, images, masks = generic_data
    victim = images / "green_triangle/test_1.jpg"
    original = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    out = tmp_path / "c.h5"
    _, errors = run_ranks(2, lambda job: extract(dataset, tiny_model, out, ExtractOptions(**OPTS), job=job))
    failed = [r for r, e in enumerate(errors) if isinstance(e, ExtractionError)]
    assert len(failed) == 1, errors
    (r,) = failed
    assert f"cannot read image {victim}" in str(errors[r]) and "--bad-image skip" in str(errors[r])
    other = errors[1 - r]
    assert isinstance(other, JobFailed) and str(other).startswith(f"rank {r} failed: cannot read image {victim}")
    assert partial_path(out).exists() and _shards(out) and not out.exists()
    victim.write_bytes(original)
    _, errors = run_ranks(2, lambda job: extract(dataset, tiny_model, out, ExtractOptions(**OPTS), job=job))
    assert errors == [None, None]
    assert_same_cache(reference, out, [2, 2])


def test_a_second_job_on_the_same_output_is_refused_on_every_rank(tmp_path, dataset, tiny_model):
    out = tmp_path / "c.h5"
    with exclusive_lock(out):  # the first job's rank 0
        _, errors = run_ranks(2, lambda job: extract(dataset, tiny_model, out, ExtractOptions(**OPTS), job=job))
    assert all(isinstance(e, CacheError) for e in errors), errors
    assert str(errors[0]) == str(errors[1]) and "already writing" in str(errors[1])
    assert not partial_path(out).exists() and not _shards(out)


def test_ranks_with_other_settings_are_refused(tmp_path, dataset, tiny_model):
    out = tmp_path / "c.h5"
    _, errors = run_ranks(2, lambda job: extract(dataset, tiny_model, out,
                                                 ExtractOptions(**{**OPTS, "seed": 1 + job.rank}), job=job))
    assert all(isinstance(e, ValueError) and "rank 1 computed other settings" in str(e) for e in errors), errors


def test_a_shard_of_other_settings_or_damaged_is_refused_by_name(tmp_path, dataset, tiny_model):
    out = tmp_path / "c.h5"
    _, errors = run_ranks(2, lambda job: extract(dataset, tiny_model, out, ExtractOptions(**OPTS), job=job,
                                                 stop_after_batches=1 if job.rank == 0 else None))
    shard = _shards(out)[-1]
    with h5py.File(shard, "r+") as f:
        f.attrs["fingerprint"] = "another run"
    with pytest.raises(CacheError, match=re.escape(str(shard)) + ".*other settings"):
        extract(dataset, tiny_model, out, ExtractOptions(**OPTS))
    shard.write_bytes(b"garbage")
    with pytest.raises(CacheError, match=re.escape(str(shard)) + ".*delete it"):
        extract(dataset, tiny_model, out, ExtractOptions(**OPTS))
    extract(dataset, tiny_model, out, ExtractOptions(**OPTS, resume=False))
    assert not _shards(out)


def test_uncommitted_rows_of_a_shard_are_not_taken(tmp_path, dataset, tiny_model, reference):
    """A rank killed between writing a batch and recording it: that batch is recomputed."""
    out = tmp_path / "c.h5"
    run_ranks(2, lambda job: extract(dataset, tiny_model, out, ExtractOptions(**OPTS), job=job,
                                     stop_after_batches=2 if job.rank == 1 else None))
    shard = [s for s in _shards(out) if s.name.endswith("shard1")][0]
    with h5py.File(shard, "r+") as f:
        committed = json.loads(f.attrs["committed"])
        key = "image/clip/train/full"
        assert committed[key] == 8
        f.attrs["committed"] = json.dumps({k: v - 4 if k.startswith(("image/clip/train", "samples/train",
                                                                          "progress/train")) else v
                                           for k, v in committed.items()})
        f["data/" + key][4:8] = 0  # the second batch's features, never recorded
    extract(dataset, tiny_model, out, ExtractOptions(**OPTS))
    assert_same_cache(reference, out, [2, 1])


@pytest.mark.slow
def test_backbone_import_on_two_ranks_writes_the_groups_of_one_process(tmp_path, tmp_path_factory, monkeypatch):
    import shutil

    import fvgpt_cache.backbones.image_pass as image_pass

    from test_import import _base_names, _config, _save, mmrl_checkpoint

    from fvgpt_cache.backbones import ImportOptions, import_backbone
    from fvgpt_cache.models import load_clip

    deep = load_clip(str(_config(tmp_path_factory, "deep-clip")), "none", seed=0)
    ds = generic_dataset(*write_generic_dataset(tmp_path / "data", per_class=(4, 2, 2)))
    one = extract(ds, deep, tmp_path / "one.h5", ExtractOptions(**OPTS)).out
    two = shutil.copy(one, tmp_path / "two.h5")
    c = open_cache(one)
    ckpt = _save(mmrl_checkpoint(deep.model, deep.tokenizer, _base_names(c), c.text_attrs("clip")["template"]),
                 tmp_path / "ck")
    options = ImportOptions(workers=0, batch_size=3)
    import_backbone(one, "mmrl", ckpt, options, loaded=deep)
    # reading a Dassl checkpoint allow-lists its pickled classes in torch's process-wide state for a
    # moment; ranks are processes under torchrun, here they are threads and take turns
    one_at_a_time, load = threading.Lock(), image_pass.load_state_dict

    def locked(*args, **kwargs):
        with one_at_a_time:
            return load(*args, **kwargs)

    monkeypatch.setattr(image_pass, "load_state_dict", locked)
    results, errors = run_ranks(2, lambda job: import_backbone(two, "mmrl", ckpt, options, loaded=deep, job=job))
    assert errors == [None, None]
    assert results[0].world_size == 2 and sum(r["rows"] for r in results[0].ranks) == 16 + 8 + 8
    _assert_same_import(one, two, "mmrl")


# ---------------------------------------------------------------------------------- torchrun (slow)

def _torchrun(nproc: int, *args, timeout: float = 240, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, **popen)


@pytest.fixture()
def job_args(tmp_path, tiny_config):
    split, images, masks = write_generic_dataset(tmp_path / "data")
    return ["--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
            "--pretrained", "none", "--shots", "4", "--train-views", "3", "--batch-size", "4", "--workers", "0",
            "--dist-timeout", "60", "--device", "cpu"]


def _cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res


def _cli_with_threads(threads: int, *args):
    """The command in this process with `threads` intra-op threads (torchrun's ranks get one each)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _cli(*args)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_torchrun_two_processes_write_the_file_of_one_process(tmp_path, job_args):
    """Every dataset equal, `/text/clip` included, although the single process runs on more threads than
    a rank (text is encoded on one thread in every mode: `device.one_cpu_thread`)."""
    ref = tmp_path / "ref.h5"
    res = _cli_with_threads(max(2, os.cpu_count() or 1), "extract", *job_args, "--out", ref)
    assert res.exit_code == 0, res.output
    out = tmp_path / "two.h5"
    res = _torchrun(2, "-m", "fvgpt_cache.cli.main", "extract", *job_args, "--out", out)
    assert res.returncode == 0, res.stderr + res.stdout
    assert_same_cache(ref, out, [2])
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:  # said again: the text features too
        assert np.array_equal(a["text/clip"][()], b["text/clip"][()])
    assert re.search(r"2 processes: rank 0 [\d.]+ img/s \(\d+ images\), rank 1 [\d.]+ img/s \(\d+ images\); "
                     r"total [\d.]+ img/s", res.stdout), res.stdout
    assert res.stdout.count("wrote ") == 1, "only rank 0 reports"
    assert not partial_path(out).exists() and not _shards(out)


SLOW_RANKS = """
import os, sys, time
import fvgpt_cache.extraction as extraction

encode, calls = extraction._encode_batch, []

def slow(*args, **kwargs):  # a slow encoder; rank 1 stops in its second batch, where the test kills it
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        print("rank 1 pid", os.getpid(), "in its second batch", flush=True)
        while True:
            time.sleep(1)
    time.sleep(0.3)
    return encode(*args, **kwargs)

extraction._encode_batch = slow
from fvgpt_cache.cli.main import app
app(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_torchrun_rank_killed_mid_run_is_finished_by_one_process(tmp_path, job_args):
    ref = tmp_path / "ref.h5"
    assert _cli("extract", *job_args, "--out", ref).exit_code == 0
    script = tmp_path / "slow_ranks.py"
    script.write_text(SLOW_RANKS)
    out = tmp_path / "c.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), "extract",
           *map(str, job_args), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen, killed = [], None
    try:
        for line in proc.stdout:
            seen.append(line)
            m = re.match(r"rank 1 pid (\d+) in its second batch", line)  # its first batch is in its shard
            if m:
                killed = int(m.group(1))
                os.kill(killed, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert killed and proc.returncode != 0, "".join(seen)
    assert partial_path(out).exists() and not out.exists() and _shards(out)
    res = _cli("extract", *job_args, "--out", out)
    assert res.exit_code == 0, res.output
    done = int(re.search(r"resumed: (\d+) rows", res.output).group(1))
    assert 8 <= done < 40, res.output  # at least a batch of each rank, not rank 1's second one
    assert_same_cache(ref, out, [2, 1])
    assert not _shards(out)


@pytest.mark.slow
def test_torchrun_corrupt_image_fails_the_job_promptly_with_the_file_named(tmp_path, job_args):
    images = job_args[job_args.index("--image-root") + 1]
    victim = images / "green_triangle/test_1.jpg"
    victim.write_bytes(b"not a jpeg")
    out = tmp_path / "c.h5"
    res = _torchrun(2, "-m", "fvgpt_cache.cli.main", "extract", *job_args, "--bad-image", "error", "--out", out,
                    timeout=120)
    assert res.returncode != 0
    text = res.stderr + res.stdout
    own = re.findall(rf"error: cannot read image {re.escape(str(victim))}", text)
    reported = re.findall(rf"error: rank (\d) failed: cannot read image {re.escape(str(victim))}", text)
    assert len(own) == 1 and len(reported) == 1, text
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d)", text, re.S)  # torchrun's summary names the failing rank
    assert root and root.group(1) == reported[0], text
    assert partial_path(out).exists() and not out.exists(), "finished batches are kept"


@pytest.mark.slow
def test_torchrun_resumes_a_single_process_run_and_refuses_a_second_job(tmp_path, job_args, tiny_config):
    ref = tmp_path / "ref.h5"
    assert _cli("extract", *job_args, "--out", ref).exit_code == 0
    out = tmp_path / "c.h5"
    split, images, masks = (job_args[job_args.index(k) + 1] for k in ("--split-file", "--image-root", "--mask-root"))
    from fvgpt_cache.models import load_clip

    with pytest.raises(KeyboardInterrupt):
        extract(generic_dataset(split, images, masks), load_clip(str(tiny_config), "none"), out,
                ExtractOptions(**OPTS), stop_after_batches=3)
    with exclusive_lock(out):  # another job (or process) writes this output
        res = _torchrun(2, "-m", "fvgpt_cache.cli.main", "extract", *job_args, "--out", out, timeout=120)
    assert res.returncode != 0
    refused = re.findall(r"error: another process is already writing .*held by PID (\d+)", res.stderr)
    assert refused == [str(os.getpid())] * 2, res.stderr
    assert not _shards(out)
    res = _torchrun(2, "-m", "fvgpt_cache.cli.main", "extract", *job_args, "--out", out)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "resumed: 12 rows were already done" in res.stdout
    assert_same_cache(ref, out, [1, 2])


@pytest.mark.slow
def test_torchrun_backbone_import_writes_the_groups_of_one_process(tmp_path, tmp_path_factory):
    import shutil

    from test_import import _base_names, _config, _save, promptsrc_checkpoint

    from fvgpt_cache.models import load_clip

    config = _config(tmp_path_factory, "deep-clip")
    split, images, masks = write_generic_dataset(tmp_path / "data", per_class=(4, 2, 2))
    one = tmp_path / "one.h5"
    res = _cli("extract", "--split-file", split, "--image-root", images, "--mask-root", masks, "--model", config,
               "--pretrained", "none", "--shots", "4", "--train-views", "3", "--workers", "0", "--out", one)
    assert res.exit_code == 0, res.output
    two = shutil.copy(one, tmp_path / "two.h5")
    deep = load_clip(str(config), "none")
    ckpt = _save(promptsrc_checkpoint(deep.model, deep.tokenizer, _base_names(open_cache(one))), tmp_path / "ck")
    args = ["--method", "promptsrc", "--checkpoint", ckpt, "--workers", "0", "--batch-size", "3", "--device", "cpu"]
    res = _cli_with_threads(max(2, os.cpu_count() or 1), "backbone", "import", one, *args)
    assert res.exit_code == 0, res.output
    res = _torchrun(2, "-m", "fvgpt_cache.cli.main", "backbone", "import", two, *args)
    assert res.returncode == 0, res.stderr + res.stdout
    assert re.search(r"2 processes: rank 0 .* rank 1 .*; total [\d.]+ img/s", res.stdout), res.stdout
    _assert_same_import(one, two, "promptsrc")
    assert not list(tmp_path.glob("two.h5.promptsrc.partial*"))


def test_a_lock_held_from_another_machine_names_its_host(tmp_path):
    """On a shared file system rank 0 of another job may run on another node: the refusal names it."""
    out = tmp_path / "c.h5"
    with lock_held_elsewhere(out, "gpu-node-07") as holder:
        with pytest.raises(CacheError, match=f"held by PID {holder.pid} on gpu-node-07\\)"):
            with exclusive_lock(out):
                pass
