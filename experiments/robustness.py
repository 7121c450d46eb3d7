r"""The specialization-robustness study (PAPER.md sections 4-7, claims 4-5).

On the low-rank synthetic setting (one rank r < d), trains students with
every method of a grid - standard training, PGD adversarial training (several
budgets, unconstrained and restricted to the data subspace), CCAT, and noise
augmentation in the orthogonal complement of the data subspace or
isotropic (the control) at several scales - ``num_seeds`` students per grid
point. Each method is compiled once: its grid points and seeds form one
vmapped axis. All students are then evaluated together as in the low-rank
experiment, and specialization is correlated with robust accuracy.

    python -m experiments.robustness --workdir=runs/robustness \
        [--config=experiments/configs/robustness.py] [--config.FIELD=VALUE ...]

Teachers are a replicated axis: ``num_seeds`` students per grid point,
``students_per_teacher`` (K) to a teacher, so ``num_seeds / K`` teachers; seed ``s`` is
a student of teacher ``s // K`` at every grid point. Intervals treat the teacher as the
unit (``tsrobust.clustered``).

Writes into ``--workdir``: ``results.csv`` / ``results.json`` (one row per
student, with its ``teacher``), ``correlation.json``, ``summary.md`` (mean +- std per
grid point; correlations; teacher-level intervals per grid point, paired differences
against standard training and the correlation within grid points) and
``robustness.png`` (specialization vs robust accuracy, one color per method).
"""

import os
import time
from typing import Any, Dict, List, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments import study
from experiments import summaries
from experiments import validation
from experiments.configs import robustness as robustness_config
from tsrobust import evaluate
from tsrobust import io
from tsrobust import lowrank
from tsrobust import lowrank_eval
from tsrobust import methods as methods_lib
from tsrobust import plotting

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'robustness.py')

HPARAM_COLUMNS = methods_lib.hparam_columns(with_at_where=True)


# Every config field: type, range, choices (validation.check_config), beside the defaults.
CONFIG_FIELDS = robustness_config.FIELDS


def validate_config(config) -> None:
  """Checks every field at start; raises ``validation.ConfigError`` naming the field.

  The table ``CONFIG_FIELDS``, then the cross-field rules: ``rank < d``,
  each method's smallest ``batch_size`` (CCAT: 2), and ``study.check_lowrank_rules``
  (``eval_batch`` divides ``num_eval``; ``num_seeds`` a multiple of
  ``students_per_teacher``; a valid attack ensemble).
  """
  validation.check_config(config, CONFIG_FIELDS)
  if config.rank >= config.d:
    raise validation.ConfigError(
        f'config.rank must satisfy 1 <= rank < d = {config.d} (the study needs an '
        f'off-subspace), got {config.rank}')
  study.check_batch_size(config)
  study.check_lowrank_rules(config)


def grid(config) -> List[methods_lib.GridPoint]:
  """``(method, hyper-parameters)`` of every grid point (``methods_lib.grid``, with at_where)."""
  return methods_lib.grid(study.as_tuple(config.methods), at_eps=config.at_eps,
                          ccat_eps=config.ccat_eps, aug_scales=config.aug_scales,
                          at_where=study.as_tuple(config.at_where), at_label=config.at_label)


def columns(config) -> List[str]:
  cols = ['method', *HPARAM_COLUMNS, 'teacher', 'seed'] + study.metric_columns(config)
  if study.has_ccat_evaluation(config):
    cols += ['ccat_threshold'] + [f'ccat_err_{study.eps_name(e)}' for e in config.eps]
    cols += [f'ccat_accepted_wrong_{study.eps_name(e)}' for e in config.eps]
  return cols


def method_settings(config) -> methods_lib.Settings:
  """The methods' settings of ``config`` (unbounded inputs, budgets as written)."""
  return methods_lib.Settings(
      loss=config.loss, batch_size=config.batch_size, at_norm=config.at_norm,
      at_steps=config.at_steps, at_label=config.at_label, at_fraction=config.at_fraction,
      ccat_norm=config.ccat_norm, ccat_steps=config.ccat_steps, ccat_rho=config.ccat_rho,
      aug_fraction=config.aug_fraction, step_factor=config.attack.pgd_step_factor)


def grid_point_of(record: Dict[str, Any]) -> str:
  """A record's grid point, named as in the attack checks (``study.grid_point_name``)."""
  return study.grid_point_name(record['method'], record)


