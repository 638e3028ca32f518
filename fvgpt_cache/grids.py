"""Ablation grids: many FVG-PT configurations over caches and seeds, trained in batched groups.

Runs over one cache that share `engine.GROUP_FIELDS` (class set, backbone, batch size, device,
FDC depth) train together in one `engine.Group`, whatever else differs (components, losses,
indicators, widths, gate depths, λs, lr, optimiser, epochs, data fraction, seed); each keeps its own
initialisation, batch order and views, so a grid row equals its single `train` run (a single run is
a group of one in the same engine). Results stream to `results.jsonl`; a rerun skips finished runs.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .ablations import ABLATIONS, CACHE_ROWS, PAPER, mask_source_rows
from .device import resolve_device
from .evaluation import curve_data
from .engine import available_memory, memory_estimate, shape_parts, split_for_memory, train_group
from .engine import group_key as engine_group_key
from .parameters import lookup
from .records import RunInput, RunRecord
from .runs import eval_sets, finish_run, record_slot, run_id, run_inputs, run_slot
from .store import FINGERPRINT_CHARS, check_same_model, lock_file, open_cache
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
    inputs: list[RunInput] = field(default_factory=list)  # `runs.run_inputs`: what it reads, by content

    @property
    def slot(self) -> str:
        return run_slot([i.path for i in self.inputs], self.config.to_dict())


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
    """`--seeds 1,2,3`, `--seeds 1-50` or a mix (`1-5,8,10-12`); empty entries, non-integers, backward
    ranges and repeats are refused."""
    items = [t.strip() for t in str(text).split(",")]
    if any(not t for t in items):
        raise ValueError(f"--seeds {text!r}: empty entry; write e.g. 1,2,3 or 1-50")
    seeds: list[int] = []
    for item in items:
        first, dash, last = item.partition("-")
        try:
            lo, hi = int(first), int(last) if dash else int(first)
        except ValueError:
            raise ValueError(f"--seeds {text!r}: {item!r} is not a seed or a range; write e.g. 1,2,3 or 1-50") from None
        if hi < lo:
            raise ValueError(f"--seeds {text!r}: the range {item!r} runs backwards; write {hi}-{lo}")
        seeds.extend(range(lo, hi + 1))
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
        params[name] = _check_values(f"{path} [params]", name, [lookup(name).coerce(v) for v in values])
    base = {k: lookup(k).coerce(v) for k, v in raw.get("base", {}).items()}
    extra = {k: raw[k] for k in ("seeds", "preset") if k in raw}
    return params, {"base": base, **extra}


def expand(caches: list[Path], seeds: list[int], params: dict[str, list], base: dict | TrainConfig | None = None,
           preset: str | None = None, preset_of: str = "auto", eval_caches: list[Path] = ()) -> list[GridRun]:
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
    targets = [open_cache(p) for p in eval_caches]
    for cache_path in caches:
        cache = open_cache(cache_path)
        inputs: dict[tuple, list] = {}  # per (backbone, mask source)
        if preset == "masks":  # one row per mask source of this cache
            variants = [("masks", label, overrides) for label, overrides in mask_source_rows(cache.fg_sources)]
        for seed in seeds:
            for ablation, label, variant in variants:
                for combo in itertools.product(*(params[n] for n in names)):
                    chosen = {**variant, **dict(zip(names, combo))}
                    cfg, info = configure(cache, {**base, **chosen, "seed": seed}, preset_of)
                    read = (cfg.backbone, cfg.fg_source)
                    if read not in inputs:
                        inputs[read] = run_inputs(cache, cfg.backbone, targets, cfg.fg_source)
                    rid = run_id(inputs[read], cfg)
                    run = runs.setdefault(rid, GridRun(Path(cache_path), cfg, _jsonable(chosen), rid, info,
                                                       inputs=inputs[read]))
                    if ablation is not None:  # the full model serves every table once per seed
                        run.ablations.append([ablation, label])
    return list(runs.values())


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def group_key(run: GridRun) -> tuple:
    """Runs with equal keys train in one group: the same cache and `engine.GROUP_FIELDS`."""
    return (str(run.cache),) + engine_group_key(run.config)


def read_results(results: Path) -> list[RunRecord]:
    """The records of a results file; a last line cut by an interruption is removed (that run is redone)."""
    if not results.exists():
        return []
    text = results.read_text()
    if text and not text.endswith("\n"):
        results.write_text(text[: text.rfind("\n") + 1])
    records = []
    for n, line in enumerate(results.read_text().splitlines(), 1):
        if line.strip():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            records.append(RunRecord.from_json(data, f"{results}, line {n}"))
    return records


def _stale_reason(record: RunRecord, run: GridRun) -> str:
    if not record.inputs:
        return "written before results recorded the content of their caches"
    now = run.config.plugin_fingerprints()
    if (record.plugins or {}) != now:
        edited = sorted(k for k in {**now, **(record.plugins or {})} if now.get(k) != (record.plugins or {}).get(k))
        return "plug-in code changed since: " + ", ".join(edited)
    old = {i.path: i.fingerprint for i in record.inputs}
    changed = [f"{Path(i.path).name} ({old[i.path][:FINGERPRINT_CHARS]} → {i.fingerprint[:FINGERPRINT_CHARS]})"
               for i in run.inputs if old.get(i.path) != i.fingerprint]
    return "cache content changed since: " + ", ".join(changed) if changed else "computed from other inputs"


def set_aside(out_dir: Path, kept: list[RunRecord], stale: list[RunRecord], why: str) -> Path:
    """Move `stale` records out of `out_dir/results.jsonl` into a new file under `out_dir/stale/` (never deleted).

    The stale file is written first, then results.jsonl is replaced atomically by `kept`, so an
    interruption loses no record (at worst one is in both files; `report` reads only results files)."""
    folder = out_dir / "stale"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{len(stale)}.jsonl"
    n = 1
    while target.exists():
        target = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{len(stale)}-{n}.jsonl"
        n += 1
    target.write_text("".join(rec.replace(set_aside=rec.set_aside or why).dumps() + "\n" for rec in stale))
    results = out_dir / "results.jsonl"
    tmp = results.with_name("results.jsonl.new")
    tmp.write_text("".join(rec.dumps() + "\n" for rec in kept))
    os.replace(tmp, results)
    return target


def run_grid(runs: list[GridRun], out_dir: Path, *, resume: bool = True, batched: bool = True,
             save_heads: bool = False, eval_caches: list[Path] = (), progress=None, log=None,
             memory_budget: int | None = None, should_stop=None, on_record=None) -> list[RunRecord]:
    """Train and evaluate `runs`, appending one JSON line to `out_dir/results.jsonl` as each run finishes
    (a run whose epochs end early is written before the rest of its group), so an interrupted grid
    resumes without retraining finished runs.

    A group whose estimated memory exceeds `memory_budget` (default: 80 % of the device's free
    memory) is trained in parts; `log(message)` hears how much memory each group needs;
    `should_stop()` (asked after every epoch; the CLI sets it on SIGTERM) ends the grid with
    `engine.TrainingStopped` once the current epoch is done and written; `on_record(record)` hears each
    record as it is written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_file(out_dir / "grid.lock", f"the grid {out_dir}"):
        return _run_grid(runs, out_dir, resume=resume, batched=batched, save_heads=save_heads,
                         eval_caches=eval_caches, progress=progress, log=log, memory_budget=memory_budget,
                         should_stop=should_stop, on_record=on_record)


