"""The Python API for users' own training loops: same result as the CLI, hooks, save → export."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from safetensors.torch import load_file
from sparsekit.exporters.compressed import load_state_dict

import sparsekit
from sparsekit.data import load_dataset
from sparsekit.models import build_model
from sparsekit.schedules import LRSchedule
from sparsekit.training import epoch_order

SEED, EPOCHS, BATCH = 5, 3, 64


def test_user_loop_matches_cli_masks_and_weights(cli, tmp_path):
    res = cli(["train", "--model", "mlp", "--model-kwargs", "hidden=32", "--data", "synthetic", "--method", "rigl",
               "--sparsity", "0.8", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--update-interval", "4",
               "--weight-decay", "0.0005", "--seed", str(SEED), "--out", str(tmp_path / "cli"), "--quiet"])
    assert res.exit_code == 0, res.stderr

    # A user's own loop over the public API, with the same data order, init and LR schedule.
    data = load_dataset("synthetic", seed=SEED)
    torch.manual_seed(SEED)
    model = build_model("mlp", {"hidden": [32]}, input_shape=data.input_shape, num_classes=data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(data.x_train) / BATCH)
    total = steps_per_epoch * EPOCHS
    sp = sparsekit.sparsify(model, opt, "rigl", sparsity=0.8, total_steps=total, seed=SEED, update_interval=4)
    lrs = LRSchedule(0.1, total)
    step = 0
    for epoch in range(EPOCHS):
        order = epoch_order(len(data.x_train), SEED, epoch)
        for i in range(steps_per_epoch):
            idx = order[i * BATCH:(i + 1) * BATCH]
            step += 1
            for g in opt.param_groups:
                g["lr"] = lrs.lr(step)
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            sp.step()
            opt.zero_grad(set_to_none=True)

    weights = load_file(str(tmp_path / "cli" / "weights.safetensors"))
    masks = load_file(str(tmp_path / "cli" / "masks.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(masks[ly.name].bool(), ly.mask) for ly in sp.layers)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = sparsekit.sparsify(model, opt, "rigl", sparsity=0.7, total_steps=40, update_interval=5, seed=seed)
    return model, opt, sp


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(40)]


def test_optimizer_hooks_equal_explicit_step():
    """Frameworks that call optimizer.step() themselves get exactly the result of sp.step()."""
    a_model, a_opt, a_sp = _setup()
    b_model, b_opt, b_sp = _setup()
    b_sp.hook_optimizer()
    for x, y in _batches():
        F.cross_entropy(a_model(x), y).backward()
        a_sp.step()
        a_opt.zero_grad()
        F.cross_entropy(b_model(x), y).backward()
        b_opt.step()  # the framework's call; the hooks do the rest (including RigL's skipped step)
        b_opt.zero_grad()
    assert b_sp.step_count == 40
    for pa, pb in zip(a_model.parameters(), b_model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert all(torch.equal(la.mask, lb.mask) for la, lb in zip(a_sp.layers, b_sp.layers, strict=True))


def test_pre_and_post_step_with_clipping_keep_masks_exact():
    model, opt, sp = _setup()
    for x, y in _batches():
        F.cross_entropy(model(x), y).backward()
        if sp.pre_step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        sp.post_step()
        opt.zero_grad()
    for ly in sp.layers:
        assert ly.active == ly.plan.active
        assert torch.count_nonzero(ly.param[~ly.mask]) == 0


def test_state_dict_round_trip_continues_identically():
    model, opt, sp = _setup()
    batches = _batches()
    for x, y in batches[:12]:
        F.cross_entropy(model(x), y).backward()
        sp.step()
        opt.zero_grad()
    # deepcopy: optimizer.state_dict() returns live tensors that load_state_dict would share.
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sp.state_dict()))
    m2, o2, s2 = _setup(seed=1)  # different init and masks, overwritten by the state
    m2.load_state_dict(saved[0])
    o2.load_state_dict(saved[1])
    s2.load_state_dict(saved[2])
    for x, y in batches[12:]:
        for m, o, s in ((model, opt, sp), (m2, o2, s2)):
            F.cross_entropy(m(x), y).backward()
            s.step()
            o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters(), strict=True))


def test_save_writes_a_run_dir_that_exports(cli, tmp_path):
    model, opt, sp = _setup()
    for x, y in _batches():
        F.cross_entropy(model(x), y).backward()
        sp.step()
        opt.zero_grad()
    x_test = torch.randn(64, 12)
    summary = sparsekit.save(model, sp, tmp_path / "mine", example_input=x_test)
    assert summary["method"] == "rigl" and summary["realized_sparsity"] > 0.69
    res = cli(["export", str(tmp_path / "mine"), "--format", "onnx,sparse-onnx,compressed", "--json"])
    assert res.exit_code == 0, res.stderr
    report = res.json()
    assert [(a["format"], a["status"]) for a in report["artifacts"]] == \
        [("onnx", "ok"), ("sparse-onnx", "ok"), ("compressed", "ok")]
    with torch.no_grad():
        ref = model(x_test).numpy()
    for a in report["artifacts"]:  # each validated on the 64 saved inputs against the model's outputs
        v = a["validation"]
        assert v["passed"] and v["n_samples"] == 64 and v["max_abs_diff"] <= v["tolerance"], a
    # the exported files hold this model: masked weights exactly 0, outputs within the fp32 tolerance
    dense = onnx.load(report["artifacts"][0]["path"]).graph.initializer
    onnx_weights = {t.name: numpy_helper.to_array(t) for t in dense}
    assert sorted(sp.masks()) == ["0.weight", "2.weight"]
    for name, mask in sp.masks().items():
        param = dict(model.named_parameters())[name].detach().numpy()
        assert (onnx_weights[name][~mask.numpy()] == 0).all() and np.array_equal(onnx_weights[name], param), name
    state = load_state_dict(report["artifacts"][2]["path"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    sess = ort.InferenceSession(report["artifacts"][1]["path"], providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x_test.numpy()})[0]
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))
