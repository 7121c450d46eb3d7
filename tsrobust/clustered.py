"""Teacher-level inference: students nested in teachers, images as units.

A study trains ``K`` students on each of ``T`` teachers. Students of one
teacher share that teacher, so they are not independent draws of the
quantity a claim is about ("a student of a random teacher"): an interval that
pools the ``T * K`` students as independent is too narrow when the teachers
differ (it covers far less than its nominal level; ``simulate_coverage``
measures it). The functions here treat the *teacher* as the unit:

- ``teacher_mean_interval``: the Student-t interval over the ``T`` per-teacher
  means (exact for normal teacher means, balanced or not; the analytic choice,
  and the one to use with few teachers).
- ``two_stage_bootstrap``: teachers resampled with replacement, then students
  within each drawn teacher; any weighted statistic; by default the
  *expanded* percentile interval (Hesterberg 2015), which widens the
  percentile interval for small ``T`` (the plain one is an option).
- ``paired_difference``: method ``a`` minus method ``b`` per teacher (teachers
  present in both), with a t-interval over teachers or the two-stage
  bootstrap; the per-teacher differences are reported too.
- ``pooled_within_correlation``: Pearson correlation within each group (e.g.
  one teacher's grid point), pooled by Fisher z weighted by ``n - 3``; with
  ``teachers`` also a t-interval over per-teacher pooled z.
- ``image_unit_interval``: robust accuracy with the attacked *image* as the
  unit (per-image mean over students, then a t-interval over images) beside
  the Wilson interval over ``students x images`` that under-covers.
- ``simulate_coverage`` / ``simulate_image_coverage``: the fraction of nominal
  intervals that cover a known truth in simulated hierarchical studies.

Data arrive as flat per-student arrays with a ``teachers`` array of labels
(integers or strings). As in ``tsrobust.stats``: numpy float64, randomness
from a JAX PRNG key (no ``np.random``), ``statistics.NormalDist`` for normal
quantiles and a small incomplete-beta routine for Student-t quantiles (no
scipy). Bad input (mismatched lengths, fewer than 2 teachers, NaN) raises a
``ValueError`` naming the argument.

>>> values = [1.0, 3.0, 2.0, 4.0, 6.0, 8.0]   # 3 teachers x 2 students
>>> teachers = ['t0', 't0', 't1', 't1', 't2', 't2']
>>> out = teacher_mean_interval(values, teachers)   # teacher means 2, 3, 7
>>> out['estimate'], out['num_teachers'], out['df']
(4.0, 3, 2)
>>> [round(v, 3) for v in out['ci']]   # 4 -/+ t_{0.975,2} * sqrt(7 / 3)
[-2.572, 10.572]
>>> round(student_t_quantile(0.975, 9), 3)
2.262
"""

import functools
import math
import statistics
from typing import Any, Callable, Dict, Optional, Tuple

import chex
import jax
import numpy as np

from tsrobust import stats

__all__ = ['student_t_cdf', 'student_t_quantile', 'weighted_mean', 'two_stage_weights',
           'two_stage_bootstrap', 'teacher_mean_interval', 'paired_difference',
           'pooled_within_correlation', 'image_unit_interval', 'simulate_coverage',
           'simulate_image_coverage', 'COVERAGE_METHODS', 'IMAGE_COVERAGE_METHODS']

# statistic(values [n], w [..., n]) -> [...]: weights broadcast over leading axes.
WeightedStatistic1 = Callable[[Any, Any], Any]


# Student-t distribution (no scipy).

def _beta_continued_fraction(a: float, b: float, x: float) -> float:
  """Continued fraction of the incomplete beta function (modified Lentz)."""
  tiny = 1e-300
  qab, qap, qam = a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 1000):
    m2 = 2 * m
    aa = m * (b - m) * x / ((qam + m2) * (a + m2))
    d = 1.0 + aa * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + aa / c
    c = c if abs(c) > tiny else tiny
    h *= d * c
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
    d = 1.0 + aa * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + aa / c
    c = c if abs(c) > tiny else tiny
    step = d * c
    h *= step
    if abs(step - 1.0) < 1e-16:
      break
  return h


