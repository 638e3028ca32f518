"""Aggregating runs into the paper's tables: mean ± std over seeds, averages over datasets, exports.

Conventions (docs/method.md#protocols): Base and New are averaged over seeds first, then HM is taken of the
averages (the CoOp-family convention); the per-seed HM mean and its standard deviation are
reported beside it. Standard deviations are sample standard deviations (ddof = 1; 0 for one seed).
"""
from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .ablations import ABLATIONS
from .equations import harmonic_mean
from .methods import find_backbone_method
from .parameters import lookup
from .records import RunRecord, read_lines, read_record
from .statistics import CI_METHODS, mean_interval, overlap, paired_difference
from .store import FINGERPRINT_CHARS
from .training import TrainConfig

METHODS = ("zeroshot", "backbone", "fvgpt")
METHOD_NAMES = {"zeroshot": "Zero-shot CLIP", "backbone": "{backbone}", "fvgpt": "+FVG-PT"}
IGNORED_IN_LABEL = ("seed", "device", "backbone")


def paper_label(backbone: str) -> str | None:
    """The paper's column for a backbone named after its method (coop → CoOp), from the method registry."""
    method = find_backbone_method(backbone.lower())
    return None if method is None else method.label


def load_records(paths: list[str | Path]) -> list[RunRecord]:
    """Results from `results.jsonl` (grids), `results.json` (train) files, or folders holding them."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("results.jsonl")) + sorted(p.rglob("results.json"))
            if not found:
                raise FileNotFoundError(f"no results.jsonl or results.json under {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"results not found: {p}")
    records, seen = [], set()
    for f in files:
        for rec in read_lines(f) if f.suffix == ".jsonl" else [read_record(f)]:
            key = (rec.run_id, rec.cache)
            if key not in seen:
                seen.add(key)
                records.append(rec)
    if not records:
        raise ValueError(f"no runs found in {', '.join(map(str, paths))}")
    return records


def config_label(config: dict) -> str:
    """The settings that differ from the defaults, e.g. 'lambda_d=5, use_frg=False' ('default' if none)."""
    defaults = TrainConfig().to_dict()
    parts = []
    for key in sorted(config):
        if key in IGNORED_IN_LABEL:
            continue
        value = config[key]
        if key not in defaults or value != defaults[key]:
            parts.append(f"{key}={'+'.join(map(str, value)) if isinstance(value, list) else value}")
    return ", ".join(parts) or "default"


# What makes the numbers of two runs comparable, besides the dataset. Runs are pooled over seeds
# only when all of these agree; the ones that differ between groups are shown in the tables.
SETTING_FIELDS = ("backbone", "config", "model", "shots", "views", "fg_mode", "rrc", "dtype", "backbone_setup")
SHORT_NAMES = {"model": "model", "shots": "shots", "views": "views", "fg_mode": "fg", "rrc": "rrc", "dtype": "dtype",
               "backbone_setup": "bb"}
# Backbone provenance that changes with the seed or the machine, not with what the backbone is.
BACKBONE_VOLATILE = ("seed", "created", "checkpoint", "checkpoint_sha256", "clip_model", "open_clip_version", "device")


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _model_base_label(prov: dict) -> str:
    if not prov:
        return "?"
    model = str(prov.get("model") or "?")
    name = Path(model).stem if model.endswith(".json") else model
    if prov.get("random_init") or prov.get("pretrained") in (None, "none"):
        weights = f"random{'' if prov.get('init_seed') is None else ' seed ' + str(prov['init_seed'])}"
    elif prov.get("pretrained_sha256"):
        weights = "sha " + str(prov["pretrained_sha256"])[:8]
    else:
        weights = str(prov.get("pretrained"))
    return f"{name}/{weights}"


def _backbone_identity(prov: dict | None) -> dict:
    if not prov:
        return {}
    ident = {k: v for k, v in prov.items() if k not in BACKBONE_VOLATILE}
    if isinstance(ident.get("options"), dict):
        ident["options"] = {k: v for k, v in ident["options"].items() if k not in BACKBONE_VOLATILE}
    return ident


def _labels(idents: dict[str, tuple[str, dict]]) -> dict[str, str]:
    """Readable labels for identities (key → (base label, identity dict)); equal base labels of
    different identities get the fields that tell them apart."""
    by_base: dict[str, list[str]] = {}
    for key, (base, _) in idents.items():
        by_base.setdefault(base, []).append(key)
    out = {}
    for base, keys in by_base.items():
        if len(keys) == 1:
            out[keys[0]] = base
            continue
        flats = {k: _flat(idents[k][1]) for k in keys}
        fields = sorted({f for fl in flats.values() for f in fl})
        differ = [f for f in fields if len({_json(fl.get(f)) for fl in flats.values()}) > 1]
        for k in keys:
            detail = ", ".join(f"{f}={flats[k].get(f)}" for f in differ[:3])
            out[k] = f"{base} ({detail or k[:8]})"
    return out


def run_fields(records: list[RunRecord]) -> list[dict]:
    """For each record: the dataset, its template and every SETTING_FIELDS value, as display strings.

    The model is known by its identity (`store.model_identity`: weights and config by SHA-256), a
    backbone by its provenance without seed and checkpoint, the configuration by every field but
    the seed; records from before provenance was saved show '?'.
    """
    from .store import model_identity

    models, backbones, rows = {}, {}, []
    for rec in records:
        prov = rec.cache_provenance
        ident = {**(model_identity(prov) if prov else {}), "D": rec.feature_dim}
        model_key = _json(ident)
        dim = "" if rec.feature_dim is None else f" D{rec.feature_dim}"
        models.setdefault(model_key, (_model_base_label(prov) + dim, ident))
        bb_ident = _backbone_identity(rec.backbone_provenance)
        bb_key = _json(bb_ident)
        backbones.setdefault(bb_key, (str(bb_ident.get("method", "-")), bb_ident))
        aug = prov.get("augmentation") or {}
        rows.append({
            "dataset": rec.dataset or Path(rec.cache).stem,
            "template": prov.get("template"),
            "backbone": rec.backbone,
            "config": config_label(rec.config),
            "model": model_key,
            "shots": "?" if not prov else ("all" if prov.get("shots") == 0 else str(prov.get("shots"))),
            "views": str((prov.get("views") or {}).get("train", "?")),
            "fg_mode": str(prov.get("fg_mode", "?")),
            "rrc": "-".join(f"{x:g}" for x in aug["random_resized_crop_scale"]) if aug.get("random_resized_crop_scale")
            else "?",
            "dtype": str(prov.get("store_dtype", "?")),
            "backbone_setup": bb_key,
        })
    model_labels, bb_labels = _labels(models), _labels(backbones)
    for row in rows:
        row["model"] = model_labels[row["model"]]
        row["backbone_setup"] = bb_labels[row["backbone_setup"]]
    return rows


def varying_fields(rows: list[dict], fields=SETTING_FIELDS) -> list[str]:
    return [f for f in fields if len({r[f] for r in rows}) > 1]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass
class Cell:
    """One method on one dataset for one configuration, over seeds."""

    base: list[float] = field(default_factory=list)
    new: list[float] = field(default_factory=list)
    all: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # the seed of each value, in order
    collapsed: list[int] = field(default_factory=list)  # seeds whose run was flagged as collapsed

    def summary(self, ci: str = "t") -> dict:
        """Means, sample standard deviations and `ci` intervals of the mean (95 %; `statistics.mean_interval`)
        over seeds; HM is the HM of the means, `hm_ci` the interval of the per-seed HMs' mean."""
        out: dict = {"n_seeds": max(len(self.base), len(self.all)), "collapsed_seeds": sorted(self.collapsed),
                     "ci_method": ci}
        if self.base and self.new:
            b, n = _mean(self.base), _mean(self.new)
            per_seed = [harmonic_mean(x, y) for x, y in zip(self.base, self.new)]
            out.update(base=b, base_std=_std(self.base), new=n, new_std=_std(self.new), hm=harmonic_mean(b, n),
                       hm_seed_mean=_mean(per_seed), hm_seed_std=_std(per_seed),
                       base_ci=mean_interval(self.base, ci), new_ci=mean_interval(self.new, ci),
                       hm_ci=mean_interval(per_seed, ci),
                       per_seed={s: {"base": x, "new": y, "hm": h}
                                 for s, x, y, h in zip(self.seeds, self.base, self.new, per_seed)})
        if self.all:
            out.update(all=_mean(self.all), all_std=_std(self.all), all_ci=mean_interval(self.all, ci),
                       per_seed={s: {"all": x} for s, x in zip(self.seeds, self.all)})
        return out


