"""Checking and shaping raw arrays into a training-ready :class:`~sparsekit.data.Dataset`.

Every loader (registry datasets and user files alike) ends here, so the rules of issue 2 live in one
place: integer labels 0…C−1 with every class in the training split, uint8 scaled to [0, 1], images
always with a channel axis, finite values, a seeded split when no test split is given, and
normalisation from the training split only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from sparsekit.data.lazy import LazySamples
from sparsekit.errors import InputError


@dataclass
class Dataset:
    """A classification dataset, normalised and split, as tensors (float32 inputs, int64 labels)."""

    name: str
    spec: str
    x_train: torch.Tensor | LazySamples  # lazy when larger than lazy.IN_MEMORY_BYTES (indexed like a tensor)
    y_train: torch.Tensor
    x_test: torch.Tensor | LazySamples
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


def check_feature_dtype(dtype: np.dtype, *, where: str, what: str = "x") -> None:
    """Inputs must be numbers (uint8, int, bool or float)."""
    if not (dtype.kind in "iub" or dtype.kind == "f"):
        raise InputError(
            f"{what} has dtype {dtype}, expected numbers (uint8, int or float)",
            where=where,
            fix="save the inputs as a numeric array (object and string arrays are refused)",
        )


def as_feature_array(x: Any, *, where: str, what: str = "x") -> np.ndarray:
    """Return ``x`` as a float32 array; uint8 is scaled to [0, 1]; non-numeric dtypes are refused."""
    x = np.asarray(x)
    check_feature_dtype(x.dtype, where=where, what=what)
    out = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32)
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


def sample_layout(shape: tuple[int, ...], *, where: str, what: str = "x") -> tuple[str, str]:
    """(kind, layout) of an input array from its shape alone: 2-D → tabular; N×H×W → ``nhw``;
    N×H×W×C → ``nhwc``; N×C×H×W → ``nchw`` (images always end channel-first, see :func:`apply_layout`)."""
    if len(shape) == 2:
        return "tabular", "nf"
    if len(shape) == 3:
        return "image", "nhw"
    if len(shape) == 4:
        last, second = shape[3] in (1, 3), shape[1] in (1, 3)
        if last and not second:
            return "image", "nhwc"
        if second and not last:
            return "image", "nchw"
        raise InputError(
            f"{what} has ambiguous image shape {list(shape)}",
            where=where,
            fix="store images as N×H×W×C (C = 1 or 3) with H and W larger than 3",
        )
    raise InputError(
        f"{what} has shape {list(shape)}, expected N×F (table), N×H×W or N×H×W×C (images)",
        where=where,
        fix="reshape the inputs to one of the supported layouts",
    )


def apply_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """Samples first, images channel-first: ``nhw`` gains a channel axis, ``nhwc`` is transposed."""
    if layout == "nhw":
        return x[:, None, :, :]
    if layout == "nhwc":
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def to_sample_layout(x: np.ndarray, *, where: str, what: str = "x") -> tuple[np.ndarray, str]:
    """Put samples first and images channel-first: 2-D → tabular; N×H×W → N×1×H×W; N×H×W×C → N×C×H×W."""
    kind, layout = sample_layout(x.shape, where=where, what=what)
    return apply_layout(x, layout), kind


def laid_out_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The per-sample shape after :func:`apply_layout`."""
    if layout == "nhw":
        return (1, *shape[1:])
    if layout == "nhwc":
        return (shape[3], shape[1], shape[2])
    return tuple(shape[1:])


