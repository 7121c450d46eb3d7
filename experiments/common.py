"""Shared pieces of the experiment binaries: config checks, progress, result files."""

import functools
import json
import logging as logging_lib
import numbers
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from tsrobust import attacks
from tsrobust import data
from tsrobust import io
from tsrobust import metrics
from tsrobust import models
from tsrobust import specialization
from tsrobust import sweep
from tsrobust import train


class ConfigError(ValueError):
  """An invalid config value; the message names the field and what is allowed."""


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  if field not in config:
    raise ConfigError(f'config.{field} is missing')
  return config[field]


def check_int(config, field: str, lo: int = None, hi: int = None) -> int:
  v = _get(config, field)
  if isinstance(v, bool) or not isinstance(v, numbers.Integral):
    raise ConfigError(f'config.{field} must be an integer, got {v!r}')
  if lo is not None and v < lo:
    raise ConfigError(f'config.{field} must be >= {lo}, got {v}')
  if hi is not None and v > hi:
    raise ConfigError(f'config.{field} must be <= {hi}, got {v}')
  return int(v)


def check_float(config, field: str, lo: float = None, hi: float = None,
                lo_open: bool = False) -> float:
  v = _get(config, field)
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v):
    raise ConfigError(f'config.{field} must be a finite number, got {v!r}')
  if lo is not None and (v <= lo if lo_open else v < lo):
    raise ConfigError(f'config.{field} must be {">" if lo_open else ">="} {lo}, got {v}')
  if hi is not None and v > hi:
    raise ConfigError(f'config.{field} must be <= {hi}, got {v}')
  return float(v)


def check_bool(config, field: str) -> bool:
  v = _get(config, field)
  if not isinstance(v, bool):
    raise ConfigError(f'config.{field} must be True or False, got {v!r}')
  return v


def check_choice(config, field: str, allowed: Sequence[str]) -> str:
  v = _get(config, field)
  if v not in allowed:
    raise ConfigError(f'config.{field} must be one of {tuple(allowed)}, got {v!r}')
  return v


def check_sequence(config, field: str, kind: type, lo: float = None, hi: float = None,
                   min_len: int = 1, unique: bool = False) -> tuple:
  """A non-empty tuple/list of ints (``kind=int``) or numbers in ``[lo, hi]``."""
  v = _get(config, field)
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    v = (v,)
  if not isinstance(v, (list, tuple)) or len(v) < min_len:
    raise ConfigError(f'config.{field} must be a sequence of at least {min_len} values, '
                      f'got {v!r}')
  want = numbers.Integral if kind is int else numbers.Real
  for item in v:
    if isinstance(item, bool) or not isinstance(item, want) or not np.isfinite(item):
      raise ConfigError(f'config.{field} must hold {"integers" if kind is int else "numbers"},'
                        f' got {item!r} in {v!r}')
    if lo is not None and item < lo:
      raise ConfigError(f'config.{field} values must be >= {lo}, got {item} in {v!r}')
    if hi is not None and item > hi:
      raise ConfigError(f'config.{field} values must be <= {hi}, got {item} in {v!r}')
  if unique and len(set(v)) != len(v):
    raise ConfigError(f'config.{field} values must be distinct, got {v!r}')
  return tuple(v)


def as_tuple(v) -> tuple:
  """A config value that may be a single item or a sequence, as a tuple."""
  return (v,) if isinstance(v, (str, int, float)) else tuple(v)


def check_names(config, field: str, allowed: Sequence[str]) -> tuple:
  """A non-empty sequence of distinct names, each from ``allowed``."""
  v = as_tuple(_get(config, field))
  if not v or any(x not in allowed for x in v) or len(set(v)) != len(v):
    raise ConfigError(f'config.{field} must be distinct names from {tuple(allowed)}, '
                      f'got {v!r}')
  return v


