"""``compressed``: one archive for storage and transport, restorable without pickle or user code.

Layout (a zip file; every member is stored, each blob compressed by us):

- ``manifest.json`` — versioned (``format: sparsekit-archive``, ``version``): precision, the run summary,
  ``io`` (input layout, normalisation, class names: ``sparsekit.model_io``, checked when read),
  and per tensor its name, shape, layout and blobs with their encodings and codecs, plus the SHA-256 of
  the original fp32 bytes (an fp32 archive restores bit-exactly, and the reader proves it).
- ``graph.onnx`` — the reference ONNX graph with the archived weights' data stripped.
- ``t/<i>.idx`` — the active set of a sparse tensor: a bitmask (1 bit per entry) or 8-bit deltas between
  active linear positions (0 = skip 255 further), or for an N:M, block or constant fan-in mask a structured
  layout (``exporters.compressed_layouts``; the archive then says version 2), whichever stores index and
  values in the fewest bytes (docs/compressed-format.md).
- ``t/<i>.val`` — the active values (sparse) or all values (dense) in fp32, fp16 or int8 with
  per-output-channel fp32 scales in ``t/<i>.scl`` (symmetric, max |w| → 127); fp32/fp16 values are
  byte-shuffled (all first bytes, then all second bytes, …) so the exponent bytes compress.
- Each blob uses whichever of none / zlib / lzma (stdlib) is smallest.

Only large weights are quantized to int8; biases and other small tensors stay fp32 in an fp32 archive
and become fp16 in an fp16 or int8 archive.
The reader refuses unsafe member names, unknown versions, and corrupt or truncated data with
``InputError`` (exit 2), and never decodes more bytes than the manifest's shapes allow.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from sparsekit.exporters import compressed_layouts as layouts
from sparsekit.exporters.active import active_mask, canonical_zeros, canonicalize_model
from sparsekit.exporters.context import ExportContext, ExportOptions, io_of
from sparsekit.exporters.delta8 import delta8_positions, encode_delta8
from sparsekit.exporters.registry import register_format
from sparsekit.exporters.validate import Runner, onnx_runner, register_runner

import sparsekit
from sparsekit.errors import InputError, ValidationError
from sparsekit.fileio import atomic_path
from sparsekit.model_io import check_io
from sparsekit.run_dir import RunDir

ARCHIVE_FORMAT = "sparsekit-archive"
ARCHIVE_VERSION = 1
STRUCTURED_VERSION = 2   # an archive with an N:M, block or fan-in layout (exporters.compressed_layouts)
READ_VERSIONS = (ARCHIVE_VERSION, STRUCTURED_VERSION)
PRECISIONS = ("fp32", "fp16", "int8")
MAX_ELEMENTS = 1 << 31
QUANTIZE_MIN_ELEMENTS = 256   # tensors smaller than this (biases) always stay fp32


# --------------------------------------------------------------------------- encodings

def _lzma(data: bytes) -> bytes:
    """xz at preset 9e with a dictionary no larger than the data (at least 4 KiB): the same bytes out of
    the encoder as the preset's 64 MiB dictionary, without setting that up per tensor (60 ms each; a
    tiny WideResNet's 104 blobs took 6 s)."""
    dict_size = min(64 << 20, max(4096, 1 << max(len(data) - 1, 1).bit_length()))
    return lzma.compress(data, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                                         "dict_size": dict_size}])


def _compress(data: bytes) -> tuple[str, bytes]:
    best = ("none", data)
    for codec, blob in (("zlib", zlib.compress(data, 9)), ("lzma", _lzma(data))):
        if len(blob) < len(best[1]):
            best = (codec, blob)
    return best


