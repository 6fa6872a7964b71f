"""8-bit delta coding of sorted linear positions, the archive's compact index for sparse sets.

Each byte is the gap from the previous position (the first from -1), 1..255; a 0 byte means "skip 255
more" before the next gap byte (docs/compressed-format.md).
"""

from __future__ import annotations

import numpy as np


def encode_delta8(positions: np.ndarray) -> bytes:
    """Gaps between sorted linear positions (first from -1) as bytes; 0 means 'skip 255 more'."""
    gaps = np.diff(positions.astype(np.int64), prepend=-1)
    skips = (gaps - 1) // 255                      # zeros to emit before the final gap byte
    last = gaps - 255 * skips
    out = np.zeros(int(skips.sum() + len(gaps)), np.uint8)
    ends = np.cumsum(skips + 1) - 1
    out[ends] = last.astype(np.uint8)
    return out.tobytes()


def delta8_positions(data: bytes) -> np.ndarray:
    """The positions ``data`` codes (unchecked: a trailing skip byte codes no position)."""
    b = np.frombuffer(data, np.uint8).astype(np.int64)
    pos = np.cumsum(np.where(b == 0, 255, b)) - 1
    return pos[b != 0]
