"""Statistics: weighted correlations, the bootstrap over seeds, within-method
correlations, Wilson intervals, and the summary table's spread.

Known answers: scipy.stats on the sample expanded by repetition, the plain
bootstrap where clusters are single students or exact duplicates, a Simpson's
paradox construction, and scipy's Wilson interval.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from tsrobust import io
from tsrobust import stats

KEY = jax.random.PRNGKey(0)


def _ties_and_weights(seed, n=15):
  rng = np.random.default_rng(seed)
  x = np.round(rng.normal(size=n), 1)  # rounding makes ties
  y = np.round(x + rng.normal(size=n), 1)
  w = rng.integers(0, 4, size=n)
  w[:2] = 1  # at least two points of positive weight
  return x, y, w


# Weighted statistics = unweighted ones on the sample repeated w[i] times.

@pytest.mark.parametrize('seed', range(5))
def test_weighted_ranks_are_mid_ranks_of_the_repeated_sample(seed):
  x, _, w = _ties_and_weights(seed)
  expanded = scipy.stats.rankdata(np.repeat(x, w))  # mid-ranks for ties
  ranks = stats.weighted_average_ranks(x, w)
  np.testing.assert_allclose(np.repeat(ranks, w), expanded, rtol=0, atol=1e-12)
  np.testing.assert_allclose(stats.weighted_average_ranks(x, np.ones_like(x)),
                             stats.average_ranks(jnp.asarray(x)), atol=1e-6)


@pytest.mark.parametrize('seed', range(5))
def test_weighted_correlations_equal_scipy_on_the_repeated_sample(seed):
  x, y, w = _ties_and_weights(seed)
  xe, ye = np.repeat(x, w), np.repeat(y, w)
  np.testing.assert_allclose(stats.weighted_pearson(x, y, w),
                             scipy.stats.pearsonr(xe, ye)[0], rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stats.weighted_spearman(x, y, w),
                             scipy.stats.spearmanr(xe, ye)[0], rtol=1e-12, atol=1e-12)
  # Scaling the weights changes nothing (a multiset repeated k times).
  np.testing.assert_allclose(stats.weighted_spearman(x, y, 3 * w),
                             stats.weighted_spearman(x, y, w), atol=1e-12)


def test_weighted_correlations_are_vectorized_over_resamples():
  x, y, _ = _ties_and_weights(0)
  ws = np.random.default_rng(1).integers(0, 3, size=(6, x.size))
  ws[:, :3] = 1
  for fn in (stats.weighted_pearson, stats.weighted_spearman):
    batched = fn(x, y, ws)
    assert batched.shape == (6,)
    np.testing.assert_allclose(batched, [fn(x, y, w) for w in ws], atol=1e-12)


def test_weighted_correlations_undefined_cases_are_nan():
  x = np.array([1.0, 2.0, 3.0, 4.0])
  y = np.array([1.0, 3.0, 2.0, 5.0])
  for fn in (stats.weighted_pearson, stats.weighted_spearman):
    assert np.isnan(fn(x, y, np.array([0.0, 0.0, 2.0, 0.0])))  # one point: constant
    assert np.isnan(fn(x, y, np.zeros(4)))
    assert np.isnan(fn(x, np.array([1.0, 1.0, 1.0, 7.0]), np.array([1.0, 2.0, 1.0, 0.0])))
    assert np.isnan(fn(np.array([1.0, np.nan, 3.0, 4.0]), y, np.ones(4)))
    assert np.isfinite(fn(np.array([1.0, np.nan, 3.0, 4.0]), y, np.array([1, 0, 1, 1])))


# The bootstrap over clusters.

def test_cluster_weights_keep_clusters_whole_with_unequal_sizes():
  clusters = np.array([7, 7, 7, 2, 9, 9, 4, 4, 4, 4])  # sizes 3, 1, 2, 4
  weights = stats.cluster_weights(clusters, KEY, 500)
  assert weights.shape == (500, 10)
  for c in np.unique(clusters):
    members = weights[:, clusters == c]
    np.testing.assert_array_equal(members, members[:, :1].repeat(members.shape[1], 1))
  first = weights[:, [np.flatnonzero(clusters == c)[0] for c in np.unique(clusters)]]
  np.testing.assert_array_equal(first.sum(1), 4)  # 4 clusters drawn per resample
  np.testing.assert_allclose(first.mean(0), 1.0, atol=0.15)  # each drawn once on average


def test_resamples_with_unequal_clusters_equal_scipy_on_the_drawn_members():
  rng = np.random.default_rng(3)
  clusters = np.repeat(np.arange(5), [1, 4, 2, 3, 2])
  x = rng.normal(size=12)
  y = x + rng.normal(size=12)
  weights = stats.cluster_weights(clusters, KEY, 20)
  for w in weights.astype(int):
    xe, ye = np.repeat(x, w), np.repeat(y, w)
    if np.ptp(xe) == 0 or np.ptp(ye) == 0:
      continue
    np.testing.assert_allclose(stats.weighted_pearson(x, y, w),
                               scipy.stats.pearsonr(xe, ye)[0], atol=1e-12)
    np.testing.assert_allclose(stats.weighted_spearman(x, y, w),
                               scipy.stats.spearmanr(xe, ye)[0], atol=1e-12)


@pytest.mark.parametrize('plain, weighted', [(stats.pearson, stats.weighted_pearson),
                                             (stats.spearman, stats.weighted_spearman)])
def test_one_student_per_cluster_is_the_plain_bootstrap(plain, weighted):
  """Same key, same draws: the clustered interval is the students' interval."""
  x = jnp.linspace(0.0, 1.0, 8)  # 8 students, as below: one jnp compile per statistic
  y = x + 0.4 * jax.random.normal(jax.random.PRNGKey(1), (8,))
  expected = stats.bootstrap_interval(plain, x, y, KEY, 1000)
  ids = 100 + 7 * np.arange(8)  # any sortable ids, in the students' order
  got = stats.clustered_bootstrap_interval(weighted, x, y, ids, KEY, 1000)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  report = stats.correlation_report(x, y, KEY, 1000)  # the students bootstrap: same draws
  k_p, k_s = jax.random.split(KEY)
  np.testing.assert_allclose(report['pearson_ci'],
                             stats.bootstrap_interval(stats.pearson, x, y, k_p, 1000), atol=1e-5)
  np.testing.assert_allclose(report['spearman_ci'],
                             stats.bootstrap_interval(stats.spearman, x, y, k_s, 1000), atol=1e-5)