def _decompress(codec: str, blob: bytes, expected: int, where: str) -> bytes:
    try:
        if codec == "none":
            out = blob
        elif codec == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(blob, expected + 1)
            if not d.eof:
                raise ValueError("truncated zlib stream")
        elif codec == "lzma":
            d = lzma.LZMADecompressor()
            out = d.decompress(blob, expected + 1)
            if not d.eof:
                raise ValueError("truncated lzma stream")
        else:
            raise ValueError(f"unknown codec {codec!r}")
    except (zlib.error, lzma.LZMAError, ValueError) as exc:
        raise _corrupt(f"cannot decode {where}: {exc}") from exc
    if len(out) != expected:
        raise _corrupt(f"{where} decodes to {len(out)} bytes, expected {expected}")
    return out


def _corrupt(what: str, where: str | None = None) -> InputError:
    return InputError(f"corrupt or truncated archive: {what}", where=where,
                      fix="re-create it with 'sparsekit export RUN_DIR --format compressed'")


def shuffle_bytes(values: np.ndarray) -> bytes:
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), values.dtype.itemsize)
    return np.ascontiguousarray(raw.T).tobytes()


def unshuffle_bytes(data: bytes, dtype: np.dtype, n: int) -> np.ndarray:
    raw = np.frombuffer(data, np.uint8).reshape(np.dtype(dtype).itemsize, n)
    return np.ascontiguousarray(raw.T).reshape(-1).view(dtype)


