r"""The low-rank teacher-student experiment (PAPER.md sections 1-5, claims 1-3).

For every rank r in ``config.ranks`` it trains ``config.num_seeds`` students
(a vmapped seeds axis) on inputs from an r-dimensional subspace, labelled by
a random teacher, then measures specialization in and out of the subspace,
first-layer weight alignment, and PGD adversarial error judged by the oracle
with perturbations restricted to the subspace, to its complement, or free.

    python -m experiments.lowrank --workdir=runs/lowrank \
        [--config=experiments/configs/lowrank.py] [--config.num_seeds=16 ...]

Teachers are a replicated axis: ``students_per_teacher`` (K) of the ``num_seeds`` seeds per
rank share a teacher and subspace (seed ``s``: teacher ``s // K``; results' ``teacher``
column).

Writes ``results.csv``, ``results.json``, ``summary.md`` (mean +- std per rank, the oracle
error per rank with teacher-level intervals, and the attack checks), ``attack_checks.json``
(the raw attacks' invariant violations, points only Square broke, APGD's error vs
iterations) and ``lowrank.png`` into ``--workdir``.
"""

import os
import time
from typing import Any, Dict, List

from absl import logging
import jax
import numpy as np

from experiments import cli
from experiments import study
from experiments import summaries
from experiments import validation
from experiments.configs import lowrank as lowrank_config
from tsrobust import evaluate
from tsrobust import io
from tsrobust import lowrank
from tsrobust import plotting

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'lowrank.py')


# Every config field: type, range, choices (validation.check_config), beside the defaults.
CONFIG_FIELDS = lowrank_config.FIELDS


def validate_config(config) -> None:
  """Checks every field at start; raises ``validation.ConfigError`` naming the field.

  The table ``CONFIG_FIELDS``, then the cross-field rules: every rank <= ``d``,
  and ``study.check_lowrank_rules`` (``eval_batch`` divides ``num_eval``; ``num_seeds``
  a multiple of ``students_per_teacher``; a valid attack ensemble).
  """
  validation.check_config(config, CONFIG_FIELDS)
  for r in config.ranks:
    if r > config.d:
      raise validation.ConfigError(f'config.ranks must satisfy 1 <= r <= d = {config.d}, '
                                   f'got r = {r}')
  study.check_lowrank_rules(config)


def columns(config) -> List[str]:
  """The CSV columns, in order."""
  return ['rank', 'teacher', 'seed'] + study.metric_columns(config)


def teacher_level_markdown(config, records) -> str:
  """summary.md's oracle error per rank with the t-interval over teachers
  (``summaries.teacher_intervals``): in S and off S at the headline budget, the full space
  at every budget."""
  mid = study.eps_name(study.headline_eps(config))
  cols = study.oracle_error_columns(config)
  intervals = summaries.teacher_intervals(records, lambda r: r['rank'], cols)
  t = len({r['teacher'] for r in records})
  return (f'## Teacher-level intervals ({t} teachers x {config.students_per_teacher} '
          'student(s) per teacher per rank)\n\n' + summaries.teacher_intervals_markdown(
              intervals, 'rank', cols,
              'Oracle adversarial error per rank: the mean over teachers of each teacher\'s '
              'mean over its students, with the 95% t-interval over the teachers '
              '(`clustered.teacher_mean_interval`, T - 1 degrees of freedom; students of one '
              'teacher are not independent draws, so the teacher is the unit; not clipped to '
              '[0, 1]). In S and off S '
              f'at the headline budget {mid} (off S: `-` at full rank), the full space at every '
              'budget. With few teachers these intervals are wide: that is what the run can '
              'say.'))


Run = lowrank.Run


def build(config) -> lowrank.Run:
  """The run's seed keys, teachers / bases / students, optimizer, loss and evaluator."""
  return lowrank.build_run(
      study.setting(config), study.eval_setting(config),
      study.attack_config(config), seed=config.seed, num_seeds=study.num_padded_seeds(config),
      optimizer=study.make_optimizer(config), loss=config.loss, batch_size=config.batch_size,
      mesh=study.mesh())


