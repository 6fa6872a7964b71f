"""sparsekit: train neural networks sparse from scratch and ship them as small, fast CPU models.

Library API (the CLI is a thin shell over it)::

    import sparsekit
    sp = sparsekit.sparsify(model, optimizer, method="rigl", sparsity=0.9, total_steps=steps)
    ...  loss.backward(); sp.step(); optimizer.zero_grad()
    ...  sp.log(epoch=epoch, test_accuracy=acc)          # optional: metrics.jsonl, curves, summary
    sparsekit.save(model, sp, "runs/mine", example_input=x_test, labels=y_test)

``sparsekit.train(TrainConfig(...), run_dir)`` runs the CLI's trainer from Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Sparsifier", "SparsitySettings", "TrainConfig", "__version__", "save", "sparsify", "train"]

if TYPE_CHECKING:
    from sparsekit.config import TrainConfig
    from sparsekit.run_writer import save
    from sparsekit.settings import SparsitySettings
    from sparsekit.sparsifier import Sparsifier, sparsify
    from sparsekit.training import train


def __getattr__(name: str) -> Any:
    # Lazy: `import sparsekit` stays cheap; torch loads on first use of the API.
    if name in ("sparsify", "Sparsifier"):
        from sparsekit import sparsifier

        return getattr(sparsifier, name)
    if name == "SparsitySettings":
        from sparsekit.settings import SparsitySettings

        return SparsitySettings
    if name == "save":
        from sparsekit.run_writer import save

        return save
    if name == "train":
        from sparsekit.training import train

        return train
    if name == "TrainConfig":
        from sparsekit.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'sparsekit' has no attribute {name!r}")
