"""pyproject.toml: what `pip install .` installs."""


def test_every_subpackage_is_declared_for_installation():
    """pyproject.toml lists packages explicitly (cli/ installs as fvgpt_cache.cli): a new subpackage
    missing there would work in an editable checkout and be absent from `pip install .`."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    declared = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "fvgpt_cache").rglob("__init__.py")}
    assert found | {"fvgpt_cache.cli"} == declared