def progress_logger(stage: str, max_lines: int = 10, stream=None):
  """An ``on_chunk`` callback reporting steps/s and ETA.

  On a terminal: one live line, rewritten in place (``\\r``), ended when the
  stage ends. Elsewhere (CI, files): at most ``max_lines`` log lines per stage,
  evenly spaced, the last one always included.
  """
  stream = sys.stderr if stream is None else stream
  live = hasattr(stream, 'isatty') and stream.isatty()
  logged = [0]

  def on_chunk(info: Mapping[str, float]) -> None:
    text = (f"{stage}: step {info['step']}/{info['num_steps']}  loss {info['loss']:.3e}  "
            f"{info['steps_per_sec']:.0f} steps/s  ETA {info['eta_sec']:.0f}s")
    last = info['step'] >= info['num_steps']
    if live:
      stream.write('\r' + text + ('\n' if last else ''))
      stream.flush()
      return
    due = info['step'] * max_lines >= (logged[0] + 1) * info['num_steps']
    if (due or last) and (logged[0] < max_lines or last):
      logged[0] += 1
      logging.info('%s', text)
  return on_chunk


def eps_name(eps: Any) -> str:
  """A budget as written in the config (``1.0`` -> ``'1.0'``, ``1`` -> ``'1'``)."""
  return str(eps)


