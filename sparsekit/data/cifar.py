"""The CIFAR-10 / CIFAR-100 *binary* format (``cifar-bin:DIR``), read without pickles.

CIFAR-10 (``cifar-10-batches-bin``): ``data_batch_1.bin`` … ``data_batch_5.bin`` (training) and
``test_batch.bin``, records of 1 label byte + 3,072 pixel bytes (1,024 red, 1,024 green, 1,024 blue, rows
of 32). CIFAR-100 (``cifar-100-binary``): ``train.bin`` and ``test.bin``, records of 2 label bytes (coarse,
fine) + 3,072 pixel bytes; the fine label (100 classes) is used. Class names come from
``batches.meta.txt`` / ``fine_label_names.txt`` when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sparsekit.errors import InputError

PIXELS = 3 * 32 * 32
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = "test_batch.bin"
CIFAR100_TRAIN, CIFAR100_TEST = "train.bin", "test.bin"
DOWNLOAD_HINT = "the binary version from https://www.cs.toronto.edu/~kriz/cifar.html, extracted"


def read_cifar_bin(path: str) -> dict[str, Any]:
    """uint8 images N×3×32×32 and int64 labels of the given train/test split, and the class names if known."""
    from sparsekit.data.readers import existing_path, user_path

    if path and not user_path(path).exists():
        raise InputError(f"CIFAR folder not found: {user_path(path)}", where=f"--data cifar-bin:{path}",
                         fix=f"check the path; sparsekit downloads nothing: get {DOWNLOAD_HINT}")
    root = existing_path(path, kind="cifar-bin", directory=True)
    if (root / CIFAR100_TRAIN).exists() or (root / CIFAR100_TEST).exists():
        train, test, label_bytes, classes, names = [CIFAR100_TRAIN], CIFAR100_TEST, 2, 100, "fine_label_names.txt"
    else:
        train, test, label_bytes, classes, names = list(CIFAR10_TRAIN), CIFAR10_TEST, 1, 10, "batches.meta.txt"
    missing = [f for f in [*train, test] if not (root / f).is_file()]
    if missing:
        raise InputError(
            f"{root} is not a CIFAR binary folder: missing {', '.join(missing)}",
            where=f"--data cifar-bin:{path}",
            fix=f"point at the folder holding data_batch_1..5.bin and test_batch.bin (CIFAR-10) or train.bin and "
                f"test.bin (CIFAR-100): {DOWNLOAD_HINT}",
        )
    parts = [read_records(root / f, label_bytes, classes) for f in train]
    x_test, y_test = read_records(root / test, label_bytes, classes)
    out: dict[str, Any] = {
        "x_train": np.concatenate([x for x, _ in parts]), "y_train": np.concatenate([y for _, y in parts]),
        "x_test": x_test, "y_test": y_test,
    }
    class_names = read_class_names(root / names, classes)
    if class_names is not None:
        out["classes"] = class_names
    return out


def read_records(file: Path, label_bytes: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images N×3×32×32 uint8, labels int64) of one ``.bin`` file; the last label byte is the label used."""
    record = label_bytes + PIXELS
    try:
        raw = np.fromfile(file, dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read {file}: {exc.strerror or exc}", where=str(file),
                         fix="check the file's permissions") from exc
    if raw.size == 0 or raw.size % record:
        whole, rest = divmod(raw.size, record)
        raise InputError(
            f"{file} is truncated or not CIFAR binary: {raw.size} bytes is not a whole number of {record}-byte "
            f"records ({whole} records + {rest} bytes)",
            where=str(file),
            fix=f"download and extract the file again ({DOWNLOAD_HINT})",
        )
    rows = raw.reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    # CIFAR-100 records start with the coarse label (20 superclasses); both must be in range
    for column, limit in ((label_bytes - 1, classes), *(((0, 20),) if label_bytes == 2 else ())):
        bad = np.flatnonzero(rows[:, column] >= limit)
        if bad.size:
            raise InputError(
                f"{file} is corrupt: record {int(bad[0])} has label byte {int(rows[bad[0], column])}, "
                f"outside 0..{limit - 1}",
                where=str(file),
                fix=f"download and extract the file again ({DOWNLOAD_HINT})",
            )
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def read_class_names(file: Path, classes: int) -> list[str] | None:
    """One class name per line (blank lines ignored), or None when the file is absent or does not fit."""
    try:
        lines = [ln.strip() for ln in file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError):
        return None
    return lines if len(lines) == classes else None
