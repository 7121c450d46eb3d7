"""Correlation across trained students, with bootstrap confidence intervals.

Students that share a seed (teacher, initial student, data stream) are not
independent draws, so intervals can be bootstrapped over *seeds* (clusters):
a resample is a multiset of seeds drawn with replacement, which is the same
as giving every student the weight "how often its seed was drawn"; the
statistics then have weighted forms (``weighted_pearson``,
``weighted_spearman``) that are vectorized over the resamples' weights.

``pearson``, ``spearman`` and ``bootstrap_interval`` (students resampled) are
``jax.numpy``. The weighted statistics, the clustered bootstrap, the reports
(``correlation_report``, ``within_group_correlations``) and
``wilson_interval`` are numpy float64, with the standard library's
``statistics.NormalDist`` for the normal quantile (not ``scipy.stats``, whose
import took 1.3 s of every binary's start): they run on result records, once
per report, where an XLA compile per shape would cost more than the
arithmetic. Resampling still takes a JAX PRNG key (no ``np.random``): with one
student per cluster it draws the same resamples as ``bootstrap_interval`` for
the same key.
"""

import statistics
from typing import Any, Callable, Dict, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['WeightedStatistic', 'pearson', 'average_ranks', 'spearman',
           'weighted_pearson', 'weighted_average_ranks', 'weighted_spearman',
           'bootstrap_interval', 'cluster_weights', 'clustered_bootstrap_interval',
           'correlation_report', 'within_group_correlations', 'wilson_interval']

# statistic(x [n], y [n], w [..., n]) -> [...]: weights broadcast over leading axes.
WeightedStatistic = Callable[[Any, Any, Any], Any]


def pearson(x: chex.Array, y: chex.Array) -> chex.Array:
  """Pearson correlation of two ``[n]`` vectors (NaN if either is constant).

  >>> float(pearson(jnp.array([1.0, 2.0, 3.0]), jnp.array([2.0, 4.0, 7.0])))  # doctest: +NUMBER
  0.993
  """
  chex.assert_rank([x, y], 1)
  chex.assert_equal_shape([x, y])
  xc, yc = x - x.mean(), y - y.mean()
  den = jnp.sqrt((xc * xc).sum() * (yc * yc).sum())
  return jnp.where(den > 0, (xc * yc).sum() / jnp.where(den > 0, den, 1.0), jnp.nan)


def average_ranks(x: chex.Array) -> chex.Array:
  """``[n]`` ranks 1..n of ``x``; tied values share the mean of their ranks.

  >>> average_ranks(jnp.array([10.0, 30.0, 20.0, 20.0])).tolist()
  [1.0, 4.0, 2.5, 2.5]
  """
  chex.assert_rank(x, 1)
  less = (x[None, :] < x[:, None]).sum(1)
  equal = (x[None, :] == x[:, None]).sum(1)
  return less + (equal + 1) / 2.0


def spearman(x: chex.Array, y: chex.Array) -> chex.Array:
  """Spearman rank correlation: Pearson correlation of the average ranks.

  >>> float(spearman(jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 10.0, 100.0])))
  1.0
  """
  return pearson(average_ranks(x), average_ranks(y))


def weighted_pearson(x: Any, y: Any, w: Any) -> Any:
  """Pearson correlation with non-negative weights, vectorized over resamples.

  With integer weights it equals ``pearson`` of the sample where point ``i``
  is repeated ``w[..., i]`` times. NaN where ``x`` or ``y`` is constant over
  the points of positive weight, where all weights are zero, or where a value
  of positive weight is NaN (values of zero weight are ignored, NaN or not).

  Args:
    x, y: ``[..., n]`` values (usually ``[n]``).
    w: ``[..., n]`` weights; all three broadcast against each other.

  Returns:
    numpy float64 of the broadcast leading shape (a scalar for ``[n]`` inputs).
  """
  x, y, w = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (x, y, w)))
  x, y = np.where(w > 0, x, 0.0), np.where(w > 0, y, 0.0)  # zero weight: even NaN ignored
  with np.errstate(invalid='ignore', divide='ignore'):
    total = w.sum(-1)
    xc = x - (w * x).sum(-1, keepdims=True) / total[..., None]
    yc = y - (w * y).sum(-1, keepdims=True) / total[..., None]
    den = np.sqrt((w * xc * xc).sum(-1) * (w * yc * yc).sum(-1))
    r = (w * xc * yc).sum(-1) / den
  defined = ((total > 0) & (den > 0) & ~_constant_on_support(x, w)
             & ~_constant_on_support(y, w))
  return np.where(defined, r, np.nan)[()]


