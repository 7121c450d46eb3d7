"""Gradient attacks (PGD, APGD) and the per-example errors they measure.

``pgd`` (Madry et al. 2018) and ``apgd`` (Croce & Hein, ICML 2020) maximize a
per-example objective over perturbations ``delta`` in a norm ball (L-inf or
L2), optionally restricted to a linear subspace given by its orthogonal
projector (the data subspace S, or its complement S_perp), and optionally
keeping ``x + delta`` in an input range (the feasible sets: ``projections``):

* random start inside the feasible set (``_random_start``: L-inf uniform in
  the box; L2 a uniform direction in the feasible subspace, radius
  ``eps * U``);
* ascent steps along ``sign(g)`` (L-inf) or ``g / ||g||`` (L2), ``g`` the
  gradient projected onto the subspace first when one is given; ``pgd`` uses
  a fixed step ``alpha``, ``apgd`` a step that starts at ``2 eps``, momentum,
  and halves the step at checkpoints when progress stalls, restarting from
  its best point;
* projection onto the feasible set after every step (``project``, then
  ``_clip_inputs`` for the input range);
* both return, per example, the best iterate seen over all iterates and
  restarts: a success (when ``success_fn`` is given) over a non-success, then
  the larger objective. ``apgd`` can also return when a success was first
  found (error vs iterations).

The objectives they maximize (``x_adv [N, ...] -> [N]``: fixed label, oracle, pair,
CCAT) and the success criteria are in ``objectives``. This module re-exports the public
names of ``objectives`` and ``projections`` (and the latter's private helpers), so
``attacks.X`` reaches all of them.

``robust_error`` / ``ccat_robust_error`` run PGD and return per-example
errors; ``ccat_lambda``, ``ccat_target`` and ``confidence_threshold`` are CCAT's
training targets and rejection threshold.
"""

import math
from typing import Callable, Optional, Tuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

# The objectives and the feasible sets, in modules of their own: used here and re-exported,
# so ``attacks.X`` reaches them as before.
from tsrobust.objectives import (ORACLE_LOSSES, Fn, ccat_objective, cross_entropy, dlr_objective,
                                 fixed_label_objective, fixed_label_success, margin,
                                 margin_objective, oracle_margin_objective, oracle_objective,
                                 oracle_pair_objective, oracle_pairs, oracle_success,
                                 oracle_targeted_margin_objective, targeted_dlr_objective,
                                 targeted_margin_objective, top_other_classes, top_values)
from tsrobust.projections import (NORMS, _broadcast, _check_norm, _clip_inputs,
                                  _per_example_norm, _random_start, project,
                                  project_onto_subspace)

LABELS = ('oracle', 'fixed')

__all__ = ['NORMS', 'ORACLE_LOSSES', 'LABELS', 'project_onto_subspace', 'project', 'pgd',
           'apgd_checkpoints', 'apgd', 'top_values', 'cross_entropy', 'margin',
           'top_other_classes', 'fixed_label_objective', 'fixed_label_success',
           'margin_objective', 'dlr_objective', 'targeted_dlr_objective',
           'targeted_margin_objective', 'oracle_objective', 'oracle_margin_objective',
           'oracle_targeted_margin_objective', 'oracle_pairs', 'oracle_pair_objective',
           'oracle_success', 'robust_error', 'ccat_objective', 'ccat_lambda', 'ccat_target',
           'confidence_threshold', 'ccat_robust_error']


# ----------------------------------------------------------------------------
# Shared pieces of the gradient attacks.
# ----------------------------------------------------------------------------

# Per example: (delta [N, ...], objective [N], success [N] bool or None).
_Best = Tuple[chex.Array, chex.Array, Optional[chex.Array]]


def _check_attack_inputs(objective_fn: Fn, x: chex.Array,
                         projector: Optional[chex.Array]) -> jnp.dtype:
  """Checks shapes; returns the dtype of the objective (traced once, not run)."""
  if x.ndim < 1:
    raise ValueError(f'x must be [N, ...], got shape {x.shape}')
  if projector is not None:
    d = math.prod(x.shape[1:])
    if projector.shape != (d, d):
      raise ValueError(f'projector must be [D, D] with D = {d} (the size of an example of '
                       f'x {x.shape}), got shape {projector.shape}')
  out = jax.eval_shape(objective_fn, x)
  if out.shape != (x.shape[0],):
    raise ValueError(f'objective_fn must map x [N, ...] to [N] (N = {x.shape[0]}), '
                     f'got shape {out.shape}')
  return out.dtype


