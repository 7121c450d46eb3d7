"""benchmarks/convergence.py: per-group comparison of runs at two attack strengths (known answers)."""

import pytest

from benchmarks import convergence
from tsrobust import io


def _run(errors, spec=1.0):
  """Two grid points x two seeds; ``errors[(method, seed)]`` = adv_oracle_full_1.0."""
  rows = [{'method': m, 'at_eps': e, 'seed': float(s), 'spec_in': spec,
           'adv_oracle_full_1.0': errors[(m, s)], 'adv_oracle_full_1.0_pgd': 0.0,
           'robust_acc_oracle_0.1': 1.0 - errors[(m, s)]}
          for m, e in (('standard', None), ('at', 0.5)) for s in range(2)]
  return rows, list(rows[0])


BASE = {('standard', 0): 0.8, ('standard', 1): 0.9, ('at', 0): 0.1, ('at', 1): 0.2}


def test_compare_known_answer():
  stronger = {('standard', 0): 0.8, ('standard', 1): 0.91, ('at', 0): 0.3, ('at', 1): 0.4}
  out = convergence.compare([_run(BASE), _run(stronger)], tolerance=0.01)
  std, at = out['groups']['method=standard'], out['groups']['method=at, at_eps=0.5']
  assert std['students'] == 2 and std['converged']
  assert std['cells']['oracle_full_1.0'] == pytest.approx([0.85, 0.855])
  assert not at['converged'] and at['max_gain'] == pytest.approx(0.2)
  assert at['max_gain_cell'] in ('oracle_full_1.0', 'oracle_full_0.1')
  # robust_acc columns count as errors 1 - acc; per-attack columns are not cells.
  assert at['cells']['oracle_full_0.1'] == pytest.approx([0.15, 0.35])
  assert set(at['cells']) == {'oracle_full_1.0', 'oracle_full_0.1'}
  assert out['differing_columns'] == []
  table = convergence.markdown(out, ['a', 'b'])
  assert '| method=at, at_eps=0.5 | 2 |' in table and '**no**' in table


def test_other_students_are_reported():
  out = convergence.compare([_run(BASE), _run(BASE, spec=0.9)])
  assert out['differing_columns'] == ['spec_in']


def test_reads_result_files(tmp_path):
  for name, errors in (('a', BASE), ('b', BASE)):
    rows, cols = _run(errors)
    io.write_csv(str(tmp_path / name / 'results.csv'), rows, cols)
  runs = [convergence._read(str(tmp_path / n)) for n in 'ab']  # pylint: disable=protected-access
  out = convergence.compare(runs)
  assert all(g['converged'] and g['max_gain'] == 0 for g in out['groups'].values())
  with pytest.raises(ValueError, match='no results.csv'):
    convergence._read(str(tmp_path / 'missing'))  # pylint: disable=protected-access
