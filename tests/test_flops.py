"""FLOP counting (docs/counting.md): training formulas on hand-computed cases, dense counts vs torch's counter."""

from __future__ import annotations

import pytest
import torch
from priced_methods import priced
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparsekit import sparsify
from sparsekit.config import TrainConfig
from sparsekit.flops import inference_macs, run_flops, training_macs, weight_positions
from sparsekit.models import build_model

# Two layers, 100 and 50 weights, used once per sample (Linear): f_D = 150 MACs; 10 % active: f_S = 15.
NUMEL = {"a": 100, "b": 50}
POS = {"a": 1, "b": 1}
SPARSE = [{"step": 0, "active": {"a": 10, "b": 5}}]


def macs(method: str, history=SPARSE, **kw) -> float:
    return training_macs(priced(method, **kw), layer_numel=NUMEL, positions=POS, history=history,
                         total_steps=10)["train_macs"]


def test_training_formulas_on_a_hand_computed_case():
    assert macs("dense", [{"step": 0, "active": {}}]) == 3 * 150 * 10
    assert macs("static") == macs("set") == macs("snip") == 3 * 15 * 10
    assert macs("snfs") == (2 * 15 + 150) * 10
    # RigL, ΔT = 4, T_end = 8: steps 1..8 cost (3·15·4 + 2·15 + 150)/5 = 72, steps 9..10 cost 45
    assert macs("rigl", interval=4, end_step=8) == pytest.approx(8 * 72 + 2 * 45)


def test_pruning_counts_each_step_at_the_mask_in_effect():
    history = [{"step": 0, "active": {"a": 100, "b": 50}}, {"step": 4, "active": {"a": 40, "b": 20}},
               {"step": 8, "active": {"a": 10, "b": 5}}]
    # steps 1-4 dense (150), 5-8 at 60, 9-10 at 15 (the update at step u is used from u+1 on)
    assert macs("pruning", history) == 3 * (4 * 150 + 4 * 60 + 2 * 15)


def test_per_layer_positions_weight_convs_by_output_positions():
    history = [{"step": 0, "active": {"a": 10, "b": 5}}]
    out = training_macs(priced("static"), layer_numel=NUMEL, positions={"a": 7, "b": 1}, history=history, total_steps=2)
    assert out["dense_forward_macs"] == 100 * 7 + 50
    assert out["train_macs"] == 3 * (10 * 7 + 5) * 2


@pytest.mark.parametrize("spec,shape", [("mlp", (64,)), ("lenet5", (1, 28, 28)), ("lenet300", (1, 28, 28))])
def test_dense_inference_count_matches_torch_flop_counter(spec, shape):
    model = build_model(spec, {}, input_shape=shape, num_classes=10)
    layers = [{"name": n, "numel": p.numel(), "active": p.numel()} for n, p in model.named_parameters()
              if n.endswith("weight") and p.dim() > 1]
    ours = inference_macs(layers, weight_positions(model, shape))
    x = torch.randn(3, *shape)
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    assert counter.get_total_flops() == 3 * ours["dense_flops"]


def test_dense_training_step_is_three_forwards_by_torch_flop_counter():
    model = build_model("mlp", {"hidden": [32, 16]}, input_shape=(20,), num_classes=4)
    f_d = sum(weight_positions(model, (20,)).get(n, 0) * p.numel() for n, p in model.named_parameters())
    x = torch.randn(5, 20, requires_grad=True)  # so the first layer's input gradient is computed too
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert counter.get_total_flops() == 5 * 2 * 3 * f_d


def test_run_flops_rigl_reports_training_vs_dense():
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [32, 16]}, input_shape=(20,), num_classes=4)
    sp = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "rigl", sparsity=0.9, total_steps=40,
                  update_interval=10)
    cfg = TrainConfig(epochs=4, batch_size=8)
    out = run_flops(model, sp, input_shape=(20,), config=cfg)
    f_d = 20 * 32 + 32 * 16 + 16 * 4
    f_s = sum(ly["active"] for ly in sp.layer_summary())
    end = round(0.75 * 40)
    expected = end * (3 * f_s * 10 + 2 * f_s + f_d) / 11 + (40 - end) * 3 * f_s
    t = out["training"]
    assert t["flops_per_example"] == pytest.approx(2 * expected)
    assert t["vs_dense"] == pytest.approx(expected / (3 * f_d * 40))
    assert t["total_flops"] == pytest.approx(2 * expected * 8)
    assert out["inference"]["sparse_macs"] == f_s and out["inference"]["dense_macs"] == f_d


def test_run_flops_pruning_without_a_log_uses_its_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 20, bias=False))
    sp = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "pruning", sparsity=0.9, total_steps=100,
                  distribution="uniform", dense_first_layer=False, prune_begin=0.1, prune_end=0.5, prune_interval=10)
    out = run_flops(model, sp, input_shape=(50,), config=TrainConfig(epochs=1))
    # kept after the pruning steps at 20/30/40/50: 480, 213, 114, 100 (cubic, s_f = 0.9)
    forward = 20 * 1000 + 10 * 480 + 10 * 213 + 10 * 114 + 50 * 100
    assert out["training"]["vs_dense"] == pytest.approx(forward / (1000 * 100))


def test_train_multiplier_reports_against_dense_at_1x():
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    sp = sparsify(model, None, "dense", sparsity=0.9, total_steps=200)
    out = run_flops(model, sp, input_shape=(10,), config=TrainConfig(epochs=5, train_multiplier=2.0))
    assert out["training"]["reference_steps"] == 100
    assert out["training"]["vs_dense"] == pytest.approx(2.0)