def _regularized_beta(a: float, b: float, x: float) -> float:
  """``I_x(a, b)``, the regularized incomplete beta function, ``0 <= x <= 1``."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
               + a * math.log(x) + b * math.log1p(-x))
  front = math.exp(log_front)
  if x < (a + 1.0) / (a + b + 2.0):
    return front * _beta_continued_fraction(a, b, x) / a
  return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def _t_upper_tail(t: float, df: float) -> float:
  """``P(T > t)`` for ``t >= 0``, ``T`` Student-t with ``df`` degrees of freedom."""
  return 0.5 * _regularized_beta(0.5 * df, 0.5, df / (df + t * t))


def _check_df(df: float) -> float:
  df = float(df)
  if not (df > 0 and math.isfinite(df)):
    raise ValueError(f'df must be a finite number > 0, got {df!r}')
  return df


def student_t_cdf(t: float, df: float) -> float:
  """``P(T <= t)`` for Student's t with ``df > 0`` degrees of freedom.

  >>> round(student_t_cdf(2.0, 1), 6)   # Cauchy: 1/2 + atan(2) / pi
  0.852416
  """
  df = _check_df(df)
  t = float(t)
  if math.isnan(t):
    raise ValueError('t must not be NaN')
  tail = _t_upper_tail(abs(t), df)
  return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
  """The ``p`` quantile of Student's t with ``df > 0`` degrees of freedom.

  Bisection on the upper tail (the regularized incomplete beta function,
  continued fraction); relative accuracy about 1e-13. Table values:
  ``t_{0.975, 3} = 3.182``, ``t_{0.975, 9} = 2.262``.

  >>> round(student_t_quantile(0.975, 3), 3)
  3.182
  """
  df = _check_df(df)
  p = float(p)
  if not 0 < p < 1:
    raise ValueError(f'p must be in (0, 1), got {p!r}')
  return _t_quantile(p, df)


@functools.lru_cache(maxsize=1024)  # intervals ask for a few (level, df) pairs many times
def _t_quantile(p: float, df: float) -> float:
  if p == 0.5:
    return 0.0
  q = 1.0 - p if p > 0.5 else p  # upper-tail probability of |quantile|
  lo, hi = 0.0, 1.0
  while _t_upper_tail(hi, df) > q:
    lo, hi = hi, 2.0 * hi
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if _t_upper_tail(mid, df) > q:
      lo = mid
    else:
      hi = mid
    if hi - lo <= 1e-14 * hi:
      break
  t = 0.5 * (lo + hi)
  return t if p > 0.5 else -t


# Input checks.

def _check_level(level: float) -> float:
  if not 0 < level < 1:
    raise ValueError(f'level must be in (0, 1), got {level!r}')
  return float(level)


def _check_values(values: Any, name: str) -> np.ndarray:
  try:
    v = np.asarray(values, np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be numbers, one per student: {e}') from None
  if v.ndim != 1:
    raise ValueError(f'{name} must be an [n] vector (one value per student), got shape {v.shape}')
  if not np.isfinite(v).all():
    bad = int((~np.isfinite(v)).sum())
    raise ValueError(f'{name} has {bad} NaN or infinite values; drop or fix them first')
  return v


def _check_labels(labels: Any, n: int, name: str,
                  values_name: str) -> Tuple[np.ndarray, np.ndarray]:
  """``(distinct labels [G] sorted, index [n] into them)``."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'{name} must be an [n] vector (one label per student), '
                     f'got shape {labels.shape}')
  if labels.shape[0] != n:
    raise ValueError(f'{name} has {labels.shape[0]} labels but {values_name} has {n} values '
                     f'(one label per value)')
  if labels.dtype.kind == 'f' and np.isnan(labels).any():
    raise ValueError(f'{name} has NaN labels')
  if labels.dtype.kind == 'O' and any(v is None for v in labels):
    raise ValueError(f'{name} has None labels')
  try:
    ids, index = np.unique(labels, return_inverse=True)
  except TypeError as e:
    msg = f'{name} must be labels of one sortable type (ints or strings): {e}'
    raise ValueError(msg) from None
  return ids, index.reshape(-1)


def _need_teachers(num: int, name: str):
  if num < 2:
    raise ValueError(f'{name} must hold at least 2 distinct teachers (an interval over '
                     f'teachers needs 2), got {num}')


def _py(label: Any) -> Any:
  """A numpy scalar label as a plain Python value (for JSON records)."""
  return label.item() if isinstance(label, np.generic) else label


def _t_interval(units: np.ndarray, level: float) -> Dict[str, Any]:
  """Mean of ``units [G]`` with the t-interval over them (``G >= 2``)."""
  g = units.shape[0]
  mean = float(units.mean())
  se = float(units.std(ddof=1) / math.sqrt(g))
  half = student_t_quantile(0.5 + level / 2.0, g - 1) * se
  return {'estimate': mean, 'ci': [mean - half, mean + half], 'se': se, 'df': g - 1}


def _group_means(values: np.ndarray, index: np.ndarray,
                 num: int) -> Tuple[np.ndarray, np.ndarray]:
  """``(means [num], sizes [num])`` of ``values`` per group ``index``."""
  sizes = np.bincount(index, minlength=num)
  return np.bincount(index, weights=values, minlength=num) / sizes, sizes


# The two-stage bootstrap.

def weighted_mean(values: Any, w: Any) -> Any:
  """``sum(w * values) / sum(w)`` over the last axis; ``w [..., n]`` broadcasts.

  >>> float(weighted_mean([1.0, 2.0, 4.0], [1.0, 0.0, 3.0]))
  3.25
  """
  values, w = np.broadcast_arrays(np.asarray(values, np.float64), np.asarray(w, np.float64))
  with np.errstate(invalid='ignore', divide='ignore'):
    return ((w * values).sum(-1) / w.sum(-1))[()]


