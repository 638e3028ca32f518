"""Ablation grids: many FVG-PT configurations trained together, batched across configurations.

Configurations that share every shape and data setting (a *group*) train in one loop: their
parameters are stacked, one `torch.func.vmap`-ed gradient call serves all of them per step, and
one optimiser step (the same torch.optim class and settings as `train`) updates all of them.
Each configuration keeps its own initialisation, shuffling and view draws (from its seed), so
its numbers equal a single `train` run of it within float tolerance. Configurations that differ
in shapes, data or optimiser settings go to different groups.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from .runs import finish_run, run_id
from .store import check_same_model, open_cache
from .training import (
    TrainConfig, TrainData, build_head, config_with, configure, epoch_batches, lr_at_epoch, make_optimizer, parse_value,
    prepare, resolve_device, subsample_per_class, view_schedule,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Fields that may differ between configurations trained in one batched group (the optimiser's
# settings may not: one fused SGD steps the whole group).
PER_CONFIG = ("seed", "lambda_d", "device")

# The paper's ablations as lists of overrides (each list item is one configuration).
PRESETS: dict[str, list[dict]] = {
    # Table 3: (1) FDC, (2) PC, (3) FRG+FDC, (4) FDC+PC, (5) full
    "components": [
        {"use_frg": False, "use_pc": False}, {"use_fdc": False}, {"use_pc": False}, {"use_frg": False}, {},
    ],
    # Table 12: drop one loss at a time, and the full model
    "losses": [{"loss_frg": False}, {"loss_ce_fdc": False}, {"loss_dist": False}, {"loss_ce_pc": False},
               {"loss_kl_pc": False}, {}],
    # Table 6: drop one indicator group at a time (FRG: distribution, similarity, geometric; BRG: distribution, similarity)
    "indicators": [{"frg_indicators": ("cos", "area")}, {"frg_indicators": ("dH", "area")},
                   {"frg_indicators": ("dH", "cos")}, {"brg_indicators": ("cos",)},
                   {"brg_indicators": ("H_bb", "H_clip")}, {}],
    # Table 5: layers of the gate MLPs
    "depth": [{"frg_layers": n, "brg_layers": n} for n in (1, 2, 3)],
    # Table 4: hidden widths of the FDC adapters, then of the gates
    "width": [{"fdc_hidden": w} for w in (16, 32, 64, 128)] + [{"gate_hidden": w} for w in (16, 64, 128)],
    # Fig. 4(b)
    "lambda": [{"lambda_d": v} for v in (0.1, 1.0, 5.0, 10.0, 20.0)],
    # Fig. 9
    "data-fraction": [{"data_fraction": f} for f in (0.25, 0.5, 0.75, 1.0)],
    # Table 13
    "fdc-branches": [{"fdc_textual": True}, {"fdc_textual": False}],
    # Table 15
    "epochs": [{"epochs": e} for e in (10, 15, 20)],
    # is a gain the foreground's or the anchoring to the backbone's? r from FRG, always 0 (full view), always 1
    "foreground-control": [{}, {"r_source": "full"}, {"r_source": "fg"}],
}


@dataclass
class GridRun:
    cache: Path
    config: TrainConfig
    params: dict
    run_id: str
    preset: dict | None = None


def parse_params(items: list[str]) -> dict[str, list]:
    """`--param lambda_d=0.1,1,5` → {"lambda_d": [0.1, 1.0, 5.0]}, typed and validated."""
    out: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param {item!r}: write NAME=V1,V2,…")
        name, values = item.split("=", 1)
        name = name.strip()
        out[name] = [parse_value(name, v) for v in values.split(",") if v.strip()]
        if not out[name]:
            raise ValueError(f"--param {name}: give at least one value")
    return out


def read_grid_file(path: Path) -> tuple[dict[str, list], dict]:
    """A TOML grid: `[params]` lists per parameter, optional `[base]` fixed settings, `seeds`, `preset`."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read grid file {path}: {exc}") from exc
    params = {}
    for name, values in raw.get("params", {}).items():
        values = values if isinstance(values, list) else [values]
        params[name] = [parse_value(name, v if isinstance(v, str) else _toml_text(v)) for v in values]
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
    variants = PRESETS[preset] if preset else [{}]
    names = list(params)
    runs, seen = [], set()
    for cache_path in caches:
        cache = open_cache(cache_path)
        for seed in seeds:
            for variant in variants:
                for combo in itertools.product(*(params[n] for n in names)):
                    chosen = {**variant, **dict(zip(names, combo))}
                    cfg, info = configure(cache, {**base, **chosen, "seed": seed}, preset_of)
                    rid = run_id(Path(cache_path), cfg)
                    if rid not in seen:
                        seen.add(rid)
                        runs.append(GridRun(Path(cache_path), cfg, _jsonable(chosen), rid, info))
    return runs


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def group_key(run: GridRun) -> tuple:
    d = run.config.to_dict()
    return (str(run.cache),) + tuple((k, json.dumps(d[k])) for k in sorted(d) if k not in PER_CONFIG)


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


