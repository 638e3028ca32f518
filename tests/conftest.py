import contextlib
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

# Every test uses tiny tensors: one intra-op thread is as fast, and it does not spin against other
# processes on a shared machine (two threads on a busy 2-core machine made steps ~30× slower).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FVGPT_TEST_DEVICE") == "cuda" and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: FVGPT_TEST_DEVICE=cuda on a machine with a GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def test_device(monkeypatch):
    """The suite runs on the CPU (`auto` resolves to it, subprocesses see no GPU) unless
    FVGPT_TEST_DEVICE=cuda, when `auto` is the GPU as for a user. Returns the device tests run on."""
    if os.environ.get("FVGPT_TEST_DEVICE") == "cuda":
        if not torch.cuda.is_available():
            pytest.fail("FVGPT_TEST_DEVICE=cuda but torch sees no CUDA device")
        return torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return torch.device("cpu")


TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSNAMES = ["red_circle", "blue square", "green triangle", "yellow star"]


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from fvgpt_cache.models import load_clip

    return load_clip(str(tiny_config), "none", seed=0)


def make_image_and_mask(rng: np.random.Generator, size=(48, 40)):
    w, h = size
    img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[y0:y0 + h // 2, x0:x0 + w // 2] = 255
    img[mask > 0] = rng.integers(0, 255, size=3, dtype=np.uint8)
    return Image.fromarray(img), Image.fromarray(mask)


def write_generic_dataset(root: Path, per_class=(6, 3, 3), seed=0, mask_ext=".png"):
    """Images under root/images/<class>/, masks mirrored under root/masks/, a split JSON."""
    rng = np.random.default_rng(seed)
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSNAMES):
        for split_name, count in zip(("train", "val", "test"), per_class):
            for i in range(count):
                rel = f"{name.replace(' ', '_')}/{split_name}_{i}.jpg"
                img, mask = make_image_and_mask(rng, size=(int(rng.integers(36, 60)), int(rng.integers(36, 60))))
                (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                img.save(root / "images" / rel, quality=95)
                mask_rel = Path(rel).with_suffix(mask_ext)
                (root / "masks" / mask_rel).parent.mkdir(parents=True, exist_ok=True)
                mask.save(root / "masks" / mask_rel)
                split[split_name].append([rel, label, name])
    (root / "split.json").write_text(json.dumps(split))
    return root / "split.json", root / "images", root / "masks"


@pytest.fixture()
def generic_data(tmp_path):
    return write_generic_dataset(tmp_path / "data")


@contextlib.contextmanager
def lock_held_elsewhere(path: Path, owner: str = ""):
    """Another process holds the POSIX record lock `store.lock_file` takes on `path` (without importing
    torch), writing its PID and `owner` into the lock file as a writer does; yields that process."""
    code = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1] + '.lock', os.O_RDWR | os.O_CREAT)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "os.write(fd, (str(os.getpid()) + (' ' + sys.argv[2] if sys.argv[2] else '')).encode())\n"
            "print('locked', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path), owner], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


_runner = CliRunner()


def run_cli(*args):
    """`fvgpt-cache ARGS…` run in-process (every argument str()-ed); the CliRunner result."""
    from fvgpt_cache.cli.main import app

    return _runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def console80():
    """The CLI's consoles at 80 columns, whatever terminal the tests run in."""
    from fvgpt_cache.cli import common

    saved = (common.console._width, common.err._width)
    common.console._width = common.err._width = 80
    yield
    common.console._width, common.err._width = saved


NUMBER = re.compile(r"-?\d+\.\d\d")  # a number printed with two decimals


def check_80_columns(output: str) -> list[str]:
    lines = output.splitlines()
    too_long = [line for line in lines if len(line) > 80]
    assert not too_long, too_long
    assert "…" not in output, "nothing cut"
    return lines


def assert_close_history(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    """Two runs' per-epoch histories agree: numbers within `tol` (absolute and relative), everything else
    (None for a switched-off gate, epoch 0's `numerics` record, `selected`) exactly."""
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert ea.keys() == eb.keys()
        for k in ea:
            if isinstance(eb[k], float):
                assert ea[k] == pytest.approx(eb[k], abs=tol, rel=tol), k
            else:
                assert ea[k] == eb[k], k
