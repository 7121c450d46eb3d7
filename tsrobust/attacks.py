"""Projected gradient descent attacks (Madry et al. 2018) with an oracle.

``pgd`` maximizes a per-example objective over perturbations ``delta`` in a
norm ball (L-inf or L2), optionally restricted to a linear subspace given by
its orthogonal projector (the data subspace S, or its complement S_perp):

* random start inside the feasible set;
* ``steps`` ascent steps of size ``alpha``: ``sign(g)`` for L-inf,
  ``g / ||g||`` for L2, where ``g`` is the gradient (projected onto the
  subspace first when one is given);
* projection onto the feasible set after every step (see ``project``);
* optional clipping of ``x + delta`` to an input range, applied last;
* ``restarts`` independent runs, keeping per example the worst case: a
  successful one (when ``success_fn`` is given) over an unsuccessful one,
  then the larger objective.

Objectives are built from ``student_fn`` / ``teacher_fn`` (maps
``[N, ...] -> [N, C]`` logits): *fixed* (the teacher's label at the clean
point) and *oracle* (the teacher evaluated at the perturbed point,
differentiating through both networks).
"""

import math
from typing import Callable, Optional, Tuple

import chex
import jax
import jax.numpy as jnp

NORMS = ('linf', 'l2')
ORACLE_LOSSES = ('kl', 'mse')
LABELS = ('oracle', 'fixed')

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
  return (_flat(v) @ projector).reshape(v.shape)


