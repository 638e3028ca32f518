"""Several mask sources in one cache: added foreground views, fg_source in training and grids, the report."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fvgpt_cache.data import generic_dataset
from fvgpt_cache.extraction import ExtractOptions, extract
from fvgpt_cache.fg_sources import SourceOptions, add_foreground_source, write_source_into_cache
from fvgpt_cache.grids import expand, run_grid
from fvgpt_cache.reports import load_records, mask_source_tables
from fvgpt_cache.runs import run_training
from fvgpt_cache.store import CacheError, open_cache
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig
from conftest import lock_held_elsewhere, assert_close_history

OPTS = dict(shots=2, seed=1, workers=0, batch_size=8, train_views=2, device="cpu")


def _shifted_masks(src, dst):
    """Other masks of the same images: each mask rolled by a quarter of its width."""
    for path in src.rglob("*.png"):
        arr = np.asarray(Image.open(path))
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(arr, arr.shape[1] // 4, axis=1)).save(out)


def test_added_sources_match_extraction_with_those_masks_and_leave_the_rest(tmp_path, generic_data, tiny_model):
    split, images, masks = generic_data
    other = tmp_path / "other"
    _shifted_masks(masks, other)
    cache_path = extract(generic_dataset(split, images, masks), tiny_model, tmp_path / "c.h5",
                         ExtractOptions(**OPTS)).out
    before = open_cache(cache_path)
    full_before = {s: before.image(s, "full") for s in before.splits}
    fg_before = {s: before.image(s, "fg") for s in before.splits}
    reference = open_cache(extract(generic_dataset(split, images, other), tiny_model, tmp_path / "ref.h5",
                                   ExtractOptions(**OPTS)).out)
    summary = add_foreground_source(cache_path, "shifted", other, SourceOptions(workers=0, batch_size=5, device="cpu"),
                                    loaded=tiny_model)
    cache = open_cache(cache_path)
    assert cache.fg_sources == ["extracted", "none", "shifted"]
    for s in cache.splits:
        fg, area = cache.foreground(s, "shifted")
        # the same views (stored boxes) with the other masks: what extract writes from those masks
        assert torch.allclose(fg, reference.image(s, "fg"), atol=2e-3)
        assert torch.equal(area, reference.areas(s))
        assert torch.equal(cache.image(s, "full"), full_before[s]) and torch.equal(cache.image(s, "fg"), fg_before[s])
        none_fg, none_area = cache.foreground(s, "none")
        assert torch.equal(none_fg, full_before[s]) and bool((none_area == 1).all())
    assert summary.stats["train"]["mean_area"] == pytest.approx(float(reference.areas("train")[:, 0].mean()))
    from fvgpt_cache.inspection import inspect_cache

    report = inspect_cache(cache_path)
    assert report["fg_sources"]["shifted"]["stats"] == summary.stats
    assert not [p for p in report["problems"] if "fg_sources" in p]
    prov = cache.fg_source_provenance("shifted")
    assert prov["mask_root"] == str(other.resolve()) and prov["clip_check_min_cosine"] > 0.99
    with pytest.raises(CacheError, match="already has the mask source 'shifted'"):
        add_foreground_source(cache_path, "shifted", other, loaded=tiny_model)
    with pytest.raises(ValueError, match="own foreground views"):
        add_foreground_source(cache_path, "extracted", other, loaded=tiny_model)
    with pytest.raises(CacheError, match="no mask source 'gradcam'"):
        cache.foreground("train", "gradcam")
    with pytest.raises(ValueError, match="built into every cache"):
        add_foreground_source(cache_path, "none", other, loaded=tiny_model)
    with lock_held_elsewhere(cache_path):
        with pytest.raises(CacheError, match="another process is already writing"):
            add_foreground_source(cache_path, "shifted", other, SourceOptions(force=True, workers=0, device="cpu"),
                                  loaded=tiny_model)


def test_missing_masks_are_named_or_use_the_whole_image(tmp_path, generic_data, tiny_model):
    split, images, masks = generic_data
    cache_path = extract(generic_dataset(split, images, masks), tiny_model, tmp_path / "c.h5", ExtractOptions(**OPTS)).out
    partial = tmp_path / "partial"
    _shifted_masks(masks, partial)
    gone = sorted(partial.rglob("*.png"))[0]
    gone.unlink()
    opts = SourceOptions(workers=0, device="cpu")
    with pytest.raises(FileNotFoundError, match="have no mask under"):
        add_foreground_source(cache_path, "p", partial, opts, loaded=tiny_model)
    summary = add_foreground_source(cache_path, "p", partial, SourceOptions(workers=0, device="cpu", missing_mask="full"),
                                    loaded=tiny_model)
    assert len(summary.provenance["missing_masks_full"]) == 1


def _with_sources(path):
    """A synthetic cache with one more mask source, 'noisy' (foreground views pulled towards the full view, areas
    halved), next to 'extracted' and the built-in 'none'."""
    cache = open_cache(path)
    rng = np.random.default_rng(0)
    noisy = {s: (0.5 * cache.image(s, "fg") + 0.5 * cache.image(s, "full")
                 + 0.05 * torch.from_numpy(rng.standard_normal(cache.image(s, "fg").shape)).float()).numpy()
             for s in cache.splits}
    write_source_into_cache(path, "noisy", noisy, {s: cache.areas(s).numpy() / 2 for s in cache.splits},
                            {"name": "noisy"})
    return path


def test_fg_source_grid_rows_batch_and_equal_their_single_runs(tmp_path):
    from fvgpt_cache.grids import group_key

    syn = _with_sources(write_feature_cache(tmp_path / "syn.h5", num_classes=6, shots=8, views=3, dim=32,
                                            test_per_class=10))
    runs = expand([syn], [1], {}, TrainConfig(epochs=2), preset="masks")
    assert sorted({r.config.fg_source for r in runs}) == ["extracted", "noisy", "none"] and len(runs) == 3
    assert len({group_key(r) for r in runs}) == 1, "mask sources must batch into one group"
    records = {r.run_id: r for r in run_grid(runs, tmp_path / "grid")}
    for run in runs:
        single = run_training(syn, run.config, save=False)
        grid = records[run.run_id]
        for method in ("fvgpt", "backbone"):
            for part in ("base", "new"):
                assert abs(grid.metrics[method][part] - single.metrics[method][part]) <= 100 / 30 + 1e-9
        assert_close_history(grid.history, single.history, tol=1e-5)
        assert grid.mask_source == single.mask_source
        assert grid.diagnostics["train"] == pytest.approx(single.diagnostics["train"], abs=1e-5)
    by_source = {r.config["fg_source"]: r for r in records.values()}
    assert by_source["none"].mask_source.mean_area == 1
    # the sources really differ: different foreground views give different training losses
    assert by_source["noisy"].history[-1]["dist"] != by_source["extracted"].history[-1]["dist"]
    # all-ones masks: the area gate cuts every view, so FRG's r is 0 and nothing is distilled to a foreground
    assert by_source["none"].diagnostics["train"]["area_cut_share"] == 1
    (title, header, body), = mask_source_tables(load_records([tmp_path / "grid"]))
    assert header[:5] == ["Mask source", "Base", "New", "HM", "ΔHM"] and [row[0] for row in body] == \
        ["extracted", "noisy", "none"]
    assert body[2][5] == "1.00" and body[0][4] == "" and body[1][8] == "1"


def test_training_on_a_missing_source_names_it(tmp_path):
    syn = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=2, views=2, dim=16, test_per_class=2)
    with pytest.raises(CacheError, match="no mask source 'gradcam'.*add-masks"):
        run_training(syn, TrainConfig(epochs=2, fg_source="gradcam"), save=False)


def test_cli_add_masks_and_report_the_masks_preset(tmp_path):
    from typer.testing import CliRunner

    from fvgpt_cache.cli.main import app

    syn = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=4, views=2, dim=16, test_per_class=4)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    res = run("add-masks", syn, "--name", "none", "--mask-root", tmp_path)
    assert res.exit_code == 2 and "built into every cache" in res.output and "Traceback" not in res.output
    res = run("add-masks", syn, "--name", "gradcam", "--mask-root", tmp_path / "nowhere")
    assert res.exit_code == 2 and "mask folder not found" in res.output
    res = run("grid", syn, "--preset", "masks", "--seeds", "1", "--set", "epochs=2", "--out", tmp_path / "g")
    assert res.exit_code == 0, res.output
    res = run("report", tmp_path / "g")
    assert res.exit_code == 0, res.output
    assert "Mask sources" in res.output and "FRG mean r" in res.output
    assert json.loads((tmp_path / "g" / "results.jsonl").read_text().splitlines()[0])["mask_source"]["name"]
