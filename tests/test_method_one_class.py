""""Adding a method is one class": a method defined here, as one small class and with no edit anywhere else,
trains through ``sparsekit.sparsify`` and the CLI, and its own hooks decide its masks and its FLOP count."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit
from sparsekit.config import TrainConfig
from sparsekit.flops import run_flops
from sparsekit.methods import METHODS, LayerUpdate, Method
from sparsekit.selection import Magnitude, select_top, tie_keys


class RandomGrow(Method):
    """Every ``every`` steps each layer drops its ``fraction`` smallest-|w| active connections and grows as
    many at random. Its (made-up) training cost: 3·f_S per step, plus one dense forward on update steps."""

    name = "test-random-grow"
    description = "test: drop smallest |w|, grow at random"
    family = "dynamic"
    defaults: ClassVar[dict[str, Any]] = {"every": 3, "fraction": 0.25}

    def is_update_step(self, step: int) -> bool:
        return step % int(self.options["every"]) == 0

    def update_counts(self, sp: Any, step: int) -> dict[str, LayerUpdate]:
        counts = {}
        for ly in sp.layers:
            k = int(self.options["fraction"] * ly.active)
            counts[ly.name] = LayerUpdate(k_drop=k, k_grow=k)
        return counts

    def grow_scores(self, sp: Any, layer: Any, step: int) -> torch.Tensor:
        return tie_keys(sp.seed, step, layer.index, layer.numel, purpose="test-grow").to(layer.param.device)

    def training_step_cost(self, f_s: float, f_d: float, step: int) -> float:
        return 3.0 * f_s + (f_d if self.is_update_step(step) else 0.0)

    def training_formula(self) -> str:
        return "3·f_S, + f_D on update steps"


def _two_layers() -> nn.Module:
    """10·8 + 8·4 = 112 weights used once per sample: f_D = 112 MACs; uniform 50 %: 40 + 16 active, f_S = 56."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))


def _expected_mask(ly: Any, before: torch.Tensor, k: int, seed: int, step: int) -> torch.Tensor:
    """The §3 update by hand: drop the k lowest |w| among active, grow the k highest keys among the rest."""
    flat = before.reshape(-1).clone()
    flat[select_top(Magnitude(ly.param.detach().reshape(-1)), flat, k, largest=False, seed=seed, step=step,
                    layer=ly.index)] = False
    keys = tie_keys(seed, step, ly.index, ly.numel, purpose="test-grow")
    flat[select_top(keys, ~flat, k, largest=True, seed=seed, step=step, layer=ly.index)] = True
    return flat.view_as(before)


def test_one_class_method_trains_through_sparsify_with_its_own_counts_and_scores():
    model = _two_layers()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: the drop order is known in advance
    sp = sparsekit.sparsify(model, opt, RandomGrow(every=3, fraction=0.25), sparsity=0.5, total_steps=10,
                            distribution="uniform", dense_first_layer=False, seed=4)
    planned = [ly.plan.active for ly in sp.layers]
    assert planned == [40, 16]
    gen = torch.Generator().manual_seed(1)
    changed = []
    for step in range(1, 11):
        before = [ly.mask.clone() for ly in sp.layers]
        x, y = torch.randn(4, 10, generator=gen), torch.randint(0, 4, (4,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        assert sp.step() is True  # the default: the optimizer step is taken
        opt.zero_grad(set_to_none=True)
        after = [ly.mask for ly in sp.layers]
        assert [ly.active for ly in sp.layers] == planned
        if step % 3 == 0:
            for ly, b, k in zip(sp.layers, before, (10, 4), strict=True):
                assert torch.equal(ly.mask, _expected_mask(ly, b, k, 4, step)), (step, ly.name)
                assert float(ly.param.detach()[ly.mask & ~b].abs().sum()) == 0.0  # new connections start at 0
        changed.append(any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)))
        for ly in sp.layers:
            assert float(ly.param.detach()[~ly.mask].abs().sum()) == 0.0
    assert changed == [s % 3 == 0 for s in range(1, 11)]
    assert [e["step"] for e in sp.update_log] == [0, 3, 6, 9]


def test_one_class_method_prices_its_own_training_steps():
    """Σ_t 3·56 + 112·[t ∈ {3, 6, 9}] = 1680 + 336 = 2016 MACs per example over 10 steps, whether counted
    over the recorded mask history or the default planned history (the counts never change)."""
    model = _two_layers()
    sp = sparsekit.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), RandomGrow(), sparsity=0.5,
                            total_steps=10, distribution="uniform", dense_first_layer=False)
    for _ in range(10):
        model(torch.randn(2, 10)).sum().backward()
        sp.step()
    cfg = TrainConfig(epochs=1, batch_size=2)
    for updates in (list(sp.update_log), None):
        t = run_flops(model, sp, input_shape=(10,), config=cfg, updates=updates)["training"]
        assert t["flops_per_example"] == 2 * 2016
        assert t["total_flops"] == 2 * 2016 * 2
        assert t["vs_dense"] == pytest.approx(2016 / (3 * 112 * 10))
        assert t["formula"] == "3·f_S, + f_D on update steps"
        assert t["update_interval"] is None and t["update_end_step"] is None


def test_registered_one_class_method_works_by_name_in_sparsify_and_the_cli(cli, monkeypatch, tmp_path):
    monkeypatch.setitem(METHODS, RandomGrow.name, RandomGrow)
    model = _two_layers()
    sp = sparsekit.sparsify(model, None, "test-random-grow", sparsity=0.5, total_steps=4, every=2)
    assert isinstance(sp.method, RandomGrow) and sp.method.options == {"every": 2, "fraction": 0.25}

    shown = cli(["methods", "test-random-grow", "--json"])
    assert shown.exit_code == 0, shown.stderr
    assert shown.json()["options"] == {"every": 3, "fraction": 0.25}

    run = tmp_path / "r"
    res = cli(["train", "--method", "test-random-grow", "--method-option", "every=2", "--model", "mlp",
               "--model-kwargs", "hidden=16", "--data", "synthetic", "--epochs", "1", "--batch-size", "64",
               "--sparsity", "0.75", "--quiet", "--out", str(run), "--json"])
    assert res.exit_code == 0, res.stderr
    s = res.json()
    steps = s["total_steps"]
    assert steps >= 4
    updates = [json.loads(line)["step"] for line in (run / "updates.jsonl").read_text().splitlines()]
    assert updates == list(range(0, steps + 1, 2))
    assert s["method_summary"] == {"name": "test-random-grow", "family": "dynamic",
                                   "options": {"every": 2, "fraction": 0.25}}
    assert s["flops"]["training"]["formula"] == "3·f_S, + f_D on update steps"
    f_s, f_d = s["flops"]["inference"]["sparse_macs"], s["flops"]["inference"]["dense_macs"]
    assert s["flops"]["training"]["flops_per_example"] == pytest.approx(2 * (3 * f_s * steps + f_d * (steps // 2)))


def test_methods_import_without_the_engine():
    """Methods return counts and scores; they never import (let alone call back into) the Sparsifier."""
    code = ("import sys, sparsekit.methods; "
            "assert 'sparsekit.sparsifier' not in sys.modules, 'the methods import the engine'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
