"""The compressed archive's index encodings: the 8-bit delta coder against hand-computed bytes and a
plain loop, its decoder's refusals, and the writer's choice of the smaller encoding (both are offered,
the smaller one after compression wins, and the reader restores either bit-exactly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sparsekit.exporters.compressed import Archive, _compress, build_archive, decode_delta8, encode_delta8
from sparsekit.exporters.context import ExportContext
from sparsekit.exporters.graph import DenseLayer, build_mlp_chain

from sparsekit.errors import InputError


def loop_delta8(positions: list[int]) -> bytes:
    """The format as documented, one position at a time: the gap from the previous position (the first
    from -1), with a 0 byte for every 255 of it that does not fit in the final byte (1..255)."""
    out, prev = bytearray(), -1
    for p in positions:
        gap = p - prev
        while gap > 255:
            out.append(0)
            gap -= 255
        out.append(gap)
        prev = p
    return bytes(out)


@pytest.mark.parametrize("positions,expected", [
    ([], b""),
    ([0], b"\x01"),
    ([0, 1, 2], b"\x01\x01\x01"),              # no empty entries between them
    ([254], b"\xff"),                          # gap 255: still one byte
    ([255], b"\x00\x01"),                      # gap 256: one skip of 255, then 1
    ([0, 255], b"\x01\xff"),                   # 254 empty entries between
    ([0, 256], b"\x01\x00\x01"),               # 255 empty entries between
    ([0, 257], b"\x01\x00\x02"),               # 256 empty entries between
    ([509], b"\x00\xff"),                      # gap 510 = 255 + 255
    ([510], b"\x00\x00\x01"),                  # gap 511 = 255 + 255 + 1
    ([65534], b"\x00" * 256 + b"\xff"),        # gap 65535 = 256·255 + 255
    ([0, 65536], b"\x01" + b"\x00" * 257 + b"\x01"),  # 65535 empty entries between: gap 65536 = 257·255 + 1
])
def test_delta8_bytes_are_hand_computed(positions, expected):
    assert encode_delta8(np.array(positions, np.int64)) == expected == loop_delta8(positions)
    size = (positions[-1] + 1) if positions else 1
    assert decode_delta8(expected, len(positions), size).tolist() == positions


@pytest.mark.parametrize("empty_between", [0, 1, 253, 254, 255, 256, 509, 510, 511, 65535, 65536])
def test_delta8_round_trips_every_gap_size(empty_between):
    positions = [3, 3 + empty_between + 1, 3 + 2 * (empty_between + 1)]
    data = encode_delta8(np.array(positions))
    assert data == loop_delta8(positions)
    size = positions[-1] + 1
    assert decode_delta8(data, 3, size).tolist() == positions
    with pytest.raises(InputError, match="corrupt"):  # the last position must lie inside the tensor
        decode_delta8(data, 3, size - 1)


def test_delta8_round_trips_a_matrix_with_empty_rows_and_first_and_last_columns():
    mask = edge_mask()
    pos = np.flatnonzero(mask)
    data = encode_delta8(pos)
    assert data == loop_delta8(pos.tolist())
    assert np.array_equal(decode_delta8(data, len(pos), mask.size), pos)


@pytest.mark.parametrize("data,nnz,size", [
    (b"\x01\x00", 1, 10),       # a trailing skip byte with no position after it
    (b"\x01\x01", 3, 10),       # fewer positions than the manifest's nnz
    (b"\x01\x01\x01", 2, 10),   # more positions than nnz
    (b"\x0a", 1, 9),            # position 9 in a tensor of 9 entries
])
def test_delta8_decoder_refuses_inconsistent_data(data, nnz, size):
    with pytest.raises(InputError, match="corrupt or truncated archive: index deltas"):
        decode_delta8(data, nnz, size)


# --------------------------------------------------------------------------- the writer's choice

ROWS, COLS = 64, 300  # rows longer than 255: gaps inside a row need skip bytes


def edge_mask() -> np.ndarray:
    """1 % random, rows 10..39 empty, first and last columns of some rows, the first and the last entry,
    and gaps of exactly 255 and 256 from row 50 on."""
    rng = np.random.default_rng(0)
    mask = rng.random((ROWS, COLS)) < 0.01
    mask[10:40] = False
    mask[0, 0] = mask[-1, -1] = True
    mask[[2, 5, 60], 0] = True
    mask[[2, 7, 61], -1] = True
    mask[50:52] = False
    flat = mask.reshape(-1)  # a view: gaps of 255 and 256 from row 50's first entry into row 51
    flat[[50 * COLS, 50 * COLS + 255, 50 * COLS + 255 + 256]] = True
    return mask


def layer_ctx(mask: np.ndarray, seed: int = 0) -> ExportContext:
    rng = np.random.default_rng(seed)
    w = np.where(mask, rng.standard_normal(mask.shape) + 0.1, 0).astype(np.float32)
    model = build_mlp_chain((mask.shape[1],), [DenseLayer(w, None, None, "w", None)])
    return ExportContext(Path("unused"), "run", model, {"w": mask}, {}, None)


def candidate_sizes(mask: np.ndarray) -> dict[str, int]:
    """Compressed size of each index encoding of ``mask``, as the writer would store it."""
    flat = mask.reshape(-1)
    raw = {"bitmask": np.packbits(flat.astype(np.uint8)).tobytes(), "delta8": encode_delta8(np.flatnonzero(flat))}
    return {enc: len(_compress(data)[1]) for enc, data in raw.items()}


def written(tmp_path: Path, mask: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Archive a one-layer model with ``mask``: its index entry, stored index blob size, restored weight
    and mask, and the reference weight."""
    ctx = layer_ctx(mask)
    path = tmp_path / "m.skz"
    path.write_bytes(build_archive(ctx, "fp32"))
    arch = Archive(path)
    try:
        (entry,) = [t for t in arch.manifest["tensors"] if t["name"] == "w"]
        blob = len(arch._read(entry["index"]["blob"]))
        restored, restored_mask = arch.tensors()["w"]
    finally:
        arch.close()
    from onnx import numpy_helper

    ref = {t.name: numpy_helper.to_array(t) for t in ctx.model.graph.initializer}["w"]
    entry["index"]["stored_bytes"] = blob
    return entry, restored, restored_mask, ref


@pytest.mark.parametrize("kind,mask,expected", [
    ("sparse-with-edges", edge_mask(), "delta8"),
    ("1-percent", np.random.default_rng(1).random((256, 256)) < 0.01, "delta8"),
    ("half-dense", np.random.default_rng(2).random((64, 64)) < 0.5, "bitmask"),
    ("40-percent", np.random.default_rng(3).random((32, 64)) < 0.4, "bitmask"),
])
def test_writer_stores_the_smaller_index_encoding_and_restores_it_exactly(tmp_path, kind, mask, expected):
    sizes = candidate_sizes(mask)
    other = "bitmask" if expected == "delta8" else "delta8"
    assert sizes[expected] < sizes[other], sizes  # a clear winner, so the case pins the choice
    entry, restored, restored_mask, ref = written(tmp_path, mask)
    assert entry["layout"] == "sparse" and entry["nnz"] == int(mask.sum())
    assert entry["index"]["encoding"] == expected
    assert entry["index"]["stored_bytes"] == sizes[expected]
    assert np.array_equal(restored_mask, mask)
    assert restored.tobytes() == ref.tobytes()
