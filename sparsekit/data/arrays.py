"""Checking and shaping raw arrays into a training-ready :class:`~sparsekit.data.Dataset`.

Every loader (registry datasets and user files alike) ends here, so the rules of issue 2 live in one
place: integer labels 0…C−1 with every class in the training split, uint8 scaled to [0, 1], images
always with a channel axis, finite values, a seeded split when no test split is given, and
normalisation from the training split only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparsekit.errors import InputError


@dataclass
class Dataset:
    """A classification dataset, normalised and split, as tensors (float32 inputs, int64 labels)."""

    name: str
    spec: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    kind: str
    task: str = "classification"
    normalization: dict[str, Any] = field(default_factory=dict)
    split: str = "given"
    class_names: list[str] | None = None  # in index order, when the source names its classes

    def info(self) -> dict[str, Any]:
        """JSON-able description, saved in the run dir's config and summary."""
        return {
            "name": self.name,
            "spec": self.spec,
            "kind": self.kind,
            "task": self.task,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "input_shape": list(self.input_shape),
            "num_classes": int(self.num_classes),
            "normalization": dict(self.normalization),
            "split": self.split,
        }


def as_feature_array(x: Any, *, where: str, what: str = "x") -> np.ndarray:
    """Return ``x`` as a float32 array; uint8 is scaled to [0, 1]; non-numeric dtypes are refused."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        out = x.astype(np.float32) / np.float32(255.0)
    elif x.dtype.kind in "iub" or x.dtype.kind == "f":
        out = x.astype(np.float32)
    else:
        raise InputError(
            f"{what} has dtype {x.dtype}, expected numbers (uint8, int or float)",
            where=where,
            fix="save the inputs as a numeric array (object and string arrays are refused)",
        )
    if out.size and not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise InputError(
            f"{what} contains {bad} NaN or infinite value(s)",
            where=where,
            fix="remove or impute the non-finite values before training",
        )
    return out


def as_label_array(y: Any, *, where: str, what: str = "y") -> np.ndarray:
    """Return integer labels as int64; floats are accepted only when integral; negatives are refused."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise InputError(
            f"{what} has shape {list(y.shape)}, expected one integer label per sample",
            where=where,
            fix="store labels as a 1-D array of class indices 0..C-1 (not one-hot)",
        )
    if y.dtype.kind in "iu":
        out = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if y.size and not np.isfinite(y).all():
            raise InputError(
                f"{what} contains NaN or infinite labels",
                where=where,
                fix="labels must be integer class indices 0..C-1",
            )
        if y.size and not (y == np.round(y)).all():
            raise InputError(
                f"{what} has non-integer labels (e.g. {y[y != np.round(y)][0]!r})",
                where=where,
                fix="labels must be integer class indices 0..C-1",
            )
        out = y.astype(np.int64)
    else:
        raise InputError(
            f"{what} has dtype {y.dtype}, expected integer labels",
            where=where,
            fix="labels must be integer class indices 0..C-1 (map names to indices first)",
        )
    if out.size and out.min() < 0:
        raise InputError(
            f"{what} has negative label {int(out.min())}",
            where=where,
            fix="labels must be integer class indices 0..C-1",
        )
    return out


def to_sample_layout(x: np.ndarray, *, where: str, what: str = "x") -> tuple[np.ndarray, str]:
    """Put samples first and images channel-first: 2-D → tabular; N×H×W → N×1×H×W; N×H×W×C → N×C×H×W."""
    if x.ndim == 2:
        return x, "tabular"
    if x.ndim == 3:
        return x[:, None, :, :], "image"
    if x.ndim == 4:
        last, second = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
        if last and not second:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), "image"
        if second and not last:
            return x, "image"
        raise InputError(
            f"{what} has ambiguous image shape {list(x.shape)}",
            where=where,
            fix="store images as N×H×W×C (C = 1 or 3) with H and W larger than 3",
        )
    raise InputError(
        f"{what} has shape {list(x.shape)}, expected N×F (table), N×H×W or N×H×W×C (images)",
        where=where,
        fix="reshape the inputs to one of the supported layouts",
    )


