"""The fp32 agreement rule for tests that compare two implementations (torch vs ONNX Runtime, one kernel
or ISA or thread count vs another): max |Δ| ≤ 1e-5 · max(1, max |reference|), the rule export validation
applies. Different code paths sum in different orders, so float32 results agree to rounding, not bit for
bit: never assert exact equality between them."""

from __future__ import annotations

import numpy as np

FP32_RTOL = 1e-5


def fp32_bound(ref: np.ndarray) -> float:
    """The largest max |Δ| allowed against ``ref``."""
    return FP32_RTOL * max(1.0, float(np.max(np.abs(ref)))) if np.size(ref) else 0.0


def max_abs_diff(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref))) if ref.size else 0.0


def assert_fp32_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert np.shape(got) == np.shape(ref), (np.shape(got), np.shape(ref))
    diff, bound = max_abs_diff(got, ref), fp32_bound(ref)
    assert diff <= bound, f"max |Δ| {diff:.3g} > {bound:.3g}"


def near_ties(logits: np.ndarray) -> int:
    """Samples whose two largest logits are within twice the fp32 bound: implementations that agree to
    the bound may pick either class there, so accuracies may differ by that many samples."""
    top2 = np.sort(np.asarray(logits, np.float64), axis=-1)[..., -2:]
    return int(np.count_nonzero(top2[..., 1] - top2[..., 0] <= 2 * fp32_bound(logits)))
