"""benchmarks/attack_strength.py: ``PRESET+escalation``, our default as the binaries run it.

A linear two-class network in 64 dimensions attacked by Square alone with 20 queries: each
doubling of the queries finds more, so the binaries' convergence check fails and the
escalation must attack harder (and a budget too small to break anything converges at once).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attack_strength
from tsrobust import evaluate

# Square alone, few queries: far from converged on the points below.
WEAK = evaluate.AttackConfig(pgd_steps=0, apgd_steps=0, apgd_t_steps=0, square_queries=20)


def _apply(params, x):
  z = x @ params['w']
  return jnp.stack([z, -z], -1), ()


def _network(eps):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(64,)).astype(np.float32)
  w /= np.linalg.norm(w)
  x = rng.normal(size=(64, 64)).astype(np.float32)
  labels = (x @ w < 0).astype(np.int32)
  return attack_strength.Network('tiny', _apply, {'w': jnp.asarray(w)}, x, labels, 'fixed',
                                 'l2', eps, None, None, None, None, None)


def test_parse_strength_and_the_binaries_check_settings():
  assert attack_strength.parse_strength('standard') == ('standard', False)
  assert attack_strength.parse_strength('standard+escalation') == ('standard', True)
  with pytest.raises(ValueError, match='strength'):
    attack_strength.parse_strength('huge+escalation')
  assert attack_strength.escalation_setting('cnn_at') == (25, 3)  # the image study's
  # The robustness study's: 64 of each student's 256 points (2 students per teacher).
  assert attack_strength.escalation_setting('mlp_at') == (64, 3)
  assert attack_strength.escalation_setting('mlp') == (128, 3)  # the low-rank study's


def test_escalation_attacks_harder_where_the_preset_has_not_converged():
  net = _network((0.5, 1.0))
  plain, _ = attack_strength.ours(net, 'weak', 0, config=WEAK)
  rows, _, report = attack_strength.ours_escalated(net, 'weak+escalation', 0, 32, 2,
                                                   config=WEAK)
  assert set(rows) == {r.replace('weak', 'weak+escalation') for r in plain}
  for name, s in plain.items():  # every success of the preset is kept ...
    assert (rows[name.replace('weak', 'weak+escalation')] >= s).all(), name
  esc = rows['ours weak+escalation: ensemble'].mean(-1)
  base = plain['ours weak: ensemble'].mean(-1)
  assert (esc > base).any(), (esc, base)  # ... and the escalation adds some
  assert report['points'] == 32 and report['max_level'] == 2
  assert report['level'] == 2, report  # 2x and 4x both found more than 0.01 more
  assert [c['level'] for c in report['checks']] == [0, 1, 2]
  assert report['checks'][0]['max_gain'] > 0.01
  # The check's level-0 cells are the preset's errors on the first 32 points.
  first = plain['ours weak: ensemble'][:, :32].mean(-1)
  np.testing.assert_allclose([report['checks'][0]['cells'][f'fixed_full_{e:g}'][0]
                              for e in net.eps], first)
  notes = attack_strength.escalation_notes(net, 'weak+escalation', report)
  assert 'level reached 2 (ensemble at 4x on every point)' in notes[0]
  assert len(notes) == 4 and 'check at 2x (level 0)' in notes[1]


def test_a_converged_preset_is_not_escalated():
  net = _network((1e-3,))  # nothing breaks: the check finds nothing more
  plain, _ = attack_strength.ours(net, 'weak', 0, config=WEAK)
  rows, _, report = attack_strength.ours_escalated(net, 'weak+escalation', 0, 100, 3,
                                                   config=WEAK)
  assert report['level'] == 0 and report['converged'] and report['points'] == 64
  for name, s in plain.items():
    np.testing.assert_array_equal(rows[name.replace('weak', 'weak+escalation')], s)
