"""A PyTorch Lightning callback: RigL (or any sparsekit method) in a LightningModule, in a few lines.

    from sparsekit.integrations.lightning import SparsekitCallback
    trainer = L.Trainer(callbacks=[SparsekitCallback(method="rigl", sparsity=0.9)])

It builds the sparsifier at fit start over the first optimizer (total steps from Lightning's
``estimated_stepping_batches``) and drives it through optimizer hooks, so Lightning's automatic
optimisation, gradient clipping and AMP keep working. Lightning is an optional dependency.
"""

from __future__ import annotations

from typing import Any

try:  # Lightning 2.x ships as `lightning` (and `pytorch_lightning`)
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on what the user installed
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError("sparsekit.integrations.lightning needs `pip install lightning`") from exc

from sparsekit.sparsifier import Sparsifier, sparsify


class SparsekitCallback(Callback):  # type: ignore[misc]
    """Sparse training for a LightningModule; ``sparsify_kwargs`` go to ``sparsekit.sparsify``."""

    def __init__(self, method: str = "rigl", sparsity: float = 0.9, **sparsify_kwargs: Any) -> None:
        super().__init__()
        self.method = method
        self.sparsity = sparsity
        self.kwargs = sparsify_kwargs
        self.sparsifier: Sparsifier | None = None
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0]
        total = int(trainer.estimated_stepping_batches)
        self.sparsifier = sparsify(pl_module, optimizer, self.method, sparsity=self.sparsity, total_steps=total,
                                   **self.kwargs)
        self._handles = self.sparsifier.hook_optimizer()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier.state_dict() if self.sparsifier is not None else {}