def _padded(size: int) -> int:
  """A power of two >= ``size`` (at least 65536): one XLA compile per size bucket."""
  return 1 << max(size - 1, 65535).bit_length()


def _below(key: chex.PRNGKey, bounds: np.ndarray) -> np.ndarray:
  """Integers uniform in ``[0, bounds)``, elementwise (``bounds >= 1``), from ``key``.

  Drawn as 32 random bits per entry (flat, in a size padded to a power of two
  so XLA compiles once per size bucket) scaled by multiply-shift: the bias is
  at most ``bounds / 2**32``.
  """
  size = bounds.size
  bits = np.asarray(jax.random.bits(key, (_padded(size),), np.uint32))[:size].astype(np.uint64)
  return ((bits * bounds.reshape(-1).astype(np.uint64)) >> np.uint64(32)).astype(
      np.int64).reshape(bounds.shape)


def two_stage_weights(index: Any, picks: Any, key: chex.PRNGKey) -> np.ndarray:
  """``[B, n]`` per-student counts of a two-stage resample, given the teachers drawn.

  ``picks [B, G]`` are the teachers drawn in each of ``B`` resamples (ids
  ``0..G-1``; ``G`` draws each, with replacement); for every draw, the drawn
  teacher's ``n_t`` students are drawn ``n_t`` times with replacement. A
  student's count is how often it was drawn, over all draws of its teacher.
  Vectorized over the resamples: it holds ``B * G * max_t n_t`` draws at once
  (fine for students; for thousands of values per teacher, chunk ``picks``).

  Args:
    index: ``[n]`` teacher id ``0..G-1`` of each student; every id has students.
    picks: ``[B, G]`` teacher ids drawn.
    key: PRNG key for the students' draws.
  """
  index = np.asarray(index).reshape(-1)
  picks = np.asarray(picks)
  n = index.shape[0]
  b = picks.shape[0]
  sizes = np.bincount(index)
  order = np.argsort(index, kind='stable')  # teacher t's students: order[start[t]:start[t+1]]
  start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  slot_sizes = sizes[picks]  # [B, G]
  width = int(sizes.max())
  bounds = np.broadcast_to(np.maximum(slot_sizes, 1)[..., None], slot_sizes.shape + (width,))
  offsets = _below(key, np.ascontiguousarray(bounds))  # [B, G, width]
  valid = np.arange(width) < slot_sizes[..., None]
  student = order[np.minimum(start[picks][..., None] + offsets, n - 1)]
  flat = (np.arange(b)[:, None, None] * n + student)[valid]
  return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _interval_levels(level: float, num_teachers: int, interval: str) -> float:
  """Lower percentile (as a fraction) of a ``percentile`` or ``expanded`` interval."""
  alpha = (1.0 - level) / 2.0
  if interval == 'percentile':
    return alpha
  # Hesterberg (2015), "What teachers should know about the bootstrap", sec. 3.6:
  # percentiles at Phi(-sqrt(G / (G - 1)) t_{1 - alpha, G - 1}), G clusters.
  t = student_t_quantile(1.0 - alpha, num_teachers - 1)
  return statistics.NormalDist().cdf(-math.sqrt(num_teachers / (num_teachers - 1.0)) * t)


_INTERVALS = ('expanded', 'percentile')
_WEIGHTINGS = ('teachers', 'students')


def _check_choice(value: str, allowed: Tuple[str, ...], name: str):
  if value not in allowed:
    raise ValueError(f'{name} must be one of {list(allowed)}, got {value!r}')


def _teacher_picks(key: chex.PRNGKey, num_resamples: int, num_teachers: int) -> np.ndarray:
  if num_resamples < 1:
    raise ValueError(f'num_resamples must be >= 1, got {num_resamples!r}')
  return _below(key, np.full((num_resamples, num_teachers), num_teachers, np.int64))


def _base_weights(index: np.ndarray, sizes: np.ndarray, weighting: str) -> np.ndarray:
  """Per-student weight of one draw: 1, or ``1 / n_t`` (every teacher counts once)."""
  return 1.0 / sizes[index] if weighting == 'teachers' else np.ones(index.shape)


def _percentiles(draws: np.ndarray, lower: float) -> list:
  if not np.isfinite(draws).any():
    return [math.nan, math.nan]
  lo, hi = np.nanquantile(draws, [lower, 1.0 - lower])
  return [float(lo), float(hi)]


