"""The HDF5 feature store, format version 1 (SPEC §5): reading, validating, locking.

Writing happens in `extraction.py`; this module owns the layout and the checks every reader
makes, so that a foreign, stale or half-written file is refused with a message that says why.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

FORMAT = "fvgpt-cache"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# The foreground views extract wrote (from --mask-root) are the source "extracted"; other mask sources
# added later (`fg_sources.add_foreground_source`) live under /fg_sources/<name>/.
EXTRACTED_FG = "extracted"
# Every cache also has the source "none": all-ones masks, whose foreground view is the full view (A = 1).
NO_MASK = "none"
# Provenance keys that must agree before two caches are used together.
MODEL_KEYS = ("model", "pretrained", "pretrained_sha256", "model_config_sha256", "quick_gelu", "preprocess", "init_seed")


def model_identity(provenance: dict) -> dict:
    """What makes two caches' features come from the same model, independent of where files lie.

    A weights file is known by its SHA-256 and a model config JSON by its own, so the same
    files at other paths (another machine, a reinstall) count as the same model.
    """
    sig = {k: provenance.get(k) for k in MODEL_KEYS}
    if sig["pretrained_sha256"]:
        sig["pretrained"] = None
    if sig["model_config_sha256"]:
        sig["model"] = None
    return sig


class CacheError(ValueError):
    """A cache file that cannot be used as asked; the message says which file and what to do."""


def fg_source_key(source: str, split: str, what: str = "clip") -> str:
    """HDF5 path of an added mask source's foreground features (`what` = the image encoder) or areas (`area`)."""
    return f"fg_sources/{source}/{what}/{split}"


def mask_statistics(area: np.ndarray) -> dict:
    """Statistics of the (N, V) foreground areas A(m) of a mask source, on view 0 of each image (train: the
    whole image squashed; val/test: the centre crop): mean area, shares of empty and of full masks."""
    a = np.asarray(area)[:, 0] if np.ndim(area) == 2 else np.asarray(area)
    if a.size == 0:
        return {"images": 0, "mean_area": None, "empty_share": None, "full_share": None}
    return {"images": int(a.size), "mean_area": float(a.mean()), "empty_share": float((a == 0).mean()),
            "full_share": float((a == 1).mean())}


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_partial(part: Path, fingerprint: str, started_with: str) -> None:
    """Refuse to continue a partial file written with other settings (`started_with` says which), or a damaged one."""
    try:
        with h5py.File(part, "r") as f:
            old = f.attrs.get("fingerprint")
    except OSError as exc:
        raise CacheError(f"partial file {part} is damaged ({exc}); rerun with --no-resume to start over") from exc
    if old != fingerprint:
        raise CacheError(f"{part} was started with {started_with}; rerun with the original settings to resume it, "
                         "or with --no-resume to start over")


# Lock files this process holds: POSIX record locks belong to the process, so a second lock of
# the same file from this process would succeed silently (and closing any descriptor of the file
# would drop the lock); this set refuses the first and avoids the second.
_HELD_LOCKS: set[str] = set()


def _lock_holder(fd: int) -> str:
    """'PID' or 'PID on HOST' as written into a held lock file by its holder, or '?' when it has not
    written one yet. The host matters on a shared file system, where the holder may be another machine."""
    try:
        pid, _, host = os.pread(fd, 300, 0).decode(errors="replace").strip().partition(" ")
    except OSError:
        return "?"
    if not pid.isdigit():
        return "?"
    return f"{pid} on {host}" if host and host != socket.gethostname() else pid


