"""Dataset loaders: shapes, dtypes, normalisation numbers, splits, and one clear error per bad input."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from sparsekit.data import DATASETS, Dataset, list_datasets, load_dataset
from sparsekit.errors import InputError


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def assert_input_error(match: str, fn, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert match in message, message
    assert "\n" not in message
    assert info.value.exit_code == 2
    return info.value


# ---------------------------------------------------------------- registry datasets


def test_digits_is_real_8x8_images_with_seeded_80_20_split():
    ds = load_dataset("digits", seed=0)
    assert isinstance(ds, Dataset)
    assert (ds.name, ds.kind, ds.num_classes, ds.input_shape) == ("digits", "image", 10, (1, 8, 8))
    assert ds.x_train.shape == (1438, 1, 8, 8) and ds.x_test.shape == (359, 1, 8, 8)  # 1797 × 0.2 → 359
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # Global normalisation (some pixels are constant 0, so not per feature): train mean 0, std 1.
    assert ds.normalization["per_feature"] is False
    assert abs(float(ds.x_train.double().mean())) < 1e-6
    assert abs(float(ds.x_train.double().std(unbiased=False)) - 1.0) < 1e-5
    # The recorded stats are those of the raw [0, 1] pixels: mean ≈ 4.88/16.
    assert 0.28 < ds.normalization["mean"] < 0.33
    info = ds.info()
    json.dumps(info)
    assert info["split"].startswith("seeded val_fraction=0.2")
    assert (info["n_train"], info["n_test"], info["input_shape"]) == (1438, 359, [1, 8, 8])


def test_seeded_split_is_deterministic_and_seed_dependent():
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)


def test_val_fraction_sets_test_size_and_is_validated():
    ds = load_dataset("digits", val_fraction=0.5)
    assert ds.x_test.shape[0] == 899  # floor(1797 × 0.5 + 0.5) = 899
    assert ds.x_test.shape[0] + ds.x_train.shape[0] == 1797
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        assert_input_error("--val-fraction", load_dataset, "digits", val_fraction=bad)


def test_synthetic_defaults_and_parameters():
    ds = load_dataset("synthetic")
    assert (ds.kind, ds.input_shape, ds.num_classes) == ("tabular", (20,), 4)
    assert ds.x_train.shape == (512, 20) and ds.x_test.shape == (128, 20)
    assert ds.split == "given" and ds.normalization["per_feature"] is True
    assert len(ds.normalization["mean"]) == 20
    # Per-feature normalisation: every train column has mean 0, std 1.
    assert torch.allclose(ds.x_train.double().mean(0), torch.zeros(20, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(
        ds.x_train.double().std(0, unbiased=False), torch.ones(20, dtype=torch.float64), atol=1e-5
    )
    small = load_dataset("synthetic:n=40,test=10,features=3,classes=5")
    assert small.x_train.shape == (40, 3) and small.x_test.shape == (10, 3) and small.num_classes == 5
    assert torch.equal(load_dataset("synthetic").x_train, ds.x_train)  # data independent of training seed
    assert not torch.equal(load_dataset("synthetic:seed=1").x_train, ds.x_train)


def test_synthetic_image_is_image_shaped():
    ds = load_dataset("synthetic-image:n=64,test=16,channels=3,size=6")
    assert (ds.kind, ds.input_shape, ds.num_classes) == ("image", (3, 6, 6), 4)
    assert ds.x_train.shape == (64, 3, 6, 6)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("synthetic:n=x", "not an integer"),
        ("synthetic:bogus=3", "bad parameter"),
        ("synthetic:n=3,classes=4", "smaller than classes"),
        ("synthetic:classes=1", "classes"),
        ("synthetic:n=8,n=9", "twice"),
        ("digits:foo", "no parameters"),
    ],
)
def test_bad_synthetic_specs(spec, match):
    assert_input_error(match, load_dataset, spec)


def test_list_datasets_has_every_spec_kind():
    rows = list_datasets()
    assert [r["name"] for r in rows] == list(DATASETS)
    assert {"digits", "synthetic", "synthetic-image", "npz", "csv", "folder"} <= set(DATASETS)
    assert all(r["description"] and "\n" not in r["description"] and r["example"] for r in rows)


# ---------------------------------------------------------------- npz


def test_npz_uint8_images_gain_channel_axis_and_are_scaled(tmp_path):
    x = np.zeros((10, 4, 4), dtype=np.uint8)
    x[:, 0, 0] = 255  # one pixel 1.0 after /255, rest 0
    y = np.arange(10) % 2
    ds = load_dataset(save_npz(tmp_path / "a.npz", x=x, y=y), val_fraction=0.2)
    assert (ds.kind, ds.input_shape, ds.num_classes, ds.name) == ("image", (1, 4, 4), 2, "npz")
    assert ds.x_train.shape == (8, 1, 4, 4) and ds.x_test.shape == (2, 1, 4, 4)
    # Raw values in [0,1]: mean 1/16, std sqrt(1/16 · 15/16) = sqrt(15)/16.
    assert ds.normalization["mean"] == pytest.approx(1 / 16)
    assert ds.normalization["std"] == pytest.approx(15**0.5 / 16)
    assert float(ds.x_train[0, 0, 0, 0]) == pytest.approx((1 - 1 / 16) / (15**0.5 / 16), rel=1e-5)


def test_npz_given_split_nhwc_to_nchw(tmp_path):
    rng = np.random.default_rng(0)
    xtr = rng.random((6, 5, 5, 3)).astype(np.float32)
    xte = rng.random((2, 5, 5, 3)).astype(np.float32)
    spec = save_npz(
        tmp_path / "b.npz",
        x_train=xtr,
        y_train=np.array([0, 1, 2, 0, 1, 2]),
        x_test=xte,
        y_test=np.array([2, 0]),
    )
    ds = load_dataset(spec)
    assert ds.split == "given" and ds.input_shape == (3, 5, 5) and ds.num_classes == 3
    mean, std = float(xtr.astype(np.float64).mean()), float(xtr.astype(np.float64).std())
    expected = (xte.transpose(0, 3, 1, 2).astype(np.float64) - mean) / std
    np.testing.assert_allclose(ds.x_test.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_npz_tabular_per_feature_or_global(tmp_path):
    x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [7.0, 70.0]] * 3)
    y = np.array([0, 1] * 6)
    ds = load_dataset(save_npz(tmp_path / "t.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2]))
    assert ds.normalization == {
        "mean": [4.0, 40.0],
        "std": pytest.approx([5**0.5, 500**0.5]),
        "per_feature": True,
        "scale": 1.0,
    }
    x_const = x.copy()
    x_const[:, 1] = 2.0  # a constant feature: per-feature std would be 0 → global stats
    ds = load_dataset(
        save_npz(tmp_path / "c.npz", x_train=x_const, y_train=y, x_test=x_const[:2], y_test=y[:2])
    )
    assert ds.normalization["per_feature"] is False
    assert ds.normalization["mean"] == pytest.approx(3.0)


def test_npz_integral_float_labels_accepted(tmp_path):
    ds = load_dataset(
        save_npz(tmp_path / "f.npz", x=np.ones((10, 2)) * np.arange(10)[:, None], y=np.array([0.0, 1.0] * 5))
    )
    assert ds.y_train.dtype == torch.int64 and ds.num_classes == 2


def write_truncated(path):
    np.savez(path, x=np.zeros((50, 3)), y=np.arange(50) % 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_corrupt(path):
    np.savez(path, x=np.zeros((50, 3)), y=np.arange(50) % 2)
    data = bytearray(path.read_bytes())
    data[60:200] = b"\xff" * 140
    path.write_bytes(bytes(data))


NPZ_ERRORS = [
    ("empty file", lambda p: p.write_bytes(b""), "empty"),
    ("not a zip", lambda p: p.write_text("hello"), "cannot read"),
    ("truncated", write_truncated, "cannot read"),
    ("corrupt", write_corrupt, "cannot read"),
    ("object array", lambda p: np.savez(p, x=np.array([[1, "a"]], dtype=object), y=np.array([0])), "object"),
    ("wrong keys", lambda p: np.savez(p, a=np.zeros((4, 2)), b=np.zeros(4)), "expected x,y"),
    (
        "both key sets",
        lambda p: np.savez(
            p,
            x=np.zeros((4, 2)),
            y=np.zeros(4),
            x_train=np.zeros((4, 2)),
            y_train=np.zeros(4),
            x_test=np.zeros((4, 2)),
            y_test=np.zeros(4),
        ),
        "ambiguous",
    ),
    ("length mismatch", lambda p: np.savez(p, x=np.zeros((5, 2)), y=np.array([0, 1, 0, 1])), "5 samples"),
    ("nan", lambda p: np.savez(p, x=np.array([[0.0, np.nan]] * 4), y=np.array([0, 1, 0, 1])), "NaN"),
    (
        "inf",
        lambda p: np.savez(p, x=np.array([[0.0, np.inf]] * 4), y=np.array([0, 1, 0, 1])),
        "NaN or infinite",
    ),
    (
        "negative label",
        lambda p: np.savez(p, x=np.zeros((4, 2)), y=np.array([0, -1, 0, 1])),
        "negative label",
    ),
    (
        "fractional label",
        lambda p: np.savez(p, x=np.zeros((4, 2)), y=np.array([0, 0.5, 0, 1])),
        "non-integer",
    ),
    ("string labels", lambda p: np.savez(p, x=np.zeros((4, 2)), y=np.array(["a", "b", "a", "b"])), "dtype"),
    ("string x", lambda p: np.savez(p, x=np.array([["a"]] * 4), y=np.array([0, 1, 0, 1])), "dtype"),
    (
        "one-hot labels",
        lambda p: np.savez(p, x=np.zeros((4, 2)), y=np.eye(2)[[0, 1, 0, 1]]),
        "one integer label",
    ),
    ("5-d x", lambda p: np.savez(p, x=np.zeros((4, 2, 2, 2, 2)), y=np.array([0, 1, 0, 1])), "expected N×F"),
    (
        "ambiguous nchw/nhwc",
        lambda p: np.savez(p, x=np.zeros((4, 3, 5, 3)), y=np.array([0, 1, 0, 1])),
        "ambiguous image shape",
    ),
    (
        "class missing from train",
        lambda p: np.savez(
            p,
            x_train=np.zeros((4, 2)),
            y_train=np.array([0, 1, 0, 1]),
            x_test=np.zeros((2, 2)),
            y_test=np.array([2, 0]),
        ),
        "class(es) 2 of 0..2 have no training sample",
    ),
    ("gap in labels", lambda p: np.savez(p, x=np.zeros((10, 2)), y=np.array([0, 2] * 5)), "class(es) 1"),
    (
        "train/test shape mismatch",
        lambda p: np.savez(
            p,
            x_train=np.zeros((4, 2)),
            y_train=np.array([0, 1, 0, 1]),
            x_test=np.zeros((2, 3)),
            y_test=np.array([1, 0]),
        ),
        "same per-sample shape",
    ),
    ("single npy", lambda p: np.save(open(p, "wb"), np.zeros(3)), "single .npy"),
]


@pytest.mark.parametrize("case, write, match", NPZ_ERRORS, ids=[c[0] for c in NPZ_ERRORS])
def test_bad_npz_files_are_one_line_input_errors_naming_the_file(tmp_path, case, write, match):
    path = tmp_path / "bad.npz"
    write(path)
    err = assert_input_error(match, load_dataset, f"npz:{path}")
    assert "bad.npz" in str(err)


def test_npz_missing_file_and_missing_path(tmp_path):
    assert_input_error("not found", load_dataset, f"npz:{tmp_path / 'nope.npz'}")
    assert_input_error("no path", load_dataset, "npz:")
    assert_input_error("is a folder", load_dataset, f"npz:{tmp_path}")


def test_bare_paths_and_unknown_names_are_refused_not_guessed(tmp_path):
    assert_input_error("write --data npz:data.npz", load_dataset, "data.npz")
    assert_input_error("write --data csv:t.csv", load_dataset, "t.csv")
    assert_input_error(f"write --data folder:{tmp_path}", load_dataset, str(tmp_path))
    assert_input_error("did you mean 'digits'", load_dataset, "digit")
    assert_input_error("empty data spec", load_dataset, "  ")


def test_options_for_other_formats_are_refused():
    assert_input_error("--label-column", load_dataset, "digits", label_column=0)
    assert_input_error("--image-size", load_dataset, "digits", image_size=16)
    assert_input_error("--channels", load_dataset, "synthetic", channels=3)


# ---------------------------------------------------------------- csv


def test_csv_without_header_label_last(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("1,2,0\n3,4,1\n5,6,0\n7,8,1\n9,10,0\n")
    ds = load_dataset(f"csv:{p}", val_fraction=0.2)
    assert (ds.kind, ds.input_shape, ds.num_classes, ds.name) == ("tabular", (2,), 2, "csv")
    assert ds.x_train.shape == (4, 2) and ds.x_test.shape == (1, 2)


def test_csv_with_header_and_named_label_column(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("label,a,b\n0,1,10\n1,2,20\n0,3,30\n1,4,40\n2,5,50\n2,6,60\n")
    ds = load_dataset(f"csv:{p}", label_column="label", val_fraction=0.2, seed=1)
    assert ds.input_shape == (2,) and ds.num_classes == 3
    assert ds.x_train.shape == (5, 2) and ds.x_test.shape == (1, 2)
    # Column 'a' is 1..6 and 'b' = 10 × 'a': after normalisation the two columns are equal.
    assert torch.allclose(ds.x_train[:, 0], ds.x_train[:, 1], atol=1e-5)
    # Index form (and its string form from the CLI) gives the same data.
    same = load_dataset(f"csv:{p}", label_column=0, val_fraction=0.2, seed=1)
    assert torch.equal(same.x_train, ds.x_train)
    assert torch.equal(
        load_dataset(f"csv:{p}", label_column="0", val_fraction=0.2, seed=1).y_train, ds.y_train
    )


@pytest.mark.parametrize(
    "text, kwargs, match",
    [
        ("", {}, "empty"),
        ("a,b\n", {}, "no data rows"),
        ("\n\n", {}, "no rows"),
        ("1,2,0\n3,x,1\n", {}, "non-numeric value 'x' at row 2, column 2"),
        ("1,2,0\n3,4\n", {}, "row 2 has 2 columns"),
        ("1,2,0\n3,4,-1\n5,6,1\n", {}, "negative label"),
        ("1,2,0.5\n3,4,1\n5,6,1\n", {}, "non-integer"),
        ("1,nan,0\n3,4,1\n5,6,1\n", {}, "NaN"),
        ("1\n2\n", {}, "need features and a label"),
        ("a,b\n1,0\n2,1\n", {"label_column": "c"}, "label column 'c' not found"),
        ("1,0\n2,1\n", {"label_column": 5}, "out of range"),
    ],
)
def test_bad_csv_files(tmp_path, text, kwargs, match):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    err = assert_input_error(match, load_dataset, f"csv:{p}", **kwargs)
    assert "bad.csv" in str(err)


# ---------------------------------------------------------------- folder


def make_image_folder(root, colours):
    from PIL import Image

    for cls, colour in colours.items():
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (10 + i, 12), colour).save(root / cls / f"{i}.png")


def test_folder_grayscale_detected_and_resized(tmp_path):
    make_image_folder(tmp_path, {"b_dark": (0, 0, 0), "a_light": (255, 255, 255)})
    ds = load_dataset(f"folder:{tmp_path}", image_size=6, val_fraction=0.25)
    assert (ds.kind, ds.input_shape, ds.num_classes, ds.name) == ("image", (1, 6, 6), 2, "folder")
    assert ds.x_train.shape == (6, 1, 6, 6) and ds.x_test.shape == (2, 1, 6, 6)
    # Sorted class names: a_light → 0 (value 1.0), b_dark → 1 (value 0.0); half and half → mean 0.5.
    assert ds.normalization["mean"] == pytest.approx(float((ds.y_train == 0).double().mean()), abs=1e-9)
    assert float(ds.x_train[ds.y_train == 0].mean()) > 0 > float(ds.x_train[ds.y_train == 1].mean())


def test_folder_colour_detected_default_size_and_channels_override(tmp_path):
    make_image_folder(tmp_path, {"red": (255, 0, 0), "blue": (0, 0, 255)})
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.input_shape == (3, 32, 32)
    assert load_dataset(f"folder:{tmp_path}", channels=1, image_size=8).input_shape == (1, 8, 8)


def test_folder_mixed_gray_and_colour_gives_rgb(tmp_path):
    from PIL import Image

    make_image_folder(tmp_path, {"a": (10, 10, 10), "b": (200, 200, 200)})
    Image.new("L", (7, 7), 128).save(tmp_path / "a" / "gray.png")
    assert load_dataset(f"folder:{tmp_path}", image_size=4).input_shape == (1, 4, 4)
    Image.new("RGB", (7, 7), (0, 255, 0)).save(tmp_path / "b" / "green.png")
    ds = load_dataset(f"folder:{tmp_path}", image_size=4, val_fraction=0.1)
    assert ds.input_shape == (3, 4, 4) and ds.x_train.shape[0] + ds.x_test.shape[0] == 10


def test_folder_errors(tmp_path):
    make_image_folder(tmp_path / "ok", {"a": (0, 0, 0), "b": (9, 9, 9)})
    (tmp_path / "ok" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_input_error("broken.png", load_dataset, f"folder:{tmp_path / 'ok'}")
    (tmp_path / "one" / "only").mkdir(parents=True)
    assert_input_error("1 class subfolder", load_dataset, f"folder:{tmp_path / 'one'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    assert_input_error("has no images", load_dataset, f"folder:{tmp_path / 'empty'}")
    assert_input_error("not found", load_dataset, f"folder:{tmp_path / 'missing'}")
    assert_input_error("--channels", load_dataset, f"folder:{tmp_path / 'ok'}", channels=2)
    assert_input_error("--image-size", load_dataset, f"folder:{tmp_path / 'ok'}", image_size=0)
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert_input_error("not a folder", load_dataset, f"folder:{f}")


def test_zip_error_types_are_all_caught(tmp_path):
    """A zip whose member has a bad CRC raises BadZipFile on read, after the archive opened fine."""
    p = tmp_path / "crc.npz"
    np.savez(p, x=np.arange(40.0).reshape(20, 2), y=np.arange(20) % 2)
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("x.npy")
    data = bytearray(p.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 130
    data[start] ^= 0xFF  # flip one byte inside the array data (uncompressed savez)
    p.write_bytes(bytes(data))
    assert_input_error("crc.npz", load_dataset, f"npz:{p}")


# ---------------------------------------------------------------- bench/make_digits28.py


def test_make_digits28_script_writes_loadable_mnist_shaped_npz(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "make_digits28.py"
    spec = importlib.util.spec_from_file_location("make_digits28", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train_idx, test_idx = module.split_originals(1797, seed=0, test_fraction=0.2)
    assert len(test_idx) == 359 and not set(train_idx) & set(test_idx)  # originals split first
    out = tmp_path / "d28.npz"
    assert module.main(["--out", str(out), "--seed", "0", "--train", "200", "--test", "50"]) == 0
    with np.load(out, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert arrays["x_train"].shape == (200, 28, 28) and arrays["x_train"].dtype == np.uint8
    assert arrays["x_test"].shape == (50, 28, 28) and arrays["y_test"].dtype == np.int64
    # Digits sit in the middle like MNIST's: the outer 2-pixel frame is nearly empty.
    x = arrays["x_train"].astype(np.float64)
    assert x[:, :2, :].mean() < 0.05 * x[:, 8:20, 8:20].mean()
    again = module.make_digits28(seed=0, n_train=200, n_test=50)
    assert all(np.array_equal(again[k], arrays[k]) for k in arrays)  # deterministic for a seed
    ds = load_dataset(f"npz:{out}")
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.split == "given"


# ---------------------------------------------------------------- bench/make_mnist_subset.py


def _write_idx(path, arr: np.ndarray, gz: bool = False) -> None:
    import gzip

    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_make_mnist_subset_reads_idx_files_and_draws_a_seeded_subset(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "make_mnist_subset.py"
    spec = importlib.util.spec_from_file_location("make_mnist_subset", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    xtr, xte = rng.integers(0, 256, (60, 28, 28)), rng.integers(0, 256, (20, 28, 28))
    ytr, yte = np.arange(60) % 10, np.arange(20) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte", xtr)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", ytr)
    _write_idx(tmp_path / "t10k-images.idx3-ubyte.gz", xte, gz=True)  # the other spelling, gzipped
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", yte)
    out = tmp_path / "sub.npz"
    args = ["--idx-dir", str(tmp_path), "--out", str(out), "--train", "30", "--test", "8", "--seed", "1"]
    assert module.main(args) == 0
    with np.load(out, allow_pickle=False) as f:
        a = {k: f[k] for k in f.files}
    j = np.random.default_rng(1)
    i, j = j.permutation(60)[:30], j.permutation(20)[:8]
    assert np.array_equal(a["x_train"], xtr[i]) and np.array_equal(a["y_train"], ytr[i])
    assert np.array_equal(a["x_test"], xte[j]) and a["y_test"].dtype == np.int64
    ds = load_dataset(f"npz:{out}")
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(SystemExit, match="no train-labels-idx1-ubyte"):
        module.main(args)
