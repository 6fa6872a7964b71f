"""``sparsekit viz``: the figures that show *why* a sparse run turned out as it did.

From a run directory (no model code needed):

- ``connectivity.png`` / ``connectivity.gif``: every input feature's outgoing connection count in the
  first sparse layer at several mask updates (``updates.jsonl`` ``input_fanout``), as H×W heat maps
  for image inputs (the RigL blog's MNIST figure: border pixels lose their connections, the centre
  gains them), beside the average input image from ``samples.npz``; for other inputs (a conv's
  channels, a Transformer's embedding) a table, one row per update and one column per feature;
- ``layers.png`` (``layers-2.png``, ...): each sparse layer's view of where its connections are in the
  final masks (``masks.safetensors``), picked per layer type by ``sparsekit.viz_views``;
- ``density.png``: planned vs realised density per layer (``summary.json`` layers), and each layer's
  density over the mask updates (``updates.jsonl`` ``active``) when it changed;
- ``curves.png``: train/test loss and accuracy per epoch (``metrics.jsonl``) with mask updates marked;
- ``compare_loss.png`` (``--compare RUN_A RUN_B ...``): loss curves of several runs overlaid.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from sparsekit.errors import InputError
from sparsekit.fileio import atomic_path
from sparsekit.run_dir import RunDir
from sparsekit.viz_views import LayerView, Panel, layer_views

N_PANELS = 6
LAYERS_PER_PAGE = 8


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wrap(text: str, width: int = 70) -> str:
    return textwrap.fill(text, width=width, break_long_words=True)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    _plt().close(fig)


def image_shape(input_shape: list[int] | tuple[int, ...], n_features: int,
                kind: str | None = None) -> tuple[int, int] | None:
    """H×W to draw ``n_features`` input fan-outs as, or None for non-image inputs.

    (C, H, W) inputs whose first layer sees C·H·W features (an MLP on images) are summed over
    channels by the caller; a conv first layer has C input features (channels), which is no image.
    A flat input of a square size is folded only when it is that first layer's input (not, say, a
    Transformer's embedding) and the data is not known to be other than images (``kind``).
    """
    shape = [int(s) for s in input_shape]
    if kind not in (None, "image") and len(shape) < 3:
        return None
    if len(shape) == 3 and shape[1] * shape[2] >= 4:
        h, w = shape[1], shape[2]
        if n_features in (h * w, shape[0] * h * w):
            return h, w
    if len(shape) == 2 and shape[0] * shape[1] == n_features:
        return shape[0], shape[1]
    if len(shape) == 1 and shape[0] == n_features:
        side = math.isqrt(n_features)
        if side * side == n_features and side >= 4:
            return side, side
    return None


def fanout_maps(updates: list[dict[str, Any]], shape: tuple[int, int] | None) -> list[tuple[int, np.ndarray]]:
    """(step, map) per update with a first-layer fan-out; maps are H×W (channels summed) or 1×N."""
    out = []
    for u in updates:
        fan = u.get("input_fanout")
        if fan is None:
            continue
        arr = np.asarray(fan, dtype=np.float64)
        if shape is not None:
            h, w = shape
            arr = arr.reshape(-1, h, w).sum(axis=0)
        else:
            arr = arr.reshape(1, -1)
        out.append((int(u["step"]), arr))
    return out


def _pick(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _input_shape(summary: dict[str, Any], n_features: int) -> tuple[list[int], str | None]:
    data = summary.get("data", {})
    return data.get("input_shape") or summary.get("input_shape") or [n_features], data.get("kind")


def _mean_image(run: RunDir, shape: tuple[int, int]) -> np.ndarray | None:
    samples = run.samples()
    x = samples.x if samples is not None else None
    if not isinstance(x, np.ndarray) or not x.size or x[0].size % (shape[0] * shape[1]):
        return None
    return x.reshape(x.shape[0], -1, *shape).mean(axis=(0, 1))


def plot_connectivity(run: RunDir, out: Path, summary: dict[str, Any]) -> list[Path]:
    """The first sparse layer's input fan-out over the mask updates: H×W maps for image features (plus a GIF),
    else one row per update and one column per input feature or channel."""
    fans = [u for u in run.updates() if u.get("input_fanout") is not None]
    if not fans:
        return []
    n_features = len(fans[0]["input_fanout"])
    input_shape, kind = _input_shape(summary, n_features)
    shape = image_shape(input_shape, n_features, kind)
    maps = fanout_maps(fans, shape)
    vmax = max(float(m.max()) for _, m in maps) or 1.0
    layer = fans[0].get("first_layer", "first layer")
    title = _wrap(f"{summary.get('method', '')}: input connectivity of {layer}")
    if shape is None:
        shapes = {ly.get("name"): ly.get("shape") or [] for ly in summary.get("layers", [])}
        fig = _fanout_table(maps, vmax, title, channels=len(shapes.get(layer, [])) > 2)
    else:
        fig = _fanout_images(maps, vmax, title, _mean_image(run, shape))
    png = out / "connectivity.png"
    _save(fig, png)
    paths = [png]
    if len(maps) > 1 and shape is not None:
        paths.append(_gif(maps, out / "connectivity.gif", vmax=vmax, shape=shape))
    return paths


def _fanout_images(maps: list[tuple[int, np.ndarray]], vmax: float, title: str, mean_img: np.ndarray | None) -> Any:
    """Snapshots of the H×W fan-out map, a colour bar, then the mean input image."""
    chosen = [maps[i] for i in _pick(len(maps), N_PANELS)]
    extra = mean_img is not None
    ratios = [1.0] * len(chosen) + [0.07] + ([0.3, 1.0] if extra else [])
    fig = _plt().figure(figsize=(2.3 * len(chosen) + (3.2 if extra else 1.0), 3.1), dpi=100, layout="constrained")
    grid = fig.add_gridspec(1, len(ratios), width_ratios=ratios)
    im = None
    for i, (step, m) in enumerate(chosen):
        ax = fig.add_subplot(grid[0, i])
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"step {step}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, cax=fig.add_subplot(grid[0, len(chosen)]), label="outgoing connections")
    if mean_img is not None:
        ax = fig.add_subplot(grid[0, len(ratios) - 1])
        ax.imshow(mean_img, cmap="gray", interpolation="nearest")
        ax.set_title("mean input", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig


def _fanout_table(maps: list[tuple[int, np.ndarray]], vmax: float, title: str, *, channels: bool) -> Any:
    """Input features that are no image (a conv's channels, a Transformer's embedding): rows = mask updates."""
    table = np.concatenate([m.reshape(1, -1) for _, m in maps])
    steps = [step for step, _ in maps]
    fig, ax = _plt().subplots(figsize=(min(11.0, 3.5 + 0.12 * table.shape[1]), min(8.0, 1.6 + 0.22 * len(steps))),
                              dpi=100, layout="constrained")
    im = ax.imshow(table, cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    rows = _pick(len(steps), 12)
    ax.set_yticks(rows, [str(steps[i]) for i in rows], fontsize=7)
    ax.set_ylabel("mask update (step)")
    ax.set_xlabel("input channel" if channels else "input feature")
    ax.xaxis.set_major_locator(_plt().MaxNLocator(16, integer=True))
    fig.colorbar(im, ax=ax, label="outgoing connections")
    ax.set_title(title, fontsize=10)
    return fig


def _gif(maps: list[tuple[int, np.ndarray]], path: Path, *, vmax: float, shape: tuple[int, int] | None) -> Path:
    """An animated GIF of the fan-out map over updates (nearest-neighbour upscaled, viridis)."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    cmap = colormaps["viridis"]
    frames = []
    for step, m in maps:
        rgb = (cmap(np.clip(m / vmax, 0, 1))[..., :3] * 255).astype(np.uint8)
        h, w = rgb.shape[:2]
        scale = max(1, 280 // max(h, w)) if shape is not None else 1
        img = Image.fromarray(rgb).resize((w * scale, max(h * scale, 40) if shape is None else h * scale),
                                          Image.NEAREST)
        canvas = Image.new("RGB", (img.width, img.height + 16), "white")
        canvas.paste(img, (0, 16))
        ImageDraw.Draw(canvas).text((2, 2), f"step {step}", fill="black")
        frames.append(canvas)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=400, loop=0)
    return path


