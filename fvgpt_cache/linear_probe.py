"""CoOp's linear-probe baseline on cached features (CoOp's `lpclip/linear_probe.py`, after CLIP's paper).

A logistic regression (scikit-learn, L-BFGS, L2, max_iter 1000) on the L2-normalised view-0
full-image features of the few-shot training set. Its inverse regularisation C is chosen on
the validation split: first over [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6], then by CoOp's
log-space bisection starting from [C*/10, 10·C*] around the best value C*, `refine_steps`
rounds (8 in CoOp). Each round fits both ends, keeps the better one (the left end on ties) and
halves the interval towards it in log10 space; the classifier of the last round is scored on
the test images of the same classes.

A linear probe has one weight vector per training class, so it has no new-class predictions:
in the base-to-new protocol it is scored on base classes only (`test_acc_base`).

Validation split: the cache's val images of the same classes. When there are none (ImageNet
has no val split, docs/datasets.md#the-eleven-datasets), up to min(4, n_c // 2) training images of each class are
held out with a generator seeded by `seed` to choose C, and the final classifier is then refit
on all training images with the chosen C; `val_source` records which was used.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from .store import Cache, CacheError, open_cache
from .training import CLASS_SETS, class_set

SEARCH_LIST = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
MAX_HOLDOUT = 4


def _features(cache: Cache, split: str, class_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if split not in cache.splits:
        return np.zeros((0, cache.text("clip").shape[1]), np.float32), np.zeros(0, np.int64)
    labels = cache.labels(split).numpy()
    rows = np.flatnonzero(np.isin(labels, class_ids))
    if rows.size == 0:
        return np.zeros((0, cache.text("clip").shape[1]), np.float32), np.zeros(0, np.int64)
    x = F.normalize(cache.image(split, "full")[rows, 0], dim=-1).numpy().astype(np.float64)
    return x, labels[rows]


def holdout_split(labels: np.ndarray, seed: int, max_per_class: int = MAX_HOLDOUT) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): min(max_per_class, n_c // 2) images of each class held out, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(max_per_class, len(idx) // 2)
        if k:
            held.extend(rng.choice(idx, size=k, replace=False).tolist())
    held = np.sort(np.array(held, dtype=np.int64))
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held


def linear_probe(cache: Cache | str, classes: str = "base", refine_steps: int = 8, seed: int = 1,
                 search: tuple[float, ...] = SEARCH_LIST, max_iter: int = 1000) -> dict:
    """CoOp's linear probe on `cache`; accuracies in percent.

    Returns {C, val_acc, test_acc, test_acc_base (classes="base"), classes, class_ids,
    val_source ("val" or "train_holdout"), n_train, n_val, n_test, search, refine}.
    """
    if classes not in CLASS_SETS:
        raise ValueError(f"classes={classes!r}: choose one of {CLASS_SETS}")
    if refine_steps < 0:
        raise ValueError(f"refine_steps={refine_steps}: use 0 or more")
    cache = open_cache(cache) if not isinstance(cache, Cache) else cache
    class_ids = class_set(cache, classes)
    x_train, y_train = _features(cache, "train", class_ids)
    if len(np.unique(y_train)) < 2:
        raise CacheError(f"{cache.path}: a linear probe needs training images of at least two {classes} classes")
    x_val, y_val = _features(cache, "val", class_ids)
    val_source = "val"
    x_fit, y_fit = x_train, y_train
    if len(y_val) == 0:
        keep, held = holdout_split(y_train, seed)
        if held.size == 0:
            raise CacheError(f"{cache.path} has no val images and too few training images per class to hold some out "
                             "for choosing C; extract with more shots")
        x_fit, y_fit, x_val, y_val = x_train[keep], y_train[keep], x_train[held], y_train[held]
        val_source = "train_holdout"
    x_test, y_test = _features(cache, "test", class_ids)

    fitted: dict[float, tuple[LogisticRegression, float]] = {}

    def fit(c: float) -> tuple[LogisticRegression, float]:
        if c not in fitted:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c).fit(x_fit, y_fit)
            fitted[c] = (clf, float((clf.predict(x_val) == y_val).mean() * 100))
        return fitted[c]

    search_accs = [fit(c)[1] for c in search]
    peak = search[int(np.argmax(search_accs))]
    c_final, (clf_final, val_acc) = peak, fit(peak)
    c_left, c_right = 0.1 * peak, 10.0 * peak
    refine = []
    for _ in range(refine_steps):
        (clf_l, acc_l), (clf_r, acc_r) = fit(c_left), fit(c_right)
        refine.append({"left": c_left, "right": c_right, "val_acc_left": acc_l, "val_acc_right": acc_r})
        log_l, log_r = math.log10(c_left), math.log10(c_right)
        if acc_l < acc_r:
            c_final, clf_final, val_acc = c_right, clf_r, acc_r
            log_l = 0.5 * (log_l + log_r)
        else:
            c_final, clf_final, val_acc = c_left, clf_l, acc_l
            log_r = 0.5 * (log_l + log_r)
        c_left, c_right = 10.0 ** log_l, 10.0 ** log_r

    if val_source == "train_holdout":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf_final = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c_final).fit(x_train, y_train)
    test_acc = float((clf_final.predict(x_test) == y_test).mean() * 100) if len(y_test) else None
    out = {
        "C": float(c_final), "val_acc": val_acc, "test_acc": test_acc, "classes": classes,
        "class_ids": [int(c) for c in class_ids], "val_source": val_source, "seed": seed,
        "n_train": int(len(y_train)), "n_fit": int(len(y_fit)), "n_val": int(len(y_val)), "n_test": int(len(y_test)),
        "search": [{"C": c, "val_acc": a} for c, a in zip(search, search_accs)], "refine": refine,
    }
    if classes == "base":
        out["test_acc_base"] = test_acc
    return out
