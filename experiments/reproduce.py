r"""Runs every study of the manual (docs/) and writes one report of their tables and figures.

    python -m experiments.reproduce --workdir=DIR [--preset=quick|full|paper] [--studies=a,b]
        [--cifar10_dir=PATH]
    python -m experiments.reproduce --workdir=DIR --update_readme

Each study of ``STUDIES`` runs as its own process, ``python -m experiments.<binary>
--workdir=DIR/<study> [--config=...] [--config.FIELD=VALUE ...]``, its output in
``DIR/<study>.log`` and its command, exit code and wall time in ``DIR/<study>.run.json``.
A study whose workdir already holds finished results of the same config (its result files
and a ``config.json`` equal to the config this run would use) is reused, not rerun; a
workdir holding another config is refused (one line, exit 2), as the binaries refuse it.

A study that reads an installed data set (``fashion_mnist``: Debian's
``dataset-fashion-mnist``) is skipped, with the install line in the report, where the data's
folder is missing.

``--preset=full`` (the default) runs the binaries' default configs: the manual's numbers.
``--preset=paper`` runs them and the image studies' teacher-replicated presets
(``real_replicated``, ``real_lowrank_replicated``, ``fashion_mnist_replicated``: 8 teachers
each, ``experiments/configs/real.py``'s ``replicate``), whose results the verdict table then
reads in place of the one-teacher studies'.
``--preset=quick`` runs tiny configs (a few steps, tiny networks, the ``fast`` attack
ensemble with PGD and APGD, two seeds, a few attacked points) to show the whole pipeline in
minutes. ``--jobs`` studies run at once (default: one per core with ``quick``, whose runs
are compile-bound; one with ``full``, so each wall time is the study's alone).

``DIR/REPORT.md`` (written atomically) holds the date, git commit, library versions and
machine, then per study the exact command, its wall time and status, its ``summary.md``
(every table wrapped in ``<!-- BEGIN GENERATED: <name> -->`` / ``<!-- END GENERATED:
<name> -->``) and links to its figures.

``--studies=a,b`` runs (or reuses) only those studies (default: all); the report says so,
and ``--update_readme`` on it updates their blocks and figures only, leaving every other
study's as it is: one study rerun after a change to it, without rerunning the rest.

``--update_readme`` copies every generated block of a ``full`` report into README.md and
every page of ``docs/`` (the manual), between the same markers, and the figures they link
(``docs/*.png``) from the studies' workdirs into ``docs/``; run again on the same report, it
changes nothing.

The studies share a persistent JAX compilation cache in ``DIR/jax_cache`` (unless
``JAX_COMPILATION_CACHE_DIR`` is set): a program one study compiled is loaded by the next
one and by a rerun.
"""

# This module (its docstring is its --help) owns the study table (STUDIES), the studies'
# commands and configs, and the driver: running or reusing the studies, --update_readme's
# reading and writing of files. The report's text and the generated-block surgery are
# experiments/report.py, whose names are re-exported here (reproduce.generated_blocks...).

import concurrent.futures
import datetime
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from absl import app
from absl import flags

from experiments import cli
from experiments import validation
from experiments import verdicts as verdicts_lib
from experiments import report as report_lib  # update_documents' text is `report`
from tsrobust import datasets
from tsrobust import io
from tsrobust import sweep

ROOT = report_lib.ROOT  # the repository root: the studies run there
PRESETS = ('quick', 'full', 'paper')
# A replicated study's name: its setting's name + this (the verdict table prefers it).
REPLICATED = '_replicated'
REPORT = report_lib.REPORT


class Study(NamedTuple):
  """One row of the study table.

  name: the study's folder in ``--workdir`` and its prefix in the generated blocks' names.
  binary: the module ``experiments.<binary>``.
  config: the ``--config`` argument (None: the binary's default config file).
  quick: ``FIELD=VALUE`` overrides of ``--preset=quick``.
  done: the files of a finished run (the binary writes them last, after training and
    evaluation).
  needs_cifar10: the study runs only when ``--cifar10_dir`` is given.
  overrides: ``FIELD=VALUE`` overrides of both presets (a variant of a binary's default,
    before the ``quick`` ones).
  data_dir: a folder the study reads (both presets); without it the study is skipped, and
    the report says ``data_hint`` (how to get the data).
  presets: the presets that run the study (``paper`` runs every study of ``full`` too).
  """
  name: str
  binary: str
  config: Optional[str]
  quick: Tuple[str, ...]
  done: Tuple[str, ...]
  needs_cifar10: bool = False
  overrides: Tuple[str, ...] = ()
  data_dir: Optional[str] = None
  data_hint: str = ''
  presets: Tuple[str, ...] = PRESETS


