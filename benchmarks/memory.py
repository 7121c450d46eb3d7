r"""Peak memory of training S image students on one shared training set.

The image binary (``experiments/real.py``) trains its CNN students with
``train.train_seeds(shared_args={'train_x': ...})``: the training images are
passed once, unbatched (``vmap`` ``in_axes=None``; one copy per device), not
copied along the seeds axis. A run's memory should then grow as
O(devices x data + S x params), not O(S x data). This script trains
``--seeds`` students of the binary's default config (``benchmarks/setting.py``'s
``ImageJob``: teacher CNN ``(8, 16)`` conv + ``(32,)`` dense, students twice as wide,
MSE to the teacher's outputs, Adam, batch 32; the ``standard`` method's loss,
minibatches drawn from the shared images) for ``--steps`` steps on ``--num_train``
MNIST-sized images and reports, in one line and optionally a JSON record:

* ``data_mb``: the training images' own size (float32 ``[N, 28, 28, 1]``);
* ``params_mb``: S x one student's parameters; ``state_mb``: S x (parameters
  + Adam's two moments), what the seeds axis holds;
* ``baseline_mb``: the process's resident memory (VmRSS) after JAX started,
  before the data exist;
* ``peak_mb``: the process's peak resident memory (VmHWM of
  ``/proc/self/status``) from the baseline on (the peak is reset there through
  ``/proc/self/clear_refs``; ``peak_reset`` says whether that worked, else it is
  the whole process's peak, ``getrusage``'s ``ru_maxrss``): data creation,
  compilation and training included; ``rise_mb = peak - baseline``; and the
  peaks of the two phases: ``peak_data_mb`` (reading or drawing the images and
  placing one copy per device) and ``peak_train_mb`` (the students'
  initialization, compilation and training, the peak reset in between);
* ``data_rise_mb``: the data phase's peak minus the resident memory just before it
  (after a garbage collection): what the images added. Meaningful in a process that
  did nothing else first, as this script's: where earlier work freed memory that is
  still resident (malloc's free lists, e.g. in a test worker), the images can reuse it
  and the rise is less than their size;
* ``bound_mb``: devices x data + state, and ``copies_mb``: S x data (what one
  copy of the images per student would need).

Images are uniform random (``--data_dir`` reads Fashion-MNIST or MNIST IDX
files instead); the teacher is a random CNN (memory does not depend on its
training). Seeds are sharded over one CPU device per core as in the binaries
(``--cpu_devices=1`` for one device).

    nice -n 19 python -m benchmarks.memory --seeds=64 --num_train=60000 --steps=20 \
        [--json=runs/memory.json]
"""

import argparse
import gc
import json
import resource
import time
from typing import Any, Dict, Optional

import numpy as np

IMAGE_SHAPE = (28, 28, 1)
MB = 2.0 ** 20


