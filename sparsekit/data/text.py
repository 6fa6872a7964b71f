"""Text corpora for character-level language modelling (``text:PATH`` and the embedded ``stdlib-docs``).

A corpus becomes fixed-length, independent windows (the simplest correct truncated BPTT): the text is
split by *position* — the first ``1 - val_fraction`` of it trains, the rest tests — and each part is
cut into non-overlapping windows of ``seq_len`` symbols; the target of position t is the symbol at
t + 1 (the last target of a window is the first symbol of the next one). Every window starts from a
zero recurrent state; nothing is carried across windows, so the shuffle of windows is free.

Vocabularies: ``byte`` (default) — the UTF-8 bytes, always 256 symbols, any file works, nothing
learned from the data; ``char`` — the sorted set of Unicode characters in the whole file (train and
test, so the test split has no unknown symbols).

Inputs are stored as float32 symbol codes (exact up to 2^24) so that run directories, samples.npz,
ONNX validation and benchmarks keep sparsekit's one input contract (float32 tensors); the char models
cast them to integer ids in their first op. Targets are int64, shape (N, seq_len).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from sparsekit.data.arrays import Dataset, check_val_fraction
from sparsekit.errors import InputError

VOCABS = ("byte", "char")
DEFAULT_SEQ_LEN = 128
TASK = "language-modeling"


def stdlib_docs_text() -> str:
    """The English text of the Python documentation topics that every CPython ships
    (``pydoc_data.topics``, ~0.47 MB on 3.11), concatenated in sorted topic order.

    Identical on every machine with the same Python version (the module is generated per release);
    the summary records its sha256 so a run says exactly which text it used.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - some minimal distro builds strip it
        raise InputError("this Python has no pydoc_data.topics (stripped by the distribution)",
                         where="--data stdlib-docs", fix="use --data text:PATH with any UTF-8 text file") from exc
    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text_file(path: str) -> str:
    from sparsekit.data.readers import existing_path

    p = existing_path(path, kind="text")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}", where=f"--data text:{path}",
                         fix="check the file's permissions") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{p} is not UTF-8 text (byte {exc.start}: {exc.reason})", where=f"--data text:{path}",
                         fix="convert the file to UTF-8 (e.g. iconv -t utf-8)") from exc


def encode(text: str, vocab: str) -> tuple[np.ndarray, int, list[str] | None]:
    """Symbol codes of ``text``, the vocabulary size, and (char vocab) the symbol list."""
    if vocab == "byte":
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64), 256, None
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text)), len(chars), chars


def windows(codes: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows: x[i] = codes[i·T : i·T+T], y[i] = codes[i·T+1 : i·T+T+1]."""
    n = (len(codes) - 1) // seq_len
    x = codes[:n * seq_len].reshape(n, seq_len)
    y = codes[1:n * seq_len + 1].reshape(n, seq_len)
    return x, y


def make_text_dataset(text: str, *, name: str, spec: str, where: str, seq_len: int | None = None,
                      vocab: str | None = None, val_fraction: float = 0.2) -> Dataset:
    """Split ``text`` by position and cut both parts into (input, next-symbol target) windows."""
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    vocab = vocab or "byte"
    if vocab not in VOCABS:
        raise InputError(f"unknown vocabulary {vocab!r}", where="--vocab", fix="use byte (256 symbols) or char")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise InputError(f"sequence length {seq_len!r} must be a positive integer", where="--seq-len",
                         fix="e.g. --seq-len 128")
    check_val_fraction(val_fraction)
    codes, vocab_size, chars = encode(text, vocab)
    cut = round(len(codes) * (1.0 - val_fraction))
    train_codes, test_codes = codes[:cut], codes[cut:]
    need = seq_len + 1
    if len(train_codes) < need or len(test_codes) < need:
        raise InputError(f"the text has {len(codes)} symbols: too short for windows of {seq_len} in both the "
                         f"train ({len(train_codes)}) and test ({len(test_codes)}) parts", where=where,
                         fix="use a longer text, a smaller --seq-len or another --val-fraction")
    xtr, ytr = windows(train_codes, seq_len)
    xte, yte = windows(test_codes, seq_len)
    normalization: dict[str, Any] = {"vocab": vocab, "vocab_size": vocab_size, "seq_len": seq_len,
                                     "symbols": len(codes), "train_symbols": int(cut),
                                     "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    if chars is not None:
        normalization["chars"] = "".join(chars)
    return Dataset(
        name=name, spec=spec,
        x_train=torch.from_numpy(xtr.astype(np.float32)), y_train=torch.from_numpy(np.ascontiguousarray(ytr)),
        x_test=torch.from_numpy(xte.astype(np.float32)), y_test=torch.from_numpy(np.ascontiguousarray(yte)),
        input_shape=(seq_len,), num_classes=vocab_size, kind="sequence", task=TASK,
        normalization=normalization,
        split=f"by position: first {1 - val_fraction:g} train, last {val_fraction:g} test; "
              f"windows of {seq_len}, state reset per window",
    )
