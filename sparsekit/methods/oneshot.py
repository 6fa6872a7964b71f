"""One-shot methods: the mask is chosen before step 1 and never changes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sparsekit.errors import InputError
from sparsekit.methods.base import InitInputs, Method, register_method
from sparsekit.selection import select_top

if TYPE_CHECKING:
    from sparsekit.masks import SparseLayer
    from sparsekit.sparsifier import Sparsifier


@register_method
class Static(Method):
    """A mask from the distribution, fixed for the whole run: random, or the largest |w| of loaded weights
    (one-shot magnitude pruning, then fine-tuning)."""

    name = "static"
    description = "Static: a random mask from the distribution (largest |w| of loaded weights), never changed"
    family = "one-shot"
    reference = "Evci et al. 2020 (baseline)"
    paper_recipe: ClassVar[dict[str, Any]] = {"distribution": "erk", "optimizer": "sgd", "momentum": 0.9}


SNIP_SCOPES = ("layer", "global")


@register_method
class SNIP(Method):
    """SNIP (Lee et al. 2019): keep the connections with the largest |g ⊙ w| at initialisation, then static.

    g is the gradient of the loss accumulated over ``snip_batches`` mini-batches (the first batches of
    epoch 0's shuffle). ``snip_scope="layer"`` keeps each layer's planned count (per-layer invariant);
    ``"global"`` ranks all prunable weights together (global count invariant) after first reserving,
    in every layer, its best ``min(out units, planned count)`` connections so no layer can empty out.
    """

    name = "snip"
    description = "SNIP: |grad ⊙ w| saliency at init (per layer or global), then static (Lee et al. 2019)"
    family = "one-shot"
    reference = "Lee et al., SNIP: Single-shot Network Pruning based on Connection Sensitivity, ICLR 2019"
    defaults: ClassVar[dict[str, Any]] = {"snip_batches": 1, "snip_scope": "layer"}
    paper_recipe: ClassVar[dict[str, Any]] = {"snip_batches": 1, "snip_scope": "layer", "distribution": "erk",
                                              "optimizer": "sgd", "momentum": 0.9}
    needs_init_batches = True
    own_start_mask = "saliency"  # of the weights it is given: loaded ones are scored as they are

    def validate(self) -> None:
        n = self.options["snip_batches"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"snip batches must be a positive integer, got {n!r}", where="--snip-batches",
                             fix="e.g. --snip-batches 1")
        if self.options["snip_scope"] not in SNIP_SCOPES:
            raise InputError(f"unknown SNIP scope {self.options['snip_scope']!r}", where="--snip-scope",
                             fix="use 'layer' (counts from the distribution) or 'global'")

    def init_batch_count(self) -> int:
        return int(self.options["snip_batches"])

    def saliency(self, layers: list[SparseLayer], init: InitInputs) -> dict[str, torch.Tensor]:
        """|g ⊙ w| per layer (flat), g accumulated over the init batches; leaves the model untouched."""
        if init.batches is None or init.loss_fn is None:
            raise InputError("SNIP needs mini-batches and a loss at initialisation", where="sparsify()",
                             fix="pass init_batches=[(x, y), ...] and loss_fn=... to sparsify()")
        model = init.model
        params = [p for p in model.parameters()]
        saved_grads = [p.grad for p in params]
        saved_buffers = {k: v.clone() for k, v in model.named_buffers()}
        for p in params:
            p.grad = None
        n = 0
        for x, y in init.batches:
            if n >= self.init_batch_count():
                break
            init.loss_fn(model(x), y).backward()
            n += 1
        if n == 0:
            raise InputError("SNIP got no mini-batches at initialisation", where="--snip-batches",
                             fix="use a dataset with at least one training batch")
        scores = {}
        for ly in layers:
            g = ly.param.grad if ly.param.grad is not None else torch.zeros_like(ly.param)
            scores[ly.name] = (g.detach() * ly.param.detach()).abs().flatten()
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
        with torch.no_grad():  # BatchNorm running statistics moved during scoring: put them back
            for k, buf in model.named_buffers():
                buf.copy_(saved_buffers[k])
        return scores

    def initial_masks(self, sp: Sparsifier, init: InitInputs) -> dict[str, torch.Tensor]:
        scores = self.saliency(sp.layers, init)
        if sp.granularity.structured:  # saliency summed per block, or the top of every N:M group / row
            from sparsekit.granular_select import structured_top

            return {ly.name: structured_top(sp.granularity, ly.plan.shape, scores[ly.name], ly.plan.active,
                                            seed=sp.seed, step=0, layer=ly.index).to(ly.param.device)
                    for ly in sp.layers}
        if self.options["snip_scope"] == "layer":
            return {ly.name: self._top(ly, scores[ly.name], ly.plan.active, sp.seed) for ly in sp.layers}
        return self._global(sp.layers, scores, sp.seed)

    @staticmethod
    def _top(ly: SparseLayer, score: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        mask = torch.zeros(ly.numel, dtype=torch.bool, device=score.device)
        everything = torch.ones_like(mask)
        mask[select_top(score, everything, k, largest=True, seed=seed, step=0, layer=ly.index)] = True
        return mask.view(ly.plan.shape)

    def _global(self, layers: list[SparseLayer], scores: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        total = sum(ly.plan.active for ly in layers)
        # Guard against empty layers: each layer first keeps its best min(out units, planned) entries.
        reserved = []
        for ly in layers:
            floor = min(ly.numel, int(ly.param.shape[0]), ly.plan.active)
            reserved.append(self._top(ly, scores[ly.name], floor, seed).flatten())
        device = scores[layers[0].name].device
        flat_scores = torch.cat([scores[ly.name].to(device) for ly in layers])
        taken = torch.cat([r.to(device) for r in reserved])
        rest = total - int(taken.sum())
        chosen = taken.clone()
        if rest > 0:
            chosen[select_top(flat_scores, ~taken, rest, largest=True, seed=seed, step=0,
                              layer=len(layers))] = True
        out, offset = {}, 0
        for ly in layers:
            out[ly.name] = chosen[offset:offset + ly.numel].view(ly.plan.shape)
            offset += ly.numel
        return out
