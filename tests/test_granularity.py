"""Mask granularity, unit level: spec parsing and its refusals (exact messages), group geometry for Linear and
Conv weights, the per-group selection (a hand-computed N:M update, ties by element key), structured masks
with exact counts, and distributions whose counts are whole units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.distributions import plan_layers
from sparsekit.errors import InputError
from sparsekit.granular_select import drop_and_grow, random_scores, structured_top, top_per_group
from sparsekit.granularity import Granularity
from sparsekit.selection import Magnitude, element_keys


@pytest.mark.parametrize(("spec", "canonical"), [
    ("unstructured", "unstructured"), (None, "unstructured"), ("2:4", "2:4"), (" 1:4 ", "1:4"), ("4x1", "4x1"),
    ("1X4", "1x4"), ("fanin", "fanin"), ("fanin+ablate", "fanin+ablate=0.3"), ("fanin+ablate=0.5", "fanin+ablate=0.5"),
])
def test_parse_gives_the_canonical_spec(spec, canonical):
    g = Granularity.parse(spec)
    assert g.spec == canonical
    assert Granularity.parse(g.spec) == g


@pytest.mark.parametrize(("spec", "message"), [
    ("3:2", "granularity '3:2' needs 0 < N < M (--granularity); fix: e.g. 2:4 (two of every four inputs kept), "
            "1:4 or 4:8"),
    ("1x1", "block '1x1' needs R, C >= 1 and more than one entry (--granularity); fix: e.g. 4x1 (4 output rows × "
            "1 input), 1x4 or 16x1; 1x1 is unstructured"),
    ("fanin+ablate=1.5", "neuron ablation threshold 1.5 is outside (0, 1) (--granularity); fix: give the saliency "
                         "threshold γ as a fraction, e.g. fanin+ablate=0.3"),
    ("blocks", "unknown granularity 'blocks' (--granularity); fix: use unstructured, N:M such as 2:4, RxC such as "
               "4x1, fanin or fanin+ablate (fanin+ablate=0.3)"),
])
def test_bad_specs_are_refused_with_one_line(spec, message):
    with pytest.raises(InputError) as exc:
        Granularity.parse(spec)
    assert exc.value.message == message


def test_a_layer_that_does_not_fit_is_refused_naming_it_and_the_fix():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(InputError) as exc:
        sparsekit.sparsify(model, None, "static", total_steps=10, granularity="2:4", dense_first_layer=True)
    assert exc.value.message == (
        "layer 2.weight of shape (3, 6) cannot be 2:4: its input dimension 6 is not a multiple of 4 "
        "(--granularity); fix: keep it dense with --layer-density 2.weight=1 (exclude=['2.weight'] in "
        "sparsify()), or choose a granularity that fits its shape")
    # kept dense, the layer is not checked
    sp = sparsekit.sparsify(model, None, "static", total_steps=10, granularity="2:4", exclude=["2.weight"],
                            dense_first_layer=False)
    assert [ly.name for ly in sp.layers] == ["0.weight"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "dense"}, "method 'dense' trains a dense model, so granularity 4x1 does not apply (--granularity); "
                          "fix: drop --granularity, or use rigl, set, snfs, snip, static or pruning"),
    ({"method": "snfs", "redistribute": True},
     "SNFS redistribution moves single connections between layers, which a 4x1 mask cannot follow "
     "(--redistribute); fix: use --no-redistribute with --granularity"),
    ({"method": "snip", "snip_scope": "global"},
     "--snip-scope global ranks single connections across layers; granularity 4x1 selects per layer "
     "(--snip-scope); fix: use --snip-scope layer with --granularity"),
])
def test_methods_that_cannot_keep_a_granularity_refuse_it(kwargs, message):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(InputError) as exc:
        sparsekit.sparsify(model, None, total_steps=10, granularity="4x1", **kwargs)
    assert exc.value.message == message


def test_ablation_needs_mask_updates():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(InputError) as exc:
        sparsekit.sparsify(model, None, "static", total_steps=10, granularity="fanin+ablate")
    assert exc.value.message == ("neuron ablation happens at the mask updates of rigl, set and snfs; 'static' "
                                   "has none (--granularity); fix: use fanin (without +ablate) with static")


def test_n_m_implies_its_density_and_refuses_another():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sp = sparsekit.sparsify(model, None, "static", total_steps=10, granularity="1:4", dense_first_layer=False)
    assert (sp.target_sparsity, sp.distribution) == (0.75, "uniform")
    assert [ly.active for ly in sp.layers] == [16, 8]
    with pytest.raises(InputError) as exc:
        sparsekit.sparsify(model, None, "static", total_steps=10, granularity="1:4", sparsity=0.9)
    assert exc.value.message == ("sparsity 0.9 disagrees with granularity 1:4, which fixes every sparse layer's "
                                   "density at 1/4 (--sparsity); fix: drop --sparsity (it is implied) or give "
                                   "--sparsity 0.75")
    with pytest.raises(InputError) as exc:
        sparsekit.sparsify(model, None, "static", total_steps=10, granularity="1:4", distribution="erk")
    assert exc.value.message == ("distribution 'erk' does not apply to granularity 1:4, which fixes every sparse "
                                   "layer's density at 1/4 (--distribution); fix: drop --distribution (uniform is "
                                   "implied)")
    with pytest.raises(InputError) as exc:
        sparsekit.sparsify(model, None, "static", total_steps=10, granularity="1:4", dense_first_layer=False,
                           layer_density={"2.weight": 0.5})
    assert exc.value.message == ("--layer-density 2.weight=0.5 disagrees with granularity 1:4, which fixes every "
                                 "sparse layer's density at 1/4 (--layer-density); fix: give 2.weight=1 (dense) or "
                                 "drop it")
    sp = sparsekit.sparsify(model, None, "static", total_steps=10, granularity="1:4", dense_first_layer=False,
                            layer_density={"2.weight": 1})
    assert [ly.active for ly in sp.layers] == [16]


# -- geometry ---------------------------------------------------------------------------------------------
def test_n_m_groups_of_a_conv_are_input_channels_at_one_tap():
    g = Granularity.parse("2:4")
    shape = (3, 8, 2, 2)
    mask = structured_top(g, shape, random_scores(math.prod(shape), seed=1, layer=0), 48, seed=1, step=0, layer=0)
    # every (o, channel group, kh, kw) holds exactly 2 of its 4 consecutive input channels
    assert torch.equal(mask.view(3, 2, 4, 2, 2).sum(dim=2), torch.full((3, 2, 2, 2), 2))
    idx = torch.arange(math.prod(shape))
    assert torch.equal(g.ungrouped(g.grouped(idx, shape), shape), idx)
    assert g.grouped(idx, shape)[1].tolist() == [1, 5, 9, 13]  # channels 0..3 at (o=0, kh=0, kw=1)


def test_blocks_of_a_conv_are_output_channels_times_columns():
    g = Granularity.parse("4x1")
    shape = (8, 2, 3, 3)
    mask = structured_top(g, shape, Magnitude(torch.randn(shape)), 4 * 10, seed=0, step=0, layer=0)
    rows = mask.view(2, 4, 18)
    assert torch.equal(rows.all(dim=1), rows.any(dim=1))  # four output channels on or off together
    assert int(mask.sum()) == 40
    idx = torch.arange(math.prod(shape))
    assert torch.equal(g.ungrouped(g.grouped(idx, shape), shape), idx)


def test_blocks_rank_by_summed_score():
    g = Granularity.parse("1x2")
    w = torch.tensor([[3.0, -3.0, 5.0, 0.0, 2.0, 2.5]])  # block sums of |w|: 6, 5, 4.5
    assert structured_top(g, (1, 6), Magnitude(w), 2, seed=0, step=0, layer=0).tolist() == [[1, 1, 0, 0, 0, 0]]


# -- per-group selection ------------------------------------------------------------------------------------
def test_n_m_update_drops_globally_then_regrows_what_each_group_lost():
    """By hand: both dropped connections are in group 0 (lowest |w| of the layer), so group 0 regrows two of
    its inactive by grow score while group 1 keeps its mask although its grow scores are the highest."""
    g = Granularity.parse("2:4")
    mask = torch.tensor([[True, True, False, False, True, True, False, False]])
    w = torch.tensor([0.1, -0.2, 0.0, 0.0, 4.0, 5.0, 0.0, 0.0])
    grow = torch.tensor([1.0, 0.0, 3.0, 2.0, 0.0, 0.0, 9.0, 9.0])
    new = drop_and_grow(g, mask, k_drop=2, k_grow=2, drop=Magnitude(w), grow=grow, seed=0, step=5, layer=0)
    assert new.int().tolist() == [[0, 0, 1, 1, 1, 1, 0, 0]]


def test_a_just_dropped_connection_may_return_and_ties_go_to_the_smaller_key():
    g = Granularity.parse("2:4")
    mask = torch.tensor([[True, True, False, False, True, True, False, False]])
    w = torch.tensor([0.1, 5.0, 0.0, 0.0, 4.0, 0.2, 0.0, 0.0])
    grow = torch.tensor([9.0, 0.0, 1.0, 3.0, 0.0, 0.0, 7.0, 7.0])
    new = drop_and_grow(g, mask, k_drop=2, k_grow=2, drop=Magnitude(w), grow=grow, seed=3, step=5, layer=2)
    keys = element_keys(3, 5, 2, np.array([6, 7]))
    tie_winner = 6 if keys[0] < keys[1] else 7
    expected = [1, 1, 0, 0, 1, 0, 0, 0]
    expected[tie_winner] = 1
    assert new.int().reshape(-1).tolist() == expected


def test_top_per_group_ranks_nan_last_and_never_picks_a_non_candidate():
    scores = np.array([[np.nan, 1.0, 5.0, 2.0], [np.nan, -np.inf, 9.0, 3.0]])
    cand = np.array([[True, True, False, True], [True, True, False, False]])
    keys = np.arange(8, dtype=np.uint64).reshape(2, 4)
    chosen = top_per_group(scores, cand, keys, np.array([2, 2]))
    assert chosen.astype(int).tolist() == [[0, 1, 0, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("spec", ["2:4", "1:4", "4x1", "2x2", "fanin"])
def test_random_structured_masks_have_exact_counts(spec):
    g = Granularity.parse(spec)
    shape = (8, 16)
    active = {"2:4": 64, "1:4": 32, "4x1": 40, "2x2": 40, "fanin": 48}[spec]
    mask = structured_top(g, shape, random_scores(128, seed=0, layer=1), active, seed=0, step=0, layer=1)
    assert int(mask.sum()) == active and g.conforms(mask)
    counts = g.group_counts(mask)
    if g.kind == "block":
        assert set(counts.tolist()) <= {0, 4}
    else:
        assert set(counts.tolist()) == {active // g.n_groups(shape)}


# -- distributions in units -----------------------------------------------------------------------------------
SHAPES = {"a": (300, 784), "b": (100, 300), "c": (10, 100)}


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
def test_plans_are_whole_units_within_one_unit_of_the_target(distribution):
    units = {"a": 300, "b": 100, "c": 10}  # fan-in: rows per layer
    plans = plan_layers(SHAPES, 0.9, distribution, dense_first_layer=False, units=units)
    plain = plan_layers(SHAPES, 0.9, distribution, dense_first_layer=False)
    for p, q in zip(plans, plain, strict=True):
        if p.prunable:
            assert p.active % units[p.name] == 0
            assert abs(p.active - p.density * p.numel) < units[p.name]
            assert abs(p.active - q.active) < units[p.name]
    assert plan_layers(SHAPES, 0.9, distribution, units=dict.fromkeys(SHAPES, 1)) == \
        plan_layers(SHAPES, 0.9, distribution)  # unit 1 is today's plan


def test_fanin_plan_takes_the_largest_remainder_in_rows():
    # density 0.4: (4, 15) ideally 6 inputs per row, (4, 14) 5.6; 11.6 units round to 12, the remainder to y
    plans = plan_layers({"x": (4, 15), "y": (4, 14)}, 0.6, "uniform", dense_first_layer=False,
                        units={"x": 4, "y": 4})
    assert [p.active for p in plans] == [24, 24]
    plans = plan_layers({"x": (4, 15), "y": (4, 14)}, 0.63, "uniform", dense_first_layer=False,
                        units={"x": 4, "y": 4})  # 5.55 + 5.18 = 10.73 -> 11 units: x gets the extra one
    assert [p.active for p in plans] == [24, 20]
