"""Memory-mapped arrays: ``.npy`` files and the uncompressed members of an ``.npz`` archive.

``np.load(path, mmap_mode="r")`` maps a ``.npy`` file; numpy does not map ``.npz`` members, so for a member
stored without compression (``numpy.savez``) we find its bytes in the zip and map them ourselves. A member
of ``numpy.savez_compressed`` cannot be mapped: it is decompressed into memory. Mapped bytes are not
CRC-checked (that would read the whole file); a corrupt member shows up as wrong values, not an error.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np

from sparsekit.errors import InputError

_LOCAL_HEADER = b"PK\x03\x04"


class MemberInfo(NamedTuple):
    """Shape and dtype of one ``.npy`` member of an archive, and whether it is stored uncompressed."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    stored: bool


def read_npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the ``.npy`` stream at ``fh``'s position (left after the header)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    return np.lib.format.read_array_header_2_0(fh)


def npz_members(path: Path) -> dict[str, MemberInfo]:
    """Each ``NAME.npy`` member's shape and dtype, read from its header only (nothing is decompressed)."""
    out: dict[str, MemberInfo] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                shape, fortran, dtype = read_npy_header(fh)
            out[info.filename[:-4]] = MemberInfo(tuple(shape), dtype, fortran, info.compress_type == zipfile.ZIP_STORED)
    return out


def map_npz_member(path: Path, name: str) -> np.memmap:
    """Memory-map the uncompressed member ``name`` (without ``.npy``) of the archive at ``path``."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) != 30 or not local.startswith(_LOCAL_HEADER):
            raise InputError(f"{path}: member {name}.npy has a damaged zip header", where=str(path),
                             fix="the file is corrupt; regenerate it with numpy.savez")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        shape, fortran, dtype = read_npy_header(fh)
        offset = fh.tell()
    return map_array(path, dtype, tuple(shape), fortran, offset)


def map_array(path: Path, dtype: np.dtype, shape: tuple[int, ...], fortran: bool, offset: int) -> np.memmap:
    """``np.memmap`` of ``shape`` at ``offset``; refuses object dtypes and files shorter than the array."""
    if dtype.hasobject:
        raise InputError(f"{path} contains object arrays, which are refused (they need pickle)", where=str(path),
                         fix="save numeric arrays only (e.g. x.astype('float32'), y.astype('int64'))")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if need > size:
        raise InputError(f"{path} is truncated: the array needs {need} bytes, the file has {size}", where=str(path),
                         fix="the file is incomplete; copy or regenerate it again")
    if need == offset:  # an empty array cannot be mapped
        return np.zeros(shape, dtype=dtype).view(np.memmap)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def map_npy(path: Path) -> np.memmap:
    """Memory-map a ``.npy`` file (read-only; pickled object arrays are refused)."""
    with open(path, "rb") as fh:
        shape, fortran, dtype = read_npy_header(fh)
        offset = fh.tell()
    return map_array(path, dtype, tuple(shape), fortran, offset)