# The quick runs are compile-bound: the fast attack ensemble without APGD-T and Square
# (each binary then compiles PGD, APGD and, for oracle labels, the pair attack); the
# convergence check runs (and says the fast ensemble has not converged) without escalating.
_QUICK_ATTACKS = ('attack.strength=fast', 'attack.apgd_t_steps=0', 'attack.square_queries=0',
                  'max_escalations=0')
# Tiny synthetic configs (the binaries' tests use the same sizes): 2 seeds (one per core),
# d = 6, a few dozen steps, 16 attacked points.
_QUICK_LOWRANK = ('num_seeds=2', 'd=6', 'teacher_hidden=(3,)', 'out_dim=3', 'width_mult=2',
                  'batch_size=16', 'num_eval=64', 'eval_batch=32',
                  'num_attack=16') + _QUICK_ATTACKS
_QUICK_LOWRANK_RANKS = _QUICK_LOWRANK + ('ranks=(2,6)', 'num_steps=60', 'chunk_steps=30')
# Tiny image configs: 64 training / 40 test images, a one-block CNN, 2 PGD-trained teachers
# (one student of each), a robust-feature model of 10 steps, 4 student steps, 8 attacked images.
_QUICK_REAL = ('num_seeds=2', 'num_teachers=2', 'num_train=64', 'num_test=40',
               'teacher_conv=(2,)', 'teacher_dense=(4,)', 'teacher_training=pgd',
               'teacher_steps=10', 'teacher_batch=16', 'teacher_pgd_steps=1', 'rf_model_steps=10',
               'rf_steps=2', 'rf_batch=32',
               'at_eps=(0.1,)', 'at_steps=1', 'ccat_steps=1', 'num_steps=4', 'chunk_steps=4',
               'batch_size=8', 'eps=(0.1,0.3)', 'num_attack=8', 'eval_batch=20',
               'bootstrap_resamples=20') + _QUICK_ATTACKS
# The low-rank MNIST preset keeps its own L2 budgets.
_QUICK_REAL_LOWRANK = tuple(o for o in _QUICK_REAL if not o.startswith(('eps=', 'at_eps=')))
_LOWRANK_DONE = ('results.csv', 'results.json', 'summary.md')
# The mechanism study at the tiny sizes: 2 teachers x 1 student, two augmentation ranks, one
# noise scale, widths 1 and 2, one finite training set; the convergence check only.
_QUICK_MECHANISM = ('num_teachers=2', 'students_per_teacher=1', 'd=6', 'rank=2',
                    'teacher_hidden=(3,)', 'out_dim=3', 'width_mult=2', 'batch_size=16',
                    'num_eval=64', 'eval_batch=32', 'num_attack=16', 'convergence_points=16',
                    'num_steps=60', 'chunk_steps=30',
                    'augmentation.ranks=(2,4)', 'augmentation.scales=(0.3,)',
                    'dependence.width_mults=(1,2)', 'dependence.num_train=(32,)',
                    'dynamics.num_points=3', 'dynamics.record_chunk_steps=30') + _QUICK_ATTACKS
_REAL_DONE = ('results.csv', 'results.json', 'summary.json', 'summary.md')