def aggregate(records: list[RunRecord], ci: str = "t") -> dict:
    """Runs pooled over seeds only when everything that makes numbers comparable agrees.

    Returns {key: group}, key = the group's SETTING_FIELDS values. A group has `setting` (those
    values), `title` (backbone, configuration and every setting that differs between groups),
    `datasets` {row: {method: summary}}, `runs` {row: [records]} (so per-run flags can be counted
    per row), `seeds`, `average` and `cross`. A row is the dataset name, with its template when one
    dataset name comes with several templates. Unlike runs are never averaged together.
    """
    fields = run_fields(records)
    templates: dict[str, set] = {}
    for f in fields:
        templates.setdefault(f["dataset"], set()).add(f["template"])
    varying = varying_fields(fields)
    groups: dict[tuple, dict] = {}
    for rec, f in zip(records, fields):
        key = tuple(f[k] for k in SETTING_FIELDS)
        title_parts = [f"backbone {f['backbone']}", f["config"]]
        title_parts += [f"{SHORT_NAMES[k]} {f[k]}" for k in varying if k not in ("backbone", "config")]
        g = groups.setdefault(key, {"setting": {k: f[k] for k in SETTING_FIELDS}, "title": " · ".join(title_parts),
                                    "cells": {}, "cross": {}, "seeds": {}, "runs": {}})
        ds = f["dataset"]
        if len(templates[ds]) > 1:
            ds = f"{ds} [template {f['template']!r}]"
        g["seeds"].setdefault(ds, []).append(rec.seed)
        g["runs"].setdefault(ds, []).append(rec)
        for method in METHODS:
            cell = g["cells"].setdefault(ds, {}).setdefault(method, Cell())
            m = rec.metrics[method]
            if m.get("base") is not None and m.get("new") is not None:
                cell.base.append(m["base"])
                cell.new.append(m["new"])
                cell.seeds.append(rec.seed)
            if m.get("all") is not None:
                cell.all.append(m["all"])
                if not (m.get("base") is not None and m.get("new") is not None):
                    cell.seeds.append(rec.seed)
            if method == "fvgpt" and rec.collapsed:
                cell.collapsed.append(rec.seed)
        for target in rec.cross_dataset:
            for method in METHODS:
                g["cross"].setdefault(ds, {}).setdefault(target["dataset"], {}).setdefault(method, []).append(target[method])
    out = {}
    for key, g in groups.items():
        for ds, runs in g["runs"].items():
            check_one_run_per_seed(ds, g["title"], runs)
        datasets = {ds: {m: c.summary(ci) for m, c in cells.items()} for ds, cells in sorted(g["cells"].items())}
        out[key] = {"setting": g["setting"], "title": g["title"], "datasets": datasets, "average": _average(datasets),
                    "seeds": g["seeds"], "runs": g["runs"],
                    "cross": {src: {tgt: {m: {"mean": _mean(v), "std": _std(v), "n_seeds": len(v)} for m, v in ms.items()}
                                    for tgt, ms in tg.items()} for src, tg in g["cross"].items()}}
    return out


