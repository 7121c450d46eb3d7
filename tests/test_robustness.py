"""The specialization-robustness study binary on a tiny config."""

import json
import os

import jax
import numpy as np
import pytest
import scipy.stats

from experiments import robustness
from experiments import study
from experiments import summaries
from experiments import validation
from experiments.configs import robustness as robustness_config
from tsrobust import check_results
from tsrobust import clustered
from tsrobust import io
from tsrobust import lowrank

# One student of each of 2 teachers (the default is 2 of each of 4: test_students_per_teacher).
TINY = dict(num_seeds=2, students_per_teacher=1, d=6, rank=2, teacher_hidden=(3,), out_dim=3,
            width_mult=2,
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
  with open(os.path.join(workdir, 'results.csv')) as f:
    assert f.readline().startswith('method,at_eps,at_where,at_label,ccat_eps,aug_scale,'
                                   'teacher,seed,')
  for r in rows:
    assert r['seed'] in (0, 1)
    assert r['teacher'] == r['seed']  # one student per teacher
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
  assert corr['bootstrap'] == 'clustered by teacher'
  assert corr['n_teachers'] == 2 and corr['students_per_teacher'] == 1
  rep = corr['eps_1.0']['spec_off']
  assert rep['n_clusters'] == 2 and rep['bootstrap'] == 'clustered by teacher'
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
  assert ('## Teacher-level inference (2 teachers x 1 student(s) per teacher per grid point)'
          in text)
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
  assert ('### Convergence: the ensemble with every iteration, query and target count '
          'doubled') in text
  unconverged = [k for k, g in checks['groups'].items() if not g['doubling']['converged']]
  assert (f'**Not converged: {", ".join(unconverged)}.**' in text) == bool(unconverged)
  with open(os.path.join(workdir, 'robustness.png'), 'rb') as f:
    assert f.read(4) == b'\x89PNG'


def _interval_cells(line):
  """``(estimate, lo, hi)`` of each ``0.1 [0.0, 0.2]`` cell of a table row."""
  out = []
  for cell in line.strip('|').split('|'):
    if '[' in cell:
      out.append(tuple(float(v) for v in cell.replace('[', ' ').replace(']', ' ')
                       .replace(',', ' ').split()))
  return out


def test_default_design_replicates_teachers_and_students():
  """The default design (issue 31): >= 3 teachers, >= 2 students of each per grid point, so
  that claim 4's rule finds a cell of >= 4 students per teacher and family wherever a
  family is graded over >= 2 budgets or scales; the attacked points per grid point are those
  of 4 students x 512 points, each student attacked on 256."""
  c = robustness_config.get_config()
  teachers, k = c.num_seeds // c.students_per_teacher, c.students_per_teacher
  assert c.num_seeds % k == 0 and teachers >= 3 and k >= 2
  assert k * min(len(c.at_eps), len(c.aug_scales)) >= 4
  assert (c.num_seeds * c.num_attack, c.convergence_points) == (4 * 512, 64)
  robustness.validate_config(c)


@pytest.mark.slow
def test_students_per_teacher(tmp_path):
  """Two students per teacher: the teacher column, students of one teacher share its
  network and subspace, and the teacher-level sections (intervals, paired differences
  against standard training, the correlation within grid points) with finite numbers."""
  config = tiny_config(num_seeds=4, students_per_teacher=2, methods=('standard', 'at', 'orth'),
                       at_eps=(1.0,), at_where=('full',), num_steps=20, chunk_steps=20)
  workdir = str(tmp_path)
  records = robustness.train_and_evaluate(config, workdir)
  assert [(r['method'], r['teacher'], r['seed']) for r in records] == [
      (m, s // 2, s) for m in ('standard', 'at', 'orth') for s in range(4)]
  rows = io.read_csv(os.path.join(workdir, 'results.csv'))
  assert [r['teacher'] for r in rows] == [0, 0, 1, 1] * 3
  keys = study.seed_keys(config)
  problem = lowrank.build_problem(study.setting(config), keys)
  leaves = lambda i: [np.asarray(v[i]) for v in jax.tree_util.tree_leaves(problem.teacher_params)]
  for a, b, same in ((0, 1, True), (2, 3, True), (0, 2, False)):
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b))) == same
    assert np.array_equal(problem.bases[a], problem.bases[b]) == same
    assert not np.array_equal(keys.student[a], keys.student[b])
  with open(os.path.join(workdir, 'correlation.json')) as f:
    corr = json.load(f)
  assert corr['n_teachers'] == 2 and corr['students_per_teacher'] == 2
  assert corr['eps_1.0']['spec_off']['n_clusters'] == 2  # the bootstrap resamples teachers
  tl = corr['teacher_level']
  assert list(tl['oracle_error']) == ['standard', 'at 1.0 full', 'orth 1.0']
  for name, g in tl['oracle_error'].items():
    assert (g['teachers'], g['students']) == (2, 4)
    for column, rep in g['columns'].items():
      assert rep['num_teachers'] == 2 and np.isfinite(rep['ci']).all(), (name, column)
      members = [r for r in records if robustness.grid_point_of(r) == name]
      means = [np.mean([r[column] for r in members if r['teacher'] == t]) for t in (0, 1)]
      np.testing.assert_allclose(rep['teacher_means'], means, atol=1e-12)
  assert list(tl['paired_vs_standard']) == ['at 1.0 full', 'orth 1.0']
  for by_col in tl['paired_vs_standard'].values():
    assert set(by_col) == {'adv_oracle_full_1.0', 'adv_oracle_off_1.0'}
    for rep in by_col.values():
      assert rep['num_teachers'] == 2 and np.isfinite(rep['ci']).all()
  for rep in tl['within_grid_points']['by_robust_accuracy'].values():
    g = rep['groups']
    assert len(g['groups']) == 3 and g['num_members'] <= 12
    if g['estimate'] is not None:
      assert -1 <= g['ci'][0] <= g['estimate'] <= g['ci'][1] <= 1
    # 2 students per (teacher, grid point) cell: too few for a correlation within one.
    tg = rep['teacher_x_group']
    assert tg['skipped']['too_small'] == 6 and tg['teacher_level']['estimate'] is None
  with open(os.path.join(workdir, 'summary.md')) as f:
    text = f.read()
  section = text.split('## Teacher-level inference (2 teachers x 2 student(s) per teacher '
                       'per grid point)')[1].split('## Attack checks')[0]
  tables = [t for t in section.split('\n\n') if t.startswith('|')]
  assert len(tables) == 3
  intervals, paired, within = [t.splitlines() for t in tables]
  assert intervals[0].startswith('| grid point | teachers | students | `adv_oracle_in_1.0` |')
  assert [line.split('|')[1].strip() for line in intervals[2:]] == [
      'standard', 'at 1.0 full', 'orth 1.0']
  assert paired[0] == ('| grid point | teachers | `adv_oracle_full_1.0` minus standard | '
                       '`adv_oracle_off_1.0` minus standard |')
  assert within[0].startswith('| robust accuracy | grid points used | students | '
                              'within grid points (Fisher z) |')
  for line in intervals[2:] + paired[2:]:
    cells = _interval_cells(line)
    assert cells and all(np.isfinite(c).all() and c[1] <= c[0] <= c[2] for c in cells), line
  assert len(within) == 2 + 3