STUDIES = (
    Study('lowrank', 'lowrank', None,
          _QUICK_LOWRANK_RANKS, _LOWRANK_DONE),
    # The default run with the strict oracle (any disagreement counts) and with L-inf budgets.
    Study('lowrank_strict', 'lowrank', None,
          _QUICK_LOWRANK_RANKS, _LOWRANK_DONE,
          overrides=('attack.oracle_tolerance=0',)),
    Study('lowrank_linf', 'lowrank', None,
          _QUICK_LOWRANK_RANKS, _LOWRANK_DONE,
          overrides=('attack_norm=linf', 'eps=(0.05,0.1,0.2)')),
    Study('robustness', 'robustness', None,
          _QUICK_LOWRANK + ('rank=2', 'num_steps=40', 'chunk_steps=40', 'at_steps=2',
                            'ccat_steps=2', 'at_eps=(0.5,1.0)', 'aug_scales=(1.0,)',
                            'bootstrap_resamples=50'), _LOWRANK_DONE),
    Study('mechanism', 'mechanism', None, _QUICK_MECHANISM, _LOWRANK_DONE),
    # The same students attacked on 4x the points: the check that the default's 64 suffice.
    Study('mechanism_strong', 'mechanism', 'experiments/configs/mechanism.py:strong',
          _QUICK_MECHANISM, _LOWRANK_DONE),
    # A two-hidden-layer teacher, student widths up to 10x (claims 1-3 of the item 5).
    Study('mechanism_deep', 'mechanism', 'experiments/configs/mechanism.py:deep',
          _QUICK_MECHANISM, _LOWRANK_DONE),
    Study('real', 'real', None, _QUICK_REAL, _REAL_DONE),
    Study('real_lowrank', 'real', 'experiments/configs/real.py:mnist_lowrank',
          _QUICK_REAL_LOWRANK, _REAL_DONE),
    Study('fashion_mnist', 'real', 'experiments/configs/real.py:fashion_mnist',
          _QUICK_REAL_LOWRANK, _REAL_DONE, data_dir=datasets.FASHION_MNIST_DIR,
          data_hint=f'{datasets.FASHION_MNIST_INSTALL} (Debian) installs it'),
    Study('cifar10', 'real', 'experiments/configs/real.py:cifar10',
          _QUICK_REAL + ('teacher_conv=(2,2,2)',), _REAL_DONE, needs_cifar10=True),
    # The image studies with 8 teachers (one student of each per grid point): --preset=paper.
    Study('real' + REPLICATED, 'real', 'experiments/configs/real.py:mnist' + REPLICATED, (),
          _REAL_DONE, presets=('paper',)),
    Study('real_lowrank' + REPLICATED, 'real',
          'experiments/configs/real.py:mnist_lowrank' + REPLICATED, (), _REAL_DONE,
          presets=('paper',)),
    Study('fashion_mnist' + REPLICATED, 'real',
          'experiments/configs/real.py:fashion_mnist' + REPLICATED, (), _REAL_DONE,
          data_dir=datasets.FASHION_MNIST_DIR,
          data_hint=f'{datasets.FASHION_MNIST_INSTALL} (Debian) installs it', presets=('paper',)),
)


# ----------------------------------------------------------------------------
# Commands and configs.
# ----------------------------------------------------------------------------

def display_path(path: str, root: str = ROOT) -> str:
  """``path`` as the studies' processes (run in ``root``) see it: relative when inside."""
  path = os.path.abspath(path)
  rel = os.path.relpath(path, root)
  return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def study_args(study: Study, preset: str, workdir: str,
               cifar10_dir: Optional[str] = None) -> List[str]:
  """The binary's arguments (after ``python -m experiments.<binary>``) for ``preset``."""
  if preset not in PRESETS:
    raise ValueError(f'preset must be one of {PRESETS}, got {preset!r}')
  args = [f'--workdir={workdir}']
  if study.config:
    args.append(f'--config={study.config}')
  if study.needs_cifar10:
    if not cifar10_dir:
      raise ValueError(f'study {study.name} needs cifar10_dir')
    args.append(f'--config.data_dir={cifar10_dir}')
  args += [f'--config.{o}' for o in study.overrides]
  if preset == 'quick':
    args += [f'--config.{o}' for o in study.quick]
  return args


def command_line(study: Study, args: Sequence[str]) -> str:
  """The shell command of a study, as a user would type it in the repository root."""
  return ' '.join(shlex.quote(a) for a in ['python', '-m', f'experiments.{study.binary}',
                                           *args])


