"""Data the size of real work: cifar-bin, memory-mapped arrays, lazy folders, augmentation, workers, the CIFAR
preset. "Large" is simulated by lowering ``lazy.IN_MEMORY_BYTES``, so every test stays small and fast."""

from __future__ import annotations

import json
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from same_run import assert_same_run

from sparsekit.config import TrainConfig, build_config
from sparsekit.data import lazy, load_dataset, readers
from sparsekit.data.batches import crop_flip, crop_flip_params
from sparsekit.data.cifar import PIXELS
from sparsekit.errors import InputError
from sparsekit.schedules import LRSchedule
from sparsekit.training import Callbacks, train


def write_records(path: Path, labels: list[list[int]], seed: int) -> np.ndarray:
    """CIFAR binary records: the label bytes of each record, then 3,072 random pixel bytes; returns the pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (len(labels), PIXELS), dtype=np.uint8)
    np.concatenate([np.array(labels, dtype=np.uint8), pixels], axis=1).tofile(path)
    return pixels


def make_cifar10(root: Path, per_batch: int = 20, n_test: int = 30) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    pixels = [write_records(root / f"data_batch_{i}.bin", [[j % 10] for j in range(per_batch)], seed=i)
              for i in range(1, 6)]
    test = write_records(root / "test_batch.bin", [[j % 10] for j in range(n_test)], seed=9)
    return {"train": np.concatenate(pixels), "test": test}


def make_cifar100(root: Path, n: int = 200) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    labels = [[j % 20, j % 100] for j in range(n)]  # coarse, fine
    write_records(root / "test.bin", labels[:50], seed=2)
    (root / "fine_label_names.txt").write_text("\n".join(f"class{i}" for i in range(100)) + "\n")
    return write_records(root / "train.bin", labels, seed=1)


def assert_input_error(match: str, fn, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    assert match in info.value.message, info.value.message
    assert "\n" not in info.value.message
    return info.value


# ---------------------------------------------------------------- cifar-bin


def test_cifar10_bin_records_are_read_exactly(tmp_path):
    pixels = make_cifar10(tmp_path)
    (tmp_path / "batches.meta.txt").write_text("\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                          "frog", "horse", "ship", "truck"]) + "\n\n")
    raw = readers_cifar(tmp_path)
    assert raw["x_train"].shape == (100, 3, 32, 32) and raw["x_test"].shape == (30, 3, 32, 32)
    # the record's bytes are 1,024 red, then green, then blue, each 32 rows of 32: channel-first as stored
    assert np.array_equal(raw["x_train"].reshape(100, -1), pixels["train"])
    assert raw["x_train"][0, 1, 2, 3] == pixels["train"][0, 1024 + 2 * 32 + 3]
    assert raw["y_train"].tolist() == [j % 10 for j in range(20)] * 5
    assert raw["classes"][0] == "airplane" and len(raw["classes"]) == 10
    ds = load_dataset(f"cifar-bin:{tmp_path}")
    assert (ds.input_shape, ds.num_classes, ds.split, ds.kind) == ((3, 32, 32), 10, "given", "image")
    mean, std = ds.normalization["mean"], ds.normalization["std"]
    expected = (pixels["test"][:2].reshape(2, 3, 32, 32) / 255.0 - mean) / std
    np.testing.assert_allclose(ds.x_test[:2].numpy(), expected, rtol=1e-5, atol=1e-5)


def readers_cifar(root: Path) -> dict:
    from sparsekit.data.cifar import read_cifar_bin

    return read_cifar_bin(str(root))


def test_cifar100_bin_uses_the_fine_label(tmp_path):
    make_cifar100(tmp_path)
    raw = readers_cifar(tmp_path)
    assert raw["y_train"].tolist() == [j % 100 for j in range(200)]  # the second label byte, not j % 20
    assert raw["classes"][99] == "class99"
    assert load_dataset(f"cifar-bin:{tmp_path}").num_classes == 100


def truncate(root: Path) -> None:
    f = root / "data_batch_3.bin"
    f.write_bytes(f.read_bytes()[:-100])


def bad_label(root: Path) -> None:
    f = root / "test_batch.bin"
    data = bytearray(f.read_bytes())
    data[2 * (1 + PIXELS)] = 12  # record 2's label byte
    f.write_bytes(bytes(data))


CIFAR_ERRORS = [
    (truncate, "data_batch_3.bin is truncated or not CIFAR binary: 61360 bytes is not a whole number of "
               "3073-byte records (19 records + 2973 bytes)"),
    (bad_label, "test_batch.bin is corrupt: record 2 has label byte 12, outside 0..9"),
    (lambda r: (r / "data_batch_4.bin").unlink(), "is not a CIFAR binary folder: missing data_batch_4.bin"),
    (lambda r: (r / "test_batch.bin").write_bytes(b""), "test_batch.bin is truncated or not CIFAR binary: 0 bytes"),
]


@pytest.mark.parametrize("damage, match", CIFAR_ERRORS)
def test_corrupt_cifar_bin_is_one_error_line_exit_2(tmp_path, cli, damage, match):
    make_cifar10(tmp_path / "c")
    damage(tmp_path / "c")
    assert_input_error(match, load_dataset, f"cifar-bin:{tmp_path / 'c'}")
    result = cli(["train", "--data", f"cifar-bin:{tmp_path / 'c'}", "--model", "mlp", "--epochs", "1",
                  "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 2 and match in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_cifar_folder_says_nothing_is_downloaded(tmp_path):
    err = assert_input_error("CIFAR folder not found", load_dataset, f"cifar-bin:{tmp_path / 'nope'}")
    assert "downloads nothing" in err.message and "cs.toronto.edu" in err.message


def test_datasets_lists_the_new_spec_forms(cli):
    out = cli(["datasets"]).stdout + cli(["datasets", "--json"]).stdout
    assert "cifar-bin:cifar-10-batches-bin" in out and "npy:" in out


# ---------------------------------------------------------------- the CIFAR preset


def test_wrn_preset_is_the_papers_recipe():
    cfg = build_config("preset:wrn-22-2-cifar", {}, {})
    assert (cfg.model, cfg.method, cfg.sparsity, cfg.distribution) == ("wrn-22-2", "rigl", 0.9, "erk")
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == ("sgd", 0.1, 0.9, 5e-4, 128)
    assert (cfg.steps, cfg.augment, cfg.data) == (97656, "crop-flip", "cifar-bin:cifar-10-batches-bin")
    opts = cfg.method_options
    assert (opts["update_interval"], opts["drop_fraction"], opts["update_end"]) == (100, 0.3, 0.75)
    lr = LRSchedule(cfg.lr, cfg.steps, cfg.lr_schedule, milestones=tuple(cfg.lr_milestones))
    # ÷5 exactly at steps 30k, 60k and 90k
    assert [lr.lr(s) for s in (1, 29999, 30000, 59999, 60000, 89999, 90000, 97656)] == pytest.approx(
        [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008], rel=1e-12)


def readme_cifar_command() -> list[str]:
    """The README's CIFAR command, as written."""
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## CIFAR and data larger", 1)[1]
    line = next(ln for ln in section.splitlines() if ln.startswith("sparsekit train --config preset:wrn-22-2-cifar"))
    return shlex.split(line)[1:]


