"""Data parallelism: 2 CPU processes (gloo) under torchrun agree with each other exactly and with one
process closely, for every method in the registry; the CLI runs under torchrun; a stuck rank fails the
job within the process-group timeout; torchrun's restarts continue from the checkpoint.

Why 2 ranks are not bit-identical to 1 process: the global batch's gradient is summed in a different
order (each rank reduces its half, then gloo adds the halves), so float32 results differ in the last
bits (measured: max |Δw| 6e-8 to 1.2e-7 after 32 steps of the tiny MLP below, per method; test loss
within 1e-7 relative). The tolerance is
``ATOL = 1e-5`` on weights and ``rel 1e-5`` on losses; masks are compared exactly (a mask could in
principle flip on a near-tie, which these tiny runs do not hit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsekit.config import TrainConfig
from sparsekit.methods import METHODS
from sparsekit.training import Callbacks, train

pytestmark = pytest.mark.slow

ATOL = 1e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
METHOD_OPTIONS = {
    "rigl": {"update_interval": 5}, "set": {"update_interval": 5}, "snfs": {"update_interval": 5},
    "pruning": {"prune_interval": 5},
}


def config_for(method: str, **kw) -> TrainConfig:
    base = dict(model="mlp", model_kwargs={"hidden": [32, 16]}, data="synthetic", method=method,
                method_options=dict(METHOD_OPTIONS.get(method, {})), sparsity=0.8, epochs=2, batch_size=32,
                seed=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SPARSEKIT_FAULT")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return e


WORKER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[1])
    from test_ddp import config_for
    from sparsekit.training import Callbacks, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = sys.argv[2]
    for method in sys.argv[3].split(","):
        def dump(info, method=method):
            sd = {"w/" + k: v.detach().clone() for k, v in info["model"].state_dict().items()}
            sd.update({"m/" + k: v.to(torch.uint8) for k, v in info["sparsifier"].masks().items()})
            save_file({k: v.contiguous() for k, v in sd.items()}, f"{out}/{method}.rank{info['rank']}.safetensors")
        train(config_for(method), f"{out}/{method}", callbacks=Callbacks(on_end=dump))
    dist.barrier()  # no rank leaves while another's last collective is in flight (gloo aborts at exit)
    dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> Path:
    """One 2-rank torchrun job (library API, debug mask checks on) training every registry method."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([*TORCHRUN, str(script), str(Path(__file__).parent), str(out), ",".join(sorted(METHODS))],
                          env=env(SPARSEKIT_DEBUG_MASKS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_ranks_agree_exactly_and_match_one_process_for_every_method(two_rank_runs, tmp_path):
    for method in sorted(METHODS):
        r0 = load_file(str(two_rank_runs / f"{method}.rank0.safetensors"))
        r1 = load_file(str(two_rank_runs / f"{method}.rank1.safetensors"))
        assert r0.keys() == r1.keys()
        for k in r0:  # parameters and masks bit-identical on both ranks
            if k.startswith("m/") or not k.endswith(("running_mean", "running_var")):
                assert torch.equal(r0[k], r1[k]), f"{method}: {k} differs between ranks"
        single: dict[str, torch.Tensor] = {}

        def keep(info, single=single):
            single.update({"w/" + k: v.detach().clone() for k, v in info["model"].state_dict().items()})
            single.update({"m/" + k: v.to(torch.uint8) for k, v in info["sparsifier"].masks().items()})

        one = train(config_for(method), tmp_path / f"single-{method}", callbacks=Callbacks(on_end=keep))
        assert single.keys() == r0.keys()
        for k in single:
            if k.startswith("m/"):
                assert torch.equal(single[k], r0[k]), f"{method}: mask {k} differs from 1 process"
            else:
                assert torch.allclose(single[k].float(), r0[k].float(), atol=ATOL, rtol=0), \
                    f"{method}: {k} max |Δ| {(single[k].float() - r0[k].float()).abs().max():.2e}"
        two = json.loads((two_rank_runs / method / "summary.json").read_text())
        assert two["world_size"] == 2 and two["steps"] == one["steps"]
        assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
        assert two["layers"] == one["layers"]


def _write_config(path: Path, **values) -> Path:
    path.write_text(json.dumps(values))
    return path


def test_cli_under_torchrun_survives_a_killed_rank_with_max_restarts(two_rank_runs, tmp_path):
    """Rank 1 is SIGKILLed at step 13 of the first attempt; torchrun restarts both ranks with the same
    command, --resume continues from the step-10 checkpoint, and the result equals the uninterrupted
    2-rank run of the fixture bit for bit."""
    args = ["-m", "sparsekit", "train", "--model", "mlp", "--model-kwargs", "hidden=32,16", "--data", "synthetic",
            "--method", "rigl", "--update-interval", "5", "--sparsity", "0.8", "--epochs", "2", "--batch-size",
            "32", "--device", "cpu", "--seed", "1", "--checkpoint-every", "5", "--resume", "-q"]
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run([*TORCHRUN, "--max-restarts=1", *args, "--out", str(run)],
                          env=env(SPARSEKIT_FAULT="kill@13/1", SPARSEKIT_DEBUG_MASKS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 240
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 32
    assert not list(run.glob(".*.tmp"))
    ref = two_rank_runs / "rigl"  # the same settings (checkpoint_every does not change results)
    for name in ("weights.safetensors", "masks.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(ref / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    strip = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
             for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                     for x in (ref / "metrics.jsonl").read_text().splitlines()]


def test_a_stuck_rank_fails_the_job_within_the_timeout(tmp_path):
    cfg = _write_config(tmp_path / "c.json", dist_timeout=5)
    t0 = time.monotonic()
    proc = subprocess.run([*TORCHRUN, "-m", "sparsekit", "train", "--config", str(cfg), "--data", "synthetic",
                           "--model-kwargs", "hidden=16", "--epochs", "2", "--device", "cpu", "-q",
                           "--out", str(tmp_path / "run")],
                          env=env(SPARSEKIT_FAULT="hang@3/1"), capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "lost contact with another rank" in proc.stderr
    assert elapsed < 120, elapsed


def test_local_slices_cover_the_batch_once():
    from sparsekit.distributed import DistContext, local_slice, loss_weight

    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [local_slice(n, DistContext(rank=r, world_size=world)) for r in range(world)]
            covered = [i for s in parts for i in range(n)[s]]
            assert covered == list(range(n))
            sizes = [len(range(n)[s]) for s in parts]
            assert max(sizes) - min(sizes) <= 1
            weights = [loss_weight(sz, n, DistContext(rank=0, world_size=world)) for sz in sizes]
            assert sum(weights) / world == pytest.approx(1.0 if n else 0.0)


def test_broadcast_and_checks_are_identity_in_one_process():
    from sparsekit.distributed import DistContext, all_reduce_sum, broadcast_json, on_main, verify_same

    ctx = DistContext()
    assert broadcast_json({"a": [1, 2]}, ctx) == {"a": [1, 2]}
    assert all_reduce_sum([1.5, 2.0], ctx) == [1.5, 2.0]
    assert on_main(lambda: 7, ctx) == 7
    verify_same({"x": torch.ones(3)}, ctx, what="masks", step=0)


def test_debug_checksum_detects_a_difference():
    from sparsekit.distributed import checksum

    a = torch.zeros(10, dtype=torch.bool)
    b = a.clone()
    b[3] = True
    assert checksum(a) == checksum(a.clone()) and checksum(a) != checksum(b)
