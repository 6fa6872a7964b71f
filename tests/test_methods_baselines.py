"""The RigL paper's baselines: SET, SNFS, SNIP, Small-Dense, Pruning (docs/methods.md invariants)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekit import sparsify
from sparsekit.config import TrainConfig
from sparsekit.errors import InputError
from sparsekit.methods import get_method_class, make_method


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(n)]


def train_steps(model: nn.Module, sp, data, *, on_step=None) -> None:
    opt = sp.optimizer
    for t, (x, y) in enumerate(data, 1):
        F.cross_entropy(model(x), y).backward()
        sp.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(t)


def counts(sp) -> dict[str, int]:
    return {ly.name: ly.active for ly in sp.layers}


def masks(sp) -> dict[str, torch.Tensor]:
    return {ly.name: ly.mask.clone() for ly in sp.layers}


# -- SET ------------------------------------------------------------------------------------------

def test_set_keeps_layer_nnz_constant_and_changes_masks():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparsify(model, opt, "set", sparsity=0.8, total_steps=20, update_interval=4, update_end=1.0)
    planned = {ly.name: ly.plan.active for ly in sp.layers}
    start = masks(sp)
    seen = []
    train_steps(model, sp, batches(20), on_step=lambda t: seen.append(counts(sp)))
    assert all(c == planned for c in seen)
    assert any(not torch.equal(start[n], m) for n, m in masks(sp).items())
    for ly in sp.layers:  # inactive weights stay exactly zero
        assert float(ly.param.detach()[~ly.mask].abs().max()) == 0.0


def test_set_random_growth_is_reproducible_and_takes_the_optimizer_step():
    runs = []
    for _ in range(2):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = sparsify(model, opt, "set", sparsity=0.8, total_steps=8, update_interval=4, seed=3)
        train_steps(model, sp, batches(8))
        runs.append(masks(sp))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not make_method("set").skip_optimizer_step(None, 100)


def test_set_grow_scores_come_from_the_set_grow_key_stream():
    from sparsekit.selection import tie_keys

    model = mlp()
    sp = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "set", sparsity=0.8, total_steps=10, seed=7)
    ly = sp.layers[1]
    assert torch.equal(sp.method.grow_scores(sp, ly, 5), tie_keys(7, 5, 1, ly.numel, purpose="set-grow"))


# -- SNFS -----------------------------------------------------------------------------------------

def test_snfs_ema_of_dense_gradient_updated_every_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights frozen: the EMA is over fixed gradients
    sp = sparsify(model, opt, "snfs", sparsity=0.8, total_steps=50, update_interval=1000)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    g = {ly.name: ly.param.grad.clone() for ly in sp.layers}  # dense, masked entries included
    sp.step()
    opt.zero_grad()
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        sp.step()
        opt.zero_grad()
    for ly in sp.layers:  # (1 - 0.9^3) g after three steps with the same gradient
        torch.testing.assert_close(sp.method.ema[ly.name], (1 - 0.9 ** 3) * g[ly.name])
        assert float(sp.method.ema[ly.name][~ly.mask].abs().sum()) > 0  # inactive entries tracked too


def test_snfs_without_redistribution_keeps_layer_nnz_and_grows_by_momentum():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = sparsify(model, opt, "snfs", sparsity=0.8, total_steps=12, update_interval=3, update_end=1.0)
    planned = {ly.name: ly.plan.active for ly in sp.layers}
    seen = []
    before = masks(sp)
    train_steps(model, sp, batches(12), on_step=lambda t: seen.append(counts(sp)))
    assert all(c == planned for c in seen)
    assert any(not torch.equal(before[n], m) for n, m in masks(sp).items())


def test_snfs_redistribution_keeps_global_count_and_one_connection_per_output_unit():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = sparsify(model, opt, "snfs", sparsity=0.9, total_steps=40, update_interval=2, update_end=1.0,
                  drop_fraction=0.5, redistribute=True)
    total = sum(ly.plan.active for ly in sp.layers)
    floors = {ly.name: min(ly.param.shape[0], ly.plan.active) for ly in sp.layers}
    seen = []
    train_steps(model, sp, batches(40), on_step=lambda t: seen.append(counts(sp)))
    assert all(sum(c.values()) == total for c in seen)
    assert all(c[n] >= floors[n] for c in seen for n in c)
    assert any(c != {ly.name: ly.plan.active for ly in sp.layers} for c in seen)  # density did move


def test_snfs_ema_is_checkpointed_as_tensors():
    model = mlp()
    sp = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "snfs", sparsity=0.8, total_steps=10)
    train_steps(model, sp, batches(2))
    state = sp.state_dict()
    assert set(state["method"]) == {f"ema/{ly.name}" for ly in sp.layers}
    fresh = make_method("snfs")
    fresh.load_state_dict(state["method"])
    names = {ly.name for ly in sp.layers}
    assert len(names) == 3 and set(fresh.ema) == set(sp.method.ema) == names
    for n in names:
        assert torch.equal(fresh.ema[n], sp.method.ema[n]) and fresh.ema[n].abs().sum() > 0, n
        assert fresh.ema[n].data_ptr() != sp.method.ema[n].data_ptr()  # a copy, not the live tensor


# -- SNIP -----------------------------------------------------------------------------------------

def snip_scores(model: nn.Module, data) -> dict[str, torch.Tensor]:
    ref = mlp()
    ref.load_state_dict(model.state_dict())
    for x, y in data:
        F.cross_entropy(ref(x), y).backward()
    return {n: (p.grad * p).abs() for n, p in ref.named_parameters() if n.endswith("weight")}


def test_snip_per_layer_keeps_the_top_grad_times_weight_and_the_planned_count():
    model = mlp()
    data = batches(2, seed=5)
    scores = snip_scores(model, data)
    sp = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "snip", sparsity=0.8, total_steps=10,
                  snip_batches=2, init_batches=data, loss_fn=F.cross_entropy)
    for ly in sp.layers:
        assert ly.active == ly.plan.active
        s = scores[ly.name].detach()
        assert float(s[ly.mask].min()) >= float(s[~ly.mask].max())
        assert ly.param.grad is None  # scoring left no gradients behind
    before = masks(sp)
    train_steps(model, sp, batches(5))
    assert all(torch.equal(before[n], m) for n, m in masks(sp).items())  # then static


def test_snip_global_keeps_global_count_and_no_empty_layer():
    model = mlp()
    data = batches(1)
    sp = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "snip", sparsity=0.95, total_steps=10,
                  snip_scope="global", init_batches=data, loss_fn=F.cross_entropy)
    assert sum(counts(sp).values()) == sum(ly.plan.active for ly in sp.layers)
    for ly in sp.layers:
        assert ly.active >= min(ly.param.shape[0], ly.plan.active)


def test_snip_needs_init_batches_and_valid_options():
    assert get_method_class("snip").needs_init_batches
    model = mlp()
    with pytest.raises(InputError):
        sparsify(model, None, "snip", sparsity=0.9, total_steps=5)
    with pytest.raises(InputError):
        make_method("snip", snip_scope="everywhere")


# -- Pruning --------------------------------------------------------------------------------------

def test_pruning_follows_cubic_schedule_and_ends_at_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 20))  # one 1000-weight layer, 90 % sparse at the end: 100 kept
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = sparsify(model, opt, "pruning", sparsity=0.9, total_steps=100, distribution="uniform",
                  dense_first_layer=False, prune_begin=0.1, prune_end=0.5, prune_interval=10)
    assert sp.layers[0].plan.active == 100 and sp.layers[0].active == 1000
    method = sp.method
    assert [t for t in range(1, 101) if method.is_update_step(t)] == [20, 30, 40, 50]
    seen = {}
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 50, generator=gen), torch.randint(0, 20, (8,), generator=gen)) for _ in range(100)]
    train_steps(model, sp, data, on_step=lambda t: seen.__setitem__(t, sp.layers[0].active))
    # s_t = 0.9 (1 - (1 - (t - 10)/40)^3): t=20 -> 0.5203125, 479.6875 kept -> 480; t=40 -> 0.8859375 -> 114
    assert seen[19] == 1000 and seen[20] == 480 and seen[39] == seen[30] and seen[40] == 114
    assert seen[50] == 100 and seen[100] == 100
    assert math.isclose(method.sparsity_at(1000, 100, 20), 0.5203125)
    assert sp.realized_sparsity() == pytest.approx(0.9)


def test_pruning_drops_smallest_magnitudes():
    model = nn.Sequential(nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 101, dtype=torch.float32).view(10, 10))
    sp = sparsify(model, torch.optim.SGD(model.parameters(), lr=0.0), "pruning", sparsity=0.5, total_steps=10,
                  distribution="uniform", dense_first_layer=False, prune_begin=0.0, prune_end=0.1)
    model(torch.zeros(1, 10)).sum().backward()
    sp.step()  # step 1 == prune_end: straight to the target
    assert sp.layers[0].mask.flatten().tolist() == [False] * 50 + [True] * 50


def test_pruning_option_validation():
    with pytest.raises(InputError):
        make_method("pruning", prune_begin=0.8, prune_end=0.5)
    with pytest.raises(InputError):
        make_method("pruning", prune_interval=0)


# -- Small-Dense ----------------------------------------------------------------------------------

def _count(model: nn.Module) -> int:
    from sparsekit.masks import prunable_weights

    return sum(p.numel() for p in prunable_weights(model).values())


def test_small_dense_width_within_5_percent_below_budget_on_default_digits_mlp():
    from sparsekit.models import build_model

    cfg = TrainConfig(method="small-dense", sparsity=0.9)  # default mlp (hidden 512,256) on digits, ERK
    data = SimpleNamespace(input_shape=(64,), num_classes=10)
    method = make_method("small-dense")
    kwargs, info = method.choose_model_kwargs(cfg, data)
    budget = info["sparse_active_budget"]
    # ERK plan of 64-512-256-10 at 90 %: 18,944 active (the 256x10 head saturates and stays dense)
    assert budget == 18944
    small = build_model("mlp", kwargs, input_shape=(64,), num_classes=10)
    assert _count(small) == info["params"] <= budget
    assert info["params"] >= 0.95 * budget
    assert info["gap"] == budget - info["params"]
    # the next width on the grid would exceed the budget
    wider = build_model("mlp", {**kwargs, "width": kwargs["width"] + 1 / 512}, input_shape=(64,), num_classes=10)
    assert _count(wider) > budget
    assert not method.sparse


def test_small_dense_refuses_models_without_width(tmp_path):
    f = tmp_path / "netdef.py"
    f.write_text("import torch.nn as nn\n\ndef build(input_shape, num_classes):\n"
                 "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    cfg = TrainConfig(model=f"py:{f}:build", method="small-dense")
    with pytest.raises(InputError, match="width"):
        make_method("small-dense").choose_model_kwargs(cfg, SimpleNamespace(input_shape=(64,), num_classes=10))


def test_every_method_has_description_defaults_and_paper_recipe():
    for name in ("rigl", "set", "snfs", "snip", "static", "small-dense", "pruning", "dense"):
        cls = get_method_class(name)
        assert cls.description and cls.family and cls.paper_recipe