@pytest.mark.slow
def test_readme_cifar_preset_command_trains_on_a_cifar_bin_folder(tmp_path, cli, monkeypatch):
    make_cifar10(tmp_path / "cifar-10-batches-bin")  # where the README says to extract it
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "wrn-rigl"
    result = cli([*readme_cifar_command(), "--steps", "2", "--batch-size", "8", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["model"] == "wrn-22-2" and summary["total_steps"] == 2
    assert summary["realized_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert summary["data"]["n_train"] == 100 and summary["data"]["input_shape"] == [3, 32, 32]
    assert json.loads((run / "config.json").read_text())["augment"] == "crop-flip"


def test_lr_milestones_are_checked():
    with pytest.raises(InputError, match="not increasing fractions"):
        TrainConfig(lr_schedule="step", lr_milestones=[0.6, 0.3]).validate()
    with pytest.raises(InputError, match="apply to the step LR schedule"):
        TrainConfig(lr_milestones=[0.5]).validate()


# ---------------------------------------------------------------- memory-mapped arrays


@pytest.fixture
def small_memory(monkeypatch):
    """Every split counts as larger than memory; statistics stream in chunks of 7 samples."""
    monkeypatch.setattr(lazy, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(lazy, "STATS_CHUNK", 7)


def image_arrays(n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % 3


def test_large_npz_and_npy_are_memory_mapped_and_match_the_in_memory_values(tmp_path, monkeypatch):
    x, y = image_arrays()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    (tmp_path / "n").mkdir()
    np.save(tmp_path / "n" / "x.npy", x)
    np.save(tmp_path / "n" / "y.npy", y)
    eager = load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert isinstance(eager.x_train, torch.Tensor)
    monkeypatch.setattr(lazy, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(lazy, "STATS_CHUNK", 7)
    assert isinstance(readers.read_npz(str(tmp_path / "a.npz"))["x"], np.memmap)
    assert not isinstance(readers.read_npz(str(tmp_path / "c.npz"))["x"], np.memmap)  # compressed: read in
    for spec in (f"npz:{tmp_path / 'a.npz'}", f"npy:{tmp_path / 'n'}"):
        ds = load_dataset(spec)
        assert isinstance(ds.x_train, lazy.ArraySamples) and isinstance(ds.x_train.raw, np.memmap)
        assert ds.normalization["mean"] == pytest.approx(eager.normalization["mean"], rel=1e-12)
        assert ds.normalization["std"] == pytest.approx(eager.normalization["std"], rel=1e-12)
        assert ds.x_train.shape == eager.x_train.shape and ds.input_shape == (3, 8, 8)
        torch.testing.assert_close(ds.x_train[torch.arange(len(ds.x_train))], eager.x_train, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ds.x_test[1:3], eager.x_test[1:3], rtol=1e-6, atol=1e-6)
        part = ds.x_train.subset(slice(5, 9))  # a rank's evaluation shard under torchrun, still lazy
        assert isinstance(part, lazy.ArraySamples) and torch.equal(part[[0, 3]], ds.x_train[[5, 8]])
    copy = pickle.loads(pickle.dumps(ds.x_train))  # DataLoader workers under spawn: the file, not its bytes
    assert isinstance(copy.raw, np.memmap) and torch.equal(copy[[4, 0]], ds.x_train[[4, 0]])


def test_streamed_statistics_of_tables_per_feature(tmp_path, small_memory):
    rng = np.random.default_rng(1)
    x = rng.normal([1.0, -5.0, 100.0], [1.0, 3.0, 0.5], size=(60, 3))
    np.savez(tmp_path / "t.npz", x_train=x, y_train=np.arange(60) % 2, x_test=x[:5], y_test=np.arange(5) % 2)
    stats = load_dataset(f"npz:{tmp_path / 't.npz'}").normalization
    assert stats["per_feature"] is True
    x32 = x.astype(np.float32).astype(np.float64)  # inputs are float32 before their statistics
    np.testing.assert_allclose(stats["mean"], x32.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], x32.std(axis=0), rtol=1e-12)


def test_large_array_errors(tmp_path, small_memory):
    x, y = image_arrays()
    (tmp_path / "n").mkdir()
    np.save(tmp_path / "n" / "x.npy", x)
    np.save(tmp_path / "n" / "y.npy", y)
    f = tmp_path / "n" / "x.npy"
    f.write_bytes(f.read_bytes()[:-10])
    assert_input_error("x.npy is truncated: the array needs", load_dataset, f"npy:{tmp_path / 'n'}")
    bad = x.astype(np.float32)
    bad[7, 1, 1, 1] = np.nan
    np.save(f, bad)
    assert_input_error("contains 1 NaN", load_dataset, f"npy:{tmp_path / 'n'}")
    (tmp_path / "n" / "y.npy").unlink()
    assert_input_error("expected x.npy,y.npy", load_dataset, f"npy:{tmp_path / 'n'}")


# ---------------------------------------------------------------- lazy folders


def make_folder(root: Path, per_class: int = 6) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def count_opens(monkeypatch) -> list[str]:
    import PIL.Image

    opened: list[str] = []
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(Path(fp).name)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    return opened


def test_large_folder_decodes_images_when_indexed(tmp_path, monkeypatch):
    make_folder(tmp_path)
    eager = load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0.25)
    monkeypatch.setattr(lazy, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(lazy, "STATS_IMAGES", 3)
    opened = count_opens(monkeypatch)
    ds = load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0.25)
    assert isinstance(ds.x_train, lazy.ImageFiles) and len(opened) == 3  # the statistics sample only
    assert ds.input_shape == (3, 8, 8) and ds.x_train.shape == (9, 3, 8, 8) and torch.equal(ds.y_train, eager.y_train)
    batch = ds.x_train[torch.tensor([4, 0])]
    assert batch.shape == (2, 3, 8, 8) and len(opened) == 5
    # with every training image in the statistics sample, the values are the in-memory ones exactly
    monkeypatch.setattr(lazy, "STATS_IMAGES", 1000)
    ds = load_dataset(f"folder:{tmp_path}", image_size=8, val_fraction=0.25)
    assert ds.normalization == eager.normalization
    assert torch.equal(ds.x_train[torch.arange(9)], eager.x_train) and torch.equal(ds.x_test[0:3], eager.x_test)
    assert torch.equal(ds.x_train.subset(slice(2, 5))[[0, 2]], eager.x_train[[2, 4]])


# ---------------------------------------------------------------- augmentation


def test_crop_flip_moves_pixels_as_specified():
    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).reshape(2, 3, 6, 5) + 1
    centre = torch.tensor([4, 4])
    assert torch.equal(crop_flip(x, centre, centre, torch.tensor([False, False])), x)
    assert torch.equal(crop_flip(x, centre, centre, torch.tensor([True, False]))[0], x[0].flip(-1))
    out = crop_flip(x, torch.tensor([0, 8]), torch.tensor([2, 1]), torch.tensor([False, True]))
    # image 0 shifted down 4 rows and right 2 columns, zeros enter; image 1 shifted up 4 rows and right 3
    # columns (its first two columns are left), then flipped: the crop is flipped, not the padded image
    assert torch.equal(out[0, :, 4:, 2:], x[0, :, :2, :3]) and (out[0, :, :4] == 0).all()
    assert torch.equal(out[1, :, :2, :2], x[1, :, 4:, :2].flip(-1))
    assert (out[1, :, 2:] == 0).all() and (out[1, :, :, 2:] == 0).all()


def test_crop_flip_params_are_a_function_of_seed_and_step():
    a, b = crop_flip_params(3, 17, 64, 32, 32), crop_flip_params(3, 17, 64, 32, 32)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    c = crop_flip_params(3, 18, 64, 32, 32)
    assert not torch.equal(a[0], c[0])
    rows, cols, flips = a
    assert rows.min() >= 0 and rows.max() <= 8 and cols.max() <= 8 and 0 < int(flips.sum()) < 64


def test_augment_refuses_tables(tmp_path):
    cfg = TrainConfig(model="mlp", data="synthetic:n=40,test=10", augment="crop-flip", epochs=1)
    with pytest.raises(InputError, match="--augment crop-flip applies to image data, not tabular"):
        train(cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    with pytest.raises(InputError, match="unknown augmentation 'flip'"):
        TrainConfig(augment="flip").validate()
    with pytest.raises(InputError, match="workers must be a non-negative integer"):
        TrainConfig(workers=-1).validate()


# ---------------------------------------------------------------- exact resume with augmentation and workers


class Stop(RuntimeError):
    pass


def image_config(**kw) -> TrainConfig:
    base = dict(model="mlp", model_kwargs={"hidden": [24]}, data="synthetic-image:n=96,test=32,size=8,channels=3",
                method="rigl", method_options={"update_interval": 4}, sparsity=0.8, epochs=3, batch_size=16,
                checkpoint_every=5, seed=1, augment="crop-flip", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def stop_at(step: int) -> Callbacks:
    def on_step(info: dict) -> None:
        if info["step"] == step:
            raise Stop

    return Callbacks(on_step=on_step)


def test_augmented_run_resumes_bit_identical_with_and_without_workers(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(image_config(), full)
    with pytest.raises(Stop):
        train(image_config(workers=2), cut, callbacks=stop_at(13))  # last checkpoint at step 10
    train(image_config(), cut, resume=True)  # workers may differ on resume: they do not change the batches
    assert_same_run(full, cut)
    plain = tmp_path / "plain"
    train(image_config(augment=None), plain)
    a, b = load_file(str(full / "weights.safetensors")), load_file(str(plain / "weights.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the augmentation does change training


def test_worker_errors_come_back_as_one_line(tmp_path, monkeypatch):
    make_folder(tmp_path / "img")
    (tmp_path / "img" / "b" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    monkeypatch.setattr(lazy, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(lazy, "STATS_IMAGES", 1)
    cfg = image_config(data=f"folder:{tmp_path / 'img'}", image_size=8, epochs=2, batch_size=4, workers=2)
    ds = load_dataset(cfg.data, seed=cfg.seed, image_size=8)  # loads: the broken image is not in the sample
    assert "9.png" in [f.name for f in ds.x_train.files]
    with pytest.raises(InputError, match=r"cannot read image .*9\.png") as info:
        train(cfg, tmp_path / "run")
    assert "Traceback" not in info.value.message and "Caught InputError" not in info.value.message
