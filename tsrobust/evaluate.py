"""The robustness evaluation every binary calls: an oracle-aware attack ensemble.

For a batch of students (a leading students axis, vmapped or ``lax.map``-ped),
``Evaluator.run`` attacks every example with every attack of the ensemble, for
every label kind, every subspace restriction and every budget, and returns
per-example successes. ``combine`` then takes, per example, the worst case
over the ensemble and makes the sets consistent *by construction*:

* a perturbation found in the data subspace S (``in``) or in its complement
  (``off``) is also a feasible unconstrained (``full``) one, so a success
  ``in`` or ``off`` counts ``full``;
* a perturbation found at budget ``eps`` is feasible at every larger budget,
  so a success at ``eps`` counts at every larger one.

Both hold because the attacked sets nest (L2 or L-inf balls, intersected
with a subspace; with a ``clip_range``, subspace attacks scale the
perturbation down instead of clipping it, so it stays feasible everywhere).

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
  ``Evaluator`` has them (``models.surrogate``).

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
``AttackConfig.scaled(2)`` doubles every iteration count: a run's
convergence check (``doubling``). Everything is pure: keys in,
numpy arrays out; one compilation per (attack, label, subspace kind) serves
every budget, rank and method, since budgets and projectors are arrays.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import attacks
from tsrobust import square as square_lib
from tsrobust import sweep

__all__ = ['ATTACKS', 'GRADIENT_ATTACKS', 'ORACLE_ONLY_ATTACKS', 'LABEL_KINDS', 'WHERES',
           'STRENGTHS', 'PRESETS', 'CONVERGED_GAIN', 'AttackConfig', 'preset', 'teacher_gap',
           'oracle_wrong', 'attack_one', 'Result', 'Evaluator', 'ccat_threshold',
           'raw_ensemble', 'combine', 'error_rates', 'ccat_error', 'attack_checks',
           'first_points', 'merge', 'doubling', 'columns', 'records', 'merge_ccat',
           'ccat_records']

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
    """This ensemble with every attack's iterations and Square's queries times ``factor``.

    Restarts and targets are unchanged. The convergence check (``doubling``) compares
    an ensemble with ``scaled(2)`` of it, run with other random keys.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
      raise ValueError(f'factor must be an integer >= 1, got {factor!r}')
    return dataclasses.replace(
        self, pgd_steps=self.pgd_steps * factor, apgd_steps=self.apgd_steps * factor,
        apgd_t_steps=self.apgd_t_steps * factor, square_queries=self.square_queries * factor,
        pair_steps=self.pair_steps * factor)

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

  Raises:
    ValueError: unknown strength or field, or an invalid value.
  """
  if strength not in PRESETS:
    raise ValueError(f'attack strength must be one of {STRENGTHS}, got {strength!r}')
  fields = {f.name for f in dataclasses.fields(AttackConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown attack config fields {unknown}; allowed: {sorted(fields)}')
  return dataclasses.replace(PRESETS[strength], **overrides)


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
                       success_fn=success)
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


# ----------------------------------------------------------------------------
# A batch of students.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  """Raw per-example outcomes of ``Evaluator.run`` (numpy).

  Attributes:
    eps: the budgets, ascending.
    success: ``{(label, where, attack): [S, E, N] bool}``.
    accepted: ``{('ccat', where, attack): [S, E, N] bool}`` (CCAT runs only).
    first_success: ``{(label, where): [S, E, N] int}`` of ``apgd``.
    clean: ``{label: [S, N] bool}`` the student already wrong at ``x``
      (``ccat``: accepted and wrong).
    clean_accepted: ``[S, N] bool`` (CCAT runs only).
  """
  eps: Tuple[float, ...]
  success: Dict[Tuple[str, str, str], np.ndarray]
  accepted: Dict[Tuple[str, str, str], np.ndarray]
  first_success: Dict[Tuple[str, str], np.ndarray]
  clean: Dict[str, np.ndarray]
  clean_accepted: Optional[np.ndarray] = None


def _over_students(fn: Callable, batched: Sequence[bool], batching: str,
                   groups: int = 1) -> Callable:
  """Maps ``fn`` over the leading axis of the arguments flagged in ``batched``.

  ``batching='map'`` runs the students ``groups`` at a time: the students
  axis is split into ``[groups, S / groups]``, ``vmap``-ped over the groups and
  ``lax.map``-ped within a group. With ``groups`` = the device count and the
  students axis sharded over the devices, each device maps over its own
  students (one core each on a CPU) instead of one device doing all of them.
  """
  if batching == 'vmap':
    return jax.vmap(fn, in_axes=tuple(0 if b else None for b in batched))

  def mapped(*args):
    shared = [None if b else a for a, b in zip(args, batched)]
    per = tuple(a for a, b in zip(args, batched) if b)
    num = jax.tree_util.tree_leaves(per)[0].shape[0]
    g = groups if groups > 1 and num % groups == 0 else 1

    def body(per_student):
      it = iter(per_student)
      return fn(*[next(it) if b else s for s, b in zip(shared, batched)])
    split = jax.tree_util.tree_map(lambda v: v.reshape((g, num // g) + v.shape[1:]), per)
    out = jax.vmap(lambda p: jax.lax.map(body, p))(split)
    return jax.tree_util.tree_map(lambda v: v.reshape((num,) + v.shape[2:]), out)
  return mapped


def _identities_like(num: int, d: int, dtype, ref: Any) -> jax.Array:
  """``[num, d, d]`` identity projectors, laid over the devices as ``ref`` along its leading axis.

  So ``full`` runs through the same executable as ``in`` / ``off`` (and as ``full`` of an
  earlier call without restricted projectors): an argument laid out differently compiles
  the whole attack again.
  """
  build = lambda: jnp.broadcast_to(jnp.eye(d, dtype=dtype), (num, d, d))
  sharding = getattr(ref, 'sharding', None)
  if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec):
    leading = jax.sharding.NamedSharding(sharding.mesh,
                                         jax.sharding.PartitionSpec(sharding.spec[0]))
    return jax.jit(build, out_shardings=leading)()
  return build()


class Evaluator:
  """Compiled ensemble evaluation of students against their teachers.

  Args:
    student_apply, teacher_apply: ``(params, x) -> (logits, activations)``.
    norm: ``'linf'`` or ``'l2'``.
    config: an ``AttackConfig`` (see ``preset``).
    clip_range: valid input range of ``x + delta``, or None.
    shared_teacher: one teacher for every student (its params have no
      students axis), else ``[S, ...]``.
    shared_data: one ``x`` (and ``labels``) for every student, else ``[S, N, ...]``.
    batching: ``'vmap'`` (MLPs) or ``'map'`` (``lax.map``, one student at a
      time per device; CNNs on a CPU).
    map_groups: with ``'map'``, students run this many at a time (default:
      the device count; shard the students axis over the devices, e.g.
      ``sweep.shard_seeds``, so each device maps over its own students).
    surrogate_apply: ``(student_apply, teacher_apply)`` computing the same values
      with other gradients, which ``apgd_pair`` follows (``models.surrogate``:
      smooth ReLU gradients); default: the exact networks.
  """

  def __init__(self, student_apply: Callable, teacher_apply: Callable, *, norm: str,
               config: AttackConfig, clip_range: Optional[Tuple[float, float]] = None,
               shared_teacher: bool = False, shared_data: bool = False,
               batching: str = 'vmap', map_groups: Optional[int] = None,
               surrogate_apply: Optional[Tuple[Callable, Callable]] = None):
    if norm not in attacks.NORMS:
      raise ValueError(f'norm must be one of {attacks.NORMS}, got {norm!r}')
    if batching not in ('vmap', 'map'):
      raise ValueError(f"batching must be 'vmap' or 'map', got {batching!r}")
    self.student_apply, self.teacher_apply = student_apply, teacher_apply
    self.surrogate_apply = surrogate_apply
    self.norm, self.config, self.clip_range = norm, config, clip_range
    self.shared_teacher, self.shared_data, self.batching = shared_teacher, shared_data, batching
    self.map_groups = jax.device_count() if map_groups is None else int(map_groups)
    if self.map_groups < 1:
      raise ValueError(f'map_groups must be >= 1, got {map_groups!r}')
    self._fns = {}
    self._clean = self._compile_clean()

  def _compile_clean(self):
    def one(sp, tp, x, labels, threshold):
      s = self.student_apply(sp, x)[0]
      t = self.teacher_apply(tp, x)[0]
      conf = jax.nn.softmax(s).max(-1)
      return {'oracle': oracle_wrong(s, t, float(self.config.oracle_tolerance)),
              'true': s.argmax(-1) != labels,
              'accepted': conf >= threshold}
    batched = (True, not self.shared_teacher, not self.shared_data, not self.shared_data,
               True)
    return jax.jit(_over_students(one, batched, self.batching, self.map_groups))

  def _fn(self, attack: str, label: str, subspace: bool, shared_projector: bool):
    key = (attack, label, subspace, shared_projector)
    if key not in self._fns:
      def one(sp, tp, x, labels, k, eps, projector, threshold):
        gradient_fns = None
        if self.surrogate_apply is not None:
          s_apply, t_apply = self.surrogate_apply
          gradient_fns = (lambda v: s_apply(sp, v)[0], lambda v: t_apply(tp, v)[0])
        return attack_one(
            lambda v: self.student_apply(sp, v)[0], lambda v: self.teacher_apply(tp, v)[0],
            x, labels, k, attack=attack, label=label, eps=eps, norm=self.norm,
            config=self.config, projector=projector if subspace else None,
            clip_range=self.clip_range, threshold=threshold, gradient_fns=gradient_fns)
      batched = (True, not self.shared_teacher, not self.shared_data, not self.shared_data,
                 True, False, subspace and not shared_projector, True)
      self._fns[key] = jax.jit(_over_students(one, batched, self.batching, self.map_groups))
    return self._fns[key]

  def run(self, student_params, teacher_params, x: chex.Array, keys: chex.Array, *,
          eps: Sequence[float], labels_kinds: Sequence[str] = ('oracle', 'fixed'),
          projectors: Optional[Mapping[str, Tuple[chex.Array, int]]] = None,
          labels: Optional[chex.Array] = None,
          thresholds: Optional[chex.Array] = None,
          identity_full: Optional[bool] = None,
          on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Result:
    """Every attack x label kind x subspace x budget, per example.

    Args:
      student_params: ``[S, ...]`` student parameters.
      teacher_params: ``[S, ...]`` (or shared) teacher parameters.
      x: ``[S, N, ...]`` (or shared ``[N, ...]``) clean inputs.
      keys: ``[S]`` PRNG keys, one per student.
      eps: budgets (sorted ascending here).
      labels_kinds: which of ``LABEL_KINDS`` to evaluate.
      projectors: ``{'in' / 'off': projector}``: ``[S, D, D]`` (or a shared
        ``[D, D]``) orthogonal projectors of the restricted attacks (each of rank
        >= 1); ``'full'`` (unconstrained) is always evaluated. With L2 and
        restricted attacks, ``full`` runs through the same compiled function
        with the identity (exactly the unconstrained L2 attack); with L-inf it
        runs without a projector (per-coordinate clipping).
      labels: ``[S, N]`` (or shared ``[N]``) int labels for ``'true'``.
      thresholds: ``[S]`` CCAT confidence thresholds for ``'ccat'``.
      identity_full: run ``full`` with an identity projector ``[S, D, D]``
        (L2 only; the same attack, one compilation shared with ``in``/``off``).
        Default: when there are restricted attacks and the norm is L2.
      on_progress: called after each attack run (one attack, label kind, subspace and
        budget, all students) with ``done``, ``total``, ``attack``, ``label``, ``where``
        and ``eps``: progress reports (it changes nothing computed).

    Returns:
      A ``Result`` (numpy).
    """
    eps, clean_args, calls = self._calls(
        student_params, teacher_params, x, keys, eps=eps, labels_kinds=labels_kinds,
        projectors=projectors, labels=labels, thresholds=thresholds,
        identity_full=identity_full)
    clean_out = sweep.to_host(self._clean(*clean_args))
    clean = {}
    for kind in labels_kinds:
      if kind == 'oracle':
        clean[kind] = clean_out['oracle']
      elif kind == 'true':
        clean[kind] = clean_out['true']
      elif kind == 'fixed':
        clean[kind] = np.zeros_like(clean_out['oracle'])  # the label is the teacher's at x
      else:
        clean[kind] = clean_out['accepted'] & clean_out['oracle']
    success, accepted, first = {}, {}, {}
    done = 0
    for kind, where, attack, fn, args_at in calls:
      pending = [fn(*args_at(ei)) for ei in range(len(eps))]
      outs = []
      for ei, out in enumerate(pending):
        outs.append(sweep.to_host(out))  # over processes
        done += 1
        if on_progress is not None:
          on_progress({'done': done, 'total': len(calls) * len(eps), 'attack': attack,
                       'label': kind, 'where': where, 'eps': float(eps[ei])})
      # delta = 0 is feasible: a point already wrong at x is a success of every attack.
      success[(kind, where, attack)] = (np.stack([o['success'] for o in outs], 1)
                                        | clean[kind][:, None, :])
      if kind == 'ccat':
        accepted[(kind, where, attack)] = np.stack([o['accepted'] for o in outs], 1)
      if attack == 'apgd':
        first[(kind, where)] = np.stack([o['first_success'] for o in outs], 1)
    return Result(eps=eps, success=success, accepted=accepted, first_success=first,
                  clean=clean, clean_accepted=clean_out['accepted'] if 'ccat' in labels_kinds
                  else None)

  def prepare(self, student_params, teacher_params, x: chex.Array, keys: chex.Array, *,
              eps: Sequence[float], labels_kinds: Sequence[str] = ('oracle', 'fixed'),
              projectors: Optional[Mapping[str, Tuple[chex.Array, int]]] = None,
              labels: Optional[chex.Array] = None,
              thresholds: Optional[chex.Array] = None,
              identity_full: Optional[bool] = None) -> int:
    """Traces, lowers and compiles what ``run`` with these arguments would, running nothing.

    The arguments are those of ``run`` (any values of the same shapes, dtypes
    and layouts: e.g. the students before training). A later ``run`` finds the
    traced and lowered programs in JAX's caches and, with the persistent
    compilation cache on (``sweep.use_compilation_cache``), the compiled ones
    on disk. Meant for a background thread while the students train: the
    main job's first evaluation spent ~8 s (warm cache) to ~30 s (cold)
    tracing and compiling on one core while the devices idled.

    Returns:
      The number of programs prepared.
    """
    _, clean_args, calls = self._calls(
        student_params, teacher_params, x, keys, eps=eps, labels_kinds=labels_kinds,
        projectors=projectors, labels=labels, thresholds=thresholds,
        identity_full=identity_full)
    self._clean.trace(*clean_args).lower().compile()
    done = {}
    for _, _, _, fn, args_at in calls:
      if id(fn) not in done:  # budgets are values: one program per attack function
        done[id(fn)] = fn.trace(*args_at(0)).lower().compile()
    return 1 + len(done)

  def _calls(self, student_params, teacher_params, x, keys, *, eps, labels_kinds, projectors,
             labels, thresholds, identity_full):
    """``run``'s checks and arguments: ``(eps, clean_args, calls)``.

    ``calls``: ``(kind, where, attack, fn, args_at)`` in ``run``'s order, where
    ``args_at(i)`` builds ``fn``'s arguments at budget ``eps[i]`` (its keys are derived
    only when asked for).
    """
    for kind in labels_kinds:
      if kind not in LABEL_KINDS:
        raise ValueError(f'labels_kinds must hold names from {LABEL_KINDS}, got {kind!r}')
      if not self.config.attacks_for(kind):
        raise ValueError(f'no attack runs for label kind {kind!r}: {ORACLE_ONLY_ATTACKS} run '
                         f'for oracle labels only; turn on another attack')
    if 'true' in labels_kinds and labels is None:
      raise ValueError("labels_kinds 'true' needs labels")
    if 'ccat' in labels_kinds and thresholds is None:
      raise ValueError("labels_kinds 'ccat' needs thresholds")
    projectors = dict(projectors or {})
    for where in projectors:
      if where not in ('in', 'off'):
        raise ValueError(f"projectors keys must be 'in' or 'off', got {where!r}")
    eps = tuple(sorted(float(e) for e in eps))
    if not eps or eps[0] < 0:
      raise ValueError(f'eps must be a non-empty sequence of budgets >= 0, got {eps!r}')
    num = keys.shape[0]
    n = x.shape[0] if self.shared_data else x.shape[1]
    dummy_labels = (jnp.zeros((n,), jnp.int32) if self.shared_data
                    else jnp.zeros((num, n), jnp.int32))
    lab = dummy_labels if labels is None else jnp.asarray(labels)
    thr = jnp.zeros((num,)) if thresholds is None else jnp.asarray(thresholds, jnp.float32)
    wheres = [w for w in WHERES if w in projectors] + ['full']
    for where, p in projectors.items():
      p = jnp.asarray(p)
      if p.ndim not in (2, 3) or p.shape[-1] != p.shape[-2]:
        raise ValueError(f'projectors[{where!r}] must be [D, D] or [S, D, D], got {p.shape}')
      projectors[where] = p
    if identity_full is None:
      identity_full = bool(projectors) and self.norm == 'l2'
    if identity_full:
      if self.norm != 'l2':
        raise ValueError('identity_full is for L2 only: unconstrained L-inf clips per coordinate')
      d = int(np.prod(x.shape[2:] if not self.shared_data else x.shape[1:]))
      like = [p for p in projectors.values() if p.ndim == 3]
      projectors['full'] = _identities_like(num, d, x.dtype, like[0] if like else keys)
    calls = []
    for kind in labels_kinds:
      for where in wheres:
        proj = projectors.get(where)
        shared_p = proj is not None and proj.ndim == 2
        for attack in self.config.attacks_for(kind):
          fn = self._fn(attack, kind, proj is not None, shared_p)
          base = ((LABEL_KINDS.index(kind) * 8 + WHERES.index(where)) * 8
                  + ATTACKS.index(attack)) * 64

          def args_at(ei, base=base, proj=proj):
            k = jax.vmap(lambda kk: jax.random.fold_in(kk, base + ei))(keys)
            return (student_params, teacher_params, x, lab, k, jnp.float32(eps[ei]), proj, thr)
          calls.append((kind, where, attack, fn, args_at))
    return eps, (student_params, teacher_params, x, lab, thr), calls


def ccat_threshold(confidence: np.ndarray, correct: np.ndarray, pass_rate: float = 0.99) -> float:
  """CCAT's confidence threshold (Stutz et al.): passes ``pass_rate`` of the correct points.

  Args:
    confidence: ``[N]`` the student's max softmax on clean held-out points.
    correct: ``[N]`` bool, the student is right there (w.r.t. the oracle).
    pass_rate: fraction of the correctly classified points to accept.

  Returns:
    The largest threshold that at least ``pass_rate`` of the correct points
    meet (``attacks.confidence_threshold`` on them); over all points if none
    is correct.
  """
  confidence = np.asarray(confidence, np.float32)
  correct = np.asarray(correct, bool)
  chex.assert_equal_shape([confidence, correct])
  pool = confidence[correct] if correct.any() else confidence
  return float(attacks.confidence_threshold(jnp.asarray(pool), pass_rate))


# ----------------------------------------------------------------------------
# Worst case over the ensemble, invariants, diagnostics (numpy, host side).
# ----------------------------------------------------------------------------


def _cumulative_over_eps(s: np.ndarray) -> np.ndarray:
  """``[S, E, N]`` bool: a success at budget ``i`` counts at every ``j >= i``."""
  return np.logical_or.accumulate(s, axis=1)


def raw_ensemble(result: Result) -> Dict[Tuple[str, str], np.ndarray]:
  """``{(label, where): [S, E, N]}``: any attack succeeded (no invariants enforced)."""
  out = {}
  for (label, where, _), s in result.success.items():
    out[(label, where)] = out.get((label, where), False) | s
  return out


def combine(result: Result) -> Dict[Tuple[str, str], np.ndarray]:
  """The evaluation's successes, ``{(label, where): [S, E, N] bool}``, consistent by construction.

  Per example: the union over attacks (worst case), then ``full`` includes
  ``in`` and ``off``, then a success at a budget counts at every larger one.
  A point the student already gets wrong at ``x`` counts as a success at
  every budget (``delta = 0`` is feasible).
  """
  raw = raw_ensemble(result)
  out = {}
  for (label, where), s in raw.items():
    out[(label, where)] = s | result.clean[label][:, None, :]
  for label in {l for l, _ in raw}:
    if (label, 'full') in out:
      for sub in ('in', 'off'):
        if (label, sub) in out:
          out[(label, 'full')] = out[(label, 'full')] | out[(label, sub)]
  return {k: _cumulative_over_eps(v) for k, v in out.items()}


def error_rates(final: Mapping[Tuple[str, str], np.ndarray]) -> Dict[Tuple[str, str], np.ndarray]:
  """``{(label, where): [S, E]}`` mean error over examples."""
  return {k: v.mean(-1) for k, v in final.items()}


def ccat_error(result: Result, final: Mapping[Tuple[str, str], np.ndarray],
               where: str = 'full') -> np.ndarray:
  """Stutz et al.'s confidence-thresholded robust error, ``[S, E]``.

  With ``c`` the student's confidence, ``tau`` the threshold, ``x~`` the
  worst-case perturbed point of example ``n`` (a success of any attack, else
  any accepted attacked point)::

    RErr = sum_n max(1[wrong(x_n), c(x_n) >= tau], 1[wrong(x~_n), c(x~_n) >= tau])
           / sum_n max(1[c(x_n) >= tau], 1[c(x~_n) >= tau])

  ``wrong`` is w.r.t. the oracle (the teacher at that point). 0 when no
  point is accepted.
  """
  succ = final[('ccat', where)]
  acc = np.zeros_like(succ)
  for (label, w, _), a in result.accepted.items():
    if label == 'ccat' and w == where:
      acc = acc | a
  acc = np.logical_or.accumulate(acc, axis=1)
  num = (succ | result.clean['ccat'][:, None, :]).sum(-1)
  den = (result.clean_accepted[:, None, :] | succ | acc).sum(-1)
  return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def _violations(s: Mapping[Tuple[str, str], np.ndarray]) -> Dict[str, int]:
  """Per-example violations of the nesting invariants in ``{(label, where): [S, E, N]}``."""
  mono = sub = 0
  for (label, where), v in s.items():
    mono += int((v[:, :-1] & ~v[:, 1:]).sum())
    if where == 'full':
      for w in ('in', 'off'):
        if (label, w) in s:
          sub += int((s[(label, w)] & ~v).sum())
  return {'non_monotone_in_eps': mono, 'subspace_not_in_full': sub}


def _row_violations(rates: Mapping[Tuple[str, str], np.ndarray]) -> int:
  """Violations counted as ``check_invariants.py`` does, on mean error per student."""
  bad = 0
  for (label, where), r in rates.items():
    bad += int((r[:, 1:] < r[:, :-1] - 1e-9).sum())
    if where == 'full':
      for w in ('in', 'off'):
        if (label, w) in rates:
          bad += int((r < rates[(label, w)] - 1e-9).sum())
  return bad


def attack_checks(result: Result, final: Mapping[Tuple[str, str], np.ndarray],
                  headline: float, attacks_run: Sequence[str],
                  convergence_points: Sequence[int],
                  rows: Optional[np.ndarray] = None,
                  doubled: Optional[Result] = None) -> Dict[str, Any]:
  """Diagnostics of the raw attacks, before the invariants were enforced.

  Args:
    result, final: ``Evaluator.run`` output and ``combine(result)``.
    headline: the budget whose convergence is reported.
    attacks_run: the attacks of the ensemble.
    convergence_points: APGD iteration counts of the convergence curve.
    rows: ``[S]`` bool, the students to count (e.g. one method's); default all.
    doubled: the ensemble with its iterations doubled on the first points (``doubling``).

  Returns:
    A JSON-able dict: per attack and for the raw ensemble, the per-example
    violations of the invariants (``non_monotone_in_eps``,
    ``subspace_not_in_full``) and the row violations counted as
    ``check_invariants.py`` does; per (label, where, eps) the fraction of
    points broken only by Square and by each attack; the convergence of APGD
    (error after k iterations, untargeted APGD alone, full space, at the
    headline budget) beside the ensemble's error; with ``doubled``, ``doubling``: this
    group's entry of ``doubling`` (and its ``points``).
  """
  sel = np.ones(next(iter(final.values())).shape[0], bool) if rows is None else rows
  pick = lambda d: {k: v[sel] for k, v in d.items()}
  eps = result.eps
  hi = eps.index(float(headline)) if float(headline) in eps else len(eps) // 2
  out = {'students': int(sel.sum()), 'eps': list(eps), 'headline_eps': eps[hi],
         'per_attack': {}, 'only_square': {}, 'convergence': {}}
  for attack in attacks_run:
    per = {(l, w): v for (l, w, a), v in pick(result.success).items() if a == attack}
    out['per_attack'][attack] = {**_violations(per),
                                 'row_violations': _row_violations(error_rates(per))}
  raw = pick(raw_ensemble(result))
  out['raw_ensemble'] = {**_violations(raw), 'row_violations': _row_violations(error_rates(raw))}
  fin = pick(final)
  out['final'] = {**_violations(fin), 'row_violations': _row_violations(error_rates(fin))}
  if 'square' in attacks_run:
    for (label, where), _ in raw.items():
      grad = np.zeros_like(raw[(label, where)])
      for a in attacks_run:
        if a != 'square' and (label, where, a) in result.success:
          grad = grad | result.success[(label, where, a)][sel]
      only = result.success[(label, where, 'square')][sel] & ~grad
      for ei, e in enumerate(eps):
        out['only_square'][f'{label}_{where}_{e:g}'] = float(only[:, ei].mean())
  for (label, where), fs in pick(result.first_success).items():
    if where != 'full':
      continue
    clean = result.clean[label][sel]
    curve = {str(k): float(((fs[:, hi] <= k) | clean).mean()) for k in convergence_points}
    out['convergence'][label] = {'apgd_error_after_iterations': curve,
                                 'ensemble_error': float(fin[(label, 'full')][:, hi].mean())}
  if doubled is not None:
    check = doubling(result, doubled, {'group': sel})
    out['doubling'] = {'points': check['points'], 'threshold': check['threshold'],
                       **check['groups']['group']}
  return out


def first_points(result: Result, n: int) -> Result:
  """``result`` restricted to the first ``n`` examples of every student."""
  cut = lambda d: {k: v[..., :n] for k, v in d.items()}
  return Result(eps=result.eps, success=cut(result.success), accepted=cut(result.accepted),
                first_success=cut(result.first_success), clean=cut(result.clean),
                clean_accepted=None if result.clean_accepted is None
                else result.clean_accepted[:, :n])


def merge(a: Result, b: Result) -> Result:
  """Two evaluations of the same students on the same points as one: per example, either's success.

  ``b``'s attacks are added under their own names with a ``+`` suffix (``apgd+``), so
  the per-attack entries of both stay; ``first_success`` is ``a``'s.
  """
  if a.eps != b.eps:
    raise ValueError(f'merge needs the same budgets, got {a.eps} and {b.eps}')
  for k, v in b.success.items():
    if k in a.success and a.success[k].shape != v.shape:
      raise ValueError(f'merge needs the same students and points, got {a.success[k].shape} '
                       f'and {v.shape} for {k}')
  plus = lambda d: {(l, w, f'{at}+'): v for (l, w, at), v in d.items()}
  return Result(eps=a.eps, success={**a.success, **plus(b.success)},
                accepted={**a.accepted, **plus(b.accepted)}, first_success=a.first_success,
                clean=a.clean, clean_accepted=a.clean_accepted)


CONVERGED_GAIN = 0.01  # a family has converged when doubling the attack adds at most this


def doubling(base: Result, doubled: Result, groups: Mapping[str, np.ndarray],
             threshold: float = CONVERGED_GAIN) -> Dict[str, Any]:
  """Has the ensemble converged? Its error as the attack budget doubles, per group of students.

  Args:
    base: the evaluation (``Evaluator.run``), ``[S, E, N]``.
    doubled: the same students attacked again on their first ``n <= N`` points by the
      ensemble with every iteration count doubled (``AttackConfig.scaled(2)``) and other
      random keys, ``[S, E, n]``.
    groups: ``{name: [S] bool}`` the students of each group (e.g. a method's grid point).
    threshold: the largest gain that counts as converged.

  Returns:
    A JSON-able dict: ``points`` (``n``), ``threshold``, and per group its ``students``,
    per cell ``label_where_eps`` the error ``[base, base and doubled together]`` on those
    points (``combine``d: the invariants hold in both), the largest gain ``max_gain`` and
    its cell ``max_gain_cell``, and ``converged`` (``max_gain <= threshold``). A group that
    has not converged reports lower bounds of its error.
  """
  n = next(iter(doubled.success.values())).shape[-1]
  base_n = first_points(base, n)
  before = error_rates(combine(base_n))
  after = error_rates(combine(merge(base_n, doubled)))
  out = {'points': int(n), 'threshold': threshold, 'groups': {}}
  for name, sel in groups.items():
    sel = np.asarray(sel, bool)
    cells, best, best_cell = {}, 0.0, None
    for (label, where), r in before.items():
      for ei, e in enumerate(base.eps):
        b, a = float(r[sel, ei].mean()), float(after[(label, where)][sel, ei].mean())
        cells[f'{label}_{where}_{e:g}'] = [b, a]
        if best_cell is None or a - b > best:
          best, best_cell = a - b, f'{label}_{where}_{e:g}'
    # (1e-9: a gain of exactly the threshold, e.g. one point of 100, is 0.010000000000000009.)
    out['groups'][name] = {'students': int(sel.sum()), 'cells': cells, 'max_gain': best,
                           'max_gain_cell': best_cell,
                           'converged': bool(best <= threshold + 1e-9)}
  return out


def columns(labels_kinds: Sequence[str], wheres: Sequence[str], eps_names: Sequence[str],
            attacks_run: Sequence[str], prefix: str = 'adv') -> Tuple[list, list]:
  """``(ensemble columns, per-attack columns)`` of the result records.

  ``{prefix}_{label}_{where}_{eps}`` (the evaluation) and
  ``{prefix}_{label}_{where}_{eps}_{attack}`` (each attack alone, raw; ``apgd_pair``
  for ``oracle`` only).
  """
  main = [f'{prefix}_{l}_{w}_{e}' for l in labels_kinds for w in wheres for e in eps_names]
  per = [f'{prefix}_{l}_{w}_{e}_{a}' for l in labels_kinds for w in wheres for e in eps_names
         for a in attacks_run if l == 'oracle' or a not in ORACLE_ONLY_ATTACKS]
  return main, per


def records(result: Result, final: Mapping[Tuple[str, str], np.ndarray],
            eps_names: Mapping[float, str], prefix: str = 'adv') -> list:
  """One dict per student: ensemble error and each attack's raw error per column."""
  rates = error_rates(final)
  num = next(iter(final.values())).shape[0]
  rows = [{} for _ in range(num)]
  for (label, where), r in rates.items():
    for ei, e in enumerate(result.eps):
      for i in range(num):
        rows[i][f'{prefix}_{label}_{where}_{eps_names[e]}'] = float(r[i, ei])
  for (label, where, attack), s in result.success.items():
    m = s.mean(-1)
    for ei, e in enumerate(result.eps):
      for i in range(num):
        rows[i][f'{prefix}_{label}_{where}_{eps_names[e]}_{attack}'] = float(m[i, ei])
  return rows


def merge_ccat(final: Mapping[Tuple[str, str], np.ndarray],
               ccat_final: Mapping[Tuple[str, str], np.ndarray],
               rows: np.ndarray) -> Dict[Tuple[str, str], np.ndarray]:
  """Counts CCAT-attack successes (accepted and wrong) as oracle errors of students ``rows``.

  A point that is accepted and wrong w.r.t. the oracle is wrong w.r.t. the
  oracle, so the plain error is at least the thresholded one by construction.

  Args:
    final: ``combine``d successes ``{(label, where): [S, E, N]}`` of all students.
    ccat_final: the CCAT evaluation's ``{('ccat', where): [len(rows), E, N]}``.
    rows: indices (into the students axis of ``final``) of the CCAT students.

  Returns:
    A copy of ``final`` with ``('oracle', where)`` or-ed with ``('ccat', where)``
    at ``rows``, for every ``where`` both hold.
  """
  out = {k: np.array(v, copy=True) for k, v in final.items()}
  for (_, where), v in ccat_final.items():
    if ('oracle', where) in out:
      chex.assert_equal_shape([out[('oracle', where)][rows], v])
      out[('oracle', where)][rows] |= v
  return out


def ccat_records(result: Result, final: Mapping[Tuple[str, str], np.ndarray],
                 eps_names: Mapping[float, str]) -> list:
  """One dict per (CCAT) student: ``ccat_err_{eps}`` and ``ccat_accepted_wrong_{eps}``.

  ``ccat_err``: ``ccat_error`` (unconstrained attacks); ``ccat_accepted_wrong``:
  the fraction of examples with an accepted and wrong perturbed point. Per
  budget in ``result.eps`` order, the two interleaved.
  """
  err = ccat_error(result, final)
  wrong = final[('ccat', 'full')].mean(-1)
  rows = [{} for _ in range(err.shape[0])]
  for j, e in enumerate(result.eps):
    for i, row in enumerate(rows):
      row[f'ccat_err_{eps_names[e]}'] = float(err[i, j])
      row[f'ccat_accepted_wrong_{eps_names[e]}'] = float(wrong[i, j])
  return rows
