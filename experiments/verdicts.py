r"""The claims x settings verdict table from finished studies' ``results.csv``.

Each claim in each setting gets the verdict its teacher-level interval earns under the
rules of ``docs/verdicts.md`` (``tsrobust.verdicts``). Nothing is trained or attacked: the
table is read from the studies' result files.

    python -m experiments.verdicts --lowrank=runs/lowrank --robustness=runs/robustness \
        [--mechanism=DIR] [--real=DIR] [--real_lowrank=DIR] [--fashion_mnist=DIR] [--nodetails]

A setting without a flag (or without a ``results.csv``) shows ``not run``. From Python
(e.g. ``experiments.reproduce``, with its study folders):

    table_from_workdirs({'lowrank': 'runs/full/lowrank', 'robustness': ...})

Results written before teachers were an axis have no ``teacher`` column: in the synthetic
studies (``lowrank``, ``robustness``) each seed then had its own teacher (K = 1), in the
image studies every student shares one teacher. Image results with a ``teacher`` column
(``experiments.real``, any ``num_teachers``) are judged by it: with T >= 2 teachers they
get teacher-level intervals.
"""

import os
from typing import Any, Dict, List, Mapping, Optional

from absl import app
from absl import flags

from tsrobust import io
from tsrobust import verdicts

# experiments.reproduce's study names, in the table's column order, with their headers.
SETTINGS = ('lowrank', 'robustness', 'mechanism', 'real', 'real_lowrank', 'fashion_mnist')
TITLES = {'lowrank': 'synthetic low-rank', 'robustness': 'robustness study',
          'mechanism': 'mechanism study', 'real': 'MNIST', 'real_lowrank': 'MNIST low-rank',
          'fashion_mnist': 'Fashion-MNIST'}
# Where results carry no ``teacher`` column: a synthetic student's teacher was its seed.
SYNTHETIC = ('lowrank', 'robustness', 'mechanism')


def mechanism_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """The mechanism study's rows as the rules read them, with a ``method`` column: its
  standard-trained students without intervention (part ``intervention``, condition
  ``none``: claims 1-3) and its students trained with noise in S_perp (``orth``) or
  isotropic noise (``iso``) at matched energy at the study's own rank, the rank of those
  standard students (part ``augmentation``: claim 5). Other parts (optimizers, other
  ranks, noise in S, the dependence part) are not read.
  """
  standard = [r for r in rows if r.get('part') == 'intervention'
              and r.get('condition') == 'none']
  if not standard:
    raise ValueError("the mechanism study's results.csv has no standard students (part "
                     "'intervention', condition 'none')")
  rank = {str(r.get('rank')) for r in standard}
  out = [{**r, 'method': 'standard'} for r in standard]
  out += [{**r, 'method': r['aug_kind']} for r in rows if r.get('part') == 'augmentation'
          and str(r.get('rank')) in rank and r.get('aug_kind') in ('orth', 'iso')]
  return out


# A setting's rows as the rules read them (default: as written), and the claims its
# design does not measure, with why.
ROWS = {'mechanism': mechanism_rows}
NOT_IN_DESIGN = {'mechanism': {
    4: 'the mechanism study has no dose-response of specialization within a method'}}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Dict[str, Any]:
  """The binary's flags (defined when it runs, so importing this module defines none)."""
  out = {s: flags.DEFINE_string(s, None, f'The {TITLES[s]} study\'s workdir (its '
                                'results.csv); unset: the column shows "not run".',
                                flag_values=flag_values) for s in SETTINGS}
  out['details'] = flags.DEFINE_bool('details', True, 'Also print each cell\'s statistic and '
                                     'the reason for its verdict.', flag_values=flag_values)
  return out


def _check_settings(workdirs: Mapping[str, Any]) -> None:
  unknown = [s for s in workdirs if s not in SETTINGS]
  if unknown:
    raise ValueError(f'unknown setting(s) {unknown}: workdirs keys must be among '
                     f'{list(SETTINGS)}')


def setting_cells(setting: str, workdir: Optional[str]) -> List[Dict[str, Any]]:
  """Every claim's cell for one setting: from ``workdir/results.csv`` when the folder has
  one, ``not run`` cells otherwise (``tsrobust.verdicts.cells``)."""
  _check_settings([setting])
  if not workdir:
    return verdicts.missing_cells(setting)
  path = os.path.join(workdir, 'results.csv')
  if not os.path.isfile(path):
    return verdicts.missing_cells(setting, f'no results.csv in {workdir}')
  rows = io.read_csv(path)
  if not rows:
    return verdicts.missing_cells(setting, f'{path} has no rows')
  missing_teacher = 'seed' if setting in SYNTHETIC else 'one'
  rows = ROWS.get(setting, lambda r: r)(rows)
  unmeasured = NOT_IN_DESIGN.get(setting, {})
  measured = [c for c in verdicts.CLAIMS if c not in unmeasured]
  cells = verdicts.cells(rows, setting, claims=measured, missing_teacher=missing_teacher)
  for c, why in unmeasured.items():
    cells += verdicts.missing_cells(setting, why, claims=(c,), result=verdicts.NOT_MEASURED)
  return sorted(cells, key=lambda cell: cell['claim'])


def cells_from_workdirs(workdirs: Mapping[str, Optional[str]]) -> List[Dict[str, Any]]:
  """Every claim's cell for every setting (``setting_cells``; a setting ``workdirs`` leaves
  out: ``not run``)."""
  _check_settings(workdirs)
  return [c for s in SETTINGS for c in setting_cells(s, workdirs.get(s))]


def table_from_workdirs(workdirs: Mapping[str, Optional[str]], details: bool = False) -> str:
  """The claims x settings verdict table (markdown) of the studies in ``workdirs``.

  Args:
    workdirs: setting -> study folder (``experiments.reproduce``'s names: ``lowrank``,
      ``robustness``, ``mechanism``, ``real``, ``real_lowrank``, ``fashion_mnist``); a
      setting left out or None shows ``not run``.
    details: also list each cell's statistic and the reason for its verdict.
  """
  cells = cells_from_workdirs(workdirs)
  text = verdicts.verdict_table(cells, SETTINGS, TITLES)
  if details:
    text += '\n' + verdicts.verdict_details(cells, TITLES)
  return text


def setting_table(setting: str, workdir: str) -> str:
  """One setting's column of the verdict table, with each cell's statistic and reason:
  what a study's own results earn (``experiments.reproduce`` puts it under the study)."""
  cells = setting_cells(setting, workdir)
  return (verdicts.verdict_table(cells, [setting], TITLES) + '\n'
          + verdicts.verdict_details(cells, TITLES))


def main(argv, defined: Mapping[str, Any]):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  print(table_from_workdirs({s: defined[s].value for s in SETTINGS},
                            details=defined['details'].value), end='')


if __name__ == '__main__':
  _DEFINED = define_flags()
  app.run(lambda argv: main(argv, _DEFINED))
