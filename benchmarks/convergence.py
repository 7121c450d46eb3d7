r"""Has the evaluation converged? One study's students under attack ensembles of growing strength.

Compares the ``results.csv`` of runs of the same study and config that differ only in the
attack ensemble (``--config.attack.strength`` and the section's other fields): the same students, so
every column that is not an attack's (specialization, clean agreement, training loss) must
be identical, and this is checked first. Per group of students (a grid point of the
robustness / image study, a rank of the low-rank study) and per error cell (the ensemble's
``adv_{label}_{where}_{eps}``, or ``1 - robust_acc_{label}_{eps}`` of the image study), it
prints the mean error of each run and flags every group where the last run (the strongest)
exceeds the first (the default) by more than ``--tolerance`` in some cell:

    python -m experiments.robustness --workdir=runs/rob
    python -m experiments.robustness --workdir=runs/rob_ref --config.attack.strength=reference
    python -m benchmarks.convergence --runs=runs/rob,runs/rob_ref [--json=PATH]

It reads result files only (no JAX work), so it can compare runs made on other machines.
"""

import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags

from tsrobust import io

_RUNS = flags.DEFINE_list('runs', None, 'Run folders (or results.csv paths), weakest first: '
                          'the first is the default, the last the reference.')
_TOLERANCE = flags.DEFINE_float('tolerance', 0.01, 'Largest difference of a group mean that '
                                'counts as converged.')
_JSON = flags.DEFINE_string('json', None, 'Also write the comparison as JSON here.')

# Columns that name a group, in the order they appear in the binaries' results.
GROUP_COLUMNS = ('method', 'variant', 'at_eps', 'at_where', 'at_label', 'ccat_eps', 'aug_scale',
                 'rank')
_ADV = re.compile(r'^adv_(oracle|fixed|true)_(in|off|full)_([0-9.]+(?:_[0-9.]+)?)$')
_ACC = re.compile(r'^robust_acc_(oracle|true)_([0-9.]+(?:_[0-9.]+)?)$')
# Columns an attack changes (besides the cells): every other column must match across runs.
_ATTACK_PREFIXES = ('adv_', 'robust_acc_', 'ccat_')


def error_cells(columns: Sequence[str]) -> Dict[str, Tuple[str, bool]]:
  """``{cell name: (column, is_accuracy)}`` of the ensemble's error columns.

  ``adv_{label}_{where}_{eps}`` (an error) and ``robust_acc_{label}_{eps}`` (an
  accuracy: the error is ``1 - value``, cell ``{label}_full_{eps}``); per-attack
  columns (``..._{attack}``) are not cells.
  """
  cells = {}
  for c in columns:
    m = _ADV.match(c)
    if m:
      cells[f'{m.group(1)}_{m.group(2)}_{m.group(3)}'] = (c, False)
      continue
    m = _ACC.match(c)
    if m and f'{m.group(1)}_full_{m.group(2)}' not in cells:
      cells[f'{m.group(1)}_full_{m.group(2)}'] = (c, True)
  return cells


def _group_key(row: Mapping[str, Any], columns: Sequence[str]) -> str:
  parts = []
  for c in GROUP_COLUMNS:
    if c in columns and row.get(c) not in (None, ''):
      v = row[c]
      parts.append(f'{c}={v:g}' if isinstance(v, float) else f'{c}={v}')
  return ', '.join(parts) or 'all'


def _read(path: str) -> Tuple[List[Dict[str, Any]], List[str]]:
  path = os.path.join(path, 'results.csv') if os.path.isdir(path) else path
  if not os.path.exists(path):
    raise ValueError(f'--runs: no results.csv at {path}')
  with open(path) as f:
    columns = f.readline().strip().split(',')
  return io.read_csv(path), columns


def same_students(runs: Sequence[Tuple[List[Dict[str, Any]], List[str]]]) -> List[str]:
  """The columns (not an attack's) that differ between the runs: [] when the students match."""
  rows0, cols0 = runs[0]
  fixed = [c for c in cols0 if not c.startswith(_ATTACK_PREFIXES)]
  differ = []
  for rows, cols in runs[1:]:
    if len(rows) != len(rows0):
      return ['(number of rows)']
    for c in fixed:
      if c not in cols:
        differ.append(c)
        continue
      for a, b in zip(rows0, rows):
        x, y = a.get(c), b.get(c)
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
          continue
        if x != y:
          differ.append(c)
          break
  return sorted(set(differ))


