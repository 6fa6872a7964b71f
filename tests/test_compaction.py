"""One compaction for every exporter: ``fast`` packs exactly what ``compact_layers`` returns, bias folds
accumulate in float64, no layer is ever emptied, and removed inputs keep the input signature."""

from __future__ import annotations

import numpy as np
from sparsekit.exporters.compact import compact_layers, with_all_inputs
from sparsekit.exporters.fast import build_fast_model, validate_against_dense
from sparsekit.exporters.graph import DenseLayer, build_mlp_chain


def _chain(rng: np.random.Generator) -> list[DenseLayer]:
    """12 inputs (0-3 without weights), 10 and 8 hidden units with dead ones of each kind, 3 outputs."""
    w0 = (rng.standard_normal((10, 12)) * (rng.random((10, 12)) < 0.6)).astype(np.float32)
    w0[:, :4] = 0                      # inputs 0-3 feed nothing
    w0[2] = 0                          # unit 2 has no inputs: relu(bias) is folded
    w1 = (rng.standard_normal((8, 10)) * (rng.random((8, 10)) < 0.6)).astype(np.float32)
    w1[:, 2] = 1.0
    w1[:, 5] = 0                       # unit 5 feeds nothing
    w1[6] = 0                          # layer-1 unit 6 has no inputs
    w2 = rng.standard_normal((3, 8)).astype(np.float32)
    b0 = rng.standard_normal(10).astype(np.float32)
    b0[2] = 0.75
    return [DenseLayer(w0, b0, "relu", "fc0.weight", "fc0.bias"),
            DenseLayer(w1, rng.standard_normal(8).astype(np.float32), "relu", "fc1.weight", "fc1.bias"),
            DenseLayer(w2, np.zeros(3, np.float32), None, "fc2.weight", "fc2.bias")]


def test_fast_packs_exactly_the_compact_layers_result():
    layers = _chain(np.random.default_rng(7))
    kept_in, expected, counts = compact_layers(12, layers)
    assert kept_in.tolist() == list(range(4, 12)) and [u["after"] for u in counts["units"]] == [8, 7, 3]
    expected = with_all_inputs(12, kept_in, expected)
    dense = build_mlp_chain((12,), layers, output_name="logits")
    model, stats = build_fast_model(dense)
    assert stats == {"units_removed": 3, "units_folded": counts["folded_units"]} and stats["units_folded"] == 2
    assert [ly.n_in for ly in model.layers] == [12, 8, 7]   # the input signature is kept
    for got, want in zip(model.layers, expected, strict=True):
        assert np.array_equal(got.dense_weight(), want.weight)
        assert np.array_equal(got.bias, want.bias)
    check = validate_against_dense(model, dense)
    assert check["max_abs_diff"] <= check["bound"]


def _two_folds() -> list[DenseLayer]:
    """Unit a0 has no inputs (bias 1) and feeds only b1, which then has no inputs; b1's bias becomes
    1 + 2^-30 in float64 (1.0 in float32) and folds into the output bias -1: exactly 2^-30."""
    w0 = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    w1 = np.array([[0.0, 1.0], [2.0 ** -30, 0.0]], np.float32)
    w2 = np.array([[1.0, 1.0]], np.float32)
    return [DenseLayer(w0, np.array([1.0, 0.0], np.float32), "relu", "a", "ab"),
            DenseLayer(w1, np.array([0.0, 1.0], np.float32), "relu", "b", "bb"),
            DenseLayer(w2, np.array([-1.0], np.float32), None, "c", "cb")]


def test_folded_biases_accumulate_in_float64_on_every_path():
    _, new, counts = compact_layers(2, _two_folds())
    assert counts["folded_units"] == 2 and [u["after"] for u in counts["units"]] == [1, 1, 1]
    assert new[2].bias.tolist() == [2.0 ** -30]  # float32 rounding between the folds would give 0.0
    model, _ = build_fast_model(build_mlp_chain((2,), _two_folds(), output_name="y"))
    assert model.layers[2].bias.tolist() == [2.0 ** -30]


def test_a_layer_whose_units_all_die_keeps_one_inert_unit():
    rng = np.random.default_rng(1)
    layers = [DenseLayer(rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32),
                         "relu", "a", "ab"),
              DenseLayer(np.zeros((5, 4), np.float32), rng.standard_normal(5).astype(np.float32), "relu", "b", "bb"),
              DenseLayer(rng.standard_normal((2, 5)).astype(np.float32), None, None, "c", None)]
    kept_in, new, counts = compact_layers(3, layers)
    assert [u["after"] for u in counts["units"]] == [1, 1, 2] and counts["folded_units"] == 5
    assert not new[0].weight.any() and not new[1].weight.any() and len(kept_in) == 3
    dense = build_mlp_chain((3,), layers, output_name="y")
    model, stats = build_fast_model(dense)
    assert [ly.n_out for ly in model.layers] == [1, 1, 2] and stats == {"units_removed": 7, "units_folded": 5}
    check = validate_against_dense(model, dense)
    assert check["max_abs_diff"] <= check["bound"]
