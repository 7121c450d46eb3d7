r"""Less work in the main job: what each option saves in time and moves in the numbers.

The main job (``python -m experiments.lowrank``, defaults) trains 8 students for 20,000
steps at each of 4 ranks and attacks 512 points per student with the ``standard``
ensemble. Its computation alone takes 53-60 s on the 2-core CPU
(``benchmarks/main_job_floor.py``), so the <= 45 s that issue 11 asks for needs less
work: fewer steps, fewer attack iterations or queries, fewer attacked points. Choosing
among them is the owners' call; this script measures each option the same way:

* the whole job's wall time (``python -m experiments.lowrank --workdir=<temp> FLAGS``, a
  subprocess, warm compilation cache), the default job and every option taking turns in
  each round, so they share the machine's minutes (its speed drifts by up to ~30% over
  a day); an untimed first round compiles what an option needs (``--warmup``);
* how far the option moves the job's numbers from the default's: for every metric
  column (specialization, weight cosines, clean agreement, the ensemble's errors) and
  rank, the change of the mean over seeds, in absolute terms and in units of the
  default's standard error over seeds (``SE = std / sqrt(n)``, over the cells whose SE is
  at least ``MIN_SE``), and the mean signed change of the attack error columns: a weaker
  attack finds fewer adversarial points, so it shows as a negative bias there, while
  noise of the same size averages out;
* the md5 of ``results.csv`` of every run (every round of an option must agree: the job
  is deterministic).

    python -m benchmarks.main_job_options [--rounds=2] [--json=PATH]
        [--option="NAME:FLAG [FLAG ...]" ...] [--base_flags="FLAG [FLAG ...]"]

(flags split as a shell would: ``--option="r:--config.ranks='(5, 40)'"``).
"""

import argparse
import hashlib
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks import hardware
from benchmarks import main_job_floor

# (name, flags of experiments.lowrank) measured by default.
DEFAULT_OPTIONS = (
    ('steps_10k', ('--config.num_steps=10000',)),
    ('square_30', ('--config.attack.square_queries=30',)),
    ('steps_10k+square_30', ('--config.num_steps=10000', '--config.attack.square_queries=30')),
    ('attack_256', ('--config.num_attack=256',)),
    ('fast_attacks', ('--config.attack.strength=fast',)),
    ('steps_10k+fast_attacks', ('--config.num_steps=10000', '--config.attack.strength=fast')),
)
# The job's reported metrics (per-attack columns excluded: they change by construction
# when the attacks do; the ensemble's columns are what the manual reports (docs/)).
METRIC = re.compile(r'^(spec_in|spec_off|wcos_in|wcos_off|clean_agree'
                    r'|adv_[a-z]+_(in|off|full)_[0-9.]+)$')
ATTACK_ERROR = re.compile(r'^adv_')
MIN_SE = 1e-3  # cells with a smaller SE over seeds (e.g. spec_in = 1.000) get no z-score


def parse_flags(text: str, what: str) -> Tuple[str, ...]:
  """Flags split as a shell would (``shlex``); each must start with ``--``."""
  try:
    parts = tuple(shlex.split(text))
  except ValueError as e:
    raise ValueError(f'{what}: {e} in {text!r}') from None
  bad = [f for f in parts if not f.startswith('--')]
  if bad:
    raise ValueError(f'{what}: flags must start with --, got {bad}')
  return parts


def parse_option(text: str) -> Tuple[str, Tuple[str, ...]]:
  """``'NAME:FLAG [FLAG ...]'`` -> ``(NAME, (FLAG, ...))`` (``parse_flags``)."""
  name, sep, flags = text.partition(':')
  if not sep or not re.fullmatch(r'[A-Za-z0-9_.+-]+', name) or name == 'default':
    raise ValueError(f'--option must be NAME:FLAG [FLAG ...] with NAME of letters, digits '
                     f'and _.+- (not "default"), got {text!r}')
  parts = parse_flags(flags, f'--option {name}')
  if not parts:
    raise ValueError(f'--option {name}: give at least one flag, got {text!r}')
  return name, parts