def preset_error(config_arg: Optional[str], root: str = ROOT) -> Optional[str]:
  """Why the config file of ``--config=FILE:PRESET`` does not accept its preset (None: it does).

  A config file may not know a preset yet (one being written): the study is skipped with
  this reason instead of failing.
  """
  if not config_arg or ':' not in config_arg:
    return None
  path, preset = config_arg.split(':', 1)
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('_reproduce_config', os.path.join(root, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    module.get_config(preset)
  except (TypeError, ValueError, KeyError) as e:
    return cli.one_line(str(e))
  return None


def load_config(study: Study, args: Sequence[str], root: str = ROOT):
  """The config ``experiments.<binary>`` would run with ``args``, parsed as the binary does.

  Raises:
    validation.ConfigError: the config file or an override fails to load.
  """
  config_arg = study.config or f'experiments/configs/{study.binary}.py'
  path = os.path.join(root, config_arg)
  argv = [study.binary] + [a if not a.startswith('--config=') else f'--config={path}'
                           for a in args]
  flag_values = flags.FlagValues()
  cli.define_flags(os.path.join(root, f'experiments/configs/{study.binary}.py'),
                   flag_values, argv)
  try:
    flag_values(argv)
  except flags.Error as e:
    raise validation.ConfigError(cli.one_line(str(e))) from e
  return flag_values.config


def is_finished(study_dir: str, config, done: Sequence[str]) -> bool:
  """Whether ``study_dir`` holds a finished run of ``config``.

  Finished: every file of ``done`` and a ``config.json`` exist. A ``config.json`` of
  another config is refused (``cli.check_workdir``), as the binary would refuse it.

  Raises:
    validation.ConfigError: ``study_dir`` holds a run of a different config, or is a file.
  """
  cli.check_workdir(study_dir, config)
  names = ('config.json',) + tuple(done)
  return all(os.path.isfile(os.path.join(study_dir, n)) for n in names)


# ----------------------------------------------------------------------------
# Reports (REPORT.md, the generated blocks, the header rows): experiments/report.py.
# ----------------------------------------------------------------------------

BEGIN = report_lib.BEGIN
END = report_lib.END
format_duration = report_lib.format_duration
mark_tables = report_lib.mark_tables
generated_blocks = report_lib.generated_blocks
replace_generated_blocks = report_lib.replace_generated_blocks
report_preset = report_lib.report_preset
linked_figures = report_lib.linked_figures
docs_name = report_lib.docs_name
Outcome = report_lib.Outcome
render_report = report_lib.render_report
git_commit = report_lib.git_commit
header_rows = report_lib.header_rows


# ----------------------------------------------------------------------------
# Running the studies.
# ----------------------------------------------------------------------------

def _last_line(path: str) -> str:
  try:
    with open(path, errors='replace') as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return ''
  return lines[-1] if lines else ''


def _read(path: str) -> Optional[str]:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return None


def study_env(workdir: str, side_by_side: bool, environ=None) -> Dict[str, str]:
  """The environment of a study's process.

  Programs compiled by one study are reused by the next (real_lowrank compiles the
  evaluation of real again) and by a rerun: a persistent compilation cache in
  ``workdir/jax_cache``. Studies run ``side_by_side`` do not preallocate GPU memory (JAX
  takes 75% of a GPU per process by default, so the second process of a GPU machine would
  fail to allocate). What the user set is kept.
  """
  env = dict(os.environ if environ is None else environ)
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.abspath(workdir),
                                                           'jax_cache'))
  if side_by_side:
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  return env


def run_study(study: Study, args: Sequence[str], workdir: str, commit: Optional[str],
              root: str = ROOT, side_by_side: bool = False) -> Tuple[str, str, float]:
  """Runs one study as a subprocess (``study_env``); ``(status, detail, wall seconds)``."""
  log_path = os.path.join(workdir, f'{study.name}.log')
  cmd = [sys.executable, '-m', f'experiments.{study.binary}', *args]
  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  t0 = time.perf_counter()
  env = study_env(workdir, side_by_side)
  with open(log_path, 'w') as log:
    code = subprocess.run(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, env=env, check=False).returncode
  wall = time.perf_counter() - t0
  io.write_json(os.path.join(workdir, f'{study.name}.run.json'),
                {'command': command_line(study, args), 'exit_code': code, 'wall_s': wall,
                 'started': started, 'commit': commit})
  if code != 0:
    return 'failed', f'exit code {code}: {_last_line(log_path)}', wall
  return 'ran', '', wall


