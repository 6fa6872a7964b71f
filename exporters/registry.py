"""Registry of export formats (Optimum-style registered writers with typed errors)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparsekit.errors import InputError, close_matches


@dataclass(frozen=True)
class ExportFormat:
    name: str
    description: str
    suffix: str
    write: Callable[..., Any]
    in_all: Callable[[Any], bool] | None = None  # ``--format all`` includes it only when this says so (ctx)


FORMATS: dict[str, ExportFormat] = {}


def register_format(name: str, description: str, suffix: str, *,
                    in_all: Callable[[Any], bool] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        FORMATS[name] = ExportFormat(name, description, suffix, fn, in_all)
        return fn

    return deco


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise InputError(f"unknown export format {name!r}", where="--format",
                         fix=close_matches(name, sorted(FORMATS)))
    return FORMATS[name]
