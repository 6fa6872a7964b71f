"""Cost of sparse training bookkeeping on LeNet-300-100 (issue 2's targets, measured side by side).

Measures, interleaved in one process, median over repetitions:
  * dense step:   forward + backward + SGD step of the dense model;
  * masked step:  the same with ``Sparsifier.step()`` on a non-update step (gradient masking);
  * mask update:  one RigL drop/grow update (scores, top-k, bookkeeping, optimizer-state reset).
Targets: masked step <= 1.10x dense step; mask update <= ~1x a training step.

    python bench/bench_masking.py [--batch-size 128] [--reps 200] [--sparsity 0.9] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import sparsekit
from sparsekit.models import build_model


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("lenet300", {}, input_shape=(1, 28, 28), num_classes=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--quick", action="store_true", help="few repetitions (CI smoke run)")
    args = ap.parse_args()
    reps = 20 if args.quick else args.reps
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    loss_fn = nn.functional.cross_entropy

    dense = _lenet()
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sparse = _lenet()
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    # update_interval huge: every step is a plain masked step; updates are timed explicitly below.
    sp = sparsekit.sparsify(sparse, opt_s, "rigl", sparsity=args.sparsity, total_steps=10**9,
                            update_interval=10**8, update_end=1.0)

    def dense_step() -> None:
        loss_fn(dense(x), y).backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    def masked_step() -> None:
        loss_fn(sparse(x), y).backward()
        sp.step()
        opt_s.zero_grad(set_to_none=True)

    upd = _lenet()
    opt_u = torch.optim.SGD(upd.parameters(), lr=0.01, momentum=0.9)
    sp_u = sparsekit.sparsify(upd, opt_u, "rigl", sparsity=args.sparsity, total_steps=10 * reps + 10,
                              update_interval=1, update_end=1.0)

    def mask_update() -> float:
        loss_fn(upd(x), y).backward()  # not timed: the update needs this step's gradient
        t0 = time.perf_counter()
        sp_u.step()  # RigL update step: optimizer step skipped, so this is the update alone
        dt = time.perf_counter() - t0
        opt_u.zero_grad(set_to_none=True)
        return dt

    for _ in range(10):
        dense_step()
        masked_step()
    times: dict[str, list[float]] = {"dense_step": [], "masked_step": [], "mask_update": []}
    for _ in range(reps):
        for name, fn in (("dense_step", dense_step), ("masked_step", masked_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        times["mask_update"].append(mask_update())
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {
        "model": "lenet300", "batch_size": args.batch_size, "sparsity": args.sparsity, "threads": args.threads,
        "reps": reps, "torch": torch.__version__,
        "dense_step_ms": med["dense_step"], "masked_step_ms": med["masked_step"], "mask_update_ms": med["mask_update"],
        "masked_vs_dense_step": med["masked_step"] / med["dense_step"],
        "update_vs_dense_step": med["mask_update"] / med["dense_step"],
    }
    print("| measure | median ms | vs dense step | target |")
    print("|---|---|---|---|")
    print(f"| dense training step | {med['dense_step']:.3f} | 1.00x | |")
    print(f"| masked training step | {med['masked_step']:.3f} | {result['masked_vs_dense_step']:.2f}x | <= 1.10x |")
    print(f"| RigL mask update | {med['mask_update']:.3f} | {result['update_vs_dense_step']:.2f}x | ~<= 1x |")
    print(json.dumps(result))
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
