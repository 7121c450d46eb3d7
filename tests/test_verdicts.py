"""Verdicts by rule (tsrobust.verdicts, experiments.verdicts).

Known answers: the rule on hand-made intervals (each side, straddling, inside the band,
the band checked first); synthetic results tables with a known effect over 5 teachers
(holds), no effect and tight noise (inside the band: does not hold), the reverse effect
(does not hold), one teacher (not established (one teacher)); the headline budget, the
low-rank rows and the method families are read as the rules say (each test builds a table
where reading the wrong budget, rows or grouping gives another verdict); bad input.
"""

import csv
import os
import re

import numpy as np
import pytest

from experiments import verdicts as exp_verdicts
from tsrobust import io
from tsrobust import verdicts

HOLDS, FAILS, OPEN = 'holds', 'does not hold', 'not established'
ONE = 'not established (one teacher)'
BUDGETS = ('0.5', '1.0', '2.0')


# The rule.

@pytest.mark.parametrize('interval, direction, negligible, null, expected', [
    ([0.10, 0.30], 'above', 0.05, 0.0, HOLDS),        # wholly above 0
    ([-0.30, -0.10], 'above', 0.05, 0.0, FAILS),      # wholly on the other side
    ([-0.10, 0.20], 'above', 0.05, 0.0, OPEN),        # straddles 0
    ([-0.03, 0.04], 'above', 0.05, 0.0, FAILS),       # wholly inside the band
    ([0.01, 0.04], 'above', 0.05, 0.0, FAILS),        # above 0 but inside the band: band first
    ([0.02, 0.08], 'above', 0.05, 0.0, HOLDS),        # above 0, reaching past the band
    ([-0.01, 0.01], 'above', None, 0.0, OPEN),        # no band: straddling stays open
    ([0.00, 0.10], 'above', None, 0.0, OPEN),         # lo must exceed the null strictly
    ([-0.30, -0.10], 'below', 0.05, 0.0, HOLDS),
    ([0.10, 0.30], 'below', 0.05, 0.0, FAILS),
    ([-0.04, 0.03], 'below', 0.05, 0.0, FAILS),
    ([-0.20, 0.01], 'below', 0.05, 0.0, OPEN),
    ([-0.50, 0.50], 'above', 0.1, 0.0, OPEN),
    ([0.93, 0.97], 'above', None, 0.9, HOLDS),        # claim 1's threshold
    ([0.80, 0.95], 'above', None, 0.9, OPEN),
    ([0.50, 0.85], 'above', None, 0.9, FAILS),
    ([0.02, 0.06], 'below', None, 0.1, HOLDS),        # claim 2's threshold
    ([0.20, 0.40], 'below', None, 0.1, FAILS),
])
def test_the_rule_on_hand_made_intervals(interval, direction, negligible, null, expected):
  assert verdicts.verdict(interval, direction, negligible, null) == expected


@pytest.mark.parametrize('kwargs, match', [
    ({'interval': [0.1, 0.2], 'direction': 'up'}, 'direction must be one of'),
    ({'interval': [0.3, 0.2], 'direction': 'above'}, 'lo <= hi'),
    ({'interval': [0.1], 'direction': 'above'}, 'two numbers'),
    ({'interval': [float('nan'), 0.2], 'direction': 'above'}, 'finite'),
    ({'interval': None, 'direction': 'above'}, 'two numbers'),
    ({'interval': [0.1, 0.2], 'direction': 'above', 'negligible': -0.1}, 'negligible must'),
])
def test_the_rule_rejects_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    verdicts.verdict(**kwargs)


# Synthetic results tables.

