"""The method interface: a sparse-training method is a small class with a few hooks.

The shared engine (``sparsekit.sparsifier.Sparsifier``) owns masks, gradient masking, top-k
selection, bookkeeping and optimizer-state resets; a method only says how to initialise masks, how
to score drops and grows, and when to update. The hooks run in this order at optimizer step t:

    loss.backward()
    method.before_optimizer_step(sp, t)   # dense gradients are still in param.grad here
    (gradients of inactive weights are zeroed)
    optimizer.step()  unless method.skip_optimizer_step(sp, t)
    method.after_optimizer_step(sp, t)    # mask updates happen here
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sparsekit.errors import InputError, close_matches

if TYPE_CHECKING:
    from sparsekit.sparsifier import Sparsifier


class Method:
    """Base class. Subclasses set ``name``, ``description``, ``family`` and ``defaults``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    family: ClassVar[str] = ""  # dynamic | one-shot | pruning | dense
    reference: ClassVar[str] = ""
    #: Option name -> default value. Options are validated against these keys.
    defaults: ClassVar[dict[str, Any]] = {}
    #: Paper recipe shown by ``sparsekit methods NAME`` (training hyper-parameters, not method options).
    paper_recipe: ClassVar[dict[str, Any]] = {}
    #: False for methods that train a dense model (dense, small-dense): no masks at all.
    sparse: ClassVar[bool] = True
    #: True when ``before_optimizer_step`` needs dense gradients on (some) steps.
    needs_dense_grad: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise InputError(f"method {self.name!r} does not take option(s) {', '.join(unknown)}",
                             where="method options",
                             fix=f"{self.name} takes: {', '.join(sorted(self.defaults)) or 'no options'}")
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.validate()

    def validate(self) -> None:
        """Check option values; raise InputError naming the flag."""

    # -- lifecycle --------------------------------------------------------------------------
    def attach(self, sp: Sparsifier) -> None:
        """Called once the engine knows the model, plans and total steps (before initial masks)."""

    def initial_masks(self, sp: Sparsifier) -> dict[str, torch.Tensor] | None:
        """Masks at step 0; None means random masks from the distribution (Static)."""
        return None

    def before_optimizer_step(self, sp: Sparsifier, step: int) -> None:
        """Read dense gradients (grow scores, momentum) before inactive gradients are zeroed."""

    def skip_optimizer_step(self, sp: Sparsifier, step: int) -> bool:
        return False

    def after_optimizer_step(self, sp: Sparsifier, step: int) -> None:
        """Update masks when due."""

    def is_update_step(self, step: int) -> bool:
        """Whether step ``step`` changes masks (for logging and FLOP counting)."""
        return False

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensor state to checkpoint (e.g. SNFS momentum). Scalars belong in ``extra_state``."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- reporting --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "options": dict(self.options)}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}", where="--method", fix=close_matches(name, sorted(METHODS)))
    return METHODS[name]


def make_method(name: str, **options: Any) -> Method:
    return get_method_class(name)(**options)
