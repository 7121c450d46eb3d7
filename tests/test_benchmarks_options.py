"""benchmarks/main_job_options.py: the comparison of a job's results with the default's
(known answers), its flag parsing, and (slow) the whole measurement on a tiny config."""

import math
import subprocess
import sys

import pytest

from benchmarks import hardware

from benchmarks import main_job_options as options
from tests import test_lowrank


def _rows(values):
  """Results rows from ``{column: {rank: [per-seed values]}}``."""
  ranks = next(iter(values.values()))
  rows = []
  for rank, per_seed in ranks.items():
    for seed in range(len(per_seed)):
      rows.append({'rank': float(rank), 'seed': float(seed), 'train_loss': 1.0,
                   **{c: v[rank][seed] for c, v in values.items()}})
  return rows


BASE = {'spec_in': {5: [1.0, 1.0, 1.0], 40: [1.0, 1.0, 1.0]},
        'spec_off': {5: [0.4, 0.5, 0.6], 40: [None, None, None]},
        'adv_oracle_full_1.0': {5: [0.8, 0.8, 0.8], 40: [0.0, 0.1, 0.2]},
        'adv_oracle_full_1.0_pgd': {5: [0.1, 0.1, 0.1], 40: [0.1, 0.1, 0.1]}}


def test_compare_known_answer():
  other = {'spec_in': {5: [1.0, 1.0, 1.0], 40: [1.0, 1.0, 1.0]},
           'spec_off': {5: [0.45, 0.55, 0.65], 40: [None, None, None]},
           'adv_oracle_full_1.0': {5: [0.7, 0.7, 0.7], 40: [0.0, 0.1, 0.2]},
           # A per-attack column: not a reported metric, so its change is ignored.
           'adv_oracle_full_1.0_pgd': {5: [0.9, 0.9, 0.9], 40: [0.9, 0.9, 0.9]}}
  c = options.compare(_rows(BASE), _rows(other))
  # spec_in x 2 ranks, spec_off at rank 5 (rank 40 has no values), adv x 2 ranks.
  assert c['cells'] == 5
  m = c['max_abs']
  assert (m['column'], m['rank']) == ('adv_oracle_full_1.0', 5.0)
  assert m['diff'] == pytest.approx(-0.1) and m['se'] == 0.0
  z = c['max_z']  # the adv cell at rank 5 has SE 0: no z-score; spec_off's is the largest
  assert (z['column'], z['rank']) == ('spec_off', 5.0)
  assert z['se'] == pytest.approx(0.1 / math.sqrt(3))
  assert z['z'] == pytest.approx(0.05 / (0.1 / math.sqrt(3)))
  assert c['attack_bias'] == pytest.approx((-0.1 + 0.0) / 2)


def test_compare_of_equal_results_is_zero():
  c = options.compare(_rows(BASE), _rows(BASE))
  assert c['max_abs']['diff'] == 0.0 and c['max_z']['z'] == 0.0 and c['attack_bias'] == 0.0


def test_compare_refuses_other_rows_and_missing_columns():
  fewer = {c: {5: v[5]} for c, v in BASE.items()}
  with pytest.raises(ValueError, match='different'):
    options.compare(_rows(BASE), _rows(fewer))
  no_spec = {c: v for c, v in BASE.items() if c != 'spec_off'}
  with pytest.raises(ValueError, match='spec_off'):
    options.compare(_rows(BASE), _rows(no_spec))


def test_parse_option():
  assert options.parse_option("r:--config.ranks='(5, 40)' --config.num_steps=10") == (
      'r', ('--config.ranks=(5, 40)', '--config.num_steps=10'))
  for bad, match in [('no_colon', 'NAME:FLAG'), ('default:--config.d=4', 'not "default"'),
                     ('a b:--config.d=4', 'NAME:FLAG'), ('x:', 'at least one flag'),
                     ('x:config.d=4', 'must start with --'), ("x:--config.d='4", 'quotation')]:
    with pytest.raises(ValueError, match=match):
      options.parse_option(bad)
  with pytest.raises(SystemExit):
    options.main(['--option=a:--config.d=4', '--option=a:--config.d=5'])
  with pytest.raises(SystemExit):
    options.main(['--rounds=0'])


def test_table_flags_runs_that_disagree():
  rec = {'flags': [], 'wall': [10.0, 12.0], 'user': [1.0, 1.0], 'md5': ['a' * 32] * 2,
         'comparison': None}
  other = dict(rec, flags=['--config.num_steps=10'], wall=[5.0, 6.0],
               md5=['b' * 32, 'c' * 32], comparison=options.compare(_rows(BASE), _rows(BASE)))
  text = options.table({'default': rec, 'short': other})
  lines = text.splitlines()
  assert len(lines) == 4
  assert '| 11.0 | 1.00x |' in lines[2] and 'aaaaaaaa' in lines[2]
  assert '| 5.5 | 0.50x |' in lines[3] and 'DIFFER: bbbbbbbb cccccccc' in lines[3]


def test_other_load_leaves_out_finished_children():
  # The measured jobs are child processes: OtherLoad subtracts their CPU seconds, which
  # getrusage(RUSAGE_CHILDREN) counts once they are waited for.
  before = hardware._children_cpu_seconds()  # pylint: disable=protected-access
  subprocess.run([sys.executable, '-c', 'import time\nt = time.process_time()\n'
                  'while time.process_time() - t < 0.5: pass'], check=True)
  assert hardware._children_cpu_seconds() - before >= 0.4  # pylint: disable=protected-access


@pytest.mark.slow
def test_measure_on_a_tiny_config():
  tiny = tuple(f'--config.{k}={v}' for k, v in test_lowrank.TINY.items() if k != 'attack')
  tiny += tuple(f'--config.attack.{k}={v}' for k, v in test_lowrank.TINY['attack'].items())
  steps = test_lowrank.TINY['num_steps']
  out = options.measure([('same', (f'--config.num_steps={steps}',)),
                         ('longer', (f'--config.num_steps={steps + 30}',))],
                        rounds=1, warmup=False, base_flags=tiny, log=lambda *a, **k: None)
  assert list(out) == ['default', 'same', 'longer']
  assert all(len(r['wall']) == 1 and r['wall'][0] > 0 for r in out.values())
  # The job is deterministic: the same config gives the same file and no change.
  assert out['same']['md5'] == out['default']['md5']
  same = out['same']['comparison']
  assert same['max_abs']['diff'] == 0.0 and same['attack_bias'] == 0.0
  # Rank 2: spec_in/off, wcos_in/off, clean_agree, 18 error columns; full rank 6 has no
  # off-subspace: spec_in, wcos_in, clean_agree, 12 error columns.
  assert same['cells'] == 23 + 15
  # More training steps move the numbers, and the comparison sees it.
  assert out['longer']['md5'] != out['default']['md5']
  assert out['longer']['comparison']['max_abs']['diff'] != 0.0
  assert 'longer' in options.table(out)
