"""Lazy samples: datasets larger than memory, converted a batch at a time.

A :class:`~sparsekit.data.Dataset` holds its inputs as tensors when the converted (float32) split fits in
``IN_MEMORY_BYTES``; above that it holds a lazy source instead, indexed like a tensor (``x[idx]`` with an
index tensor or array, ``x[i:j]``, ``len(x)``, ``x.shape``) and returning the same float32 values the
in-memory path would: rows of a memory-mapped array (:class:`ArraySamples`) or image files decoded on
access (:class:`ImageFiles`). Normalisation statistics come from the training split, streamed in chunks
(arrays) or from a seeded sample of ``STATS_IMAGES`` images (folders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Converted (float32) size of a split above which the inputs stay on disk and are read per batch.
IN_MEMORY_BYTES = 1 << 30
#: Samples per chunk when streaming statistics over a memory-mapped array.
STATS_CHUNK = 4096
#: Images decoded to estimate a large folder's normalisation and channel count (all of them when fewer).
STATS_IMAGES = 1024


def fits_in_memory(n_samples: int, sample_elems: int) -> bool:
    """Whether ``n_samples`` float32 samples of ``sample_elems`` values each stay under ``IN_MEMORY_BYTES``."""
    return n_samples * sample_elems * 4 <= IN_MEMORY_BYTES


def positions(key: Any, n: int) -> np.ndarray:
    """Sample positions selected by ``key`` (an int, a slice, or an index tensor/array) as int64."""
    if isinstance(key, slice):
        return np.arange(n, dtype=np.int64)[key]
    if isinstance(key, torch.Tensor):
        key = key.cpu().numpy()
    idx = np.asarray(key)
    if idx.dtype == np.bool_:
        return np.flatnonzero(idx).astype(np.int64)
    idx = idx.astype(np.int64).reshape(-1)
    return np.where(idx < 0, idx + n, idx)


class LazySamples:
    """Tensor-like access to samples converted on demand; subclasses implement ``convert``."""

    def __init__(self, n: int, sample_shape: tuple[int, ...]) -> None:
        self.n = n
        self.sample_shape = sample_shape

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, *self.sample_shape))

    def __len__(self) -> int:
        return self.n

    def dim(self) -> int:
        return 1 + len(self.sample_shape)

    def __getitem__(self, key: Any) -> torch.Tensor:
        idx = positions(key, self.n)
        out = torch.from_numpy(np.ascontiguousarray(self.convert(idx)))
        return out[0] if isinstance(key, (int, np.integer)) else out

    def convert(self, idx: np.ndarray) -> np.ndarray:
        """float32 samples at positions ``idx`` (normalised, channel-first images)."""
        raise NotImplementedError

    def subset(self, part: slice) -> LazySamples:
        """The samples ``part`` as another lazy source (``x[part]`` would read them all)."""
        raise NotImplementedError


class ArraySamples(LazySamples):
    """Rows ``rows`` (all when None) of a raw array, usually a ``np.memmap``; ``prepare`` turns a block of raw
    rows into normalised float32 samples (the same function the in-memory path applies to the whole array)."""

    def __init__(self, raw: np.ndarray, rows: np.ndarray | None, prepare: Callable[[np.ndarray], np.ndarray],
                 sample_shape: tuple[int, ...]) -> None:
        super().__init__(len(raw) if rows is None else len(rows), sample_shape)
        self.raw, self.rows, self.prepare = raw, rows, prepare

    def convert(self, idx: np.ndarray) -> np.ndarray:
        picked = idx if self.rows is None else self.rows[idx]
        return self.prepare(self.raw[picked])

    def subset(self, part: slice) -> ArraySamples:
        rows = np.arange(len(self.raw)) if self.rows is None else self.rows
        return ArraySamples(self.raw, rows[part], self.prepare, self.sample_shape)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (DataLoader workers under spawn) as the file and offset of a memmap, not its bytes."""
        state = dict(self.__dict__)
        raw = self.raw
        if isinstance(raw, np.memmap) and raw.filename is not None:
            order = "F" if raw.flags.f_contiguous and not raw.flags.c_contiguous else "C"
            state["raw"] = ("memmap", raw.filename, raw.offset, raw.dtype.str, raw.shape, order)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        raw = state["raw"]
        if isinstance(raw, tuple) and raw and raw[0] == "memmap":
            _, filename, offset, dtype, shape, order = raw
            state["raw"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape,
                                     order=order)
        self.__dict__.update(state)


