"""Models: a registry of built-in architectures plus ``py:`` specs that load the user's own builder.

Spec grammar (``--model``): a registry name (see :data:`MODELS`) | ``py:package.module:function`` |
``py:path/to/file.py:function``. ``py:`` specs import and run the user's code — by design.
Every model gets ``input_shape`` and ``num_classes`` from the data; registry models take ``width``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sparsekit.errors import InputError, close_matches
from sparsekit.models import imagenet, nets, sequence
from sparsekit.models.user import build_user_model, user_accepts_width

__all__ = ["MODELS", "ModelInfo", "build_model", "list_models", "model_accepts_width", "parse_model_kwargs"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    defaults: dict[str, Any]
    builder: Callable[..., nn.Module]
    accepts_width: bool = True
    input_kind: str = "any"  # "any", "image" or "sequence" (symbol windows from text data)
    attention_heads: int = 0  # heads of its attention layers (0: none); viz splits projections per head
    notes: str = field(default="")


def _flat_size(input_shape: tuple[int, ...]) -> int:
    return int(math.prod(input_shape))


def _build_mlp(
    input_shape: tuple[int, ...], num_classes: int, *, hidden: list[int], width: float
) -> nn.Module:
    return nets.MLP(_flat_size(input_shape), [nets.scaled(h, width) for h in hidden], num_classes)


def _build_lenet300(input_shape: tuple[int, ...], num_classes: int, *, width: float) -> nn.Module:
    return nets.MLP(_flat_size(input_shape), [nets.scaled(h, width) for h in (300, 100)], num_classes)


def _build_lenet5(input_shape: tuple[int, ...], num_classes: int, *, width: float) -> nn.Module:
    return nets.LeNet5(input_shape, num_classes, width=width)


def _build_resnet20(input_shape: tuple[int, ...], num_classes: int, *, width: float) -> nn.Module:
    return nets.ResNetCifar(input_shape, num_classes, depth=20, width=width)


def _build_wrn_22_2(input_shape: tuple[int, ...], num_classes: int, *, width: float) -> nn.Module:
    return nets.WideResNet(input_shape, num_classes, depth=22, widen=2, width=width)


def _build_mobilenet_v1(input_shape: tuple[int, ...], num_classes: int, *, width: float) -> nn.Module:
    return nets.MobileNetV1(input_shape, num_classes, width=width)


def _build_resnet18(input_shape: tuple[int, ...], num_classes: int, *, width: float, stem: str) -> nn.Module:
    return imagenet.ResNet(input_shape, num_classes, block=imagenet.Basic, depths=(2, 2, 2, 2), width=width,
                           stem=stem)


def _build_resnet50(input_shape: tuple[int, ...], num_classes: int, *, width: float, stem: str) -> nn.Module:
    return imagenet.ResNet(input_shape, num_classes, block=imagenet.Bottleneck, depths=(3, 4, 6, 3), width=width,
                           stem=stem)


def _build_mobilenet_v2(input_shape: tuple[int, ...], num_classes: int, *, width: float, stem: str) -> nn.Module:
    return imagenet.MobileNetV2(input_shape, num_classes, width=width, stem=stem)


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in [
        ModelInfo(
            "mlp",
            "multi-layer perceptron: Flatten → Linear+ReLU per hidden width → Linear "
            "(any input; the default model)",
            {"hidden": [512, 256], "width": 1.0},
            _build_mlp,
        ),
        ModelInfo(
            "lenet300",
            "LeNet-300-100: Flatten → 300 → 100 → classes, ReLU (784-300-100-10 on MNIST)",
            {"width": 1.0},
            _build_lenet300,
        ),
        ModelInfo(
            "lenet5",
            "LeNet-5 (ReLU, max-pool): conv 6 → conv 16 → 120 → 84 → classes; images "
            "(28×28, 32×32, adapts to others)",
            {"width": 1.0},
            _build_lenet5,
            input_kind="image",
        ),
        ModelInfo(
            "resnet20",
            "CIFAR ResNet-20 (3 stages 16/32/64, BatchNorm, identity shortcuts; 0.27 M params); 32×32 images",
            {"width": 1.0},
            _build_resnet20,
            input_kind="image",
        ),
        ModelInfo(
            "wrn-22-2",
            "WideResNet-22-2 (pre-activation, 32/64/128 channels, no dropout; 1.1 M params); 32×32 images",
            {"width": 1.0},
            _build_wrn_22_2,
            input_kind="image",
        ),
        ModelInfo(
            "mobilenet-v1",
            "small MobileNet-V1 (0.5× channels, depthwise-separable, CIFAR strides); 32×32 images",
            {"width": 1.0},
            _build_mobilenet_v1,
            input_kind="image",
        ),
        ModelInfo(
            "resnet18",
            "ResNet-18 (basic blocks 64/128/256/512, BatchNorm, projection shortcuts; 11.7 M params at 1000 "
            "classes); stem=imagenet (7×7/2 + max-pool, 224×224) or stem=cifar (3×3/1, 32×32)",
            {"width": 1.0, "stem": "imagenet"},
            _build_resnet18,
            input_kind="image",
        ),
        ModelInfo(
            "resnet50",
            "ResNet-50 (bottleneck blocks, the RigL paper's ImageNet model; 25.6 M params at 1000 classes); "
            "stem=imagenet or cifar",
            {"width": 1.0, "stem": "imagenet"},
            _build_resnet50,
            input_kind="image",
        ),
        ModelInfo(
            "mobilenet-v2",
            "MobileNetV2 1.0 (inverted residuals, depthwise 3×3 kept dense by the fast format; 3.5 M params at "
            "1000 classes); stem=imagenet (224×224) or cifar (stride 1)",
            {"width": 1.0, "stem": "imagenet"},
            _build_mobilenet_v2,
            input_kind="image",
        ),
        ModelInfo(
            "char-gru",
            "character-level LM (RigL paper, appendix I): embedding 128 → GRU 512 → readout 256 → 128 "
            "→ vocabulary; text data (stdlib-docs, text:PATH)",
            {"width": 1.0},
            sequence.build_char_gru,
            input_kind="sequence",
        ),
        ModelInfo(
            "char-lstm",
            "character-level LM: embedding 128 → LSTM 512 → readout 256 → 128 → vocabulary; text data",
            {"width": 1.0},
            sequence.build_char_lstm,
            input_kind="sequence",
        ),
        ModelInfo(
            "char-transformer",
            "small causal character-level Transformer: 4 pre-norm layers, d=256, 4 heads, GELU FFN 1024, "
            "learned positions (window = --seq-len); text data",
            {"width": 1.0},
            sequence.build_char_transformer,
            input_kind="sequence",
            attention_heads=sequence.CHAR_TRANSFORMER_HEADS,
        ),
    ]
}


def list_models() -> list[dict[str, Any]]:
    """Rows for ``sparsekit models``."""
    return [
        {
            "name": i.name,
            "description": i.description,
            "defaults": dict(i.defaults),
            "input": i.input_kind,
            "accepts_width": i.accepts_width,
        }
        for i in MODELS.values()
    ]


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _parse_number(text: str) -> int | float | None:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value


def parse_model_kwargs(pairs: list[str]) -> dict[str, Any]:
    """Parse repeatable ``key=value`` strings into model kwargs.

    ``["hidden=512,256", "width=0.5", "act=gelu"]`` → ``{"hidden": [512, 256], "width": 0.5, "act": "gelu"}``.

    One pair per string. Values: int, float, ``true``/``false`` (bool), a comma list of numbers
    (always a list, even ``hidden=64,``), or else a plain string.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        where = f"--model-kwargs {pair}"
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise InputError(
                f"malformed model kwarg {pair!r}",
                where=where,
                fix="write one key=value pair per --model-kwargs, e.g. --model-kwargs hidden=512,256",
            )
        raw = raw.strip()
        if not raw:
            raise InputError(f"model kwarg {key!r} has no value", where=where, fix=f"write {key}=VALUE")
        if "=" in raw or any(ch.isspace() for ch in raw):
            raise InputError(
                f"malformed model kwarg {pair!r} (several pairs in one?)",
                where=where,
                fix="give each key=value pair its own --model-kwargs",
            )
        if key in out:
            raise InputError(f"model kwarg {key!r} given twice", where=where, fix="give each key once")
        value: Any
        if "," in raw:
            items = [s for s in raw.split(",")]
            if items and items[-1] == "":
                items = items[:-1]
            numbers = [_parse_number(s) for s in items]
            if not items or any(n is None or s.strip() == "" for n, s in zip(numbers, items, strict=True)):
                raise InputError(
                    f"model kwarg {key}={raw!r}: comma lists must be numbers",
                    where=where,
                    fix=f"e.g. {key}=512,256",
                )
            if any(isinstance(n, float) for n in numbers):
                numbers = [float(n) for n in numbers if n is not None]
            value = numbers
        else:
            number = _parse_number(raw)
            if number is not None:
                value = number
            elif raw.lower() in ("true", "false"):
                value = raw.lower() == "true"
            else:
                value = raw
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise InputError(
                f"model kwarg {key}={raw!r} is not finite", where=where, fix="use a finite number"
            )
        out[key] = value
    return out


