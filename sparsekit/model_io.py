"""What a deployer needs to feed an exported model and read its answer: the input layout, the input
normalisation and the class names (``docs/deploy.md``).

One record, ``summary.json``'s ``io``, travels into every artifact: ONNX files carry it as
``metadata_props`` (``sparsekit.input_layout``, ``sparsekit.input_normalization``,
``sparsekit.class_names``; JSON for structures), the compressed archive as its manifest's ``io``. Readers
of files from others decode it with ``from_metadata``/``check_io``, which refuse hostile values with one
``InputError`` line.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from sparsekit.errors import InputError

PREFIX = "sparsekit."
FIELDS = ("input_layout", "input_normalization", "class_names")
MAX_METADATA_CHARS = 4 << 20      # one metadata value; more is not a layout, a normalisation or class names
MAX_CLASSES = 1 << 20
MAX_CLASS_NAME_CHARS = 256
MAX_FEATURES = (1 << 31) - 1
_LAYOUT = re.compile(r"[A-Za-z][A-Za-z0-9 _-]{0,31}\Z")
_FIX = "re-export the model with 'sparsekit export' (the io metadata is written by sparsekit)"

# layouts save() infers from an example input's dtype and rank (float, integer)
FLOAT_LAYOUTS = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
TOKEN_LAYOUTS = {1: "N tokens", 2: "NT tokens"}


def from_dataset(data: Any) -> dict[str, Any]:
    """The io record of a run trained on a ``sparsekit.data`` dataset."""
    layout = {"image": "NCHW", "tabular": "NC", "sequence": "NT tokens"}.get(data.kind)
    norm = data.normalization if data.kind != "sequence" else None
    normalization = None if not norm or "mean" not in norm else {
        "mean": norm["mean"], "std": norm["std"], "scale": float(norm.get("scale", 1.0))}
    names = getattr(data, "class_names", None)
    return {"input_layout": layout, "input_normalization": normalization,
            "class_names": None if names is None else [str(n) for n in names]}


def infer_layout(dtype_is_float: bool, rank: int) -> str | None:
    """A layout name for an example input's dtype and rank (samples first), or None when it is not obvious."""
    return (FLOAT_LAYOUTS if dtype_is_float else TOKEN_LAYOUTS).get(rank)


def to_metadata(io: dict[str, Any] | None) -> dict[str, str]:
    """``metadata_props`` entries of an io record (absent fields are left out)."""
    out: dict[str, str] = {}
    for field in FIELDS:
        value = (io or {}).get(field)
        if value is not None:
            out[PREFIX + field] = value if isinstance(value, str) else json.dumps(value)
    return out


def from_metadata(props: dict[str, str], where: str) -> dict[str, Any]:
    """The io record in an artifact's ``metadata_props`` (fields it lacks are None), checked (``check_io``)."""
    io: dict[str, Any] = dict.fromkeys(FIELDS)
    for field in FIELDS:
        raw = props.get(PREFIX + field)
        if raw is None:
            continue
        if len(raw) > MAX_METADATA_CHARS:
            raise InputError(f"metadata {PREFIX + field} is {len(raw)} characters long", where=where, fix=_FIX)
        if field == "input_layout" and not raw.startswith("{"):  # one name; an object names one per input
            io[field] = raw
            continue
        try:
            io[field] = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"metadata {PREFIX + field} is not valid JSON ({type(exc).__name__})", where=where,
                             fix=_FIX) from exc
    return check_io(io, where)


def check_io(io: Any, where: str) -> dict[str, Any]:
    """``io`` after checking each field's type and range; a bad one is an ``InputError`` naming the field."""
    if not isinstance(io, dict):
        raise InputError("io metadata is not an object", where=where, fix=_FIX)
    _check_layout(io.get("input_layout"), where)
    _check_normalization(io.get("input_normalization"), where)
    _check_class_names(io.get("class_names"), where)
    return {field: io.get(field) for field in FIELDS}


