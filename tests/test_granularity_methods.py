"""Mask granularity in every sparse method: the pattern holds exactly after initialisation and after every
update (N:M at every step, blocks all-or-nothing, equal fan-in per row), the active count never changes
(pruning: whole units, n_t:M at every step, N:M from the end of its schedule), neuron ablation keeps the
layer's count, and a resumed structured run ends bit-identical; the CLI writes the granularity into the
run's config and summary and refuses a resume with another one."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest
import torch
from safetensors.torch import load_file
from same_run import assert_same_run
from torch import nn

import sparsekit
from sparsekit.config import TrainConfig
from sparsekit.errors import InputError
from sparsekit.granularity import Granularity
from sparsekit.training import Callbacks, train

STEPS = 24
OPTIONS = {"rigl": {"update_interval": 2}, "set": {"update_interval": 2}, "snfs": {"update_interval": 2},
           "pruning": {"prune_interval": 2, "prune_begin": 0.1, "prune_end": 0.6}}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def run(build, method: str, spec: str, *, init_mask: str | None = None, check=None) -> sparsekit.Sparsifier:
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 16) if build is mlp else torch.randn(16, 4, 4, 4)
    y = torch.randint(0, 4, (16,))
    extra = {"init_batches": [(x, y)], "loss_fn": nn.functional.cross_entropy} if method == "snip" else {}
    sp = sparsekit.sparsify(model, opt, method, sparsity=None if ":" in spec else 0.75, total_steps=STEPS,
                            granularity=spec, dense_first_layer=False, init_mask=init_mask, seed=3,
                            **OPTIONS.get(method, {}), **extra)
    if check is not None:
        check(sp, 0)
    for t in range(1, STEPS + 1):
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
        opt.zero_grad()
        if check is not None:
            check(sp, t)
    return sp


def exact_pattern(gran: Granularity, mask: torch.Tensor) -> None:
    counts = gran.group_counts(mask)
    if gran.kind == "block":
        assert set(counts.tolist()) <= {0, gran.group_size(tuple(mask.shape))}
    elif gran.kind == "nm":
        assert set(counts.tolist()) == {gran.n}
    else:
        assert len(set(counts.tolist())) == 1  # every row the same fan-in


METHODS_GRANS = [(m, g) for m in ("rigl", "set", "snfs", "static", "snip") for g in ("2:4", "4x1", "1x4", "fanin")]


@pytest.mark.parametrize("build", [mlp, cnn])
@pytest.mark.parametrize(("method", "spec"), METHODS_GRANS)
def test_pattern_and_counts_hold_at_every_step(build, method, spec):
    gran = Granularity.parse(spec)
    first: dict[str, int] = {}

    def check(sp, t):
        for ly in sp.layers:
            exact_pattern(gran, ly.mask)
            assert ly.active == first.setdefault(ly.name, ly.plan.active)
            assert ly.active % gran.unit(tuple(ly.mask.shape)) == 0

    sp = run(build, method, spec, check=check)
    if sp.method.family == "dynamic":  # the updates really moved connections
        moved = sum(int((ly.mask != m).sum()) for ly, m in zip(sp.layers, initial_masks(build, method, spec),
                                                                  strict=True))
        assert moved > 0


def initial_masks(build, method: str, spec: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build()
    sp = sparsekit.sparsify(model, None, "static", sparsity=None if ":" in spec else 0.75, total_steps=STEPS,
                            granularity=spec, dense_first_layer=False, seed=3)
    return [ly.mask.clone() for ly in sp.layers]


@pytest.mark.parametrize("spec", ["2:4", "4x1", "fanin"])
def test_magnitude_start_mask_is_structured_and_picks_the_largest_groups(spec):
    gran = Granularity.parse(spec)
    sp = run(mlp, "static", spec, init_mask="magnitude")
    for ly in sp.layers:
        exact_pattern(gran, ly.mask)
    if gran.kind == "block":  # every kept block's |w| sum at the start beat every dropped one's
        torch.manual_seed(0)
        w = mlp()[2].weight.detach().abs()
        sums = gran.grouped(w, tuple(w.shape)).sum(dim=1)
        on = gran.grouped(sp.layers[1].mask, tuple(w.shape)).all(dim=1)
        assert float(sums[on].min()) >= float(sums[~on].max())


@pytest.mark.parametrize("build", [mlp, cnn])
@pytest.mark.parametrize("spec", ["2:4", "4x1", "fanin"])
def test_pruning_goes_in_whole_units_and_ends_at_the_pattern(build, spec):
    gran = Granularity.parse(spec)
    history: list[dict[str, int]] = []

    def check(sp, t):
        for ly in sp.layers:
            counts = gran.group_counts(ly.mask)
            if gran.kind == "block":
                assert set(counts.tolist()) <= {0, gran.group_size(tuple(ly.mask.shape))}
            else:  # n_t:M (or K_t per row) at every step
                assert len(set(counts.tolist())) == 1
        history.append({ly.name: ly.active for ly in sp.layers})

    sp = run(build, "pruning", spec, check=check)
    for ly in sp.layers:
        exact_pattern(gran, ly.mask)
        assert ly.active == ly.plan.active
    planned = sp.method.planned_history(sp.layers)
    for entry in planned[1:]:
        assert history[entry["step"]] == entry["active"]  # the recorded counts are the planned ones
    assert len({tuple(h.values()) for h in history}) > 2  # it pruned in several steps


# -- neuron ablation --------------------------------------------------------------------------------------
def test_ablation_switches_off_rows_without_salient_inputs_and_keeps_the_count():
    """Rows 0..3 of the middle layer are dead (zero weights, zero gradients): their salient count is 0 < γ·K,
    so they are ablated at the first update; their budget goes to the other rows (K or K+1), the layer's
    active count is unchanged, and they stay off."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparsekit.sparsify(model, opt, "rigl", sparsity=0.75, total_steps=STEPS, granularity="fanin+ablate",
                            dense_first_layer=False, update_interval=2, seed=3)
    layer = sp.layers[1]
    before = layer.active

    keep = torch.tensor([0.0] * 4 + [1.0] * 12)

    def kill_rows(module, args, out):  # units 0..3 feed nothing: their weights get no gradient
        return out * keep

    with torch.no_grad():
        model[2].weight[:4] = 0
    model[2].register_forward_hook(kill_rows)
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    for _ in range(6):
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
        opt.zero_grad()
        counts = sp.granularity.group_counts(layer.mask)
        assert layer.active == before
        if sp.step_count >= 2:  # from the first update on
            assert counts[:4].tolist() == [0, 0, 0, 0]
        alive = counts[counts > 0]
        assert int(alive.max()) - int(alive.min()) <= 1 and int(alive.sum()) == before
    assert sp.granularity.summary(layer.mask) == {"groups": 16, "active_groups": 12}


