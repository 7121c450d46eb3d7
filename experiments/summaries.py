"""What the binaries report besides results: the attack checks and correlations, as tables.

``method_attack_checks`` runs ``evaluate.attack_checks`` per grid point and logs the
groups whose attack has not converged; ``attack_checks_summary`` /
``attack_checks_markdown`` write them (``attack_checks.json``, summary.md's "Attack
checks" and "Convergence" tables); ``correlation`` / ``correlation_markdown`` the
correlations of specialization with robust accuracy, bootstrapped over clusters (teachers
in the synthetic studies, seeds in the image study). Teacher-level inference
(``tsrobust.clustered``, the teacher as the unit): ``teacher_intervals`` (a column's mean
per group with the t-interval over teachers), ``paired_differences`` (each group minus a
baseline group, per teacher), ``within_correlations`` (within groups, pooled by Fisher z),
and their tables.
"""

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from experiments import study
from tsrobust import clustered
from tsrobust import evaluate
from tsrobust import lowrank_eval
from tsrobust import stats

# The paragraph before a summary.md table of adversarial error per subspace and budget
# (experiments.reproduce names its generated block '<study>-subspaces').
SUBSPACE_TABLE_TITLE = 'Adversarial error by subspace and budget'


def grid_groups(config, points) -> Dict[str, np.ndarray]:
  """``{grid point name: [P * S] bool}``: each grid point's kept students (not the padded
  seeds), in the order the binaries stack them (grid point, then seed)."""
  s = study.num_padded_seeds(config)
  groups = {}
  for p, (method, hp) in enumerate(points):
    rows = np.zeros(len(points) * s, bool)
    rows[p * s:p * s + config.num_seeds] = True
    groups[study.grid_point_name(method, hp)] = rows
  return groups


def group_convergence(ev: lowrank_eval.Evaluation, name: str):
  """``evaluate.attack_checks``' ``convergence`` argument for group ``name`` (None: no
  check ran, or the group had no students)."""
  c = ev.convergence
  if c is None or name not in c['groups']:
    return None
  return {'points': c['points'], 'threshold': c['threshold'], 'max_level': c['max_level'],
          'group': c['groups'][name]}


def group_reference(ev: lowrank_eval.Evaluation, name: str):
  """Group ``name``'s reference check (``escalation.reference_check``), with its ``points``
  and ``threshold``; None when it did not run."""
  r = ev.reference
  if r is None or name not in r['groups']:
    return None
  return {'points': r['points'], 'threshold': r['threshold'], **r['groups'][name]}


def method_attack_checks(config, points, ev: lowrank_eval.Evaluation,
                         attack_cfg: evaluate.AttackConfig,
                         headline: float) -> Dict[str, Any]:
  """``evaluate.attack_checks`` per grid point (its kept students), summarized.

  Per grid point, not per method: the variants of a method (AT at 0.5 and at 2,
  say) differ in how hard they are to attack, and the convergence check, with its
  escalation (``Evaluation.convergence``, the evaluation run with ``grid_groups``), must
  hold for each.
  """
  checks = {}
  for name, rows in grid_groups(config, points).items():
    checks[name] = evaluate.attack_checks(
        ev.result, ev.final, headline=headline, attacks_run=attack_cfg.attacks,
        convergence_points=attack_cfg.convergence_points(), rows=rows,
        convergence=group_convergence(ev, name))
    ref = group_reference(ev, name)
    if ref is not None:
      checks[name]['reference'] = ref
  summary = attack_checks_summary(config, checks)
  log_unconverged(summary)
  return summary


