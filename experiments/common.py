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
from tsrobust import evaluate
from tsrobust import io
from tsrobust import metrics
from tsrobust import models
from tsrobust import specialization
from tsrobust import stats
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
  overridable), ``--workdir`` and ``--cpu_devices`` here rather than at
  import, so binaries can be imported side by side; validates the config
  before any work and turns a ``ConfigError`` into a usage error naming the
  field.

  ``--cpu_devices=N`` sets how many devices JAX makes of the CPU, before any
  JAX work (``sweep.use_all_cpu_cores``); the seeds are sharded over them.
  0 (the default): one per core; 1: a single device (JAX's default); N: N
  devices. A count already set by the user (``--xla_force_host_platform_device_count``
  in ``XLA_FLAGS``, or ``JAX_NUM_CPU_DEVICES``) is kept, and on a GPU / TPU the
  flag changes nothing. The log says how many devices the run uses.
  """
  config_flags.DEFINE_config_file('config', default_config, 'Experiment config file.')
  flags.DEFINE_string('workdir', None, 'Folder for the result files.')
  flags.DEFINE_integer('cpu_devices', 0, 'CPU devices to run on (seeds are sharded over '
                       'them): 0 = one per core, 1 = a single device, N = N devices.',
                       lower_bound=0)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    sweep.use_all_cpu_cores(flags.FLAGS.cpu_devices or None)  # before any JAX work
    workdir = flags.FLAGS.workdir
    if not workdir:
      raise app.UsageError('--workdir is required')
    config = flags.FLAGS.config
    try:
      validate(config)
    except ConfigError as e:
      raise app.UsageError(str(e)) from e
    quiet_library_logs()
    devices = jax.devices()
    logging.info('running on %d %s device(s) (--cpu_devices=%d, %d cores): %s', len(devices),
                 devices[0].platform, flags.FLAGS.cpu_devices, sweep.cpu_cores(), devices)
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
# The attack ensemble's fields, shared by every binary.
# ----------------------------------------------------------------------------

# config field -> AttackConfig field; -1 takes the preset's value.
ATTACK_OVERRIDES = {'attack_steps': 'pgd_steps', 'attack_restarts': 'pgd_restarts',
                    'apgd_steps': 'apgd_steps', 'apgd_restarts': 'apgd_restarts',
                    'apgd_t_steps': 'apgd_t_steps', 'attack_targets': 'targets',
                    'square_queries': 'square_queries'}


def validate_attack_fields(config) -> None:
  """``attack_strength`` (a preset) and its overrides; the resulting ensemble must be valid."""
  check_choice(config, 'attack_strength', evaluate.STRENGTHS)
  for field in ATTACK_OVERRIDES:
    v = check_int(config, field, lo=-1)
    if field.endswith('restarts') and v == 0:
      raise ConfigError(f'config.{field} must be -1 (the preset\'s) or >= 1, got 0')
  check_float(config, 'attack_step_factor', lo=0, lo_open=True)
  check_choice(config, 'oracle_loss', attacks.ORACLE_LOSSES)
  check_float(config, 'oracle_tolerance', lo=0)
  try:
    attack_config(config)
  except ValueError as e:
    raise ConfigError(f'config.attack_strength / its overrides: {e}') from e


def attack_config(config) -> evaluate.AttackConfig:
  """The ``evaluate.AttackConfig`` of ``config``: the preset, then every override != -1."""
  overrides = {dst: int(config[src]) for src, dst in ATTACK_OVERRIDES.items()
               if int(config[src]) != -1}
  return evaluate.preset(config.attack_strength, pgd_step_factor=float(config.attack_step_factor),
                         oracle_loss=config.oracle_loss,
                         oracle_tolerance=float(config.oracle_tolerance), **overrides)


def headline_eps(config) -> float:
  """The budget summaries and figures show: the middle of ``config.eps`` as written."""
  return config.eps[len(config.eps) // 2]


def attack_checks_summary(config, checks: Mapping[str, Any]) -> Dict[str, Any]:
  """``attack_checks.json``: the ensemble's settings and the per-group checks."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  return {'attack_strength': config.attack_strength,
          'attack_config': dataclasses.asdict(attack_config(config)),
          'headline_eps': headline_eps(config), 'groups': dict(checks)}


