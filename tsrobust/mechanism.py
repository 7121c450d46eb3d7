"""The mechanism behind claims 2 and 3: off-subspace weights, interventions on them, dynamics.

PAPER.md's argument: the gradient of the first-layer weights is a combination of data
points, so it lies in the data subspace S and, under (S)GD without weight decay,
``P_perp W`` never leaves its initialization (claim 2); perturbations in S_perp then move
teacher and student pre-activations by unrelated amounts (claim 3). This module measures
and intervenes on exactly that part of a student, for one seed (``jax.vmap`` for many):

* ``off_subspace_movement`` / ``node_off_subspace_movement``: how far ``P_perp W`` moved,
  ``||P_perp (W - W_0)|| / ||P_perp W_0||`` (layer, Frobenius) or per node (columns);
* ``rescale_off_subspace``: ``W -> P W + c P_perp W``;
* ``match_teacher_nodes`` / ``transplant_off_subspace``: give each matched student node
  its teacher node's ``P_perp w_T`` (zero the unmatched ones);
* ``transplant_off_subspace_all``: the same for every student node specialized to a teacher
  node (an over-realized student's several copies of one teacher node);
* ``INTERVENTIONS`` / ``intervene``: the interventions by name;
* ``snapshot``: per teacher node, max correlation in and off S, weight cosines and
  ``P_perp`` movement, as fixed-shape arrays: callable from a scan or between chunks;
* ``log_spaced_steps`` / ``train_with_snapshots``: ``train.train_seeds`` cut at log-spaced
  chunk boundaries with a snapshot at each (one training pass; the trajectory is the
  uninterrupted one, since step ``t`` uses ``fold_in(key, t)``);
* ``probe_sets``, ``check_projector``: the evaluation inputs, the input checks.

Only first-layer *kernels* change in an intervention; biases and later layers stay.
Checks that need values (a full-rank projector, ``c < 0``, ``x_eval`` outside S) run
when the arguments are concrete; under ``jit`` / ``vmap`` the caller checks first
(``check_projector`` takes a batch of projectors).
"""

import functools
import math
import numbers
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import data
from tsrobust import models
from tsrobust import numerics
from tsrobust import specialization
from tsrobust import train

__all__ = ['INTERVENTIONS', 'check_projector', 'probe_sets', 'off_subspace_movement',
           'node_off_subspace_movement', 'rescale_off_subspace', 'match_teacher_nodes',
           'transplant_off_subspace', 'transplant_off_subspace_all', 'intervene', 'snapshot',
           'batched_snapshot',
           'log_spaced_steps', 'train_with_snapshots']

INTERVENTIONS = ('none', 'rescale', 'transplant')


def _concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _perp(projector: chex.Array) -> chex.Array:
  return jnp.eye(projector.shape[-1], dtype=projector.dtype) - projector


def _movement(projector: chex.Array, w: chex.Array, w0: chex.Array):
  """``(per node [n], layer scalar)`` ratios ``||P_perp (W - W0)|| / ||P_perp W0||``."""
  perp = _perp(projector)
  moved = numerics.matmul(perp, w - w0)
  base = numerics.matmul(perp, w0)
  return (jnp.linalg.norm(moved, axis=0) / jnp.linalg.norm(base, axis=0),
          jnp.linalg.norm(moved) / jnp.linalg.norm(base))


def _kernel(params_or_kernel) -> chex.Array:
  """A first-layer kernel ``[d, n]``: given, or read from a Flax params dict."""
  if isinstance(params_or_kernel, dict) or hasattr(params_or_kernel, 'keys'):
    return models.first_layer_kernel(params_or_kernel)
  return params_or_kernel


def _with_first_layer_kernel(params: chex.ArrayTree, kernel: chex.Array) -> chex.ArrayTree:
  """``params`` with its first Dense layer's kernel replaced (everything else shared)."""
  inner = params['params']
  name = 'hidden_0' if 'hidden_0' in inner else 'output'
  chex.assert_equal_shape([inner[name]['kernel'], kernel])
  return {**params, 'params': {**inner, name: {**inner[name], 'kernel': kernel}}}


