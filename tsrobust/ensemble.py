"""The attack ensemble: its attacks, label kinds and presets, and one attack on one student.

The ensemble (``ATTACKS``), per label kind ``oracle`` (student vs the teacher
at ``x + delta``) / ``fixed`` or ``true`` (a label fixed at ``x``) / ``ccat``
(accepted and wrong):

* ``pgd``: PGD on KL(teacher || student) (or MSE) / on cross-entropy / on
  CCAT's objective;
* ``apgd``: APGD on the oracle margin ``max_{k!=t} s_k - s_t`` / on
  cross-entropy / on the oracle margin;
* ``apgd_t``: APGD on the oracle targeted margin ``s_k - s_t``, ``k`` over the
  top ``targets`` other classes / on the targeted DLR loss (the targeted
  margin with < 4 classes) / as ``oracle``;
* ``square``: Square (gradient-free) on the oracle margin / on the margin /
  on CCAT's objective;
* ``apgd_pair`` (oracle labels only): APGD on the pair margin
  (``attacks.oracle_pair_objective``: the teacher on class ``a`` by at least
  the tolerance, the student on class ``b``, a soft minimum of the two margins,
  differentiated through both networks), once per pair ``(y, c)`` and ``(c,
  y)`` of the teacher's clean label ``y`` and its next ``pair_targets``
  classes ``c``; it follows the surrogate networks' gradients when the
  ``evaluate.Evaluator`` has them (``models.surrogate``).

Why ``apgd_pair``: for a student trained to follow the teacher (adversarial
training with oracle labels), the points where they disagree are thin slivers
along the teacher's decision boundaries. The oracle margin's label jumps when
the teacher's argmax changes, which happens as the student's does; the pair
objective is continuous there and its gradient, through both networks, moves
along the boundary towards where the student's error is largest. The exact
gradient of a ReLU unit that is off is 0, so the units that turn on only away
from the training data are invisible to it; the surrogate gradient sees them.
On the robustness study's adversarially trained students this finds several
times the errors the other attacks find (``docs/evaluation.md``, "Why the pair
attack"; ``docs/robustness.md``).

``t`` is the teacher's argmax at the perturbed point. Target classes of
``apgd_t`` are the student's largest clean logits other than the label at
the clean point (as AutoAttack picks them). ``fixed`` labels are the
teacher's argmax at the clean point; ``true`` labels are given (real data).
``ccat`` success is CCAT's criterion (Stutz et al. 2020): the student's
confidence at ``x + delta`` passes the threshold and its argmax differs from
the teacher's there.

Presets (``preset``): ``fast`` (tests), ``standard`` (the binaries'
defaults), ``strong`` (close to AutoAttack's standard version: APGD 100
iterations, 9 targets, Square 5000 queries; with ``apgd_pair``), ``reference``
(well beyond ``strong``: restarts, Square 10,000 queries, ``apgd_pair`` 500
iterations x 18 pairs x 2 restarts, 30x ``standard``'s; for convergence checks, not for
routine runs).
``AttackConfig.scaled(2)`` doubles every iteration count, Square's queries and the
targets of APGD-T and of the pair attack (up to ``C - 1``): a run's convergence check
(``outcomes.doubling``).

``attack_one`` runs one attack of the ensemble, for one label kind and one budget, on
one student; ``evaluate.Evaluator`` runs them all on a batch of students, and
``outcomes`` takes the worst case per example over their results. ``evaluate``
re-exports this module's names.
"""

import dataclasses
import functools
from typing import Callable, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import attacks
from tsrobust import square as square_lib

__all__ = ['ATTACKS', 'GRADIENT_ATTACKS', 'ORACLE_ONLY_ATTACKS', 'LABEL_KINDS', 'WHERES',
           'STRENGTHS', 'PRESETS', 'AttackConfig', 'preset', 'teacher_gap', 'oracle_wrong',
           'attack_one']

