"""Resume for every method in the registry, on a model that draws random numbers in its forward pass
(dropout): an interrupted run continued with --resume ends bit-identical to an uninterrupted one —
weights, masks, every checkpoint tensor (optimizer, method state such as SNFS's EMA, RNG), metrics,
mask updates and the summary. In-process and tiny (12 steps), so it runs in the default suite; the
kill -9 variants live in test_faults.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from same_run import assert_same_run

from sparsekit.config import TrainConfig
from sparsekit.methods import METHODS
from sparsekit.training import Callbacks, train

# 96 samples / batch 16 = 6 steps per epoch, 2 epochs: checkpoints at steps 4, 6, 8 and 12. Mask updates
# every 3 steps (RigL/SET/SNFS until T_end = 9; pruning between steps 1 and 6).
METHOD_OPTIONS = {"rigl": {"update_interval": 3}, "set": {"update_interval": 3}, "snfs": {"update_interval": 3},
                  "pruning": {"prune_interval": 3}}
INTERRUPT_AT = 10  # the last checkpoint before it is step 8: steps 9..12 (with an update at 9) are redone

DROPOUT_MODEL = '''\
from torch import nn


def build(input_shape, num_classes, width: float = 1.0):
    hidden = max(2, round(16 * width))
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
'''


class Interrupted(RuntimeError):
    pass


def interrupt_at(step: int) -> Callbacks:
    def on_step(info: dict) -> None:
        if info["step"] == step:
            raise Interrupted

    return Callbacks(on_step=on_step)


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "dropout_net.py"
    path.write_text(DROPOUT_MODEL)
    return f"py:{path}:build"


def config(method: str, model: str) -> TrainConfig:
    return TrainConfig(model=model, data="synthetic:n=96,test=32", method=method,
                       method_options=METHOD_OPTIONS.get(method, {}), sparsity=0.8, epochs=2, batch_size=16,
                       checkpoint_every=4, seed=7, device="cpu")





@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_bit_identical_for_every_method_with_dropout(tmp_path, dropout_model, method):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(config(method, dropout_model), full)
    with pytest.raises(Interrupted):
        train(config(method, dropout_model), cut, callbacks=interrupt_at(INTERRUPT_AT))
    with safe_open(str(cut / "checkpoint.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["sparsekit"])["step_count"] == 8
    train(config(method, dropout_model), cut, resume=True)
    assert_same_run(full, cut)
    if method == "snfs":  # the EMA is checkpointed (and compared above) for every prunable layer
        ckpt = load_file(str(full / "checkpoint.safetensors"))
        masks = load_file(str(full / "masks.safetensors"))
        assert {k for k in ckpt if k.startswith("method/")} == {f"method/ema/{n}" for n in masks}
        assert all(ckpt[f"method/ema/{n}"].abs().sum() > 0 for n in masks)


def test_dropout_makes_the_run_depend_on_the_rng(tmp_path, dropout_model):
    """The control for the test above: the same run with another global RNG stream ends elsewhere, so a
    resume that forgot to restore the RNG state could not end bit-identical."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(config("static", dropout_model), a)
    cfg = config("static", dropout_model)

    def reseed(info: dict) -> None:
        if info["step"] == 8:
            torch.manual_seed(12345)

    train(cfg, b, callbacks=Callbacks(on_step=reseed))
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