def check_one_run_per_seed(dataset: str, title: str, runs: list[RunRecord]) -> None:
    """Refuse a table cell that would pool two runs of one seed: they were computed from different
    inputs (cache contents, or evaluation caches), and averaging them would pass for a seed mean."""
    by_seed: dict[int, list[RunRecord]] = {}
    for rec in runs:
        by_seed.setdefault(rec.seed, []).append(rec)
    for seed, recs in sorted(by_seed.items()):
        if len(recs) < 2:
            continue
        a, b = recs[:2]
        fa, fb = a.train_fingerprint, b.train_fingerprint
        what = ("caches of different content" if fa and fb and fa != fb else
                "caches of unknown content (records written before fingerprints)" if not (fa and fb) else
                "the same cache but other inputs (evaluation caches)")
        show = lambda r, fp: f"{r.cache} (content {fp[:FINGERPRINT_CHARS] if fp else '?'}, run {r.run_id})"  # noqa: E731
        raise ValueError(f"{dataset}, seed {seed} ({title}): {len(recs)} runs computed from {what} would be pooled "
                         f"under one name: {show(a, fa)} and {show(b, fb)}. Report them from separate results files, "
                         "or move the stale ones away (grid keeps set-aside records in OUT/stale/)")


def _average(datasets: dict) -> dict | None:
    """'Average over N datasets': mean of the seed-averaged Base and New, HM of those means."""
    with_bn = [d for d in datasets.values() if "base" in d["fvgpt"]]
    if len(with_bn) < 2:
        return None
    avg = {"n_datasets": len(with_bn)}
    for m in METHODS:
        b, n = _mean([d[m]["base"] for d in with_bn]), _mean([d[m]["new"] for d in with_bn])
        avg[m] = {"base": b, "new": n, "hm": harmonic_mean(b, n)}
    return avg


def load_paper() -> dict:
    return json.loads(resources.files("fvgpt_cache").joinpath("reference/paper.json").read_text())


def paper_rows(backbone: str, datasets: list[str]) -> dict:
    """The paper's Table 1 numbers for a backbone name we know (coop, kgcoop, ...), by dataset."""
    name = paper_label(backbone)
    if name is None:
        return {}
    t1 = load_paper()["table1_base_to_new"]
    key = {"average": "average"}
    return {ds: {"backbone": t1[key.get(ds, ds)][name], "fvgpt": t1[key.get(ds, ds)][f"{name}+FVG-PT"]}
            for ds in [*datasets, "average"] if key.get(ds, ds) in t1 and name in t1[key.get(ds, ds)]}


def rows(summary: dict) -> list[dict]:
    """Flat rows (one per setting, dataset, method) for CSV and JSON; every setting field is a column."""
    out = []
    for g in summary.values():
        setting = g["setting"]
        for ds, methods in g["datasets"].items():
            for method, s in methods.items():
                out.append({**setting, "dataset": ds, "method": method, **_flat_intervals(s)})
        if g["average"]:
            for method in METHODS:
                out.append({**setting, "dataset": f"average ({g['average']['n_datasets']})", "method": method,
                            **g["average"][method]})
        for src, targets in g["cross"].items():
            for tgt, methods in targets.items():
                for method, s in methods.items():
                    out.append({**setting, "dataset": f"{src}->{tgt}", "method": method,
                                "all": s["mean"], "all_std": s["std"], "n_seeds": s["n_seeds"]})
    return out


CI_KEYS = ("base", "new", "hm", "all")


def _flat_intervals(s: dict) -> dict:
    """A summary with each `<key>_ci` interval as `<key>_ci_low`, `<key>_ci_high` columns (per-seed values kept)."""
    out = {k: v for k, v in s.items() if not k.endswith("_ci")}
    for key in CI_KEYS:
        if f"{key}_ci" in s:
            ci = s[f"{key}_ci"]
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = (None, None) if ci is None else ci
    return out


