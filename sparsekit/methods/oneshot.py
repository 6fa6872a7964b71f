"""One-shot methods: the mask is chosen before step 1 and never changes."""

from __future__ import annotations

from sparsekit.methods.base import Method, register_method


@register_method
class Static(Method):
    """A random mask from the distribution, fixed for the whole run."""

    name = "static"
    description = "Static: a random mask from the distribution, never changed"
    family = "one-shot"
    reference = "Evci et al. 2020 (baseline)"
