"""Shared fixtures: tiny models and a CLI runner that goes through ``sparsekit.cli.main.main``."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# plans re-measured on load are cached here, never in the user's ~/.cache (per test run)
if "SPARSEKIT_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["SPARSEKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsekit-test-cache-")
# after OMP_NUM_THREADS is set (it imports numpy): the fast runtime's fixtures, for tests/test_runtime_*.py
from runtime_helpers import isa, threading_knobs  # noqa: F401


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(args: list[str]) -> CliResult:
    """Run the CLI in-process exactly as the console script does (exit codes and error lines)."""
    from sparsekit.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli() -> Callable[[list[str]], CliResult]:
    return run_cli


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
