"""The training loop: one readable loop over the public ``Sparsifier`` engine.

``train(config, run_dir)`` sets up a run (``set_up_run``: data, model, optimizer, LR schedule, the
method under a ``Sparsifier``, the run directory, DDP under torchrun), then runs ``train_step`` once per
step with ``end_of_epoch`` and ``save_checkpoint`` when due, and ``finish_run`` at the end. The LR is
step-indexed and the shuffle (seed, epoch)-indexed; checkpoints are atomic; everything that decides
the result is a function of (config, step), so a resumed run ends bit-identical to an uninterrupted
one on CPU. Progress and hooks go to ``Callbacks`` (the CLI renders them as a bar or plain log lines); the loop knows
no particular method and no test fault: faults are callbacks too (see ``sparsekit.faults``).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit import distributed as dist
from sparsekit import run_writer as rd
from sparsekit.checkpoint import load_checkpoint, restore
from sparsekit.checkpoint import save_checkpoint as write_checkpoint
from sparsekit.config import TrainConfig
from sparsekit.data.batches import BatchPlan, StepBatches, batch_stream, check_augment, epoch_order
from sparsekit.data.lazy import LazySamples
from sparsekit.errors import InputError, TrainingError
from sparsekit.run_dir import RunDir
from sparsekit.schedules import LRSchedule
from sparsekit.settings import SparsitySettings
from sparsekit.sparsifier import Sparsifier
from sparsekit.start import RECALIBRATION_BATCHES, StartPoint, load_into, load_start, recalibrate_batchnorm
from sparsekit.tasks import CLASSIFICATION, TASKS, Task, task_of


@dataclass
class Callbacks:
    """Events of a run; every field is optional. The CLI uses these for the progress bar.

    Progress events get a JSON-able dict and fire on rank 0 only: ``on_start``, ``on_step`` (the end of
    each trained step), ``on_epoch`` (the end of an epoch, its metrics record), ``on_message``. Hooks fire on
    every rank (also under torchrun) and get the ``TrainingRun``: ``on_step_begin(run, step)`` before step
    ``step`` (1-based) takes its batch; ``on_loss(run, step, loss)`` may return a tensor that replaces the
    step's loss (before the NaN policy and backward); ``before_commit(run, step, tmp)`` runs on rank 0
    when the checkpoint of ``step`` is complete in its temporary file, before it replaces the previous one.
    An exception raised by any callback stops the run there (the last checkpoint stays).
    """

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    on_message: Callable[[str], None] | None = None
    #: Called on every rank (also under torchrun) after the run, with the final model and sparsifier.
    on_end: Callable[[dict[str, Any]], None] | None = None
    on_step_begin: Callable[[TrainingRun, int], None] | None = None
    on_loss: Callable[[TrainingRun, int, torch.Tensor], torch.Tensor | None] | None = None
    before_commit: Callable[[TrainingRun, int, Path], None] | None = None
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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             device: torch.device, task: Task = TASKS[CLASSIFICATION]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a split (per symbol for language modelling)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    batch_size = task.eval_batch_size(batch_size, x)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out = model(xb)
        total_loss += task.loss_sum(out, yb)
        correct += task.correct(out, yb)
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
          callbacks: Callbacks | Sequence[Callbacks] | None = None) -> dict[str, Any]:
    """Train one run and return its summary (also written to ``run_dir/summary.json``).

    ``callbacks``: one ``Callbacks`` or several, called in the given order.

    Under torchrun (``WORLD_SIZE`` > 1) this joins the process group and trains with
    DistributedDataParallel; only rank 0 writes the run directory and emits progress events (``on_end``
    and the hooks fire on every rank). See ``sparsekit.distributed``.
    """
    import torch.distributed as torch_dist

    cbs = [callbacks] if isinstance(callbacks, Callbacks) else list(callbacks or [])
    config.validate()
    run_dir = Path(run_dir)
    created_group = not (torch_dist.is_available() and torch_dist.is_initialized())
    ctx = dist.setup(config.device, config.dist_timeout)
    threads_before = torch.get_num_threads()
    try:
        summary = _train(config, run_dir, resume=resume, overwrite=overwrite, callbacks=cbs, ctx=ctx)
    finally:
        torch.set_num_threads(threads_before)
    dist.teardown(ctx, created=created_group)
    return summary


# Below this many dense multiply-accumulates per training step (forward), one CPU thread is as fast as
# several, and on a machine with other work it is far faster: measured here, the default digits run took
# 2.6 s of training on 1 thread and 82 s on 2 threads while the other core was busy.
SMALL_STEP_MACS = 1 << 26


def choose_threads(config: TrainConfig, model: nn.Module, input_shape: tuple[int, ...],
                   device: torch.device, ctx: dist.DistContext) -> int:
    """Intra-op CPU threads for this run: ``--threads N``, or (0 = auto) 1 for small steps and under
    torchrun on CPU (one process per core), else torch's default."""
    if config.threads > 0:
        return config.threads
    if device.type != "cpu" or ctx.enabled:
        return 1 if ctx.enabled and device.type == "cpu" else torch.get_num_threads()
    from sparsekit.flops import weight_positions

    positions = weight_positions(model, input_shape)
    macs = sum(p.numel() * positions.get(n, 0) for n, p in model.named_parameters())
    return 1 if macs * config.batch_size < SMALL_STEP_MACS else torch.get_num_threads()