@contextlib.contextmanager
def lock_file(lock_path: Path, what: str):
    """Hold an exclusive POSIX record lock (`fcntl.lockf`) on `lock_path` while the block runs.

    Record locks belong to the process that took them: forked children (DataLoader workers) do
    not inherit them, and the kernel drops them the moment that process dies, even by SIGKILL.
    A second holder gets a `CacheError` naming `what` and the PID that holds the lock.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock_path.resolve())
    if key in _HELD_LOCKS:
        raise CacheError(f"this process is already writing {what} (it holds {lock_path}); "
                         "wait for that to finish or write to another --out")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise CacheError(
                f"another process is already writing {what} (lock {lock_path} is held by PID {holder}); "
                "wait for it to finish or write to another --out"
            ) from None
        try:  # the previous holder may have removed the file between our open and our lock
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _HELD_LOCKS.add(key)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield lock_path
    finally:
        _HELD_LOCKS.discard(key)
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()  # removed while still held, so no other process can lock the old file
        os.close(fd)


def exclusive_lock(out: Path):
    """Refuse a second writer of the same output (`<out>.lock`, see `lock_file`)."""
    out = Path(out)
    return lock_file(out.with_name(out.name + ".lock"), str(out))


@dataclass
class Cache:
    """A read-only view of a complete cache file. Arrays are loaded on demand."""

    path: Path
    provenance: dict
    logit_scale: float
    classnames: list[str]
    base: np.ndarray
    new: np.ndarray

    def _h5(self) -> h5py.File:
        return h5py.File(self.path, "r")

    @property
    def splits(self) -> list[str]:
        with self._h5() as f:
            return [s for s in SPLITS if f"samples/{s}" in f]

    @property
    def text_groups(self) -> list[str]:
        with self._h5() as f:
            return sorted(f["text"].keys())

    def text(self, name: str = "clip") -> torch.Tensor:
        with self._h5() as f:
            if f"text/{name}" not in f:
                raise CacheError(f"{self.path} has no text features {name!r}; it has {sorted(f['text'].keys())}")
            return torch.from_numpy(f[f"text/{name}"][()].astype(np.float32))

    def text_attrs(self, name: str = "clip") -> dict:
        with self._h5() as f:
            return dict(f[f"text/{name}"].attrs)

    def text_provenance(self, name: str) -> dict:
        """The provenance a backbone's writer stored with `/text/<name>` ({} for CLIP's own group)."""
        raw = self.text_attrs(name).get("provenance")
        return json.loads(raw) if raw else {}

    def has_image(self, split: str, kind: str, encoder: str = "clip") -> bool:
        with self._h5() as f:
            return f"image/{encoder}/{split}/{kind}" in f

    def image(self, split: str, kind: str = "full", encoder: str = "clip") -> torch.Tensor:
        """(N, V, D) float32 features of one split and view kind."""
        key = f"image/{encoder}/{split}/{kind}"
        with self._h5() as f:
            if key not in f:
                raise CacheError(f"{self.path} has no {key}; it was extracted without that split or view")
            return torch.from_numpy(f[key][()].astype(np.float32))

    def labels(self, split: str) -> torch.Tensor:
        with self._h5() as f:
            return torch.from_numpy(f[f"samples/{split}/label"][()].astype(np.int64))

    def areas(self, split: str) -> torch.Tensor:
        with self._h5() as f:
            return torch.from_numpy(f[f"samples/{split}/area"][()].astype(np.float32))

    def boxes(self, split: str) -> torch.Tensor:
        """(N, V, 5) int32 crop boxes (top, left, height, width, flip) of augmented views; −1 rows for deterministic ones."""
        with self._h5() as f:
            key = f"samples/{split}/box"
            if key not in f:
                raise CacheError(f"{self.path} stores no view boxes ({key}); it was written before boxes were stored, "
                                 "re-extract it")
            return torch.from_numpy(f[key][()].astype(np.int32))

    def paths(self, split: str) -> list[str]:
        with self._h5() as f:
            return [p.decode() if isinstance(p, bytes) else str(p) for p in f[f"samples/{split}/path"][()]]

    def model_signature(self) -> dict:
        return model_identity(self.provenance)

    @property
    def fg_sources(self) -> list[str]:
        """Mask sources whose foreground views the cache holds: "extracted", "none" (built in), then the added ones."""
        with self._h5() as f:
            return [EXTRACTED_FG, NO_MASK, *sorted(f["fg_sources"].keys() if "fg_sources" in f else [])]

    def fg_source_provenance(self, source: str) -> dict:
        """How an added mask source was made ({} for "extracted": the cache's own provenance says)."""
        if source == EXTRACTED_FG:
            return {}
        if source == NO_MASK:
            return {"name": NO_MASK, "how": "all-ones masks: the foreground view is the full view, A(m) = 1"}
        with self._h5() as f:
            return json.loads(f[f"fg_sources/{source}"].attrs.get("provenance", "{}"))

    def foreground(self, split: str, source: str = EXTRACTED_FG, encoder: str = "clip") -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V, D) float32 foreground features of one mask source and their (N, V) areas A(m)."""
        if source == EXTRACTED_FG:
            return self.image(split, "fg", encoder), self.areas(split)
        if source == NO_MASK:  # an all-ones mask gives exactly the full view's pixels (in both fg modes)
            full = self.image(split, "full", encoder)
            return full, torch.ones(full.shape[:2])
        key = fg_source_key(source, split, encoder)
        with self._h5() as f:
            if f"fg_sources/{source}" not in f:
                raise CacheError(f"{self.path} has no mask source {source!r}; it has {self.fg_sources}. Add it with "
                                 f"`fvgpt-cache add-masks {self.path} --name {source} --mask-root DIR`")
            if key not in f:
                raise CacheError(f"{self.path}: mask source {source!r} has no {encoder!r} foreground features of "
                                 f"{split} ({key}); sources hold CLIP's features, so use a CLIP-family backbone")
            return (torch.from_numpy(f[key][()].astype(np.float32)),
                    torch.from_numpy(f[fg_source_key(source, split, "area")][()].astype(np.float32)))


def open_cache(path: str | Path) -> Cache:
    """Open and validate a finished cache; refuse partial, foreign and unknown-version files."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if partial_path(path).exists():
            hint = f" An interrupted extraction left {partial_path(path)}; rerun the same extract command to resume it."
        raise CacheError(f"cache not found: {path}.{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"{path} is not a readable HDF5 file ({exc}); re-extract it with `fvgpt-cache extract`") from exc
    with f:
        fmt = f.attrs.get("format")
        if fmt != FORMAT:
            raise CacheError(f"{path} is not an fvgpt-cache store (format attribute is {fmt!r})")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{path} has cache format version {version}; this fvgpt-cache reads version {FORMAT_VERSION}. "
                "Re-extract it with this version, or use the fvgpt-cache release that wrote it"
            )
        if "progress" in f:
            raise CacheError(f"{path} is an unfinished extraction; rerun the extract command to complete it")
        for key in ("classes/names", "classes/base", "classes/new", "text/clip"):
            if key not in f:
                raise CacheError(f"{path} is missing {key}; the file is damaged, re-extract it")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["classes/names"][()]]
        return Cache(
            path=path,
            provenance=json.loads(f.attrs["provenance"]),
            logit_scale=float(f.attrs["logit_scale"]),
            classnames=names,
            base=f["classes/base"][()].astype(np.int64),
            new=f["classes/new"][()].astype(np.int64),
        )


