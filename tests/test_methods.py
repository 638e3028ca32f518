"""The backbone-method registry: a method registered from a test reaches presets, reports, hints and the CLI."""
import json
import re
from pathlib import Path

import h5py
import pytest
from conftest import run_cli

import fvgpt_cache
from fvgpt_cache.methods import (
    RELEASE, BackboneMethod, Preset, backbone_method, backbone_method_names, backbone_methods, register_backbone_method,
    registered_backbone_method, unregister_backbone_method,
)
from fvgpt_cache.records import RunRecord
from fvgpt_cache.store import CacheError, open_cache, write_text_group
from fvgpt_cache.synthetic import write_feature_cache

SMALL = dict(num_classes=6, shots=8, views=2, dim=32, test_per_class=10)
MYPROMPT = BackboneMethod("myprompt", "MyPrompt", image_encoder="clip", written="trained",
                          presets=(Preset("myprompt", "my-configs/myprompt.yaml", {"lr": 0.002}),),
                          hint="Write it with `myprompt-write {cache} --as {method}`")


@pytest.fixture()
def myprompt():
    with registered_backbone_method(MYPROMPT) as method:
        yield method
    assert "myprompt" not in backbone_method_names()


def _cache(path: Path, method: str | None, dataset: str = "dtd"):
    """A synthetic cache of `dataset`; with `method`, a backbone group of that name whose provenance says so."""
    p = write_feature_cache(path, **SMALL, backbone=None)
    with h5py.File(p, "r+") as f:
        prov = json.loads(f.attrs["provenance"])
        prov.update(dataset=dataset)
        f.attrs["provenance"] = json.dumps(prov)
    if method is not None:
        write_text_group(p, method, open_cache(p).text("clip"), {"method": method})
    return open_cache(p)


def test_builtins_are_one_entry_each():
    assert backbone_method_names() == ("coop", "kgcoop", "promptsrc", "mmrl", "clip")
    assert [m.label for m in backbone_methods()] == ["CoOp", "KgCoOp", "PromptSRC", "MMRL", "CLIP"]
    assert backbone_method_names("imported") == ("promptsrc", "mmrl")
    assert backbone_method_names("trained") == ("coop", "kgcoop")
    assert [m.image_encoder for m in backbone_methods()] == ["clip", "clip", "own", "own", "clip"]
    mmrl = backbone_method("mmrl")
    assert mmrl.preset_for("imagenet", "all").name == "mmrl-cross" and mmrl.preset_for("dtd").rrc_scale == (0.5, 1.0)
    coop = backbone_method("coop")
    assert coop.preset_for("EuroSAT").name == "coop-eurosat"  # dataset names compare lower-case
    assert coop.preset_for("eurosat", "all").name == "coop"  # the EuroSAT config is base-to-new only
    assert all(p.source.startswith(RELEASE) for m in backbone_methods() for p in m.presets)


def test_importers_resolve_lazily():
    from fvgpt_cache.backbones.mmrl import MMRL
    from fvgpt_cache.backbones.promptsrc import PromptSRC

    assert backbone_method("promptsrc").load_importer() is PromptSRC and backbone_method("mmrl").load_importer() is MMRL
    with pytest.raises(ValueError, match="'coop' .*no importer.*promptsrc, mmrl"):
        backbone_method("coop").load_importer()


def test_duplicates_unknown_names_and_bad_entries_are_refused(myprompt):
    with pytest.raises(ValueError, match="'coop' is already registered; pass replace=True"):
        register_backbone_method(BackboneMethod("coop", "Mine"))
    with pytest.raises(ValueError, match=r"unknown backbone method 'nope'; registered: coop, kgcoop, promptsrc, mmrl, "
                                         r"clip, myprompt"):
        backbone_method("nope")
    with pytest.raises(ValueError, match=r"preset name\(s\) \['coop-eurosat'\] belong to \['coop'\]"):
        register_backbone_method(BackboneMethod("other", "Other", presets=(Preset("coop-eurosat", "x"),)))
    with pytest.raises(ValueError, match="image_encoder='siglip'"):
        BackboneMethod("other", "Other", image_encoder="siglip")
    with pytest.raises(ValueError, match="written='downloaded'"):
        BackboneMethod("other", "Other", written="downloaded")
    with pytest.raises(ValueError, match="name 'auto'"):
        BackboneMethod("auto", "Auto")
    with pytest.raises(ValueError, match="'package.module:attribute'"):
        BackboneMethod("other", "Other", importer="my_module.Importer")
    with pytest.raises(ValueError, match="classes='new'"):
        Preset("p", "x", classes="new")
    # replace=True swaps an entry; the context manager puts the original back
    with registered_backbone_method(BackboneMethod("myprompt", "Renamed"), replace=True):
        assert backbone_method("myprompt").label == "Renamed"
    assert backbone_method("myprompt") is myprompt
    assert unregister_backbone_method("myprompt") is myprompt and "myprompt" not in backbone_method_names()
    register_backbone_method(myprompt)  # the fixture's teardown expects it registered


def test_a_registered_method_gets_its_preset(tmp_path, myprompt):
    from fvgpt_cache.presets import choose_preset
    from fvgpt_cache.training import configure

    assert choose_preset("myprompt", "dtd") is myprompt.presets[0]
    cache = _cache(tmp_path / "c.h5", "myprompt")
    cfg, info = configure(cache, {})
    assert info["method"] == "myprompt" and info["preset"]["name"] == "myprompt" and info["warnings"] == []
    assert cfg.lr == 0.002
    # any backbone can take its preset by name, and an unregistered name is refused with the choices
    other = _cache(tmp_path / "d.h5", "coop")
    assert configure(other, {}, preset_of="myprompt")[0].lr == 0.002
    with pytest.raises(ValueError, match="--preset-of 'nope': choose one of auto, none, coop, .*, clip, myprompt"):
        configure(other, {}, preset_of="nope")