@dataclass
class TrainingRun:
    """Everything one run carries between steps; built by ``set_up_run``, handed to every step and hook."""

    config: TrainConfig
    run_dir: Path
    ctx: dist.DistContext
    callbacks: list[Callbacks]
    device: torch.device
    data: Any
    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    sparsifier: Sparsifier
    width_info: dict[str, Any] | None
    #: where the run started (``summary.json``'s ``start``): the file loaded, its kind, the step-0 mask
    start: dict[str, Any]
    steps_per_epoch: int
    total_epochs: int
    total_steps: int
    t_start: float
    #: the DistributedDataParallel wrapper of ``model`` under torchrun
    ddp: nn.Module | None = None
    #: running sums of the epoch and counters; saved in (and restored from) the checkpoint's metadata
    state: dict[str, Any] = field(default_factory=lambda: {
        "epoch_loss_sum": 0.0, "epoch_correct": 0, "epoch_seen": 0, "train_seconds": 0.0, "skipped_batches": 0})
    #: the stream of training batches, opened at the first step trained by this process
    batches: Iterator[Any] | None = None
    seconds_before: float = 0.0
    t_loop: float = 0.0

    @property
    def forward(self) -> nn.Module:
        """What a training step calls: the DDP wrapper under torchrun, else the model."""
        return self.model if self.ddp is None else self.ddp

    def emit(self, name: str, payload: Any) -> None:
        """A progress event (``on_start``, ``on_step``, ``on_epoch``, ``on_message``): rank 0 only."""
        if self.ctx.is_main:
            for cb in self.callbacks:
                cb.emit(name, payload)

    def hook(self, name: str, *args: Any) -> None:
        """An event on every rank (``on_step_begin``, ``on_end``)."""
        for cb in self.callbacks:
            fn = getattr(cb, name)
            if fn is not None:
                fn(*args)

    def epoch_of(self, step: int) -> int:
        """The 1-based epoch that step ``step`` (1-based) belongs to."""
        return (step - 1) // self.steps_per_epoch + 1

    def start_clock(self) -> None:
        self.seconds_before, self.t_loop = float(self.state["train_seconds"]), time.perf_counter()

    def train_seconds(self) -> float:
        """Training time so far, over every attempt of a resumed run."""
        return self.seconds_before + time.perf_counter() - self.t_loop


@dataclass
class StepResult:
    """What one step reports: the global batch's mean loss, its learning rate, whether any rank must stop,
    and whether the NaN policy skipped it."""

    loss: float
    lr: float
    stopping: bool
    skipped: bool = False