def to_csv(summary: dict) -> str:
    data = rows(summary)
    cols = [*SETTING_FIELDS[:2], "dataset", "method", "n_seeds", "collapsed_seeds", "ci_method",
            "base", "base_std", "base_ci_low", "base_ci_high", "new", "new_std", "new_ci_low", "new_ci_high",
            "hm", "hm_seed_mean", "hm_seed_std", "hm_ci_low", "hm_ci_high", "all", "all_std", "all_ci_low",
            "all_ci_high", *SETTING_FIELDS[2:]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in data:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def to_json(summary: dict) -> str:
    return json.dumps(rows(summary), indent=1)


def _spread(s: dict, key: str, sep: str) -> str:
    """'± 0.00' included: a spread is shown whenever there are two seeds or more, even when it is zero."""
    sd = s.get(f"{key}_std")
    return f"{sep}±{sep}{sd:.2f}" if sd is not None and s.get("n_seeds", 1) > 1 else ""


def _interval(s: dict, key: str, sep: str = " ") -> str:
    """'[79.51, 84.49]': the confidence interval of the mean ('' for one seed)."""
    ci = s.get(f"{key}_ci")
    return f"{sep}[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _fmt(s: dict, key: str, std: bool = True) -> str:
    if s.get(key) is None:
        return "-"
    return f"{s[key]:.2f}" + (_spread(s, key, " ") + _interval(s, key) if std else "")


def table_rows(backbone: str, g: dict, compare_paper: bool = False) -> tuple[list[str], list[list[str]]]:
    """Table 1 layout: a row per dataset (and the average): zero-shot, backbone, +FVG-PT (B, N, HM), ΔHM."""
    header = ["Dataset", "CLIP B", "CLIP N", "CLIP HM", f"{backbone} B", f"{backbone} N", f"{backbone} HM",
              "+FVG-PT B", "+FVG-PT N", "+FVG-PT HM", "ΔHM", "Seeds"]
    body = []
    paper = paper_rows(backbone, list(g["datasets"])) if compare_paper else {}
    items = list(g["datasets"].items())
    for ds, methods in items:
        if "base" not in methods["fvgpt"]:
            continue
        cells = [ds]
        for m in METHODS:
            cells += [_fmt(methods[m], "base"), _fmt(methods[m], "new"), f"{methods[m]['hm']:.2f}"]
        cells.append(f"{methods['fvgpt']['hm'] - methods['backbone']['hm']:+.2f}")
        cells.append(str(methods["fvgpt"]["n_seeds"]))
        flagged = methods["fvgpt"].get("collapsed_seeds")
        if flagged:
            cells[0] += f" (collapsed: seed {', '.join(map(str, flagged))})"
        body.append(cells)
        if ds in paper:
            body.append(_paper_row(ds, paper[ds]))
    if g["average"]:
        a = g["average"]
        cells = [f"Average over {a['n_datasets']}"]
        for m in METHODS:
            cells += [f"{a[m]['base']:.2f}", f"{a[m]['new']:.2f}", f"{a[m]['hm']:.2f}"]
        cells.append(f"{a['fvgpt']['hm'] - a['backbone']['hm']:+.2f}")
        cells.append("")
        body.append(cells)
        if "average" in paper:
            body.append(_paper_row("average", paper["average"]))
    return header, body


def _paper_row(ds: str, p: dict) -> list[str]:
    cells = [f"{ds} (paper)", "", "", ""]
    for m in ("backbone", "fvgpt"):
        cells += [f"{p[m]['base']:.2f}", f"{p[m]['new']:.2f}", f"{p[m]['hm']:.2f}"]
    cells.append(f"{p['fvgpt']['hm'] - p['backbone']['hm']:+.2f}")
    cells.append("")
    return cells


def cross_rows(backbone: str, g: dict, compare_paper: bool = False) -> tuple[list[str], list[list[str]]] | None:
    """Table 2 layout: source accuracy (FDC, all classes) and each target (PC branch), mean over seeds."""
    if not g["cross"]:
        return None
    body, header = [], None
    for src, targets in g["cross"].items():
        names = sorted(targets)
        header = ["Method", f"{src} (source)", "Avg. targets", *names, "Seeds"]
        src_cell = g["datasets"].get(src, {})
        for m in METHODS:
            vals = [targets[t][m]["mean"] for t in names]
            source = src_cell.get(m, {}).get("all")
            body.append([METHOD_NAMES[m].format(backbone=backbone), "-" if source is None else f"{source:.2f}",
                         f"{_mean(vals):.2f}", *[f"{v:.2f}" for v in vals],
                         str(min(targets[t][m]["n_seeds"] for t in names))])
        name = paper_label(backbone)
        t2 = load_paper()["table2_cross_dataset"] if compare_paper and name else {}
        if name in t2:
            for key in (name, f"{name}+FVG-PT"):
                body.append([f"{key} (paper)", f"{t2[key]['imagenet']:.2f}", f"{t2[key]['average_target']:.2f}",
                             *[f"{t2[key][t]:.2f}" if t in t2[key] else "" for t in names], ""])
    return header, body


def tables(summary: dict, compare_paper: bool = False, extra=()):
    """Every non-empty table of a summary: (title, header, body) in Table 1, then Table 2, layout; then `extra`."""
    for g in summary.values():
        backbone = g["setting"]["backbone"]
        for kind, table in (("Base-to-new", table_rows(backbone, g, compare_paper)),
                            ("Cross-dataset", cross_rows(backbone, g, compare_paper))):
            if table and table[1]:
                yield f"{kind} · {g['title']}", table[0], table[1]
    yield from extra


def _pm(s: dict, key: str) -> str:
    """'82.00±2.00' (no spaces, to fit a terminal; '±0.00' too), '82.00' for one seed, '-' when missing."""
    if s.get(key) is None:
        return "-"
    return f"{s[key]:.2f}" + _spread(s, key, "")


def _ci_short(s: dict, key: str, centre: str | None = None) -> str:
    """An interval in a few characters: '±2.51' when it is symmetric about the mean (Student's t), else
    'lo–hi' (bootstrap); '-' when missing."""
    ci, mid = s.get(f"{key}_ci"), s.get(centre or key)
    if not ci or mid is None:
        return "-"
    lo, hi = ci
    if abs((mid - lo) - (hi - mid)) < 1e-6:
        return f"±{hi - mid:.2f}"
    return f"{lo:.1f}–{hi:.1f}"


def console_tables(summary: dict, compare_paper: bool = False, extra=()):
    """The same tables in a layout that fits 80 columns: (title, header, rows, kinds).

    Base-to-new: a line with the dataset and its number of runs (n), then one line per method
    (Base, New, HM, ΔHM vs the backbone). Cross-dataset: one line per target, one column per
    method. `extra` tables (the ablations, already narrow) follow as they are. `kinds[i]` is
    "dataset", "method", "ci" (the intervals of the methods' means, `statistics.mean_interval`; for HM the
    interval of the per-seed HMs' mean) or "paper" for row i.
    """
    for g in summary.values():
        backbone = g["setting"]["backbone"]
        names = {"zeroshot": "CLIP", "backbone": backbone, "fvgpt": "+FVG-PT"}
        header, body, kinds = ["", "Base", "New", "HM", "ΔHM", "n"], [], []
        paper = paper_rows(backbone, list(g["datasets"])) if compare_paper else {}
        entries = [(ds, m, str(len(g["seeds"][ds]))) for ds, m in g["datasets"].items() if "base" in m["fvgpt"]]
        if g["average"]:
            entries.append((f"Average over {g['average']['n_datasets']}", g["average"], ""))
        for ds, methods, n in entries:
            flagged = methods["fvgpt"].get("collapsed_seeds")
            label = ds + (f" (collapsed: seed {', '.join(map(str, flagged))})" if flagged else "")
            body.append([label, "", "", "", "", n])
            kinds.append("dataset")
            for m in METHODS:
                s = methods[m]
                delta = f"{s['hm'] - methods['backbone']['hm']:+.2f}" if m == "fvgpt" else ""
                body.append([f"  {names[m]}", _pm(s, "base"), _pm(s, "new"), f"{s['hm']:.2f}", delta, ""])
                kinds.append("method")
            for m in METHODS:  # the intervals of the means, after the methods' lines (one seed: none)
                s = methods[m]
                if s.get("base_ci"):
                    body.append([f"  95% CI {names[m]}", _ci_short(s, "base"), _ci_short(s, "new"),
                                 _ci_short(s, "hm", "hm_seed_mean"), "", ""])
                    kinds.append("ci")
            key = "average" if ds.startswith("Average over") else ds
            if key in paper:
                p = paper[key]
                for m in ("backbone", "fvgpt"):
                    delta = f"{p['fvgpt']['hm'] - p['backbone']['hm']:+.2f}" if m == "fvgpt" else ""
                    body.append([f"  {names[m]} (paper)", f"{p[m]['base']:.2f}", f"{p[m]['new']:.2f}",
                                 f"{p[m]['hm']:.2f}", delta, ""])
                    kinds.append("paper")
        if body:
            yield f"Base-to-new · {g['title']}", header, body, kinds
        cross = cross_rows(backbone, g, compare_paper)
        if cross and cross[1]:
            wide_header, wide = cross
            methods = [r for r in wide if not r[0].endswith("(paper)")]
            papers = [r for r in wide if r[0].endswith("(paper)")]
            header = ["Target", *[names[m] for m in METHODS], *[r[0].replace(" (paper)", " (p)") for r in papers]]
            body, kinds = [], []
            for i, label in enumerate(wide_header[1:], start=1):
                body.append([label.replace(" (source)", " (src)"), *[r[i] for r in methods], *[r[i] for r in papers]])
                kinds.append("method")
            yield f"Cross-dataset · {g['title']}", header, body, kinds
    for title, header, body in extra:
        yield title, header, body, ["method"] * len(body)


FULL_ROWS = ("(5) FRG+FDC+PC", "all indicators", "all losses", "visual + textual", "2 layers", "FDC 64", "λ_d = 10",
             "100% of the shots", "10 epochs", "r from FRG (FVG-PT)")


def ablation_tables(records: list[RunRecord]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The paper's ablation tables from grid runs that carry `ablations` (grid --preset …):

    one table per ablation and backbone, a row per variant in the paper's order: Base and New as
    means over datasets of the seed means, HM of those, ΔHM against the full model's row, and the
    seeds of each row whose run collapsed. Runs of different datasets are averaged only for a
    variant that has runs on every dataset of the table. As in `aggregate`, runs are pooled only
    when their setting agrees (model, shots, views, …, backbone, and every TrainConfig field the
    ablation does not vary); settings that differ get tables of their own, named in the titles."""

    cells: dict[tuple, dict] = {}
    settings: dict[tuple, dict] = {}
    for rec, f in zip(records, run_fields(records)):
        for ablation, label in rec.ablations or []:
            varied = {k for _, overrides in ABLATIONS[ablation][1] for k in overrides}
            setting = {**{k: f[k] for k in SETTING_FIELDS},
                       "config": config_label({k: v for k, v in rec.config.items() if k not in varied})}
            key = (ablation, tuple(setting.values()))
            settings[key] = setting
            row = cells.setdefault(key, {}).setdefault(label, {})
            m = rec.metrics["fvgpt"]
            if m.get("base") is None:
                continue
            ds = row.setdefault(rec.dataset, {"base": [], "new": [], "seeds": [], "collapsed": []})
            ds["base"].append(m["base"])
            ds["new"].append(m["new"])
            ds["seeds"].append(rec.seed)
            if rec.collapsed:
                ds["collapsed"].append(rec.seed)
    varying = {ablation: varying_fields([v for k, v in settings.items() if k[0] == ablation]) for ablation, _ in settings}
    out = []
    for (ablation, key), rows in cells.items():
        setting = settings[(ablation, key)]
        backbone = setting["backbone"]
        title, order = ABLATIONS[ablation]
        datasets = sorted(set.union(*(set(r) for r in rows.values())))
        body, full_hm, full_label = [], None, None
        summaries = {}
        for label, _ in order:
            per_ds = rows.get(label, {})
            if set(per_ds) != set(datasets):
                continue
            b = _mean([_mean(per_ds[d]["base"]) for d in datasets])
            n = _mean([_mean(per_ds[d]["new"]) for d in datasets])
            seeds = min(len(per_ds[d]["base"]) for d in datasets)
            flagged = sorted({s for d in datasets for s in per_ds[d]["collapsed"]})
            summaries[label] = (b, n, harmonic_mean(b, n), seeds, flagged)
            if label in FULL_ROWS:
                full_hm, full_label = harmonic_mean(b, n), label
        for label, (b, n, hm, seeds, flagged) in summaries.items():
            delta = "" if full_hm is None or label in FULL_ROWS else f"{hm - full_hm:+.2f}"
            paired = None if full_label is None or label in FULL_ROWS else \
                paired_difference(_hm_by_seed(rows[label], datasets), _hm_by_seed(rows[full_label], datasets))
            body.append([label, f"{b:.2f}", f"{n:.2f}", f"{hm:.2f}", delta, _paired_cell(paired), str(seeds),
                         ", ".join(map(str, flagged)) or "-"])
        if body:
            where = datasets[0] if len(datasets) == 1 else f"average over {len(datasets)} datasets"
            parts = [f"{SHORT_NAMES.get(k, k)} {setting[k]}" for k in varying[ablation] if k not in ("backbone", "config")]
            if setting["config"] != "default":
                parts.insert(0, setting["config"])
            out.append((" · ".join([title, f"backbone {backbone}", *parts, where]),
                        ["Variant", "Base", "New", "HM", "ΔHM", "95% CI", "seeds", "collapsed"], body))
    return out


def _hm_by_seed(per_ds: dict, datasets: list[str]) -> dict[int, float]:
    """{seed: HM of the mean Base and the mean New over `datasets`} for the seeds every dataset has."""
    common = set.intersection(*(set(per_ds[d]["seeds"]) for d in datasets))
    out = {}
    for seed in common:
        pick = [per_ds[d]["seeds"].index(seed) for d in datasets]
        b = _mean([per_ds[d]["base"][i] for d, i in zip(datasets, pick)])
        n = _mean([per_ds[d]["new"][i] for d, i in zip(datasets, pick)])
        out[seed] = harmonic_mean(b, n)
    return out


def _paired_cell(paired) -> str:
    """'±1.23' (or 'lo–hi'), with ' n.s.' when the paired t-test finds no difference at 5 %; '' for one seed."""
    if paired is None or paired.interval is None:
        return ""
    lo, hi = paired.interval
    return f"±{(hi - lo) / 2:.2f}" + ("" if paired.significant else " n.s.")


def interval_warnings(summary: dict) -> list[str]:
    """Datasets where +FVG-PT's and the backbone's HM intervals overlap: the table's ΔHM may be noise."""
    out = []
    for g in summary.values():
        for ds, methods in g["datasets"].items():
            f, b = methods["fvgpt"], methods["backbone"]
            if overlap(f.get("hm_ci"), b.get("hm_ci")):
                out.append(f"{ds} ({g['title']}): the 95 % intervals of +FVG-PT's HM ({_ci_text(f['hm_ci'])}) and "
                           f"{g['setting']['backbone']}'s ({_ci_text(b['hm_ci'])}) overlap over {f['n_seeds']} seeds: "
                           "the difference may be noise; `report --vs backbone` compares them seed by seed")
    return out


def _ci_text(ci) -> str:
    return f"{ci[0]:.2f}–{ci[1]:.2f}"


PAIRED_METRICS = ("base", "new", "hm")


def _config_matches(config: dict, reference: str) -> bool:
    """Whether a run's configuration is the `--vs` reference: 'default' or KEY=VALUE[,KEY=VALUE…]."""
    if reference == "default":
        return config_label(config) == "default"
    from .training import parse_value

    for item in reference.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--vs {reference!r}: write backbone, default or KEY=VALUE[,KEY=VALUE]")
        want = parse_value(key.strip(), value)
        have = config.get(key.strip())
        if (list(want) if isinstance(want, tuple) else want) != have:
            return False
    return True


def paired_tables(summary: dict, reference: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """`report --vs REFERENCE`: every other configuration against the reference, seed by seed.

    `backbone`: +FVG-PT against its own backbone in the same runs. A configuration (`default`,
    `lambda_d=10`, …): every group whose setting equals the reference group's in everything but the
    configuration, per dataset, paired by seed (only seeds both have). Columns: the mean paired
    difference of Base, New and HM, the 95 % t interval of ΔHM and the paired t-test's p-value;
    'n.s.' marks p ≥ 0.05."""
    header = ["Dataset", "vs", "n", "ΔBase", "ΔNew", "ΔHM", "95% CI", "p"]
    out = []

    def line(ds: str, name: str, cur: dict, ref: dict) -> list[str] | None:
        if not all("hm" in v for v in [*cur.values(), *ref.values()]):
            return None  # all-class runs: no Base/New to compare
        diffs = {m: paired_difference({s: v[m] for s, v in cur.items()}, {s: v[m] for s, v in ref.items()})
                 for m in PAIRED_METRICS}
        hm = diffs["hm"]
        if hm is None:
            return None
        p = "-" if hm.p_value is None else f"{hm.p_value:.3f}" + ("" if hm.significant else " n.s.")
        return [ds, name, str(hm.n), *[f"{diffs[m].mean:+.2f}" for m in PAIRED_METRICS],
                "-" if hm.interval is None else _ci_text(hm.interval), p]

    if reference == "backbone":
        for g in summary.values():
            body = [row for ds, methods in g["datasets"].items() if "per_seed" in methods["fvgpt"]
                    for row in [line(ds, "+FVG-PT", methods["fvgpt"]["per_seed"], methods["backbone"]["per_seed"])]
                    if row]
            if body:
                out.append((f"Paired vs the backbone · {g['title']}", header, body))
        return out
    refs = [g for g in summary.values() if any(_config_matches(r.config, reference)
                                               for runs in g["runs"].values() for r in runs)]
    if not refs:
        raise ValueError(f"--vs {reference!r}: no configuration in these results matches it; the configurations "
                         f"are: {', '.join(sorted({g['setting']['config'] for g in summary.values()}))}")
    for ref in refs:
        others = [g for g in summary.values() if g is not ref and
                  all(g["setting"][k] == ref["setting"][k] for k in SETTING_FIELDS if k != "config")]
        body = []
        for g in others:
            for ds, methods in g["datasets"].items():
                base = ref["datasets"].get(ds, {}).get("fvgpt", {})
                if "per_seed" in methods["fvgpt"] and "per_seed" in base:
                    row = line(ds, g["setting"]["config"], methods["fvgpt"]["per_seed"], base["per_seed"])
                    if row:
                        body.append(row)
        if body:
            out.append((f"Paired vs {ref['setting']['config']} (+FVG-PT, seed by seed) · {ref['title']}", header, body))
    return out


def mask_source_tables(records: list[RunRecord]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The mask-source ablation (grid --preset masks): per setting, a row per mask source with Base, New,
    HM (seed means, averaged over datasets as in `ablation_tables`), ΔHM against the cache's own
    foreground views ("extracted"), and the source's mask statistics on the training images: mean
    foreground area, the share of empty masks, and FRG's mean r on the training views."""
    cells: dict[tuple, dict] = {}
    settings: dict[tuple, dict] = {}
    for rec, f in zip(records, run_fields(records)):
        if not any(a == "masks" for a, _ in rec.ablations or []):
            continue
        source = rec.config.get("fg_source", "extracted")
        setting = {**{k: f[k] for k in SETTING_FIELDS},
                   "config": config_label({k: v for k, v in rec.config.items() if k != "fg_source"})}
        key = tuple(setting.values())
        settings[key] = setting
        m = rec.metrics["fvgpt"]
        if m.get("base") is None:
            continue
        row = cells.setdefault(key, {}).setdefault(source, {})
        ds = row.setdefault(rec.dataset, {"base": [], "new": [], "area": [], "empty": [], "r": []})
        ds["base"].append(m["base"])
        ds["new"].append(m["new"])
        stats = rec.mask_source
        ds["area"].append(None if stats is None else stats.mean_area)
        ds["empty"].append(None if stats is None else stats.empty_share)
        ds["r"].append(((rec.diagnostics or {}).get("train") or {}).get("r_mean"))
    varying = varying_fields(list(settings.values()))
    out = []
    fmt = lambda xs, scale=1.0: "-" if any(x is None for x in xs) else f"{scale * _mean(xs):.2f}"  # noqa: E731
    for key, rows in cells.items():
        setting = settings[key]
        datasets = sorted(set.union(*(set(r) for r in rows.values())))
        summaries = {}
        for source in sorted(rows, key=lambda s: (s != "extracted", s)):
            per_ds = rows[source]
            if set(per_ds) != set(datasets):
                continue
            b = _mean([_mean(per_ds[d]["base"]) for d in datasets])
            n = _mean([_mean(per_ds[d]["new"]) for d in datasets])
            pooled = lambda k: [x for d in datasets for x in per_ds[d][k]]  # noqa: E731
            summaries[source] = (b, n, harmonic_mean(b, n), min(len(per_ds[d]["base"]) for d in datasets),
                                 fmt(pooled("area")), fmt(pooled("empty"), 100), fmt(pooled("r")))
        ref = summaries.get("extracted")
        body = [[source, f"{b:.2f}", f"{n:.2f}", f"{hm:.2f}", "" if ref is None or source == "extracted" else
                 f"{hm - ref[2]:+.2f}", area, empty, r, str(seeds)]
                for source, (b, n, hm, seeds, area, empty, r) in summaries.items()]
        if body:
            where = datasets[0] if len(datasets) == 1 else f"average over {len(datasets)} datasets"
            parts = [f"{SHORT_NAMES.get(k, k)} {setting[k]}" for k in varying if k not in ("backbone", "config")]
            if setting["config"] != "default":
                parts.insert(0, setting["config"])
            out.append((" · ".join([ABLATIONS["masks"][0], f"backbone {setting['backbone']}", *parts, where]),
                        ["Mask source", "Base", "New", "HM", "ΔHM", "mean area", "empty %", "FRG mean r", "seeds"], body))
    return out


def to_markdown(summary: dict, compare_paper: bool = False, extra=()) -> str:
    parts = []
    for title, header, body in tables(summary, compare_paper, extra):
        parts.append(f"### {title}\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join("---" for _ in header) + "|")
        parts += ["| " + " | ".join(r) + " |" for r in body]
        parts.append("")
    return "\n".join(parts)


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "±": r"$\pm$", "Δ": r"$\Delta$", "·": ","}


def _latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def to_latex(summary: dict, compare_paper: bool = False, extra=()) -> str:
    """tabular environments with booktabs rules (\\usepackage{booktabs} in the preamble)."""
    parts = [r"% needs \usepackage{booktabs}", ""]
    esc = _latex_escape
    for title, header, body in tables(summary, compare_paper, extra):
        parts.append(f"% {esc(title)}")
        parts.append(r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}")
        parts.append(r"\toprule")
        parts.append(" & ".join(esc(h) for h in header) + r" \\")
        parts.append(r"\midrule")
        parts += [" & ".join(esc(c) for c in r) + r" \\" for r in body]
        parts.append(r"\bottomrule")
        parts.append(r"\end{tabular}")
        parts.append("")
    return "\n".join(parts)


def config_value(config: dict, param: str):
    """A parameter's value in a record's configuration; a plug-in parameter a record leaves out is at its default."""
    p = lookup(param)
    return config[param] if param in config else p.to_json(p.default)


def sweep(records: list[RunRecord], param: str) -> dict:
    """A one-parameter sweep: {dataset or 'average': {value: {"base", "new", "hm", "hm_std"}}} of FVG-PT.

    Runs with the same dataset and value are averaged whatever else differs between them;
    `averaged_over` says what that is.
    """
    lookup(param)  # an unknown name is refused even without records
    by: dict[str, dict] = {}
    for rec in records:
        value = config_value(rec.config, param)
        value = "+".join(value) if isinstance(value, list) else value
        m = rec.metrics["fvgpt"]
        if m.get("base") is None:
            continue
        by.setdefault(rec.dataset, {}).setdefault(value, []).append((m["base"], m["new"]))
    out = {}
    for ds, values in by.items():
        out[ds] = {}
        for v, pairs in sorted(values.items(), key=lambda kv: kv[0]):
            b, n = _mean([p[0] for p in pairs]), _mean([p[1] for p in pairs])
            out[ds][v] = {"base": b, "new": n, "hm": harmonic_mean(b, n),
                          "hm_std": _std([harmonic_mean(x, y) for x, y in pairs])}
    if len(out) > 1:
        common = set.intersection(*(set(v) for v in out.values()))
        out["average"] = {}
        for v in sorted(common):
            b = _mean([out[ds][v]["base"] for ds in by])
            n = _mean([out[ds][v]["new"] for ds in by])
            out["average"][v] = {"base": b, "new": n, "hm": harmonic_mean(b, n), "hm_std": 0.0}
    return out


def averaged_over(records: list[RunRecord], param: str) -> dict[str, list[str]]:
    """Every field besides `param` and the seed that varies among runs a sweep point averages.

    {field: [its values]}: setting fields (model, shots, backbone, …) and each TrainConfig field.
    """
    points: dict[tuple, list[int]] = {}
    for i, rec in enumerate(records):
        if rec.metrics["fvgpt"].get("base") is None:
            continue
        points.setdefault((rec.dataset, _json(rec.config[param])), []).append(i)
    fields = run_fields(records)
    found: dict[str, set] = {}
    for members in points.values():
        if len(members) < 2:
            continue
        for f in SETTING_FIELDS:
            if f == "config":
                continue
            values = {fields[i][f] for i in members}
            if len(values) > 1:
                found.setdefault(f, set()).update(values)
        keys = {k for i in members for k in records[i].config} - {param, *IGNORED_IN_LABEL}
        for k in sorted(keys):
            values = {_json(records[i].config.get(k)) for i in members}
            if len(values) > 1:
                found.setdefault(k, set()).update(values)
    return {k: sorted(v) for k, v in found.items()}


def describe_averaged(averaged: dict[str, list[str]], limit: int = 4) -> str:
    """'model (2: a, b), use_frg (2: false, true)' for messages and the figure."""
    parts = []
    for k, values in averaged.items():
        shown = ", ".join(values[:limit]) + (", …" if len(values) > limit else "")
        parts.append(f"{k} ({len(values)}: {shown})")
    return "; ".join(parts)


def plot_sweep(data: dict, param: str, path: Path, averaged: dict[str, list[str]] | None = None) -> Path:
    """HM (and Base, New) against one parameter, one line per dataset; PNG or SVG by the file suffix.

    `averaged` (from `averaged_over`) is written under the plots: what else varies in each point.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'fvgpt-cache[plot]' (or pip install matplotlib)") from None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ds, values in data.items():
        xs = list(values)
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        pos = xs if numeric else list(range(len(xs)))
        for ax, key in zip(axes, ("base", "new", "hm")):
            ax.plot(pos, [values[x][key] for x in xs], marker="o", label=ds, lw=2.5 if ds == "average" else 1.2)
            ax.set_title({"base": "Base", "new": "New", "hm": "HM"}[key])
            ax.set_xlabel(param)
            if not numeric:
                ax.set_xticks(pos, [str(x) for x in xs], rotation=30)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=7)
    if averaged:
        text = textwrap.fill("averaged over: " + describe_averaged(averaged), 180)
        fig.text(0.01, 0.01, text, fontsize=7, color="darkred", va="bottom")
        fig.tight_layout(rect=(0, 0.05 + 0.035 * text.count("\n"), 1, 1))
    else:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Per-epoch curves (the `history` of every record: losses, test and validation accuracy, gate statistics)

CI_NAMES = {"t": "Student's t", "bootstrap": "percentile bootstrap (10,000 resamples)"}
CURVE_COLUMNS = ("epoch", "lr", "selected", "test_base", "test_new", "test_hm", "test_all", "val_base", "val_new",
                 "val_hm", "val_all", "r_mean", "frg_auc", "b_mean_new", "frg", "ce_fdc", "dist", "base", "acc_fdc",
                 "ce_pc", "kl_pc", "pc", "total")


def curves_csv(records: list[RunRecord]) -> str:
    """One row per run and epoch (`report --format curves`): the run's identity (id, dataset, backbone, seed,
    every TrainConfig field) and that epoch's numbers; empty where a run has no such number."""
    fields_ = TrainConfig.field_names()
    cols = ["run_id", "dataset", "backbone", "seed", *CURVE_COLUMNS, *(f"config.{f}" for f in fields_ if f != "seed")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for rec in records:
        config = {f"config.{k}": "+".join(map(str, v)) if isinstance(v, list) else v for k, v in rec.config.items()}
        for entry in rec.history:
            writer.writerow({"run_id": rec.run_id, "dataset": rec.dataset, "backbone": rec.backbone,
                             "seed": rec.seed, **config,
                             **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in entry.items()}})
    return buf.getvalue()


def curve_bands(records: list[RunRecord], param: str, metric: str) -> dict:
    """{dataset: {value of `param`: (epochs, mean, std over the runs)}} of one curve metric (e.g. test_hm)."""
    lookup(param)  # an unknown name is refused even without records
    by: dict = {}
    for rec in records:
        points = [(h["epoch"], h[metric]) for h in rec.history if h.get(metric) is not None]
        if not points:
            continue
        value = config_value(rec.config, param)
        value = "+".join(map(str, value)) if isinstance(value, list) else value
        by.setdefault(rec.dataset, {}).setdefault(value, []).append(dict(points))
    out: dict = {}
    for ds, values in by.items():
        for value, runs in values.items():
            epochs = sorted(set.intersection(*(set(r) for r in runs)))
            vals = [[r[e] for r in runs] for e in epochs]
            out.setdefault(ds, {})[value] = (epochs, [_mean(v) for v in vals], [_std(v) for v in vals])
    return out


def plot_curves(records: list[RunRecord], param: str, path: Path) -> Path:
    """Test Base/New/HM (or All) against epoch: a row of panels per dataset, one line per value of `param`
    (mean over the runs with it), a band of ± one standard deviation over them (the seed spread)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'fvgpt-cache[plot]' (or pip install matplotlib)") from None
    has_bn = any(h.get("test_hm") is not None for r in records for h in r.history)
    metrics = ("test_base", "test_new", "test_hm") if has_bn else ("test_all",)
    bands = {m: curve_bands(records, param, m) for m in metrics}
    datasets = sorted(bands[metrics[0]])
    if not datasets:
        raise ValueError("these results carry no per-epoch test accuracy (written before curves were recorded)")
    fig, axes = plt.subplots(len(datasets), len(metrics), figsize=(4 * len(metrics), 3 * len(datasets)), squeeze=False)
    for row, ds in enumerate(datasets):
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for value, (epochs, mean, std) in sorted(bands[metric][ds].items(), key=lambda kv: str(kv[0])):
                x = [e + 1 for e in epochs]
                ax.plot(x, mean, marker="o", ms=3, label=f"{param}={value}")
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
            ax.set_title(f"{ds} · {metric.replace('test_', '').replace('hm', 'HM').capitalize()}")
            ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    averaged = averaged_over(records, param)
    if averaged:
        fig.text(0.01, 0.01, textwrap.fill("averaged over: " + describe_averaged(averaged), 180), fontsize=7,
                 color="darkred", va="bottom")
    fig.tight_layout(rect=(0, 0.06 if averaged else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
