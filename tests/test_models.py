"""Model registry, kwargs parsing, py: loader; parameter counts computed by hand."""

from __future__ import annotations

import textwrap

import pytest
import torch
from tolerances import assert_fp32_close
from torch import nn

from sparsekit.errors import InputError
from sparsekit.models import MODELS, build_model, list_models, model_accepts_width, parse_model_kwargs


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_input_error(match: str, fn, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    assert match in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    return info.value


# ---------------------------------------------------------------- parse_model_kwargs


def test_parse_model_kwargs_values():
    assert parse_model_kwargs(
        ["hidden=512,256", "width=0.5", "act=gelu", "lr=1e-3", "bias=false", "h=64,"]
    ) == {
        "hidden": [512, 256],
        "width": 0.5,
        "act": "gelu",
        "lr": 0.001,
        "bias": False,
        "h": [64],
    }
    assert parse_model_kwargs(["n=3"]) == {"n": 3} and isinstance(parse_model_kwargs(["n=3"])["n"], int)
    assert parse_model_kwargs(["r=0.5,1"]) == {"r": [0.5, 1.0]}
    assert parse_model_kwargs([]) == {}


@pytest.mark.parametrize(
    "pairs, match",
    [
        (["hidden"], "malformed"),
        (["=3"], "malformed"),
        (["1x=3"], "malformed"),
        (["width="], "no value"),
        (["hidden=512,256 width=0.5"], "several pairs"),
        (["hidden=512,width=0.5"], "several pairs"),
        (["width=1", "width=2"], "given twice"),
        (["hidden=a,b"], "comma lists must be numbers"),
        (["hidden=1,,2"], "comma lists must be numbers"),
        (["width=nan"], "not finite"),
    ],
)
def test_parse_model_kwargs_errors(pairs, match):
    assert_input_error(match, parse_model_kwargs, pairs)


# ---------------------------------------------------------------- registry models

# (model, input_shape, kwargs, expected parameter count, computed by hand)
PARAM_COUNTS = [
    # 64·512+512 + 512·256+256 + 256·10+10
    ("mlp", (1, 8, 8), {}, 33280 + 131328 + 2570),
    # hidden=32 on 20 features, 4 classes: 20·32+32 + 32·4+4
    ("mlp", (20,), {"hidden": 32}, 672 + 132),
    # width 0.5: 64-256-128-10
    ("mlp", (64,), {"width": 0.5}, 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10),
    # 784·300+300 + 300·100+100 + 100·10+10
    ("lenet300", (784,), {}, 266610),
    ("lenet300", (1, 28, 28), {}, 266610),
    # width 0.5: 784-150-50-10
    ("lenet300", (784,), {"width": 0.5}, 784 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10),
    # conv 1→6 (5×5) 156, conv 6→16 2416, fc 400→120 48120, 120→84 10164, 84→10 850
    ("lenet5", (1, 28, 28), {}, 156 + 2416 + 48120 + 10164 + 850),
    # 32×32 colour: first conv 3·6·25+6 = 456, same 16×5×5 map
    ("lenet5", (3, 32, 32), {}, 456 + 2416 + 48120 + 10164 + 850),
    # 8×8: conv1 pad 2 → 8 → pool 4 → conv2 pad 2 → 4 → pool 2 → 16·2·2 = 64 features
    ("lenet5", (1, 8, 8), {}, 156 + 2416 + (64 * 120 + 120) + 10164 + 850),
    # conv1 432 + bn 32; stage1 6·2304 + 6·32; stage2 4608 + 5·9216 + 6·64;
    # stage3 18432 + 5·36864 + 6·128; fc 650
    ("resnet20", (3, 32, 32), {}, 432 + 32 + 13824 + 192 + 50688 + 384 + 202752 + 768 + 650),
]


@pytest.mark.parametrize("name, shape, kwargs, expected", PARAM_COUNTS)
def test_registry_param_counts_and_output_shape(name, shape, kwargs, expected):
    torch.manual_seed(0)
    model = build_model(name, kwargs, input_shape=shape, num_classes=10 if shape != (20,) else 4)
    assert n_params(model) == expected
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10 if shape != (20,) else 4)


@pytest.mark.parametrize("name", ["wrn-22-2", "mobilenet-v1"])
def test_larger_conv_nets_build_and_run(name):
    torch.manual_seed(0)
    model = build_model(name, {"width": 0.25}, input_shape=(3, 16, 16), num_classes=7)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_full_size_param_counts_of_the_larger_conv_nets():
    assert n_params(build_model("wrn-22-2", {}, input_shape=(3, 32, 32), num_classes=10)) == 1079642
    assert n_params(build_model("mobilenet-v1", {}, input_shape=(3, 32, 32), num_classes=10)) == 823722


