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

The ensemble (its attacks, label kinds, presets, and one attack on one student:
``attack_one``) is defined in ``ensemble``; ``Result`` and all that is made of it
(``combine``, ``error_rates``, ``attack_checks``, ``doubling``, the records) in
``outcomes``. This module runs the ensemble on a batch of students (``Evaluator``) and
re-exports both modules' names, so ``evaluate.X`` reaches every one of them.

Everything is pure: keys in, numpy arrays out; one compilation per (attack, label,
subspace kind) serves every budget, rank and method, since budgets and projectors are
arrays.
"""

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import attacks
from tsrobust import sweep
# The ensemble and the post-processing of its results, in modules of their own: used here
# and re-exported, so ``evaluate.X`` reaches them as before.
from tsrobust.ensemble import (ATTACKS, GRADIENT_ATTACKS, LABEL_KINDS, ORACLE_ONLY_ATTACKS,
                               PRESETS, STRENGTHS, WHERES, AttackConfig, attack_one,
                               oracle_wrong, preset, teacher_gap)
from tsrobust.outcomes import (CONVERGED_GAIN, Result, attack_checks, ccat_error,
                               ccat_records, columns, combine, doubling, error_rates,
                               first_points, merge, merge_ccat, raw_ensemble, records)
# (tests/test_evaluate.py reads evaluate._row_violations.)
from tsrobust.outcomes import _row_violations  # pylint: disable=unused-import

__all__ = ['ATTACKS', 'GRADIENT_ATTACKS', 'ORACLE_ONLY_ATTACKS', 'LABEL_KINDS', 'WHERES',
           'STRENGTHS', 'PRESETS', 'CONVERGED_GAIN', 'AttackConfig', 'preset', 'teacher_gap',
           'oracle_wrong', 'attack_one', 'Result', 'Evaluator', 'ccat_threshold',
           'raw_ensemble', 'combine', 'error_rates', 'ccat_error', 'attack_checks',
           'first_points', 'merge', 'doubling', 'columns', 'records', 'merge_ccat',
           'ccat_records']


# ----------------------------------------------------------------------------
# A batch of students.
# ----------------------------------------------------------------------------


def _over_students(fn: Callable, batched: Sequence[bool], batching: str) -> Callable:
  """Maps ``fn`` over the leading axis of the arguments flagged in ``batched``: ``vmap``,
  or (``batching='map'``) one student at a time on each device (``sweep.map_over_seeds``).
  """
  if batching == 'vmap':
    return jax.vmap(fn, in_axes=tuple(0 if b else None for b in batched))
  return sweep.map_over_seeds(fn, batched)


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
    batching: ``'vmap'`` (MLPs) or ``'map'`` (one student at a time per device,
      ``sweep.map_over_seeds``; CNNs on a CPU: shard the students axis over the devices,
      e.g. ``sweep.shard_seeds``).
    surrogate_apply: ``(student_apply, teacher_apply)`` computing the same values
      with other gradients, which ``apgd_pair`` follows (``models.surrogate``:
      smooth ReLU gradients); default: the exact networks.
  """

  def __init__(self, student_apply: Callable, teacher_apply: Callable, *, norm: str,
               config: AttackConfig, clip_range: Optional[Tuple[float, float]] = None,
               shared_teacher: bool = False, shared_data: bool = False,
               batching: str = 'vmap',
               surrogate_apply: Optional[Tuple[Callable, Callable]] = None):
    if norm not in attacks.NORMS:
      raise ValueError(f'norm must be one of {attacks.NORMS}, got {norm!r}')
    if batching not in sweep.SEED_BATCHINGS:
      raise ValueError(f'batching must be one of {sweep.SEED_BATCHINGS}, got {batching!r}')
    self.student_apply, self.teacher_apply = student_apply, teacher_apply
    self.surrogate_apply = surrogate_apply
    self.norm, self.config, self.clip_range = norm, config, clip_range
    self.shared_teacher, self.shared_data, self.batching = shared_teacher, shared_data, batching
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
    return jax.jit(_over_students(one, batched, self.batching))

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
      self._fns[key] = jax.jit(_over_students(one, batched, self.batching))
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