def _constant_on_support(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """True where ``x`` takes one value (or none) where ``w > 0``: exact, no rounding.

  NaN values count as "not constant"; their NaN reaches the result anyway.
  """
  on = w > 0
  return np.where(on, x, np.inf).min(-1) >= np.where(on, x, -np.inf).max(-1)


def weighted_average_ranks(x: Any, w: Any) -> np.ndarray:
  """Mid-ranks of ``x`` in the sample that repeats ``x[..., i]`` ``w[..., i]`` times.

  ``out[..., i]`` is the rank (1-based; ties share the mean of their ranks)
  of every copy of ``x[..., i]`` in the expanded sample: the total weight of
  the values below it plus ``(total weight of the values equal to it + 1) / 2``.
  With unit weights this is ``average_ranks(x)``. ``x`` and ``w`` are
  ``[..., n]`` and broadcast; ``O(n log n)`` per row.
  """
  x, w = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(w, np.float64))
  n = x.shape[-1]
  order = np.argsort(x, axis=-1, kind='stable')
  xs = np.take_along_axis(x, order, -1)
  cum = np.concatenate([np.zeros(x.shape[:-1] + (1,)),
                        np.cumsum(np.take_along_axis(w, order, -1), -1)], -1)
  pos = np.arange(n)
  first = np.ones(x.shape, bool)  # first of its run of equal values
  first[..., 1:] = xs[..., 1:] != xs[..., :-1]
  last = np.ones(x.shape, bool)
  last[..., :-1] = first[..., 1:]
  start = np.maximum.accumulate(np.where(first, pos, 0), -1)
  stop = np.minimum.accumulate(np.where(last, pos + 1, n)[..., ::-1], -1)[..., ::-1]
  below = np.take_along_axis(cum, start, -1)
  tied = np.take_along_axis(cum, stop, -1) - below
  ranks = np.empty(x.shape)
  np.put_along_axis(ranks, order, below + (tied + 1.0) / 2.0, -1)
  return ranks


def weighted_spearman(x: Any, y: Any, w: Any) -> Any:
  """Spearman correlation with non-negative weights, vectorized over resamples.

  With integer weights it equals ``spearman`` of the sample where point
  ``i`` is repeated ``w[..., i]`` times: the weighted Pearson correlation of
  the mid-ranks in that expanded sample. Shapes and NaN as ``weighted_pearson``.
  """
  x, y, w = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (x, y, w)))
  finite = np.where(w > 0, np.isfinite(x) & np.isfinite(y), True).all(-1)
  r = weighted_pearson(weighted_average_ranks(x, w), weighted_average_ranks(y, w), w)
  return np.where(finite, r, np.nan)[()]