def rank_inputs(config, run: lowrank.Run, r: int):
  """``(data_args, held, state)`` at rank ``r`` (``lowrank.rank_inputs``)."""
  return lowrank.rank_inputs(run, study.setting(config), r)


def train_and_evaluate(config, workdir: str) -> List[Dict[str, Any]]:
  """Runs the experiment and writes the result files; returns the records."""
  validate_config(config)
  cli.prepare_workdir(workdir, config)
  d = config.d
  run = build(config)
  keys, problem, optimizer, loss_fn, evaluator = run

  records, checks = [], {}
  teachers = study.teachers(config)
  for r in config.ranks:
    t0 = time.perf_counter()
    data_args, held, state = rank_inputs(config, run, r)
    projector = data_args['projector']
    warm = None
    if r == config.ranks[0] and jax.process_count() == 1:
      # The evaluation's programs, compiled while the students train (in a single-process
      # run; with several processes each compiles them at their first call, as before).
      warm = study.Background('evaluation programs', evaluator.prepare, state.params,
                              problem.teacher_params, projector, held, full_rank=r == d)
    state, losses = study.train_or_keep_last_good(
        loss_fn, optimizer, state, problem.teacher_params, data_args, keys.train, config,
        workdir, f'rank{r}')
    prepared = warm.wait() if warm is not None else None
    if prepared is not None:
      logging.info('%d evaluation programs prepared in %.1fs beside the training', prepared,
                   warm.seconds)
    kept = np.arange(projector.shape[0]) < config.num_seeds
    rows, ev = evaluator.evaluate(state.params, problem.teacher_params, projector, held,
                                  full_rank=r == d, groups={'all': kept},
                                  progress=lambda what: cli.evaluation_progress(
                                      f'rank {r}, {what}'))
    rows = rows[:config.num_seeds]
    checks[f'rank_{r}'] = evaluate.attack_checks(
        ev.result, ev.final, headline=study.headline_eps(config),
        attacks_run=evaluator.attack_config.attacks,
        convergence_points=evaluator.attack_config.convergence_points(), rows=kept,
        convergence=summaries.group_convergence(ev, 'all'))
    if summaries.group_reference(ev, 'all') is not None:
      checks[f'rank_{r}']['reference'] = summaries.group_reference(ev, 'all')
    for i, row in enumerate(rows):
      records.append({'rank': r, 'teacher': teachers[i], 'seed': i,
                      'train_loss': float(losses[i, -1])
                      if losses.size else None, **row})
    logging.info('rank %d done in %.1fs: %s clean_agree %.3f', r, time.perf_counter() - t0,
                 study.spec_log_text(rows, len(config.teacher_hidden)),
                 np.mean([x['clean_agree'] for x in rows]))

  study.write_results(workdir, config, records, columns(config))
  mid = study.eps_name(study.headline_eps(config))
  checks = summaries.attack_checks_summary(config, checks)
  summaries.log_unconverged(checks)
  if jax.process_index() == 0:
    io.write_json(os.path.join(workdir, 'attack_checks.json'), checks)
    io.atomic_write_text(os.path.join(workdir, 'summary.md'), io.markdown_summary(
        records, ['rank'], study.spec_columns(config) + [
            'wcos_in', 'wcos_off', 'wcos_off_random', 'clean_agree', f'adv_oracle_in_{mid}',
            f'adv_oracle_off_{mid}', f'adv_oracle_full_{mid}', f'adv_fixed_full_{mid}'])
        + '\n' + teacher_level_markdown(config, records)
        + '\n' + summaries.attack_checks_markdown(checks))
    plotting.plot_lowrank(os.path.join(workdir, 'results.csv'),
                          os.path.join(workdir, 'lowrank.png'), eps=mid,
                          norm=config.attack_norm)
  return records


if __name__ == '__main__':
  cli.run_binary(validate_config, train_and_evaluate, _DEFAULT_CONFIG,
                 ('results.csv', 'results.json', 'summary.md', 'attack_checks.json',
                  'lowrank.png'),
                 fields=CONFIG_FIELDS, doc=__doc__)
