"""Training progress on stderr: a rich bar on a terminal, plain lines for logs (CI, batch jobs), or nothing.

``make_progress(mode, quiet=...)`` picks one; all three take the loop's events through ``callbacks()`` and
``finish(summary)``. The final accuracy shown is always the summary's (the value written to summary.json),
never an epoch's record: one source of truth.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sparsekit.cli.render import stderr_console

from sparsekit.training import Callbacks

#: plain mode: a line at least this often (seconds), and at every tenth of the run
PLAIN_EVERY_SECONDS = 10.0
PLAIN_MARKS = 10


class ProgressMode(str, Enum):
    """``--progress``: auto is bar when stderr is a terminal, plain otherwise."""

    auto = "auto"
    bar = "bar"
    plain = "plain"
    none = "none"


def resolve_mode(mode: ProgressMode | str, *, quiet: bool, stream: TextIO | None = None) -> str:
    """The renderer to use: -q means none; auto is bar on a terminal and plain otherwise."""
    mode = ProgressMode(mode).value
    if quiet:
        return "none"
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "plain"


def _final_stats(summary: dict[str, Any]) -> str:
    """The final test metrics, read from the summary only (the keys it has)."""
    formats = {"test_bpc": "test bpc {:.3f}", "test_accuracy": "test acc {:.4f}",
               "realized_sparsity": "sparsity {:.3f}", "train_seconds": "({:.1f} s)"}
    return " ".join(fmt.format(summary[k]) for k, fmt in formats.items() if summary.get(k) is not None)


def _epoch_stats(record: dict[str, Any]) -> str:
    bpc = f" test bpc {record['test_bpc']:.3f}" if record.get("test_bpc") is not None else ""
    return f"test loss {record['test_loss']:.4f}{bpc} test acc {record['test_accuracy']:.4f}"


def _clock(seconds: float) -> str:
    s = max(round(seconds), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Reporter:
    """What every renderer offers: the loop's callbacks, a context, and ``finish(summary)``."""

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def callbacks(self) -> Callbacks:
        return Callbacks()

    def finish(self, summary: dict[str, Any]) -> None:
        """Show the run's final metrics, taken from ``summary`` (summary.json's values)."""


class PlainProgress(Reporter):
    """One line per event worth logging: at least every ``every_seconds``, at every tenth of the run, at each
    epoch end, and a last line from the summary. Lines start with the run directory's name."""

    def __init__(self, stream: TextIO | None = None, *, every_seconds: float = PLAIN_EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.every, self.clock = every_seconds, clock
        self.label, self.total, self.epochs = "train", 0, 0
        self.t0 = self.last_line = 0.0
        self.s0, self.samples, self.next_mark = 0, 0, 0
        self.last_step: dict[str, Any] = {}

    def callbacks(self) -> Callbacks:
        return Callbacks(on_start=self._start, on_step=self._step, on_epoch=self._epoch, on_message=self._print)

    def _print(self, text: str) -> None:
        print(f"{self.label}: {text}", file=self.stream, flush=True)

    def _start(self, info: dict[str, Any]) -> None:
        self.label = Path(info["run_dir"]).name
        self.total, self.epochs, self.s0 = info["total_steps"], info["epochs"], info["start_step"]
        self.t0 = self.last_line = self.clock()
        self.samples, self.next_mark = 0, self._mark_after(self.s0)
        self._print(f"{self.total} steps, {self.epochs} epoch(s) of {info['steps_per_epoch']} steps"
                    + (f", resuming at step {self.s0}" if self.s0 else ""))

    def _mark_after(self, step: int) -> int:
        """The first tenth-of-the-run boundary after ``step``."""
        for k in range(1, PLAIN_MARKS + 1):
            mark = -(-self.total * k // PLAIN_MARKS)
            if mark > step:
                return mark
        return self.total + 1

    def _step(self, info: dict[str, Any]) -> None:
        self.samples += info.get("samples", 0)
        self.last_step = info
        step, now = info["step"], self.clock()
        if step >= self.next_mark or now - self.last_line >= self.every:
            self.next_mark = self._mark_after(step)
            self.last_line = now
            self._print(self._step_line(info, now))

    def _step_line(self, info: dict[str, Any], now: float) -> str:
        step, elapsed = info["step"], max(now - self.t0, 1e-9)
        done = step - self.s0
        eta = (self.total - step) * elapsed / done if done else 0.0
        return (f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) epoch {info['epoch']}/"
                f"{self.epochs} loss {info['loss']:.4f} sparsity {info['sparsity']:.3f} "
                f"{self.samples / elapsed:.0f} samples/s ETA {_clock(eta)}")

    def _epoch(self, record: dict[str, Any]) -> None:
        self.last_line = self.clock()
        self._print(f"epoch {record['epoch']}/{self.epochs} done at step {record['step']}/{self.total}: "
                    f"train loss {record['train_loss']:.4f} {_epoch_stats(record)} "
                    f"sparsity {record['sparsity']:.3f} ({record['seconds']:.1f} s)")

    def finish(self, summary: dict[str, Any]) -> None:
        self._print(f"done: {_final_stats(summary)}")


class BarProgress(Reporter):
    """A rich progress bar: loss, the last test accuracy, sparsity, samples/s; refreshed at each epoch end and
    set from the summary by ``finish``."""

    def __init__(self) -> None:
        self.console = stderr_console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.task: Any = None
        self.label = "train"
        self.test = ""
        self.last_step: dict[str, Any] = {}
        self._t0, self._samples = time.perf_counter(), 0

    def __enter__(self) -> BarProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def callbacks(self) -> Callbacks:
        return Callbacks(on_start=self._start, on_step=self._step, on_epoch=self._epoch, on_message=self._message)

    def _start(self, info: dict[str, Any]) -> None:
        self._t0, self._samples, self.test = time.perf_counter(), 0, ""
        self.label = Path(info["run_dir"]).name
        self.task = self.progress.add_task(self.label, total=info["total_steps"], completed=info["start_step"],
                                           stats="")

    def _stats(self) -> str:
        info = self.last_step
        if not info:
            return self.test
        rate = self._samples / max(time.perf_counter() - self._t0, 1e-9)
        parts = [f"loss {info['loss']:.4f}", self.test, f"sparsity {info['sparsity']:.3f}", f"{rate:.0f} samples/s"]
        return " ".join(p for p in parts if p)

    def _refresh(self, **fields: Any) -> None:
        if self.task is not None:
            self.progress.update(self.task, stats=self._stats(), **fields)

    def _step(self, info: dict[str, Any]) -> None:
        self._samples += info.get("samples", 0)
        self.last_step = info
        if info["step"] % 10 == 0 or info["step"] == info["total_steps"]:
            self._refresh(completed=info["step"], description=f"{self.label} epoch {info['epoch']}")

    def _epoch(self, record: dict[str, Any]) -> None:
        self.test = _epoch_stats(record)
        self._refresh()

    def _message(self, text: str) -> None:
        self.console.print(text)

    def finish(self, summary: dict[str, Any]) -> None:
        self.test = _final_stats({k: summary.get(k) for k in ("test_bpc", "test_accuracy")})
        self._refresh()


def make_progress(mode: ProgressMode | str, *, quiet: bool = False) -> Reporter:
    """The renderer for ``--progress MODE`` (``quiet`` wins: no progress at all)."""
    chosen = resolve_mode(mode, quiet=quiet)
    if chosen == "bar":
        return BarProgress()
    if chosen == "plain":
        return PlainProgress()
    return Reporter()
