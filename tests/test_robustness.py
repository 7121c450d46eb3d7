"""The specialization-robustness study binary on a tiny config."""

import json
import os

import numpy as np
import pytest
import scipy.stats

from experiments import robustness
from experiments import validation
from experiments.configs import robustness as robustness_config
from tsrobust import check_results
from tsrobust import io

TINY = dict(num_seeds=2, d=6, rank=2, teacher_hidden=(3,), out_dim=3, width_mult=2,
            num_steps=40, chunk_steps=40, batch_size=16, num_eval=64, eval_batch=32,
            num_attack=16, attack=dict(strength='fast'), at_steps=2, ccat_steps=2, at_eps=(0.5, 1.0),
            at_where=('full', 'in'), aug_scales=(1.0,), bootstrap_resamples=50)


def tiny_config(**overrides):
  config = robustness_config.get_config()
  config.update(TINY)
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('robustness'))
  return workdir, robustness.train_and_evaluate(tiny_config(), workdir)


@pytest.mark.slow
def test_one_row_per_student_with_hyperparameters(tiny_run):
  workdir, records = tiny_run
  rows = io.read_csv(os.path.join(workdir, 'results.csv'))
  # standard 1 + at 2 eps x 2 where + ccat 1 + orth 1 + iso 1 = 8 grid points, 2 seeds each.
  assert len(rows) == len(records) == 16
  assert check_results.check_file(os.path.join(workdir, 'results.csv')) == ([], 16)
  methods = [r['method'] for r in rows]
  assert methods == [m for m in ('standard', 'at', 'ccat', 'orth', 'iso')
                     for _ in range({'at': 4}.get(m, 1) * 2)]
  at_rows = [r for r in rows if r['method'] == 'at']
  assert sorted({(r['at_eps'], r['at_where']) for r in at_rows}) == [
      (0.5, 'full'), (0.5, 'in'), (1.0, 'full'), (1.0, 'in')]
  assert all(r['at_label'] == 'oracle' for r in at_rows)
  for r in rows:
    assert r['seed'] in (0, 1)
    for key in ('spec_in', 'spec_off', 'wcos_in', 'wcos_off', 'clean_agree',
                'adv_oracle_off_1.0', 'adv_fixed_full_2.0'):
      assert r[key] is not None, key
    ccat_cols = [k for k in r if k.startswith('ccat_err_')]
    assert len(ccat_cols) == 3
    if r['method'] == 'ccat':
      assert all(0.0 <= r[k] <= 1.0 for k in ccat_cols)
      assert 0.0 < r['ccat_threshold'] <= 1.0
      for e in ('0.5', '1.0', '2.0'):  # accepted and wrong is a subset of wrong
        assert r[f'ccat_accepted_wrong_{e}'] <= r[f'adv_oracle_full_{e}'] + 1e-9
    else:
      assert all(r[k] is None for k in ccat_cols)
      assert r['ccat_eps'] is None


@pytest.mark.slow
def test_correlation_file(tiny_run):
  workdir, records = tiny_run
  with open(os.path.join(workdir, 'correlation.json')) as f:
    corr = json.load(f)
  assert corr['n_students'] == 16
  assert corr['bootstrap'] == 'clustered by seed'
  rep = corr['eps_1.0']['spec_off']
  assert rep['n_clusters'] == 2
  assert list(rep['by_method']) == ['standard', 'at', 'ccat', 'orth', 'iso']
  assert rep['by_method']['at']['n'] == 8
  assert {'pearson', 'pearson_ci'} <= set(rep['pooled_within'])
  defined = 0
  for eps in ('0.5', '1.0', '2.0'):
    acc = [1.0 - r[f'adv_oracle_full_{eps}'] for r in records]
    for spec in ('spec_in', 'spec_off', 'spec_mean'):
      rep = corr[f'eps_{eps}'][spec]
      assert set(rep) >= {'pearson', 'pearson_ci', 'spearman', 'spearman_ci'}
      x = [r[spec] if spec != 'spec_mean' else (r['spec_in'] + r['spec_off']) / 2
           for r in records]
      for name, fn in (('pearson', scipy.stats.pearsonr), ('spearman', scipy.stats.spearmanr)):
        if rep[name] is None:  # undefined when a column is constant
          assert np.ptp(acc) == 0 or np.ptp(x) == 0, (eps, spec, name)
        else:  # the pooled estimate is the plain one over the 16 students
          defined += 1
          np.testing.assert_allclose(rep[name], fn(x, acc)[0], atol=1e-6, err_msg=(eps, spec))
          lo, hi = rep[f'{name}_ci']
          assert lo <= hi
  assert defined


