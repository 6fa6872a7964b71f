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


# ---- help: every option shows its default, and the shown defaults are the real ones ----

LISTINGS = {"models", "datasets", "methods"}  # their only output is the answer: no -q


def _commands() -> dict:
    import typer
    from sparsekit.cli.main import _register, app

    _register()
    return typer.main.get_command(app).commands


def _option_rows(cli, monkeypatch, command: str) -> dict[str, str]:
    """``--opt`` -> its row in the rendered ``--help`` (wide enough that no row wraps)."""
    monkeypatch.setenv("COLUMNS", "3000")
    res = cli([command, "--help"])
    assert res.exit_code == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("│")]
    out = {}
    for param in _commands()[command].params:
        if param.param_type_name == "option" and param.name != "help":
            pattern = re.compile(r"^│[\s*]+" + re.escape(param.opts[0]) + r"(?![\w-])")
            matches = [ln for ln in rows if pattern.search(ln)]
            assert len(matches) == 1, (command, param.opts, matches)
            out[param.opts[0]] = matches[0]
    return out


def test_every_option_of_every_command_shows_its_default(cli, monkeypatch):
    missing = []
    for name, command in _commands().items():
        rows = _option_rows(cli, monkeypatch, name)
        required = {p.opts[0] for p in command.params if p.required}
        missing += [f"{name} {opt}" for opt, row in rows.items() if opt not in required and "[default: " not in row]
    assert missing == []


def _shown_default(row: str) -> str:
    """The first value of ``[default: X]`` or ``[default: (X; with ...)]``."""
    text = re.search(r"\[default: (.*?)\]", row).group(1).strip("()")
    return text.split(";")[0].strip()


def _real_defaults(cli) -> dict[str, object]:
    """TrainConfig's defaults and the methods' option defaults, by option name."""
    from dataclasses import fields

    from sparsekit.config import TrainConfig

    defaults: dict[str, object] = {}
    for method in cli(["methods", "--json"]).json():
        for key, value in method["options"].items():
            assert defaults.setdefault(key, value) == value, key  # one default per option name
    defaults.update({f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)})
    return defaults


@pytest.mark.parametrize("command", ["train", "compare"])
def test_shown_defaults_are_the_real_ones(cli, monkeypatch, command):
    real = _real_defaults(cli)
    rows = _option_rows(cli, monkeypatch, command)
    checked = 0
    for param in _commands()[command].params:
        value = real.get(param.name)
        if param.name not in real or param.opts[0] not in rows:
            continue
        shown = _shown_default(rows[param.opts[0]])
        if isinstance(value, bool) or (value is None and param.is_bool_flag):
            side = param.opts[0] if value else param.secondary_opts[0]
            assert shown == side.lstrip("-"), (param.opts, shown)
        elif isinstance(value, (int, float)):
            assert float(shown) == value, (param.opts, shown, value)
        elif isinstance(value, str):
            assert shown == value, (param.opts, shown, value)
        else:
            continue
        checked += 1
    assert checked >= (35 if command == "train" else 25)


def test_quiet_on_every_command_that_does_work():
    lacking = [name for name, command in _commands().items()
               if name not in LISTINGS and not any("-q" in p.opts and "--quiet" in p.opts for p in command.params)]
    assert lacking == []


# ---- runs/latest: the top-level help's example works as written ----


def test_the_top_level_help_example_works_from_an_empty_folder(cli, monkeypatch, tmp_path):
    """Runs the example of `sparsekit --help` word for word, in an empty folder; only speed flags are added
    (train: --steps 20, report: --no-latency), never paths."""
    import shlex

    from sparsekit.cli.main import app

    monkeypatch.chdir(tmp_path)
    example = app.info.help.split("Example: ", 1)[1]
    speed = {"train": ["--steps", "20", "-q"], "export": ["-q"], "report": ["--no-latency", "-q"]}
    for command in example.split("&&"):
        words = shlex.split(command)
        assert words[0] == "sparsekit"
        res = cli([*words[1:], *speed[words[1]]])
        assert res.exit_code == 0, (command, res.stderr)
        assert (res.stdout, res.stderr) == ("", ""), command  # -q: nothing but errors
    link = tmp_path / "runs" / "latest"
    assert link.is_symlink() and link.readlink() == Path("rigl-0.9-s0")
    assert (tmp_path / "runs" / "rigl-0.9-s0" / "export" / "export_report.json").is_file()


def test_run_and_viz_are_quiet_with_q(cli, monkeypatch, tmp_path):
    import numpy as np

    run = tmp_path / "r"
    assert cli(["train", "--steps", "5", "-q", "--out", str(run)]).exit_code == 0
    assert cli(["export", str(run), "--format", "fast", "-q"]).exit_code == 0
    np.save(tmp_path / "x.npy", np.zeros((2, 64), dtype=np.float32))
    ran = cli(["run", str(run / "export" / "model.fast.onnx"), "-i", str(tmp_path / "x.npy"),
               "-o", str(tmp_path / "y.npy"), "-q"])
    assert (ran.exit_code, ran.stdout, ran.stderr) == (0, "", "") and np.load(tmp_path / "y.npy").shape == (2, 10)
    shown = cli(["viz", str(run), "-q"])
    assert (shown.exit_code, shown.stdout, shown.stderr) == (0, "", "") and list((run / "viz").glob("*.png"))


def test_latest_follows_the_last_run_in_runs_only(cli, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    tiny = ["--steps", "2", "-q"]
    assert cli(["train", *tiny, "--method", "static"]).exit_code == 0
    assert (tmp_path / "runs" / "latest").readlink() == Path("static-0.9-s0")
    assert cli(["train", *tiny, "--out", "runs/second"]).exit_code == 0
    assert (tmp_path / "runs" / "latest").readlink() == Path("second")  # replaced
    assert cli(["train", *tiny, "--out", str(tmp_path / "elsewhere" / "third")]).exit_code == 0
    assert (tmp_path / "runs" / "latest").readlink() == Path("second")  # not a run directly in ./runs
    assert not (tmp_path / "elsewhere" / "latest").exists()
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_real_latest_directory_is_never_replaced(cli, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "latest").mkdir(parents=True)
    (tmp_path / "runs" / "latest" / "mine.txt").write_text("keep")
    res = cli(["train", "--steps", "2", "-q", "--out", "runs/a"])
    assert res.exit_code == 0
    assert res.stderr == ("warning: runs/latest exists and is not a link, so it was left as it is (it does not "
                          "point to the last run)\n")
    assert not (tmp_path / "runs" / "latest").is_symlink()
    assert (tmp_path / "runs" / "latest" / "mine.txt").read_text() == "keep"