def _value_and_grad(objective_fn: Fn) -> Callable[[chex.Array], Tuple[chex.Array, chex.Array]]:
  """``xa -> (objective [N], d sum(objective) / d xa [N, ...])`` in one pass."""
  def summed(xa):
    values = objective_fn(xa)
    return values.sum(), values
  value_and_grad = jax.value_and_grad(summed, has_aux=True)

  def fn(xa):
    (_, values), g = value_and_grad(xa)
    return values, g
  return fn


def _ascent_direction(g: chex.Array, norm: str, projector: Optional[chex.Array]) -> chex.Array:
  """``sign(P g)`` (L-inf) or ``P g / ||P g||`` (L2), per example; 0 where ``P g = 0``."""
  g = project_onto_subspace(g, projector)
  if norm == 'linf':
    return jnp.sign(g)
  return g / _broadcast(jnp.maximum(_per_example_norm(g, 'l2'), 1e-12), g)


def _keep_best(best: _Best, candidate: _Best, force: chex.Array = False) -> _Best:
  """Per example, ``candidate`` where it is better (or ``force``), else ``best``.

  Better: a success over a non-success, then a strictly larger objective
  (success is ignored when it is None).
  """
  b_delta, b_obj, b_succ = best
  c_delta, c_obj, c_succ = candidate
  if b_succ is None:
    better = c_obj > b_obj
  else:
    better = (c_succ & ~b_succ) | ((c_succ == b_succ) & (c_obj > b_obj))
  better = better | force
  delta = jnp.where(_broadcast(better, c_delta), c_delta, b_delta)
  succ = None if b_succ is None else jnp.where(better, c_succ, b_succ)
  return delta, jnp.where(better, c_obj, b_obj), succ


def _feasible_map(x: chex.Array, eps: chex.Numeric, norm: str,
                  projector: Optional[chex.Array],
                  clip_range: Optional[Tuple[float, float]]) -> Fn:
  """``delta -> _clip_inputs(x, project(delta))``: the attacks' projection."""
  return lambda delta: _clip_inputs(x, project(delta, eps, norm, projector), clip_range,
                                    projector)


def _over_restarts(one_restart: Callable, init, key: chex.PRNGKey, restarts: int):
  """Folds ``one_restart(carry, (key_r, r == 0)) -> (carry, None)`` over the restarts.

  Restart ``r`` uses ``split(key, restarts)[r]``; a single restart is not
  wrapped in a scan (less to compile).
  """
  keys = jax.random.split(key, restarts)
  if restarts == 1:
    return one_restart(init, (keys[0], jnp.asarray(True)))[0]
  return jax.lax.scan(one_restart, init, (keys, jnp.arange(restarts) == 0))[0]