def two_stage_bootstrap(values: Any, teachers: Any, key: chex.PRNGKey,
                        num_resamples: int = 2000, level: float = 0.95,
                        statistic: WeightedStatistic1 = weighted_mean,
                        weighting: str = 'teachers',
                        interval: str = 'expanded') -> Dict[str, Any]:
  """Two-stage (teachers, then students) bootstrap interval of ``statistic``.

  Each resample draws ``G`` teachers with replacement from the ``G`` in
  ``teachers``, then, for each drawn teacher, its ``n_t`` students with
  replacement. All resamples are evaluated at once through per-student
  weights ``w [num_resamples, n]`` (``two_stage_weights``): ``statistic(values,
  w)`` is a weighted statistic vectorized over the leading axis, as in
  ``tsrobust.stats``. NaN resamples are dropped.

  ``weighting='teachers'`` (default) gives every drawn teacher the same total
  weight (each student ``1 / n_t``): the estimate is the mean of the teacher
  means, as in ``teacher_mean_interval``. ``'students'`` gives every drawn
  student weight 1 (the pooled student mean). With equally many students per
  teacher the two agree.

  ``interval='expanded'`` (default) is Hesterberg's expanded percentile
  interval: the percentiles at ``Phi(-sqrt(G/(G-1)) t_{(1+level)/2, G-1})``
  instead of ``(1 - level) / 2``, which corrects the percentile interval's
  narrowness for few teachers (with 8 teachers the plain one is about as wide
  as a normal interval with the ``(G-1)/G`` variance: about 89% coverage for
  a nominal 95%); ``'percentile'`` is the plain percentile interval. With
  fewer than about 8 teachers prefer ``teacher_mean_interval``: the expanded
  level then reaches beyond the resamples' extremes.

  Args:
    values: ``[n]`` one value per student.
    teachers: ``[n]`` teacher label per student (ints or strings); >= 2 teachers.
    key: PRNG key.
    num_resamples: number of resamples (>= 1).
    level: coverage of the interval, in (0, 1).
    statistic: ``(values [n], w [B, n]) -> [B]``, e.g. ``weighted_mean``.
    weighting: ``'teachers'`` or ``'students'`` (see above).
    interval: ``'expanded'`` or ``'percentile'``.

  Returns:
    ``{'estimate', 'ci': [lo, hi], 'num_teachers', 'num_students', 'level',
    'num_resamples', 'weighting', 'interval'}``.
  """
  values = _check_values(values, 'values')
  ids, index = _check_labels(teachers, values.shape[0], 'teachers', 'values')
  _need_teachers(len(ids), 'teachers')
  level = _check_level(level)
  _check_choice(weighting, _WEIGHTINGS, 'weighting')
  _check_choice(interval, _INTERVALS, 'interval')
  g = len(ids)
  sizes = np.bincount(index, minlength=g)
  base = _base_weights(index, sizes, weighting)
  k_teachers, k_students = jax.random.split(key)
  picks = _teacher_picks(k_teachers, num_resamples, g)
  w = two_stage_weights(index, picks, k_students) * base
  draws = np.asarray(statistic(values, w), np.float64)
  return {'estimate': float(statistic(values, base)),
          'ci': _percentiles(draws, _interval_levels(level, g, interval)),
          'num_teachers': g, 'num_students': int(values.shape[0]), 'level': level,
          'num_resamples': num_resamples, 'weighting': weighting, 'interval': interval}


def teacher_mean_interval(values: Any, teachers: Any, level: float = 0.95) -> Dict[str, Any]:
  """The t-interval over per-teacher means.

  Each teacher's students are averaged; the ``G`` teacher means are the
  units: estimate their mean, ``se = sd / sqrt(G)``, interval
  ``estimate -/+ t_{(1+level)/2, G-1} * se``. Exact when the teacher means are
  normal with a common variance (e.g. equally many students per teacher),
  however few the teachers; the between-teacher spread already contains the
  students' noise, so no separate within-teacher term is needed.

  Args:
    values: ``[n]`` one value per student.
    teachers: ``[n]`` teacher label per student; >= 2 distinct teachers.
    level: coverage, in (0, 1).

  Returns:
    ``{'estimate', 'ci': [lo, hi], 'se', 'df', 'num_teachers', 'num_students',
    'level', 'teachers': [labels, sorted], 'teacher_means': [...]}``.
  """
  values = _check_values(values, 'values')
  ids, index = _check_labels(teachers, values.shape[0], 'teachers', 'values')
  _need_teachers(len(ids), 'teachers')
  level = _check_level(level)
  means, _ = _group_means(values, index, len(ids))
  out = _t_interval(means, level)
  out.update({'num_teachers': len(ids), 'num_students': int(values.shape[0]), 'level': level,
              'teachers': [_py(t) for t in ids], 'teacher_means': means.tolist()})
  return out


