"""Low-rank inputs: subspace bases, projectors, samplers and probes.

Inputs lie in an r-dimensional subspace S of R^d: ``x = U z`` with ``U`` a
``d x r`` matrix with orthonormal columns and ``z ~ N(0, s^2 I_r)``.
``P = U U^T`` projects onto S and ``P_perp = I - P`` onto its complement.

Two samplers with the same law:

* ``sample_subspace(key, U, n, s)``: ``s U z`` from ``r`` normals per example,
  the training step's sampler (the cheap one: ``r`` instead of ``d`` normals);
* ``sample_lowrank(key, P, n, s)``: ``s P g`` with ``g ~ N(0, I_d)``, which has
  exactly the law of ``s U z`` (``U^T g ~ N(0, I_r)``); a ``[d, d]`` projector
  has the same shape at every rank, so one compiled function serves a whole
  sweep over ranks (the held-out sets use it).
"""

import math
from typing import Tuple

import chex
import jax
import jax.numpy as jnp

from tsrobust import numerics

__all__ = ['random_orthonormal', 'nested_basis', 'projectors', 'energy_matched_scale',
           'sample_lowrank', 'sample_subspace', 'off_subspace_probe']


def random_orthonormal(key: chex.PRNGKey, d: int, r: int) -> chex.Array:
  """A random ``[d, r]`` matrix with orthonormal columns (QR of a Gaussian).

  The columns are Haar-distributed (signs fixed so that R has a positive
  diagonal). The first ``r'`` columns of ``random_orthonormal(key, d, r)``
  equal ``random_orthonormal(key, d, r')`` only up to QR, so for nested
  subspaces take leading columns of one ``[d, d]`` basis (``nested_basis``).

  >>> u = random_orthonormal(jax.random.PRNGKey(0), 6, 2)
  >>> u.shape, bool(jnp.allclose(u.T @ u, jnp.eye(2), atol=1e-5))
  ((6, 2), True)
  """
  if not 1 <= r <= d:
    raise ValueError(f'rank r must satisfy 1 <= r <= d = {d}, got r = {r}')
  q, rr = jnp.linalg.qr(jax.random.normal(key, (d, r)))
  return q * jnp.sign(jnp.diagonal(rr))[None, :]


def nested_basis(key: chex.PRNGKey, d: int, r: int) -> chex.Array:
  """Leading ``r`` columns of a random ``[d, d]`` orthonormal basis.

  With the same key, the subspace for rank ``r`` contains the one for every
  smaller rank, so a sweep over ranks changes only the data's dimension.

  >>> key = jax.random.PRNGKey(0)
  >>> bool(jnp.array_equal(nested_basis(key, 6, 4)[:, :2], nested_basis(key, 6, 2)))
  True
  """
  if not 1 <= r <= d:
    raise ValueError(f'rank r must satisfy 1 <= r <= d = {d}, got r = {r}')
  return random_orthonormal(key, d, d)[:, :r]


def projectors(basis: chex.Array) -> Tuple[chex.Array, chex.Array]:
  """``(P, P_perp)``, both ``[d, d]``, for a ``[d, r]`` orthonormal basis.

  >>> p, p_perp = projectors(random_orthonormal(jax.random.PRNGKey(0), 6, 2))
  >>> round(float(jnp.trace(p)), 4), round(float(jnp.trace(p_perp)), 4)  # the dimensions
  (2.0, 4.0)
  """
  chex.assert_rank(basis, 2)
  p = numerics.matmul(basis, basis.T)
  return p, jnp.eye(basis.shape[0], dtype=p.dtype) - p


def energy_matched_scale(d: int, r: int, scale: float = 1.0) -> float:
  """``s = scale * sqrt(d / r)``: then ``E||x||^2 = scale^2 d`` at every rank.

  With unit-norm teacher fan-in vectors this also keeps the first-layer
  pre-activation variance near ``scale^2`` whatever the rank, so budgets and
  biases mean the same thing across a rank sweep.

  >>> energy_matched_scale(40, 10)
  2.0
  """
  if not 1 <= r <= d:
    raise ValueError(f'rank r must satisfy 1 <= r <= d = {d}, got r = {r}')
  return scale * math.sqrt(d / r)


