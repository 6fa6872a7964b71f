"""sparsekit.save with real models' inputs: integer tokens, several inputs (tuple or dict), dynamic batch and
sequence axes, clear errors; metrics logged through the API give the CLI's metrics, summary and curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit
from sparsekit.errors import InputError
from sparsekit.model_io import read_io
from sparsekit.run_dir import RunDir

VOCAB, CLASSES = 40, 3


class TokenClassifier(nn.Module):
    """Embedding → mean over positions → Linear → ReLU → Linear: int64 token ids (N, T) in, (N, classes) out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.emb(tokens).mean(dim=1))))


class MaskedTokens(TokenClassifier):
    """Two integer inputs by keyword: token ids and an attention mask (1 = real token)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        m = attention_mask.unsqueeze(-1).float()
        pooled = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.fc2(F.relu(self.fc1(pooled)))


class TwoFloatInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12 + 4, 24)
        self.fc2 = nn.Linear(24, CLASSES)

    def forward(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.cat([features, context], dim=1))))


def _tokens(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _train(model: nn.Module, call, labels: torch.Tensor, steps: int = 12) -> sparsekit.Sparsifier:
    """A few steps of RigL at 60% so that masks are real; ``call(model)`` gives the logits of the batch."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparsekit.sparsify(model, opt, "rigl", sparsity=0.6, total_steps=steps, update_interval=4,
                            dense_first_layer=False)
    for _ in range(steps):
        F.cross_entropy(call(model), labels).backward()
        sp.step()
        opt.zero_grad()
    return sp


def _export(cli, run: Path, formats: str = "onnx,sparse-onnx,compressed") -> dict:
    res = cli(["export", str(run), "--format", formats, "--json"])
    assert res.exit_code == 0, res.stderr
    report = res.json()
    for a in report["artifacts"]:  # each run on the saved integer/several inputs against torch's outputs
        assert a["status"] == "ok" and a["validation"]["passed"] and a["validation"]["n_samples"] == 64, a
        assert a["validation"]["max_abs_diff"] <= a["validation"]["tolerance"], a
    return report


def _ort(path: Path | str) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _close(got: np.ndarray, ref: torch.Tensor) -> bool:
    ref_np = ref.detach().numpy()
    bound = 1e-5 * max(1.0, float(np.abs(ref_np).max()))
    return got.shape == ref_np.shape and float(np.abs(got - ref_np).max()) <= bound


def test_int64_tokens_save_export_and_dynamic_batch_and_sequence(cli, tmp_path):
    model = TokenClassifier()
    x, y = _tokens(64, 10, 1), torch.randint(0, CLASSES, (64,), generator=torch.Generator().manual_seed(2))
    sp = _train(model, lambda m: m(x), y)
    summary = sparsekit.save(model, sp, tmp_path / "tok", example_input=x, labels=y,
                             dynamic_axes={"input": {1: "seq"}})
    assert summary["io"] == {"input_layout": "NT tokens", "input_normalization": None, "class_names": None}
    samples = RunDir(tmp_path / "tok").samples()
    assert samples.x.dtype == np.int64 and np.array_equal(samples.x, x.numpy())  # ids kept, never cast to float
    report = _export(cli, tmp_path / "tok")
    for a in report["artifacts"][:2]:
        sess = _ort(a["path"])
        (inp,) = sess.get_inputs()
        assert (inp.name, inp.type, inp.shape) == ("input", "tensor(int64)", ["batch", "seq"])
        model.eval()
        for n, t in ((1, 3), (5, 23)):  # other batch sizes and sequence lengths than the example's 64 × 10
            z = _tokens(n, t, 10 + n)
            assert _close(sess.run(None, {"input": z.numpy()})[0], model(z)), (a["format"], n, t)


