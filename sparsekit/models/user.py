"""``py:`` model specs: import the user's builder function and call it. This runs the user's code, by design.

``py:package.module:function`` imports a module from ``sys.path``; ``py:path/to/file.py:function``
loads a file. The function gets ``input_shape=…, num_classes=…`` when its signature accepts them
(by name or ``**kwargs``), plus the ``--model-kwargs``. It must return an ``nn.Module``, whose output on
a batch of 2 zero inputs must have shape ``[2, num_classes]``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit.errors import InputError

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIX = "write py:package.module:function or py:path/to/file.py:function"


def split_user_spec(spec: str) -> tuple[str, str, bool]:
    """``py:target:function`` → (target, function, is_file)."""
    body = spec[3:] if spec.startswith("py:") else spec
    target, sep, func = body.rpartition(":")
    where = f"--model {spec}"
    if not sep or not target or not func:
        raise InputError(f"malformed py: model spec {spec!r} (no ':function')", where=where, fix=_FIX)
    if not _IDENT.match(func):
        raise InputError(
            f"malformed py: model spec {spec!r}: {func!r} is not a function name", where=where, fix=_FIX
        )
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if not is_file and not _DOTTED.match(target):
        raise InputError(
            f"malformed py: model spec {spec!r}: {target!r} is neither a module nor a .py path",
            where=where,
            fix=_FIX,
        )
    return target, func, is_file


def _load_module(target: str, is_file: bool, spec: str) -> Any:
    where = f"--model {spec}"
    if is_file:
        try:
            path = Path(target).expanduser()
        except RuntimeError:
            path = Path(target)
        if not path.is_file():
            raise InputError(
                f"model file not found: {path}",
                where=where,
                fix="check the path (relative to the current directory)",
            )
        resolved = path.resolve()
        name = "sparsekit_user_model_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, resolved)
        if module_spec is None or module_spec.loader is None:
            raise InputError(f"cannot load {path} as a Python module", where=where, fix="use a .py file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise InputError(
                f"importing {path} raised {type(exc).__name__}: {exc}",
                where=where,
                fix="fix the error in your model file",
            ) from exc
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise InputError(
            f"module {target!r} not found ({exc})",
            where=where,
            fix="install the package, run from its directory, or use py:path/to/file.py:function",
        ) from exc
    except Exception as exc:
        raise InputError(
            f"importing {target} raised {type(exc).__name__}: {exc}",
            where=where,
            fix="fix the error in your module",
        ) from exc


def load_user_function(spec: str) -> Callable[..., Any]:
    target, func, is_file = split_user_spec(spec)
    module = _load_module(target, is_file, spec)
    if not hasattr(module, func):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise InputError(
            f"{target} has no attribute {func!r}",
            where=f"--model {spec}",
            fix=f"callables there: {', '.join(public[:10]) or 'none'}",
        )
    fn = getattr(module, func)
    if not callable(fn):
        raise InputError(
            f"{target}:{func} is not callable ({type(fn).__name__})",
            where=f"--model {spec}",
            fix="point at a function that returns an nn.Module",
        )
    return fn


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def user_accepts_width(spec: str) -> bool:
    sig = _signature(load_user_function(spec))
    return sig is not None and "width" in sig.parameters


def build_user_model(
    spec: str, kwargs: dict[str, Any], *, input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    fn = load_user_function(spec)
    where = f"--model {spec}"
    sig = _signature(fn)
    call_kwargs = dict(kwargs)
    if sig is not None:
        params = sig.parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if var_kw or ("input_shape" in params and "num_classes" in params):
            call_kwargs = {"input_shape": input_shape, "num_classes": num_classes, **kwargs}
        elif "num_classes" in params:
            call_kwargs = {"num_classes": num_classes, **kwargs}
        elif "input_shape" in params:
            call_kwargs = {"input_shape": input_shape, **kwargs}
        try:
            sig.bind(**call_kwargs)
        except TypeError as exc:
            accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            raise InputError(
                f"cannot call {fn.__name__} with {sorted(call_kwargs)}: {exc}",
                where=where,
                fix=f"its parameters: {', '.join(accepted) or 'none'}; adjust --model-kwargs",
            ) from exc
    try:
        model = fn(**call_kwargs)
    except Exception as exc:
        raise InputError(
            f"{fn.__name__}(…) raised {type(exc).__name__}: {exc}",
            where=where,
            fix="fix your model builder or its --model-kwargs",
        ) from exc
    if not isinstance(model, nn.Module):
        raise InputError(
            f"{fn.__name__}(…) returned {type(model).__name__}, not a torch.nn.Module",
            where=where,
            fix="return an nn.Module instance",
        )
    _check_output_shape(model, input_shape, num_classes, where)
    return model


def _check_output_shape(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, where: str) -> None:
    """Run a batch of 2 zeros (eval mode, no grad, so no state changes) and check the logits' shape."""
    was_training = model.training
    params = list(model.parameters())
    dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    device = params[0].device if params else torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape), dtype=dtype, device=device))
    except Exception as exc:
        raise InputError(
            f"model does not accept inputs of shape [N, {', '.join(map(str, input_shape))}] "
            f"({type(exc).__name__}: {exc})",
            where=where,
            fix="make the model's input match the data (see `sparsekit datasets`)",
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(
            f"model output is {shape} for a batch of 2, expected [2, {num_classes}]",
            where=where,
            fix=f"return logits of shape [N, num_classes] (num_classes={num_classes} from the data)",
        )