def same_command(a: Optional[str], b: str, root: str = ROOT) -> bool:
  """Whether two study commands are the same run: equal once each ``--workdir=`` is made
  absolute (relative to ``root``), so a report written with ``--workdir=runs/x`` reuses the
  wall time and commit of a run made with ``--workdir=/abs/path/runs/x``."""
  if a is None:
    return False

  def norm(command):
    return [f'--workdir={os.path.normpath(os.path.join(root, w[len("--workdir="):]))}'
            if w.startswith('--workdir=') else w for w in shlex.split(command)]
  return norm(a) == norm(b)


def reproduce(workdir: str, preset: str, cifar10_dir: Optional[str] = None,
              root: str = ROOT, studies: Sequence[Study] = STUDIES,
              log=print, jobs: int = 1,
              only: Optional[Sequence[str]] = None) -> List[Outcome]:
  """Runs (or reuses) every study and writes ``workdir/REPORT.md``; returns the outcomes.

  ``only``: the names of the studies to run (``select_studies``; None: all of ``studies``).

  ``jobs``: studies run at once (each is one process; a study's compilation uses about
  one core).

  Every study's config is loaded and its workdir checked before any study runs, so a
  workdir holding another config stops the run at once.

  Raises:
    validation.ConfigError: a study's config fails to load or its workdir holds another config.
  """
  studies = [st for st in studies if preset in st.presets]
  if only is not None:
    studies = select_studies(only, studies)
  os.makedirs(workdir, exist_ok=True)
  shown = display_path(workdir, root)
  commit, dirty = git_commit(root)
  run_commit = None if commit is None else commit + ('+dirty' if dirty else '')
  plan = []
  for study in studies:
    if study.needs_cifar10 and not cifar10_dir:
      continue
    args = study_args(study, preset, os.path.join(shown, study.name),
                      None if not cifar10_dir else display_path(cifar10_dir, root))
    command = command_line(study, args)
    why = preset_error(study.config, root)
    if not why and study.data_dir and not os.path.isdir(study.data_dir):
      why = f'data not installed: no folder {study.data_dir}; {study.data_hint}'
      plan.append((study, args, command, None, why))
      continue
    if why:
      plan.append((study, args, command, None, f'preset not available ({why})'))
      continue
    try:
      config = load_config(study, args, root)
      finished = is_finished(os.path.join(workdir, study.name), config, study.done)
    except validation.ConfigError as e:
      raise validation.ConfigError(f'study {study.name}: {e}') from e
    plan.append((study, args, command, finished, ''))

  lock = threading.Lock()

  def say(text: str) -> None:  # whole lines, also when studies run side by side
    with lock:
      log(text)

  def one(item) -> Outcome:
    study, args, command, finished, why = item
    study_dir = os.path.join(workdir, study.name)
    previous = {}
    if finished is None:
      status, detail, wall = 'skipped', why, None
    elif finished:
      previous = json.loads(_read(os.path.join(workdir, f'{study.name}.run.json')) or '{}')
      if not same_command(previous.get('command'), command, root):
        previous = {}
      status, wall = 'reused', previous.get('wall_s')
      detail = f'run of {previous["started"]}' if previous.get('started') else ''
    else:
      say(f'{study.name}: {command}')
      status, detail, wall = run_study(study, args, workdir, run_commit, root,
                                       side_by_side=jobs > 1)
    took = '' if not wall else (f' in {format_duration(wall)}' if status != 'reused' else
                                f' (that run took {format_duration(wall)})')
    say(f'{study.name}: {status}{took}' + (f' ({detail})' if detail else ''))
    has_results = status in ('ran', 'reused')
    figures = tuple(sorted(f for f in os.listdir(study_dir) if f.endswith('.png'))
                    ) if has_results else ()
    setting = study_setting(study.name)
    return Outcome(study.name, command, status, detail, wall,
                   run_commit if status == 'ran' else previous.get('commit'),
                   _read(os.path.join(study_dir, 'summary.md')) if has_results else None,
                   figures,
                   _setting_verdicts(setting, study_dir) if has_results and setting else None)

  t0 = time.perf_counter()
  if jobs > 1:
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
      outcomes = list(pool.map(one, plan))
  else:
    outcomes = [one(item) for item in plan]
  elapsed = time.perf_counter() - t0
  header = header_rows(root)
  header['studies run at once'] = str(jobs) + (
      ' (wall times of studies run side by side include their contention)' if jobs > 1 else '')
  header['wall time of this run'] = format_duration(elapsed)
  io.atomic_write_text(os.path.join(workdir, REPORT),
                       render_report(preset, header, outcomes, shown,
                                     None if only is None else [st.name for st in studies],
                                     verdict_section(workdir, partial=only is not None)))
  return outcomes


