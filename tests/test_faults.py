"""Faults: kill -9 anywhere (even inside a checkpoint write), SIGTERM, NaN loss, disk full. After a
kill, the same command with --resume ends bit-identical to an uninterrupted run on CPU — weights,
masks, optimizer, method and RNG state, every metric but timings — for every method in the registry.

Kills are real SIGKILLs of a ``python -m sparsekit train`` subprocess, placed deterministically by the
test-only ``SPARSEKIT_FAULT`` hook (callbacks from ``sparsekit.faults`` that the CLI installs), plus one
at a random moment.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from same_run import assert_same_run, checkpoint_meta

from sparsekit.methods import METHODS

pytestmark = pytest.mark.slow

METHOD_FLAGS = {"rigl": ["--update-interval", "5"], "set": ["--update-interval", "5"],
                "snfs": ["--update-interval", "5"], "pruning": ["--prune-interval", "5"]}


def train_args(method: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "mlp", "--model-kwargs", "hidden=24,12", "--data", "synthetic:n=256",
            "--method", method, *METHOD_FLAGS.get(method, []), "--sparsity", "0.8", "--epochs", "2",
            "--batch-size", "32", "--seed", "2", "--device", "cpu", "--checkpoint-every", "5", "-q",
            "--out", str(out), *extra]


def run_subprocess(args: list[str], fault: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEKIT_FAULT", "WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["SPARSEKIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "sparsekit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)



def checkpoint_step(path: Path) -> int:
    return checkpoint_meta(path)["step_count"]




@pytest.mark.parametrize("method", sorted(METHODS))
def test_kill_9_then_resume_is_bit_identical(cli, tmp_path, method):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli(train_args(method, full)).exit_code == 0
    kill_at = 6 + sorted(METHODS).index(method) * 3 % 11  # a different point of the 16-step run per method
    proc = run_subprocess(train_args(method, cut), fault=f"kill@{kill_at}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # checkpoints every 5 steps and at the end of each 8-step epoch; step kill_at never ran
    last = max(s for s in range(1, kill_at) if s % 5 == 0 or s % 8 == 0)
    assert checkpoint_step(cut / "checkpoint.safetensors") == last
    assert not (cut / "summary.json").exists()
    res = cli(train_args(method, cut, "--resume"))
    assert res.exit_code == 0, res.stderr
    assert_same_run(full, cut)


def test_kill_inside_a_checkpoint_write_keeps_the_previous_one(cli, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli(train_args("rigl", full)).exit_code == 0
    proc = run_subprocess(train_args("rigl", cut), fault="kill-in-save@10")  # temp written, not renamed
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_step(cut / "checkpoint.safetensors") == 8  # the previous one, complete and readable
    assert list(cut.glob(".checkpoint.safetensors.*.tmp"))  # the torn new one never replaced it
    assert cli(train_args("rigl", cut, "--resume")).exit_code == 0
    assert not list(cut.glob(".*.tmp"))
    assert_same_run(full, cut)


def test_kill_before_the_first_checkpoint_then_resume_starts_fresh(cli, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli(train_args("rigl", full)).exit_code == 0
    assert run_subprocess(train_args("rigl", cut), fault="kill@3").returncode == -signal.SIGKILL
    assert (cut / "config.json").exists() and not (cut / "checkpoint.safetensors").exists()
    assert cli(train_args("rigl", cut, "--resume")).exit_code == 0
    assert_same_run(full, cut)


def test_kill_9_at_a_random_moment(cli, tmp_path):
    """An external SIGKILL at an unplanned moment (the checkpoint is rewritten every step)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--checkpoint-every", "1", "--epochs", "6"]
    assert cli(train_args("rigl", full, *args)).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k != "SPARSEKIT_FAULT"}
    proc = subprocess.Popen([sys.executable, "-m", "sparsekit", *train_args("rigl", cut, *args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (cut / "checkpoint.safetensors").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(random.uniform(0, 0.2))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert cli(train_args("rigl", cut, *args, "--resume")).exit_code == 0
    assert_same_run(full, cut)


def test_sigterm_checkpoints_and_exits_5(tmp_path):
    run = tmp_path / "r"
    proc = run_subprocess(train_args("rigl", run), fault="sigterm@8")
    assert proc.returncode == 5
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "interrupted by signal 15 at step 8" in lines[0] and "--resume" in lines[0]
    assert checkpoint_step(run / "checkpoint.safetensors") == 8


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_FAULT", "nan@12")
    run = tmp_path / "r"
    res = cli(train_args("rigl", run, "--json"))
    assert res.exit_code == 5
    assert "loss became nan at step 12" in res.stderr and "Traceback" not in res.stderr
    assert res.json()["error"]["type"] == "training"
    assert checkpoint_step(run / "checkpoint.safetensors") == 10
    ckpt = load_file(str(run / "checkpoint.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in ckpt.items() if v.is_floating_point())


def test_nan_policy_skip_batch_skips_and_finishes(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_FAULT", "nan@12")
    run = tmp_path / "r"
    res = cli(train_args("rigl", run, "--nan-policy", "skip-batch"))
    assert res.exit_code == 0, res.stderr
    meta = checkpoint_meta(run / "checkpoint.safetensors")
    assert meta["state"]["skipped_batches"] == 1 and meta["step_count"] == 16
    assert json.loads((run / "summary.json").read_text())["steps"] == 16


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_disk_full_or_unwritable_while_saving_keeps_the_previous_checkpoint(cli, tmp_path, monkeypatch, err):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint (step 8): half a file, then the device is full
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(err, os.strerror(err), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    run = tmp_path / "r"
    res = cli(train_args("rigl", run))
    assert res.exit_code == 5
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not save the checkpoint at step 8" in lines[0]
    assert os.strerror(err) in lines[0] and "previous checkpoint was kept" in lines[0]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert checkpoint_step(run / "checkpoint.safetensors") == 5
    assert not list(run.glob(".*.tmp"))


def test_malformed_fault_spec_is_an_input_error(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_FAULT", "kill@soon")
    res = cli(train_args("static", tmp_path / "r"))
    assert res.exit_code == 2 and "SPARSEKIT_FAULT" in res.stderr
