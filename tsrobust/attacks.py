"""Gradient attacks (PGD, APGD), projections and attack objectives.

``pgd`` (Madry et al. 2018) and ``apgd`` (Croce & Hein, ICML 2020) maximize a
per-example objective over perturbations ``delta`` in a norm ball (L-inf or
L2), optionally restricted to a linear subspace given by its orthogonal
projector (the data subspace S, or its complement S_perp), and optionally
keeping ``x + delta`` in an input range:

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

Objectives map ``x_adv [N, ...] -> [N]`` (to maximize) and are built from
``student_fn`` / ``teacher_fn`` (maps ``[N, ...] -> [N, C]`` logits):

* *fixed label* (the teacher's label at the clean point): cross-entropy
  (``fixed_label_objective``), margin (``margin_objective``), DLR
  (``dlr_objective``), and targeted margin / DLR toward classes picked by
  ``top_other_classes``;
* *oracle* (the teacher at the perturbed point): KL / MSE to the teacher
  (``oracle_objective``, differentiating through both networks), the
  oracle margin (``oracle_margin_objective``, through the student only) and
  the pair margin (``oracle_pair_objective``: the student on class ``b`` and
  the teacher on class ``a``, through both; pairs from ``oracle_pairs``);
* CCAT's largest non-label confidence (``ccat_objective``).

``robust_error`` / ``ccat_robust_error`` run PGD and return per-example
errors.
"""

import math
from typing import Callable, Optional, Tuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import numerics

NORMS = ('linf', 'l2')
ORACLE_LOSSES = ('kl', 'mse')
LABELS = ('oracle', 'fixed')

__all__ = ['NORMS', 'ORACLE_LOSSES', 'LABELS', 'project_onto_subspace', 'project', 'pgd',
           'apgd_checkpoints', 'apgd', 'top_values', 'cross_entropy', 'margin',
           'top_other_classes', 'fixed_label_objective', 'fixed_label_success',
           'margin_objective', 'dlr_objective', 'targeted_dlr_objective',
           'targeted_margin_objective', 'oracle_objective', 'oracle_margin_objective',
           'oracle_targeted_margin_objective', 'oracle_pairs', 'oracle_pair_objective',
           'oracle_success', 'robust_error', 'ccat_objective', 'ccat_lambda', 'ccat_target',
           'confidence_threshold', 'ccat_robust_error']

Fn = Callable[[chex.Array], chex.Array]


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


# ----------------------------------------------------------------------------
# Objectives and success criteria.
# ----------------------------------------------------------------------------


def _check_logits(logits: chex.Array, labels: chex.Array, min_classes: int, what: str) -> None:
  """``logits [N, C]`` with ``C >= min_classes`` and ``labels [N]`` (checked at trace time)."""
  chex.assert_rank(logits, 2)
  chex.assert_shape(labels, (logits.shape[0],))
  if logits.shape[-1] < min_classes:
    raise ValueError(f'{what} needs logits with at least {min_classes} classes, '
                     f'got shape {logits.shape}')


def _other_max(logits: chex.Array, labels: chex.Array) -> chex.Array:
  """``max_{k != y} z_k`` ``[N]``."""
  is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jnp.where(is_label, -jnp.inf, logits).max(-1)


def top_values(logits: chex.Array, k: int) -> chex.Array:
  """``[N, k]`` the ``k`` largest logits per row, descending (with repeats, as ``lax.top_k``).

  Equal to ``jax.lax.top_k(logits, k)[0]``, computed by ``k`` max-reductions
  (each masks one position of the previous maximum): for the few values the
  attack objectives need this is ~20-50x faster than ``top_k`` on XLA:CPU,
  which runs inside every attack iteration.
  """
  if not 1 <= k <= logits.shape[-1]:
    raise ValueError(f'k must be in [1, {logits.shape[-1]}], got {k}')
  classes = jnp.arange(logits.shape[-1])
  values, z = [], logits
  for i in range(k):
    values.append(z.max(-1))
    if i + 1 < k:
      z = jnp.where(classes == z.argmax(-1)[..., None], -jnp.inf, z)
  return jnp.stack(values, -1)


def _at(logits: chex.Array, labels: chex.Array) -> chex.Array:
  """``z_y`` ``[N]``."""
  return jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def cross_entropy(logits: chex.Array, labels: chex.Array) -> chex.Array:
  """``[N]`` cross-entropy ``-log softmax(z)_y`` of ``[N, C]`` logits against int labels ``[N]``."""
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def margin(logits: chex.Array, labels: chex.Array) -> chex.Array:
  """``max_{k != y} z_k - z_y`` ``[N]`` of ``[N, C]`` logits (``C >= 2``) and int labels ``[N]``.

  Positive exactly when the argmax is not the label (ties aside).
  """
  _check_logits(logits, labels, 2, 'margin')
  return _other_max(logits, labels) - _at(logits, labels)