def _lowrank_table(effect, noise, teachers=5, students=2, seed=0, other_budgets=None,
                   teacher_sd=0.1, with_full_rank=True):
  """Rows of a low-rank study (standard students only): off - in error at the headline
  budget 1.0 is ``effect`` + N(0, noise) per student; each teacher has its own level
  (``teacher_sd``); at the other budgets the difference is ``other_budgets`` (default
  ``effect``). Full-rank rows (no off-subspace columns) carry a huge in-error."""
  rng = np.random.default_rng(seed)
  other = effect if other_budgets is None else other_budgets
  rows = []
  for t in range(teachers):
    level = 0.2 + teacher_sd * rng.standard_normal()
    for k in range(students):
      row = {'rank': 5.0, 'teacher': float(t), 'seed': float(t * students + k),
             'spec_in': 0.99, 'spec_off': 0.5, 'wcos_off': 0.15, 'wcos_off_random': 0.146}
      for b in BUDGETS:
        base = level + 0.01 * rng.standard_normal()
        diff = (effect if b == '1.0' else other) + noise * rng.standard_normal()
        row[f'adv_oracle_in_{b}'] = base
        row[f'adv_oracle_off_{b}'] = base + diff
        row[f'adv_oracle_full_{b}'] = base + diff
      rows.append(row)
      if with_full_rank:
        full = dict(row, rank=40.0, spec_in=0.0, spec_off=None, wcos_off=None,
                    wcos_off_random=None)
        for b in BUDGETS:
          full.update({f'adv_oracle_in_{b}': 0.9, f'adv_oracle_off_{b}': None})
        rows.append(full)
  return rows


def test_claim3_large_effect_over_5_teachers_holds():
  c = verdicts.claim3(_lowrank_table(effect=0.4, noise=0.02), 'lowrank')
  assert c['verdict'] == HOLDS, c
  assert c['teachers'] == 5
  assert c['estimate'] == pytest.approx(0.4, abs=0.03)
  assert c['ci'][0] > 0.3 and c['ci'][1] < 0.5
  assert set(c) == {'claim', 'setting', 'statistic', 'estimate', 'ci', 'teachers', 'verdict',
                    'why'}
  assert c['claim'] == 3 and c['setting'] == 'lowrank' and '1.0' in c['statistic']


def test_claim3_no_effect_with_tight_noise_does_not_hold():
  c = verdicts.claim3(_lowrank_table(effect=0.0, noise=0.005, teacher_sd=0.2), 'lowrank')
  assert c['verdict'] == FAILS, c
  assert -0.05 <= c['ci'][0] and c['ci'][1] <= 0.05
  assert 'negligible band' in c['why']


def test_claim3_reverse_effect_does_not_hold_and_noise_leaves_it_open():
  assert verdicts.claim3(_lowrank_table(effect=-0.3, noise=0.02), 's')['verdict'] == FAILS
  noisy = verdicts.claim3(_lowrank_table(effect=0.05, noise=0.5, students=1, seed=3), 's')
  assert noisy['verdict'] == OPEN, noisy


def test_claim3_one_teacher_is_not_established():
  c = verdicts.claim3(_lowrank_table(effect=0.4, noise=0.02, teachers=1, students=4), 'x')
  assert c['verdict'] == ONE
  assert c['ci'] is None and c['teachers'] == 1
  assert c['estimate'] == pytest.approx(0.4, abs=0.05)


def test_claim3_reads_the_headline_budget_and_eps_picks_another():
  rows = _lowrank_table(effect=0.4, noise=0.02, other_budgets=-0.4)
  assert verdicts.claim3(rows, 's')['verdict'] == HOLDS      # the middle budget, 1.0
  assert verdicts.claim3(rows, 's', eps=2.0)['verdict'] == FAILS
  with pytest.raises(ValueError, match=r"eps must be one of the budgets \['0.5', '1.0', '2.0'\]"):
    verdicts.claim3(rows, 's', eps=3.0)


def test_claim3_reads_standard_students_only():
  rows = _lowrank_table(effect=0.4, noise=0.02)
  for r in rows:
    r['method'] = 'standard'
  bad = [dict(r, method='at', **{'adv_oracle_in_1.0': 0.9, 'adv_oracle_off_1.0': 0.0})
         for r in rows]
  assert verdicts.claim3(rows + bad, 's')['verdict'] == HOLDS
  with pytest.raises(verdicts.NotMeasured, match="no 'standard' rows"):
    verdicts.claim3(bad, 's')


