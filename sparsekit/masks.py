"""Masks: which weights are prunable, one boolean mask per prunable weight, and keeping masked
weights, their gradients and their optimizer state at exactly zero.

Masks are the truth: a weight can be 0 and still be active. Masking is done in place on the dense
tensors (no mask multiply in the forward pass), so the gradient autograd computes for a masked
entry is the true dense gradient that RigL grows by, and squashing for export is a no-op.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import torch
from torch import nn

from sparsekit.distributions import LayerPlan
from sparsekit.selection import Magnitude, select_top, stream_seed

# Module types whose weight matrices are prunable, and the parameter names inside them.
_RNN_TYPES = (nn.RNN, nn.GRU, nn.LSTM)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying module of a DistributedDataParallel/DataParallel/compiled wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def prunable_weights(model: nn.Module, *, exclude: tuple[str, ...] = (),
                     include_embeddings: bool = False) -> dict[str, nn.Parameter]:
    """Candidate weights in model order, keyed by fully qualified parameter name.

    Linear and Conv weights; the input and recurrent matrices of RNN/GRU/LSTM (each stacked gate
    matrix is one prunable weight); the packed in-projection of MultiheadAttention (its out_proj is a
    Linear). Biases, embeddings and normalisation layers stay dense (``include_embeddings`` adds every
    ``nn.Embedding`` table: ``--sparse-embeddings``). ``exclude`` holds fnmatch patterns.
    """
    model = unwrap_model(model)
    found: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        names: list[str] = []
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            names = ["weight"]
        elif isinstance(module, nn.Embedding) and include_embeddings:
            names = ["weight"]
        elif isinstance(module, _RNN_TYPES):
            names = [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]
        elif isinstance(module, nn.MultiheadAttention):
            names = [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                     if getattr(module, n, None) is not None]
        for n in names:
            full = prefix + n
            param = getattr(module, n)
            if any(fnmatch.fnmatchcase(full, p) for p in exclude):
                continue
            if isinstance(param, nn.Parameter) and param.requires_grad:
                found[full] = param
    return found


_GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}


def gate_block_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """For stacked gate matrices, the shape of one gate block: GRU (3H, in) → (H, in), LSTM (4H, in) →
    (H, in), MultiheadAttention in_proj (3E, E) → (E, E). ER/ERK score these weights by it (see
    ``sparsekit.distributions``); every other weight is scored by its own shape (absent here)."""
    model = unwrap_model(model)
    out: dict[str, tuple[int, ...]] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        gates = next((g for t, g in _GATES.items() if type(module) is t), None)
        if gates is not None and gates > 1:
            for n, p in module.named_parameters(recurse=False):
                if n.startswith("weight_"):
                    out[prefix + n] = (p.shape[0] // gates, *p.shape[1:])
        elif isinstance(module, nn.MultiheadAttention) and getattr(module, "in_proj_weight", None) is not None:
            w = module.in_proj_weight
            out[prefix + "in_proj_weight"] = (w.shape[0] // 3, *w.shape[1:])
    return out


class SparseLayer:
    """One prunable weight under a mask (bool, same shape and device as the weight)."""

    def __init__(self, index: int, name: str, param: nn.Parameter, mask: torch.Tensor, plan: LayerPlan) -> None:
        self.index = index  # position in the prunable list: part of the tie-break key
        self.name = name
        self.param = param
        self.plan = plan
        self.mask = mask

    @property
    def mask(self) -> torch.Tensor:
        return self._mask

    @mask.setter
    def mask(self, value: torch.Tensor) -> None:
        self._mask = value
        self._active: int | None = None

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def active(self) -> int:
        """Active connections (cached until the mask is replaced)."""
        if self._active is None:  # numpy counts bools ~10x faster than torch's sum on CPU
            m = self._mask
            self._active = int(np.count_nonzero(m.numpy())) if m.device.type == "cpu" else int(m.sum())
        return self._active

    @property
    def density(self) -> float:
        return self.active / self.numel


def random_mask(shape: tuple[int, ...], active: int, *, seed: int, layer: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """A mask with exactly ``active`` entries on, uniformly at random from (seed, layer)."""
    numel = 1
    for d in shape:
        numel *= d
    gen = torch.Generator().manual_seed(stream_seed(seed, 0, layer, "init-mask"))
    idx = torch.randperm(numel, generator=gen)[:active]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[idx] = True
    return mask.view(shape).to(device)


def magnitude_mask(weight: torch.Tensor, active: int, *, seed: int, layer: int,
                   first: torch.Tensor | None = None) -> torch.Tensor:
    """A mask with exactly ``active`` entries on: those of largest |w|, ties broken by the (seed, step 0,
    layer, element) key. Entries of ``first`` (the mask the weights were trained under, if known) rank
    before all others, so a weight that is 0 but was active keeps its place over the masked-out zeros."""
    flat = weight.detach().reshape(-1)
    everything = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    prior = everything if first is None else first.reshape(-1).to(device=flat.device, dtype=torch.bool)
    n_prior = int(prior.sum())
    mask = torch.zeros_like(everything)
    if active <= n_prior:
        mask[select_top(Magnitude(flat), prior, active, largest=True, seed=seed, step=0, layer=layer)] = True
    else:  # all of the prior mask, then the largest of the rest
        mask |= prior
        mask[select_top(Magnitude(flat), ~prior, active - n_prior, largest=True, seed=seed, step=0,
                        layer=layer)] = True
    return mask.view(weight.shape)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> list[torch.Tensor]:
    """Per-element optimizer state of ``param`` (momentum buffer, Adam moments, ...)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]


@torch.no_grad()
def commit_mask(layer: SparseLayer, new_mask: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Replace a layer's mask. Dropped and new connections get weight 0 (``--grow-init zero``) and
    optimizer state 0; a connection dropped and regrown in the same update is left as it was."""
    old = layer.mask
    keep = old & new_mask
    layer.param.mul_(keep)
    for state in optimizer_state_tensors(optimizer, layer.param):
        state.mul_(keep)
    layer.mask = new_mask


@torch.no_grad()
def commit_mask_change(layer: SparseLayer, new_mask: torch.Tensor, gone: torch.Tensor, new: torch.Tensor,
                       optimizer: torch.optim.Optimizer | None, float_mask: torch.Tensor | None = None) -> None:
    """``commit_mask`` for a change given by flat indices: ``gone`` (active before, inactive after) and
    ``new`` (inactive before, active after). Touches only those entries instead of whole tensors."""
    for t in [layer.param, *optimizer_state_tensors(optimizer, layer.param)]:
        flat = t.view(-1)
        flat.index_fill_(0, gone, 0)
        flat.index_fill_(0, new, 0)
    if float_mask is not None:
        fm = float_mask.view(-1)
        fm.index_fill_(0, gone, 0)
        fm.index_fill_(0, new, 1)
    active = layer.active - gone.numel() + new.numel()
    layer.mask = new_mask
    layer._active = active
