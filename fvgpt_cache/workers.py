"""Worker processes that never outlive the process that started them."""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(worker_id: int | None = None, parent: int | None = None) -> None:
    """`worker_init_fn` for DataLoader workers: the kernel kills this worker when its parent dies.

    Without it a worker lingers for seconds after its parent is killed (SIGKILL, the OOM killer)
    and keeps the parent's open files. Linux only (prctl); elsewhere the DataLoader's own watchdog
    ends the worker a little later. `parent` is the PID that created the loader
    (`functools.partial(die_with_parent, parent=os.getpid())`): if it died before the prctl call
    took effect, the worker exits at once.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def worker_init(parent: int | None = None):
    """The `worker_init_fn` to pass a DataLoader created by this process."""
    return functools.partial(die_with_parent, parent=os.getpid() if parent is None else parent)
