"""escalation.escalate: the convergence check per group, and attacking harder where it fails.

A known answer: every (student, point) has a hardness ``h``, and the ensemble at level ``L``
(``scaled(2 ** L)``) breaks a point iff ``h <= L``. So a group's error after escalating to
level ``L`` is the fraction of its points with ``h <= L``, and it converges at the first
level whose next doubling adds at most the threshold.
"""

import jax
import numpy as np
import pytest

from tsrobust import escalation
from tsrobust import evaluate
from tsrobust import rng

NEVER = 99
EPS = (0.5, 1.0)


def _hardness():
  """6 students x 8 points: group a (students 0, 1) breaks at level 0; group b (2, 3) has
  a quarter of its points breaking at level 1, the rest never; group c (4, 5) breaks one
  more point at every level (never converges); student order interleaves nothing."""
  h = np.full((6, 8), NEVER)
  h[0:2, :] = 0
  h[2:4, [0, 5]] = 1   # one point of the first 4 (the check's), one beyond
  h[4:6, :] = np.arange(8)
  return h


def _result(h, level, students, start, stop):
  broken = h[students, start:stop] <= level
  s = np.repeat(broken[:, None, :], len(EPS), axis=1)
  return evaluate.Result(eps=EPS, success={('oracle', 'full', 'apgd'): s}, accepted={},
                         first_success={},
                         clean={'oracle': np.zeros(broken.shape, bool)})


GROUPS = {'a': np.array([1, 1, 0, 0, 0, 0], bool), 'b': np.array([0, 0, 1, 1, 0, 0], bool),
          'c': np.array([0, 0, 0, 0, 1, 1], bool)}


def _escalate(max_level, check_points=4):
  h = _hardness()
  calls = []

  def run(level, students, start, stop):
    calls.append((level, tuple(students.tolist()), start, stop))
    return _result(h, level, students, start, stop)
  base = _result(h, 0, np.arange(6), 0, 8)
  result, report = escalation.escalate(run, base, GROUPS, check_points, max_level)
  return result, report, calls


def _errors(result):
  err = evaluate.error_rates(evaluate.combine(result))[('oracle', 'full')][:, -1]
  return {g: float(err[m].mean()) for g, m in GROUPS.items()}


def test_known_answer_levels_and_errors():
  result, report, calls = _escalate(max_level=3)
  groups = report['groups']
  assert report['points'] == 4 and report['max_level'] == 3
  # a: converged at once, never escalated; b: one escalation, then converged.
  assert (groups['a']['level'], groups['a']['converged']) == (0, True)
  assert (groups['b']['level'], groups['b']['converged']) == (1, True)
  assert [c['converged'] for c in groups['b']['checks']] == [False, True]
  # c: every doubling finds one more point of the first 4 until they are all broken
  # (levels 0..3 break points 0..3; the check at level 4 finds nothing new there).
  assert groups['c']['level'] == 3
  assert [c['level'] for c in groups['c']['checks']] == [0, 1, 2, 3]
  assert groups['c']['converged']
  # The errors on ALL points: b finds its point beyond the check's four (point 5) too.
  assert _errors(result) == {'a': 1.0, 'b': 0.25, 'c': 0.5}
  # Escalation reuses the check's first points and attacks only the rest, only of the
  # groups that failed; group a's students are never escalated.
  assert calls[0] == (1, (0, 1, 2, 3, 4, 5), 0, 4)
  assert calls[1] == (1, (2, 3, 4, 5), 4, 8)
  assert all(0 not in c[1] and 1 not in c[1] for c in calls[1:])


def test_not_converged_at_the_last_level_says_so():
  result, report, _ = _escalate(max_level=1)
  c = report['groups']['c']
  assert c['level'] == 1 and not c['converged']
  assert c['cells']['oracle_full_1'] == [0.5, 0.75]  # levels 0-1 vs + level 2, first 4 points
  assert _errors(result)['c'] == 0.25  # a lower bound, and the report says it is one


