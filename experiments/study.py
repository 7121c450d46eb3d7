"""The studies' glue between a config and the library: what every binary builds the same way.

A binary's config (``experiments/configs/*.py``) names its fields as the library's
arguments (the attack ensemble is the section ``config.attack``, passed whole to
``evaluate.preset``), and this module turns it into them: the attack ensemble
(``attack_config``), the low-rank setting and its evaluator (``setting``,
``lowrank_evaluator``), the seeds mesh and its padding (``mesh``, ``shard``,
``num_padded_seeds``), the optimizer; the cross-field checks every study shares; the
training loop of the studies (``train_or_keep_last_good``, ``train_grid``: progress,
resumable checkpoints, the last good state kept on divergence) and the result files
(``write_results``, the columns ``metric_columns`` / ``spec_columns``).
"""

import functools
import os
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from experiments import cli
from experiments.validation import ConfigError
from tsrobust import evaluate
from tsrobust import io
from tsrobust import lowrank
from tsrobust import lowrank_eval
from tsrobust import methods
from tsrobust import sweep
from tsrobust import train

def as_tuple(v) -> tuple:
  """A config value that may be a single item or a sequence, as a tuple."""
  return (v,) if isinstance(v, (str, int, float)) else tuple(v)


eps_name = lowrank_eval.eps_name


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
# The attack ensemble and the cross-field rules.
# ----------------------------------------------------------------------------

def check_attack_rules(config) -> None:
  """Cross-field rule: the preset with its overrides must make a valid attack ensemble."""
  try:
    cfg = attack_config(config)
  except ValueError as e:
    raise ConfigError(f'config.attack: {e}') from e
  if not cfg.attacks_for('fixed'):
    raise ConfigError(f'config.attack: only {cfg.attacks} would run, '
                      f'for oracle labels only; the clean-label evaluations need another attack '
                      f'(pgd, apgd, apgd_t or square)')


def attack_config(config) -> evaluate.AttackConfig:
  """The ``evaluate.AttackConfig`` of ``config.attack`` (its keys are ``evaluate.preset``'s)."""
  return evaluate.preset(**config.attack)


