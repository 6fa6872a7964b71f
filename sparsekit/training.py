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
from torch import nn

from sparsekit import distributed as dist
from sparsekit import rundir as rd
from sparsekit.checkpoint import load_checkpoint, restore, save_checkpoint
from sparsekit.config import TrainConfig
from sparsekit.errors import InputError, TrainingError
from sparsekit.schedules import LRSchedule
from sparsekit.selection import stream_seed
from sparsekit.settings import SparsitySettings
from sparsekit.sparsifier import Sparsifier
from sparsekit.tasks import CLASSIFICATION, TASKS, Task, task_of


@dataclass
class Callbacks:
    """Events of a run; every field is optional. The CLI uses these for the progress bar."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    on_message: Callable[[str], None] | None = None
    #: Called on every rank (also under torchrun) after the run, with the final model and sparsifier.
    on_end: Callable[[dict[str, Any]], None] | None = None
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
          callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Train one run and return its summary (also written to ``run_dir/summary.json``).

    Under torchrun (``WORLD_SIZE`` > 1) this joins the process group and trains with
    DistributedDataParallel; only rank 0 writes the run directory and emits progress events (``on_end``
    fires on every rank). See ``sparsekit.distributed``.
    """
    import torch.distributed as torch_dist

    cb = callbacks or Callbacks()
    config.validate()
    run_dir = Path(run_dir)
    created_group = not (torch_dist.is_available() and torch_dist.is_initialized())
    ctx = dist.setup(config.device, config.dist_timeout)
    threads_before = torch.get_num_threads()
    try:
        summary = _train(config, run_dir, resume=resume, overwrite=overwrite, cb=cb, ctx=ctx)
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


