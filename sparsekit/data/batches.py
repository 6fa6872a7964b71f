"""Training batches: the samples of each step, their augmentation, and DataLoader workers.

Step ``t``'s batch is a function of (seed, t) only: the samples come from the shuffle of its epoch
(``epoch_order``), the augmentation from a generator seeded by (seed, t). So a resumed run draws exactly
the batches an uninterrupted one would, and ``--workers N`` (batches built in N background processes by a
torch ``DataLoader``) trains bit-identically to ``--workers 0``: workers only change *where* a batch is
built, never what it holds.

Augmentation ``crop-flip`` is the standard CIFAR recipe (used by the RigL paper): pad each image by 4 pixels
with zeros (the training mean, as inputs are normalised), take a random 32×32 (H×W) crop, and flip it
horizontally with probability 1/2. It applies to training batches only, never to evaluation.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparsekit import errors
from sparsekit.distributed import DistContext, local_slice
from sparsekit.selection import stream_seed

AUGMENTS = ("none", "crop-flip")
CROP_PADDING = 4

#: What one step's batch is: (step, inputs, labels, size of the global batch).
Batch = tuple[int, torch.Tensor, torch.Tensor, int]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of epoch ``epoch``: a function of (seed, epoch) only, so resume needs no RNG state."""
    gen = torch.Generator().manual_seed(stream_seed(seed, epoch, -1, "shuffle"))
    return torch.randperm(n, generator=gen)


def crop_flip_params(seed: int, step: int, n: int, height: int, width: int,
                     padding: int = CROP_PADDING) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row offsets, column offsets, flips) of the ``n`` images of step ``step``'s global batch."""
    gen = torch.Generator().manual_seed(stream_seed(seed, step, -1, "augment"))
    rows = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    cols = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    flips = torch.randint(0, 2, (n,), generator=gen).bool()
    return rows, cols, flips


def crop_flip(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flips: torch.Tensor,
              padding: int = CROP_PADDING) -> torch.Tensor:
    """Images N×C×H×W zero-padded by ``padding``, cropped back to H×W at (rows, cols), flipped where ``flips``."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    r = rows[:, None] + torch.arange(h)
    k = cols[:, None] + torch.arange(w)
    k = torch.where(flips[:, None], k.flip(1), k)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  r[:, None, :, None], k[:, None, None, :]]


@dataclass(frozen=True)
class BatchPlan:
    """What decides a step's batch: the split size, batch size, epoch length, seed, augmentation, and this
    process's share of the global batch under torchrun."""

    n_train: int
    batch_size: int
    steps_per_epoch: int
    seed: int
    augment: str = "none"
    rank: int = 0
    world_size: int = 1


class StepBatches(torch.utils.data.Dataset):
    """``batches[t]``: step ``t``'s batch (on the CPU) from the training inputs ``x`` (a tensor or a lazy
    source) and labels ``y``; a map-style dataset over step numbers, so a DataLoader can build batches."""

    def __init__(self, x: Any, y: torch.Tensor, plan: BatchPlan) -> None:
        self.x, self.y, self.plan = x, y, plan
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:  # steps are numbered from 1; the loader is given explicit step numbers
        return 0

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.plan.n_train, self.plan.seed, epoch))
        return self._order[1]

    def __getitem__(self, step: int) -> Batch:
        plan = self.plan
        epoch, batch_idx = divmod(step - 1, plan.steps_per_epoch)
        idx = self.order(epoch)[batch_idx * plan.batch_size:(batch_idx + 1) * plan.batch_size]
        n_global = len(idx)
        share = local_slice(n_global, DistContext(rank=plan.rank, world_size=plan.world_size))
        idx = idx[share]
        xb = self.x[idx]
        if plan.augment == "crop-flip" and len(idx):
            rows, cols, flips = crop_flip_params(plan.seed, step, n_global, xb.shape[2], xb.shape[3])
            xb = crop_flip(xb, rows[share], cols[share], flips[share])
        return step, xb, self.y[idx], n_global


class _CaughtErrors(torch.utils.data.Dataset):
    """In a worker process: a sparsekit error (a corrupt image, say) comes back as a value to re-raise as
    itself in the main process, not as a worker traceback."""

    def __init__(self, batches: StepBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return 0

    def __getitem__(self, step: int) -> Any:
        try:
            return self.batches[step]
        except errors.SparsekitError as exc:
            return ("error", type(exc).__name__, exc.what, exc.where, exc.fix)


def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: workers ignore it and the main process
    checkpoints at the next step, as without workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batch_stream(batches: StepBatches, steps: range, workers: int) -> Iterator[Batch]:
    """The batches of ``steps`` in order: built here (``workers`` 0) or by a DataLoader with ``workers``
    background processes (the same batches, prefetched)."""
    if workers == 0:
        for step in steps:
            yield batches[step]
        return
    # its own generator: the loader's worker seeds must not draw from (and so move) the global torch RNG,
    # which the checkpoint saves
    loader = torch.utils.data.DataLoader(_CaughtErrors(batches), batch_size=None, sampler=steps, num_workers=workers,
                                         worker_init_fn=_ignore_sigint, generator=torch.Generator().manual_seed(0))
    for item in loader:
        if item[0] == "error":
            _, name, what, where, fix = item
            raise getattr(errors, name, errors.SparsekitError)(what, where=where, fix=fix)
        yield item


def check_augment(augment: str | None, data: Any) -> None:
    """``crop-flip`` needs images (N×C×H×W inputs); tables and text take no augmentation."""
    if augment == "crop-flip" and (data.kind != "image" or len(data.input_shape) != 3):
        raise errors.InputError(f"--augment crop-flip applies to image data, not {data.kind} data ({data.spec})",
                                where="--augment", fix="drop --augment or use --augment none")
