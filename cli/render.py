"""Rendering helpers shared by commands: JSON on stdout, rich tables on stderr (progress: ``progress.py``)."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table


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


def quiet_option(what: str = "Print nothing but errors (and --json output).") -> Any:
    """The -q/--quiet flag: every command that prints more than its answer takes it."""
    return typer.Option(False, "--quiet", "-q", help=what, show_default="off")


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