def plot_layers(run: RunDir, out: Path, summary: dict[str, Any]) -> list[Path]:
    """``layers.png`` (``layers-2.png``, ... past ``LAYERS_PER_PAGE`` layers): each sparse layer's view from
    the final masks (``sparsekit.viz_views``)."""
    masks = run.masks()
    if not masks:
        return []
    input_shape, kind = _input_shape(summary, 0)
    chw = tuple(int(d) for d in input_shape) if len(input_shape) == 3 and kind in (None, "image") else None
    if chw is None and len(input_shape) == 1 and kind in (None, "image"):
        side = image_shape(input_shape, int(input_shape[0]))
        chw = (1, *side) if side else None
    views = layer_views(masks, summary, chw)
    paths = []
    pages = math.ceil(len(views) / LAYERS_PER_PAGE)
    for page, start in enumerate(range(0, len(views), LAYERS_PER_PAGE), 1):
        granularity = summary.get("granularity", "unstructured")
        title = f"{summary.get('method', '')} ({granularity}): where each layer's connections are (final masks)"
        last = min(start + LAYERS_PER_PAGE, len(views))
        span = f"layer {last}" if last == start + 1 else f"layers {start + 1}-{last}"
        title += f", {span} of {len(views)}" if pages > 1 else ""
        fig = layers_figure(views[start:start + LAYERS_PER_PAGE], title)
        path = out / ("layers.png" if page == 1 else f"layers-{page}.png")
        _save(fig, path)
        paths.append(path)
    return paths