def pgd(objective_fn: Fn, x: chex.Array, key: chex.PRNGKey, *, eps: chex.Numeric,
        alpha: chex.Numeric, steps: int, norm: str = 'linf', restarts: int = 1,
        projector: Optional[chex.Array] = None,
        clip_range: Optional[Tuple[float, float]] = None,
        success_fn: Optional[Fn] = None, random_start: bool = True) -> chex.Array:
  """PGD (Madry et al. 2018): the best perturbation found per example.

  Each restart starts at a random feasible point (``_random_start``, or 0),
  then takes ``steps`` steps ``delta <- Proj(delta + alpha * dir(g))`` with
  ``dir(g) = sign(P g)`` (L-inf) or ``P g / ||P g||`` (L2), ``g`` the gradient
  of the objective at ``x + delta`` (``P`` the projector, or the identity),
  and ``Proj`` = ``project`` followed by ``_clip_inputs``. The objective of
  every iterate (the start point, every step, the final point) comes with its
  gradient (``jax.value_and_grad``; the final point costs one more forward
  pass), and ``success_fn`` is evaluated at every iterate only when given.

  The unconstrained L-inf attack clips per coordinate (the Euclidean
  projection onto the box): callers must pass ``projector=None`` for it, not
  the identity matrix, with which ``project`` would *scale* the whole
  perturbation into the box (the subspace rule) and the attack would be
  weaker.

  Args:
    objective_fn: ``x_adv [N, ...] -> [N]`` objective to maximize. Each
      entry must depend only on its own example (gradients are taken of the sum).
    x: ``[N, ...]`` clean inputs.
    key: PRNG key (random starts; restart ``r`` uses ``split(key, restarts)[r]``).
    eps: budget (>= 0). May be a traced scalar: changing it does not recompile.
    alpha: step size (may be traced).
    steps: number of ascent steps (>= 0, static).
    norm: ``'linf'`` or ``'l2'`` (static).
    restarts: number of independent runs (>= 1, static).
    projector: ``[D, D]`` orthogonal projector restricting ``delta`` to a
      subspace (``D = prod(x.shape[1:])``), or None (unconstrained).
    clip_range: ``(lo, hi)`` valid input range, or None. With a projector,
      ``delta`` is scaled down (not clipped) to fit, so it stays in the subspace.
    success_fn: ``x_adv [N, ...] -> [N] bool``; when given, a successful
      iterate is preferred over any unsuccessful one.
    random_start: start from a random feasible point (else from 0).

  Returns:
    ``delta`` with the shape of ``x``: per example the best iterate over all
    iterates of all restarts (a success over a non-success, then the larger
    objective; the earliest among equals). Feasible, and ``x + delta`` in
    ``clip_range`` when one is given.
  """
  _check_norm(norm)
  if steps < 0:
    raise ValueError(f'steps must be >= 0, got {steps}')
  if restarts < 1:
    raise ValueError(f'restarts must be >= 1, got {restarts}')
  obj_dtype = _check_attack_inputs(objective_fn, x, projector)
  n = x.shape[0]
  value_and_grad = _value_and_grad(objective_fn)
  feasible = _feasible_map(x, eps, norm, projector, clip_range)
  success = (lambda xa: None) if success_fn is None else success_fn
  no_success = None if success_fn is None else jnp.zeros((n,), bool)
  worst = lambda delta: (delta, jnp.full((n,), -jnp.inf, obj_dtype), no_success)

  def ascend(carry, _):
    delta, best = carry
    obj, g = value_and_grad(x + delta)
    best = _keep_best(best, (delta, obj, success(x + delta)))
    delta = feasible(delta + alpha * _ascent_direction(g, norm, projector))
    return (delta, best), None

  def one_restart(best, inputs):
    run_key, is_first = inputs
    delta = (_random_start(run_key, x, eps, norm, projector) if random_start
             else jnp.zeros_like(x))
    delta = _clip_inputs(x, delta, clip_range, projector)
    (delta, run_best), _ = jax.lax.scan(ascend, (delta, worst(delta)), None, length=steps)
    xa = x + delta
    run_best = _keep_best(run_best, (delta, objective_fn(xa), success(xa)))
    return _keep_best(best, run_best, force=is_first), None

  delta, _, _ = _over_restarts(one_restart, worst(jnp.zeros_like(x)), key, restarts)
  return delta


