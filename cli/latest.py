"""``runs/latest``: after ``sparsekit train`` finishes a run whose directory sits directly in ``./runs`` (the
default ``--out`` is ``runs/<method>-<sparsity>-s<seed>``), ``runs/latest`` is a symlink to it, so that
``sparsekit export runs/latest`` and ``sparsekit report runs/latest`` work on the last run.

The link is relative (``runs/latest -> rigl-0.9-s0``, so a moved ``runs/`` keeps working) and replaced
atomically: a new link is made under a temporary name and renamed over the old one. A real file or
directory named ``runs/latest`` is never replaced: the caller gets a warning instead.
"""

from __future__ import annotations

import os
from pathlib import Path

RUNS = Path("runs")
LATEST = "latest"


def link_latest(run_dir: Path, runs: Path = RUNS) -> str | None:
    """Point ``runs/latest`` at ``run_dir`` if ``run_dir`` is directly in ``runs``; a warning if it could not."""
    run_dir = Path(os.path.abspath(run_dir))
    if run_dir.name == LATEST or not runs.is_dir() or run_dir.parent.resolve() != runs.resolve():
        return None
    link = runs / LATEST
    if link.exists() and not link.is_symlink():
        return f"{link} exists and is not a link, so it was left as it is (it does not point to the last run)"
    tmp = runs / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, link)  # atomic; fails (never replaces) if a real directory appeared meanwhile
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return f"could not point {link} at {run_dir.name}: {exc.strerror or exc}"
    return None
