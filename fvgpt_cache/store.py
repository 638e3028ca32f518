"""The HDF5 feature store, format version 1 (docs/cache-format.md): reading, validating, locking.

Writing happens in `extraction.py`; this module owns the layout and the checks every reader
makes, so that a foreign, stale or half-written file is refused with a message that says why.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from .data import SPLITS

FORMAT = "fvgpt-cache"
FORMAT_VERSION = 1

# Key paths of the layout (docs/cache-format.md). Every module that reads or writes a cache or a
# `.partial` file builds its keys with these, so the layout is written down once.
CLASS_NAMES, BASE_CLASSES, NEW_CLASSES = "classes/names", "classes/base", "classes/new"
TEXT, IMAGE, PROGRESS = "text", "image", "progress"


def text_key(name: str = "clip") -> str:
    """`text/<name>`: (C, D) text features of a group (`clip`: zero-shot CLIP)."""
    return f"{TEXT}/{name}"


def image_key(encoder: str, split: str | None = None, kind: str | None = None) -> str:
    """`image/<encoder>[/<split>[/<kind>]]`: (N, V, D) image features; kind full, fg (MMRL: also full_rep, fg_rep)."""
    return "/".join(part for part in (IMAGE, encoder, split, kind) if part is not None)


def sample_key(split: str, field: str | None = None) -> str:
    """`samples/<split>[/<field>]`: per-image label, path, area, box."""
    return f"samples/{split}" + (f"/{field}" if field else "")


def progress_key(split: str, field: str = "status") -> str:
    """`progress/<split>/<field>` of a `.partial` file: status, mask_resized, error."""
    return f"{PROGRESS}/{split}/{field}"

# The foreground views extract wrote (from --mask-root) are the source "extracted"; other mask sources
# added later (`fg_sources.add_foreground_source`) live under /fg_sources/<name>/.
EXTRACTED_FG = "extracted"
# Every cache also has the source "none": all-ones masks, whose foreground view is the full view (A = 1).
NO_MASK = "none"
FG_SOURCES = "fg_sources"  # the group of added mask sources: fg_sources/<name>/<encoder|area>/<split>
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


# ---------------------------------------------------------------------------------------------
# Content identity. Every dataset of a finished cache carries the SHA-256 of its dtype, shape,
# attributes and bytes (attribute DIGEST_ATTR); the file's root carries CONTENT_ATTR, the SHA-256
# over all of them and the root's provenance. Writers call `seal` last; a writer that changes a
# dataset in place must delete that dataset's DIGEST_ATTR first (writers here delete and recreate).
# Run records store the digest of the datasets a run reads (`Cache.input_fingerprint`), so a
# result is recognised by what it was computed from, never by the file's path.
DIGEST_ATTR = "sha256"
CONTENT_ATTR = "content_sha256"
FINGERPRINT_CHARS = 16  # how much of a fingerprint names things (folders, tables); records keep all 64


def _dataset_digest(ds: h5py.Dataset) -> str:
    """SHA-256 of a dataset's dtype, shape, attributes (but its digest) and values, read in blocks of rows;
    strings are hashed one by one (length-prefixed), so the digest does not depend on the block size."""
    h = hashlib.sha256()
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in ds.attrs.items() if k != DIGEST_ATTR}
    h.update(json.dumps([str(ds.dtype), list(ds.shape), attrs], sort_keys=True, default=str).encode())
    if ds.ndim == 0:
        h.update(np.asarray(ds[()]).tobytes())
        return h.hexdigest()
    step = max(4096, ds.chunks[0] if ds.chunks else 0)
    for start in range(0, ds.shape[0], step):
        block = ds[start:start + step]
        if ds.dtype.kind == "O":  # variable-length strings
            for x in block:
                b = x if isinstance(x, bytes) else str(x).encode()
                h.update(len(b).to_bytes(8, "little") + b)
        else:
            h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def _dataset_keys(f: h5py.File) -> list[str]:
    keys: list[str] = []
    f.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(keys)


def _digests(f: h5py.File, write: bool) -> dict[str, str]:
    """{dataset key: digest}: stored ones as they are, missing ones computed (and stored if `write`)."""
    out = {}
    for key in _dataset_keys(f):
        ds = f[key]
        digest = ds.attrs.get(DIGEST_ATTR)
        if digest is None:
            digest = _dataset_digest(ds)
            if write:
                ds.attrs[DIGEST_ATTR] = digest
        out[key] = str(digest)
    return out


def combine_digests(digests: dict[str, str], *extra: str) -> str:
    """One SHA-256 over named digests (sorted by name) and extra strings."""
    h = hashlib.sha256()
    for key in sorted(digests):
        h.update(f"{key}\0{digests[key]}\n".encode())
    for item in extra:
        h.update(f"\1{item}".encode())
    return h.hexdigest()


# Provenance that says when or how a file was written, not what it holds.
VOLATILE_PROVENANCE = ("created", "world_sizes")


def _root_identity(f: h5py.File) -> tuple[str, str]:
    prov = json.loads(f.attrs.get("provenance", "{}"))
    stable = {k: v for k, v in prov.items() if k not in VOLATILE_PROVENANCE}
    return json.dumps(stable, sort_keys=True, default=str), repr(float(f.attrs.get("logit_scale", 0.0)))


def seal(f: h5py.File) -> str:
    """Digest every dataset that has none yet and write the file's content fingerprint; returns it.

    Call it last, inside the writer's open `h5py.File(..., "r+"|"w")`, after every change."""
    fingerprint = combine_digests(_digests(f, write=True), *_root_identity(f))
    f.attrs[CONTENT_ATTR] = fingerprint
    return fingerprint


