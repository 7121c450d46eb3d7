r"""The low-rank teacher-student experiment (PAPER.md sections 1-5, claims 1-3).

For every rank r in ``config.ranks`` it trains ``config.num_seeds`` students
(a vmapped seeds axis) on inputs from an r-dimensional subspace, labelled by
a random teacher, then measures specialization in and out of the subspace,
first-layer weight alignment, and PGD adversarial error judged by the oracle
with perturbations restricted to the subspace, to its complement, or free.

    python -m experiments.lowrank --workdir=runs/lowrank \
        [--config=experiments/configs/lowrank.py] [--config.num_seeds=16 ...]

Writes ``results.csv``, ``results.json``, ``summary.md`` (mean +- std per rank) and
``lowrank.png`` into ``--workdir``.
"""

import functools
import os
import time
from typing import Any, Dict, List

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from experiments import common
from tsrobust import attacks
from tsrobust import data
from tsrobust import io
from tsrobust import metrics
from tsrobust import models
from tsrobust import plotting
from tsrobust import specialization
from tsrobust import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'lowrank.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG,
                                          'Experiment config (ml_collections).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for the result files.')

WHERES = ('in', 'off', 'full')


def validate_config(config) -> None:
  """Checks every field at start; raises ``common.ConfigError`` naming the field."""
  c = common
  c.check_int(config, 'seed', lo=0)
  c.check_int(config, 'num_seeds', lo=1)
  d = c.check_int(config, 'd', lo=1)
  c.check_sequence(config, 'ranks', int, lo=1, unique=True)
  for r in config.ranks:
    if r > d:
      raise common.ConfigError(f'config.ranks must satisfy 1 <= r <= d = {d}, got r = {r}')
  c.check_float(config, 'data_scale', lo=0, lo_open=True)
  c.check_bool(config, 'energy_matched')
  c.check_int(config, 'num_train', lo=0)
  c.check_sequence(config, 'teacher_hidden', int, lo=1)
  c.check_int(config, 'out_dim', lo=2)
  c.check_bool(config, 'use_bias')
  c.check_float(config, 'teacher_bias_scale', lo=0)
  c.check_float(config, 'strength_decay', lo=0)
  c.check_bool(config, 'teacher_per_seed')
  c.check_int(config, 'width_mult', lo=1)
  c.check_float(config, 'student_init_scale', lo=0, lo_open=True)
  c.check_choice(config, 'loss', train.LOSSES)
  c.check_choice(config, 'optimizer', train.OPTIMIZERS)
  c.check_float(config, 'learning_rate', lo=0, lo_open=True)
  c.check_float(config, 'momentum', lo=0, hi=0.999)
  c.check_float(config, 'weight_decay', lo=0)
  c.check_choice(config, 'schedule', train.SCHEDULES)
  c.check_int(config, 'batch_size', lo=1)
  c.check_int(config, 'num_steps', lo=0)
  c.check_int(config, 'chunk_steps', lo=1)
  n_eval = c.check_int(config, 'num_eval', lo=2)
  eval_batch = c.check_int(config, 'eval_batch', lo=1)
  if n_eval % eval_batch:
    raise common.ConfigError(
        f'config.eval_batch must divide config.num_eval = {n_eval}, got {eval_batch}')
  c.check_float(config, 'probe_scale', lo=0, lo_open=True)
  c.check_float(config, 'tau', lo=-1, hi=1)
  c.check_choice(config, 'attack_norm', attacks.NORMS)
  c.check_sequence(config, 'eps', float, lo=0, unique=True)
  c.check_int(config, 'attack_steps', lo=1)
  c.check_float(config, 'attack_step_factor', lo=0, lo_open=True)
  c.check_int(config, 'attack_restarts', lo=1)
  c.check_int(config, 'num_attack', lo=1)
  c.check_choice(config, 'oracle_loss', attacks.ORACLE_LOSSES)


