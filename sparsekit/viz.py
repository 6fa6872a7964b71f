"""``sparsekit viz``: the figures that show *why* a sparse run turned out as it did.

From a run directory (no model code needed):

- ``connectivity.png`` / ``connectivity.gif``: every input feature's outgoing connection count in the
  first sparse layer at several mask updates (``updates.jsonl`` ``input_fanout``), as H×W heat maps
  for image inputs (the RigL blog's MNIST figure: border pixels lose their connections, the centre
  gains them), beside the average input image from ``samples.npz``;
- ``density.png``: planned vs realised density per layer (``summary.json`` layers);
- ``curves.png``: train/test loss and accuracy per epoch (``metrics.jsonl``) with mask updates marked;
- ``compare_loss.png`` (``--compare RUN_A RUN_B ...``): loss curves of several runs overlaid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sparsekit.errors import InputError
from sparsekit.fileio import atomic_path
from sparsekit.run_dir import RunDir

N_PANELS = 6


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    _plt().close(fig)


def image_shape(input_shape: list[int] | tuple[int, ...], n_features: int) -> tuple[int, int] | None:
    """H×W to draw ``n_features`` input fan-outs as, or None for non-image inputs.

    (C, H, W) inputs whose first layer sees C·H·W features (an MLP on images) are summed over
    channels by the caller; a conv first layer has C input features (channels), which is no image.
    """
    shape = [int(s) for s in input_shape]
    if len(shape) == 3 and shape[1] * shape[2] >= 4:
        h, w = shape[1], shape[2]
        if n_features in (h * w, shape[0] * h * w):
            return h, w
    if len(shape) == 2 and shape[0] * shape[1] == n_features:
        return shape[0], shape[1]
    if len(shape) == 1:
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


def plot_connectivity(run: RunDir, out: Path, summary: dict[str, Any]) -> list[Path]:
    plt = _plt()
    updates = run.updates()
    fans = [u for u in updates if u.get("input_fanout") is not None]
    if not fans:
        return []
    n_features = len(fans[0]["input_fanout"])
    input_shape = summary.get("data", {}).get("input_shape") or summary.get("input_shape") or [n_features]
    shape = image_shape(input_shape, n_features)
    maps = fanout_maps(fans, shape)
    vmax = max(float(m.max()) for _, m in maps) or 1.0
    mean_img = None
    samples = run.samples() if shape is not None else None
    if samples is not None:
        x = samples.x
        if isinstance(x, np.ndarray) and x.size:
            mean_img = x.reshape(x.shape[0], -1, *shape).mean(axis=(0, 1)) if x[0].size % (shape[0] * shape[1]) == 0 \
                else None
    chosen = [maps[i] for i in _pick(len(maps), N_PANELS)]
    extra = 1 if mean_img is not None else 0
    # Columns: the snapshots, a thin colour bar, a gap for its label, then the mean input image.
    ratios = [1.0] * len(chosen) + [0.07] + ([0.45, 1.0] if extra else [])
    fig = plt.figure(figsize=(2.3 * len(chosen) + (3.2 if extra else 1.0), 2.9 if shape else 2.2), dpi=100)
    grid = fig.add_gridspec(1, len(ratios), width_ratios=ratios, wspace=0.15)
    axes = [fig.add_subplot(grid[0, i]) for i in range(len(chosen))]
    cax = fig.add_subplot(grid[0, len(chosen)])
    layer = fans[0].get("first_layer", "first layer")
    im = None
    for ax, (step, m) in zip(axes, chosen, strict=False):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, aspect="auto" if shape is None else "equal",
                       interpolation="nearest")
        ax.set_title(f"step {step}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if mean_img is not None:
        ax = fig.add_subplot(grid[0, len(ratios) - 1])
        ax.imshow(mean_img, cmap="gray", interpolation="nearest")
        ax.set_title("mean input", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, cax=cax, label="outgoing connections")
    fig.suptitle(f"{summary.get('method', '')}: input connectivity of {layer}", fontsize=10)
    png = out / "connectivity.png"
    _save(fig, png)
    paths = [png]
    if len(maps) > 1:
        paths.append(_gif(maps, out / "connectivity.gif", vmax=vmax, shape=shape))
    return paths


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


def plot_density(out: Path, summary: dict[str, Any]) -> Path:
    plt = _plt()
    layers = summary.get("layers", [])
    names = [ly["name"] for ly in layers]
    planned = [ly.get("planned_density", 1.0) for ly in layers]
    real = [ly.get("density", 1.0) for ly in layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4), dpi=100)
    x = np.arange(len(names))
    ax.bar(x - 0.2, planned, 0.4, label="planned", color="#9ecae1", edgecolor="black", lw=0.5)
    ax.bar(x + 0.2, real, 0.4, label="realised", color="#08519c", edgecolor="black", lw=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("density (fraction of weights active)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(f"{summary.get('method', '')} per-layer density (realised sparsity "
                 f"{summary.get('realized_sparsity', 0):.4f})", fontsize=10)
    fig.tight_layout()
    path = out / "density.png"
    _save(fig, path)
    return path


def plot_curves(run: RunDir, out: Path, summary: dict[str, Any]) -> Path | None:
    plt = _plt()
    metrics = run.metrics()
    if not metrics:
        return None
    update_steps = [u["step"] for u in run.updates() if u.get("step", 0) > 0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
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
    fig.suptitle(f"{summary.get('method', '')} — {run.path.name}", fontsize=10)
    fig.tight_layout()
    path = out / "curves.png"
    _save(fig, path)
    return path


def plot_compare_loss(run_dirs: list[Path], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
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
    fig.tight_layout()
    _save(fig, path)
    return path


def visualize(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write every figure for one run; returns {"files": [...], "updates": n, ...}."""
    run = RunDir(run_dir)
    summary = run.summary()
    dest = Path(out) if out is not None else run.viz_dir
    dest.mkdir(parents=True, exist_ok=True)
    files = plot_connectivity(run, dest, summary)
    files.append(plot_density(dest, summary))
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
