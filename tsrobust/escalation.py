"""Attack harder where the ensemble has not converged: the convergence check, per group.

A group of students (a method's grid point, say) has *converged* when the ensemble with
every iteration count, query count and target count doubled (``AttackConfig.scaled(2)``,
other random starts), run
again on the first ``n`` attacked points, raises no error cell by more than
``outcomes.CONVERGED_GAIN`` (``outcomes.doubling``). ``escalate`` runs that check per group
and, for each group that fails it, *escalates*: the doubled ensemble attacks all of the
group's points (the check's first ``n`` points are reused; the rest are attacked with the
same keys), its successes are added to the evaluation's, and the check runs again one
level up (the ensemble at 4x on the first points), up to ``max_level`` escalations.

Level ``L`` is the ensemble ``scaled(2 ** L)`` with keys ``escalation_keys(keys, L)``; a
group escalated to level ``L`` has been attacked by every level ``0..L`` on every point,
and its errors are the union of their successes (then ``outcomes.combine``). Groups that
converge at level 0 are attacked exactly as without escalation: their results do not
change. A group still not converged at ``max_level`` reports lower bounds, and says so.

``reference_check`` compares the evaluation, per group, with a much stronger ensemble (the
``reference`` preset) on the first points: the test that the escalated default has
converged, too costly for every run.

``escalate`` is numpy glue around a ``run`` callback, so the low-rank and the image
evaluators (``lowrank_eval``, ``image_eval``) share it; ``take_students``,
``concat_points`` and ``add_successes`` are its operations on ``outcomes.Result``.
"""

from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import numpy as np

from tsrobust import outcomes
from tsrobust import rng

__all__ = ['escalation_keys', 'reference_keys', 'take_students', 'concat_points',
           'add_successes', 'escalate', 'reference_check']

Result = outcomes.Result


def escalation_keys(keys: jax.Array, level: int) -> jax.Array:
  """``[S]`` attack keys of level ``level >= 1``: ``fold_in(key, rng.CONVERGENCE_CHECK)``
  at level 1 (the convergence check's keys, as without escalation), folded with the level
  above it."""
  if level < 1:
    raise ValueError(f'level must be >= 1, got {level!r}')
  out = jax.vmap(lambda k: jax.random.fold_in(k, rng.CONVERGENCE_CHECK))(keys)
  if level > 1:
    out = jax.vmap(lambda k: jax.random.fold_in(k, level))(out)
  return out


def reference_keys(keys: jax.Array) -> jax.Array:
  """``[S]`` attack keys of the reference check: ``fold_in(key, rng.REFERENCE_CHECK)``."""
  return jax.vmap(lambda k: jax.random.fold_in(k, rng.REFERENCE_CHECK))(keys)


def _map(result: Result, fn: Callable[[np.ndarray], np.ndarray]) -> Result:
  """``fn`` applied to every per-student array of ``result``."""
  each = lambda d: {k: fn(v) for k, v in d.items()}
  return Result(eps=result.eps, success=each(result.success), accepted=each(result.accepted),
                first_success=each(result.first_success), clean=each(result.clean),
                clean_accepted=None if result.clean_accepted is None
                else fn(result.clean_accepted))


def take_students(result: Result, students: np.ndarray) -> Result:
  """``result`` of the students ``students`` (indices), in that order."""
  idx = np.asarray(students, int)
  return _map(result, lambda v: v[idx])


def concat_points(a: Result, b: Result) -> Result:
  """The same students' results on ``a``'s points, then ``b``'s (the last axis)."""
  if a.eps != b.eps or set(a.success) != set(b.success):
    raise ValueError('concat_points needs the same budgets and attacks, got '
                     f'{a.eps} / {sorted(a.success)} and {b.eps} / {sorted(b.success)}')
  cat = lambda x, y: {k: np.concatenate([v, y[k]], -1) for k, v in x.items()}
  return Result(eps=a.eps, success=cat(a.success, b.success),
                accepted=cat(a.accepted, b.accepted),
                first_success=cat(a.first_success, b.first_success),
                clean=cat(a.clean, b.clean),
                clean_accepted=None if a.clean_accepted is None
                else np.concatenate([a.clean_accepted, b.clean_accepted], -1))


def add_successes(base: Result, extra: Result, students: np.ndarray) -> Result:
  """``base`` with ``extra``'s successes (and acceptances) added, per example, to rows
  ``students``: each attack's entry is its success at any level run. ``extra`` holds those
  students on all of ``base``'s points; ``first_success`` and ``clean`` stay ``base``'s."""
  idx = np.asarray(students, int)
  missing = sorted(set(extra.success) - set(base.success))
  if missing:
    raise ValueError(f'add_successes: attacks {missing} are not in the evaluation')

  def add(d, e):
    out = {k: v.copy() for k, v in d.items()}
    for k, v in e.items():
      if out[k][idx].shape != v.shape:
        raise ValueError(f'add_successes needs {out[k][idx].shape} for {k}, got {v.shape}')
      out[k][idx] |= v
    return out
  return Result(eps=base.eps, success=add(base.success, extra.success),
                accepted=add(base.accepted, extra.accepted),
                first_success=base.first_success, clean=base.clean,
                clean_accepted=base.clean_accepted)


