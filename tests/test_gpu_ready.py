"""What a CUDA machine would break, checked on the CPU: models left where the caller had them, no host
syncs in the engine's step, the fused optimiser kernels' fallbacks, the engine's float32 numerics."""
import copy
import json
import os

import pytest
import torch

from fvgpt_cache.device import module_device, moved_to
from fvgpt_cache.engine import Group, TERMS, kernels
from fvgpt_cache.store import open_cache
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig, prepare
from test_backbones import toy_cache  # noqa: F401  (its toy cache with a CLIP model behind it, as a fixture here)

SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = write_feature_cache(tmp_path_factory.mktemp("g") / "g.h5", num_classes=5, shots=6, views=3, dim=24,
                               test_per_class=3)
    return prepare(open_cache(path), TrainConfig())


class SyncCounter:
    """Counts the Tensor methods that copy a value to the host (on CUDA: wait for the device)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


def test_moved_to_puts_the_module_back_even_after_an_error():
    lin = torch.nn.Linear(2, 2)
    seen = []
    original = lin.to

    def spy(*args, **kwargs):
        seen.append(torch.device(args[0]))
        return original(*args, **kwargs)
    lin.to = spy
    with pytest.raises(KeyError):
        with moved_to(lin, torch.device("cpu")):
            raise KeyError("boom")
    assert seen == [torch.device("cpu"), torch.device("cpu")] and module_device(lin) == torch.device("cpu")


def record_moves(monkeypatch, model) -> list[str]:
    """The devices `model.to(…)` is called with from now on, in order (a spy on its class's `to`)."""
    moves = []
    original = type(model).to

    def spy(self, *args, **kwargs):
        if self is model:
            moves.append(str(args[0]))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(type(model), "to", spy)
    return moves


def test_extraction_moves_the_callers_model_to_its_device_and_back(tmp_path, generic_data, tiny_model, monkeypatch):
    """`extract` runs the model on the options' device and leaves it where it was: the spy sees the move
    there and the move back, in that order (on a GPU machine the first is CUDA, see the cuda test below)."""
    from fvgpt_cache.data import generic_dataset
    from fvgpt_cache.extraction import ExtractOptions, extract

    ds = generic_dataset(*generic_data)
    moves = record_moves(monkeypatch, tiny_model.model)
    extract(ds, tiny_model, tmp_path / "c.h5", ExtractOptions(shots=2, train_views=2, workers=0, batch_size=8))
    assert moves == ["cpu", "cpu"]


@pytest.mark.cuda
def test_cuda_extraction_leaves_a_cpu_model_on_the_cpu(tmp_path, generic_data, tiny_model):
    from fvgpt_cache.data import generic_dataset
    from fvgpt_cache.extraction import ExtractOptions, extract

    ds = generic_dataset(*generic_data)
    extract(ds, tiny_model, tmp_path / "c.h5", ExtractOptions(shots=2, train_views=2, workers=0, device="cuda"))
    assert module_device(tiny_model.model).type == "cpu"


def test_the_engine_step_never_copies_to_the_host(small_data, monkeypatch):
    """step_losses and optimizer_step, with some configurations inactive, call no .item()/.tolist()/float()…"""
    cfgs = [TrainConfig(seed=1), TrainConfig(seed=2, optimizer="adamw", lr=0.001, tau=1.5),
            TrainConfig(seed=3, lr=0.01, gate_hidden=8)]
    g = Group(small_data, cfgs, torch.device("cpu"))
    g.prepare()
    g._optimizer_setup()
    g.set_lr([c.lr for c in cfgs])
    rows = torch.randint(0, len(g.table) // len(g.variants), (len(cfgs), 4), generator=torch.Generator().manual_seed(0))
    weight = torch.full((len(cfgs), 4), 0.25)
    counter = SyncCounter(monkeypatch)
    out = g.step_losses(rows, weight)
    g.optimizer_step([1.0, 0.0, 1.0])
    g.optimizer_step(None)
    monkeypatch.undo()
    assert counter.calls == [] and out.shape == (len(TERMS), len(cfgs))


@pytest.mark.parametrize("backward", ["manual", "autograd"])
def test_a_step_with_a_registered_loss_term_never_copies_to_the_host(small_data, monkeypatch, backward):
    """The same for a group that weights a registered loss term (autograd on the stacked tensors), both paths."""
    from fvgpt_cache import register_loss_term, unregister_loss_term
    from fvgpt_cache.training import config_with

    register_loss_term("sync_probe", lambda t: t.log_q.exp().square().sum(-1), help="a test term")
    try:
        cfgs = [TrainConfig(seed=1), config_with(TrainConfig(seed=2), lambda_sync_probe=0.5)]
        g = Group(small_data, cfgs, torch.device("cpu"), backward=backward)
        g.prepare()
        rows = torch.randint(0, len(g.table) // len(g.variants), (2, 4), generator=torch.Generator().manual_seed(0))
        counter = SyncCounter(monkeypatch)
        out = g.step_losses(rows, torch.full((2, 4), 0.25))
        monkeypatch.undo()
        assert counter.calls == [] and out.shape == (len(TERMS) + 1, 2)
    finally:
        unregister_loss_term("sync_probe")


def test_host_copies_per_epoch_do_not_grow_with_the_steps(small_data, monkeypatch):
    """The training loop copies to the host once per epoch (history), never per step: the same count for
    a batch size that makes 1 step per epoch and one that makes many."""
    counts = []
    for batch in (32, 2):
        cfgs = [TrainConfig(seed=1, epochs=2, batch_size=batch), TrainConfig(seed=2, epochs=2, batch_size=batch,
                                                                             data_fraction=0.5)]
        g = Group(small_data, cfgs, torch.device("cpu"))
        g.prepare()  # the statistics' one-off table is not part of the loop
        monkeypatch.setattr(Group, "prepare", lambda self: None)
        counter = SyncCounter(monkeypatch)
        g.train()
        monkeypatch.undo()
        counts.append(len([c for c in counter.calls if c != "cpu"]))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_public_fallback_steps_equal_the_fused_kernels(small_data, monkeypatch, optimizer):
    """The engine trained with the fallbacks (as on a torch without the fused kernels) ends where the fused
    kernels end, within float32 rounding."""
    if not kernels.fused_available(optimizer, torch.device("cpu")):
        pytest.skip(f"this torch has no fused {optimizer} on the CPU to compare with")
    cfgs = [TrainConfig(seed=1, epochs=3, optimizer=optimizer, lr=0.002 if optimizer == "adamw" else 0.02,
                        weight_decay=0.01),
            TrainConfig(seed=2, epochs=3, optimizer=optimizer, lr=0.001 if optimizer == "adamw" else 0.01,
                        data_fraction=0.5)]
    fused = Group(small_data, copy.deepcopy(cfgs), torch.device("cpu")).train()
    monkeypatch.setattr(kernels, "_PROBED", {(optimizer, "cpu"): False})
    plain = Group(small_data, copy.deepcopy(cfgs), torch.device("cpu")).train()
    assert kernels.fused_available(optimizer, torch.device("cpu")) is False
    assert fused[0][1][0]["numerics"]["optimizer_kernel"] == "fused"
    assert plain[0][1][0]["numerics"]["optimizer_kernel"] == "public fallback"  # recorded, not silent
    for (a, ha, _), (b, hb, _) in zip(fused, plain):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-6), (pa - pb).abs().max()
        assert ha[-1]["total"] == pytest.approx(hb[-1]["total"], rel=1e-4)
    start = Group(small_data, [cfgs[0]], torch.device("cpu")).heads[0]
    assert any((pa - p0).abs().max() > 1e-3 for pa, p0 in zip(fused[0][0].parameters(), start.parameters())), "no step"


def _tf32_state() -> tuple:
    return tuple(getattr(owner, name) for owner, name, _ in kernels._precision_settings())


def test_engine_trains_in_full_float32_and_records_it(small_data):
    """TF32 turned on by the environment is off while the engine trains, restored after, and recorded."""
    settings = kernels._precision_settings()
    before = _tf32_state()
    low = "tf32" if settings[0][1] == "fp32_precision" else True
    for owner, name, _ in settings[:2]:
        setattr(owner, name, low)
    environment = _tf32_state()
    seen = []
    try:
        g = Group(small_data, [TrainConfig(seed=1, epochs=2)], torch.device("cpu"))
        original = g.step_losses

        def spy(*args):
            seen.append(_tf32_state())
            return original(*args)
        g.step_losses = spy
        (_, history, _), = g.train()
        after = _tf32_state()
    finally:
        for (owner, name, _), value in zip(settings, before):
            setattr(owner, name, value)
    assert after == environment and environment[:2] == (low, low)
    assert seen and set(seen) == {tuple(value for _, _, value in settings)}
    kernel = "fused" if kernels.fused_available("sgd", torch.device("cpu")) else "public fallback"
    assert history[0]["numerics"] == {"float32_matmul": "ieee", "tf32": False, "optimizer_kernel": kernel}
    assert "numerics" not in history[-1]


# ---------------------------------------------------------------- extraction: device, precision, finiteness

def _stop_after_one_batch(ds, tiny_model, out, options):
    from fvgpt_cache.extraction import extract

    with pytest.raises(KeyboardInterrupt):
        extract(ds, tiny_model, out, options, stop_after_batches=1)


def test_a_partial_file_is_resumed_only_with_its_device_and_precision(tmp_path, generic_data, tiny_model):
    import h5py

    from fvgpt_cache.data import generic_dataset
    from fvgpt_cache.extraction import ExtractOptions, extract
    from fvgpt_cache.store import CacheError, partial_path

    ds = generic_dataset(*generic_data)
    out = tmp_path / "c.h5"
    opts = dict(shots=2, train_views=2, workers=0, batch_size=4)
    _stop_after_one_batch(ds, tiny_model, out, ExtractOptions(**opts))
    with pytest.raises(CacheError, match=r"started on cpu with --precision fp32, but this run computes on cpu with "
                                         r"--precision bf16.*--device cpu --precision fp32.*--no-resume"):
        extract(ds, tiny_model, out, ExtractOptions(**opts, precision="bf16"))
    with h5py.File(partial_path(out), "r+") as f:  # as if a GPU had started it
        f.attrs["compute"] = json.dumps({"device_type": "cuda", "precision": "fp16"})
    with pytest.raises(CacheError, match="started on cuda with --precision fp16, but this run computes on cpu"):
        extract(ds, tiny_model, out, ExtractOptions(**opts))
    summary = extract(ds, tiny_model, out, ExtractOptions(**opts, resume=False))
    prov = open_cache(summary.out).provenance
    assert prov["compute"] == {"device_type": "cpu", "precision": "fp32"}
    with h5py.File(out, "r") as f:
        assert "compute" not in f.attrs  # a finished cache keeps it in provenance only


def test_non_finite_features_stop_extraction_with_the_batch_named(tmp_path, generic_data, tiny_model, monkeypatch):
    from fvgpt_cache.data import generic_dataset
    from fvgpt_cache.extraction import ExtractionError, ExtractOptions, extract
    from fvgpt_cache.store import partial_path

    ds = generic_dataset(*generic_data)
    model = tiny_model.model
    original = model.encode_image
    calls = []

    def overflowing(pixels):  # the second forward (the second batch) overflows in one image
        calls.append(len(pixels))
        out = original(pixels)
        if len(calls) == 3:
            out = out.clone()
            out[1, 0] = float("inf")
        return out
    monkeypatch.setattr(model, "encode_image", overflowing)
    out = tmp_path / "c.h5"
    with pytest.raises(ExtractionError, match=r"non-finite \(NaN or inf\) features in the train batch of rows 4–7: "
                                              r"1 of \d+ views, the first full view 1 of \S+\.jpg, computed with "
                                              r"--precision fp32"):
        extract(ds, tiny_model, out, ExtractOptions(shots=2, train_views=2, workers=0, batch_size=4, encode_batch=8))
    assert partial_path(out).exists() and not out.exists()
    import h5py
    with h5py.File(partial_path(out), "r") as f:
        status = f["progress/train/status"][()]
    assert status[:4].all() and not status[4:].any()  # the first batch kept, nothing of the failing one


# ---------------------------------------------------------------- memory planning

PEAK_SCRIPT = r"""
import ctypes, json, re, sys
import torch
from fvgpt_cache.engine import Group, memory_estimate
from fvgpt_cache.training import TrainConfig, TrainData

libc = ctypes.CDLL("libc.so.6")
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: no huge pages rounding mappings up when the kernel gets to it
torch.set_num_threads(1)

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

out = []
for clip_is_backbone, c in json.loads(sys.argv[1]):
    gen = torch.Generator().manual_seed(0)
    n, views, dim = 800, 2, 512
    feats = lambda: torch.nn.functional.normalize(torch.randn(n, views, dim, generator=gen), dim=-1).half()
    full = feats()
    data = TrainData(class_ids=torch.arange(c).numpy(), full=full, fg=feats(), clip=full if clip_is_backbone else feats(),
                     area=torch.rand(n, views, generator=gen), y=torch.arange(n) % c,
                     txt_bb=torch.randn(c, dim, generator=gen), txt_clip=torch.randn(c, dim, generator=gen), scale=100.0)
    cfgs = [TrainConfig(seed=1), TrainConfig(seed=2, tau=1.0)]
    Group(data, cfgs, torch.device("cpu")).prepare()  # warm-up: one-off buffers of the kernels
    g = Group(data, cfgs, torch.device("cpu"))
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := the resident set now
    start = status("VmRSS")
    g.prepare()
    out.append({"peak": status("VmHWM") - start, "estimate": memory_estimate(data, cfgs)[0], "table": g.table.numel() * 4})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_memory_estimate_covers_the_measured_peak_of_prepare():
    """The shared part of `memory_estimate` is at least the peak memory `Group.prepare` takes on the CPU,
    for a CLIP backbone (its view reused) and another one (a third feature table) with many classes, two
    variants of the statistics each.

    Measured as the growth of the resident set's high-water mark in a fresh process in which glibc
    serves every block of 128 KiB or more with its own mapping (MALLOC_MMAP_THRESHOLD_): a freed tensor
    leaves the resident set at once and no new one lands in memory freed earlier, so the high-water mark
    is the peak of live tensors (in a long-lived process, fragments of freed memory inflate it)."""
    import subprocess
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    cases = [(True, 100), (False, 400)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    for case, m in zip(cases, json.loads(res.stdout.strip().splitlines()[-1])):
        assert m["peak"] > m["table"], (case, m)  # the measurement sees the table being built
        assert m["estimate"] >= m["peak"], (case, m)
        assert m["estimate"] < 3 * m["peak"], (case, m)  # and is not a blanket overestimate


# ---------------------------------------------------------------- extraction memory plan

def _plan(tiny_model, **kw):
    from fvgpt_cache.extraction_plan import plan_extraction

    args = dict(batch_size=64, views=11, image_size=224, workers=2, encode_batch=256, device=torch.device("cpu"),
                precision="fp32", model=tiny_model.model)
    return plan_extraction(**{**args, **kw})


def test_extraction_memory_grows_with_batch_size_and_workers(tiny_model):
    p = _plan(tiny_model)
    assert p.batch_bytes == 64 * 11 * 4 * 224 * 224  # uint8 pixels + bool mask per view: ~141 MB (float32 was 4×3/4 more)
    assert p.shared_bytes == 2 * 2 * p.batch_bytes  # two workers × two queued batches
    assert _plan(tiny_model, batch_size=128).shared_bytes == 2 * p.shared_bytes
    assert _plan(tiny_model, workers=8).shared_bytes == 4 * p.shared_bytes
    assert _plan(tiny_model, workers=8).host_bytes > p.host_bytes
    cuda = _plan(tiny_model, device=torch.device("cuda"), precision="fp16")  # planning only: nothing runs on CUDA
    assert cuda.host_bytes < p.host_bytes + p.batch_bytes and cuda.encoder_bytes < p.encoder_bytes  # activations on the GPU, half size
    assert "batch 64 images × 11 views" in p.describe() and "/dev/shm" in p.describe()


def test_auto_batch_size_takes_the_largest_power_of_two_that_fits(tiny_model, monkeypatch):
    from fvgpt_cache import extraction_plan as ep

    per_image = _plan(tiny_model, batch_size=1, workers=0).batch_bytes
    monkeypatch.setattr(ep, "host_memory_available", lambda: 64 << 30)
    monkeypatch.setattr(ep, "shared_memory_available", lambda path="/dev/shm": 2 * (2 * 2 * 40 * per_image))
    p = _plan(tiny_model, batch_size="auto")
    assert p.batch_size == 32 and p.batch_rule.startswith("auto")  # 64 would need more than half of /dev/shm
    assert p.shared_bytes <= 0.5 * p.shared_available < _plan(tiny_model, batch_size=64).shared_bytes
    monkeypatch.setattr(ep, "shared_memory_available", lambda path="/dev/shm": None)
    monkeypatch.setattr(ep, "host_memory_available", lambda: 1 << 20)
    with pytest.raises(ValueError, match="not even one image per batch fits"):
        _plan(tiny_model, batch_size="auto")


def test_extraction_says_its_plan_and_refuses_a_full_dev_shm(tmp_path, generic_data, tiny_model, monkeypatch):
    from fvgpt_cache import extraction_plan as ep
    from fvgpt_cache.data import generic_dataset
    from fvgpt_cache.extraction import ExtractionError, ExtractOptions, extract

    ds = generic_dataset(*generic_data)
    seen = []
    summary = extract(ds, tiny_model, tmp_path / "a.h5", ExtractOptions(shots=2, train_views=2, workers=0,
                                                                        batch_size="auto"), on_plan=seen.append)
    assert seen and summary.plan["batch_size"] == seen[0].batch_size == 256 and summary.plan["views"] == 2
    monkeypatch.setattr(ep, "shared_memory_available", lambda path="/dev/shm": 1000)
    with pytest.raises(ExtractionError, match=r"need .* GiB of /dev/shm but 0.00 GiB are free.*--shm-size"):
        extract(ds, tiny_model, tmp_path / "b.h5", ExtractOptions(shots=2, train_views=2, workers=1))


def test_a_node_plans_for_all_its_processes_and_torchrun_refuses_auto(tiny_model, monkeypatch):
    from fvgpt_cache import extraction_plan as ep

    one = _plan(tiny_model)
    monkeypatch.setattr(ep, "shared_memory_available", lambda path="/dev/shm": 3 * one.shared_bytes)
    assert not _plan(tiny_model).problems()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    eight = _plan(tiny_model)
    assert eight.processes_per_node == 8 and "× 8 processes on this node" in eight.describe()
    assert any("/dev/shm" in p for p in eight.problems())  # 8 processes' queued batches do not fit
    monkeypatch.setenv("WORLD_SIZE", "16")
    with pytest.raises(ValueError, match="--batch-size auto is for one process"):
        _plan(tiny_model, batch_size="auto")


def test_extract_command_prints_the_plan_and_takes_precision_and_encode_batch(tmp_path, generic_data, tiny_config):
    from typer.testing import CliRunner

    from fvgpt_cache.cli.main import app

    split, images, masks = generic_data
    out = tmp_path / "c.h5"
    args = ["extract", "--split-file", split, "--image-root", images, "--mask-root", masks, "--model", tiny_config,
            "--pretrained", "none", "--shots", "2", "--train-views", "2", "--workers", "0", "--out", out,
            "--batch-size", "auto", "--encode-batch", "64", "--precision", "bf16"]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert "plan: cpu, precision bf16, batch 256 images × 2 views (auto: the largest power of two" in res.output
    assert "encoder 64 images per forward" in res.output
    assert open_cache(out).provenance["compute"] == {"device_type": "cpu", "precision": "bf16"}
    res = CliRunner().invoke(app, [str(a) for a in args[:-6] + ["--batch-size", "many", "--force"]])
    assert res.exit_code != 0 and "--batch-size 'many': give a number of images or 'auto'" in res.output


def test_backbone_training_moves_the_callers_model_back(toy_cache, tiny_model, monkeypatch):
    """`train_backbone(…, loaded=…)` trains where cfg.device says and leaves the caller's model where it was."""
    from fvgpt_cache.backbones import BackboneConfig, train_backbone

    moves = record_moves(monkeypatch, tiny_model.model)
    train_backbone(toy_cache, BackboneConfig(method="coop", device="cpu", epochs=2), loaded=tiny_model)
    assert moves == ["cpu", "cpu"]  # to the training device, then back where it was