def apgd_checkpoints(steps: int) -> Tuple[int, ...]:
  """APGD's checkpoints ``w_j = ceil(p_j * steps)`` with ``0 < w_j < steps``, ascending.

  ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
  0.06)`` (Croce & Hein 2020), computed exactly in hundredths; repeated
  values are dropped, and ``w = steps`` is left out (a halving there could
  not change the result).
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  out = []
  prev, p = 0, 22
  while p < 100:
    w = -(-p * steps // 100)
    if 0 < w < steps and (not out or w > out[-1]):
      out.append(w)
    prev, p = p, p + max(p - prev - 3, 6)
  return tuple(out)


def apgd(objective_fn: Fn, x: chex.Array, key: chex.PRNGKey, *, eps: chex.Numeric,
         steps: int, norm: str = 'linf', restarts: int = 1,
         projector: Optional[chex.Array] = None,
         clip_range: Optional[Tuple[float, float]] = None,
         success_fn: Optional[Fn] = None, rho: float = 0.75, momentum: float = 0.75,
         return_trace: bool = False) -> Union[chex.Array, Tuple[chex.Array, chex.Array]]:
  """APGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum.

  Per restart, from a random feasible start ``x_0`` (``_random_start``, as in
  ``pgd``), with ``Proj`` = ``project`` then ``_clip_inputs`` and ``dir`` as
  in ``pgd`` (``sign(P g)`` or ``P g / ||P g||``):

  * ``z = Proj(x_k + eta * dir(g(x_k)))``;
    ``x_{k+1} = Proj(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with
    ``a = momentum`` (``a = 1``, no momentum, for the first step);
  * the step ``eta`` starts at ``2 eps`` (both norms) and is per example;
  * at the checkpoints ``w_j`` (``apgd_checkpoints(steps)``) ``eta`` is halved
    when (a) fewer than ``rho * (w_j - w_{j-1})`` of the steps since the last
    checkpoint increased the objective, or (b) ``eta`` was not halved at the
    last checkpoint and the best objective has not increased since then. When
    halving, the run goes on from its best point so far (highest objective)
    with its gradient, and the momentum term restarts at 0 (``x_{k-1} :=
    x_k``).

  Costs ``steps`` value-and-gradient evaluations and one forward pass per
  restart (plus ``success_fn`` at every iterate when it is given).

  Args:
    objective_fn: ``x_adv [N, ...] -> [N]`` objective to maximize, each entry
      depending only on its own example.
    x: ``[N, ...]`` clean inputs.
    key: PRNG key (restart ``r`` starts from ``split(key, restarts)[r]``).
    eps: budget (>= 0); may be a traced scalar (one compile for all budgets).
    steps: iterations per restart (>= 1, static).
    norm: ``'linf'`` or ``'l2'`` (static).
    restarts: independent runs from different random starts (>= 1, static).
    projector: ``[D, D]`` orthogonal projector restricting ``delta`` to a
      subspace, or None (unconstrained; pass None, not the identity, as in ``pgd``).
    clip_range: ``(lo, hi)`` valid input range, or None (as in ``pgd``).
    success_fn: ``x_adv [N, ...] -> [N] bool``; when given, a successful
      iterate is preferred over any unsuccessful one.
    rho: fraction of increasing steps below which the step is halved, in (0, 1].
    momentum: ``a`` above, the weight of the new step, in [0, 1]; the previous
      displacement gets ``1 - a`` (``momentum=1``: no momentum).
    return_trace: also return ``first_success`` (needs ``success_fn``).

  Returns:
    ``delta`` with the shape of ``x``: per example the best iterate over all
    iterations and restarts (a success over a non-success, then the larger
    objective); feasible, ``x + delta`` in ``clip_range``. With
    ``return_trace``, ``(delta, first_success)``, ``first_success`` ``[N]``
    int32: the smallest ``k`` (0 = the start point, ``1..steps``) such that
    some iterate among the first ``k`` steps of a restart succeeded,
    minimized over restarts; ``steps + 1`` if none did. The error of the best
    iterate after ``k`` iterations (of this run, with its step schedule) is
    ``first_success <= k``.
  """
  _check_norm(norm)
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  if restarts < 1:
    raise ValueError(f'restarts must be >= 1, got {restarts}')
  if not 0 < rho <= 1:
    raise ValueError(f'rho must be in (0, 1], got {rho!r}')
  if not 0 <= momentum <= 1:
    raise ValueError(f'momentum must be in [0, 1], got {momentum!r}')
  if return_trace and success_fn is None:
    raise ValueError('return_trace=True needs success_fn (first_success records successes)')
  obj_dtype = _check_attack_inputs(objective_fn, x, projector)
  n = x.shape[0]
  value_and_grad = _value_and_grad(objective_fn)
  feasible = _feasible_map(x, eps, norm, projector, clip_range)
  track = success_fn is not None
  never = jnp.full((n,), steps + 1, jnp.int32)

  # Static schedule, fed to the scan: is_checkpoint[k] and w_j - w_{j-1} at k = w_j.
  is_checkpoint = np.zeros(steps, bool)
  interval = np.zeros(steps, np.float32)
  last = 0
  for w in apgd_checkpoints(steps):
    is_checkpoint[w], interval[w] = True, w - last
    last = w
  schedule = (jnp.arange(steps, dtype=jnp.int32), jnp.asarray(is_checkpoint),
              jnp.asarray(interval))

  def iterate(carry, inputs):
    k, checkpoint, since = inputs
    c = dict(carry)
    delta = c['delta']
    xa = x + delta
    obj, g = value_and_grad(xa)
    start = k == 0
    c['increases'] = c['increases'] + ((~start) & (obj > c['obj'])).astype(jnp.int32)
    improved = start | (obj > c['max_obj'])
    c['max_delta'] = jnp.where(_broadcast(improved, delta), delta, c['max_delta'])
    c['max_grad'] = jnp.where(_broadcast(improved, g), g, c['max_grad'])
    c['max_obj'] = jnp.where(improved, obj, c['max_obj'])
    if track:
      succ = success_fn(xa)
      c['best'] = _keep_best(c['best'], (delta, obj, succ))
      c['first'] = jnp.minimum(c['first'], jnp.where(succ, k, steps + 1))
    # Checkpoint: maybe halve the step and go on from the best point.
    stalled = c['increases'] < rho * since
    no_progress = ~c['halved_last'] & ~(c['max_obj'] > c['max_obj_last'])
    halve = checkpoint & (~start) & (stalled | no_progress)
    reset = checkpoint | start
    c['increases'] = jnp.where(reset, 0, c['increases'])
    c['max_obj_last'] = jnp.where(reset, c['max_obj'], c['max_obj_last'])
    c['halved_last'] = jnp.where(reset, halve, c['halved_last'])
    c['eta'] = jnp.where(halve, c['eta'] / 2, c['eta'])
    back = _broadcast(halve, delta)
    delta = jnp.where(back, c['max_delta'], delta)
    g = jnp.where(back, c['max_grad'], g)
    prev = jnp.where(back, c['max_delta'], c['prev'])
    c['obj'] = jnp.where(halve, c['max_obj'], obj)
    # Momentum step.
    a = jnp.where(start, 1.0, momentum).astype(x.dtype)
    z = feasible(delta + _broadcast(c['eta'], delta) * _ascent_direction(g, norm, projector))
    c['delta'] = feasible(delta + a * (z - delta) + (1 - a) * (delta - prev))
    c['prev'] = delta
    return c, None

  def one_restart(carry, inputs):
    run_key, is_first = inputs
    best, first = carry
    delta = _clip_inputs(x, _random_start(run_key, x, eps, norm, projector), clip_range,
                         projector)
    zeros = jnp.zeros((n,), obj_dtype)
    init = dict(delta=delta, prev=delta, eta=jnp.full((n,), 2.0, x.dtype) * eps, obj=zeros,
                increases=jnp.zeros((n,), jnp.int32), max_delta=delta,
                max_grad=jnp.zeros_like(x), max_obj=zeros, max_obj_last=zeros,
                halved_last=jnp.zeros((n,), bool))
    if track:
      init['best'] = (delta, jnp.full((n,), -jnp.inf, obj_dtype), jnp.zeros((n,), bool))
      init['first'] = never
    c, _ = jax.lax.scan(iterate, init, schedule)
    # The final iterate: evaluated (no gradient needed).
    delta = c['delta']
    xa = x + delta
    obj = objective_fn(xa)
    if track:
      succ = success_fn(xa)
      run_best = _keep_best(c['best'], (delta, obj, succ))
      first = jnp.minimum(first, jnp.minimum(c['first'], jnp.where(succ, steps, steps + 1)))
    else:
      run_best = _keep_best((c['max_delta'], c['max_obj'], None), (delta, obj, None))
    return (_keep_best(best, run_best, force=is_first), first), None

  init_best = (jnp.zeros_like(x), jnp.full((n,), -jnp.inf, obj_dtype),
               jnp.zeros((n,), bool) if track else None)
  (delta, _, _), first = _over_restarts(one_restart, (init_best, never), key, restarts)
  if return_trace:
    return delta, first
  return delta


def robust_error(student_fn: Fn, teacher_fn: Fn, x: chex.Array, key: chex.PRNGKey, *,
                 eps: chex.Numeric, alpha: chex.Numeric, steps: int, label: str = 'oracle',
                 norm: str = 'l2', restarts: int = 1,
                 projector: Optional[chex.Array] = None, oracle_loss: str = 'kl',
                 clip_range: Optional[Tuple[float, float]] = None) -> chex.Array:
  """Per-example adversarial error of ``student_fn`` judged with ``teacher_fn``.

  Args:
    student_fn, teacher_fn: ``[N, ...] -> [N, C]`` logits.
    x: ``[N, ...]`` clean inputs.
    key: PRNG key.
    eps, alpha, steps, norm, restarts, projector, clip_range: as in ``pgd``.
    label: ``'oracle'`` (teacher's label at ``x + delta``) or ``'fixed'``
      (teacher's label at ``x``).
    oracle_loss: objective of the oracle attack, ``'kl'`` or ``'mse'``.

  Returns:
    ``[N]`` bool: the student is wrong at the attacked point.
  """
  if label not in LABELS:
    raise ValueError(f'label must be one of {LABELS}, got {label!r}')
  if label == 'oracle':
    objective = oracle_objective(student_fn, teacher_fn, oracle_loss)
    success = oracle_success(student_fn, teacher_fn)
  else:
    y = teacher_fn(x).argmax(-1)
    objective = fixed_label_objective(student_fn, y)
    success = fixed_label_success(student_fn, y)
  delta = pgd(objective, x, key, eps=eps, alpha=alpha, steps=steps, norm=norm,
              restarts=restarts, projector=projector, clip_range=clip_range,
              success_fn=success)
  return success(x + delta)


# ----------------------------------------------------------------------------
# Confidence-calibrated adversarial training (Stutz, Hein, Schiele 2020).
# ----------------------------------------------------------------------------


def ccat_lambda(delta: chex.Array, eps: chex.Numeric, norm: str, rho: float = 10.0):
  """``lam = (1 - min(1, ||delta|| / eps)) ** rho`` per example (``[N]``)."""
  _check_norm(norm)
  size = _per_example_norm(delta, norm)
  return (1.0 - jnp.minimum(1.0, size / jnp.maximum(eps, 1e-12))) ** rho


def ccat_target(labels: chex.Array, lam: chex.Array, num_classes: int) -> chex.Array:
  """``lam * onehot(y) + (1 - lam) / C``: ``[N, C]`` targets of adversarial points."""
  onehot = jax.nn.one_hot(labels, num_classes)
  return lam[:, None] * onehot + (1.0 - lam[:, None]) / num_classes


def confidence_threshold(clean_confidence: chex.Array, pass_rate: float = 0.99) -> chex.Array:
  """The largest threshold that at least ``pass_rate`` of the clean points meet.

  Points with ``confidence >= threshold`` are accepted. With ``n`` points
  sorted ascending ``c_1 <= ... <= c_n``, it is ``c_i`` with
  ``i = n - ceil(pass_rate * n) + 1`` (1-based).
  """
  chex.assert_rank(clean_confidence, 1)
  n = clean_confidence.shape[0]
  if not 0 < pass_rate <= 1:
    raise ValueError(f'pass_rate must be in (0, 1], got {pass_rate!r}')
  keep = min(max(math.ceil(pass_rate * n - 1e-9), 1), n)  # 1e-9: 0.99 * 100 -> 99
  return jnp.sort(clean_confidence)[n - keep]


def ccat_robust_error(student_fn: Fn, teacher_fn: Fn, x: chex.Array, key: chex.PRNGKey, *,
                      eps: chex.Numeric, alpha: chex.Numeric, steps: int, threshold: chex.Numeric,
                      norm: str = 'linf', restarts: int = 1,
                      projector: Optional[chex.Array] = None,
                      clip_range: Optional[Tuple[float, float]] = None) -> chex.Array:
  """CCAT evaluation: per-example error of an attacked point that is *not rejected*.

  The attack maximizes the student's largest confidence in a class other than
  the teacher's clean label. A point is rejected when the student's
  confidence (max softmax) at ``x + delta`` is below ``threshold`` (set with
  ``confidence_threshold`` on clean points); an accepted point is an error
  when the student's argmax differs from the teacher's at ``x + delta`` (the
  oracle).

  Returns:
    ``[N]`` bool: accepted and wrong.
  """
  y = teacher_fn(x).argmax(-1)

  def accepted_and_wrong(xa):
    s = student_fn(xa)
    conf = jax.nn.softmax(s).max(-1)
    return (conf >= threshold) & (s.argmax(-1) != teacher_fn(xa).argmax(-1))

  delta = pgd(ccat_objective(student_fn, y), x, key, eps=eps, alpha=alpha, steps=steps,
              norm=norm, restarts=restarts, projector=projector, clip_range=clip_range,
              success_fn=accepted_and_wrong)
  return accepted_and_wrong(x + delta)
