"""The public Python API: open a cache, configure, train one run, run a grid, load records, make a report.

Everything here is re-exported by `fvgpt_cache` (`from fvgpt_cache import train, grid, report`);
the command line calls these functions. They return typed objects: `RunRecord` (one run),
`GridPlan` (the runs a grid will train), `Report` (tables that render as the CLI's `report` does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Union

from . import reports as _reports
from .grids import GridRun, check_caches, check_grid, expand, read_results, run_grid
from .records import RunRecord
from .runs import run_training
from .store import Cache, open_cache
from .training import TrainConfig
from .training import configure as _configure

CachePath = Union[str, Path, Cache]
REPORT_FORMATS = ("markdown", "csv", "json", "latex", "curves")


def _path(cache: CachePath) -> Path:
    return Path(cache.path) if isinstance(cache, Cache) else Path(cache)


def _cache(cache: CachePath) -> Cache:
    return cache if isinstance(cache, Cache) else open_cache(cache)


def _many(caches: CachePath | Iterable[CachePath]) -> list[Path]:
    if isinstance(caches, (str, Path, Cache)):
        return [_path(caches)]
    out = [_path(c) for c in caches]
    if not out:
        raise ValueError("give at least one cache")
    return out


def configure(cache: CachePath, overrides: dict | None = None, preset_of: str = "auto",
              **params) -> tuple[TrainConfig, dict]:
    """The `TrainConfig` a run on `cache` would use: the defaults < the backbone's training preset
    (`preset_of`: auto, none, or a method name) < `overrides` and `params` (TrainConfig fields by name).
    Returns it with a record of the preset: its name and source, the settings you overrode, warnings.
    Unknown names and invalid values are refused."""
    return _configure(_cache(cache), {**(overrides or {}), **params}, preset_of)


def train(cache: CachePath, config: TrainConfig | None = None, *, eval_caches: Iterable[CachePath] = (),
          out: str | Path | None = None, save: bool | None = None, preset_of: str = "auto",
          progress: Callable[[int, int, dict], None] | None = None, **params) -> RunRecord:
    """Train and evaluate one FVG-PT run on `cache`; returns its `RunRecord`.

    The configuration is `config` (a `TrainConfig`, taken as fully set) and/or `params` (TrainConfig
    fields by name, e.g. `lambda_d=5, epochs=2`), on top of the backbone's training preset
    (`preset_of`: auto, none, or a method name), as `fvgpt-cache train` does. `eval_caches`: other
    caches of the same model to evaluate the PC branch on (cross-dataset). The run folder
    (`results.json`, `head.pt`) is written to `out`; `save=True` without `out` writes it under
    `cache/runs/`; by default a run is saved only when `out` is given. `progress(epoch, epochs,
    losses)` hears each finished epoch.
    """
    opened = _cache(cache)
    overrides = {**(config.to_dict() if config is not None else {}), **params}
    cfg, preset = _configure(opened, overrides, preset_of)
    save = out is not None if save is None else save
    return run_training(opened.path, cfg, Path(out) if out is not None else None, [_path(c) for c in eval_caches],
                        progress=progress, save=save, preset=preset)


@dataclass
class GridPlan:
    """The runs of a grid, expanded and validated before any training (`plan_grid`): each run's cache,
    configuration, grid parameters and run id; `warnings` about settings that apply only in part."""

    runs: list[GridRun]
    caches: list[Path]
    seeds: list[int]
    eval_caches: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def presets(self) -> list[str]:
        """The training presets the runs use ('none' for the plain defaults)."""
        return sorted({(r.preset or {}).get("preset", {}).get("name", "none") if (r.preset or {}).get("preset")
                       else "none" for r in self.runs})

    @property
    def preset_warnings(self) -> list[str]:
        return sorted({w for r in self.runs for w in (r.preset or {}).get("warnings", [])})


def plan_grid(caches: CachePath | Iterable[CachePath], params: dict[str, list] | None = None, *,
              seeds: Iterable[int] = (1,), base: dict | TrainConfig | None = None, preset: str | None = None,
              preset_of: str = "auto", eval_caches: Iterable[CachePath] = ()) -> GridPlan:
    """Every (cache, seed, preset row, parameter combination) of a grid, validated before any training.

    `params`: {TrainConfig field: [values]} (the grid is their Cartesian product); `base`: fixed
    settings for every run (a field may not be both fixed and varied); `preset`: one of the paper's
    ablations (`grids.PRESETS`); `preset_of`: the training preset per cache, as in `train`.
    """
    params = {k: list(v) for k, v in (params or {}).items()}
    fixed = base.to_dict() if isinstance(base, TrainConfig) else dict(base or {})
    paths, targets, seeds = _many(caches), [_path(c) for c in eval_caches], list(seeds)
    if not seeds:
        raise ValueError("give at least one seed")
    warnings = check_grid(params, {k: v for k, v in fixed.items() if k != "device"}, preset)  # device: an option
    check_caches(paths, targets)
    runs = expand(paths, seeds, params, base, preset, preset_of, targets)
    return GridPlan(runs, paths, seeds, targets, warnings)


def grid(caches: CachePath | Iterable[CachePath] | GridPlan, params: dict[str, list] | None = None, *,
         out: str | Path, seeds: Iterable[int] = (1,), base: dict | TrainConfig | None = None,
         preset: str | None = None, preset_of: str = "auto", eval_caches: Iterable[CachePath] = (),
         resume: bool = True, batched: bool = True, save_heads: bool = False, memory_budget: int | None = None,
         progress=None, log=None, should_stop=None, on_record=None) -> list[RunRecord]:
    """Train a grid (a `GridPlan`, or the arguments of `plan_grid`) into `out/results.jsonl`; returns the
    records of every run of the grid, in the plan's order (those done by an earlier call included:
    with `resume` a rerun trains only what is missing). `on_record(record)` hears each newly written
    record; `progress(done, total)`, `log(message)`, `should_stop()` and `memory_budget` are those of
    `grids.run_grid`."""
    plan = caches if isinstance(caches, GridPlan) else plan_grid(
        caches, params, seeds=seeds, base=base, preset=preset, preset_of=preset_of, eval_caches=eval_caches)
    out = Path(out)
    run_grid(plan.runs, out, resume=resume, batched=batched, save_heads=save_heads, eval_caches=plan.eval_caches,
             progress=progress, log=log, memory_budget=memory_budget, should_stop=should_stop, on_record=on_record)
    by_id = {r.run_id: r for r in read_results(out / "results.jsonl")}
    return [by_id[r.run_id] for r in plan.runs]


def load_records(*paths: str | Path | Iterable[str | Path]) -> list[RunRecord]:
    """Records from `results.json` / `results.jsonl` files or folders holding them (searched recursively);
    a run found twice is kept once."""
    flat: list = []
    for p in paths:
        flat.extend([p] if isinstance(p, (str, Path)) else list(p))
    return _reports.load_records(flat)


@dataclass
class Report:
    """Runs aggregated over seeds and datasets into the paper's table layouts (`report`).

    `summary`: groups of comparable runs (`reports.aggregate`); `tables`: the paired comparisons
    (`vs`), ablation and mask-source tables. Render with `to_markdown`, `to_csv`, `to_json`,
    `to_latex`, `curves_csv` or `render(format)`; the same text as `fvgpt-cache report --format`.
    """

    records: list[RunRecord]
    summary: dict
    tables: list = field(default_factory=list)
    compare_paper: bool = False
    ci: str = "t"

    def to_markdown(self) -> str:
        return _reports.to_markdown(self.summary, self.compare_paper, self.tables)

    def to_latex(self) -> str:
        return _reports.to_latex(self.summary, self.compare_paper, self.tables)

    def to_csv(self) -> str:
        return _reports.to_csv(self.summary)

    def to_json(self) -> str:
        return _reports.to_json(self.summary)

    def curves_csv(self) -> str:
        """Every run's per-epoch history as CSV rows."""
        return _reports.curves_csv(self.records)

    def render(self, fmt: str) -> str:
        if fmt not in REPORT_FORMATS:
            raise ValueError(f"report format {fmt!r}: choose one of {', '.join(REPORT_FORMATS)}")
        return getattr(self, "curves_csv" if fmt == "curves" else f"to_{fmt}")()

    def console_tables(self):
        """(title, header, rows, row kinds) per table, laid out for an 80-column terminal."""
        return _reports.console_tables(self.summary, self.compare_paper, self.tables)

    @property
    def warnings(self) -> list[str]:
        """Cells whose confidence interval is not meaningful (too few seeds, ...)."""
        return _reports.interval_warnings(self.summary)

    @property
    def ci_name(self) -> str:
        return _reports.CI_NAMES[self.ci]

    def plot_sweep(self, param: str, path: str | Path) -> tuple[Path, dict[str, list[str]]]:
        """Plot Base/New/HM against one TrainConfig field; returns the file and the fields each point
        averages over besides the seed (empty when none)."""
        averaged = _reports.averaged_over(self.records, param)
        return _reports.plot_sweep(_reports.sweep(self.records, param), param, Path(path), averaged), averaged

    def plot_curves(self, param: str, path: str | Path) -> Path:
        """Plot Base/New/HM against epoch, one line per value of `param`, a band for the seed spread."""
        return _reports.plot_curves(self.records, param, Path(path))


