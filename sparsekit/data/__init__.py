"""Datasets: a small registry of built-in sources plus prefixed specs for user files.

Spec grammar (``--data``): ``digits`` | ``synthetic[:n=…,test=…,features=…,classes=…,seed=…]`` |
``synthetic-image[:n=…,test=…,size=…,channels=…,classes=…,seed=…]`` | ``npz:PATH`` | ``csv:PATH`` |
``npy:DIR`` | ``folder:PATH`` | ``cifar-bin:DIR`` | ``text:PATH`` | ``stdlib-docs``. File specs need their
prefix: a bare path is refused
rather than guessed. ``text:`` and ``stdlib-docs`` are language-modelling corpora (``sparsekit.data.text``).
Nothing is downloaded; no file is unpickled. Inputs too large for memory stay on disk (memory-mapped arrays,
folder images decoded per batch): see ``sparsekit.data.lazy``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparsekit.data import readers
from sparsekit.data.arrays import Dataset, check_val_fraction, make_dataset
from sparsekit.errors import InputError, close_matches

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "list_datasets", "load_dataset"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    spec_example: str


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "digits",
            "scikit-learn's bundled 8×8 handwritten digits (1,797 real scans, 10 classes; "
            "images 1×8×8; seeded 80/20 split); the default",
            "digits",
        ),
        DatasetInfo(
            "synthetic",
            "seeded Gaussian blobs, tabular (default 512 train / 128 test, 20 features, "
            "4 classes); for tests",
            "synthetic:n=512,test=128,features=20,classes=4,seed=0",
        ),
        DatasetInfo(
            "synthetic-image",
            "seeded image-shaped blobs (default 1×8×8, 512 train / 128 test, 4 classes); for tests",
            "synthetic-image:n=512,size=8,channels=1,classes=4",
        ),
        DatasetInfo(
            "npz",
            "NumPy .npz with keys x,y (split for you) or x_train,y_train,x_test,y_test; "
            "uint8 scaled to [0,1]; N×H×W or N×H×W×C images, N×F tables; uncompressed (savez) inputs over "
            "1 GiB as float32 are memory-mapped, compressed ones are read into memory",
            "npz:data/mnist.npz",
        ),
        DatasetInfo(
            "npy",
            "folder of NumPy .npy files x,y or x_train,y_train,x_test,y_test, memory-mapped (larger than "
            "memory is fine; read per batch when over 1 GiB as float32); same rules as npz",
            "npy:data/big",
        ),
        DatasetInfo(
            "cifar-bin",
            "CIFAR-10/100 binary version (data_batch_1..5.bin + test_batch.bin, or train.bin + test.bin "
            "with fine labels); 3×32×32 images, given test split; no pickles",
            "cifar-bin:cifar-10-batches-bin",
        ),
        DatasetInfo(
            "csv",
            "numeric CSV table, header row optional; label column by --label-column "
            "(index or header name; default last)",
            "csv:table.csv",
        ),
        DatasetInfo(
            "stdlib-docs",
            "language modelling: the English text of the Python documentation topics shipped with "
            "every Python (pydoc_data.topics, ~0.47 MB; no download); byte vocabulary, windows of "
            "--seq-len, split by position",
            "stdlib-docs",
        ),
        DatasetInfo(
            "text",
            "language modelling: a UTF-8 text file, split by position (last --val-fraction tests), "
            "windows of --seq-len (default 128) with next-symbol targets; --vocab byte (256) or char",
            "text:corpus.txt",
        ),
        DatasetInfo(
            "folder",
            "class-per-subfolder images read with Pillow, resized to --image-size "
            "(default 32), --channels 1 or 3 (default: 3 if any image is colour); over 1 GiB decoded, images "
            "are decoded per batch and normalised from 1,024 sampled images",
            "folder:./images",
        ),
    ]
}

_FILE_KINDS = ("npz", "npy", "csv", "folder", "cifar-bin", "text")
_TEXT_KINDS = ("text", "stdlib-docs")


def list_datasets() -> list[dict[str, str]]:
    """Rows for ``sparsekit datasets``."""
    return [
        {"name": i.name, "description": i.description, "example": i.spec_example} for i in DATASETS.values()
    ]


def load_dataset(
    spec: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    label_column: int | str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    seq_len: int | None = None,
    vocab: str | None = None,
) -> Dataset:
    """Load, check, split and normalise the dataset named by ``spec`` (deterministic for a given seed)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("empty data spec", where="--data", fix=_fix_hint())
    spec = spec.strip()
    check_val_fraction(val_fraction)
    kind, sep, rest = spec.partition(":")
    if kind not in DATASETS:
        raise _unknown(spec)
    if label_column is not None and kind != "csv":
        raise InputError(
            f"--label-column only applies to csv: data, not {kind}",
            where="--label-column",
            fix="drop --label-column or use --data csv:PATH",
        )
    if (image_size is not None or channels is not None) and kind != "folder":
        flag = "--image-size" if image_size is not None else "--channels"
        raise InputError(
            f"{flag} only applies to folder: data, not {kind}",
            where=flag,
            fix=f"drop {flag} or use --data folder:PATH",
        )
    if (seq_len is not None or vocab is not None) and kind not in _TEXT_KINDS:
        flag = "--seq-len" if seq_len is not None else "--vocab"
        raise InputError(f"{flag} only applies to text data (text:PATH, stdlib-docs), not {kind}", where=flag,
                         fix=f"drop {flag} or use --data text:PATH")
    if kind in _TEXT_KINDS:
        from sparsekit.data import text as text_data

        if kind == "stdlib-docs" and sep:
            raise InputError("stdlib-docs takes no parameters", where=f"--data {spec}",
                             fix="write --data stdlib-docs (use --seq-len and --vocab for the windows)")
        corpus = text_data.stdlib_docs_text() if kind == "stdlib-docs" else text_data.read_text_file(rest)
        where = f"--data {spec}" if kind == "stdlib-docs" else str(readers.user_path(rest))
        return text_data.make_text_dataset(corpus, name=kind, spec=spec, where=where, seq_len=seq_len,
                                           vocab=vocab, val_fraction=val_fraction)
    build: Callable[[], dict[str, Any]]
    where = f"--data {spec}"
    if kind == "digits":
        if sep:
            raise InputError("digits takes no parameters", where=where, fix="write --data digits")
        build = readers.read_digits
    elif kind == "synthetic":
        params = readers.parse_spec_params(rest, readers.SYNTHETIC_DEFAULTS, spec=spec)

        def build() -> dict[str, Any]:
            return readers.make_synthetic(params)
    elif kind == "synthetic-image":
        params = readers.parse_spec_params(rest, readers.SYNTHETIC_IMAGE_DEFAULTS, spec=spec)

        def build() -> dict[str, Any]:
            return readers.make_synthetic_image(params)
    elif kind == "npz":
        where = str(readers.user_path(rest)) if rest else where

        def build() -> dict[str, Any]:
            return readers.read_npz(rest)
    elif kind == "npy":
        where = str(readers.user_path(rest)) if rest else where

        def build() -> dict[str, Any]:
            return readers.read_npy_dir(rest)
    elif kind == "cifar-bin":
        where = str(readers.user_path(rest)) if rest else where

        def build() -> dict[str, Any]:
            from sparsekit.data.cifar import read_cifar_bin

            return read_cifar_bin(rest)
    elif kind == "csv":
        where = str(readers.user_path(rest)) if rest else where

        def build() -> dict[str, Any]:
            return readers.read_csv(rest, label_column)
    else:  # folder
        where = str(readers.user_path(rest)) if rest else where

        def build() -> dict[str, Any]:
            return readers.read_folder(rest, image_size=image_size, channels=channels)

    arrays = build()
    if "files" in arrays:  # a folder too large to decode up front
        from sparsekit.data.lazy import folder_dataset

        return folder_dataset(arrays, name=kind, spec=spec, where=where, seed=seed, val_fraction=val_fraction)
    if "x_train" in arrays:  # a given test split
        split = {"x_train": arrays["x_train"], "y_train": arrays["y_train"],
                 "x_test": arrays["x_test"], "y_test": arrays["y_test"]}
    else:  # one set: make_dataset holds out a seeded val_fraction
        split = {"x_train": arrays["x"], "y_train": arrays["y"]}
    return make_dataset(name=kind, spec=spec, where=where, seed=seed, val_fraction=val_fraction,
                        class_names=arrays.get("classes"), input_scale=arrays.get("input_scale", 1.0), **split)


def _fix_hint() -> str:
    return (
        "use a registry name ("
        + ", ".join(k for k in DATASETS if k not in _FILE_KINDS)
        + ") or a prefixed file spec npz:PATH, npy:DIR, csv:PATH, folder:PATH, cifar-bin:DIR, text:PATH"
    )


def _unknown(spec: str) -> InputError:
    """Unknown name, or a bare path: refuse with a hint rather than guess the format."""
    p = readers.user_path(spec)
    suffix = p.suffix.lower()
    guess = {".npz": "npz", ".csv": "csv", ".txt": "text"}.get(suffix) or ("folder" if p.is_dir() else None)
    if guess or p.exists() or "/" in spec or "\\" in spec:
        prefix = guess or "npz|csv|folder|text"
        return InputError(
            f"data spec {spec!r} looks like a path but has no format prefix",
            where="--data",
            fix=f"write --data {prefix}:{spec}",
        )
    kind = spec.partition(":")[0]
    return InputError(
        f"unknown dataset {kind!r}",
        where=f"--data {spec}",
        fix=close_matches(kind, list(DATASETS)) + "; file specs need a prefix (npz:, npy:, csv:, folder:, cifar-bin:, "
        "text:)",
    )
