"""Shared pieces of the experiment binaries: config tables, the low-rank setting, training
and evaluation glue, result files (the command line itself is ``experiments/cli.py``)."""

import functools
import os
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import cli
from experiments import validation
from tsrobust import attacks
from tsrobust import data
from tsrobust import evaluate
from tsrobust import io
from tsrobust import methods
from tsrobust import metrics
from tsrobust import models
from tsrobust import specialization
from tsrobust import stats
from tsrobust import sweep
from tsrobust import train


ConfigError = validation.ConfigError
RunError = cli.RunError

# The command line (flags, help, errors, interruptions, workdir, logs) is experiments/cli.py;
# these names of it stay importable from here.
run_binary = cli.run_binary
define_flags = cli.define_flags
parse_flags = cli.parse_flags
exit_with_error = cli.exit_with_error
one_line = cli.one_line
check_workdir = cli.check_workdir
prepare_workdir = cli.prepare_workdir
progress_logger = cli.progress_logger
quiet_library_logs = cli.quiet_library_logs
checkpoint_every_sec = cli.checkpoint_every_sec
USAGE_EXIT_CODE = cli.USAGE_EXIT_CODE
RUN_EXIT_CODE = cli.RUN_EXIT_CODE


def as_tuple(v) -> tuple:
  """A config value that may be a single item or a sequence, as a tuple."""
  return (v,) if isinstance(v, (str, int, float)) else tuple(v)


def eps_name(eps: Any) -> str:
  """A budget as written in the config (``1.0`` -> ``'1.0'``, ``1`` -> ``'1'``)."""
  return str(eps)


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
                    'square_queries': 'square_queries', 'pair_steps': 'pair_steps',
                    'pair_targets': 'pair_targets', 'pair_restarts': 'pair_restarts'}


_PRESETS = {-1: "the preset's"}

# The fields experiments/configs/attacks.py adds to every config (``add_attack_fields``).
ATTACK_FIELDS = {
    'attack_strength': validation.Choice(evaluate.STRENGTHS),
    'attack_steps': validation.Int(lo=-1),
    'attack_restarts': validation.Int(lo=1, special=_PRESETS),
    'apgd_steps': validation.Int(lo=-1),
    'apgd_restarts': validation.Int(lo=1, special=_PRESETS),
    'apgd_t_steps': validation.Int(lo=-1),
    'attack_targets': validation.Int(lo=-1),
    'square_queries': validation.Int(lo=-1),
    'pair_steps': validation.Int(lo=-1),
    'pair_targets': validation.Int(lo=-1),
    'pair_restarts': validation.Int(lo=1, special=_PRESETS),
    'pair_smoothing': validation.Float(lo=0, special={-1.0: "the preset's"}),
    'surrogate_temperature': validation.Float(lo=0),
    'convergence_points': validation.Int(lo=0),
    'attack_step_factor': validation.Float(lo=0, lo_open=True),
    'oracle_loss': validation.Choice(attacks.ORACLE_LOSSES),
    'oracle_tolerance': validation.Float(lo=0),
}


def check_attack_rules(config) -> None:
  """Cross-field rule: the preset with its overrides must make a valid attack ensemble."""
  try:
    cfg = attack_config(config)
  except ValueError as e:
    raise ConfigError(f'config.attack_strength / its overrides: {e}') from e
  if not cfg.attacks_for('fixed'):
    raise ConfigError(f'config.attack_strength / its overrides: only {cfg.attacks} would run, '
                      f'for oracle labels only; the clean-label evaluations need another attack '
                      f'(pgd, apgd, apgd_t or square)')


def attack_config(config) -> evaluate.AttackConfig:
  """The ``evaluate.AttackConfig`` of ``config``: the preset, then every override != -1."""
  overrides = {dst: int(config[src]) for src, dst in ATTACK_OVERRIDES.items()
               if int(config[src]) != -1}
  if float(config.pair_smoothing) != -1:
    overrides['pair_smoothing'] = float(config.pair_smoothing)
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
          'surrogate_temperature': float(config.surrogate_temperature),
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
  return '\n'.join(lines) + '\n' + doubling_markdown(summary)


