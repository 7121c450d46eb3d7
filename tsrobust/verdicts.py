"""Verdicts written by rule: each claim in each setting, from a teacher-level interval.

The rules are ``docs/verdicts.md``; this module is them, as code. A claim's *statistic*
is computed from a study's results table with the **teacher** as the unit (students of
one teacher are not independent: ``tsrobust.clustered``), its 95% interval is compared
with the claim's null value, and ``verdict`` says what the interval earns:

- ``'holds'``: the interval lies wholly on the claim's side of the null value (and not
  inside the negligible band);
- ``'does not hold'``: it lies wholly on the other side, or wholly inside the negligible
  band around the null (an effect too small to carry the claim: checked first);
- ``'not established'``: anything else (it straddles the null or a band edge);
- ``'not established (one teacher)'``: fewer than 2 teachers, so no teacher-level
  interval exists; the estimate is still given.

A study that does not measure a claim (no columns for it, no students of the methods it
compares) raises ``NotMeasured`` (a ``ValueError`` naming the columns it reads);
``cells`` turns it into a ``'not measured'`` cell. ``verdict_table`` writes the claims x
settings table in markdown.

Tables are a study's ``results.csv`` as the project reads it (``io.read_csv``: a list
of row dicts, empty cells None) or column arrays (a dict of equal-length sequences).

>>> verdict([0.12, 0.30], 'above', negligible=0.05)
'holds'
>>> verdict([-0.03, 0.04], 'above', negligible=0.05)   # wholly inside the band
'does not hold'
>>> verdict([-0.10, 0.20], 'above', negligible=0.05)
'not established'
>>> verdict([0.93, 0.97], 'above', null=0.9)           # claim 1's threshold
'holds'
"""

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tsrobust import clustered

__all__ = ['VERDICTS', 'RULES', 'CLAIM_NAMES', 'NotMeasured', 'verdict', 'claim1', 'claim2',
           'claim3', 'claim4', 'claim5', 'CLAIMS', 'cell', 'cells', 'missing_cells',
           'verdict_table', 'verdict_details', 'headline_budget']

HOLDS, FAILS, OPEN = 'holds', 'does not hold', 'not established'
ONE_TEACHER = 'not established (one teacher)'
NOT_MEASURED, NOT_RUN = 'not measured', 'not run'
# Every verdict a cell can carry: the rule's four, and two for cells without numbers.
VERDICTS = (HOLDS, FAILS, OPEN, ONE_TEACHER, NOT_MEASURED, NOT_RUN)

DIRECTIONS = ('above', 'below')
MISSING_TEACHER = ('error', 'seed', 'one')

# Per claim: the side of ``null`` that supports it and the negligible band's half-width
# around ``null`` (None: no band). docs/verdicts.md states each and why.
RULES = {
    1: {'direction': 'above', 'null': 0.9, 'negligible': None},
    2: {'direction': 'below', 'null': 0.1, 'negligible': None},
    3: {'direction': 'above', 'null': 0.0, 'negligible': 0.05},
    4: {'direction': 'above', 'null': 0.0, 'negligible': 0.1},
    5: {'direction': 'below', 'null': 0.0, 'negligible': 0.05},
}
CLAIM_NAMES = {
    1: 'specialization in S',
    2: 'no alignment off S',
    3: 'attacks off S stronger than in S',
    4: 'specialization tracks robustness',
    5: 'noise in S_perp beats isotropic',
}

# Hyper-parameters graded within a method family (a dose-response); the others define it.
_GRADED = ('at_eps', 'ccat_eps', 'aug_scale')
_FAMILY_KEYS = ('at_where', 'at_label')


class NotMeasured(ValueError):
  """The table lacks what a claim reads (its columns, or students of the methods it
  compares): the study does not measure the claim."""


# ----------------------------------------------------------------------------
# The rule.
# ----------------------------------------------------------------------------

