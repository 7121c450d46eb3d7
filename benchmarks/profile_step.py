r"""Where the vmapped trainer's time goes: one training step taken apart.

Each line times ``jit(vmap(lax.scan over --steps steps))`` over ``--seeds``
students (as ``train.train_seeds`` runs it) of one piece of the step, so
differences between lines are the cost of the pieces:

* ``rng``: ``jax.random.normal(fold_in(key, t), (r, B))`` only (what the
  library's sampler draws);
* ``data``: the library's sampler ``s (U z)^T`` (``data.sample_subspace``);
* ``data+teacher``: plus the teacher's forward pass (the labels);
* ``step``: the library's full ``train.train_step`` (default loss, optimizer);
* ``step; fixed x``: the same step on a fixed batch (no random numbers):
  the cost of the student's forward, backward and the optimizer;
* ``step; s g P``: the step with the projector sampler ``data.sample_lowrank``
  (``d`` normals per example and a ``d x d`` product; the library's training
  sampler until 2026-11-26);
* ``step; z @ U^T``: the step with ``r`` normals drawn as ``[B, r]`` (the same
  numbers of normals as the library, the small axis minor).

``--cpu_devices=N`` shards the seeds over N virtual CPU devices
(``jax_num_cpu_devices``, ``sweep.shard_seeds``), as the library does over
real devices. Medians of ``--repeats``; compilation excluded.

    python -m benchmarks.profile_step --seeds=32 --steps=1000 [--cpu_devices=2]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import hardware
from benchmarks import setting


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', type=int, default=32)
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--cpu_devices', type=int, default=1)
  parser.add_argument('--prng_impl', default=None,
                      help='jax_default_prng_impl (threefry2x32, rbg, unsafe_rbg)')
  parser.add_argument('--threefry_partitionable', default=None, choices=('true', 'false'))
  parser.add_argument('--only', default=None, help='semicolon-separated subset of the pieces')
  parser.add_argument('--wait_quiet', type=float, default=0)
  parser.add_argument('--unrolled_threefry', action=argparse.BooleanOptionalAction,
                      default=True,
                      help='unrolled threefry on CPU, as the binaries (--unrolled_threefry)')
  args = parser.parse_args()
  if args.cpu_devices > 1:
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  if args.prng_impl:
    jax.config.update('jax_default_prng_impl', args.prng_impl)
  if args.threefry_partitionable:
    jax.config.update('jax_threefry_partitionable', args.threefry_partitionable == 'true')
  from tsrobust import data  # pylint: disable=g-import-not-at-top
  from tsrobust import sweep  # pylint: disable=g-import-not-at-top
  from tsrobust import train  # pylint: disable=g-import-not-at-top
  if args.unrolled_threefry:
    sweep.use_unrolled_threefry_on_cpu()
  print(hardware.environment())
  print(f'prng {jax.config.jax_default_prng_impl}, threefry_partitionable '
        f'{jax.config.jax_threefry_partitionable}, unrolled {args.unrolled_threefry}; '
        f'S={args.seeds}, {args.steps} steps, '
        f'median of {args.repeats}\n', flush=True)

  p = setting.jax_problem(args.seeds)
  c = p.config
  b, d, r = c.batch_size, c.d, setting.RANK
  x_fixed = jax.vmap(lambda k, u, s: data.sample_subspace(k, u, b, s))(
      p.keys, p.data_args['basis'], p.data_args['scale'])
  data_args = dict(p.data_args, x=x_fixed)
  flops = setting.flops_per_student_step(c)

  def student_loss(params, tp, x):
    return train.teacher_loss(p.student.apply(params, x)[0], p.teacher.apply(tp, x)[0],
                              c.loss)

  def step_on(x_of):
    def step(st, tp, da, key):
      loss, g = jax.value_and_grad(student_loss)(st.params, tp, x_of(key, da))
      updates, opt_state = p.optimizer.update(g, st.opt_state, st.params)
      del loss
      return train.TrainState(optax.apply_updates(st.params, updates), opt_state, st.step + 1)
    return step

  sample = lambda k, da: data.sample_subspace(k, da['basis'], b, da['scale'])
  zeros = jnp.zeros((args.seeds, b, d))
  no_data = flops['exact'] - flops['data']
  pieces = {
      'rng': (lambda cz, tp, da, k: cz + jax.random.normal(k, (r, b)).sum(), zeros, 0),
      'data': (lambda cz, tp, da, k: cz + sample(k, da), zeros, flops['data']),
      'data+teacher': (lambda cz, tp, da, k: cz + p.teacher.apply(tp, sample(k, da))[0].sum(),
                       zeros, flops['data'] + flops['teacher']),
      'step': (lambda st, tp, da, k: train.train_step(p.loss_fn, p.optimizer, st, tp, da,
                                                      k)[0], p.state, flops['exact']),
      'step; fixed x': (step_on(lambda k, da: da['x'] * (1.0 + 0.0 * jax.random.normal(
          k, ()))), p.state, no_data),
      'step; s g P': (step_on(lambda k, da: data.sample_lowrank(k, da['projector'], b,
                                                                da['scale'])),
                      p.state, no_data + 2 * b * d * d),
      'step; z @ U^T': (step_on(lambda k, da: da['scale'] * jax.random.normal(
          k, (b, r)) @ da['basis'].T), p.state, flops['exact']),
  }
  only = args.only.split(';') if args.only else list(pieces)
  mesh = sweep.seed_mesh()
  inputs = (p.teacher_params, data_args, p.keys)
  if args.cpu_devices > 1:
    inputs = sweep.shard_seeds(inputs, mesh)
  print('| piece | us / step (all S) | us / student-step | GFLOP/s (matmul) | other procs '
        '(cores) |\n|---|---|---|---|---|')
  for name in only:
    fn, carry, fl = pieces[name]
    if args.cpu_devices > 1:
      carry = sweep.shard_seeds(carry, mesh)

    def chunk(carry, tp, da, key, fn=fn):
      def body(cr, t):
        return fn(cr, tp, da, jax.random.fold_in(key, t)), None
      return jax.lax.scan(body, carry, jnp.arange(args.steps))[0]
    f = jax.jit(jax.vmap(chunk))
    jax.block_until_ready(f(carry, *inputs))
    hardware.wait_until_quiet(args.wait_quiet)
    meter = hardware.OtherLoad()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(carry, *inputs))
      times.append(time.perf_counter() - t0)
    t = statistics.median(times) / args.steps
    print(f'| {name} | {1e6 * t:.0f} | {1e6 * t / args.seeds:.1f} | '
          f'{args.seeds * fl / t / 1e9:.1f} | {meter.cores():.2f} |', flush=True)


if __name__ == '__main__':
  main()