def report(records: Iterable[RunRecord] | str | Path | Iterable[str | Path], *, ci: str = "t",
           compare: str | None = None, vs: str | None = None) -> Report:
    """Aggregate runs (records, or results files and folders) into a `Report`.

    `ci`: the confidence interval of seed means (t or bootstrap); `compare="paper"` puts the paper's
    Tables 1 and 2 beside the runs; `vs`: compare every configuration with this one seed by seed
    (`backbone`, `default` or KEY=VALUE[,KEY=VALUE]).
    """
    if compare not in (None, "paper"):
        raise ValueError(f"compare={compare!r}: only 'paper' is known")
    if ci not in _reports.CI_METHODS:
        raise ValueError(f"ci={ci!r}: choose one of {', '.join(_reports.CI_METHODS)}")
    items = [records] if isinstance(records, (str, Path)) else list(records)
    if not items:
        raise ValueError("no runs to report")
    if all(isinstance(r, RunRecord) for r in items):
        loaded = items
    elif any(isinstance(r, RunRecord) for r in items):
        raise ValueError("give either records or results paths, not both")
    else:
        loaded = load_records(items)
    summary = _reports.aggregate(loaded, ci)
    tables = _reports.ablation_tables(loaded) + _reports.mask_source_tables(loaded)
    if vs:
        tables = [*_reports.paired_tables(summary, vs), *tables]
    return Report(loaded, summary, tables, compare == "paper", ci)


def baselines(cache: CachePath, linear_probe: bool = True) -> dict[str, dict]:
    """Base/New/HM (%) on the test split of every text group in the cache (zero-shot CLIP, ensembles,
    backbones): {group: {base, new, hm}}; with `linear_probe`, CoOp's linear-probe baseline too
    (base classes only, C chosen on the validation split)."""
    import numpy as np

    from .evaluation import EvalSet, accuracy
    from .equations import backbone_logits, harmonic_mean
    from .linear_probe import linear_probe as fit_probe

    c = _cache(cache)
    rows = {}
    for group in c.text_groups:
        ts = EvalSet(c, group)
        acc = {}
        for split, ids in (("base", c.base), ("new", c.new)):
            sel, y, txt, _ = ts.subset(np.asarray(ids))
            img = ts.full if split == "base" else ts.full_new
            acc[split] = accuracy(backbone_logits(img[sel], txt, ts.scale), y)
        both = acc["base"] is not None and acc["new"] is not None
        rows[group] = {**acc, "hm": harmonic_mean(acc["base"], acc["new"]) if both else None}
    if linear_probe:
        lp = fit_probe(c)
        rows["linear probe"] = {"base": lp["test_acc_base"], "new": None, "hm": None, "C": lp["C"]}
    return rows