def compare(base: Sequence[Dict], other: Sequence[Dict]) -> Dict:
  """How far ``other``'s results (rows of ``io.read_csv``) are from ``base``'s.

  Both must hold the same ``(rank, seed)`` rows. For every metric column (``METRIC``) and
  rank with values in ``base``: ``d`` = mean over seeds of ``other`` - that of ``base``
  and ``se`` = ``base``'s standard error over seeds.

  Returns:
    ``{'cells': int, 'max_abs': {column, rank, base, other, diff, se} of the largest
    |d|, 'max_z': the same with ``z = |d| / se`` for the largest z among cells with
    ``se >= MIN_SE`` (None when there is none), 'attack_bias': mean d over the
    ``adv_*`` cells (None when there is none)}``.

  Raises:
    ValueError: the two hold different rows, or a metric column of ``base`` is missing.
  """
  def key(row):
    return (row['rank'], row['seed'])
  if sorted(map(key, base)) != sorted(map(key, other)):
    raise ValueError('the two results hold different (rank, seed) rows: '
                     f'{sorted(map(key, base))} vs {sorted(map(key, other))}')
  columns = [c for c in base[0] if METRIC.match(c)]
  missing = [c for c in columns if c not in other[0]]
  if missing:
    raise ValueError(f'columns {missing} are missing from the other results')
  cells, bias = [], []
  for column in columns:
    for rank in sorted({row['rank'] for row in base}):
      b = [row[column] for row in base if row['rank'] == rank and row[column] is not None]
      o = [row[column] for row in other if row['rank'] == rank and row[column] is not None]
      if not b or not o:
        continue
      d = statistics.fmean(o) - statistics.fmean(b)
      se = statistics.stdev(b) / math.sqrt(len(b)) if len(b) > 1 else 0.0
      cells.append(dict(column=column, rank=rank, base=statistics.fmean(b),
                        other=statistics.fmean(o), diff=d, se=se))
      if ATTACK_ERROR.match(column):
        bias.append(d)
  if not cells:
    raise ValueError('no metric column with values in both results')
  scored = [c for c in cells if c['se'] >= MIN_SE]
  max_z = max(scored, key=lambda c: abs(c['diff']) / c['se']) if scored else None
  if max_z is not None:
    max_z = dict(max_z, z=abs(max_z['diff']) / max_z['se'])
  return {'cells': len(cells), 'max_abs': max(cells, key=lambda c: abs(c['diff'])),
          'max_z': max_z, 'attack_bias': statistics.fmean(bias) if bias else None}


