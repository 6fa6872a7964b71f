"""Structured masks under data parallelism: 2 CPU processes (gloo) under torchrun end with bit-identical masks
and weights on both ranks (SPARSEKIT_DEBUG_MASKS checks every update too), the same masks as one process,
and the pattern intact. Same pattern and tolerances as test_ddp.py."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import ATOL, TORCHRUN, env

from sparsekit.config import TrainConfig
from sparsekit.granularity import Granularity
from sparsekit.training import Callbacks, train

pytestmark = pytest.mark.slow
CASES = {"rigl-2of4": ("rigl", "2:4"), "set-4x1": ("set", "4x1"), "snfs-ablate": ("snfs", "fanin+ablate")}


def config_for(case: str) -> TrainConfig:
    method, spec = CASES[case]
    return TrainConfig(model="mlp", model_kwargs={"hidden": [32, 16]}, data="synthetic", method=method,
                       method_options={"update_interval": 5}, sparsity=0.5 if ":" in spec else 0.8,
                       distribution="uniform", dense_first_layer=False, epochs=2, batch_size=32, seed=1,
                       device="cpu", granularity=spec).validate()


WORKER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[1])
    from test_granularity_ddp import CASES, config_for
    from sparsekit.training import Callbacks, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = sys.argv[2]
    for case in CASES:
        def dump(info, case=case):
            sd = {"w/" + k: v.detach().clone() for k, v in info["model"].state_dict().items()}
            sd.update({"m/" + k: v.to(torch.uint8) for k, v in info["sparsifier"].masks().items()})
            save_file({k: v.contiguous() for k, v in sd.items()}, f"{out}/{case}.rank{info['rank']}.safetensors")
        train(config_for(case), f"{out}/{case}", callbacks=Callbacks(on_end=dump))
    dist.barrier()  # no rank leaves while another's last collective is in flight (gloo aborts at exit)
    dist.destroy_process_group()
''')


def test_structured_masks_agree_across_ranks_and_with_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([*TORCHRUN, str(script), str(Path(__file__).parent), str(tmp_path)],
                          env=env(SPARSEKIT_DEBUG_MASKS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, (_, spec) in CASES.items():
        r0 = load_file(str(tmp_path / f"{case}.rank0.safetensors"))
        r1 = load_file(str(tmp_path / f"{case}.rank1.safetensors"))
        for k in r0:
            assert torch.equal(r0[k], r1[k]), f"{case}: {k} differs between ranks"
        single: dict[str, torch.Tensor] = {}

        def keep(info, single=single):
            single.update({"w/" + k: v.detach().clone() for k, v in info["model"].state_dict().items()})
            single.update({"m/" + k: v.to(torch.uint8) for k, v in info["sparsifier"].masks().items()})

        train(config_for(case), tmp_path / f"single-{case}", callbacks=Callbacks(on_end=keep))
        for k in single:
            if k.startswith("m/"):
                assert torch.equal(single[k], r0[k]), f"{case}: mask {k} differs from 1 process"
                assert Granularity.parse(spec).conforms(r0[k].bool()), f"{case}: {k} lost the pattern"
            else:
                assert torch.allclose(single[k].float(), r0[k].float(), atol=ATOL, rtol=0), k
