"""ImageNet-shape CNNs of the RigL paper's experiments and of deployment benchmarks: ResNet-18, ResNet-50 (He et al.
2016, torchvision's layout: stride on the 3×3 convolution) and MobileNetV2 (Sandler et al. 2018), written here
(no torchvision, no downloaded weights). ``stem="cifar"`` swaps the 7×7/2 stem and its max-pool for a 3×3/1
convolution, the usual CIFAR variant (ResNet-18 on 32×32 images); ``width`` scales every channel count.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.models.nets import _init_conv_net, scaled


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def _stem(channels: int, out: int, stem: str) -> nn.Sequential:
    if stem == "imagenet":
        return nn.Sequential(*_conv_bn(channels, out, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    if stem == "cifar":
        return nn.Sequential(*_conv_bn(channels, out, 3, 1), nn.ReLU(inplace=True))
    raise ValueError(f"stem must be imagenet or cifar, not {stem!r}")


class Basic(nn.Module):
    """ResNet-18/34 block: two 3×3 convolutions, a 1×1/stride projection shortcut when the shape changes."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, planes, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(planes, planes, 3))
        self.short = (nn.Sequential(*_conv_bn(cin, planes, 1, stride)) if stride != 1 or cin != planes
                      else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    """ResNet-50 block: 1×1 reduce, 3×3 (with the stride), 1×1 expand ×4; projection shortcut when needed."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(*_conv_bn(cin, planes, 1), nn.ReLU(inplace=True),
                                  *_conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(planes, out, 1))
        self.short = nn.Sequential(*_conv_bn(cin, out, 1, stride)) if stride != 1 or cin != out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
    """Stem, four stages (64/128/256/512 planes, the last three starting with stride 2), pool, classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, block: type[nn.Module],
                 depths: tuple[int, ...], width: float = 1.0, stem: str = "imagenet") -> None:
        super().__init__()
        planes = [scaled(p, width) for p in (64, 128, 256, 512)]
        self.stem = _stem(input_shape[0], planes[0], stem)
        cin, stages = planes[0], []
        for s, (p, n) in enumerate(zip(planes, depths, strict=True)):
            blocks = []
            for b in range(n):
                blocks.append(block(cin, p, 2 if s > 0 and b == 0 else 1))
                cin = p * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (×t), 3×3 depthwise (stride), 1×1 linear projection; residual when the
    shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = cin * t
        layers: list[nn.Module] = [] if t == 1 else [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
                   *_conv_bn(hidden, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


# (expansion t, channels c, repeats n, first stride s) of MobileNetV2's bottleneck stages
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0 (width scales every channel count): stem 3×3/2 (32), the bottleneck stages, 1×1 (1280),
    pool, classifier; ``stem="cifar"`` makes the stem stride 1."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
                 stem: str = "imagenet") -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be imagenet or cifar, not {stem!r}")
        cin = scaled(32, width)
        layers: list[nn.Module] = [*_conv_bn(input_shape[0], cin, 3, 2 if stem == "imagenet" else 1),
                                   nn.ReLU6(inplace=True)]
        for t, c, n, s in MOBILENET_V2:
            for i in range(n):
                layers.append(InvertedResidual(cin, scaled(c, width), s if i == 0 else 1, t))
                cin = scaled(c, width)
        last = scaled(1280, max(1.0, width))
        layers += [*_conv_bn(cin, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(last, num_classes)
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))