def robust_accuracy_name(eps) -> str:
  """The robust accuracy at budget ``eps`` as the tables name it."""
  return f'1 - adv_oracle_full_{study.eps_name(eps)}'


def teacher_level(config, records) -> Dict[str, Any]:
  """Teacher-level inference (``tsrobust.clustered``; ``summaries``' teacher functions).

  ``'oracle_error'``: per grid point, ``study.oracle_error_columns`` with the t-interval over
  teachers; ``'paired_vs_standard'``: per grid point, its oracle error minus standard
  training's, per teacher, at the headline budget, full space and off S (None without
  ``standard``); ``'within_grid_points'``: per budget, the correlation of ``spec_off``
  with robust accuracy within grid points, pooled by Fisher z
  (``summaries.within_correlations``).
  """
  mid = study.eps_name(study.headline_eps(config))
  within = {}
  kept = [r for r in records if r['spec_off'] is not None and np.isfinite(r['spec_off'])]
  for eps in config.eps:
    name = study.eps_name(eps)
    within[robust_accuracy_name(eps)] = summaries.within_correlations(
        [r['spec_off'] for r in kept], [1.0 - r[f'adv_oracle_full_{name}'] for r in kept],
        [grid_point_of(r) for r in kept], [r['teacher'] for r in kept])
  return {
      'unit': 'teacher', 'level': 0.95,
      'oracle_error': summaries.teacher_intervals(records, grid_point_of,
                                                  study.oracle_error_columns(config)),
      'paired_vs_standard': summaries.paired_differences(
          records, grid_point_of, 'standard', [f'adv_oracle_full_{mid}', f'adv_oracle_off_{mid}']),
      'within_grid_points': {'x': 'spec_off', 'by_robust_accuracy': within}}


def correlations(config, records) -> Dict[str, Any]:
  """Pearson / Spearman of robust accuracy vs specialization: pooled, within methods,
  bootstrapped by teacher; and the teacher-level inference (``teacher_level``)."""
  key = jax.random.PRNGKey(config.seed)
  teachers = [r['teacher'] for r in records]
  out = {'robust_accuracy': '1 - adv_oracle_full_{eps}', 'n_students': len(records),
         'n_teachers': len(set(teachers)),
         'students_per_teacher': int(config.students_per_teacher),
         'bootstrap': 'clustered by teacher'}
  spec = {'spec_in': np.array([r['spec_in'] for r in records]),
          'spec_off': np.array([r['spec_off'] for r in records])}
  spec['spec_mean'] = (spec['spec_in'] + spec['spec_off']) / 2
  methods = [r['method'] for r in records]
  for i, eps in enumerate(config.eps):
    name = study.eps_name(eps)
    acc = 1.0 - np.array([r[f'adv_oracle_full_{name}'] for r in records])
    out[f'eps_{name}'] = {
        s_name: summaries.correlation(s_val, acc, methods, teachers,
                                      jax.random.fold_in(key, 10 * i + j),
                                      config.bootstrap_resamples, unit='teacher')
        for j, (s_name, s_val) in enumerate(spec.items())}
  out['teacher_level'] = teacher_level(config, records)
  return out


def correlation_markdown(config, corr) -> str:
  """Per specialization measure, the correlation table over budgets."""
  parts = []
  for s_name in ('spec_off', 'spec_in', 'spec_mean'):
    names = [study.eps_name(e) for e in config.eps]
    reports = {f'1 - adv_oracle_full_{n}': corr[f'eps_{n}'][s_name] for n in names}
    parts.append(summaries.correlation_markdown(
        reports, s_name, config.bootstrap_resamples,
        resampled='teachers: all students of a teacher move together',
        within_note='*Within* is within *methods*: it pools a method\'s variants (e.g. AT '
                    'restricted to S with unconstrained AT), so it can show a contrast of '
                    'variants; the correlation within grid points is in "Teacher-level '
                    'inference" below, beside it.'))
  return '\n'.join(parts)