@pytest.mark.slow
def test_summary_and_figure(tiny_run):
  workdir, _ = tiny_run
  with open(os.path.join(workdir, 'summary.md')) as f:
    text = f.read()
  lines = text.split('\n\n')[0].strip().splitlines()
  assert lines[0].startswith('| method | at_eps | at_where | ccat_eps | aug_scale | n |')
  assert len(lines) == 2 + 8
  # The correlation tables (pooled, within methods, per method) and the attack checks.
  assert '| robust accuracy | n | Pearson pooled | Spearman pooled | Pearson within |' in text
  assert '## Attack checks (`attack.strength = fast`)' in text
  with open(os.path.join(workdir, 'attack_checks.json')) as f:
    checks = json.load(f)
  # Per grid point (a method and its hyper-parameters), each with its convergence check.
  assert list(checks['groups']) == ['standard', 'at 0.5 full', 'at 1.0 full', 'at 0.5 in',
                                    'at 1.0 in', 'ccat 1.0', 'orth 1.0', 'iso 1.0']
  assert checks['groups']['at 0.5 in']['students'] == 2
  for group in checks['groups'].values():
    assert group['final']['row_violations'] == 0
    doubling = group['doubling']
    assert doubling['points'] == 16 and doubling['students'] == 2  # min(128, num_attack)
    assert set(doubling['cells']) == {f'{l}_{w}_{e:g}' for l in ('oracle', 'fixed')
                                      for w in ('in', 'off', 'full') for e in (0.5, 1.0, 2.0)}
    for before, after in doubling['cells'].values():
      assert 0 <= before <= after <= 1  # the doubled run's successes are added, never removed
    assert doubling['converged'] == (doubling['max_gain'] <= doubling['threshold'])
  assert '### Convergence: the ensemble with every iteration count doubled' in text
  unconverged = [k for k, g in checks['groups'].items() if not g['doubling']['converged']]
  assert (f'**Not converged: {", ".join(unconverged)}.**' in text) == bool(unconverged)
  with open(os.path.join(workdir, 'robustness.png'), 'rb') as f:
    assert f.read(4) == b'\x89PNG'


def test_grid_is_grouped_by_method():
  points = robustness.grid(tiny_config(methods=('orth', 'standard'), aug_scales=(0.5, 2.0)))
  assert points == [('orth', {'aug_scale': 0.5}), ('orth', {'aug_scale': 2.0}),
                    ('standard', {})]


@pytest.mark.parametrize('field, value, message', [
    ('rank', 6, 'config.rank must satisfy 1 <= rank < d = 6'),
    ('methods', ('standard', 'trades'), 'config.methods must be distinct names from'),
    ('at_where', ('off',), 'config.at_where must be distinct names from'),
    ('at_eps', (-0.5,), 'config.at_eps values must be >= 0'),
    ('aug_fraction', 1.5, 'config.aug_fraction must be <= 1'),
    ('at_label', 'soft', 'config.at_label must be one of'),
    ('num_seeds', 0, 'config.num_seeds must be >= 1'),
])
def test_bad_config_fails_at_start(tmp_path, field, value, message):
  with pytest.raises(validation.ConfigError) as info:
    robustness.train_and_evaluate(tiny_config(**{field: value}), str(tmp_path))
  assert message in str(info.value)
  assert not os.listdir(tmp_path)