def test_without_the_registration_the_method_falls_back_with_a_warning(tmp_path):
    from fvgpt_cache.training import configure

    cfg, info = configure(_cache(tmp_path / "c.h5", "myprompt"), {})
    assert info["preset"] is None and cfg.lr == 0.0035
    assert "no preset for the backbone method 'myprompt'" in info["warnings"][0]


def test_reports_use_the_label_as_the_papers_column(monkeypatch, myprompt):
    from fvgpt_cache import reports
    from fvgpt_cache.training import TrainConfig

    assert reports.paper_label("myprompt") == "MyPrompt" and reports.paper_label("MMRL") == "MMRL"
    assert reports.paper_label("nope") is None
    assert reports.paper_rows("myprompt", ["dtd"]) == {}  # the paper has no MyPrompt column
    paper = reports.load_paper()
    for row in paper["table1_base_to_new"].values():
        row["MyPrompt"] = {"base": 70.0, "new": 60.0, "hm": 64.62}
        row["MyPrompt+FVG-PT"] = {"base": 71.5, "new": 61.5, "hm": 66.12}
    monkeypatch.setattr(reports, "load_paper", lambda: paper)
    assert reports.paper_rows("myprompt", ["dtd"])["dtd"]["fvgpt"]["base"] == 71.5
    m = {"base": 80.0, "new": 60.0, "hm": 68.57}
    rec = {"format": "fvgpt-cache-results", "version": 3, "run_id": "r1", "cache": "/c/dtd.h5", "dataset": "dtd",
           "backbone": "myprompt", "seed": 1, "config": TrainConfig(backbone="myprompt").to_dict(),
           "metrics": {"fvgpt": m, "backbone": m, "zeroshot": m}, "cross_dataset": []}
    md = reports.to_markdown(reports.aggregate([RunRecord.from_json(rec)]), compare_paper=True)
    assert "| dtd (paper) |" in md and "71.50 | 61.50 | 66.12" in md


def test_the_missing_backbone_hint_comes_from_the_entry(tmp_path, myprompt):
    from fvgpt_cache.training import pick_backbone

    cache = _cache(tmp_path / "c.h5", None)
    with pytest.raises(CacheError, match=re.escape(f"Write it with `myprompt-write {cache.path} --as myprompt`")):
        pick_backbone(cache, "myprompt")
    with pytest.raises(CacheError, match=re.escape(f"fvgpt-cache backbone import {cache.path} --method mmrl")):
        pick_backbone(cache, "mmrl")
    with pytest.raises(CacheError, match=r"no backbone 'nope'; it has \['clip'\]$"):
        pick_backbone(cache, "nope")


def test_the_cli_takes_a_registered_method(tmp_path, myprompt):
    cache = _cache(tmp_path / "c.h5", "myprompt")
    res = run_cli("train", cache.path, "--preset-of", "myprompt", "--epochs", "2", "--json", "--out", tmp_path / "r")
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["preset"]["preset"]["name"] == "myprompt" and record["config"]["lr"] == 0.002
    res = run_cli("train", cache.path, "--preset-of", "nope")
    assert res.exit_code == 2 and "'nope': choose one of auto, none, coop" in res.output and "myprompt" in res.output
    bare = _cache(tmp_path / "bare.h5", None)
    res = run_cli("train", bare.path, "--backbone", "myprompt")
    assert res.exit_code == 2 and "no backbone 'myprompt'" in res.output and "myprompt-write" in res.output
    res = run_cli("backbone", "methods")
    assert res.exit_code == 0 and "myprompt" in res.output and "MyPrompt" in res.output
    # `backbone train` trains CoOp-style methods only: the error says how MyPrompt is written, or lists the names
    res = run_cli("backbone", "train", cache.path, "--method", "myprompt")
    assert res.exit_code == 2 and "myprompt-write CACHE --as myprompt" in res.output
    res = run_cli("backbone", "train", cache.path, "--method", "nope")
    assert res.exit_code == 2 and "registered: coop, kgcoop, promptsrc, mmrl, clip, myprompt" in res.output


def test_the_study_takes_registered_methods(myprompt):
    from fvgpt_cache.study import study_backbones

    assert study_backbones() == ("coop", "kgcoop", "promptsrc", "mmrl", "myprompt")  # not zero-shot clip


def test_method_names_have_one_owner():
    """The built-in methods' names are spelled only in the registry module; everything else asks it."""
    import fvgpt_cache.cli

    package, cli = Path(fvgpt_cache.__file__).parent, Path(fvgpt_cache.cli.__file__).parent
    literal = re.compile(r"""(["'])(coop|kgcoop|promptsrc|mmrl)\1""")
    files = sorted({*package.rglob("*.py"), *cli.rglob("*.py")} - {package / "methods.py"})
    found = [f"{path}:{n}: {line.strip()}" for path in files
             for n, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert len(files) > 50 and cli / "backbone.py" in files and literal.search((package / "methods.py").read_text())
    assert found == []


def test_the_docs_example_runs(tmp_path, monkeypatch):
    """docs/backbones.md#adding-a-backbone-method, run as written on a synthetic cache."""
    page = (Path(__file__).parents[1] / "docs" / "backbones.md").read_text()
    code = page.split("## Adding a backbone method")[1].split("```python")[1].split("```")[0]
    write_feature_cache(tmp_path / "cache.h5", **SMALL, backbone=None)
    scope = {}
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, "backbones.md", "exec"), scope)
    finally:
        if "myprompt" in backbone_method_names():
            unregister_backbone_method("myprompt")
    assert scope["cfg"].lr == 0.002 and scope["preset"]["preset"]["name"] == "myprompt"