def _fake_records(num_teachers, students_per_teacher):
  """Records of 3 grid points: error = grid effect + teacher level + student noise."""
  records = []
  for method, hp, effect in (('standard', {}, 0.5), ('at', {'at_eps': 1.0, 'at_where': 'in'},
                                                     0.3), ('orth', {'aug_scale': 1.0}, 0.45)):
    for seed in range(num_teachers * students_per_teacher):
      t = seed // students_per_teacher
      err = effect + 0.1 * t + 0.01 * ((7 * seed) % 5)
      row = {'method': method, 'at_eps': None, 'at_where': None, 'aug_scale': None,
             'ccat_eps': None, **hp, 'teacher': t, 'seed': seed,
             'spec_off': 0.2 + 0.05 * ((3 * seed) % 4) + effect}
      for e in ('0.5', '1.0', '2.0'):
        for where in ('in', 'off', 'full'):
          row[f'adv_oracle_{where}_{e}'] = err * {'0.5': 0.5, '1.0': 1.0, '2.0': 1.5}[e]
      records.append(row)
  return records


def test_teacher_level_inference_on_known_records():
  """robustness.teacher_level is clustered's functions on the records, per grid point."""
  config = tiny_config()
  records = _fake_records(num_teachers=4, students_per_teacher=1)
  tl = robustness.teacher_level(config, records)
  assert list(tl['oracle_error']) == ['standard', 'at 1.0 in', 'orth 1.0']
  at = [r for r in records if r['method'] == 'at']
  want = clustered.teacher_mean_interval([r['adv_oracle_full_2.0'] for r in at], [0, 1, 2, 3])
  got = tl['oracle_error']['at 1.0 in']['columns']['adv_oracle_full_2.0']
  assert got['estimate'] == pytest.approx(want['estimate'])
  np.testing.assert_allclose(got['ci'], want['ci'])
  # Paired: AT - standard is -0.2 for every teacher (the teacher level cancels) up to the
  # students' noise, which is the same seed's at both grid points: exactly -0.2.
  diff = tl['paired_vs_standard']['at 1.0 in']['adv_oracle_full_1.0']
  np.testing.assert_allclose(diff['differences'], [-0.2] * 4, atol=1e-12)
  assert diff['ci'][0] == pytest.approx(-0.2) and diff['ci'][1] == pytest.approx(-0.2)
  within = tl['within_grid_points']['by_robust_accuracy']['1 - adv_oracle_full_1.0']
  assert within['groups']['num_groups'] == 3
  want = clustered.pooled_within_correlation(
      [r['spec_off'] for r in records], [1 - r['adv_oracle_full_1.0'] for r in records],
      [robustness.grid_point_of(r) for r in records])
  assert within['groups']['estimate'] == pytest.approx(want['estimate'])
  assert within['teacher_x_group']['teacher_level']['estimate'] is None  # cells of 1 student
  # One shared teacher: estimates without intervals; no standard: no paired differences.
  shared = [dict(r, teacher=0) for r in records if r['method'] != 'standard']
  tl = robustness.teacher_level(config, shared)
  assert tl['paired_vs_standard'] is None
  rep = tl['oracle_error']['orth 1.0']['columns']['adv_oracle_full_1.0']
  assert rep['ci'] is None and rep['estimate'] == pytest.approx(
      np.mean([r['adv_oracle_full_1.0'] for r in shared if r['method'] == 'orth']))
  text = robustness.teacher_level_markdown(
      config, {'teacher_level': tl, 'n_teachers': 1, 'students_per_teacher': 4})
  assert 'No `standard` grid point: no paired differences' in text
  assert '| orth 1.0 | 1 | 4 |' in text


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
    ('students_per_teacher', 0, 'config.students_per_teacher must be >= 1'),
    ('students_per_teacher', 4, 'config.num_seeds must be a multiple of '
     'config.students_per_teacher = 4 (the students of each teacher), got 2'),
])
def test_bad_config_fails_at_start(tmp_path, field, value, message):
  with pytest.raises(validation.ConfigError) as info:
    robustness.train_and_evaluate(tiny_config(**{field: value}), str(tmp_path))
  assert message in str(info.value)
  assert not os.listdir(tmp_path)


def test_reference_table_says_which_attack_found_the_gain():
  """The reference check's table names the attacks that raise the largest-gain cell alone."""
  check = lambda gains, converged: {
      'points': 4, 'threshold': 0.01, 'students': 2, 'converged': converged,
      'cells': {'oracle_full_1': [0.25, 0.75]}, 'max_gain': 0.5,
      'max_gain_cell': 'oracle_full_1', 'gain_by_attack': gains}
  summary = {'groups': {
      'at 2.0 full': {'headline_eps': 1.0, 'reference': check(
          {'apgd': 0.0, 'apgd_pair': 0.5, 'square': 0.25}, False)},
      'standard': {'headline_eps': 1.0, 'reference': check({'apgd': 0.0}, True)}}}
  rows = summaries.reference_markdown(summary).splitlines()
  assert ('| at 2.0 full | 2 | 0.250 / 0.750 | `oracle_full_1` | 0.250 / 0.750 | '
          '`apgd_pair` +0.500, `square` +0.250 | **no** |') in rows
  assert '| standard | 2 | 0.250 / 0.750 | `oracle_full_1` | 0.250 / 0.750 | - | yes |' in rows