def layers_figure(views: list[LayerView], title: str) -> Any:
    """One row per layer (its name, kind and density as the row's title), one panel per view panel."""
    fig = _plt().figure(figsize=(13.0, 2.5 * len(views) + 0.5), dpi=100, layout="constrained")
    fig.suptitle(_wrap(title, 110), fontsize=11)
    rows = fig.subfigures(len(views), 1, squeeze=False)[:, 0]
    for sub, view in zip(rows, views, strict=True):
        shape = "×".join(str(d) for d in view.shape)
        sub.suptitle(_wrap(f"{view.name}  ·  {view.kind} [{shape}]  ·  {view.granularity}  ·  "
                           f"density {view.density:.3f}", 110),
                     fontsize=9, fontweight="bold")
        axes = sub.subplots(1, len(view.panels), squeeze=False)[0]
        for ax, panel in zip(axes, view.panels, strict=True):
            _draw_panel(sub, ax, panel, view.density)
    return fig


def _draw_panel(fig: Any, ax: Any, panel: Panel, density: float) -> None:
    """Bars for 1-D densities (dashed: the layer's density), a heat map for 2-D ones (values written in
    when there are few cells)."""
    v = panel.values
    ax.set_title(_wrap(panel.title, 45), fontsize=8)
    ax.set_xlabel(panel.xlabel, fontsize=7)
    ax.set_ylabel(panel.ylabel, fontsize=7)
    ax.tick_params(labelsize=6)
    for axis in (ax.xaxis, ax.yaxis if v.ndim == 2 else None):
        if axis is not None:
            axis.set_major_locator(_plt().MaxNLocator(8, integer=True))
    if v.ndim == 1:
        ax.bar(np.arange(len(v)), v, width=1.0 if len(v) > 32 else 0.8, color="#3182bd", lw=0)
        ax.axhline(density, color="black", ls="--", lw=0.8)
        ax.set_ylim(0, min(1.05, max(float(v.max()), density) * 1.2 + 1e-3))
        ax.set_xlim(-0.6, len(v) - 0.4)
        if panel.xticklabels is not None:
            ax.set_xticks(range(len(v)), panel.xticklabels)
        return
    square = 0.33 < v.shape[0] / v.shape[1] < 3 and v.size <= 4096
    extent = None if panel.extent is None else (0, panel.extent[1], panel.extent[0], 0)
    im = ax.imshow(v, cmap="viridis", vmin=0, vmax=max(float(v.max()), 1e-9), interpolation="nearest",
                   aspect="equal" if square and extent is None else "auto", extent=extent)
    fig.colorbar(im, ax=ax, shrink=0.9).ax.tick_params(labelsize=6)
    if panel.xticklabels is not None:
        ax.set_xticks(range(v.shape[1]), panel.xticklabels)
    if panel.yticklabels is not None:
        ax.set_yticks(range(v.shape[0]), panel.yticklabels)
    if v.size <= 30:
        for (r, c), val in np.ndenumerate(v):
            ax.text(c, r, f"{val:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if val < 0.6 * v.max() else "black")


Series = dict[str, tuple[list[int], list[float]]]  # layer → (steps, densities)


def density_over_updates(updates: list[dict[str, Any]], summary: dict[str, Any]) -> Series:
    """Per layer: (steps, density) at each mask update that recorded its active count; {} when no layer's
    density changed (RigL, SET: each layer keeps its count, so the bars of the final densities say it all)."""
    numel = {ly["name"]: int(ly["numel"]) for ly in summary.get("layers", []) if ly.get("numel")}
    series: Series = {}
    for u in updates:
        for name, active in (u.get("active") or {}).items():
            if name in numel:
                steps, dens = series.setdefault(name, ([], []))
                steps.append(int(u["step"]))
                dens.append(int(active) / numel[name])
    changed = any(len(set(d)) > 1 for _, d in series.values())
    return series if changed else {}


def plot_density(run: RunDir, out: Path, summary: dict[str, Any]) -> Path:
    """Planned vs realised density per layer; beside it, each layer's density over the mask updates when it
    changed during training (gradual pruning)."""
    plt = _plt()
    layers = summary.get("layers", [])
    names = [ly["name"] for ly in layers]
    planned = [ly.get("planned_density", 1.0) for ly in layers]
    real = [ly.get("density", 1.0) for ly in layers]
    series = density_over_updates(run.updates(), summary)
    width = max(5.0, 0.9 * len(names) + 2)
    height = 3.2 + 0.075 * max((len(n) for n in names), default=0)  # the layer names below the bars
    fig, axes = plt.subplots(1, 2 if series else 1, figsize=(width + (6.0 if series else 0.0), height), dpi=100,
                             layout="constrained", squeeze=False, width_ratios=[width, 6.0] if series else None)
    ax = axes[0, 0]
    x = np.arange(len(names))
    ax.bar(x - 0.2, planned, 0.4, label="planned", color="#9ecae1", edgecolor="black", lw=0.5)
    ax.bar(x + 0.2, real, 0.4, label="realised", color="#08519c", edgecolor="black", lw=0.5)
    ax.set_xticks(x)
    upright = max((len(n) for n in names), default=0) > 14  # long names stand upright, clear of each other
    ax.set_xticklabels(names, rotation=90 if upright else 30, ha="center" if upright else "right", fontsize=8)
    ax.set_ylabel("density (fraction of weights active)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(_wrap(f"{summary.get('method', '')} per-layer density (realised sparsity "
                       f"{summary.get('realized_sparsity', 0):.4f})"), fontsize=10)
    if series:
        ax2 = axes[0, 1]
        for name, (steps, dens) in series.items():
            ax2.plot(steps, dens, "o-", ms=2.5, lw=1, label=name)
        ax2.set_xlabel("step (mask updates)")
        ax2.set_ylabel("density")
        ax2.set_ylim(0, 1.05)
        ax2.grid(True, alpha=0.3)
        ax2.set_title("density per layer over the mask updates", fontsize=10)
        if len(series) <= 12:
            ax2.legend(fontsize=6)
    path = out / "density.png"
    _save(fig, path)
    return path


def plot_curves(run: RunDir, out: Path, summary: dict[str, Any]) -> Path | None:
    plt = _plt()
    metrics = run.metrics()
    if not metrics:
        return None
    update_steps = [u["step"] for u in run.updates() if u.get("step", 0) > 0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100, layout="constrained")
    for ax, key, scale, style, label in ((ax1, "train_loss", 1, "o-", "train loss"),
                                         (ax1, "test_loss", 1, "s-", "test loss"),
                                         (ax2, "train_accuracy", 100, "o-", "train acc"),
                                         (ax2, "test_accuracy", 100, "s-", "test acc")):
        logged = [m for m in metrics if m.get(key) is not None]  # runs of sparsekit.save log what they have
        if logged:
            ax.plot([m["step"] for m in logged], [scale * m[key] for m in logged], style, ms=3, label=label)
    for ax in (ax1, ax2):
        for i, s in enumerate(update_steps):
            ax.axvline(s, color="red", alpha=0.25, lw=0.8, label="mask update" if i == 0 else None)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("cross-entropy")
    ax2.set_ylabel("accuracy (%)")
    fig.suptitle(_wrap(f"{summary.get('method', '')} — {run.path.name}", 120), fontsize=10)
    path = out / "curves.png"
    _save(fig, path)
    return path


def plot_compare_loss(run_dirs: list[Path], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100, layout="constrained")
    for i, run in enumerate(RunDir(d) for d in run_dirs):
        metrics = run.metrics()
        if not metrics:
            raise InputError(f"{run.path} has no {run.METRICS}", where="--compare",
                             fix="give sparsekit run directories")
        color = f"C{i % 10}"
        steps = [m["step"] for m in metrics]
        name = run.path.name
        ax.plot(steps, [m["train_loss"] for m in metrics], "-", color=color, label=f"{name} train")
        ax.plot(steps, [m["test_loss"] for m in metrics], "--", color=color, label=f"{name} test")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("loss curves", fontsize=10)
    _save(fig, path)
    return path


def visualize(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write every figure for one run; returns {"files": [...], "updates": n, ...}."""
    run = RunDir(run_dir)
    summary = run.summary()
    dest = Path(out) if out is not None else run.viz_dir
    dest.mkdir(parents=True, exist_ok=True)
    files = plot_connectivity(run, dest, summary)
    files += plot_layers(run, dest, summary)
    files.append(plot_density(run, dest, summary))
    curves = plot_curves(run, dest, summary)
    if curves is not None:
        files.append(curves)
    return {"run_dir": str(run.path), "out": str(dest), "files": [str(f) for f in files],
            "updates": len(run.updates())}


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> dict[str, Any]:
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise InputError("--compare needs at least two run directories", where="--compare",
                         fix="sparsekit viz --compare RUN_A RUN_B")
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    path = plot_compare_loss(dirs, dest / "compare_loss.png")
    return {"out": str(dest), "files": [str(path)], "runs": [str(d) for d in dirs]}
