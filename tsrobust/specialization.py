"""Student specialization: normalized correlations between teacher and student nodes.

For teacher node ``j`` with activations ``a_j(x)`` and student node ``k`` with
``b_k(x)``, over an evaluation set (conv layers: samples and spatial
positions of a channel)::

    rho_jk = sum_i (a_j - mean a_j)(b_k - mean b_k)
             / sqrt(sum_i (a_j - mean a_j)^2 * sum_i (b_k - mean b_k)^2 + eps)

The sums are kept as sufficient statistics (count, means, centered second
moments, centered cross moments) and merged with Chan et al.'s pairwise
update, so an evaluation set can be streamed in batches of any size and gives
the one-shot value. Teacher node ``j`` is *specialized* when
``max_k rho_jk >= tau``; teacher nodes with (near-)zero variance on the data
are *dead*: reported, and excluded from the means.
"""

import math
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from tsrobust import numerics

__all__ = ['CorrStats', 'empty_stats', 'batch_stats', 'merge_stats',
           'correlation_from_stats', 'correlation_matrix', 'LayerSummary', 'summarize',
           'weight_alignment', 'random_cosine_baseline', 'network_stats']


class CorrStats(NamedTuple):
  """Sufficient statistics of paired activations (teacher ``a``, student ``b``).

  Attributes:
    count: number of rows seen (scalar).
    mean_a: ``[J]`` teacher means.
    mean_b: ``[K]`` student means.
    m2_a: ``[J]`` centered sums of squares of the teacher nodes.
    m2_b: ``[K]`` centered sums of squares of the student nodes.
    cross: ``[J, K]`` centered cross sums.
  """
  count: chex.Array
  mean_a: chex.Array
  mean_b: chex.Array
  m2_a: chex.Array
  m2_b: chex.Array
  cross: chex.Array


def _rows(acts: chex.Array) -> chex.Array:
  """``[N, C]`` or ``[N, H, W, C]`` activations as rows ``[N (* H * W), C]``."""
  if acts.ndim == 2:
    return acts
  if acts.ndim == 4:
    return acts.reshape(-1, acts.shape[-1])
  raise ValueError(
      f'activations must be [N, C] (dense) or [N, H, W, C] (conv), got shape {acts.shape}')


def empty_stats(num_teacher: int, num_student: int,
                dtype: jnp.dtype = jnp.float32) -> CorrStats:
  """Statistics of zero rows: the identity of ``merge_stats``."""
  return CorrStats(jnp.zeros((), dtype), jnp.zeros((num_teacher,), dtype),
                   jnp.zeros((num_student,), dtype), jnp.zeros((num_teacher,), dtype),
                   jnp.zeros((num_student,), dtype),
                   jnp.zeros((num_teacher, num_student), dtype))


def batch_stats(teacher_acts: chex.Array, student_acts: chex.Array) -> CorrStats:
  """Statistics of one batch of activations.

  Args:
    teacher_acts: ``[N, J]`` or ``[N, H, W, J]``.
    student_acts: ``[N, K]`` or ``[N, H, W, K]``, same leading shape.

  Returns:
    ``CorrStats`` with ``count = N`` (``N * H * W`` for conv).

  >>> a = jnp.array([[0.0, 1.0], [1.0, 0.0], [2.0, 1.0]])  # 3 samples, 2 teacher nodes
  >>> s = merge_stats(batch_stats(a[:2], a[:2]), batch_stats(a[2:], a[2:]))
  >>> bool(jnp.allclose(correlation_from_stats(s), correlation_matrix(a, a), atol=1e-6))
  True
  """
  chex.assert_equal_shape_prefix([teacher_acts, student_acts], teacher_acts.ndim - 1)
  a, b = _rows(teacher_acts), _rows(student_acts)
  n = a.shape[0]
  mean_a, mean_b = a.mean(0), b.mean(0)
  ca, cb = a - mean_a, b - mean_b
  return CorrStats(jnp.asarray(n, a.dtype), mean_a, mean_b, (ca * ca).sum(0),
                   (cb * cb).sum(0), numerics.matmul(ca.T, cb))


