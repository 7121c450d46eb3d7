"""experiments.pair_ladder: the pair attack at growing budgets on a finished robustness run."""

import os

from absl import app
import numpy as np
import pytest

from experiments import pair_ladder
from experiments import robustness
from tsrobust import evaluate
from tsrobust import io

from tests import test_robustness


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A tiny robustness run without the convergence check: its per-attack columns are the
  first attack's, with the run's keys."""
  workdir = str(tmp_path_factory.mktemp('ladder'))
  config = test_robustness.tiny_config(convergence_points=0)
  robustness.train_and_evaluate(config, workdir)
  return workdir, pair_ladder.load_run(workdir)


def test_parse_rung():
  assert pair_ladder.parse_rung('100x9x2') == (100, 9, 2)
  for bad in ('100x9', '0x3x1', '100x3x0', 'ax3x1', ''):
    with pytest.raises(ValueError, match='STEPSxTARGETSxRESTARTS'):
      pair_ladder.parse_rung(bad)


def test_rung_config_keeps_the_criteria_and_runs_the_pair_attack_alone():
  base = evaluate.preset('standard', oracle_tolerance=0.05, pair_momentum=0.6)
  cfg = pair_ladder.rung_config(base, 500, 9, 2)
  assert cfg.attacks_for('oracle') == ('apgd_pair',)
  assert (cfg.pair_steps, cfg.pair_targets, cfg.pair_restarts) == (500, 9, 2)
  assert (cfg.oracle_tolerance, cfg.pair_momentum, cfg.pair_smoothing) == (0.05, 0.6, 0.5)


@pytest.mark.slow
def test_the_first_rung_at_the_runs_budget_repeats_the_runs_pair_attack(finished_run):
  """Known answer: with the run's keys, points and budget, every student's error of the
  first rung is the run's ``adv_oracle_full_<eps>_apgd_pair``."""
  workdir, config = finished_run
  fast = evaluate.preset('fast')
  trained = robustness.trained_students(config, workdir)
  rungs = [(fast.pair_steps, fast.pair_targets, fast.pair_restarts), (40, 2, 2)]
  eps = [float(e) for e in config.eps]
  table = pair_ladder.ladder(trained, config, rungs, config.num_attack, eps)
  rows = io.read_csv(os.path.join(workdir, 'results.csv'))
  assert len(table['groups']) == len(trained.points)
  want = np.array([[r[f'adv_oracle_full_{e}_apgd_pair'] for e in config.eps] for r in rows])
  got = np.concatenate([table['success'][g][0].mean(-1) for g in table['groups']])
  assert want.shape == got.shape == (len(rows), len(eps))
  assert want.max() > 0  # the known answer is not all zeros
  np.testing.assert_allclose(got, want, atol=1e-9)
  # The union is at least every rung, and each rung's mean is its successes'.
  assert table['error'].shape == (len(table['groups']), 2, len(eps))
  assert np.all(table['union'] >= table['error'].max(1) - 1e-12)
  g0 = table['groups'][0]
  np.testing.assert_allclose(table['error'][0], table['success'][g0].mean((1, 3)))
  # A reference after one rung gets the keys of the ladder's second rung: the same successes,
  # outside the union.
  with_ref = pair_ladder.ladder(trained, config, rungs[:1], config.num_attack, eps,
                                reference=rungs[1])
  assert with_ref['reference'] == '40x2x2' and with_ref['rungs'] == [table['rungs'][0]]
  for g in table['groups']:
    np.testing.assert_array_equal(with_ref['reference_success'][g], table['success'][g][1])
    np.testing.assert_array_equal(with_ref['success'][g], table['success'][g][:1])
  np.testing.assert_allclose(with_ref['union'], table['error'][:, 0])
  np.testing.assert_allclose(with_ref['reference_error'], table['error'][:, 1])


@pytest.mark.slow
def test_methods_and_points_select_students(finished_run):
  workdir, config = finished_run
  trained = robustness.trained_students(config, workdir)
  table = pair_ladder.ladder(trained, config, [(5, 1, 1)], 4, [1.0], methods=('at',))
  assert table['groups'] == ['at 0.5 full', 'at 1.0 full', 'at 0.5 in', 'at 1.0 in']
  assert table['success'][table['groups'][0]].shape == (1, config.num_seeds, 1, 4)
  with pytest.raises(ValueError, match='no grid point of methods'):
    pair_ladder.ladder(trained, config, [(5, 1, 1)], 4, [1.0], methods=('nope',))
  with pytest.raises(ValueError, match='points must be in'):
    pair_ladder.ladder(trained, config, [(5, 1, 1)], config.num_attack + 1, [1.0])


def test_unconverged_names_the_cells_the_last_rung_still_raises():
  table = {'groups': ['a', 'b'], 'eps': [1.0, 2.0], 'rungs': ['1x1x1', '2x1x1'],
           'error': np.array([[[0.10, 0.30], [0.105, 0.35]],
                              [[0.50, 0.50], [0.50, 0.52]]])}
  assert pair_ladder.unconverged(table, 0.01) == [('a', 2.0, pytest.approx(0.05)),
                                                  ('b', 2.0, pytest.approx(0.02))]
  assert pair_ladder.unconverged(table, 0.03) == [('a', 2.0, pytest.approx(0.05))]
  assert pair_ladder.unconverged(dict(table, rungs=['1x1x1'], error=table['error'][:, :1]),
                                 0.0) == []


def test_markdown_has_a_row_per_group_and_budget():
  table = {'groups': ['standard', 'at 2.0 full'], 'eps': [1.0, 2.0],
           'rungs': ['100x3x1', '500x9x2'],
           'error': np.array([[[0.1, 0.2], [0.15, 0.25]], [[0.0, 0.12], [0.0, 0.41]]]),
           'union': np.array([[0.16, 0.26], [0.0, 0.44]])}
  text = pair_ladder.markdown(table, 64, 8)
  assert '| grid point | eps | 100x3x1 | 500x9x2 | union |' in text
  assert '| at 2.0 full | 2 | 0.120 | 0.410 | 0.440 |' in text
  assert text.count('\n| ') == 1 + 4  # the header and 2 groups x 2 budgets
  with_ref = dict(table, rungs=['100x3x1'], error=table['error'][:, :1], reference='500x9x2',
                  reference_error=np.array([[0.15, 0.25], [0.0, 0.46]]))
  text = pair_ladder.markdown(with_ref, 64, 8)
  assert '| 100x3x1 | union | reference 500x9x2 | union - reference |' in text
  assert '| at 2.0 full | 2 | 0.120 | 0.440 | 0.460 | -0.020 |' in text


def test_load_run_refuses_a_folder_without_results(tmp_path):
  with pytest.raises(app.UsageError, match='finished experiments.robustness run'):
    pair_ladder.load_run(str(tmp_path))
