"""Structured index layouts of the compressed archive: N:M, RxC blocks and constant fan-in.

Each layout says where a sparse tensor's kept values go, in fewer bits than a bitmask when the mask has
the structure (docs/compressed-format.md). A layout is the index bytes plus the order in which the
values are stored (linear positions of the kept entries); the archive stores the values in that order
with the same precisions and codecs as the unstructured layout.

- ``nm`` (N:M along the input channels, ``sparsekit.structure``): values in group order, ``(out, in·N/M)``
  for a Linear; per value its position inside its group of M, 2 bits (M ≤ 4, four to a byte, the first in
  the low bits) or one byte.
- ``blocks`` (RxC of the 2-D view): which blocks are on, as the ``(out/R, cols/C)`` block grid in one of
  the archive's own index encodings (a bitmask, or 8-bit deltas between kept block positions — whichever
  is smaller); values block by block, each block's R×C entries row-major.
- ``fanin`` (every row K, ablated rows 0, the others K or K + 1): a bitmask of ablated rows, a bitmask of
  K + 1 rows, then per kept entry its column gap inside its row (a row's first entry: its column; the
  others ≥ 1; ``uint8`` when a row is at most 256 long, else ``uint16``/``uint32``); values in memory
  order, ``(out, K)`` when the fan-in is constant.

Decoders check everything against the manifest's shape and nnz and raise ``LayoutError`` (a
``ValueError``) with what is wrong; they never return a position twice or outside the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sparsekit.exporters.delta8 import delta8_positions, encode_delta8

from sparsekit import structure

LAYOUTS = ("nm", "blocks", "fanin")
GRID_ENCODINGS = ("bitmask", "delta8")


class LayoutError(ValueError):
    """A structured layout that does not decode to a valid set of positions."""


@dataclass
class Layout:
    layout: str                 # "nm", "blocks" or "fanin"
    structure: dict[str, Any]   # the manifest's fields for it
    index: bytes                # the raw index bytes (before the codec)
    order: np.ndarray           # linear positions of the kept entries, in the order values are stored

    @property
    def spec(self) -> str:
        return spec_of(self.layout, self.structure)


def spec_of(layout: str, st: dict[str, Any]) -> str:
    """The granularity a layout stores (``2:4``, ``4x1``, ``fanin``), or the layout name for others."""
    if layout == "nm":
        return f"{st['n']}:{st['m']}"
    if layout == "blocks":
        return f"{st['r']}x{st['c']}"
    return "fanin" if layout == "fanin" else layout


def _uint_for(limit: int) -> str:
    return "uint8" if limit <= 1 << 8 else "uint16" if limit <= 1 << 16 else "uint32"


def _le(values: np.ndarray, dtype: str) -> bytes:
    return values.astype(np.dtype(dtype).newbyteorder("<")).tobytes()


def _ints(raw: bytes, start: int, count: int, dtype: str, what: str) -> np.ndarray:
    dt = np.dtype(dtype).newbyteorder("<")
    end = start + count * dt.itemsize
    if end > len(raw):
        raise LayoutError(f"{what} needs {end} index bytes, the blob has {len(raw)}")
    return np.frombuffer(raw[start:end], dt).astype(np.int64)


def _dims(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        raise LayoutError(f"a structured layout needs a 2-D+ tensor, shape is {list(shape)}")
    return shape[0], int(np.prod(shape[1:]))


def _index_dtype(structure_: dict[str, Any], key: str, limit: int) -> str:
    """The manifest's dtype ``key`` (uint8/16/32), refused when it cannot hold ``limit`` distinct values."""
    dtype = structure_.get(key)
    if dtype not in ("uint8", "uint16", "uint32") or np.iinfo(dtype).max + 1 < limit:
        raise LayoutError(f"{key} {dtype!r} cannot hold {limit} values")
    return dtype


# --------------------------------------------------------------------------- N:M

def encode_nm(mask: np.ndarray, n: int, m: int) -> Layout:
    groups = structure.nm_groups(mask, m)
    g, p = np.nonzero(groups)                      # row-major: positions ascend inside each group
    order = structure.nm_order(mask.shape)[g * m + p]
    if m <= 4:
        pad = (-len(p)) % 4
        q = np.concatenate([p, np.zeros(pad, np.int64)]).reshape(-1, 4).astype(np.uint8)
        index = (q[:, 0] | q[:, 1] << 2 | q[:, 2] << 4 | q[:, 3] << 6).astype(np.uint8).tobytes()
    else:
        index = p.astype(np.uint8).tobytes()
    return Layout("nm", {"n": n, "m": m, "bits": 2 if m <= 4 else 8}, index, order)


