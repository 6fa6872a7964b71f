"""What "a resumed run ends bit-identical to an uninterrupted one" means, checked in one place.

Every tensor of the weights, the masks and the final checkpoint (optimizer, method and RNG state) is equal
bit for bit; the checkpoint's JSON state, the metrics, the mask-update log and the summary are equal except
for wall-clock timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

TIMING_KEYS = {"train_seconds", "wall_seconds", "created", "run_dir", "seconds"}


def checkpoint_meta(path: Path) -> dict:
    """The checkpoint's JSON state (the safetensors metadata entry ``sparsekit``)."""
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["sparsekit"])


def jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl log without their timing fields."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("weights.safetensors", "masks.safetensors", "checkpoint.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k}"
    ma, mb = (checkpoint_meta(p / "checkpoint.safetensors") for p in (a, b))
    for m in (ma, mb):
        m["state"].pop("train_seconds")
    assert ma == mb
    for name in ("metrics.jsonl", "updates.jsonl"):
        assert jsonl(a / name) == jsonl(b / name), name
    sa, sb = ({k: v for k, v in json.loads((p / "summary.json").read_text()).items() if k not in TIMING_KEYS}
              for p in (a, b))
    assert sa == sb
