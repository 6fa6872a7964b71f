"""compact-onnx on graphs that are not MLP chains: dead channels of conv nets, residual blocks, depthwise
convolutions and Transformer feed-forward units go exactly when they can, and stay when they cannot."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch
from export_fixtures import make_run_dir
from sparsekit.exporters.compact_graph import compact_graph
from torch import nn

from sparsekit.onnx_export import export_dense_onnx

TOL = 1e-5  # the fp32 rule: max|Δ| <= 1e-5 · max(1, max|reference|)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _compact(net: nn.Module, x: torch.Tensor, tmp_path) -> tuple[dict, np.ndarray, np.ndarray, onnx.ModelProto]:
    export_dense_onnx(net.eval(), x, tmp_path / "m.onnx")
    model = onnx.load(tmp_path / "m.onnx")
    new, counts = compact_graph(model)
    onnx.checker.check_model(new, full_check=True)
    return counts, _run(model, x.numpy()), _run(new, x.numpy()), new


def _by_layer(counts: dict) -> dict[str, tuple[int, int, int]]:
    return {c["layer"]: (c["before"], c["after"], c["folded"]) for c in counts["channels"]}


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.max(np.abs(a - b))) <= TOL * max(1.0, float(np.max(np.abs(a))))


class ConvNoPadSink(nn.Module):
    """conv_a (padded) → ReLU → MaxPool → conv_b (no padding) → ReLU → Flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv_a(x)), 2)
        return self.fc(torch.relu(self.conv_b(h)).flatten(1))


@torch.no_grad()
def _planted_conv_net() -> ConvNoPadSink:
    torch.manual_seed(0)
    net = ConvNoPadSink()
    net.conv_a.weight[0] = 0; net.conv_a.bias[0] = 0.7        # noqa: E702 constant 0.7 → folded into conv_b
    net.conv_b.weight[:, 1] = 0
    net.conv_a.weight[2] = 0; net.conv_a.bias[2] = -0.4       # noqa: E702 ReLU(-0.4) = 0: goes, nothing folded
    net.conv_b.weight[3] = 0; net.conv_b.bias[3] = 0.5        # noqa: E702 constant → folded into fc via Flatten
    return net


def test_conv_channels_without_inputs_or_readers_go_and_constants_fold(tmp_path):
    counts, before, after, new = _compact(_planted_conv_net(), torch.rand(4, 3, 8, 8), tmp_path)
    assert _by_layer(counts) == {"conv_a.weight": (8, 5, 1), "conv_b.weight": (8, 7, 1)}
    assert _close(before, after)
    shapes = {t.name: tuple(t.dims) for t in new.graph.initializer}
    assert shapes["conv_a.weight"] == (5, 3, 3, 3) and shapes["conv_b.weight"] == (7, 5, 3, 3)
    assert shapes["fc.weight"] == (5, 7 * 2 * 2)


class PaddedSink(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(torch.relu(self.conv_a(x))).mean(dim=(2, 3))


def test_a_constant_channel_stays_before_a_padded_convolution(tmp_path):
    torch.manual_seed(0)
    net = PaddedSink()
    with torch.no_grad():
        net.conv_a.weight[0] = 0
        net.conv_a.bias[0] = 0.7   # constant 0.7, but conv_b's zero padding sees 0 at the border: must stay
        net.conv_b.weight[:, 5] = 0  # unread: goes
    counts, before, after, _ = _compact(net, torch.rand(2, 3, 6, 6), tmp_path)
    assert _by_layer(counts) == {"conv_a.weight": (8, 7, 0)}
    assert _close(before, after)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv_b(torch.relu(self.conv_a(x))) + x)
        return self.fc(h.mean(dim=(2, 3), keepdim=True).flatten(1))  # as the zoo's ResNets end


def test_channels_that_feed_a_residual_add_stay(tmp_path):
    torch.manual_seed(0)
    net = Residual()
    with torch.no_grad():
        net.conv_b.weight[2] = 0  # conv_b's channel 2 has no inputs, but the skip path still carries x
        net.conv_b.bias[2] = 0.3
        net.conv_b.weight[:, 1] = 0  # conv_a's channel 1 unread: inside the block, so it goes
    counts, before, after, _ = _compact(net, torch.rand(2, 4, 5, 5), tmp_path)
    assert _by_layer(counts) == {"conv_a.weight": (4, 3, 0)}
    assert _close(before, after)


class Separable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.project = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.relu(self.dw(torch.relu(self.expand(x))))).mean(dim=(2, 3))


def test_depthwise_convolutions_lose_the_channels_with_them(tmp_path):
    torch.manual_seed(0)
    net = Separable()
    with torch.no_grad():
        net.project.weight[:, 2] = 0
        net.project.weight[:, 4] = 0
    counts, before, after, new = _compact(net, torch.rand(2, 3, 5, 5), tmp_path)
    assert _by_layer(counts) == {"expand.weight": (6, 4, 0)}
    assert _close(before, after)
    dw = next(n for n in new.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1
                                                                       for a in n.attribute))
    assert next(a.i for a in dw.attribute if a.name == "group") == 4


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x))) + x


def test_transformer_feed_forward_units_fold_through_gelu(tmp_path):
    torch.manual_seed(0)
    net = FeedForward()
    with torch.no_grad():
        net.up.weight[3] = 0
        net.up.bias[3] = 0.9      # GELU(0.9) ≠ 0: folded into down's bias
        net.down.weight[:, 7] = 0  # unread
    counts, before, after, _ = _compact(net, torch.rand(2, 5, 8), tmp_path)
    assert [(c["before"], c["after"], c["folded"]) for c in counts["channels"]] == [(16, 14, 1)]
    assert _close(before, after)


def test_export_cli_writes_and_says_what_it_removed(cli, tmp_path):
    net = _planted_conv_net()
    run = make_run_dir(tmp_path / "run", net, {n: p != 0 for n, p in net.named_parameters() if p.dim() > 1},
                       torch.rand(16, 3, 8, 8))
    res = cli(["export", str(run), "--format", "compact-onnx", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.stderr
    assert "removed 4 channels/units" in " ".join(res.stdout.split())
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    art = next(a for a in report["artifacts"] if a["format"] == "compact-onnx")
    assert art["status"] == "ok" and len(art["compaction"]["channels"]) == 2
    onnx.checker.check_model(onnx.load(tmp_path / "out" / "model.compact.onnx"), full_check=True)
