"""The compressed archive's structured layouts (exporters/compressed_layouts.py): every layout restores
the weight and its mask exactly in every precision, the writer keeps the smallest layout (the declared
granularity's first, detection otherwise), the archive says version 2 only when it needs to, a corrupt
structured index is refused with one line, and a run dir with a 2:4 / 4x1 run exports end to end."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hst
from onnx import helper, numpy_helper
from sparsekit.exporters import compressed, compressed_layouts
from sparsekit.exporters.compressed import Archive, build_archive, quantize_int8
from sparsekit.exporters.context import ExportContext
from sparsekit.exporters.graph import DenseLayer, build_mlp_chain
from structured_masks import block_mask, fanin_mask, nm_mask, weights_for
from test_properties import FAST, expect_documented

from sparsekit.errors import InputError


def conv_model(w: np.ndarray) -> onnx.ModelProto:
    """One Conv node on a (1, I, 5, 5) input with weight ``w`` named "w"."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, w.shape[1], 5, 5])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def ctx_for(mask: np.ndarray, granularity: str | None = None) -> tuple[ExportContext, np.ndarray]:
    w = weights_for(mask)
    model = conv_model(w) if w.ndim == 4 else build_mlp_chain((w.shape[1],), [DenseLayer(w, None, None, "w", None)])
    summary = {} if granularity is None else {"granularity": granularity}
    return ExportContext(Path("unused"), "run", model, {"w": mask}, summary, None), w


def archived(tmp_path: Path, ctx: ExportContext, precision: str = "fp32") -> tuple[dict, np.ndarray, np.ndarray, dict]:
    path = tmp_path / f"m.{precision}.skz"
    path.write_bytes(build_archive(ctx, precision))
    arch = Archive(path)
    try:
        (entry,) = [t for t in arch.manifest["tensors"] if t["name"] == "w"]
        restored, restored_mask = arch.tensors()["w"]
        return entry, restored, restored_mask, arch.manifest
    finally:
        arch.close()


@pytest.fixture
def force_structured(monkeypatch):
    """Make the unstructured index look huge, so that any structured candidate is the smallest."""
    real = compressed._unstructured_index

    def huge(mask):
        enc, codec, _, raw_len = real(mask)
        return enc, codec, b"\x00" * 10**7, raw_len

    monkeypatch.setattr(compressed, "_unstructured_index", huge)


