"""Fault injection for tests (``SPARSEKIT_FAULT``), never set in normal use.

Faults are ordinary training callbacks (``sparsekit.training.Callbacks``) that the ``sparsekit train``
command installs when the variable is set, so the training loop has no fault-specific code and the
subprocess tests (kill -9, SIGTERM, a stuck rank under torchrun) drive the real command.

Comma-separated ``KIND@STEP`` or ``KIND@STEP/RANK`` items: ``kill`` (SIGKILL itself when step STEP
begins), ``kill-in-save`` (SIGKILL after the checkpoint of step >= STEP is written to its temporary
file, before the rename), ``sigterm`` (send itself SIGTERM), ``nan`` (the loss of that step becomes
NaN), ``hang`` (sleep forever, a stuck rank). Faults fire only on torchrun's first attempt
(``TORCHELASTIC_RESTART_COUNT`` unset or 0), so ``--max-restarts`` can show recovery.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsekit.errors import InputError
from sparsekit.training import Callbacks, TrainingRun

ENV = "SPARSEKIT_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None  # None: every rank

    def applies(self, run: TrainingRun, kind: str) -> bool:
        return self.kind == kind and (self.rank is None or self.rank == run.ctx.rank)


def parse(spec: str) -> list[Fault]:
    """``KIND@STEP[/RANK],...`` → faults; a malformed item is an InputError naming the variable."""
    faults = []
    for part in spec.split(","):
        kind, _, rest = part.strip().partition("@")
        step_s, _, rank_s = rest.partition("/")
        try:
            faults.append(Fault(kind, int(step_s), int(rank_s) if rank_s else None))
        except ValueError as exc:
            raise InputError(f"malformed {ENV} item {part!r}", where=ENV,
                             fix="write KIND@STEP[/RANK], e.g. kill@12; or unset it") from exc
    return faults


def from_env() -> Callbacks | None:
    """The callbacks of ``SPARSEKIT_FAULT``, or None when it is unset or torchrun is on a restart."""
    spec = os.environ.get(ENV, "").strip()
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return None
    return FaultInjector(parse(spec)).callbacks()


class FaultInjector:
    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults

    def callbacks(self) -> Callbacks:
        return Callbacks(on_step_begin=self.at_step, on_loss=self.corrupt_loss, before_commit=self.before_commit)

    def at_step(self, run: TrainingRun, step: int) -> None:
        for fault in self.faults:
            if fault.step != step:
                continue
            if fault.applies(run, "kill"):
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault.applies(run, "sigterm"):
                os.kill(os.getpid(), signal.SIGTERM)
            elif fault.applies(run, "hang"):  # stuck, but dies on torchrun's SIGTERM (no 30 s grace in tests)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                while True:
                    time.sleep(60)

    def corrupt_loss(self, run: TrainingRun, step: int, loss: torch.Tensor) -> torch.Tensor | None:
        if any(f.applies(run, "nan") and f.step == step for f in self.faults):
            return loss * float("nan")
        return None

    def before_commit(self, run: TrainingRun, step: int, tmp: Path) -> None:
        if any(f.applies(run, "kill-in-save") and step >= f.step for f in self.faults):
            os.kill(os.getpid(), signal.SIGKILL)