def bootstrap_interval(statistic: Callable[[chex.Array, chex.Array], chex.Array],
                       x: chex.Array, y: chex.Array, key: chex.PRNGKey,
                       num_resamples: int = 2000, level: float = 0.95) -> chex.Array:
  """Percentile bootstrap interval ``[lo, hi]`` of ``statistic(x, y)``.

  Resamples the ``n`` pairs with replacement ``num_resamples`` times;
  resamples where the statistic is undefined (NaN, e.g. all pairs equal) are
  dropped. Treats students as independent; see ``clustered_bootstrap_interval``.

  >>> x = jnp.arange(20.0)
  >>> lo, hi = bootstrap_interval(pearson, x, 2 * x + 1, jax.random.PRNGKey(0), 200)
  >>> round(float(lo), 4), round(float(hi), 4)
  (1.0, 1.0)
  """
  chex.assert_equal_shape([x, y])
  if not 0 < level < 1:
    raise ValueError(f'level must be in (0, 1), got {level!r}')
  n = x.shape[0]
  idx = jax.random.randint(key, (num_resamples, n), 0, n)
  values = jax.vmap(lambda i: statistic(x[i], y[i]))(idx)
  alpha = (1.0 - level) / 2.0
  return jnp.nanquantile(values, jnp.array([alpha, 1.0 - alpha]))


def cluster_weights(clusters: Any, key: chex.PRNGKey, num_resamples: int) -> np.ndarray:
  """``[num_resamples, n]`` per-student weights of a clustered bootstrap.

  Each resample draws ``G`` clusters with replacement from the ``G``
  distinct ids in ``clusters`` (``[n]``, one id per student); a student's
  weight is how often its cluster was drawn. The draws index the sorted ids
  and equal ``jax.random.randint(key, (num_resamples, G), 0, G)``, as in
  ``bootstrap_interval`` over ``G`` students; they are drawn flat, in a size
  padded to a power of two, so XLA compiles once per size bucket rather than
  once per ``G`` (with JAX's default partitionable threefry the padded draw
  starts with the unpadded one; a test checks it).
  """
  clusters = np.asarray(clusters)
  if clusters.ndim != 1:
    raise ValueError(f'clusters must be an [n] vector (one id per student), '
                     f'got shape {clusters.shape}')
  if num_resamples < 1:
    raise ValueError(f'num_resamples must be >= 1, got {num_resamples!r}')
  ids, index = np.unique(clusters, return_inverse=True)
  g = len(ids)
  size = num_resamples * g
  padded = 1 << max(size - 1, 65535).bit_length()  # >= size; one bucket up to 2000 x 32
  picks = np.asarray(jax.random.randint(key, (padded,), 0, max(g, 1)))
  picks = picks[:size].reshape(num_resamples, g)
  rows = np.arange(num_resamples)[:, None] * g
  counts = np.bincount((picks + rows).ravel(), minlength=num_resamples * g)
  return counts.reshape(num_resamples, g)[:, index.reshape(-1)].astype(np.float64)


def clustered_bootstrap_interval(statistic: WeightedStatistic, x: Any, y: Any,
                                 clusters: Any, key: chex.PRNGKey,
                                 num_resamples: int = 2000, level: float = 0.95) -> np.ndarray:
  """Percentile interval ``[lo, hi]`` of ``statistic`` when resampling clusters.

  Each of ``num_resamples`` resamples draws ``G`` clusters (e.g. seeds) with
  replacement from the ``G`` distinct ids in ``clusters`` and keeps every
  member of each drawn cluster; clusters may differ in size. The resamples
  are evaluated at once as ``statistic(x, y, w)``, ``w[b, i]`` = how often
  student ``i``'s cluster was drawn in resample ``b`` (``cluster_weights``),
  so ``statistic`` takes weights and broadcasts over their leading axis:
  ``weighted_pearson``, ``weighted_spearman``, or one of that form. NaN
  resamples are dropped; if all are NaN the interval is ``[nan, nan]``.

  With one student per cluster and clusters ``0..n-1`` it draws the same
  resamples as ``bootstrap_interval`` with the same key. With fewer than two
  clusters there is nothing to resample and the interval is ``[nan, nan]``.

  Args:
    statistic: ``(x [n], y [n], w [resamples, n]) -> [resamples]``.
    x, y: ``[n]`` values per student.
    clusters: ``[n]`` cluster id (e.g. seed) per student, any sortable dtype.
    key: PRNG key.
    num_resamples: number of resamples (>= 1).
    level: coverage of the interval, in (0, 1).

  Returns:
    ``[2]`` float64 array ``[lo, hi]``.
  """
  if statistic is pearson or statistic is spearman:
    raise ValueError('clustered_bootstrap_interval needs a weighted statistic '
                     '(x, y, w): use weighted_pearson or weighted_spearman')
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f'x and y must be [n] vectors of one length, got {x.shape} and {y.shape}')
  if not 0 < level < 1:
    raise ValueError(f'level must be in (0, 1), got {level!r}')
  clusters = np.asarray(clusters)
  if clusters.shape != x.shape:
    raise ValueError(f'clusters must have shape {x.shape} (one id per student), '
                     f'got {clusters.shape}')
  if len(np.unique(clusters)) < 2:
    return np.full((2,), np.nan)
  weights = cluster_weights(clusters, key, num_resamples)
  values = np.asarray(statistic(x, y, weights), np.float64)
  if not np.isfinite(values).any():
    return np.full((2,), np.nan)
  alpha = (1.0 - level) / 2.0
  return np.nanquantile(values, [alpha, 1.0 - alpha])