class ImageFiles(LazySamples):
    """Image files decoded when indexed: ``decode(path)`` gives a uint8 H×W×C array, ``prepare`` normalises a
    uint8 N×H×W×C block to float32 N×C×H×W."""

    def __init__(self, files: Sequence[Path], decode: Callable[[Path], np.ndarray],
                 prepare: Callable[[np.ndarray], np.ndarray], sample_shape: tuple[int, ...]) -> None:
        super().__init__(len(files), sample_shape)
        self.files, self.decode, self.prepare = list(files), decode, prepare

    def convert(self, idx: np.ndarray) -> np.ndarray:
        c, h, w = self.sample_shape
        block = np.empty((len(idx), h, w, c), dtype=np.uint8)
        for i, j in enumerate(idx):
            block[i] = self.decode(self.files[int(j)])
        return self.prepare(block)

    def subset(self, part: slice) -> ImageFiles:
        return ImageFiles(self.files[part], self.decode, self.prepare, self.sample_shape)


class RunningMoments:
    """Per-position count, mean and M2 over chunks (Chan et al.'s parallel update), in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, chunk: np.ndarray) -> None:
        x = chunk.astype(np.float64).reshape(len(chunk), -1)
        n, mean = len(x), x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def stats(self, kind: str) -> dict[str, Any]:
        """The in-memory path's rule: per feature for tables when every feature varies, else one global pair."""
        assert self.mean is not None and self.m2 is not None
        std = np.sqrt(self.m2 / self.count)
        if kind == "tabular" and self.count > 1 and (std > 0).all():
            return {"mean": self.mean.tolist(), "std": std.tolist(), "per_feature": True}
        g_mean = float(self.mean.mean())
        g_var = float((self.m2.sum() + self.count * ((self.mean - g_mean) ** 2).sum()) / (self.count * self.mean.size))
        g_std = g_var**0.5 if g_var > 0 else 1.0
        return {"mean": g_mean, "std": g_std, "per_feature": False}


def folder_dataset(found: dict[str, Any], *, name: str, spec: str, where: str, seed: int,
                   val_fraction: float) -> Any:
    """A :class:`~sparsekit.data.Dataset` of a large image folder (``read_folder`` gave ``files``): a seeded
    split of the files, statistics and (unless given) the channel count from up to ``STATS_IMAGES``
    training images, images decoded when indexed."""
    from functools import partial

    from sparsekit.data.arrays import (
        Dataset,
        apply_layout,
        as_feature_array,
        check_classes,
        normalization_stats,
        prepare_block,
        seeded_split,
    )
    from sparsekit.data.readers import decode_image, decode_to_channels, is_colour, to_channels

    files, y, size = found["files"], found["y"], found["size"]
    tr, te = seeded_split(len(files), seed=seed, val_fraction=val_fraction, where=where)
    num_classes = check_classes(y[tr], y[te], where=where)
    sample = np.sort(np.random.default_rng(seed).permutation(tr)[:STATS_IMAGES])
    decoded = [decode_image(files[i], size) for i in sample]
    c = found["channels"] or (3 if any(is_colour(im) for im in decoded) else 1)
    block = apply_layout(np.stack([to_channels(im, c) for im in decoded]), "nhwc")
    # decoded pixels are uint8, which as_feature_array scales by 1/255: recorded for deployers (make_dataset's rule)
    stats = {**normalization_stats(as_feature_array(block, where=where), "image"),
             "scale": 1.0 / 255.0 if block.dtype == np.uint8 else 1.0}
    decode = partial(decode_to_channels, size=size, channels=c)
    prepare = partial(prepare_block, layout="nhwc", stats=stats, where=where)
    x_train, x_test = (ImageFiles([files[i] for i in rows], decode, prepare, (c, size, size)) for rows in (tr, te))
    return Dataset(name=name, spec=spec, x_train=x_train, y_train=torch.from_numpy(y[tr]), x_test=x_test,
                   y_test=torch.from_numpy(y[te]), input_shape=(c, size, size), num_classes=num_classes,
                   kind="image", normalization=stats, class_names=[str(c) for c in found.get("classes") or []] or None,
                   split=f"seeded val_fraction={val_fraction:g} seed={seed}; images decoded per batch, "
                         f"normalisation from {len(sample)} training images")
