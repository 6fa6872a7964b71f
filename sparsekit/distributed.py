"""Data parallelism under ``torchrun``: the process group, the per-rank share of each batch, and the
few collectives the training loop needs so that every rank makes the same decisions.

``torchrun --nproc_per_node=N -m sparsekit train ...`` starts N copies of the same command with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set. ``setup()`` reads them,
initialises torch.distributed (gloo on CPU, nccl on CUDA, an explicit timeout so that a lost rank
fails the job in bounded time instead of gloo's 30 minutes) and returns a ``DistContext``.

Why the loop stays identical on every rank:

* every step consumes one *global* batch (``--batch-size`` samples of the (seed, epoch) shuffle);
  rank r trains on its contiguous share of it (``local_slice``), so all ranks take the same number of
  steps with no padding and no dropped samples;
* each rank weights its loss by its share (``loss_weight``), so DDP's average of the gradients is
  exactly the gradient of the global batch's mean loss (as in one process, up to summation order);
* decisions that depend on data (non-finite loss, a signal to stop) are all-reduced first
  (``reduce_step_stats``), and errors of rank-0-only I/O are broadcast (``on_main``), so no rank is
  left waiting in a collective while another has given up;
* mask updates read ``param.grad`` after DDP's all-reduce and break ties by (seed, step, layer,
  element) keys, so they agree; with ``SPARSEKIT_DEBUG_MASKS=1`` this is verified after every update
  by an all-gather of mask checksums (``verify_same``).

Nothing here pickles: objects crossing ranks are JSON encoded into uint8 tensors.
"""

from __future__ import annotations

import datetime
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from sparsekit.errors import InputError, SparsekitError, TrainingError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 300.0
DEBUG_MASKS_ENV = "SPARSEKIT_DEBUG_MASKS"


@dataclass
class DistContext:
    """Where this process sits in the job. ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def comm_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torch.distributed job (for printing in the CLI)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def setup(device_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the job described by torchrun's environment (or reuse a process group the caller made).

    Returns a single-process context when ``WORLD_SIZE`` is unset or 1 and no group exists.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        return DistContext(rank, world, local, backend, device)
    world = env_world_size()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed", where="torchrun",
                         fix="install a torch build with distributed support, or run without torchrun")
    try:
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise InputError("WORLD_SIZE is set but RANK is missing or not an integer", where="environment",
                         fix="launch with torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE") from exc
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise InputError("CUDA was requested but no CUDA device is available", where="--device",
                             fix="use --device cpu or --device auto")
        if local >= torch.cuda.device_count():
            raise InputError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible)",
                             where="torchrun --nproc_per_node",
                             fix="start at most one process per GPU, or use --device cpu")
        torch.cuda.set_device(local)
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=float(timeout_s))
    try:
        dist.init_process_group(backend=backend, timeout=timeout, store=_store(rank, world, timeout),
                                rank=rank, world_size=world)
    except Exception as exc:  # rendezvous failures come as several exception types
        raise TrainingError(f"could not join the distributed job as rank {rank} of {world} "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                            where=f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} "
                                  f"MASTER_PORT={os.environ.get('MASTER_PORT')}",
                            fix="check that every node runs the same torchrun command and can reach the "
                                "master address") from exc
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistContext(rank, world, local, backend, device)


def _store(rank: int, world: int, timeout: datetime.timedelta) -> Any:
    """The rendezvous store, with keys prefixed by torchrun's restart count.

    torchrun's agent keeps one store for all attempts; with the plain ``env://`` init a restarted
    worker reads the previous attempt's (dead) peer addresses and gloo fails to connect. A fresh
    prefix per attempt makes ``--max-restarts`` work.
    """
    import torch.distributed as dist

    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as exc:
        raise InputError("WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are missing", where="environment",
                         fix="launch with torchrun, which sets them") from exc
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(host, port, world_size=None if agent else world, is_master=(rank == 0 and not agent),
                          timeout=timeout, wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"sparsekit/attempt{attempt}/", store)


def teardown(ctx: DistContext, *, created: bool) -> None:
    import torch.distributed as dist

    if created and ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def local_slice(n: int, ctx: DistContext) -> slice:
    """Rank ``ctx.rank``'s contiguous share of a global batch of ``n`` samples (sizes differ by <= 1;
    a share may be empty when ``n < world_size``, e.g. a short last batch)."""
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (1 if ctx.rank < extra else 0))


def loss_weight(n_local: int, n_global: int, ctx: DistContext) -> float:
    """Factor on the local mean loss so that DDP's gradient average equals the global-batch mean:
    mean_local * n_local * W / n_global, averaged over W ranks, is sum_all / n_global."""
    return n_local * ctx.world_size / max(n_global, 1)


def _collective_error(exc: BaseException, what: str) -> TrainingError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return TrainingError(f"lost contact with another rank during {what} ({first[:300]})", where="torch.distributed",
                         fix="check the other ranks' output for the first error; rerun the same command with "
                             "--resume to continue from the last checkpoint")


def guard(what: str) -> Any:
    """Context manager turning a failed collective (dead or stuck rank, timeout) into a TrainingError."""
    import contextlib

    @contextlib.contextmanager
    def _cm() -> Any:
        try:
            yield
        except SparsekitError:
            raise
        except (RuntimeError, OSError) as exc:
            raise _collective_error(exc, what) from exc

    return _cm()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few numbers over ranks (float64); identity in one process."""
    if not ctx.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=ctx.comm_device())
    with guard("a step's all-reduce"):
        dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_json(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s JSON-able ``obj`` on every rank (length, then UTF-8 bytes; no pickle)."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    dev = ctx.comm_device()
    payload = json.dumps(obj).encode() if ctx.rank == src else b""
    n = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    with guard("a broadcast from rank 0"):
        dist.broadcast(n, src=src)
        buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=dev)
        if ctx.rank == src:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(buf, src=src)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def _encode_error(exc: SparsekitError) -> dict[str, Any]:
    return {"kind": type(exc).__name__, "what": exc.what, "where": exc.where, "fix": exc.fix}