def top_other_classes(logits: chex.Array, labels: chex.Array, k: int) -> chex.Array:
  """The ``k`` classes other than the label with the largest logits, descending.

  Targets for the targeted attacks (AutoAttack picks them from the clean
  logits). Ties go to the lower class index.

  Args:
    logits: ``[N, C]``.
    labels: ``[N]`` int.
    k: how many, ``1 <= k <= C - 1`` (static).

  Returns:
    ``[N, k]`` int32.
  """
  _check_logits(logits, labels, 2, 'top_other_classes')
  if not 1 <= k <= logits.shape[-1] - 1:
    raise ValueError(f'k must be in [1, C - 1] = [1, {logits.shape[-1] - 1}], got {k}')
  is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.int32)
  # Primary key (last): not the label first; then the larger logit first.
  order = jnp.lexsort((-logits, is_label), axis=-1)
  return order[:, :k].astype(jnp.int32)


def fixed_label_objective(student_fn: Fn, labels: chex.Array) -> Fn:
  """``cross_entropy(student(x_adv), y)`` ``[N]``, labels ``y`` fixed at the clean points."""
  return lambda xa: cross_entropy(student_fn(xa), labels)


def fixed_label_success(student_fn: Fn, labels: chex.Array) -> Fn:
  """``argmax student(x_adv) != y`` ``[N]`` bool."""
  return lambda xa: student_fn(xa).argmax(-1) != labels


def margin_objective(student_fn: Fn, labels: chex.Array) -> Fn:
  """``max_{k != y} s_k - s_y`` ``[N]`` with ``s = student(x_adv)`` (``margin``)."""
  return lambda xa: margin(student_fn(xa), labels)


def dlr_objective(student_fn: Fn, labels: chex.Array) -> Fn:
  """The DLR loss of Croce & Hein (2020), ``[N]``, invariant to shifting and scaling the logits.

  ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``z =
  student(x_adv)`` and ``z_pi1 >= z_pi2 >= ...`` the logits sorted
  descending. Needs at least 3 classes (``ValueError`` when called otherwise).
  """
  def objective(xa):
    z = student_fn(xa)
    _check_logits(z, labels, 3, 'dlr_objective')
    top = top_values(z, 3)
    return (_other_max(z, labels) - _at(z, labels)) / (top[:, 0] - top[:, 2] + 1e-12)
  return objective


def targeted_dlr_objective(student_fn: Fn, labels: chex.Array, targets: chex.Array) -> Fn:
  """Targeted DLR loss (Croce & Hein 2020) toward ``targets`` ``[N]``, ``[N]``.

  ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` with ``z =
  student(x_adv)``, ``t`` the target and ``pi`` sorting descending. Needs at
  least 4 classes (``ValueError`` when called otherwise).
  """
  def objective(xa):
    z = student_fn(xa)
    _check_logits(z, labels, 4, 'targeted_dlr_objective')
    chex.assert_equal_shape([labels, targets])
    top = top_values(z, 4)
    return ((_at(z, targets) - _at(z, labels))
            / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12))
  return objective


def targeted_margin_objective(student_fn: Fn, labels: chex.Array, targets: chex.Array) -> Fn:
  """``s_t - s_y`` ``[N]`` with ``s = student(x_adv)``, ``t = targets`` ``[N]``, ``y = labels``."""
  def objective(xa):
    s = student_fn(xa)
    _check_logits(s, labels, 2, 'targeted_margin_objective')
    chex.assert_equal_shape([labels, targets])
    return _at(s, targets) - _at(s, labels)
  return objective


def oracle_objective(student_fn: Fn, teacher_fn: Fn, loss: str = 'kl') -> Fn:
  """Disagreement between student and teacher, both at the perturbed point, ``[N]``.

  ``'kl'``: ``KL(softmax(teacher) || softmax(student))``; ``'mse'``:
  ``sum_c (student_c - teacher_c)^2``. Gradients flow through both networks.
  """
  if loss not in ORACLE_LOSSES:
    raise ValueError(f'oracle loss must be one of {ORACLE_LOSSES}, got {loss!r}')

  def objective(xa):
    s, t = student_fn(xa), teacher_fn(xa)
    if loss == 'mse':
      return ((s - t) ** 2).sum(-1)
    logp_t = jax.nn.log_softmax(t)
    return (jnp.exp(logp_t) * (logp_t - jax.nn.log_softmax(s))).sum(-1)
  return objective


def _teacher_label(teacher_fn: Fn, xa: chex.Array) -> chex.Array:
  """``argmax teacher(x_adv)`` ``[N]``, carrying no gradient."""
  return jax.lax.stop_gradient(teacher_fn(xa)).argmax(-1)


def oracle_margin_objective(student_fn: Fn, teacher_fn: Fn) -> Fn:
  """Oracle margin ``max_{k != t} s_k - s_t`` ``[N]``, ``t = argmax teacher(x_adv)``.

  ``s = student(x_adv)``; the teacher's label is taken at the perturbed point
  and carries no gradient, which flows through the student only. Positive
  exactly when the student disagrees with the teacher there (ties aside).
  """
  return lambda xa: margin(student_fn(xa), _teacher_label(teacher_fn, xa))


