"""The RigL update step of docs/methods.md, on hand-written examples and as invariants."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsekit.schedules import UpdateSchedule
from sparsekit.selection import select_top, tie_keys
from sparsekit.sparsifier import sparsify

# Layer (2, 3) flat indices: 0 1 2 / 3 4 5. Start mask: 0, 1, 3 active.
START = torch.tensor([[True, True, False], [True, False, False]])
WEIGHTS = torch.tensor([[0.5, -0.1, 0.0], [0.3, 0.0, 0.0]])
# |grad|: idx 1 and 4 tie at 0.9 (idx 1 is the connection that gets dropped).
GRADS = torch.tensor([[0.0, 0.9, 0.4], [0.0, 0.9, 0.1]])


def _tiny(seed: int, optimizer_cls=torch.optim.SGD, **opt_kw):
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    opt = optimizer_cls(layer.parameters(), lr=0.1, **opt_kw)
    # update_interval=1, update_end=1 over 2 steps: step 1 updates with f(1) = 0.7/2 (1 + cos(pi/2)) = 0.35,
    # k = floor(0.35 * 3 active) = 1.
    sp = sparsify(layer, opt, "rigl", sparsity=0.5, distribution="uniform", dense_first_layer=False,
                  total_steps=2, seed=seed, update_interval=1, update_end=1.0, drop_fraction=0.7)
    sp.commit_masks({"weight": START.clone()}, step=0)
    with torch.no_grad():
        layer.weight.copy_(WEIGHTS)
    return layer, opt, sp


def _seed_where(first_wins: bool) -> int:
    for seed in range(100):
        keys = tie_keys(seed, 1, 0, 6)
        if (keys[1] < keys[4]) == first_wins:
            return seed
    raise AssertionError("no seed found")


def test_tie_resolved_in_favour_of_dropped_connection_keeps_it_as_it_was():
    seed = _seed_where(first_wins=True)
    layer, _, sp = _tiny(seed, momentum=0.9)
    layer.weight.grad = GRADS.clone()
    took = sp.step()
    assert took is False  # RigL skips the optimizer step on update steps
    # idx 1 (lowest |w| among active) is dropped, then regrown (tie with idx 4 won by its key)
    assert sp.layers[0].mask.tolist() == START.tolist()
    assert torch.equal(layer.weight.detach(), WEIGHTS)  # left as it was, not reset


def test_tie_resolved_for_other_connection_grows_new_one_at_zero():
    seed = _seed_where(first_wins=False)
    layer, opt, sp = _tiny(seed, momentum=0.9)
    # Give every entry a momentum buffer so the reset is visible.
    layer.weight.grad = torch.ones(2, 3)
    sp.pre_step()
    opt.step()  # take a normal step first to create momentum state (not an update step in this call)
    with torch.no_grad():
        layer.weight.copy_(WEIGHTS)
    sp.step_count = 0
    layer.weight.grad = GRADS.clone()
    sp.step()
    expected = torch.tensor([[True, False, False], [True, True, False]])
    assert sp.layers[0].mask.tolist() == expected.tolist()
    buf = opt.state[layer.weight]["momentum_buffer"]
    assert layer.weight[1, 1].item() == 0.0 and buf[1, 1].item() == 0.0  # new: weight 0, momentum 0
    assert layer.weight[0, 1].item() == 0.0 and buf[0, 1].item() == 0.0  # dropped: zeroed
    assert buf[0, 0].item() != 0.0  # kept connections keep their state


def test_select_top_breaks_ties_by_key_not_by_index():
    scores = torch.zeros(10)
    cand = torch.ones(10, dtype=torch.bool)
    keys = tie_keys(3, 7, 2, 10)
    chosen = select_top(scores, cand, 3, largest=True, seed=3, step=7, layer=2)
    assert sorted(chosen.tolist()) == sorted(torch.argsort(keys)[:3].tolist())


def test_select_top_prefers_scores_over_keys():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    cand = torch.tensor([True, True, True, False, True])
    assert sorted(select_top(scores, cand, 2, largest=True, seed=0, step=1, layer=0).tolist()) == [1, 2]
    assert sorted(select_top(scores, cand, 2, largest=False, seed=0, step=1, layer=0).tolist()) == [0, 4]


def test_cosine_drop_fraction_and_update_window():
    sched = UpdateSchedule(total_steps=1000, interval=100, update_end=0.75, drop_fraction=0.3)
    assert sched.end_step == 750
    assert sched.update_steps() == [100, 200, 300, 400, 500, 600, 700]
    assert sched.fraction(375) == pytest.approx(0.15)  # halfway: alpha/2
    assert sched.fraction(100) == pytest.approx(0.15 * (1 + math.cos(math.pi * 100 / 750)))
    assert not sched.is_update_step(800) and sched.is_update_step(700)
    lin = UpdateSchedule(total_steps=1000, interval=100, drop_schedule="linear")
    assert lin.fraction(375) == pytest.approx(0.15)


class _Net(nn.Module):
    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for o, i in shapes)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


@pytest.mark.parametrize("shapes", [[(16, 8), (4, 16)], [(32, 12), (32, 32), (5, 32)]])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_rigl_keeps_layer_nnz_constant_and_masked_state_zero(shapes, sparsity, opt_name):
    torch.manual_seed(1)
    net = _Net(shapes)
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
           "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
           "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2)}[opt_name](net.parameters())
    sp = sparsify(net, opt, "rigl", sparsity=sparsity, total_steps=60, update_interval=3, seed=2)
    planned = {ly.name: ly.plan.active for ly in sp.layers}
    x = torch.randn(64, shapes[0][1])
    y = torch.randint(0, shapes[-1][0], (64,))
    updates = 0
    for _ in range(60):
        updates += sp.is_update_step()
        nn.functional.cross_entropy(net(x), y).backward()
        sp.step()
        opt.zero_grad()
        for ly in sp.layers:
            assert ly.active == planned[ly.name]
    assert updates == 15  # steps 3, 6, ..., 45 (T_end = 45)
    for ly in sp.layers:
        off = ~ly.mask
        assert torch.count_nonzero(ly.param[off]) == 0
        for state in opt.state[ly.param].values():
            if isinstance(state, torch.Tensor) and state.shape == ly.param.shape:
                assert torch.count_nonzero(state[off]) == 0
    assert sp.realized_sparsity() == pytest.approx(
        1 - sum(planned.values()) / sum(ly.numel for ly in sp.layers))


def test_masks_actually_change_and_new_connections_start_at_zero():
    torch.manual_seed(0)
    net = _Net([(32, 16), (4, 32)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sp = sparsify(net, opt, "rigl", sparsity=0.8, total_steps=40, update_interval=5, seed=0)
    before = {ly.name: ly.mask.clone() for ly in sp.layers}
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    for _ in range(5):
        nn.functional.cross_entropy(net(x), y).backward()
        snapshot = {ly.name: ly.param.detach().clone() for ly in sp.layers}
        took = sp.step()
        opt.zero_grad()
    assert sp.step_count == 5 and took is False
    changed = sum(int((before[ly.name] != ly.mask).sum()) for ly in sp.layers)
    assert changed > 0
    for ly in sp.layers:
        new = ly.mask & ~before[ly.name]
        assert torch.all(ly.param[new] == 0)
        kept = ly.mask & before[ly.name]
        assert torch.equal(ly.param[kept], snapshot[ly.name][kept])  # skipped step: no change


def test_no_skip_step_on_update_takes_the_optimizer_step():
    torch.manual_seed(0)
    net = _Net([(8, 4), (2, 8)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = sparsify(net, opt, "rigl", sparsity=0.5, total_steps=10, update_interval=1,
                  skip_step_on_update=False)
    nn.functional.cross_entropy(net(torch.randn(4, 4)), torch.tensor([0, 1, 0, 1])).backward()
    assert sp.step() is True


def test_dense_method_has_no_masks_and_steps_normally():
    net = _Net([(8, 4), (2, 8)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = sparsify(net, opt, "dense", total_steps=5)
    assert sp.layers == [] and sp.realized_sparsity() == 0.0
    assert all(not row["prunable"] for row in sp.layer_summary())


def test_static_mask_never_changes():
    torch.manual_seed(0)
    net = _Net([(16, 8), (4, 16)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sp = sparsify(net, opt, "static", sparsity=0.7, total_steps=30, seed=4)
    masks = {ly.name: ly.mask.clone() for ly in sp.layers}
    for _ in range(30):
        nn.functional.cross_entropy(net(torch.randn(8, 8)), torch.randint(0, 4, (8,))).backward()
        sp.step()
        opt.zero_grad()
    assert all(torch.equal(masks[ly.name], ly.mask) for ly in sp.layers)


def test_unknown_method_option_is_an_error():
    from sparsekit.errors import InputError

    with pytest.raises(InputError, match="does not take option"):
        sparsify(nn.Linear(4, 4), None, "static", sparsity=0.5, total_steps=5, update_interval=3)


def test_select_top_equals_a_full_sort_by_score_then_key():
    """The linear-time selection picks exactly what a full lexicographic sort (score, key) picks."""
    import numpy as np

    from sparsekit.selection import element_keys

    rng = np.random.default_rng(1)
    for trial in range(150):
        n = int(rng.integers(5, 20000 if trial % 10 == 0 else 2000))
        scores = (rng.integers(0, 6, n) if trial % 2 else rng.standard_normal(n)).astype(np.float32)
        if trial % 7 == 0:
            scores[rng.random(n) < 0.1] = np.nan  # NaN ranks last
        cand = rng.random(n) < rng.random()
        if not cand.any():
            continue
        k = int(cand.sum()) if trial % 5 == 0 else max(1, int(rng.random() * cand.sum()))
        for largest in (True, False):
            got = select_top(torch.from_numpy(scores), torch.from_numpy(cand), k, largest=largest,
                             seed=3, step=5, layer=1).tolist()
            idx = np.flatnonzero(cand)
            s = scores[idx] if largest else -scores[idx]
            s = np.where(np.isnan(s), -np.inf, s)
            order = np.lexsort((element_keys(3, 5, 1, idx), -s))
            assert len(got) == k and set(got) == set(idx[order[:k]].tolist()), (trial, largest)


def test_c_selection_helpers_match_the_numpy_path(monkeypatch):
    """csrc/sparsekit_select.c gives exactly the numpy path's choice (including ties and NaN)."""
    import numpy as np

    import sparsekit.selection as sel

    assert sel._c is not None, "the _select extension was not built"
    rng = np.random.default_rng(2)
    for trial in range(120):
        n = int(rng.integers(5, 40000 if trial % 20 == 0 else 4000))
        s = (rng.integers(0, 6, n) if trial % 2 else rng.standard_normal(n)).astype(np.float32)
        if trial % 7 == 0:
            s[rng.random(n) < 0.1] = np.nan
        cand = rng.random(n) < rng.random()
        if not cand.any():
            continue
        k = max(1, int(rng.random() * cand.sum())) if trial % 3 else max(1, int(0.01 * cand.sum()))
        for largest in (True, False):
            args = (torch.from_numpy(s), torch.from_numpy(cand), k)
            kw = {"largest": largest, "seed": 1, "step": 2, "layer": 3}
            with_c = select_top(*args, **kw).tolist()
            monkeypatch.setattr(sel, "_c", None)
            without = select_top(*args, **kw).tolist()
            monkeypatch.undo()
            assert len(with_c) == k and set(with_c) == set(without), trial