def decode_nm(raw: bytes, st: dict[str, Any], shape: tuple[int, ...], nnz: int) -> np.ndarray:
    n, m, bits = int(st["n"]), int(st["m"]), int(st["bits"])
    if not 0 < n < m <= 256 or bits != (2 if m <= 4 else 8) or shape[1] % m:
        raise LayoutError(f"N:M {n}:{m} ({bits}-bit positions) does not fit input dimension {shape[1]}")
    groups = int(np.prod(shape)) // m
    if nnz != groups * n:
        raise LayoutError(f"{groups} groups of {n}:{m} keep {groups * n} values, nnz is {nnz}")
    if bits == 2:
        if len(raw) != (nnz + 3) // 4:
            raise LayoutError(f"{len(raw)} bytes of 2-bit positions for {nnz} values")
        b = np.frombuffer(raw, np.uint8)
        p = np.stack([b & 3, b >> 2 & 3, b >> 4 & 3, b >> 6], axis=1).reshape(-1).astype(np.int64)
        if np.any(p[nnz:]):
            raise LayoutError("nonzero padding after the last 2-bit position")
        p = p[:nnz]
    else:
        if len(raw) != nnz:
            raise LayoutError(f"{len(raw)} bytes of 8-bit positions for {nnz} values")
        p = np.frombuffer(raw, np.uint8).astype(np.int64)
    per_group = p.reshape(groups, n)
    if np.any(per_group >= m) or (n > 1 and np.any(np.diff(per_group, axis=1) <= 0)):
        raise LayoutError(f"positions inside a group of {m} are not distinct, increasing and < {m}")
    return structure.nm_order(shape)[(np.arange(groups)[:, None] * m + per_group).reshape(-1)]


# --------------------------------------------------------------------------- blocks

def encode_blocks(mask: np.ndarray, r: int, c: int, grid_encoding: str = "delta8") -> Layout:
    grid = structure.block_grid(mask, r, c)
    _, cols = _dims(mask.shape)
    br, bc = np.nonzero(grid)
    flat = np.flatnonzero(grid)
    index = np.packbits(grid.reshape(-1)).tobytes() if grid_encoding == "bitmask" else encode_delta8(flat)
    st = {"r": r, "c": c, "blocks": len(br), "grid_encoding": grid_encoding}
    return Layout("blocks", st, index, _block_order(br, bc, r, c, cols))


def _block_order(br: np.ndarray, bc: np.ndarray, r: int, c: int, cols: int) -> np.ndarray:
    base = br.astype(np.int64) * r * cols + bc.astype(np.int64) * c
    offsets = (np.arange(r, dtype=np.int64)[:, None] * cols + np.arange(c, dtype=np.int64)).reshape(-1)
    return (base[:, None] + offsets).reshape(-1)