def headline_eps(config) -> float:
  """The budget summaries and figures show: the middle of ``config.eps`` as written."""
  return config.eps[len(config.eps) // 2]


def check_teacher_rules(config) -> None:
  """Cross-field rules of the teachers axis: ``num_seeds`` (students per grid point) is a
  multiple of ``students_per_teacher``; with one shared teacher (``teacher_per_seed``
  False) ``students_per_teacher`` is 1 or ``num_seeds`` (every student that teacher's)."""
  k, n = config.students_per_teacher, config.num_seeds
  if not config.teacher_per_seed:
    if k not in (1, n):
      raise ConfigError(f'config.students_per_teacher must be 1 or config.num_seeds = {n} '
                        f'when config.teacher_per_seed is False (one teacher shared by every '
                        f'student), got {k}')
  elif n % k:
    raise ConfigError(f'config.num_seeds must be a multiple of config.students_per_teacher = '
                      f'{k} (the students of each teacher), got {n}')


def check_lowrank_rules(config) -> None:
  """Cross-field rules of the low-rank setting (after the table check).

  ``eval_batch`` divides ``num_eval``; the teachers axis (``check_teacher_rules``); the
  attack ensemble is valid.
  """
  if config.num_eval % config.eval_batch:
    raise ConfigError(f'config.eval_batch must divide config.num_eval = {config.num_eval}, '
                      f'got {config.eval_batch}')
  check_teacher_rules(config)
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


# ----------------------------------------------------------------------------
# The low-rank setting, its evaluator and its result columns.
# ----------------------------------------------------------------------------

def setting(config) -> lowrank.Setting:
  """The ``lowrank.Setting`` of a low-rank config (its fields of the same names)."""
  return lowrank.from_mapping(lowrank.Setting, config)


def eval_setting(config) -> lowrank_eval.EvalSetting:
  """The ``lowrank_eval.EvalSetting`` of a low-rank config (its fields of the same names)."""
  return lowrank.from_mapping(lowrank_eval.EvalSetting, config)


def lowrank_evaluator(config, problem: lowrank.Problem) -> lowrank_eval.LowRankEvaluator:
  """The evaluator of a low-rank config's students."""
  return lowrank_eval.LowRankEvaluator(
      eval_setting(config), attack_config(config),
      problem.teacher, problem.student, num_train=config.num_train, mesh=mesh())


def seed_keys(config) -> lowrank.SeedKeys:
  """The keys of ``num_padded_seeds(config)`` seeds (``lowrank.seed_keys``), grouped into
  teachers as the setting says (a config without ``students_per_teacher``: 1)."""
  s = setting(config)
  return lowrank.seed_keys(config.seed, num_padded_seeds(config), bool(s.teacher_per_seed),
                           s.students_per_teacher)


def teachers(config) -> List[int]:
  """The teacher of each kept seed ``0..num_seeds - 1`` (``lowrank.teacher_ids``): the
  results' ``teacher`` column."""
  s = setting(config)
  return lowrank.teacher_ids(config.num_seeds, bool(s.teacher_per_seed),
                             s.students_per_teacher).tolist()


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
  """Columns of one student's evaluation (``lowrank_eval.metric_columns``), in order."""
  return lowrank_eval.metric_columns(len(config.teacher_hidden), config.eps,
                                     attack_config(config).attacks)


def oracle_error_columns(config) -> List[str]:
  """The oracle errors the summaries give teacher-level intervals: in S and off S at the
  headline budget, the full space at every budget."""
  mid = eps_name(headline_eps(config))
  return ([f'adv_oracle_in_{mid}', f'adv_oracle_off_{mid}']
          + [f'adv_oracle_full_{eps_name(e)}' for e in config.eps])


def attack_rows(config, ev: lowrank_eval.Evaluation, full_rank: bool) -> List[Dict[str, Any]]:
  """Per-student ``adv_*`` columns (``lowrank_eval.attack_rows``)."""
  return lowrank_eval.attack_rows(ev, config.eps, attack_config(config).attacks, full_rank)


# ----------------------------------------------------------------------------
# Seeds over devices, training.
# ----------------------------------------------------------------------------

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
                            shared_args=None, batching: str = 'vmap'):
  """``train.train_seeds`` on sharded inputs, with progress and resumable checkpoints.

  ``shared_args``: data every student reads (no seeds axis), replicated once
  per device instead of copied per student. ``batching``: ``train.train_seeds``'
  (``'map'``: each device's students one at a time). Checkpoints go to
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
                             shared_args=shared_args, batching=batching)
  except train.TrainingDivergedError as e:
    path = os.path.join(workdir, f'last_good_params_{stage}.msgpack')
    params = sweep.to_host(e.last_good_state.params)  # a collective: every process
    if jax.process_index() == 0:
      io.save_pytree(path, params)
    raise cli.RunError(f'{e} ({stage}); last good parameters saved to {path}; lower '
                   f'config.learning_rate') from e
  except KeyboardInterrupt:  # maybe held until a checkpoint was written: the newest one
    cli.STATUS.saved_checkpoint(checkpointer.latest_step())
    raise
  finally:
    checkpointer.close()


def train_grid(config, workdir: str, points, make_loss: Callable, make_args: Callable,
               init_params, teacher_params, train_keys, timings: Optional[Dict] = None,
               batching: str = 'vmap'):
  """Trains every grid point x seed, one compiled method at a time (the studies' loop).

  For each method of ``points`` (``methods.group_by_method``), its ``G``
  grid points x ``S`` seeds form one students axis (grid-major): the initial
  parameters, teacher parameters and keys (each ``[S, ...]``) are tiled
  ``G`` times, ``make_loss(method)`` is the loss and ``make_args(method,
  method_points)`` returns ``(data_args, shared_args)`` (per student, and
  read by every student; ``train_or_keep_last_good``). Checkpoints in
  ``workdir/checkpoints/<method>``; ``timings['train_<method>']`` the seconds.
  ``batching``: ``train.train_seeds``' (the image study: ``sweep.default_seed_batching()``).

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
        methods.tile(train_keys, g), config, workdir, method, shared_args=shared,
        batching=batching)
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


