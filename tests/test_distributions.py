"""Per-layer budgets (docs/methods.md), checked against numbers computed by hand."""

from __future__ import annotations

import pytest

from sparsekit.distributions import largest_remainder, plan_layers
from sparsekit.errors import InputError

SHAPES = {"a.weight": (4, 2), "b.weight": (2, 4), "c.weight": (1, 2)}


def counts(plans):
    return [(p.name, p.prunable, p.active) for p in plans]


def test_erk_hand_computed_budget():
    # raw = sum(dims)/prod(dims): a 6/8, b 6/8, c 3/2; budget 0.5*18 = 9 = eps*(6+6+3) -> eps 0.6
    plans = plan_layers(SHAPES, 0.5, "erk")
    assert [round(p.density, 6) for p in plans] == [0.45, 0.45, 0.9]
    # ideal 3.6, 3.6, 1.8 -> floors 3,3,1; remainders .6,.6,.8 -> c first, then a (earlier index)
    assert counts(plans) == [("a.weight", True, 4), ("b.weight", True, 3), ("c.weight", True, 2)]


def test_erk_saturated_layer_becomes_dense_and_rest_is_resolved():
    # S=0.1: eps = 16.2/15 = 1.08 -> c at 1.62 > 1 becomes dense; a,b re-solved to 0.9 each (14.4 -> 14)
    plans = plan_layers(SHAPES, 0.1, "erk")
    assert counts(plans) == [("a.weight", True, 7), ("b.weight", True, 7), ("c.weight", False, 2)]
    assert [round(p.density, 6) for p in plans[:2]] == [0.9, 0.9]
    prunable = [p for p in plans if p.prunable]
    assert sum(p.active for p in prunable) == round(0.9 * sum(p.numel for p in prunable))


def test_er_ignores_kernel_dims_but_erk_counts_them():
    shapes = {"conv.weight": (8, 4, 3, 3), "fc.weight": (10, 8)}
    er = plan_layers(shapes, 0.9, "er")
    erk = plan_layers(shapes, 0.9, "erk")
    # ER raw: conv (4+8)/32 = .375, fc 18/80 = .225 ; ERK raw: conv 18/288 = .0625, fc .225
    assert er[0].density / er[1].density == pytest.approx(0.375 / 0.225)
    assert erk[0].density / erk[1].density == pytest.approx(0.0625 / 0.225)
    for plans in (er, erk):
        assert sum(p.active for p in plans) == round(0.1 * (288 + 80))


def test_uniform_keeps_first_layer_dense_by_default():
    plans = plan_layers({"l1.weight": (10, 10), "l2.weight": (10, 10), "l3.weight": (5, 10)}, 0.8, "uniform")
    assert counts(plans) == [("l1.weight", False, 100), ("l2.weight", True, 20), ("l3.weight", True, 10)]
    sparse_first = plan_layers({"l1.weight": (10, 10), "l2.weight": (10, 10)}, 0.8, "uniform",
                               dense_first_layer=False)
    assert counts(sparse_first) == [("l1.weight", True, 20), ("l2.weight", True, 20)]


def test_override_is_fixed_first_and_rest_resolved():
    shapes = {"l1.weight": (10, 10), "l2.weight": (10, 10)}
    plans = plan_layers(shapes, 0.5, "uniform", dense_first_layer=False, overrides={"l1.*": 0.8})
    # total 100 active of 200; l1 fixed at 80 -> l2 gets 20
    assert counts(plans) == [("l1.weight", True, 80), ("l2.weight", True, 20)]


def test_erk_power_scale_zero_is_uniform():
    plans = plan_layers(SHAPES, 0.5, "erk", erk_power_scale=0.0)
    assert [p.density for p in plans] == pytest.approx([0.5, 0.5, 0.5])


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_is_rejected(sparsity):
    with pytest.raises(InputError, match="sparsity"):
        plan_layers(SHAPES, sparsity, "erk")


def test_unknown_distribution_lists_choices():
    with pytest.raises(InputError, match=r"did you mean .*'erk'"):
        plan_layers(SHAPES, 0.5, "ekr")


def test_unmatched_override_is_an_error():
    with pytest.raises(InputError, match="matches no layer"):
        plan_layers(SHAPES, 0.5, "erk", overrides={"nope.*": 0.5})


def test_largest_remainder_is_exact_and_capped():
    assert largest_remainder([1.5, 1.5, 1.0], 4, [10, 10, 10]) == [2, 1, 1]
    assert sum(largest_remainder([0.3] * 10, 3, [1] * 10)) == 3
    assert largest_remainder([2.9, 0.1], 3, [2, 5]) == [2, 1]