def sample_lowrank(key: chex.PRNGKey, projector: chex.Array, n: int,
                   scale: chex.Numeric = 1.0) -> chex.Array:
  """``n`` inputs ``s * P g``, ``g ~ N(0, I_d)``: the law of ``U z``, ``z ~ N(0, s^2 I_r)``.

  Args:
    key: PRNG key.
    projector: ``[d, d]`` orthogonal projector onto the data subspace
      (``jnp.eye(d)`` for full rank).
    n: number of samples.
    scale: per-coordinate standard deviation ``s`` inside the subspace.

  Returns:
    ``[n, d]`` inputs.

  >>> p, p_perp = projectors(random_orthonormal(jax.random.PRNGKey(0), 6, 2))
  >>> x = sample_lowrank(jax.random.PRNGKey(1), p, 128, scale=2.0)
  >>> x.shape, float(jnp.abs(x @ p_perp).max()) < 1e-5  # nothing outside the subspace
  ((128, 6), True)
  """
  chex.assert_rank(projector, 2)
  d = projector.shape[0]
  return scale * numerics.matmul(jax.random.normal(key, (n, d), projector.dtype), projector)


def sample_subspace(key: chex.PRNGKey, basis: chex.Array, n: int,
                    scale: chex.Numeric = 1.0) -> chex.Array:
  """``n`` inputs ``s * U z``, ``z ~ N(0, I_r)``: ``r`` normals per example.

  The same law as ``sample_lowrank(key, U U^T, n, s)`` (not the same numbers),
  at a quarter of the random numbers when ``r = d / 4``. The normals are drawn
  as ``[r, n]`` and the result is ``(U z)^T``: with the long batch axis minor,
  XLA:CPU vectorizes the normal sampler; drawn as ``[n, r]`` with a small ``r``
  it was slower than ``d`` normals per example (``benchmarks/profile_step.py``).

  Args:
    key: PRNG key.
    basis: ``[d, r]`` matrix with orthonormal columns spanning the subspace.
    n: number of samples.
    scale: per-coordinate standard deviation ``s`` of ``z``.

  Returns:
    ``[n, d]`` inputs.

  >>> u = random_orthonormal(jax.random.PRNGKey(0), 6, 2)
  >>> x = sample_subspace(jax.random.PRNGKey(1), u, 128)
  >>> x.shape, float(jnp.abs(x - x @ u @ u.T).max()) < 1e-5
  ((128, 6), True)
  """
  chex.assert_rank(basis, 2)
  z = jax.random.normal(key, (basis.shape[1], n), basis.dtype)
  return scale * numerics.matmul(basis, z).T


def off_subspace_probe(key: chex.PRNGKey, x: chex.Array, projector_perp: chex.Array,
                       scale: chex.Numeric = 1.0) -> chex.Array:
  """``x + P_perp xi``, ``xi ~ N(0, scale^2 I_d)``: inputs that leave the data subspace.

  Args:
    key: PRNG key.
    x: ``[n, d]`` inputs (usually from the subspace).
    projector_perp: ``[d, d]`` projector onto the complement of the subspace.
    scale: standard deviation of each coordinate of ``xi``.

  Returns:
    ``[n, d]`` probes.

  >>> p, p_perp = projectors(random_orthonormal(jax.random.PRNGKey(0), 6, 2))
  >>> x = sample_lowrank(jax.random.PRNGKey(1), p, 64)
  >>> probe = off_subspace_probe(jax.random.PRNGKey(2), x, p_perp)
  >>> bool(jnp.allclose(probe @ p, x, atol=1e-5))  # the same point inside S, moved off it
  True
  """
  chex.assert_rank([x, projector_perp], 2)
  xi = jax.random.normal(key, x.shape, x.dtype)
  return x + scale * numerics.matmul(xi, projector_perp)
