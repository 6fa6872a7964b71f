"""The training loop's hooks (``Callbacks.on_step_begin``, ``on_loss``, ``before_commit``), in process:
each fires at its documented point, an exception from a hook stops the run with the last checkpoint
intact, and the resumed run ends bit-identical to an uninterrupted one. The ``SPARSEKIT_FAULT`` test hook
is built from the same callbacks (``sparsekit.faults``); its kill -9 runs live in test_faults.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from same_run import assert_same_run, checkpoint_meta

from sparsekit.config import TrainConfig
from sparsekit.distributed import DistContext
from sparsekit.errors import InputError, TrainingError
from sparsekit.faults import Fault, FaultInjector, parse
from sparsekit.training import Callbacks, TrainingRun, train

# 512 samples / batch 32 = 16 steps per epoch, 2 epochs: checkpoints at steps 7, 14, 16, 21, 28 and 32.


def config(**kw) -> TrainConfig:
    base = dict(model="mlp", model_kwargs={"hidden": [32, 16]}, data="synthetic", method="rigl",
                method_options={"update_interval": 5}, sparsity=0.8, epochs=2, batch_size=32, checkpoint_every=7,
                seed=3)
    base.update(kw)
    return TrainConfig(**base)





@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("events") / "full"
    train(config(), run)
    return run


def test_step_begin_fires_before_each_step_and_an_interrupt_there_resumes_bit_identical(full_run, tmp_path):
    cut, seen = tmp_path / "cut", []

    def interrupt_at_30(run: TrainingRun, step: int) -> None:
        assert run.sparsifier.step_count == step - 1  # before the step, not after it
        seen.append(step)
        if step == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(), cut, callbacks=Callbacks(on_step_begin=interrupt_at_30))
    assert seen == list(range(1, 31))
    assert checkpoint_meta(cut / "checkpoint.safetensors")["step_count"] == 28  # step 29 ran, unsaved
    assert not (cut / "summary.json").exists()

    first, second, order = [], [], []
    hooks = [Callbacks(on_step_begin=lambda run, step: (first.append(step), order.append("a"))),
             Callbacks(on_step_begin=lambda run, step: (second.append(step), order.append("b")))]
    train(config(), cut, resume=True, callbacks=hooks)
    assert first == second == [29, 30, 31, 32] and order == ["a", "b"] * 4
    assert_same_run(full_run, cut)


def test_on_loss_replaces_the_loss_that_is_checked_and_backpropagated(full_run, tmp_path):
    def nan_at_12(run: TrainingRun, step: int, loss: torch.Tensor) -> torch.Tensor | None:
        return loss * float("nan") if step == 12 else None

    with pytest.raises(TrainingError, match=r"loss became nan at step 12 \(epoch 1\)"):
        train(config(), tmp_path / "stop", callbacks=Callbacks(on_loss=nan_at_12))
    assert checkpoint_meta(tmp_path / "stop" / "checkpoint.safetensors")["step_count"] == 7

    steps: list[int] = []
    train(config(nan_policy="skip-batch"), tmp_path / "skip",
          callbacks=Callbacks(on_loss=nan_at_12, on_step=lambda info: steps.append(info["step"])))
    meta = checkpoint_meta(tmp_path / "skip" / "checkpoint.safetensors")
    assert meta["state"]["skipped_batches"] == 1 and meta["step_count"] == 32
    assert steps == [s for s in range(1, 33) if s != 12]  # the skipped step reports nothing
    weights = load_file(str(tmp_path / "skip" / "weights.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())

    # a replacement is what backward sees: doubling every loss changes the weights; returning None does not
    train(config(), tmp_path / "same", callbacks=Callbacks(on_loss=lambda run, step, loss: None))
    assert_same_run(full_run, tmp_path / "same")
    train(config(), tmp_path / "double", callbacks=Callbacks(on_loss=lambda run, step, loss: loss * 2))
    a, b = load_file(str(full_run / "weights.safetensors")), load_file(str(tmp_path / "double" / "weights.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_before_commit_runs_between_the_complete_temporary_file_and_the_rename(full_run, tmp_path):
    cut, calls = tmp_path / "cut", []

    def interrupt_save_14(run: TrainingRun, step: int, tmp: Path) -> None:
        calls.append(step)
        assert tmp != cut / "checkpoint.safetensors" and checkpoint_meta(tmp)["step_count"] == step  # complete
        if step == 14:
            assert checkpoint_meta(cut / "checkpoint.safetensors")["step_count"] == 7  # not yet replaced
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(), cut, callbacks=Callbacks(before_commit=interrupt_save_14))
    assert calls == [7, 14]
    assert checkpoint_meta(cut / "checkpoint.safetensors")["step_count"] == 7  # the new one never replaced it
    assert not list(cut.glob(".*.tmp"))  # an exception (unlike kill -9) removes the temporary file
    train(config(), cut, resume=True)
    assert_same_run(full_run, cut)


def test_sigterm_sent_from_a_hook_checkpoints_that_step_and_stops(tmp_path):
    def sigterm_at_8(run: TrainingRun, step: int) -> None:
        if step == 8:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingError, match="interrupted by signal 15 at step 8; checkpoint saved"):
        train(config(), tmp_path / "r", callbacks=Callbacks(on_step_begin=sigterm_at_8))
    assert checkpoint_meta(tmp_path / "r" / "checkpoint.safetensors")["step_count"] == 8


def test_fault_spec_parses_ranks_and_fires_only_on_its_rank():
    assert parse("kill@3, nan@12/1,kill-in-save@5") == [Fault("kill", 3), Fault("nan", 12, 1),
                                                          Fault("kill-in-save", 5)]
    for bad in ("kill@soon", "nan@3/x", "kill@3,"):
        with pytest.raises(InputError, match="malformed SPARSEKIT_FAULT item"):
            parse(bad)
    hooks = FaultInjector(parse("nan@12/1")).callbacks()
    loss = torch.tensor(1.5)

    class Run:  # the one field the fault hooks read
        def __init__(self, rank: int) -> None:
            self.ctx = DistContext(rank=rank, world_size=2)

    assert hooks.on_loss is not None
    assert hooks.on_loss(Run(0), 12, loss) is None  # type: ignore[arg-type]
    assert hooks.on_loss(Run(1), 11, loss) is None  # type: ignore[arg-type]
    assert torch.isnan(hooks.on_loss(Run(1), 12, loss))  # type: ignore[arg-type]