def oracle_targeted_margin_objective(student_fn: Fn, teacher_fn: Fn,
                                     targets: chex.Array) -> Fn:
  """``s_target - s_t`` ``[N]``, ``s = student(x_adv)``, ``t = argmax teacher(x_adv)``.

  The teacher's label carries no gradient; it flows through the student only.
  """
  def objective(xa):
    s = student_fn(xa)
    t = _teacher_label(teacher_fn, xa)
    _check_logits(s, t, 2, 'oracle_targeted_margin_objective')
    chex.assert_equal_shape([t, targets])
    return _at(s, targets) - _at(s, t)
  return objective


def oracle_pairs(teacher_logits: chex.Array, k: int) -> Tuple[chex.Array, chex.Array]:
  """``(teacher_class, student_class)`` ``[2k, N]`` each: the pairs ``oracle_pair_objective`` tries.

  With ``y`` the teacher's argmax and ``c_1..c_k`` its next ``k`` classes
  (``top_other_classes``), all at the clean point: ``(y, c_i)`` (the teacher
  keeps ``y``, the student moves to ``c_i``) for ``i = 1..k``, then ``(c_i, y)``
  (the teacher moves to ``c_i``, the student keeps ``y``). Near a boundary of
  the teacher between ``y`` and ``c_i``, a student that approximates the teacher
  disagrees with it on one side or the other, depending on the sign of its error.

  >>> t = jnp.array([[0.0, 3.0, 1.0, 2.0]])
  >>> a, b = oracle_pairs(t, 2)
  >>> a[:, 0].tolist(), b[:, 0].tolist()
  ([1, 1, 3, 2], [3, 2, 1, 1])
  """
  chex.assert_rank(teacher_logits, 2)
  y = teacher_logits.argmax(-1).astype(jnp.int32)
  others = top_other_classes(teacher_logits, y, k).T  # [k, N]
  ys = jnp.broadcast_to(y, others.shape)
  return jnp.concatenate([ys, others]), jnp.concatenate([others, ys])


def oracle_pair_objective(student_fn: Fn, teacher_fn: Fn, teacher_class: chex.Array,
                          student_class: chex.Array, *, tolerance: float = 0.0,
                          smoothing: chex.Array = 0.0) -> Fn:
  """Disagreement on one pair of classes ``(a, b)``, through both networks, ``[N]``.

  With ``s = student(x_adv)``, ``t = teacher(x_adv)``, ``a = teacher_class``,
  ``b = student_class`` (``[N]`` int, ``a != b``)::

    f = s_b - max_{j != b} s_j                  (the student's argmax is b)
    g = t_a - max_{j != a} t_j - tolerance      (the teacher's is a, by >= tolerance)

  and the objective is ``min(f, g)``, or with ``smoothing`` ``tau > 0`` (``[N]``
  or a scalar, in logit units) the soft minimum ``-tau log(exp(-f / tau) +
  exp(-g / tau))``. ``min(f, g) > 0`` implies an oracle error (the argmaxes
  differ where the teacher's top-2 gap is >= ``tolerance``). Unlike
  ``oracle_margin_objective``, whose label ``t`` jumps when the teacher's
  argmax changes (where a student that follows the teacher changes too), the
  pair is fixed, so the objective is continuous across the teacher's
  boundaries; and its gradient flows through the teacher as well, so ascent can
  move *along* a boundary of the teacher towards where the student's error is
  largest. The soft minimum blends the two gradients where ``f ~ g``, the
  ridge along which the two margins trade off (a plain minimum zig-zags there).
  """
  def objective(xa):
    s, t = student_fn(xa), teacher_fn(xa)
    _check_logits(s, student_class, 2, 'oracle_pair_objective')
    chex.assert_equal_shape([teacher_class, student_class])
    f = _at(s, student_class) - _other_max(s, student_class)
    g = _at(t, teacher_class) - _other_max(t, teacher_class) - tolerance
    tau = jnp.broadcast_to(jnp.asarray(smoothing, f.dtype), f.shape)
    soft = -tau * jnp.logaddexp(-f / jnp.maximum(tau, 1e-12), -g / jnp.maximum(tau, 1e-12))
    return jnp.where(tau > 0, soft, jnp.minimum(f, g))
  return objective


def oracle_success(student_fn: Fn, teacher_fn: Fn) -> Fn:
  """The student's argmax differs from the teacher's, both at the perturbed point."""
  return lambda xa: student_fn(xa).argmax(-1) != teacher_fn(xa).argmax(-1)


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


def ccat_objective(student_fn: Fn, labels: chex.Array) -> Fn:
  """CCAT's attack objective: the largest non-label confidence ``max_{k != y} softmax_k``."""
  def objective(xa):
    probs = jax.nn.softmax(student_fn(xa))
    return jnp.where(jax.nn.one_hot(labels, probs.shape[-1], dtype=bool), -jnp.inf,
                     probs).max(-1)
  return objective


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
