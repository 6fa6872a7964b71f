"""Resume: an interrupted run continued with --resume ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sparsekit.config import TrainConfig
from sparsekit.errors import InputError
from sparsekit.training import Callbacks, train


class Boom(RuntimeError):
    pass


def _config(method: str = "rigl", **kw) -> TrainConfig:
    opts = {"update_interval": 5} if method == "rigl" else {}
    base = dict(model="mlp", model_kwargs={"hidden": [32, 16]}, data="synthetic", method=method,
                method_options=opts, sparsity=0.8, epochs=4, batch_size=32, checkpoint_every=7, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _interrupt_at(step: int) -> Callbacks:
    def on_step(info: dict) -> None:
        if info["step"] == step:
            raise Boom

    return Callbacks(on_step=on_step)


@pytest.mark.parametrize("method", ["rigl", "static"])
def test_resume_is_bit_identical(tmp_path, method):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(_config(method), full)
    with pytest.raises(Boom):
        train(_config(method), cut, callbacks=_interrupt_at(30))  # mid-epoch 2; last checkpoint at step 28
    train(_config(method), cut, resume=True)
    for name in ("weights.safetensors", "masks.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(cut / name))
        assert a.keys() == b.keys()
        assert all((a[k] == b[k]).all() for k in a), name
    ca, cb = load_file(str(full / "checkpoint.safetensors")), load_file(str(cut / "checkpoint.safetensors"))
    optim = [k for k in ca if k.startswith("optim/")]
    assert optim and all((ca[k] == cb[k]).all() for k in optim)
    assert _metrics(full) == _metrics(cut)
    assert [json.loads(x)["step"] for x in (cut / "updates.jsonl").read_text().splitlines()] == \
        [json.loads(x)["step"] for x in (full / "updates.jsonl").read_text().splitlines()]
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (full, cut))
    assert sa["test_accuracy"] == sb["test_accuracy"] and sa["layers"] == sb["layers"]


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    run = tmp_path / "r"
    summary = train(_config(epochs=1), run, resume=True)
    assert summary["steps"] == 16


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "r"
    train(_config(epochs=1), run)
    with pytest.raises(InputError, match="already exists"):
        train(_config(epochs=1), run)
    assert train(_config(epochs=1), run, overwrite=True)["steps"] == 16


def test_resume_with_different_settings_is_refused(tmp_path):
    run = tmp_path / "r"
    with pytest.raises(Boom):
        train(_config(), run, callbacks=_interrupt_at(10))
    with pytest.raises(InputError, match=r"different settings.*sparsity"):
        train(_config(sparsity=0.5), run, resume=True)


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a sparsekit run directory"):
        train(_config(epochs=1), tmp_path, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
