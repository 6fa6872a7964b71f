"""Exact compaction of an MLP chain (``compact_layers``: the one compaction, used by ``compact-onnx``,
``int8-onnx`` and, before packing, ``fast``) and the ``compact-onnx`` format: the network with every input
and unit that lost its connections removed.

A hidden unit whose incoming weights are all zero still outputs act(bias), so act(b_j) · W_next[:, j] is
folded into the next layer's bias before the unit goes; a unit whose outgoing weights are all zero simply
goes; an input feature with no outgoing weights goes too, and the model keeps its input signature.
Removing one unit can leave another without connections, so this repeats until nothing changes. The
folded contributions accumulate in float64 and are rounded to float32 once, at the end; every layer
keeps at least one unit (an inert one when all of them died), so no layer is ever empty.

Dead *inputs* are counted but, by default, kept as zero columns of the first weight instead of being
selected with a ``Gather``: in ONNX Runtime a ``Gather`` on the feature axis costs far more than the
multiply-adds it saves (measured here: selecting 716 of 784 features at batch 256 took 1.1 ms, more than
the whole dense LeNet-300-100, 0.9 ms). ``input_selection="gather"`` builds the Gather form.

Any other graph (conv nets, residual and attention graphs) is compacted channel by channel by
``sparsekit.exporters.compact_graph``; a graph where nothing can be removed exactly is refused with a
message, and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from sparsekit.exporters.compact_graph import compact_graph
from sparsekit.exporters.context import (
    ExportContext,
    ExportOptions,
    metadata_for,
    save_onnx_atomic,
    set_metadata,
)
from sparsekit.exporters.graph import DenseLayer, UnsupportedGraphError, build_mlp_chain, parse_mlp_chain
from sparsekit.exporters.registry import register_format


def _act(x: np.ndarray, activation: str | None) -> np.ndarray:
    return np.maximum(x, 0) if activation == "relu" else x


def compact_layers(n_inputs: int, layers: list[DenseLayer]
                   ) -> tuple[np.ndarray, list[DenseLayer], dict[str, Any]]:
    """Shrink ``layers`` (weights ``(out, in)``); returns kept input indices, new layers and counts.

    The output layer's units are never removed; every layer keeps at least one unit (and the model at
    least one input) so the graph stays valid even when everything was folded into constants.
    """
    ws = [np.array(layer.weight, dtype=np.float32) for layer in layers]
    bs = [np.zeros(w.shape[0], np.float64) if layer.bias is None else layer.bias.astype(np.float64)
          for w, layer in zip(ws, layers, strict=True)]
    kept_in = np.arange(n_inputs)
    folded = 0
    changed = True
    while changed:
        changed = False
        # inputs with no outgoing weights
        alive = np.any(ws[0] != 0, axis=0)
        if not alive.all() and alive.any():
            ws[0], kept_in = ws[0][:, alive], kept_in[alive]
            changed = True
        for i in range(len(ws) - 1):  # hidden layers only
            w, w_next = ws[i], ws[i + 1]
            no_in = ~np.any(w != 0, axis=1)
            no_out = ~np.any(w_next != 0, axis=0)
            # fold the constant output act(b_j) of input-less units into the next bias
            fold = no_in & ~no_out
            if fold.any():
                const = _act(bs[i][fold], layers[i].activation)
                bs[i + 1] = bs[i + 1] + w_next[:, fold].astype(np.float64) @ const
                folded += int(fold.sum())
            drop = no_in | no_out
            if drop.all():  # keep one unit, made inert, so that the layer is never empty
                w, w_next = w.copy(), w_next.copy()
                w[0], w_next[:, 0] = 0, 0
                bs[i][0] = 0.0
                drop[0] = False
            if drop.any():
                keep = ~drop
                ws[i], bs[i] = w[keep], bs[i][keep]
                ws[i + 1] = w_next[:, keep]
                changed = True
            else:
                ws[i], ws[i + 1] = w, w_next
    new_layers = []
    for layer, w, b in zip(layers, ws, bs, strict=True):
        keep_bias = layer.bias is not None or np.any(b != 0)
        new_layers.append(DenseLayer(np.ascontiguousarray(w, np.float32),
                                     b.astype(np.float32) if keep_bias else None, layer.activation,
                                     layer.weight_name, layer.bias_name))
    counts = {
        "inputs": {"before": n_inputs, "after": len(kept_in)},
        "units": [{"layer": layer.weight_name, "before": int(layer.weight.shape[0]), "after": int(w.shape[0])}
                  for layer, w in zip(layers, ws, strict=True)],
        "folded_units": folded,
        "weights": {"before": int(sum(layer.weight.size for layer in layers)),
                    "after": int(sum(w.size for w in ws))},
    }
    return kept_in, new_layers, counts


def with_all_inputs(n_inputs: int, kept_in: np.ndarray, layers: list[DenseLayer]) -> list[DenseLayer]:
    """``layers`` with the removed inputs back as zero columns of the first weight: the model keeps its input
    signature (for ORT and the fast kernels a zero column costs nothing or less than selecting the inputs)."""
    if len(kept_in) == n_inputs:
        return layers
    first = layers[0]
    full = np.zeros((first.weight.shape[0], n_inputs), np.float32)
    full[:, kept_in] = first.weight
    return [DenseLayer(full, first.bias, first.activation, first.weight_name, first.bias_name), *layers[1:]]


def graph_compacted(ctx: ExportContext, options: ExportOptions) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A graph that is not an MLP chain, channel by channel; refused when no channel can go."""
    from sparsekit.exporters.dense import reference_model

    try:
        model, counts = compact_graph(reference_model(ctx, "compact-onnx", options))
    except (ValueError, IndexError, KeyError, onnx.shape_inference.InferenceError) as exc:  # a graph it cannot read
        raise UnsupportedGraphError(f"compact-onnx cannot read this graph's channels ({exc}); nothing was written",
                                    where=str(ctx.source), fix="use --format onnx,sparse-onnx,compressed") from exc
    if not counts["channels"]:
        raise UnsupportedGraphError(
            "compact-onnx found no channel or unit that can be removed exactly (every one has live incoming "
            "and outgoing weights, or feeds a residual or attention path); nothing was written",
            where=str(ctx.source), fix="use --format onnx,sparse-onnx,compressed,fast")
    del model.metadata_props[:]
    return model, counts