class _Loss(nn.Module):
    """Wraps `FVGPTHead.losses_from` as a forward so `functional_call` can swap in stacked parameters."""

    def __init__(self, head, txt_bb, scale, flags):
        super().__init__()
        self.head, self.txt_bb, self.scale, self.flags = head, txt_bb, scale, flags

    def forward(self, frozen, lambda_d):
        return self.head.losses_from(frozen, self.txt_bb, self.scale, lambda_d, **self.flags)


def train_group(data: TrainData, cfgs: list[TrainConfig], labels: np.ndarray) -> list[tuple]:
    """Train configurations that share shapes, data and optimiser settings together.

    Returns (head, history) for each. The stacked parameters are ordinary leaf tensors: a vmapped
    forward, one backward of the summed losses (configurations share no parameters, so each gets
    its own gradient) and one optimiser step on the stacks reproduce K separate runs.
    """
    ref = cfgs[0]
    device = resolve_device(ref.device)
    k, views = len(cfgs), data.full.shape[1]
    heads = [build_head(data.full.shape[-1], c) for c in cfgs]
    template = heads[0].to(device)
    flat = lambda t: t.flatten(0, 1).to(device)  # noqa: E731
    frozen = template.frozen(flat(data.full), flat(data.fg), flat(data.clip), flat(data.area),
                             data.y.repeat_interleave(views).to(device), data.txt_bb.to(device),
                             data.txt_clip.to(device), data.scale)
    txt_bb = data.txt_bb.to(device)
    subsets = [torch.from_numpy(subsample_per_class(labels, c.data_fraction, c.seed)) for c in cfgs]
    n = len(subsets[0])
    names = [name for name, _ in template.named_parameters()]
    params = {name: torch.stack([dict(h.named_parameters())[name].detach() for h in heads]).to(device).requires_grad_()
              for name in names}
    optimizer = make_optimizer(params.values(), ref) if params else None
    loss_module = _Loss(template, txt_bb, data.scale, ref.loss_flags())

    def loss_fn(p, batch, lambda_d):
        return functional_call(loss_module, {f"head.{name}": v for name, v in p.items()}, (batch, lambda_d))

    forward = vmap(loss_fn, in_dims=(0, 0, 0))
    lambdas = torch.tensor([c.lambda_d for c in cfgs], dtype=torch.float32, device=device)
    gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    schedules = [view_schedule(n, views, c.epochs, c.seed) for c in cfgs]
    histories: list[list[dict]] = [[] for _ in cfgs]
    for epoch in range(ref.epochs):
        lr = lr_at_epoch(epoch, ref)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        per_config = [epoch_batches(n, c, g) for c, g in zip(cfgs, gens)]
        totals: dict[str, torch.Tensor] = {}
        for step in range(len(per_config[0])):
            rows = torch.stack([subsets[i][per_config[i][step]] * views + schedules[i][epoch, per_config[i][step]]
                                for i in range(k)]).to(device)
            losses = forward(params, {key: v[rows] for key, v in frozen.items()}, lambdas)
            if optimizer is not None and losses["total"].requires_grad:
                optimizer.zero_grad(set_to_none=True)
                losses["total"].sum().backward()
                optimizer.step()
            for key, v in losses.items():
                totals[key] = totals[key] + v.detach() if key in totals else v.detach()
        steps = max(len(per_config[0]), 1)
        for i in range(k):
            histories[i].append({"epoch": epoch, "lr": lr, **{key: float(v[i]) / steps for key, v in totals.items()}})
    out = []
    for i, head in enumerate(heads):
        head.load_state_dict({name: params[name][i].detach().cpu() for name in names})
        out.append((head.eval(), histories[i]))
    return out


def run_grid(runs: list[GridRun], out_dir: Path, *, resume: bool = True, batched: bool = True,
             save_heads: bool = False, eval_caches: list[Path] = (), progress=None) -> list[dict]:
    """Train and evaluate `runs`, appending one JSON line per finished run to `out_dir/results.jsonl`."""
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
        full_cfg = config_with(members[0].config, data_fraction=1.0)
        data = prepare(cache, full_cfg)
        cfgs = [config_with(m.config, backbone=data.meta["backbone"]) for m in members]
        t1 = time.perf_counter()
        trained = train_group(data, cfgs, data.y.numpy())
        seconds = {"load": t1 - t0, "train": (time.perf_counter() - t1) / len(cfgs), "group_size": len(cfgs)}
        with results_path.open("a") as fh:
            for m, cfg, (head, history) in zip(members, cfgs, trained):
                run_data = data if cfg.data_fraction >= 1 else prepare(cache, cfg)
                record = finish_run(cache, cfg, run_data, head, history, seconds, targets,
                                    out_dir / "runs" / m.run_id, save=save_heads, preset=m.preset)
                record["run_id"] = m.run_id
                record["params"] = m.params
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                records.append(record)
                finished += 1
                if progress:
                    progress(finished, len(runs))
    return records
