"""Accuracy of RigL at each mask granularity against unstructured RigL and dense (the issue's "how good").

    python bench/bench_granularity.py --data npz:data/mnist8k.npz --seeds 4 --json granularity.json

Runs ``sparsekit compare`` once per granularity with the RigL-table recipe (LeNet-300-100, 30 epochs, batch
128, SGD 0.1 momentum 0.9, cosine, ERK; N:M is uniform over every layer at density N/M, as it must be) and
prints test accuracy, mean ± std over the seeds, with the gap to the reference each target names:

- ``4x1`` blocks at 90%: within 1 point of unstructured RigL at 90%;
- ``2:4`` (50%): within 0.5 point of dense;
- ``fanin`` (constant fan-in) at 90%: within 0.5 point of unstructured RigL at 90% (and ``fanin+ablate``,
  SRigL's neuron ablation, held to the same).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = ["--model", "lenet300", "--epochs", "30", "--batch-size", "128", "--lr", "0.1", "--momentum", "0.9",
          "--lr-schedule", "cosine", "--quiet"]
# (label, methods, sparsity, granularity, distribution, reference label, allowed gap in points)
CASES = [
    ("dense + rigl 90%", "dense,rigl", "0.9", "unstructured", "erk", None, None),
    ("rigl 90% 4x1", "rigl", "0.9", "4x1", "erk", "rigl 90%", 1.0),
    ("rigl 90% fanin", "rigl", "0.9", "fanin", "erk", "rigl 90%", 0.5),
    ("rigl 90% fanin+abl", "rigl", "0.9", "fanin+ablate", "erk", "rigl 90%", 0.5),
    ("rigl 2:4", "rigl", "0.5", "2:4", "uniform", "dense", 0.5),
]


def run_compare(data: str, seeds: int, methods: str, sparsity: str, granularity: str, distribution: str,
                out: Path, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "sparsekit", "compare", "--data", data, "--seeds", str(seeds), "--methods", methods,
           "--sparsity", sparsity, "--granularity", granularity, "--distribution", distribution, "--out", str(out),
           *RECIPE, *extra]
    subprocess.run(cmd, check=True)
    return json.loads((out / "compare.json").read_text())["runs"]


def accuracies(runs: list[dict], method: str) -> list[float]:
    return [100.0 * float(r["test_accuracy"]) for r in runs if r["method"] == method]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset spec, e.g. npz:data/mnist8k.npz")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--json", type=Path, help="also write the table here")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `sparsekit compare` flags")
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, methods, sparsity, gran, dist, _, _ in CASES:
            runs = run_compare(args.data, args.seeds, methods, sparsity, gran, dist, Path(tmp) / gran.replace(":", "-"),
                               args.extra)
            if "dense" in methods:
                rows["dense"] = accuracies(runs, "dense")
                rows["rigl 90%"] = accuracies(runs, "rigl")
            else:
                rows[label] = accuracies(runs, "rigl")
    table = []
    print(f"{'run':<18} {'test accuracy (%)':>18} {'vs':>10} {'gap':>7} {'target':>8}")
    for label, _, _, _, _, ref, allowed in [("dense", "", "", "", "", None, None),
                                            ("rigl 90%", "", "", "", "", None, None), *CASES[1:]]:
        acc = rows[label]
        mean, std = statistics.fmean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0
        gap = None if ref is None else mean - statistics.fmean(rows[ref])
        met = None if gap is None else gap >= -allowed
        table.append({"run": label, "mean": mean, "std": std, "seeds": len(acc), "reference": ref, "gap": gap,
                      "allowed": allowed, "met": met})
        print(f"{label:<18} {mean:>11.2f} ± {std:.2f} {ref or '':>10} "
              f"{'' if gap is None else f'{gap:+.2f}':>7} {'' if met is None else ('met' if met else 'missed'):>8}")
    if args.json:
        args.json.write_text(json.dumps({"data": args.data, "seeds": args.seeds, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
