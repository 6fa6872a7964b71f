"""Mask granularity: which entries of a weight go on and off together (docs/methods.md#granularity).

- ``unstructured``: every entry on its own (the default; the engine's own fast path, not this module).
- ``N:M``: groups of M consecutive *inputs* (Linear: M columns of one row; Conv (O, I, kh, kw): M input
  channels at one (o, kh, kw)); every group keeps exactly N.
- ``RxC``: blocks of R output rows × C consecutive columns of the weight viewed as (out, prod(shape[1:]));
  a block is all on or all off.
- ``fanin``: every output row keeps the same number K of inputs (SRigL). ``fanin+ablate[=γ]`` also
  switches off rows whose salient count falls below γ·K at an update; their budget goes to the others
  (rows then hold K or K+1, the layer's active count is unchanged).

This module says what a granularity is (parsing, geometry, the pattern check, the refusals);
``sparsekit.granular_select`` selects under it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from sparsekit.errors import InputError

KINDS = ("unstructured", "nm", "block", "fanin")
FORMS = "unstructured | N:M (e.g. 2:4, input dim) | RxC blocks (e.g. 4x1, 1x4, 16x1) | fanin | fanin+ablate[=γ]"
DEFAULT_GAMMA = 0.3
_FIX = "use unstructured, N:M such as 2:4, RxC such as 4x1, fanin or fanin+ablate (fanin+ablate=0.3)"


@dataclass(frozen=True)
class Granularity:
    """One mask granularity. Build it with ``Granularity.parse(spec)``; ``spec`` gives it back canonically."""

    kind: str = "unstructured"
    n: int = 0  # N:M
    m: int = 0
    rows: int = 1  # RxC
    cols: int = 1
    ablate: float | None = None  # fanin+ablate: saliency threshold γ

    @classmethod
    def parse(cls, spec: str | Granularity | None) -> Granularity:
        """``unstructured``, ``N:M``, ``RxC``, ``fanin``, ``fanin+ablate`` or ``fanin+ablate=γ``."""
        if isinstance(spec, Granularity):
            return spec
        text = "unstructured" if spec is None else str(spec).strip().lower()
        bad = InputError(f"unknown granularity {spec!r}", where="--granularity", fix=_FIX)
        if text == "unstructured":
            return cls()
        if text == "fanin":
            return cls("fanin")
        if (hit := re.fullmatch(r"fanin\+ablate(?:=([0-9.eE+-]+))?", text)) is not None:
            try:
                gamma = DEFAULT_GAMMA if hit.group(1) is None else float(hit.group(1))
            except ValueError:
                raise bad from None
            if not 0.0 < gamma < 1.0:
                raise InputError(f"neuron ablation threshold {gamma:g} is outside (0, 1)", where="--granularity",
                                 fix="give the saliency threshold γ as a fraction, e.g. fanin+ablate=0.3")
            return cls("fanin", ablate=gamma)
        if (hit := re.fullmatch(r"(\d+):(\d+)", text)) is not None:
            n, m = int(hit.group(1)), int(hit.group(2))
            if not 0 < n < m:
                raise InputError(f"granularity {spec!r} needs 0 < N < M", where="--granularity",
                                 fix="e.g. 2:4 (two of every four inputs kept), 1:4 or 4:8")
            return cls("nm", n=n, m=m)
        if (hit := re.fullmatch(r"(\d+)x(\d+)", text)) is not None:
            r, c = int(hit.group(1)), int(hit.group(2))
            if r < 1 or c < 1 or r * c == 1:
                raise InputError(f"block {spec!r} needs R, C >= 1 and more than one entry", where="--granularity",
                                 fix="e.g. 4x1 (4 output rows × 1 input), 1x4 or 16x1; 1x1 is unstructured")
            return cls("block", rows=r, cols=c)
        raise bad

    @property
    def spec(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"{self.rows}x{self.cols}"
        if self.kind == "fanin":
            return "fanin" if self.ablate is None else f"fanin+ablate={self.ablate:g}"
        return "unstructured"

    @property
    def structured(self) -> bool:
        return self.kind != "unstructured"

    @property
    def fixed_count(self) -> bool:
        """N:M and fan-in: a fixed number of active entries per group (regrown per group at an update)."""
        return self.kind in ("nm", "fanin")

    # -- geometry -----------------------------------------------------------------------------------
    def misfit(self, shape: tuple[int, ...]) -> str | None:
        """Why a weight of ``shape`` cannot take this granularity, or None when it can."""
        if not self.structured:
            return None
        if len(shape) < 2:
            return "it is not a matrix"
        cols = math.prod(shape[1:])
        if self.kind == "nm" and shape[1] % self.m:
            return f"its input dimension {shape[1]} is not a multiple of {self.m}"
        if self.kind == "block" and (shape[0] % self.rows or cols % self.cols):
            return (f"its {shape[0]} output rows × {cols} columns do not divide into "
                    f"{self.rows}x{self.cols} blocks")
        return None

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a prunable weight whose shape does not fit, naming the layer and the fix."""
        why = self.misfit(tuple(shape))
        if why is not None:
            raise InputError(f"layer {name} of shape {tuple(shape)} cannot be {self.spec}: {why}",
                             where="--granularity",
                             fix=f"keep it dense with --layer-density {name}=1 (exclude=[{name!r}] in sparsify()), "
                                 "or choose a granularity that fits its shape")

    def unit(self, shape: tuple[int, ...]) -> int:
        """Active counts of a layer are multiples of this: the block size, the number of N:M groups (N per
        group), the number of rows (K per row); 1 when unstructured or when the shape does not fit."""
        if not self.structured or self.misfit(tuple(shape)) is not None:
            return 1
        if self.kind == "block":
            return self.rows * self.cols
        if self.kind == "nm":
            return math.prod(shape) // self.m
        return int(shape[0])

    def group_size(self, shape: tuple[int, ...]) -> int:
        if self.kind == "nm":
            return self.m
        if self.kind == "block":
            return self.rows * self.cols
        return math.prod(shape[1:]) if len(shape) > 1 else 1

    def n_groups(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) // self.group_size(shape)

    def grouped(self, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of the layer (any shape with the layer's numel) as (groups, group size)."""
        out, cols = shape[0], math.prod(shape[1:])
        if self.kind == "nm":
            rest = math.prod(shape[2:])
            v = t.reshape(out, shape[1] // self.m, self.m, rest)
            return v.permute(0, 1, 3, 2).reshape(-1, self.m) if rest > 1 else v.reshape(-1, self.m)
        if self.kind == "block":
            v = t.reshape(out // self.rows, self.rows, cols // self.cols, self.cols)
            return v.permute(0, 2, 1, 3).reshape(-1, self.rows * self.cols)
        return t.reshape(out, cols)

    def ungrouped(self, g: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The inverse of ``grouped``: back to a flat tensor in the layer's memory order."""
        out, cols = shape[0], math.prod(shape[1:])
        if self.kind == "nm":
            rest = math.prod(shape[2:])
            v = g.reshape(out, shape[1] // self.m, rest, self.m)
            return v.permute(0, 1, 3, 2).reshape(-1) if rest > 1 else v.reshape(-1)
        if self.kind == "block":
            v = g.reshape(out // self.rows, cols // self.cols, self.rows, self.cols)
            return v.permute(0, 2, 1, 3).reshape(-1)
        return g.reshape(-1)

    def group_counts(self, mask: torch.Tensor) -> torch.Tensor:
        """Active entries per group (int64, CPU)."""
        shape = tuple(mask.shape)
        return self.grouped(mask.detach().cpu(), shape).sum(dim=1)

    def conforms(self, mask: torch.Tensor, *, any_count: bool = False) -> bool:
        """Whether ``mask`` has this granularity's pattern exactly. ``any_count``: N:M groups may all hold
        the same n other than N (gradual pruning's n_t:M on its way to N:M, or dense)."""
        if not self.structured:
            return True
        if self.misfit(tuple(mask.shape)) is not None:
            return False
        counts = self.group_counts(mask)
        if self.kind == "block":
            return bool(((counts == 0) | (counts == self.group_size(tuple(mask.shape)))).all())
        if self.kind == "nm":
            return bool((counts == (counts[0] if any_count else self.n)).all())
        alive = counts[counts > 0]
        if self.ablate is None:
            return bool((counts == counts[0]).all())
        return alive.numel() == 0 or int(alive.max()) - int(alive.min()) <= 1

    def summary(self, mask: torch.Tensor) -> dict[str, int]:
        """``groups`` and ``active_groups`` (blocks on, N:M groups with an active entry, rows alive)."""
        counts = self.group_counts(mask)
        return {"groups": int(counts.numel()), "active_groups": int((counts > 0).sum())}


def describe(spec: Any) -> str:
    """The canonical spelling of a granularity given as text (for messages and summaries)."""
    return Granularity.parse(spec).spec


def implied_density(gran: Granularity, sparsity: float | None, distribution: str | None) -> tuple[float, str]:
    """(sparsity, distribution) of a run: N:M implies 1 − N/M and uniform and refuses others given
    explicitly; otherwise None means the defaults (0.9, erk)."""
    if gran.kind != "nm":
        return (0.9 if sparsity is None else sparsity), ("erk" if distribution is None else distribution)
    implied = 1.0 - gran.n / gran.m
    if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
        raise InputError(f"sparsity {sparsity:g} disagrees with granularity {gran.spec}, which fixes every sparse "
                         f"layer's density at {gran.n}/{gran.m}", where="--sparsity",
                         fix=f"drop --sparsity (it is implied) or give --sparsity {implied:g}")
    if distribution is not None and distribution != "uniform":
        raise InputError(f"distribution {distribution!r} does not apply to granularity {gran.spec}, which fixes "
                         f"every sparse layer's density at {gran.n}/{gran.m}", where="--distribution",
                         fix="drop --distribution (uniform is implied)")
    return implied, "uniform"


def check_method(gran: Granularity, method: Any, options: dict[str, Any]) -> None:
    """Refuse a granularity a method cannot keep (``method`` is the Method class or instance)."""
    if not gran.structured:
        return
    name = method.name
    if not method.sparse:
        raise InputError(f"method {name!r} trains a dense model, so granularity {gran.spec} does not apply",
                         where="--granularity",
                         fix="drop --granularity, or use rigl, set, snfs, snip, static or pruning")
    if options.get("redistribute"):
        raise InputError(f"SNFS redistribution moves single connections between layers, which a {gran.spec} mask "
                         "cannot follow", where="--redistribute", fix="use --no-redistribute with --granularity")
    if options.get("snip_scope") == "global":
        raise InputError(f"--snip-scope global ranks single connections across layers; granularity {gran.spec} "
                         "selects per layer", where="--snip-scope", fix="use --snip-scope layer with --granularity")
    if gran.ablate is not None and method.family != "dynamic":
        raise InputError(f"neuron ablation happens at the mask updates of rigl, set and snfs; {name!r} has none",
                         where="--granularity", fix=f"use fanin (without +ablate) with {name}")


def method_granularities(method: Any) -> list[str]:
    """The granularity forms a method (class) takes, for ``sparsekit methods``."""
    if not method.sparse:
        return ["unstructured"]
    forms = ["unstructured", "N:M", "RxC", "fanin"]
    return [*forms, "fanin+ablate"] if method.family == "dynamic" else forms
