"""Loading plug-ins: the Python modules that register indicators, loss terms, backbone methods or parameters.

A registration lives in the process that ran it. A notebook imports its own module; the command line imports
the modules given with `fvgpt-cache --plugin MODULE_OR_FILE` (or `FVGPT_CACHE_PLUGINS`) and every entry point of
the group `fvgpt_cache.plugins` that an installed package declares, e.g. in its pyproject.toml:

    [project.entry-points."fvgpt_cache.plugins"]
    my_terms = "my_package.fvgpt_terms"

This module imports nothing heavy (the command line starts without torch); a plug-in module imports what it needs.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

ENTRY_POINT_GROUP = "fvgpt_cache.plugins"
FILE_MODULE_PREFIX = "fvgpt_cache_plugin_"  # the module name of a plug-in given as a .py file starts so


def _import_file(path: Path):
    # named by the file's resolved path: two files with one name are two modules
    name = f"{FILE_MODULE_PREFIX}{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:  # the same file given twice (or again in one process): registered once
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_plugins(modules: Sequence[str] = (), entry_points: bool = True) -> list[str]:
    """Import each of `modules` (a module name, or the path of a `.py` file) and, with `entry_points`, every
    entry point of the group `fvgpt_cache.plugins`; returns what was loaded, in order.

    A module that cannot be imported is refused with its name and the reason (its own error)."""
    loaded = []
    for name in modules:
        path = Path(name)
        try:
            if path.suffix == ".py":
                if not path.is_file():
                    raise ValueError(f"plug-in file {path} not found")
                _import_file(path.resolve())
            else:
                importlib.import_module(name)
        except ModuleNotFoundError as exc:
            raise ValueError(f"plug-in {name!r}: no module {exc.name!r}; give an importable module name (on "
                             "PYTHONPATH) or the path of a .py file") from exc
        loaded.append(name)
    if entry_points:
        for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            point.load()
            loaded.append(point.value)
    return loaded


def code_fingerprint(fn) -> str:
    """What a plug-in computes, by content: the SHA-256 (first 16 hex digits) of its source code, or of its
    bytecode and constants where the source cannot be read (a function defined in an interactive session).
    A run's id covers the fingerprints of the plug-ins it used, so editing a plug-in's code makes its runs new
    runs: a grid trains them again and sets the old records aside."""
    try:
        text = inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = repr(fn).encode() if code is None else code.co_code + repr(code.co_consts).encode()
    return hashlib.sha256(text).hexdigest()[:16]