def teacher_level_markdown(config, corr) -> str:
  """The teacher-level sections of summary.md: oracle error per grid point, paired
  differences against standard training, the correlation within grid points."""
  tl = corr['teacher_level']
  mid = study.eps_name(study.headline_eps(config))
  t, k = corr['n_teachers'], corr['students_per_teacher']
  parts = [f'## Teacher-level inference ({t} teachers x {k} student(s) per teacher per grid '
           'point)', '',
           summaries.teacher_intervals_markdown(
               tl['oracle_error'], 'grid point', study.oracle_error_columns(config),
               'Oracle adversarial error per grid point: the mean over teachers of each '
               'teacher\'s mean over its students, with the 95% t-interval over the teachers '
               '(`clustered.teacher_mean_interval`, T - 1 degrees of freedom; students of one '
               'teacher are not independent draws, so the teacher is the unit; not clipped to '
               '[0, 1]). In S and off S '
               f'at the headline budget {mid}, the full space at every budget. With few '
               'teachers these intervals are wide: that is what the study can say.')]
  diffs = tl['paired_vs_standard']
  if diffs is None:
    parts += ['No `standard` grid point: no paired differences against standard training.', '']
  else:
    parts.append(summaries.paired_differences_markdown(
        diffs, 'grid point', [f'adv_oracle_full_{mid}', f'adv_oracle_off_{mid}'],
        f'Paired differences against standard training at the headline budget {mid}: per '
        'teacher, the grid point\'s mean oracle error minus standard training\'s (the same '
        'teacher, so its own level cancels), then the mean over teachers with the 95% '
        't-interval over the per-teacher differences (`clustered.paired_difference`). '
        'Negative: more robust than standard training.', baseline='standard'))
  parts.append(summaries.within_correlations_markdown(
      tl['within_grid_points']['by_robust_accuracy'],
      'Within grid points: the Pearson correlation of `spec_off` with robust accuracy among '
      'the students of one grid point, pooled over grid points by Fisher z '
      '(`clustered.pooled_within_correlation`, groups = grid points). It stands beside the '
      '*within methods* column above, which mixes variants. Its interval treats the grid '
      'points as independent; they share the teachers, so it is too narrow. *Teacher x grid '
      'point*: within the students of one teacher at one grid point (needs >= 4 students '
      'per teacher, `students_per_teacher`), pooled per teacher, then the t-interval over '
      'the teachers: the teacher-level interval (`-`: no cell large enough, or fewer than 2 '
      'teachers).', groups='grid points', group='grid point'))
  return '\n'.join(parts)


class Students(NamedTuple):
  """A robustness config's trained students and what their evaluation reads.

  ``params`` holds ``len(points) * num_padded`` students (grid-major, on the host);
  ``projector [num_padded, d, d]``, ``held`` (``LowRankEvaluator.held_out``) and the
  ``problem``'s teachers are per seed, the same at every grid point.
  """
  points: List[methods_lib.GridPoint]
  problem: lowrank.Problem
  evaluator: lowrank_eval.LowRankEvaluator
  projector: Any
  held: Dict[str, Any]
  params: Any
  losses: np.ndarray
  num_padded: int


def trained_students(config, workdir: str) -> Students:
  """Trains every grid point's students, or reloads them from ``workdir``'s checkpoints
  (a finished run's: nothing is trained again; ``study.train_grid``)."""
  points = grid(config)
  r = config.rank
  s = study.num_padded_seeds(config)  # >= num_seeds; the padded seeds are dropped
  keys = study.seed_keys(config)
  problem = lowrank.build_problem(study.setting(config), keys)
  evaluator = study.lowrank_evaluator(config, problem)
  scales = jnp.full((s,), lowrank.data_scale(study.setting(config), r))
  lowrank_args = lowrank.lowrank_args(problem.bases, r, scales)
  projector = lowrank_args['projector']
  held = evaluator.held_out(projector, scales, keys.eval)
  settings = method_settings(config)
  sample = lowrank.sampler(config.num_train)

  def make_loss(method):
    return methods_lib.make_loss(method, problem.student.apply, problem.teacher.apply, sample,
                                 settings)

  def make_args(method, mpoints):  # per student: every seed has its own subspace
    g = len(mpoints)
    args = {**{k: methods_lib.tile(v, g) for k, v in lowrank_args.items()},
            **methods_lib.student_args(mpoints, s, settings),
            **methods_lib.subspace_args(mpoints, projector)}
    if config.num_train:
      args['train_x'] = methods_lib.tile(held['train_x'], g)
    return args, None
  params, losses = study.train_grid(config, workdir, points, make_loss, make_args,
                                    problem.student_params, problem.teacher_params, keys.train)
  return Students(points, problem, evaluator, projector, held, params, losses, s)


