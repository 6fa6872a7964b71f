#!/usr/bin/env bash
# CUDA check, for a machine with an NVIDIA GPU (CI has none): installs this checkout without network into
# /tmp/sk, then trains on CUDA and on the CPU side by side, every method on the LeNet-300-100 recipe,
# torchrun with nccl, export + validation of a CUDA-trained run, a 2:4 export loaded as torch semi-structured
# sparse tensors (fp16 outputs vs the CPU reference), and GPU-vs-CPU mask/weight agreement.
#
#     bash bench/gpu_check.sh OUTDIR        # needs data/digits28.npz (python bench/make_digits28.py)
#
# Writes OUTDIR/log.txt and OUTDIR/gpu_check.json (one row per run: device, method, accuracy, sparsity, s).
set -u
OUTDIR=${1:-/tmp/sparsekit-gpu-check}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/log.txt") 2>&1
PY=${PYTHON:-python3}
RUNS=/tmp/sk-runs
rm -rf "$RUNS" && mkdir -p "$RUNS"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ -d .whl ]; then $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/sk .whl/*.whl; fi
$PY -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/sk . || { echo "install failed"; exit 1; }
export PYTHONPATH=/tmp/sk OMP_NUM_THREADS=1
REPO=$(pwd)
cd /tmp  # so that the checkout's sparsekit/ (no compiled parts, no cli/) does not shadow the install
SK="$PY -m sparsekit"

echo "== default run (digits MLP, RigL 90%): cuda then cpu"
for dev in cuda cpu; do
  /usr/bin/time -f "wall %e s" $SK train --method rigl --device "$dev" --out "$RUNS/default-$dev" --json --quiet \
    > "$RUNS/default-$dev.json" || echo "FAILED default $dev"
done

echo "== LeNet-300-100 recipe on digits28, seed 0, every method at 98% and 90%, cuda"
RECIPE="--model lenet300 --data npz:$REPO/data/digits28.npz --epochs 30 --batch-size 128 --optimizer sgd --lr 0.1
        --momentum 0.9 --lr-schedule cosine --distribution erk --seed 0 --device cuda --json --quiet"
for s in ${SPARSITIES:-0.98 0.9}; do
  for m in ${METHODS:-rigl set snfs snip static pruning small-dense}; do
    $SK train $RECIPE --method "$m" --sparsity "$s" --out "$RUNS/lenet-$m-$s" > "$RUNS/lenet-$m-$s.json" \
      || echo "FAILED $m $s"
  done
done
$SK train $RECIPE --method dense --out "$RUNS/lenet-dense" > "$RUNS/lenet-dense.json" || echo "FAILED dense"

echo "== torchrun, 1 process, nccl"
$PY -m torch.distributed.run --standalone --nproc_per_node=1 -m sparsekit train --method rigl --device cuda \
  --epochs 5 --out "$RUNS/ddp-nccl" --json --quiet > "$RUNS/ddp-nccl.json" || echo "FAILED torchrun nccl"

echo "== export + report of the CUDA-trained default run"
$SK export "$RUNS/default-cuda" --format all || echo "FAILED export"
$SK report "$RUNS/default-cuda" --json > "$RUNS/report-cuda.json" || echo "FAILED report"

echo "== 2:4 semi-structured export, loaded as torch semi-structured sparse tensors on CUDA"
REPO="$REPO" RUNS="$RUNS" $PY - <<'EOF' || echo "FAILED semi-structured"
import os, sys, torch
from torch import nn
sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))  # the tests' run-dir fabricator and 2:4 masks
from export_fixtures import make_run_dir
from structured_masks import nm_mask
from sparsekit.exporters.pipeline import export
from sparsekit.semi_structured import load_semi_structured
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
model = net()
masks = {n: torch.from_numpy(nm_mask(tuple(p.shape), 2, 4, seed=i))
         for i, (n, p) in enumerate(model.named_parameters()) if n.endswith("weight")}
run = make_run_dir(os.path.join(os.environ["RUNS"], "semi"), model, masks, torch.randn(64, 64))
rep = export(run, "semi-structured", os.path.join(run, "export"))
print("export:", rep["artifacts"][0]["status"], rep["artifacts"][0]["notes"])
gpu = net()
result = load_semi_structured(os.path.join(run, "export", "model.2to4.safetensors"), gpu)
print("load:", result)
assert all(v == "semi-structured" for v in result.values()), result
x = torch.randn(256, 64)
with torch.no_grad():
    ref = model(x)
    out = gpu(x.cuda().half()).float().cpu()
err = float((out - ref).abs().max()) / float(ref.abs().max())
print(f"semi-structured fp16 vs fp32 CPU reference: max rel err {err:.2e}")
assert err < 2e-2, err
EOF

echo "== GPU vs CPU: one RigL update on the same batch"
$PY - <<'EOF' || echo "FAILED gpu-vs-cpu"
import torch, sparsekit
from torch import nn
def run(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sparsekit.sparsify(model, opt, method="rigl", sparsity=0.9, total_steps=400, update_interval=10)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        x = torch.randn(32, 64, generator=g).to(device); y = torch.randint(0, 10, (32,), generator=g).to(device)
        opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    return {n: l.mask.cpu() for n, l in ((l.name, l) for l in sp.layers)}, [p.detach().cpu() for p in model.parameters()]
mc, wc = run("cuda"); mp, wp = run("cpu")
for n in mc:
    agree = (mc[n] == mp[n]).float().mean().item()
    print(f"mask {n}: active cuda {int(mc[n].sum())} cpu {int(mp[n].sum())}, agreement {agree:.4f}")
print("max |w_cuda - w_cpu|", max(float((a - b).abs().max()) for a, b in zip(wc, wp)))
EOF

$PY - "$RUNS" "$OUTDIR/gpu_check.json" <<'EOF'
import json, sys, pathlib
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        d = json.loads(f.read_text())
    except Exception as e:
        rows.append({"file": f.name, "error": str(e)}); continue
    if "test_accuracy" in d:
        rows.append({"file": f.name, "method": d.get("method"), "target": d.get("target_sparsity"),
                     "realized": d.get("realized_sparsity"), "acc": d.get("test_accuracy"),
                     "train_s": d.get("train_seconds")})
    else:
        rows.append({"file": f.name, "keys": sorted(d)[:12]})
for r in rows:
    print(r)
pathlib.Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
EOF
cp "$RUNS/report-cuda.json" "$OUTDIR/" 2>/dev/null || true
echo "== done"
