"""Methods by name for hand-computed FLOP cases: ``priced("rigl", interval=4, end_step=8)`` is RigL with
ΔT = 4 and T_end = 8, ready to price steps (``training_step_cost``) or a run (``flops.training_macs``)."""

from __future__ import annotations

from types import SimpleNamespace

from sparsekit.methods import Method, get_method_class


def priced(name: str, *, interval: int = 100, end_step: int = 0) -> Method:
    cls = get_method_class(name)
    if "update_interval" not in cls.defaults:
        return cls()
    method = cls(update_interval=interval, update_end=1.0)
    method.attach(SimpleNamespace(total_steps=end_step))  # T_end = round(1.0 · end_step); attach reads only that
    return method