def test_fanin_without_ablation_keeps_dead_rows():
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model[2].weight[:4] = 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparsekit.sparsify(model, opt, "rigl", sparsity=0.75, total_steps=STEPS, granularity="fanin",
                            dense_first_layer=False, update_interval=2, seed=3)
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    for _ in range(4):
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
        opt.zero_grad()
    assert set(sp.granularity.group_counts(sp.layers[1].mask).tolist()) == {sp.layers[1].plan.active // 16}


# -- resume, checkpoints, CLI --------------------------------------------------------------------------------
def config(spec: str, **kw) -> TrainConfig:
    base = dict(model="mlp", model_kwargs={"hidden": [32, 16]}, data="synthetic:n=96,test=32", method="rigl",
                method_options={"update_interval": 3}, sparsity=0.75, epochs=2, batch_size=16, checkpoint_every=4,
                seed=7, device="cpu", granularity=spec)
    base.update(kw)
    return TrainConfig(**base).validate()


class Interrupted(RuntimeError):
    pass


def test_resumed_structured_run_is_bit_identical(tmp_path):
    def stop(info: dict) -> None:
        if info["step"] == 10:
            raise Interrupted

    full, cut = tmp_path / "full", tmp_path / "cut"
    train(config("4x1"), full)
    with pytest.raises(Interrupted):
        train(config("4x1"), cut, callbacks=Callbacks(on_step=stop))
    train(config("4x1"), cut, resume=True)
    assert_same_run(full, cut)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["granularity"] == "4x1"
    gran = Granularity.parse("4x1")
    masks = load_file(str(full / "masks.safetensors"))
    for entry in summary["layers"]:
        if entry["prunable"]:
            mask = masks[entry["name"]]
            assert gran.conforms(mask)
            assert entry["groups"] == mask.numel() // 4
            assert entry["active_groups"] == entry["active"] // 4 == int(mask.sum()) // 4


def test_resume_with_another_granularity_is_refused(tmp_path):
    def stop(info: dict) -> None:
        if info["step"] == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config("4x1"), tmp_path, callbacks=Callbacks(on_step=stop))
    with pytest.raises(InputError) as exc:
        train(config("fanin"), tmp_path, resume=True)
    assert exc.value.message.startswith(f"the checkpoint in {tmp_path} was made with different settings (granularity)")


