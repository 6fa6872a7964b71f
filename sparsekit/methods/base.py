"""The method interface: a sparse-training method is one class with a few hooks, each with a default.

The engine (``sparsekit.sparsifier.Sparsifier``) owns masks, gradient masking, top-k selection,
optimizer-state resets and bookkeeping, and calls the method; the method never calls the engine back.
It says how to start (``initial_masks``), when to update (``is_update_step``), how many connections
each layer drops and grows (``update_counts``) and by which scores (``drop_scores``/``grow_scores``);
the engine selects and commits. The hooks run in this order at optimizer step t:

    loss.backward()
    method.before_optimizer_step(sp, t)   # dense gradients are still in param.grad here
    (gradients of inactive weights are zeroed)
    optimizer.step()  unless method.skip_optimizer_step(sp, t)
    method.after_optimizer_step(sp, t)
    if method.is_update_step(t): for each layer in method.update_counts(sp, t), the engine drops the
        k_drop active connections with the lowest drop_scores and grows the k_grow inactive ones with
        the highest grow_scores, then commits the new masks

Around training, a method also says how the model is built (``choose_model_kwargs``), how many
mini-batches it scores at initialisation (``init_batch_count``), and what training costs
(``training_step_cost``, ``training_segment_cost``, ``training_formula``, ``planned_history``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from sparsekit.errors import InputError, close_matches
from sparsekit.selection import Magnitude

if TYPE_CHECKING:
    from sparsekit.masks import SparseLayer
    from sparsekit.sparsifier import Sparsifier

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Scores = torch.Tensor | Magnitude


class LayerUpdate(NamedTuple):
    """One layer's share of a mask update: drop ``k_drop`` active connections, then grow ``k_grow``."""

    k_drop: int
    k_grow: int


#: The start masks a user may ask for (``--init-mask``, ``sparsify(init_mask=...)``).
INIT_MASKS = ("magnitude", "random")


@dataclass(frozen=True)
class InitInputs:
    """What ``initial_masks`` may use besides the engine's layers: the (unwrapped) model, the mini-batches
    given to ``sparsify(init_batches=...)`` and the loss (``loss_fn=...``), None when not given; the
    start mask resolved by ``Method.start_mask`` (``magnitude`` or ``random`` for methods that take one);
    and the masks loaded weights were trained under (a sparse run directory given to ``--init-from``)."""

    model: nn.Module
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
    loss_fn: LossFn | None = None
    start_mask: str | None = "random"
    source_masks: dict[str, torch.Tensor] | None = None