def compare(runs: Sequence[Tuple[List[Dict[str, Any]], List[str]]],
            tolerance: float = 0.01) -> Dict[str, Any]:
  """Per group and cell, the mean error of each run; the largest difference last - first.

  Args:
    runs: ``(rows, columns)`` of each run's ``results.csv``, weakest attack first.
    tolerance: a group has converged when ``last - first <= tolerance`` in every cell.

  Returns:
    ``{'groups': {name: {'students', 'cells': {cell: [mean per run]}, 'max_gain',
    'max_gain_cell', 'converged'}}, 'tolerance', 'differing_columns'}``.
  """
  if len(runs) < 2:
    raise ValueError('compare needs at least two runs')
  rows0, cols0 = runs[0]
  cells = error_cells(cols0)
  if not cells:
    raise ValueError('no error columns (adv_* / robust_acc_*) in the first run')
  groups: Dict[str, List[int]] = {}
  for i, row in enumerate(rows0):
    groups.setdefault(_group_key(row, cols0), []).append(i)
  out = {'tolerance': tolerance, 'differing_columns': same_students(runs), 'groups': {}}
  for name, idx in groups.items():
    per_cell = {}
    for cell, (column, is_acc) in cells.items():
      means = []
      for rows, _ in runs:
        vals = [rows[i].get(column) for i in idx]
        vals = [v for v in vals if isinstance(v, float) and not math.isnan(v)]
        if not vals:
          break
        m = sum(vals) / len(vals)
        means.append(1 - m if is_acc else m)
      if len(means) == len(runs):
        per_cell[cell] = means
    gains = {c: m[-1] - m[0] for c, m in per_cell.items()}
    worst = max(gains, key=gains.get) if gains else None
    out['groups'][name] = {
        'students': len(idx), 'cells': per_cell,
        'max_gain': gains[worst] if worst else 0.0, 'max_gain_cell': worst,
        'converged': bool(not gains or gains[worst] <= tolerance + 1e-12)}
  return out


def markdown(result: Mapping[str, Any], names: Sequence[str],
             cells: Optional[Sequence[str]] = None) -> str:
  """A table per group: the cells' means per run, the largest difference, converged or not."""
  groups = result['groups']
  if cells is None:
    cells = list(dict.fromkeys(c for g in groups.values() for c in g['cells']))
  lines = ['| group | n | ' + ' | '.join(f'`{c}`' for c in cells)
           + ' | largest difference | converged |', '|' + '---|' * (len(cells) + 4)]
  for name, g in groups.items():
    row = [name, str(g['students'])]
    for c in cells:
      m = g['cells'].get(c)
      row.append('-' if m is None else ' / '.join(f'{v:.3f}' for v in m))
    worst = g['max_gain_cell']
    row.append('-' if worst is None else f'{g["max_gain"]:+.3f} (`{worst}`)')
    row.append('yes' if g['converged'] else '**no**')
    lines.append('| ' + ' | '.join(row) + ' |')
  header = (f'Mean error per group, runs {" / ".join(names)}; converged when the last run '
            f'exceeds the first by at most {result["tolerance"]:g} in every cell.')
  return header + '\n\n' + '\n'.join(lines) + '\n'


def main(argv):
  del argv
  if not _RUNS.value or len(_RUNS.value) < 2:
    raise app.UsageError('--runs needs at least two run folders, weakest attack first')
  try:
    runs = [_read(p) for p in _RUNS.value]
  except ValueError as e:  # a folder without a finished run: one line, not a traceback
    raise app.UsageError(str(e)) from None
  result = compare(runs, _TOLERANCE.value)
  if result['differing_columns']:
    print(f'WARNING: not the same students: columns {result["differing_columns"]} differ')
  print(markdown(result, _RUNS.value))
  bad = [k for k, g in result['groups'].items() if not g['converged']]
  print(f'{len(bad)} of {len(result["groups"])} groups not converged'
        + (f': {", ".join(bad)}' if bad else ''))
  if _JSON.value:
    io.write_json(_JSON.value, {'runs': _RUNS.value, **result})


if __name__ == '__main__':
  app.run(main)
