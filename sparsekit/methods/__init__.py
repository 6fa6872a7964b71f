"""Sparse-training methods, one small class each, behind ``sparsekit.methods.base.Method``.

Adding a method is one class: subclass ``Method``, override the hooks that differ from the defaults
(docs/methods.md, "Adding a method"), and either pass an instance to ``sparsify`` or decorate the class
with ``@register_method`` to use it by name. The built-in methods are registered by the imports below.
"""

from sparsekit.methods import dense, dynamic, oneshot, pruning  # noqa: F401  (registration side effects)
from sparsekit.methods.base import (
    METHODS,
    InitInputs,
    LayerUpdate,
    Method,
    get_method_class,
    make_method,
    register_method,
)

__all__ = ["METHODS", "InitInputs", "LayerUpdate", "Method", "get_method_class", "make_method", "register_method"]