def _train(config: TrainConfig, run_dir: Path, *, resume: bool, overwrite: bool, cb: Callbacks,
           ctx: dist.DistContext) -> dict[str, Any]:
    from sparsekit.data import load_dataset
    from sparsekit.methods import make_method

    main = ctx.is_main
    faults = _Faults.from_env(ctx.rank)

    def emit(name: str, payload: Any) -> None:
        if main:
            cb.emit(name, payload)

    # fail fast, before loading data; under torchrun rank 0 decides and every rank raises its error
    dist.on_main(lambda: rd.check_run_dir(run_dir, resume=resume, overwrite=overwrite), ctx)
    device = ctx.device if ctx.enabled and ctx.device is not None else resolve_device(config.device)
    t_start = time.perf_counter()

    data = load_dataset(config.data, seed=config.seed, val_fraction=config.val_fraction,
                        label_column=config.label_column, image_size=config.image_size, channels=config.channels,
                        seq_len=config.seq_len, vocab=config.vocab)
    task = task_of(data)
    method = make_method(config.method, **config.method_options)
    model, width_info = rd.build_run_model(config, data, method)
    model.to(device)
    if device.type == "cpu":
        torch.set_num_threads(choose_threads(config, model, tuple(data.input_shape), device, ctx))
    n_train = len(data.x_train)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_epochs = max(1, round(config.epochs * config.train_multiplier))
    total_steps = steps_per_epoch * total_epochs
    if config.steps is not None:  # a step budget (LM recipes) instead of whole epochs
        total_steps = max(1, round(config.steps * config.train_multiplier))
        total_epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = make_optimizer(config, list(model.parameters()))
    schedule = LRSchedule(config.lr, total_steps, config.lr_schedule,
                          warmup_steps=round(config.warmup_epochs * config.train_multiplier * steps_per_epoch))
    init_batches = _init_batches(data, config, device, method.init_batch_count())
    sp = Sparsifier(model, optimizer, method, SparsitySettings.from_config(config, total_steps),
                    init_batches=init_batches, loss_fn=task.loss)  # masks broadcast from rank 0
    if config.init_from:
        rd.init_from_run(config.init_from, model, sp)
    # Everything the command asked for is valid: only now is the run directory created or replaced.
    prepared = dist.on_main(lambda: rd.prepare_run_dir(run_dir, config, resume=resume, overwrite=overwrite), ctx)
    checkpoint_name = dist.broadcast_json(None if prepared is None else str(prepared), ctx)
    checkpoint = None if checkpoint_name is None else Path(checkpoint_name)

    state: dict[str, Any] = {"epoch_loss_sum": 0.0, "epoch_correct": 0, "epoch_seen": 0, "train_seconds": 0.0,
                             "skipped_batches": 0}
    if checkpoint is not None:
        tensors, meta = load_checkpoint(checkpoint)  # every rank reads it (shared filesystem)
        sp.load_state_dict(restore(tensors, meta, model=model, optimizer=optimizer))
        state.update(meta["state"])
        dist.on_main(lambda: rd.truncate_logs(run_dir, step=sp.step_count), ctx)
        emit("on_message", f"resumed from {checkpoint} at step {sp.step_count}/{total_steps}")
    else:
        dist.on_main(lambda: rd.write_updates(run_dir, sp.update_log), ctx)
    sp.update_log.clear()

    fwd: nn.Module = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if dist.debug_masks_enabled():
            dist.verify_same(sp.masks(), ctx, what="masks", step=sp.step_count)

            def _check(s: Any, step: int) -> None:
                dist.verify_same(s.masks(), ctx, what="masks", step=step)
                dist.verify_same({ly.name: ly.param for ly in s.layers}, ctx, what="weights", step=step)

            sp.on_update.append(_check)

    x_train, y_train = data.x_train, data.y_train
    emit("on_start", {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "epochs": total_epochs,
                      "start_step": sp.step_count, "run_dir": str(run_dir), "world_size": ctx.world_size})

    def save(step_state: dict[str, Any], step: int) -> None:
        before_commit = faults.before_commit(step)

        def write() -> None:
            try:
                save_checkpoint(run_dir / rd.CHECKPOINT, model=model, optimizer=optimizer,
                                sparsifier_state=sp.state_dict(), state=step_state, before_commit=before_commit)
            except InputError as exc:  # disk full, permissions: the run stops, the old checkpoint stays
                raise TrainingError(f"could not save the checkpoint at step {step}: {exc.what}",
                                    where=str(run_dir / rd.CHECKPOINT),
                                    fix="free disk space or fix permissions, then rerun the same command with "
                                        "--resume; the previous checkpoint was kept") from exc

        dist.on_main(write, ctx)

    model.train()
    seconds_before = float(state["train_seconds"])
    t_loop = time.perf_counter()
    order, order_epoch = torch.empty(0, dtype=torch.long), -1
    with _StopFlag() as stop:
        while sp.step_count < total_steps:
            step = sp.step_count + 1
            faults.at_step(step)
            epoch, batch_idx = divmod(step - 1, steps_per_epoch)
            if order_epoch != epoch:
                order, order_epoch = epoch_order(n_train, config.seed, epoch), epoch
            idx = order[batch_idx * config.batch_size:(batch_idx + 1) * config.batch_size]
            n_global = len(idx)
            if ctx.enabled:
                idx = idx[dist.local_slice(n_global, ctx)]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            lr = schedule.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = fwd(xb)
            loss = task.loss(out, yb) if len(idx) else out.sum() * 0.0
            loss = faults.corrupt_loss(step, loss)
            loss_value = float(loss.detach())
            correct = task.correct(out, yb)
            loss_sum = loss_value * len(idx)
            stopping = stop.signal is not None
            if ctx.enabled:  # one all-reduce: global loss/accuracy, and any rank's stop request
                loss_sum, g_correct, _, g_stop = dist.all_reduce_sum(
                    [loss_sum, float(correct), float(len(idx)), float(stopping)], ctx)
                correct, stopping = int(g_correct), g_stop > 0
                loss_value = loss_sum / max(n_global, 1)
            if not math.isfinite(loss_value):
                if config.nan_policy == "skip-batch":
                    optimizer.zero_grad(set_to_none=True)
                    state["skipped_batches"] += 1
                    sp.step_count += 1  # the step is consumed (schedules stay aligned), weights unchanged
                    continue
                raise TrainingError(f"loss became {loss_value} at step {step} (epoch {epoch + 1})",
                                    where=str(run_dir),
                                    fix="lower --lr, add --clip-grad, or use --nan-policy skip-batch; "
                                        "the last good checkpoint was kept")
            if ctx.enabled:
                with dist.guard(f"the gradient all-reduce of step {step}"):
                    (loss * dist.loss_weight(len(idx), n_global, ctx)).backward()
            else:
                loss.backward()
            take = sp.pre_step()
            if config.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            if take:
                optimizer.step()
            sp.post_step()
            optimizer.zero_grad(set_to_none=True)
            state["epoch_loss_sum"] += loss_sum
            state["epoch_correct"] += correct
            state["epoch_seen"] += n_global
            if sp.update_log:
                log = list(sp.update_log)
                dist.on_main(lambda log=log: rd.write_updates(run_dir, log), ctx)
                sp.update_log.clear()
            emit("on_step", {"step": step, "total_steps": total_steps, "loss": loss_value, "lr": lr,
                             "sparsity": sp.realized_sparsity(), "epoch": epoch + 1})
            end_of_epoch = batch_idx == steps_per_epoch - 1
            if end_of_epoch:
                test_loss, test_acc = _evaluate(model, data.x_test, data.y_test, config.eval_batch_size, device, ctx,
                                                task)
                seen = max(state["epoch_seen"], 1)
                elapsed = seconds_before + time.perf_counter() - t_loop
                record = {"epoch": epoch + 1, "step": step, "train_loss": state["epoch_loss_sum"] / seen,
                          "train_accuracy": state["epoch_correct"] / seen, "test_loss": test_loss,
                          "test_accuracy": test_acc, **task.extra_metrics(test_loss),
                          "sparsity": sp.realized_sparsity(), "lr": lr, "seconds": elapsed}
                state.update(epoch_loss_sum=0.0, epoch_correct=0, epoch_seen=0)
                dist.on_main(lambda record=record: rd.append_metrics(run_dir, record), ctx)
                emit("on_epoch", record)
            due = end_of_epoch or (config.checkpoint_every and step % config.checkpoint_every == 0)
            if due or stopping:
                state["train_seconds"] = seconds_before + time.perf_counter() - t_loop
                save(state, step)
            if stopping:
                what = f"signal {stop.signal}" if stop.signal is not None else "a signal on another rank"
                raise TrainingError(f"interrupted by {what} at step {step}; checkpoint saved", where=str(run_dir),
                                    fix="run the same command with --resume to continue from the checkpoint")
    state["train_seconds"] = seconds_before + time.perf_counter() - t_loop
    test_loss, test_acc = _evaluate(model, data.x_test, data.y_test, config.eval_batch_size, device, ctx, task)

    def finish() -> dict[str, Any]:
        summary = rd.finish_run(run_dir, config=config, model=model, sparsifier=sp, data=data,
                                test_loss=test_loss, test_accuracy=test_acc, train_seconds=state["train_seconds"],
                                total_steps=total_steps, width_info=width_info,
                                wall_seconds=time.perf_counter() - t_start, device=device,
                                world_size=ctx.world_size)
        return summary

    summary = dist.on_main(finish, ctx)
    save(state, sp.step_count)
    summary = dist.broadcast_json(summary, ctx)
    if cb.on_end is not None:
        cb.on_end({"model": model, "sparsifier": sp, "rank": ctx.rank, "world_size": ctx.world_size})
    return summary


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
              ctx: dist.DistContext, task: Task = TASKS[CLASSIFICATION]) -> tuple[float, float]:
    """``evaluate`` over the whole split; under torchrun each rank takes a shard and the sums are reduced."""
    if not ctx.enabled:
        return evaluate(model, x, y, batch_size, device, task)
    sl = dist.local_slice(len(x), ctx)
    xs, ys = x[sl], y[sl]
    n = len(xs)
    loss, acc = evaluate(model, xs, ys, batch_size, device, task) if n else (0.0, 0.0)
    total_loss, correct = dist.all_reduce_sum([loss * n, acc * n], ctx)
    m = max(len(x), 1)
    return total_loss / m, round(correct) / m


