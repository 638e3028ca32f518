"""Ablation grids: many FVG-PT configurations over caches and seeds, trained in batched groups.

Runs over one cache that share `engine.GROUP_FIELDS` (class set, backbone, batch size, device,
FDC depth) train together in one `engine.Group`, whatever else differs (components, losses,
indicators, widths, gate depths, λs, lr, optimiser, epochs, data fraction, seed); each keeps its own
initialisation, batch order and views, so a grid row equals its single `train` run (a single run is
a group of one in the same engine). Results stream to `results.jsonl`; a rerun skips finished runs.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .ablations import ABLATIONS, CACHE_ROWS, PAPER, mask_source_rows
from .device import resolve_device
from .engine import available_memory, memory_estimate, shape_parts, split_for_memory, train_group
from .engine import group_key as engine_group_key
from .runs import eval_sets, finish_run, run_id
from .store import check_same_model, open_cache
from .training import TrainConfig, config_with, configure, parse_value, prepare

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The paper's ablations as lists of overrides (each list item is one configuration).
PRESETS = (*ABLATIONS, "paper")


@dataclass
class GridRun:
    cache: Path
    config: TrainConfig
    params: dict
    run_id: str
    preset: dict | None = None
    ablations: list = field(default_factory=list)  # [(ablation preset, row label)] this run serves


# Grid axes with their own option: a --param for them would silently replace that option.
OWN_OPTIONS = {"seed": "--seeds", "device": "--device"}


def _check_values(where: str, name: str, values: list) -> list:
    """Refuse an empty list and values that are equal after parsing (`1` and `1.0`)."""
    if name in OWN_OPTIONS:
        raise ValueError(f"{where} {name}: use {OWN_OPTIONS[name]} for {name}, not a grid parameter")
    if not values:
        raise ValueError(f"{where} {name}: give at least one value")
    seen: dict[str, object] = {}
    for v in values:
        key = json.dumps(list(v) if isinstance(v, tuple) else v)
        if key in seen:
            raise ValueError(f"{where} {name}: the value {v!r} is given twice (values equal after parsing, such as "
                             "1 and 1.0, are the same configuration); list each value once")
        seen[key] = v
    return values


def parse_params(items: list[str]) -> dict[str, list]:
    """`--param lambda_d=0.1,1,5` → {"lambda_d": [0.1, 1.0, 5.0]}, typed and validated.

    Refused by name: an empty value (`1,,10`), a value given twice after parsing, and the same
    parameter in two --param options.
    """
    out: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param {item!r}: write NAME=V1,V2,…")
        name, values = item.split("=", 1)
        name = name.strip()
        if name in out:
            raise ValueError(f"--param {name} is given twice; put all its values in one --param {name}=V1,V2,…")
        texts = values.split(",")
        if any(not t.strip() for t in texts):
            raise ValueError(f"--param {item!r}: empty value; write {name}=V1,V2 without empty entries")
        out[name] = _check_values("--param", name, [parse_value(name, t) for t in texts])
    return out


def merge_params(first: dict[str, list], second: dict[str, list], where: tuple[str, str]) -> dict[str, list]:
    """Parameters from two sources (a grid file and --param); the same name in both is refused."""
    both = sorted(set(first) & set(second))
    if both:
        raise ValueError(f"{', '.join(both)} is set both in {where[0]} and by {where[1]}; set each parameter in one place")
    return {**first, **second}


def check_grid(params: dict[str, list], fixed: dict, preset: str | None) -> list[str]:
    """Refuse settings that would silently override each other; return warnings for partial ones.

    Refused: a --set (or [base]) of a parameter the grid varies, a --param of a field the preset's
    rows vary (the rows would collapse into one), a --set of a field every table of the preset
    varies (it would have no effect). A --set of a field only some tables of `--preset paper`
    vary applies to the other tables: that is a warning.
    """
    for name in fixed:
        if name in OWN_OPTIONS:
            raise ValueError(f"--set {name}: use {OWN_OPTIONS[name]} for {name}")
    both = sorted(set(params) & set(fixed))
    if both:
        raise ValueError(f"{', '.join(both)} is both fixed (--set/--backbone or [base]) and varied (--param or "
                         "[params]); keep one")
    if preset is None:
        return []
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    tables = PAPER if preset == "paper" else (preset,)
    varies = {name: {k for _, overrides in ABLATIONS[name][1] for k in overrides} | ({CACHE_ROWS[name]} if name in
                                                                                       CACHE_ROWS else set())
              for name in tables}
    everywhere = set.intersection(*varies.values())
    anywhere = set.union(*varies.values())
    clash = sorted(set(params) & anywhere)
    if clash:
        raise ValueError(f"preset {preset!r} varies {', '.join(clash)} in its rows; a --param of it would make those "
                         "rows equal (run another grid for that)")
    clash = sorted(set(fixed) & everywhere)
    if clash:
        raise ValueError(f"preset {preset!r} varies {', '.join(clash)}; a --set of it would have no effect")
    return [f"--set {k}={fixed[k]} applies to every table except {', '.join(n for n in tables if k in varies[n])}, "
            f"whose rows set {k} themselves" for k in sorted(set(fixed) & anywhere)]


def parse_seeds(text: str) -> list[int]:
    """`--seeds 1,2,3`; empty entries, non-integers and repeats are refused."""
    items = [t.strip() for t in str(text).split(",")]
    if any(not t for t in items):
        raise ValueError(f"--seeds {text!r}: empty entry; write e.g. 1,2,3")
    try:
        seeds = [int(t) for t in items]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: seeds are integers, e.g. 1,2,3") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: a seed is given twice")
    return seeds


def check_caches(caches: list[Path], eval_caches: list[Path] = ()) -> None:
    """Refuse a grid over caches (and evaluation caches) extracted with different models or preprocessing."""
    check_same_model([open_cache(p) for p in [*caches, *eval_caches]])


def read_grid_file(path: Path) -> tuple[dict[str, list], dict]:
    """A TOML grid: `[params]` lists per parameter, optional `[base]` fixed settings, `seeds`, `preset`."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read grid file {path}: {exc}") from exc
    params = {}
    for name, values in raw.get("params", {}).items():
        values = values if isinstance(values, list) else [values]
        params[name] = _check_values(f"{path} [params]", name,
                                     [parse_value(name, v if isinstance(v, str) else _toml_text(v)) for v in values])
    base = {k: parse_value(k, v if isinstance(v, str) else _toml_text(v)) for k, v in raw.get("base", {}).items()}
    extra = {k: raw[k] for k in ("seeds", "preset") if k in raw}
    return params, {"base": base, **extra}