def _train(config: TrainConfig, run_dir: Path, *, resume: bool, overwrite: bool, callbacks: list[Callbacks],
           ctx: dist.DistContext) -> dict[str, Any]:
    """The loop: set up, then one ``train_step`` per step with its epoch end and checkpoints, then finish."""
    run = set_up_run(config, run_dir, resume=resume, overwrite=overwrite, callbacks=callbacks, ctx=ctx)
    run.emit("on_start", {"total_steps": run.total_steps, "steps_per_epoch": run.steps_per_epoch,
                          "epochs": run.total_epochs, "start_step": run.sparsifier.step_count,
                          "run_dir": str(run_dir), "world_size": ctx.world_size})
    run.model.train()
    run.start_clock()
    with _StopFlag() as stop:
        while run.sparsifier.step_count < run.total_steps:
            step = run.sparsifier.step_count + 1
            run.hook("on_step_begin", run, step)
            result = train_step(run, step, stop_requested=stop.signal is not None)
            if result.skipped:
                continue
            epoch_done = step % run.steps_per_epoch == 0
            if epoch_done:
                end_of_epoch(run, step, result.lr)
            if epoch_done or result.stopping or (config.checkpoint_every and step % config.checkpoint_every == 0):
                run.state["train_seconds"] = run.train_seconds()
                save_checkpoint(run, step)
            if result.stopping:
                what = f"signal {stop.signal}" if stop.signal is not None else "a signal on another rank"
                raise TrainingError(f"interrupted by {what} at step {step}; checkpoint saved", where=str(run_dir),
                                    fix="run the same command with --resume to continue from the checkpoint")
    return finish_run(run)


def step_budget(config: TrainConfig, n_train: int) -> tuple[int, int, int]:
    """(steps per epoch, epochs, total steps): whole epochs, or a step budget (LM recipes) if ``steps`` is set."""
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_epochs = max(1, round(config.epochs * config.train_multiplier))
    total_steps = steps_per_epoch * total_epochs
    if config.steps is not None:
        total_steps = max(1, round(config.steps * config.train_multiplier))
        total_epochs = math.ceil(total_steps / steps_per_epoch)
    return steps_per_epoch, total_epochs, total_steps


def set_up_run(config: TrainConfig, run_dir: Path, *, resume: bool, overwrite: bool, callbacks: list[Callbacks],
               ctx: dist.DistContext) -> TrainingRun:
    """Data, model, optimizer, LR schedule and sparsifier; then the run directory (fresh or resumed from its
    checkpoint) and, under torchrun, the DDP wrapper."""
    from sparsekit.data import load_dataset
    from sparsekit.methods import make_method

    # fail fast, before loading data; under torchrun rank 0 decides and every rank raises its error
    dist.on_main(lambda: rd.check_run_dir(run_dir, resume=resume, overwrite=overwrite), ctx)
    device = ctx.device if ctx.enabled and ctx.device is not None else resolve_device(config.device)
    t_start = time.perf_counter()

    data = load_dataset(config.data, seed=config.seed, val_fraction=config.val_fraction,
                        label_column=config.label_column, image_size=config.image_size, channels=config.channels,
                        seq_len=config.seq_len, vocab=config.vocab)
    check_augment(config.augment, data)
    task = task_of(data)
    method = make_method(config.method, **config.method_options)
    model, width_info = rd.build_run_model(config, data, method)
    start = load_start(config.init_from) if config.init_from else None
    if start is not None:  # before the sparsifier: the start mask is chosen from these weights
        load_into(model, start, fix=method.mismatched_start_fix())
    model.to(device)
    if device.type == "cpu":
        torch.set_num_threads(choose_threads(config, model, tuple(data.input_shape), device, ctx))
    steps_per_epoch, total_epochs, total_steps = step_budget(config, len(data.x_train))
    optimizer = make_optimizer(config, list(model.parameters()))
    milestones = {} if config.lr_milestones is None else {"milestones": tuple(config.lr_milestones)}
    schedule = LRSchedule(config.lr, total_steps, config.lr_schedule,
                          warmup_steps=round(config.warmup_epochs * config.train_multiplier * steps_per_epoch),
                          **milestones)
    init_batches = _init_batches(data, config, device, method.init_batch_count())
    sp = Sparsifier(model, optimizer, method, SparsitySettings.from_config(config, total_steps),
                    init_batches=init_batches, loss_fn=task.loss,
                    source_masks=None if start is None else start.masks)  # masks broadcast from rank 0
    run = TrainingRun(config=config, run_dir=run_dir, ctx=ctx, callbacks=callbacks, device=device, data=data,
                      task=task, model=model, optimizer=optimizer, schedule=schedule, sparsifier=sp,
                      width_info=width_info, steps_per_epoch=steps_per_epoch, total_epochs=total_epochs,
                      total_steps=total_steps, t_start=t_start, start=sp.start_summary())
    if start is not None:
        _settle_start(run, start)
    _open_run_dir(run, resume=resume, overwrite=overwrite)
    if ctx.enabled:
        _wrap_ddp(run)
    return run