def doubling_markdown(summary: Mapping[str, Any]) -> str:
  """The convergence check per group (``evaluate.doubling``): '' when it did not run."""
  groups = {k: g['doubling'] for k, g in summary['groups'].items() if 'doubling' in g}
  if not groups:
    return ''
  first = next(iter(groups.values()))
  threshold = first['threshold']
  head = next(iter(summary['groups'].values()))['headline_eps']  # as the attacks' budgets
  bad = [k for k, d in groups.items() if not d['converged']]
  lines = ['', f'### Convergence: the ensemble with every iteration count doubled', '',
           f'On the first {first["points"]} attacked points of each student, the ensemble '
           f'with twice the iterations and queries (other random starts) attacks again; a '
           f'group has converged when that raises no error cell (label, subspace, budget) by '
           f'more than {threshold:g}. Errors are combined as in the evaluation (the doubled '
           f'run\'s successes added to the run\'s).', '']
  if bad:
    lines += [f'**Not converged: {", ".join(bad)}.** Their errors are lower bounds; a '
              f'stronger `attack_strength` (or more iterations) would find more.', '']
  else:
    lines += ['Every group has converged.', '']
  cols = ['group', 'students', f'oracle, full, {head:g}: run / doubled',
          'largest gain: cell', 'run / doubled', 'converged']
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, d in groups.items():
    key = f'oracle_full_{head:g}'
    main = d['cells'].get(key)
    before, after = d['cells'][d['max_gain_cell']]
    lines.append('| ' + ' | '.join([
        name, str(d['students']),
        '-' if main is None else f'{main[0]:.3f} / {main[1]:.3f}',
        f'`{d["max_gain_cell"]}`', f'{before:.3f} / {after:.3f}',
        'yes' if d['converged'] else '**no**']) + ' |')
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
# The paragraph before a summary.md table of adversarial error per subspace and budget
# (experiments.reproduce names its generated block '<study>-subspaces').
SUBSPACE_TABLE_TITLE = 'Adversarial error by subspace and budget'
LOWRANK_LABELS = ('oracle', 'fixed')  # evaluate.LABEL_KINDS of the synthetic setting


# Student training, shared by every binary.
TRAINING_FIELDS = {
    'seed': validation.Int(lo=0),
    'num_seeds': validation.Int(lo=1),
    'width_mult': validation.Int(lo=1),
    'student_init_scale': validation.Float(lo=0, lo_open=True),
    'loss': validation.Choice(train.LOSSES),
    'optimizer': validation.Choice(train.OPTIMIZERS),
    'learning_rate': validation.Float(lo=0, lo_open=True),
    'momentum': validation.Float(lo=0, hi=0.999),
    'weight_decay': validation.Float(lo=0),
    'schedule': validation.Choice(train.SCHEDULES),
    'batch_size': validation.Int(lo=1),
    'num_steps': validation.Int(lo=0),
    'chunk_steps': validation.Int(lo=1),
}

# The training methods' grids and the correlation's bootstrap (robustness.py, real.py).
METHOD_GRID_FIELDS = {
    'at_eps': validation.Floats(lo=0, unique=True),
    'at_steps': validation.Int(lo=1),
    'at_label': validation.Choice(attacks.LABELS),
    'at_fraction': validation.Float(lo=0, hi=1),
    'ccat_eps': validation.Floats(lo=0, unique=True),
    'ccat_steps': validation.Int(lo=1),
    'ccat_rho': validation.Float(lo=0, lo_open=True),
    'ccat_pass_rate': validation.Float(lo=0, hi=1, lo_open=True),
    'aug_scales': validation.Floats(lo=0, unique=True),
    'aug_fraction': validation.Float(lo=0, hi=1),
    'bootstrap_resamples': validation.Int(lo=10),
}

