"""Shared by the fast runtime's tests (tests/test_runtime_*.py): the C module, the code paths to run the
kernel-level tests on, the fp32 check, random sparse weights, and the fixtures ``isa`` and ``threading_knobs``
(tests/conftest.py makes them visible to every test file)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import pytest
from tolerances import assert_fp32_close

from sparsekit.runtime import layers as L

K = L._K
# the code path this process started on: the CPU's best, or SPARSEKIT_ISA's (make test-isa runs the runtime
# tests once per path); without SPARSEKIT_ISA the kernel-level tests also run every other path
START_ISA = K.isa() if K is not None else "numpy"
ISAS = [START_ISA] if K is None or os.environ.get("SPARSEKIT_ISA") else K.available_isas()


def close(got: np.ndarray, ref: np.ndarray) -> None:
    """The fp32 rule of docs/validation.md: max |Δ| ≤ 1e-5 · max(1, max |ref|)."""
    assert_fp32_close(got, ref)


def sparse_matrix(rng: np.random.Generator, n_out: int, n_in: int, density: float, *,
                  zero_rows: Any = (), zero_cols: Any = ()) -> np.ndarray:
    w = (rng.standard_normal((n_out, n_in)) * (rng.random((n_out, n_in)) < density)).astype(np.float32)
    w[list(zero_rows)] = 0
    w[:, list(zero_cols)] = 0
    return w


def dense_mlp(rng: np.random.Generator, sizes: list[int], density: float) -> onnx.ModelProto:
    """A dense ONNX MLP on (1, 8, 8) inputs (the exporter's graph), ``density`` of its weights nonzero."""
    from sparsekit.exporters.graph import DenseLayer, build_mlp_chain

    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(DenseLayer(sparse_matrix(rng, n_out, n_in, density), rng.standard_normal(n_out).astype(
            np.float32), "relu" if i < len(sizes) - 2 else None, f"fc{i}.weight", f"fc{i}.bias"))
    return build_mlp_chain((1, 8, 8), layers, output_name="logits")


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    if K is not None:
        K.set_isa(request.param)
    yield request.param
    if K is not None:
        K.set_isa(START_ISA)


@pytest.fixture
def threading_knobs() -> Iterator[Any]:
    """Restore the kernels' threading settings (spin time, work thresholds, panel split) afterwards."""
    if K is None:
        pytest.skip("no compiled kernels")
    saved = K.set_threading()
    yield K
    K.set_threading(saved["spin_us"], saved["rows_par_min"], saved["panel_par_min"], saved["panel_split"])
