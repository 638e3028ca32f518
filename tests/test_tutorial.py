"""docs/tutorial.md runs: its python blocks, in order, in one namespace, in an empty folder."""
import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks() -> list[str]:
    return BLOCK.findall((ROOT / "docs" / "tutorial.md").read_text())


def test_the_tutorial_runs_in_order(tmp_path, monkeypatch):
    code = blocks()
    assert len(code) >= 8, "the tutorial's cells were not found"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "tutorial"}
    out = io.StringIO()
    for number, cell in enumerate(code, 1):
        with contextlib.redirect_stdout(out):
            exec(compile(cell, f"docs/tutorial.md cell {number}", "exec"), namespace)  # noqa: S102
    printed = out.getvalue()
    assert "refused: unknown parameter 'lamda_d' (did you mean lambda_d?)" in printed
    assert "| lambda_d=1.0" in printed or "lambda_d=1.0" in printed
    assert (tmp_path / "runs" / "first" / "results.json").is_file()
    assert len(namespace["records"]) == 4 and len(namespace["loaded"]) == 5
