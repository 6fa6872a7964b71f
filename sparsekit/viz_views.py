"""Where each layer's connections went: per-layer density views computed from the final masks.

Every view is data first (``LayerView``: panels of density arrays, each value the fraction of a group of
weights that is active), drawn afterwards by ``sparsekit.viz``; the view is picked per layer automatically:

- ``conv`` (a 3-D+ mask ``[out, in, *kernel]``): density per output channel, per input channel and per
  kernel position (a kh×kw map);
- ``image-input`` (the first layer of an MLP on images): density per input pixel as an H×W image, per
  output unit, and a block map of the mask;
- ``attention-qkv`` (a packed q/k/v projection: ``in_proj``/``qkv`` in the name, or ``[3d, d]`` when the
  model has heads): density per q/k/v block and head (per output unit when the head count is unknown), per
  input feature, and a block map;
- ``attention-out`` (``out_proj`` of a model with heads): density per head on the input side, per output unit;
- ``gates`` (a recurrent ``weight_ih_l*``/``weight_hh_l*``): density per gate and hidden unit;
- ``linear`` (every other 2-D mask): density per output unit, per input feature, and a block map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparsekit import structure

BLOCK_ROWS, BLOCK_COLS = 48, 64  # the block map's largest size (mask rows × columns averaged per block)
HEAD_KEYS = ("heads", "n_heads", "num_heads", "nhead", "num_attention_heads")
_QKV = re.compile(r"(in_proj|qkv|c_attn)", re.IGNORECASE)
_OUT_PROJ = re.compile(r"(out_proj|o_proj)", re.IGNORECASE)
_RNN = re.compile(r"weight_(ih|hh)_l(\d+)(_reverse)?$")
_GATE_NAMES = {3: ["r", "z", "n"], 4: ["i", "f", "g", "o"]}  # torch's GRU and LSTM gate order


@dataclass
class Panel:
    """One plot of densities: 1-D values are drawn as bars, 2-D values as a heat map."""

    title: str
    values: np.ndarray
    xlabel: str
    ylabel: str = "density"
    xticklabels: list[str] | None = None
    yticklabels: list[str] | None = None
    extent: tuple[int, int] | None = None  # a block map's full (rows, columns): its axes count mask entries


@dataclass
class LayerView:
    name: str
    kind: str
    shape: tuple[int, ...]
    density: float
    panels: list[Panel] = field(default_factory=list)
    granularity: str = "unstructured"  # the run's granularity as this layer's mask holds it (structure.label)


def block_density(mask: np.ndarray, rows: int = BLOCK_ROWS, cols: int = BLOCK_COLS) -> np.ndarray:
    """The 2-D mask averaged over at most rows × cols near-equal blocks (the mask itself when smaller)."""
    m = mask.reshape(mask.shape[0], -1).astype(np.float64)
    r_edges = np.linspace(0, m.shape[0], min(rows, m.shape[0]) + 1).astype(np.int64)
    c_edges = np.linspace(0, m.shape[1], min(cols, m.shape[1]) + 1).astype(np.int64)
    sums = np.add.reduceat(np.add.reduceat(m, r_edges[:-1], axis=0), c_edges[:-1], axis=1)
    return sums / np.outer(np.diff(r_edges), np.diff(c_edges))


def _block_panel(mask: np.ndarray) -> Panel:
    m = mask.reshape(mask.shape[0], -1)
    blocks = block_density(m)
    coarse = blocks.shape != m.shape
    return Panel("mask, block-averaged" if coarse else "mask", blocks, f"input ({m.shape[1]})",
                 f"output ({m.shape[0]})", extent=m.shape)


def _out_panel(mask: np.ndarray, what: str = "output unit") -> Panel:
    return Panel(f"density per {what}", mask.reshape(mask.shape[0], -1).mean(axis=1), what)


def _in_panel(mask: np.ndarray, what: str = "input feature") -> Panel:
    return Panel(f"density per {what}", mask.reshape(mask.shape[0], mask.shape[1], -1).mean(axis=(0, 2)), what)


def conv_view(name: str, mask: np.ndarray) -> LayerView:
    kernel = mask.mean(axis=(0, 1))
    kernel = kernel.reshape(1, -1) if kernel.ndim == 1 else kernel.reshape(kernel.shape[0], -1)
    return LayerView(name, "conv", mask.shape, float(mask.mean()), [
        _out_panel(mask, "output channel"), _in_panel(mask, "input channel"),
        Panel("density per kernel position", kernel, "kernel column", "kernel row")])


def linear_view(name: str, mask: np.ndarray) -> LayerView:
    return LayerView(name, "linear", mask.shape, float(mask.mean()),
                     [_out_panel(mask), _in_panel(mask), _block_panel(mask)])


def image_input_view(name: str, mask: np.ndarray, image: tuple[int, int]) -> LayerView:
    """An MLP's first layer on (C, H, W) images flattened: density per pixel (channels averaged)."""
    h, w = image
    pixels = mask.reshape(mask.shape[0], -1, h, w).mean(axis=(0, 1))
    return LayerView(name, "image-input", mask.shape, float(mask.mean()), [
        Panel("density per input pixel", pixels, "pixel column", "pixel row"), _out_panel(mask),
        _block_panel(mask)])