def _interval(ci: chex.Array) -> list:
  return [float(ci[0]), float(ci[1])]


def correlation_report(x: chex.Array, y: chex.Array, key: chex.PRNGKey,
                       num_resamples: int = 2000, level: float = 0.95,
                       clusters: Optional[chex.Array] = None) -> Dict[str, Any]:
  """Pearson and Spearman correlation of ``x`` and ``y`` with bootstrap intervals.

  Args:
    x, y: ``[n]`` values per student.
    key: PRNG key.
    num_resamples: bootstrap resamples.
    level: coverage of the intervals.
    clusters: optional ``[n]`` seed id per student. Given, the intervals
      resample seeds (``clustered_bootstrap_interval``); otherwise students
      (the resamples of ``bootstrap_interval`` with the same key; computed
      in numpy float64 through the weighted statistics, so no XLA compile).

  Returns:
    ``{'n', 'pearson', 'pearson_ci': [lo, hi], 'spearman', 'spearman_ci',
    'level', 'num_resamples', 'bootstrap'}``; ``'bootstrap'`` is
    ``'students'`` or ``'clustered by seed'``, and with clusters the dict
    also has ``'n_clusters'`` (with fewer than 2 the intervals are NaN and a
    ``'note'`` says why). Undefined values are NaN.
  """
  return _weighted_report(x, y, clusters, key, num_resamples, level)


