"""Each validation rule of `sparsekit export` has a case that must fail it, at the CLI: exit 4, the failing
file removed, the other artifacts kept, and the report naming exactly the rule that failed.

The rules (docs/validation.md): fp16/int8 forms need top-1 agreement ≥ 99% with the torch reference and an
accuracy drop ≤ 0.5 points (int8: ≤ 1 point); every .onnx file must pass ``onnx.checker`` (full check).
The fp16 cases control the outputs exactly: the fp16 archive's runner is replaced by one that answers with
the reference logits except on chosen samples (so no near-tie can flip by platform). The int8 case is a
real quantization loss; the checker case a real file that ONNX Runtime runs but the checker rejects.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_fixtures import MLP, make_run_dir, random_masks
from sparsekit.exporters import validate
from sparsekit.exporters.registry import FORMATS, ExportFormat

N = 200
WRONG = 50  # the reference model is wrong on samples 0..49 (their labels are shifted by one class)


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = MLP(64, (32, 16), 10).eval()
    masks = random_masks(model, 0.5)
    x = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
        pred = model(x).argmax(1)
    y = pred.clone()
    y[:WRONG] = (pred[:WRONG] + 1) % 10
    return make_run_dir(tmp_path_factory.mktemp("runs") / "fp16", model, masks, x, y)


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory) -> Path:
    """Every first-layer row has one outlier weight (±6, on an input scaled to 1 %): per-row int8 scales
    of 6/127 round the other weights of the row (|w| ≤ 0.125) coarsely, and top-1 moves on some samples."""
    torch.manual_seed(0)
    model = MLP(64, (32, 16), 10)
    masks = random_masks(model, 0.5)
    with torch.no_grad():
        masks["net.1.weight"][:, 0] = True
        model.net[1].weight[:, 0] = 6.0 * torch.sign(model.net[1].weight[:, 0])
    x = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x[:, 0, 0, 0] *= 0.01
    return make_run_dir(tmp_path_factory.mktemp("runs") / "int8", model, masks, x)


def samples(run: Path) -> dict[str, np.ndarray]:
    return dict(np.load(run / "samples.npz"))


def report(out: Path) -> dict[str, dict]:
    rep = json.loads((out / "export_report.json").read_text())
    return {Path(a["path"]).name: a for a in rep["artifacts"]}


def answer_fp16_with(monkeypatch, run: Path, rows: list[int], shift: int) -> None:
    """The fp16 archive's outputs: the reference logits, with top-1 of ``rows`` moved by ``shift`` classes."""
    s = samples(run)
    logits = s["logits"].copy()
    for i in rows:
        target = (logits[i].argmax() + shift) % logits.shape[1]
        logits[i, target] = logits[i].max() + 1.0
    by_input = {s["x"][i].tobytes(): logits[i] for i in range(len(s["x"]))}
    real = validate.RUNNERS["compressed"]

    def loader(path: Path, threads: int = 1) -> validate.Runner:
        runner = real(path, threads)
        if ".fp16." not in Path(path).name:
            return runner
        return lambda x: np.stack([by_input[row.tobytes()] for row in np.asarray(x, np.float32)])

    monkeypatch.setitem(validate.RUNNERS, "compressed", loader)


def export_args(run: Path, out: Path, precisions: str) -> list[str]:
    return ["export", str(run), "--format", "onnx,compressed", "--precision", precisions, "--out", str(out)]


def test_fp16_under_99_percent_agreement_fails_though_accuracy_is_unchanged(cli, tmp_path, monkeypatch, fp16_run):
    """10 samples the reference gets wrong move to another wrong class: agreement 95%, accuracy drop 0."""
    assert (samples(fp16_run)["logits"].argmax(1) != samples(fp16_run)["y"]).sum() == WRONG
    answer_fp16_with(monkeypatch, fp16_run, rows=list(range(10)), shift=2)
    out = tmp_path / "o"
    res = cli(export_args(fp16_run, out, "fp32,fp16"))
    assert res.exit_code == 4, res.stderr
    assert "top-1 agreement 95.00% < 99%" in res.stderr and res.stderr.count("\n") == 1
    assert not (out / "model.fp16.skz").exists()
    assert (out / "model.skz").is_file() and (out / "model.onnx").is_file()
    arts = report(out)
    v = arts["model.fp16.skz"]["validation"]
    assert arts["model.fp16.skz"]["status"] == "failed (file removed)"
    assert v["errors"] == ["logits: top-1 agreement 95.00% < 99%"]
    assert v["top1_agreement"] == 0.95 and v["accuracy_drop_points"] == 0
    assert arts["model.skz"]["status"] == arts["model.onnx"]["status"] == "ok"


def test_fp16_drop_over_half_a_point_fails_at_exactly_99_percent_agreement(cli, tmp_path, monkeypatch, fp16_run):
    """2 of 200 correct samples turn wrong: agreement 99.0% (passes), accuracy drop 1.0 point > 0.5."""
    answer_fp16_with(monkeypatch, fp16_run, rows=[WRONG, WRONG + 1], shift=3)
    out = tmp_path / "o"
    assert cli(export_args(fp16_run, out, "fp16")).exit_code == 4
    assert not (out / "model.fp16.skz").exists() and (out / "model.onnx").is_file()
    v = report(out)["model.fp16.skz"]["validation"]
    assert v["top1_agreement"] == 0.99
    assert v["errors"] == ["logits: accuracy drop 1.00 points > 0.5"]