def test_no_escalation_is_the_plain_check_and_changes_nothing():
  base = _result(_hardness(), 0, np.arange(6), 0, 8)
  result, report, calls = _escalate(max_level=0)
  assert len(calls) == 1
  for k, v in base.success.items():
    np.testing.assert_array_equal(result.success[k], v)
  plain = evaluate.doubling(base, _result(_hardness(), 1, np.arange(6), 0, 4), GROUPS)
  for g in GROUPS:
    assert report['groups'][g]['cells'] == plain['groups'][g]['cells']
    assert report['groups'][g]['converged'] == plain['groups'][g]['converged']


def test_check_on_all_points_needs_no_second_run():
  _, report, calls = _escalate(max_level=3, check_points=8)
  assert all(c[2:] == (0, 8) for c in calls)
  assert report['groups']['c']['level'] == 3 and not report['groups']['c']['converged']


def test_escalation_keys():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  one = escalation.escalation_keys(keys, 1)
  np.testing.assert_array_equal(
      one, jax.vmap(lambda k: jax.random.fold_in(k, rng.CONVERGENCE_CHECK))(keys))
  two = escalation.escalation_keys(keys, 2)
  assert not np.array_equal(one, two)
  with pytest.raises(ValueError, match='level'):
    escalation.escalation_keys(keys, 0)


