r"""Self-consistency of the robust errors in a ``results.csv`` (PAPER.md section 5b).

    python -m tsrobust.check_results RUN/results.csv [RUN2/results.csv ...]

The feasible sets of the attacks nest, so any honest evaluation satisfies, in every row:

- ``adv_{label}_full_{eps} >= adv_{label}_in_{eps}`` and ``>= adv_{label}_off_{eps}``
  (both restricted balls lie inside the unconstrained one);
- ``adv_{label}_{where}_{eps}`` non-decreasing in ``eps`` (a larger ball holds the smaller);
- ``robust_acc_{label}_{eps}`` non-increasing in ``eps``.

Only the ensemble's columns are checked (the per-attack columns ``..._{attack}`` are raw
attacks, which may violate them: ``attack_checks.json`` counts how often); empty cells are
skipped. A budget written with a denominator (``8.0_255``, CIFAR-10's 8/255) is
``8.0 / 255``. The command prints every violation and a count per file, and exits 1 if
there is any (0 otherwise, 2 for a file it cannot read).
"""

import csv
import math
import re
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ['violations', 'check_file', 'main']

_EPS = r'(\d+(?:\.\d*)?)(?:_(\d+(?:\.\d*)?))?'
_ADV = re.compile(rf'^adv_([a-z]+)_(in|off|full)_{_EPS}$')
_ACC = re.compile(rf'^robust_acc_([a-z]+)_{_EPS}$')
TOLERANCE = 1e-9


def _number(value) -> Optional[float]:
  if value is None or value == '':
    return None
  try:
    x = float(value)
  except (TypeError, ValueError):
    return None
  return None if math.isnan(x) else x


def _budget(num: str, den: Optional[str]) -> float:
  return float(num) / (float(den) if den else 1.0)


def violations(rows: Sequence[Mapping[str, object]]) -> List[str]:
  """Every violation of the invariants in ``rows`` (dicts of column -> value or cell text).

  Returns one message per violation, e.g. ``'row 0: adv_oracle_full_1 = 0.1000 <
  adv_oracle_off_1 = 0.2000'``; an empty list when the rows are consistent.

  >>> violations([{'adv_oracle_in_1.0': 0.0, 'adv_oracle_off_1.0': 0.5,
  ...              'adv_oracle_full_1.0': 0.5, 'adv_oracle_full_2.0': 0.75}])
  []
  >>> violations([{'adv_oracle_off_1.0': '0.5', 'adv_oracle_full_1.0': '0.25',
  ...              'robust_acc_oracle_0.1': '0.5', 'robust_acc_oracle_0.3': '0.6'}]
  ...            )  # doctest: +NORMALIZE_WHITESPACE
  ['row 0: adv_oracle_full_1 = 0.2500 < adv_oracle_off_1 = 0.5000',
   'row 0: robust_acc_oracle rises from 0.5000 (eps 0.1) to 0.6000 (eps 0.3)']
  """
  found = []
  for i, row in enumerate(rows):
    adv: Dict[Tuple[str, str, float], float] = {}
    acc: Dict[str, List[Tuple[float, float]]] = {}
    for column, value in row.items():
      x = _number(value)
      if x is None:
        continue
      m = _ADV.match(column)
      if m:
        adv[(m.group(1), m.group(2), _budget(m.group(3), m.group(4)))] = x
        continue
      m = _ACC.match(column)
      if m:
        acc.setdefault(m.group(1), []).append((_budget(m.group(2), m.group(3)), x))
    for (label, where, eps), x in sorted(adv.items()):
      if where != 'full':
        continue
      for sub in ('in', 'off'):
        y = adv.get((label, sub, eps))
        if y is not None and x < y - TOLERANCE:
          found.append(f'row {i}: adv_{label}_full_{eps:g} = {x:.4f} < '
                       f'adv_{label}_{sub}_{eps:g} = {y:.4f}')
    for label, where in sorted({(a, b) for a, b, _ in adv}):
      seq = sorted((e, x) for (a, b, e), x in adv.items() if (a, b) == (label, where))
      for (e1, x1), (e2, x2) in zip(seq, seq[1:]):
        if x2 < x1 - TOLERANCE:
          found.append(f'row {i}: adv_{label}_{where} falls from {x1:.4f} (eps {e1:g}) to '
                       f'{x2:.4f} (eps {e2:g})')
    for label, seq in sorted(acc.items()):
      seq.sort()
      for (e1, x1), (e2, x2) in zip(seq, seq[1:]):
        if x2 > x1 + TOLERANCE:
          found.append(f'row {i}: robust_acc_{label} rises from {x1:.4f} (eps {e1:g}) to '
                       f'{x2:.4f} (eps {e2:g})')
  return found


def check_file(path: str) -> Tuple[List[str], int]:
  """``(violations, number of rows)`` of the CSV file at ``path``.

  Raises:
    OSError: the file cannot be read.
  """
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  return violations(rows), len(rows)


def main(argv: Sequence[str]) -> int:
  """Checks every file of ``argv[1:]``; prints the violations; returns the exit code."""
  paths = list(argv[1:])
  if not paths:
    sys.stderr.write('usage: python -m tsrobust.check_results RUN/results.csv [...]\n')
    return 2
  total, code = 0, 0
  for path in paths:
    try:
      found, num_rows = check_file(path)
    except OSError as e:
      sys.stderr.write(f'error: {path}: {e.strerror or e}\n')
      code = 2
      continue
    for line in found:
      print(f'{path}: {line}')
    print(f'{path}: {len(found)} violations in {num_rows} rows')
    total += len(found)
  return code or (1 if total else 0)


if __name__ == '__main__':
  sys.exit(main(sys.argv))