def test_claims_1_and_2_on_low_rank_rows():
  rows = _lowrank_table(effect=0.4, noise=0.02)
  assert verdicts.claim1(rows, 's')['verdict'] == HOLDS       # full-rank rows (0.0) left out
  assert verdicts.claim1(rows, 's', threshold=0.995)['verdict'] == FAILS
  assert verdicts.claim2(rows, 's')['verdict'] == HOLDS
  aligned = [dict(r, wcos_off=0.7 + 0.01 * (i % 3)) if r['wcos_off'] is not None else r
             for i, r in enumerate(rows)]
  assert verdicts.claim2(aligned, 's')['verdict'] == FAILS
  mixed = [dict(r, spec_in=0.8 + 0.01 * (i % 5)) if r['spec_off'] is not None else r
           for i, r in enumerate(rows)]
  assert verdicts.claim1(mixed, 's')['verdict'] == FAILS


def _robustness_table(slope, offset, orth_gain, teachers=5, seed=0):
  """Rows of a robustness-like study: within each family, robust accuracy = family level +
  ``slope`` * spec_off + noise (spec_off graded by the budget / scale); family levels
  ``offset`` * family spec level push the pooled correlation the other way. ``orth``'s
  oracle error is ``orth_gain`` below ``iso``'s at every scale."""
  rng = np.random.default_rng(seed)
  rows = []
  families = [('at', 'full', 'at_eps', 0.8), ('at', 'in', 'at_eps', 0.3),
              ('orth', '', 'aug_scale', 0.6), ('iso', '', 'aug_scale', 0.4)]
  for t in range(teachers):
    t_level = 0.05 * rng.standard_normal()
    for method, where, graded, spec_level in families:
      for j, g in enumerate((0.5, 1.0, 2.0, 3.0)):
        for k in range(2):
          x = spec_level + 0.05 * j + 0.01 * rng.standard_normal()
          acc = 0.5 + t_level + offset * spec_level + slope * (x - spec_level)
          acc += 0.002 * rng.standard_normal()
          if method == 'orth':
            acc += orth_gain
          row = {'method': method, 'at_eps': None, 'at_where': where, 'at_label': '',
                 'ccat_eps': None, 'aug_scale': None, 'teacher': t, 'seed': 2 * t + k,
                 'spec_off': x}
          row[graded] = g
          for b in BUDGETS:
            row[f'adv_oracle_full_{b}'] = 1.0 - acc
          rows.append(row)
  return rows


def test_claim4_within_families_holds_where_pooling_would_not():
  rows = _robustness_table(slope=1.0, offset=-1.5, orth_gain=0.0)
  c = verdicts.claim4(rows, 'robustness')
  assert c['verdict'] == HOLDS, c
  assert c['estimate'] > 0.9 and c['teachers'] == 5
  pooled = np.corrcoef([r['spec_off'] for r in rows],
                       [1 - r['adv_oracle_full_1.0'] for r in rows])[0, 1]
  assert pooled < 0  # a pooled correlation would say the reverse
  assert verdicts.claim4(_robustness_table(-1.0, 1.5, 0.0), 'r')['verdict'] == FAILS


def test_claim4_cells_too_small_are_not_established():
  rows = [r for r in _robustness_table(1.0, 0.0, 0.0) if r['seed'] % 2 == 0]
  rows = [r for r in rows if r.get('at_eps') in (None, 0.5) and r.get('aug_scale') in (None, 0.5)]
  c = verdicts.claim4(rows, 's')   # one student per teacher x family
  assert c['verdict'] == OPEN and c['estimate'] is None
  assert 'too_small' in c['why']


