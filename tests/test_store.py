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