def _resume(runs: list[GridRun], out_dir: Path, resume: bool, log) -> set[str]:
    """Run ids already done in `out_dir/results.jsonl`. A record in the slot of a requested run (same
    cache paths and configuration) whose content differs is stale: set aside, with the reason."""
    records = read_results(out_dir / "results.jsonl")
    if not records:
        return set()
    if not resume:
        where = set_aside(out_dir, [], records, "--no-resume")
        if log:
            log(f"--no-resume: set aside the {len(records)} earlier record(s) in {where}")
        return set()
    wanted = {r.run_id: r for r in runs}
    slots = {r.slot: r for r in runs}
    done, kept, stale, reasons = set(), [], [], {}
    for rec in records:
        run = wanted.get(rec.run_id)
        if run is not None and rec.inputs:
            done.add(run.run_id)
            kept.append(rec)
            continue
        run = slots.get(record_slot(rec))
        if run is None:
            kept.append(rec)  # another grid's run in the same folder: not ours to judge
            continue
        reason = _stale_reason(rec, run)
        stale.append(rec.replace(set_aside=reason))
        reasons[reason] = reasons.get(reason, 0) + 1
    if stale:
        where = set_aside(out_dir, kept, stale, "stale")
        if log:
            why = "; ".join(f"{n} {reason}" for reason, n in reasons.items())
            log(f"set aside {len(stale)} stale record(s) in {where} ({why}); their runs are trained again")
    return done