def test_claim5_orth_against_iso_paired_per_teacher_and_scale():
  assert verdicts.claim5(_robustness_table(1.0, 0.0, 0.2), 'r')['verdict'] == HOLDS
  assert verdicts.claim5(_robustness_table(1.0, 0.0, -0.2), 'r')['verdict'] == FAILS
  flat = verdicts.claim5(_robustness_table(1.0, 0.0, 0.0), 'r')
  assert flat['verdict'] == FAILS and 'negligible band' in flat['why']
  one = verdicts.claim5(_robustness_table(1.0, 0.0, 0.2, teachers=1), 'r')
  assert one['verdict'] == ONE and one['estimate'] == pytest.approx(-0.2, abs=0.01)
  at_one = verdicts.claim5(_robustness_table(1.0, 0.0, 0.2), 'r', aug_scale=2.0)
  assert 'aug_scale 2' in at_one['statistic']
  with pytest.raises(ValueError, match='aug_scale must be one of'):
    verdicts.claim5(_robustness_table(1.0, 0.0, 0.2), 'r', aug_scale=0.7)


def test_every_claim_with_one_teacher_is_not_established():
  rows = _robustness_table(1.0, 0.0, 0.2, teachers=1)
  std = [dict(r, method='standard', at_where='', wcos_off=0.15, wcos_off_random=0.14,
              spec_in=0.99, **{'adv_oracle_in_1.0': 0.1, 'adv_oracle_off_1.0': 0.5})
         for r in rows[:4]]
  for c in verdicts.cells(rows + std, 'one'):
    assert c['verdict'] == ONE, c


# Teachers, missing columns, bad tables.

def test_teachers_from_the_teacher_column_or_as_told():
  rows = _lowrank_table(effect=0.4, noise=0.02)
  bare = [{k: v for k, v in r.items() if k != 'teacher'} for r in rows]
  with pytest.raises(ValueError, match="no 'teacher' column"):
    verdicts.claim3(bare, 's')
  assert verdicts.claim3(bare, 's', missing_teacher='seed')['teachers'] == 10
  assert verdicts.claim3(bare, 's', missing_teacher='one')['verdict'] == ONE
  with pytest.raises(ValueError, match='missing_teacher must be one of'):
    verdicts.claim3(bare, 's', missing_teacher='guess')
  with pytest.raises(ValueError, match="'teacher' has 1 empty"):
    verdicts.claim3([dict(rows[0], teacher=None)] + rows[1:], 's')


def test_column_arrays_give_the_same_cell_as_rows():
  rows = _lowrank_table(effect=0.4, noise=0.02, with_full_rank=False)
  cols = {k: [r[k] for r in rows] for k in rows[0]}
  assert verdicts.claim3(cols, 's') == verdicts.claim3(rows, 's')


def test_claims_a_study_does_not_measure():
  rows = _lowrank_table(effect=0.4, noise=0.02)
  no_sub = [{k: v for k, v in r.items() if 'off' not in k} for r in rows]
  with pytest.raises(verdicts.NotMeasured, match='adv_oracle_off_<eps>'):
    verdicts.claim3(no_sub, 's')
  assert isinstance(verdicts.NotMeasured('x'), ValueError)
  by_claim = {c['claim']: c for c in verdicts.cells(rows, 'lowrank')}
  assert by_claim[4]['verdict'] == 'not measured' and "['method']" in by_claim[4]['why']
  assert by_claim[5]['verdict'] == 'not measured'
  assert [by_claim[c]['verdict'] for c in (1, 2, 3)] == [HOLDS, HOLDS, HOLDS]


@pytest.mark.parametrize('table, match', [
    ([], 'no rows'),
    ({'a': [1, 2], 'b': [1]}, 'equal lengths'),
    ({'a': 3}, "column 'a' must be a sequence"),
    ('results.csv', 'list of row dicts'),
    ([1, 2], 'a row is not a dict'),
])
def test_bad_tables(table, match):
  with pytest.raises(ValueError, match=match):
    verdicts.claim3(table, 's')