def paired_difference(a: Any, b: Any, teachers_a: Any, teachers_b: Any,
                      key: Optional[chex.PRNGKey] = None, level: float = 0.95,
                      method: str = 't', num_resamples: int = 2000,
                      interval: str = 'expanded') -> Dict[str, Any]:
  """Mean of ``a`` minus ``b`` per teacher (e.g. AT - standard), over teachers.

  Students of method ``a`` and of method ``b`` are averaged per teacher; on
  the teachers present in both, ``d_t = mean_t(a) - mean_t(b)``; the estimate
  is the mean of the ``d_t``. The teacher's own level cancels in ``d_t``
  (pairing), so the interval reflects how the *effect* varies over teachers.

  ``method='t'``: t-interval over the ``d_t`` (``teacher_mean_interval`` of
  the differences). ``method='bootstrap'``: the two-stage bootstrap with the
  same teachers drawn for ``a`` and ``b`` and their students drawn separately;
  each drawn teacher counts once (its ``a`` mean minus its ``b`` mean); needs
  ``key``; ``interval`` as in ``two_stage_bootstrap``.

  Args:
    a, b: ``[n_a]``, ``[n_b]`` values per student of either method.
    teachers_a, teachers_b: their teacher labels; >= 2 teachers in common.
    key: PRNG key (for ``method='bootstrap'``).
    level: coverage, in (0, 1).
    method: ``'t'`` or ``'bootstrap'``.
    num_resamples: bootstrap resamples.
    interval: bootstrap interval, ``'expanded'`` or ``'percentile'``.

  Returns:
    ``{'estimate', 'ci', 'level', 'method', 'num_teachers', 'teachers'
    (common, sorted), 'differences' (per teacher), 'means_a', 'means_b',
    'num_students_a', 'num_students_b' (in common teachers), 'unpaired_teachers'
    (labels left out: in one method only)}``; with ``'t'`` also ``'se'``, ``'df'``.
  """
  a = _check_values(a, 'a')
  b = _check_values(b, 'b')
  ta = np.asarray(teachers_a)
  tb = np.asarray(teachers_b)
  _check_labels(ta, a.shape[0], 'teachers_a', 'a')
  _check_labels(tb, b.shape[0], 'teachers_b', 'b')
  level = _check_level(level)
  _check_choice(method, ('t', 'bootstrap'), 'method')
  if method == 'bootstrap':
    _check_choice(interval, _INTERVALS, 'interval')
    if key is None:
      raise ValueError("key is required with method='bootstrap'")
  try:
    common = np.intersect1d(ta, tb)
    unpaired = np.setxor1d(ta, tb)
  except TypeError as e:
    msg = f'teachers_a and teachers_b must be labels of one sortable type: {e}'
    raise ValueError(msg) from None
  _need_teachers(len(common), 'teachers_a and teachers_b (in common)')
  in_a, in_b = np.isin(ta, common), np.isin(tb, common)
  a, b = a[in_a], b[in_b]
  ia = np.searchsorted(common, ta[in_a])
  ib = np.searchsorted(common, tb[in_b])
  g = len(common)
  means_a, sizes_a = _group_means(a, ia, g)
  means_b, sizes_b = _group_means(b, ib, g)
  diffs = means_a - means_b
  out = {'level': level, 'method': method, 'num_teachers': g,
         'teachers': [_py(t) for t in common], 'differences': diffs.tolist(),
         'means_a': means_a.tolist(), 'means_b': means_b.tolist(),
         'num_students_a': int(a.shape[0]), 'num_students_b': int(b.shape[0]),
         'unpaired_teachers': [_py(t) for t in unpaired]}
  if method == 't':
    out.update(_t_interval(diffs, level))
    return out
  k_teachers, k_a, k_b = jax.random.split(key, 3)
  picks = _teacher_picks(k_teachers, num_resamples, g)
  wa = two_stage_weights(ia, picks, k_a) / sizes_a[ia]
  wb = two_stage_weights(ib, picks, k_b) / sizes_b[ib]
  draws = (wa @ a - wb @ b) / g  # each of the G draws has total weight 1 per method
  out.update({'estimate': float(diffs.mean()),
              'ci': _percentiles(draws, _interval_levels(level, g, interval)),
              'num_resamples': num_resamples, 'interval': interval})
  return out


# Correlations within groups, pooled.

def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  xc, yc = x - x.mean(), y - y.mean()
  return float((xc * yc).sum() / math.sqrt((xc * xc).sum() * (yc * yc).sum()))