# (apgd_pair last: each attack's random keys derive from its index here.)
ATTACKS = ('pgd', 'apgd', 'apgd_t', 'square', 'apgd_pair')
GRADIENT_ATTACKS = ('pgd', 'apgd', 'apgd_t', 'apgd_pair')
ORACLE_ONLY_ATTACKS = ('apgd_pair',)  # attacks that only the oracle label kind runs
LABEL_KINDS = ('oracle', 'fixed', 'true', 'ccat')
WHERES = ('in', 'off', 'full')
STRENGTHS = ('fast', 'standard', 'strong', 'reference')


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """Iterations of each attack of the ensemble (0 iterations / queries: attack not run).

  Attributes:
    pgd_steps, pgd_restarts: PGD with step ``pgd_step_factor * eps / pgd_steps``.
    apgd_steps, apgd_restarts: APGD (untargeted).
    apgd_t_steps, targets: APGD-T, run once per target class (``targets``
      classes, at most ``C - 1``).
    square_queries, square_p_init: Square attack.
    pair_steps, pair_targets, pair_restarts: APGD on the oracle pair margin
      (``attacks.oracle_pair_objective``; oracle labels only), run once per pair
      of ``attacks.oracle_pairs`` (``2 * pair_targets`` pairs, at most ``2 (C - 1)``).
    pair_smoothing: its soft minimum's temperature, relative to each example's
      logit scale (the standard deviation over classes of the teacher's clean
      logits); 0: the plain minimum.
    pair_momentum: its APGD's ``alpha``, the weight of the new step against the
      previous displacement (Croce & Hein use 0.75; less is heavier momentum, which
      follows the teacher's boundaries further: docs/evaluation.md).
    oracle_loss: PGD's oracle objective, ``'kl'`` or ``'mse'``.
    oracle_tolerance: an oracle disagreement counts only where the teacher's
      own top-2 logit gap at that point is ``>= oracle_tolerance`` (0: any
      disagreement). A student that approximates the teacher up to a logit
      error ``e`` disagrees with it in slivers of width ~``e`` around every
      teacher decision boundary, and a strong attack finds them within any
      budget that reaches a boundary; the tolerance counts only
      disagreements where the oracle is unambiguous. With a tolerance the
      oracle-margin objectives become ``min(margin, teacher gap - tolerance)``.
  """
  pgd_steps: int = 20
  pgd_restarts: int = 1
  pgd_step_factor: float = 2.5
  apgd_steps: int = 30
  apgd_restarts: int = 1
  apgd_t_steps: int = 15
  targets: int = 3
  square_queries: int = 100
  square_p_init: float = 0.8
  pair_steps: int = 0
  pair_targets: int = 3
  pair_restarts: int = 1
  pair_smoothing: float = 0.5
  pair_momentum: float = 0.4
  oracle_loss: str = 'kl'
  oracle_tolerance: float = 0.0

  def __post_init__(self):
    for name in ('pgd_steps', 'apgd_steps', 'apgd_t_steps', 'targets', 'square_queries',
                 'pair_steps', 'pair_targets'):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f'{name} must be an integer >= 0, got {v!r}')
    for name in ('pgd_restarts', 'apgd_restarts', 'pair_restarts'):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f'{name} must be an integer >= 1, got {v!r}')
    if not self.pgd_step_factor > 0:
      raise ValueError(f'pgd_step_factor must be > 0, got {self.pgd_step_factor!r}')
    if not (isinstance(self.pair_smoothing, (int, float)) and self.pair_smoothing >= 0):
      raise ValueError(f'pair_smoothing must be >= 0, got {self.pair_smoothing!r}')
    if not (isinstance(self.pair_momentum, (int, float)) and 0 < self.pair_momentum <= 1):
      raise ValueError(f'pair_momentum must be in (0, 1], got {self.pair_momentum!r}')
    if not 0 < self.square_p_init <= 1:
      raise ValueError(f'square_p_init must be in (0, 1], got {self.square_p_init!r}')
    if not (isinstance(self.oracle_tolerance, (int, float)) and self.oracle_tolerance >= 0):
      raise ValueError(f'oracle_tolerance must be >= 0, got {self.oracle_tolerance!r}')
    if self.oracle_loss not in attacks.ORACLE_LOSSES:
      raise ValueError(f'oracle_loss must be one of {attacks.ORACLE_LOSSES}, '
                       f'got {self.oracle_loss!r}')
    if not self.attacks:
      raise ValueError('at least one attack must run (all iteration counts are 0)')

  @property
  def attacks(self) -> Tuple[str, ...]:
    """The attacks that run, in ``ATTACKS`` order."""
    on = {'pgd': self.pgd_steps > 0, 'apgd': self.apgd_steps > 0,
          'apgd_t': self.apgd_t_steps > 0 and self.targets > 0,
          'square': self.square_queries > 0,
          'apgd_pair': self.pair_steps > 0 and self.pair_targets > 0}
    return tuple(a for a in ATTACKS if on[a])

  def attacks_for(self, label: str) -> Tuple[str, ...]:
    """The attacks that run for label kind ``label`` (``apgd_pair``: oracle labels only)."""
    return tuple(a for a in self.attacks if label == 'oracle' or a not in ORACLE_ONLY_ATTACKS)

  def scaled(self, factor: int) -> 'AttackConfig':
    """This ensemble with every attack's iterations, Square's queries, and the targets of
    APGD-T and of ``apgd_pair`` times ``factor``.

    Targets beyond ``C - 1`` classes are dropped where the attacks run (``attack_one``), so on
    10 classes ``standard``'s 3 targets become 6 at 2x and 9 (every other class) from 4x on.
    Restarts are unchanged: the convergence check (``outcomes.doubling``) compares an ensemble
    with ``scaled(2)`` of it run from other random starts, and an escalated group's errors
    are the union over its levels, each from its own starts. Why the targets too: on
    adversarially trained students the pair attack's misses are as much in the pairs it does
    not try as in its iterations (docs/evaluation.md, "the pair attack's ladder").

    >>> c = preset('standard').scaled(4)
    >>> (c.apgd_steps, c.targets, c.pair_steps, c.pair_targets, c.pair_restarts)
    (120, 12, 400, 12, 1)
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
      raise ValueError(f'factor must be an integer >= 1, got {factor!r}')
    return dataclasses.replace(
        self, pgd_steps=self.pgd_steps * factor, apgd_steps=self.apgd_steps * factor,
        apgd_t_steps=self.apgd_t_steps * factor, square_queries=self.square_queries * factor,
        pair_steps=self.pair_steps * factor, targets=self.targets * factor,
        pair_targets=self.pair_targets * factor)

  def with_budget_of(self, strength: str) -> 'AttackConfig':
    """This ensemble's criteria (oracle tolerance and loss, PGD's step factor, the pair
    attack's smoothing and momentum, Square's ``p_init``) with the iterations, restarts, targets and
    queries of preset ``strength``: e.g. the reference check's ensemble.

    >>> cfg = preset('standard', oracle_tolerance=0.05).with_budget_of('reference')
    >>> (cfg.oracle_tolerance, cfg.square_queries)
    (0.05, 10000)
    """
    if strength not in PRESETS:
      raise ValueError(f'strength must be one of {STRENGTHS}, got {strength!r}')
    keep = ('pgd_step_factor', 'square_p_init', 'pair_smoothing', 'pair_momentum',
            'oracle_loss', 'oracle_tolerance')
    return dataclasses.replace(PRESETS[strength], **{k: getattr(self, k) for k in keep})

  def convergence_points(self) -> Tuple[int, ...]:
    """APGD iteration counts at which its error is reported (1/4, 1/2, all)."""
    n = self.apgd_steps
    return tuple(sorted({max(1, n // 4), max(1, n // 2), n})) if n else ()


PRESETS = {
    'fast': AttackConfig(pgd_steps=5, apgd_steps=10, apgd_t_steps=5, targets=1,
                         square_queries=30, pair_steps=10, pair_targets=1),
    'standard': AttackConfig(pair_steps=100),
    'strong': AttackConfig(pgd_steps=100, apgd_steps=100, apgd_t_steps=100, targets=9,
                           square_queries=5000, pair_steps=200, pair_targets=9),
    'reference': AttackConfig(pgd_steps=100, pgd_restarts=2, apgd_steps=100, apgd_restarts=2,
                              apgd_t_steps=100, targets=9, square_queries=10000,
                              pair_steps=500, pair_targets=9, pair_restarts=2),
}


def preset(strength: str, **overrides) -> AttackConfig:
  """The ``AttackConfig`` of a strength preset, with fields overridden.

  An override of None keeps the preset's value, so a config section holding every
  field (None where it keeps the preset's) is passed whole: ``preset(**config.attack)``.

  >>> preset('fast', apgd_steps=50, square_queries=None).apgd_steps
  50
  >>> preset('fast', square_queries=None).square_queries == preset('fast').square_queries
  True

  Raises:
    ValueError: unknown strength or field, or an invalid value.
  """
  if strength not in PRESETS:
    raise ValueError(f'attack strength must be one of {STRENGTHS}, got {strength!r}')
  fields = {f.name for f in dataclasses.fields(AttackConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown attack config fields {unknown}; allowed: {sorted(fields)}')
  return dataclasses.replace(PRESETS[strength],
                             **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------
# One student, one attack, one label kind, one budget.
# ----------------------------------------------------------------------------


def teacher_gap(teacher_logits: chex.Array) -> chex.Array:
  """``[N]`` the teacher's top-1 minus top-2 logit: how unambiguous the oracle is."""
  top2 = attacks.top_values(teacher_logits, 2)
  return top2[:, 0] - top2[:, 1]


def oracle_wrong(student_logits: chex.Array, teacher_logits: chex.Array,
                 tolerance: float = 0.0) -> chex.Array:
  """``[N]`` bool: the argmaxes differ where the teacher's gap is ``>= tolerance``."""
  wrong = student_logits.argmax(-1) != teacher_logits.argmax(-1)
  if tolerance > 0:
    wrong = wrong & (teacher_gap(teacher_logits) >= tolerance)
  return wrong


def _ccat_criteria(s_fn, t_fn, threshold, tolerance):
  """``(accepted, accepted_and_wrong)``: ``x_adv -> [N] bool`` each."""
  def accepted(xa):
    return jax.nn.softmax(s_fn(xa)).max(-1) >= threshold

  def accepted_and_wrong(xa):
    s = s_fn(xa)
    return (jax.nn.softmax(s).max(-1) >= threshold) & oracle_wrong(s, t_fn(xa), tolerance)
  return accepted, accepted_and_wrong


def _subspace_boundary(delta: chex.Array, *, x: chex.Array, eps: chex.Numeric, norm: str,
                       projector: chex.Array,
                       clip_range: Optional[Tuple[float, float]]) -> chex.Array:
  """``P delta`` rescaled onto the budget's boundary (its norm = ``eps``), then kept in range."""
  d = attacks.project_onto_subspace(delta, projector)
  flat = d.reshape(d.shape[0], -1)
  size = (jnp.abs(flat).max(-1) if norm == 'linf' else jnp.sqrt((flat * flat).sum(-1)))
  d = d * (eps / jnp.maximum(size, 1e-12)).reshape((-1,) + (1,) * (d.ndim - 1))
  return attacks._clip_inputs(x, d, clip_range, projector)  # pylint: disable=protected-access


def _first_success(deltas: chex.Array, succ: chex.Array) -> chex.Array:
  """``[N, ...]``: per example, the first of ``deltas [R, N, ...]`` that succeeded (else the first)."""
  pick = jnp.argmax(succ, axis=0)
  return jnp.take_along_axis(deltas, pick.reshape((1, -1) + (1,) * (deltas.ndim - 2)),
                             axis=0)[0]


def attack_one(student_fn: Callable, teacher_fn: Callable, x: chex.Array,
               labels: Optional[chex.Array], key: chex.PRNGKey, *, attack: str, label: str,
               eps: chex.Numeric, norm: str, config: AttackConfig,
               projector: Optional[chex.Array] = None,
               clip_range: Optional[Tuple[float, float]] = None,
               threshold: Optional[chex.Numeric] = None,
               gradient_fns: Optional[Tuple[Callable, Callable]] = None
               ) -> Dict[str, chex.Array]:
  """One attack of the ensemble on one student.

  Args:
    student_fn, teacher_fn: ``[N, ...] -> [N, C]`` logits.
    x: ``[N, ...]`` clean inputs.
    labels: ``[N]`` int labels for ``label='true'``; ignored otherwise (``fixed``
      and ``ccat`` use the teacher's argmax at ``x``).
    key: PRNG key.
    attack: one of ``ATTACKS``.
    label: one of ``LABEL_KINDS``.
    eps: budget (a traced scalar is fine).
    norm: ``'linf'`` or ``'l2'``.
    config: iterations of the attacks.
    projector: ``[D, D]`` orthogonal projector restricting ``delta``, or None
      (unconstrained; never pass the identity: L-inf would scale instead of clip).
    clip_range: valid input range, or None.
    threshold: CCAT confidence threshold (``label='ccat'``).
    gradient_fns: ``(student_fn, teacher_fn)`` with the same values whose
      gradients ``apgd_pair`` follows (e.g. ``models.surrogate`` networks);
      default: ``student_fn, teacher_fn``.

  Returns:
    ``{'success': [N] bool}``; ``'accepted'`` ``[N]`` for ``ccat``;
    ``'first_success'`` ``[N]`` int32 for ``apgd``.
  """
  if attack not in ATTACKS:
    raise ValueError(f'attack must be one of {ATTACKS}, got {attack!r}')
  if label not in LABEL_KINDS:
    raise ValueError(f'label must be one of {LABEL_KINDS}, got {label!r}')
  if attack not in config.attacks_for(label):
    raise ValueError(f'attack {attack!r} does not run for label {label!r} with this config '
                     f'(it runs {config.attacks_for(label)})')
  c = config
  s_fn, t_fn = student_fn, teacher_fn
  clean_s = s_fn(x)
  num_classes = clean_s.shape[-1]
  if label == 'true':
    if labels is None:
      raise ValueError("label='true' needs labels")
    y = labels
  else:
    y = t_fn(x).argmax(-1)
  out = {}
  tol = float(c.oracle_tolerance)
  if label == 'oracle':
    success = lambda xa: oracle_wrong(s_fn(xa), t_fn(xa), tol)
  elif label == 'ccat':
    if threshold is None:
      raise ValueError("label='ccat' needs a threshold")
    accepted, success = _ccat_criteria(s_fn, t_fn, threshold, tol)
  else:
    success = attacks.fixed_label_success(s_fn, y)
  oracle_like = label in ('oracle', 'ccat')

  def with_tolerance(objective):  # also push the teacher's gap above the tolerance
    if tol <= 0:
      return objective
    return lambda xa: jnp.minimum(objective(xa), teacher_gap(t_fn(xa)) - tol)

  if attack == 'pgd':
    if label == 'oracle':
      objective = attacks.oracle_objective(s_fn, t_fn, c.oracle_loss)
    elif label == 'ccat':
      objective = attacks.ccat_objective(s_fn, y)
    else:
      objective = attacks.fixed_label_objective(s_fn, y)
    delta = attacks.pgd(objective, x, key, eps=eps,
                        alpha=c.pgd_step_factor * eps / c.pgd_steps, steps=c.pgd_steps,
                        norm=norm, restarts=c.pgd_restarts, projector=projector,
                        clip_range=clip_range, success_fn=success)
  elif attack == 'apgd':
    objective = (with_tolerance(attacks.oracle_margin_objective(s_fn, t_fn)) if oracle_like
                 else attacks.fixed_label_objective(s_fn, y))
    delta, first = attacks.apgd(objective, x, key, eps=eps, steps=c.apgd_steps, norm=norm,
                                restarts=c.apgd_restarts, projector=projector,
                                clip_range=clip_range, success_fn=success, return_trace=True)
    out['first_success'] = first
  elif attack == 'apgd_t':
    k = min(c.targets, num_classes - 1)
    targets = attacks.top_other_classes(clean_s, y, k)

    def one_target(args):
      target, tkey = args
      tgt = jnp.broadcast_to(target, y.shape)
      if oracle_like:
        objective = with_tolerance(attacks.oracle_targeted_margin_objective(s_fn, t_fn, tgt))
      elif num_classes >= 4:
        objective = attacks.targeted_dlr_objective(s_fn, y, tgt)
      else:
        objective = attacks.targeted_margin_objective(s_fn, y, tgt)
      d = attacks.apgd(objective, x, tkey, eps=eps, steps=c.apgd_t_steps, norm=norm,
                       projector=projector, clip_range=clip_range, success_fn=success)
      return d, success(x + d)
    delta = _first_success(*jax.lax.map(one_target, (targets.T, jax.random.split(key, k))))
  elif attack == 'apgd_pair':
    g_s, g_t = gradient_fns if gradient_fns is not None else (s_fn, t_fn)
    clean_t = t_fn(x)
    k = min(c.pair_targets, num_classes - 1)
    keep, move = attacks.oracle_pairs(clean_t, k)
    tau = c.pair_smoothing * clean_t.std(-1)

    def one_pair(args):
      a, b, pkey = args
      objective = attacks.oracle_pair_objective(g_s, g_t, a, b, tolerance=tol, smoothing=tau)
      d = attacks.apgd(objective, x, pkey, eps=eps, steps=c.pair_steps, norm=norm,
                       restarts=c.pair_restarts, projector=projector, clip_range=clip_range,
                       success_fn=success, momentum=c.pair_momentum)
      return d, success(x + d)
    delta = _first_success(*jax.lax.map(one_pair, (keep, move, jax.random.split(key, 2 * k))))
  else:  # square
    if label == 'ccat':
      objective = attacks.ccat_objective(s_fn, y)
    elif label == 'oracle':
      objective = with_tolerance(attacks.oracle_margin_objective(s_fn, t_fn))
    else:
      objective = attacks.margin_objective(s_fn, y)
    if projector is None:
      delta = square_lib.square(objective, x, key, eps=eps, queries=c.square_queries,
                                norm=norm, clip_range=clip_range, success_fn=success,
                                p_init=c.square_p_init)
    else:
      # In a subspace: the search runs in the ambient space and every candidate is mapped
      # into the feasible set (projected onto the subspace, rescaled to the budget's
      # boundary, kept in clip_range), so one compilation serves every subspace.
      feasible = functools.partial(_subspace_boundary, x=x, eps=eps, norm=norm,
                                   projector=projector, clip_range=clip_range)
      ambient = square_lib.square(lambda xa: objective(x + feasible(xa - x)), x, key, eps=eps,
                                  queries=c.square_queries, norm=norm,
                                  success_fn=lambda xa: success(x + feasible(xa - x)),
                                  p_init=c.square_p_init)
      delta = feasible(ambient)
  xa = x + delta
  out['success'] = success(xa)
  if label == 'ccat':
    out['accepted'] = accepted(xa)
  return out