VERDICTS_BLOCK = 'verdicts'


def _setting_verdicts(setting: str, study_dir: str) -> str:
  """``experiments.verdicts.setting_table``, or the line saying why its rows cannot be read."""
  try:
    return verdicts_lib.setting_table(setting, study_dir)
  except ValueError as e:
    return f'Not judged: {e}'


def study_setting(name: str) -> Optional[str]:
  """The verdict table's setting whose results study ``name`` holds (``real_lowrank`` and
  ``real_lowrank_replicated``: ``real_lowrank``); None: a study no column reads."""
  base = name[:-len(REPLICATED)] if name.endswith(REPLICATED) else name
  return base if base in verdicts_lib.SETTINGS else None


def verdict_section(workdir: str, partial: bool = False) -> str:
  """The report's "Verdicts" section: the claims x settings table (``experiments.verdicts``,
  rules in docs/verdicts.md) of the studies' results in ``workdir``, as the generated block
  ``verdicts``, then (outside it: the README carries no commit hashes) the commit each
  setting's results come from.

  A setting without results shows "not run"; a setting whose replicated study
  (``<setting>_replicated``, ``--preset=paper``) has results is read from it. A ``--studies``
  run (``partial``) writes the table only when every setting's folder holds results (else a
  line saying which are missing), so that ``--update_readme`` never replaces a whole table by
  a partial one.
  """
  have = {}
  for s in verdicts_lib.SETTINGS:
    for name in (s + REPLICATED, s):
      if os.path.isfile(os.path.join(workdir, name, 'results.csv')):
        have[s] = os.path.join(workdir, name)
        break
  missing = [s for s in verdicts_lib.SETTINGS if s not in have]
  if partial and missing:
    return (f'Not written: the verdict table needs every setting\'s results in this folder; '
            f'missing: {", ".join(missing)}.')
  table = verdicts_lib.table_from_workdirs(have)
  made = []
  for s in have:
    name = os.path.basename(have[s])
    run = json.loads(_read(os.path.join(workdir, f'{name}.run.json')) or '{}')
    made.append(f'{verdicts_lib.TITLES[s]} ({name}) {str(run.get("commit") or "unknown")[:12]}')
  source = ('<sub>By the rules of `docs/verdicts.md` (`python -m experiments.verdicts`), '
            'from the studies\' `results.csv`; the reproduction report names the commit of '
            'each.</sub>')
  lines = [BEGIN.format(VERDICTS_BLOCK), table.rstrip('\n'), '', source,
           END.format(VERDICTS_BLOCK)]
  if made:
    lines += ['', 'The results\' commits: ' + ', '.join(made) + '.']
  return '\n'.join(lines) + '\n'


def select_studies(names: Sequence[str], studies: Sequence[Study] = STUDIES) -> List[Study]:
  """The studies named in ``names``, in ``studies``' order.

  Raises:
    validation.ConfigError: an unknown or repeated name, or no name.
  """
  known = [st.name for st in studies]
  unknown = [n for n in names if n not in known]
  if unknown or not names or len(set(names)) != len(names):
    raise validation.ConfigError(
        f'--studies must be distinct names among {", ".join(known)}, got '
        f'{",".join(names) or "nothing"}' + (f' (unknown: {", ".join(unknown)})' if unknown
                                             else ''))
  return [st for st in studies if st.name in names]


