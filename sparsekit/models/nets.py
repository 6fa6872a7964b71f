"""The built-in architectures. Each takes ``width`` (multiplier of every hidden width / channel count).

Conventions shared by all of them, because other parts rely on them:
- no dropout and no other hidden randomness in ``forward`` (bit-exact resume);
- readable, stable submodule names (``fc1``, ``stage2.block0.conv1``, ``head``): exporters and
  per-layer overrides address layers by these names;
- inputs are (N, *input_shape); MLPs start with ``nn.Flatten()`` so images keep their shape in ONNX;
- conv nets end with adaptive average pooling, so they work on any reasonable image size (they are
  designed for 32×32).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def scaled(base: int, width: float) -> int:
    """round(base × width), half up, at least 1: the integer grid Small-Dense searches over."""
    return max(1, math.floor(base * width + 0.5))


class MLP(nn.Sequential):
    """Flatten → (Linear → ReLU) per hidden width → Linear head. Names: flatten, fc1, relu1, …, head."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int) -> None:
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        prev = in_features
        for i, h in enumerate(hidden, start=1):
            layers += [(f"fc{i}", nn.Linear(prev, h)), (f"relu{i}", nn.ReLU())]
            prev = h
        layers.append(("head", nn.Linear(prev, num_classes)))
        super().__init__(OrderedDict(layers))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling: conv(6,5×5) → pool → conv(16,5×5) → pool → 120 → 84 → classes.

    The first conv pads by 2 for inputs smaller than 32 (the usual MNIST 28×28 variant, giving the
    classic 16×5×5 feature map); the second pads by 2 when its input is smaller than 10 (tiny images
    such as 8×8 digits), and the second pool is skipped when it would leave nothing.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        c, h, w = input_shape
        c1, c2, f1, f2 = (scaled(b, width) for b in (6, 16, 120, 84))
        pad1 = 2 if min(h, w) < 32 else 0
        h1, w1 = (h + 2 * pad1 - 4) // 2, (w + 2 * pad1 - 4) // 2
        pad2 = 0 if min(h1, w1) >= 10 else 2
        h2, w2 = h1 + 2 * pad2 - 4, w1 + 2 * pad2 - 4
        if min(h1, w1, h2, w2) < 1:
            raise ValueError(f"input {h}×{w} is too small for LeNet-5")
        pool2 = min(h2, w2) >= 2
        if pool2:
            h2, w2 = h2 // 2, w2 // 2
        self.conv1 = nn.Conv2d(c, c1, 5, padding=pad1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=pad2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2) if pool2 else nn.Identity()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * h2 * w2, f1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, f2)
        self.relu4 = nn.ReLU()
        self.head = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.head(self.relu4(self.fc2(x)))


def _init_conv_net(model: nn.Module) -> None:
    """He (fan_out) init for convs, BN γ=1 β=0, PyTorch default for Linear — the usual CIFAR recipe."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """CIFAR ResNet block (He et al. 2016, option A): identity shortcut, zero-padded and subsampled
    when the shape changes, so the shortcut adds no parameters (ResNet-20 has 0.27 M)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32×32 images: conv3×3(16) → 3 stages of n blocks (16/32/64) → pool → head."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, depth: int = 20, width: float = 1.0
    ) -> None:
        super().__init__()
        n = (depth - 2) // 6
        widths = [scaled(b, width) for b in (16, 32, 64)]
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for s, planes in enumerate(widths):
            blocks = OrderedDict()
            for b in range(n):
                blocks[f"block{b}"] = BasicBlock(in_planes, planes, 2 if (s > 0 and b == 0) else 1)
                in_planes = planes
            stages.append(nn.Sequential(blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(in_planes, num_classes)
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.head(self.flatten(self.pool(x)))


class WideBlock(nn.Module):
    """Pre-activation wide block
    (Zagoruyko & Komodakis 2016), no dropout; 1×1 conv shortcut on shape change."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-k: conv3×3(16) →
    3 stages of (depth−4)/6 wide blocks (16k/32k/64k) → BN-ReLU → pool → head."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 22,
        widen: int = 2,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [scaled(b * widen, width) for b in (16, 32, 64)]
        stem = scaled(16, width)
        self.conv1 = nn.Conv2d(input_shape[0], stem, 3, padding=1, bias=False)
        in_planes = stem
        stages = []
        for s, planes in enumerate(widths):
            blocks = OrderedDict()
            for b in range(n):
                blocks[f"block{b}"] = WideBlock(in_planes, planes, 2 if (s > 0 and b == 0) else 1)
                in_planes = planes
            stages.append(nn.Sequential(blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(in_planes, num_classes)
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.head(self.flatten(self.pool(x)))


# MobileNet-V1 at 0.5× channels with CIFAR strides (first conv stride 1): (out_channels, stride).
MOBILENET_V1_CONFIG: tuple[tuple[int, int], ...] = (
    (32, 1),
    (64, 2),
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (256, 1),
    (256, 1),
    (256, 1),
    (256, 1),
    (512, 2),
    (512, 1),
)
MOBILENET_V1_STEM = 16


class DepthwiseSeparable(nn.Module):
    """3×3 depthwise conv → BN → ReLU → 1×1 pointwise conv → BN → ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(in_planes, in_planes, 3, stride=stride, padding=1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.pw = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.pw(F.relu(self.bn1(self.dw(x))))))


class MobileNetV1(nn.Module):
    """Small MobileNet-V1 (0.5× channels, 13 depthwise-separable blocks, CIFAR strides) for 32×32 images."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        stem = scaled(MOBILENET_V1_STEM, width)
        self.conv1 = nn.Conv2d(input_shape[0], stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks = OrderedDict()
        in_planes = stem
        for i, (planes, stride) in enumerate(MOBILENET_V1_CONFIG):
            out = scaled(planes, width)
            blocks[f"block{i}"] = DepthwiseSeparable(in_planes, out, stride)
            in_planes = out
        self.blocks = nn.Sequential(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(in_planes, num_classes)
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.head(self.flatten(self.pool(x)))