def _bad(field: str, what: str, where: str) -> InputError:
    return InputError(f"metadata {PREFIX + field} {what}", where=where, fix=_FIX)


def _check_layout(layout: Any, where: str) -> None:
    if layout is None:
        return
    values = layout.values() if isinstance(layout, dict) else [layout]
    if isinstance(layout, dict) and not all(isinstance(k, str) and 0 < len(k) <= 256 for k in layout):
        raise _bad("input_layout", "has input names that are not short strings", where)
    if not all(isinstance(v, str) and _LAYOUT.match(v) for v in values):
        raise _bad("input_layout", "must be a layout name like NCHW, NC or 'NT tokens' (or one per input)", where)


def _numbers(value: Any) -> list[float] | None:
    """The finite numbers of a number or a flat list of numbers, else None."""
    items = value if isinstance(value, list) else [value]
    if not items or len(items) > MAX_FEATURES:
        return None
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in items)
    return [float(v) for v in items] if ok else None


def _check_normalization(norm: Any, where: str) -> None:
    if norm is None:
        return
    if not isinstance(norm, dict) or set(norm) - {"mean", "std", "scale"} or not {"mean", "std"} <= set(norm):
        raise _bad("input_normalization", "must be an object {mean, std[, scale]}", where)
    mean, std = _numbers(norm["mean"]), _numbers(norm["std"])
    scale = _numbers(norm.get("scale", 1.0))
    if mean is None or std is None or scale is None or len(scale) != 1 or isinstance(norm.get("scale"), list):
        raise _bad("input_normalization", "needs finite numbers (mean and std: a number or a list; scale: a number)",
                   where)
    if isinstance(norm["mean"], list) != isinstance(norm["std"], list) or len(mean) != len(std):
        raise _bad("input_normalization", "has mean and std of different lengths", where)
    if min(std) <= 0 or scale[0] <= 0:
        raise _bad("input_normalization", "has a std or scale that is not positive", where)


def _check_class_names(names: Any, where: str) -> None:
    if names is None:
        return
    if not isinstance(names, list) or not 0 < len(names) <= MAX_CLASSES:
        raise _bad("class_names", f"must be a list of 1 to {MAX_CLASSES} strings", where)
    for name in names:
        if not isinstance(name, str) or len(name) > MAX_CLASS_NAME_CHARS or not name.isprintable():
            raise _bad("class_names", f"has an entry that is not a printable string of at most "
                       f"{MAX_CLASS_NAME_CHARS} characters ({str(name)[:40]!r})", where)


def check_against_model(io: dict[str, Any], *, n_classes: int | None, n_features: int | None, where: str) -> None:
    """Class names must name every output; a per-feature normalisation must cover every input feature."""
    names = io.get("class_names")
    if names is not None and n_classes is not None and len(names) != n_classes:
        raise _bad("class_names", f"names {len(names)} classes but the model has {n_classes} outputs", where)
    norm = io.get("input_normalization")
    if norm is not None and n_features is not None and isinstance(norm["mean"], list) \
            and len(norm["mean"]) != n_features:
        raise _bad("input_normalization", f"has {len(norm['mean'])} per-feature values for "
                   f"{n_features} input features", where)


def read_io(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The io record of an exported artifact: any ``.onnx`` file sparsekit wrote (its ``metadata_props``) or a
    compressed archive (its manifest), checked; fields the file does not carry are None."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p} not found", where=str(p), fix="pass an exported .onnx or .skz file")
    with open(p, "rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"
    if is_zip:
        from sparsekit.exporters.compressed import Archive

        archive = Archive(p)
        archive.close()
        return archive.io or dict.fromkeys(FIELDS)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise InputError(f"cannot read {p} as ONNX: {type(exc).__name__}", where=str(p),
                         fix="pass an exported .onnx or .skz file") from exc
    return from_metadata({m.key: m.value for m in proto.metadata_props}, str(p))
