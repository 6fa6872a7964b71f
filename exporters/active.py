"""Active sets of sparse weights: which entries an exporter must keep.

The masks are the truth (a weight can be 0 and still active); without a mask, a mostly-zero weight's
nonzeros are its active set.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def active_mask(name: str, array: np.ndarray, masks: dict[str, np.ndarray]) -> np.ndarray | None:
    """The active set of a weight: its mask when the run has one, else its nonzeros if mostly zero."""
    mask = masks.get(name)
    if mask is not None and mask.shape == array.shape:
        return mask | (array != 0)  # a nonzero outside the mask would be a squash bug; never drop it
    if array.ndim >= 2 and np.count_nonzero(array) <= array.size // 2:
        return array != 0
    return None


def canonical_zeros(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``array`` with inactive entries set to +0.0: squashing a mask by multiplication leaves -0.0
    where a negative weight was masked, equal in value but not in bits."""
    if np.signbit(array[~mask]).any():
        return np.where(mask, array, np.float32(0)).astype(array.dtype)
    return array


def canonicalize_model(model: onnx.ModelProto, masks: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Rewrite (in place) masked weights whose inactive entries hold -0.0 so they hold +0.0."""
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or not t.dims or len(t.dims) < 2:
            continue
        arr = numpy_helper.to_array(t)
        mask = active_mask(t.name, arr, masks)
        if mask is not None:
            fixed = canonical_zeros(arr, mask)
            if fixed is not arr:
                t.CopyFrom(numpy_helper.from_array(fixed, t.name))
    return model