def _decode_error(d: dict[str, Any]) -> SparsekitError:
    import sparsekit.errors as errors

    cls = getattr(errors, d.get("kind", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, SparsekitError)):
        cls = TrainingError
    return cls(d["what"], where=d.get("where"), fix=d.get("fix"))


def on_main(fn: Callable[[], T], ctx: DistContext) -> T | None:
    """Run ``fn`` on rank 0 only (file I/O); every rank raises the same error if it failed there.

    Returns ``fn()``'s result on rank 0 and None elsewhere. Unexpected exceptions on rank 0 are
    reported to the others as a TrainingError and re-raised unchanged on rank 0.
    """
    if not ctx.enabled:
        return fn()
    result: T | None = None
    status: dict[str, Any] = {"ok": True}
    pending: BaseException | None = None
    if ctx.is_main:
        try:
            result = fn()
        except SparsekitError as exc:
            status, pending = {"ok": False, "error": _encode_error(exc)}, exc
        except Exception as exc:
            status = {"ok": False, "error": {"kind": "TrainingError",
                                             "what": f"rank 0 failed: {type(exc).__name__}: {exc}"[:500],
                                             "where": "rank 0", "fix": "see rank 0's error"}}
            pending = exc
    status = broadcast_json(status, ctx)
    if not status["ok"]:
        if pending is not None:
            raise pending
        raise _decode_error(status["error"])
    return result


def checksum(tensor: torch.Tensor) -> int:
    """CRC32 of a tensor's bytes (CPU copy): equal tensors, equal checksums."""
    t = tensor.detach().contiguous().cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return zlib.crc32(t.view(torch.uint8).numpy().tobytes()) if t.numel() else 0


def debug_masks_enabled() -> bool:
    return os.environ.get(DEBUG_MASKS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def verify_same(tensors: dict[str, torch.Tensor], ctx: DistContext, *, what: str, step: int) -> None:
    """All-gather per-tensor checksums; raise TrainingError naming the first tensor that differs."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    names = sorted(tensors)
    local = torch.tensor([checksum(tensors[n]) for n in names] or [0], dtype=torch.int64,
                         device=ctx.comm_device())
    gathered = [torch.zeros_like(local) for _ in range(ctx.world_size)]
    with guard(f"the {what} check"):
        dist.all_gather(gathered, local)
    ref = gathered[0].cpu()
    for r, g in enumerate(gathered[1:], start=1):
        diff = (g.cpu() != ref).nonzero()
        if len(diff):
            name = names[int(diff[0])] if names else "?"
            raise TrainingError(f"{what} differ between rank 0 and rank {r} after step {step} ({name})",
                                where="torch.distributed",
                                fix="this is a bug in sparsekit (every rank must make the same update); "
                                    "please report it with the command")