def train_and_evaluate(config, workdir: str) -> List[Dict[str, Any]]:
  """Runs the study and writes the result files; returns the records."""
  validate_config(config)
  cli.prepare_workdir(workdir, config)
  trained = trained_students(config, workdir)
  points, problem, evaluator = trained.points, trained.problem, trained.evaluator
  projector, held, params, losses = trained.projector, trained.held, trained.params, trained.losses
  s = trained.num_padded

  # Evaluate every student at once: one compilation for the whole study.
  t0 = time.perf_counter()
  n_points = len(points)
  tparams = methods_lib.tile(problem.teacher_params, n_points)
  held_all = methods_lib.tile(held, n_points)
  proj_all = methods_lib.tile(projector, n_points)
  rows, ev = evaluator.evaluate(params, tparams, proj_all, held_all, full_rank=False,
                                groups=summaries.grid_groups(config, points),
                                progress=lambda what: cli.evaluation_progress(
                                    f'the students, {what}'))
  sel = np.flatnonzero(np.repeat([methods_lib.METHODS[m].ccat_evaluation for m, _ in points],
                                 s))
  if sel.size:
    # CCAT's own evaluation: threshold passing ccat_pass_rate of the correctly classified
    # held-out points, the ensemble plus CCAT's objective judged by acceptance and the oracle.
    pick = lambda tree: jax.tree_util.tree_map(lambda v: v[sel], tree)
    c_params, c_tparams, c_held, c_proj = study.shard(
        (pick(params), pick(tparams), pick(held_all), pick(proj_all)))
    thresholds = evaluator.ccat_thresholds(c_params, c_tparams, c_held)
    ev_c = evaluator.attack(c_params, c_tparams, c_proj, c_held, full_rank=False,
                            labels_kinds=('ccat',), thresholds=thresholds, check=False,
                            progress=lambda what: cli.evaluation_progress(
                                f"CCAT students by CCAT's criterion, {what}"))
    ev = lowrank_eval.Evaluation(ev.result, evaluate.merge_ccat(ev.final, ev_c.final, sel),
                                 ev.convergence, ev.reference)
    for row, a in zip(rows, study.attack_rows(config, ev, full_rank=False)):
      row.update(a)
    names = {float(e): study.eps_name(e) for e in config.eps}
    for i, c_row, threshold in zip(sel, evaluate.ccat_records(ev_c.result, ev_c.final, names),
                                   thresholds):
      rows[i].update(c_row, ccat_threshold=float(threshold))
  logging.info('evaluated %d students in %.1fs', len(rows), time.perf_counter() - t0)
  checks = summaries.method_attack_checks(config, points, ev, evaluator.attack_config,
                                          study.headline_eps(config))
  records = methods_lib.records(points, config.num_seeds, s, HPARAM_COLUMNS, losses, rows,
                                teachers=study.teachers(config))

  mid = study.eps_name(study.headline_eps(config))
  corr = correlations(config, records)
  study.write_results(workdir, config, records, columns(config))
  summary_cols = study.spec_columns(config) + [
      'wcos_off', 'clean_agree', f'adv_oracle_in_{mid}', f'adv_oracle_off_{mid}',
      f'adv_oracle_full_{mid}']
  if sel.size:
    summary_cols += [f'ccat_accepted_wrong_{mid}', f'ccat_err_{mid}']
  if jax.process_index() == 0:
    io.write_json(os.path.join(workdir, 'correlation.json'), corr)
    io.write_json(os.path.join(workdir, 'attack_checks.json'), checks)
    io.atomic_write_text(os.path.join(workdir, 'summary.md'), io.markdown_summary(
        records, ['method', 'at_eps', 'at_where', 'ccat_eps', 'aug_scale'], summary_cols)
        + '\n' + correlation_markdown(config, corr) + '\n' + teacher_level_markdown(config, corr)
        + '\n' + summaries.attack_checks_markdown(checks))
    plotting.plot_spec_vs_robustness(os.path.join(workdir, 'results.csv'),
                                     os.path.join(workdir, 'robustness.png'), eps=mid,
                                     norm=config.attack_norm)
  c_mid = corr[f'eps_{mid}']['spec_off']
  logging.info('spec_off vs robust accuracy at eps %s: pearson %.3f [%.3f, %.3f]', mid,
               c_mid['pearson'], *c_mid['pearson_ci'])
  return records


if __name__ == '__main__':
  cli.run_binary(validate_config, train_and_evaluate, _DEFAULT_CONFIG,
                 ('results.csv', 'results.json', 'correlation.json', 'summary.md',
                  'attack_checks.json', 'robustness.png'),
                 fields=CONFIG_FIELDS, doc=__doc__)
