"""The train CLI as a user runs it: flags, config files, errors and exit codes, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from sparsekit.run_writer import validate_summary

TINY = ["--model", "mlp", "--model-kwargs", "hidden=16", "--data", "synthetic", "--epochs", "1",
        "--batch-size", "64", "--quiet"]


def test_train_json_summary_matches_schema_and_counts(cli, tmp_path):
    res = cli(["train", *TINY, "--sparsity", "0.75", "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.stderr
    s = res.json()
    validate_summary(s)
    assert s == json.loads((tmp_path / "r" / "summary.json").read_text()) | {"created": s["created"]}
    prunable = [ly for ly in s["layers"] if ly["prunable"]]
    size = sum(ly["numel"] for ly in prunable)
    assert s["params"]["prunable"] == size
    assert s["realized_sparsity"] == pytest.approx(0.75, abs=1 / size)
    assert s["params"]["nonzero"] == s["params"]["total"] - size + sum(ly["active"] for ly in prunable)
    for name in ("config.json", "metrics.jsonl", "checkpoint.safetensors", "model.onnx", "samples.npz",
                 "weights.safetensors", "masks.safetensors", "updates.jsonl"):
        assert (tmp_path / "r" / name).is_file(), name


def test_config_file_with_cli_override_and_print_config(cli, tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("method: static\nsparsity: 0.6\nepochs: 3\nmodel_kwargs: {hidden: [8]}\n")
    res = cli(["train", "--config", str(cfg), "--sparsity", "0.7", "--print-config"])
    assert res.exit_code == 0
    resolved = json.loads(res.stdout)
    assert (resolved["method"], resolved["sparsity"], resolved["epochs"]) == ("static", 0.7, 3)
    toml = tmp_path / "recipe.toml"
    toml.write_text('method = "rigl"\nupdate_interval_typo = 3\n')
    bad = cli(["train", "--config", str(toml), "--print-config"])
    assert bad.exit_code == 2 and "unknown option 'update_interval_typo'" in bad.stderr


def test_saved_config_reproduces_the_run(cli, tmp_path):
    a = cli(["train", *TINY, "--out", str(tmp_path / "a"), "--json"]).json()
    b = cli(["train", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"),
             "--quiet", "--json"]).json()
    assert a["test_accuracy"] == b["test_accuracy"] and a["layers"] == b["layers"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "rigll"], "unknown method 'rigll'"),
        (["--sparsity", "1.2"], "sparsity 1.2 is outside"),
        (["--sparsity", "abc"], "Invalid value for '--sparsity'"),
        (["--epochs", "0"], "epochs must be a positive integer"),
        (["--lr", "-1"], "learning rate must be > 0"),
        (["--distribution", "nope"], "unknown distribution"),
        (["--optimizer", "lbfgs"], "unknown optimizer"),
        (["--method", "static", "--update-interval", "5"], "does not take option"),
        (["--model-kwargs", "hidden"], "hidden"),
        (["--layer-density", "=3"], "malformed --layer-density"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
        (["--no-such-flag"], "No such option"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, tmp_path, args, needle):
    res = cli(["train", *TINY, "--out", str(tmp_path / "r"), *args, "--json"])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in res.stderr
    payload = json.loads(res.stdout)
    assert payload["exit_code"] == 2 and needle in payload["error"]["message"]
    assert not (tmp_path / "r").exists()


def test_existing_run_dir_is_not_overwritten(cli, tmp_path):
    assert cli(["train", *TINY, "--out", str(tmp_path / "r")]).exit_code == 0
    before = (tmp_path / "r" / "summary.json").read_text()
    res = cli(["train", *TINY, "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--resume" in res.stderr and "--overwrite" in res.stderr
    assert (tmp_path / "r" / "summary.json").read_text() == before


def test_registry_listings(cli):
    methods = cli(["methods", "--json"]).json()
    assert {"rigl", "static", "dense"} <= {m["name"] for m in methods}
    rigl = cli(["methods", "show", "rigl", "--json"]).json()
    assert rigl["options"]["update_interval"] == 100 and rigl["options"]["drop_fraction"] == 0.3
    assert {"mlp", "lenet300"} <= {m["name"] for m in cli(["models", "--json"]).json()}
    assert "digits" in {d["name"] for d in cli(["datasets", "--json"]).json()}
    unknown = cli(["methods", "sett"])
    assert unknown.exit_code == 2 and "unknown method" in unknown.stderr


def test_python_dash_m_and_help():
    out = subprocess.run([sys.executable, "-m", "sparsekit", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--update-interval" in out.stdout and "Example" in out.stdout


@pytest.mark.slow
def test_default_rigl_run_on_digits_end_to_end(cli, tmp_path):
    """The README's default story: `sparsekit train --method rigl` (digits, MLP, 90%, ERK)."""
    res = cli(["train", "--method", "rigl", "--out", str(tmp_path / "demo"), "--quiet", "--json"])
    assert res.exit_code == 0, res.stderr
    s = res.json()
    size = s["params"]["prunable"]
    assert s["test_accuracy"] >= 0.95
    assert s["realized_sparsity"] == pytest.approx(s["target_sparsity"], abs=1 / size)
    schema = json.loads(__import__("importlib.resources", fromlist=["files"]).files("sparsekit")
                        .joinpath("schemas/summary.schema.json").read_text())
    jsonschema.validate(s, schema)


def test_auto_threads_use_one_thread_for_small_steps_and_respect_the_flag():
    import torch

    from sparsekit.config import TrainConfig
    from sparsekit.distributed import DistContext
    from sparsekit.models import build_model
    from sparsekit.training import SMALL_STEP_MACS, choose_threads

    ctx = DistContext()
    small = build_model("mlp", {"hidden": [32]}, input_shape=(20,), num_classes=4)  # 768 MACs/sample
    assert choose_threads(TrainConfig(), small, (20,), torch.device("cpu"), ctx) == 1
    assert choose_threads(TrainConfig(threads=3), small, (20,), torch.device("cpu"), ctx) == 3
    big = build_model("mlp", {"hidden": [2048, 2048]}, input_shape=(1024,), num_classes=10)
    macs = 1024 * 2048 + 2048 * 2048 + 2048 * 10
    assert macs * 64 >= SMALL_STEP_MACS
    assert choose_threads(TrainConfig(batch_size=64), big, (1024,), torch.device("cpu"), ctx) == \
        torch.get_num_threads()