def decode_delta8(data: bytes, nnz: int, size: int) -> np.ndarray:
    out = delta8_positions(data)
    if len(out) != nnz or (nnz and (out[-1] >= size)) or (data and data[-1] == 0):
        raise _corrupt(f"index deltas give {len(out)} positions, expected {nnz} within {size}")
    return out


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: scale = max |w_row| / 127 (1 where the row is all zero)."""
    rows = w.reshape(w.shape[0], -1).astype(np.float32)
    scale = np.max(np.abs(rows), axis=1) / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale


# --------------------------------------------------------------------------- writing

def _value_raw(picked: np.ndarray, prec: str) -> bytes:
    if prec == "fp32":
        return shuffle_bytes(picked.astype("<f4"))
    if prec == "fp16":
        return shuffle_bytes(picked.astype("<f2"))
    return picked.astype(np.int8).tobytes()


def _unstructured_index(mask: np.ndarray) -> tuple[str, str, bytes, int]:
    """The smaller (after compression) of a bitmask and 8-bit deltas: encoding, codec, blob, raw bytes."""
    candidates = [("bitmask", np.packbits(mask.reshape(-1).astype(np.uint8)).tobytes()),
                  ("delta8", encode_delta8(np.flatnonzero(mask.reshape(-1))))]
    best = None
    for enc, raw in candidates:
        codec, blob = _compress(raw)
        if best is None or len(blob) < len(best[2]):
            best = (enc, codec, blob, len(raw))
    return best


def _sparse_entry(i: int, mask: np.ndarray, values: np.ndarray, prec: str, declared: str,
                  blobs: dict[str, bytes]) -> tuple[dict[str, Any], np.ndarray]:
    """The index fields of a sparse tensor in its smallest layout (stored bytes of index + values): the
    unstructured bitmask/delta8 one, or a structured one (``compressed_layouts``) when the mask has the
    structure; returns the fields and the positions whose values are stored, in order."""
    pos = np.flatnonzero(mask.reshape(-1))
    enc, codec, blob, raw_len = _unstructured_index(mask)
    val_blob = _compress(_value_raw(values[pos], prec))[1]
    plain = len(blob) + len(val_blob)
    fields: dict[str, Any] = {"layout": "sparse", "nnz": len(pos),
                              "index": {"encoding": enc, "blob": f"t/{i}.idx", "codec": codec, "bytes": raw_len}}
    best, best_blob, order = plain, blob, pos
    value_bytes: dict[str, int] = {}  # per layout: its candidates store values in the same order
    for lay in layouts.candidates(mask, declared):
        if lay.layout not in value_bytes:
            same = len(lay.order) == len(pos) and np.array_equal(lay.order, pos)
            value_bytes[lay.layout] = len(val_blob) if same else len(_compress(_value_raw(values[lay.order], prec))[1])
        stored_vals = value_bytes[lay.layout]
        lcodec, lblob = _compress(lay.index)
        if len(lblob) + stored_vals < best:
            best, best_blob, order = len(lblob) + stored_vals, lblob, lay.order
            fields = {"layout": lay.layout, "nnz": len(pos), "structure": lay.structure,
                      "index": {"encoding": lay.layout, "blob": f"t/{i}.idx", "codec": lcodec,
                                "bytes": len(lay.index)}}
    blobs[f"t/{i}.idx"] = best_blob
    fields["stored_bytes"], fields["unstructured_bytes"] = best, plain
    return fields, order


def _tensor_entry(i: int, name: str, arr: np.ndarray, mask: np.ndarray | None, precision: str,
                  blobs: dict[str, bytes], declared: str = "unstructured") -> dict[str, Any]:
    digest = hashlib.sha256(np.ascontiguousarray(arr, np.float32).tobytes()).hexdigest()
    entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "dtype": "float32",
                             "sha256_fp32": digest}
    flat = arr.reshape(-1)
    large = arr.ndim >= 2 and arr.size >= QUANTIZE_MIN_ELEMENTS
    # small tensors (biases) never go to int8; in a lossy archive they are fp16
    prec = precision if large else ("fp32" if precision == "fp32" else "fp16")
    if prec == "int8":
        q, scale = quantize_int8(arr)
        codec, blob = _compress(scale.astype("<f4").tobytes())
        blobs[f"t/{i}.scl"] = blob
        entry["scales"] = {"blob": f"t/{i}.scl", "codec": codec, "axis": 0, "count": len(scale)}
        flat = q.reshape(-1)
    if mask is not None:
        fields, order = _sparse_entry(i, mask, flat, prec, declared, blobs)
        entry.update(fields)
        picked = flat[order]
    else:
        entry["layout"] = "dense"
        picked = flat
    raw = _value_raw(picked, prec)
    codec, blob = _compress(raw)
    blobs[f"t/{i}.val"] = blob
    entry["values"] = {"dtype": {"fp32": "float32", "fp16": "float16", "int8": "int8"}[prec],
                       "blob": f"t/{i}.val", "codec": codec, "shuffle": prec != "int8", "bytes": len(raw)}
    return entry


def build_archive(ctx: ExportContext, precision: str = "fp32") -> bytes:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}", where="--precision",
                         fix=f"choose one of {', '.join(PRECISIONS)}")
    graph = onnx.ModelProto()
    graph.CopyFrom(ctx.model)
    blobs: dict[str, bytes] = {}
    tensors = []
    declared = str(ctx.summary.get("granularity", "unstructured"))
    for t in graph.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(t)
        mask = active_mask(t.name, arr, ctx.masks) if arr.ndim >= 2 else None
        if mask is not None:
            arr = canonical_zeros(arr, mask)
        tensors.append(_tensor_entry(len(tensors), t.name, arr, mask, precision, blobs, declared))
        dims = list(t.dims)
        t.Clear()
        t.name, t.data_type = tensors[-1]["name"], onnx.TensorProto.FLOAT
        t.dims.extend(dims)
    manifest = {
        "format": ARCHIVE_FORMAT, "sparsekit_version": sparsekit.__version__,
        # structured layouts need a reader that knows them: only such archives say version 2
        "version": STRUCTURED_VERSION if any(t["layout"] in layouts.LAYOUTS for t in tensors) else ARCHIVE_VERSION,
        "precision": precision, "graph": "graph.onnx", "source_run": ctx.source_run,
        "summary": ctx.summary, "io": io_of(ctx), "tensors": tensors,
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest, separators=(",", ":")),
                    compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        zf.writestr("graph.onnx", graph.SerializeToString(), compress_type=zipfile.ZIP_DEFLATED,
                    compresslevel=9)
        for name, blob in blobs.items():
            zf.writestr(name, blob)
    return buf.getvalue()


# --------------------------------------------------------------------------- reading

def _safe_member(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and "\\" not in name and not p.is_absolute() and ".." not in p.parts \
        and not name.startswith("/") and ":" not in name


def is_archive(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


class Archive:
    """A read-only view of an archive, decoded in memory (nothing is extracted to disk)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path, "r")
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
            raise _corrupt(str(exc), where=str(self.path)) from exc
        bad = [n for n in names if not _safe_member(n)]
        if bad:
            raise InputError(f"archive member name {bad[0]!r} escapes the archive (path traversal)",
                             where=str(self.path), fix="only open archives written by sparsekit")
        self._names = set(names)
        try:
            self.manifest = json.loads(self._read("manifest.json"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise _corrupt(f"manifest.json is not JSON: {exc}", where=str(self.path)) from exc
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != ARCHIVE_FORMAT:
            raise InputError("not a sparsekit archive (manifest format field)", where=str(self.path),
                             fix="pass a file written by 'sparsekit export --format compressed'")
        if m.get("version") not in READ_VERSIONS or isinstance(m.get("version"), bool):
            raise InputError(f"archive version {m.get('version')!r} is not supported (this sparsekit "
                             f"reads versions {', '.join(map(str, READ_VERSIONS))})", where=str(self.path),
                             fix="upgrade sparsekit or re-export the run")
        self.precision = m.get("precision", "fp32")
        self.io = None if m.get("io") is None else check_io(m["io"], f"{self.path}: manifest io")

    def _read(self, name: str) -> bytes:
        if not isinstance(name, str) or not _safe_member(name):
            raise InputError(f"archive refers to member {name!r} outside the archive (path traversal)",
                             where=str(self.path), fix="only open archives written by sparsekit")
        if name not in self._names:
            raise _corrupt(f"member {name!r} is missing", where=str(self.path))
        try:
            return self._zip.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, ValueError) as exc:
            raise _corrupt(f"{name}: {exc}", where=str(self.path)) from exc

    def decode_tensor(self, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """The float32 tensor and its active mask (None for dense tensors)."""
        try:
            shape = tuple(int(d) for d in entry["shape"])
            size = int(np.prod(shape)) if shape else 1
            if size > MAX_ELEMENTS or any(d < 0 for d in shape):
                raise _corrupt(f"tensor {entry['name']!r} has an implausible shape {shape}")
            vals = entry["values"]
            dtype = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype(np.int8)}[
                vals["dtype"]]
            mask = None
            if entry["layout"] == "sparse":
                nnz = int(entry["nnz"])
                if not 0 <= nnz <= size:
                    raise _corrupt(f"tensor {entry['name']!r} nnz {nnz} out of range")
                idx = entry["index"]
                raw = _decompress(idx["codec"], self._read(idx["blob"]), int(idx["bytes"]), idx["blob"])
                if idx["encoding"] == "bitmask":
                    if len(raw) != (size + 7) // 8:
                        raise _corrupt(f"{idx['blob']}: bitmask of {len(raw)} bytes for {size} entries")
                    flat_mask = np.unpackbits(np.frombuffer(raw, np.uint8), count=size).astype(bool)
                    pos = np.flatnonzero(flat_mask)
                    if len(pos) != nnz:
                        raise _corrupt(f"{idx['blob']}: bitmask has {len(pos)} entries, expected {nnz}")
                elif idx["encoding"] == "delta8":
                    pos = decode_delta8(raw, nnz, size)
                else:
                    raise _corrupt(f"unknown index encoding {idx['encoding']!r}")
                n_vals = nnz
            elif entry["layout"] in layouts.LAYOUTS:
                pos, n_vals = self._structured_positions(entry, shape, size), int(entry["nnz"])
            elif entry["layout"] == "dense":
                pos, n_vals = None, size
            else:
                raise _corrupt(f"unknown layout {entry['layout']!r}")
            raw = _decompress(vals["codec"], self._read(vals["blob"]), n_vals * dtype.itemsize, vals["blob"])
            values = unshuffle_bytes(raw, dtype, n_vals) if vals.get("shuffle") else \
                np.frombuffer(raw, dtype).copy()
            if dtype == np.int8:
                sc = entry["scales"]
                raw_scale = _decompress(sc["codec"], self._read(sc["blob"]), shape[0] * 4, sc["blob"])
                scale = np.frombuffer(raw_scale, "<f4")
                per_row = max(1, size // max(1, shape[0]))
                rows = (np.arange(size) if pos is None else pos) // per_row
                values = values.astype(np.float32) * scale[rows]
            dense = np.zeros(size, np.float32)
            if pos is None:
                dense[:] = values.astype(np.float32)
            else:
                dense[pos] = values.astype(np.float32)
                mask = np.zeros(size, bool)
                mask[pos] = True
                mask = mask.reshape(shape)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _corrupt(f"bad manifest entry for tensor {entry.get('name')!r}: {exc}",
                           where=str(self.path)) from exc
        dense = dense.reshape(shape)
        if self.precision == "fp32" or dtype == np.dtype("<f4"):
            digest = hashlib.sha256(dense.tobytes()).hexdigest()
            if digest != entry.get("sha256_fp32"):
                raise _corrupt(f"tensor {entry['name']!r} does not match its checksum", where=str(self.path))
        return dense, mask

    def _structured_positions(self, entry: dict[str, Any], shape: tuple[int, ...], size: int) -> np.ndarray:
        """The stored values' positions of an N:M, block or fan-in layout, checked."""
        nnz = int(entry["nnz"])
        if not 0 <= nnz <= size:
            raise _corrupt(f"tensor {entry['name']!r} nnz {nnz} out of range")
        idx = entry["index"]
        raw = _decompress(idx["codec"], self._read(idx["blob"]), int(idx["bytes"]), idx["blob"])
        try:
            pos = layouts.decode(entry["layout"], raw, entry.get("structure"), shape, nnz)
        except layouts.LayoutError as exc:
            raise _corrupt(f"tensor {entry['name']!r} has a bad {entry['layout']} layout: {exc}",
                           where=str(self.path)) from exc
        seen = np.zeros(size, bool)
        if len(pos) == nnz and (not nnz or (pos.min() >= 0 and pos.max() < size)):
            seen[pos] = True
        if int(seen.sum()) != nnz:
            raise _corrupt(f"tensor {entry['name']!r} has a bad {entry['layout']} layout: positions "
                           f"are not {nnz} distinct entries of the tensor", where=str(self.path))
        return pos

    def tensors(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        entries = self.manifest.get("tensors")
        if not isinstance(entries, list):
            raise _corrupt("manifest has no tensor list", where=str(self.path))
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                raise _corrupt(f"manifest tensor entry {str(e)[:60]!r} has no name", where=str(self.path))
        return {e["name"]: self.decode_tensor(e) for e in entries}

    def restore_model(self) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """The ONNX model with every archived weight put back, and the masks of sparse tensors."""
        try:
            model = onnx.load_model_from_string(self._read(self.manifest.get("graph", "graph.onnx")))
        except InputError:
            raise
        except Exception as exc:  # protobuf DecodeError
            raise _corrupt(f"graph.onnx does not parse: {exc}", where=str(self.path)) from exc
        decoded = self.tensors()
        masks = {}
        found = set()
        for t in model.graph.initializer:
            if t.name in decoded:
                arr, mask = decoded[t.name]
                if list(t.dims) != list(arr.shape):
                    raise _corrupt(f"tensor {t.name!r} shape {list(arr.shape)} != graph {list(t.dims)}")
                t.raw_data = arr.astype("<f4").tobytes()
                found.add(t.name)
                if mask is not None:
                    masks[t.name] = mask
        missing = set(decoded) - found
        if missing:
            raise _corrupt(f"graph has no initializer for {sorted(missing)[0]!r}", where=str(self.path))
        return model, masks

    def close(self) -> None:
        self._zip.close()


def load_archive(path: str | Path) -> ExportContext:
    """An archive as an export source: the restored reference model, masks, summary, and the source
    run's samples when that run dir is still around (else outputs are validated as 'unavailable')."""
    arch = Archive(path)
    try:
        model, masks = arch.restore_model()
    finally:
        arch.close()
    raw_summary = arch.manifest.get("summary")
    if raw_summary is not None and not isinstance(raw_summary, dict):
        raise _corrupt("manifest summary is not an object", where=str(path))
    summary = dict(raw_summary or {})
    run = summary.get("run_dir") or arch.manifest.get("source_run")
    samples = RunDir(run).samples() if run and Path(run).is_dir() else None
    return ExportContext(source=Path(path), source_kind="archive", model=model, masks=masks,
                         summary=summary, samples=samples,
                         extra={"archive_precision": arch.precision, "archive_manifest": arch.manifest})


def load_state_dict(path: str | Path):
    """The archive's tensors as a torch ``state_dict``-style mapping (float32), no pickle involved."""
    import torch

    arch = Archive(path)
    try:
        return {name: torch.from_numpy(arr) for name, (arr, _) in arch.tensors().items()}
    finally:
        arch.close()


def layout_gain(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per sparse tensor its layout and stored bytes (index + values) against the unstructured layout's,
    and the totals over the tensors stored in a structured layout."""
    rows = [{"name": e["name"], "layout": e["layout"],
             "spec": layouts.spec_of(e["layout"], e.get("structure") or {}),
             "bytes": e["stored_bytes"], "unstructured_bytes": e["unstructured_bytes"]}
            for e in entries if e.get("layout") != "dense" and "stored_bytes" in e]
    structured = [r for r in rows if r["layout"] in layouts.LAYOUTS]
    return {"layouts": rows, "structured_layouts": len(structured),
            "structured_bytes": sum(r["bytes"] for r in structured),
            "structured_unstructured_bytes": sum(r["unstructured_bytes"] for r in structured)}


def gain_note(gain: dict[str, Any]) -> str:
    specs = sorted({r["spec"] for r in gain["layouts"] if r["layout"] in layouts.LAYOUTS})
    new, old = gain["structured_bytes"], gain["structured_unstructured_bytes"]
    return (f"structured layouts ({', '.join(specs)}) for {gain['structured_layouts']} of {len(gain['layouts'])} "
            f"sparse tensors: {new} bytes vs {old} unstructured ({old / max(new, 1):.2f}× smaller)")


@register_runner("compressed")
def archive_runner(path: str | Path, threads: int = 1) -> Runner:
    """Archives run as their restored ONNX model (they are a storage format, not a runtime)."""
    arch = Archive(path)
    try:
        model, _ = arch.restore_model()
    finally:
        arch.close()
    return onnx_runner(model.SerializeToString(), threads)


@register_format("compressed", "single archive: bitmask or delta-coded indices + fp32/fp16/int8 values "
                 "(--precision), byte-shuffled, zlib/lzma, JSON manifest, graph inside", ".skz")
def write_compressed(ctx: ExportContext, out_path: Path, options: ExportOptions) -> dict[str, Any]:
    precision = options.precisions[0]
    data = build_archive(ctx, precision)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(data)
    notes: dict[str, Any] = {"precision": precision, "notes": []}
    arch = Archive(out_path)
    try:
        notes.update(layout_gain(arch.manifest["tensors"]))
        restored = arch.tensors() if precision == "fp32" else {}
    finally:
        arch.close()
    if notes["structured_layouts"]:
        notes["notes"].append(gain_note(notes))
    if precision == "fp32":  # prove the round trip is bit-exact against the reference weights
        ref_model = onnx.ModelProto()
        ref_model.CopyFrom(ctx.model)
        canonicalize_model(ref_model, ctx.masks)
        ref = {t.name: numpy_helper.to_array(t) for t in ref_model.graph.initializer}
        bad = [n for n, (a, m) in restored.items() if not np.array_equal(a.view(np.uint32),
                                                                         ref[n].astype(np.float32).view(np.uint32))
               or (m is not None and not np.array_equal(m, active_mask(n, ref[n], ctx.masks)))]
        if bad:
            raise ValidationError(f"fp32 archive does not restore bit-exactly ({bad[0]})",
                                  where=str(out_path), fix="report this as a bug with the run dir attached")
        notes["bit_exact"] = True
    return notes