def pooled_within_correlation(x: Any, y: Any, groups: Any, teachers: Any = None,
                              level: float = 0.95) -> Dict[str, Any]:
  """Pearson correlation within each group, pooled over groups by Fisher z.

  Each group (e.g. the students of one teacher at one grid point, or of one
  method) gives ``r_g``; ``z_g = atanh(r_g)`` has variance about
  ``1 / (n_g - 3)``; the pooled ``z = sum (n_g - 3) z_g / sum (n_g - 3)``,
  ``se = 1 / sqrt(sum (n_g - 3))``, and the estimate and interval are
  ``tanh`` of ``z`` and of ``z -/+ z_{(1+level)/2} se``.

  **The interval assumes the groups are independent** (and bivariate-normal
  within). Groups of one teacher share that teacher and are not independent,
  so with ``teachers`` given the groups are ``(teacher, group)`` pairs and
  ``'teacher_level'`` adds an interval that does not assume it: each
  teacher's groups pooled into one ``z_t`` (same weights), then the
  t-interval over the teachers' ``z_t``, back-transformed.

  Groups with fewer than 4 members, where ``x`` or ``y`` is constant, or
  with ``|r| = 1`` (infinite z) are skipped and counted in ``'skipped'``.

  Args:
    x, y: ``[n]`` values per student.
    groups: ``[n]`` group label per student.
    teachers: optional ``[n]`` teacher label per student.
    level: coverage, in (0, 1).

  Returns:
    ``{'estimate', 'ci', 'z', 'se_z', 'level', 'num_groups' (used),
    'num_members' (in used groups), 'skipped': {'too_small', 'constant',
    'perfect'}, 'groups': [{'group', ('teacher',) 'n', 'r', 'skipped'}],
    'assumption'}`` and, with ``teachers``, ``'teacher_level'``. With no
    usable group the estimate and interval are None and a ``'note'`` says so.
  """
  x = _check_values(x, 'x')
  y = _check_values(y, 'y')
  n = x.shape[0]
  if y.shape[0] != n:
    raise ValueError(f'x has {n} values but y has {y.shape[0]} (one pair per student)')
  group_ids, group_index = _check_labels(groups, n, 'groups', 'x')
  level = _check_level(level)
  if teachers is None:
    teacher_ids, teacher_index = None, np.zeros(n, np.int64)
  else:
    teacher_ids, teacher_index = _check_labels(teachers, n, 'teachers', 'x')
  cells, cell_index = np.unique(teacher_index * len(group_ids) + group_index,
                                return_inverse=True)
  cell_index = cell_index.reshape(-1)
  skipped = {'too_small': 0, 'constant': 0, 'perfect': 0}
  rows, zs, weights, cell_teacher = [], [], [], []
  for c, cell in enumerate(cells):
    members = cell_index == c
    t, grp = divmod(int(cell), len(group_ids))
    row = {'group': _py(group_ids[grp])}
    if teacher_ids is not None:
      row['teacher'] = _py(teacher_ids[t])
    gx, gy = x[members], y[members]
    row.update({'n': int(members.sum()), 'r': None, 'skipped': None})
    if row['n'] < 4:
      row['skipped'] = 'too_small'
    elif np.ptp(gx) == 0 or np.ptp(gy) == 0:
      row['skipped'] = 'constant'
    else:
      r = _pearson(gx, gy)
      row['r'] = r
      if abs(r) > 1.0 - 1e-12:
        row['skipped'] = 'perfect'
      else:
        zs.append(math.atanh(r))
        weights.append(row['n'] - 3.0)
        cell_teacher.append(t)
    if row['skipped']:
      skipped[row['skipped']] += 1
    rows.append(row)
  out = {'level': level, 'num_groups': len(zs), 'num_members': int(sum(weights) + 3 * len(zs)),
         'skipped': skipped, 'groups': rows,
         'assumption': 'groups independent (bivariate normal within); see teacher_level'}
  if not zs:
    out.update({'estimate': None, 'ci': None, 'z': None, 'se_z': None,
                'note': 'no group with >= 4 members, non-constant x and y and |r| < 1'})
  else:
    zs_a, w_a = np.array(zs), np.array(weights)
    z = float((w_a * zs_a).sum() / w_a.sum())
    se = 1.0 / math.sqrt(w_a.sum())
    half = statistics.NormalDist().inv_cdf(0.5 + level / 2.0) * se
    out.update({'estimate': math.tanh(z), 'ci': [math.tanh(z - half), math.tanh(z + half)],
                'z': z, 'se_z': se})
  if teacher_ids is not None:
    out['teacher_level'] = _teacher_level_z(np.array(zs), np.array(weights),
                                            np.array(cell_teacher, np.int64), teacher_ids, level)
  return out


def _teacher_level_z(zs: np.ndarray, weights: np.ndarray, cell_teacher: np.ndarray,
                     teacher_ids: np.ndarray, level: float) -> Dict[str, Any]:
  used = np.unique(cell_teacher)
  if len(used) < 2:
    return {'estimate': None, 'ci': None, 'num_teachers': int(len(used)),
            'note': 'fewer than 2 teachers with a usable group'}
  pos = np.searchsorted(used, cell_teacher)
  z_t = (np.bincount(pos, weights * zs, len(used)) / np.bincount(pos, weights, len(used)))
  t = _t_interval(z_t, level)
  return {'estimate': math.tanh(t['estimate']), 'ci': [math.tanh(v) for v in t['ci']],
          'z': t['estimate'], 'se_z': t['se'], 'df': t['df'], 'num_teachers': int(len(used)),
          'teachers': [_py(teacher_ids[i]) for i in used],
          'teacher_r': np.tanh(z_t).tolist()}


# Robust accuracy with the image as the unit.

