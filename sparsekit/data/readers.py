"""Readers for user data files (``npz:``, ``csv:``, ``folder:``) and the built-in sources.

Readers return raw arrays; :func:`sparsekit.data.arrays.make_dataset` does the checking, splitting and
normalisation. Every failure to read a file becomes an :class:`InputError` naming the file.
"""

from __future__ import annotations

import csv
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from sparsekit.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def user_path(path: str) -> Path:
    """``Path(path)`` with ``~`` expanded where possible (an unknown ``~user`` stays literal)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def existing_path(path: str, *, kind: str, directory: bool = False) -> Path:
    if not path:
        raise InputError(
            f"{kind}: spec has no path", where=f"--data {kind}:", fix=f"write --data {kind}:PATH"
        )
    p = user_path(path)
    if not p.exists():
        raise InputError(
            f"data {'folder' if directory else 'file'} not found: {p}",
            where=f"--data {kind}:{path}",
            fix="check the path (relative paths are from the current directory)",
        )
    if directory and not p.is_dir():
        raise InputError(
            f"{p} is not a folder",
            where=f"--data {kind}:{path}",
            fix="folder: expects a directory with one subfolder per class" if kind == "folder"
            else f"{kind}: expects a directory",
        )
    if not directory and p.is_dir():
        raise InputError(
            f"{p} is a folder, not a file",
            where=f"--data {kind}:{path}",
            fix="use folder:PATH for class-per-subfolder images",
        )
    if not directory and p.stat().st_size == 0:
        raise InputError(
            f"data file is empty: {p}",
            where=f"--data {kind}:{path}",
            fix="regenerate or re-download the file",
        )
    return p


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Arrays of an .npz with keys ``x, y`` or ``x_train, y_train, x_test, y_test`` (no pickles)."""
    p = existing_path(path, kind="npz")
    where = str(p)
    try:
        with open(p, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise InputError(
            f"cannot read {p}: {exc.strerror or exc}", where=where, fix="check permissions"
        ) from exc
    if magic.startswith(b"\x93NUMPY"):
        raise InputError(
            f"{p} is a single .npy array, not an .npz archive",
            where=where,
            fix="save with numpy.savez(path, x=..., y=...) or x_train/y_train/x_test/y_test",
        )
    if not magic.startswith(b"PK"):
        raise InputError(
            f"cannot read {p}: not an .npz (zip) archive",
            where=where,
            fix="save the arrays with numpy.savez or numpy.savez_compressed",
        )
    try:
        with np.load(p, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise InputError(
                    f"{p} is a single .npy array, not an .npz archive",
                    where=where,
                    fix="save with numpy.savez(path, x=..., y=...) or x_train/y_train/x_test/y_test",
                )
            keys = set(archive.files)
            full, pair = {"x_train", "y_train", "x_test", "y_test"}, {"x", "y"}
            if full <= keys and pair & keys:
                raise InputError(
                    f"{p} has both x/y and x_train/.../y_test keys (ambiguous)",
                    where=where,
                    fix="keep either x,y (split for you) or x_train,y_train,x_test,y_test",
                )
            if full <= keys:
                wanted = ["x_train", "y_train", "x_test", "y_test"]
            elif pair <= keys:
                wanted = ["x", "y"]
            else:
                raise InputError(
                    f"{p} has keys {sorted(keys)}; expected x,y or x_train,y_train,x_test,y_test",
                    where=where,
                    fix="re-save the arrays under the expected key names",
                )
            return {k: _npz_array(p, archive, k) for k in wanted}
    except InputError:
        raise
    except ValueError as exc:
        text = str(exc)
        if "object arrays" in text.lower():
            raise InputError(
                f"{p} contains object arrays, which are refused (they need pickle)",
                where=where,
                fix="save numeric arrays only (e.g. x.astype('float32'), y.astype('int64'))",
            ) from exc
        raise InputError(
            f"cannot read {p} as .npz: {text}",
            where=where,
            fix="the file is corrupt or not an .npz; regenerate it with numpy.savez",
        ) from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, RuntimeError) as exc:
        raise InputError(
            f"cannot read {p} as .npz ({type(exc).__name__}: {exc})",
            where=where,
            fix="the file is truncated, corrupt or not an .npz; regenerate it with numpy.savez",
        ) from exc


def _npz_array(path: Path, archive: Any, key: str) -> np.ndarray:
    """Member ``key``: memory-mapped when it is an input too large for memory and stored uncompressed
    (``numpy.savez``), else read (and CRC-checked) into memory."""
    from sparsekit.data.lazy import fits_in_memory
    from sparsekit.data.mmap import map_npz_member, npz_members

    if key.startswith("x"):
        info = npz_members(path)[key]
        if info.stored and not fits_in_memory(info.shape[0] if info.shape else 1, int(np.prod(info.shape[1:]))):
            return map_npz_member(path, key)
    return archive[key]


def read_npy_dir(path: str) -> dict[str, np.ndarray]:
    """A folder of ``.npy`` files ``x, y`` or ``x_train, y_train, x_test, y_test``; inputs memory-mapped."""
    from sparsekit.data.mmap import map_npy

    root = existing_path(path, kind="npy", directory=True)
    names = {f.stem for f in root.glob("*.npy")}
    full, pair = ["x_train", "y_train", "x_test", "y_test"], ["x", "y"]
    wanted = full if set(full) <= names else pair if set(pair) <= names else None
    if wanted is None or (set(full) <= names and set(pair) & names):
        raise InputError(
            f"{root} has .npy files {sorted(names)}; expected x.npy,y.npy or x_train,y_train,x_test,y_test .npy",
            where=str(root),
            fix="save each array with numpy.save under one of those two sets of names",
        )
    out: dict[str, np.ndarray] = {}
    for key in wanted:
        f = root / f"{key}.npy"
        try:
            out[key] = map_npy(f) if key.startswith("x") else np.load(f, allow_pickle=False)
        except InputError:
            raise
        except (ValueError, OSError, EOFError) as exc:
            what = "object arrays, which are refused (they need pickle)" if "pickle" in str(exc) else "no valid .npy"
            raise InputError(f"{f} holds {what} ({type(exc).__name__}: {exc})", where=str(f),
                             fix="save numeric arrays with numpy.save (the file may be truncated or corrupt)") from exc
    return out


def _parse_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def read_csv(path: str, label_column: int | str | None) -> dict[str, np.ndarray]:
    """Numeric table with an optional header row (detected: any non-numeric cell in the first row)."""
    p = existing_path(path, kind="csv")
    where = str(p)
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(
            f"cannot read {p} as CSV ({type(exc).__name__}: {exc})",
            where=where,
            fix="save the table as UTF-8 comma-separated text",
        ) from exc
    if not rows:
        raise InputError(f"CSV file has no rows: {p}", where=where, fix="provide a table with data rows")
    header: list[str] | None = None
    if any(_parse_float(c.strip()) is None for c in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    if not rows:
        raise InputError(
            f"CSV file has a header but no data rows: {p}", where=where, fix="provide a table with data rows"
        )
    ncol = len(header) if header is not None else len(rows[0])
    if ncol < 2:
        raise InputError(
            f"CSV has {ncol} column(s); need features and a label",
            where=where,
            fix="use at least one feature column and one label column",
        )
    label_index = _label_index(label_column, header, ncol, where)
    values = np.empty((len(rows), ncol), dtype=np.float64)
    first_line = 2 if header is not None else 1
    for i, row in enumerate(rows):
        if len(row) != ncol:
            raise InputError(
                f"row {i + first_line} has {len(row)} columns, expected {ncol}",
                where=where,
                fix="give every row the same number of comma-separated values",
            )
        for j, cell in enumerate(row):
            v = _parse_float(cell.strip())
            if v is None:
                raise InputError(
                    f"non-numeric value {cell.strip()!r} at row {i + first_line}, column {j + 1}",
                    where=where,
                    fix="features and labels must be numbers (encode categories first)",
                )
            values[i, j] = v
    features = np.delete(values, label_index, axis=1)
    return {"x": features, "y": values[:, label_index]}


def _label_index(label_column: int | str | None, header: list[str] | None, ncol: int, where: str) -> int:
    if label_column is None:
        return ncol - 1
    if isinstance(label_column, str):
        if header is not None and label_column in header:
            return header.index(label_column)
        try:
            label_column = int(label_column)
        except ValueError:
            choices = f"columns: {', '.join(header)}" if header else "the CSV has no header row; use an index"
            raise InputError(
                f"label column {label_column!r} not found", where=f"--label-column ({where})", fix=choices
            ) from None
    if (
        isinstance(label_column, bool)
        or not isinstance(label_column, int)
        or not -ncol <= label_column < ncol
    ):
        raise InputError(
            f"label column {label_column!r} out of range for {ncol} columns",
            where=f"--label-column ({where})",
            fix=f"use an index 0..{ncol - 1} or -1 (last)",
        )
    return label_column % ncol


def read_folder(path: str, *, image_size: int | None, channels: int | None) -> dict[str, Any]:
    """Class-per-subfolder images (sorted class names), resized to image_size × image_size, as uint8 N×S×S×C.

    A folder whose decoded images would not fit in ``lazy.IN_MEMORY_BYTES`` is not decoded here: the result
    then has ``files`` instead of ``x``, and :func:`folder_dataset` decodes images when batches are drawn."""
    from sparsekit.data.lazy import fits_in_memory

    root = existing_path(path, kind="folder", directory=True)
    size = 32 if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
        raise InputError(
            f"image size {image_size!r} is invalid",
            where="--image-size",
            fix="use a positive integer, e.g. 32",
        )
    if channels is not None and channels not in (1, 3):
        raise InputError(
            f"channels {channels!r} is invalid", where="--channels", fix="use 1 (grayscale) or 3 (RGB)"
        )
    files, y, classes = list_image_files(root)
    out: dict[str, Any] = {"y": y, "classes": classes, "size": size}
    if not fits_in_memory(len(files), size * size * (channels or 3)):
        return {**out, "files": files, "channels": channels}
    # Resize as we read (memory stays ~ N × size² × 3 bytes); gray sources stay 1-channel until we
    # know whether any image is colour.
    resized = [decode_image(f, size) for f in files]
    c = channels if channels is not None else (3 if any(is_colour(im) for im in resized) else 1)
    x = np.empty((len(resized), size, size, c), dtype=np.uint8)
    for i, small in enumerate(resized):
        x[i] = to_channels(small, c)
    return {**out, "x": x, "channels": c}


def list_image_files(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """The image files of each class subfolder (sorted), their labels, and the sorted class names."""
    where = str(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise InputError(
            f"{root} has {len(classes)} class subfolder(s); need at least 2",
            where=where,
            fix="put each class's images in its own subfolder, e.g. images/cat/1.png",
        )
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(
            f
            for f in (root / name).iterdir()
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        )
        if not found:
            raise InputError(
                f"class folder {root / name} has no images",
                where=where,
                fix=f"add images ({', '.join(IMAGE_SUFFIXES)}) or remove the folder",
            )
        files += [(f, label) for f in found]
    return [f for f, _ in files], np.array([label for _, label in files], dtype=np.int64), classes


def decode_image(f: Path, size: int) -> np.ndarray:
    """One image resized to size × size: uint8 H×W (gray sources) or H×W×3."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            im.load()
            img = im.convert("L" if im.mode in GRAY_MODES else "RGB")
            return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as exc:
        raise InputError(
            f"cannot read image {f} ({type(exc).__name__}: {exc})",
            where=str(f),
            fix="remove or replace the corrupt/truncated image",
        ) from exc


def is_colour(small: np.ndarray) -> bool:
    """Whether a decoded image has differing colour channels (RGB files of gray pixels count as gray)."""
    return small.ndim == 3 and not (
        np.array_equal(small[..., 0], small[..., 1]) and np.array_equal(small[..., 1], small[..., 2])
    )


def to_channels(small: np.ndarray, c: int) -> np.ndarray:
    """A decoded image as uint8 H×W×C with C = 1 or 3."""
    from PIL import Image

    if c == 3:
        return small if small.ndim == 3 else np.repeat(small[..., None], 3, axis=2)
    return (small if small.ndim == 2 else np.asarray(Image.fromarray(small).convert("L")))[..., None]


def decode_to_channels(f: Path, *, size: int, channels: int) -> np.ndarray:
    """:func:`decode_image` then :func:`to_channels`: one lazily read folder image."""
    return to_channels(decode_image(f, size), channels)


def read_digits() -> dict[str, Any]:
    """scikit-learn's bundled 8×8 digits (1,797 real scans, no download), pixel values 0..16 → [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    return {"x": x, "y": bunch.target.astype(np.int64), "classes": [str(c) for c in bunch.target_names],
            "input_scale": 1.0 / 16.0}


SYNTHETIC_DEFAULTS = {"n": 512, "test": 128, "features": 20, "classes": 4, "seed": 0}
SYNTHETIC_LIMITS = {"n": 1_000_000, "test": 1_000_000, "features": 10_000, "classes": 10_000, "size": 256}
SYNTHETIC_IMAGE_DEFAULTS = {"n": 512, "test": 128, "size": 8, "channels": 1, "classes": 4, "seed": 0}


def parse_spec_params(text: str, defaults: dict[str, int], *, spec: str) -> dict[str, int]:
    """``n=…,features=…`` → ints, only keys from ``defaults``; each positive (seed ≥ 0)."""
    out = dict(defaults)
    if not text:
        return out
    seen: set[str] = set()
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise InputError(
                f"bad parameter {part!r} in data spec",
                where=f"--data {spec}",
                fix=f"use key=value pairs with keys {', '.join(defaults)}",
            )
        if key in seen:
            raise InputError(
                f"parameter {key!r} given twice", where=f"--data {spec}", fix="give each key once"
            )
        seen.add(key)
        try:
            number = int(value.strip())
        except ValueError:
            raise InputError(
                f"parameter {key}={value!r} is not an integer",
                where=f"--data {spec}",
                fix=f"e.g. {key}={defaults[key]}",
            ) from None
        if number < (0 if key == "seed" else 1):
            raise InputError(
                f"parameter {key}={number} must be positive",
                where=f"--data {spec}",
                fix=f"e.g. {key}={defaults[key]}",
            )
        if number > SYNTHETIC_LIMITS.get(key, number):
            raise InputError(
                f"parameter {key}={number} is too large",
                where=f"--data {spec}",
                fix=f"use at most {key}={SYNTHETIC_LIMITS[key]} (synthetic data is for tests)",
            )
        out[key] = number
    if out["classes"] < 2:
        raise InputError("synthetic data needs classes ≥ 2", where=f"--data {spec}", fix="e.g. classes=4")
    if out["n"] < out["classes"]:
        raise InputError(
            f"n={out['n']} is smaller than classes={out['classes']}",
            where=f"--data {spec}",
            fix="use n ≥ classes so every class has a training sample",
        )
    return out


def _balanced_labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    """Labels with every class present (n ≥ classes), in random order."""
    y = np.arange(n) % classes
    return rng.permutation(y).astype(np.int64)


def make_synthetic(params: dict[str, int]) -> dict[str, np.ndarray]:
    """Gaussian blobs: class centres ~ N(0, 1.5²) per feature, unit noise; learnable but not trivial.

    The data depend only on the spec's ``seed`` (default 0), not on the training seed, so runs with
    different seeds see the same data.
    """
    rng = np.random.default_rng(params["seed"])
    centres = rng.normal(
        0.0, 1.5 / math.sqrt(max(1.0, params["features"] / 20)), size=(params["classes"], params["features"])
    )

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = _balanced_labels(rng, n, params["classes"])
        x = centres[y] + rng.normal(0.0, 1.0, size=(n, params["features"]))
        return x.astype(np.float32), y

    x_train, y_train = draw(params["n"])
    x_test, y_test = draw(params["test"])
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def make_synthetic_image(params: dict[str, int]) -> dict[str, np.ndarray]:
    """Image-shaped blobs (N×C×S×S): one smooth random template per class plus pixel noise."""
    rng = np.random.default_rng(params["seed"])
    c, s, k = params["channels"], params["size"], params["classes"]
    if c not in (1, 3):
        raise InputError(
            f"channels={c} is invalid", where="--data synthetic-image", fix="use channels=1 or 3"
        )
    if s < 4:
        raise InputError(
            f"size={s} is too small", where="--data synthetic-image", fix="use size ≥ 4, e.g. size=8"
        )
    coarse = rng.normal(0.0, 1.0, size=(k, c, max(2, s // 2), max(2, s // 2)))
    # Upsample the coarse pattern (nearest) so templates have spatial structure, like strokes.
    reps = math.ceil(s / coarse.shape[-1])
    templates = np.repeat(np.repeat(coarse, reps, axis=2), reps, axis=3)[:, :, :s, :s]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = _balanced_labels(rng, n, k)
        x = templates[y] + rng.normal(0.0, 1.0, size=(n, c, s, s))
        return x.astype(np.float32), y

    x_train, y_train = draw(params["n"])
    x_test, y_test = draw(params["test"])
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
