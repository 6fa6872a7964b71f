"""Sparse-training methods, one small class each, behind ``sparsekit.methods.base.Method``.

Adding a method is one new class decorated with ``@register_method`` in a module imported here.
"""

from sparsekit.methods import dense, dynamic, oneshot, pruning  # noqa: F401  (registration side effects)
from sparsekit.methods.base import METHODS, Method, get_method_class, make_method, register_method

__all__ = ["METHODS", "Method", "get_method_class", "make_method", "register_method"]