def test_one_pass_selection_on_magnitudes_equals_a_full_sort(monkeypatch):
    """Layer-sized inputs take the one-pass path (sampled bound, csrc gather_ge) with |.| taken on the fly:
    the choice equals a full sort by (|score|, key), with ties, NaN and signed scores, and the numpy path."""
    import numpy as np

    import sparsekit.selection as sel
    from sparsekit.selection import Magnitude, element_keys

    assert sel._c is not None, "the _select extension was not built"
    calls = {"one_pass": 0}
    real = sel._c.gather_ge

    class Spy:
        def __getattr__(self, name):  # the other helpers unchanged
            return getattr(real.__self__, name) if name != "gather_ge" else self.gather_ge

        @staticmethod
        def gather_ge(*a):
            calls["one_pass"] += 1
            return real(*a)

    monkeypatch.setattr(sel, "_c", Spy())
    rng = np.random.default_rng(4)
    for trial in range(24):
        n = int(rng.integers(30_000, 240_000))
        s = (rng.integers(-3, 4, n) if trial % 3 == 0 else rng.standard_normal(n)).astype(np.float32)
        if trial % 4 == 1:
            s[rng.random(n) < 0.05] = np.nan
        cand = rng.random(n) < (0.1 if trial % 2 else 0.9)
        k = max(1, int(cand.sum() * (0.3 if trial % 5 else 0.01)))
        for largest in (True, False):
            kw = {"largest": largest, "seed": 5, "step": 7, "layer": 2}
            got = select_top(Magnitude(torch.from_numpy(s)), torch.from_numpy(cand), k, **kw).tolist()
            idx = np.flatnonzero(cand)
            v = np.abs(s[idx]) if largest else -np.abs(s[idx])
            v = np.where(np.isnan(v), -np.inf, v)
            order = np.lexsort((element_keys(5, 7, 2, idx), -v))
            assert len(got) == k and set(got) == set(idx[order[:k]].tolist()), (trial, largest)
            monkeypatch.setattr(sel, "_c", None)
            assert set(select_top(Magnitude(torch.from_numpy(s)), torch.from_numpy(cand), k, **kw).tolist()) \
                == set(got)
            monkeypatch.setattr(sel, "_c", Spy())
    assert calls["one_pass"] >= 40  # nearly every selection above took the one-pass path