# ----------------------------------------------------------------------------
# README.md and the manual (docs/) from a full report.
# ----------------------------------------------------------------------------

def figure_sources(workdir: str, studies: Sequence[Study] = STUDIES) -> Dict[str, str]:
  """``docs/<name>`` -> the figure file in a study's workdir it is copied from."""
  out = {}
  for study in studies:
    folder = os.path.join(workdir, study.name)
    if os.path.isdir(folder):
      for f in sorted(os.listdir(folder)):
        if f.endswith('.png'):
          out[f'docs/{docs_name(study.name, f)}'] = os.path.join(folder, f)
  return out


def documents(root: str = ROOT) -> List[str]:
  """The files ``--update_readme`` updates: ``README.md`` and ``docs/*.md`` (relative to
  ``root``, README first, then the pages by name)."""
  docs = os.path.join(root, 'docs')
  pages = sorted(f for f in os.listdir(docs) if f.endswith('.md')) if os.path.isdir(docs) else []
  return ['README.md'] + [f'docs/{f}' for f in pages]


def update_documents(workdir: str, root: str = ROOT,
                     studies: Sequence[Study] = STUDIES) -> List[str]:
  """Copies the generated blocks of ``workdir/REPORT.md`` (a full one) into README.md and
  every page of ``docs/`` under ``root``, and the figures they link into ``root/docs/``.

  Every document is checked before any is written: a report that is missing or not
  ``full``, unbalanced markers, a marker without a block in the report, or a linked figure
  no study wrote stops it with nothing changed. A document whose text would not change is
  not rewritten, so a second run on the same report changes nothing. Returns the block
  names and figures updated, in order, once each.

  Raises:
    validation.ConfigError: naming the document and what is wrong.
  """
  report = _read(os.path.join(workdir, REPORT))
  if report is None:
    raise validation.ConfigError(
        f'--update_readme: {os.path.join(workdir, REPORT)} does not exist; '
                             f'run python -m experiments.reproduce --workdir={workdir} '
                             f'--preset=full first')
  preset = report_preset(report)
  if preset not in ('full', 'paper'):
    raise validation.ConfigError(f'--update_readme needs a report of --preset=full or paper; '
                                 f'{os.path.join(workdir, REPORT)} is from --preset={preset}')
  try:
    blocks = generated_blocks(report)
  except ValueError as e:
    raise validation.ConfigError(f'--update_readme: {REPORT}: {e}') from e
  limited = report_lib.report_studies(report)
  names = [st.name for st in studies]  # a --studies report: the others' blocks, figures stay
  sources = figure_sources(workdir, studies)
  plan, done = [], []
  for rel in documents(root):
    path = os.path.join(root, rel)
    text = _read(path)
    if text is None:
      continue
    try:
      current = generated_blocks(text)
      kept = {} if limited is None else {
          n: b for n, b in current.items() if report_lib.block_study(n, names) not in limited}
      updated = replace_generated_blocks(text, {**kept, **blocks})
    except ValueError as e:
      raise validation.ConfigError(f'--update_readme: {rel}: {e}') from e
    figures = linked_figures(text, in_docs=rel.startswith('docs/'))
    if limited is not None:
      figures = [f for f in figures if report_lib.figure_study(f, names) in limited]
    missing = [f for f in figures if f not in sources]
    if missing:
      raise validation.ConfigError(f'--update_readme: {rel} links {missing}, which no study of '
                                   f'{workdir} wrote (it has {sorted(sources)})')
    plan.append((path, text, updated, figures))
    done += [n for n in current if n in blocks] + figures
  for fig in dict.fromkeys(f for _, _, _, figures in plan for f in figures):
    with open(sources[fig], 'rb') as f:
      data = f.read()
    target = os.path.join(root, fig)
    if _read_bytes(target) != data:
      io.atomic_write_bytes(target, data)
  for path, text, updated, _ in plan:
    if updated != text:
      io.atomic_write_text(path, updated)
  return list(dict.fromkeys(done))


def _read_bytes(path: str) -> Optional[bytes]:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError:
    return None


# ----------------------------------------------------------------------------
# The binary.
# ----------------------------------------------------------------------------