def _weighted_report(x: Any, y: Any, clusters: Optional[Any], key: chex.PRNGKey,
                     num_resamples: int, level: float,
                     pearson_fn: WeightedStatistic = weighted_pearson,
                     spearman_fn: WeightedStatistic = weighted_spearman) -> Dict[str, Any]:
  """``correlation_report`` through the weighted statistics, numpy float64.

  Without clusters every student is its own cluster: the students bootstrap,
  with the draws of ``bootstrap_interval`` for the same key.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f'x and y must be [n] vectors of one length, got {x.shape} and {y.shape}')
  k_p, k_s = jax.random.split(key)
  ids = np.arange(x.shape[0]) if clusters is None else np.asarray(clusters)
  ones = np.ones(x.shape)
  out = {'n': int(x.shape[0]), 'pearson': float(pearson_fn(x, y, ones)),
         'pearson_ci': _interval(clustered_bootstrap_interval(
             pearson_fn, x, y, ids, k_p, num_resamples, level)),
         'spearman': float(spearman_fn(x, y, ones)),
         'spearman_ci': _interval(clustered_bootstrap_interval(
             spearman_fn, x, y, ids, k_s, num_resamples, level)),
         'level': level, 'num_resamples': num_resamples, 'bootstrap': 'students'}
  if clusters is not None:
    out['bootstrap'] = 'clustered by seed'
    out['n_clusters'] = len(np.unique(ids))
    if out['n_clusters'] < 2:
      out['note'] = 'fewer than 2 seeds: no clustered interval'
  return out


def _group_residuals(v: np.ndarray, w: np.ndarray, onehot: np.ndarray) -> np.ndarray:
  """``v [n]`` minus the ``w [..., n]``-weighted mean of its group (``onehot [n, K]``).

  A group of zero weight keeps its values; they have zero weight anyway.
  """
  with np.errstate(invalid='ignore', divide='ignore'):
    means = ((w * v) @ onehot) / (w @ onehot)
  return v - np.nan_to_num(means, nan=0.0) @ onehot.T


class _Within:
  """``statistic`` of the group residuals, the means recomputed under the weights."""

  def __init__(self, statistic: WeightedStatistic, group: np.ndarray):
    self.statistic = statistic
    self.onehot = np.eye(int(group.max()) + 1)[group]

  def __call__(self, x, y, w):
    x, y, w = (np.asarray(v, np.float64) for v in (x, y, w))
    return self.statistic(_group_residuals(x, w, self.onehot),
                          _group_residuals(y, w, self.onehot), w)


def _undefined_report(n: int, level: float, num_resamples: int,
                      n_clusters: Optional[int], note: str) -> Dict[str, Any]:
  out = {'n': n, 'pearson': None, 'pearson_ci': None, 'spearman': None,
         'spearman_ci': None, 'level': level, 'num_resamples': num_resamples,
         'bootstrap': 'students' if n_clusters is None else 'clustered by seed'}
  if n_clusters is not None:
    out['n_clusters'] = n_clusters
  out['note'] = note
  return out


def within_group_correlations(x: chex.Array, y: chex.Array, groups: Any,
                              clusters: Optional[chex.Array], key: chex.PRNGKey,
                              num_resamples: int = 2000, min_size: int = 3,
                              level: float = 0.95) -> Dict[str, Any]:
  """Correlations within each group (e.g. method) beside the pooled ones.

  Pooling students of different methods can show a correlation that no
  single method has (Simpson's paradox), so this reports, with intervals
  clustered by seed when ``clusters`` is given (students otherwise):

  - ``'groups'``: ``{str(group): correlation_report}`` over the students of
    each group, in first-seen order, resampling the seeds present in that
    group. A group with fewer than ``min_size`` students, or where ``x`` or
    ``y`` is constant, has ``pearson`` / ``spearman`` and their intervals
    ``None`` and a ``'note'`` saying why.
  - ``'pooled'``: ``correlation_report`` over all students.
  - ``'pooled_within'``: the correlation of ``x - mean_g(x)`` with
    ``y - mean_g(y)`` (each student minus its group's mean), i.e. the
    within-group correlation pooled over groups; Spearman ranks those
    residuals. Groups with one student carry no within-group information and
    are left out. Each resample recomputes the group means under its
    weights. Extra keys: ``'n_groups'`` (groups used), ``'centered'``.

  Args:
    x, y: ``[n]`` values per student.
    groups: ``[n]`` group label per student (strings or numbers).
    clusters: ``[n]`` seed id per student, or None.
    key: PRNG key.
    num_resamples: bootstrap resamples.
    min_size: smallest group that gets its own correlation (>= 2).
    level: coverage of the intervals.

  Returns:
    ``{'groups': {...}, 'pooled': {...}, 'pooled_within': {...},
    'min_size': min_size}``.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  n = x.shape[0]
  if x.shape != (n,) or y.shape != (n,):
    raise ValueError(f'x and y must be [n] vectors of one length, got {x.shape} and {y.shape}')
  groups = np.asarray(groups)
  if groups.shape != (n,):
    raise ValueError(f'groups must have shape ({n},) (one label per student), got {groups.shape}')
  if clusters is not None:
    clusters = np.asarray(clusters)
    if clusters.shape != (n,):
      raise ValueError(f'clusters must have shape ({n},) (one id per student), '
                       f'got {clusters.shape}')
  if min_size < 2:
    raise ValueError(f'min_size must be >= 2, got {min_size!r}')
  labels, first, group_index = np.unique(groups, return_index=True, return_inverse=True)
  group_index = group_index.reshape(n)
  order = np.argsort(first)  # first-seen order
  k_groups, k_pooled, k_within = jax.random.split(key, 3)

  per_group = {}
  for rank, g in enumerate(order):
    members = group_index == g
    gx, gy = x[members], y[members]
    gc = None if clusters is None else clusters[members]
    n_clusters = None if gc is None else len(np.unique(gc))
    note = None
    if members.sum() < min_size:
      note = f'fewer than min_size = {min_size} students'
    elif np.ptp(gx) == 0:
      note = 'x is constant in this group'
    elif np.ptp(gy) == 0:
      note = 'y is constant in this group'
    if note is None:
      per_group[str(labels[g])] = _weighted_report(
          gx, gy, gc, jax.random.fold_in(k_groups, rank), num_resamples, level)
    else:
      per_group[str(labels[g])] = _undefined_report(int(members.sum()), level, num_resamples,
                                                    n_clusters, note)

  pooled = _weighted_report(x, y, clusters, k_pooled, num_resamples, level)

  sizes = np.bincount(group_index, minlength=len(labels))
  keep = sizes[group_index] >= 2
  wx, wy = x[keep], y[keep]
  w_index = np.unique(group_index[keep], return_inverse=True)[1].reshape(-1)
  n_groups = int(w_index.max()) + 1 if w_index.size else 0
  if not w_index.size:
    within = _undefined_report(0, level, num_resamples,
                               None if clusters is None else 0, 'no group has 2 students')
  else:
    within = _weighted_report(wx, wy, None if clusters is None else clusters[keep], k_within,
                              num_resamples, level, _Within(weighted_pearson, w_index),
                              _Within(weighted_spearman, w_index))
  within['n_groups'] = n_groups
  within['centered'] = 'x and y minus their group means'
  return {'groups': per_group, 'pooled': pooled, 'pooled_within': within,
          'min_size': min_size}


def wilson_interval(successes: Any, n: Any, level: float = 0.95):
  """Wilson score interval for a binomial proportion ``successes / n``.

  E.g. robust accuracy measured on ``n`` attacked points. Vectorized:
  ``successes`` and ``n`` broadcast against each other. ``n = 0`` gives
  ``(0, 1)``.

  Args:
    successes: integer counts, ``0 <= successes <= n``.
    n: integer numbers of trials, ``>= 0``.
    level: coverage, in (0, 1).

  Returns:
    ``(lo, hi)``, numpy arrays of the broadcast shape (0-d for scalars).

  >>> lo, hi = wilson_interval(312, 400)  # e.g. robust accuracy on 400 attacked points
  >>> round(float(lo), 3), round(float(hi), 3)
  (0.737, 0.818)
  """
  if not 0 < level < 1:
    raise ValueError(f'level must be in (0, 1), got {level!r}')
  s = np.asarray(successes, np.float64)
  m = np.asarray(n, np.float64)
  if np.any(s != np.round(s)) or np.any(m != np.round(m)):
    raise ValueError('successes and n must be integer counts (round fractions * n first)')
  if np.any(m < 0) or np.any(s < 0) or np.any(s > m):
    raise ValueError('need 0 <= successes <= n and n >= 0')
  s, m = np.broadcast_arrays(s, m)
  z = statistics.NormalDist().inv_cdf(0.5 + level / 2.0)
  safe = np.where(m > 0, m, 1.0)
  p = s / safe
  denom = 1.0 + z * z / safe
  center = (p + z * z / (2.0 * safe)) / denom
  half = z / denom * np.sqrt(p * (1.0 - p) / safe + z * z / (4.0 * safe * safe))
  # Clipping only removes rounding (the exact bounds lie in [0, 1]).
  lo = np.where(m > 0, np.clip(center - half, 0.0, 1.0), 0.0)
  hi = np.where(m > 0, np.clip(center + half, 0.0, 1.0), 1.0)
  return lo, hi