def model_accepts_width(spec: str) -> bool:
    """Whether the model takes a ``width`` multiplier (Small-Dense needs one)."""
    if spec.startswith("py:"):
        return user_accepts_width(spec)
    return _registry_info(spec).accepts_width


def _registry_info(spec: str) -> ModelInfo:
    if spec in MODELS:
        return MODELS[spec]
    hint = ""
    if ":" in spec or spec.endswith(".py") or "/" in spec:
        hint = "; user models need the py: prefix, e.g. py:mypkg.models:build or py:path/to/file.py:build"
    raise InputError(
        f"unknown model {spec!r}", where=f"--model {spec}", fix=close_matches(spec, list(MODELS)) + hint
    )


def _check_registry_kwargs(info: ModelInfo, kwargs: dict[str, Any]) -> dict[str, Any]:
    where = f"--model {info.name} --model-kwargs"
    unknown = sorted(set(kwargs) - set(info.defaults))
    if unknown:
        raise InputError(
            f"model {info.name!r} does not accept {', '.join(repr(k) for k in unknown)}",
            where=where,
            fix=f"accepted keys: {', '.join(info.defaults)}",
        )
    merged = {**info.defaults, **kwargs}
    width = merged["width"]
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float))
        or not (0 < width <= 64)
        or not math.isfinite(width)
    ):
        raise InputError(
            f"width={width!r} is invalid", where=where, fix="use a positive number, e.g. width=0.5"
        )
    merged["width"] = float(width)
    if "hidden" in merged:
        hidden = merged["hidden"]
        hidden = hidden if isinstance(hidden, list) else [hidden]
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise InputError(
                f"hidden={merged['hidden']!r} is invalid",
                where=where,
                fix="use positive integer widths, e.g. hidden=512,256",
            )
        merged["hidden"] = list(hidden)
    if "stem" in merged and merged["stem"] not in ("imagenet", "cifar"):
        raise InputError(f"stem={merged['stem']!r} is invalid", where=where,
                         fix="use stem=imagenet (7x7/2 stem, 224x224 images) or stem=cifar (3x3/1, 32x32)")
    return merged