class _Faults:
    """Fault injection for tests (``SPARSEKIT_FAULT``), never set in normal use.

    Comma-separated ``KIND@STEP`` or ``KIND@STEP/RANK`` items: ``kill`` (SIGKILL itself when step STEP
    begins), ``kill-in-save`` (SIGKILL after the checkpoint of step >= STEP is written to its temporary
    file, before the rename), ``sigterm`` (send itself SIGTERM), ``nan`` (the loss of that step becomes
    NaN), ``hang`` (sleep forever, a stuck rank). Faults fire only on torchrun's first attempt
    (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so ``--max-restarts`` can show recovery.
    """

    ENV = "SPARSEKIT_FAULT"

    def __init__(self, items: list[tuple[str, int]]) -> None:
        self.items = items

    @classmethod
    def from_env(cls, rank: int) -> _Faults:
        import os

        spec = os.environ.get(cls.ENV, "").strip()
        if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
            return cls([])
        items = []
        for part in spec.split(","):
            kind, _, rest = part.strip().partition("@")
            step_s, _, rank_s = rest.partition("/")
            try:
                step_n = int(step_s)
                if rank_s and int(rank_s) != rank:
                    continue
            except ValueError as exc:
                raise InputError(f"malformed {cls.ENV} item {part!r}", where=cls.ENV,
                                 fix="write KIND@STEP[/RANK], e.g. kill@12; or unset it") from exc
            items.append((kind, step_n))
        return cls(items)

    def at_step(self, step: int) -> None:
        import os

        for kind, at in self.items:
            if at != step:
                continue
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif kind == "hang":  # stuck, but dies on torchrun's SIGTERM (no 30 s grace period in tests)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                while True:
                    time.sleep(60)

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if any(kind == "nan" and at == step for kind, at in self.items):
            return loss * float("nan")
        return loss

    def before_commit(self, step: int) -> Callable[[Path], None] | None:
        import os

        if any(kind == "kill-in-save" and step >= at for kind, at in self.items):
            return lambda tmp: os.kill(os.getpid(), signal.SIGKILL)
        return None


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

