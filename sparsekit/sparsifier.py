"""The sparsifier: the public engine every training loop (ours and users') drives.

    sp = sparsekit.sparsify(model, optimizer, method="rigl", sparsity=0.9, total_steps=...)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        sp.step()                 # mask update when due, then optimizer.step() (or skipped)
        optimizer.zero_grad()

Frameworks that call ``optimizer.step()`` themselves use ``pre_step()`` (returns whether to take the
optimizer step) and ``post_step()`` around it. The engine keeps masked weights, their gradients and
optimizer state at exactly zero, does the reproducible top-k of every update, and records compact
connectivity snapshots for plots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsekit.distributions import LayerPlan, plan_layers
from sparsekit.errors import InputError
from sparsekit.granular_select import ablate_rows, drop_to_targets, random_scores, structured_top
from sparsekit.granular_select import drop_and_grow as granular_drop_and_grow
from sparsekit.granularity import Granularity, check_method
from sparsekit.masks import (
    SparseLayer,
    commit_mask,
    commit_mask_change,
    gate_block_shapes,
    prunable_weights,
    random_mask,
    unwrap_model,
)
from sparsekit.methods import Method, make_method
from sparsekit.methods.base import InitInputs, LossFn, Scores
from sparsekit.selection import select_top
from sparsekit.settings import SparsitySettings

# Optimizers for which zero gradient + zero state provably keeps a zero weight at exactly zero
# (also with weight decay): for these the weights need no re-masking after each step.
_ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class Sparsifier:
    """Masks, method and step counter for one model/optimizer pair.

    ``settings`` (a ``SparsitySettings``) says how sparse, where and for how long (``sparsify`` builds it
    from keywords). ``init_batches`` and ``loss_fn`` go to the method's ``initial_masks`` (SNIP scores them)
    and are not kept, and so do ``source_masks``: the masks loaded weights were trained under (a sparse
    run directory's), whose active connections rank first in a magnitude start mask.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        method: Method,
        settings: SparsitySettings,
        *,
        init_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
        loss_fn: LossFn | None = None,
        source_masks: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.settings = settings
        #: the masks' structure (unstructured, N:M, RxC blocks, fan-in); the unstructured path is the engine's own
        self.granularity = Granularity.parse(settings.granularity)
        check_method(self.granularity, method, method.options)
        #: the step-0 mask: magnitude | random, or the method's own (saliency, dense); None when dense
        self.start_mask = method.start_mask(settings.init_mask, pretrained=settings.pretrained)
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.method = method
        self.seed = int(settings.seed)  # the tie-break key stream; a loaded checkpoint continues its own
        self.step_count = 0  # optimizer iterations done (t of the last completed step)
        self.update_log: list[dict[str, Any]] = []  # drained by the trainer (connectivity snapshots)
        self.metrics_log: list[dict[str, Any]] = []  # users' log() records, written by sparsekit.save
        self.on_update: list[Callable[[Sparsifier, int], None]] = []
        # Pending drop_and_grow results (new mask, old mask, dropped, grown) and the first layer's
        # per-input connection counts, both kept so that commit_masks touches only changed entries.
        self._changes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._fanout: np.ndarray | None = None
        self.plans, candidates = self._plan(settings)
        self.layers: list[SparseLayer] = []
        for plan in self.plans:
            if plan.prunable:
                param = candidates[plan.name]
                full = torch.ones(plan.shape, dtype=torch.bool, device=param.device)
                self.layers.append(SparseLayer(len(self.layers), plan.name, param, full, plan))
        self._remask_weights = optimizer is not None and type(optimizer) not in _ZERO_PRESERVING
        method.attach(self)
        masks = method.initial_masks(self, InitInputs(self.model, init_batches, loss_fn, self.start_mask,
                                                      source_masks))
        if masks is None:
            masks = {ly.name: self.random_mask(ly) for ly in self.layers}
        masks = self._broadcast(masks)
        self._check_pattern(masks, where="initial_masks")
        for ly in self.layers:
            ly.mask = masks[ly.name].to(device=ly.param.device, dtype=torch.bool)
        self._refresh_float_masks()
        self.apply_masks()
        if settings.sparse_init == "scaled" and not settings.pretrained:  # loaded weights stay as they are
            self.rescale_initial_weights()
        self._record_update(0, fraction=None)

    def _plan(self, settings: SparsitySettings) -> tuple[list[LayerPlan], dict[str, nn.Parameter]]:
        """Per-layer plans (all dense for dense methods) and the candidate weights by name."""
        candidates = prunable_weights(self.model, exclude=settings.exclude,
                                      include_embeddings=settings.include_embeddings)
        shapes = {n: tuple(p.shape) for n, p in candidates.items()}
        if not self.method.sparse:
            return [LayerPlan(n, s, False, 1.0, int(torch.Size(s).numel())) for n, s in shapes.items()], candidates
        gran = self.granularity
        for pattern, density in (settings.layer_density or {}).items():
            if gran.kind == "nm" and density < 1.0 and abs(density * gran.m - gran.n) > 1e-9:
                raise InputError(f"--layer-density {pattern}={density:g} disagrees with granularity {gran.spec}, "
                                 f"which fixes every sparse layer's density at {gran.n}/{gran.m}",
                                 where="--layer-density", fix=f"give {pattern}=1 (dense) or drop it")
        units = {n: gran.unit(s) for n, s in shapes.items()} if gran.structured else None
        plans = plan_layers(shapes, settings.sparsity, settings.distribution or "erk",
                            dense_first_layer=settings.dense_first_layer, erk_power_scale=settings.erk_power_scale,
                            overrides=settings.layer_density, score_shapes=gate_block_shapes(self.model), units=units)
        for plan in plans:  # layers kept dense are not checked
            if plan.prunable:
                gran.check(plan.name, plan.shape)
        return plans, candidates

    def random_mask(self, layer: SparseLayer) -> torch.Tensor:
        """The random step-0 mask of a layer at its planned count, in the granularity's pattern."""
        plan, device = layer.plan, layer.param.device
        if not self.granularity.structured:
            return random_mask(plan.shape, plan.active, seed=self.seed, layer=layer.index, device=device)
        scores = random_scores(plan.numel, seed=self.seed, layer=layer.index)
        return structured_top(self.granularity, plan.shape, scores, plan.active, seed=self.seed, step=0,
                              layer=layer.index).to(device)

    def _check_pattern(self, masks: dict[str, torch.Tensor], *, where: str) -> None:
        """Every mask keeps the granularity's pattern (a method or checkpoint that breaks it is refused)."""
        if not self.granularity.structured:
            return
        for name, mask in masks.items():
            if not self.granularity.conforms(mask, any_count=True):
                raise InputError(f"mask {name} does not have the {self.granularity.spec} pattern", where=where,
                                 fix="resume or start with the granularity the masks were made with")

    @property
    def total_steps(self) -> int:
        return self.settings.total_steps

    @property
    def target_sparsity(self) -> float:
        return float(self.settings.sparsity)

    @property
    def distribution(self) -> str:
        return self.settings.distribution

    # -- masks ------------------------------------------------------------------------------------
    def _refresh_float_masks(self) -> None:
        self._fmasks = [ly.mask.to(ly.param.dtype) for ly in self.layers]
        self._fanout = None  # masks may have been replaced: recount on the next record
        self._active_total = sum(ly.active for ly in self.layers)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero inactive weights and optimizer state (idempotent)."""
        if not self.layers:
            return
        torch._foreach_mul_([ly.param.data for ly in self.layers], self._fmasks)
        if self.optimizer is not None:
            for ly, fm in zip(self.layers, self._fmasks, strict=True):
                for name, state in self.optimizer.state.get(ly.param, {}).items():
                    if isinstance(state, torch.Tensor) and state.shape == ly.param.shape and name != "step":
                        state.mul_(fm)

    @torch.no_grad()
    def rescale_initial_weights(self) -> None:
        """Sparse-aware init: scale each output unit's weights by sqrt(dense fan-in / active fan-in), so a
        unit's pre-activation variance matches the dense init (Evci et al. 2022, "Gradient flow in sparse
        neural networks"). Without it a 98%-sparse layer starts with ~7x smaller activations."""
        for ly in self.layers:
            if ly.param.dim() < 2:
                continue
            rows = ly.mask.flatten(1)
            fan_in = rows.shape[1]
            active = rows.sum(dim=1).clamp(min=1).to(ly.param.dtype)
            scale = (fan_in / active).sqrt().view(-1, *([1] * (ly.param.dim() - 1)))
            ly.param.mul_(scale)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        grads, masks = [], []
        for ly, fm in zip(self.layers, self._fmasks, strict=True):
            if ly.param.grad is not None:
                grads.append(ly.param.grad)
                masks.append(fm)
        if grads:
            torch._foreach_mul_(grads, masks)

    def masks(self) -> dict[str, torch.Tensor]:
        return {ly.name: ly.mask for ly in self.layers}

    def _update_masks(self, step: int) -> None:
        """One mask update: the method says how many connections each layer drops and grows and by which
        scores (``Method.update_counts``, ``drop_scores``, ``grow_scores``); the engine selects and commits."""
        counts = self.method.update_counts(self, step)
        new_masks = {}
        for layer in self.layers:
            change = counts.get(layer.name)
            if change is None:
                continue
            drop = self.method.drop_scores(self, layer, step) if change.k_drop > 0 else None
            grow = self.method.grow_scores(self, layer, step) if change.k_grow > 0 else None
            new_masks[layer.name] = self.drop_and_grow(layer, step, k_drop=change.k_drop, k_grow=change.k_grow,
                                                       drop_scores=drop, grow_scores=grow)
        self.commit_masks(new_masks, step)

    def drop_and_grow(self, layer: SparseLayer, step: int, *, k_drop: int, k_grow: int,
                      drop_scores: Scores | None, grow_scores: Scores | None) -> torch.Tensor:
        """The new mask of one layer: drop the ``k_drop`` active connections with the lowest drop score,
        then grow the ``k_grow`` highest-scoring connections among all inactive after the drop (a
        just-dropped connection may come back). Ties broken by (seed, step, layer, element) keys.
        ``Magnitude(t)`` scores rank by |t| without materialising it; a score may be None when its
        count is 0. A structured granularity selects by groups (``sparsekit.granular_select.drop_and_grow``)."""
        if self.granularity.structured:
            return self._structured_drop_and_grow(layer, step, k_drop, k_grow, drop_scores, grow_scores)
        flat = layer.mask.reshape(-1)
        new = flat.clone()
        empty = torch.empty(0, dtype=torch.long, device=flat.device)
        dropped = grown = empty
        if k_drop > 0:
            assert drop_scores is not None
            dropped = select_top(drop_scores, flat, k_drop, largest=False, seed=self.seed, step=step,
                                 layer=layer.index)
            new[dropped] = False
        if k_grow > 0:
            assert grow_scores is not None
            grown = select_top(grow_scores, ~new, k_grow, largest=True, seed=self.seed, step=step,
                               layer=layer.index)
            new[grown] = True
        out = new.view_as(layer.mask)
        # commit_masks uses the indices instead of whole-tensor passes when handed this very tensor.
        self._changes[layer.name] = (out, layer.mask, dropped, grown)
        return out

    def _structured_drop_and_grow(self, layer: SparseLayer, step: int, k_drop: int, k_grow: int,
                                  drop_scores: Scores | None, grow_scores: Scores | None) -> torch.Tensor:
        gran, keys = self.granularity, {"seed": self.seed, "step": step, "layer": layer.index}
        mask = layer.mask
        if gran.ablate is not None and k_drop == k_grow > 0:
            assert drop_scores is not None and grow_scores is not None
            mask, target = ablate_rows(gran, mask, k_drop, drop_scores, grow_scores, **keys)
            new = drop_to_targets(gran, mask, target, k_drop, drop_scores, grow_scores, **keys)
        else:
            new = granular_drop_and_grow(gran, mask, k_drop=k_drop, k_grow=k_grow, drop=drop_scores,
                                         grow=grow_scores, **keys)
        return new.to(layer.mask.device)

    def commit_masks(self, new_masks: dict[str, torch.Tensor], step: int, *, fraction: float | None = None) -> None:
        """Install new masks: reset weights/optimizer state of new and dropped connections, log."""
        changes, self._changes = self._changes, {}
        fanout_delta: tuple[torch.Tensor, torch.Tensor] | None = None
        full = False
        for i, ly in enumerate(self.layers):
            if ly.name not in new_masks:
                continue
            mask = new_masks[ly.name]
            change = changes.get(ly.name)
            if change is not None and change[0] is mask and change[1] is ly.mask:
                _, old, dropped, grown = change
                old_flat, new_flat = old.reshape(-1), mask.reshape(-1)
                gone = dropped[~new_flat[dropped]] if dropped.numel() else dropped
                added = grown[~old_flat[grown]] if grown.numel() else grown
                commit_mask_change(ly, mask, gone, added, self.optimizer, self._fmasks[i])
                if i == 0:
                    fanout_delta = (gone, added)
            else:
                commit_mask(ly, mask.to(torch.bool), self.optimizer)
                full = True
        if full:
            self._refresh_float_masks()
        else:
            self._active_total = sum(ly.active for ly in self.layers)
        self._record_update(step, fraction=fraction, fanout_delta=None if full else fanout_delta)
        for cb in self.on_update:
            cb(self, step)

    def _record_update(self, step: int, fraction: float | None,
                       fanout_delta: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        entry: dict[str, Any] = {"step": step, "active": {ly.name: ly.active for ly in self.layers}}
        if self.layers:
            first = self.layers[0]
            # Outgoing connection count of every input feature of the first sparse layer.
            shape = tuple(first.mask.shape)
            if len(shape) > 1:
                entry["first_layer"] = first.name
                if fanout_delta is not None and self._fanout is not None:
                    # Kept up to date from the changed entries: input feature of flat index i.
                    inner = int(np.prod(shape[2:], dtype=np.int64))
                    for idx, sign in ((fanout_delta[0], -1), (fanout_delta[1], 1)):
                        if idx.numel():
                            cols = (idx.cpu().numpy() // inner) % shape[1]
                            self._fanout += sign * np.bincount(cols, minlength=shape[1])
                else:
                    reduce = tuple(d for d in range(len(shape)) if d != 1)
                    mask = first.mask.cpu().numpy()  # numpy sums bools far faster than torch on CPU
                    self._fanout = mask.sum(axis=reduce, dtype=np.int64)
                entry["input_fanout"] = self._fanout.tolist()
        self.update_log.append(entry)

    def _broadcast(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Under torch.distributed, every rank takes rank 0's masks."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return masks
        out = {}
        for name, m in masks.items():
            t = m.to(torch.uint8).to(self._comm_device())
            dist.broadcast(t, src=0)
            out[name] = t.to(torch.bool)
        return out

    @staticmethod
    def _comm_device() -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")

    # -- the step ---------------------------------------------------------------------------------
    def pre_step(self) -> bool:
        """Call after ``backward()`` and before ``optimizer.step()``; returns whether to take that step.
        Reads dense gradients for the method, then zeroes gradients of inactive weights (clip after this)."""
        t = self.step_count + 1
        self.method.before_optimizer_step(self, t)
        self.mask_gradients()
        return not self.method.skip_optimizer_step(self, t)

    def post_step(self) -> None:
        """Call after ``optimizer.step()`` (or after skipping it): re-applies masks, updates them when due."""
        self.step_count += 1
        if self._remask_weights:
            self.apply_masks()
        self.method.after_optimizer_step(self, self.step_count)
        if self.method.is_update_step(self.step_count):
            self._update_masks(self.step_count)

    def step(self, closure: Callable[[], Any] | None = None) -> bool:
        """``pre_step()``, ``optimizer.step()`` unless the method skips it, ``post_step()``.
        Returns whether the optimizer step was taken."""
        take = self.pre_step()
        if take and self.optimizer is not None:
            self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.post_step()
        return take

    def hook_optimizer(self) -> list[Any]:
        """For frameworks that call ``optimizer.step()`` themselves (Lightning's automatic optimisation,
        Hugging Face Trainer, ``GradScaler.step``): run ``pre_step``/``post_step`` from optimizer hooks.

        When the method skips the optimizer step (RigL on update steps), the pre-hook snapshots the
        parameters and optimizer state and the post-hook restores them, so the step has no effect.
        A step that the framework itself skips (AMP overflow) fires no hook and is not counted.
        Returns the hook handles (``.remove()`` them to detach).
        """
        if self.optimizer is None:
            raise InputError("hook_optimizer() needs the optimizer given to sparsify()", where="sparsify()",
                             fix="pass the optimizer to sparsify(model, optimizer, ...)")
        snapshot: dict[str, Any] = {}

        def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            snapshot.clear()
            if not self.pre_step():
                params = [p for g in opt.param_groups for p in g["params"]]
                snapshot["params"] = [p.detach().clone() for p in params]
                snapshot["state"] = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                             for k, v in opt.state[p].items()} for p in params if p in opt.state}
                snapshot["had_state"] = {id(p) for p in params if p in opt.state}

        @torch.no_grad()
        def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if snapshot:
                params = [p for g in opt.param_groups for p in g["params"]]
                for p, old in zip(params, snapshot["params"], strict=True):
                    p.copy_(old)
                    if id(p) in snapshot["had_state"]:
                        opt.state[p] = snapshot["state"][id(p)]
                    else:
                        opt.state.pop(p, None)
                snapshot.clear()
            self.post_step()

        return [self.optimizer.register_step_pre_hook(pre), self.optimizer.register_step_post_hook(post)]

    def is_update_step(self, step: int | None = None) -> bool:
        return self.method.is_update_step(self.step_count + 1 if step is None else step)

    # -- reporting ------------------------------------------------------------------------------
    def layer_summary(self) -> list[dict[str, Any]]:
        by_name = {ly.name: ly for ly in self.layers}
        out = []
        for plan in self.plans:
            ly = by_name.get(plan.name)
            active = ly.active if ly is not None else plan.active
            numel = int(torch.Size(plan.shape).numel())
            entry = {"name": plan.name, "shape": list(plan.shape), "prunable": plan.prunable,
                     "planned_density": plan.density, "planned_active": plan.active,
                     "density": active / numel, "active": active, "numel": numel}
            if ly is not None and self.granularity.structured:
                entry.update(self.granularity.summary(ly.mask))
            out.append(entry)
        return out

    def start_summary(self) -> dict[str, Any]:
        """How the run started, for ``summary.json``: fresh or loaded weights (the trainer adds the file it
        loaded), the step-0 mask, and whether the initial weights were rescaled."""
        fresh = not self.settings.pretrained
        return {"from": None, "kind": "fresh" if fresh else "pretrained", "init_mask": self.start_mask,
                "rescaled": fresh and bool(self.layers) and self.settings.sparse_init == "scaled"}

    def realized_sparsity(self) -> float:
        """1 - active / size over the prunable set, from the masks (a weight can be 0 and active)."""
        size = sum(ly.numel for ly in self.layers)
        return 0.0 if size == 0 else 1.0 - self._active_total / size

    def log(self, step: int | None = None, **metrics: Any) -> dict[str, Any]:
        """Record metrics of your own loop (e.g. ``epoch=, train_loss=, test_loss=, test_accuracy=, lr=``) for
        ``sparsekit.save``: they become metrics.jsonl (``sparsekit viz`` draws the curves) and the summary's
        test metrics, as in a CLI run. ``step`` defaults to the steps taken; the realised sparsity is added. The
        records stay in memory (``metrics_log``) until ``save``; ``state_dict`` does not hold them."""
        from sparsekit.run_writer import metrics_record

        record = metrics_record(self, step, metrics)
        self.metrics_log.append(record)
        return record

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "seed": self.seed,
            "masks": {ly.name: ly.mask.clone() for ly in self.layers},
            "method": self.method.state_dict(),
            "method_extra": self.method.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {ly.name for ly in self.layers}
        if set(state["masks"]) != names:
            raise InputError("checkpoint masks do not match this model's prunable layers",
                             where="checkpoint", fix="resume with the same model, method and distribution")
        for ly in self.layers:
            m = state["masks"][ly.name]
            if tuple(m.shape) != tuple(ly.mask.shape):
                raise InputError(f"checkpoint mask {ly.name} has shape {tuple(m.shape)}, model has "
                                 f"{tuple(ly.mask.shape)}", where="checkpoint",
                                 fix="resume with the same model")
            ly.mask = m.to(device=ly.param.device, dtype=torch.bool)
        self._check_pattern(self.masks(), where="checkpoint")
        self.step_count = int(state["step_count"])
        self.seed = int(state.get("seed", self.seed))  # tie-break keys continue the saved stream
        self.method.load_state_dict(state.get("method", {}))
        self.method.load_extra_state(state.get("method_extra", {}))
        self._refresh_float_masks()
        self.update_log.clear()


def sparsify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    method: str | Method = "rigl",
    *,
    sparsity: float | None = None,
    total_steps: int,
    distribution: str | None = None,
    seed: int = 0,
    dense_first_layer: bool | None = None,
    erk_power_scale: float = 1.0,
    layer_density: dict[str, float] | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    init_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: LossFn | None = None,
    sparse_init: str = "scaled",
    include_embeddings: bool = False,
    pretrained: bool = False,
    init_mask: str | None = None,
    granularity: str = "unstructured",
    **method_options: Any,
) -> Sparsifier:
    """Put ``model`` under a sparse-training ``method`` with a fixed parameter budget from step 0.

    ``method_options`` are the method's own knobs (e.g. ``update_interval=100, drop_fraction=0.3`` for
    RigL; see ``sparsekit methods NAME``). Call ``.step()`` in place of ``optimizer.step()``, or
    ``.pre_step()``/``.post_step()`` around it. ``layer_density`` maps fnmatch patterns of parameter
    names to fixed densities; ``exclude`` patterns keep weights dense; ``include_embeddings`` makes
    ``nn.Embedding`` tables prunable too (dense by default).

    ``pretrained=True`` when the model's weights were loaded (sparse fine-tuning of a dense or pretrained
    model): the kept weights are left exactly as loaded (``sparse_init`` rescales fresh weights only), and
    rigl, set, snfs and static start from the magnitude mask (the largest |w| per layer, at the
    distribution's counts). ``init_mask="random"`` or ``"magnitude"`` chooses that start mask explicitly
    (default: magnitude when pretrained, random otherwise); snip scores the weights it is given and
    pruning starts dense either way.

    ``sparsity`` defaults to 0.9 and ``distribution`` to ``"erk"``. ``granularity`` structures the masks:
    ``"unstructured"`` (default), ``"N:M"`` along the input dimension (e.g. ``"2:4"``; implies sparsity
    1 − N/M and a uniform distribution over every layer: ``dense_first_layer`` defaults to True only for the
    other granularities), ``"RxC"`` blocks (e.g. ``"4x1"``), ``"fanin"`` (every output unit
    keeps the same number of inputs) or ``"fanin+ablate[=γ]"`` (also neuron ablation); see
    docs/methods.md#granularity.
    """
    m = make_method(method, **method_options) if isinstance(method, str) else method
    if method_options and not isinstance(method, str):
        raise InputError("method options were given together with a Method instance", where="sparsify()",
                         fix="pass options to the Method constructor or pass the method by name")
    if dense_first_layer is None:
        dense_first_layer = not Granularity.parse(granularity).kind == "nm"
    settings = SparsitySettings(total_steps=total_steps, sparsity=sparsity, distribution=distribution, seed=seed,
                                dense_first_layer=dense_first_layer, erk_power_scale=erk_power_scale,
                                layer_density=layer_density, exclude=tuple(exclude), sparse_init=sparse_init,
                                include_embeddings=include_embeddings, pretrained=pretrained, init_mask=init_mask,
                                granularity=granularity)
    return Sparsifier(model, optimizer, m, settings, init_batches=init_batches, loss_fn=loss_fn)
