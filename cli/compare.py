"""``sparsekit compare``: sweep methods × sparsities × seeds, then table, CSV, JSON and a plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from sparsekit.cli.main import app
from sparsekit.cli.progress import ProgressMode, make_progress
from sparsekit.cli.render import print_json, quiet_option, stderr_console, stdout_console

from sparsekit.errors import InputError


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise InputError(f"malformed {flag} {text!r}", where=flag, fix="give a comma list, e.g. 0.9,0.98") from exc


@app.command(
    epilog=(
        "Examples:\n\n"
        "  sparsekit compare --quick --out runs/cmp-quick\n\n"
        "  sparsekit compare --model lenet300 --data npz:digits28.npz --methods "
        "rigl,set,snfs,snip,static,small-dense,pruning,dense --sparsity 0.9,0.98 --seeds 2 --epochs 30 "
        "--batch-size 128 --out runs/cmp\n\n"
        "  OMP_NUM_THREADS=1 sparsekit compare --config preset:char-gru-quick "
        "--methods rigl,set,snfs,static,small-dense,pruning,dense --sparsity 0.75 --out runs/cmp-char"
    )
)
def compare(
    model: str = typer.Option(None, "--model", help="Model spec (see `sparsekit models`).", show_default="mlp"),
    model_kwargs: list[str] = typer.Option(None, "--model-kwargs", help="key=value for the model; repeatable.", show_default="none"),
    data: str = typer.Option(None, "--data", help="Dataset spec (see `sparsekit datasets`).", show_default="digits"),
    config: str = typer.Option(None, "--config", help="Shared settings from a YAML/TOML/JSON file or preset:NAME "
                               "(its method and sparsity are defaults for --methods/--sparsity); flags override it.", show_default="none"),
    steps: int = typer.Option(None, "--steps", help="Total optimizer steps per run (overrides --epochs).", show_default="whole epochs"),
    seq_len: int = typer.Option(None, "--seq-len", help="text data: window length.", show_default="128"),
    vocab: str = typer.Option(None, "--vocab", help="text data: byte | char.", show_default="byte"),
    clip_grad: float = typer.Option(None, "--clip-grad", help="Clip the gradient norm.", show_default="off"),
    methods: str = typer.Option("rigl,set,snfs,snip,static,small-dense,pruning,dense", "--methods",
                                help="Comma list of methods (dense is trained once per seed)."),
    sparsity: str = typer.Option(None, "--sparsity", help="Comma list of sparsity levels, e.g. 0.9,0.98.", show_default="0.9"),
    seeds: int = typer.Option(None, "--seeds", help="Seeds per (method, sparsity): 0..N-1.", show_default="3; 1 with --quick"),
    epochs: int = typer.Option(None, "--epochs", help="Epochs per run.", show_default="60; 2 with --quick"),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Sweep directory (one run dir per run)."),
    quick: bool = typer.Option(False, "--quick", help="CI mode: at most 2 epochs, mask updates every 5 steps, 1 seed.", show_default="off"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Retrain runs that already exist.", show_default="off"),
    json_out: bool = typer.Option(False, "--json", help="Print compare.json on stdout.", show_default="off"),
    progress_mode: ProgressMode = typer.Option(ProgressMode.auto, "--progress",
                                               help="Progress of each run on stderr: bar | plain (log lines "
                                               "for CI) | none | auto (bar on a terminal, else plain)."),
    quiet: bool = quiet_option("Only the table: no progress, per-run lines or notes (implies --progress none)."),
    distribution: str = typer.Option(None, "--distribution", help="uniform | er | erk.", show_default="erk"),
    granularity: str = typer.Option(None, "--granularity", help="Mask structure of the sparse runs: unstructured | "
                                    "N:M (2:4) | RxC blocks (4x1) | fanin | fanin+ablate[=0.3].",
                                    show_default="unstructured"),
    batch_size: int = typer.Option(None, "--batch-size", help="Mini-batch size.", show_default="64"),
    optimizer: str = typer.Option(None, "--optimizer", help="sgd | adam | adamw.", show_default="sgd"),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate.", show_default="0.1"),
    momentum: float = typer.Option(None, "--momentum", help="SGD momentum.", show_default="0.9"),
    nesterov: bool = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum.", show_default="no-nesterov"),
    weight_decay: float = typer.Option(None, "--weight-decay", help="L2 weight decay.", show_default="5e-4"),
    lr_schedule: str = typer.Option(None, "--lr-schedule", help="cosine | step | constant.", show_default="cosine"),
    warmup_epochs: float = typer.Option(None, "--warmup-epochs", help="Linear LR warm-up epochs.", show_default="0"),
    train_multiplier: float = typer.Option(None, "--train-multiplier", help="Scale training length (1x/2x/5x).", show_default="1"),
    dense_first_layer: bool = typer.Option(None, "--dense-first-layer/--sparse-first-layer",
                                           help="With uniform: keep the first layer dense.", show_default="dense-first-layer"),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda.", show_default="auto"),
    val_fraction: float = typer.Option(None, "--val-fraction", help="Held-out fraction without a test split.", show_default="0.2"),
    update_interval: int = typer.Option(None, "--update-interval", help="RigL/SET/SNFS: ΔT.", show_default="100; 5 with --quick"),
    update_end: float = typer.Option(None, "--update-end", help="RigL/SET/SNFS: fraction of training with updates.", show_default="0.75"),
    drop_fraction: float = typer.Option(None, "--drop-fraction", help="RigL/SET/SNFS: α.", show_default="0.3"),
    drop_schedule: str = typer.Option(None, "--drop-schedule", help="cosine | constant | linear.", show_default="cosine"),
    snip_batches: int = typer.Option(None, "--snip-batches", help="SNIP: mini-batches scored at init.", show_default="1"),
    snip_scope: str = typer.Option(None, "--snip-scope", help="SNIP: layer | global.", show_default="layer"),
    redistribute: bool = typer.Option(None, "--redistribute/--no-redistribute", help="SNFS: momentum redistribution.", show_default="no-redistribute"),
    prune_begin: float = typer.Option(None, "--prune-begin", help="Pruning: start (fraction of training).", show_default="0.1"),
    prune_end: float = typer.Option(None, "--prune-end", help="Pruning: end (fraction of training).", show_default="0.75"),
    prune_interval: int = typer.Option(None, "--prune-interval", help="Pruning: steps between pruning steps.", show_default="100"),
) -> None:
    """Train every (method, sparsity, seed), then print the paper-style table and write
    compare.csv, compare.json and compare.png (accuracy vs training FLOPs) into --out."""
    from sparsekit.cli.train import METHOD_FLAGS

    from sparsekit.compare import CompareSpec, format_row, granularities_differ, run_compare
    from sparsekit.config import merge_config, read_config_file
    from sparsekit.models import parse_model_kwargs

    local = dict(locals())
    train: dict[str, Any] = {k: local[k] for k in (
        "model", "data", "epochs", "distribution", "batch_size", "optimizer", "lr", "momentum", "nesterov",
        "weight_decay", "lr_schedule", "warmup_epochs", "train_multiplier", "dense_first_layer", "device",
        "val_fraction", "steps", "seq_len", "vocab", "clip_grad", "granularity")}
    if model_kwargs:
        train["model_kwargs"] = parse_model_kwargs(model_kwargs)
    options = {opt: local[flag] for flag, opt in METHOD_FLAGS.items() if flag in local and local[flag] is not None}
    if config is not None:  # file < flags; its method/sparsity only seed the sweep's defaults
        file_data = read_config_file(config)
        options = {**(file_data.pop("method_options", None) or {}), **options}
        file_data.pop("method", None)
        file_sparsity = file_data.pop("sparsity", None)
        if sparsity is None and file_sparsity is not None:
            sparsity = str(file_sparsity)
        file_train = merge_config({}, file_data, source=f"--config {config}")
        train = {**file_train, **{k: v for k, v in train.items() if v is not None}}
    spec = CompareSpec(methods=[m.strip() for m in methods.split(",") if m.strip()],
                       sparsities=_floats(sparsity or "0.9", "--sparsity"),
                       seeds=seeds if seeds is not None else (1 if quick else 3),
                       train=train, method_options=options, quick=quick)
    err = stderr_console()
    progress = make_progress(progress_mode, quiet=quiet)

    def on_run(info: dict[str, Any]) -> None:
        if quiet:
            return
        if not info["reused"]:
            progress.finish(info)
        acc = info["test_accuracy"]
        how = "reused" if info["reused"] else f"{info['train_seconds']:.1f}s"
        bpc = f", {info['test_bpc']:.3f} bpc" if info.get("test_bpc") is not None else ""
        err.print(f"[{info['index']}/{info['total']}] {info['name']}: test acc "
                  f"{'—' if acc is None else f'{100 * acc:.2f}%'}{bpc} ({how})")

    with progress:
        result = run_compare(spec, out, overwrite=overwrite, on_run=on_run, callbacks=progress.callbacks())
    if json_out:
        print_json(result)
        return
    lm = result["spec"].get("task") == "language-modeling"
    length = f"{result['spec'].get('steps')} steps" if lm else f"{result['spec'].get('epochs')} epochs"
    t = Table(title=f"compare: {result['spec'].get('model')} on {result['spec'].get('data')}, "
                    f"{spec.seeds} seed(s), {length}")
    cols = [("method", "method"), ("sparsity", "sparsity"),
            *([("bpc", "test bits/char (mean ± std)")] if lm else []),
            ("accuracy", "next-char acc %" if lm else "test acc % (mean ± std)"),
            ("best", "best acc %"), ("realized", "realised sparsity"), ("train_flops", "train FLOPs ×dense"),
            ("inference_flops", "infer FLOPs ×dense"), ("params", "params (nonzero)"), ("seconds", "time s")]
    if granularities_differ(result["rows"]):  # e.g. 2:4 runs next to the (unstructured) dense baseline
        cols.insert(2, ("granularity", "granularity"))
    for _, title in cols:
        t.add_column(title, justify="left" if title == "method" else "right")
    for row in result["rows"]:
        f = format_row(row)
        t.add_row(*[f[k] for k, _ in cols])
    stdout_console().print(t)
    if quiet:
        return
    if result.get("note"):
        print(f"note: {result['note']}", file=sys.stderr)
    print(f"wrote {', '.join(result['files'].values())}", file=sys.stderr)