def input_keys(keys: list[str], backbone: str = "clip", encoder: str = "clip", fg_source: str = EXTRACTED_FG) -> list[str]:
    """The datasets a run on `backbone` (image features from `encoder`, foreground views of `fg_source`)
    reads: everything but the text groups of other backbones, the image groups of other encoders and
    the other added mask sources. Adding or replacing another backbone or mask source therefore leaves a
    run's inputs, and so its records, untouched."""
    def used(key: str) -> bool:
        parts = key.split("/")
        if parts[0] == TEXT:
            return parts[1] in ("clip", backbone)
        if parts[0] == IMAGE:
            return parts[1] in ("clip", encoder)
        if parts[0] == FG_SOURCES:
            return parts[1] == fg_source
        return True
    return [k for k in keys if used(k)]


# Fingerprints computed for files that were written before datasets carried digests, by
# (path, inode, size, mtime): such a file is hashed once per process, not once per read.
_COMPUTED: dict[tuple, dict[str, str]] = {}
def fg_source_key(source: str, split: str, what: str = "clip") -> str:
    """HDF5 path of an added mask source's foreground features (`what` = the image encoder) or areas (`area`)."""
    return f"{FG_SOURCES}/{source}/{what}/{split}"


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
            return [s for s in SPLITS if sample_key(s) in f]

    @property
    def text_groups(self) -> list[str]:
        with self._h5() as f:
            return sorted(f[TEXT].keys())

    def text(self, name: str = "clip") -> torch.Tensor:
        with self._h5() as f:
            if text_key(name) not in f:
                raise CacheError(f"{self.path} has no text features {name!r}; it has {sorted(f[TEXT].keys())}")
            return torch.from_numpy(f[text_key(name)][()].astype(np.float32))

    def text_attrs(self, name: str = "clip") -> dict:
        with self._h5() as f:
            return dict(f[text_key(name)].attrs)

    def text_provenance(self, name: str) -> dict:
        """The provenance a backbone's writer stored with `/text/<name>` ({} for CLIP's own group)."""
        raw = self.text_attrs(name).get("provenance")
        return json.loads(raw) if raw else {}

    def has_image(self, split: str, kind: str, encoder: str = "clip") -> bool:
        with self._h5() as f:
            return image_key(encoder, split, kind) in f

    def image(self, split: str, kind: str = "full", encoder: str = "clip") -> torch.Tensor:
        """(N, V, D) float32 features of one split and view kind."""
        key = image_key(encoder, split, kind)
        with self._h5() as f:
            if key not in f:
                raise CacheError(f"{self.path} has no {key}; it was extracted without that split or view")
            return torch.from_numpy(f[key][()].astype(np.float32))

    def labels(self, split: str) -> torch.Tensor:
        with self._h5() as f:
            return torch.from_numpy(f[sample_key(split, "label")][()].astype(np.int64))

    def areas(self, split: str) -> torch.Tensor:
        with self._h5() as f:
            return torch.from_numpy(f[sample_key(split, "area")][()].astype(np.float32))

    def boxes(self, split: str) -> torch.Tensor:
        """(N, V, 5) int32 crop boxes (top, left, height, width, flip) of augmented views; −1 rows for deterministic ones."""
        with self._h5() as f:
            key = sample_key(split, "box")
            if key not in f:
                raise CacheError(f"{self.path} stores no view boxes ({key}); it was written before boxes were stored, "
                                 "re-extract it")
            return torch.from_numpy(f[key][()].astype(np.int32))

    def paths(self, split: str) -> list[str]:
        with self._h5() as f:
            return [p.decode() if isinstance(p, bytes) else str(p) for p in f[sample_key(split, "path")][()]]

    def model_signature(self) -> dict:
        return model_identity(self.provenance)

    def digests(self) -> dict[str, str]:
        """{dataset key: SHA-256} of every dataset (stored by `seal`; computed for older files)."""
        st = self.path.stat()
        memo = (str(self.path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
        if memo not in _COMPUTED:
            with self._h5() as f:
                if len(_COMPUTED) >= 64:
                    _COMPUTED.clear()
                _COMPUTED[memo] = _digests(f, write=False)
        return _COMPUTED[memo]

    def verify(self) -> list[str]:
        """Datasets whose bytes no longer match their stored digest (changed in place by another tool)."""
        with self._h5() as f:
            return [k for k in _dataset_keys(f)
                    if f[k].attrs.get(DIGEST_ATTR) is not None and f[k].attrs[DIGEST_ATTR] != _dataset_digest(f[k])]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the whole content (every dataset and the provenance): the cache's identity."""
        with self._h5() as f:
            stored = f.attrs.get(CONTENT_ATTR)
            root = _root_identity(f)
        return str(stored) if stored is not None else combine_digests(self.digests(), *root)

    def image_encoder_of(self, backbone: str) -> str:
        """The image group a backbone's runs read: its provenance's `image_encoder`, else CLIP's."""
        if backbone == "clip" or backbone not in self.text_groups:
            return "clip"
        return str(self.text_provenance(backbone).get("image_encoder", "clip"))

    def input_fingerprint(self, backbone: str = "clip", fg_source: str = EXTRACTED_FG) -> str:
        """SHA-256 of what a run on `backbone` with the mask source `fg_source` reads (`input_keys`) and
        the provenance; the key a result is filed under. Equal content at another path gives the same value."""
        digests = self.digests()
        used = input_keys(list(digests), backbone, self.image_encoder_of(backbone), fg_source)
        with self._h5() as f:
            root = _root_identity(f)
        return combine_digests({k: digests[k] for k in used}, *root)
    @property
    def fg_sources(self) -> list[str]:
        """Mask sources whose foreground views the cache holds: "extracted", "none" (built in), then the added ones."""
        with self._h5() as f:
            return [EXTRACTED_FG, NO_MASK, *sorted(f[FG_SOURCES].keys() if FG_SOURCES in f else [])]

    def fg_source_provenance(self, source: str) -> dict:
        """How an added mask source was made ({} for "extracted": the cache's own provenance says)."""
        if source == EXTRACTED_FG:
            return {}
        if source == NO_MASK:
            return {"name": NO_MASK, "how": "all-ones masks: the foreground view is the full view, A(m) = 1"}
        with self._h5() as f:
            return json.loads(f[f"{FG_SOURCES}/{source}"].attrs.get("provenance", "{}"))

    def foreground(self, split: str, source: str = EXTRACTED_FG, encoder: str = "clip") -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V, D) float32 foreground features of one mask source and their (N, V) areas A(m)."""
        if source == EXTRACTED_FG:
            return self.image(split, "fg", encoder), self.areas(split)
        if source == NO_MASK:  # an all-ones mask gives exactly the full view's pixels (in both fg modes)
            full = self.image(split, "full", encoder)
            return full, torch.ones(full.shape[:2])
        key = fg_source_key(source, split, encoder)
        with self._h5() as f:
            if f"{FG_SOURCES}/{source}" not in f:
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
        if PROGRESS in f:
            raise CacheError(f"{path} is an unfinished extraction; rerun the extract command to complete it")
        for key in (CLASS_NAMES, BASE_CLASSES, NEW_CLASSES, text_key("clip")):
            if key not in f:
                raise CacheError(f"{path} is missing {key}; the file is damaged, re-extract it")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f[CLASS_NAMES][()]]
        return Cache(
            path=path,
            provenance=json.loads(f.attrs["provenance"]),
            logit_scale=float(f.attrs["logit_scale"]),
            classnames=names,
            base=f[BASE_CLASSES][()].astype(np.int64),
            new=f[NEW_CLASSES][()].astype(np.int64),
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
        f.create_dataset(CLASS_NAMES, data=classnames, dtype=utf8)
        f.create_dataset(BASE_CLASSES, data=np.asarray(base, dtype=np.int64))
        f.create_dataset(NEW_CLASSES, data=np.asarray(new, dtype=np.int64))
        f.create_dataset(text_key("clip"), data=np.asarray(text_clip, dtype=np.float32))
        f[text_key("clip")].attrs["template"] = template
        for split, kinds in images.items():
            for kind, arr in kinds.items():
                f.create_dataset(image_key("clip", split, kind), data=np.asarray(arr, dtype=store_dtype))
            f.create_dataset(sample_key(split, "label"), data=np.asarray(labels[split], dtype=np.int64))
            f.create_dataset(sample_key(split, "area"), data=np.asarray(areas[split], dtype=np.float32))
            f.create_dataset(sample_key(split, "path"), data=paths[split], dtype=utf8)
        seal(f)
    os.replace(tmp, path)
    return path


def write_text_group(path: str | Path, name: str, features: np.ndarray | torch.Tensor, provenance: dict) -> None:
    """Add or replace `/text/<name>` (C, D), L2-normalised, with its provenance; checks the shape fits."""
    if name == "clip":
        raise CacheError("the text group 'clip' holds zero-shot CLIP features written by extraction; choose another name")
    feats = torch.as_tensor(features, dtype=torch.float32)
    feats = torch.nn.functional.normalize(feats, dim=-1).numpy()
    with exclusive_lock(Path(path)), h5py.File(path, "r+") as f:
        expected = f[text_key("clip")].shape
        if feats.shape != expected:
            raise CacheError(f"text features for {name!r} have shape {feats.shape}; {path} needs {expected} "
                             "(one row per class, the model's embedding width)")
        if text_key(name) in f:
            del f[text_key(name)]
        f.create_dataset(text_key(name), data=feats)
        f[text_key(name)].attrs["provenance"] = json.dumps(provenance)
        seal(f)