def check_projector(projector: chex.Array, name: str = 'projector') -> None:
  """Raises ``ValueError`` unless ``projector`` (``[d, d]`` or ``[S, d, d]``) leaves an S_perp.

  An intervention on the off-subspace weights needs a complement: a full-rank
  projector (trace d, i.e. ``P = I``) has none. Traced arguments are not checked.

  >>> check_projector(jnp.eye(3))
  Traceback (most recent call last):
  ValueError: projector is full rank (d = 3): no S_perp to measure or intervene on; use r < d
  """
  if projector.ndim < 2 or projector.shape[-1] != projector.shape[-2]:
    raise ValueError(f'{name} must be [d, d] (or [S, d, d]), got shape {projector.shape}')
  if not _concrete(projector):
    return
  d = projector.shape[-1]
  ranks = np.asarray(jnp.trace(projector, axis1=-2, axis2=-1)).reshape(-1)
  if (ranks > d - 0.5).any():
    raise ValueError(f'{name} is full rank (d = {d}): no S_perp to measure or intervene on; '
                     f'use r < d')


def _check_scale(value, name: str, allow_zero: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
    raise ValueError(f'{name} must be a number, got {value!r}')
  if not _concrete(value):
    return
  v = np.asarray(value)
  ok = np.isfinite(v).all() and ((v >= 0).all() if allow_zero else (v > 0).all())
  if not ok:
    raise ValueError(f'{name} must be {">= 0" if allow_zero else "> 0"} and finite, '
                     f'got {value!r}')


def probe_sets(key: chex.PRNGKey, projector: chex.Array, n: int, scale: float = 1.0,
               probe_scale: float = 1.0) -> Tuple[chex.Array, chex.Array]:
  """``(x_in, x_off)``, both ``[n, d]``: inputs in S and the same points moved off S.

  ``x_in = data.sample_lowrank(k1, P, n, scale)``;
  ``x_off = data.off_subspace_probe(k2, x_in, P_perp, probe_scale)``, the probes of
  ``metrics.lowrank_specialization``.

  >>> p, _ = data.projectors(data.random_orthonormal(jax.random.PRNGKey(0), 6, 2))
  >>> x_in, x_off = probe_sets(jax.random.PRNGKey(1), p, 32, scale=2.0)
  >>> x_in.shape, bool(jnp.allclose(x_off @ p, x_in, atol=1e-5))
  ((32, 6), True)
  >>> probe_sets(jax.random.PRNGKey(1), p, 32, probe_scale=0.0)
  Traceback (most recent call last):
  ValueError: probe_scale must be > 0 and finite, got 0.0
  """
  chex.assert_rank(projector, 2)
  _check_scale(scale, 'scale')
  _check_scale(probe_scale, 'probe_scale')
  if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
    raise ValueError(f'n must be an integer >= 2 (correlations need two rows), got {n!r}')
  k_in, k_off = jax.random.split(key)
  x_in = data.sample_lowrank(k_in, projector, int(n), scale)
  return x_in, data.off_subspace_probe(k_off, x_in, _perp(projector), probe_scale)


def _checked_kernels(w, w0, projector):
  """``(w, w0)`` as first-layer kernels, shapes and projector checked (the movement's inputs)."""
  w, w0 = _kernel(w), _kernel(w0)
  chex.assert_rank([w, projector], 2)
  chex.assert_equal_shape([w, w0])
  chex.assert_shape(projector, (w.shape[0], w.shape[0]))
  check_projector(projector)
  return w, w0


def node_off_subspace_movement(w, w0, projector: chex.Array) -> chex.Array:
  """``[n]``: ``||P_perp (w_k - w0_k)|| / ||P_perp w0_k||`` per first-layer node ``k``.

  Args:
    w, w0: first-layer kernels ``[d, n]`` (node k is column k), or Flax params dicts
      (their first layer is read: ``models.first_layer_kernel``).
    projector: ``[d, d]`` projector ``P`` onto the data subspace.

  Returns:
    ``[n]`` ratios; a node with ``P_perp w0_k = 0`` gives ``inf`` (moved) or NaN (not).
  """
  return _movement(projector, *_checked_kernels(w, w0, projector))[0]


def off_subspace_movement(w, w0, projector: chex.Array) -> chex.Array:
  """Scalar ``||P_perp (W - W0)||_F / ||P_perp W0||_F`` of the first layer (claim 2).

  0 for ``W == W0``; under (S)GD without weight decay on data in S it stays 0 up to
  float rounding, since every first-layer gradient lies in S.

  Args:
    w, w0: first-layer kernels ``[d, n]`` or Flax params dicts (first layer read).
    projector: ``[d, d]`` projector onto the data subspace.

  >>> p = jnp.diag(jnp.array([1.0, 0.0, 0.0]))       # S = the first coordinate
  >>> w0 = jnp.array([[1.0], [3.0], [4.0]])          # ||P_perp w0|| = 5
  >>> w = w0 + jnp.array([[7.0], [0.0], [1.0]])      # moved 7 in S, 1 off it
  >>> float(off_subspace_movement(w, w0, p)), float(off_subspace_movement(w0, w0, p))
  (0.2, 0.0)
  """
  return _movement(projector, *_checked_kernels(w, w0, projector))[1]


def rescale_off_subspace(student_params: chex.ArrayTree, projector: chex.Array,
                         c: chex.Numeric) -> chex.ArrayTree:
  """The student with first-layer kernel ``W -> P W + c P_perp W``, i.e. ``W + (c - 1) P_perp W``.

  ``c = 1`` returns the kernel unchanged (bit for bit); ``c = 0`` removes its
  off-subspace part. Biases and later layers are untouched.

  Args:
    student_params: one student's Flax params.
    projector: ``[d, d]`` projector onto the data subspace (rank < d).
    c: the factor, >= 0.

  Returns:
    The new params (same structure).

  >>> p = jnp.diag(jnp.array([1.0, 0.0]))
  >>> params = {'params': {'output': {'kernel': jnp.array([[1.0], [2.0]])}}}
  >>> rescale_off_subspace(params, p, 0.5)['params']['output']['kernel'].tolist()
  [[1.0], [1.0]]
  >>> rescale_off_subspace(params, p, -1.0)
  Traceback (most recent call last):
  ValueError: c must be >= 0 and finite, got -1.0
  """
  _check_scale(c, 'c', allow_zero=True)
  w = models.first_layer_kernel(student_params)
  chex.assert_rank(w, 2)
  chex.assert_shape(projector, (w.shape[0], w.shape[0]))
  check_projector(projector)
  c = jnp.asarray(c, w.dtype)
  chex.assert_rank(c, 0)
  return _with_first_layer_kernel(
      student_params, w + (c - 1) * numerics.matmul(_perp(projector), w))


def match_teacher_nodes(corr: chex.Array, eligible: chex.Array) -> Dict[str, chex.Array]:
  """One-to-one matching of teacher nodes to student nodes from a correlation matrix.

  Teacher node ``j`` proposes its best student ``k_j = argmax_k corr[j, k]`` (the
  best student of ``specialization.summarize``). A student node proposed by several
  eligible teacher nodes goes to the one with the highest ``corr[j, k_j]`` (ties: the
  lowest ``j``); the others stay unmatched (their best student is taken; they are
  *not* moved to a second choice). Ineligible teacher nodes (dead, or below a
  threshold) propose nothing.

  Args:
    corr: ``[J, K]`` correlations (NaN rows allowed where ``eligible`` is False).
    eligible: ``[J]`` bool.

  Returns:
    ``teacher_of_student`` ``[K]`` (the matched teacher node, -1 if none),
    ``student_of_teacher`` ``[J]`` (the matched student node, -1 if none),
    ``best_student`` ``[J]`` (each teacher node's proposal, matched or not).

  >>> corr = jnp.array([[0.9, 0.1, 0.0],    # teacher 0 and 1 both pick student 0;
  ...                   [0.95, 0.2, 0.0],   # teacher 1 correlates more: it wins
  ...                   [0.0, 0.1, 0.8]])
  >>> out = match_teacher_nodes(corr, jnp.array([True, True, True]))
  >>> out['teacher_of_student'].tolist(), out['student_of_teacher'].tolist()
  ([1, -1, 2], [-1, 0, 2])
  """
  chex.assert_rank(corr, 2)
  chex.assert_shape(eligible, (corr.shape[0],))
  num_student = corr.shape[1]
  best = jnp.argmax(jnp.where(jnp.isnan(corr), -jnp.inf, corr), axis=1)
  score = jnp.where(eligible, jnp.take_along_axis(corr, best[:, None], axis=1)[:, 0], -jnp.inf)
  proposes = eligible[:, None] & (best[:, None] == jnp.arange(num_student)[None, :])  # [J, K]
  winner = jnp.argmax(jnp.where(proposes, score[:, None], -jnp.inf), axis=0)         # [K]
  teacher_of_student = jnp.where(proposes.any(axis=0), winner, -1)
  won = eligible & (teacher_of_student[best] == jnp.arange(corr.shape[0]))
  return {'teacher_of_student': teacher_of_student,
          'student_of_teacher': jnp.where(won, best, -1),
          'best_student': best}


def _first_layer_summary(teacher_apply: Callable, student_apply: Callable,
                         teacher_params: chex.ArrayTree, student_params: chex.ArrayTree,
                         x: chex.Array, dead_tol: float):
  """``(corr [J, K], summary)`` of the first hidden layer on ``x``."""
  acts_t = teacher_apply(teacher_params, x)[1]
  acts_s = student_apply(student_params, x)[1]
  if not acts_t or not acts_s:
    raise ValueError('teacher and student must have a hidden layer: a linear model has no '
                     'nodes to correlate')
  stats = specialization.batch_stats(acts_t[0], acts_s[0])
  return (specialization.correlation_from_stats(stats),
          specialization.summarize(stats, dead_tol=dead_tol))


def _check_in_subspace(x: chex.Array, projector: chex.Array, name: str) -> None:
  if not _concrete(x, projector):
    return
  off = float(jnp.abs(numerics.matmul(x, _perp(projector))).max())
  size = float(jnp.abs(x).max())
  if off > 1e-4 * max(size, 1.0):
    raise ValueError(f'{name} must lie in the data subspace (x = P x): its largest '
                     f'component off it is {off:.3g}; draw it with probe_sets or '
                     f'data.sample_lowrank')


def _transplant_inputs(teacher_apply, student_apply, student_params, teacher_params,
                       projector, x_eval, dead_tol):
  """The transplants' checked inputs: ``(w_s [d, K], w_t [d, J], corr [J, K], summary)``."""
  w_s = models.first_layer_kernel(student_params)
  w_t = models.first_layer_kernel(teacher_params)
  chex.assert_rank([w_s, w_t, x_eval, projector], 2)
  d = w_s.shape[0]
  chex.assert_shape(w_t, (d, None))
  chex.assert_shape(projector, (d, d))
  chex.assert_shape(x_eval, (None, d))
  check_projector(projector)
  _check_in_subspace(x_eval, projector, 'x_eval')
  corr, summary = _first_layer_summary(teacher_apply, student_apply, teacher_params,
                                       student_params, x_eval, dead_tol)
  return w_s, w_t, corr, summary


def transplant_off_subspace(teacher_apply: Callable, student_apply: Callable,
                            student_params: chex.ArrayTree, teacher_params: chex.ArrayTree,
                            projector: chex.Array, x_eval: chex.Array, *,
                            min_corr: Optional[float] = None, dead_tol: float = 1e-6,
                            eps: float = 1e-12) -> Tuple[chex.ArrayTree, Dict[str, chex.Array]]:
  """Gives each matched student node its teacher node's off-subspace weights (claim 3's cause).

  Matching is in S, on the first hidden layer's activations over ``x_eval``: the
  correlations of ``specialization`` and the one-to-one rule of ``match_teacher_nodes``
  (each alive teacher node proposes its best student; a student proposed by several
  keeps the best-correlated teacher node, the others go unmatched). With ``min_corr``,
  teacher nodes whose best correlation is below it are not matched either.

  For a student node ``k`` matched to teacher node ``j``::

      w_k -> P w_k + (||P w_k|| / ||P w_T_j||) P_perp w_T_j

  (the teacher's whole weight vector scaled to the student's in-subspace norm, when
  ``P w_k`` is parallel to ``P w_T_j``); every unmatched student node gets
  ``P_perp w_k = 0``. Biases and later layers are unchanged.

  Args:
    teacher_apply, student_apply: ``(params, x) -> (outputs, activations)``.
    student_params, teacher_params: one seed's parameters.
    projector: ``[d, d]`` projector onto the data subspace (rank < d).
    x_eval: ``[N, d]`` inputs in S for the matching.
    min_corr: optional threshold on a teacher node's best correlation.
    dead_tol: teacher nodes with activation variance <= this are dead (never matched).
    eps: added to ``||P w_T_j||`` in the ratio.

  Returns:
    ``(params, info)``: the new student params and ``info`` with
    ``teacher_of_student`` ``[K]`` (-1: unmatched, off-subspace part zeroed),
    ``student_of_teacher`` ``[J]`` (-1: dead, below ``min_corr`` or lost its best
    student to a better-correlated teacher node), ``match_corr`` ``[J]`` (each
    teacher node's best correlation in S, NaN when dead), ``norm_ratio`` ``[K]``
    (the applied ``||P w_k|| / ||P w_T_j||``, 0 when unmatched), ``num_matched`` and
    ``num_zeroed`` (scalars; they add up to K).
  """
  w_s, w_t, corr, summary = _transplant_inputs(teacher_apply, student_apply, student_params,
                                               teacher_params, projector, x_eval, dead_tol)
  eligible = summary.alive
  if min_corr is not None:
    eligible = eligible & (summary.max_corr >= min_corr)
  match = match_teacher_nodes(corr, eligible)
  t_of_s = match['teacher_of_student']
  matched = t_of_s >= 0
  perp = _perp(projector)
  in_s = numerics.matmul(projector, w_s)
  w_t_in = numerics.matmul(projector, w_t)
  w_t_off = numerics.matmul(perp, w_t)
  j = jnp.maximum(t_of_s, 0)
  ratio = jnp.where(matched, jnp.linalg.norm(in_s, axis=0)
                    / (jnp.linalg.norm(w_t_in, axis=0)[j] + eps), 0.0)
  new_off = w_t_off[:, j] * ratio[None, :]        # zero where unmatched
  new_w = w_s + (new_off - numerics.matmul(perp, w_s))
  info = {'teacher_of_student': t_of_s,
          'student_of_teacher': match['student_of_teacher'],
          'match_corr': summary.max_corr,
          'norm_ratio': ratio,
          'num_matched': matched.sum(),
          'num_zeroed': (~matched).sum()}
  return _with_first_layer_kernel(student_params, new_w), info


def transplant_off_subspace_all(teacher_apply: Callable, student_apply: Callable,
                                student_params: chex.ArrayTree, teacher_params: chex.ArrayTree,
                                projector: chex.Array, x_eval: chex.Array, *,
                                min_corr: float = 0.9, dead_tol: float = 1e-6,
                                eps: float = 1e-12
                                ) -> Tuple[chex.ArrayTree, Dict[str, chex.Array]]:
  """Gives *every* specialized student node its teacher node's off-subspace weights.

  ``transplant_off_subspace`` matches one student node per teacher node; an over-realized
  student (width ``k m``) spreads a teacher node over several student nodes, each a scaled
  copy of it in S, and there only one of them would get the teacher's ``P_perp w_T``. Here
  each student node ``k`` takes its best-correlated alive teacher node ``j(k) = argmax_j
  rho_jk`` on the first hidden layer's activations over ``x_eval`` (in S); where
  ``rho_{j(k) k} >= min_corr``::

      w_k -> P w_k + (||P w_k|| / ||P w_T_j||) P_perp w_T_j

  so a node with ``P w_k = c P w_T_j`` becomes ``c w_T_j`` everywhere; every other student
  node gets ``P_perp w_k = 0``. Biases and later layers are unchanged.

  Args:
    teacher_apply, student_apply: ``(params, x) -> (outputs, activations)``.
    student_params, teacher_params: one seed's parameters.
    projector: ``[d, d]`` projector onto the data subspace (rank < d).
    x_eval: ``[N, d]`` inputs in S.
    min_corr: the correlation a student node needs with its teacher node to be matched.
    dead_tol: teacher nodes with activation variance <= this are dead (never matched).
    eps: added to ``||P w_T_j||`` in the ratio.

  Returns:
    ``(params, info)``: the new student params and ``info`` with ``teacher_of_student``
    ``[K]`` (-1: unmatched, off-subspace part zeroed), ``match_corr`` ``[K]`` (each student
    node's best correlation with an alive teacher node), ``norm_ratio`` ``[K]`` (0 when
    unmatched), ``students_of_teacher`` ``[J]`` (matched student nodes per teacher node),
    ``num_matched`` and ``num_zeroed`` (scalars; they add up to K).

  A teacher transplanted into a student that already is a copy of it changes nothing:

  >>> teacher = models.MLP((2,), 2)
  >>> tp = models.random_teacher_params(jax.random.PRNGKey(0), teacher, 4)
  >>> p = data.projectors(data.random_orthonormal(jax.random.PRNGKey(1), 4, 2))[0]
  >>> x = data.sample_lowrank(jax.random.PRNGKey(2), p, 256)
  >>> new, info = transplant_off_subspace_all(teacher.apply, teacher.apply, tp, tp, p, x)
  >>> int(info['num_matched']), bool(jnp.allclose(models.first_layer_kernel(new),
  ...                                             models.first_layer_kernel(tp), atol=1e-5))
  (2, True)
  """
  w_s, w_t, corr, summary = _transplant_inputs(teacher_apply, student_apply, student_params,
                                               teacher_params, projector, x_eval, dead_tol)
  scores = jnp.where(summary.alive[:, None] & ~jnp.isnan(corr), corr, -jnp.inf)
  j = jnp.argmax(scores, axis=0)                                  # [K]
  best = jnp.max(scores, axis=0)
  matched = best >= min_corr
  perp = _perp(projector)
  in_s = numerics.matmul(projector, w_s)
  w_t_in = numerics.matmul(projector, w_t)
  ratio = jnp.where(matched, jnp.linalg.norm(in_s, axis=0)
                    / (jnp.linalg.norm(w_t_in, axis=0)[j] + eps), 0.0)
  new_off = numerics.matmul(perp, w_t)[:, j] * ratio[None, :]     # zero where unmatched
  new_w = w_s + (new_off - numerics.matmul(perp, w_s))
  t_of_s = jnp.where(matched, j, -1)
  info = {'teacher_of_student': t_of_s,
          'match_corr': jnp.where(jnp.isfinite(best), best, jnp.nan),
          'norm_ratio': ratio,
          'students_of_teacher': (t_of_s[None, :] == jnp.arange(w_t.shape[1])[:, None]).sum(1),
          'num_matched': matched.sum(),
          'num_zeroed': (~matched).sum()}
  return _with_first_layer_kernel(student_params, new_w), info


def intervene(name: str, teacher_apply: Callable, student_apply: Callable,
              student_params: chex.ArrayTree, teacher_params: chex.ArrayTree,
              projector: chex.Array, x_eval: chex.Array, *, c: chex.Numeric = 1.0,
              **transplant_kwargs) -> Tuple[chex.ArrayTree, Dict[str, chex.Array]]:
  """One intervention of ``INTERVENTIONS`` by name: ``(params, info)``.

  ``'none'``: the student as it is; ``'rescale'``: ``rescale_off_subspace`` by ``c``;
  ``'transplant'``: ``transplant_off_subspace`` (``transplant_kwargs`` passed on).
  ``info`` is empty except for the transplant's.

  >>> intervene('swap', None, None, {}, {}, jnp.zeros((2, 2)), jnp.zeros((4, 2)))
  Traceback (most recent call last):
  ValueError: intervention name must be one of ('none', 'rescale', 'transplant'), got 'swap'
  """
  if name not in INTERVENTIONS:
    raise ValueError(f'intervention name must be one of {INTERVENTIONS}, got {name!r}')
  check_projector(projector)
  if name == 'none':
    return student_params, {}
  if name == 'rescale':
    return rescale_off_subspace(student_params, projector, c), {}
  return transplant_off_subspace(teacher_apply, student_apply, student_params, teacher_params,
                                 projector, x_eval, **transplant_kwargs)


def snapshot(teacher_apply: Callable, student_apply: Callable, teacher_params: chex.ArrayTree,
             student_params: chex.ArrayTree, student_params_init: chex.ArrayTree,
             projector: chex.Array, x_in: chex.Array, x_off: chex.Array, *,
             dead_tol: float = 1e-6) -> Dict[str, chex.Array]:
  """Per teacher node of the first layer: specialization in / off S and ``P_perp`` movement.

  Pure, fixed shapes, no checks that need values: call it from a ``lax.scan``, or
  between jitted chunks (``train_with_snapshots``), and stack the results. The
  correlations are ``specialization``'s on the first hidden layer, so the mean of
  ``corr_in`` / ``corr_off`` over alive nodes is ``metrics.lowrank_specialization``'s
  ``spec_in[0]`` / ``spec_off[0]`` on the same ``x_in`` / ``x_off`` (``probe_sets``).

  Args:
    teacher_apply, student_apply: ``(params, x) -> (outputs, activations)``.
    teacher_params, student_params: one seed's teacher and current student.
    student_params_init: the student at step 0 (the movement's reference).
    projector: ``[d, d]`` projector onto the data subspace.
    x_in: ``[N, d]`` inputs in S; x_off: ``[N, d]`` probes off S.
    dead_tol: teacher nodes with variance <= this on ``x_in`` are dead.

  Returns:
    A dict, ``J`` the teacher's first-layer width:
      ``corr_in``, ``corr_off``: ``[J]`` max correlation over student nodes on
        ``x_in`` / ``x_off`` (NaN where the teacher node is dead there);
      ``best_student``: ``[J]`` argmax in S;
      ``alive``: ``[J]`` bool (on ``x_in``);
      ``wcos_in``, ``wcos_off``: ``[J]`` signed cosines of ``P w`` / ``P_perp w`` of the
        teacher node and its best student (``specialization.weight_alignment``);
      ``moved_off``: ``[J]`` ``||P_perp (w_k - w0_k)|| / ||P_perp w0_k||`` of the best
        student ``k`` (NaN where dead);
      ``moved_off_layer``: scalar ``off_subspace_movement`` of the whole layer.
  """
  chex.assert_rank([x_in, x_off, projector], 2)
  chex.assert_equal_shape([x_in, x_off])
  chex.assert_shape(projector, (x_in.shape[1], x_in.shape[1]))
  w = models.first_layer_kernel(student_params)
  w0 = models.first_layer_kernel(student_params_init)
  _, sum_in = _first_layer_summary(teacher_apply, student_apply, teacher_params,
                                   student_params, x_in, dead_tol)
  _, sum_off = _first_layer_summary(teacher_apply, student_apply, teacher_params,
                                    student_params, x_off, dead_tol)
  best = sum_in.best_student
  perp = _perp(projector)
  cos_in, cos_off = specialization.weight_alignment(
      models.first_layer_kernel(teacher_params), w, best, projector, perp)
  node_moved, layer_moved = _movement(projector, w, w0)
  alive = sum_in.alive
  return {'corr_in': sum_in.max_corr,
          'corr_off': sum_off.max_corr,
          'best_student': best,
          'alive': alive,
          'wcos_in': cos_in,
          'wcos_off': cos_off,
          'moved_off': jnp.where(alive, node_moved[best], jnp.nan),
          'moved_off_layer': layer_moved}


@functools.lru_cache(maxsize=16)
def batched_snapshot(teacher_apply: Callable, student_apply: Callable) -> Callable:
  """``jit(vmap(snapshot))`` over a leading seeds axis of every argument, compiled once.

  ``f(teacher_params, student_params, student_params_init, projector, x_in, x_off)``
  with each ``[S, ...]`` returns ``snapshot``'s dict with ``[S, ...]`` arrays.
  """
  return jax.jit(jax.vmap(functools.partial(snapshot, teacher_apply, student_apply)))


def log_spaced_steps(num_steps: int, chunk_steps: int, num_points: int) -> Tuple[int, ...]:
  """About ``num_points`` log-spaced steps in ``[0, num_steps]`` on chunk boundaries.

  Always 0 and ``num_steps``; in between, multiples of ``chunk_steps`` nearest to
  ``geomspace(chunk_steps, num_steps, num_points - 1)``, duplicates dropped (so fewer
  points when the chunks are coarse). Training between two of them is whole chunks:
  ``train.train_seeds`` reuses one compiled chunk (only a last partial chunk, when
  ``chunk_steps`` does not divide ``num_steps``, compiles once more).

  >>> log_spaced_steps(1000, 10, 6)
  (0, 10, 30, 100, 320, 1000)
  >>> log_spaced_steps(1000, 0, 6)
  Traceback (most recent call last):
  ValueError: chunk_steps must be an integer >= 1, got 0
  """
  for name, value, low in (('num_steps', num_steps, 1), ('chunk_steps', chunk_steps, 1),
                           ('num_points', num_points, 2)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
      raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')
  points = {0, int(num_steps)}
  if num_points > 2 and chunk_steps < num_steps:
    for s in np.geomspace(chunk_steps, num_steps, num_points - 1):
      points.add(min(int(round(s / chunk_steps)) * chunk_steps, int(num_steps)))
  return tuple(sorted(points))


def train_with_snapshots(loss_fn: train.LossFn, optimizer, state: train.TrainState,
                         teacher_params: chex.ArrayTree, data_args: Any, keys: chex.PRNGKey, *,
                         record_steps: Sequence[int], chunk_steps: int,
                         record: Callable[[chex.ArrayTree], Any],
                         on_chunk: Optional[Callable[[Dict[str, float]], None]] = None,
                         shared_args: Optional[Dict[str, Any]] = None):
  """``train.train_seeds`` up to ``record_steps[-1]``, recording at each of ``record_steps``.

  One training pass: ``train_seeds`` runs from one recorded step to the next, and
  ``record(params)`` (batched params ``[S, ...]`` -> a pytree ``[S, ...]``, e.g.
  ``batched_snapshot`` with the other arguments bound) is called there. The final
  state equals an uninterrupted ``train_seeds`` run's (step ``t`` uses ``fold_in(key,
  t)``). Steps from ``log_spaced_steps`` keep every chunk full length. No checkpoints.

  Args:
    loss_fn, optimizer, state, teacher_params, data_args, keys, chunk_steps, shared_args:
      as for ``train.train_seeds``.
    record_steps: strictly increasing steps >= 0, counted from ``state``'s step (0: record
      before training).
    record: ``params -> pytree`` of arrays with a leading seeds axis.
    on_chunk: ``train_seeds``' progress callback, with ``step`` / ``num_steps`` / ``eta_sec``
      of the whole run.

  Returns:
    ``(state, losses, records)``: the final state, ``[S, num_chunks]`` chunk losses, and
    ``record``'s pytree stacked on axis 1, ``[S, len(record_steps), ...]``.
  """
  steps = [int(s) for s in record_steps]
  if not steps or steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:])):
    raise ValueError(f'record_steps must be non-empty, strictly increasing and >= 0, got '
                     f'{list(record_steps)!r}')
  total = steps[-1]
  records, losses = [], []
  done = 0
  for target in steps:
    if target > done:
      def progress(info, offset=done):
        step = offset + info['step']
        rate = info['steps_per_sec']
        on_chunk({**info, 'step': step, 'num_steps': total,
                  'eta_sec': (total - step) / rate if rate > 0 else math.inf})
      state, chunk_losses = train.train_seeds(
          loss_fn, optimizer, state, teacher_params, data_args, keys,
          num_steps=target - done, chunk_steps=chunk_steps,
          on_chunk=None if on_chunk is None else progress, shared_args=shared_args)
      losses.append(chunk_losses)
      done = target
    records.append(record(state.params))
  num_seeds = jax.tree_util.tree_leaves(keys)[0].shape[0]
  all_losses = (np.concatenate(losses, axis=1) if losses
                else np.zeros((num_seeds, 0), np.float32))
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs, axis=1), *records)
  return state, all_losses, stacked
