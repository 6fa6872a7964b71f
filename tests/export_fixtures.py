"""Fabricate run dirs the way the trainer writes them (the run-dir contract), for export/report tests.

``make_run_dir`` takes a torch model and boolean masks, squashes the masks into the weights, and writes
summary.json, config.json, model.onnx (via ``export_dense_onnx``), masks.safetensors,
weights.safetensors and samples.npz — nothing else, so export must work from these files alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from sparsekit.onnx_export import export_dense_onnx


class MLP(nn.Module):
    def __init__(self, n_in: int = 64, hidden: tuple[int, ...] = (32, 16), n_out: int = 10,
                 flatten: bool = True) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Flatten()] if flatten else []
        prev = n_in
        for h in hidden:
            mods += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        mods.append(nn.Linear(prev, n_out))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def random_masks(model: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() >= 2:
            masks[name] = torch.rand(p.shape, generator=g) < density
    return masks


def make_run_dir(run_dir: Path, model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor | None = None, *, method: str = "rigl", target_sparsity: float = 0.9,
                 train_labels_from_model: bool = True, flops: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, m in masks.items():
            params[name].mul_(m.to(params[name].dtype))
        logits = model(x)
    if y is None:
        # labels that the model gets mostly right, so accuracies are meaningful
        y = logits.argmax(1)
        if not train_labels_from_model:
            y = torch.randint(0, logits.shape[1], (x.shape[0],))
    layers = []
    total = prunable = nonzero = active_total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        nonzero += int((p != 0).sum())
        if name in masks:
            active = int(masks[name].sum())
            prunable += p.numel()
            active_total += active
            layers.append({"name": name, "shape": list(p.shape), "prunable": True,
                           "planned_density": active / p.numel(), "density": active / p.numel(),
                           "active": active})
    acc = float((logits.argmax(1) == y).float().mean())
    summary = {
        "schema_version": 1, "task": "classification", "method": method, "distribution": "uniform",
        "target_sparsity": target_sparsity, "realized_sparsity": 1 - active_total / max(prunable, 1),
        "overall_sparsity": 1 - nonzero / total, "layers": layers,
        "params": {"total": total, "prunable": prunable, "nonzero": nonzero},
        "test_accuracy": acc, "test_loss": 0.5, "train_seconds": 1.0, "run_dir": str(run_dir),
    }
    if flops is not None:
        summary["flops"] = flops
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "config.json").write_text(json.dumps({"method": method, "seed": 0}))
    export_dense_onnx(model, x[:2], run_dir / "model.onnx",
                      metadata={"sparsekit_method": method, "source_run": str(run_dir)})
    save_file({k: v.contiguous() for k, v in masks.items()}, str(run_dir / "masks.safetensors"))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(run_dir / "weights.safetensors"))
    np.savez(run_dir / "samples.npz", x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64),
             logits=logits.numpy().astype(np.float32))
    return run_dir


def dead_unit_mlp(seed: int = 0) -> tuple[MLP, dict[str, torch.Tensor]]:
    """An 8x8-input MLP with dead inputs, a hidden unit with no inputs but a nonzero bias (must be
    folded), a unit with no outgoing weights, and an otherwise random 60% sparse mask."""
    torch.manual_seed(seed)
    model = MLP(64, (32, 16), 10)
    masks = random_masks(model, 0.4, seed)
    w1, w2, w3 = "net.1.weight", "net.3.weight", "net.5.weight"
    masks[w1][:, :20] = False          # inputs 0..19 lose every connection
    masks[w1][3, :] = False            # hidden unit 3 has no inputs ...
    masks[w2][:, 3] = True             # ... but feeds forward: relu(bias) must be folded
    masks[w2][:, 5] = False            # hidden unit 5 has no outgoing weights
    masks[w2][7, :] = False            # second-layer unit 7: no inputs, bias folded into the output
    masks[w3][:, 7] = True
    with torch.no_grad():
        model.net[1].bias[3] = 0.75    # positive, so relu(bias) != 0
        model.net[3].bias[7] = 0.5
    return model, masks


def scripted_speed(speedups: dict[str, float | dict[int, float]] | None = None):
    """A stand-in for ``exporters.int8.speedups_vs_dense`` that times nothing: each int8 candidate runs at
    the speedup given for it (one number, or per batch size), 1.0 (as fast as dense) by default."""
    from sparsekit.exporters.speed import speed_record

    table = speedups or {}

    def fake(_dense, cands, inputs, **_kw):
        def at(k: str, b: int) -> float:
            v = table.get(k, 1.0)
            return v.get(b, 1.0) if isinstance(v, dict) else v

        return {k: [speed_record(b, 1, at(k, b)) for b in inputs] for k in cands}

    return fake
