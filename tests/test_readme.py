"""The README's tour commands run as written (with fewer epochs), so the documentation never rots."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_commands() -> list[list[str]]:
    text = README.read_text()
    section = text.split("## 5-minute tour", 1)[1]
    block = re.search(r"```console\n(.*?)```", section, re.S)
    assert block, "the tour has a console block"
    return [shlex.split(line[2:]) for line in block.group(1).splitlines() if line.startswith("$ sparsekit ")]


def shorten(argv: list[str]) -> list[str]:
    """Same commands, CI-sized: 2 epochs, few latency repetitions."""
    argv = list(argv)
    if "--epochs" in argv:
        argv[argv.index("--epochs") + 1] = "2"
    elif argv[1] == "train":
        argv += ["--epochs", "2"]
    if argv[1] == "report":
        argv += ["--runs", "3"]
    return argv[1:]


def test_readme_starts_with_the_two_commands():
    first_block = README.read_text().split("```")[1]
    lines = [ln.split("#")[0].strip() for ln in first_block.splitlines()[1:] if ln.strip()]
    assert lines == ["make demo", "make test"]


@pytest.mark.slow
def test_tour_commands_run(cli, tmp_path, monkeypatch):
    commands = tour_commands()
    assert [c[1] for c in commands] == ["train", "export", "report", "viz", "compare"]
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        res = cli(shorten(argv))
        assert res.exit_code == 0, (argv, res.stderr[-2000:])
    assert (tmp_path / "runs/tour/export/model.fast.onnx").is_file()
    assert (tmp_path / "runs/tour-compare/compare.png").is_file()