def test_width_scales_every_hidden_width_with_half_up_rounding():
    m = build_model("mlp", {"hidden": [10, 3], "width": 0.5}, input_shape=(4,), num_classes=2)
    assert [m.fc1.out_features, m.fc2.out_features] == [5, 2]  # 1.5 → 2 (half up)
    m = build_model("mlp", {"hidden": [10], "width": 0.01}, input_shape=(4,), num_classes=2)
    assert m.fc1.out_features == 1  # never below 1
    r = build_model("resnet20", {"width": 0.5}, input_shape=(3, 32, 32), num_classes=10)
    assert (r.conv1.out_channels, r.stage3.block2.conv2.out_channels) == (8, 32)


def test_mlp_starts_with_flatten_and_has_readable_names():
    m = build_model("mlp", {}, input_shape=(1, 8, 8), num_classes=10)
    assert isinstance(next(iter(m.children())), nn.Flatten)
    assert [n for n, _ in m.named_parameters()] == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "head.weight",
        "head.bias",
    ]


def _shape_for(name: str) -> tuple[int, ...]:
    """Images for every model except the character LMs, which take symbol windows."""
    return (16,) if MODELS[name].input_kind == "sequence" else (3, 16, 16)


def test_init_is_deterministic_given_manual_seed():
    for name in MODELS:
        torch.manual_seed(5)
        a = build_model(name, {"width": 0.25}, input_shape=_shape_for(name), num_classes=3)
        torch.manual_seed(5)
        b = build_model(name, {"width": 0.25}, input_shape=_shape_for(name), num_classes=3)
        for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert na == nb and torch.equal(pa, pb), (name, na)


def test_no_dropout_in_registry_models():
    for name in MODELS:
        m = build_model(name, {"width": 0.25}, input_shape=_shape_for(name), num_classes=3)
        assert not any(isinstance(mod, nn.modules.dropout._DropoutNd) for mod in m.modules()), name


def test_registry_errors():
    assert_input_error(
        "did you mean 'lenet300'", build_model, "lenet30", {}, input_shape=(784,), num_classes=10
    )
    assert_input_error(
        "need the py: prefix", build_model, "models.py:f", {}, input_shape=(4,), num_classes=2
    )
    err = assert_input_error(
        "does not accept 'depth'",
        build_model,
        "resnet20",
        {"depth": 56},
        input_shape=(3, 32, 32),
        num_classes=10,
    )
    assert "accepted keys: width" in str(err)
    assert_input_error(
        "accepted keys: hidden, width", build_model, "mlp", {"hiden": 3}, input_shape=(4,), num_classes=2
    )
    assert_input_error("needs images", build_model, "lenet5", {}, input_shape=(20,), num_classes=2)
    assert_input_error("needs images", build_model, "resnet20", {}, input_shape=(20,), num_classes=2)
    assert_input_error("width=0", build_model, "mlp", {"width": 0}, input_shape=(4,), num_classes=2)
    assert_input_error("width='big'", build_model, "mlp", {"width": "big"}, input_shape=(4,), num_classes=2)
    assert_input_error("hidden=", build_model, "mlp", {"hidden": [0, 3]}, input_shape=(4,), num_classes=2)
    assert_input_error("too small", build_model, "lenet5", {}, input_shape=(1, 1, 1), num_classes=2)
    assert_input_error("empty model spec", build_model, "", {}, input_shape=(4,), num_classes=2)


def test_list_models_and_accepts_width():
    rows = list_models()
    assert [r["name"] for r in rows] == ["mlp", "lenet300", "lenet5", "resnet20", "wrn-22-2", "mobilenet-v1",
                                         "resnet18", "resnet50", "mobilenet-v2", "char-gru", "char-lstm",
                                         "char-transformer"]
    assert rows[0]["defaults"] == {"hidden": [512, 256], "width": 1.0}
    assert all(r["description"] and "\n" not in r["description"] for r in rows)
    assert all(model_accepts_width(name) for name in MODELS)
    assert_input_error("unknown model", model_accepts_width, "nope")