def build_model(
    spec: str, kwargs: dict[str, Any], *, input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """Build the model named by ``spec`` for per-sample ``input_shape`` and ``num_classes`` outputs."""
    input_shape = tuple(int(s) for s in input_shape)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(
            "empty model spec", where="--model", fix="use a registry name (see `sparsekit models`)"
        )
    spec = spec.strip()
    if spec.startswith("py:"):
        return build_user_model(spec, dict(kwargs), input_shape=input_shape, num_classes=num_classes)
    info = _registry_info(spec)
    merged = _check_registry_kwargs(info, dict(kwargs))
    if info.input_kind == "image" and len(input_shape) != 3:
        raise InputError(
            f"model {spec!r} needs images (C×H×W) but the data has input shape {list(input_shape)}",
            where=f"--model {spec}",
            fix="use an image dataset, or a model for any input (mlp, lenet300)",
        )
    if info.input_kind == "sequence" and len(input_shape) != 1:
        raise InputError(
            f"model {spec!r} needs text windows (symbol sequences) but the data has input shape "
            f"{list(input_shape)}",
            where=f"--model {spec}",
            fix="use text data: --data stdlib-docs or --data text:PATH",
        )
    try:
        return info.builder(input_shape, num_classes, **merged)
    except ValueError as exc:
        raise InputError(
            f"cannot build {spec!r} for input shape {list(input_shape)}: {exc}",
            where=f"--model {spec}",
            fix="use larger images or another model",
        ) from exc
