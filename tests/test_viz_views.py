"""``sparsekit viz``'s per-layer views: the view picked per layer type, the drawn values equal densities
recomputed from the masks, titles that do not overlap, and coinciding points in ``compare.png`` kept apart."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import AxesImage

from sparsekit import viz
from sparsekit.compare import accuracy_figure, marker_offsets
from sparsekit.run_dir import RunDir
from sparsekit.viz_views import block_density, layer_view, layer_views

RNG = np.random.default_rng(0)


def _mask(*shape: int, p: float = 0.3) -> np.ndarray:
    return RNG.random(shape) < p


def _loop_density(mask: np.ndarray, keep: int) -> np.ndarray:
    """Density per index of axis ``keep``, counted one slice at a time (independent of the views' reductions)."""
    return np.array([np.count_nonzero(np.take(mask, i, axis=keep)) / np.take(mask, i, axis=keep).size
                     for i in range(mask.shape[keep])])


# ---------------------------------------------------------------- the view per layer type, on synthetic masks

def test_conv_layer_gets_channel_and_kernel_position_densities():
    m = _mask(6, 3, 3, 5)
    view = layer_view("stage1.conv1.weight", m, first=True, image=(3, 8, 8))
    assert view is not None and view.kind == "conv"
    out, inp, kernel = (p.values for p in view.panels)
    np.testing.assert_allclose(out, _loop_density(m, 0))
    np.testing.assert_allclose(inp, _loop_density(m, 1))
    assert kernel.shape == (3, 5)
    for r, c in itertools.product(range(3), range(5)):
        assert kernel[r, c] == pytest.approx(np.count_nonzero(m[:, :, r, c]) / 18)
    assert view.density == pytest.approx(m.mean())


def test_packed_qkv_projection_is_split_into_q_k_v_and_heads():
    d, heads = 16, 4
    m = _mask(3 * d, d)
    view = layer_view("encoder.layers.0.self_attn.in_proj_weight", m, heads=heads)
    assert view is not None and view.kind == "attention-qkv"
    grid = view.panels[0]
    assert grid.values.shape == (3, heads) and grid.yticklabels == ["q", "k", "v"]
    for b, h in itertools.product(range(3), range(heads)):
        rows = m[b * d + h * (d // heads): b * d + (h + 1) * (d // heads)]
        assert grid.values[b, h] == pytest.approx(rows.mean())
    np.testing.assert_allclose(view.panels[1].values, _loop_density(m, 1))
    # head count unknown: per q/k/v output unit; a [3d, d] weight with heads but another name: q/k/v too
    per_unit = layer_view("blocks.0.attn.qkv.weight", m).panels[0].values
    np.testing.assert_allclose(per_unit, m.reshape(3, d, d).mean(axis=2))
    assert layer_view("attn_pack.weight", m, heads=heads).kind == "attention-qkv"


def test_attention_out_projection_is_split_per_input_head_and_other_linears_per_unit():
    m = _mask(16, 16)
    view = layer_view("encoder.layers.0.self_attn.out_proj.weight", m, heads=4)
    assert view.kind == "attention-out"
    np.testing.assert_allclose(view.panels[0].values, [m[:, 4 * h:4 * h + 4].mean() for h in range(4)])
    ff = _mask(64, 16)
    lin = layer_view("encoder.layers.0.linear1.weight", ff, heads=4)
    assert lin.kind == "linear"
    np.testing.assert_allclose(lin.panels[0].values, _loop_density(ff, 0))
    np.testing.assert_allclose(lin.panels[1].values, _loop_density(ff, 1))
    assert layer_view("encoder.layers.0.self_attn.out_proj.weight", m).kind == "linear"  # heads unknown


def test_first_mlp_layer_on_images_gets_the_pixel_image_and_later_layers_do_not():
    m = _mask(16, 2 * 8 * 8)
    view = layer_view("fc1.weight", m, image=(2, 8, 8), first=True)
    assert view.kind == "image-input"
    pixels = view.panels[0].values
    assert pixels.shape == (8, 8)
    assert pixels[2, 5] == pytest.approx((m[:, 2 * 8 + 5].sum() + m[:, 64 + 2 * 8 + 5].sum()) / 32)
    assert layer_view("fc2.weight", _mask(8, 128), image=(2, 8, 8), first=False).kind == "linear"
    assert layer_view("fc1.weight", _mask(8, 100), image=(2, 8, 8), first=True).kind == "linear"
    assert layer_view("fc1.weight", m, image=None, first=True).kind == "linear"
    assert layer_view("bias", _mask(8)) is None


def test_recurrent_weights_are_split_per_gate():
    hidden = 6
    masks = {"rnn.weight_ih_l0": _mask(3 * hidden, 5), "rnn.weight_hh_l0": _mask(3 * hidden, hidden)}
    view = layer_view("rnn.weight_ih_l0", masks["rnn.weight_ih_l0"], masks=masks)
    assert view.kind == "gates" and view.panels[0].yticklabels == ["r", "z", "n"]
    np.testing.assert_allclose(view.panels[0].values[1], masks["rnn.weight_ih_l0"][hidden:2 * hidden].mean(axis=1))


def test_block_map_averages_blocks_and_keeps_small_masks_whole():
    m = _mask(100, 130)
    blocks = block_density(m)
    assert blocks.shape == (48, 64)
    assert blocks[0, 0] == pytest.approx(m[:2, :2].mean())  # linspace edges: 100/48 → first block 2 rows
    small = _mask(10, 12)
    np.testing.assert_array_equal(block_density(small), small.astype(float))


def test_layer_order_follows_the_summary_and_first_means_the_models_first_layer():
    masks = {"b.weight": _mask(8, 64), "a.weight": _mask(16, 64)}
    summary = {"layers": [{"name": "dense_in.weight"}, {"name": "a.weight"}, {"name": "b.weight"}]}
    views = layer_views(masks, summary, (1, 8, 8))
    assert [v.name for v in views] == ["a.weight", "b.weight"]
    assert [v.kind for v in views] == ["linear", "linear"]  # the model's first layer is dense: no image view


def test_non_image_inputs_are_not_folded_into_images():
    assert viz.image_shape([16], 64, "sequence") is None  # a Transformer's embedding width
    assert viz.image_shape([16], 64) is None
    assert viz.image_shape([64], 64, "tabular") is None
    assert viz.image_shape([64], 64, "image") == (8, 8)


# ---------------------------------------------------------------- tiny runs, drawn

TINY = {
    "mlp": ["--model", "mlp", "--data", "synthetic-image:n=32,test=16,size=8,channels=1",
            "--model-kwargs", "hidden=16,8"],
    "resnet20": ["--model", "resnet20", "--data", "synthetic-image:n=32,test=16,size=8,channels=3",
                 "--model-kwargs", "width=0.125"],
    "char-transformer": ["--model", "char-transformer", "--model-kwargs", "width=0.0625", "--seq-len", "8"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from conftest import run_cli

    root = tmp_path_factory.mktemp("vizruns")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = {}
    for name, args in TINY.items():
        if name.startswith("char-"):
            args = [*args, "--data", f"text:{corpus}"]
        out[name] = root / name
        res = run_cli(["train", *args, "--method", "rigl", "--sparsity", "0.8", "--steps", "6",
                       "--update-interval", "2", "--batch-size", "8", "--device", "cpu", "--out", str(out[name]),
                       "-q"])
        assert res.exit_code == 0, res.stderr
    return out


def _figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every figure ``viz`` saves, by file name (kept open for inspection)."""
    saved: dict[str, Any] = {}
    real = viz._save

    def keep(fig: Any, path: Path) -> None:
        saved[path.name] = fig
        real(fig, path)

    monkeypatch.setattr(viz, "_save", keep)
    return saved


def _drawn_values(fig: Any) -> list[np.ndarray]:
    """Per axes with data, in drawing order: bar heights or the heat map's array."""
    out = []
    for ax in fig.get_axes():
        images = [a for a in ax.get_children() if isinstance(a, AxesImage)]
        if images:
            out.append(np.asarray(images[0].get_array(), dtype=float))
        elif ax.patches:
            out.append(np.array([p.get_height() for p in ax.patches]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_drawn_layer_panels_equal_densities_from_the_masks(runs, tmp_path, monkeypatch, name):
    saved = _figures(monkeypatch)
    result = viz.visualize(runs[name], tmp_path)
    assert "layers.png" in {Path(f).name for f in result["files"]}
    run = RunDir(runs[name])
    masks = run.masks()
    views = layer_views(masks, run.summary(), None if name == "char-transformer" else
                        tuple(run.summary()["data"]["input_shape"]))
    kinds = {v.name: v.kind for v in views}
    if name == "resnet20":
        assert set(kinds.values()) == {"conv"} | ({"linear"} if any(m.ndim == 2 for m in masks.values()) else set())
    elif name == "mlp":
        assert kinds["fc1.weight"] == "image-input" and kinds["fc2.weight"] == "linear"
    else:
        assert kinds["encoder.layers.0.self_attn.in_proj_weight"] == "attention-qkv"
        assert kinds["encoder.layers.0.self_attn.out_proj.weight"] == "attention-out"
        assert kinds["encoder.layers.0.linear1.weight"] == "linear"
        qkv = next(v for v in views if v.kind == "attention-qkv")
        assert qkv.panels[0].values.shape == (3, 4)  # the zoo's char-transformer has 4 heads
    drawn = list(itertools.chain.from_iterable(
        _drawn_values(saved["layers.png" if i == 1 else f"layers-{i}.png"]) for i in range(1, 9)
        if ("layers.png" if i == 1 else f"layers-{i}.png") in saved))
    expected = []
    for v in views:
        m = masks[v.name]
        assert v.density == pytest.approx(np.count_nonzero(m) / m.size)
        expected += [p.values for p in v.panels]
    assert len(drawn) == len(expected)
    for got, want in zip(drawn, expected, strict=True):
        np.testing.assert_allclose(got, want)
    for v in views:  # and the views themselves against the masks, counted independently
        m = masks[v.name]
        if v.kind in ("conv", "linear"):
            np.testing.assert_allclose(v.panels[0].values, _loop_density(m, 0))


@pytest.mark.slow
def test_connectivity_of_a_transformer_is_a_table_over_updates_not_an_image(runs, tmp_path, monkeypatch):
    saved = _figures(monkeypatch)
    result = viz.visualize(runs["char-transformer"], tmp_path)
    names = {Path(f).name for f in result["files"]}
    assert "connectivity.png" in names and "connectivity.gif" not in names
    updates = [u for u in RunDir(runs["char-transformer"]).updates() if "input_fanout" in u]
    (table,) = _drawn_values(saved["connectivity.png"])
    np.testing.assert_array_equal(table, [u["input_fanout"] for u in updates])
    assert table.shape == (len(updates), 16) and len(updates) >= 3  # d_model 16 features, one row per update
    assert saved["connectivity.png"].axes[0].get_xlabel() == "input feature"


@pytest.mark.slow
def test_connectivity_of_a_cnn_counts_per_input_channel_over_updates(runs, tmp_path, monkeypatch):
    saved = _figures(monkeypatch)
    names = {Path(f).name for f in viz.visualize(runs["resnet20"], tmp_path)["files"]}
    assert "connectivity.gif" not in names
    updates = [u for u in RunDir(runs["resnet20"]).updates() if "input_fanout" in u]
    (table,) = _drawn_values(saved["connectivity.png"])
    np.testing.assert_array_equal(table, [u["input_fanout"] for u in updates])
    assert table.shape[1] == 3 and saved["connectivity.png"].axes[0].get_xlabel() == "input channel"


def _text_boxes(fig: Any) -> list[tuple[str, Any]]:
    """Screen boxes of every title, suptitle (figure and row), axis label and tick label that shows text."""
    canvas = FigureCanvasAgg(fig)  # viz closed the figure (its canvas went back to the base class)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [f._suptitle for f in (fig, *fig.subfigs) if f._suptitle is not None]
    texts += [t for ax in fig.get_axes() for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    for ax in fig.get_axes():  # the tick labels drawn: those inside the view
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        texts += [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]
        texts += [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_titles_and_labels_do_not_overlap(runs, tmp_path, monkeypatch, name):
    saved = _figures(monkeypatch)
    viz.visualize(runs[name], tmp_path)
    assert {"layers.png", "density.png", "connectivity.png"} <= set(saved)  # curves.png: after an epoch
    for file, fig in saved.items():
        boxes = _text_boxes(fig)
        assert len(boxes) >= 6, file
        for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), f"{file}: {ta!r} overlaps {tb!r}"


# ---------------------------------------------------------------- compare.png

def test_coinciding_points_are_spread_and_lone_points_stay():
    offs = marker_offsets([(100.0, 50.0), (100.0, 50.0), (100.0, 50.5), (300.0, 50.0), (100.0, 80.0)],
                          spacing=11.0)
    assert [o[0] for o in offs] == [-11.0, 0.0, 11.0, 0.0, 0.0]  # in the order given; another height: alone
    assert [o[1] for o in offs[:3]] == [11.0, 11.0, 11.0] and offs[3] == offs[4] == (0.0, 0.0)
    # a neighbour the spread cluster would now hide joins it; x order is kept
    xs = [p + o[0] for p, o in zip([100.0, 100.0, 115.0], marker_offsets([(100.0, 0.0), (100.0, 0.0),
                                                                          (115.0, 0.0)]), strict=True)]
    assert xs == sorted(xs) and min(b - a for a, b in itertools.pairwise(xs)) == pytest.approx(11.0)


def test_compare_figure_draws_identical_results_at_different_places():
    def row(method: str, sparsity: float, acc: float, flops: float) -> dict[str, Any]:
        return {"method": method, "sparsity": sparsity, "accuracy_mean": acc, "accuracy_std": 0.0,
                "train_flops_vs_dense": flops, "bpc_mean": None}

    fig = accuracy_figure([row("dense", 0.0, 0.97, 1.0), row("rigl", 0.9, 0.95, 0.3), row("set", 0.9, 0.95, 0.3),
                           row("static", 0.9, 0.90, 0.5)])
    fig.canvas.draw()
    markers = {}
    for line in fig.axes[0].get_lines():
        if line.get_marker() not in (None, "None", "", "_") and len(line.get_xdata()) == 1 and line.get_label():
            x, y = line.get_transform().transform((line.get_xdata()[0], line.get_ydata()[0]))
            markers[matplotlib.colors.to_hex(line.get_color())] = (x, y)
    assert len(markers) == 4  # dense, rigl, set, static
    rigl, set_ = markers[matplotlib.colors.to_hex("C1")], markers[matplotlib.colors.to_hex("C2")]
    size_px = 9 * fig.dpi / 72
    assert rigl[1] == pytest.approx(set_[1]) and abs(rigl[0] - set_[0]) >= size_px  # side by side, not hidden
    static = markers[matplotlib.colors.to_hex("C3")]
    x, _ = fig.axes[0].transData.transform((0.5, 0.9))
    assert static[0] == pytest.approx(x)  # a point alone stays where its value is
    labels = [t for t in fig.axes[0].texts if t.get_text() in ("rigl 0.9", "set 0.9")]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert len(boxes) == 2 and not boxes[0].overlaps(boxes[1])


def test_readme_names_the_layers_figure():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "layers.png" in text