def _md5(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.md5(f.read()).hexdigest()


def measure(options: Sequence[Tuple[str, Tuple[str, ...]]], rounds: int, warmup: bool,
            base_flags: Sequence[str] = (), python: Optional[str] = None,
            log=print) -> Dict:
  """Runs the default job and every option ``rounds`` times (taking turns) and compares.

  Returns ``{name: {'flags', 'wall', 'user', 'md5', 'comparison'}}`` with ``'default'``
  first (its comparison is None); ``wall`` / ``user`` hold one entry per timed round.
  """
  from tsrobust import io  # pylint: disable=g-import-not-at-top
  python = python or sys.executable
  runs = [('default', ())] + list(options)
  out = {name: {'flags': list(base_flags) + list(flags), 'wall': [], 'user': [], 'md5': []}
         for name, flags in runs}
  with tempfile.TemporaryDirectory() as root:
    for i in range(rounds + int(warmup)):
      timed = i >= int(warmup)
      for name, _ in runs:
        workdir = os.path.join(root, f'{name}_{i}')
        wall, user = main_job_floor.main_job(python, workdir, out[name]['flags'])
        out[name]['md5'].append(_md5(os.path.join(workdir, 'results.csv')))
        if timed:
          out[name]['wall'].append(wall)
          out[name]['user'].append(user)
        log(f'round {i + 1}{"" if timed else " (warm-up, not timed)"}: {name} {wall:.1f} s '
            f'wall, {user:.1f} s user CPU', flush=True)
    last = rounds + int(warmup) - 1
    base = io.read_csv(os.path.join(root, f'default_{last}', 'results.csv'))
    for name, _ in runs:
      other = io.read_csv(os.path.join(root, f'{name}_{last}', 'results.csv'))
      out[name]['comparison'] = None if name == 'default' else compare(base, other)
  return out


def table(out: Dict) -> str:
  """The markdown table of ``measure``'s output."""
  base_wall = statistics.median(out['default']['wall'])
  lines = ['| option | flags | wall s (rounds) | median | vs default | largest change of a '
           'seed mean (column, rank) | largest change / SE | mean change of the attack '
           'errors | results.csv md5 |', '|---|---|---|---|---|---|---|---|---|']
  for name, rec in out.items():
    wall = statistics.median(rec['wall'])
    c = rec['comparison']
    if c is None:
      change = z = bias = '-'
    else:
      m = c['max_abs']
      change = (f"{m['diff']:+.4f} ({m['column']}, {m['rank']:g}: {m['base']:.3f} -> "
                f"{m['other']:.3f}, SE {m['se']:.3f})")
      z = '-' if c['max_z'] is None else (
          f"{c['max_z']['z']:.2f} ({c['max_z']['column']}, {c['max_z']['rank']:g})")
      bias = '-' if c['attack_bias'] is None else f"{c['attack_bias']:+.4f}"
    md5s = sorted(set(rec['md5']))
    md5 = md5s[0][:8] if len(md5s) == 1 else 'DIFFER: ' + ' '.join(m[:8] for m in md5s)
    lines.append(f"| {name} | {' '.join(rec['flags']) or '(defaults)'} | "
                 f"{' / '.join(f'{w:.1f}' for w in rec['wall'])} | {wall:.1f} | "
                 f'{wall / base_wall:.2f}x | {change} | {z} | {bias} | {md5} |')
  return '\n'.join(lines)


def main(argv: Optional[List[str]] = None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=2, help='timed rounds (>= 1)')
  parser.add_argument('--warmup', action=argparse.BooleanOptionalAction, default=True,
                      help='an untimed first round (compiles what each option needs)')
  parser.add_argument('--option', action='append', default=None,
                      help='"NAME:FLAG [FLAG ...]" (repeatable; default: DEFAULT_OPTIONS)')
  parser.add_argument('--base_flags', default='',
                      help='"FLAG [FLAG ...]" given to every run, the default one too')
  parser.add_argument('--json', default=None, help='write the measurements to this path')
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error(f'--rounds must be >= 1, got {args.rounds}')
  try:
    options = ([parse_option(o) for o in args.option] if args.option
               else list(DEFAULT_OPTIONS))
    base_flags = parse_flags(args.base_flags, '--base_flags')
  except ValueError as e:
    parser.error(str(e))
  names = [n for n, _ in options]
  if len(set(names)) != len(names):
    parser.error(f'--option names must be distinct, got {names}')
  from tsrobust import sweep  # pylint: disable=g-import-not-at-top
  sweep.use_all_cpu_cores()  # as the jobs do, so the environment lists their devices
  meter = hardware.OtherLoad()  # the jobs are children: not counted
  out = measure(options, args.rounds, args.warmup, base_flags)
  others = meter.cores()
  environment = hardware.environment()
  print(f'\n{environment}\n')
  print(f'main job (python -m experiments.lowrank), {args.rounds} timed round(s), every '
        f'option after the default in each; warm compilation cache'
        f'{" (an untimed round first)" if args.warmup else ""}; other processes '
        f'{others:.2f} cores meanwhile\n')
  print(table(out))
  if args.json:
    from tsrobust import io  # pylint: disable=g-import-not-at-top
    io.write_json(args.json, {'runs': out, 'environment': environment,
                              'other_cores': others})
  return out


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  main()