def test_imagenet_models_have_their_papers_sizes_and_a_cifar_stem():
    import torch

    counts = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet-v2": 3_504_872}  # torchvision's, 1000 classes
    for name, want in counts.items():
        model = build_model(name, {}, input_shape=(3, 224, 224), num_classes=1000)
        assert sum(p.numel() for p in model.parameters()) == want
    cifar = build_model("resnet18", {"stem": "cifar", "width": 0.25}, input_shape=(3, 32, 32), num_classes=10)
    assert cifar.stem[0].kernel_size == (3, 3) and cifar.stem[0].stride == (1, 1)
    assert cifar(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert_input_error("stem='vgg' is invalid", build_model, "resnet18", {"stem": "vgg"}, input_shape=(3, 32, 32),
                       num_classes=10)


# ---------------------------------------------------------------- py: models

USER_FILE = """
import torch
from tolerances import assert_fp32_close
from torch import nn

def full(input_shape, num_classes, hidden=8, width=1.0):
    n = 1
    for s in input_shape:
        n *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(n, int(hidden * width)), nn.ReLU(),
                         nn.Linear(int(hidden * width), num_classes))

def kwargs_only(**kw):
    return nn.Linear(kw["input_shape"][0], kw["num_classes"])

def plain(out=3):
    return nn.Linear(4, out)

def not_module(input_shape, num_classes):
    return 42

def wrong_out(input_shape, num_classes):
    return nn.Linear(input_shape[0], num_classes + 1)

def boom(input_shape, num_classes):
    raise RuntimeError("kaboom")

CONSTANT = 3
"""


@pytest.fixture
def user_file(tmp_path):
    p = tmp_path / "user_models.py"
    p.write_text(textwrap.dedent(USER_FILE))
    return p


def test_py_file_spec_passes_shape_classes_and_kwargs(user_file):
    m = build_model(f"py:{user_file}:full", {"hidden": 6}, input_shape=(2, 3), num_classes=5)
    assert m(torch.randn(4, 2, 3)).shape == (4, 5) and m[1].out_features == 6
    assert model_accepts_width(f"py:{user_file}:full") is True
    assert model_accepts_width(f"py:{user_file}:plain") is False
    m = build_model(f"py:{user_file}:kwargs_only", {}, input_shape=(4,), num_classes=3)
    assert (m.in_features, m.out_features) == (4, 3)
    m = build_model(f"py:{user_file}:plain", {}, input_shape=(4,), num_classes=3)  # gets no shape/classes
    assert m.out_features == 3


def test_py_module_spec(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    m = build_model("py:user_models:full", {}, input_shape=(4,), num_classes=2)
    assert m(torch.randn(1, 4)).shape == (1, 2)


def test_py_spec_errors(user_file, tmp_path):
    def err(spec, match, kwargs=None, shape=(4,), classes=3):
        return assert_input_error(
            match, build_model, spec, kwargs or {}, input_shape=shape, num_classes=classes
        )

    err("py:nofunction", "no ':function'")
    err("py:mod:1bad", "not a function name")
    err("py:not a module:f", "neither a module nor a .py path")
    err("py:sparsekit_no_such_module_xyz:f", "not found")
    err(f"py:{tmp_path / 'missing.py'}:f", "model file not found")
    err(f"py:{user_file}:nope", "has no attribute 'nope'")
    err(f"py:{user_file}:CONSTANT", "not callable")
    err(f"py:{user_file}:not_module", "returned int, not a torch.nn.Module")
    err(f"py:{user_file}:wrong_out", "expected [2, 3]")
    err(f"py:{user_file}:boom", "RuntimeError: kaboom")
    err(f"py:{user_file}:plain", "cannot call plain", kwargs={"bogus": 1})
    err(f"py:{user_file}:plain", "does not accept inputs of shape [N, 5]", shape=(5,))
    bad = tmp_path / "syntax.py"
    bad.write_text("def f(:\n")
    err(f"py:{bad}:f", "importing")


# ---------------------------------------------------------------- ONNX export of every registry model

EXPORT_CASES = [
    ("mlp", (1, 8, 8), {}),
    ("lenet300", (1, 28, 28), {}),
    ("lenet5", (1, 28, 28), {}),
    ("resnet20", (3, 32, 32), {"width": 0.5}),
    ("wrn-22-2", (3, 16, 16), {"width": 0.25}),
    ("mobilenet-v1", (3, 16, 16), {"width": 0.25}),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, shape, kwargs", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_registry_model_exports_to_onnx_and_matches_torch(tmp_path, name, shape, kwargs):
    import onnxruntime as ort

    from sparsekit.onnx_export import export_dense_onnx

    torch.manual_seed(0)
    model = build_model(name, kwargs, input_shape=shape, num_classes=10).eval()
    x = torch.randn(4, *shape)
    path = tmp_path / f"{name}.onnx"
    export_dense_onnx(model, x, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert list(inp.shape[1:]) == list(shape)  # image models (and the MLP) keep the image input shape
    got = session.run(None, {inp.name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == (4, 10)
    assert_fp32_close(got, ref)