CASES = {
    "2:4-linear": (nm_mask((16, 32), 2, 4), "nm", "2:4"),
    "1:4-linear": (nm_mask((16, 32), 1, 4), "nm", "1:4"),
    "2:4-conv": (nm_mask((8, 16, 3, 3), 2, 4), "nm", "2:4"),
    "4:8-linear": (nm_mask((8, 32), 4, 8, seed=4), "nm", "4:8"),
    "4x1-linear": (block_mask((36, 42), 4, 1, 0.3), "blocks", "4x1"),   # 378 blocks: 6 padding bits
    "1x4-linear": (block_mask((32, 40), 1, 4, 0.3, seed=2), "blocks", "1x4"),
    "4x1-conv": (block_mask((8, 4, 3, 3), 4, 1, 0.3), "blocks", "4x1"),
    "fanin": (fanin_mask((16, 300), 7), "fanin", "fanin"),
    "fanin-ablated": (fanin_mask((16, 40), 5, ablated=(0, 15), long_rows=(3, 9)), "fanin", "fanin"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_structured_layout_restores_weight_and_mask_exactly(tmp_path, force_structured, case, precision):
    mask, layout, spec = CASES[case]
    ctx, w = ctx_for(mask, spec)
    entry, restored, restored_mask, manifest = archived(tmp_path, ctx, precision)
    assert entry["layout"] == layout and compressed_layouts.spec_of(layout, entry["structure"]) == spec
    assert manifest["version"] == 2 and entry["nnz"] == int(mask.sum())
    assert np.array_equal(restored_mask, mask)
    if precision == "fp32":
        assert restored.tobytes() == w.tobytes()
    elif precision == "fp16" or w.size < compressed.QUANTIZE_MIN_ELEMENTS:
        assert np.array_equal(restored, w.astype(np.float16).astype(np.float32))
    else:  # per-output-channel scales follow each value to its row, whatever order values are stored in
        q, scale = quantize_int8(w)
        ref = (q.reshape(w.shape[0], -1).astype(np.float32) * scale[:, None]).reshape(w.shape)
        assert np.array_equal(restored, np.where(mask, ref, 0))


def stored_sizes(mask: np.ndarray, w: np.ndarray, declared: str) -> dict[str, int]:
    """Stored bytes (index + fp32 values after the codec) of every layout the writer may pick."""
    pos = np.flatnonzero(mask)
    vals = len(compressed._compress(compressed._value_raw(w.reshape(-1)[pos], "fp32"))[1])
    sizes = {"sparse": len(compressed._unstructured_index(mask)[2]) + vals}
    for lay in compressed_layouts.candidates(mask, declared):
        v = len(compressed._compress(compressed._value_raw(w.reshape(-1)[lay.order], "fp32"))[1])
        key = lay.layout + ("/" + lay.structure["grid_encoding"] if lay.layout == "blocks" else "")
        sizes[key] = len(compressed._compress(lay.index)[1]) + v
    return sizes


@pytest.mark.parametrize("mask,declared,expected", [
    (block_mask((256, 256), 4, 1, 0.1), "4x1", "blocks"),
    (block_mask((256, 256), 16, 1, 0.1, seed=3), "unstructured", "blocks"),   # detected
    (nm_mask((128, 256), 1, 4), "1:4", "nm"),
    (fanin_mask((256, 256), 26), "fanin", "fanin"),
    (np.random.default_rng(0).random((64, 64)) < 0.1, "unstructured", "sparse"),
    (fanin_mask((64, 1024), 100), "fanin", "sparse"),   # 16-bit column gaps lose to 8-bit deltas
])
def test_writer_keeps_the_smallest_layout_and_reports_its_gain(tmp_path, mask, declared, expected):
    ctx, w = ctx_for(mask, declared)
    entry, restored, restored_mask, _ = archived(tmp_path, ctx)
    sizes = stored_sizes(mask, w, declared)
    assert entry["layout"] == expected and entry["stored_bytes"] == min(sizes.values()), sizes
    assert entry["unstructured_bytes"] == sizes["sparse"]
    assert (entry["stored_bytes"] < entry["unstructured_bytes"]) == (expected != "sparse")
    assert np.array_equal(restored_mask, mask) and restored.tobytes() == w.tobytes()


def test_declared_granularity_comes_first_and_detection_is_the_fallback(tmp_path, force_structured):
    mask = block_mask((64, 32), 16, 1, 0.3)          # 16x1 blocks are also 8x1, 4x1 and 2x1 blocks
    assert archived(tmp_path, ctx_for(mask, "4x1")[0])[0]["structure"]["r"] == 4
    assert archived(tmp_path, ctx_for(mask)[0])[0]["structure"]["r"] == 16
    assert archived(tmp_path, ctx_for(mask, "2:4")[0])[0]["structure"]["r"] == 16  # declared, not held
    assert archived(tmp_path, ctx_for(mask, "bogus:spec")[0])[0]["structure"]["r"] == 16


def test_unstructured_archives_stay_version_1_and_unknown_versions_are_refused(tmp_path):
    entry, _, _, manifest = archived(tmp_path, ctx_for(np.random.default_rng(0).random((32, 32)) < 0.1)[0])
    assert entry["layout"] == "sparse" and manifest["version"] == 1
    blob = rewritten((tmp_path / "m.fp32.skz").read_bytes(), lambda m, members: m.update(version=3))
    (tmp_path / "v3.skz").write_bytes(blob)
    with pytest.raises(InputError, match=r"archive version 3 is not supported \(this sparsekit reads versions 1, 2\)"):
        Archive(tmp_path / "v3.skz")


# --------------------------------------------------------------------------- hostile archives

def rewritten(blob: bytes, edit) -> bytes:
    """The archive with ``edit(manifest, members)`` applied (members: name -> bytes)."""
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members["manifest.json"])
    edit(manifest, members)
    members["manifest.json"] = json.dumps(manifest).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


def set_index(entry: dict, members: dict, raw: bytes) -> None:
    """Store ``raw`` as the entry's index blob, uncompressed."""
    entry["index"].update(codec="none", bytes=len(raw))
    members[entry["index"]["blob"]] = raw


def edit_w(fn):
    """An edit of the tensor "w": ``fn(entry, members, raw_index)``."""
    def edit(manifest, members):
        (entry,) = [t for t in manifest["tensors"] if t["name"] == "w"]
        idx = entry["index"]
        raw = compressed._decompress(idx["codec"], members[idx["blob"]], idx["bytes"], idx["blob"])
        fn(entry, members, raw)
    return edit


def _nm_duplicate(entry, members, raw):      # group 0 keeps position 0 twice: 2-bit codes 0, 0
    set_index(entry, members, bytes([raw[0] & 0b11110000]) + raw[1:])


def _nm_not_increasing(entry, members, raw):  # group 0's positions 3 then 1
    set_index(entry, members, bytes([(raw[0] & 0b11110000) | 0b0111]) + raw[1:])


def _nm_truncated(entry, members, raw):
    set_index(entry, members, raw[:-1])


def _blocks_extra_bit(entry, members, raw):   # a block more than the manifest's count
    set_index(entry, members, bytes([raw[0] | 0xFF]) + raw[1:])


def _blocks_padding(entry, members, raw):     # a grid bit past the last block
    set_index(entry, members, raw[:-1] + bytes([raw[-1] | 1]))


def _blocks_long(entry, members, raw):        # one byte more than the grid needs
    set_index(entry, members, raw + b"\x00")


def _fanin_both_flags(entry, members, raw):   # row 0 (ablated) also flagged K+1: 16 rows, 2 bytes of flags each
    assert raw[0] & 0x80
    set_index(entry, members, raw[:2] + bytes([raw[2] | 0x80]) + raw[3:])


def _fanin_column_overflow(entry, members, raw):  # the last gap runs past the row
    set_index(entry, members, raw[:-1] + b"\xff")


def _fanin_zero_gap(entry, members, raw):     # row 1's second entry on its first's column (row 0 is ablated)
    set_index(entry, members, raw[:5] + b"\x00" + raw[6:])


HOSTILE = [
    ("nm-duplicate-position", "2:4-linear", _nm_duplicate, r"bad nm layout: positions inside a group of 4"),
    ("nm-not-increasing", "2:4-linear", _nm_not_increasing, r"bad nm layout: positions inside a group of 4"),
    ("nm-truncated", "2:4-linear", _nm_truncated, r"bad nm layout: \d+ bytes of 2-bit positions for 256 values"),
    ("nm-wrong-m", "2:4-linear", edit_w(lambda e, m, r: e["structure"].update(m=3)),
     r"bad nm layout: N:M 2:3 \(2-bit positions\) does not fit input dimension 32"),
    ("nm-nnz-mismatch", "2:4-linear", edit_w(lambda e, m, r: e.update(nnz=e["nnz"] - 1)),
     r"bad nm layout: 128 groups of 2:4 keep 256 values, nnz is 255"),
    ("nm-structure-missing", "2:4-linear", edit_w(lambda e, m, r: e.pop("structure")),
     r"bad nm layout: its structure fields are not an object"),
    ("nm-structure-wrong-type", "2:4-linear", edit_w(lambda e, m, r: e["structure"].update(n="two")),
     r"bad nm layout: bad structure fields"),
    ("blocks-extra-block", "4x1-linear", edit_w(_blocks_extra_bit), r"bad blocks layout: block grid gives"),
    ("blocks-padding", "4x1-linear", edit_w(_blocks_padding), r"bad blocks layout: nonzero padding after the block"),
    ("blocks-long", "4x1-linear", edit_w(_blocks_long), r"bad blocks layout: block bitmask of 49 bytes for 378 blocks"),
    ("blocks-not-tiling", "4x1-linear", edit_w(lambda e, m, r: e["structure"].update(r=5)),
     r"bad blocks layout: 5x1 blocks do not tile the \(36, 42\) matrix"),
    ("blocks-unknown-encoding", "4x1-linear", edit_w(lambda e, m, r: e["structure"].update(grid_encoding="rle")),
     r"bad blocks layout: unknown block grid encoding 'rle'"),
    ("fanin-both-flags", "fanin-ablated", edit_w(_fanin_both_flags), r"bad fanin layout: row flags mark a row"),
    ("fanin-column-overflow", "fanin-ablated", edit_w(_fanin_column_overflow),
     r"bad fanin layout: column gaps after a row's first are not >= 1, or run past column 39"),
    ("fanin-zero-gap", "fanin-ablated", edit_w(_fanin_zero_gap), r"bad fanin layout: column gaps after"),
    ("fanin-k-too-large", "fanin-ablated", edit_w(lambda e, m, r: e["structure"].update(k=41)),
     r"bad fanin layout: fan-in K=41 out of range for 40 columns"),
    ("fanin-narrow-gap-dtype", "fanin", edit_w(lambda e, m, r: e["structure"].update(gap_dtype="uint8")),
     r"bad fanin layout: gap_dtype 'uint8' cannot hold 300 values"),
]


@pytest.fixture(scope="module")
def structured_archives(tmp_path_factory) -> dict[str, bytes]:
    """One archive per layout (blocks with the bitmask grid), written with the structured layout forced."""
    out = {}
    base = tmp_path_factory.mktemp("structured")
    with pytest.MonkeyPatch.context() as mp:
        real = compressed._unstructured_index
        mp.setattr(compressed, "_unstructured_index", lambda m: (*real(m)[:2], b"\x00" * 10**7, real(m)[3]))
        mp.setattr(compressed_layouts, "GRID_ENCODINGS", ("bitmask",))
        for case in ("2:4-linear", "4x1-linear", "fanin", "fanin-ablated"):
            mask, _, spec = CASES[case]
            ctx, _ = ctx_for(mask, spec)
            out[case] = build_archive(ctx, "fp32")
            (base / "x.skz").write_bytes(out[case])
            assert Archive(base / "x.skz").tensors()["w"][1].sum() == mask.sum()
    return out


@pytest.mark.parametrize("case,edit,fragment", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_a_corrupt_structured_layout_is_refused_with_one_line(tmp_path, structured_archives, case, edit, fragment):
    if edit in (_nm_duplicate, _nm_not_increasing, _nm_truncated):
        edit = edit_w(edit)
    path = tmp_path / "bad.skz"
    path.write_bytes(rewritten(structured_archives[case], edit))
    for read in (compressed.load_state_dict, compressed.load_archive):
        with pytest.raises(InputError, match=fragment) as info:
            read(path)
        err = info.value
        assert err.exit_code == 2 and "\n" not in err.message
        assert err.message.startswith("corrupt or truncated archive: tensor 'w' has a bad ")


def test_positions_a_decoder_repeats_are_refused(tmp_path, structured_archives, monkeypatch):
    """The reader's last guard: whatever a layout decodes must be nnz distinct entries of the tensor."""
    real = compressed_layouts.DECODERS["nm"]
    monkeypatch.setitem(compressed_layouts.DECODERS, "nm", lambda *a: (lambda p: np.r_[p[:-1], p[0]])(real(*a)))
    (tmp_path / "x.skz").write_bytes(structured_archives["2:4-linear"])
    with pytest.raises(InputError, match="bad nm layout: positions are not 256 distinct entries of the tensor"):
        compressed.load_state_dict(tmp_path / "x.skz")


@FAST
@given(data=hst.data())
def test_random_bytes_in_a_structured_index_are_refused_or_restore_exactly(structured_archives, data, tmp_path_factory):
    case = data.draw(hst.sampled_from(sorted(structured_archives)))
    flips = data.draw(hst.lists(hst.tuples(hst.integers(0, 10**6), hst.integers(1, 255)), min_size=1, max_size=4))

    def flip(entry, members, raw):
        b = bytearray(raw)
        for at, x in flips:
            b[at % len(b)] ^= x
        set_index(entry, members, bytes(b))

    path = tmp_path_factory.mktemp("flip") / "x.skz"
    path.write_bytes(rewritten(structured_archives[case], edit_w(flip)))
    got = expect_documented(compressed.load_state_dict, path)
    if got is not None:  # a flip that still decodes passed the fp32 checksum: the weight is the original
        assert got["w"].numpy().tobytes() == weights_for(CASES[case][0]).tobytes()


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("granularity,make", [
    ("1:4", lambda shape, i: nm_mask(shape, 1, 4, seed=i)),   # (2:4's positions cost what a bitmask does)
    ("4x1", lambda shape, i: block_mask(shape, 4, 1, 0.15, seed=i)),
])
def test_a_structured_run_exports_and_restores_through_the_cli(tmp_path, cli, granularity, make):
    from export_fixtures import MLP, make_run_dir

    torch.manual_seed(0)
    model = MLP(64, (256, 128), 8)
    masks = {n: torch.from_numpy(make(tuple(p.shape), i)) for i, (n, p) in enumerate(model.named_parameters())
             if n.endswith("weight")}
    run = make_run_dir(tmp_path / "run", model, masks, torch.randn(64, 8, 8))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "granularity": granularity}))
    res = cli(["export", str(run), "--format", "compressed", "--out", str(tmp_path / "exp"), "--json"])
    assert res.exit_code == 0, res.stderr
    (art,) = res.json()["artifacts"]
    assert art["status"] == "ok" and art["bit_exact"] is True
    rows = {r["name"]: r for r in art["layouts"]}
    assert set(rows) == set(masks)
    structured = [r for r in rows.values() if r["layout"] != "sparse"]
    assert structured and all(r["spec"] == granularity and r["bytes"] < r["unstructured_bytes"] for r in structured)
    assert art["structured_bytes"] == sum(r["bytes"] for r in structured)
    assert any(n.startswith("structured layouts (" + granularity) for n in art["notes"])
    res = cli(["export", str(tmp_path / "exp" / "model.skz"), "--format", "onnx", "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.stderr
    back = onnx.load(str(tmp_path / "back" / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    for name, m in masks.items():
        assert np.array_equal(weights[name] != 0, m.numpy())
