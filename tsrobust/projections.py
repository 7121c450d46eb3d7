"""The attacks' feasible sets: norm balls (L-inf, L2), optionally in a subspace, inputs in range.

A perturbation ``delta [N, ...]`` is feasible when ``||delta|| <= eps`` per example
(``norm``: ``'linf'`` or ``'l2'``), when it lies in a linear subspace given by its
orthogonal projector (if one is given: the data subspace S, or its complement S_perp), and
when ``x + delta`` lies in an input range (if one is given):

* ``project`` maps ``delta`` into the ball (intersected with the subspace);
* ``_clip_inputs`` keeps ``x + delta`` in the input range (in a subspace by scaling
  ``delta`` down, so it stays in the subspace and in the ball);
* ``_random_start`` draws a random feasible start of the gradient attacks.

The attacks that search these sets are in ``attacks`` (PGD, APGD; ``attacks.project``,
``attacks._clip_inputs`` and the like are this module's, imported there) and ``square``.
"""

import math
from typing import Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from tsrobust import numerics

NORMS = ('linf', 'l2')

__all__ = ['NORMS', 'project_onto_subspace', 'project']


def _check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f'norm must be one of {NORMS}, got {norm!r}')


def _flat(v: chex.Array) -> chex.Array:
  return v.reshape(v.shape[0], -1)


def _per_example_norm(v: chex.Array, norm: str) -> chex.Array:
  f = _flat(v)
  if norm == 'l2':
    return jnp.sqrt((f * f).sum(-1))
  return jnp.abs(f).max(-1)


def _broadcast(per_example: chex.Array, like: chex.Array) -> chex.Array:
  return per_example.reshape((-1,) + (1,) * (like.ndim - 1))


def project_onto_subspace(v: chex.Array, projector: Optional[chex.Array]) -> chex.Array:
  """``P v`` per example; ``v`` is ``[N, ...]`` and ``P`` is ``[D, D]`` with ``D = prod(...)``."""
  if projector is None:
    return v
  return numerics.matmul(_flat(v), projector).reshape(v.shape)


def project(delta: chex.Array, eps: chex.Numeric, norm: str,
            projector: Optional[chex.Array] = None) -> chex.Array:
  """Maps ``delta`` into ``{||delta|| <= eps} (intersected with the subspace of projector)``.

  * no subspace: the Euclidean projection (L-inf: clip; L2: rescale);
  * L2 in a subspace: project onto the subspace, then rescale - exact, since
    the feasible set is a ball inside the subspace;
  * L-inf in a subspace: project onto the subspace, then scale down until it
    fits the box. The result is feasible but *not* the Euclidean projection
    onto the (subspace x box) intersection. (So pass ``projector=None``, not
    the identity, for the unconstrained attack: the identity would scale
    rather than clip.)

  Args:
    delta: ``[N, ...]`` perturbations.
    eps: budget (>= 0), scalar.
    norm: ``'linf'`` or ``'l2'``.
    projector: ``[D, D]`` orthogonal projector or ``None``.

  Returns:
    Feasible ``[N, ...]`` perturbations.
  """
  _check_norm(norm)
  if norm == 'linf' and projector is None:
    return jnp.clip(delta, -eps, eps)
  delta = project_onto_subspace(delta, projector)
  size = _per_example_norm(delta, norm)
  factor = jnp.minimum(1.0, eps / jnp.maximum(size, 1e-12))
  return delta * _broadcast(factor, delta)


def _random_start(key: chex.PRNGKey, x: chex.Array, eps: chex.Numeric, norm: str,
                  projector: Optional[chex.Array]) -> chex.Array:
  """A random feasible perturbation ``[N, ...]`` (before any input-range clipping).

  L-inf: uniform in the box ``[-eps, eps]^D``, then ``project`` (in a
  subspace: projected, then scaled into the box).

  L2: direction uniform on the unit sphere of the feasible subspace (a
  standard normal vector, projected with ``P`` when given, normalized), radius
  ``eps * U`` with ``U ~ Uniform[0, 1]``: the radius is uniform on
  ``[0, eps]`` (mean ``eps / 2``) rather than that of a uniform point of the
  ball (``eps * U^(1/dim)``, within a few percent of ``eps`` in high
  dimension), so the restarts also explore the inside of the ball.
  """
  # A single flat draw each (one threefry, no split): less for XLA to compile.
  if norm == 'linf':
    box = jax.random.uniform(key, (x.size,), x.dtype, -1.0, 1.0).reshape(x.shape)
    return project(eps * box, eps, norm, projector)
  # D + 1 standard normals per example: the first D give the direction, the
  # last the radius, through the normal CDF (Phi(z) ~ Uniform[0, 1]).
  n, d = x.shape[0], math.prod(x.shape[1:])
  z = jax.random.normal(key, (n * (d + 1),), x.dtype).reshape(n, d + 1)
  direction = project_onto_subspace(z[:, :d].reshape(x.shape), projector)
  direction = direction / _broadcast(jnp.maximum(_per_example_norm(direction, 'l2'), 1e-12),
                                     direction)
  radius = eps * jax.scipy.special.ndtr(z[:, d])
  return direction * _broadcast(radius, direction)


def _clip_inputs(x: chex.Array, delta: chex.Array,
                 clip_range: Optional[Tuple[float, float]],
                 projector: Optional[chex.Array] = None) -> chex.Array:
  """Keeps ``x + delta`` in ``clip_range``.

  Without a subspace, ``x + delta`` is clipped coordinate-wise. With one,
  clipping would leave the subspace, so ``delta`` is instead scaled down along
  its own direction until ``x + delta`` fits (it stays in the subspace and in
  the ball; ``x`` itself is assumed to be in range).

  In floating point, ``x + delta * ((hi - x) / delta)`` lands one ulp past ``hi`` in
  about 1% of cases (float32, random ``x`` and ``delta``), so a factor that binds (or
  nearly: within ``8 eps`` of 1) is shrunk by ``8 eps`` relative (``eps`` the dtype's
  machine epsilon; ~1e-6 for float32): ``x + delta`` then never leaves the range. A
  ``delta`` that fits with more room than that is returned unchanged.
  """
  if clip_range is None:
    return delta
  lo, hi = clip_range
  if projector is None:
    return jnp.clip(x + delta, lo, hi) - x
  safe = jnp.where(delta == 0, 1.0, delta)
  room = jnp.where(delta > 0, (hi - x) / safe, jnp.where(delta < 0, (lo - x) / safe, jnp.inf))
  room = _flat(room).min(-1)
  margin = 8 * jnp.finfo(delta.dtype).eps
  factor = jnp.where(room < 1 + margin, jnp.clip(room, 0.0, 1.0) * (1 - margin), 1.0)
  return delta * _broadcast(factor, delta)
