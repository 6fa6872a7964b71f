"""Dense-width methods: train a dense model (the reference, or a narrower one)."""

from __future__ import annotations

from sparsekit.methods.base import Method, register_method


@register_method
class Dense(Method):
    """The dense reference model: no masks."""

    name = "dense"
    description = "Dense: the reference model, all weights trained"
    family = "dense"
    sparse = False