def prepare_block(raw: np.ndarray, *, layout: str, stats: dict[str, Any], where: str) -> np.ndarray:
    """Raw rows → normalised float32 samples: what the in-memory path does to a whole split, per batch."""
    return apply_normalization(apply_layout(as_feature_array(raw, where=where), layout), stats)


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
    recorded with the normalisation so that a deployer can start from the stored values. Inputs whose
    converted size exceeds ``lazy.IN_MEMORY_BYTES`` (typically memory-mapped arrays) are not read here: they
    become lazy sources converted per batch (:mod:`sparsekit.data.lazy`)."""
    from sparsekit.data import lazy

    check_val_fraction(val_fraction)
    given = x_test is not None
    if np.asarray(x_train).dtype == np.uint8:
        input_scale = input_scale / 255.0
    xs = {"x_train": x_train, "x_test": x_test} if given else {"x": x_train}
    ys = {"y_train": y_train, "y_test": y_test} if given else {"y": y_train}
    in_memory = all(lazy.fits_in_memory(len(v), int(np.prod(np.shape(v)[1:]))) for v in xs.values())
    if in_memory:
        xs = {k: as_feature_array(v, where=where, what=k) for k, v in xs.items()}
    else:
        for k, v in xs.items():
            check_feature_dtype(v.dtype, where=where, what=k)
    ya = {k: as_label_array(v, where=where, what=k) for k, v in ys.items()}
    layouts = {k: sample_layout(v.shape, where=where, what=k) for k, v in xs.items()}
    kinds = {kind for kind, _ in layouts.values()}
    shapes = {k: laid_out_shape(v.shape, layouts[k][1]) for k, v in xs.items()}
    for (xk, xv), (yk, yv) in zip(xs.items(), ya.items(), strict=True):
        if xv.shape[0] != yv.shape[0]:
            raise InputError(
                f"{xk} has {xv.shape[0]} samples but {yk} has {yv.shape[0]} labels",
                where=where,
                fix="store one label per sample",
            )
        if xv.shape[0] == 0:
            raise InputError(f"{xk} has no samples", where=where, fix="provide a non-empty dataset")
    if given:
        if shapes["x_train"] != shapes["x_test"] or len(kinds) != 1:
            raise InputError(
                f"x_train samples have shape {list(shapes['x_train'])} but x_test samples "
                f"have {list(shapes['x_test'])}",
                where=where,
                fix="give train and test inputs the same per-sample shape",
            )
        sources = {"train": (xs["x_train"], None, layouts["x_train"][1]),
                   "test": (xs["x_test"], None, layouts["x_test"][1])}
        ytr, yte = ya["y_train"], ya["y_test"]
        split = "given"
    else:
        tr, te = seeded_split(xs["x"].shape[0], seed=seed, val_fraction=val_fraction, where=where)
        sources = {"train": (xs["x"], tr, layouts["x"][1]), "test": (xs["x"], te, layouts["x"][1])}
        ytr, yte = ya["y"][tr], ya["y"][te]
        split = f"seeded val_fraction={val_fraction:g} seed={seed}"
    kind = kinds.pop()
    num_classes = check_classes(ytr, yte, where=where)
    if in_memory:
        laid: dict[int, np.ndarray] = {}  # one array for both parts of a seeded split
        for x, _, layout in sources.values():
            laid.setdefault(id(x), apply_layout(x, layout))
        xtr, xte = (laid[id(x)] if rows is None else laid[id(x)][rows] for x, rows, _ in sources.values())
        stats = {**normalization_stats(xtr, kind), "scale": float(input_scale)}
        x_train_t = torch.from_numpy(np.ascontiguousarray(apply_normalization(xtr, stats)))
        x_test_t = torch.from_numpy(np.ascontiguousarray(apply_normalization(xte, stats)))
    else:
        x, rows, layout = sources["train"]
        stats = {**streamed_stats(x, rows, layout, kind, where=where), "scale": float(input_scale)}
        x_train_t, x_test_t = (
            lazy.ArraySamples(x, rows, partial(prepare_block, layout=layout, stats=stats, where=where),
                              laid_out_shape(x.shape, layout))
            for x, rows, layout in sources.values())
    return Dataset(
        name=name,
        spec=spec,
        x_train=x_train_t,
        y_train=torch.from_numpy(np.ascontiguousarray(ytr)),
        x_test=x_test_t,
        y_test=torch.from_numpy(np.ascontiguousarray(yte)),
        input_shape=tuple(int(s) for s in shapes["x_train" if given else "x"]),
        num_classes=num_classes,
        kind=kind,
        normalization=stats,
        split=split,
        class_names=None if class_names is None else [str(c) for c in class_names],
    )


def check_classes(ytr: np.ndarray, yte: np.ndarray, *, where: str) -> int:
    """The number of classes; every class 0..C-1 must have a training sample and C must be at least 2."""
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
    return num_classes


def streamed_stats(x: np.ndarray, rows: np.ndarray | None, layout: str, kind: str, *, where: str) -> dict[str, Any]:
    """:func:`normalization_stats` of the training rows of a (memory-mapped) array, read in chunks; also
    refuses non-finite values as the in-memory path does."""
    from sparsekit.data.lazy import STATS_CHUNK, RunningMoments

    moments = RunningMoments()
    n = len(x) if rows is None else len(rows)
    for start in range(0, n, STATS_CHUNK):
        picked = slice(start, start + STATS_CHUNK) if rows is None else rows[start:start + STATS_CHUNK]
        moments.add(apply_layout(as_feature_array(x[picked], where=where, what="x_train"), layout))
    return moments.stats(kind)
