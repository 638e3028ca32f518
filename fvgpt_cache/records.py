"""The results record of one run (`RunRecord`): one class reads and writes `results.json` and `results.jsonl` lines.

Schema versions: 1 (the first records; `inputs`, `feature_dim`, `backbone_provenance` came during
version 1), 2 (`inputs` always, `selection`, per-epoch curves in `history`, `mask_source`) and 3
(the same keys, written by `RunRecord.to_json`; `plugins` only in runs that used registered indicators or
loss terms, which no earlier code could train). Older records load with defaults for the keys
they lack (None, or an empty list or dict); a version newer than this code knows is refused.
Plain JSON in, plain JSON out: this module imports neither torch nor the heads.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FORMAT = "fvgpt-cache-results"
SCHEMA_VERSION = 3
KNOWN_VERSIONS = (1, 2, 3)


class RecordError(ValueError):
    """A results record that cannot be read: another format, a future version, a missing or mistyped key."""


@dataclass(frozen=True)
class RunInput:
    """One cache a run read: its `role` (train | eval), its resolved `path` and the content fingerprint
    (`Cache.input_fingerprint`) that the run id hashes."""

    role: str
    path: str
    fingerprint: str


@dataclass
class Selection:
    """Which epoch a run reports: `rule` (last | val), `epoch` (0-based), the validation numbers at that
    epoch (None without a validation split) and FVG-PT's test numbers at the last epoch."""

    rule: str
    epoch: int
    val: dict | None = None
    last_epoch_test: dict = field(default_factory=dict)


@dataclass
class MaskSource:
    """The mask source a run trained with and the statistics of its training masks (`store.mask_statistics`)."""

    name: str
    images: int | None = None
    mean_area: float | None = None
    empty_share: float | None = None
    full_share: float | None = None
    made_by: Any = None  # the source's masks.json record, if it was made by `fvgpt-cache masks`


GRID_KEYS = ("params", "ablations", "set_aside")  # written only when set (by grids)
WHEN_SET = (*GRID_KEYS, "plugins")  # keys a record lists only when they hold something
# (key, type(s) a present value must have); the first block is required in every version.
REQUIRED = (("run_id", str), ("cache", str), ("backbone", str), ("seed", int), ("config", dict), ("metrics", dict))
OPTIONAL = {
    "inputs": list, "dataset": str, "cache_provenance": dict, "backbone_provenance": dict, "preset": dict,
    "warnings": list, "test_images": dict, "foreground_shift": dict, "cross_dataset": list, "diagnostics": dict,
    "stability": dict, "head_parameters": int, "feature_dim": int, "train_images": int, "mask_source": dict,
    "views": int, "seconds": dict, "selection": dict, "history": list, "run_dir": str, "params": dict,
    "ablations": list, "set_aside": str, "plugins": dict,
}


