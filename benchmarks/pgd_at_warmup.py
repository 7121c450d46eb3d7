r"""Does PGD-AT from scratch stall on MNIST, and does the budget warm-up prevent it?

Trains the real binary's PGD-AT network (``experiments/configs/real.py``, as
``benchmarks/setting.py``'s ``ImageJob`` declares it: the teacher's CNN on the bundled
MNIST digits, L-inf PGD-AT at ``--eps`` with ``teacher_pgd_steps`` PGD steps, Adam) for
``--steps`` steps from the initialization of a PGD teacher of each seed
(``--role=teacher``: key ``fold_in(PRNGKey(seed), TRAIN_KEY)``) or of each seed's robust
model (``--role=robust_model``: its own stream), once per ``pgd_warmup`` value of
``--warmups``, and prints the clean test accuracy and the PGD-20 robust accuracy at
``--eps`` (true labels, first 1,000 test images) of each.

    python -m benchmarks.pgd_at_warmup --seeds=1,2,3 --warmups=0,0.1 --workdir=/tmp/pgd_at

Each network is trained through ``tsrobust.teachers.pretrain_teacher`` into
``--workdir`` (its cache: a rerun reuses finished networks). ~95 s per
network on the 2-core CPU.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from benchmarks import setting
from tsrobust import attacks
from tsrobust import teachers


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', default='1,2,3')
  parser.add_argument('--warmups', default='0,0.1', help='pgd_warmup values (fractions)')
  parser.add_argument('--role', default='teacher', choices=teachers.ROLES)
  parser.add_argument('--eps', type=float, default=0.1)
  parser.add_argument('--steps', type=int, default=1500)
  parser.add_argument('--num_test', type=int, default=1000)
  parser.add_argument('--workdir', required=True)
  args = parser.parse_args()
  print('| seed | role | pgd_warmup (steps) | seconds | final loss | clean acc | '
        'PGD-20 robust acc |\n|---|---|---|---|---|---|---|', flush=True)
  for seed in [int(s) for s in args.seeds.split(',')]:
    for warmup in [float(w) for w in args.warmups.split(',')]:
      c = dataclasses.replace(  # the image binary's default config, PGD-AT at --eps
          setting.ImageJob(), seed=seed, pgd_warmup=warmup, teacher_training='pgd',
          teacher_eps=args.eps, teacher_steps=args.steps, rf_model_eps=args.eps,
          rf_model_steps=args.steps)
      dataset = c.load_data()
      model = c.teacher_model(dataset.num_classes)
      spec = c.teacher_spec(args.role)
      t0 = time.perf_counter()
      params, info = teachers.pretrain_teacher(spec, model, dataset, args.workdir, args.role)
      seconds = time.perf_counter() - t0
      x = jnp.asarray(dataset.test_x[:args.num_test])
      y = jnp.asarray(dataset.test_y[:args.num_test])
      logits = lambda v: model.apply(params, v)[0]
      delta = jax.jit(lambda x, y, k: attacks.pgd(
          lambda xa: attacks.cross_entropy(logits(xa), y), x, k, eps=args.eps,
          alpha=2.5 * args.eps / 20, steps=20, norm='linf', clip_range=(0.0, 1.0)))(
              x, y, jax.random.PRNGKey(5))
      clean = float((logits(x).argmax(-1) == y).mean())
      robust = float((logits(x + delta).argmax(-1) == y).mean())
      print(f'| {seed} | {args.role} | {warmup:g} ({spec.get("eps_warmup", 0)}) | '
            f'{seconds:.0f}{" (reused)" if info["reused"] else ""} | {info["final_loss"]:.3f} | '
            f'{clean:.3f} | {robust:.3f} |', flush=True)


if __name__ == '__main__':
  main()