def project(delta: chex.Array, eps: chex.Numeric, norm: str,
            projector: Optional[chex.Array] = None) -> chex.Array:
  """Maps ``delta`` into ``{||delta|| <= eps} (intersected with the subspace of projector)``.

  * no subspace: the Euclidean projection (L-inf: clip; L2: rescale);
  * L2 in a subspace: project onto the subspace, then rescale - exact, since
    the feasible set is a ball inside the subspace;
  * L-inf in a subspace: project onto the subspace, then scale down until it
    fits the box. The result is feasible but *not* the Euclidean projection
    onto the (subspace x box) intersection.

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
  """A random feasible perturbation.

  L-inf: uniform in the box, then ``project``. L2: a uniformly random point of
  the ball of the feasible subspace (dimension ``trace(P)``, or D).
  """
  k_dir, k_rad = jax.random.split(key)
  if norm == 'linf':
    return project(jax.random.uniform(k_dir, x.shape, x.dtype, -eps, eps), eps, norm,
                   projector)
  direction = project_onto_subspace(jax.random.normal(k_dir, x.shape, x.dtype), projector)
  direction = direction / _broadcast(jnp.maximum(_per_example_norm(direction, 'l2'), 1e-12),
                                     direction)
  dim = _flat(x).shape[1] if projector is None else jnp.trace(projector)
  radius = eps * jax.random.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / jnp.maximum(dim, 1))
  return direction * _broadcast(radius, direction)


def _clip_inputs(x: chex.Array, delta: chex.Array,
                 clip_range: Optional[Tuple[float, float]],
                 projector: Optional[chex.Array] = None) -> chex.Array:
  """Keeps ``x + delta`` in ``clip_range``.

  Without a subspace, ``x + delta`` is clipped coordinate-wise. With one,
  clipping would leave the subspace, so ``delta`` is instead scaled down along
  its own direction until ``x + delta`` fits (it stays in the subspace and in
  the ball; ``x`` itself is assumed to be in range).
  """
  if clip_range is None:
    return delta
  lo, hi = clip_range
  if projector is None:
    return jnp.clip(x + delta, lo, hi) - x
  safe = jnp.where(delta == 0, 1.0, delta)
  room = jnp.where(delta > 0, (hi - x) / safe, jnp.where(delta < 0, (lo - x) / safe, jnp.inf))
  factor = jnp.clip(_flat(room).min(-1), 0.0, 1.0)
  return delta * _broadcast(factor, delta)


def pgd(objective_fn: Fn, x: chex.Array, key: chex.PRNGKey, *, eps: chex.Numeric,
        alpha: chex.Numeric, steps: int, norm: str = 'linf', restarts: int = 1,
        projector: Optional[chex.Array] = None,
        clip_range: Optional[Tuple[float, float]] = None,
        success_fn: Optional[Fn] = None, random_start: bool = True) -> chex.Array:
  """PGD: the worst-case perturbation found per example.

  Args:
    objective_fn: ``x_adv [N, ...] -> [N]`` objective to maximize. Each
      entry must depend only on its own example (gradients are taken of the sum).
    x: ``[N, ...]`` clean inputs.
    key: PRNG key (random starts).
    eps: budget (>= 0). May be a traced scalar: changing it does not recompile.
    alpha: step size.
    steps: number of ascent steps (static).
    norm: ``'linf'`` or ``'l2'`` (static).
    restarts: number of independent runs (>= 1, static).
    projector: ``[D, D]`` projector restricting ``delta`` to a subspace, or None.
    clip_range: ``(lo, hi)`` valid input range, or None. With a projector,
      ``delta`` is scaled down (not clipped) to fit, so it stays in the subspace.
    success_fn: ``x_adv -> [N] bool``; when given, restarts prefer successes.
    random_start: start from a random feasible point (else from 0).

  Returns:
    ``delta`` with the shape of ``x``: feasible, and ``x + delta`` in
    ``clip_range`` when one is given.
  """
  _check_norm(norm)
  if steps < 0:
    raise ValueError(f'steps must be >= 0, got {steps}')
  if restarts < 1:
    raise ValueError(f'restarts must be >= 1, got {restarts}')
  grad_fn = jax.grad(lambda xa: objective_fn(xa).sum())

  def ascend(delta, _):
    g = project_onto_subspace(grad_fn(x + delta), projector)
    if norm == 'linf':
      step = jnp.sign(g)
    else:
      step = g / _broadcast(jnp.maximum(_per_example_norm(g, 'l2'), 1e-12), g)
    delta = project(delta + alpha * step, eps, norm, projector)
    return _clip_inputs(x, delta, clip_range, projector), None

  def one_run(run_key):
    delta = (_random_start(run_key, x, eps, norm, projector) if random_start
             else jnp.zeros_like(x))
    delta = _clip_inputs(x, delta, clip_range, projector)
    delta, _ = jax.lax.scan(ascend, delta, None, length=steps)
    xa = x + delta
    succ = (success_fn(xa) if success_fn is not None
            else jnp.zeros((x.shape[0],), bool))
    return delta, objective_fn(xa), succ

  def keep_worst(carry, run_key):
    best_delta, best_obj, best_succ = carry
    delta, obj, succ = one_run(run_key)
    better = (succ & ~best_succ) | ((succ == best_succ) & (obj > best_obj))
    pick = _broadcast(better, delta)
    return (jnp.where(pick, delta, best_delta), jnp.where(better, obj, best_obj),
            best_succ | succ), None

  keys = jax.random.split(key, restarts)
  first = one_run(keys[0])
  (delta, _, _), _ = jax.lax.scan(keep_worst, first, keys[1:])
  return delta


# ----------------------------------------------------------------------------
# Objectives and success criteria.
# ----------------------------------------------------------------------------


def cross_entropy(logits: chex.Array, labels: chex.Array) -> chex.Array:
  """``[N]`` cross-entropy of ``[N, C]`` logits against int labels ``[N]``."""
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def fixed_label_objective(student_fn: Fn, labels: chex.Array) -> Fn:
  """Cross-entropy of the student against labels fixed at the clean points."""
  return lambda xa: cross_entropy(student_fn(xa), labels)


def fixed_label_success(student_fn: Fn, labels: chex.Array) -> Fn:
  """The student's argmax differs from the fixed label."""
  return lambda xa: student_fn(xa).argmax(-1) != labels


def oracle_objective(student_fn: Fn, teacher_fn: Fn, loss: str = 'kl') -> Fn:
  """Disagreement between student and teacher, both at the perturbed point.

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