def compact_model(ctx: ExportContext, options: ExportOptions, *, matmul: bool = False,
                  input_selection: str = "zero-columns"):
    """The compacted ONNX model (without metadata) and its counts; raises UnsupportedGraphError.
    An MLP chain is rebuilt whole (``matmul`` and ``input_selection`` choose its form); any other graph keeps
    its nodes and loses channels (``graph_compacted``)."""
    try:
        shape, layers = parse_mlp_chain(ctx.model)
    except UnsupportedGraphError:
        return graph_compacted(ctx, options)
    n_in = int(np.prod(shape))
    kept_in, new_layers, counts = compact_layers(n_in, layers)
    if input_selection == "zero-columns":
        new_layers, kept_in = with_all_inputs(n_in, kept_in, new_layers), np.arange(n_in)
    counts["input_selection"] = input_selection
    inputs = [i for i in ctx.model.graph.input if i.name not in {t.name for t in ctx.model.graph.initializer}]
    model = build_mlp_chain(shape, new_layers,
                            input_indices=None if len(kept_in) == n_in else kept_in,
                            input_name=inputs[0].name, output_name=ctx.model.graph.output[0].name,
                            opset=options.opset, matmul=matmul)
    return model, counts


@register_format("compact-onnx", "structurally shrunk ONNX: dead inputs, units and channels removed exactly",
                 ".compact.onnx")
def write_compact_onnx(ctx: ExportContext, out_path: Path, options: ExportOptions) -> dict[str, Any]:
    model, counts = compact_model(ctx, options)
    set_metadata(model, metadata_for(ctx, "compact-onnx", opset=options.opset,
                                     extra={"compaction": counts,
                                            "exporter": "sparsekit.exporters.compact"}))
    save_onnx_atomic(model, out_path)
    return {"precision": "fp32", "notes": [removed_note(counts)], "compaction": counts}


def removed_note(counts: dict[str, Any]) -> str:
    """What compaction removed, in one line (``sparsekit export`` prints it)."""
    weights = f"parameters {counts['weights']['before']:,} → {counts['weights']['after']:,}"
    if "channels" in counts:
        layers = counts["channels"]
        shown = ", ".join(f"{c['layer']} {c['before']}→{c['after']}" for c in layers[:4])
        more = f" and {len(layers) - 4} more" if len(layers) > 4 else ""
        folded = sum(c["folded"] for c in layers)
        return f"removed {sum(c['before'] - c['after'] for c in layers)} channels/units ({shown}{more}; " \
               f"{folded} folded into the next bias); {weights}"
    units = sum(u["before"] - u["after"] for u in counts["units"])
    return f"removed {counts['inputs']['before'] - counts['inputs']['after']} dead inputs (kept as zero " \
           f"columns unless gathered) and {units} units ({counts['folded_units']} folded); {weights}"
