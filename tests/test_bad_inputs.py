"""Bad input, table-driven: every case goes through the CLI (``sparsekit.cli.main.main``) and must give

* the documented exit code (2 for bad input and usage; 5 for a training failure),
* exactly one line on stderr, ``error: WHAT (WHERE); fix: HOW`` (typer usage errors: what + see --help),
* no traceback, and
* no partial file: the output path does not appear, or an existing run directory is unchanged.

Each row is (id, setup, expected exit code, a fragment the message must contain). ``setup(d, run)``
gets an empty scratch directory ``d`` and a finished tiny run directory ``run`` (read-only for the
cases: copy it first) and returns the CLI arguments.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

TRAIN = ["train", "--epochs", "1", "--data", "synthetic:n=64,test=32", "--model-kwargs", "hidden=8", "-q",
         "--device", "cpu"]


def out(d: Path) -> list[str]:
    return ["--out", str(d / "out")]


def npz(d: Path, name: str = "data.npz", **arrays) -> Path:
    p = d / name
    with open(p, "wb") as fh:
        np.savez(fh, **arrays)
    return p


def good_xy(n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 6)).astype(np.float32), "y": (np.arange(n) % 3).astype(np.int64)}


def write(d: Path, name: str, content: bytes | str) -> Path:
    p = d / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def train_data(spec: str, d: Path, *extra: str) -> list[str]:
    return ["train", "--epochs", "1", "--data", spec, "-q", "--device", "cpu", *extra, *out(d)]


def copy_run(run: Path, d: Path) -> Path:
    dst = d / "out"
    shutil.copytree(run, dst)
    return dst


def resume_args(d: Path) -> list[str]:
    return [*TRAIN, "--out", str(d / "out"), "--resume"]


def npz_object_array(d: Path) -> Path:
    p = d / "obj.npz"
    with open(p, "wb") as fh:
        np.savez(fh, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, dtype=np.int64))
    return p


def truncated(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(d: Path, corrupt: bool) -> Path:
    root = d / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(png_bytes())
    if corrupt:
        (root / "a" / "0.png").write_bytes(png_bytes()[:20])
    return root


def zip_with(d: Path, members: dict[str, bytes], name: str = "evil.skz") -> Path:
    p = d / name
    with zipfile.ZipFile(p, "w") as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    return p


def checkpoint_from_other_model(d: Path, run: Path) -> list[str]:
    """A run dir whose config matches the command but whose checkpoint belongs to another model."""
    dst = copy_run(run, d)
    from torch import nn

    from sparsekit.checkpoint import save_checkpoint

    other = nn.Sequential(nn.Linear(3, 2))
    save_checkpoint(dst / "checkpoint.safetensors", model=other, optimizer=None,
                    sparsifier_state={"step_count": 1, "masks": {}, "method": {}, "method_extra": {}}, state={})
    return resume_args(d)


def _seq(*steps: Callable[[], object]) -> None:
    for s in steps:
        s()


Setup = Callable[[Path, Path], list[str]]
CASES: list[tuple[str, Setup, int, str]] = [
    # names
    ("unknown-model", lambda d, r: [*TRAIN, "--model", "resnet9000", *out(d)], 2, "unknown model"),
    ("unknown-method", lambda d, r: [*TRAIN, "--method", "rigll", *out(d)], 2, "did you mean 'rigl'"),
    ("unknown-dataset", lambda d, r: [*TRAIN[:3], "--data", "mnistt", "-q", *out(d)], 2, "mnistt"),
    ("bare-path-dataset", lambda d, r: train_data(str(npz(d, **good_xy())), d), 2, "npz:"),
    ("unknown-export-format", lambda d, r: ["export", str(r), "--format", "tflite", "--out", str(d / "out")], 2,
     "tflite"),
    ("unknown-distribution", lambda d, r: [*TRAIN, "--distribution", "erkk", *out(d)], 2, "distribution"),
    # py: specs
    ("py-spec-empty", lambda d, r: [*TRAIN, "--model", "py:", *out(d)], 2, "py:"),
    ("py-spec-no-function", lambda d, r: [*TRAIN, "--model", f"py:{write(d, 'm.py', 'x = 1')}", *out(d)], 2, "py:"),
    ("py-spec-missing-file", lambda d, r: [*TRAIN, "--model", f"py:{d}/nope.py:build", *out(d)], 2, "nope.py"),
    ("py-spec-missing-attr", lambda d, r: [*TRAIN, "--model", f"py:{write(d, 'm.py', 'x = 1')}:build", *out(d)], 2,
     "build"),
    ("py-spec-syntax-error", lambda d, r: [*TRAIN, "--model", f"py:{write(d, 'm.py', 'def (:')}:build", *out(d)], 2,
     "m.py"),
    # npz files
    ("npz-missing", lambda d, r: train_data(f"npz:{d}/missing.npz", d), 2, "missing.npz"),
    ("npz-empty", lambda d, r: train_data(f"npz:{write(d, 'e.npz', b'')}", d), 2, "e.npz"),
    ("npz-truncated", lambda d, r: train_data(f"npz:{truncated(npz(d, **good_xy(400)))}", d), 2, "data.npz"),
    ("npz-wrong-type", lambda d, r: train_data(f"npz:{write(d, 't.npz', 'just text')}", d), 2, "t.npz"),
    ("npz-object-array", lambda d, r: train_data(f"npz:{npz_object_array(d)}", d), 2, "obj.npz"),
    ("npz-missing-key", lambda d, r: train_data(f"npz:{npz(d, x=good_xy()['x'])}", d), 2, "data.npz"),
    ("npz-length-mismatch", lambda d, r: train_data(f"npz:{npz(d, x=good_xy()['x'], y=good_xy()['y'][:-3])}", d),
     2, "data.npz"),
    ("labels-negative", lambda d, r: train_data(f"npz:{npz(d, x=good_xy()['x'], y=good_xy()['y'] - 1)}", d), 2,
     "label"),
    ("labels-not-integers", lambda d, r: train_data(
        f"npz:{npz(d, x=good_xy()['x'], y=good_xy()['y'] + 0.5)}", d), 2, "label"),
    ("nan-in-data", lambda d, r: train_data(
        f"npz:{npz(d, x=np.where(np.eye(40, 6) > 0, np.nan, good_xy()['x']), y=good_xy()['y'])}", d), 2, "NaN"),
    # csv files
    ("csv-missing", lambda d, r: train_data(f"csv:{d}/missing.csv", d), 2, "missing.csv"),
    ("csv-empty", lambda d, r: train_data(f"csv:{write(d, 'e.csv', '')}", d), 2, "e.csv"),
    ("csv-not-numeric", lambda d, r: train_data(
        f"csv:{write(d, 'w.csv', 'a,b,label' + chr(10) + 'x,y,1' + chr(10) * 3)}", d), 2, "w.csv"),
    ("csv-ragged", lambda d, r: train_data(
        f"csv:{write(d, 'r.csv', ''.join(f'{i},{i},{i % 2}' + chr(10) for i in range(30)) + '1,2' + chr(10))}", d),
     2, "r.csv"),
    ("csv-binary", lambda d, r: train_data(f"csv:{write(d, 'b.csv', bytes(range(256)) * 4)}", d), 2, "b.csv"),
    # image folders
    ("folder-empty", lambda d, r: train_data(f"folder:{(d / 'empty').mkdir() or d / 'empty'}", d), 2, "empty"),
    ("folder-corrupt-image", lambda d, r: train_data(f"folder:{image_folder(d, corrupt=True)}", d), 2, "0.png"),
    ("folder-not-images", lambda d, r: train_data(
        f"folder:{_text_folder(d)}", d), 2, "txt"),
    # data vs model
    ("conv-model-on-flat-data", lambda d, r: [*TRAIN[:5], "--model", "lenet5", *out(d)], 2, "lenet5"),
    ("model-kwargs-malformed", lambda d, r: [*TRAIN[:5], "--model-kwargs", "hidden", *out(d)], 2, "hidden"),
    ("model-kwargs-unknown", lambda d, r: [*TRAIN[:5], "--model-kwargs", "depth=3", *out(d)], 2, "depth"),
    ("model-kwargs-bad-list", lambda d, r: [*TRAIN[:5], "--model-kwargs", "hidden=8,x", *out(d)], 2, "hidden"),
    # numbers
    ("sparsity-negative", lambda d, r: [*TRAIN, "--sparsity", "-0.1", *out(d)], 2, "sparsity"),
    ("sparsity-one", lambda d, r: [*TRAIN, "--sparsity", "1", *out(d)], 2, "sparsity"),
    ("sparsity-non-numeric", lambda d, r: [*TRAIN, "--sparsity", "ninety", *out(d)], 2, "sparsity"),
    ("epochs-negative", lambda d, r: [*TRAIN, "--epochs", "-2", *out(d)], 2, "epochs"),
    ("lr-negative", lambda d, r: [*TRAIN, "--lr", "-0.1", *out(d)], 2, "learning rate"),
    ("batch-size-zero", lambda d, r: [*TRAIN, "--batch-size", "0", *out(d)], 2, "batch size"),
    ("checkpoint-every-negative", lambda d, r: [*TRAIN, "--checkpoint-every", "-5", *out(d)], 2, "checkpoint"),
    ("method-option-unknown", lambda d, r: [*TRAIN, "--method", "static", "--method-option", "foo=1", *out(d)], 2,
     "foo"),
    ("method-option-malformed", lambda d, r: [*TRAIN, "--method-option", "=1", *out(d)], 2, "--method-option"),
    ("config-unknown-key", lambda d, r: [*TRAIN, "--config", str(write(d, "c.json", '{"spasity": 0.5}')), *out(d)],
     2, "spasity"),
    ("config-dist-timeout-zero", lambda d, r: [*TRAIN, "--config", str(write(d, "c.json", '{"dist_timeout": 0}')),
                                               *out(d)], 2, "timeout"),
    ("config-unparsable", lambda d, r: [*TRAIN, "--config", str(write(d, "c.yaml", "a: [1,")), *out(d)], 2, "c.yaml"),
    # output directory
    ("out-under-a-file", lambda d, r: [*TRAIN, "--out", str(write(d, "f", "x") / "run")], 2, "--out"),
    ("out-is-a-file", lambda d, r: [*TRAIN, "--out", str(write(d, "f", "x"))], 2, "not a directory"),
    ("run-dir-exists", lambda d, r: [*TRAIN, "--out", str(copy_run(r, d))], 2, "--resume"),
    ("overwrite-foreign-dir", lambda d, r: [*TRAIN, "--overwrite", "--out",
                                            str(write(d, "keep.txt", "x").parent)], 2, "not a sparsekit run"),
    ("init-from-missing", lambda d, r: [*TRAIN, "--init-from", str(d / "nope"), *out(d)], 2, "--init-from"),
    # checkpoints
    ("checkpoint-corrupt", lambda d, r: _seq(lambda: write(copy_run(r, d), "checkpoint.safetensors",
                                                           b"\x00garbage" * 64)) or resume_args(d), 2, "corrupt"),
    ("checkpoint-truncated", lambda d, r: _seq(lambda: truncated(copy_run(r, d) / "checkpoint.safetensors"))
     or resume_args(d), 2, "checkpoint"),
    ("checkpoint-foreign", lambda d, r: _seq(lambda: save_file({"w": __import__("torch").zeros(2)},
                                                               str(copy_run(r, d) / "checkpoint.safetensors")))
     or resume_args(d), 2, "not a sparsekit checkpoint"),
    ("checkpoint-other-model", checkpoint_from_other_model, 2, "different model"),
    ("checkpoint-other-settings", lambda d, r: [*TRAIN, "--seed", "5", "--out", str(copy_run(r, d)), "--resume"],
     2, "different settings"),
    # export / report inputs
    ("export-missing-source", lambda d, r: ["export", str(d / "nothing"), "--out", str(d / "out")], 2, "nothing"),
    ("export-corrupt-archive", lambda d, r: ["export", str(write(d, "m.skz", b"PK\x03\x04" + b"\x00" * 64)),
                                             "--out", str(d / "out")], 2, "m.skz"),
    ("export-truncated-archive", lambda d, r: ["export", str(truncated(_archive(d, r), 0.6)), "--out",
                                               str(d / "out2")], 2, "model.skz"),
    ("export-archive-path-traversal", lambda d, r: ["export", str(zip_with(d, {"../evil.json": b"{}"})),
                                                    "--out", str(d / "out")], 2, "path traversal"),
    ("export-archive-not-sparsekit", lambda d, r: ["export", str(zip_with(d, {"manifest.json": b'{"a": 1}'})),
                                                   "--out", str(d / "out")], 2, "not a sparsekit archive"),
    ("export-run-corrupt-onnx", lambda d, r: _seq(lambda: write(copy_run(r, d), "model.onnx", b"not onnx"))
     or ["export", str(d / "out"), "--format", "onnx", "--out", str(d / "out" / "exp")], 2, "model.onnx"),
    ("export-not-a-run-dir", lambda d, r: ["export", str((d / "empty").mkdir() or d / "empty"),
                                           "--out", str(d / "out")], 2, "empty"),
    ("report-corrupt-onnx", lambda d, r: ["report", str(write(d, "m.onnx", b"\x08\x01garbage")), "--no-latency"],
     2, "m.onnx"),
    ("report-corrupt-archive", lambda d, r: ["report", str(write(d, "m.skz", b"PK\x03\x04junk")), "--no-latency"],
     2, "m.skz"),
    ("report-missing", lambda d, r: ["report", str(d / "none.onnx"), "--no-latency"], 2, "none.onnx"),
]


def _text_folder(d: Path) -> Path:
    root = d / "txt"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.txt").write_text("hello")
    return root


def _archive(d: Path, run: Path) -> Path:
    """A real archive exported from the run, copied into ``d``."""
    src = run.parent / "archive" / "model.skz"
    dst = d / "model.skz"
    shutil.copy(src, dst)
    return dst


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from conftest import run_cli

    base = tmp_path_factory.mktemp("bad-inputs")
    run = base / "run"
    res = run_cli([*TRAIN, "--out", str(run), "--checkpoint-every", "1"])
    assert res.exit_code == 0, res.stderr
    res = run_cli(["export", str(run), "--format", "compressed", "--out", str(base / "archive")])
    assert res.exit_code == 0, res.stderr
    return run


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_the_table_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("setup", "code", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_error_and_no_partial_file(cli, tmp_path, finished_run, setup, code, fragment):
    run_before = _snapshot(finished_run)
    d = tmp_path / "d"
    d.mkdir()
    args = setup(d, finished_run)
    before = _snapshot(d)
    res = cli(args)
    assert res.exit_code == code, (res.exit_code, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in res.stderr and "internal error" not in line, line
    assert fragment.lower() in line.lower(), line
    if "; fix: " not in line:
        assert "--help" in line, line  # usage errors from the parser point at --help instead
    assert _snapshot(d) == before, "the failed command left or changed files"
    assert _snapshot(finished_run) == run_before


def test_json_mode_gives_the_error_as_json(cli, tmp_path):
    res = cli([*TRAIN, "--sparsity", "1.5", "--json", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    payload = json.loads(res.stdout)
    assert payload["exit_code"] == 2 and payload["error"]["type"] == "input"
    assert payload["error"]["where"] == "--sparsity" and payload["error"]["fix"]