def _check_interval(interval: Any) -> Tuple[float, float]:
  try:
    lo, hi = (float(v) for v in interval)
  except (TypeError, ValueError):
    raise ValueError(f'interval must be two numbers [lo, hi], got {interval!r}') from None
  if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
    raise ValueError(f'interval must be finite with lo <= hi, got {interval!r}')
  return lo, hi


def verdict(interval: Any, direction: str, negligible: Optional[float] = None,
            null: float = 0.0) -> str:
  """The written rule: what a teacher-level interval says of a claim.

  Args:
    interval: ``[lo, hi]``, the statistic's 95% interval.
    direction: ``'above'`` or ``'below'``: the side of ``null`` that supports the claim.
    negligible: half-width of the negligible band around ``null`` (None: no band): an
      interval wholly inside ``[null - negligible, null + negligible]`` does not hold,
      whichever side of ``null`` it lies on (checked first).
    null: the value the claim is tested against (0 for a difference or a correlation;
      a threshold such as claim 1's 0.9).

  Returns:
    ``'holds'`` (``lo > null`` for ``'above'``, ``hi < null`` for ``'below'``),
    ``'does not hold'`` (wholly on the other side: ``hi < null`` / ``lo > null``, or
    inside the band) or ``'not established'``.
  """
  lo, hi = _check_interval(interval)
  if direction not in DIRECTIONS:
    raise ValueError(f'direction must be one of {list(DIRECTIONS)}, got {direction!r}')
  null = float(null)
  if not math.isfinite(null):
    raise ValueError(f'null must be a finite number, got {null!r}')
  if negligible is not None:
    negligible = float(negligible)
    if not (negligible >= 0 and math.isfinite(negligible)):
      raise ValueError(f'negligible must be None or a finite number >= 0, got {negligible!r}')
    if null - negligible <= lo and hi <= null + negligible:
      return FAILS
  supports, opposes = (lo > null, hi < null) if direction == 'above' else (hi < null, lo > null)
  if supports:
    return HOLDS
  if opposes:
    return FAILS
  return OPEN


def _reason(rule: Mapping[str, Any], interval: Sequence[float], result: str) -> str:
  lo, hi = interval
  null, band, side = rule['null'], rule['negligible'], rule['direction']
  other = 'below' if side == 'above' else 'above'
  if result == FAILS and band is not None and null - band <= lo and hi <= null + band:
    return f'the teacher-level CI lies inside the negligible band {null:g} +- {band:g}'
  if result == HOLDS:
    return f'the teacher-level CI lies wholly {side} {null:g}'
  if result == FAILS:
    return f'the teacher-level CI lies wholly {other} {null:g}'
  edge = f' or an edge of the negligible band {null:g} +- {band:g}' if band is not None else ''
  return f'the teacher-level CI straddles {null:g}{edge}'


# ----------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------

def _as_columns(table: Any) -> Dict[str, List[Any]]:
  """A results table as ``{column: [value per row]}``, columns in their first-seen order."""
  if isinstance(table, Mapping):
    cols = {}
    for k, v in table.items():
      if isinstance(v, (str, bytes)) or not hasattr(v, '__len__'):
        raise ValueError(f'table column {k!r} must be a sequence (one value per row), '
                         f'got {type(v).__name__}')
      cols[str(k)] = list(v)
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
      raise ValueError(f'table columns must have equal lengths, got {lengths}')
  elif isinstance(table, (list, tuple)):
    if not all(isinstance(r, Mapping) for r in table):
      raise ValueError('table must be a list of row dicts or a dict of columns; '
                       'a row is not a dict')
    names: List[str] = []
    for r in table:
      names.extend(k for k in r if k not in names)
    cols = {str(n): [r.get(n) for r in table] for n in names}
  else:
    raise ValueError('table must be a list of row dicts (io.read_csv) or a dict of columns, '
                     f'got {type(table).__name__}')
  if not cols or not len(next(iter(cols.values()))):
    raise ValueError('table has no rows')
  return cols