def decode_blocks(raw: bytes, st: dict[str, Any], shape: tuple[int, ...], nnz: int) -> np.ndarray:
    r, c, nblocks, enc = int(st["r"]), int(st["c"]), int(st["blocks"]), st["grid_encoding"]
    rows, cols = _dims(shape)
    if r < 1 or c < 1 or rows % r or cols % c:
        raise LayoutError(f"{r}x{c} blocks do not tile the ({rows}, {cols}) matrix")
    n_br, n_bc = rows // r, cols // c
    if not 0 <= nblocks <= n_br * n_bc or nblocks * r * c != nnz:
        raise LayoutError(f"{nblocks} blocks of {r}x{c} do not hold nnz {nnz}")
    if enc == "bitmask":
        if len(raw) != (n_br * n_bc + 7) // 8:
            raise LayoutError(f"block bitmask of {len(raw)} bytes for {n_br * n_bc} blocks")
        bits = np.unpackbits(np.frombuffer(raw, np.uint8))
        if bits[n_br * n_bc:].any():
            raise LayoutError("nonzero padding after the block bitmask")
        flat = np.flatnonzero(bits[:n_br * n_bc])
    elif enc == "delta8":
        flat = delta8_positions(raw)
        if raw and raw[-1] == 0:
            raise LayoutError("block grid deltas end in a skip byte")
    else:
        raise LayoutError(f"unknown block grid encoding {enc!r}")
    if len(flat) != nblocks or (nblocks and flat[-1] >= n_br * n_bc):
        raise LayoutError(f"block grid gives {len(flat)} blocks within {n_br * n_bc}, expected {nblocks}")
    return _block_order(flat // n_bc, flat % n_bc, r, c, cols)


# --------------------------------------------------------------------------- constant fan-in

def encode_fanin(mask: np.ndarray) -> Layout:
    f = structure.fanin(mask)
    mat = structure.matrix(mask)
    counts = mat.sum(1)
    gap_dtype = _uint_for(mat.shape[1])
    rows, cols = np.nonzero(mat)
    first = np.r_[True, rows[1:] != rows[:-1]]
    gaps = np.where(first, cols, np.diff(cols, prepend=0))
    index = np.packbits(counts == 0).tobytes() + np.packbits(counts == f.k + 1).tobytes() + _le(gaps, gap_dtype)
    st = {"k": f.k, "ablated": len(f.ablated), "long_rows": f.long_rows, "gap_dtype": gap_dtype}
    return Layout("fanin", st, index, np.flatnonzero(mat))


def decode_fanin(raw: bytes, st: dict[str, Any], shape: tuple[int, ...], nnz: int) -> np.ndarray:
    k = int(st["k"])
    rows, cols = _dims(shape)
    gap_dtype = _index_dtype(st, "gap_dtype", cols)
    if not 0 < k <= cols:
        raise LayoutError(f"fan-in K={k} out of range for {cols} columns")
    nbits = (rows + 7) // 8
    if len(raw) != 2 * nbits + nnz * np.dtype(gap_dtype).itemsize:
        raise LayoutError(f"{len(raw)} index bytes for {rows} rows and nnz {nnz}")
    flags = np.frombuffer(raw[:2 * nbits], np.uint8)
    ablated = np.unpackbits(flags[:nbits], count=rows).astype(bool)
    long = np.unpackbits(flags[nbits:], count=rows).astype(bool)
    if np.any(np.packbits(ablated) != flags[:nbits]) or np.any(np.packbits(long) != flags[nbits:]):
        raise LayoutError("nonzero padding after the row flags")
    if np.any(ablated & long) or (long.any() and not ablated.any()) or (long.any() and k + 1 > cols):
        raise LayoutError("row flags mark a row both ablated and K+1, or K+1 rows with none ablated")
    counts = np.where(ablated, 0, k + long.astype(np.int64))
    if int(counts.sum()) != nnz:
        raise LayoutError(f"row counts sum to {int(counts.sum())}, nnz is {nnz}")
    gaps = _ints(raw, 2 * nbits, nnz, gap_dtype, "column gaps")
    row = np.repeat(np.arange(rows, dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts                    # each row's first entry
    total = np.concatenate([[0], np.cumsum(gaps)])         # gaps summed before each entry
    col = total[1:] - np.repeat(total[starts], counts)
    first = np.zeros(nnz, bool)
    first[starts[counts > 0]] = True
    if np.any((gaps < 1) & ~first) or np.any(col >= cols):
        raise LayoutError(f"column gaps after a row's first are not >= 1, or run past column {cols - 1}")
    return row * cols + col


# --------------------------------------------------------------------------- choosing and decoding

def candidates(mask: np.ndarray, declared: str = "unstructured") -> list[Layout]:
    """The structured layouts to offer for ``mask``: the declared granularity's when the mask has it,
    else whatever ``sparsekit.structure`` detects (N:M, the largest block, fan-in)."""
    if mask.ndim < 2 or not mask.any():
        return []
    try:
        g = structure.parse_spec(declared)
    except ValueError:
        g = "unstructured"
    if g != "unstructured" and structure.conforms(mask, declared):
        if isinstance(g, structure.NM):
            return [encode_nm(mask, g.n, g.m)]
        if isinstance(g, structure.Block):
            return [encode_blocks(mask, g.r, g.c, enc) for enc in GRID_ENCODINGS]
        return [encode_fanin(mask)]
    found = []
    if nm := structure.detect_nm(mask):
        found.append(encode_nm(mask, nm.n, nm.m))
    if block := structure.detect_block(mask):
        found += [encode_blocks(mask, block.r, block.c, enc) for enc in GRID_ENCODINGS]
    if structure.fanin(mask) is not None:
        found.append(encode_fanin(mask))
    return found


DECODERS = {"nm": decode_nm, "blocks": decode_blocks, "fanin": decode_fanin}


def decode(layout: str, raw: bytes, st: Any, shape: tuple[int, ...], nnz: int) -> np.ndarray:
    """Linear positions of the kept values, in stored order; ``LayoutError`` when they are not valid."""
    if not isinstance(st, dict):
        raise LayoutError("its structure fields are not an object")
    try:
        return DECODERS[layout](raw, st, shape, nnz)
    except LayoutError:
        raise
    except (KeyError, TypeError, OverflowError, ValueError) as exc:
        raise LayoutError(f"bad structure fields {str(st)[:80]}: {exc!r}") from exc