def columns(config) -> List[str]:
  """The CSV columns, in order."""
  n_layers = len(config.teacher_hidden)
  cols = ['rank', 'seed', 'train_loss', 'spec_in']
  cols += [f'spec_in_l{l + 1}' for l in range(n_layers)]
  cols += ['spec_off'] + [f'spec_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'frac_in_l{l + 1}' for l in range(n_layers)]
  cols += [f'frac_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'dead_l{l + 1}' for l in range(n_layers)]
  cols += ['wcos_in', 'wcos_off', 'wcos_off_random', 'clean_agree']
  cols += [f'adv_{label}_{where}_{common.eps_name(e)}'
           for label in attacks.LABELS for where in WHERES for e in config.eps]
  return cols


def _seed_keys(config):
  """Per-seed keys for each use; a shared problem uses one key for every seed."""
  master = jax.random.PRNGKey(config.seed)
  seeds = jnp.arange(config.num_seeds)
  per_seed = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(master, s), 5))(seeds)
  k_teacher, k_basis, k_student, k_train, k_eval = (per_seed[:, i] for i in range(5))
  if not config.teacher_per_seed:
    shared = jax.random.split(jax.random.fold_in(master, 2 ** 31 - 1), 2)
    k_teacher = jnp.broadcast_to(shared[0], k_teacher.shape)
    k_basis = jnp.broadcast_to(shared[1], k_basis.shape)
  return k_teacher, k_basis, k_student, k_train, k_eval


def _sampler(num_train: int):
  """``(key, data_args, n) -> x``: online low-rank samples, or a fixed training set."""
  if num_train == 0:
    return lambda key, a, n: data.sample_lowrank(key, a['projector'], n, a['scale'])
  return lambda key, a, n: a['train_x'][jax.random.randint(key, (n,), 0, num_train)]