@pytest.mark.parametrize('plain, weighted', [(stats.pearson, stats.weighted_pearson),
                                             (stats.spearman, stats.weighted_spearman)])
def test_duplicated_members_give_the_seeds_bootstrap_and_a_wider_interval(plain, weighted):
  """8 seeds whose 5 students are copies: the information is 8 points, not 40."""
  rng = np.random.default_rng(0)
  xs = rng.normal(size=8)
  ys = xs + rng.normal(size=8)
  x, y, seeds = np.repeat(xs, 5), np.repeat(ys, 5), np.repeat(np.arange(8), 5)
  clustered = stats.clustered_bootstrap_interval(weighted, x, y, seeds, KEY, 1000)
  per_seed = stats.bootstrap_interval(plain, jnp.asarray(xs), jnp.asarray(ys), KEY, 1000)
  np.testing.assert_allclose(clustered, per_seed, atol=1e-5)
  # Students as independent (= bootstrap_interval, as the test above shows): too narrow.
  naive = stats.clustered_bootstrap_interval(weighted, x, y, np.arange(40), KEY, 1000)
  assert clustered[1] - clustered[0] > 1.5 * (naive[1] - naive[0])


def test_clustered_bootstrap_edge_cases():
  x = np.arange(6.0)
  y = np.array([0.0, 2.0, 1.0, 3.0, 5.0, 4.0])
  one_seed = stats.clustered_bootstrap_interval(stats.weighted_pearson, x, y, np.zeros(6),
                                                KEY, 100)
  assert np.isnan(one_seed).all()
  with pytest.raises(ValueError, match='weighted statistic'):
    stats.clustered_bootstrap_interval(stats.pearson, x, y, np.arange(6), KEY, 100)
  with pytest.raises(ValueError, match='one id per student'):
    stats.clustered_bootstrap_interval(stats.weighted_pearson, x, y, np.arange(5), KEY, 100)
  with pytest.raises(ValueError, match='level'):
    stats.clustered_bootstrap_interval(stats.weighted_pearson, x, y, np.arange(6), KEY, 100,
                                       level=1.0)


def test_correlation_report_records_how_it_resampled():
  x = np.linspace(0.0, 1.0, 24)
  y = x + 0.2 * np.sin(17 * x)
  keys = {'n', 'pearson', 'pearson_ci', 'spearman', 'spearman_ci', 'level', 'num_resamples',
          'bootstrap'}
  students = stats.correlation_report(x, y, KEY, 300)
  assert set(students) == keys and students['bootstrap'] == 'students'
  seeds = np.arange(24) % 6
  clustered = stats.correlation_report(x, y, KEY, 300, clusters=seeds)
  assert set(clustered) == keys | {'n_clusters'}
  assert clustered['bootstrap'] == 'clustered by seed' and clustered['n_clusters'] == 6
  assert clustered['pearson'] == pytest.approx(students['pearson'], abs=1e-6)  # same estimate
  for name in ('pearson', 'spearman'):
    lo, hi = clustered[f'{name}_ci']
    assert lo <= clustered[name] <= hi
  single = stats.correlation_report(x, y, KEY, 300, clusters=np.zeros(24, int))
  assert np.isnan(single['pearson_ci']).all() and 'note' in single


# Within-method correlations.

def _simpson(seeds=6):
  """3 methods; across methods x and y rise together, within each they fall."""
  rng = np.random.default_rng(0)
  x, y, groups, clusters = [], [], [], []
  for g, name in enumerate(('standard', 'pgd', 'ccat')):
    t = np.linspace(0.0, 1.0, seeds) + 0.05 * rng.normal(size=seeds)
    x.append(3.0 * g + t)
    y.append(3.0 * g - t + 0.1 * rng.normal(size=seeds))
    groups += [name] * seeds
    clusters.append(np.arange(seeds))  # seed s trains one student per method
  return np.concatenate(x), np.concatenate(y), np.array(groups), np.concatenate(clusters)