def attack_checks_markdown(summary: Mapping[str, Any]) -> str:
  """A markdown section of ``attack_checks_summary``: is the evaluation trustworthy?"""
  groups = summary['groups']
  if not groups:
    return ''
  first = next(iter(groups.values()))
  attacks_run = list(first['per_attack'])
  head = first['headline_eps']
  labels = list(first['convergence'])
  lines = [f'## Attack checks (`attack_strength = {summary["attack_strength"]}`)', '',
           'Per-example violations of the invariants by each raw attack and by their union '
           '(before the evaluation enforces them: `full` includes `in` / `off`, errors '
           'non-decreasing in eps), summed over students; points only Square broke; '
           f'untargeted APGD\'s error after k iterations (full space, eps {head:g}) beside the '
           'ensemble\'s error.', '']
  cols = ['group', 'students'] + [f'viol. {a}' for a in attacks_run] + ['viol. union',
                                                                      'viol. final']
  for label in labels:
    cols += [f'only Square ({label}, full, {head:g})', f'APGD error vs iterations ({label})',
             f'ensemble ({label})']
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  total = lambda d: d['non_monotone_in_eps'] + d['subspace_not_in_full']
  for name, g in groups.items():
    cells = [name, str(g['students'])]
    cells += [str(total(g['per_attack'][a])) for a in attacks_run]
    cells += [str(total(g['raw_ensemble'])), str(total(g['final']))]
    for label in labels:
      sq = g['only_square'].get(f'{label}_full_{head:g}')
      cells.append('-' if sq is None else f'{sq:.4f}')
      conv = g['convergence'][label]
      cells.append(' / '.join(f'{k}: {v:.3f}' for k, v in
                              conv['apgd_error_after_iterations'].items()))
      cells.append(f"{conv['ensemble_error']:.3f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def correlation(x, y, groups, seeds, key, num_resamples: int) -> Dict[str, Any]:
  """Pooled correlation of ``x`` and ``y`` across students, with within-method ones.

  Intervals are bootstrapped over seeds (``seeds``: the seed id of each
  student; all methods of a seed share its teacher, initial student and data
  stream, so students are resampled in seed clusters). Returns the pooled
  ``stats.correlation_report`` keys at the top level, plus ``'pooled_within'``
  (the correlation of the deviations from each method's mean) and
  ``'by_method'`` (one report per method).
  """
  rep = stats.within_group_correlations(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                        np.asarray(groups), np.asarray(seeds), key,
                                        num_resamples)
  return {**rep['pooled'], 'pooled_within': rep['pooled_within'], 'by_method': rep['groups']}


def correlation_markdown(reports: Mapping[str, Mapping[str, Any]], x_name: str,
                         num_resamples: int) -> str:
  """A markdown table of ``correlation`` reports, one row per robust-accuracy column."""
  fmt = lambda v: '-' if v is None or not np.isfinite(v) else f'{v:.3f}'
  ci = lambda r, k: (f'{fmt(r[k])} [{fmt((r.get(k + "_ci") or [None])[0])}, '
                     f'{fmt((r.get(k + "_ci") or [None, None])[1])}]')
  first = next(iter(reports.values()))
  methods = list(first['by_method'])
  lines = [f'Correlation across students of `{x_name}` with robust accuracy (95% intervals, '
           f'{num_resamples} bootstrap resamples of seeds: all methods of a seed move together). '
           '*Pooled*: all students; *within*: deviations from each method\'s mean, pooled; '
           'then Pearson within each method (`-`: too few students or constant).', '',
           '| robust accuracy | n | Pearson pooled | Spearman pooled | Pearson within | '
           + ' | '.join(methods) + ' |', '|' + '---|' * (5 + len(methods))]
  for name, r in reports.items():
    cells = [f'`{name}`', str(r['n']), ci(r, 'pearson'), ci(r, 'spearman'),
             ci(r['pooled_within'], 'pearson')]
    cells += [fmt(r['by_method'][m]['pearson']) for m in methods]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------
# The low-rank synthetic setting, shared by experiments/lowrank.py and
# experiments/robustness.py.
# ----------------------------------------------------------------------------

WHERES = ('in', 'off', 'full')
LOWRANK_LABELS = ('oracle', 'fixed')  # evaluate.LABEL_KINDS of the synthetic setting


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
  validate_attack_fields(config)
  check_int(config, 'num_attack', lo=1)


def metric_columns(config) -> List[str]:
  """Columns of one student's evaluation (``LowRankEvaluator.evaluate``), in order."""
  n_layers = len(config.teacher_hidden)
  cols = ['train_loss', 'spec_in'] + [f'spec_in_l{l + 1}' for l in range(n_layers)]
  cols += ['spec_off'] + [f'spec_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'frac_in_l{l + 1}' for l in range(n_layers)]
  cols += [f'frac_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'dead_l{l + 1}' for l in range(n_layers)]
  cols += ['wcos_in', 'wcos_off', 'wcos_off_random', 'clean_agree']
  main, per_attack = evaluate.columns(LOWRANK_LABELS, WHERES,
                                      [eps_name(e) for e in config.eps],
                                      attack_config(config).attacks)
  return cols + main + per_attack


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


class Evaluation(NamedTuple):
  """The raw outcome of an evaluation: ``evaluate.Result``, its ``combine``d successes."""
  result: evaluate.Result
  final: Dict[Any, np.ndarray]


class LowRankEvaluator:
  """Compiles the evaluation of a batch of students once, for every rank and method.

  ``held_out`` draws per-seed evaluation data; ``evaluate`` returns one dict of
  ``metric_columns`` (minus ``train_loss``) per student, and the raw
  ``Evaluation`` (for ``evaluate.attack_checks`` and CCAT). Budgets and
  projectors are array arguments, so nothing recompiles across budgets or
  methods (Square recompiles per subspace dimension).
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

    def confidence(sp, tp, x):  # CCAT thresholds: confidence and correctness on x_eval
      s = s_apply(sp, x)[0]
      return jax.nn.softmax(s).max(-1), s.argmax(-1) == t_apply(tp, x)[0].argmax(-1)

    self.held_out = jax.jit(held_out)
    self._spec = jax.jit(spec)
    self._confidence = jax.jit(jax.vmap(confidence))
    self.attack_config = attack_config(config)
    self.attacks = evaluate.Evaluator(s_apply, t_apply, norm=c.attack_norm,
                                      config=self.attack_config)

  def ccat_thresholds(self, params, teacher_params, held) -> np.ndarray:
    """``[S]`` thresholds passing ``ccat_pass_rate`` of the correctly classified points."""
    conf, correct = sweep.to_host(self._confidence(params, teacher_params, held['x_eval']))
    return np.array([evaluate.ccat_threshold(cf, ok, self.config.ccat_pass_rate)
                     for cf, ok in zip(conf, correct)], np.float32)

  def attack(self, params, teacher_params, projector, held, full_rank: bool,
             labels_kinds=LOWRANK_LABELS, thresholds=None) -> Evaluation:
    """The attack ensemble in S (``in``), S_perp (``off``) and unconstrained (``full``).

    At full rank there is no complement and ``in`` is the whole space: only
    ``full`` is attacked (``rows`` copies it to ``in``).
    """
    d = projector.shape[-1]
    projs = {}
    if not full_rank:
      eye = jnp.eye(d, dtype=projector.dtype)
      projs = {'in': projector, 'off': shard(eye[None] - projector)}
    result = self.attacks.run(params, teacher_params, held['x_attack'], held['pgd_key'],
                              eps=self.config.eps, labels_kinds=labels_kinds,
                              projectors=projs, thresholds=thresholds,
                              identity_full=self.config.attack_norm == 'l2')
    return Evaluation(result, evaluate.combine(result))

  def evaluate(self, params, teacher_params, projector, held, full_rank: bool):
    """Metrics of a batch of students ``[S, ...]``; off-subspace ones are None at full rank.

    Inputs are laid over the seeds mesh (``shard``); S must be a multiple of
    the device count. Returns ``(rows, Evaluation)``.
    """
    c = self.config
    num = projector.shape[0]
    d = projector.shape[-1]
    rank = int(round(float(np.trace(np.asarray(sweep.to_host(projector)[0])))))
    params, teacher_params, projector, held = shard((params, teacher_params, projector, held))
    spec = sweep.to_host(self._spec(params, teacher_params, held['x_eval'], projector,
                                    held['probe_key']))
    ev = self.attack(params, teacher_params, projector, held, full_rank)
    adv = attack_rows(c, ev, full_rank)
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
      row.update(adv[i])
      rows.append(row)
    return rows, ev


def attack_rows(config, ev: Evaluation, full_rank: bool) -> List[Dict[str, Any]]:
  """Per-student ``adv_*`` columns; at full rank ``in`` = ``full`` and ``off`` is empty."""
  names = {float(e): eps_name(e) for e in config.eps}
  rows = evaluate.records(ev.result, ev.final, names)
  adv_columns = [k for k in metric_columns(config) if k.startswith('adv_')]
  for row in rows:
    for key in list(row):
      if full_rank and '_full_' in key:
        row[key.replace('_full_', '_in_', 1)] = row[key]
    for key in adv_columns:
      if key not in row:
        row[key] = None  # the complement at full rank
  return rows
