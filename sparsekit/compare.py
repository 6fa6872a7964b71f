"""``sparsekit compare``: the RigL paper's comparison on your model and data, in one call.

Every (method, sparsity, seed) is one ordinary training run in ``OUT/<method>-<sparsity>-s<seed>``
(``dense`` once per seed, in ``OUT/dense-s<seed>``), trained with :func:`sparsekit.training.train`.
The sweep is resumable: a run with a ``summary.json`` is reused (after checking its config matches),
an interrupted one continues from its checkpoint. Results are aggregated over seeds into rows
(accuracy mean ± std, realised sparsity, training and inference FLOPs relative to dense, parameters,
time) and written as ``compare.csv``, ``compare.json`` and ``compare.png`` (accuracy vs training
FLOPs with error bars, one marker per method and sparsity, like the paper's ResNet-50 figure).
"""

from __future__ import annotations

import csv
import math
import statistics
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsekit.config import TrainConfig, imply_from_granularity
from sparsekit.errors import InputError
from sparsekit.fileio import atomic_path, atomic_write_json
from sparsekit.run_dir import RunDir

if TYPE_CHECKING:  # training imports torch; the sweep imports it only when it trains
    from sparsekit.training import Callbacks

CSV_COLUMNS = ["method", "sparsity", "runs", "accuracy_mean", "accuracy_std", "best_accuracy_mean",
               "realized_sparsity", "train_flops_vs_dense", "inference_flops_vs_dense", "params_nonzero",
               "train_seconds_mean", "bpc_mean", "bpc_std", "granularity"]
# Printed with every language-modelling comparison: the embedded corpus and the quick preset are tiny.
LM_NOTE = ("language modelling at this scale (embedded stdlib-docs corpus, quick preset) is a smoke test of "
           "the pipeline and the methods, not a replication of the paper's WikiText-103 results")
# Settings that may differ between the sweep that wrote a run and this one without changing the result.
_FREE = {"device", "checkpoint_every", "eval_batch_size", "sparsekit_version"}
# Options shortened for CI by --quick (unless given explicitly): mask updates must happen in tiny runs.
QUICK_EPOCHS = 2
QUICK_OPTIONS = {"update_interval": 5, "prune_interval": 5}


@dataclass
class CompareSpec:
    """What to sweep. ``train`` holds TrainConfig fields shared by every run (epochs, lr, ...);
    ``method_options`` are offered to every method that takes them (e.g. update_interval)."""

    methods: list[str]
    sparsities: list[float]
    seeds: int = 1
    train: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    quick: bool = False

    def validate(self) -> CompareSpec:
        from sparsekit.methods import get_method_class

        if not self.methods:
            raise InputError("no methods to compare", where="--methods", fix="e.g. --methods rigl,static,dense")
        for m in self.methods:
            get_method_class(m)
        if len(set(self.methods)) != len(self.methods):
            raise InputError("a method is listed twice", where="--methods", fix="list each method once")
        classes = [get_method_class(m) for m in self.methods]
        if not self.sparsities and any(c.sparse or c.sized_by_sparsity for c in classes):
            raise InputError("no sparsity levels given", where="--sparsity", fix="e.g. --sparsity 0.9,0.98")
        for s in self.sparsities:
            if not 0.0 < s < 1.0:
                raise InputError(f"sparsity {s} is outside (0, 1)", where="--sparsity", fix="e.g. --sparsity 0.9,0.98")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise InputError(f"--seeds {self.seeds!r} must be a positive integer", where="--seeds",
                             fix="e.g. --seeds 3")
        return self


@dataclass(frozen=True)
class PlannedRun:
    method: str
    sparsity: float  # 0.0 for dense
    seed: int
    name: str
    config: TrainConfig


def run_name(method: str, sparsity: float, seed: int) -> str:
    return f"dense-s{seed}" if method == "dense" else f"{method}-{sparsity:g}-s{seed}"


