"""Progress a log can read (plain lines off a terminal, one final accuracy: the summary's), and help that
works from a clone (every option shows its default, -q everywhere that prints, `runs/latest`)."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from sparsekit.cli.progress import BarProgress, PlainProgress, resolve_mode

STEP_LINE = re.compile(r"^(\S+): step (\d+)/(\d+) \((\d+)%\) epoch (\d+)/(\d+) loss \d+\.\d{4} sparsity \d\.\d{3} "
                       r"\d+ samples/s ETA \d+:\d\d:\d\d$")


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _events(progress: PlainProgress | BarProgress, total: int, *, per_epoch: int, last_epoch_acc: float) -> None:
    """Feed a run's events: ``total`` steps, an epoch record every ``per_epoch`` steps."""
    cb = progress.callbacks()
    cb.on_start({"total_steps": total, "steps_per_epoch": per_epoch, "epochs": -(-total // per_epoch),
                 "start_step": 0, "run_dir": "runs/demo", "world_size": 1})
    for step in range(1, total + 1):
        cb.on_step({"step": step, "total_steps": total, "loss": 0.5, "lr": 0.1, "sparsity": 0.9,
                    "epoch": (step - 1) // per_epoch + 1, "samples": 64})
        if step % per_epoch == 0:
            cb.on_epoch({"epoch": step // per_epoch, "step": step, "train_loss": 0.5, "train_accuracy": 0.9,
                         "test_loss": 0.1, "test_accuracy": last_epoch_acc, "sparsity": 0.9, "lr": 0.1,
                         "seconds": 1.0})


class FakeClock:
    def __init__(self, per_call: float) -> None:
        self.t, self.per_call = 0.0, per_call

    def __call__(self) -> float:
        self.t += self.per_call
        return self.t


@pytest.mark.parametrize(("seconds_per_step", "expected"), [
    (0.001, list(range(100, 1001, 100))),  # a fast run: one line per tenth of the run
    (1.0, list(range(10, 1001, 10))),  # a slow run: one line per 10 s
])
def test_plain_lines_come_at_each_tenth_and_every_10_seconds(seconds_per_step, expected):
    out = io.StringIO()
    # the clock is read once per step and once per epoch end (every 250 steps here)
    progress = PlainProgress(out, clock=FakeClock(seconds_per_step))
    _events(progress, 1000, per_epoch=250, last_epoch_acc=0.5)
    lines = out.getvalue().splitlines()
    steps = [int(m.group(2)) for m in map(STEP_LINE.match, lines) if m]
    assert steps == expected
    assert len([ln for ln in lines if " done at step " in ln]) == 4
    assert all(ln.startswith("demo: ") for ln in lines)


def test_plain_line_throughput_and_eta():
    out = io.StringIO()
    progress = PlainProgress(out, clock=FakeClock(0.5))  # 0.5 s per clock read; 64 samples per step
    _events(progress, 100, per_epoch=1000, last_epoch_acc=0.5)
    half = next(ln for ln in out.getvalue().splitlines() if " step 50/100 " in ln)
    # 50 steps in 25 s: 128 samples/s; 50 steps left at 2 steps/s: 25 s
    assert half.endswith("(50%) epoch 1/1 loss 0.5000 sparsity 0.900 128 samples/s ETA 0:00:25"), half


@pytest.mark.parametrize("kind", ["plain", "bar"])
def test_final_accuracy_is_the_summarys_not_the_last_epochs(kind):
    err = io.StringIO()
    with redirect_stderr(err):
        progress = PlainProgress() if kind == "plain" else BarProgress()
        with progress:
            _events(progress, 20, per_epoch=10, last_epoch_acc=0.9958)
            progress.finish({"test_accuracy": 1.0, "realized_sparsity": 0.9, "train_seconds": 2.0})
    last = [ln for ln in err.getvalue().splitlines() if ln.strip()][-1]
    assert "test acc 1.0000" in last and "0.9958" not in last, last


@pytest.mark.parametrize(("mode", "quiet", "tty", "chosen"), [
    ("auto", False, True, "bar"), ("auto", False, False, "plain"), ("plain", False, True, "plain"),
    ("bar", False, False, "bar"), ("none", False, True, "none"), ("bar", True, True, "none"),
    ("auto", True, False, "none"),
])
def test_progress_mode(mode, quiet, tty, chosen):
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert resolve_mode(mode, quiet=quiet, stream=Stream()) == chosen


def test_train_off_a_terminal_prints_plain_lines_and_the_summarys_accuracy(cli, tmp_path):
    run = tmp_path / "r"
    # one epoch of the digits data is 23 steps: 28 steps end mid-epoch, after the last epoch record
    res = cli(["train", "--steps", "28", "--out", str(run)])
    assert res.exit_code == 0, res.stderr
    lines = res.stderr.splitlines()
    steps = [int(m.group(2)) for m in map(STEP_LINE.match, lines) if m]
    assert {3, 6, 9, 12, 14, 17, 20, 23, 26, 28} <= set(steps), lines
    assert any(ln.startswith("r: epoch 1/2 done at step 23/28: train loss ") for ln in lines), lines
    summary = _summary(run)
    done = [ln for ln in lines if ln.startswith("r: done: ")]
    assert done == [f"r: done: test acc {summary['test_accuracy']:.4f} sparsity {summary['realized_sparsity']:.3f} "
                    f"({summary['train_seconds']:.1f} s)"]
    epochs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["best_test_accuracy"] == max(summary["test_accuracy"], *(e["test_accuracy"] for e in epochs))


def test_train_bar_ends_on_the_summarys_accuracy(cli, tmp_path):
    res = cli(["train", "--steps", "28", "--progress", "bar", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.stderr
    bar = [ln for ln in res.stderr.splitlines() if " 28/28 " in ln]
    assert bar and f"test acc {_summary(tmp_path / 'r')['test_accuracy']:.4f}" in bar[-1], bar
    assert not any(STEP_LINE.match(ln) for ln in res.stderr.splitlines())


def test_quiet_and_none_print_no_progress(cli, tmp_path):
    quiet = cli(["train", "--steps", "3", "-q", "--progress", "plain", "--out", str(tmp_path / "q")])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    none = cli(["train", "--steps", "3", "--progress", "none", "--out", str(tmp_path / "n")])
    assert none.exit_code == 0 and "step " not in none.stderr and "test accuracy" in none.stderr


def test_compare_prints_plain_progress_per_run(cli, tmp_path):
    res = cli(["compare", "--methods", "static", "--sparsity", "0.5", "--seeds", "1", "--steps", "4",
               "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.stderr
    acc = _summary(tmp_path / "cmp" / "static-0.5-s0")["test_accuracy"]
    assert any(STEP_LINE.match(ln) and ln.startswith("static-0.5-s0: step 4/4 ") for ln in res.stderr.splitlines())
    assert f"static-0.5-s0: done: test acc {acc:.4f} " in res.stderr