class _DropLibraryInfo(logging_lib.Filter):
  """Drops INFO records of checkpointing internals (orbax logs every file it writes)."""

  def filter(self, record):
    return record.levelno >= logging_lib.WARNING or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  """Keeps a binary's log to its own progress lines (and every warning)."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo())


def run_binary(validate: Callable, train_and_evaluate: Callable, default_config: str,
               outputs: Sequence[str]) -> None:
  """The absl entry point of an experiment binary (call under ``__main__``).

  Defines ``--config`` (an ml_collections config file, every field
  overridable) and ``--workdir`` here rather than at import, so binaries can
  be imported side by side; validates the config before any work and turns
  a ``ConfigError`` into a usage error naming the field.
  """
  config_flags.DEFINE_config_file('config', default_config, 'Experiment config file.')
  flags.DEFINE_string('workdir', None, 'Folder for the result files.')

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    workdir = flags.FLAGS.workdir
    if not workdir:
      raise app.UsageError('--workdir is required')
    config = flags.FLAGS.config
    try:
      validate(config)
    except ConfigError as e:
      raise app.UsageError(str(e)) from e
    quiet_library_logs()
    logging.info('devices: %s', jax.devices())
    train_and_evaluate(config, workdir)
    logging.info('wrote %s in %s', ', '.join(outputs), workdir)

  app.run(main)


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates ``workdir`` and records the config in ``config.json``.

  A workdir already holding a different config is refused: its checkpoints
  and results belong to that config and would be silently mixed.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  current = json.loads(json.dumps(io.to_plain(config.to_dict())))  # as it reads back
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != current:
      changed = sorted(k for k in set(previous) | set(current)
                       if previous.get(k) != current.get(k))
      raise ConfigError(
          f'{workdir} holds a run with a different config (fields {changed} differ); '
          f'use a new --workdir, or delete that one to start over')
    return
  if jax.process_index() == 0:
    io.write_json(path, current)


def write_results(workdir: str, config: ml_collections.ConfigDict,
                  records: List[Dict[str, Any]], columns: Iterable[str]) -> None:
  """``results.csv`` and ``results.json`` (config, versions, records), atomically.

  Only process 0 writes (multi-host runs compute the same records everywhere).
  """
  if jax.process_index() != 0:
    return
  columns = list(columns)
  io.write_csv(os.path.join(workdir, 'results.csv'), records, columns)
  payload = {'config': config.to_dict(), 'versions': io.library_versions(),
             'columns': columns, 'records': records}
  io.write_json(os.path.join(workdir, 'results.json'), payload)


# ----------------------------------------------------------------------------
# The low-rank synthetic setting, shared by experiments/lowrank.py and
# experiments/robustness.py.
# ----------------------------------------------------------------------------

WHERES = ('in', 'off', 'full')


def validate_lowrank_fields(config) -> None:
  """Checks the fields every low-rank binary shares (task, networks, training, eval)."""
  check_int(config, 'seed', lo=0)
  check_int(config, 'num_seeds', lo=1)
  check_int(config, 'd', lo=1)
  check_float(config, 'data_scale', lo=0, lo_open=True)
  check_bool(config, 'energy_matched')
  check_int(config, 'num_train', lo=0)
  check_sequence(config, 'teacher_hidden', int, lo=1)
  check_int(config, 'out_dim', lo=2)
  check_bool(config, 'use_bias')
  check_float(config, 'teacher_bias_scale', lo=0)
  check_float(config, 'strength_decay', lo=0)
  check_bool(config, 'teacher_per_seed')
  check_int(config, 'width_mult', lo=1)
  check_float(config, 'student_init_scale', lo=0, lo_open=True)
  check_choice(config, 'loss', train.LOSSES)
  check_choice(config, 'optimizer', train.OPTIMIZERS)
  check_float(config, 'learning_rate', lo=0, lo_open=True)
  check_float(config, 'momentum', lo=0, hi=0.999)
  check_float(config, 'weight_decay', lo=0)
  check_choice(config, 'schedule', train.SCHEDULES)
  check_int(config, 'batch_size', lo=1)
  check_int(config, 'num_steps', lo=0)
  check_int(config, 'chunk_steps', lo=1)
  n_eval = check_int(config, 'num_eval', lo=2)
  eval_batch = check_int(config, 'eval_batch', lo=1)
  if n_eval % eval_batch:
    raise ConfigError(
        f'config.eval_batch must divide config.num_eval = {n_eval}, got {eval_batch}')
  check_float(config, 'probe_scale', lo=0, lo_open=True)
  check_float(config, 'tau', lo=-1, hi=1)
  check_choice(config, 'attack_norm', attacks.NORMS)
  check_sequence(config, 'eps', float, lo=0, unique=True)
  check_int(config, 'attack_steps', lo=1)
  check_float(config, 'attack_step_factor', lo=0, lo_open=True)
  check_int(config, 'attack_restarts', lo=1)
  check_int(config, 'num_attack', lo=1)
  check_choice(config, 'oracle_loss', attacks.ORACLE_LOSSES)


def metric_columns(config) -> List[str]:
  """Columns of one student's evaluation (``LowRankEvaluator.evaluate``), in order."""
  n_layers = len(config.teacher_hidden)
  cols = ['train_loss', 'spec_in'] + [f'spec_in_l{l + 1}' for l in range(n_layers)]
  cols += ['spec_off'] + [f'spec_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'frac_in_l{l + 1}' for l in range(n_layers)]
  cols += [f'frac_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'dead_l{l + 1}' for l in range(n_layers)]
  cols += ['wcos_in', 'wcos_off', 'wcos_off_random', 'clean_agree']
  cols += [f'adv_{label}_{where}_{eps_name(e)}'
           for label in attacks.LABELS for where in WHERES for e in config.eps]
  return cols


@functools.lru_cache(maxsize=None)
def mesh():
  """The seeds mesh over every device (all hosts after ``jax.distributed.initialize``)."""
  return sweep.seed_mesh()


def shard(tree):
  """Lays a pytree with a leading seeds axis over ``mesh()``."""
  return sweep.shard_seeds(tree, mesh())


def num_padded_seeds(config) -> int:
  """Seeds to compute: ``num_seeds`` rounded up to a multiple of the device count.

  The extra seeds are ordinary seeds ``num_seeds, num_seeds + 1, ...`` whose
  results are dropped, so the kept results do not depend on the device count.
  """
  return sweep.padded_size(config.num_seeds, mesh())


class SeedKeys(NamedTuple):
  """``[S]`` keys per use; a shared problem uses one teacher/basis key for every seed."""
  teacher: jax.Array
  basis: jax.Array
  student: jax.Array
  train: jax.Array
  eval: jax.Array


def seed_keys(config) -> SeedKeys:
  """Keys of ``num_padded_seeds(config)`` seeds; seed ``s`` uses ``fold_in(seed, s)``."""
  master = jax.random.PRNGKey(config.seed)
  per_seed = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(master, s), 5))(
      jnp.arange(num_padded_seeds(config)))
  keys = SeedKeys(*(per_seed[:, i] for i in range(5)))
  if not config.teacher_per_seed:
    shared = jax.random.split(jax.random.fold_in(master, 2 ** 31 - 1), 2)
    keys = keys._replace(teacher=jnp.broadcast_to(shared[0], keys.teacher.shape),
                         basis=jnp.broadcast_to(shared[1], keys.basis.shape))
  return keys