def escalate(run: Callable[[int, np.ndarray, int, int], Result], base: Result,
             groups: Mapping[str, np.ndarray], check_points: int, max_level: int,
             threshold: float = outcomes.CONVERGED_GAIN) -> Tuple[Result, Dict[str, Any]]:
  """The convergence check per group, escalating the groups that fail it.

  Args:
    run: ``run(level, students, start, stop)``: the ensemble ``scaled(2 ** level)`` with
      keys ``escalation_keys(keys, level)`` on the students ``students`` (indices, ascending)
      and their points ``start:stop``, a ``Result [len(students), E, stop - start]``.
    base: the evaluation (level 0), ``[S, E, N]``.
    groups: ``{name: [S] bool}``, disjoint; students in no group are neither checked nor
      escalated.
    check_points: the check attacks the first ``n = min(check_points, N)`` points.
    max_level: escalations at most (0: the check only, nothing escalated).
    threshold: the largest gain of a doubling that counts as converged.

  Returns:
    ``(result, report)``: ``base`` with the escalated levels' successes added, and a
    JSON-able report: ``points`` (``n``), ``threshold``, ``max_level`` and per group its
    ``level`` (escalations run), ``checks`` (``outcomes.doubling``'s group entry at each
    level checked, with its ``level``) and, as the last check's, ``students``, ``cells``,
    ``max_gain``, ``max_gain_cell`` and ``converged``.
  """
  if isinstance(max_level, bool) or not isinstance(max_level, (int, np.integer)) \
      or max_level < 0:
    raise ValueError(f'max_level must be an integer >= 0, got {max_level!r}')
  num, num_points = next(iter(base.success.values())).shape[::2]
  n = min(int(check_points), num_points)
  if n < 1:
    raise ValueError(f'check_points must be >= 1, got {check_points!r}')
  masks = _masks(groups, num)
  taken = sum(m.astype(int) for m in masks.values()) if masks else np.zeros(num, int)
  if np.any(taken > 1):
    raise ValueError('groups must be disjoint; students '
                     f'{np.flatnonzero(taken > 1).tolist()} are in several')
  result = base
  report = {name: {'level': 0, 'checks': []} for name in masks}
  active = [name for name in masks if masks[name].any()]
  for level in range(max_level + 1):
    if not active:
      break
    students = np.flatnonzero(np.any([masks[g] for g in active], axis=0))
    check = run(level + 1, students, 0, n)
    d = outcomes.doubling(take_students(result, students), check,
                          {g: masks[g][students] for g in active}, threshold)
    for g in active:
      report[g]['checks'].append({'level': level, **d['groups'][g]})
    active = [g for g in active if not d['groups'][g]['converged']]
    if not active or level == max_level:
      break
    up = np.flatnonzero(np.any([masks[g] for g in active], axis=0))
    first = take_students(check, np.searchsorted(students, up))
    full = first if n == num_points else concat_points(first, run(level + 1, up, n,
                                                                   num_points))
    result = add_successes(result, full, up)
    for g in active:
      report[g]['level'] = level + 1
  report = {g: r for g, r in report.items() if r['checks']}  # (empty groups: nothing checked)
  for r in report.values():
    r.update({k: v for k, v in r['checks'][-1].items() if k != 'level'})
  return result, {'points': int(n), 'threshold': threshold, 'max_level': int(max_level),
                  'groups': report}


def _masks(groups: Mapping[str, np.ndarray], num: int) -> Dict[str, np.ndarray]:
  masks = {}
  for name, sel in groups.items():
    sel = np.asarray(sel, bool)
    if sel.shape != (num,):
      raise ValueError(f'group {name!r} must be a [{num}] bool mask, got shape {sel.shape}')
    masks[name] = sel
  return masks


def reference_check(run: Callable[[np.ndarray, int, int], Result], result: Result,
                    groups: Mapping[str, np.ndarray], points: int,
                    threshold: float = outcomes.CONVERGED_GAIN) -> Dict[str, Any]:
  """The evaluation against a reference ensemble on each group's first points.

  Args:
    run: ``run(students, start, stop)``: the reference ensemble (e.g.
      ``AttackConfig.with_budget_of('reference')``, keys ``reference_keys``) on those
      students' points ``start:stop``.
    result: the evaluation (escalated groups' successes included), ``[S, E, N]``.
    groups: ``{name: [S] bool}``; students in no group are not attacked.
    points: the first ``n = min(points, N)`` points of every student.
    threshold: the largest gain that counts as agreeing with the reference.

  Returns:
    ``{'points', 'threshold', 'groups'}``, per group ``outcomes.doubling``'s entry with the
    reference in place of the doubled ensemble: per cell ``[evaluation, evaluation and
    reference together]``, ``max_gain``, its cell, and ``converged`` (within ``threshold``
    of the reference: the union is at least as strong as the reference alone).
  """
  num, num_points = next(iter(result.success.values())).shape[::2]
  n = min(int(points), num_points)
  if n < 1:
    raise ValueError(f'points must be >= 1, got {points!r}')
  masks = {g: m for g, m in _masks(groups, num).items() if m.any()}
  if not masks:
    return {'points': n, 'threshold': threshold, 'groups': {}}
  students = np.flatnonzero(np.any(list(masks.values()), axis=0))
  ref = run(students, 0, n)
  d = outcomes.doubling(take_students(result, students), ref,
                        {g: m[students] for g, m in masks.items()}, threshold)
  return {'points': int(n), 'threshold': threshold, 'groups': d['groups']}