# The low-rank synthetic setting (lowrank.py, robustness.py): task, teacher, training, eval.
LOWRANK_FIELDS = {
    **TRAINING_FIELDS,
    'd': validation.Int(lo=1),
    'data_scale': validation.Float(lo=0, lo_open=True),
    'energy_matched': validation.Bool(),
    'num_train': validation.Int(lo=0),
    'teacher_hidden': validation.Ints(lo=1),
    'out_dim': validation.Int(lo=2),
    'use_bias': validation.Bool(),
    'teacher_bias_scale': validation.Float(lo=0),
    'strength_decay': validation.Float(lo=0),
    'teacher_per_seed': validation.Bool(),
    'num_eval': validation.Int(lo=2),
    'eval_batch': validation.Int(lo=1),
    'probe_scale': validation.Float(lo=0, lo_open=True),
    'tau': validation.Float(lo=-1, hi=1),
    'attack_norm': validation.Choice(attacks.NORMS),
    'eps': validation.Floats(lo=0, unique=True),
    **ATTACK_FIELDS,
    'num_attack': validation.Int(lo=1),
}


def check_lowrank_rules(config) -> None:
  """Cross-field rules of the low-rank setting (after the table check).

  ``eval_batch`` divides ``num_eval``; the attack ensemble is valid.
  """
  if config.num_eval % config.eval_batch:
    raise ConfigError(f'config.eval_batch must divide config.num_eval = {config.num_eval}, '
                      f'got {config.eval_batch}')
  check_attack_rules(config)


def check_batch_size(config) -> None:
  """Cross-field rule: ``batch_size`` >= each method's ``min_batch_size`` (CCAT: 2)."""
  for name in as_tuple(config.methods):
    least = methods.METHODS[name].min_batch_size
    if config.batch_size < least:
      raise ConfigError(f'config.batch_size must be >= {least} when config.methods has '
                        f'{name}, got {config.batch_size}')


def has_ccat_evaluation(config) -> bool:
  """Whether a method of ``config.methods`` is also evaluated by CCAT's criterion."""
  return any(methods.METHODS[m].ccat_evaluation for m in as_tuple(config.methods))


def spec_columns(config) -> List[str]:
  """``spec_in``, ``spec_off``, and their per-layer columns when the teacher has several
  hidden layers (the deeper layers specialize less: the summaries show each)."""
  n_layers = len(config.teacher_hidden)
  if n_layers < 2:
    return ['spec_in', 'spec_off']
  return (['spec_in'] + [f'spec_in_l{k + 1}' for k in range(n_layers)]
          + ['spec_off'] + [f'spec_off_l{k + 1}' for k in range(n_layers)])


def spec_log_text(rows: Sequence[Mapping[str, Any]], n_layers: int) -> str:
  """``spec_in 0.962 (layers 0.991 / 0.934) spec_off ...``: means over ``rows``.

  Per-layer means appear with several hidden layers; ``n/a`` where a column is
  empty (off-subspace columns at full rank).
  """
  def mean(key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return f'{np.mean(vals):.3f}' if vals else 'n/a'
  parts = []
  for where in ('in', 'off'):
    text = f'spec_{where} {mean(f"spec_{where}")}'
    if n_layers > 1 and mean(f'spec_{where}') != 'n/a':
      text += ' (layers ' + ' / '.join(mean(f'spec_{where}_l{k + 1}')
                                       for k in range(n_layers)) + ')'
    parts.append(text)
  return ' '.join(parts)


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
  num, per_seed_teacher = num_padded_seeds(config), bool(config.teacher_per_seed)
  seed = config.seed

  def draw():  # integer work: exact at any optimization level
    master = jax.random.PRNGKey(seed)
    per_seed = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(master, s), 5))(
        jnp.arange(num))
    keys = SeedKeys(*(per_seed[:, i] for i in range(5)))
    if not per_seed_teacher:
      shared = jax.random.split(jax.random.fold_in(master, 2 ** 31 - 1), 2)
      keys = keys._replace(teacher=jnp.broadcast_to(shared[0], keys.teacher.shape),
                           basis=jnp.broadcast_to(shared[1], keys.basis.shape))
    return keys
  return sweep.jit_once(draw)()


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

  def draw(keys):
    teacher_params = jax.vmap(functools.partial(
        models.random_teacher_params, model=teacher, in_dim=d,
        bias_scale=config.teacher_bias_scale, strength_decay=config.strength_decay))(
            keys.teacher)
    bases = jax.vmap(lambda k: data.random_orthonormal(k, d, d))(keys.basis)
    student_params = jax.vmap(lambda k: student.init(k, jnp.zeros((1, d))))(keys.student)
    return teacher_params, bases, student_params
  return Problem(teacher, student, *sweep.jit_once(draw)(keys))