def _toml_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value)


def expand(caches: list[Path], seeds: list[int], params: dict[str, list], base: dict | TrainConfig | None = None,
           preset: str | None = None, preset_of: str = "auto") -> list[GridRun]:
    """Every (cache, seed, preset variant, parameter combination); all validated before any training.

    Each configuration is `training.configure`d on its cache: TrainConfig defaults < the backbone's
    training preset (`preset_of`) < `base` (fixed settings; a TrainConfig counts as all set) < the
    grid's variant and parameters.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    base = base.to_dict() if isinstance(base, TrainConfig) else dict(base or {})
    tables = PAPER if preset == "paper" else (preset,) if preset else ()
    variants = [(name, label, overrides) for name in tables for label, overrides in ABLATIONS[name][1]] or \
        [(None, None, {})]
    names = list(params)
    runs: dict[str, GridRun] = {}
    for cache_path in caches:
        cache = open_cache(cache_path)
        if preset == "masks":  # one row per mask source of this cache
            variants = [("masks", label, overrides) for label, overrides in mask_source_rows(cache.fg_sources)]
        for seed in seeds:
            for ablation, label, variant in variants:
                for combo in itertools.product(*(params[n] for n in names)):
                    chosen = {**variant, **dict(zip(names, combo))}
                    cfg, info = configure(cache, {**base, **chosen, "seed": seed}, preset_of)
                    rid = run_id(Path(cache_path), cfg)
                    run = runs.setdefault(rid, GridRun(Path(cache_path), cfg, _jsonable(chosen), rid, info))
                    if ablation is not None:  # the full model serves every table once per seed
                        run.ablations.append([ablation, label])
    return list(runs.values())


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def group_key(run: GridRun) -> tuple:
    """Runs with equal keys train in one group: the same cache and `engine.GROUP_FIELDS`."""
    return (str(run.cache),) + engine_group_key(run.config)


def done_run_ids(results: Path) -> set[str]:
    """Run ids already in a results file; a last line cut by an interruption is removed."""
    if not results.exists():
        return set()
    text = results.read_text()
    if text and not text.endswith("\n"):
        results.write_text(text[: text.rfind("\n") + 1])
    ids = set()
    for line in results.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                ids.add(json.loads(line)["run_id"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by an interruption; that run is simply redone
    return ids


def run_grid(runs: list[GridRun], out_dir: Path, *, resume: bool = True, batched: bool = True,
             save_heads: bool = False, eval_caches: list[Path] = (), progress=None, log=None,
             memory_budget: int | None = None) -> list[dict]:
    """Train and evaluate `runs`, appending one JSON line per finished run to `out_dir/results.jsonl`.

    A group whose estimated memory exceeds `memory_budget` (default: 80 % of the device's free
    memory) is trained in parts; `log(message)` hears how much memory each group needs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"
    if not resume and results_path.exists():
        results_path.unlink()
    done = done_run_ids(results_path) if resume else set()
    todo = [r for r in runs if r.run_id not in done]
    if progress:
        progress(len(runs) - len(todo), len(runs))
    targets = [open_cache(p) for p in eval_caches]
    groups: dict[tuple, list[GridRun]] = {}
    for r in todo:
        groups.setdefault(group_key(r) if batched else (r.run_id,), []).append(r)
    records, finished = [], len(runs) - len(todo)
    caches = {}
    for members in groups.values():
        cache_path = members[0].cache
        if cache_path not in caches:
            caches[cache_path] = open_cache(cache_path)
            check_same_model([caches[cache_path], *targets])
        cache = caches[cache_path]
        t0 = time.perf_counter()
        data = prepare(cache, members[0].config, fg_sources=[m.config.fg_source for m in members])
        cfgs = [config_with(m.config, backbone=data.meta["backbone"]) for m in members]
        device = resolve_device(cfgs[0].device)
        budget = memory_budget or int(0.8 * available_memory(device))
        parts = split_for_memory(data, cfgs, budget)
        if log:
            shapes = shape_parts(cfgs)
            shared, each = memory_estimate(data, cfgs)
            log(f"group of {len(cfgs)} configuration(s) on {cache.path.name}: {shared / 2**20:.0f} MB shared + "
                f"{each / 2**20:.1f} MB each = {(shared + len(cfgs) * each) / 2**20:.0f} MB"
                + (f"; trained in {len(parts)} parts to fit {budget / 2**20:.0f} MB" if len(parts) > 1 else "")
                + (f"; one part per padded shape ({len(shapes)})" if len(shapes) > 1 else ""))
        t1 = time.perf_counter()
        trained = [item for part in parts for item in train_group(data, part, device)]
        seconds = {"load": t1 - t0, "train": (time.perf_counter() - t1) / len(cfgs), "group_size": len(cfgs)}
        sets = eval_sets(cache, targets, cfgs[0].backbone)
        with results_path.open("a") as fh:
            for m, cfg, (head, history, images) in zip(members, cfgs, trained):
                record = finish_run(cache, cfg, data.source(cfg.fg_source).subset(images), head, history, seconds, targets,
                                    out_dir / "runs" / m.run_id, save=save_heads, preset=m.preset, evalsets=sets)
                record["run_id"] = m.run_id
                record["params"] = m.params
                record["ablations"] = m.ablations
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                records.append(record)
                finished += 1
                if progress:
                    progress(finished, len(runs))
    return records
