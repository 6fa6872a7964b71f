"""The settings a Sparsifier is built with: one frozen object, made once and passed as a whole.

``sparsekit.sparsify(...)`` builds it from its keyword arguments; the trainer builds it from its
``TrainConfig`` (``SparsitySettings.from_config``). Method options are not here: they belong to the
method object (``Method.options``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsekit.config import SPARSE_INITS
from sparsekit.errors import InputError
from sparsekit.granularity import Granularity, implied_density

if TYPE_CHECKING:
    from sparsekit.config import TrainConfig


@dataclass(frozen=True)
class SparsitySettings:
    """How sparse, where, and for how long (method-independent).

    ``total_steps``: optimizer steps of the whole run (schedules are fractions of it). ``layer_density``
    maps fnmatch patterns of parameter names to fixed densities; ``exclude`` patterns keep weights dense;
    ``include_embeddings`` makes ``nn.Embedding`` tables prunable; ``sparse_init`` is ``scaled`` (each
    output unit's weights rescaled to the dense init's variance) or ``dense`` (the dense init, masked).
    ``pretrained`` says the model's weights were loaded (a dense or pretrained checkpoint): they are never
    rescaled (``sparse_init`` applies to a fresh initialisation only) and ``init_mask`` (``magnitude`` |
    ``random``; None: magnitude for loaded weights, random otherwise) picks the start mask of the
    methods that take one (``Method.start_mask``). ``granularity`` is the mask's structure
    (``sparsekit.granularity``: unstructured, N:M, RxC, fanin, fanin+ablate); N:M fixes every sparse layer's
    density at N/M, so ``sparsity`` and ``distribution`` left as None are implied (1 − N/M, uniform) and
    given ones that disagree are refused. Unstructured: None means 0.9 and erk.
    """

    total_steps: int
    sparsity: float | None = None  # None: resolved in __post_init__ (always a float after it)
    distribution: str | None = None
    seed: int = 0
    dense_first_layer: bool = True
    erk_power_scale: float = 1.0
    layer_density: dict[str, float] | None = None
    exclude: tuple[str, ...] = ()
    sparse_init: str = "scaled"
    include_embeddings: bool = False
    pretrained: bool = False
    init_mask: str | None = None
    granularity: str = "unstructured"

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise InputError(f"total_steps={self.total_steps!r} must be a positive integer", where="sparsify()",
                             fix="pass the number of optimizer steps of the whole run (len(loader) * epochs)")
        if self.sparse_init not in SPARSE_INITS:
            raise InputError(f"unknown sparse init {self.sparse_init!r}", where="--sparse-init",
                             fix="choose 'scaled' (variance kept per unit) or 'dense' (the dense init, masked)")
        if not isinstance(self.pretrained, bool):
            raise InputError(f"pretrained={self.pretrained!r} must be True or False", where="sparsify()",
                             fix="pass pretrained=True when the model's weights were loaded")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        gran = Granularity.parse(self.granularity)
        object.__setattr__(self, "granularity", gran.spec)
        sparsity, distribution = implied_density(gran, self.sparsity, self.distribution)
        object.__setattr__(self, "sparsity", sparsity)
        object.__setattr__(self, "distribution", distribution)

    @classmethod
    def from_config(cls, config: TrainConfig, total_steps: int) -> SparsitySettings:
        """The settings of a ``sparsekit train`` run of ``total_steps`` optimizer steps."""
        return cls(total_steps=total_steps, sparsity=config.sparsity, distribution=config.distribution,
                   seed=config.seed, dense_first_layer=config.dense_first_layer,
                   erk_power_scale=config.erk_power_scale, layer_density=config.layer_density or None,
                   sparse_init=config.sparse_init, include_embeddings=bool(config.sparse_embeddings),
                   pretrained=bool(config.init_from), init_mask=config.init_mask,
                   granularity=config.granularity)
