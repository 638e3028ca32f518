"""The public API: `from fvgpt_cache import ...` is what the CLI uses, and what a notebook uses."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

import fvgpt_cache
from fvgpt_cache import (
    GridPlan, Report, RunRecord, TrainConfig, grid, load_records, open_cache, plan_grid, report, train,
    write_feature_cache,
)

SMALL = dict(num_classes=6, shots=4, views=2, dim=16, test_per_class=6)
CLI = Path(fvgpt_cache.__file__).parents[1] / "cli"


def _defines(module: str, name: str) -> bool:
    """Does fvgpt_cache/<module>.py (or its package __init__) define or import `name` at top level?"""
    root = Path(fvgpt_cache.__file__).parent / module.replace(".", "/")
    path = root / "__init__.py" if root.is_dir() else root.with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def test_the_package_imports_light_and_every_export_exists():
    missing = [f"{name} ({module}.{attr})" for name, (module, attr) in fvgpt_cache._EXPORTS.items()
               if not _defines(module, attr)]
    assert not missing, missing
    code = "import sys, fvgpt_cache; print(sorted(m for m in ('torch', 'h5py', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", "import fvgpt_cache imports no heavy module; names are loaded on first use"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fvgpt_cache.nope  # noqa: B018


@pytest.mark.slow
def test_every_name_in_all_resolves():
    for name in fvgpt_cache.__all__:
        assert getattr(fvgpt_cache, name) is not None, name


def _imports(path: Path):
    """(module, names, line) of every import in a CLI module, relative ones resolved against fvgpt_cache.cli."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(["fvgpt_cache", "cli"][: 3 - node.level] + ([module] if module else []))
            yield module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def test_the_cli_imports_the_library_only_through_the_public_api():
    files = sorted(CLI.glob("*.py"))
    assert {f.name for f in files} >= {"train.py", "grid.py", "run.py", "common.py"}
    bad = []
    for f in files:
        for module, names, line in _imports(f):
            if module == "fvgpt_cache":
                bad += [f"{f.name}:{line} {n} (not in fvgpt_cache.__all__)" for n in names if n not in fvgpt_cache.__all__]
            elif module.startswith("fvgpt_cache.") and module.split(".")[1] != "cli":  # the CLI's own modules
                bad.append(f"{f.name}:{line} from {module}")
    assert not bad, "the CLI reaches past the public API: " + "; ".join(bad)


def test_the_import_check_would_catch_a_private_import(tmp_path):
    sneaky = tmp_path / "x.py"
    sneaky.write_text("from fvgpt_cache.runs import run_training\nfrom ..grids import expand\nfrom .common import app\n")
    assert [m for m, _, _ in _imports(sneaky)] == ["fvgpt_cache.runs", "fvgpt_cache.grids", "fvgpt_cache.cli.common"]


@pytest.fixture()
def syn(tmp_path):
    return write_feature_cache(tmp_path / "syn.h5", **SMALL)


def test_train_takes_a_config_or_params_and_saves_only_when_asked(syn, tmp_path):
    rec = train(syn, epochs=2, lambda_d=5.0)
    assert isinstance(rec, RunRecord) and rec.run_dir is None and rec.config["lambda_d"] == 5.0
    assert rec.preset["overridden"] == ["epochs", "lambda_d"]
    same = train(open_cache(syn), TrainConfig(epochs=1), epochs=2, lambda_d=5.0)  # params override the config
    assert same.run_id == rec.run_id and same.metrics == rec.metrics and same.history == rec.history
    saved = train(syn, TrainConfig(epochs=2), out=tmp_path / "run")
    assert (tmp_path / "run" / "results.json").is_file() and saved.run_dir == str(tmp_path / "run")
    assert load_records(tmp_path / "run") == [saved]
    with pytest.raises(ValueError, match=r"unknown parameter 'lamda_d' \(did you mean lambda_d\?\)"):
        train(syn, lamda_d=1.0)


def test_grid_returns_every_run_of_the_plan_and_resumes(syn, tmp_path):
    plan = plan_grid(syn, {"lambda_d": [1.0, 10.0]}, seeds=[1], base={"epochs": 2})
    assert isinstance(plan, GridPlan) and len(plan) == 2 and plan.presets == ["none"]
    heard = []
    first = grid(plan, out=tmp_path / "g", on_record=heard.append)
    assert [r.run_id for r in first] == [r.run_id for r in plan.runs] and len(heard) == 2
    assert [r.params for r in first] == [{"lambda_d": 1.0}, {"lambda_d": 10.0}]
    heard.clear()
    again = grid(syn, {"lambda_d": [1.0, 10.0]}, seeds=[1], base={"epochs": 2}, out=tmp_path / "g",
                 on_record=heard.append)
    assert again == first and heard == [], "a rerun trains nothing and returns the same records"
    single = train(syn, epochs=2, lambda_d=1.0, preset_of="auto")
    assert single.run_id == first[0].run_id and single.metrics == first[0].metrics
    with pytest.raises(ValueError, match="both fixed .* and varied"):
        plan_grid(syn, {"lambda_d": [1.0]}, base={"lambda_d": 2.0})


def test_report_renders_as_the_cli_does(syn, tmp_path):
    grid(syn, {"lambda_d": [1.0, 10.0]}, seeds=[1, 2], base={"epochs": 2}, out=tmp_path / "g")
    rep = report(tmp_path / "g")
    assert isinstance(rep, Report) and len(rep.records) == 4
    assert report(load_records(tmp_path / "g")).to_csv() == rep.to_csv()
    for fmt in ("markdown", "csv", "json"):
        res = run_cli("report", tmp_path / "g", "--format", fmt)
        assert res.exit_code == 0, res.output
        assert res.stdout.strip().splitlines() == rep.render(fmt).strip().splitlines(), fmt
    res = run_cli("report", tmp_path / "g", "--format", "markdown", "--vs", "lambda_d=10")
    assert res.stdout.strip() == report(tmp_path / "g", vs="lambda_d=10").to_markdown().strip()
    with pytest.raises(ValueError, match="report format 'html'"):
        rep.render("html")
    with pytest.raises(ValueError, match="ci='z'"):
        report(rep.records, ci="z")