def test_a_checkpoint_whose_masks_break_the_pattern_is_refused():
    torch.manual_seed(0)
    sp = sparsekit.sparsify(mlp(), None, "static", sparsity=None, total_steps=4, granularity="2:4",
                            dense_first_layer=False)
    state = sp.state_dict()
    name = sp.layers[0].name
    state["masks"][name].view(-1)[:4] = torch.tensor([True, True, True, False])  # 3 of 4 in one group
    with pytest.raises(InputError) as exc:
        sp.load_state_dict(state)
    assert exc.value.message == (f"mask {name} does not have the 2:4 pattern (checkpoint); fix: resume or start with "
                                 "the granularity the masks were made with")


def test_cli_implies_n_m_density_and_writes_the_granularity(cli, tmp_path):
    res = cli(["train", "--model", "mlp", "--model-kwargs", "hidden=32,16", "--data", "synthetic:n=96,test=32",
               "--method", "set", "--granularity", "2:4", "--epochs", "1", "--batch-size", "16",
               "--update-interval", "2", "--out", str(tmp_path / "r"), "--quiet", "--json"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["granularity"], summary["distribution"], summary["target_sparsity"]) == ("2:4", "uniform", 0.5)
    assert summary["config"]["granularity"] == "2:4"
    schema = json.loads(resources.files("sparsekit").joinpath("schemas/summary.schema.json").read_text())
    jsonschema.validate(summary, schema)
    assert [ly["active_groups"] for ly in summary["layers"] if ly["prunable"]] == \
        [ly["groups"] for ly in summary["layers"] if ly["prunable"]]  # every 2:4 group holds its two
    assert [ly["prunable"] for ly in summary["layers"]] == [True, True, True]  # the first layer is 2:4 too
    res = cli(["train", "--data", "synthetic", "--granularity", "2:4", "--sparsity", "0.9", "--epochs", "1",
               "--out", str(tmp_path / "bad"), "--quiet"])
    assert res.exit_code == 2
    assert res.stderr.strip() == ("error: sparsity 0.9 disagrees with granularity 2:4, which fixes every sparse "
                                  "layer's density at 2/4 (--sparsity); fix: drop --sparsity (it is implied) or "
                                  "give --sparsity 0.5")


def test_unstructured_run_summary_says_so(cli, tmp_path):
    res = cli(["train", "--model", "mlp", "--model-kwargs", "hidden=16", "--data", "synthetic:n=64,test=32",
               "--method", "static", "--epochs", "1", "--out", str(tmp_path / "u"), "--quiet", "--json"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["granularity"] == "unstructured"
    assert all("groups" not in ly for ly in summary["layers"])
