r"""JAX's CPU lowering of the threefry hash against the unrolled one, side by side.

``sweep.use_unrolled_threefry_on_cpu()`` lowers ``threefry2x32`` on CPU as the
straight-line code JAX uses on accelerators instead of JAX's CPU default (a
rolled loop over whole arrays). Each lowering runs in its own process (the
lowering is chosen per process, before compiling), alternated ``--repeats``
times; each line is the median over its repeats:

* ``bits`` / ``normal``: ``jax.random.bits`` / ``jax.random.normal`` of
  ``--n`` numbers on one device, ns per number;
* ``scan``: a jitted 1,000-step ``lax.scan`` drawing ``[4, 40, 128]`` normals
  per step (one device's share of the main job's rank-40 training draws), us
  per step;
* ``compile``: seconds to compile that scan;
* ``same bits``: whether the draws' bytes agree across the two lowerings.

    python -m benchmarks.threefry [--repeats=3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks import hardware

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = """
import hashlib, json, sys, time
import jax
from jax import random
from benchmarks import hardware
from tsrobust import sweep
if sys.argv[1] == 'unrolled':
  assert sweep.use_unrolled_threefry_on_cpu()
n = int(sys.argv[2])
key = random.PRNGKey(0)

def per_number(fn):
  fn(key).block_until_ready()
  return hardware.median_time(lambda: fn(key).block_until_ready(), 5) / n * 1e9

bits = jax.jit(lambda k: random.bits(k, (n,)))
normal = jax.jit(lambda k: random.normal(k, (n,)))
out = {'bits': per_number(bits), 'normal': per_number(normal)}
keys = random.split(key, 1000)
scan = jax.jit(lambda ks: jax.lax.scan(
    lambda c, k: (c + random.normal(k, (4, 40, 128)).sum(), None), 0.0, ks)[0])
t0 = time.perf_counter()
scan(keys).block_until_ready()
out['compile'] = time.perf_counter() - t0
t0 = time.perf_counter()
scan(keys).block_until_ready()
out['scan'] = (time.perf_counter() - t0) * 1e3  # us per step over 1,000 steps
digest = hashlib.sha256()
for x in (bits(key), normal(key), random.split(key, 7), random.fold_in(key, 3)):
  digest.update(jax.device_get(x).tobytes())
out['digest'] = digest.hexdigest()
print(json.dumps(out))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--n', type=int, default=1 << 22, help='numbers per draw')
  args = parser.parse_args()
  print(hardware.environment())
  runs = {'default': [], 'unrolled': []}
  for _ in range(args.repeats):
    for lowering in runs:
      done = subprocess.run([sys.executable, '-c', _WORKER, lowering, str(args.n)],
                            capture_output=True, text=True, check=True, cwd=_ROOT,
                            env=dict(os.environ, JAX_PLATFORMS='cpu'))
      runs[lowering].append(json.loads(done.stdout.strip().splitlines()[-1]))
  pieces = ('bits', 'normal', 'scan', 'compile')
  med = {low: {k: statistics.median(r[k] for r in rs) for k in pieces}
         for low, rs in runs.items()}
  same = len({r['digest'] for rs in runs.values() for r in rs}) == 1
  print(f'\nthreefry on one CPU device, {args.n} numbers per draw, median of {args.repeats} '
        f'alternated processes; same bits in every run: {same}\n')
  print('| piece | JAX default (rolled loop) | unrolled | ratio |')
  print('|---|---|---|---|')
  units = {'bits': 'ns / number', 'normal': 'ns / number', 'scan': 'us / step',
           'compile': 's'}
  for k, unit in units.items():
    a, b = med['default'][k], med['unrolled'][k]
    print(f'| {k} ({unit}) | {a:.2f} | {b:.2f} | {a / b:.2f}x |')


if __name__ == '__main__':
  main()