def with_eval_caches(runs: list[GridRun], eval_caches: list[Path]) -> list[GridRun]:
    """The runs keyed for these evaluation caches: a run's id covers every cache it reads, so runs expanded
    without (or with other) evaluation caches get their inputs and ids anew."""
    want = [str(Path(p).resolve()) for p in eval_caches]
    targets, caches, out = None, {}, []
    for r in runs:
        if [i.path for i in r.inputs if i.role == "eval"] == want:
            out.append(r)
            continue
        targets = targets if targets is not None else [open_cache(p) for p in eval_caches]
        cache = caches.setdefault(r.cache, open_cache(r.cache))
        inputs = run_inputs(cache, r.config.backbone, targets, r.config.fg_source)
        out.append(dataclasses.replace(r, inputs=inputs, run_id=run_id(inputs, r.config)))
    return out


def _run_grid(runs: list[GridRun], out_dir: Path, *, resume: bool, batched: bool, save_heads: bool,
              eval_caches: list[Path], progress, log, memory_budget: int | None, should_stop,
              on_record) -> list[RunRecord]:
    results_path = out_dir / "results.jsonl"
    runs = with_eval_caches(runs, eval_caches)
    done = _resume(runs, out_dir, resume, log)
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
        curve = curve_data(cache, cfgs[0].backbone, cfgs[0].classes)
        sets: dict = {}  # the test features for evaluation, read when the first configuration is done

        def write(i: int, item, members=members, cfgs=cfgs, cache=cache, data=data, t1=t1, sets=sets) -> None:
            nonlocal finished
            head, history, images = item
            m, cfg = members[i], cfgs[i]
            if not sets:
                sets.update(eval_sets(cache, targets, cfg.backbone))
            seconds = {"load": t1 - t0, "train": (time.perf_counter() - t1) / len(cfgs), "group_size": len(cfgs)}
            record = finish_run(cache, cfg, data.source(cfg.fg_source).subset(images), head, history, seconds, targets,
                                out_dir / "runs" / m.run_id, save=save_heads, preset=m.preset, evalsets=sets)
            if record.run_id != m.run_id:  # the cache changed between expand and training
                raise RuntimeError(f"{cache.path} changed while the grid ran (run {m.run_id} read content "
                                   f"{record.run_id}); rerun the grid")
            record = record.replace(params=m.params, ablations=m.ablations)
            with results_path.open("a") as fh:  # each run as soon as it is done: an interruption loses no finished run
                fh.write(record.dumps() + "\n")
            records.append(record)
            if on_record:
                on_record(record)
            finished += 1
            if progress:
                progress(finished, len(runs))

        offset = 0
        for part in parts:
            train_group(data, part, device, curve=curve, should_stop=should_stop,
                        on_finished=lambda i, item, offset=offset: write(offset + i, item))
            offset += len(part)
    return records