def _missing(v: Any) -> bool:
  return v is None or (isinstance(v, str) and v == '') or (
      isinstance(v, (float, np.floating)) and math.isnan(v))


def _numbers(cols: Mapping[str, List[Any]], name: str) -> np.ndarray:
  """Column ``name`` as float64, missing cells (None, '', NaN) as NaN."""
  out = np.full(len(cols[name]), np.nan)
  for i, v in enumerate(cols[name]):
    if _missing(v):
      continue
    try:
      out[i] = float(v)
    except (TypeError, ValueError):
      raise ValueError(f'column {name!r} must hold numbers (or empty cells), row {i} has '
                       f'{v!r}') from None
  return out


def _labels(cols: Mapping[str, List[Any]], name: str) -> np.ndarray:
  """Column ``name`` as strings ('' for missing cells; 1.0 and 1 both '1')."""
  def text(v):
    if _missing(v):
      return ''
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
      return str(int(v))
    return str(v)
  return np.array([text(v) for v in cols[name]], dtype=object)


def _require(cols: Mapping[str, Any], names: Sequence[str], claim: int, what: str):
  absent = [n for n in names if n not in cols]
  if absent:
    raise NotMeasured(f'claim {claim} reads column(s) {absent}: {what}; the table has '
                      f'{len(cols)} other columns')


def _teachers(cols: Mapping[str, List[Any]], missing_teacher: str) -> np.ndarray:
  """The teacher label of each row (``teacher``; else per ``missing_teacher``)."""
  if missing_teacher not in MISSING_TEACHER:
    raise ValueError(f'missing_teacher must be one of {list(MISSING_TEACHER)}, '
                     f'got {missing_teacher!r}')
  if 'teacher' in cols:
    t = _labels(cols, 'teacher')
    if (t == '').any():
      raise ValueError(f"column 'teacher' has {int((t == '').sum())} empty cells; every "
                       'student needs its teacher')
    return t
  if missing_teacher == 'seed':
    if 'seed' not in cols:
      raise ValueError("missing_teacher='seed' needs a 'seed' column; the table has neither "
                       "'teacher' nor 'seed'")
    t = _labels(cols, 'seed')
    if (t == '').any():
      raise ValueError("column 'seed' has empty cells; with missing_teacher='seed' every "
                       'student needs its seed')
    return t
  if missing_teacher == 'one':
    return np.array(['0'] * len(next(iter(cols.values()))), dtype=object)
  raise ValueError("the table has no 'teacher' column; pass missing_teacher='seed' (a "
                   "synthetic run from before teachers were an axis: each seed its own "
                   "teacher) or 'one' (a study with one teacher)")


def _standard(cols: Mapping[str, List[Any]], claim: int) -> np.ndarray:
  """Rows of standard-trained students: ``method == 'standard'``, or every row of a
  study without a ``method`` column (the low-rank study trains only standard students)."""
  n = len(next(iter(cols.values())))
  if 'method' not in cols:
    return np.ones(n, bool)
  keep = _labels(cols, 'method') == 'standard'
  if not keep.any():
    raise NotMeasured(f"claim {claim} reads standard-trained students; the table's "
                      "'method' column has no 'standard' rows")
  return keep


_BUDGET = re.compile(r'^[0-9][0-9.eE+-]*$')


def _budgets(cols: Mapping[str, Any], prefix: str) -> List[str]:
  """Budgets of the columns ``prefix + eps``, in column order (the config's order)."""
  return [c[len(prefix):] for c in cols if c.startswith(prefix) and _BUDGET.match(c[len(prefix):])]


