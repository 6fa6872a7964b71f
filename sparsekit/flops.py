"""Parameter, nonzero and FLOP counting (DESIGN.md §4).

A MAC is one multiply-accumulate; FLOPs = 2 × MACs, counted over weight matmuls and convolutions
only (what ``torch.utils.flop_counter`` counts). Inference: a Linear layer costs its active weights
per sample; a conv costs its active kernel weights × output positions. Every key names its unit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsekit.masks import unwrap_model


@torch.no_grad()
def weight_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """For each Linear/Conv weight, how many times per sample each weight entry is used
    (1 for Linear on a vector, output positions for conv, sequence positions for per-token layers)."""
    model = unwrap_model(model)
    uses: dict[str, int] = {}
    hooks = []
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            key = f"{mod_name}.weight" if mod_name else "weight"

            def hook(mod: nn.Module, inp: Any, out: torch.Tensor, key: str = key) -> None:
                if isinstance(mod, nn.Linear):
                    uses[key] = uses.get(key, 0) + out.numel() // out.shape[-1]
                else:
                    uses[key] = uses.get(key, 0) + out[0, 0].numel()

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return uses


def inference_macs(layers: list[dict[str, Any]], positions: dict[str, int]) -> dict[str, Any]:
    """Per-layer and total inference MACs/FLOPs per sample, dense vs sparse."""
    per_layer = []
    dense_total = sparse_total = 0
    for ly in layers:
        pos = positions.get(ly["name"])
        if pos is None:
            continue
        dense = ly["numel"] * pos
        sparse = ly["active"] * pos
        dense_total += dense
        sparse_total += sparse
        per_layer.append({"name": ly["name"], "dense_macs": dense, "sparse_macs": sparse})
    return {
        "layers": per_layer,
        "dense_macs": dense_total,
        "sparse_macs": sparse_total,
        "dense_flops": 2 * dense_total,
        "sparse_flops": 2 * sparse_total,
        "sparse_vs_dense": (sparse_total / dense_total) if dense_total else 1.0,
    }


def run_flops(model: nn.Module, sparsifier: Any, *, input_shape: tuple[int, ...], config: Any = None) -> dict[str, Any]:
    """FLOP counts for a finished run's summary (inference per sample; training added by methods)."""
    layers = sparsifier.layer_summary()
    return {"unit_note": "macs = multiply-accumulates per sample; flops = 2 x macs",
            "inference": inference_macs(layers, weight_positions(model, input_shape))}