def image_unit_interval(success: Any, level: float = 0.95) -> Dict[str, Any]:
  """Robust accuracy with the attacked image as the unit.

  ``success[s, i]`` says whether student ``s`` withstood the attack on image
  ``i`` (the same images attacked for every student, e.g. students of one
  teacher). Students agree on which images are hard, so the ``S x I``
  outcomes are not independent: the Wilson interval over all of them
  (``'ci_pooled_wilson'``, shown for contrast) is too narrow by about
  ``sqrt(design_effect)``. Here each image's success rate over the students
  ``p_i`` is the unit: estimate ``mean(p_i)``, interval ``-/+ t_{(1+level)/2,
  I-1} sd(p_i) / sqrt(I)`` (by the CLT over images; it is not clipped to
  [0, 1]). It is about the population the images are drawn from, for these
  students. When every ``p_i`` is equal (e.g. all 1) it has zero width: then
  the images carry no spread to estimate, and a binomial interval over the
  ``I`` images (``stats.wilson_interval``) is the honest statement.

  Args:
    success: ``[students, images]`` bool (or 0/1); >= 2 images.
    level: coverage, in (0, 1).

  Returns:
    ``{'estimate', 'ci', 'se', 'df', 'num_images', 'num_students', 'level',
    'ci_pooled_wilson', 'design_effect'}`` (``design_effect``: the variance of
    the estimate over images / the binomial one over ``S x I``; NaN when the
    latter is 0).
  """
  s = np.asarray(success)
  if s.ndim != 2:
    raise ValueError(f'success must be [students, images], got shape {s.shape}')
  if s.dtype != bool:
    s = _check_values(s.reshape(-1), 'success').reshape(s.shape)
    if not np.isin(s, (0.0, 1.0)).all():
      raise ValueError('success must be bool or 0/1 values')
  num_students, num_images = s.shape
  if num_students < 1:
    raise ValueError('success must have at least 1 student (row)')
  if num_images < 2:
    raise ValueError(f'success must have at least 2 images (columns), got {num_images}')
  level = _check_level(level)
  per_image = s.astype(np.float64).mean(0)
  out = _t_interval(per_image, level)
  total = int(s.sum())
  lo, hi = stats.wilson_interval(total, s.size, level)
  p = total / s.size
  binomial_var = p * (1.0 - p) / s.size
  out.update({'num_images': num_images, 'num_students': num_students, 'level': level,
              'ci_pooled_wilson': [float(lo), float(hi)],
              'design_effect': out['se'] ** 2 / binomial_var if binomial_var > 0 else math.nan})
  return out


# Coverage by simulation.

def _draw(sampler: Callable[..., Any], key: chex.PRNGKey, shape: Tuple[int, ...]) -> np.ndarray:
  """``sampler(key, shape)`` as float64, drawn flat in a padded size (see ``_padded``)."""
  size = int(np.prod(shape))
  return np.asarray(sampler(key, (_padded(size),)), np.float64)[:size].reshape(shape)


def _naive_mean_interval(values: np.ndarray, level: float) -> list:
  """t-interval that treats every student as independent (the wrong unit)."""
  return _t_interval(values, level)['ci']


def _naive_difference_interval(a: np.ndarray, b: np.ndarray, level: float) -> list:
  """Normal interval of ``mean(a) - mean(b)``, students independent, pairing ignored."""
  d = a.mean() - b.mean()
  se = math.sqrt(a.var(ddof=1) / a.shape[0] + b.var(ddof=1) / b.shape[0])
  half = statistics.NormalDist().inv_cdf(0.5 + level / 2.0) * se
  return [d - half, d + half]


COVERAGE_METHODS = ('teacher_t', 'bootstrap', 'bootstrap_percentile', 'naive',
                    'paired_t', 'paired_bootstrap', 'paired_naive')