def test_compact_refuses_a_token_model_in_one_line_and_fast_packs_its_linear_layers(cli, tmp_path):
    model = TokenClassifier()
    x = _tokens(16, 6, 3)
    sp = _train(model, lambda m: m(x), torch.zeros(16, dtype=torch.long), steps=4)
    sparsekit.save(model, sp, tmp_path / "tok", example_input=x)
    res = cli(["export", str(tmp_path / "tok"), "--format", "compact-onnx"])
    assert res.exit_code != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "error:" in res.stderr, res.stderr
    res = cli(["export", str(tmp_path / "tok"), "--format", "fast"])  # a graph: its sparse linears packed
    assert res.exit_code == 0, res.stderr
    fast = sparsekit.runtime.load(tmp_path / "tok" / "export" / "model.fast.onnx")
    z = _tokens(3, 6, 7)  # the sequence axis is fixed unless save() is given dynamic_axes
    model.eval()
    assert _close(fast.run(z.numpy()), model(z))


def test_two_positional_inputs_keep_forward_names(cli, tmp_path):
    model = TwoFloatInputs()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(64, 12, generator=g), torch.randn(64, 4, generator=g)
    y = torch.randint(0, CLASSES, (64,), generator=g)
    sp = _train(model, lambda m: m(a, b), y)
    summary = sparsekit.save(model, sp, tmp_path / "two", example_input=(a, b), labels=y,
                             class_names=["cat", "dog", "eel"])
    assert summary["input_shape"] == {"features": [12], "context": [4]}
    assert summary["io"]["input_layout"] == {"features": "NC", "context": "NC"}
    samples = RunDir(tmp_path / "two").samples()
    assert list(samples.x) == ["features", "context"] and np.array_equal(samples.x["context"], b.numpy())
    report = _export(cli, tmp_path / "two")
    sess = _ort(report["artifacts"][0]["path"])
    assert [i.name for i in sess.get_inputs()] == ["features", "context"]
    g2 = torch.Generator().manual_seed(5)
    a2, b2 = torch.randn(7, 12, generator=g2), torch.randn(7, 4, generator=g2)
    assert _close(sess.run(None, {"features": a2.numpy(), "context": b2.numpy()})[0], model.eval()(a2, b2))
    for art in report["artifacts"]:
        assert read_io(art["path"])["class_names"] == ["cat", "dog", "eel"], art["format"]


def test_dict_input_with_a_shared_dynamic_sequence_axis(cli, tmp_path):
    model = MaskedTokens()
    ids = _tokens(64, 12, 6)
    mask = (torch.arange(12)[None] < torch.randint(3, 13, (64, 1), generator=torch.Generator().manual_seed(7))).long()
    y = torch.randint(0, CLASSES, (64,), generator=torch.Generator().manual_seed(8))
    batch = {"input_ids": ids, "attention_mask": mask}
    sp = _train(model, lambda m: m(**batch), y)
    sparsekit.save(model, sp, tmp_path / "dict", example_input=batch, labels=y,
                   dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})
    report = _export(cli, tmp_path / "dict")
    sess = _ort(report["artifacts"][0]["path"])
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("input_ids", ["batch", "seq"]),
                                                              ("attention_mask", ["batch", "seq"])]
    for n, t in ((2, 4), (9, 30)):
        z = {"input_ids": _tokens(n, t, 20 + t), "attention_mask": torch.ones(n, t, dtype=torch.long)}
        assert _close(sess.run(None, {k: v.numpy() for k, v in z.items()})[0], model.eval()(**z)), (n, t)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a Python branch on a tensor value: torch.export cannot trace it
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize(("example", "message"), [
    ("some text", "example_input is a str"),
    ((), "example_input is a tuple and empty"),
    ({"x": [1, 2]}, "input 'x' is a list, not a torch.Tensor"),
    (torch.zeros(0, 4), "the first axis must hold >= 1 samples"),
    (torch.zeros(3, 4, dtype=torch.complex64), "has dtype torch.complex64"),
    ((torch.zeros(3, 2), torch.zeros(5, 2)), "inputs hold different numbers of samples"),
])
def test_inputs_that_cannot_be_exported_are_one_line_errors(tmp_path, example, message):
    model = nn.Linear(4, 2)
    sp = sparsekit.sparsify(model, None, "static", sparsity=0.5, total_steps=1)
    with pytest.raises(InputError) as info:
        sparsekit.save(model, sp, tmp_path / "bad", example_input=example)
    assert message in info.value.what and "\n" not in str(info.value)
    assert not (tmp_path / "bad").exists()  # nothing written