def rank_projector(bases: jax.Array, r: int) -> jax.Array:
  """``[S, d, d]`` projectors onto the span of the leading ``r`` basis columns."""
  return jax.vmap(lambda u: data.projectors(u)[0])(bases[:, :, :r])


def lowrank_args(bases: jax.Array, r: int, scales: jax.Array) -> Dict[str, jax.Array]:
  """Per-seed ``data_args`` of the online sampler at rank ``r`` (see ``sampler``).

  ``basis`` ``[S, d, r]`` (what the sampler reads), ``projector`` ``[S, d, d]``
  (what the orthogonal augmentation reads) and ``scale`` ``[S]``.
  """
  return {'basis': bases[:, :, :r], 'projector': rank_projector(bases, r), 'scale': scales}


def data_scale(config, r: int) -> float:
  """Per-coordinate std ``s`` of ``z`` at rank ``r`` (see ``energy_matched``)."""
  if config.energy_matched:
    return data.energy_matched_scale(config.d, r, config.data_scale)
  return config.data_scale


def sampler(num_train: int):
  """``(key, data_args, n) -> x``: online low-rank samples, or a fixed training set.

  Online (``num_train = 0``): ``data.sample_subspace`` from ``data_args['basis']``
  (``[d, r]``, ``r`` normals per example) and ``data_args['scale']``; the
  training chunk is compiled once per rank. Fixed: ``num_train`` rows of
  ``data_args['train_x']``, drawn with replacement.
  """
  if num_train == 0:
    return lambda key, a, n: data.sample_subspace(key, a['basis'], n, a['scale'])
  return lambda key, a, n: a['train_x'][jax.random.randint(key, (n,), 0, num_train)]


def make_optimizer(config, num_steps: int = None):
  return train.make_optimizer(
      config.optimizer, config.learning_rate, momentum=config.momentum,
      weight_decay=config.weight_decay, schedule=config.schedule,
      total_steps=num_steps or config.num_steps)


