"""tsrobust.check_results: the invariants of robust errors, known answers and the command."""

import os
import subprocess
import sys

from tsrobust import check_results
from tsrobust import io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_consistent_rows_have_no_violation():
  rows = [{'adv_oracle_in_0.5': 0.0, 'adv_oracle_off_0.5': 0.25, 'adv_oracle_full_0.5': 0.25,
           'adv_oracle_in_1.0': 0.0, 'adv_oracle_off_1.0': 0.5, 'adv_oracle_full_1.0': 0.75,
           'adv_fixed_full_0.5': 0.5, 'adv_fixed_full_1.0': 0.5,
           'robust_acc_oracle_0.5': 0.75, 'robust_acc_oracle_1.0': 0.25}]
  assert check_results.violations(rows) == []


def test_each_rule_counts_once_per_violation():
  rows = [
      {'adv_oracle_in_1.0': 0.5, 'adv_oracle_off_1.0': 0.6, 'adv_oracle_full_1.0': 0.4},
      {'adv_fixed_off_0.5': 0.5, 'adv_fixed_off_1.0': 0.3, 'adv_fixed_off_2.0': 0.2},
      {'robust_acc_true_0.05': 0.2, 'robust_acc_true_0.1': 0.3},
  ]
  assert check_results.violations(rows) == [
      'row 0: adv_oracle_full_1 = 0.4000 < adv_oracle_in_1 = 0.5000',
      'row 0: adv_oracle_full_1 = 0.4000 < adv_oracle_off_1 = 0.6000',
      'row 1: adv_fixed_off falls from 0.5000 (eps 0.5) to 0.3000 (eps 1)',
      'row 1: adv_fixed_off falls from 0.3000 (eps 1) to 0.2000 (eps 2)',
      'row 2: robust_acc_true rises from 0.2000 (eps 0.05) to 0.3000 (eps 0.1)']


def test_raw_attack_columns_and_empty_cells_are_not_checked():
  rows = [{'adv_oracle_off_1.0': None, 'adv_oracle_full_1.0': 0.1,
           'adv_oracle_off_1.0_pgd': 0.9, 'adv_oracle_full_1.0_pgd': 0.0,  # raw attacks
           'adv_oracle_in_2.0': '', 'robust_acc_oracle_0.1_square': 0.9,
           'robust_acc_oracle_0.1': 0.5, 'robust_acc_oracle_0.3_apgd': 0.9}]
  assert check_results.violations(rows) == []


def test_budgets_with_a_denominator_are_ordered_by_value():
  """CIFAR-10's columns name 2/255 ``2.0_255``: compared by value, not as text."""
  rows = [{'robust_acc_oracle_2.0_255': 0.6, 'robust_acc_oracle_8.0_255': 0.2,
           'robust_acc_oracle_16.0_255': 0.3, 'adv_oracle_full_8.0_255_apgd': 0.0}]
  assert check_results.violations(rows) == [
      'row 0: robust_acc_oracle rises from 0.2000 (eps 0.0313725) to 0.3000 '
      '(eps 0.0627451)']


def test_the_command_prints_and_exits_1_on_violations(tmp_path):
  good, bad = str(tmp_path / 'good.csv'), str(tmp_path / 'bad.csv')
  io.write_csv(good, [{'adv_oracle_off_1.0': 0.2, 'adv_oracle_full_1.0': 0.3}] * 3)
  io.write_csv(bad, [{'adv_oracle_off_1.0': 0.4, 'adv_oracle_full_1.0': 0.3}])
  run = lambda *paths: subprocess.run([sys.executable, '-m', 'tsrobust.check_results', *paths],
                                      cwd=ROOT, capture_output=True, text=True, timeout=60)
  done = run(good)
  assert (done.returncode, done.stdout) == (0, f'{good}: 0 violations in 3 rows\n')
  done = run(good, bad)
  assert done.returncode == 1
  assert done.stdout.splitlines() == [
      f'{good}: 0 violations in 3 rows',
      f'{bad}: row 0: adv_oracle_full_1 = 0.3000 < adv_oracle_off_1 = 0.4000',
      f'{bad}: 1 violations in 1 rows']
  done = run(str(tmp_path / 'missing.csv'))
  assert done.returncode == 2 and done.stderr.startswith('error: ')
  assert 'Traceback' not in done.stderr
