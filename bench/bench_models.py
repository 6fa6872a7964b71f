"""Whole models on CPU: sparsekit's ``fast`` artifact (sparse convolutions and linear layers on its kernels, the rest
in ONNX Runtime) next to the dense model in ONNX Runtime, side by side in one run.

Each model gets random masks at ``--sparsity`` per layer (uniform; the stem convolution and depthwise convolutions
stay dense, as in the reference measurements of the issue), BatchNorm folded by the ONNX export, and is packed with
the exporter's default calibration (a convolution stays with ONNX Runtime unless it measured faster sparse). Rows:
dense ORT and fast per call (medians of interleaved runs, 1 thread unless --threads), their ratio, the FLOP limit
(dense MACs / sparse MACs over every layer) and, for reference, stock ONNX Runtime running the fast file itself.

    python bench/bench_models.py [--quick | --zoo | --char] [--case resnet18] [--threads 2] [--blocks 4x1]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fast import machine

CASES = {  # name: (builder kwargs for sparsekit.models.build_model or a callable, input shape, batches)
    "resnet18": ("resnet18", {}, (3, 224, 224), (1, 16)),
    "resnet18-cifar": ("resnet18", {"stem": "cifar"}, (3, 32, 32), (1, 16, 64)),
    "mobilenet-v2": ("mobilenet-v2", {}, (3, 224, 224), (1, 16)),
    "transformer": ("transformer", {}, (128, 512), (1, 16)),
}
ZOO = {  # sparsekit's own small CNNs: at 90% they must not be slower than dense at batch 1 and 64
    "resnet20": ("resnet20", {}, (3, 32, 32), (1, 64)),
    "wrn-22-2": ("wrn-22-2", {}, (3, 32, 32), (1, 64)),
    "mobilenet-v1": ("mobilenet-v1", {}, (3, 32, 32), (1, 64)),
    "lenet5": ("lenet5", {}, (1, 28, 28), (1, 64)),
}
CHAR = {  # the char-gru row (width 1, 75% uniform): one generation step (the step model), and full sequences
    "char-gru-step": ("char-gru", {}, (128,), (1,)),
    "char-gru": ("char-gru", {}, (128,), (1, 16)),
}
CHAR_SPARSITY = 0.75
QUICK = {"resnet18-cifar": ("resnet18", {"stem": "cifar", "width": 0.25}, (3, 32, 32), (1, 16)),
         "transformer": ("transformer", {"layers": 1, "d": 128}, (32, 128), (1, 4))}


class Encoder(nn.Module):
    """The issue's Transformer: 4 post-norm encoder layers, d 512, 8 heads, FFN 2048, on float inputs."""

    def __init__(self, layers: int = 4, d: int = 512) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 8 if d >= 256 else 4, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def build(name: str, kwargs: dict, shape: tuple[int, ...]) -> nn.Module:
    if name == "transformer":
        return Encoder(**kwargs)
    from sparsekit.models import build_model

    classes = 256 if name.startswith("char-") else 1000 if shape[-1] >= 224 else 10
    return build_model(name, kwargs, input_shape=shape, num_classes=classes)