def test_within_group_reports_both_signs_of_simpsons_paradox():
  x, y, groups, seeds = _simpson()
  rep = stats.within_group_correlations(x, y, groups, seeds, KEY, 500)
  assert list(rep['groups']) == ['standard', 'pgd', 'ccat']  # first-seen order
  assert rep['pooled']['pearson'] > 0.8 and rep['pooled']['pearson_ci'][0] > 0
  for g in rep['groups'].values():
    assert g['n'] == 6 and g['n_clusters'] == 6 and g['bootstrap'] == 'clustered by seed'
    assert g['pearson'] < -0.8 and g['spearman'] < -0.8
    assert g['pearson_ci'][1] < 0
  within = rep['pooled_within']
  assert within['pearson'] < -0.8 and within['pearson_ci'][1] < 0
  assert within['spearman'] < -0.8 and within['spearman_ci'][1] < 0
  assert within['n'] == 18 and within['n_groups'] == 3 and within['n_clusters'] == 6


def test_pooled_within_is_the_correlation_of_group_residuals():
  x, y, groups, seeds = _simpson()
  rx, ry = x.copy(), y.copy()
  for g in np.unique(groups):
    rx[groups == g] -= x[groups == g].mean()
    ry[groups == g] -= y[groups == g].mean()
  rep = stats.within_group_correlations(x, y, groups, None, KEY, 200)
  within = rep['pooled_within']
  np.testing.assert_allclose(within['pearson'], scipy.stats.pearsonr(rx, ry)[0], atol=1e-12)
  np.testing.assert_allclose(within['spearman'], scipy.stats.spearmanr(rx, ry)[0], atol=1e-12)
  assert within['bootstrap'] == 'students' and 'n_clusters' not in within


def test_small_or_constant_groups_have_no_correlation():
  x, y, groups, seeds = _simpson(seeds=4)
  x = np.concatenate([x, [1.0, 2.0], [1.0, 2.0, 3.0]])
  y = np.concatenate([y, [0.0, 1.0], [5.0, 5.0, 5.0]])
  groups = np.concatenate([groups, ['pair'] * 2, ['flat'] * 3])
  seeds = np.concatenate([seeds, [0, 1], [0, 1, 2]])
  rep = stats.within_group_correlations(x, y, groups, seeds, KEY, 200, min_size=3)
  pair, flat = rep['groups']['pair'], rep['groups']['flat']
  assert pair['pearson'] is None and pair['spearman'] is None and pair['pearson_ci'] is None
  assert 'min_size' in pair['note'] and pair['n'] == 2 and pair['n_clusters'] == 2
  assert flat['pearson'] is None and 'y is constant' in flat['note']
  assert rep['groups']['pgd']['pearson'] < 0
  assert rep['pooled_within']['n_groups'] == 5  # groups of >= 2 students all pool
  with pytest.raises(ValueError, match='one label per student'):
    stats.within_group_correlations(x, y, groups[:-1], seeds, KEY, 10)


# Wilson interval.

@pytest.mark.parametrize('level', [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(level):
  n = np.array([1, 7, 20, 20, 20, 100, 1000])
  k = np.array([1, 3, 0, 9, 20, 37, 999])
  lo, hi = stats.wilson_interval(k, n, level)
  for i in range(len(n)):
    ci = scipy.stats.binomtest(int(k[i]), int(n[i])).proportion_ci(level, method='wilson')
    np.testing.assert_allclose([lo[i], hi[i]], [ci.low, ci.high], rtol=1e-10, atol=1e-12)


def test_wilson_shapes_and_edge_cases():
  lo, hi = stats.wilson_interval(0, 0)
  assert (float(lo), float(hi)) == (0.0, 1.0)
  lo, hi = stats.wilson_interval(np.array([[0], [5]]), np.array([10, 20, 0]) * 0 + 10)
  assert lo.shape == hi.shape == (2, 3)
  assert (lo <= hi).all() and lo.min() >= 0 and hi.max() <= 1
  for bad in [(3, 2), (-1, 5), (2.5, 5), (1, -1)]:
    with pytest.raises(ValueError):
      stats.wilson_interval(*bad)


# The summary table's spread.

def test_markdown_summary_uses_the_sample_std():
  rows = [{'m': 'a', 'v': 1.0}, {'m': 'a', 'v': 2.0}, {'m': 'a', 'v': 3.0},
          {'m': 'b', 'v': 4.0}, {'m': 'b', 'v': None}, {'m': 'c', 'v': float('nan')}]
  lines = io.markdown_summary(rows, ['m'], ['v']).strip().splitlines()
  assert lines[2] == '| a | 3 | 2.000 +- 1.000 |'  # ddof=1; ddof=0 would be 0.816
  assert lines[3] == '| b | 2 | 4.000 +- - |'      # one value: no spread
  assert lines[4] == '| c | 1 | - |'
