"""What an evaluation found: ``Result``, the worst case over its attacks, and its records.

``evaluate.Evaluator.run`` returns a ``Result``: per example, which attack of the
ensemble (``ensemble``) succeeded, per label kind, subspace and budget. This module
turns it into the evaluation's errors and what is reported of them, all numpy, host
side: ``combine`` (the worst case per example, the nesting invariants made to hold by
construction; ``raw_ensemble`` without them), ``error_rates``, ``ccat_error``,
``attack_checks`` (the raw attacks' diagnostics), ``doubling`` (has the ensemble
converged?, with ``first_points`` and ``merge``), and the result records (``columns``,
``records``, ``merge_ccat``, ``ccat_records``). ``evaluate`` re-exports this module's
names.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import chex
import numpy as np

from tsrobust.ensemble import ORACLE_ONLY_ATTACKS

__all__ = ['CONVERGED_GAIN', 'Result', 'raw_ensemble', 'combine', 'error_rates', 'ccat_error',
           'attack_checks', 'first_points', 'merge', 'doubling', 'columns', 'records',
           'merge_ccat', 'ccat_records']


@dataclasses.dataclass
class Result:
  """Raw per-example outcomes of ``evaluate.Evaluator.run`` (numpy).

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
                  convergence: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Diagnostics of the raw attacks, before the invariants were enforced.

  Args:
    result, final: ``evaluate.Evaluator.run`` output and ``combine(result)``.
    headline: the budget whose convergence is reported.
    attacks_run: the attacks of the ensemble.
    convergence_points: APGD iteration counts of the convergence curve.
    rows: ``[S]`` bool, the students to count (e.g. one method's); default all.
    convergence: this group's convergence check (``escalation.escalate``'s report: its
      ``points``, ``threshold`` and ``max_level``, and the group's entry as ``group``).

  Returns:
    A JSON-able dict: per attack and for the raw ensemble, the per-example
    violations of the invariants (``non_monotone_in_eps``,
    ``subspace_not_in_full``) and the row violations counted as
    ``check_invariants.py`` does; per (label, where, eps) the fraction of
    points broken only by Square and by each attack; the convergence of APGD
    (error after k iterations, untargeted APGD alone, full space, at the
    headline budget) beside the ensemble's error; with ``convergence``, ``doubling``: the
    group's last check (``doubling``'s entry, with ``points``, ``threshold``, ``max_level``,
    the escalation ``level`` reached and every level's ``checks``).
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
  if convergence is not None:
    out['doubling'] = {k: convergence[k] for k in ('points', 'threshold', 'max_level')}
    out['doubling'].update(convergence['group'])
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
    base: the evaluation (``evaluate.Evaluator.run``), ``[S, E, N]``.
    doubled: the same students attacked again on their first ``n <= N`` points by the
      ensemble with every iteration, query and target count doubled
      (``ensemble.AttackConfig.scaled(2)``) and other random keys, ``[S, E, n]``.
    groups: ``{name: [S] bool}`` the students of each group (e.g. a method's grid point).
    threshold: the largest gain that counts as converged.

  Returns:
    A JSON-able dict: ``points`` (``n``), ``threshold``, and per group its ``students``,
    per cell ``label_where_eps`` the error ``[base, base and doubled together]`` on those
    points (``combine``d: the invariants hold in both), the largest gain ``max_gain`` and
    its cell ``max_gain_cell``, ``gain_by_attack`` (the gain in that cell when only one
    attack of ``doubled`` is added, per attack: which attack finds what the base missed),
    and ``converged`` (``max_gain <= threshold``). A group that has not converged reports
    lower bounds of its error.
  """
  n = next(iter(doubled.success.values())).shape[-1]
  base_n = first_points(base, n)
  before = error_rates(combine(base_n))
  after = error_rates(combine(merge(base_n, doubled)))
  attacks_run = sorted({a for _, _, a in doubled.success})
  after_one = {a: error_rates(combine(merge(base_n, _only_attack(doubled, a))))
               for a in attacks_run}
  index = {f'{label}_{where}_{e:g}': (label, where, ei) for label, where in before
           for ei, e in enumerate(base.eps)}
  out = {'points': int(n), 'threshold': threshold, 'groups': {}}
  for name, sel in groups.items():
    sel = np.asarray(sel, bool)
    cells, best, best_cell = {}, 0.0, None
    for cell, (label, where, ei) in index.items():
      b = float(before[(label, where)][sel, ei].mean())
      a = float(after[(label, where)][sel, ei].mean())
      cells[cell] = [b, a]
      if best_cell is None or a - b > best:
        best, best_cell = a - b, cell
    label, where, ei = index[best_cell]
    by_attack = {a: float(r[(label, where)][sel, ei].mean()) - cells[best_cell][0]
                 for a, r in after_one.items()}
    # (1e-9: a gain of exactly the threshold, e.g. one point of 100, is 0.010000000000000009.)
    out['groups'][name] = {'students': int(sel.sum()), 'cells': cells, 'max_gain': best,
                           'max_gain_cell': best_cell, 'gain_by_attack': by_attack,
                           'converged': bool(best <= threshold + 1e-9)}
  return out


def _only_attack(result: Result, attack: str) -> Result:
  """``result`` with only ``attack``'s successes (its clean errors kept)."""
  keep = lambda d: {k: v for k, v in d.items() if k[2] == attack}
  return Result(eps=result.eps, success=keep(result.success), accepted=keep(result.accepted),
                first_success={}, clean=result.clean, clean_accepted=result.clean_accepted)


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