class Method:
    """Base class. Subclasses set ``name``, ``description``, ``family`` and ``defaults`` and override
    only the hooks they need; every hook's default is the behaviour of a static sparse method."""

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
    #: True when ``before_optimizer_step`` reads dense gradients; the default training cost then pays
    #: for them on every step (2·f_S + f_D).
    needs_dense_grad: ClassVar[bool] = False
    #: True when ``initial_masks`` scores mini-batches at initialisation (``init_batch_count`` of them).
    needs_init_batches: ClassVar[bool] = False
    #: True for a dense method that still reads ``--sparsity`` (small-dense sizes its model by it).
    sized_by_sparsity: ClassVar[bool] = False
    #: How the step-0 mask is chosen when the method chooses it itself, whatever the weights (SNIP:
    #: "saliency", Pruning: "dense"); None: by ``--init-mask`` (see ``start_mask``).
    own_start_mask: ClassVar[str | None] = None

    def __init__(self, **options: Any) -> None:
        """Check and store the options. Subclasses that keep state create it here (after ``super()``)."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise InputError(f"method {self.name!r} does not take option(s) {', '.join(unknown)}",
                             where="method options",
                             fix=f"{self.name} takes: {', '.join(sorted(self.defaults)) or 'no options'}")
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.validate()

    def validate(self) -> None:
        """Check option values; raise InputError naming the flag. Creates no state."""

    # -- before training ----------------------------------------------------------------------
    def choose_model_kwargs(self, config: Any, data: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Model builder kwargs for a ``sparsekit train`` run, and a report for ``summary.json`` (or None).
        Default: the config's ``model_kwargs`` unchanged."""
        return dict(config.model_kwargs), None

    def init_batch_count(self) -> int:
        """How many training mini-batches ``initial_masks`` needs (the trainer passes that many)."""
        return 1 if self.needs_init_batches else 0

    @classmethod
    def start_mask(cls, init_mask: str | None, *, pretrained: bool) -> str | None:
        """The step-0 mask this method starts from. Methods without ``own_start_mask`` take ``init_mask``:
        ``magnitude`` (the largest |w| per layer) or ``random``; None picks magnitude when the weights
        were loaded (``pretrained``) and random for a fresh initialisation. The others report their own
        (None for dense methods) and refuse an explicit ``init_mask``."""
        if init_mask is not None and init_mask not in INIT_MASKS:
            raise InputError(f"unknown init mask {init_mask!r}", where="--init-mask",
                             fix=close_matches(str(init_mask), INIT_MASKS))
        own = cls.own_start_mask if cls.sparse else None
        if cls.sparse and own is None:
            return init_mask or ("magnitude" if pretrained else "random")
        if init_mask is not None:
            starts = f"starts from its own mask ({own})" if own else "trains a dense model"
            raise InputError(f"method {cls.name!r} {starts}, so --init-mask does not apply", where="--init-mask",
                             fix="drop --init-mask; it chooses the start of rigl, set, snfs and static")
        return own

    def mismatched_start_fix(self) -> str:
        """The fix printed when ``--init-from`` weights do not fit the model this method trains."""
        return "use the --model and --model-kwargs the weights were trained with"

    def attach(self, sp: Sparsifier) -> None:
        """Called once the engine knows the model, plans and total steps (before ``initial_masks``)."""

    def initial_masks(self, sp: Sparsifier, init: InitInputs) -> dict[str, torch.Tensor] | None:
        """Masks at step 0 by layer name; None means random masks from the distribution. Default: with
        ``init.start_mask == "magnitude"`` the largest |w| per layer at the planned counts (the loaded
        weights' own mask, if known, ranking first; under a structured granularity |w| per block or
        group), else None."""
        if init.start_mask != "magnitude":
            return None
        from sparsekit.masks import magnitude_mask

        if sp.granularity.structured:  # |w| summed per block, or the top |w| of every N:M group / row
            from sparsekit.granular_select import structured_top

            return {ly.name: structured_top(sp.granularity, ly.plan.shape, Magnitude(ly.param.detach()),
                                            ly.plan.active, seed=sp.seed, step=0, layer=ly.index).to(ly.param.device)
                    for ly in sp.layers}
        first = init.source_masks or {}
        return {ly.name: magnitude_mask(ly.param, ly.plan.active, seed=sp.seed, layer=ly.index,
                                        first=first.get(ly.name)) for ly in sp.layers}

    # -- every step ---------------------------------------------------------------------------
    def before_optimizer_step(self, sp: Sparsifier, step: int) -> None:
        """Read dense gradients (grow scores, momentum) before inactive gradients are zeroed."""

    def skip_optimizer_step(self, sp: Sparsifier, step: int) -> bool:
        return False

    def after_optimizer_step(self, sp: Sparsifier, step: int) -> None:
        """After the optimizer step (taken or skipped), before a mask update of this step."""

    # -- mask updates -------------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        """Whether the masks change after step ``step`` (also used for logging and FLOP counting)."""
        return False

    def update_counts(self, sp: Sparsifier, step: int) -> dict[str, LayerUpdate]:
        """At an update step: how many connections each layer drops and grows. Layers left out keep
        their mask."""
        return {}

    def drop_scores(self, sp: Sparsifier, layer: SparseLayer, step: int) -> Scores:
        """Flat scores of ``layer``; the engine drops the lowest among active connections. Default |w|."""
        return Magnitude(layer.param.detach().reshape(-1))  # |w|, taken on the fly by the selection

    def grow_scores(self, sp: Sparsifier, layer: SparseLayer, step: int) -> Scores:
        """Flat scores of ``layer``; the engine grows the highest among connections inactive after the
        drop (new ones start at 0 with zeroed optimizer state). Needed when ``update_counts`` grows."""
        raise NotImplementedError(f"method {self.name!r} grows connections but defines no grow_scores")

    # -- training cost (docs/counting.md; f_s / f_d: sparse / dense forward MACs of one example) --------
    def training_step_cost(self, f_s: float, f_d: float, step: int) -> float:
        """Training MACs of one example at step ``step`` (backward = 2 × forward): 3·f_D for dense
        methods, 2·f_S + f_D when dense gradients are read every step, else 3·f_S."""
        if not self.sparse:
            return 3.0 * f_d
        if self.needs_dense_grad:
            return 2.0 * f_s + f_d
        return 3.0 * f_s

    def training_segment_cost(self, f_s: float, f_d: float, first: int, last: int) -> float:
        """Training MACs of one example over steps ``first..last``, during which the mask (so ``f_s``)
        stays the same: the sum of ``training_step_cost`` over those steps."""
        if type(self).training_step_cost is Method.training_step_cost:  # step-independent: multiply
            return (last - first + 1) * self.training_step_cost(f_s, f_d, first)  # (== fsum, bit for bit)
        return math.fsum(self.training_step_cost(f_s, f_d, t) for t in range(first, last + 1))

    def training_formula(self) -> str:
        """The per-step cost as text, for summaries (in units of forward passes)."""
        if not self.sparse:
            return "3·f_D"
        return "2·f_S + f_D" if self.needs_dense_grad else "3·f_S"

    def training_formula_fields(self) -> dict[str, Any]:
        """Constants of the formula reported next to it in ``summary.json`` (RigL: ΔT and T_end)."""
        return {"update_interval": None, "update_end_step": None}

    def planned_history(self, layers: list[SparseLayer]) -> list[dict[str, Any]]:
        """Active counts per layer after every planned mask change (``updates.jsonl`` rows), for counting
        FLOPs without a recorded history. Default: the current counts from step 0 on."""
        return [{"step": 0, "active": {ly.name: ly.active for ly in layers}}]

    def dense_reference_shapes(self) -> dict[str, list[int]] | None:
        """Prunable-weight shapes of the dense model that training FLOPs are compared with; None means
        the trained model's own (Small-Dense trains a narrower model than its reference)."""
        return None

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
