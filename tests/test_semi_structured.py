"""The ``semi-structured`` export of 2:4 runs and its loader (sparsekit.semi_structured): written only for
2:4 runs (and in ``--format all`` only then), every listed weight checked 2:4 on CPU, validated on CPU
through the run's ONNX graph, hostile files refused with one line, CPU-only loading refused, and the CUDA
conversion path exercised with ``torch.sparse.to_sparse_semi_structured`` and ``torch.cuda`` faked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from sparsekit.exporters.context import load_run_dir
from sparsekit.exporters.pipeline import parse_formats
from structured_masks import nm_mask
from torch import nn

from sparsekit import semi_structured as ss
from sparsekit.errors import InputError

FILE = "model.2to4.safetensors"


class Net(nn.Module):
    """A Linear chain and a 2:4 conv (listed dense: torch's semi-structured tensors are 2-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def two_four_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(nm_mask(tuple(p.shape), 2, 4, seed=i))
            for i, (n, p) in enumerate(model.named_parameters()) if n.endswith("weight")}


@pytest.fixture(scope="module")
def run_2to4(tmp_path_factory) -> Path:
    from export_fixtures import make_run_dir

    torch.manual_seed(0)
    model = Net()
    run = make_run_dir(tmp_path_factory.mktemp("r24") / "run", model, two_four_masks(model), torch.randn(48, 4, 8, 8))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "granularity": "2:4"}))
    return run


