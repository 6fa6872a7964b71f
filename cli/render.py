"""Rendering helpers shared by commands: JSON on stdout, rich tables and progress on stderr."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sparsekit.training import Callbacks


def make_console(*, stderr: bool = False, quiet: bool = False) -> Console:
    """A rich console; when the stream is not a terminal (a file, a pipe, CI logs) and COLUMNS is unset,
    tables get 160 columns instead of rich's 80 so that they are not squeezed and cut."""
    stream = sys.stderr if stderr else sys.stdout
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    width = None if is_tty or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, quiet=quiet, width=width)


def stderr_console() -> Console:
    return make_console(stderr=True)


def stdout_console() -> Console:
    return make_console()


def print_json(obj: Any) -> None:
    """One JSON document on stdout (NaN/Inf become null so the output is strict JSON)."""

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    sys.stdout.write(json.dumps(clean(obj), indent=2) + "\n")
    sys.stdout.flush()


class TrainProgress:
    """A rich progress bar on stderr: loss, accuracy, sparsity, steps/s."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = stderr_console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=False, disable=not enabled,
        )
        self.task: Any = None
        self.last_epoch: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self._s0 = 0

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def callbacks(self) -> Callbacks:
        return Callbacks(on_start=self._start, on_step=self._step, on_epoch=self._epoch, on_message=self._message)

    def _start(self, info: dict[str, Any]) -> None:
        self._t0, self._s0 = time.perf_counter(), info["start_step"]
        self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["start_step"],
                                           stats="")

    def _stats(self, step: int, loss: float, sparsity: float) -> str:
        rate = (step - self._s0) / max(time.perf_counter() - self._t0, 1e-9)
        acc = self.last_epoch.get("test_accuracy")
        acc_s = f" test acc {acc:.4f}" if acc is not None else ""
        if self.last_epoch.get("test_bpc") is not None:
            acc_s += f" test bpc {self.last_epoch['test_bpc']:.3f}"
        return f"loss {loss:.4f}{acc_s} sparsity {sparsity:.3f} {rate:.0f} steps/s"

    def _step(self, info: dict[str, Any]) -> None:
        if self.task is not None and (info["step"] % 10 == 0 or info["step"] == info["total_steps"]):
            self.progress.update(self.task, completed=info["step"],
                                 stats=self._stats(info["step"], info["loss"], info["sparsity"]),
                                 description=f"epoch {info['epoch']}")

    def _epoch(self, record: dict[str, Any]) -> None:
        self.last_epoch = record

    def _message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"sparsekit run: {summary.get('method')} on {summary.get('model', '?')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    acc = summary.get("test_accuracy")
    lm = summary.get("task") == "language-modeling"
    rows = [
        *([("test bits per character", f"{summary['test_bpc']:.4f}"),
           ("test perplexity", f"{summary['test_perplexity']:.3f}")] if lm and "test_bpc" in summary else []),
        ("next-char accuracy" if lm else "test accuracy", f"{acc:.4f}" if isinstance(acc, float) else str(acc)),
        ("test loss", f"{summary.get('test_loss', float('nan')):.4f}"),
        ("target sparsity", f"{summary['target_sparsity']:.4f}"),
        ("realized sparsity (prunable set)", f"{summary['realized_sparsity']:.4f}"),
        ("overall sparsity (all weights)", f"{summary['overall_sparsity']:.4f}"),
        ("params total / nonzero", f"{summary['params']['total']:,} / {summary['params']['nonzero']:,}"),
        ("train seconds", f"{summary['train_seconds']:.1f}"),
    ]
    inf = summary.get("flops", {}).get("inference")
    if inf:
        rows.append(("inference FLOPs/sample sparse / dense",
                     f"{inf['sparse_flops']:,} / {inf['dense_flops']:,} ({inf['sparse_vs_dense']:.3f}x)"))
    tok = summary.get("flops", {}).get("per_token")
    if tok:
        rows.append(("inference FLOPs/token sparse / dense", f"{tok['sparse_flops']:,.0f} / {tok['dense_flops']:,.0f}"))
    tr = summary.get("flops", {}).get("training")
    if tr and "vs_dense" in tr:
        rows.append(("training FLOPs vs dense", f"{tr['vs_dense']:.3f}x"))
    for k, v in rows:
        table.add_row(k, v)
    return table
