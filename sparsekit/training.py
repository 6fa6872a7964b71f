"""The training loop: one readable function over the public ``sparsify`` API.

``train(config, run_dir)`` loads data and model, puts the model under the method with ``sparsify``,
trains with a step-indexed LR schedule and a (seed, epoch)-indexed shuffle, checkpoints atomically,
and writes the run directory (see ``sparsekit.rundir``). Everything that decides the result is a
function of (config, step), so a resumed run ends bit-identical to an uninterrupted one on CPU.
Progress goes to ``callbacks`` (the CLI renders it with rich); the loop knows no particular method.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit import rundir as rd
from sparsekit.checkpoint import load_checkpoint, restore, save_checkpoint
from sparsekit.config import TrainConfig
from sparsekit.errors import InputError, TrainingError
from sparsekit.schedules import LRSchedule
from sparsekit.selection import stream_seed
from sparsekit.sparsifier import sparsify


@dataclass
class Callbacks:
    """Events of a run; every field is optional. The CLI uses these for the progress bar."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    on_message: Callable[[str], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def emit(self, name: str, payload: Any) -> None:
        fn = getattr(self, name)
        if fn is not None:
            fn(payload)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA device is available", where="--device",
                         fix="use --device cpu or --device auto")
    return torch.device(name)


def make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)
    if config.nesterov:
        raise InputError("--nesterov applies to SGD only", where="--nesterov", fix="drop it or use --optimizer sgd")
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of epoch ``epoch``: a function of (seed, epoch) only, so resume needs no RNG state."""
    gen = torch.Generator().manual_seed(stream_seed(seed, epoch, -1, "shuffle"))
    return torch.randperm(n, generator=gen)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a split."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out = model(xb)
        total_loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train(was_training)
    n = max(len(x), 1)
    return total_loss / n, correct / n


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits 5."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Train one run and return its summary (also written to ``run_dir/summary.json``)."""
    from sparsekit.data import load_dataset
    from sparsekit.methods import make_method

    cb = callbacks or Callbacks()
    config.validate()
    run_dir = Path(run_dir)
    rd.check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # fail fast, before loading data
    device = resolve_device(config.device)
    t_start = time.perf_counter()

    data = load_dataset(config.data, seed=config.seed, val_fraction=config.val_fraction,
                        label_column=config.label_column, image_size=config.image_size, channels=config.channels)
    method = make_method(config.method, **config.method_options)
    model, width_info = rd.build_run_model(config, data, method)
    model.to(device)
    n_train = len(data.x_train)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_epochs = max(1, round(config.epochs * config.train_multiplier))
    total_steps = steps_per_epoch * total_epochs
    optimizer = make_optimizer(config, list(model.parameters()))
    schedule = LRSchedule(config.lr, total_steps, config.lr_schedule,
                          warmup_steps=round(config.warmup_epochs * config.train_multiplier * steps_per_epoch))
    init_batches = _init_batches(data, config, device) if getattr(method, "needs_init_batches", False) else None
    sp = sparsify(model, optimizer, method, sparsity=config.sparsity, total_steps=total_steps,
                  distribution=config.distribution, seed=config.seed, dense_first_layer=config.dense_first_layer,
                  erk_power_scale=config.erk_power_scale, layer_density=config.layer_density or None,
                  init_batches=init_batches, loss_fn=F.cross_entropy)
    if config.init_from:
        rd.init_from_run(config.init_from, model, sp)
    # Everything the command asked for is valid: only now is the run directory created or replaced.
    checkpoint = rd.prepare_run_dir(run_dir, config, resume=resume, overwrite=overwrite)

    state: dict[str, Any] = {"epoch_loss_sum": 0.0, "epoch_correct": 0, "epoch_seen": 0, "train_seconds": 0.0,
                             "skipped_batches": 0}
    if checkpoint is not None:
        tensors, meta = load_checkpoint(checkpoint)
        sp.load_state_dict(restore(tensors, meta, model=model, optimizer=optimizer))
        state.update(meta["state"])
        rd.truncate_logs(run_dir, step=sp.step_count)
        cb.emit("on_message", f"resumed from {checkpoint} at step {sp.step_count}/{total_steps}")
    else:
        rd.write_updates(run_dir, sp.update_log)
    sp.update_log.clear()

    x_train, y_train = data.x_train, data.y_train
    cb.emit("on_start", {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "epochs": total_epochs,
                         "start_step": sp.step_count, "run_dir": str(run_dir)})

    def save(step_state: dict[str, Any]) -> None:
        save_checkpoint(run_dir / rd.CHECKPOINT, model=model, optimizer=optimizer,
                        sparsifier_state=sp.state_dict(), state=step_state)

    model.train()
    seconds_before = float(state["train_seconds"])
    t_loop = time.perf_counter()
    order, order_epoch = torch.empty(0, dtype=torch.long), -1
    with _StopFlag() as stop:
        while sp.step_count < total_steps:
            step = sp.step_count + 1
            epoch, batch_idx = divmod(step - 1, steps_per_epoch)
            if order_epoch != epoch:
                order, order_epoch = epoch_order(n_train, config.seed, epoch), epoch
            idx = order[batch_idx * config.batch_size:(batch_idx + 1) * config.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            lr = schedule.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            if not torch.isfinite(loss):
                if config.nan_policy == "skip-batch":
                    optimizer.zero_grad(set_to_none=True)
                    state["skipped_batches"] += 1
                    sp.step_count += 1  # the step is consumed (schedules stay aligned), weights unchanged
                    continue
                raise TrainingError(f"loss became {float(loss)} at step {step} (epoch {epoch + 1})",
                                    where=str(run_dir),
                                    fix="lower --lr, add --clip-grad, or use --nan-policy skip-batch; "
                                        "the last good checkpoint was kept")
            loss.backward()
            take = sp.pre_step()
            if config.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            if take:
                optimizer.step()
            sp.post_step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            state["epoch_loss_sum"] += loss_value * len(idx)
            state["epoch_correct"] += int((out.argmax(1) == yb).sum())
            state["epoch_seen"] += len(idx)
            if sp.update_log:
                rd.write_updates(run_dir, sp.update_log)
                sp.update_log.clear()
            cb.emit("on_step", {"step": step, "total_steps": total_steps, "loss": loss_value, "lr": lr,
                                "sparsity": sp.realized_sparsity(), "epoch": epoch + 1})
            end_of_epoch = batch_idx == steps_per_epoch - 1
            if end_of_epoch:
                test_loss, test_acc = evaluate(model, data.x_test, data.y_test, config.eval_batch_size, device)
                seen = max(state["epoch_seen"], 1)
                elapsed = seconds_before + time.perf_counter() - t_loop
                record = {"epoch": epoch + 1, "step": step, "train_loss": state["epoch_loss_sum"] / seen,
                          "train_accuracy": state["epoch_correct"] / seen, "test_loss": test_loss,
                          "test_accuracy": test_acc, "sparsity": sp.realized_sparsity(), "lr": lr,
                          "seconds": elapsed}
                state.update(epoch_loss_sum=0.0, epoch_correct=0, epoch_seen=0)
                rd.append_metrics(run_dir, record)
                cb.emit("on_epoch", record)
            due = end_of_epoch or (config.checkpoint_every and step % config.checkpoint_every == 0)
            if due or stop.signal is not None:
                state["train_seconds"] = seconds_before + time.perf_counter() - t_loop
                save(state)
            if stop.signal is not None:
                raise TrainingError(f"interrupted by signal {stop.signal} at step {step}", where=str(run_dir),
                                    fix="run the same command with --resume to continue from the checkpoint")
    state["train_seconds"] = seconds_before + time.perf_counter() - t_loop
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, config.eval_batch_size, device)
    summary = rd.finish_run(run_dir, config=config, model=model, sparsifier=sp, data=data,
                            test_loss=test_loss, test_accuracy=test_acc, train_seconds=state["train_seconds"],
                            total_steps=total_steps, width_info=width_info,
                            wall_seconds=time.perf_counter() - t_start, device=device)
    save(state)
    return summary


def _init_batches(data: Any, config: TrainConfig, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches for one-shot methods that score at initialisation (SNIP): from epoch 0's shuffle."""
    order = epoch_order(len(data.x_train), config.seed, 0)
    n = int(config.method_options.get("snip_batches", 1))
    out = []
    for i in range(n):
        idx = order[(i * config.batch_size) % len(order):][:config.batch_size]
        out.append((data.x_train[idx].to(device), data.y_train[idx].to(device)))
    return out