def block_mask(shape: torch.Size, sparsity: float, blocks: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A random mask of whole (r, c) blocks of the weight viewed as (out, prod(shape[1:])) (a convolution's columns
    are (in, kh, kw) flattened: 4x1 = 4 output channels x 1 input tap); unstructured where r, c do not divide it."""
    r, c = blocks
    rows, cols = shape[0], int(np.prod(shape[1:]))
    if rows % r or cols % c:
        return torch.rand(shape, generator=gen) >= sparsity
    keep = torch.rand((rows // r, cols // c), generator=gen) >= sparsity
    return keep.repeat_interleave(r, 0).repeat_interleave(c, 1).reshape(shape)


def sparsify(model: nn.Module, sparsity: float, seed: int = 0, blocks: tuple[int, int] = (1, 1)) -> None:
    """Random masks at ``sparsity`` per layer on every Linear (and MultiheadAttention's packed projection) and every
    dense-group convolution but the first (the stem), of whole ``blocks`` (see ``block_mask``)."""
    gen = torch.Generator().manual_seed(seed)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    stem = convs[0] if convs else None
    with torch.no_grad():
        for m in model.modules():
            weights = []
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not stem and getattr(m, "groups", 1) == 1:
                weights.append(m.weight)
            if isinstance(m, nn.MultiheadAttention):
                weights.append(m.in_proj_weight)
            if isinstance(m, nn.RNNBase):  # GRU/LSTM input and recurrent matrices
                weights += [p for n, p in m.named_parameters() if n.startswith("weight_")]
            for w in weights:
                w.mul_(block_mask(w.shape, sparsity, blocks, gen))


def macs(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(dense, sparse) multiply-adds of the weight layers for one input batch, from forward hooks."""
    totals = [0.0, 0.0]

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        w = m.weight
        per_out = w[0].numel()
        positions = out.numel() / w.shape[0]
        totals[0] += positions * w.numel() if not isinstance(m, nn.Conv2d) or m.groups == 1 else out.numel() * per_out
        nnz = float((w != 0).sum())
        totals[1] += positions * nnz

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return totals[0], totals[1]


def timed(fns: dict, reps: int, budget_s: float, threads: int = 1) -> dict[str, float]:
    """Median seconds per call, interleaved; thread CPU time at 1 thread (robust to other processes), wall
    time with more (the other threads' work is not in the caller's CPU time)."""
    clock = time.thread_time if threads == 1 else time.perf_counter
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    for r in range(reps):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            samples[k].append(clock() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: float(np.median(v)) for k, v in samples.items()}


def bench_case(label: str, spec: tuple, sparsity: float, threads: int, reps: int, budget_s: float,
               blocks: tuple[int, int] = (1, 1)) -> list[dict]:
    from sparsekit.exporters.fast import write_model

    from sparsekit.onnx_export import export_dense_onnx
    from sparsekit.runtime import load

    name, kwargs, shape, batches = spec
    model = build(name, kwargs, shape).eval()
    sparsify(model, sparsity, blocks=blocks)
    if blocks != (1, 1):
        label = f"{label} {blocks[0]}x{blocks[1]} blocks"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_path, fast_path = Path(tmp) / "dense.onnx", Path(tmp) / "model.fast.onnx"
        x_example = torch.randn(2, *shape)
        export_dense_onnx(model, x_example, dense_path)
        dense = onnx.load(str(dense_path))
        t0 = time.perf_counter()
        example = char_inputs(2, shape) if name.startswith("char-") else x_example.numpy()
        # planned, and its sparse convolutions chosen, for batch 1 and the case's largest batch
        # (sparsekit export --format fast --tune-batch-size B)
        write_model(dense, fast_path, threads=threads, inputs=example, batch_size=max(batches))
        export_s = time.perf_counter() - t0
        fast = load(fast_path, threads=threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as bench_fast.py (see RESULTS.md)
        sess = ort.InferenceSession(str(dense_path), so, providers=["CPUExecutionProvider"])
        stock = ort.InferenceSession(str(fast_path), so, providers=["CPUExecutionProvider"])
        in_name = sess.get_inputs()[0].name
        for b in batches:
            x = (char_inputs(b, shape) if name.startswith("char-") else
                 np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32))
            ref = sess.run(None, {in_name: x})[0]
            got = fast.run(x)
            err = float(np.max(np.abs(got - ref)))
            med = timed({"dense ORT": lambda x=x: sess.run(None, {in_name: x}), "fast": lambda x=x: fast.run(x),
                         "fast file in stock ORT": lambda x=x: stock.run(None, {in_name: x})}, reps, budget_s,
                        threads)
            d_macs, s_macs = macs(model, torch.from_numpy(x)) if not name.startswith("char-") else (
                weight_limit(model), 1.0)
            rows.append({"case": label, "batch": b, "threads": threads, "sparsity": sparsity,
                         "dense_ms": round(med["dense ORT"] * 1e3, 3), "fast_ms": round(med["fast"] * 1e3, 3),
                         "speedup": round(med["dense ORT"] / med["fast"], 2),
                         "stock_ort_on_fast_file": round(med["dense ORT"] / med["fast file in stock ORT"], 2),
                         "flop_limit": round(d_macs / max(s_macs, 1.0), 2), "max_abs_diff": err,
                         "sparse_linear": len(fast.layers), "sparse_conv": len(getattr(fast, "convs", [])),
                         "sparse_rnn": sum(type(s).__name__ == "RnnStep" for s in getattr(fast, "_steps", [])),
                         "export_s": round(export_s, 1)})
            print(f"# {label} batch {b}: dense {rows[-1]['dense_ms']} ms, fast {rows[-1]['fast_ms']} ms "
                  f"({rows[-1]['speedup']}x, FLOP limit {rows[-1]['flop_limit']}x)", file=sys.stderr, flush=True)
    return rows


def force_sparse_convs() -> None:
    """Export packs every sparse convolution and keeps them all, instead of timing each and the whole artifact."""
    from sparsekit.exporters import fast_graph_write

    fast_graph_write.faster_than_dense = lambda *_a, **_k: lambda *_b: True
    fast_graph_write._fastest_variant = lambda _dense, _meta, _plan, _inputs, measured: (*measured, [])


def weight_limit(model: nn.Module) -> float:
    """Dense / nonzero entries of the weight matrices (Linear, Conv, GRU/LSTM): the MAC limit of a recurrent model,
    whose every weight is used once per token."""
    weights = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    return sum(p.numel() for p in weights) / max(1, sum(int((p != 0).sum()) for p in weights))


def char_inputs(batch: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(batch).integers(0, 256, (batch, *shape)).astype(np.float32)


def bench_step(label: str, spec: tuple, threads: int, reps: int, budget_s: float) -> list[dict]:
    """One generation step at batch 1, state in and out: the dense step model (ONNX Runtime) against its fast
    artifact as ``sparsekit export --format fast`` writes it (``write_step_models``, which keeps the recurrent
    layer dense if sparse measured slower), and with the recurrent layer sparse whatever it measured."""
    return [row for measure in (True, False)
            for row in bench_one_step(label if measure else f"{label} (GRU forced sparse)", spec, threads, reps,
                                      budget_s, measure)]


def bench_one_step(label: str, spec: tuple, threads: int, reps: int, budget_s: float, measure: bool) -> list[dict]:
    from sparsekit.exporters.fast_step import write_step_models

    from sparsekit.runtime import load

    name, kwargs, shape, _ = spec
    model = build(name, kwargs, shape).eval()
    sparsify(model, CHAR_SPARSITY)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        record = write_step_models(model, Path(tmp) / "model.fast.onnx", opset=18, metadata={}, measure=measure)
        export_s = time.perf_counter() - t0
        if record["step_fast"] is None:  # export measured the fast step slower than dense and wrote none
            print(f"# {label}: no fast step model; {record['note']}", file=sys.stderr, flush=True)
            return [{"case": label, "batch": 1, "threads": threads, "sparsity": CHAR_SPARSITY, "dense_ms": None,
                     "fast_ms": None, "speedup": record["step_speedup_batch1"], "stock_ort_on_fast_file": None,
                     "flop_limit": round(weight_limit(model), 2), "max_abs_diff": None, "sparse_linear": 0,
                     "sparse_conv": 0, "sparse_rnn": 0, "export_s": round(export_s, 1), "note": record["note"]}]
        fast = load(record["step_fast"], threads=threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(record["step_model"], so, providers=["CPUExecutionProvider"])
        stock = ort.InferenceSession(record["step_fast"], so, providers=["CPUExecutionProvider"])
        h = np.random.default_rng(0).standard_normal((1, 1, model.rnn.hidden_size)).astype(np.float32) * 0.5
        feed = {"input": char_inputs(1, (1,)), "h": h}
        err = max(float(np.max(np.abs(a - b))) for a, b in zip(fast.run(feed), sess.run(None, feed), strict=True))
        med = timed({"dense ORT": lambda: sess.run(None, feed), "fast": lambda: fast.run(feed),
                     "fast file in stock ORT": lambda: stock.run(None, feed)}, reps, budget_s, threads)
    row = {"case": label, "batch": 1, "threads": threads, "sparsity": CHAR_SPARSITY,
           "dense_ms": round(med["dense ORT"] * 1e3, 4), "fast_ms": round(med["fast"] * 1e3, 4),
           "speedup": round(med["dense ORT"] / med["fast"], 2),
           "stock_ort_on_fast_file": round(med["dense ORT"] / med["fast file in stock ORT"], 2),
           "flop_limit": round(weight_limit(model), 2), "max_abs_diff": err, "sparse_linear": len(fast.layers),
           "sparse_conv": 0, "sparse_rnn": sum(type(s).__name__ == "RnnStep" for s in fast._steps),
           "export_s": round(export_s, 1), "note": record["note"]}
    print(f"# {label}: dense {row['dense_ms']} ms, fast {row['fast_ms']} ms ({row['speedup']}x); {row['note']}",
          file=sys.stderr, flush=True)
    return [row]


def markdown(info: dict, rows: list[dict]) -> str:
    head = (f"Machine: {info['cpu']} ({info.get('cpu_id', '')}), {info['cores']} cores, load average "
            f"{info.get('load_average_1_5_15')}; ONNX Runtime {info['onnxruntime']}, sparsekit kernels "
            f"{info['sparsekit_isa']}. Medians of interleaved runs (thread CPU time).")
    lines = [head, "", "| model | batch | threads | dense ORT | fast | speedup | FLOP limit | sparse convs / linears "
             "/ GRUs | stock ORT on the fast file |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense_ms, fast_ms = (f"{r[k]} ms" if r[k] is not None else "–" for k in ("dense_ms", "fast_ms"))
        lines.append(f"| {r['case']} | {r['batch']} | {r['threads']} | {dense_ms} | {fast_ms} | "
                     f"**{r['speedup']}×** | {r['flop_limit']}× | {r['sparse_conv']} / {r['sparse_linear']} / "
                     f"{r.get('sparse_rnn', 0)} | "
                     f"{r['stock_ort_on_fast_file']}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small models (CI smoke run, < 1 min)")
    p.add_argument("--case", action="append", help="only these cases (names: " + ", ".join([*CASES, *ZOO]) + ")")
    p.add_argument("--zoo", action="store_true", help="sparsekit's small CNNs instead (" + ", ".join(ZOO) + ")")
    p.add_argument("--char", action="store_true", help="the char-gru cases instead (" + ", ".join(CHAR) + "; "
                   f"{CHAR_SPARSITY * 100:.0f}%% uniform, whatever --sparsity says)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--json", type=Path, help="write rows and machine info here")
    p.add_argument("--all-sparse-convs", action="store_true", help="every convolution sparse, whatever export "
                   "would choose by timing (what the sparse kernels give where export keeps some dense)")
    p.add_argument("--blocks", metavar="RxC", help="each case also with masks of whole RxC blocks (e.g. 4x1: 4 output "
                   "channels x 1 input tap), right after its unstructured run")
    args = p.parse_args(argv)
    shapes = [(1, 1)]
    if args.blocks:
        try:
            r, c = (int(v) for v in args.blocks.lower().split("x"))
            assert r >= 1 and c >= 1
        except (ValueError, AssertionError):
            p.error(f"--blocks {args.blocks!r}: expected RxC with positive integers, e.g. 4x1")
        shapes.append((r, c))
    if args.all_sparse_convs:
        force_sparse_convs()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(max(1, args.threads))
    cases = QUICK if args.quick else ZOO if args.zoo else CHAR if args.char else CASES
    if args.case:
        cases = {k: v for k, v in {**CASES, **ZOO, **CHAR}.items() if k in args.case}
    info = machine()
    rows = []
    for label, spec in cases.items():
        budget = 2.0 if args.quick else 20.0
        if label == "char-gru-step":
            rows += bench_step(label, spec, args.threads, max(args.reps, 41), budget)
            continue
        sparsity = CHAR_SPARSITY if label in CHAR else args.sparsity
        for blocks in shapes:
            rows += bench_case(label, spec, sparsity, args.threads, args.reps, budget, blocks)
    info["load_average_end"] = machine()["load_average_1_5_15"]
    print(markdown(info, rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