def log_unconverged(checks: Mapping[str, Any]) -> None:
  """A warning per group whose attack has not converged (``evaluate.doubling``) or is below
  the reference check, and a line per group that was escalated."""
  for name, g in checks['groups'].items():
    d = g.get('doubling')
    if d is None:
      continue
    level = d.get('level', 0)
    if level and d['converged']:
      logging.info('%s: converged after %d escalation(s): the ensemble at %dx on every point',
                   name, level, 2 ** level)
    if not d['converged']:
      before, after = d['cells'][d['max_gain_cell']]
      logging.warning('%s: the attack has not converged (ensemble at %dx): doubling it '
                      '(iterations, queries, targets) raises %s from %.3f to %.3f on the first '
                      '%d points (its errors are lower bounds)', name, 2 ** level, d['max_gain_cell'],
                      before, after, d['points'])
  for name, g in checks['groups'].items():
    r = g.get('reference')
    if r is not None and not r['converged']:
      before, after = r['cells'][r['max_gain_cell']]
      logging.warning('%s: the reference ensemble raises %s from %.3f to %.3f on the first %d '
                      'points: the evaluation is below the reference', name,
                      r['max_gain_cell'], before, after, r['points'])


def attack_checks_summary(config, checks: Mapping[str, Any]) -> Dict[str, Any]:
  """``attack_checks.json``: the ensemble's settings and the per-group checks."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  return {'attack_strength': config.attack.strength,
          'attack_config': dataclasses.asdict(study.attack_config(config)),
          'surrogate_temperature': float(config.surrogate_temperature),
          'headline_eps': study.headline_eps(config), 'groups': dict(checks)}


def attack_checks_markdown(summary: Mapping[str, Any]) -> str:
  """A markdown section of ``attack_checks_summary``: is the evaluation trustworthy?"""
  groups = summary['groups']
  if not groups:
    return ''
  first = next(iter(groups.values()))
  attacks_run = list(first['per_attack'])
  head = first['headline_eps']
  labels = list(first['convergence'])
  lines = [f'## Attack checks (`attack.strength = {summary["attack_strength"]}`)', '',
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
  return '\n'.join(lines) + '\n' + doubling_markdown(summary) + reference_markdown(summary)


def doubling_markdown(summary: Mapping[str, Any]) -> str:
  """The convergence check per group (``evaluate.doubling``): '' when it did not run."""
  groups = {k: g['doubling'] for k, g in summary['groups'].items() if 'doubling' in g}
  if not groups:
    return ''
  first = next(iter(groups.values()))
  threshold = first['threshold']
  head = next(iter(summary['groups'].values()))['headline_eps']  # as the attacks' budgets
  bad = [k for k, d in groups.items() if not d['converged']]
  max_level = first.get('max_level', 0)
  lines = ['', '### Convergence: the ensemble with every iteration, query and target count '
           'doubled', '',
           f'On the first {first["points"]} attacked points of each student, the ensemble '
           f'with twice the iterations, queries and targets (other random starts) attacks '
           f'again; a '
           f'group has converged when that raises no error cell (label, subspace, budget) by '
           f'more than {threshold:g}. Errors are combined as in the evaluation (the doubled '
           f'run\'s successes added to the run\'s). "Found by" lists the attacks of the '
           f'doubled run that raise the largest-gain cell each on its own (their gains '
           f'overlap).', '']
  if max_level:
    lines += [f'A group whose check raises a cell by more than that is escalated (at most '
              f'{max_level} times, '
              '`max_escalations`): the doubled ensemble attacks all its points, its successes '
              'are added, and the check runs again with the ensemble doubled once more. '
              '"Ensemble" is the largest run on every point of the group (1x: the '
              'configured one); the check shown is the last one.', '']
  if bad:
    lines += [f'**Not converged: {", ".join(bad)}.** Their errors are lower bounds; a '
              f'stronger `attack.strength` (or more iterations) would find more.', '']
  else:
    lines += ['Every group has converged.', '']
  cols = ['group', 'students', 'ensemble', f'oracle, full, {head:g}: run / doubled',
          'largest gain: cell', 'run / doubled', 'found by (alone)', 'converged']
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, d in groups.items():
    key = f'oracle_full_{head:g}'
    main = d['cells'].get(key)
    before, after = d['cells'][d['max_gain_cell']]
    lines.append('| ' + ' | '.join([
        name, str(d['students']), f'{2 ** d.get("level", 0)}x',
        '-' if main is None else f'{main[0]:.3f} / {main[1]:.3f}',
        f'`{d["max_gain_cell"]}`', f'{before:.3f} / {after:.3f}', found_by(d),
        'yes' if d['converged'] else '**no**']) + ' |')
  return '\n'.join(lines) + '\n'


def found_by(check: Mapping[str, Any]) -> str:
  """The attacks of a check's stronger run that raise its largest-gain cell, each alone
  (``outcomes.doubling``'s ``gain_by_attack``), largest first: '-' when none does."""
  gains = sorted(((g, a) for a, g in check.get('gain_by_attack', {}).items() if g > 1e-9),
                 reverse=True)
  return ', '.join(f'`{a}` +{g:.3f}' for g, a in gains) or '-'


def reference_markdown(summary: Mapping[str, Any]) -> str:
  """The reference check per group (``escalation.reference_check``): '' when it did not run."""
  groups = {k: g['reference'] for k, g in summary['groups'].items() if 'reference' in g}
  if not groups:
    return ''
  first = next(iter(groups.values()))
  head = next(iter(summary['groups'].values()))['headline_eps']
  bad = [k for k, d in groups.items() if not d['converged']]
  lines = ['', '### Reference check: the `reference` ensemble on the first points', '',
           f'On the first {first["points"]} attacked points of each student, the `reference` '
           'preset\'s ensemble (restarts, Square 10,000 queries, `apgd_pair` 500 iterations '
           'x 18 pairs x 2 restarts; other random starts) attacks after the evaluation; its '
           'successes are added to the evaluation\'s. A group agrees with the reference when '
           f'no error cell rises by more than {first["threshold"]:g}. "Found by" lists the '
           'reference\'s attacks that raise the largest-gain cell each on its own.', '']
  lines += ([f'**Below the reference by more than {first["threshold"]:g}: {", ".join(bad)}.**',
             ''] if bad else ['Every group is within the threshold of the reference.', ''])
  cols = ['group', 'students', f'oracle, full, {head:g}: run / with reference',
          'largest gain: cell', 'run / with reference', 'found by (alone)', 'within']
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, d in groups.items():
    main = d['cells'].get(f'oracle_full_{head:g}')
    before, after = d['cells'][d['max_gain_cell']]
    lines.append('| ' + ' | '.join([
        name, str(d['students']), '-' if main is None else f'{main[0]:.3f} / {main[1]:.3f}',
        f'`{d["max_gain_cell"]}`', f'{before:.3f} / {after:.3f}', found_by(d),
        'yes' if d['converged'] else '**no**']) + ' |')
  return '\n'.join(lines) + '\n'


def correlation(x, y, groups, clusters, key, num_resamples: int,
                unit: str = 'seed') -> Dict[str, Any]:
  """Pooled correlation of ``x`` and ``y`` across students, with within-method ones.

  Intervals are bootstrapped over clusters (``clusters``: the cluster id of each
  student, its ``unit``: ``'teacher'`` in the synthetic studies, where all students
  of a teacher share it; ``'seed'`` in the image study, where all methods of a seed
  share its initial student and data stream), students resampled in whole clusters.
  Returns the pooled ``stats.correlation_report`` keys at the top level, plus
  ``'pooled_within'`` (the correlation of the deviations from each method's mean) and
  ``'by_method'`` (one report per method); each report's ``'bootstrap'`` names the unit.
  """
  rep = stats.within_group_correlations(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                        np.asarray(groups), np.asarray(clusters), key,
                                        num_resamples)
  if unit != 'seed':  # stats names its clusters seeds
    for r in [rep['pooled'], rep['pooled_within'], *rep['groups'].values()]:
      if r.get('bootstrap') == 'clustered by seed':
        r['bootstrap'] = f'clustered by {unit}'
  return {**rep['pooled'], 'pooled_within': rep['pooled_within'], 'by_method': rep['groups']}


def correlation_markdown(reports: Mapping[str, Mapping[str, Any]], x_name: str,
                         num_resamples: int,
                         resampled: str = 'seeds: all methods of a seed move together',
                         within_note: str = '') -> str:
  """A markdown table of ``correlation`` reports, one row per robust-accuracy column.

  ``resampled``: what the bootstrap resamples, as the text says it; ``within_note``: a
  sentence on the *within* column, appended to the text.
  """
  fmt = lambda v: '-' if v is None or not np.isfinite(v) else f'{v:.3f}'
  ci = lambda r, k: (f'{fmt(r[k])} [{fmt((r.get(k + "_ci") or [None])[0])}, '
                     f'{fmt((r.get(k + "_ci") or [None, None])[1])}]')
  first = next(iter(reports.values()))
  methods = list(first['by_method'])
  lines = [f'Correlation across students of `{x_name}` with robust accuracy (95% intervals, '
           f'{num_resamples} bootstrap resamples of {resampled}). '
           '*Pooled*: all students; *within*: deviations from each method\'s mean, pooled; '
           'then Pearson within each method (`-`: too few students or constant).'
           + (f' {within_note}' if within_note else ''), '',
           '| robust accuracy | n | Pearson pooled | Spearman pooled | Pearson within | '
           + ' | '.join(methods) + ' |', '|' + '---|' * (5 + len(methods))]
  for name, r in reports.items():
    cells = [f'`{name}`', str(r['n']), ci(r, 'pearson'), ci(r, 'spearman'),
             ci(r['pooled_within'], 'pearson')]
    cells += [fmt(r['by_method'][m]['pearson']) for m in methods]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------
# Teacher-level inference (tsrobust.clustered): the teacher as the unit.
# ----------------------------------------------------------------------------

def _fmt(v) -> str:
  return '-' if v is None or not np.isfinite(v) else f'{v:.3f}'


def interval_cell(report: Optional[Mapping[str, Any]]) -> str:
  """``0.123 [0.050, 0.196]`` (estimate and interval), ``0.123`` without an interval,
  ``-`` without an estimate."""
  if report is None or report.get('estimate') is None:
    return '-'
  ci = report.get('ci')
  if ci is None:
    return _fmt(report['estimate'])
  return f'{_fmt(report["estimate"])} [{_fmt(ci[0])}, {_fmt(ci[1])}]'


def _grouped(records: Sequence[Mapping[str, Any]],
             group_of: Callable[[Mapping[str, Any]], Any]) -> Dict[Any, List[Mapping[str, Any]]]:
  groups: Dict[Any, List[Mapping[str, Any]]] = {}
  for r in records:
    groups.setdefault(group_of(r), []).append(r)
  return groups


def _values(members: Sequence[Mapping[str, Any]], column: str):
  """``(values, teachers)`` of the members whose ``column`` is set (not None / NaN)."""
  kept = [m for m in members if m.get(column) is not None and np.isfinite(float(m[column]))]
  return (np.array([float(m[column]) for m in kept]),
          np.array([m['teacher'] for m in kept], np.int64))


def teacher_interval(values, teachers, level: float = 0.95) -> Optional[Dict[str, Any]]:
  """``clustered.teacher_mean_interval`` of ``values``; None without values; with one
  teacher, the estimate (its students' mean) with ``'ci': None`` and a ``'note'``."""
  values = np.asarray(values, np.float64)
  if not values.size:
    return None
  if len(np.unique(teachers)) < 2:
    return {'estimate': float(values.mean()), 'ci': None, 'num_teachers': 1,
            'num_students': int(values.size),
            'note': 'one teacher: no teacher-level interval'}
  return clustered.teacher_mean_interval(values, teachers, level)


def teacher_intervals(records: Sequence[Mapping[str, Any]],
                      group_of: Callable[[Mapping[str, Any]], Any], columns: Sequence[str],
                      level: float = 0.95) -> Dict[str, Dict[str, Any]]:
  """Per group (first-seen order), each column's mean over teachers with its t-interval.

  ``{str(group): {'teachers': T, 'students': n, 'columns': {column: teacher_interval}}}``;
  records carry a ``teacher`` field; a column that is empty in a group (e.g. off-subspace
  errors at full rank) is None.
  """
  out = {}
  for group, members in _grouped(records, group_of).items():
    out[str(group)] = {
        'teachers': len({m['teacher'] for m in members}), 'students': len(members),
        'columns': {c: teacher_interval(*_values(members, c), level) for c in columns}}
  return out


def teacher_intervals_markdown(intervals: Mapping[str, Mapping[str, Any]], group_title: str,
                               columns: Sequence[str], text: str) -> str:
  """A markdown section of ``teacher_intervals``: ``text`` (a paragraph), then the table."""
  cols = [group_title, 'teachers', 'students'] + [f'`{c}`' for c in columns]
  lines = [text, '', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, g in intervals.items():
    cells = [name, str(g['teachers']), str(g['students'])]
    cells += [interval_cell(g['columns'].get(c)) for c in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def paired_differences(records: Sequence[Mapping[str, Any]],
                       group_of: Callable[[Mapping[str, Any]], Any], baseline: str,
                       columns: Sequence[str],
                       level: float = 0.95) -> Optional[Dict[str, Dict[str, Any]]]:
  """Each group minus the ``baseline`` group, per teacher (``clustered.paired_difference``,
  t-interval over the teachers both have).

  ``{str(group): {column: report}}`` for every group but the baseline, in first-seen
  order; None when no group is named ``baseline``. A column without two common teachers
  gets ``{'estimate': None, 'ci': None, 'note': why}``.
  """
  groups = {str(k): v for k, v in _grouped(records, group_of).items()}
  if baseline not in groups:
    return None
  out = {}
  for name, members in groups.items():
    if name == baseline:
      continue
    out[name] = {}
    for c in columns:
      a, ta = _values(members, c)
      b, tb = _values(groups[baseline], c)
      try:
        out[name][c] = clustered.paired_difference(a, b, ta, tb, level=level)
      except ValueError as e:  # fewer than 2 teachers in common (or no values)
        out[name][c] = {'estimate': None, 'ci': None, 'note': str(e)}
  return out


def paired_differences_markdown(diffs: Mapping[str, Mapping[str, Any]], group_title: str,
                                columns: Sequence[str], text: str, baseline: str) -> str:
  """A markdown section of ``paired_differences`` against ``baseline``: ``text``, then the
  table."""
  cols = [group_title, 'teachers'] + [f'`{c}` minus {baseline}' for c in columns]
  lines = [text, '', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, by_col in diffs.items():
    t = max((r.get('num_teachers', 0) for r in by_col.values()), default=0)
    cells = [name, str(t)] + [interval_cell(by_col.get(c)) for c in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def within_correlations(x, y, groups, teachers, level: float = 0.95) -> Dict[str, Any]:
  """The correlation of ``x`` and ``y`` within groups, pooled by Fisher z.

  ``'groups'``: ``clustered.pooled_within_correlation`` with one group per label of
  ``groups`` (e.g. grid point: the students of all its teachers; its interval treats the
  groups as independent, which groups sharing teachers are not); ``'teacher_x_group'``:
  the same with ``teachers``, each ``(teacher, group)`` its own group (>= 4 students
  each), whose ``'teacher_level'`` is the t-interval over the teachers' pooled z.
  """
  return {'groups': clustered.pooled_within_correlation(x, y, groups, level=level),
          'teacher_x_group': clustered.pooled_within_correlation(x, y, groups, teachers,
                                                                 level=level)}


def within_correlations_markdown(reports: Mapping[str, Mapping[str, Any]], text: str,
                                 groups: str = 'groups', group: str = 'group') -> str:
  """A markdown section of ``within_correlations``, one row per ``reports`` entry (a
  robust-accuracy column): ``text``, then the table (``groups`` / ``group``: what a group
  is, plural and singular, in the headers)."""
  cols = ['robust accuracy', f'{groups} used', 'students', f'within {groups} (Fisher z)',
          f'teacher x {group} cells used', f'within teacher x {group}, over teachers (t)']
  lines = [text, '', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, r in reports.items():
    g, tg = r['groups'], r['teacher_x_group']
    cells = [f'`{name}`', f"{g['num_groups']} of {len(g['groups'])}", str(g['num_members']),
             interval_cell(g), f"{tg['num_groups']} of {len(tg['groups'])}",
             interval_cell(tg.get('teacher_level'))]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