def test_index_commit_equals_whole_tensor_commit():
    """commit_masks on drop_and_grow's own result (index path) leaves weights, optimizer state, float
    masks, counts and the first layer's fan-out exactly as the whole-tensor path does."""
    import copy

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 10))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        sp = sparsify(model, opt, "rigl", sparsity=0.8, total_steps=100, update_interval=1000)
        x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
        for _ in range(3):
            nn.functional.cross_entropy(model(x), y).backward()
            sp.step()
            opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        return model, opt, sp

    results = []
    for index_path in (True, False):
        model, opt, sp = setup()
        new = {}
        for ly in sp.layers:
            k = ly.active // 3
            new[ly.name] = sp.drop_and_grow(ly, 5, k_drop=k, k_grow=k,
                                            drop_scores=ly.param.detach().abs().flatten(),
                                            grow_scores=ly.param.grad.detach().abs().flatten())
        with torch.no_grad():  # new connections must start at 0 with 0 state even if they were not 0
            for ly in sp.layers:
                fresh = new[ly.name] & ~ly.mask
                ly.param[fresh] = 7.0
                for t in opt.state[ly.param].values():
                    if t.shape == ly.param.shape:
                        t[fresh] = 7.0
        if not index_path:
            new = {n: m.clone() for n, m in new.items()}  # not drop_and_grow's tensors: whole-tensor path
        sp.commit_masks(new, 5)
        results.append((copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"]),
                        [f.clone() for f in sp._fmasks], [ly.active for ly in sp.layers], sp._active_total,
                        sp.update_log[-1]["input_fanout"], {ly.name: ly.mask.clone() for ly in sp.layers}))
    a, b = results
    assert not any((t == 7.0).any() for t in a[0].values())
    assert all(torch.equal(a[0][n], b[0][n]) for n in a[0])
    assert all(torch.equal(a[1][i][key], b[1][i][key]) for i in a[1] for key in a[1][i])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))
    assert a[3] == b[3] and a[4] == b[4] and a[5] == b[5]
    assert all(torch.equal(a[6][n], b[6][n]) for n in a[6])
    assert a[5] == b[6]["0.weight"].sum(dim=0).tolist()