def qkv_view(name: str, mask: np.ndarray, heads: int) -> LayerView:
    """A packed [3d, in] q/k/v projection: density per (q|k|v, head), or per (q|k|v, unit) without heads."""
    d = mask.shape[0] // 3
    per_unit = mask.reshape(3, d, -1).mean(axis=2)
    if heads > 0 and d % heads == 0:
        grid = per_unit.reshape(3, heads, d // heads).mean(axis=2)
        first = Panel("density per q/k/v head", grid, "head", "", [str(i) for i in range(heads)], ["q", "k", "v"])
    else:
        first = Panel("density per q/k/v output unit", per_unit, "output unit", "", None, ["q", "k", "v"])
    return LayerView(name, "attention-qkv", mask.shape, float(mask.mean()), [first, _in_panel(mask),
                                                                              _block_panel(mask)])


def out_proj_view(name: str, mask: np.ndarray, heads: int) -> LayerView:
    """An attention output projection [d, d]: its input is the heads' outputs side by side."""
    per_head = mask.reshape(mask.shape[0], heads, -1).mean(axis=(0, 2))
    return LayerView(name, "attention-out", mask.shape, float(mask.mean()), [
        Panel("density per input head", per_head, "head", "density", [str(i) for i in range(heads)]),
        _out_panel(mask), _block_panel(mask)])


def gates_view(name: str, mask: np.ndarray, gates: int) -> LayerView:
    """A recurrent layer's stacked gate matrix [gates·hidden, in]: density per gate and hidden unit."""
    grid = mask.reshape(gates, mask.shape[0] // gates, -1).mean(axis=2)
    return LayerView(name, "gates", mask.shape, float(mask.mean()), [
        Panel("density per gate and hidden unit", grid, "hidden unit", "", None, _GATE_NAMES.get(gates)),
        _in_panel(mask), _block_panel(mask)])


def _rnn_gates(name: str, mask: np.ndarray, masks: dict[str, np.ndarray]) -> int:
    """The gate count of a recurrent weight (rows = gates × hidden; weight_hh is [gates·hidden, hidden])."""
    found = _RNN.search(name)
    if found is None:
        return 0
    hh = masks.get(name[:found.start()] + f"weight_hh_l{found.group(2)}{found.group(3) or ''}")
    hidden = hh.shape[1] if hh is not None and hh.ndim == 2 else 0
    return mask.shape[0] // hidden if hidden and mask.shape[0] % hidden == 0 and mask.shape[0] > hidden else 0


def layer_view(name: str, mask: np.ndarray, *, masks: dict[str, np.ndarray] | None = None, heads: int = 0,
               image: tuple[int, int, int] | None = None, first: bool = False) -> LayerView | None:
    """The view that fits this layer (see the module doc); None for a mask with fewer than 2 dimensions.
    ``image`` is the input's (C, H, W) (image data), ``heads`` the model's attention heads (0: unknown),
    ``first`` whether this is the model's first layer (the one that sees the input)."""
    if mask.ndim < 2:
        return None
    if mask.ndim > 2:
        return conv_view(name, mask)
    rows, cols = mask.shape
    if rows % 3 == 0 and (_QKV.search(name) or (heads > 0 and rows == 3 * cols)):
        return qkv_view(name, mask, heads)
    if heads > 0 and cols % heads == 0 and _OUT_PROJ.search(name):
        return out_proj_view(name, mask, heads)
    gates = _rnn_gates(name, mask, masks or {})
    if gates:
        return gates_view(name, mask, gates)
    if first and image is not None and cols in (image[1] * image[2], image[0] * image[1] * image[2]):
        return image_input_view(name, mask, image[1:])
    return linear_view(name, mask)


def attention_heads(summary: dict[str, Any]) -> int:
    """The model's attention head count: from its --model-kwargs, else from the zoo's description of it;
    0 when the model says nothing (projections are then shown per output unit)."""
    config = summary.get("config") or {}
    kwargs = config.get("model_kwargs") or {}
    for key in HEAD_KEYS:
        if isinstance(kwargs.get(key), int) and kwargs[key] > 0:
            return int(kwargs[key])
    from sparsekit.models import MODELS

    info = MODELS.get(str(config.get("model") or summary.get("model") or ""))
    return int(getattr(info, "attention_heads", 0) or 0)


def layer_views(masks: dict[str, np.ndarray], summary: dict[str, Any],
                image: tuple[int, int, int] | None) -> list[LayerView]:
    """A view per sparse layer, in the summary's layer order (masks' order for layers it does not list)."""
    listed = [ly.get("name") for ly in summary.get("layers", [])]
    order = [n for n in listed if n in masks] + [n for n in masks if n not in listed]
    first = listed[0] if listed else (order[0] if order else None)
    heads = attention_heads(summary) if any(masks[n].ndim == 2 for n in order) else 0
    declared = str(summary.get("granularity", "unstructured"))
    views = []
    for name in order:
        view = layer_view(name, masks[name], masks=masks, heads=heads, image=image, first=name == first)
        if view is not None:
            view.granularity = structure.label(masks[name], declared)
            views.append(view)
    return views