def _settle_start(run: TrainingRun, start: StartPoint) -> None:
    """After the start mask was chosen from loaded weights: record where they came from and, if the mask
    removed some of them, re-estimate BatchNorm statistics on the first mini-batches of epoch 0 (the same on
    every rank). A resumed run restores its own statistics from the checkpoint afterwards."""
    run.start.update(start.summary())
    if all(bool(ly.mask.all()) for ly in run.sparsifier.layers):
        return
    n = min(run.steps_per_epoch, RECALIBRATION_BATCHES)
    recalibrated = recalibrate_batchnorm(run.model, _init_batches(run.data, run.config, run.device, n) or [])
    if recalibrated:
        run.start["batchnorm_recalibrated"] = recalibrated


def _open_run_dir(run: TrainingRun, *, resume: bool, overwrite: bool) -> None:
    """Create (or replace) the run directory, or continue from its checkpoint."""
    ctx, sp, run_dir = run.ctx, run.sparsifier, run.run_dir
    # Everything the command asked for is valid: only now is the run directory created or replaced.
    prepared = dist.on_main(lambda: rd.prepare_run_dir(run_dir, run.config, resume=resume, overwrite=overwrite),
                            ctx)
    checkpoint_name = dist.broadcast_json(None if prepared is None else str(prepared), ctx)
    if checkpoint_name is not None:
        checkpoint = Path(checkpoint_name)
        tensors, meta = load_checkpoint(checkpoint)  # every rank reads it (shared filesystem)
        sp.load_state_dict(restore(tensors, meta, model=run.model, optimizer=run.optimizer))
        run.state.update(meta["state"])
        dist.on_main(lambda: rd.truncate_logs(run_dir, step=sp.step_count), ctx)
        run.emit("on_message", f"resumed from {checkpoint} at step {sp.step_count}/{run.total_steps}")
    else:
        dist.on_main(lambda: rd.write_updates(run_dir, sp.update_log), ctx)
    sp.update_log.clear()


def _wrap_ddp(run: TrainingRun) -> None:
    """DistributedDataParallel around the model; with ``SPARSEKIT_DEBUG_MASKS=1`` also check after every mask
    update that all ranks hold the same masks and weights."""
    from torch.nn.parallel import DistributedDataParallel

    ctx, sp, device = run.ctx, run.sparsifier, run.device
    run.ddp = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    if dist.debug_masks_enabled():
        dist.verify_same(sp.masks(), ctx, what="masks", step=sp.step_count)

        def check(s: Any, step: int) -> None:
            dist.verify_same(s.masks(), ctx, what="masks", step=step)
            dist.verify_same({ly.name: ly.param for ly in s.layers}, ctx, what="weights", step=step)

        sp.on_update.append(check)