def test_bad_values_and_claims():
  rows = _lowrank_table(effect=0.4, noise=0.02)
  rows[0]['adv_oracle_off_1.0'] = 'n/a'
  with pytest.raises(ValueError, match="column 'adv_oracle_off_1.0' must hold numbers"):
    verdicts.claim3(rows, 's')
  with pytest.raises(ValueError, match=r'claim must be one of \[1, 2, 3, 4, 5\]'):
    verdicts.cell(6, rows, 's')
  with pytest.raises(ValueError, match='claim must be one of'):
    verdicts.missing_cells('s', claims=(0,))


# The table.

def test_verdict_table_claims_as_rows_settings_as_columns():
  good = verdicts.cells(_lowrank_table(effect=0.4, noise=0.02), 'lowrank')
  text = verdicts.verdict_table(good + verdicts.missing_cells('real'),
                                settings=['lowrank', 'robustness', 'real'],
                                titles={'lowrank': 'synthetic low-rank'})
  lines = text.strip().split('\n')
  assert lines[0] == '| claim | synthetic low-rank | robustness | real |'
  assert len(lines) == 2 + 5
  row3 = lines[2 + 2].split(' | ')
  assert row3[0] == '| 3. attacks off S stronger than in S'
  c3 = next(c for c in good if c['claim'] == 3)
  lo, hi = c3['ci']
  assert row3[1] == f'holds: {c3["estimate"]:.3f} [{lo:.3f}, {hi:.3f}], T=5'
  assert row3[2] == 'not run' and row3[3] == 'not run |'   # no cells / missing_cells
  assert lines[2 + 3].split(' | ')[1] == 'not measured'
  one = verdicts.cells(_lowrank_table(effect=0.4, noise=0.02, teachers=1), 'x')
  assert re.search(r'\n\| 3\. [^|]+ \| not established \(one teacher\): 0\.\d{3}, T=1 \|\n',
                   verdicts.verdict_table(one))
  details = verdicts.verdict_details(good)
  assert details.count('\n- ') == 4 and 'claim 4, lowrank: not measured' in details


def test_verdict_table_rejects_bad_cells():
  good = verdicts.cells(_lowrank_table(effect=0.4, noise=0.02), 'lowrank')
  with pytest.raises(ValueError, match='two cells for claim 1'):
    verdicts.verdict_table(good + good[:1])
  with pytest.raises(ValueError, match='verdict must be one of'):
    verdicts.verdict_table([dict(good[0], verdict='maybe')])
  with pytest.raises(ValueError, match='each cell must be a dict with keys'):
    verdicts.verdict_table([{'claim': 1}])


# experiments.verdicts: study folders to the table.

def test_table_from_workdirs(tmp_path):
  rows = _lowrank_table(effect=0.4, noise=0.02)
  old = [{k: v for k, v in r.items() if k != 'teacher'} for r in rows]  # seed = teacher
  io.write_csv(os.path.join(tmp_path, 'results.csv'), old)
  empty = tmp_path / 'empty'
  empty.mkdir()
  no_rows = tmp_path / 'no_rows'
  no_rows.mkdir()
  (no_rows / 'results.csv').write_text('rank,teacher\n')
  text = exp_verdicts.table_from_workdirs({'lowrank': str(tmp_path), 'real': str(empty),
                                           'robustness': str(no_rows),
                                           'fashion_mnist': None}, details=True)
  table = [line for line in text.split('\n') if line.startswith('| 3.')][0].split(' | ')
  assert table[1].startswith('holds: ') and table[1].endswith('T=10')
  assert table[2:] == ['not run'] * 4 + ['not run |']
  assert f'no results.csv in {empty}' in text
  assert f'{no_rows}/results.csv has no rows' in text
  with pytest.raises(ValueError, match=r"unknown setting\(s\) \['mnist'\]"):
    exp_verdicts.table_from_workdirs({'mnist': str(tmp_path)})
  with open(os.path.join(tmp_path, 'results.csv')) as f:
    assert 'teacher' not in next(csv.reader(f))