@pytest.fixture(scope="module")
def exported(run_2to4, tmp_path_factory) -> tuple[dict, Path]:
    from conftest import run_cli

    out = tmp_path_factory.mktemp("e24")
    res = run_cli(["export", str(run_2to4), "--format", "semi-structured", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    (art,) = res.json()["artifacts"]
    return art, out / FILE


def test_a_2to4_run_exports_its_state_dict_with_the_2d_weights_listed(run_2to4, exported):
    art, path = exported
    assert art["status"] == "ok" and art["validation"]["passed"] and art["validation"]["max_abs_diff"] <= 1e-5
    assert art["semi_structured_weights"] == ["fc1.weight", "fc2.weight"]
    tensors, manifest = ss.read_semi_structured(path)
    assert manifest["granularity"] == "2:4" and manifest["dense_2to4"] == ["conv.weight"]
    assert [w["name"] for w in manifest["weights"]] == ["fc1.weight", "fc2.weight"]
    from safetensors.numpy import load_file

    weights = load_file(str(run_2to4 / "weights.safetensors"))
    assert sorted(tensors) == sorted(weights)
    for name, w in weights.items():  # equal values (masked entries +0.0 in the file, -0.0 after squashing)
        assert tensors[name].dtype == np.float32 and np.array_equal(tensors[name], w)
    for name in ("fc1.weight", "fc2.weight"):
        assert np.all((tensors[name].reshape(-1, 4) != 0).sum(1) == 2)
    assert any("load_semi_structured" in n for n in art["notes"]) and any("conv" in n for n in art["notes"])


def test_all_includes_semi_structured_only_for_2to4_runs(run_2to4, tmp_path):
    from export_fixtures import make_run_dir, random_masks

    assert "semi-structured" in parse_formats("all", load_run_dir(run_2to4))[0]
    model = Net()
    other = make_run_dir(tmp_path / "u", model, random_masks(model, 0.5), torch.randn(8, 4, 8, 8))
    names, from_all = parse_formats("all", load_run_dir(other))
    assert from_all and "semi-structured" not in names and {"onnx", "compressed"} <= set(names)


def test_a_run_that_is_not_2to4_is_refused_with_one_line(tmp_path, cli):
    from export_fixtures import make_run_dir

    model = Net()
    masks = two_four_masks(model)
    masks["fc1.weight"][0, :4] = True   # one group of 4 keeps 4
    run = make_run_dir(tmp_path / "run", model, masks, torch.randn(8, 4, 8, 8))
    res = cli(["export", str(run), "--format", "semi-structured", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "semi-structured needs every prunable layer 2:4; 'fc1.weight' is not (the run's granularity is " \
           "unstructured)" in res.stderr
    assert not (tmp_path / "o" / FILE).exists()


# --------------------------------------------------------------------------- hostile files

def write_file(path: Path, tensors: dict[str, np.ndarray], manifest: object | None) -> Path:
    meta = None if manifest is None else {ss.MANIFEST_KEY: manifest if isinstance(manifest, str) else
                                          json.dumps(manifest)}
    save_file(tensors, str(path), metadata=meta)
    return path


def good() -> tuple[dict[str, np.ndarray], dict]:
    w = np.where(nm_mask((8, 16), 2, 4), np.float32(1.5), np.float32(0)).astype(np.float32)
    return {"fc.weight": w}, {"format": ss.FORMAT, "version": 1, "weights": [{"name": "fc.weight", "shape": [8, 16]}]}


def _three_in_a_group(t, m):
    t["fc.weight"][3, 4:8] = [1, 1, 1, 0]


HOSTILE = [
    ("three-nonzeros-in-a-group", _three_in_a_group,
     "weight 'fc.weight' is not 2:4: a group of 4 inputs has 3 nonzeros"),
    ("no-manifest", lambda t, m: m.clear(), r"not a sparsekit semi-structured file \(manifest format field\)"),
    ("future-version", lambda t, m: m.update(version=2), "semi-structured version 2 is not supported"),
    ("listed-weight-missing", lambda t, m: m["weights"].append({"name": "gone", "shape": [4, 4]}),
     "manifest lists weight 'gone' that the file does not hold"),
    ("shape-mismatch", lambda t, m: m["weights"][0].update(shape=[16, 8]),
     r"weight 'fc.weight' has shape \[8, 16\], the manifest says \[16, 8\]"),
    ("weights-not-a-list", lambda t, m: m.update(weights={"fc.weight": 1}),
     r"manifest 'weights' is not a list of \{name, shape\} objects"),
    ("inputs-not-groups-of-4", lambda t, m: (t.update({"fc.weight": np.zeros((8, 6), np.float32)}),
                                             m["weights"][0].update(shape=[8, 6])),
     r"weight 'fc.weight' of shape \[8, 6\] cannot be 2:4"),
]


@pytest.mark.parametrize("edit,fragment", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_files_are_refused_with_one_line(tmp_path, edit, fragment):
    tensors, manifest = good()
    ss.read_semi_structured(write_file(tmp_path / "ok.safetensors", tensors, manifest))  # the unedited file reads
    edit(tensors, manifest)
    path = write_file(tmp_path / "bad.safetensors", tensors, manifest)
    with pytest.raises(InputError, match=fragment) as info:
        ss.read_semi_structured(path)
    assert info.value.exit_code == 2 and "\n" not in info.value.message


@pytest.mark.parametrize("content,fragment", [
    (b"\x00" * 40, "not a readable safetensors file"),
    (None, "no semi-structured manifest in the file metadata"),
    ("{not json", "no semi-structured manifest in the file metadata"),
])
def test_unreadable_files_and_manifests_are_refused(tmp_path, content, fragment):
    path = tmp_path / "x.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_file(path, good()[0], content)
    with pytest.raises(InputError, match=fragment):
        ss.read_semi_structured(path)


def test_the_cpu_runner_needs_the_source_run(exported, tmp_path):
    from sparsekit.exporters.semi_structured import semi_structured_runner

    tensors, manifest = ss.read_semi_structured(exported[1])
    moved = write_file(tmp_path / FILE, tensors, {**manifest, "source_run": str(tmp_path / "gone")})
    with pytest.raises(InputError, match=r"the source run .*gone of .* is gone"):
        semi_structured_runner(moved)


# --------------------------------------------------------------------------- loading on CUDA

def test_loading_without_cuda_is_one_clear_error(exported, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="semi-structured 2:4 tensors need CUDA") as info:
        ss.load_semi_structured(exported[1], Net())
    assert info.value.exit_code == 2 and "fix: load it on a machine with a CUDA GPU" in info.value.message


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch sees a GPU; ``.to(device=cuda)`` only changes the dtype; the conversion records its inputs and
    refuses a weight with fewer than 16 rows (as torch refuses shapes off its kernel tile)."""
    calls = []

    def convert(t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        if t.shape[0] < 16:
            raise RuntimeError("Error original_tensor.shape is not supported!\nmore")
        return t.clone()

    real_to = nn.Module.to
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", convert)
    monkeypatch.setattr(nn.Module, "to", lambda self, device=None, dtype=None: real_to(self, dtype=dtype))
    return calls


def test_loading_on_cuda_converts_every_listed_weight(exported, fake_cuda):
    tensors, _ = ss.read_semi_structured(exported[1])
    model = Net()
    result = ss.load_semi_structured(exported[1], model, device="cuda")
    assert result == {"fc1.weight": "semi-structured",
                      "fc2.weight": "dense: Error original_tensor.shape is not supported!"}
    assert [tuple(t.shape) for t in fake_cuda] == [(64, 256), (8, 64)]
    for t, name in zip(fake_cuda, ("fc1.weight", "fc2.weight"), strict=True):
        assert t.dtype == torch.float16 and t.is_contiguous()
        assert torch.equal(t, torch.from_numpy(tensors[name]).half())
    assert model.conv.weight.dtype == torch.float16 and torch.equal(model.conv.weight.float(),
                                                                    torch.from_numpy(tensors["conv.weight"]).half().float())
    assert not model.fc1.weight.requires_grad and model.fc2.weight.requires_grad  # replaced vs kept dense


def test_loading_refuses_a_cpu_device_and_a_model_of_other_shape(exported, fake_cuda):
    with pytest.raises(InputError, match="device 'cpu' cannot hold semi-structured tensors"):
        ss.load_semi_structured(exported[1], Net(), device="cpu")
    other = Net()
    other.fc2 = nn.Linear(64, 9)
    with pytest.raises(InputError, match="the file does not fit the model: Error"):
        ss.load_semi_structured(exported[1], other)
    assert not fake_cuda


def test_the_cpu_runner_runs_the_files_weights(run_2to4, exported, tmp_path):
    """Validation runs the file's own weights in the run's graph: a changed 2:4 weight changes the outputs."""
    from sparsekit.exporters.semi_structured import semi_structured_runner

    x = np.load(run_2to4 / "samples.npz")["x"][:8]
    tensors, manifest = ss.read_semi_structured(exported[1])
    same = semi_structured_runner(exported[1])(x)
    tensors["fc2.weight"] = tensors["fc2.weight"] * np.float32(2)
    changed = semi_structured_runner(write_file(tmp_path / FILE, tensors, manifest))(x)
    assert np.max(np.abs(changed - same)) > 1e-3