def check_same_model(caches: list[Cache]) -> None:
    """Refuse to mix caches whose model or preprocessing differ."""
    ref = caches[0].model_signature()
    for other in caches[1:]:
        sig = other.model_signature()
        diff = [k for k in MODEL_KEYS if sig[k] != ref[k]]
        if diff:
            show = lambda c, k: c.provenance.get(k)  # noqa: E731  (the recorded value, path included)
            raise CacheError(
                f"{other.path} and {caches[0].path} were extracted with different models or preprocessing "
                f"({', '.join(f'{k}: {show(other, k)!r} vs {show(caches[0], k)!r}' for k in diff)}); "
                "re-extract one with the other's settings"
            )


def write_cache(path: str | Path, *, classnames: list[str], base: list[int], new: list[int], text_clip: np.ndarray,
                template: str, images: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
                areas: dict[str, np.ndarray], paths: dict[str, list[str]], provenance: dict, logit_scale: float,
                store_dtype: str = "float16") -> Path:
    """Write a complete cache from arrays in one go (synthetic caches, conversions).

    `images[split][kind]` is (N, V, D) for kind in full/fg. The file appears atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    utf8 = h5py.string_dtype("utf-8")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, provenance=json.dumps(provenance),
                       logit_scale=float(logit_scale))
        f.create_dataset("classes/names", data=classnames, dtype=utf8)
        f.create_dataset("classes/base", data=np.asarray(base, dtype=np.int64))
        f.create_dataset("classes/new", data=np.asarray(new, dtype=np.int64))
        f.create_dataset("text/clip", data=np.asarray(text_clip, dtype=np.float32))
        f["text/clip"].attrs["template"] = template
        for split, kinds in images.items():
            for kind, arr in kinds.items():
                f.create_dataset(f"image/clip/{split}/{kind}", data=np.asarray(arr, dtype=store_dtype))
            f.create_dataset(f"samples/{split}/label", data=np.asarray(labels[split], dtype=np.int64))
            f.create_dataset(f"samples/{split}/area", data=np.asarray(areas[split], dtype=np.float32))
            f.create_dataset(f"samples/{split}/path", data=paths[split], dtype=utf8)
    os.replace(tmp, path)
    return path


def write_text_group(path: str | Path, name: str, features: np.ndarray | torch.Tensor, provenance: dict) -> None:
    """Add or replace `/text/<name>` (C, D), L2-normalised, with its provenance; checks the shape fits."""
    if name == "clip":
        raise CacheError("the text group 'clip' holds zero-shot CLIP features written by extraction; choose another name")
    feats = torch.as_tensor(features, dtype=torch.float32)
    feats = torch.nn.functional.normalize(feats, dim=-1).numpy()
    with exclusive_lock(Path(path)), h5py.File(path, "r+") as f:
        expected = f["text/clip"].shape
        if feats.shape != expected:
            raise CacheError(f"text features for {name!r} have shape {feats.shape}; {path} needs {expected} "
                             "(one row per class, the model's embedding width)")
        if f"text/{name}" in f:
            del f[f"text/{name}"]
        f.create_dataset(f"text/{name}", data=feats)
        f[f"text/{name}"].attrs["provenance"] = json.dumps(provenance)