def plan_runs(spec: CompareSpec) -> list[PlannedRun]:
    """Every run of the sweep, dense first for each seed (it anchors the ×dense columns)."""
    from sparsekit.methods import get_method_class

    spec.validate()
    train = dict(spec.train)
    options = dict(spec.method_options)
    if spec.quick:
        train["epochs"] = min(int(train.get("epochs") or QUICK_EPOCHS), QUICK_EPOCHS)
        for k, v in QUICK_OPTIONS.items():
            options.setdefault(k, v)
    runs = []
    for seed in range(spec.seeds):
        for method in (["dense"] if "dense" in spec.methods else []):
            runs.append(_planned(method, 0.0, seed, train, options))
        for sparsity in spec.sparsities:
            for method in spec.methods:
                if method != "dense":
                    runs.append(_planned(method, sparsity, seed, train, options))
    for r in runs:  # fail before the first run if any option is wrong
        get_method_class(r.method)(**r.config.method_options)
    return runs


def _planned(method: str, sparsity: float, seed: int, train: dict[str, Any], options: dict[str, Any]) -> PlannedRun:
    from sparsekit.methods import get_method_class

    cls = get_method_class(method)
    opts = {**cls.defaults, **{k: v for k, v in options.items() if k in cls.defaults}}
    data = {**TrainConfig().to_dict(), **{k: v for k, v in train.items() if v is not None},
            "method": method, "sparsity": sparsity, "seed": seed, "method_options": opts}
    if not cls.sparse:  # the dense runs of a structured sweep
        data["granularity"] = "unstructured"
    imply_from_granularity(data, {k for k, v in train.items() if v is not None} | {"sparsity"})
    return PlannedRun(method, sparsity, seed, run_name(method, sparsity, seed), TrainConfig(**data).validate())


