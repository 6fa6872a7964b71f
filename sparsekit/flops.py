"""Parameter, nonzero and FLOP counting (docs/counting.md).

A MAC is one multiply-accumulate; FLOPs = 2 × MACs, counted over weight matmuls and convolutions
only (what ``torch.utils.flop_counter`` counts). Inference: a Linear layer costs its active weights
per sample; a conv costs its active kernel weights × output positions. Every key names its unit.

Sequence models (convention: *per token*, one symbol of a window): every weight matrix applied at
each position costs its active entries once per token — Linear layers on (N, T, F), the GRU/LSTM
input and recurrent matrices ``weight_ih_l*``/``weight_hh_l*`` (all gates of the stacked matrix; the
recurrent matmul is counted at t = 0 too, as the kernels compute it), the attention ``in_proj_weight``
(self-attention: q, k and v of every token) and ``out_proj``. Per sample (one window of T tokens)
is T × per token; summaries give both. Gate nonlinearities, elementwise gate products and the
attention score/value matmuls (2·T·d MACs per token per attention layer, dense, unaffected by weight
sparsity) are not weight matmuls: the latter are reported separately as ``attention_macs``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparsekit.masks import unwrap_model
from sparsekit.methods import Method


@torch.no_grad()
def weight_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """For each Linear/Conv weight, how many times per sample each weight entry is used
    (1 for Linear on a vector, output positions for conv, sequence positions for per-token layers)."""
    model = unwrap_model(model)
    uses: dict[str, int] = {}
    hooks = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (nn.RNN, nn.GRU, nn.LSTM)):
            names = [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]

            def rnn_hook(mod: nn.Module, inp: Any, out: Any, names: list[str] = names, prefix: str = prefix) -> None:
                x = inp[0]
                tokens = x.numel() // x.shape[-1]  # N·T time steps (each runs every layer and direction)
                for n in names:
                    uses[prefix + n] = uses.get(prefix + n, 0) + tokens

            hooks.append(module.register_forward_hook(rnn_hook))
        elif isinstance(module, nn.MultiheadAttention):
            # F.multi_head_attention_forward uses out_proj.weight directly (no Linear hook fires).
            names = [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                     if getattr(module, n, None) is not None] + ["out_proj.weight"]

            def mha_hook(mod: nn.Module, inp: Any, out: Any, names: list[str] = names, prefix: str = prefix) -> None:
                q = inp[0]
                tokens = q.numel() // q.shape[-1]  # query tokens (self-attention: k, v have as many)
                for n in names:
                    uses[prefix + n] = uses.get(prefix + n, 0) + tokens

            hooks.append(module.register_forward_hook(mha_hook))
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
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




def training_macs(method: Method, *, layer_numel: dict[str, int], positions: dict[str, int],
                  history: list[dict[str, Any]], total_steps: int) -> dict[str, float]:
    """Training MACs per example summed over steps 1..total_steps (the method prices each stretch of
    steps between mask changes: ``Method.training_segment_cost``).

    ``history`` holds the active counts per prunable layer after each mask change (``updates.jsonl``
    rows: ``{"step": u, "active": {name: count}}``); the mask recorded at step u is the one the forward
    pass uses at steps u+1 .. (next change). Layers not in ``active`` are dense.
    """
    f_d = float(sum(layer_numel[n] * positions[n] for n in layer_numel if n in positions))
    rows = sorted(history, key=lambda r: r["step"]) or [{"step": 0, "active": {}}]
    total = 0.0
    sparse_sum = 0.0
    for i, row in enumerate(rows):
        first = int(row["step"]) + 1
        last = total_steps if i + 1 == len(rows) else min(total_steps, int(rows[i + 1]["step"]))
        if last < first:
            continue
        active = row.get("active", {})
        f_s = float(sum(int(active.get(n, layer_numel[n])) * positions[n] for n in layer_numel if n in positions))
        sparse_sum += f_s * (last - first + 1)
        total += method.training_segment_cost(f_s, f_d, first, last)
    return {"train_macs": total, "dense_forward_macs": f_d,
            "mean_sparse_forward_macs": sparse_sum / max(total_steps, 1)}


def run_flops(model: nn.Module, sparsifier: Any, *, input_shape: tuple[int, ...], config: Any = None,
              updates: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """FLOP counts for a finished run's summary: inference per sample, and (with ``config``) training
    FLOPs per example summed over the run's actual steps, relative to dense training of the full-width
    model for the same number of base epochs (so a 2× run costs ~2× a 1× one, as in the paper)."""
    layers = sparsifier.layer_summary()
    positions = weight_positions(model, input_shape)
    inference = inference_macs(layers, positions)
    per_token = sequence_counts(model, input_shape, inference)
    method: Method = sparsifier.method
    # The dense reference is the full-width model; for small-dense the model itself is narrower.
    full_shapes = method.dense_reference_shapes()
    if full_shapes:
        ref_dense_macs = sum(math.prod(full_shapes[n]) * positions[n] for n in full_shapes if n in positions)
    else:
        ref_dense_macs = inference["dense_macs"]
    out: dict[str, Any] = {
        "unit_note": "macs = multiply-accumulates per sample; flops = 2 x macs",
        "inference": inference,
        "reference_dense_macs": ref_dense_macs,
        "inference_vs_dense": inference["sparse_macs"] / ref_dense_macs if ref_dense_macs else 1.0,
    }
    if per_token is not None:
        out["per_token"] = per_token
    if config is None:
        return out
    total_steps = int(sparsifier.total_steps)
    total_epochs = max(1, round(config.epochs * config.train_multiplier))
    reference_steps = total_steps * config.epochs / total_epochs  # dense at 1×: the paper's reference
    if updates is None or not updates:
        updates = method.planned_history(sparsifier.layers)
    numel = {ly["name"]: int(ly["numel"]) for ly in layers}
    macs = training_macs(method, layer_numel=numel, positions=positions, history=updates, total_steps=total_steps)
    dense_ref = 3.0 * ref_dense_macs * reference_steps
    batch = int(getattr(config, "batch_size", 1))
    out["training"] = {
        "method": method.name,
        "formula": method.training_formula(),
        "steps": total_steps,
        "reference_steps": reference_steps,
        **method.training_formula_fields(),
        "dense_forward_flops": 2 * macs["dense_forward_macs"],
        "mean_sparse_forward_flops": 2 * macs["mean_sparse_forward_macs"],
        "flops_per_example": 2 * macs["train_macs"],
        "dense_flops_per_example": 2 * dense_ref,
        "total_flops": 2 * macs["train_macs"] * batch,
        "total_flops_note": "flops_per_example x batch_size (a short last batch counted full)",
        "vs_dense": macs["train_macs"] / dense_ref if dense_ref else 1.0,
    }
    if per_token is not None:
        out["training"]["flops_per_token"] = out["training"]["flops_per_example"] / per_token["tokens_per_sample"]
    return out


def attention_macs(model: nn.Module, tokens: int) -> int:
    """Dense MACs per sample of the attention score (QKᵀ) and value (AV) matmuls of every
    MultiheadAttention in self-attention over ``tokens`` positions: 2·T²·d each (no causal saving)."""
    total = 0
    for module in unwrap_model(model).modules():
        if isinstance(module, nn.MultiheadAttention):
            total += 2 * tokens * tokens * module.embed_dim
    return total


def sequence_counts(model: nn.Module, input_shape: tuple[int, ...], inference: dict[str, Any]) -> dict[str, Any] | None:
    """Per-token inference counts for sequence models (``sequence_model = True``; input (T,)), else None."""
    if not getattr(unwrap_model(model), "sequence_model", False) or len(input_shape) != 1:
        return None
    tokens = int(input_shape[0])
    attn = attention_macs(model, tokens)
    return {
        "convention": "per token: weight matmuls applied at each position of a window, / tokens_per_sample",
        "tokens_per_sample": tokens,
        "dense_macs": inference["dense_macs"] / tokens,
        "sparse_macs": inference["sparse_macs"] / tokens,
        "dense_flops": inference["dense_flops"] / tokens,
        "sparse_flops": inference["sparse_flops"] / tokens,
        "attention_macs": attn / tokens,
        "attention_flops": 2 * attn / tokens,
    }