def seeded_split(n: int, *, seed: int, val_fraction: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Random (not stratified) train/test index split, identical for the same (n, seed, fraction)."""
    check_val_fraction(val_fraction)
    n_test = math.floor(n * val_fraction + 0.5)
    n_test = min(max(n_test, 1), n - 1)
    if n < 2:
        raise InputError(
            f"only {n} sample(s): cannot split off a test set",
            where=where,
            fix="provide more samples or an explicit test split",
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def check_val_fraction(val_fraction: float) -> None:
    if (
        not isinstance(val_fraction, (int, float))
        or not (0.0 < float(val_fraction) < 1.0)
        or not math.isfinite(float(val_fraction))
    ):
        raise InputError(
            f"val fraction {val_fraction!r} is out of range",
            where="--val-fraction",
            fix="use a number strictly between 0 and 1, e.g. 0.2",
        )


def normalization_stats(x_train: np.ndarray, kind: str) -> dict[str, Any]:
    """Training-split mean/std: per feature for tables when every feature varies, else one global pair."""
    x64 = x_train.astype(np.float64)
    if kind == "tabular" and x64.shape[0] > 1:
        std = x64.std(axis=0)
        if (std > 0).all():
            return {"mean": x64.mean(axis=0).tolist(), "std": std.tolist(), "per_feature": True}
    mean = float(x64.mean()) if x64.size else 0.0
    std = float(x64.std()) if x64.size else 1.0
    if not std > 0:
        std = 1.0
    return {"mean": mean, "std": std, "per_feature": False}


def apply_normalization(x: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    mean = np.asarray(stats["mean"], dtype=np.float64)
    std = np.asarray(stats["std"], dtype=np.float64)
    return ((x.astype(np.float64) - mean) / std).astype(np.float32)


def make_dataset(
    *,
    name: str,
    spec: str,
    where: str,
    x_train: Any,
    y_train: Any,
    x_test: Any = None,
    y_test: Any = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    class_names: list[str] | None = None,
    input_scale: float = 1.0,
) -> Dataset:
    """Validate raw arrays, split if there is no test split, normalise, and wrap them as a Dataset.

    ``input_scale`` is what the loader already multiplied the stored values by (uint8 adds 1/255); it is
    recorded with the normalisation so that a deployer can start from the stored values."""
    check_val_fraction(val_fraction)
    given = x_test is not None
    if np.asarray(x_train).dtype == np.uint8:
        input_scale = input_scale / 255.0
    xs = {"x_train": x_train, "x_test": x_test} if given else {"x": x_train}
    ys = {"y_train": y_train, "y_test": y_test} if given else {"y": y_train}
    xa = {k: as_feature_array(v, where=where, what=k) for k, v in xs.items()}
    ya = {k: as_label_array(v, where=where, what=k) for k, v in ys.items()}
    shaped = {k: to_sample_layout(v, where=where, what=k) for k, v in xa.items()}
    kinds = {kind for _, kind in shaped.values()}
    xa = {k: v for k, (v, _) in shaped.items()}
    for (xk, xv), (yk, yv) in zip(xa.items(), ya.items(), strict=True):
        if xv.shape[0] != yv.shape[0]:
            raise InputError(
                f"{xk} has {xv.shape[0]} samples but {yk} has {yv.shape[0]} labels",
                where=where,
                fix="store one label per sample",
            )
        if xv.shape[0] == 0:
            raise InputError(f"{xk} has no samples", where=where, fix="provide a non-empty dataset")
    if given:
        if xa["x_train"].shape[1:] != xa["x_test"].shape[1:] or len(kinds) != 1:
            raise InputError(
                f"x_train samples have shape {list(xa['x_train'].shape[1:])} but x_test samples "
                f"have {list(xa['x_test'].shape[1:])}",
                where=where,
                fix="give train and test inputs the same per-sample shape",
            )
        xtr, ytr, xte, yte = xa["x_train"], ya["y_train"], xa["x_test"], ya["y_test"]
        split = "given"
    else:
        tr, te = seeded_split(xa["x"].shape[0], seed=seed, val_fraction=val_fraction, where=where)
        xtr, ytr, xte, yte = xa["x"][tr], ya["y"][tr], xa["x"][te], ya["y"][te]
        split = f"seeded val_fraction={val_fraction:g} seed={seed}"
    kind = kinds.pop()
    num_classes = int(max(ytr.max(), yte.max())) + 1
    missing = sorted(set(range(num_classes)) - set(np.unique(ytr).tolist()))
    if missing:
        shown = ", ".join(str(c) for c in missing[:10]) + (", …" if len(missing) > 10 else "")
        raise InputError(
            f"class(es) {shown} of 0..{num_classes - 1} have no training sample",
            where=where,
            fix="labels must be 0..C-1 with every class in the training split "
            "(relabel, or use more data / a smaller --val-fraction)",
        )
    if num_classes < 2:
        raise InputError(
            "only one class in the labels", where=where, fix="classification needs at least two classes"
        )
    stats = {**normalization_stats(xtr, kind), "scale": float(input_scale)}
    xtr, xte = apply_normalization(xtr, stats), apply_normalization(xte, stats)
    return Dataset(
        name=name,
        spec=spec,
        x_train=torch.from_numpy(np.ascontiguousarray(xtr)),
        y_train=torch.from_numpy(np.ascontiguousarray(ytr)),
        x_test=torch.from_numpy(np.ascontiguousarray(xte)),
        y_test=torch.from_numpy(np.ascontiguousarray(yte)),
        input_shape=tuple(int(s) for s in xtr.shape[1:]),
        num_classes=num_classes,
        kind=kind,
        normalization=stats,
        split=split,
        class_names=None if class_names is None else [str(c) for c in class_names],
    )
