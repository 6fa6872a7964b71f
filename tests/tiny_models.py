"""Tiny models whose FLOPs are computed by hand in more than one test file."""

from __future__ import annotations

import torch
from torch import nn


class TinyGRU(nn.Module):
    """A one-symbol-per-step GRU language model. Per token: W_ih 12×3 = 36, W_hh 12×4 = 48, head 7×4 = 28
    MACs (112 dense)."""

    sequence_model = True

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x.unsqueeze(-1).expand(-1, -1, 3))[0])
