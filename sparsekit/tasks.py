"""Tasks: what the training loop optimises and reports, so the loop itself stays task-agnostic.

- ``classification``: outputs (N, C), labels (N,); loss = mean cross-entropy; accuracy = top-1.
- ``language-modeling``: outputs (N, T, V) next-symbol logits, targets (N, T); loss = mean
  cross-entropy per symbol (nats); accuracy = next-symbol top-1 over every position; reported extras
  are bits per character ``bpc = loss / ln 2`` and perplexity ``exp(loss)`` (per symbol: per byte
  with the byte vocabulary, which is what "bits per character" means in the char-LM literature).

``correct`` returns counts in *sample* units (for LM: the fraction of a window's positions that are
right, summed over windows), so ``sum(correct) / samples`` is accuracy for both tasks; with windows of
equal length the per-sample mean loss is also the per-symbol mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparsekit.errors import InputError


@dataclass(frozen=True)
class Task:
    name: str

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch (per symbol for LM)."""
        if out.dim() == 3:
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.cross_entropy(out, y)

    def loss_sum(self, out: torch.Tensor, y: torch.Tensor) -> float:
        """Sum over samples of each sample's mean loss."""
        if out.dim() == 3:
            per = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
            return float(per) / out.shape[1]
        return float(F.cross_entropy(out, y, reduction="sum"))

    def correct(self, out: torch.Tensor, y: torch.Tensor) -> float | int:
        """Correct predictions in sample units (LM: the correct fraction of each window, summed)."""
        if out.dim() == 3:
            return float((out.argmax(-1) == y).float().mean(1).sum())
        return int((out.argmax(1) == y).sum())

    def eval_batch_size(self, requested: int, x: torch.Tensor) -> int:
        """Evaluation batch: LM logits are (batch, T, vocab), so cap the batch at ~32k tokens (~32 MB of
        fp32 logits at vocabulary 256) whatever ``--eval-batch-size`` says."""
        if self.name != LANGUAGE_MODELING or x.dim() < 2:
            return requested
        return max(1, min(requested, EVAL_TOKENS // max(1, x.shape[1])))

    def extra_metrics(self, loss: float | None, prefix: str = "test") -> dict[str, float]:
        """Metrics derived from the mean loss: bits per character and perplexity for LM."""
        if self.name != LANGUAGE_MODELING or loss is None or not math.isfinite(loss):
            return {}
        return {f"{prefix}_bpc": loss / math.log(2), f"{prefix}_perplexity": math.exp(min(loss, 700.0))}


CLASSIFICATION = "classification"
EVAL_TOKENS = 32768
LANGUAGE_MODELING = "language-modeling"
TASKS = {name: Task(name) for name in (CLASSIFICATION, LANGUAGE_MODELING)}


def get_task(name: str | None) -> Task:
    if name is None:
        return TASKS[CLASSIFICATION]
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}", where="dataset", fix=f"one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of(data: Any) -> Task:
    """The task of a loaded :class:`~sparsekit.data.Dataset`."""
    return get_task(getattr(data, "task", None))