def simulate_coverage(method: str, key: chex.PRNGKey, num_studies: int = 200,
                      num_teachers: int = 8, students_per_teacher: int = 4,
                      teacher_sd: float = 1.0, student_sd: float = 0.5,
                      effect: float = 0.0, level: float = 0.95,
                      num_resamples: int = 1000) -> Dict[str, Any]:
  """Fraction of nominal ``level`` intervals that cover the truth in simulated studies.

  Each study has ``T = num_teachers`` teachers and ``K =
  students_per_teacher`` students per teacher (per method). One-sample
  methods: ``value[t, k] = effect + u_t + e[t, k]``, ``u_t ~ N(0,
  teacher_sd^2)``, ``e ~ N(0, student_sd^2)``; the truth is ``effect``.
  Paired methods: ``a[t, k] = u_t + e``, ``b[t, k] = u_t - effect - v_t + e'``
  with ``v_t ~ N(0, teacher_sd^2)`` the teacher's own effect deviation; the
  truth of ``a - b`` is ``effect``.

  Methods: ``'teacher_t'`` (``teacher_mean_interval``), ``'bootstrap'``
  (``two_stage_bootstrap``, expanded), ``'bootstrap_percentile'`` (plain
  percentile), ``'naive'`` (t-interval over all students as independent),
  ``'paired_t'`` / ``'paired_bootstrap'`` (``paired_difference``),
  ``'paired_naive'`` (two independent samples of students, pairing and
  teachers ignored).

  Returns:
    ``{'coverage', 'mean_width', 'num_studies', 'method', 'truth', 'level'}``.
  """
  _check_choice(method, COVERAGE_METHODS, 'method')
  if num_studies < 1:
    raise ValueError(f'num_studies must be >= 1, got {num_studies!r}')
  if num_teachers < 2:
    raise ValueError(f'num_teachers must be >= 2, got {num_teachers!r}')
  if students_per_teacher < 1:
    raise ValueError(f'students_per_teacher must be >= 1, got {students_per_teacher!r}')
  if teacher_sd < 0 or student_sd < 0:
    raise ValueError(f'teacher_sd and student_sd must be >= 0, got {teacher_sd!r}, '
                     f'{student_sd!r}')
  level = _check_level(level)
  t, k = num_teachers, students_per_teacher
  k_data, k_boot = jax.random.split(key)
  noise = _draw(jax.random.normal, k_data, (num_studies, 4, t, k))
  u = teacher_sd * noise[:, 0, :, :1]
  v = teacher_sd * noise[:, 1, :, :1]
  a = (u + student_sd * noise[:, 2]).reshape(num_studies, t * k)
  b = (u - effect - v + student_sd * noise[:, 3]).reshape(num_studies, t * k)
  teachers = np.repeat(np.arange(t), k)
  covered, widths = 0, []
  for i in range(num_studies):
    ki = jax.random.fold_in(k_boot, i)
    values = a[i] + effect
    if method == 'teacher_t':
      ci = teacher_mean_interval(values, teachers, level)['ci']
    elif method in ('bootstrap', 'bootstrap_percentile'):
      ci = two_stage_bootstrap(values, teachers, ki, num_resamples, level,
                               interval='expanded' if method == 'bootstrap' else 'percentile')['ci']
    elif method == 'naive':
      ci = _naive_mean_interval(values, level)
    elif method == 'paired_naive':
      ci = _naive_difference_interval(a[i], b[i], level)
    else:
      ci = paired_difference(a[i], b[i], teachers, teachers, ki, level,
                             't' if method == 'paired_t' else 'bootstrap', num_resamples)['ci']
    covered += ci[0] <= effect <= ci[1]
    widths.append(ci[1] - ci[0])
  return {'coverage': covered / num_studies, 'mean_width': float(np.mean(widths)),
          'num_studies': num_studies, 'method': method, 'truth': effect, 'level': level}


IMAGE_COVERAGE_METHODS = ('image', 'pooled_wilson')


def _logistic_normal_mean(mu: float, sd: float) -> float:
  """``E[sigmoid(mu + sd Z)]``, ``Z ~ N(0, 1)``, by 80-point Gauss-Hermite quadrature."""
  nodes, w = np.polynomial.hermite.hermgauss(80)
  return float((w / np.sqrt(np.pi) * (1.0 / (1.0 + np.exp(-(mu + np.sqrt(2.0) * sd * nodes)))
                                      )).sum())


def simulate_image_coverage(method: str, key: chex.PRNGKey, num_studies: int = 200,
                            num_images: int = 100, num_students: int = 4,
                            image_sd: float = 2.0, accuracy_logit: float = 1.0,
                            level: float = 0.95) -> Dict[str, Any]:
  """Coverage of robust-accuracy intervals when images differ in difficulty.

  Each study draws ``num_images`` images with robustness logits
  ``accuracy_logit + image_sd * Z_i``; each of ``num_students`` students
  withstands the attack on image ``i`` with probability ``sigmoid(logit_i)``.
  The truth is the mean over the image population, ``E[sigmoid(logit)]``.
  Methods: ``'image'`` (``image_unit_interval``), ``'pooled_wilson'`` (Wilson
  over ``students x images`` as independent).

  Returns:
    ``{'coverage', 'mean_width', 'num_studies', 'method', 'truth', 'level'}``.
  """
  _check_choice(method, IMAGE_COVERAGE_METHODS, 'method')
  if num_studies < 1 or num_images < 2 or num_students < 1:
    raise ValueError('need num_studies >= 1, num_images >= 2, num_students >= 1, got '
                     f'{num_studies!r}, {num_images!r}, {num_students!r}')
  level = _check_level(level)
  k_logit, k_success = jax.random.split(key)
  logits = accuracy_logit + image_sd * _draw(jax.random.normal, k_logit,
                                             (num_studies, 1, num_images))
  uniform = _draw(jax.random.uniform, k_success, (num_studies, num_students, num_images))
  success = uniform < 1.0 / (1.0 + np.exp(-logits))
  truth = _logistic_normal_mean(accuracy_logit, image_sd)
  covered, widths = 0, []
  for i in range(num_studies):
    out = image_unit_interval(success[i], level)
    ci = out['ci'] if method == 'image' else out['ci_pooled_wilson']
    covered += ci[0] <= truth <= ci[1]
    widths.append(ci[1] - ci[0])
  return {'coverage': covered / num_studies, 'mean_width': float(np.mean(widths)),
          'num_studies': num_studies, 'method': method, 'truth': truth, 'level': level}
