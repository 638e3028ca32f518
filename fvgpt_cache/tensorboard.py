"""Each run's per-epoch curve as TensorBoard scalars (`--tensorboard DIR`), beside Dassl's logs.

One event folder per run, `DIR/<dataset>/<backbone>-seed<S>-<run id>`, with every number of the
run's history under its name (test/base, test/new, test/hm, val/…, gates/r_mean, loss/total, …), the
epoch as the step. Needs the optional `tensorboard` package (`pip install 'fvgpt-cache[tensorboard]'`).
"""
from __future__ import annotations

from pathlib import Path

from .records import RunRecord

GROUPS = {"test_": "test/", "val_": "val/"}
GATES = ("r_mean", "frg_auc", "b_mean_new")
SKIP = ("epoch", "selected")


def scalar_name(key: str) -> str:
    """A history key's TensorBoard tag: test_hm → test/hm, r_mean → gates/r_mean, total → loss/total."""
    for prefix, group in GROUPS.items():
        if key.startswith(prefix):
            return group + key[len(prefix):]
    if key in GATES:
        return "gates/" + key
    if key == "lr":
        return "lr"
    return "loss/" + key


def run_folder(root: Path, record: RunRecord) -> Path:
    return Path(root) / str(record.dataset or "dataset") / f"{record.backbone}-seed{record.seed}-{record.run_id}"


def write_run(root: str | Path, record: RunRecord) -> Path:
    """Write one run's history as scalars (once per run id); returns its event folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install 'fvgpt-cache[tensorboard]' "
                           "(or pip install tensorboard)") from None
    folder = run_folder(Path(root), record)
    if any(folder.glob("events.*")):  # the same run id is the same numbers: written once, not appended again
        return folder
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for entry in record.history:
            for key, value in entry.items():
                if key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(scalar_name(key), value, global_step=entry["epoch"] + 1)
    finally:
        writer.close()
    return folder


def check_available() -> None:
    """Fail before training when --tensorboard cannot be honoured."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install 'fvgpt-cache[tensorboard]' "
                           "(or pip install tensorboard)") from None
