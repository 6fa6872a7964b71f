"""Loaded models stay usable in a forked child (``os.fork``, ``multiprocessing`` with the fork start method).

A child has only the thread that forked. Two things another thread of the parent may hold at that moment would
stay held in the child for good: a model's lock (``FastModel._lock``, taken by calls that do not run as one C
chain), and ONNX Runtime's internal locks (the ``dense`` kernel runs there; a child forked while another thread was
inside ORT hung in its next ORT call). So every live model gets a fresh lock in the child, and a fork waits until
no thread is inside an ORT call made by a model (new ones wait for the fork). The C thread pool resets itself
(``pool_atfork_child`` in csrc/runtime/sk_pool.c).
"""

from __future__ import annotations

import os
import threading
import weakref
from types import TracebackType
from typing import Any


class OrtCalls:
    """``with ORT_CALLS:`` around a model's ONNX Runtime calls; any number of threads may be inside at once."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cv = threading.Condition()
        self._inside = 0
        self._forking = False

    def __enter__(self) -> None:
        with self._cv:
            while self._forking:
                self._cv.wait()
            self._inside += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with self._cv:
            self._inside -= 1
            self._cv.notify_all()

    def before_fork(self) -> None:
        """Wait until no thread is inside; return holding the lock (released after the fork)."""
        self._cv.acquire()
        self._forking = True
        self._cv.wait_for(lambda: self._inside == 0)

    def after_fork_in_parent(self) -> None:
        self._forking = False
        self._cv.notify_all()
        self._cv.release()


ORT_CALLS = OrtCalls()
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # every FastModel alive


def register(model: Any) -> None:
    """Give ``model`` (anything with a ``_lock``) a fresh lock in forked children."""
    _LIVE.add(model)


def _after_fork_in_child() -> None:
    ORT_CALLS._reset()
    for model in list(_LIVE):
        model._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=ORT_CALLS.before_fork, after_in_parent=ORT_CALLS.after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