def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string('workdir', None, 'Folder of the report; study S runs in DIR/S.',
                      flag_values=flag_values)
  flags.DEFINE_enum('preset', 'full', PRESETS, 'full: the binaries\' default configs (the '
                    'manual\'s numbers); paper: those and the image studies with 8 teachers '
                    '(their verdicts); quick: tiny configs (minutes).',
                    flag_values=flag_values)
  flags.DEFINE_string('cifar10_dir', None, 'Folder of the CIFAR-10 binary batches; adds the '
                      'cifar10 study.', flag_values=flag_values)
  flags.DEFINE_integer('jobs', 0, 'Studies run at once; 0: one per core with --preset=quick '
                       '(compile-bound: each compiles on about one core), 1 with --preset=full '
                       '(each study\'s wall time measured alone).', lower_bound=0,
                       flag_values=flag_values)
  flags.DEFINE_list('studies', None, 'Run (or reuse) only these studies, e.g. '
                    'robustness,mechanism (default: all); --update_readme on their report '
                    'updates their blocks only.', flag_values=flag_values)
  flags.DEFINE_bool('update_readme', False, 'Copy the generated blocks and figures of the '
                    'full report in --workdir into README.md and the manual, docs/*.md and '
                    'docs/*.png (runs no study).', flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS,
         root: str = ROOT, studies: Sequence[Study] = STUDIES) -> None:
  """Runs the studies (or updates README + docs); a user mistake ends in one line, exit 2."""
  f = flag_values
  try:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {list(argv[1:])}; flags are written '
                           f'--name=value')
    if not f.workdir:
      raise app.UsageError('--workdir is required (the folder of the report and the studies)')
    if f.update_readme:
      if f.cifar10_dir or f.studies:
        raise app.UsageError('--cifar10_dir and --studies are not used with --update_readme '
                             '(it copies an existing report, with the studies it ran)')
      done = update_documents(f.workdir, root, studies)
      print(f'updated README.md and docs/ from {os.path.join(f.workdir, REPORT)}: '
            f'{", ".join(done)}')
      return
    if f.cifar10_dir is not None and not os.path.isdir(f.cifar10_dir):
      raise app.UsageError(f'--cifar10_dir must be a folder holding the CIFAR-10 binary '
                           f'batches, got {f.cifar10_dir!r}')
    if os.path.exists(f.workdir) and not os.path.isdir(f.workdir):
      raise app.UsageError(f'--workdir {f.workdir} is a file, not a folder; use another '
                           f'--workdir')
    cli.quiet_library_logs()
    jobs = f.jobs or (sweep.cpu_cores() if f.preset == 'quick' else 1)
    outcomes = reproduce(f.workdir, f.preset, f.cifar10_dir, root, studies, jobs=jobs,
                         only=f.studies)
  except (validation.ConfigError, app.UsageError) as e:
    cli.exit_with_error(e)
  except KeyboardInterrupt:
    cli.exit_with_error('interrupted; the same command resumes (finished studies are '
                        'reused, an interrupted one resumes from its checkpoints)',
                        code=130)
  print(f'wrote {os.path.join(f.workdir, REPORT)}')
  failed = [o.name for o in outcomes if o.status == 'failed']
  if failed:
    cli.exit_with_error(f'studies failed: {", ".join(failed)} (logs: '
                        + ', '.join(os.path.join(f.workdir, f'{n}.log') for n in failed)
                        + ')', code=cli.RUN_EXIT_CODE)


def run(argv: Optional[Sequence[str]] = None,
        flag_values: Optional[flags.FlagValues] = None, root: str = ROOT,
        studies: Sequence[Study] = STUDIES) -> None:
  """The entry point; ``flag_values`` (tests): private flags, run in-process without absl.app."""
  args = list(sys.argv if argv is None else argv)
  if flag_values is None:
    define_flags(flags.FLAGS)
    app.run(lambda a: main(a, flags.FLAGS, root, studies), argv=args,
            flags_parser=lambda a: cli.parse_flags(a, flags.FLAGS))
  else:
    define_flags(flag_values)
    main(cli.parse_flags(args, flag_values), flag_values, root, studies)


if __name__ == '__main__':
  run()