class Problem(NamedTuple):
  teacher: models.MLP
  student: models.MLP
  teacher_params: Any   # [S, ...]
  bases: jax.Array      # [S, d, d]; rank r uses the leading r columns
  student_params: Any   # [S, ...] initial student parameters


def build_problem(config, keys: SeedKeys) -> Problem:
  """Teachers, nested subspace bases and initial students, one per seed."""
  d = config.d
  teacher = models.MLP(tuple(config.teacher_hidden), config.out_dim, config.use_bias)
  student = models.student_of(teacher, config.width_mult, config.student_init_scale)
  teacher_params = jax.vmap(functools.partial(
      models.random_teacher_params, model=teacher, in_dim=d,
      bias_scale=config.teacher_bias_scale, strength_decay=config.strength_decay))(
          keys.teacher)
  bases = jax.vmap(lambda k: data.random_orthonormal(k, d, d))(keys.basis)
  student_params = jax.vmap(lambda k: student.init(k, jnp.zeros((1, d))))(keys.student)
  return Problem(teacher, student, teacher_params, bases, student_params)


def rank_projector(bases: jax.Array, r: int) -> jax.Array:
  """``[S, d, d]`` projectors onto the span of the leading ``r`` basis columns."""
  u = bases[:, :, :r]
  return u @ jnp.swapaxes(u, 1, 2)


def data_scale(config, r: int) -> float:
  """Per-coordinate std ``s`` of ``z`` at rank ``r`` (see ``energy_matched``)."""
  if config.energy_matched:
    return data.energy_matched_scale(config.d, r, config.data_scale)
  return config.data_scale


def sampler(num_train: int):
  """``(key, data_args, n) -> x``: online low-rank samples, or a fixed training set."""
  if num_train == 0:
    return lambda key, a, n: data.sample_lowrank(key, a['projector'], n, a['scale'])
  return lambda key, a, n: a['train_x'][jax.random.randint(key, (n,), 0, num_train)]


def make_optimizer(config, num_steps: int = None):
  return train.make_optimizer(
      config.optimizer, config.learning_rate, momentum=config.momentum,
      weight_decay=config.weight_decay, schedule=config.schedule,
      total_steps=num_steps or config.num_steps)


def train_or_keep_last_good(loss_fn, optimizer, state, teacher_params, data_args, keys, config,
                            workdir: str, stage: str, num_steps: int = None):
  """``train.train_seeds`` on sharded inputs, with progress and resumable checkpoints.

  Checkpoints go to ``workdir/checkpoints/<stage>``; a rerun resumes there. On
  divergence, saves the last good parameters in the workdir and stops with a
  message. Returns the final state (sharded) and the loss history (numpy).
  """
  state, teacher_params, data_args, keys = shard((state, teacher_params, data_args, keys))
  checkpointer = sweep.Checkpointer(os.path.join(workdir, 'checkpoints', stage))
  try:
    return train.train_seeds(loss_fn, optimizer, state, teacher_params, data_args, keys,
                             num_steps=num_steps or config.num_steps,
                             chunk_steps=config.chunk_steps, on_chunk=progress_logger(stage),
                             checkpointer=checkpointer)
  except train.TrainingDivergedError as e:
    path = os.path.join(workdir, f'last_good_params_{stage}.msgpack')
    io.save_pytree(path, sweep.to_host(e.last_good_state.params))
    raise RuntimeError(f'{e} ({stage}); last good parameters saved to {path}; lower '
                       f'config.learning_rate') from e
  finally:
    checkpointer.close()


