"""fvgpt_cache.store: the writer's lock."""
import pytest
from conftest import lock_held_elsewhere


def test_second_writer_is_refused_with_the_pid_holding_the_lock(tmp_path):
    from fvgpt_cache.store import CacheError, exclusive_lock

    out = tmp_path / "c.h5"
    with lock_held_elsewhere(out) as holder:
        with pytest.raises(CacheError, match=f"another process is already writing .*held by PID {holder.pid}"):
            with exclusive_lock(out):
                pass
    with exclusive_lock(out):  # the kernel dropped the killed holder's lock
        pass


def test_hdf5_key_paths_and_splits_are_written_down_once():
    """store owns the layout: no other module spells an HDF5 key path (`"text/…"`, `f"image/{…}/…"`, …) or
    defines the cache's splits again.
    Break used: write `f"samples/{split}/area"` back into `inspection.py` (or a second `SPLITS = (` into store.py)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    literal = re.compile(r"""["'](text|image|samples|classes|progress)/""")
    spelled = []
    for path in [*(root / "fvgpt_cache").rglob("*.py"), *(root / "cli").rglob("*.py")]:
        if path.name == "store.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if literal.search(line):
                spelled.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not spelled, "\n".join(spelled)
    defined = [p.relative_to(root).as_posix() for p in (root / "fvgpt_cache").rglob("*.py")
               if re.search(r"^SPLITS = ", p.read_text(), re.M)]
    assert sorted(defined) == ["fvgpt_cache/data.py", "fvgpt_cache/world.py"], defined  # world's are its test kinds
