"""Correlation across trained students, with bootstrap confidence intervals.

Pure ``jax.numpy``; the bootstrap takes a PRNG key and resamples students
(pairs ``(x_i, y_i)``) with replacement, vmapped over resamples.
"""

from typing import Callable, Dict

import chex
import jax
import jax.numpy as jnp


def pearson(x: chex.Array, y: chex.Array) -> chex.Array:
  """Pearson correlation of two ``[n]`` vectors (NaN if either is constant)."""
  chex.assert_rank([x, y], 1)
  chex.assert_equal_shape([x, y])
  xc, yc = x - x.mean(), y - y.mean()
  den = jnp.sqrt((xc * xc).sum() * (yc * yc).sum())
  return jnp.where(den > 0, (xc * yc).sum() / jnp.where(den > 0, den, 1.0), jnp.nan)


def average_ranks(x: chex.Array) -> chex.Array:
  """``[n]`` ranks 1..n of ``x``; tied values share the mean of their ranks."""
  chex.assert_rank(x, 1)
  less = (x[None, :] < x[:, None]).sum(1)
  equal = (x[None, :] == x[:, None]).sum(1)
  return less + (equal + 1) / 2.0


def spearman(x: chex.Array, y: chex.Array) -> chex.Array:
  """Spearman rank correlation: Pearson correlation of the average ranks."""
  return pearson(average_ranks(x), average_ranks(y))


def bootstrap_interval(statistic: Callable[[chex.Array, chex.Array], chex.Array],
                       x: chex.Array, y: chex.Array, key: chex.PRNGKey,
                       num_resamples: int = 2000, level: float = 0.95) -> chex.Array:
  """Percentile bootstrap interval ``[lo, hi]`` of ``statistic(x, y)``.

  Resamples the ``n`` pairs with replacement ``num_resamples`` times;
  resamples where the statistic is undefined (NaN, e.g. all pairs equal) are
  dropped.
  """
  chex.assert_equal_shape([x, y])
  if not 0 < level < 1:
    raise ValueError(f'level must be in (0, 1), got {level!r}')
  n = x.shape[0]
  idx = jax.random.randint(key, (num_resamples, n), 0, n)
  values = jax.vmap(lambda i: statistic(x[i], y[i]))(idx)
  alpha = (1.0 - level) / 2.0
  return jnp.nanquantile(values, jnp.array([alpha, 1.0 - alpha]))


def correlation_report(x: chex.Array, y: chex.Array, key: chex.PRNGKey,
                       num_resamples: int = 2000, level: float = 0.95) -> Dict[str, float]:
  """Pearson and Spearman correlation of ``x`` and ``y`` with bootstrap intervals."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  k_p, k_s = jax.random.split(key)
  p_lo, p_hi = bootstrap_interval(pearson, x, y, k_p, num_resamples, level)
  s_lo, s_hi = bootstrap_interval(spearman, x, y, k_s, num_resamples, level)
  return {'n': int(x.shape[0]), 'pearson': float(pearson(x, y)),
          'pearson_ci': [float(p_lo), float(p_hi)], 'spearman': float(spearman(x, y)),
          'spearman_ci': [float(s_lo), float(s_hi)], 'level': level,
          'num_resamples': num_resamples}