@pytest.mark.parametrize('kwargs, match', [
    (dict(max_level=-1), 'max_level'),
    (dict(check_points=0), 'check_points'),
    (dict(groups={'x': np.ones(5, bool)}), r"group 'x' must be a \[6\] bool mask"),
    (dict(groups={'x': np.ones(6, bool), 'y': np.ones(6, bool)}), 'disjoint'),
])
def test_bad_input(kwargs, match):
  base = _result(_hardness(), 0, np.arange(6), 0, 8)
  args = dict(groups=GROUPS, check_points=4, max_level=1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    escalation.escalate(lambda *a: None, base, **args)


def test_add_successes_and_concat_points():
  h = _hardness()
  a, b = _result(h, 1, np.array([2, 3]), 0, 4), _result(h, 1, np.array([2, 3]), 4, 8)
  whole = escalation.concat_points(a, b)
  np.testing.assert_array_equal(whole.success[('oracle', 'full', 'apgd')],
                                _result(h, 1, np.array([2, 3]), 0, 8).success[
                                    ('oracle', 'full', 'apgd')])
  base = _result(h, 0, np.arange(6), 0, 8)
  out = escalation.add_successes(base, whole, np.array([2, 3]))
  s = out.success[('oracle', 'full', 'apgd')]
  assert s[2:4, :, [0, 5]].all() and s[2:4].sum() == 2 * 2 * len(EPS)
  np.testing.assert_array_equal(s[[0, 1, 4, 5]], base.success[('oracle', 'full', 'apgd')][
      [0, 1, 4, 5]])
  assert not base.success[('oracle', 'full', 'apgd')][2:4].any()  # base is not modified
  with pytest.raises(ValueError, match='not in the evaluation'):
    other = evaluate.Result(eps=EPS, success={('oracle', 'full', 'pgd'): whole.success[
        ('oracle', 'full', 'apgd')]}, accepted={}, first_success={}, clean=whole.clean)
    escalation.add_successes(base, other, np.array([2, 3]))


# ---------------------------------------------------------------------------------------
# Through the low-rank evaluator: a weak ensemble on random students (it has not converged).
# ---------------------------------------------------------------------------------------


def _evaluate(max_escalations):
  from tsrobust import lowrank, lowrank_eval  # pylint: disable=g-import-not-at-top
  setting = lowrank.Setting(d=8, teacher_hidden=(4,), out_dim=3, width_mult=2)
  keys = lowrank.seed_keys(0, 4, True)
  problem = lowrank.build_problem(setting, keys)
  weak = evaluate.AttackConfig(pgd_steps=1, apgd_steps=0, apgd_t_steps=0, square_queries=0)
  ev_setting = lowrank_eval.EvalSetting(eps=(0.25, 0.5), num_eval=64, eval_batch=64,
                                        num_attack=16, convergence_points=8,
                                        max_escalations=max_escalations)
  evaluator = lowrank_eval.LowRankEvaluator(ev_setting, weak, problem.teacher, problem.student)
  projector = lowrank.rank_projector(problem.bases, 3)
  held = evaluator.held_out(projector, np.ones(4, np.float32), keys.eval)
  # Groups of 1 and 3 students: the escalated runs pad them to the devices.
  groups = {'one': np.array([1, 0, 0, 0], bool), 'three': np.array([0, 1, 1, 1], bool)}
  params, tparams, proj, held = evaluator.shard((problem.student_params, problem.teacher_params,
                                                 projector, held))
  return evaluator.attack(params, tparams, proj, held, full_rank=False, groups=groups), groups


@pytest.fixture(scope='module')
def evaluations():
  return _evaluate(0), _evaluate(2)


def test_the_evaluator_escalates_only_unconverged_groups(evaluations):
  (plain, groups), (esc, _) = evaluations
  escalated = [g for g, r in esc.convergence['groups'].items() if r['level'] > 0]
  assert escalated, 'a one-step PGD on random students should not have converged'
  for g, sel in groups.items():
    r0, r = plain.convergence['groups'][g], esc.convergence['groups'][g]
    assert r['checks'][0]['cells'] == r0['cells']  # level 0's check is the plain check
    for k, v in plain.result.success.items():
      if r['level'] == 0:  # converged at once: attacked exactly as without escalation
        np.testing.assert_array_equal(esc.result.success[k][sel], v[sel])
      else:  # every success of level 0 is kept, and the escalation adds some
        assert (esc.result.success[k][sel] >= v[sel]).all()
    if r['level'] > 0:
      gain = sum(int(esc.result.success[k][sel].sum() - v[sel].sum())
                 for k, v in plain.result.success.items())
      assert gain > 0
      assert len(r['checks']) == r['level'] + 1
  final_plain = evaluate.error_rates(plain.final)
  final_esc = evaluate.error_rates(esc.final)
  for k, v in final_plain.items():
    assert (final_esc[k] >= v - 1e-12).all()


def test_reference_check_known_answer():
  h = _hardness()
  base = _result(h, 0, np.arange(6), 0, 8)
  result, _ = escalation.escalate(lambda lv, st, a, b: _result(h, lv, st, a, b), base, GROUPS,
                                  4, 1)
  seen = []

  def reference(students, start, stop):  # as strong as level 5
    seen.append((tuple(students.tolist()), start, stop))
    return _result(h, 5, students, start, stop)
  ref = escalation.reference_check(reference, result, GROUPS, 4)
  assert seen == [((0, 1, 2, 3, 4, 5), 0, 4)]
  g = ref['groups']
  assert g['a']['converged'] and g['b']['converged']  # a breaks at 0, b's point at 1
  # c escalated to level 1 breaks points 0-1 of the first four; level 5 breaks all four.
  assert g['c']['cells']['oracle_full_1'] == [0.5, 1.0] and not g['c']['converged']
  with pytest.raises(ValueError, match='points'):
    escalation.reference_check(reference, result, GROUPS, 0)


def test_with_budget_of_keeps_the_criteria():
  cfg = evaluate.preset('fast', oracle_tolerance=0.05, oracle_loss='mse', pair_smoothing=0.0,
                        pair_momentum=0.75)
  ref = cfg.with_budget_of('reference')
  assert (ref.oracle_tolerance, ref.oracle_loss, ref.pair_smoothing, ref.pair_momentum) == (
      0.05, 'mse', 0.0, 0.75)
  assert (ref.square_queries, ref.pair_restarts) == (10000, 2)
  with pytest.raises(ValueError, match='strength'):
    cfg.with_budget_of('huge')