def merge_stats(s1: CorrStats, s2: CorrStats) -> CorrStats:
  """Statistics of the union of two disjoint sets of rows (Chan et al. 1979)."""
  n = s1.count + s2.count
  safe_n = jnp.where(n > 0, n, 1)
  w = s1.count * s2.count / safe_n
  da = s2.mean_a - s1.mean_a
  db = s2.mean_b - s1.mean_b
  return CorrStats(
      n,
      s1.mean_a + da * s2.count / safe_n,
      s1.mean_b + db * s2.count / safe_n,
      s1.m2_a + s2.m2_a + w * da * da,
      s1.m2_b + s2.m2_b + w * db * db,
      s1.cross + s2.cross + w * da[:, None] * db[None, :])


def correlation_from_stats(stats: CorrStats, eps: float = 1e-12) -> chex.Array:
  """``[J, K]`` normalized correlations ``rho_jk`` from sufficient statistics."""
  return stats.cross / jnp.sqrt(stats.m2_a[:, None] * stats.m2_b[None, :] + eps)


def correlation_matrix(teacher_acts: chex.Array, student_acts: chex.Array,
                       eps: float = 1e-12) -> chex.Array:
  """One-shot ``[J, K]`` normalized correlations (see the module docstring).

  >>> t = jnp.array([[0.0], [1.0], [2.0], [3.0]])          # one teacher node, 4 samples
  >>> s = jnp.concatenate([2 * t + 1, -t, t ** 2], axis=1)  # three student nodes
  >>> correlation_matrix(t, s).round(3).tolist()
  [[1.0, -1.0, 0.958]]
  """
  return correlation_from_stats(batch_stats(teacher_acts, student_acts), eps)


class LayerSummary(NamedTuple):
  """Specialization of one layer.

  Attributes:
    mean_max_corr: mean over alive teacher nodes of ``max_k rho_jk`` (NaN if
      every teacher node is dead).
    frac_specialized: fraction of alive teacher nodes with ``max_k rho_jk >= tau``.
    max_corr: ``[J]`` ``max_k rho_jk`` per teacher node (NaN for dead nodes).
    best_student: ``[J]`` ``argmax_k rho_jk`` per teacher node.
    alive: ``[J]`` bool, teacher node has variance above the dead tolerance.
    num_dead: number of dead teacher nodes.
  """
  mean_max_corr: chex.Array
  frac_specialized: chex.Array
  max_corr: chex.Array
  best_student: chex.Array
  alive: chex.Array
  num_dead: chex.Array


def summarize(stats: CorrStats, tau: float = 0.9, dead_tol: float = 1e-6,
              eps: float = 1e-12) -> LayerSummary:
  """Per-layer summary from the statistics of one layer.

  Args:
    stats: ``CorrStats`` of the layer.
    tau: specialization threshold on ``max_k rho_jk``.
    dead_tol: a teacher node whose variance ``m2_a / count`` is at most this is dead.
    eps: added under the square root of the correlation's denominator.

  >>> t = jnp.array([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0]])  # node 1 is constant: dead
  >>> s = jnp.stack([t[:, 0] * 3.0, -t[:, 0]], axis=1)
  >>> out = summarize(batch_stats(t, s), tau=0.9)
  >>> float(out.mean_max_corr), float(out.frac_specialized), int(out.num_dead)
  (1.0, 1.0, 1)
  >>> out.best_student.tolist()[0]
  0
  """
  rho = correlation_from_stats(stats, eps)
  variance = stats.m2_a / jnp.maximum(stats.count, 1)
  alive = variance > dead_tol
  max_corr = jnp.where(alive, rho.max(axis=1), jnp.nan)
  num_alive = alive.sum()
  safe = jnp.maximum(num_alive, 1)
  mean_max = jnp.where(num_alive > 0, jnp.where(alive, max_corr, 0.0).sum() / safe, jnp.nan)
  frac = jnp.where(num_alive > 0, (alive & (max_corr >= tau)).sum() / safe, jnp.nan)
  return LayerSummary(mean_max, frac, max_corr, rho.argmax(axis=1), alive,
                      (~alive).sum())


def _cosine(u: chex.Array, v: chex.Array, eps: float = 1e-12) -> chex.Array:
  """Column-wise cosine of two ``[d, J]`` matrices."""
  return (u * v).sum(0) / jnp.sqrt((u * u).sum(0) * (v * v).sum(0) + eps)