def train_and_evaluate(config, workdir: str) -> List[Dict[str, Any]]:
  """Runs the experiment and writes the result files; returns the records."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  s, d = config.num_seeds, config.d
  k_teacher, k_basis, k_student, k_train, k_eval = _seed_keys(config)

  teacher = models.MLP(tuple(config.teacher_hidden), config.out_dim, config.use_bias)
  student = models.student_of(teacher, config.width_mult, config.student_init_scale)
  teacher_params = jax.vmap(functools.partial(
      models.random_teacher_params, model=teacher, in_dim=d,
      bias_scale=config.teacher_bias_scale, strength_decay=config.strength_decay))(k_teacher)
  bases = jax.vmap(lambda k: data.random_orthonormal(k, d, d))(k_basis)  # [S, d, d]
  student_params0 = jax.vmap(lambda k: student.init(k, jnp.zeros((1, d))))(k_student)

  optimizer = train.make_optimizer(
      config.optimizer, config.learning_rate, momentum=config.momentum,
      weight_decay=config.weight_decay, schedule=config.schedule,
      total_steps=config.num_steps)
  loss_fn = train.teacher_regression_loss(student.apply, teacher.apply, config.loss,
                                          _sampler(config.num_train), config.batch_size)

  @jax.jit
  def make_data(projector, scale, key):
    """Per-seed held-out and training data; vmapped over seeds."""
    def one(p, sc, k):
      k_spec, k_probe, k_att, k_pgd, k_tr = jax.random.split(k, 5)
      out = {'x_eval': data.sample_lowrank(k_spec, p, config.num_eval, sc),
             'x_attack': data.sample_lowrank(k_att, p, config.num_attack, sc),
             'probe_key': k_probe, 'pgd_key': k_pgd}
      if config.num_train:
        out['train_x'] = data.sample_lowrank(k_tr, p, config.num_train, sc)
      return out
    return jax.vmap(one)(projector, scale, key)

  @jax.jit
  def spec_metrics(sp, tp, x, projector, probe_key):
    return jax.vmap(functools.partial(
        metrics.lowrank_specialization, teacher.apply, student.apply,
        probe_scale=config.probe_scale, tau=config.tau,
        batch_size=config.eval_batch))(tp, sp, x, projector, probe_key)

  @functools.partial(jax.jit, static_argnames='label')
  def attack_error(sp, tp, x, key, eps, projector, label):
    def one(sp1, tp1, x1, k1, p1):
      return attacks.robust_error(
          lambda v: student.apply(sp1, v)[0], lambda v: teacher.apply(tp1, v)[0], x1, k1,
          eps=eps, alpha=config.attack_step_factor * eps / config.attack_steps,
          steps=config.attack_steps, label=label, norm=config.attack_norm,
          restarts=config.attack_restarts, projector=p1,
          oracle_loss=config.oracle_loss).mean()
    return jax.vmap(one)(sp, tp, x, key, projector)

  records = []
  eye = jnp.broadcast_to(jnp.eye(d), (s, d, d))
  for r in config.ranks:
    t0 = time.perf_counter()
    u = bases[:, :, :r]
    projector = u @ jnp.swapaxes(u, 1, 2)
    scale = (data.energy_matched_scale(d, r, config.data_scale) if config.energy_matched
             else config.data_scale)
    scales = jnp.full((s,), scale)
    held = make_data(projector, scales, k_eval)
    data_args = {'projector': projector, 'scale': scales}
    if config.num_train:
      data_args['train_x'] = held['train_x']
    state = jax.vmap(lambda p: train.init_state(p, optimizer))(student_params0)
    try:
      state, losses = train.train_seeds(
          loss_fn, optimizer, state, teacher_params, data_args, k_train,
          num_steps=config.num_steps, chunk_steps=config.chunk_steps,
          on_chunk=common.progress_logger(f'rank {r}'))
    except train.TrainingDivergedError as e:
      path = os.path.join(workdir, f'last_good_params_rank{r}.msgpack')
      io.save_pytree(path, e.last_good_state.params)
      raise RuntimeError(f'{e} (rank {r}); last good parameters saved to {path}; lower '
                         f'config.learning_rate') from e
    params = state.params
    spec = jax.device_get(spec_metrics(params, teacher_params, held['x_eval'], projector,
                                       held['probe_key']))
    projs = {'in': projector, 'off': eye - projector, 'full': eye}
    adv = {}
    for label in attacks.LABELS:
      for where in WHERES:
        for i, eps in enumerate(config.eps):
          name = f'adv_{label}_{where}_{common.eps_name(eps)}'
          if where == 'off' and r == d:
            adv[name] = None  # no complement at full rank
            continue
          keys = jax.vmap(lambda k, j=i: jax.random.fold_in(k, j))(held['pgd_key'])
          adv[name] = np.asarray(attack_error(params, teacher_params, held['x_attack'], keys,
                                              jnp.float32(eps), projs[where], label))
    full_rank = r == d
    baseline = None if full_rank else specialization.random_cosine_baseline(d - r)
    for i in range(s):
      rec = {'rank': r, 'seed': i, 'train_loss': float(losses[i, -1]) if losses.size else None,
             'spec_in': float(np.mean(spec['spec_in'][i])),
             'spec_off': None if full_rank else float(np.mean(spec['spec_off'][i]))}
      for l in range(spec['spec_in'].shape[1]):
        rec[f'spec_in_l{l + 1}'] = float(spec['spec_in'][i, l])
        rec[f'spec_off_l{l + 1}'] = None if full_rank else float(spec['spec_off'][i, l])
        rec[f'frac_in_l{l + 1}'] = float(spec['frac_in'][i, l])
        rec[f'frac_off_l{l + 1}'] = None if full_rank else float(spec['frac_off'][i, l])
        rec[f'dead_l{l + 1}'] = int(spec['dead_in'][i, l])
      rec['wcos_in'] = float(spec['wcos_in'][i])
      rec['wcos_off'] = None if full_rank else float(spec['wcos_off'][i])
      rec['wcos_off_random'] = baseline
      rec['clean_agree'] = float(spec['clean_agree'][i])
      for name, values in adv.items():
        rec[name] = None if values is None else float(values[i])
      records.append(rec)
    logging.info('rank %d done in %.1fs: spec_in %.3f spec_off %s clean_agree %.3f', r,
                 time.perf_counter() - t0, float(np.mean(spec['spec_in'])),
                 'n/a' if full_rank else f'{float(np.nanmean(spec["spec_off"])):.3f}',
                 float(np.mean(spec['clean_agree'])))

  common.write_results(workdir, config, records, columns(config))
  mid = common.eps_name(config.eps[len(config.eps) // 2])
  io.atomic_write_text(os.path.join(workdir, 'summary.md'), io.markdown_summary(
      records, ['rank'], ['spec_in', 'spec_off', 'wcos_in', 'wcos_off', 'wcos_off_random',
                          'clean_agree', f'adv_oracle_in_{mid}', f'adv_oracle_off_{mid}',
                          f'adv_oracle_full_{mid}', f'adv_fixed_full_{mid}']))
  plotting.plot_lowrank(os.path.join(workdir, 'results.csv'),
                        os.path.join(workdir, 'lowrank.png'), eps=mid)
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  config = _CONFIG.value
  try:
    validate_config(config)
  except common.ConfigError as e:
    raise app.UsageError(str(e)) from e
  logging.info('devices: %s', jax.devices())
  train_and_evaluate(config, _WORKDIR.value)
  logging.info('wrote %s', ', '.join(os.path.join(_WORKDIR.value, f) for f in
                                     ('results.csv', 'results.json', 'summary.md',
                                                          'lowrank.png')))


if __name__ == '__main__':
  app.run(main)
