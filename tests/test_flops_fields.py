"""Every FLOP field a summary reports is 2 × its MACs, checked field by field on hand-computed cases, and
RigL's training cost switches to 3·f_S exactly after T_end (a step on T_end still pays for the dense gradient)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from priced_methods import priced
from tiny_models import TinyGRU
from torch import nn

from sparsekit import sparsify
from sparsekit.config import TrainConfig
from sparsekit.flops import run_flops, training_macs
from sparsekit.settings import SparsitySettings

# Two layers of 100 and 50 weights used once per sample: f_D = 150 MACs; 10 % active: f_S = 15.
NUMEL = {"a": 100, "b": 50}
POS = {"a": 1, "b": 1}


def flops_keys(d: dict[str, Any]) -> list[str]:
    return [k for k, v in d.items() if "flops" in k and isinstance(v, (int, float)) and not isinstance(v, bool)]


def assert_flops_twice_macs(d: dict[str, Any]) -> int:
    """For every numeric ``*flops*`` key with a ``*macs*`` twin in the same dict: flops == 2 × macs.
    Returns how many pairs were checked (so a caller can insist that some were)."""
    checked = 0
    for key in flops_keys(d):
        twin = key.replace("flops", "macs")
        if twin in d:
            assert d[key] == pytest.approx(2 * d[twin], rel=1e-12), key
            checked += 1
    return checked


def test_rigl_step_on_t_end_still_pays_for_the_dense_gradient():
    # ΔT = 4, T_end = 8: step 8 (the last update) costs (3·15·4 + 2·15 + 150)/5 = 72, step 9 costs 3·15 = 45
    rigl = priced("rigl", interval=4, end_step=8)
    assert rigl.training_step_cost(15.0, 150.0, 8) == pytest.approx(72)
    assert rigl.training_step_cost(15.0, 150.0, 9) == pytest.approx(45)


def test_rigl_mask_change_exactly_at_t_end_hand_computed():
    """ΔT = 1, T_end = 4, 6 steps: the mask changes at steps 1, 2, 3 and 4 (the last exactly at T_end).
    Steps 1..4 cost (3·15·1 + 2·15 + 150)/2 = 112.5 MACs, steps 5..6 cost 3·15 = 45: 4·112.5 + 2·45 = 540."""
    history = [{"step": u, "active": {"a": 10, "b": 5}} for u in range(5)]
    out = training_macs(priced("rigl", interval=1, end_step=4), layer_numel=NUMEL, positions=POS, history=history,
                        total_steps=6)
    assert out["train_macs"] == pytest.approx(540)
    assert out["dense_forward_macs"] == 150 and out["mean_sparse_forward_macs"] == pytest.approx(15)


def _two_layer_run(method: str, **options: Any) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    sp = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), method, sparsity=0.5, total_steps=10,
                  distribution="uniform", dense_first_layer=False, **options)
    return model, sp


def test_every_training_and_inference_flop_field_is_twice_its_hand_computed_macs():
    """Weights 80 + 32 (f_D = 112 MACs); uniform 50 %: 40 + 16 active (f_S = 56). The mask history halves
    the active counts after step 6: the mean sparse forward over 10 steps is (6·56 + 4·28)/10 = 44.8."""
    model, sp = _two_layer_run("static")
    names = [ly.name for ly in sp.layers]
    updates = [{"step": 0, "active": dict(zip(names, (40, 16), strict=True))},
               {"step": 6, "active": dict(zip(names, (20, 8), strict=True))}]
    out = run_flops(model, sp, input_shape=(10,), config=TrainConfig(epochs=1, batch_size=3), updates=updates)
    inf, t = out["inference"], out["training"]
    assert (inf["dense_macs"], inf["sparse_macs"]) == (112, 56)
    assert (inf["dense_flops"], inf["sparse_flops"]) == (224, 112)
    assert assert_flops_twice_macs(inf) == 2
    train_macs = 3 * (6 * 56 + 4 * 28)
    assert t["dense_forward_flops"] == 2 * 112
    assert t["mean_sparse_forward_flops"] == pytest.approx(2 * 44.8)
    assert t["flops_per_example"] == pytest.approx(2 * train_macs)
    assert t["dense_flops_per_example"] == pytest.approx(2 * 3 * 112 * 10)
    assert t["total_flops"] == pytest.approx(2 * train_macs * 3)
    # every FLOP field of the training block is one of the hand-checked ones above
    assert set(flops_keys(t)) == {"dense_forward_flops", "mean_sparse_forward_flops", "flops_per_example",
                                  "dense_flops_per_example", "total_flops"}


def test_rigl_run_flops_fields_on_a_run_whose_last_update_is_t_end():
    """RigL, 10 steps, ΔT = 2, update_end 0.8: T_end = 8 and the updates at 2, 4, 6, 8 keep f_S = 56."""
    model, sp = _two_layer_run("rigl", update_interval=2, update_end=0.8)
    assert sp.method.schedule.update_steps() == [2, 4, 6, 8]
    out = run_flops(model, sp, input_shape=(10,), config=TrainConfig(epochs=1, batch_size=1))
    t = out["training"]
    per_step = (3 * 56 * 2 + 2 * 56 + 112) / 3
    assert t["update_end_step"] == 8
    assert t["flops_per_example"] == pytest.approx(2 * (8 * per_step + 2 * 3 * 56))
    assert t["dense_forward_flops"] == 224 and t["mean_sparse_forward_flops"] == pytest.approx(112)



def test_per_token_flop_fields_are_twice_their_macs():
    torch.manual_seed(0)
    model = TinyGRU()
    sp = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", sparsity=0.5, total_steps=4,
                  distribution="uniform", dense_first_layer=False)
    out = run_flops(model, sp, input_shape=(5,), config=TrainConfig(epochs=1))
    tok = out["per_token"]
    assert (tok["dense_macs"], tok["sparse_macs"]) == (112, 56)
    assert (tok["dense_flops"], tok["sparse_flops"], tok["attention_flops"]) == (224, 112, 0)
    assert assert_flops_twice_macs(tok) == 3
    assert assert_flops_twice_macs(out["inference"]) == 2
    # static: 3·f_S per step, 5 tokens per sample, 4 steps: 2 · 3 · 56 · 5 · 4 FLOPs per example / 5 tokens
    assert out["training"]["flops_per_token"] == pytest.approx(2 * 3 * 56 * 4)


def test_attention_flop_field_is_twice_its_macs():
    from sparsekit.methods import make_method
    from sparsekit.models import build_model
    from sparsekit.sparsifier import Sparsifier

    m = build_model("char-transformer", {"width": 0.125}, input_shape=(6,), num_classes=256)
    d = m.head.in_features
    dense = Sparsifier(m, None, make_method("dense"), SparsitySettings(sparsity=0.0, total_steps=1))
    tok = run_flops(m, dense, input_shape=(6,))["per_token"]
    assert tok["attention_macs"] == 4 * 2 * 6 * d  # 4 layers, QKᵀ and AV: 2·T·d per token each
    assert tok["attention_flops"] == 2 * tok["attention_macs"]
    assert assert_flops_twice_macs(tok) == 3