def _batch(run: TrainingRun, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Step ``step``'s batch from its epoch's shuffle (this rank's share of it under torchrun), augmented,
    on the device, and the size of the global batch (``sparsekit.data.batches``)."""
    if run.batches is None:
        plan = BatchPlan(n_train=len(run.data.x_train), batch_size=run.config.batch_size,
                         steps_per_epoch=run.steps_per_epoch, seed=run.config.seed,
                         augment=run.config.augment or "none", rank=run.ctx.rank, world_size=run.ctx.world_size)
        run.batches = batch_stream(StepBatches(run.data.x_train, run.data.y_train, plan),
                                   range(step, run.total_steps + 1), run.config.workers)
    got, xb, yb, n_global = next(run.batches)
    if got != step:  # the stream follows the loop's steps one by one
        raise RuntimeError(f"batch stream out of step: got step {got}, training step {step}")
    return xb.to(run.device), yb.to(run.device), n_global


def _loss(run: TrainingRun, step: int, out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """The batch's mean loss, as replaced by any ``on_loss`` callback (every rank)."""
    loss = run.task.loss(out, yb) if len(yb) else out.sum() * 0.0
    for cb in run.callbacks:
        if cb.on_loss is not None:
            replaced = cb.on_loss(run, step, loss)
            loss = loss if replaced is None else replaced
    return loss


def train_step(run: TrainingRun, step: int, *, stop_requested: bool) -> StepResult:
    """Step ``step`` (1-based): forward, the NaN policy, backward, the method's step and the optimizer's;
    then the mask-update log and the ``on_step`` event."""
    ctx, sp = run.ctx, run.sparsifier
    xb, yb, n_global = _batch(run, step)
    n_local = len(xb)
    lr = run.schedule.lr(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    out = run.forward(xb)
    loss = _loss(run, step, out, yb)
    loss_value = float(loss.detach())
    correct = run.task.correct(out, yb)
    loss_sum = loss_value * n_local
    stopping = stop_requested
    if ctx.enabled:  # one all-reduce: global loss/accuracy, and any rank's stop request
        loss_sum, g_correct, _, g_stop = dist.all_reduce_sum(
            [loss_sum, float(correct), float(n_local), float(stopping)], ctx)
        correct, stopping = int(g_correct), g_stop > 0
        loss_value = loss_sum / max(n_global, 1)
    if not math.isfinite(loss_value):
        _skip_non_finite(run, step, loss_value)
        return StepResult(loss_value, lr, stopping, skipped=True)
    if ctx.enabled:
        with dist.guard(f"the gradient all-reduce of step {step}"):
            (loss * dist.loss_weight(n_local, n_global, ctx)).backward()
    else:
        loss.backward()
    _optimizer_step(run)
    run.state["epoch_loss_sum"] += loss_sum
    run.state["epoch_correct"] += correct
    run.state["epoch_seen"] += n_global
    if sp.update_log:
        log = list(sp.update_log)
        dist.on_main(lambda: rd.write_updates(run.run_dir, log), ctx)
        sp.update_log.clear()
    run.emit("on_step", {"step": step, "total_steps": run.total_steps, "loss": loss_value, "lr": lr,
                         "sparsity": sp.realized_sparsity(), "epoch": run.epoch_of(step), "samples": n_global})
    return StepResult(loss_value, lr, stopping)


def _skip_non_finite(run: TrainingRun, step: int, loss_value: float) -> None:
    """The NaN policy: ``skip-batch`` consumes the step with the weights unchanged; otherwise the run stops."""
    if run.config.nan_policy != "skip-batch":
        raise TrainingError(f"loss became {loss_value} at step {step} (epoch {run.epoch_of(step)})",
                            where=str(run.run_dir),
                            fix="lower --lr, add --clip-grad, or use --nan-policy skip-batch; "
                                "the last good checkpoint was kept")
    run.optimizer.zero_grad(set_to_none=True)
    run.state["skipped_batches"] += 1
    run.sparsifier.step_count += 1  # the step is consumed (schedules stay aligned), weights unchanged


def _optimizer_step(run: TrainingRun) -> None:
    """The method's pre-step (gradient masking, maybe a mask update), clipping, the optimizer, the post-step."""
    sp = run.sparsifier
    take = sp.pre_step()
    if run.config.clip_grad is not None:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.config.clip_grad)
    if take:
        run.optimizer.step()
    sp.post_step()
    run.optimizer.zero_grad(set_to_none=True)


def end_of_epoch(run: TrainingRun, step: int, lr: float) -> None:
    """Evaluate on the test split, append the epoch's record to metrics.jsonl, emit ``on_epoch``."""
    state = run.state
    test_loss, test_acc = _evaluate(run.model, run.data.x_test, run.data.y_test, run.config.eval_batch_size,
                                    run.device, run.ctx, run.task)
    seen = max(state["epoch_seen"], 1)
    record = {"epoch": run.epoch_of(step), "step": step,
              "train_loss": state["epoch_loss_sum"] / seen, "train_accuracy": state["epoch_correct"] / seen,
              "test_loss": test_loss, "test_accuracy": test_acc, **run.task.extra_metrics(test_loss),
              "sparsity": run.sparsifier.realized_sparsity(), "lr": lr, "seconds": run.train_seconds()}
    state.update(epoch_loss_sum=0.0, epoch_correct=0, epoch_seen=0)
    dist.on_main(lambda: rd.append_metrics(run.run_dir, record), run.ctx)
    run.emit("on_epoch", record)


def save_checkpoint(run: TrainingRun, step: int) -> None:
    """Write the checkpoint of ``step`` on rank 0, atomically: the previous one stays until the new one is
    complete. ``before_commit`` callbacks run between the two."""
    path = RunDir(run.run_dir).checkpoint_file
    hooks = [cb.before_commit for cb in run.callbacks if cb.before_commit is not None]

    def before_commit(tmp: Path) -> None:
        for hook in hooks:
            hook(run, step, tmp)

    def write() -> None:
        try:
            write_checkpoint(path, model=run.model, optimizer=run.optimizer,
                             sparsifier_state=run.sparsifier.state_dict(), state=run.state,
                             before_commit=before_commit if hooks else None)
        except InputError as exc:  # disk full, permissions: the run stops, the old checkpoint stays
            raise TrainingError(f"could not save the checkpoint at step {step}: {exc.what}", where=str(path),
                                fix="free disk space or fix permissions, then rerun the same command with "
                                    "--resume; the previous checkpoint was kept") from exc

    dist.on_main(write, run.ctx)


def finish_run(run: TrainingRun) -> dict[str, Any]:
    """After the last step: the final evaluation, the run directory's artifacts and summary (rank 0), the last
    checkpoint, and ``on_end`` on every rank. Returns the summary (on every rank)."""
    run.state["train_seconds"] = run.train_seconds()
    if run.batches is not None:  # stop any DataLoader workers before the final evaluation and export
        run.batches.close()
    data, ctx = run.data, run.ctx
    test_loss, test_acc = _evaluate(run.model, data.x_test, data.y_test, run.config.eval_batch_size, run.device,
                                    ctx, run.task)
    summary = dist.on_main(lambda: rd.finish_run(
        run.run_dir, config=run.config, model=run.model, sparsifier=run.sparsifier, data=data,
        test_loss=test_loss, test_accuracy=test_acc, train_seconds=run.state["train_seconds"],
        total_steps=run.total_steps, width_info=run.width_info, wall_seconds=time.perf_counter() - run.t_start,
        device=run.device, world_size=ctx.world_size, start=run.start), ctx)
    save_checkpoint(run, run.sparsifier.step_count)
    summary = dist.broadcast_json(summary, ctx)
    run.hook("on_end", {"model": run.model, "sparsifier": run.sparsifier, "rank": ctx.rank,
                        "world_size": ctx.world_size})
    return summary


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
              ctx: dist.DistContext, task: Task = TASKS[CLASSIFICATION]) -> tuple[float, float]:
    """``evaluate`` over the whole split; under torchrun each rank takes a shard and the sums are reduced."""
    if not ctx.enabled:
        return evaluate(model, x, y, batch_size, device, task)
    sl = dist.local_slice(len(x), ctx)
    xs, ys = (x.subset(sl) if isinstance(x, LazySamples) else x[sl]), y[sl]
    n = len(xs)
    loss, acc = evaluate(model, xs, ys, batch_size, device, task) if n else (0.0, 0.0)
    total_loss, correct = dist.all_reduce_sum([loss * n, acc * n], ctx)
    m = max(len(x), 1)
    return total_loss / m, round(correct) / m


def _init_batches(data: Any, config: TrainConfig, device: torch.device,
                  n: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """``n`` mini-batches for methods that score at initialisation (SNIP), from epoch 0's shuffle; None for 0."""
    if n <= 0:
        return None
    order = epoch_order(len(data.x_train), config.seed, 0)
    out = []
    for i in range(n):
        idx = order[(i * config.batch_size) % len(order):][:config.batch_size]
        out.append((data.x_train[idx].to(device), data.y_train[idx].to(device)))
    return out