class LowRankEvaluator:
  """Compiles the evaluation of a batch of students once, for every rank and method.

  ``held_out`` draws per-seed evaluation data; ``evaluate`` returns one dict of
  ``metric_columns`` (minus ``train_loss``) per student. Budgets and
  projectors are array arguments, so nothing recompiles across ranks,
  budgets or methods.
  """

  def __init__(self, config, teacher: models.MLP, student: models.MLP):
    self.config = config
    c = config
    t_apply, s_apply = teacher.apply, student.apply

    def held_out(projector, scale, key):
      def one(p, sc, k):
        k_spec, k_probe, k_att, k_pgd, k_tr = jax.random.split(k, 5)
        out = {'x_eval': data.sample_lowrank(k_spec, p, c.num_eval, sc),
               'x_attack': data.sample_lowrank(k_att, p, c.num_attack, sc),
               'probe_key': k_probe, 'pgd_key': k_pgd}
        if c.num_train:
          out['train_x'] = data.sample_lowrank(k_tr, p, c.num_train, sc)
        return out
      return jax.vmap(one)(projector, scale, key)

    def spec(sp, tp, x, projector, probe_key):
      return jax.vmap(functools.partial(
          metrics.lowrank_specialization, t_apply, s_apply, probe_scale=c.probe_scale,
          tau=c.tau, batch_size=c.eval_batch))(tp, sp, x, projector, probe_key)

    def attack(sp, tp, x, pgd_key, budget_index, eps, projector, label):
      def one(sp1, tp1, x1, k1, p1):
        k1 = jax.random.fold_in(k1, budget_index)
        return attacks.robust_error(
            lambda v: s_apply(sp1, v)[0], lambda v: t_apply(tp1, v)[0], x1, k1, eps=eps,
            alpha=c.attack_step_factor * eps / c.attack_steps, steps=c.attack_steps,
            label=label, norm=c.attack_norm, restarts=c.attack_restarts, projector=p1,
            oracle_loss=c.oracle_loss).mean()
      return jax.vmap(one)(sp, tp, x, pgd_key, projector)

    self.held_out = jax.jit(held_out)
    self._spec = jax.jit(spec)
    self._attack = jax.jit(attack, static_argnames='label')

  def evaluate(self, params, teacher_params, projector, held,
               full_rank: bool) -> List[Dict[str, Any]]:
    """Metrics of a batch of students ``[S, ...]``; off-subspace ones are None at full rank.

    Inputs are laid over the seeds mesh (``shard``); S must be a multiple of
    the device count.
    """
    c = self.config
    num = projector.shape[0]
    d = projector.shape[-1]
    rank = int(round(float(np.trace(np.asarray(sweep.to_host(projector)[0])))))
    params, teacher_params, projector, held = shard((params, teacher_params, projector, held))
    spec = sweep.to_host(self._spec(params, teacher_params, held['x_eval'], projector,
                                    held['probe_key']))
    eye = shard(jnp.broadcast_to(jnp.eye(d), projector.shape))
    projs = {'in': projector, 'off': eye - projector, 'full': eye}
    adv = {}
    for label in attacks.LABELS:
      for where in WHERES:
        for i, eps in enumerate(c.eps):
          name = f'adv_{label}_{where}_{eps_name(eps)}'
          if where == 'off' and full_rank:
            adv[name] = None  # no complement at full rank
            continue
          adv[name] = np.asarray(sweep.to_host(self._attack(
              params, teacher_params, held['x_attack'], held['pgd_key'], i,
              jnp.float32(eps), projs[where], label)))
    baseline = None if full_rank else specialization.random_cosine_baseline(d - rank)
    rows = []
    for i in range(num):
      row = {'spec_in': float(np.mean(spec['spec_in'][i])),
             'spec_off': None if full_rank else float(np.mean(spec['spec_off'][i]))}
      for l in range(spec['spec_in'].shape[1]):
        row[f'spec_in_l{l + 1}'] = float(spec['spec_in'][i, l])
        row[f'spec_off_l{l + 1}'] = None if full_rank else float(spec['spec_off'][i, l])
        row[f'frac_in_l{l + 1}'] = float(spec['frac_in'][i, l])
        row[f'frac_off_l{l + 1}'] = None if full_rank else float(spec['frac_off'][i, l])
        row[f'dead_l{l + 1}'] = int(spec['dead_in'][i, l])
      row['wcos_in'] = float(spec['wcos_in'][i])
      row['wcos_off'] = None if full_rank else float(spec['wcos_off'][i])
      row['wcos_off_random'] = baseline
      row['clean_agree'] = float(spec['clean_agree'][i])
      for name, values in adv.items():
        row[name] = None if values is None else float(values[i])
      rows.append(row)
    return rows