@dataclass(kw_only=True)
class RunRecord:
    """One run's results: what it read, how it was configured, what it scored, how it trained.

    `inputs`: what the run read, by content (role, path, fingerprint; `runs.run_id` hashes it);
    `metrics`: {zeroshot|backbone|fvgpt: {base, new, hm, all}} on the cache's test split;
    `cross_dataset`: one entry per evaluation cache; `diagnostics`/`stability`: what the gates
    learned and whether the FDC branch collapsed; `history`: one dict per epoch. `params` and
    `ablations` are set by grids (the grid's parameters of this run, the ablation rows it serves);
    `set_aside` is the reason a grid moved a stale record out of its results file; `plugins` (only when the run
    used registered indicators or loss terms) their code fingerprints, which the run id covers. The fields are
    keyword-only, in the order `results.json` lists them.
    """

    run_id: str
    cache: str
    inputs: list[RunInput] = field(default_factory=list)
    dataset: str | None = None
    cache_provenance: dict = field(default_factory=dict)
    backbone: str
    backbone_provenance: dict | None = None
    seed: int
    config: dict
    plugins: dict[str, str] | None = None  # code fingerprints of the registered indicators and loss terms it used
    preset: dict | None = None
    warnings: list[str] = field(default_factory=list)
    metrics: dict
    test_images: dict = field(default_factory=dict)
    foreground_shift: dict | None = None
    cross_dataset: list[dict] = field(default_factory=list)
    diagnostics: dict | None = None
    stability: dict | None = None
    head_parameters: int | None = None
    feature_dim: int | None = None
    train_images: int | None = None
    mask_source: MaskSource | None = None
    views: int | None = None
    seconds: dict = field(default_factory=dict)
    selection: Selection | None = None
    history: list[dict] = field(default_factory=list)
    run_dir: str | None = None
    params: dict | None = None
    ablations: list[list[str]] | None = None
    set_aside: str | None = None

    @property
    def collapsed(self) -> bool:
        """The run's collapse flag (`training.stability`); False for records without one."""
        return bool((self.stability or {}).get("collapsed"))

    @property
    def train_fingerprint(self) -> str | None:
        """The content fingerprint of the cache the run trained on (None for records older than fingerprints)."""
        return next((i.fingerprint for i in self.inputs if i.role == "train"), None)

    def to_json(self) -> dict:
        """The record as written to results files (always the current schema version)."""
        values = dataclasses.asdict(self)  # nested parts (inputs, selection, mask source) as plain dicts
        # grid-only and plug-in keys only when set
        return {"format": RESULTS_FORMAT, "version": SCHEMA_VERSION,
                **{k: v for k, v in values.items() if not (k in WHEN_SET and v is None)}}

    def dumps(self, indent: int | None = None) -> str:
        return json.dumps(self.to_json(), indent=indent)

    @classmethod
    def from_json(cls, data: dict | str, source: str | Path | None = None) -> RunRecord:
        """Read a record of schema version 1, 2 or 3 from a dict or JSON text; `source` (a file, or a file
        and line) names where it came from in errors."""
        where = f"{source}: " if source is not None else ""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{where}not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise RecordError(f"{where}a results record is a JSON object, not {type(data).__name__}")
        if data.get("format") != RESULTS_FORMAT:
            raise RecordError(f"{where}does not hold fvgpt-cache results (format={data.get('format')!r})")
        version = data.get("version")
        if version not in KNOWN_VERSIONS:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise RecordError(f"{where}results schema version {version!r} "
                              + ("is newer than this fvgpt-cache reads (versions 1 to "
                                 f"{SCHEMA_VERSION}); upgrade fvgpt-cache to read it" if newer else
                                 f"is not one of {', '.join(map(str, KNOWN_VERSIONS))}"))
        values = {}
        for key, kind in REQUIRED:
            if key not in data:
                raise RecordError(f"{where}the results record (version {version}) has no {key!r}; it is required")
            values[key] = _checked(where, key, data[key], kind)
        for key, kind in OPTIONAL.items():
            if data.get(key) is not None:
                values[key] = _checked(where, key, data[key], kind)
        unknown = sorted(set(data) - {"format", "version"} - {k for k, _ in REQUIRED} - set(OPTIONAL))
        if unknown:
            raise RecordError(f"{where}unknown key(s) {', '.join(map(repr, unknown))} in a version {version} results "
                              "record; it was not written by fvgpt-cache")
        if "inputs" in values:
            values["inputs"] = [_part(where, "inputs", RunInput, _checked(where, "inputs", i, dict))
                                for i in values["inputs"]]
        if "selection" in values:
            values["selection"] = _part(where, "selection", Selection, values["selection"])
        if "mask_source" in values:
            values["mask_source"] = _part(where, "mask_source", MaskSource, values["mask_source"])
        return cls(**values)

    def replace(self, **changes) -> RunRecord:
        return dataclasses.replace(self, **changes)


def _checked(where: str, key: str, value, kind):
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise RecordError(f"{where}{key!r} is {type(value).__name__} ({str(value)[:40]}), expected {kind.__name__}")
    return value


def _part(where: str, key: str, cls, value: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise RecordError(f"{where}{key!r} has unknown key(s) {', '.join(map(repr, unknown))}")
    try:
        return cls(**value)
    except TypeError as exc:
        raise RecordError(f"{where}{key!r}: {exc}") from None


def read_record(path: str | Path) -> RunRecord:
    """A run's `results.json`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecordError(f"cannot read {path}: {exc}") from None
    return RunRecord.from_json(text, path)


def read_lines(path: str | Path) -> list[RunRecord]:
    """Every record of a `results.jsonl` file (blank lines skipped); each error names the file and line."""
    path = Path(path)
    return [RunRecord.from_json(line, f"{path}, line {n}")
            for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