def weight_alignment(teacher_kernel: chex.Array, student_kernel: chex.Array,
                     best_student: chex.Array, projector: chex.Array,
                     projector_perp: Optional[chex.Array] = None):
  """First-layer weight cosines of matched teacher/student nodes, in and out of S.

  For teacher node ``j`` and its best student ``k = best_student[j]``:
  ``cos(P w_T_j, P w_S_k)`` and ``cos(P_perp w_T_j, P_perp w_S_k)``.

  Args:
    teacher_kernel: ``[d, J]`` teacher first-layer kernel (node j is column j).
    student_kernel: ``[d, K]`` student first-layer kernel.
    best_student: ``[J]`` int indices into the student's nodes.
    projector: ``[d, d]`` projector onto the data subspace.
    projector_perp: ``[d, d]`` projector onto the complement (default ``I - P``).

  Returns:
    ``(cos_in [J], cos_off [J])``, signed cosines.

  >>> p = jnp.diag(jnp.array([1.0, 1.0, 0.0]))  # S = the first two coordinates
  >>> w_t = jnp.array([[1.0], [0.0], [1.0]])
  >>> w_s = jnp.array([[2.0], [0.0], [-1.0]])   # aligned in S, opposite off it
  >>> cos_in, cos_off = weight_alignment(w_t, w_s, jnp.array([0]), p)
  >>> float(cos_in[0]), float(cos_off[0])
  (1.0, -1.0)
  """
  chex.assert_rank([teacher_kernel, student_kernel, projector], 2)
  chex.assert_shape(best_student, (teacher_kernel.shape[1],))
  if projector_perp is None:
    projector_perp = jnp.eye(projector.shape[0], dtype=projector.dtype) - projector
  ws = student_kernel[:, best_student]
  mm = numerics.matmul
  return (_cosine(mm(projector, teacher_kernel), mm(projector, ws)),
          _cosine(mm(projector_perp, teacher_kernel), mm(projector_perp, ws)))


def random_cosine_baseline(dim: int) -> float:
  """``sqrt(2 / (pi * dim))``: E|cos| of two independent random directions in R^dim.

  (Asymptotic in ``dim``; the exact value is
  ``Gamma(dim/2) / (sqrt(pi) Gamma((dim+1)/2))``, within 1/(4 dim) relative.)

  >>> round(random_cosine_baseline(30), 3)  # rank 10 of d = 40: wcos_off_random
  0.146
  """
  if dim < 1:
    raise ValueError(f'dim must be >= 1, got {dim}')
  return math.sqrt(2.0 / (math.pi * dim))


def network_stats(teacher_apply, student_apply, teacher_params: chex.ArrayTree,
                  student_params: chex.ArrayTree, x: chex.Array,
                  batch_size: Optional[int] = None):
  """Per-hidden-layer ``CorrStats`` of teacher vs student activations on ``x``.

  The inputs are streamed in batches of ``batch_size`` (``lax.scan``), so the
  activations of all of ``x`` never sit in memory at once; the result equals
  the one-shot statistics.

  Args:
    teacher_apply, student_apply: ``(params, x) -> (outputs, activations)``
      with the same number of hidden layers.
    teacher_params, student_params: their parameters.
    x: ``[N, ...]`` evaluation inputs.
    batch_size: rows per batch; must divide N. ``None``: one batch.

  Returns:
    A tuple of ``CorrStats``, one per hidden layer.
  """
  n = x.shape[0]
  batch_size = n if batch_size is None else batch_size
  if batch_size < 1 or n % batch_size:
    raise ValueError(f'batch_size must divide the number of inputs {n}, got {batch_size}')

  def stats_of(xb):
    _, acts_t = teacher_apply(teacher_params, xb)
    _, acts_s = student_apply(student_params, xb)
    if len(acts_t) != len(acts_s):
      raise ValueError(f'teacher has {len(acts_t)} hidden layers, student {len(acts_s)}')
    return tuple(batch_stats(a, b) for a, b in zip(acts_t, acts_s))

  batches = x.reshape((n // batch_size, batch_size) + x.shape[1:])
  first = stats_of(batches[0])

  def body(carry, xb):
    return tuple(merge_stats(c, s) for c, s in zip(carry, stats_of(xb))), None
  stats, _ = jax.lax.scan(body, first, batches[1:])
  return stats