def test_fp16_within_both_rules_passes(cli, tmp_path, monkeypatch, fp16_run):
    """The boundary: 1 of 200 correct samples turns wrong (agreement 99.5%, drop 0.5 points): kept."""
    answer_fp16_with(monkeypatch, fp16_run, rows=[WRONG], shift=3)
    out = tmp_path / "o"
    res = cli(export_args(fp16_run, out, "fp16"))
    assert res.exit_code == 0, res.stderr
    v = report(out)["model.fp16.skz"]["validation"]
    assert v["passed"] and v["top1_agreement"] == 0.995 and v["accuracy_drop_points"] == pytest.approx(0.5)


def test_int8_accuracy_drop_over_one_point_fails(cli, tmp_path, int8_run):
    out = tmp_path / "o"
    res = cli(export_args(int8_run, out, "fp32,int8"))
    assert res.exit_code == 4, res.stderr
    assert not (out / "model.int8.skz").exists()
    assert (out / "model.skz").is_file() and (out / "model.onnx").is_file()
    arts = report(out)
    v = arts["model.int8.skz"]["validation"]
    assert arts["model.int8.skz"]["status"] == "failed (file removed)" and v["precision"] == "int8"
    assert 2 <= v["accuracy_drop_points"] <= 30, v
    agreement = f"logits: top-1 agreement {v['top1_agreement']:.2%} < 99%"
    assert v["errors"] == [agreement, f"logits: accuracy drop {v['accuracy_drop_points']:.2f} points > 1.0"]
    assert f"accuracy drop {v['accuracy_drop_points']:.2f} points > 1.0" in res.stderr
    assert arts["model.skz"]["status"] == "ok"


def duplicate_metadata_key(path: Path) -> None:
    """A valid model made invalid for ``onnx.checker`` only: ONNX Runtime loads and runs it unchanged."""
    model = onnx.load(str(path))
    model.metadata_props.add(key=model.metadata_props[0].key, value="again")
    onnx.save_model(model, str(path))


def write_onnx_then(after) -> ExportFormat:
    real = FORMATS["onnx"]

    def write(ctx, out_path: Path, options) -> dict:
        info = real.write(ctx, out_path, options)
        after(out_path)
        return info

    return ExportFormat(real.name, real.description, real.suffix, write)


def test_onnx_checker_rejection_fails_the_file(cli, tmp_path, monkeypatch, fp16_run):
    monkeypatch.setitem(FORMATS, "onnx", write_onnx_then(duplicate_metadata_key))
    out = tmp_path / "o"
    res = cli(export_args(fp16_run, out, "fp32"))
    assert res.exit_code == 4, res.stderr
    assert "onnx.checker rejected the model" in res.stderr and "duplicate keys in metadata_props" in res.stderr
    assert not (out / "model.onnx").exists() and (out / "model.skz").is_file()
    arts = report(out)
    assert arts["model.onnx"]["status"] == "failed (file removed)"
    assert arts["model.skz"]["status"] == "ok"
    # kept with --warn-only: ONNX Runtime runs it and its outputs are right, so only the checker catches it
    kept = tmp_path / "kept"
    assert cli([*export_args(fp16_run, kept, "fp32"), "--warn-only"]).exit_code == 0
    assert report(kept)["model.onnx"]["status"] == "kept (validation failed)"
    s = samples(fp16_run)
    sess = ort.InferenceSession(str(kept / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: s["x"]})[0]
    assert np.max(np.abs(got - s["logits"])) <= 1e-5 * max(1.0, float(np.max(np.abs(s["logits"]))))


def test_language_model_outputs_are_judged_per_token():
    """(n, T, V) logits: agreement and accuracy are per token, so a lossy LM form that changes 2 of 100
    tokens' top-1 fails the 99% rule (it used to pass whatever it returned)."""
    from sparsekit.exporters.context import Samples

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 25, 7)).astype(np.float32)
    y = ref.argmax(-1)
    samples = Samples(np.zeros((4, 25), np.float32), y, ref)
    ok = validate.compare(ref + 1e-3, samples, "fp16")
    assert ok["passed"] and ok["top1_agreement"] == 1.0 and ok["accuracy_drop_points"] == 0.0
    bad = ref.copy()
    for n, t in ((0, 3), (2, 24)):  # two of the 100 tokens now predict another symbol
        bad[n, t, (y[n, t] + 1) % 7] = bad[n, t].max() + 1
    result = validate.compare(bad, samples, "fp16")
    assert result["top1_agreement"] == pytest.approx(0.98) and result["accuracy_drop_points"] == pytest.approx(2.0)
    assert not result["passed"]
    assert result["errors"] == ["logits: top-1 agreement 98.00% < 99%", "logits: accuracy drop 2.00 points > 0.5"]
