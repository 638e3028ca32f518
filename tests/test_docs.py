"""The documentation: README length, no pointers outside the repository, every page in the site's
navigation, and the command examples that can run offline do run.

Examples are shell blocks marked with a comment line `<!-- test: offline -->` (or `<!-- test: offline slow -->`)
right above the fence. The blocks of one page run in order, in one fresh folder, with `bash -euo pipefail`, this
Python first on the PATH and one thread per process. We run them with this small runner rather than
pytest-markdown-docs (Python blocks only) or mktestdocs (every block of a language): our examples are shell
commands of the CLI, most need data or weights a test machine does not have, so each runnable block opts in.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- test: offline( slow)? -->\n```bash\n(.*?)```", re.S)


def examples(page: Path) -> list[tuple[bool, str]]:
    return [(bool(m.group(1)), m.group(2)) for m in BLOCK.finditer(page.read_text())]


def test_readme_is_short_and_keeps_its_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert 'pip install . && fvgpt-cache demo' in text and 'pip install -e ".[test]" && pytest' in text


def test_nothing_points_outside_the_repository():
    """The method, protocol and format are in docs/; no file cites a specification the repository lacks."""
    files = [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".toml", ".yml", ".json"} and p.is_file()
             and not {".git", "site", ".venv", "cache"} & set(p.relative_to(ROOT).parts)]
    cited = [str(p.relative_to(ROOT)) for p in files if re.search("SPEC \u00a7|\\.\\./shared", p.read_text(errors="replace"))  # \u00a7: §
             and p != Path(__file__)]
    assert not cited, cited


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name not in nav]
    assert not missing, f"add {missing} to mkdocs.yml's nav"


def test_runnable_examples_are_marked_on_the_pages_that_promise_them():
    marked = {p.name for p in PAGES if examples(p)}
    assert {"training.md", "ablations.md", "world.md"} <= marked, marked


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if examples(p)], ids=lambda p: p.name)
def test_offline_examples_run(page, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    for number, (_, code) in enumerate(examples(page), 1):
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=900)
        assert res.returncode == 0, f"{page.name}, example {number}:\n{code}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


@pytest.mark.slow
def test_the_readme_shows_the_demos_output(tmp_path, console80):
    """The README's demo table is what `fvgpt-cache demo` prints (rows of numbers, as printed)."""
    from conftest import run_cli

    readme = (ROOT / "README.md").read_text()
    shown = [line.strip() for line in readme.split("```\n world demo:")[1].split("```")[0].splitlines()
             if line.startswith("│")]
    assert len(shown) == 8
    res = run_cli("demo", "--out", tmp_path / "demo")
    assert res.exit_code == 0, res.output
    printed = [line.strip() for line in res.output.splitlines() if line.startswith("│")]
    assert printed == shown
