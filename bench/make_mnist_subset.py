"""Build an MNIST subset npz (issue 2's "28×28 real digit images, 8,000 train / 2,000 test") from MNIST
IDX files that you already have. Nothing is downloaded: point ``--idx-dir`` at a folder holding
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` (``.idx3-ubyte`` spellings and ``.gz`` files are accepted too).

    python bench/make_mnist_subset.py --idx-dir PATH --out data/mnist8k.npz --seed 1

The subset is a seeded random draw without replacement: ``--train`` images of the 60,000 training images
and ``--test`` of the 10,000 test images (the README's MNIST numbers used ``--seed 1``). Keys
``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 images, int64 labels): the layout ``--data npz:``
reads.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

from sparsekit.fileio import atomic_path

_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise SystemExit(f"error: no {names[0]} (or .gz) in {folder}; fix: pass the folder holding MNIST's four IDX files")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (unsigned bytes) as a numpy array, its shape from the header."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SystemExit(f"error: {path} is not an unsigned-byte IDX file; fix: pass MNIST's original IDX files")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SystemExit(f"error: {path} is truncated ({data.size} bytes for shape {dims})")
    return data.reshape(dims)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idx-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("data/mnist8k.npz"))
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    arrays = {key: read_idx(_find(args.idx_dir, names)) for key, names in _NAMES.items()}
    n_train, n_test = len(arrays["train_labels"]), len(arrays["test_labels"])
    if not (0 < args.train <= n_train and 0 < args.test <= n_test):
        raise SystemExit(f"error: --train/--test must be within 1..{n_train} / 1..{n_test}")
    rng = np.random.default_rng(args.seed)
    i = rng.permutation(n_train)[: args.train]
    j = rng.permutation(n_test)[: args.test]
    out = {
        "x_train": arrays["train_images"][i], "y_train": arrays["train_labels"][i].astype(np.int64),
        "x_test": arrays["test_images"][j], "y_test": arrays["test_labels"][j].astype(np.int64),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **out)
    print(json.dumps({"out": str(args.out), "seed": args.seed, "train": args.train, "test": args.test,
                      "train_class_counts": np.bincount(out["y_train"], minlength=10).tolist()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