def test_setting_table_is_one_column_with_its_reasons(tmp_path):
  io.write_csv(os.path.join(tmp_path, 'results.csv'), _lowrank_table(effect=0.4, noise=0.02))
  text = exp_verdicts.setting_table('lowrank', str(tmp_path))
  lines = text.split('\n')
  assert lines[:2] == ['| claim | synthetic low-rank |', '|---|---|']
  assert lines[4].startswith('| 3. ') and ' | holds: ' in lines[4] and lines[4].endswith('T=5 |')
  # The whole table's column for that setting, then one line per claim with its reason.
  full = exp_verdicts.table_from_workdirs({'lowrank': str(tmp_path)})
  assert [l.split(' | ')[1].rstrip(' |') for l in lines[2:7]] == [
      l.split(' | ')[1] for l in full.split('\n')[2:7]]
  assert sum(l.startswith('- claim ') for l in lines) == 5
  assert 'claim 3, synthetic low-rank: ' in text and 'wholly above 0' in text
  with pytest.raises(ValueError, match=r"unknown setting\(s\) \['mnist'\]"):
    exp_verdicts.setting_table('mnist', str(tmp_path))


def _mechanism_rows(orth_minus_iso, teachers=4):
  """Rows of a mechanism study: per teacher, its standard student (part intervention,
  condition none; off - in error 0.6), its transplanted student (a huge in-error, not to be
  read), orth / iso / in students at the study's rank 10 (orth - iso = ``orth_minus_iso``
  at both scales) and at rank 20 (orth - iso = +0.5: not to be read), and an optimizer row."""
  rng = np.random.default_rng(0)
  rows = []
  base = {f'adv_oracle_{w}_{b}': 0.0 for w in ('in', 'off', 'full') for b in BUDGETS}
  for t in range(teachers):
    level = 0.3 + 0.05 * rng.standard_normal()
    std = dict(base, part='intervention', condition='none', teacher=t, rank=10,
               aug_kind='', aug_scale=0.0, spec_in=0.99, spec_off=0.5, wcos_off=0.15,
               wcos_off_random=0.146)
    std.update({f'adv_oracle_off_{b}': 0.6 + 0.01 * rng.standard_normal() for b in BUDGETS})
    rows.append(std)
    rows.append(dict(std, condition='transplant', **{'adv_oracle_in_1.0': 0.9}))
    for rank, diff in ((10, orth_minus_iso), (20, 0.5)):
      for scale in (0.1, 0.3):
        for kind, err in (('iso', level), ('orth', level + diff), ('in', level + 0.3)):
          rows.append(dict(std, part='augmentation', condition=f'r={rank} {kind} {scale}',
                           rank=rank, aug_kind=kind, aug_scale=scale,
                           **{'adv_oracle_full_1.0': err + 0.005 * rng.standard_normal()}))
    rows.append(dict(std, part='optimizer', condition='adam', spec_in=0.1))
  return rows


def test_the_mechanism_study_column(tmp_path):
  """Claims 1-3 read its standard students, claim 5 its orth / iso students at its own rank,
  claim 4 is not measured; a table without standard students is refused."""
  for diff, expected in ((-0.2, HOLDS), (0.2, FAILS)):
    io.write_csv(os.path.join(tmp_path, 'results.csv'), _mechanism_rows(diff))
    cells = exp_verdicts.cells_from_workdirs({'mechanism': str(tmp_path)})
    got = {c['claim']: c for c in cells if c['setting'] == 'mechanism'}
    assert [got[k]['verdict'] for k in (1, 2, 3)] == [HOLDS] * 3
    assert got[3]['estimate'] == pytest.approx(0.6, abs=0.02)  # the transplant row unread
    assert got[4]['verdict'] == verdicts.NOT_MEASURED
    assert got[5]['verdict'] == expected and got[5]['teachers'] == 4
    assert got[5]['estimate'] == pytest.approx(diff, abs=0.01)  # rank 20 unread
  rows = [r for r in _mechanism_rows(-0.2) if r['part'] != 'intervention']
  with pytest.raises(ValueError, match='no standard students'):
    exp_verdicts.mechanism_rows(rows)
  with pytest.raises(ValueError, match='result must be'):
    verdicts.missing_cells('mechanism', result='holds')