def status_mb(field: str) -> float:
  """A memory field (``VmRSS``, ``VmHWM``) of ``/proc/self/status`` in MiB.

  Falls back to ``getrusage`` ``ru_maxrss`` (the peak, KiB on Linux) where
  ``/proc`` is missing.
  """
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) * 1024 / MB  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def reset_peak() -> bool:
  """Resets the peak (VmHWM) to the current resident memory (Linux >= 4.0); False if not."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _tree_mb(tree) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(np.dtype(v.dtype).itemsize * int(np.prod(v.shape))
             for v in jax.tree_util.tree_leaves(tree)) / MB


def measure(num_seeds: int, num_train: int, steps: int, *, chunk_steps: Optional[int] = None,
            data_dir: str = '', seed: int = 0) -> Dict[str, Any]:
  """Trains ``num_seeds`` CNN students on ``num_train`` shared images; returns the record.

  Args:
    num_seeds: students S (a multiple of the device count).
    num_train: training images N (random uniform ``[N, 28, 28, 1]``, or the
      first N of ``data_dir``'s).
    steps: training steps; ``chunk_steps`` per jitted chunk (default: all).
    data_dir: a folder of MNIST-format IDX files (MNIST, Fashion-MNIST) whose
      training images to use ('': random images).
    seed: PRNG seed of the data, the teacher and the students.

  Returns:
    The record described in the module docstring (sizes in MiB), with
    ``final_loss`` (mean over students; finite if training ran).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import setting  # pylint: disable=g-import-not-at-top
  from tsrobust import cnn  # pylint: disable=g-import-not-at-top
  from tsrobust import datasets  # pylint: disable=g-import-not-at-top
  from tsrobust import sweep  # pylint: disable=g-import-not-at-top
  from tsrobust import train  # pylint: disable=g-import-not-at-top

  config = setting.ImageJob()  # the image binary's default config
  mesh = sweep.seed_mesh()
  devices = mesh.devices.size
  if num_seeds % devices:
    raise ValueError(f'num_seeds must be a multiple of the {devices} devices, got {num_seeds}')
  jnp.zeros(1).block_until_ready()  # JAX started: the baseline includes its runtime
  baseline = status_mb('VmRSS')
  reset = reset_peak()
  t0 = time.perf_counter()

  gc.collect()
  before_data = status_mb('VmRSS')
  if data_dir:
    images = datasets.load_mnist(data_dir).train_x[:num_train]
  else:
    images = np.random.default_rng(seed).random((num_train,) + IMAGE_SHAPE, np.float32)
  num_train = images.shape[0]
  data_mb = images.nbytes / MB
  shared = sweep.replicate({'train_x': images}, mesh)  # one copy per device
  del images
  jax.block_until_ready(shared)
  peak_data = status_mb('VmHWM')
  reset_peak()  # from here: the students (initialization, compilation, training)

  teacher = config.teacher_model(10)
  student = cnn.student_of(teacher, config.width_mult, config.student_init_scale)
  k_teacher, k_student, k_train = jax.random.split(jax.random.PRNGKey(seed), 3)
  teacher_params = cnn.init_params(k_teacher, teacher, IMAGE_SHAPE)
  tparams = jax.tree_util.tree_map(
      lambda v: jnp.broadcast_to(v, (num_seeds,) + v.shape), teacher_params)
  params = jax.vmap(lambda k: cnn.init_params(k, student, IMAGE_SHAPE))(
      jax.random.split(k_student, num_seeds))
  params_mb = _tree_mb(params)
  optimizer = setting.make_optimizer(config)
  state = jax.vmap(lambda p: train.init_state(p, optimizer))(params)
  del params
  keys = jax.random.split(k_train, num_seeds)

  # The image binary's 'standard' loss: the teacher's outputs on minibatches of the shared images.
  sample = lambda key, a, n: a['train_x'][jax.random.randint(key, (n,), 0, num_train)]
  loss_fn = train.teacher_regression_loss(student.apply, teacher.apply, config.loss, sample,
                                          config.batch_size)
  state, tparams, keys = sweep.shard_seeds((state, tparams, keys), mesh)
  state, losses = train.train_seeds(loss_fn, optimizer, state, tparams, {}, keys,
                                    num_steps=steps, chunk_steps=chunk_steps or steps,
                                    shared_args=shared)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t0
  peak_train = status_mb('VmHWM')
  peak = max(peak_data, peak_train)
  state_mb = _tree_mb((state.params, state.opt_state))
  return {'seeds': num_seeds, 'num_train': int(num_train), 'image_shape': list(IMAGE_SHAPE),
          'steps': steps, 'devices': int(devices), 'data_mb': data_mb,
          'params_mb': params_mb, 'state_mb': state_mb, 'baseline_mb': baseline,
          'peak_mb': peak, 'rise_mb': peak - baseline, 'peak_reset': reset,
          'data_rise_mb': peak_data - before_data,
          'peak_data_mb': peak_data, 'peak_train_mb': peak_train,
          'bound_mb': devices * data_mb + state_mb, 'copies_mb': num_seeds * data_mb,
          'final_loss': float(np.mean(losses[:, -1])) if losses.size else float('nan'),
          'seconds': seconds}


def line(r: Dict[str, Any]) -> str:
  """The record as one line of text."""
  return (f"S={r['seeds']} N={r['num_train']} {r['steps']} steps, {r['devices']} device(s): "
          f"peak RSS {r['peak_mb']:.0f} MiB (baseline {r['baseline_mb']:.0f}, rise "
          f"{r['rise_mb']:.0f}; data phase {r['peak_data_mb']:.0f}, training phase "
          f"{r['peak_train_mb']:.0f}); data {r['data_mb']:.0f} MiB, "
          f"S x params {r['params_mb']:.1f} "
          f"MiB (with Adam state {r['state_mb']:.1f}); devices x data + state "
          f"{r['bound_mb']:.0f} MiB vs S x data {r['copies_mb']:.0f} MiB; "
          f"{r['seconds']:.0f} s, final loss {r['final_loss']:.3g}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', type=int, default=64)
  parser.add_argument('--num_train', type=int, default=60000)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--chunk_steps', type=int, default=None)
  parser.add_argument('--cpu_devices', type=int, default=0,
                      help='CPU devices (0: one per core, as the binaries)')
  parser.add_argument('--data_dir', default='',
                      help='read the training images of these MNIST-format IDX files')
  parser.add_argument('--json', default=None, metavar='PATH')
  args = parser.parse_args()
  from tsrobust import sweep  # pylint: disable=g-import-not-at-top
  sweep.use_all_cpu_cores(args.cpu_devices or None)
  from benchmarks import hardware  # pylint: disable=g-import-not-at-top
  print(hardware.environment(), flush=True)
  other = hardware.OtherLoad()
  record = measure(args.seeds, args.num_train, args.steps, chunk_steps=args.chunk_steps,
                   data_dir=args.data_dir)
  record.update(other_cores=other.cores(), load=hardware.load(),
                data=args.data_dir or 'uniform random')
  print(line(record))
  print(f"other processes kept {record['other_cores']:.2f} cores busy; "
        f"load {record['load']}")
  print(json.dumps(record))
  if args.json:
    from tsrobust import io  # pylint: disable=g-import-not-at-top
    io.write_json(args.json, record)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