class Background:
  """``fn(*args, **kwargs)`` in a daemon thread, for work that only warms caches.

  ``wait()`` joins it and returns ``fn``'s result, or None when it raised (the
  error is logged: the work it would have saved is then done where it is needed,
  e.g. a program traced and compiled at its first call).
  """

  def __init__(self, name: str, fn: Callable, *args, **kwargs):
    self.name, self._result, self._error = name, None, None
    t0 = time.perf_counter()

    def body():
      try:
        self._result = fn(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except
        self._error = e
      self.seconds = time.perf_counter() - t0
    self.seconds = None
    self._thread = threading.Thread(target=body, name=name, daemon=True)
    self._thread.start()

  def wait(self):
    self._thread.join()
    if self._error is not None:
      logging.warning('%s failed (%s: %s); its work is done when needed instead', self.name,
                      type(self._error).__name__, self._error)
      return None
    return self._result


def train_or_keep_last_good(loss_fn, optimizer, state, teacher_params, data_args, keys, config,
                            workdir: str, stage: str, num_steps: int = None,
                            shared_args=None):
  """``train.train_seeds`` on sharded inputs, with progress and resumable checkpoints.

  ``shared_args``: data every student reads (no seeds axis), replicated once
  per device instead of copied per student. Checkpoints go to
  ``workdir/checkpoints/<stage>`` (at most every ``--checkpoint_every_sec``,
  and at the end); a rerun resumes there. On divergence, saves
  the last good parameters in the workdir and stops with a message. Returns
  the final state (sharded) and the loss history (numpy).
  """
  state, teacher_params, data_args, keys = shard((state, teacher_params, data_args, keys))
  if shared_args is not None:
    shared_args = sweep.replicate(shared_args, mesh())
  checkpointer = sweep.Checkpointer(os.path.join(workdir, 'checkpoints', stage),
                                    every_sec=cli.checkpoint_every_sec())
  num_steps = num_steps or config.num_steps
  on_chunk = cli.progress_logger(stage)
  start = int(np.asarray(sweep.to_host(state.step)).reshape(-1)[0])
  if checkpointer.latest_step() == start + num_steps and num_steps:
    logging.info('%s: already trained (checkpoint at step %d), loaded', cli.stage_label(stage),
                 start + num_steps)
  try:
    return train.train_seeds(loss_fn, optimizer, state, teacher_params, data_args, keys,
                             num_steps=num_steps, chunk_steps=config.chunk_steps,
                             on_chunk=on_chunk, checkpointer=checkpointer,
                             shared_args=shared_args)
  except train.TrainingDivergedError as e:
    path = os.path.join(workdir, f'last_good_params_{stage}.msgpack')
    params = sweep.to_host(e.last_good_state.params)  # a collective: every process
    if jax.process_index() == 0:
      io.save_pytree(path, params)
    raise RunError(f'{e} ({stage}); last good parameters saved to {path}; lower '
                   f'config.learning_rate') from e
  except KeyboardInterrupt:  # maybe held until a checkpoint was written: the newest one
    cli.STATUS.saved_checkpoint(checkpointer.latest_step())
    raise
  finally:
    checkpointer.close()


def train_grid(config, workdir: str, points, make_loss: Callable, make_args: Callable,
               init_params, teacher_params, train_keys, timings: Optional[Dict] = None):
  """Trains every grid point x seed, one compiled method at a time (the studies' loop).

  For each method of ``points`` (``methods.group_by_method``), its ``G``
  grid points x ``S`` seeds form one students axis (grid-major): the initial
  parameters, teacher parameters and keys (each ``[S, ...]``) are tiled
  ``G`` times, ``make_loss(method)`` is the loss and ``make_args(method,
  method_points)`` returns ``(data_args, shared_args)`` (per student, and
  read by every student; ``train_or_keep_last_good``). Checkpoints in
  ``workdir/checkpoints/<method>``; ``timings['train_<method>']`` the seconds.

  Returns:
    ``(params, final_loss)``: host parameters ``[P * S, ...]`` in ``points``
    order and the final training losses ``[P * S]`` (NaN with no steps).
  """
  optimizer = make_optimizer(config)
  s = jax.tree_util.tree_leaves(train_keys)[0].shape[0]
  trained, losses = [], []
  for method, mpoints in methods.group_by_method(points):
    g = len(mpoints)
    t0 = time.perf_counter()
    data_args, shared = make_args(method, mpoints)
    state = jax.vmap(lambda p: train.init_state(p, optimizer))(methods.tile(init_params, g))
    state, loss = train_or_keep_last_good(
        make_loss(method), optimizer, state, methods.tile(teacher_params, g), data_args,
        methods.tile(train_keys, g), config, workdir, method, shared_args=shared)
    trained.append(sweep.to_host(state.params))
    losses.append(loss[:, -1] if loss.size else np.full((g * s,), np.nan))
    seconds = time.perf_counter() - t0
    if timings is not None:
      timings[f'train_{method}'] = seconds
    logging.info('trained %s: %d grid points x %d seeds in %.1fs', method, g, s, seconds)
  params = jax.tree_util.tree_map(lambda *v: np.concatenate(v), *trained)
  return params, np.concatenate(losses)


def grid_point_name(method: str, hp: Mapping[str, Any]) -> str:
  """A grid point's name in the attack checks: its variant, and where AT attacked."""
  name = methods.variant_name(method, hp)
  return f"{name} {hp['at_where']}" if hp.get('at_where') else name


def method_attack_checks(config, points, ev: 'Evaluation', attack_cfg: evaluate.AttackConfig,
                         headline: float) -> Dict[str, Any]:
  """``evaluate.attack_checks`` per grid point (its kept students), summarized.

  Per grid point, not per method: the variants of a method (AT at 0.5 and at 2,
  say) differ in how hard they are to attack, and the convergence check
  (``Evaluation.doubled``) must hold for each.
  """
  s = num_padded_seeds(config)
  checks = {}
  for p, (method, hp) in enumerate(points):
    rows = np.zeros(len(points) * s, bool)
    rows[p * s:p * s + config.num_seeds] = True
    checks[grid_point_name(method, hp)] = evaluate.attack_checks(
        ev.result, ev.final, headline=headline, attacks_run=attack_cfg.attacks,
        convergence_points=attack_cfg.convergence_points(), rows=rows, doubled=ev.doubled)
  summary = attack_checks_summary(config, checks)
  log_unconverged(summary)
  return summary


class Evaluation(NamedTuple):
  """The raw outcome of an evaluation: ``evaluate.Result``, its ``combine``d successes, and
  the convergence check's ``Result`` (the doubled ensemble on the first points), if run."""
  result: evaluate.Result
  final: Dict[Any, np.ndarray]
  doubled: Optional[evaluate.Result] = None


# fold_in(attack key, .): the convergence check's keys (other random starts than the run's).
DOUBLING_KEY = 2 ** 31 - 5


def surrogate_apply(config, student, teacher):
  """``(student, teacher)`` apply functions with surrogate ReLU gradients for ``apgd_pair``.

  None when ``config.surrogate_temperature`` is 0 (exact gradients).
  """
  t = float(config.surrogate_temperature)
  if t == 0:
    return None
  return models.surrogate(student, t).apply, models.surrogate(teacher, t).apply


def doubling_args(config, x: jax.Array, keys: jax.Array, shared: bool = False):
  """The convergence check's inputs: the first ``convergence_points`` of ``x [S, N, ...]``
  (or shared ``[N, ...]`` with ``shared=True``) and ``keys [S]`` folded with ``DOUBLING_KEY``."""
  n = min(int(config.convergence_points), int(config.num_attack))
  return (x[:n] if shared else x[:, :n]), jax.vmap(
      lambda k: jax.random.fold_in(k, DOUBLING_KEY))(keys)


def log_unconverged(checks: Mapping[str, Any]) -> None:
  """A warning per group whose attack has not converged (``evaluate.doubling``)."""
  for name, g in checks['groups'].items():
    d = g.get('doubling')
    if d is not None and not d['converged']:
      before, after = d['cells'][d['max_gain_cell']]
      logging.warning('%s: the attack has not converged: doubling its iterations raises %s '
                      'from %.3f to %.3f on the first %d points (its errors are lower bounds)',
                      name, d['max_gain_cell'], before, after, d['points'])


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

    self.held_out = sweep.jit_once(held_out)  # runs once per rank
    self._spec = jax.jit(spec)
    self._confidence = jax.jit(jax.vmap(confidence))
    self.attack_config = attack_config(config)
    surrogate = surrogate_apply(config, student, teacher)
    self.attacks = evaluate.Evaluator(s_apply, t_apply, norm=c.attack_norm,
                                      config=self.attack_config, surrogate_apply=surrogate)
    self.doubled_attacks = None
    if c.convergence_points:
      self.doubled_attacks = evaluate.Evaluator(s_apply, t_apply, norm=c.attack_norm,
                                                config=self.attack_config.scaled(2),
                                                surrogate_apply=surrogate)

  def ccat_thresholds(self, params, teacher_params, held) -> np.ndarray:
    """``[S]`` thresholds passing ``ccat_pass_rate`` of the correctly classified points."""
    conf, correct = sweep.to_host(self._confidence(params, teacher_params, held['x_eval']))
    return np.array([evaluate.ccat_threshold(cf, ok, self.config.ccat_pass_rate)
                     for cf, ok in zip(conf, correct)], np.float32)

  def attack(self, params, teacher_params, projector, held, full_rank: bool,
             labels_kinds=LOWRANK_LABELS, thresholds=None, check: bool = True,
             progress: Optional[Callable[[str], Callable]] = None) -> Evaluation:
    """The attack ensemble in S (``in``), S_perp (``off``) and unconstrained (``full``).

    At full rank there is no complement and ``in`` is the whole space: only
    ``full`` is attacked (``rows`` copies it to ``in``). With ``check`` and
    ``convergence_points > 0``, the doubled ensemble attacks the first points again
    (``Evaluation.doubled``). ``progress``: ``what -> on_progress``
    (``evaluate.Evaluator.run``), called once per run of the ensemble.
    """
    progress = progress or (lambda what: None)
    args, kwargs = self._attack_args(params, teacher_params, projector, held, full_rank,
                                     labels_kinds, thresholds)
    result = self.attacks.run(*args, on_progress=progress('the ensemble'), **kwargs)
    doubled = None
    if check and self.doubled_attacks is not None:
      doubled = self.doubled_attacks.run(*self._doubling_args(args),
                                         on_progress=progress('the convergence check'),
                                         **kwargs)
    return Evaluation(result, evaluate.combine(result), doubled)

  def _doubling_args(self, args):
    params, teacher_params, x, keys = args
    return (params, teacher_params, *doubling_args(self.config, x, keys))

  def _attack_args(self, params, teacher_params, projector, held, full_rank, labels_kinds,
                   thresholds):
    """``evaluate.Evaluator.run``'s arguments: ``(args, kwargs)`` unpacked by the caller."""
    d = projector.shape[-1]
    projs = {}
    if not full_rank:
      eye = jnp.eye(d, dtype=projector.dtype)
      projs = {'in': projector, 'off': shard(eye[None] - projector)}
    return ((params, teacher_params, held['x_attack'], held['pgd_key']),
            dict(eps=self.config.eps, labels_kinds=labels_kinds, projectors=projs,
                 thresholds=thresholds, identity_full=self.config.attack_norm == 'l2'))

  @staticmethod
  def _spec_args(params, teacher_params, projector, held):
    """The specialization program's arguments (``evaluate`` and ``prepare`` alike)."""
    return params, teacher_params, held['x_eval'], projector, held['probe_key']

  def prepare(self, params, teacher_params, projector, held, full_rank: bool) -> int:
    """Traces, lowers and compiles ``evaluate``'s programs for these shapes; runs nothing.

    ``params``: any students of the evaluated ones' structure (e.g. before training).
    The low-rank binary calls it in a background thread (``Background``) while the
    first students train. Returns the number of programs prepared.
    """
    params, teacher_params, projector, held = shard((params, teacher_params, projector, held))
    self._spec.trace(*self._spec_args(params, teacher_params, projector, held)).lower().compile()
    args, kwargs = self._attack_args(params, teacher_params, projector, held, full_rank,
                                     LOWRANK_LABELS, None)
    prepared = 1 + self.attacks.prepare(*args, **kwargs)
    if self.doubled_attacks is not None:
      prepared += self.doubled_attacks.prepare(*self._doubling_args(args), **kwargs)
    return prepared

  def evaluate(self, params, teacher_params, projector, held, full_rank: bool,
               progress: Optional[Callable[[str], Callable]] = None):
    """Metrics of a batch of students ``[S, ...]``; off-subspace ones are None at full rank.

    Inputs are laid over the seeds mesh (``shard``); S must be a multiple of
    the device count. ``progress``: as in ``attack``. Returns ``(rows, Evaluation)``.
    """
    c = self.config
    num = projector.shape[0]
    d = projector.shape[-1]
    rank = int(round(float(np.trace(np.asarray(sweep.to_host(projector)[0])))))
    params, teacher_params, projector, held = shard((params, teacher_params, projector, held))
    spec = sweep.to_host(self._spec(*self._spec_args(params, teacher_params, projector, held)))
    ev = self.attack(params, teacher_params, projector, held, full_rank, progress=progress)
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