def test_untraceable_model_is_an_input_error_not_a_traceback(tmp_path):
    model = DataDependent()
    sp = sparsekit.sparsify(model, None, "static", sparsity=0.5, total_steps=1, dense_first_layer=False)
    with pytest.raises(InputError) as info:
        sparsekit.save(model, sp, tmp_path / "dd", example_input=torch.randn(8, 4))
    assert info.value.what.startswith("torch cannot export the model to ONNX with this example input: ")
    assert "GuardOnDataDependentSymNode" in info.value.what  # the root cause, not torch's wrapper
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value) and len(str(info.value)) < 800
    assert not (tmp_path / "dd").exists()  # nothing written
    with pytest.raises(InputError, match="dynamic axis 5"):
        sparsekit.save(nn.Linear(4, 2), sp, tmp_path / "ax", example_input=torch.randn(8, 4),
                       dynamic_axes={"input": {5: "seq"}})
    with pytest.raises(InputError, match="names 3 classes but the model has 2 outputs"):
        sparsekit.save(nn.Linear(4, 2), sp, tmp_path / "cn", example_input=torch.randn(8, 4),
                       class_names=["a", "b", "c"])
    with pytest.raises(InputError, match="has 3 per-feature values for 4 input features"):
        sparsekit.save(nn.Linear(4, 2), sp, tmp_path / "nm", example_input=torch.randn(8, 4),
                       normalization={"mean": [0, 0, 0], "std": [1, 1, 1]})
    assert not any((tmp_path / d).exists() for d in ("ax", "cn", "nm"))


def test_logged_metrics_give_the_cli_metrics_summary_and_curves(cli, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparsekit.sparsify(model, opt, "rigl", sparsity=0.7, total_steps=30, update_interval=5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 12, generator=g), torch.randint(0, CLASSES, (96,), generator=g)
    accs = []
    for epoch in range(1, 4):
        for i in range(10):
            loss = F.cross_entropy(model(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8])
            loss.backward()
            sp.step()
            opt.zero_grad()
        with torch.no_grad():
            out = model(x[80:])
        accs.append(float((out.argmax(1) == y[80:]).float().mean()))
        sp.log(epoch=epoch, train_loss=loss, train_accuracy=0.5, test_loss=F.cross_entropy(out, y[80:]),
               test_accuracy=accs[-1], lr=0.1)
    with pytest.raises(InputError, match="metric test_accuracy='high' is not a number"):
        sp.log(test_accuracy="high")
    summary = sparsekit.save(model, sp, tmp_path / "api", example_input=x[80:], labels=y[80:])
    metrics = RunDir(tmp_path / "api").metrics()
    assert [m["step"] for m in metrics] == [10, 20, 30] and [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["test_accuracy"] for m in metrics] == accs
    assert all(isinstance(m["train_loss"], float) and m["sparsity"] == pytest.approx(0.7, abs=0.01) for m in metrics)
    assert summary["test_accuracy"] == accs[-1] and summary["best_test_accuracy"] == max(accs)
    assert summary["epochs"] == 3
    res = cli(["viz", str(tmp_path / "api"), "--json"])
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "api" / "viz" / "curves.png").stat().st_size > 10_000


def test_readme_python_api_block_runs_as_written(tmp_path, monkeypatch):
    """The README's loop, with a small model and data in place of the reader's own."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = text.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, CLASSES))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, CLASSES, (64,), generator=g)
    ns = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "epochs": 2,
          "loader": [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], "loss_fn": F.cross_entropy,
          "evaluate": lambda m: float((m(x).argmax(1) == y).float().mean()), "x_test": x, "y_test": y}
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), ns)
    summary = json.loads((tmp_path / "runs" / "mine" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 8
    assert [m["step"] for m in RunDir(tmp_path / "runs" / "mine").metrics()] == [4, 8]
    from sparsekit.viz import visualize

    visualize(tmp_path / "runs" / "mine")  # curves of what was logged (here no test loss, no train accuracy)
    assert (tmp_path / "runs" / "mine" / "viz" / "curves.png").is_file()
