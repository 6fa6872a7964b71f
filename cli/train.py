"""``sparsekit train``: parse flags into a TrainConfig, call ``sparsekit.training.train``, render."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from sparsekit.cli.latest import link_latest
from sparsekit.cli.main import app
from sparsekit.cli.progress import ProgressMode, make_progress
from sparsekit.cli.render import print_json, quiet_option, stderr_console

from sparsekit.errors import InputError

METHOD_FLAGS = {  # flag value name -> method option name
    "update_interval": "update_interval",
    "update_end": "update_end",
    "drop_fraction": "drop_fraction",
    "drop_schedule": "drop_schedule",
    "skip_step_on_update": "skip_step_on_update",
    "grow_init": "grow_init",
    "snip_batches": "snip_batches",
    "snip_scope": "snip_scope",
    "redistribute": "redistribute",
    "prune_begin": "prune_begin",
    "prune_end": "prune_end",
    "prune_interval": "prune_interval",
}


def parse_pairs(pairs: list[str], flag: str) -> dict[str, Any]:
    """``key=value`` pairs for --method-option / --layer-density (values parsed as JSON scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0].strip():
            raise InputError(f"malformed {flag} {pair!r}", where=flag, fix="write key=value, one pair per use")
        key, value = (s.strip() for s in pair.split("=", 1))
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command(
    epilog=(
        "Examples:\n\n"
        "  sparsekit train --method rigl\n\n"
        "  sparsekit train --model lenet300 --data npz:mnist.npz --method rigl --sparsity 0.98 "
        "--epochs 30 --out runs/lenet --json\n\n"
        "  sparsekit train --model mlp --model-kwargs hidden=512,256 --data csv:table.csv --method static\n\n"
        "  sparsekit train --config preset:char-gru-quick --method rigl --out runs/char-gru\n\n"
        "  sparsekit train --method rigl --init-from runs/dense-0.9-s0 --sparsity 0.9 --epochs 5 --lr 0.01"
    )
)
def train(
    model: str = typer.Option(None, "--model", help="Model: registry name (see `sparsekit models`) or "
                              "py:package.module:function / py:path/file.py:function (runs your code).", show_default="mlp"),
    model_kwargs: list[str] = typer.Option(None, "--model-kwargs", help="key=value for the model, one pair per "
                                           "use; lists as comma lists (hidden=512,256); width=0.5 scales widths.", show_default="none"),
    data: str = typer.Option(None, "--data", help="Dataset: digits | synthetic | npz:PATH | npy:DIR | csv:PATH "
                             "| folder:PATH | cifar-bin:DIR | text:PATH | stdlib-docs "
                             "(see `sparsekit datasets`).", show_default="digits"),
    method: str = typer.Option(None, "--method", help="Sparse-training method (see `sparsekit methods`).", show_default="rigl"),
    sparsity: float = typer.Option(None, "--sparsity", help="Fraction of prunable weights removed.", show_default="0.9"),
    distribution: str = typer.Option(None, "--distribution", help="Per-layer density: uniform | er | erk.", show_default="erk"),
    granularity: str = typer.Option(None, "--granularity", help="Mask structure: unstructured | N:M along the "
                                    "input dim (2:4, 1:4, 4:8; implies --sparsity 1-N/M, uniform) | RxC blocks "
                                    "(4x1, 1x4, 16x1) | fanin (equal inputs per unit) | fanin+ablate[=0.3] (also "
                                    "neuron ablation).", show_default="unstructured"),
    dense_first_layer: bool = typer.Option(None, "--dense-first-layer/--sparse-first-layer",
                                           help="With uniform: keep the first layer dense (paper).", show_default="dense-first-layer"),
    sparse_embeddings: bool = typer.Option(None, "--sparse-embeddings/--dense-embeddings",
                                           help="Also sparsify nn.Embedding tables (char models).", show_default="dense-embeddings"),
    sparse_init: str = typer.Option(None, "--sparse-init", help="scaled (each unit's fresh weights rescaled to its sparse fan-in) | dense (dense init, masked); --init-from weights are never rescaled.", show_default="scaled"),
    erk_power_scale: float = typer.Option(None, "--erk-power-scale", help="Exponent on ERK/ER raw densities.", show_default="1.0"),
    layer_density: list[str] = typer.Option(None, "--layer-density", help="PATTERN=DENSITY fixed per-layer density "
                                            "(fnmatch on parameter names, e.g. 'net.1.weight=0.5'); repeatable.", show_default="none"),
    epochs: int = typer.Option(None, "--epochs", help="Training epochs (before --train-multiplier).", show_default="60"),
    train_multiplier: float = typer.Option(None, "--train-multiplier", help="Scale training length, LR schedule and "
                                           "update window (paper's 1x/2x/5x).", show_default="1"),
    batch_size: int = typer.Option(None, "--batch-size", help="Mini-batch size.", show_default="64"),
    optimizer: str = typer.Option(None, "--optimizer", help="sgd | adam | adamw.", show_default="sgd"),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate.", show_default="0.1"),
    momentum: float = typer.Option(None, "--momentum", help="SGD momentum.", show_default="0.9"),
    nesterov: bool = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum (SGD).", show_default="no-nesterov"),
    weight_decay: float = typer.Option(None, "--weight-decay", help="L2 weight decay.", show_default="5e-4"),
    lr_schedule: str = typer.Option(None, "--lr-schedule", help="cosine | step (x0.2 at 30/60/90%) | constant.", show_default="cosine"),
    warmup_epochs: float = typer.Option(None, "--warmup-epochs", help="Linear LR warm-up epochs.", show_default="0"),
    clip_grad: float = typer.Option(None, "--clip-grad", help="Clip the gradient norm (after masking).", show_default="off"),
    seed: int = typer.Option(None, "--seed", help="Seed for init, masks, shuffling and tie-breaks.", show_default="0"),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda.", show_default="auto"),
    val_fraction: float = typer.Option(None, "--val-fraction", help="Held-out fraction when the data has no test split.", show_default="0.2"),
    label_column: str = typer.Option(None, "--label-column", help="csv: label column index or header name.", show_default="last"),
    image_size: int = typer.Option(None, "--image-size", help="folder: resize images to SIZE x SIZE.", show_default="32"),
    channels: int = typer.Option(None, "--channels", help="folder: 1 (grayscale) or 3 (RGB).", show_default="from images"),
    seq_len: int = typer.Option(None, "--seq-len", help="text data: window length in symbols (truncated BPTT; "
                                "state reset per window).", show_default="128"),
    vocab: str = typer.Option(None, "--vocab", help="text data: byte (256 symbols) | char (the file's characters).", show_default="byte"),
    augment: str = typer.Option(None, "--augment", help="Training-batch augmentation: none | crop-flip (images: "
                                "4-pixel padded random crop + horizontal flip, seeded per step).", show_default="none"),
    workers: int = typer.Option(None, "--workers", help="DataLoader processes building training batches (same "
                                "batches, bit-identical results; helps lazy folders).", show_default="0"),
    steps: int = typer.Option(None, "--steps", help="Total optimizer steps (before --train-multiplier); "
                              "overrides --epochs.", show_default="whole epochs"),
    update_interval: int = typer.Option(None, "--update-interval", help="RigL/SET/SNFS: steps between mask updates (ΔT).", show_default="100"),
    update_end: float = typer.Option(None, "--update-end", help="RigL/SET/SNFS: fraction of training with mask updates.", show_default="0.75"),
    drop_fraction: float = typer.Option(None, "--drop-fraction", help="RigL/SET/SNFS: initial drop fraction α.", show_default="0.3"),
    drop_schedule: str = typer.Option(None, "--drop-schedule", help="cosine | constant | linear.", show_default="cosine"),
    skip_step_on_update: bool = typer.Option(None, "--skip-step-on-update/--no-skip-step-on-update",
                                             help="RigL: skip the optimizer step at mask updates (paper).", show_default="skip-step-on-update"),
    grow_init: str = typer.Option(None, "--grow-init", help="Value of new connections: zero.", show_default="zero"),
    snip_batches: int = typer.Option(None, "--snip-batches", help="SNIP: mini-batches scored at init.", show_default="1"),
    snip_scope: str = typer.Option(None, "--snip-scope", help="SNIP: layer (by distribution) | global.", show_default="layer"),
    redistribute: bool = typer.Option(None, "--redistribute/--no-redistribute", help="SNFS: momentum redistribution across layers.", show_default="no-redistribute"),
    prune_begin: float = typer.Option(None, "--prune-begin", help="Pruning: start, fraction of training.", show_default="0.1"),
    prune_end: float = typer.Option(None, "--prune-end", help="Pruning: end, fraction of training.", show_default="0.75"),
    prune_interval: int = typer.Option(None, "--prune-interval", help="Pruning: steps between pruning steps.", show_default="100"),
    method_option: list[str] = typer.Option(None, "--method-option", help="Any other method option as key=value; repeatable.", show_default="none"),
    init_from: str = typer.Option(None, "--init-from", help="Start from trained weights: a sparsekit run directory, "
                                  "a .safetensors file or a torch state dict file (torch.save(model.state_dict()); "
                                  "read with weights_only=True); names and shapes must match --model. Never rescaled.",
                                  show_default="none"),
    init_mask: str = typer.Option(None, "--init-mask", help="Start mask of rigl/set/snfs/static: magnitude (largest "
                                  "|w| per layer) | random.", show_default="magnitude with --init-from, else random"),
    threads: int = typer.Option(None, "--threads", help="CPU threads for training; 0 = auto (1 when a step is small, where more threads only add overhead).", show_default="0"),
    dist_timeout: float = typer.Option(None, "--dist-timeout", help="torchrun: seconds before a lost or hung rank fails the job.", show_default="300"),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="Also checkpoint every N steps (0: each epoch).", show_default="0"),
    nan_policy: str = typer.Option(None, "--nan-policy", help="On a non-finite loss: stop | skip-batch.", show_default="stop"),
    out: Path = typer.Option(None, "--out", help="Run directory. A run directly in runs/ also becomes runs/latest (a symlink "
                       "to the last finished one).", show_default="runs/<method>-<sparsity>-s<seed>"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out if there is one (else start).", show_default="off"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory.", show_default="off"),
    config: str = typer.Option(None, "--config", help="YAML/TOML/JSON config, or preset:NAME for a shipped "
                               "preset (see `sparsekit methods`); flags given here override it.", show_default="none"),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as JSON and exit.", show_default="off"),
    json_out: bool = typer.Option(False, "--json", help="Print summary.json on stdout (errors as JSON too).", show_default="off"),
    progress_mode: ProgressMode = typer.Option(ProgressMode.auto, "--progress",
                                               help="Progress on stderr: bar | plain (log lines for CI: every "
                                               "10 s, every 10% and each epoch end) | none | auto (bar on a "
                                               "terminal, else plain)."),
    quiet: bool = quiet_option("No progress or table (implies --progress none)."),
) -> None:
    """Train a model sparse (from scratch, or from trained weights with --init-from) and write a run directory
    (config, metrics, checkpoint, summary)."""
    from sparsekit.config import build_config
    from sparsekit.models import parse_model_kwargs

    local = dict(locals())
    cli: dict[str, Any] = {
        "model": model, "data": data, "method": method, "sparsity": sparsity, "distribution": distribution,
        "granularity": granularity,
        "dense_first_layer": dense_first_layer, "sparse_init": sparse_init, "erk_power_scale": erk_power_scale, "epochs": epochs,
        "train_multiplier": train_multiplier, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
        "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay, "lr_schedule": lr_schedule,
        "warmup_epochs": warmup_epochs, "clip_grad": clip_grad, "seed": seed, "device": device,
        "val_fraction": val_fraction, "image_size": image_size, "channels": channels,
        "seq_len": seq_len, "vocab": vocab, "steps": steps, "sparse_embeddings": sparse_embeddings,
        "augment": augment, "workers": workers, "checkpoint_every": checkpoint_every, "dist_timeout": dist_timeout, "threads": threads, "nan_policy": nan_policy, "init_from": init_from,
        "init_mask": init_mask,
    }
    if label_column is not None:
        cli["label_column"] = int(label_column) if label_column.lstrip("-").isdigit() else label_column
    if model_kwargs:
        cli["model_kwargs"] = parse_model_kwargs(model_kwargs)
    if layer_density:
        cli["layer_density"] = parse_pairs(layer_density, "--layer-density")
    method_opts = {opt: local[flag] for flag, opt in METHOD_FLAGS.items() if local[flag] is not None}
    method_opts.update(parse_pairs(method_option or [], "--method-option"))
    cfg = build_config(config, cli, method_opts)
    if print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    run_dir = out or Path("runs") / f"{cfg.method}-{cfg.sparsity:g}-s{cfg.seed}"

    from sparsekit.distributed import is_main_process
    from sparsekit.faults import from_env as faults_from_env
    from sparsekit.training import train as run_training

    faults = faults_from_env()  # test-only SPARSEKIT_FAULT hooks (kill -9, SIGTERM, NaN, a stuck rank)
    main_rank = is_main_process()  # under torchrun only rank 0 prints
    with make_progress(progress_mode, quiet=quiet or not main_rank) as progress:
        callbacks = [progress.callbacks(), *([faults] if faults is not None else [])]
        summary = run_training(cfg, run_dir, resume=resume, overwrite=overwrite, callbacks=callbacks)
        progress.finish(summary)
    if not main_rank:
        return
    warning = link_latest(run_dir)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if json_out:
        print_json(summary)
    elif not quiet:
        from sparsekit.cli.render import summary_table

        stderr_console().print(summary_table(summary))
        print(f"run directory: {run_dir}", file=sys.stderr)