def _reusable(run_dir: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The summary of a finished run with the same settings; None when the run must (re)start."""
    run = RunDir(run_dir)
    if not (run.summary_file.is_file() and run.config_file.is_file()):
        return None
    saved = run.config()
    mine = config.to_dict()
    diff = sorted(k for k in mine if k not in _FREE and saved.get(k) != mine[k])
    if diff:
        raise InputError(f"{run_dir} holds a finished run with different settings ({', '.join(diff)})",
                         where="--out", fix="choose another --out, or pass --overwrite to retrain it")
    return run.summary()


def run_compare(spec: CompareSpec, out_dir: str | Path, *, overwrite: bool = False,
                on_run: Callable[[dict[str, Any]], None] | None = None,
                callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Train (or reuse) every run of the sweep, then aggregate and write csv/json/png into ``out_dir``.
    ``callbacks`` (progress events, hooks) are passed to every run that is trained."""
    from sparsekit.training import train

    out = Path(out_dir)
    runs = plan_runs(spec)
    out.mkdir(parents=True, exist_ok=True)
    summaries: list[tuple[PlannedRun, dict[str, Any]]] = []
    for i, run in enumerate(runs, 1):
        run_dir = out / run.name
        summary = None if overwrite else _reusable(run_dir, run.config)
        reused = summary is not None
        if summary is None:
            summary = train(run.config, run_dir, resume=not overwrite, overwrite=overwrite, callbacks=callbacks)
        summaries.append((run, summary))
        if on_run is not None:
            on_run({"index": i, "total": len(runs), "name": run.name, "reused": reused,
                    "test_accuracy": summary.get("test_accuracy"), "train_seconds": summary.get("train_seconds"),
                    "test_bpc": summary.get("test_bpc")})
    result = aggregate(summaries, spec)
    write_outputs(out, result)
    return result


def _run_record(run: PlannedRun, s: dict[str, Any]) -> dict[str, Any]:
    flops = s.get("flops", {})
    training = flops.get("training", {})
    return {
        "name": run.name, "method": run.method, "sparsity": run.sparsity, "seed": run.seed,
        "granularity": s.get("granularity", "unstructured"), "task": s.get("task", "classification"),
        "test_bpc": s.get("test_bpc"),
        "test_accuracy": s.get("test_accuracy"), "best_test_accuracy": s.get("best_test_accuracy"),
        "realized_sparsity": s.get("realized_sparsity"),
        "train_flops_vs_dense": training.get("vs_dense"),
        "inference_flops_vs_dense": flops.get("inference_vs_dense"),
        "params_nonzero": s.get("params", {}).get("nonzero"), "params_total": s.get("params", {}).get("total"),
        "train_seconds": s.get("train_seconds"), "small_dense": s.get("small_dense"),
    }


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _std(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)


def aggregate(summaries: list[tuple[PlannedRun, dict[str, Any]]], spec: CompareSpec) -> dict[str, Any]:
    """Rows per (method, sparsity, granularity), in the order methods and sparsities were given (dense first)."""
    records = [_run_record(r, s) for r, s in summaries]
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((rec["method"], rec["sparsity"], rec["granularity"]), []).append(rec)
    rows = []
    for (method, sparsity, granularity), recs in groups.items():
        rows.append({
            "method": method, "sparsity": sparsity, "granularity": granularity, "runs": len(recs),
            "accuracy_mean": _mean([r["test_accuracy"] for r in recs]),
            "accuracy_std": _std([r["test_accuracy"] for r in recs]),
            "best_accuracy_mean": _mean([r["best_test_accuracy"] for r in recs]),
            "realized_sparsity": _mean([r["realized_sparsity"] for r in recs]),
            "train_flops_vs_dense": _mean([r["train_flops_vs_dense"] for r in recs]),
            "inference_flops_vs_dense": _mean([r["inference_flops_vs_dense"] for r in recs]),
            "params_nonzero": _mean([r["params_nonzero"] for r in recs]),
            "train_seconds_mean": _mean([r["train_seconds"] for r in recs]),
            "bpc_mean": _mean([r["test_bpc"] for r in recs]),
            "bpc_std": _std([r["test_bpc"] for r in recs]),
        })
    first = summaries[0][1] if summaries else {}
    task = first.get("task", "classification")
    result = {"spec": {"methods": spec.methods, "sparsities": spec.sparsities, "seeds": spec.seeds,
                       "quick": spec.quick, "model": first.get("config", {}).get("model"),
                       "data": first.get("config", {}).get("data"), "epochs": first.get("config", {}).get("epochs"),
                       "steps": first.get("total_steps"), "task": task},
              "rows": rows, "runs": records}
    if task == "language-modeling":
        result["note"] = LM_NOTE
    return result


def write_outputs(out: Path, result: dict[str, Any]) -> dict[str, str]:
    files = {"csv": str(out / "compare.csv"), "json": str(out / "compare.json"), "png": str(out / "compare.png")}
    lines: list[list[Any]] = [CSV_COLUMNS]
    for row in result["rows"]:
        lines.append(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    with atomic_path(out / "compare.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(lines)
    result["files"] = files
    atomic_write_json(out / "compare.json", result)
    plot_accuracy_vs_flops(result["rows"], out / "compare.png",
                           title=_title(result.get("spec", {})),
                           bpc=result.get("spec", {}).get("task") == "language-modeling")
    return files


def _title(spec: dict[str, Any]) -> str:
    bits = [str(spec.get(k)) for k in ("model", "data") if spec.get(k)]
    seeds = spec.get("seeds")
    what = "bits per character" if spec.get("task") == "language-modeling" else "accuracy"
    return f"{what} vs training FLOPs" + (f" — {' on '.join(bits)}" if bits else "") + \
        (f" ({seeds} seed{'s' if seeds != 1 else ''}, mean ± std)" if seeds else "")


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]


def plot_accuracy_vs_flops(rows: list[dict[str, Any]], path: Path, *, title: str = "", bpc: bool = False) -> None:
    """``compare.png``: ``accuracy_figure`` written to ``path``."""
    import matplotlib.pyplot as plt

    fig = accuracy_figure(rows, title=title, bpc=bpc)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def accuracy_figure(rows: list[dict[str, Any]], *, title: str = "", bpc: bool = False) -> Any:
    """Test accuracy (%) against training FLOPs relative to dense: colour = method, marker = sparsity.
    With ``bpc`` (language modelling) the y axis is test bits per character instead (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(9.5, 5.5), dpi=110)
    ys = sorted(100 * r["accuracy_mean"] for r in rows if r["accuracy_mean"] is not None)
    # Far outliers (a collapsed run) would squash the rest: draw them clipped at the bottom, labelled.
    floor = ys[len(ys) // 2] - 12.0 if ys else 0.0
    clipped = bool(ys) and ys[0] < floor
    drawn: list[tuple[Any, str, float, float]] = []  # (artists, label, x, y) of every point drawn
    for r in rows:
        if r["train_flops_vs_dense"] is None or (r.get("bpc_mean") if bpc else r["accuracy_mean"]) is None:
            continue
        if bpc:
            x, y, yerr = r["train_flops_vs_dense"], r["bpc_mean"], r.get("bpc_std") or 0.0
        else:
            x, y = r["train_flops_vs_dense"], 100 * r["accuracy_mean"]
            yerr = 100 * (r["accuracy_std"] or 0.0)
        if clipped and y < floor:
            artist = ax.plot([x], [floor + 0.4], marker="v", color=colors[r["method"]], ms=9, mec="black", mew=0.6)
            drawn.append((artist, f"{r['method']} {r['sparsity']:g}: {y:.1f}% (off scale)", x, floor + 0.4))
            continue
        if r["method"] == "dense":
            ax.axhline(y, color=colors["dense"], ls="--", lw=1, alpha=0.6)
            marker = "*"
        else:
            marker = _MARKERS[sparsities.index(r["sparsity"]) % len(_MARKERS)]
        artist = ax.errorbar([x], [y], yerr=[yerr], fmt=marker, color=colors[r["method"]], ms=9, capsize=4,
                             mec="black", mew=0.6)
        drawn.append((artist, "dense" if r["method"] == "dense" else f"{r['method']} {r['sparsity']:g}", x, y))
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], marker="*" if m == "dense" else "o", ls="", ms=8, label=m)
               for m in methods]
    handles += [Line2D([], [], color="black", mfc="white", marker=_MARKERS[i % len(_MARKERS)], ls="", ms=8,
                       label=f"sparsity {s:g}") for i, s in enumerate(sparsities)]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    xs = [r["train_flops_vs_dense"] for r in rows if r["train_flops_vs_dense"]]
    if xs and max(xs) / max(min(xs), 1e-12) > 20:
        ax.set_xscale("log")
    if clipped:
        ax.set_ylim(bottom=floor)
    ax.margins(x=0.08, y=0.08)  # room for the labels of the outermost points
    ax.set_xlabel("training FLOPs (× dense); points that would hide each other are drawn side by side")
    ax.set_ylabel("test bits per character (lower is better)" if bpc else "test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.set_title(textwrap.fill(title, 90), fontsize=10)
    fig.tight_layout()
    _place_labels(ax, drawn, _spread_coinciding(ax, drawn))
    return fig


def label_offsets(points: list[tuple[float, float]], *, width: float = 70.0, height: float = 10.0,
                  base: tuple[float, float] = (6.0, 4.0)) -> list[tuple[float, float]]:
    """Text offsets (points) that keep point labels from overlapping: each label starts up-right of its
    point and, where it would collide with a label already placed (boxes ``width`` × ``height``), moves
    down (then up) by whole label heights. ``points`` are display positions in points."""
    placed: list[tuple[float, float]] = []
    out: list[tuple[float, float]] = [base] * len(points)
    for i in sorted(range(len(points)), key=lambda j: (-points[j][1], points[j][0])):
        px, py = points[i]
        for step in (0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5):
            bx, by = px + base[0], py + base[1] + step * height
            if all(abs(bx - qx) >= width or abs(by - qy) >= height for qx, qy in placed):
                break
        placed.append((bx, by))
        out[i] = (bx - px, by - py)
    return out


def marker_offsets(points: list[tuple[float, float]], *, near: float = 9.0,
                   spacing: float = 11.0) -> list[tuple[float, float]]:
    """Horizontal offsets (points) that keep markers from hiding each other. Points (display positions in
    points) less than ``near`` apart in height share a row; within a row, markers less than ``spacing`` apart
    form a cluster, laid side by side ``spacing`` apart about the cluster's mean, in their x order (ties: the
    order given), merging clusters until none come closer. Per point: (its marker's offset, the offset of
    its cluster's last marker, where its label starts); a point with room keeps (0, 0)."""
    out = [(0.0, 0.0)] * len(points)
    for row in _rows(points, near):
        clusters = [[i] for i in sorted(row, key=lambda i: (points[i][0], i))]
        merged = True
        while merged:
            merged = False
            for a in range(len(clusters) - 1):
                left, right = _laid_out(clusters[a], points, spacing), _laid_out(clusters[a + 1], points, spacing)
                if right[0] - left[-1] < spacing - 1e-9:
                    clusters[a:a + 2] = [clusters[a] + clusters[a + 1]]
                    merged = True
                    break
        for cluster in clusters:
            xs = _laid_out(cluster, points, spacing)
            for i, x in zip(cluster, xs, strict=True):
                out[i] = (x - points[i][0], xs[-1] - points[i][0])
    return out


def _rows(points: list[tuple[float, float]], near: float) -> list[list[int]]:
    """Indices of points chained by heights less than ``near`` apart."""
    rows: list[list[int]] = []
    for i in sorted(range(len(points)), key=lambda j: points[j][1]):
        if rows and points[i][1] - points[rows[-1][-1]][1] < near:
            rows[-1].append(i)
        else:
            rows.append([i])
    return rows


def _laid_out(cluster: list[int], points: list[tuple[float, float]], spacing: float) -> list[float]:
    """The cluster's markers side by side, ``spacing`` apart, centred on their mean x."""
    centre = sum(points[i][0] for i in cluster) / len(cluster)
    return [centre + (k - (len(cluster) - 1) / 2) * spacing for k in range(len(cluster))]


def _artists(container: Any) -> list[Any]:
    """The lines and collections of a plotted point (``plot``'s list or ``errorbar``'s container)."""
    out = []
    for item in container:
        out.extend(_artists(item) if isinstance(item, (list, tuple)) else [item])
    return out


def _spread_coinciding(ax: Any, drawn: list[tuple[Any, str, float, float]]) -> list[Any]:
    """Move coinciding markers apart (``marker_offsets``); returns, per point, the transform (data → display)
    its label is placed with: right of its group's last marker."""
    from matplotlib.transforms import offset_copy

    to_points = 72.0 / ax.figure.dpi
    disp = ax.transData.transform([(x, y) for _, _, x, y in drawn]) if drawn else []
    offsets = marker_offsets([(float(dx) * to_points, float(dy) * to_points) for dx, dy in disp])
    transforms = []
    for (artist, _, _, _), (dx, right) in zip(drawn, offsets, strict=True):
        if dx:
            moved = offset_copy(ax.transData, fig=ax.figure, x=dx, y=0.0, units="points")
            for part in _artists(artist):
                part.set_transform(moved)
        transforms.append(offset_copy(ax.transData, fig=ax.figure, x=right, y=0.0, units="points"))
    return transforms


def _place_labels(ax: Any, drawn: list[tuple[Any, str, float, float]], transforms: list[Any]) -> None:
    """Annotate the points with their labels in their marker's colour, nudged apart where they would
    overlap."""
    if not drawn:
        return
    to_points = 72.0 / ax.figure.dpi
    disp = [t.transform((x, y)) for t, (_, _, x, y) in zip(transforms, drawn, strict=True)]
    points = [(float(dx) * to_points, float(dy) * to_points) for dx, dy in disp]
    for (artist, text, x, y), t, off in zip(drawn, transforms, label_offsets(points), strict=True):
        moved = abs(off[1] - 4.0) > 1e-6
        colour = _artists(artist)[0].get_color()
        ax.annotate(text, (x, y), xycoords=t, textcoords="offset points", xytext=off, fontsize=7, va="center",
                    color=colour, arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if moved else None)


def granularities_differ(rows: list[dict[str, Any]]) -> bool:
    """Whether the table needs a granularity column (rows of more than one granularity)."""
    return len({r.get("granularity", "unstructured") for r in rows}) > 1


def format_row(row: dict[str, Any]) -> dict[str, str]:
    """Strings for the rich table."""
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f}"

    acc = pct(row["accuracy_mean"])
    if row["accuracy_std"] is not None and row["runs"] > 1:
        acc += f" ± {100 * row['accuracy_std']:.2f}"
    return {
        "method": row["method"], "sparsity": "—" if row["method"] == "dense" else f"{row['sparsity']:g}",
        "granularity": row.get("granularity", "unstructured"), "accuracy": acc, "best": pct(row["best_accuracy_mean"]),
        "realized": "—" if row["realized_sparsity"] is None else f"{row['realized_sparsity']:.4f}",
        "train_flops": "—" if row["train_flops_vs_dense"] is None else f"{row['train_flops_vs_dense']:.3f}×",
        "inference_flops": "—" if row["inference_flops_vs_dense"] is None
        else f"{row['inference_flops_vs_dense']:.3f}×",
        "params": "—" if row["params_nonzero"] is None else f"{row['params_nonzero']:,.0f}",
        "seconds": "—" if row["train_seconds_mean"] is None or math.isnan(row["train_seconds_mean"])
        else f"{row['train_seconds_mean']:.1f}",
        "bpc": "—" if row.get("bpc_mean") is None else f"{row['bpc_mean']:.3f}"
        + (f" ± {row['bpc_std']:.3f}" if row.get("bpc_std") is not None and row["runs"] > 1 else ""),
    }