def headline_budget(table: Any, prefix: str = 'adv_oracle_full_',
                    eps: Optional[Any] = None) -> str:
  """The headline budget's name: the middle of the budgets of the ``prefix + eps`` columns
  in their written order (as ``study.headline_eps``: ``config.eps[len // 2]``), or the one
  equal to ``eps``.

  >>> headline_budget({'adv_oracle_full_0.5': [0.1], 'adv_oracle_full_1.0': [0.2],
  ...                  'adv_oracle_full_1.0_pgd': [0.2], 'adv_oracle_full_2.0': [0.3]})
  '1.0'
  """
  cols = table if isinstance(table, Mapping) else _as_columns(table)
  names = _budgets(cols, prefix)
  if not names:
    raise NotMeasured(f'no {prefix}<eps> columns in the table')
  if eps is None:
    return names[len(names) // 2]
  for name in names:
    if float(name) == float(eps):
      return name
  raise ValueError(f'eps must be one of the budgets {names} (columns {prefix}<eps>), '
                   f'got {eps!r}')


def _error_column(cols: Mapping[str, List[Any]], eps: Optional[Any],
                  claim: int) -> Tuple[np.ndarray, str]:
  """``(robust error per row, its text)`` at the headline budget: ``adv_oracle_full_<eps>``,
  else ``1 - robust_acc_oracle_<eps>`` (the image studies without subspace columns)."""
  for prefix, flip in (('adv_oracle_full_', False), ('robust_acc_oracle_', True)):
    if _budgets(cols, prefix):
      name = prefix + headline_budget(cols, prefix, eps)
      v = _numbers(cols, name)
      return (1.0 - v, f'1 - {name}') if flip else (v, name)
  raise NotMeasured(f'claim {claim} reads the oracle robust error at the headline budget: '
                    'columns adv_oracle_full_<eps> or robust_acc_oracle_<eps>; the table has '
                    'neither')


# ----------------------------------------------------------------------------
# The claims.
# ----------------------------------------------------------------------------

def _cell(claim, setting, statistic, estimate, ci, teachers, result, why) -> Dict[str, Any]:
  return {'claim': claim, 'setting': setting, 'statistic': statistic,
          'estimate': None if estimate is None else float(estimate),
          'ci': None if ci is None else [float(ci[0]), float(ci[1])],
          'teachers': int(teachers), 'verdict': result, 'why': why}


def _judged(claim, setting, statistic, estimate, ci, teachers, students,
            rule: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  rule = RULES[claim] if rule is None else rule
  result = verdict(ci, rule['direction'], rule['negligible'], rule['null'])
  why = f'{_reason(rule, ci, result)}; {teachers} teachers, {students} students'
  return _cell(claim, setting, statistic, estimate, ci, teachers, result, why)


def _one_teacher(claim, setting, statistic, estimate, students) -> Dict[str, Any]:
  return _cell(claim, setting, statistic, estimate, None, 1, ONE_TEACHER,
               f'one teacher, {students} students: no teacher-level interval exists')


def _finite_rows(*arrays: np.ndarray) -> np.ndarray:
  return np.logical_and.reduce([np.isfinite(a) for a in arrays])


def _mean_claim(claim, table, setting, values_of, statistic, missing_teacher, level,
                rule=None):
  """A claim whose statistic is the mean over teachers of a per-student value."""
  cols = _as_columns(table)
  teachers = _teachers(cols, missing_teacher)
  values, keep = values_of(cols)
  keep = keep & np.isfinite(values)
  if not keep.any():
    raise NotMeasured(f'claim {claim}: no student has the values it reads ({statistic})')
  v, t = values[keep], teachers[keep]
  num_t = len(set(t))
  if num_t < 2:
    return _one_teacher(claim, setting, statistic, v.mean(), int(keep.sum()))
  out = clustered.teacher_mean_interval(v, t, level)
  return _judged(claim, setting, statistic, out['estimate'], out['ci'], num_t, int(keep.sum()),
                 rule)


def _spec_column(cols: Mapping[str, Any]) -> str:
  for name in ('spec_in', 'spec_mean'):
    if name in cols:
      return name
  raise NotMeasured("claim 1 reads in-subspace specialization: column 'spec_in' (synthetic) "
                    "or 'spec_mean' (images); the table has neither")


def claim1(table: Any, setting: str, threshold: float = 0.9, missing_teacher: str = 'error',
           level: float = 0.95) -> Dict[str, Any]:
  """Claim 1: standard students specialize within S.

  Statistic: the mean over teachers of ``spec_in`` (synthetic; ``spec_mean`` in the image
  studies: mean max correlation over layers, on data from S) of standard-trained students
  on low-rank data (rows whose ``spec_off`` is set, i.e. ranks below ``d``). Holds when the
  teacher-level interval lies above ``threshold`` (0.9, the specialization threshold tau).
  """
  cols0 = _as_columns(table)
  spec = _spec_column(cols0)
  _require(cols0, ['spec_off'], 1, 'its rows mark low-rank data; a study without it has no '
           'data subspace, and claim 1 is about low-rank data')
  rule = dict(RULES[1], null=float(threshold))

  def values_of(cols):
    keep = _standard(cols, 1) & np.isfinite(_numbers(cols, 'spec_off'))
    return _numbers(cols, spec), keep
  statistic = f'{spec} of standard students on low-rank data, vs {threshold:g}'
  return _mean_claim(1, cols0, setting, values_of, statistic, missing_teacher, level, rule)


def claim2(table: Any, setting: str, missing_teacher: str = 'error',
           level: float = 0.95) -> Dict[str, Any]:
  """Claim 2: off S, the students' first-layer weights are unrelated to the teacher's.

  Statistic: the mean over teachers of ``wcos_off - wcos_off_random`` (the off-subspace
  cosine of each teacher node with its best student, minus the ``E|cos|`` of two random
  directions in ``S_perp``) of standard students on low-rank data. Holds when the
  teacher-level interval lies below 0.1 (no more than 0.1 above chance); does not hold when
  it lies above 0.1.
  """
  cols0 = _as_columns(table)
  _require(cols0, ['wcos_off', 'wcos_off_random'], 2,
           'first-layer weight cosines off S and their random baseline')

  def values_of(cols):
    off, base = _numbers(cols, 'wcos_off'), _numbers(cols, 'wcos_off_random')
    return off - base, _standard(cols, 2)
  return _mean_claim(2, cols0, setting, values_of,
                     'wcos_off - wcos_off_random of standard students on low-rank data',
                     missing_teacher, level)


def claim3(table: Any, setting: str, eps: Optional[Any] = None, missing_teacher: str = 'error',
           level: float = 0.95) -> Dict[str, Any]:
  """Claim 3: off-subspace perturbations hurt more than in-subspace ones of the same size.

  Statistic: ``adv_oracle_off_<eps> - adv_oracle_in_<eps>`` at the headline budget (the
  middle budget, or ``eps``), paired per student, the mean over teachers of each teacher's
  mean (``clustered.paired_difference``), standard students on low-rank data (every rank
  below ``d`` a teacher has: the low-rank study's teacher is the same at every rank).
  """
  cols = _as_columns(table)
  if not _budgets(cols, 'adv_oracle_off_'):
    raise NotMeasured('claim 3 reads columns adv_oracle_off_<eps> and adv_oracle_in_<eps> '
                      '(oracle error off and in S); the table has none: no data subspace')
  name = headline_budget(cols, 'adv_oracle_off_', eps)
  _require(cols, [f'adv_oracle_in_{name}'], 3, 'oracle error in S at the headline budget')
  teachers = _teachers(cols, missing_teacher)
  off, inside = _numbers(cols, f'adv_oracle_off_{name}'), _numbers(cols, f'adv_oracle_in_{name}')
  keep = _standard(cols, 3) & _finite_rows(off, inside)
  statistic = f'adv_oracle_off_{name} - adv_oracle_in_{name}, standard students, paired'
  if not keep.any():
    raise NotMeasured('claim 3: no standard student has both off- and in-subspace errors '
                      '(full rank only?)')
  t = teachers[keep]
  num_t = len(set(t))
  if num_t < 2:
    return _one_teacher(3, setting, statistic, (off[keep] - inside[keep]).mean(),
                        int(keep.sum()))
  out = clustered.paired_difference(off[keep], inside[keep], t, t, level=level)
  return _judged(3, setting, statistic, out['estimate'], out['ci'], num_t, int(keep.sum()))


def _family(cols: Mapping[str, List[Any]]) -> np.ndarray:
  """Each row's method family: its method and non-graded hyper-parameters (``at_where``,
  ``at_label``); the graded ones (``at_eps``, ``ccat_eps``, ``aug_scale``) vary inside."""
  fam = _labels(cols, 'method')
  for key in _FAMILY_KEYS:
    if key in cols:
      v = _labels(cols, key)
      fam = np.array([f'{f} {key}={x}' if x else f for f, x in zip(fam, v)], dtype=object)
  return fam


def claim4(table: Any, setting: str, eps: Optional[Any] = None, missing_teacher: str = 'error',
           level: float = 0.95) -> Dict[str, Any]:
  """Claim 4: specialization correlates with robustness, within method families.

  Statistic: the Pearson correlation of robust accuracy at the headline budget
  (``1 - adv_oracle_full_<eps>``, or ``robust_acc_oracle_<eps>``) with ``spec_off``
  (``spec_mean`` in a study without a subspace) within each teacher x family cell (a
  family: one method with its non-graded hyper-parameters, its graded budget or scale
  varying inside; >= 4 students), pooled per teacher by Fisher z, then the t-interval over
  teachers (``clustered.pooled_within_correlation``'s ``teacher_level``).
  """
  cols = _as_columns(table)
  _require(cols, ['method'], 4, 'the training method: a study of one method has no families')
  x_name = 'spec_off' if 'spec_off' in cols else 'spec_mean'
  _require(cols, [x_name], 4, 'specialization off S (spec_off), or on the data (spec_mean)')
  teachers = _teachers(cols, missing_teacher)
  err, err_name = _error_column(cols, eps, 4)
  acc_name = err_name[4:] if err_name.startswith('1 - ') else f'1 - {err_name}'
  x, y = _numbers(cols, x_name), 1.0 - err
  keep = _finite_rows(x, y)
  statistic = f'corr({acc_name}, {x_name}) within teacher x method family, over teachers'
  if not keep.any():
    raise NotMeasured(f'claim 4: no student has both {x_name} and {acc_name}')
  fam, t = _family(cols)[keep], teachers[keep]
  num_t = len(set(t))
  n = int(keep.sum())
  if num_t < 2:
    out = clustered.pooled_within_correlation(x[keep], y[keep], fam, level=level)
    return _one_teacher(4, setting, statistic, out['estimate'], n)
  out = clustered.pooled_within_correlation(x[keep], y[keep], fam, t, level=level)
  tl = out['teacher_level']
  if tl['estimate'] is None:
    skipped = ', '.join(f'{k} {v}' for k, v in out['skipped'].items() if v)
    return _cell(4, setting, statistic, None, None, num_t, OPEN,
                 f'fewer than 2 teachers with a usable teacher x family cell (>= 4 students, '
                 f'neither variable constant, |r| < 1): {len(out["groups"])} cells, '
                 f'skipped: {skipped or "none"}; {num_t} teachers, {n} students')
  cell_ = _judged(4, setting, statistic, tl['estimate'], tl['ci'], num_t, n)
  if tl['num_teachers'] < num_t:
    cell_['why'] += f', {tl["num_teachers"]} of {num_t} teachers with a usable cell'
  return cell_


def claim5(table: Any, setting: str, eps: Optional[Any] = None,
           aug_scale: Optional[float] = None, missing_teacher: str = 'error',
           level: float = 0.95) -> Dict[str, Any]:
  """Claim 5: noise augmentation in S_perp (``orth``) beats isotropic noise (``iso``).

  Statistic: per teacher and noise scale both methods trained at (``aug_scale``, or the
  one given), the mean oracle robust error at the headline budget of its ``orth`` students
  minus that of its ``iso`` students; per teacher the mean over those scales; then the
  t-interval over teachers. Holds when it lies below 0 (orth less error).
  """
  cols = _as_columns(table)
  _require(cols, ['method', 'aug_scale'], 5, "the methods 'orth' and 'iso' at noise scales")
  method = _labels(cols, 'method')
  for m in ('orth', 'iso'):
    if not (method == m).any():
      raise NotMeasured(f"claim 5 compares methods 'orth' and 'iso'; the table has no {m!r} "
                        'students')
  teachers = _teachers(cols, missing_teacher)
  err, err_name = _error_column(cols, eps, 5)
  scale = _numbers(cols, 'aug_scale')
  ok = np.isfinite(err) & np.isfinite(scale)
  common = sorted(set(scale[ok & (method == 'orth')]) & set(scale[ok & (method == 'iso')]))
  if aug_scale is not None:
    if float(aug_scale) not in common:
      raise ValueError(f'aug_scale must be one of the scales both orth and iso trained at '
                       f'{common}, got {aug_scale!r}')
    common = [float(aug_scale)]
  where = 'at every scale both have' if aug_scale is None else f'at aug_scale {aug_scale:g}'
  statistic = f'{err_name} of orth minus iso, paired per teacher and scale, {where}'
  diffs, labels, n = [], [], 0
  for t in sorted(set(teachers[ok])):
    for s in common:
      a = ok & (teachers == t) & (scale == s) & (method == 'orth')
      b = ok & (teachers == t) & (scale == s) & (method == 'iso')
      if a.any() and b.any():
        diffs.append(err[a].mean() - err[b].mean())
        labels.append(t)
        n += int(a.sum() + b.sum())
  if not diffs:
    raise NotMeasured('claim 5: no teacher has orth and iso students at a shared scale '
                      'with robust errors')
  num_t = len(set(labels))
  if num_t < 2:
    return _one_teacher(5, setting, statistic, float(np.mean(diffs)), n)
  out = clustered.teacher_mean_interval(np.array(diffs), np.array(labels, dtype=object),
                                        level)
  return _judged(5, setting, statistic, out['estimate'], out['ci'], num_t, n)


CLAIMS = {1: claim1, 2: claim2, 3: claim3, 4: claim4, 5: claim5}


def _check_claim(claim: Any) -> int:
  if claim not in CLAIMS:
    raise ValueError(f'claim must be one of {list(CLAIMS)}, got {claim!r}')
  return claim


def cell(claim: int, table: Any, setting: str, **kwargs) -> Dict[str, Any]:
  """One claim's cell; a claim the table does not measure gets ``'not measured'`` and why.

  ``kwargs`` go to the claim's function (``missing_teacher``, ``eps``, ``level``, ...).
  """
  fn = CLAIMS[_check_claim(claim)]
  try:
    return fn(table, setting, **kwargs)
  except NotMeasured as e:
    return _cell(claim, setting, None, None, None, 0, NOT_MEASURED, str(e))


def cells(table: Any, setting: str, claims: Sequence[int] = tuple(CLAIMS),
          missing_teacher: str = 'error', eps: Optional[Any] = None,
          level: float = 0.95) -> List[Dict[str, Any]]:
  """Every claim's cell for one study's table (``cell`` per claim)."""
  out = []
  for c in claims:
    kw: Dict[str, Any] = {'missing_teacher': missing_teacher, 'level': level}
    if c in (3, 4, 5):
      kw['eps'] = eps
    out.append(cell(c, table, setting, **kw))
  return out


def missing_cells(setting: str, why: str = 'the study was not run',
                  claims: Sequence[int] = tuple(CLAIMS),
                  result: str = NOT_RUN) -> List[Dict[str, Any]]:
  """``'not run'`` cells for a setting without results (or ``result = NOT_MEASURED``:
  cells of claims a study does not measure by design)."""
  if result not in (NOT_RUN, NOT_MEASURED):
    raise ValueError(f'result must be {NOT_RUN!r} or {NOT_MEASURED!r}, got {result!r}')
  return [_cell(_check_claim(c), setting, None, None, None, 0, result, why) for c in claims]


# ----------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------

def _fmt(v: Optional[float]) -> str:
  return '-' if v is None else f'{v:.3f}'


def _cell_text(c: Mapping[str, Any]) -> str:
  v = c['verdict']
  if v in (NOT_MEASURED, NOT_RUN) or c['estimate'] is None:
    return v
  if c['ci'] is None:
    return f'{v}: {_fmt(c["estimate"])}, T={c["teachers"]}'
  lo, hi = c['ci']
  return f'{v}: {_fmt(c["estimate"])} [{_fmt(lo)}, {_fmt(hi)}], T={c["teachers"]}'


_CELL_KEYS = ('claim', 'setting', 'statistic', 'estimate', 'ci', 'teachers', 'verdict', 'why')


def _check_cells(cells_: Sequence[Mapping[str, Any]]) -> None:
  for c in cells_:
    if not isinstance(c, Mapping) or any(k not in c for k in _CELL_KEYS):
      raise ValueError(f'each cell must be a dict with keys {list(_CELL_KEYS)}, got {c!r}')
    _check_claim(c['claim'])
    if c['verdict'] not in VERDICTS:
      raise ValueError(f'a cell\'s verdict must be one of {list(VERDICTS)}, '
                       f'got {c["verdict"]!r}')


def verdict_table(cells_: Sequence[Mapping[str, Any]], settings: Optional[Sequence[str]] = None,
                  titles: Optional[Mapping[str, str]] = None) -> str:
  """The claims x settings table in markdown: a row per claim, a column per setting.

  Each cell is ``verdict: estimate [lo, hi], T=teachers`` (``verdict: estimate, T=1``
  without an interval; ``not measured`` / ``not run`` alone); a (claim, setting) pair
  with no cell is ``not run``.

  Args:
    cells_: cells of the claim functions (``cells``, ``missing_cells``).
    settings: the columns, in order (default: the cells' settings, first-seen order).
    titles: a column header per setting (default: the setting's name).
  """
  _check_cells(cells_)
  if settings is None:
    settings = list(dict.fromkeys(c['setting'] for c in cells_))
  titles = dict(titles or {})
  by_key = {}
  for c in cells_:
    if (c['claim'], c['setting']) in by_key:
      raise ValueError(f'two cells for claim {c["claim"]} in setting {c["setting"]!r}')
    by_key[(c['claim'], c['setting'])] = c
  lines = ['| claim | ' + ' | '.join(titles.get(s, s) for s in settings) + ' |',
           '|---|' + '---|' * len(settings)]
  for claim in CLAIMS:
    row = [f'{claim}. {CLAIM_NAMES[claim]}']
    for s in settings:
      c = by_key.get((claim, s))
      row.append(NOT_RUN if c is None else _cell_text(c))
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'


def verdict_details(cells_: Sequence[Mapping[str, Any]],
                    titles: Optional[Mapping[str, str]] = None) -> str:
  """A markdown list of every cell's statistic and the reason for its verdict."""
  _check_cells(cells_)
  titles = dict(titles or {})
  lines = []
  for c in sorted(cells_, key=lambda c: c['claim']):
    stat = f' `{c["statistic"]}`:' if c['statistic'] else ''
    lines.append(f'- claim {c["claim"]}, {titles.get(c["setting"], c["setting"])}:{stat} '
                 f'{c["verdict"]} ({c["why"]})')
  return '\n'.join(lines) + '\n'
