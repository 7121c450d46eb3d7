"""Shared pieces of the experiment binaries: config checks, progress, result files."""

import functools
import json
import logging as logging_lib
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from experiments import validation
from tsrobust import attacks
from tsrobust import data
from tsrobust import evaluate
from tsrobust import io
from tsrobust import methods
from tsrobust import metrics
from tsrobust import models
from tsrobust import specialization
from tsrobust import stats
from tsrobust import sweep
from tsrobust import train


ConfigError = validation.ConfigError


class RunError(RuntimeError):
  """A run stopped for a reason the user can act on (``run_binary`` prints it in one line)."""


def as_tuple(v) -> tuple:
  """A config value that may be a single item or a sequence, as a tuple."""
  return (v,) if isinstance(v, (str, int, float)) else tuple(v)


def progress_logger(stage: str, max_lines: int = 10, stream=None):
  """An ``on_chunk`` callback reporting steps/s and ETA.

  On a terminal: one live line, rewritten in place (``\\r``), ended when the
  stage ends. Elsewhere (CI, files): at most ``max_lines`` log lines per stage,
  evenly spaced, the last one always included.
  """
  stream = sys.stderr if stream is None else stream
  live = hasattr(stream, 'isatty') and stream.isatty()
  logged = [0]

  def on_chunk(info: Mapping[str, float]) -> None:
    text = (f"{stage}: step {info['step']}/{info['num_steps']}  loss {info['loss']:.3e}  "
            f"{info['steps_per_sec']:.0f} steps/s  ETA {info['eta_sec']:.0f}s")
    last = info['step'] >= info['num_steps']
    if live:
      stream.write('\r' + text + ('\n' if last else ''))
      stream.flush()
      return
    due = info['step'] * max_lines >= (logged[0] + 1) * info['num_steps']
    if (due or last) and (logged[0] < max_lines or last):
      logged[0] += 1
      logging.info('%s', text)
  return on_chunk


def eps_name(eps: Any) -> str:
  """A budget as written in the config (``1.0`` -> ``'1.0'``, ``1`` -> ``'1'``)."""
  return str(eps)


class _DropLibraryInfo(logging_lib.Filter):
  """Drops INFO records of checkpointing internals (orbax logs every file it writes)."""

  def filter(self, record):
    return record.levelno >= logging_lib.WARNING or '/orbax/' not in record.pathname


# Loggers whose INFO records are noise to a user (e.g. jax's "Unable to initialize backend
# 'tpu'" on every machine without one): shown from WARNING up unless --verbosity >= 1.
QUIET_LOGGERS = ('jax._src.xla_bridge',)


def quiet_library_logs() -> None:
  """Keeps a binary's log to its own progress lines (and every warning).

  Call before JAX starts its backends (the TPU INFO line is logged then).
  With ``--verbosity=1`` (DEBUG) or more, the libraries' INFO lines stay.
  """
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
  level = logging_lib.INFO if logging.get_verbosity() >= logging.DEBUG else logging_lib.WARNING
  for name in QUIET_LOGGERS:
    logging_lib.getLogger(name).setLevel(level)


# ----------------------------------------------------------------------------
# The binaries' entry point: flags, and user mistakes as one line on stderr.
# ----------------------------------------------------------------------------

USAGE_EXIT_CODE = 2  # a mistake in the command line or the config (as argparse)
RUN_EXIT_CODE = 1    # a run stopped (RunError), e.g. diverged training


def exit_with_error(message: Any, code: int = USAGE_EXIT_CODE, stream=None) -> None:
  """Writes ``error: <message>`` as one line on stderr and exits with ``code``."""
  stream = sys.stderr if stream is None else stream
  stream.write(f'error: {one_line(str(message))}\n')
  stream.flush()
  raise SystemExit(code)


def one_line(text: str) -> str:
  """``text`` on one line: a multi-line message (one wrapping a traceback, as a config
  file's failure to load does) is its first line and its last (the error itself)."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if len(lines) <= 2:
    return ' '.join(lines)
  return f'{lines[0]} ... {lines[-1]}'


def _config_overrides(argv: Sequence[str]) -> List[str]:
  """The field paths of the ``--config.FIELD=VALUE`` arguments in ``argv``."""
  found = []
  for arg in argv:
    m = re.match(r'-{1,2}(?:no)?config\.([^=]+)', arg)
    if m:
      found.append(m.group(1))
  return found


def _flag_error_message(error: Exception, argv: Sequence[str]) -> str:
  """A one-line message for a failure of absl / ml_collections to read the flags."""
  nested = [f for f in _config_overrides(argv) if '.' in f]
  if nested:  # the configs are flat: --config.d.x or a misspelled --config.foo.bar
    return (f'--config.{nested[0]}: config fields are not nested; write --config.FIELD=VALUE '
            f'with a field of the config')
  if isinstance(error, KeyError) and error.args:  # KeyError quotes its message
    return one_line(str(error.args[0]))
  return one_line(str(error))


def define_flags(default_config: str, flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Optional[Sequence[str]] = None) -> None:
  """Defines ``--config``, ``--workdir``, ``--cpu_devices``, ``--compilation_cache``,
  ``--unrolled_threefry`` and the multi-process flags.

  ``--config.FIELD=VALUE`` of a field the config lacks is accepted here (the
  config is not locked) and refused by the binary's table check
  (``validation.check_config``), which names the closest fields. ``argv``:
  the command line the config overrides are read from (default ``sys.argv``).

  Raises:
    ConfigError: the default config file fails to load with the overrides.
  """
  try:
    config_flags.DEFINE_config_file(
        'config', default_config, 'Experiment config file; every field can be overridden '
        'as --config.FIELD=VALUE.', flag_values=flag_values, lock_config=False,
        accept_new_attributes=True, sys_argv=None if argv is None else list(argv))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(_flag_error_message(e, sys.argv if argv is None else argv)) from e
  flags.DEFINE_string('workdir', None, 'Folder for the result files.', flag_values=flag_values)
  flags.DEFINE_integer('cpu_devices', 0, 'CPU devices to run on (seeds are sharded over '
                       'them): 0 = one per core, 1 = a single device, N = N devices.',
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_string('compilation_cache', None, "Folder of JAX's persistent compilation "
                      'cache: programs an earlier run compiled are loaded, not compiled again '
                      '(default: $XDG_CACHE_HOME/tsrobust/jax, i.e. ~/.cache/tsrobust/jax; '
                      "'' turns it off; JAX_COMPILATION_CACHE_DIR, when set, wins).",
                      flag_values=flag_values)
  flags.DEFINE_boolean('unrolled_threefry', True, 'On CPU, lower the threefry hash of '
                       "jax.random as straight-line code (JAX's lowering on accelerators): "
                       'the same random numbers, drawn 3-6x faster '
                       '(sweep.use_unrolled_threefry_on_cpu).', flag_values=flag_values)
  flags.DEFINE_float('checkpoint_every_sec', DEFAULT_CHECKPOINT_EVERY_SEC,
                     'Save training checkpoints at most every this many seconds, and at the '
                     'end of each training stage (0: after every chunk). A killed run resumes '
                     'from the last save.', lower_bound=0, flag_values=flag_values)
  define_distributed_flags(flag_values)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> List[str]:
  """absl's flag parsing; a mistake ends in one line on stderr (exit 2), not usage text."""
  try:
    return flag_values(list(argv))
  except flags.Error as e:
    exit_with_error(_flag_error_message(e, argv))


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a ``workdir`` whose ``config.json`` holds a different config.

  Its checkpoints and results belong to that config and would be silently
  mixed; the message names the differing fields and what to do.
  """
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is a file, not a folder; use another --workdir')
  if not os.path.exists(path):
    return
  current = json.loads(json.dumps(io.to_plain(config.to_dict())))  # as it reads back
  with open(path) as f:
    previous = json.load(f)
  if previous != current:
    changed = sorted(k for k in set(previous) | set(current)
                     if previous.get(k) != current.get(k))
    values = '; '.join(f'{k}: {previous.get(k, "(none)")!r} there, '
                       f'{current.get(k, "(none)")!r} now' for k in changed[:3])
    raise ConfigError(
        f'{workdir} holds a run with a different config (fields {changed} differ; {values}); '
        f'use a new --workdir, or delete that one to start over')


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates ``workdir`` and records the config in ``config.json``.

  A workdir already holding a different config is refused (``check_workdir``).
  """
  check_workdir(workdir, config)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'--workdir {workdir} cannot be created ({e.strerror}); use another '
                      f'--workdir') from e
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    return
  if jax.process_index() == 0:
    io.write_json(path, json.loads(json.dumps(io.to_plain(config.to_dict()))))


def _main(argv: Sequence[str], validate: Callable, train_and_evaluate: Callable,
          outputs: Sequence[str], flag_values: flags.FlagValues) -> None:
  """The body of a binary; a user mistake ends in one line on stderr (``exit_with_error``)."""
  try:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {list(argv[1:])}; flags are written '
                           f'--name=value')
    quiet_library_logs()  # before JAX starts its backends
    workdir = flag_values.workdir
    if not workdir:
      raise app.UsageError('--workdir is required (the folder for the result files)')
    config = flag_values.config
    if not isinstance(config, ml_collections.ConfigDict):
      try:  # a --config file that failed to load: its error is raised on any access
        config.to_dict()
      except OSError as e:
        cause = str(e).strip().splitlines()[-1].strip()
        raise app.UsageError(f'--config: the config file could not be loaded ({cause})') from e
      raise app.UsageError(f'--config must give an ml_collections.ConfigDict, got '
                           f'{type(config).__name__}')
    validate(config)
    check_workdir(workdir, config)  # mistakes are reported before any output or JAX work
    sweep.use_all_cpu_cores(flag_values.cpu_devices  # before any JAX work
                            or cpu_devices_per_process(flag_values))
    cache = sweep.use_compilation_cache(flag_values.compilation_cache)  # before any compile
    threefry = flag_values.unrolled_threefry and sweep.use_unrolled_threefry_on_cpu()
    set_checkpoint_every_sec(flag_values.checkpoint_every_sec)
    init_distributed(flag_values)  # after the checks (a mistake stops every process alike)
    devices = jax.devices()
    logging.info('running on %d %s device(s) (--cpu_devices=%d, %d cores): %s; compilation '
                 'cache %s; threefry on CPU %s', len(devices), devices[0].platform,
                 flag_values.cpu_devices, sweep.cpu_cores(), devices, cache or 'off',
                 'unrolled' if threefry else "JAX's default")
    train_and_evaluate(config, workdir)
  except (ConfigError, app.UsageError) as e:
    exit_with_error(e)
  except RunError as e:
    exit_with_error(e, code=RUN_EXIT_CODE)
  if jax.process_index() == 0:
    logging.info('wrote %s in %s', ', '.join(outputs), workdir)
  else:
    logging.info('process %d of %d done (process 0 writes the files)', jax.process_index(),
                 jax.process_count())


# ----------------------------------------------------------------------------
# Multi-process runs (jax.distributed): flags, CPU devices per process, start.
# ----------------------------------------------------------------------------

def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """``--coordinator_address``, ``--num_processes``, ``--process_id`` (``init_distributed``)."""
  flags.DEFINE_string('coordinator_address', '', 'host:port of process 0 in a multi-process '
                      'run (jax.distributed); empty: a single process.', flag_values=flag_values)
  flags.DEFINE_integer('num_processes', 1, 'Processes in the run (with --coordinator_address).',
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer('process_id', 0, 'This process\'s index in [0, --num_processes); '
                       'process 0 writes every file.', lower_bound=0, flag_values=flag_values)


def _is_loopback(address: str) -> bool:
  """Whether ``host:port`` names this machine by a loopback name (every process runs here)."""
  import ipaddress  # pylint: disable=g-import-not-at-top
  host = address.rsplit(':', 1)[0].strip('[]').lower()
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def cpu_devices_per_process(flag_values: flags.FlagValues = flags.FLAGS) -> Optional[int]:
  """This process's CPU device count under ``--cpu_devices=0``; None: one per core.

  In a multi-process run whose coordinator is a loopback address (``localhost:PORT``: every
  process on this machine) the processes share the cores: ``cores // num_processes`` each
  (at least 1). Otherwise (one process per machine) every process takes its machine's cores;
  processes sharing a machine under a routable coordinator address should get
  ``--cpu_devices`` (or be pinned with ``taskset``: the count follows the CPU affinity).
  """
  f = flag_values
  if f.num_processes > 1 and f.coordinator_address and _is_loopback(f.coordinator_address):
    return max(1, sweep.cpu_cores() // f.num_processes)
  return None


def init_distributed(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Joins a multi-process run (``jax.distributed.initialize``) if ``--coordinator_address``.

  Call before any JAX computation. Every process runs the same binary with the same config
  and ``--workdir`` (a folder all of them see: orbax writes each process's checkpoint shards
  there); the seeds are sharded over the devices of all processes (``mesh``), results are
  gathered back to every process (``sweep.to_host``) and only process 0 writes result
  files. On CPU, cross-process collectives use gloo.

  Raises:
    app.UsageError: ``--num_processes`` / ``--process_id`` without a coordinator, an
      address without a port, or a ``--process_id`` out of range.
  """
  f = flag_values
  if not f.coordinator_address:
    if f.num_processes != 1 or f.process_id != 0:
      raise app.UsageError('--num_processes and --process_id need --coordinator_address '
                           '(host:port of process 0)')
    return
  if ':' not in f.coordinator_address:
    raise app.UsageError(f'--coordinator_address must be host:port, got '
                         f'{f.coordinator_address!r}')
  if f.process_id >= f.num_processes:
    raise app.UsageError(f'--process_id must be in [0, {f.num_processes}) '
                         f'(--num_processes), got {f.process_id}')
  # Cross-process collectives on CPU: gloo (the default of recent jaxlibs; 'none' fails them).
  if jax.config.values.get('jax_cpu_collectives_implementation', 'gloo') in (None, '', 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f.coordinator_address,
                             num_processes=f.num_processes, process_id=f.process_id)
  logging.info('process %d of %d (coordinator %s)', jax.process_index(), jax.process_count(),
               f.coordinator_address)


def run_binary(validate: Callable, train_and_evaluate: Callable, default_config: str,
               outputs: Sequence[str], argv: Optional[Sequence[str]] = None,
               flag_values: Optional[flags.FlagValues] = None) -> None:
  """The absl entry point of an experiment binary (call under ``__main__``).

  Defines ``--config`` (an ml_collections config file, every field
  overridable), ``--workdir`` and ``--cpu_devices`` here rather than at
  import, so binaries can be imported side by side; validates the config
  (``validate``: the binary's table and cross-field checks) and the workdir
  before any work.

  Every user mistake - a flag absl cannot parse, an unknown or misspelled
  config field, a bad value, a workdir holding another config, a check that
  needs the loaded data (a ``ConfigError`` raised in ``train_and_evaluate``) -
  ends with one line ``error: <message>`` on stderr, naming the field and what
  is allowed, and exit code 2 (no traceback, no usage text); a ``RunError``
  (e.g. diverged training) likewise, with exit code 1.

  ``--cpu_devices=N`` sets how many devices JAX makes of the CPU, before any
  JAX work (``sweep.use_all_cpu_cores``); the seeds are sharded over them.
  0 (the default): one per core; 1: a single device (JAX's default); N: N
  devices. A count already set by the user (``--xla_force_host_platform_device_count``
  in ``XLA_FLAGS``, or ``JAX_NUM_CPU_DEVICES``) is kept, and on a GPU / TPU the
  flag changes nothing. The log says how many devices the run uses.

  ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``: this
  process is process I of a multi-process run (``init_distributed``); the
  seeds are sharded over the devices of all processes and only process 0
  writes files.

  Args:
    validate: ``config -> None``, raising ``ConfigError``.
    train_and_evaluate: ``(config, workdir) -> Any``.
    default_config: the config file ``--config`` defaults to.
    outputs: the files the binary writes (for the last log line).
    argv: the command line (default ``sys.argv``).
    flag_values: tests: a private ``flags.FlagValues`` to define the flags on;
      the binary then runs in-process without ``absl.app`` (no absl flags such
      as ``--verbosity``, no logging setup) and ends as it would (``SystemExit``).
  """
  in_app = flag_values is None
  flag_values = flags.FLAGS if in_app else flag_values
  args = list(sys.argv if argv is None else argv)
  try:
    define_flags(default_config, flag_values, args)
  except ConfigError as e:
    exit_with_error(e)
  main = functools.partial(_main, validate=validate, train_and_evaluate=train_and_evaluate,
                           outputs=outputs, flag_values=flag_values)
  if in_app:
    app.run(main, argv=args, flags_parser=functools.partial(parse_flags, flag_values=flag_values))
  else:
    main(parse_flags(args, flag_values))


def write_results(workdir: str, config: ml_collections.ConfigDict,
                  records: List[Dict[str, Any]], columns: Iterable[str]) -> None:
  """``results.csv`` and ``results.json`` (config, versions, records), atomically.

  Only process 0 writes (multi-host runs compute the same records everywhere).
  """
  if jax.process_index() != 0:
    return
  columns = list(columns)
  io.write_csv(os.path.join(workdir, 'results.csv'), records, columns)
  payload = {'config': config.to_dict(), 'versions': io.library_versions(),
             'columns': columns, 'records': records}
  io.write_json(os.path.join(workdir, 'results.json'), payload)


# ----------------------------------------------------------------------------
# The attack ensemble's fields, shared by every binary.
# ----------------------------------------------------------------------------

# config field -> AttackConfig field; -1 takes the preset's value.
ATTACK_OVERRIDES = {'attack_steps': 'pgd_steps', 'attack_restarts': 'pgd_restarts',
                    'apgd_steps': 'apgd_steps', 'apgd_restarts': 'apgd_restarts',
                    'apgd_t_steps': 'apgd_t_steps', 'attack_targets': 'targets',
                    'square_queries': 'square_queries', 'pair_steps': 'pair_steps',
                    'pair_targets': 'pair_targets', 'pair_restarts': 'pair_restarts'}


_PRESETS = {-1: "the preset's"}

# The fields experiments/configs/attacks.py adds to every config (``add_attack_fields``).
ATTACK_FIELDS = {
    'attack_strength': validation.Choice(evaluate.STRENGTHS),
    'attack_steps': validation.Int(lo=-1),
    'attack_restarts': validation.Int(lo=1, special=_PRESETS),
    'apgd_steps': validation.Int(lo=-1),
    'apgd_restarts': validation.Int(lo=1, special=_PRESETS),
    'apgd_t_steps': validation.Int(lo=-1),
    'attack_targets': validation.Int(lo=-1),
    'square_queries': validation.Int(lo=-1),
    'pair_steps': validation.Int(lo=-1),
    'pair_targets': validation.Int(lo=-1),
    'pair_restarts': validation.Int(lo=1, special=_PRESETS),
    'pair_smoothing': validation.Float(lo=0, special={-1.0: "the preset's"}),
    'surrogate_temperature': validation.Float(lo=0),
    'convergence_points': validation.Int(lo=0),
    'attack_step_factor': validation.Float(lo=0, lo_open=True),
    'oracle_loss': validation.Choice(attacks.ORACLE_LOSSES),
    'oracle_tolerance': validation.Float(lo=0),
}


def check_attack_rules(config) -> None:
  """Cross-field rule: the preset with its overrides must make a valid attack ensemble."""
  try:
    cfg = attack_config(config)
  except ValueError as e:
    raise ConfigError(f'config.attack_strength / its overrides: {e}') from e
  if not cfg.attacks_for('fixed'):
    raise ConfigError(f'config.attack_strength / its overrides: only {cfg.attacks} would run, '
                      f'for oracle labels only; the clean-label evaluations need another attack '
                      f'(pgd, apgd, apgd_t or square)')


def attack_config(config) -> evaluate.AttackConfig:
  """The ``evaluate.AttackConfig`` of ``config``: the preset, then every override != -1."""
  overrides = {dst: int(config[src]) for src, dst in ATTACK_OVERRIDES.items()
               if int(config[src]) != -1}
  if float(config.pair_smoothing) != -1:
    overrides['pair_smoothing'] = float(config.pair_smoothing)
  return evaluate.preset(config.attack_strength, pgd_step_factor=float(config.attack_step_factor),
                         oracle_loss=config.oracle_loss,
                         oracle_tolerance=float(config.oracle_tolerance), **overrides)


def headline_eps(config) -> float:
  """The budget summaries and figures show: the middle of ``config.eps`` as written."""
  return config.eps[len(config.eps) // 2]


def attack_checks_summary(config, checks: Mapping[str, Any]) -> Dict[str, Any]:
  """``attack_checks.json``: the ensemble's settings and the per-group checks."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  return {'attack_strength': config.attack_strength,
          'attack_config': dataclasses.asdict(attack_config(config)),
          'surrogate_temperature': float(config.surrogate_temperature),
          'headline_eps': headline_eps(config), 'groups': dict(checks)}


def attack_checks_markdown(summary: Mapping[str, Any]) -> str:
  """A markdown section of ``attack_checks_summary``: is the evaluation trustworthy?"""
  groups = summary['groups']
  if not groups:
    return ''
  first = next(iter(groups.values()))
  attacks_run = list(first['per_attack'])
  head = first['headline_eps']
  labels = list(first['convergence'])
  lines = [f'## Attack checks (`attack_strength = {summary["attack_strength"]}`)', '',
           'Per-example violations of the invariants by each raw attack and by their union '
           '(before the evaluation enforces them: `full` includes `in` / `off`, errors '
           'non-decreasing in eps), summed over students; points only Square broke; '
           f'untargeted APGD\'s error after k iterations (full space, eps {head:g}) beside the '
           'ensemble\'s error.', '']
  cols = ['group', 'students'] + [f'viol. {a}' for a in attacks_run] + ['viol. union',
                                                                      'viol. final']
  for label in labels:
    cols += [f'only Square ({label}, full, {head:g})', f'APGD error vs iterations ({label})',
             f'ensemble ({label})']
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  total = lambda d: d['non_monotone_in_eps'] + d['subspace_not_in_full']
  for name, g in groups.items():
    cells = [name, str(g['students'])]
    cells += [str(total(g['per_attack'][a])) for a in attacks_run]
    cells += [str(total(g['raw_ensemble'])), str(total(g['final']))]
    for label in labels:
      sq = g['only_square'].get(f'{label}_full_{head:g}')
      cells.append('-' if sq is None else f'{sq:.4f}')
      conv = g['convergence'][label]
      cells.append(' / '.join(f'{k}: {v:.3f}' for k, v in
                              conv['apgd_error_after_iterations'].items()))
      cells.append(f"{conv['ensemble_error']:.3f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n' + doubling_markdown(summary)


def doubling_markdown(summary: Mapping[str, Any]) -> str:
  """The convergence check per group (``evaluate.doubling``): '' when it did not run."""
  groups = {k: g['doubling'] for k, g in summary['groups'].items() if 'doubling' in g}
  if not groups:
    return ''
  first = next(iter(groups.values()))
  threshold = first['threshold']
  head = next(iter(summary['groups'].values()))['headline_eps']  # as the attacks' budgets
  bad = [k for k, d in groups.items() if not d['converged']]
  lines = ['', f'### Convergence: the ensemble with every iteration count doubled', '',
           f'On the first {first["points"]} attacked points of each student, the ensemble '
           f'with twice the iterations and queries (other random starts) attacks again; a '
           f'group has converged when that raises no error cell (label, subspace, budget) by '
           f'more than {threshold:g}. Errors are combined as in the evaluation (the doubled '
           f'run\'s successes added to the run\'s).', '']
  if bad:
    lines += [f'**Not converged: {", ".join(bad)}.** Their errors are lower bounds; a '
              f'stronger `attack_strength` (or more iterations) would find more.', '']
  else:
    lines += ['Every group has converged.', '']
  cols = ['group', 'students', f'oracle, full, {head:g}: run / doubled',
          'largest gain: cell', 'run / doubled', 'converged']
  lines += ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, d in groups.items():
    key = f'oracle_full_{head:g}'
    main = d['cells'].get(key)
    before, after = d['cells'][d['max_gain_cell']]
    lines.append('| ' + ' | '.join([
        name, str(d['students']),
        '-' if main is None else f'{main[0]:.3f} / {main[1]:.3f}',
        f'`{d["max_gain_cell"]}`', f'{before:.3f} / {after:.3f}',
        'yes' if d['converged'] else '**no**']) + ' |')
  return '\n'.join(lines) + '\n'


def correlation(x, y, groups, seeds, key, num_resamples: int) -> Dict[str, Any]:
  """Pooled correlation of ``x`` and ``y`` across students, with within-method ones.

  Intervals are bootstrapped over seeds (``seeds``: the seed id of each
  student; all methods of a seed share its teacher, initial student and data
  stream, so students are resampled in seed clusters). Returns the pooled
  ``stats.correlation_report`` keys at the top level, plus ``'pooled_within'``
  (the correlation of the deviations from each method's mean) and
  ``'by_method'`` (one report per method).
  """
  rep = stats.within_group_correlations(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                        np.asarray(groups), np.asarray(seeds), key,
                                        num_resamples)
  return {**rep['pooled'], 'pooled_within': rep['pooled_within'], 'by_method': rep['groups']}


def correlation_markdown(reports: Mapping[str, Mapping[str, Any]], x_name: str,
                         num_resamples: int) -> str:
  """A markdown table of ``correlation`` reports, one row per robust-accuracy column."""
  fmt = lambda v: '-' if v is None or not np.isfinite(v) else f'{v:.3f}'
  ci = lambda r, k: (f'{fmt(r[k])} [{fmt((r.get(k + "_ci") or [None])[0])}, '
                     f'{fmt((r.get(k + "_ci") or [None, None])[1])}]')
  first = next(iter(reports.values()))
  methods = list(first['by_method'])
  lines = [f'Correlation across students of `{x_name}` with robust accuracy (95% intervals, '
           f'{num_resamples} bootstrap resamples of seeds: all methods of a seed move together). '
           '*Pooled*: all students; *within*: deviations from each method\'s mean, pooled; '
           'then Pearson within each method (`-`: too few students or constant).', '',
           '| robust accuracy | n | Pearson pooled | Spearman pooled | Pearson within | '
           + ' | '.join(methods) + ' |', '|' + '---|' * (5 + len(methods))]
  for name, r in reports.items():
    cells = [f'`{name}`', str(r['n']), ci(r, 'pearson'), ci(r, 'spearman'),
             ci(r['pooled_within'], 'pearson')]
    cells += [fmt(r['by_method'][m]['pearson']) for m in methods]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------
# The low-rank synthetic setting, shared by experiments/lowrank.py and
# experiments/robustness.py.
# ----------------------------------------------------------------------------

WHERES = ('in', 'off', 'full')
# The paragraph before a summary.md table of adversarial error per subspace and budget
# (experiments.reproduce names its generated block '<study>-subspaces').
SUBSPACE_TABLE_TITLE = 'Adversarial error by subspace and budget'
LOWRANK_LABELS = ('oracle', 'fixed')  # evaluate.LABEL_KINDS of the synthetic setting


# Student training, shared by every binary.
TRAINING_FIELDS = {
    'seed': validation.Int(lo=0),
    'num_seeds': validation.Int(lo=1),
    'width_mult': validation.Int(lo=1),
    'student_init_scale': validation.Float(lo=0, lo_open=True),
    'loss': validation.Choice(train.LOSSES),
    'optimizer': validation.Choice(train.OPTIMIZERS),
    'learning_rate': validation.Float(lo=0, lo_open=True),
    'momentum': validation.Float(lo=0, hi=0.999),
    'weight_decay': validation.Float(lo=0),
    'schedule': validation.Choice(train.SCHEDULES),
    'batch_size': validation.Int(lo=1),
    'num_steps': validation.Int(lo=0),
    'chunk_steps': validation.Int(lo=1),
}

# The training methods' grids and the correlation's bootstrap (robustness.py, real.py).
METHOD_GRID_FIELDS = {
    'at_eps': validation.Floats(lo=0, unique=True),
    'at_steps': validation.Int(lo=1),
    'at_label': validation.Choice(attacks.LABELS),
    'at_fraction': validation.Float(lo=0, hi=1),
    'ccat_eps': validation.Floats(lo=0, unique=True),
    'ccat_steps': validation.Int(lo=1),
    'ccat_rho': validation.Float(lo=0, lo_open=True),
    'ccat_pass_rate': validation.Float(lo=0, hi=1, lo_open=True),
    'aug_scales': validation.Floats(lo=0, unique=True),
    'aug_fraction': validation.Float(lo=0, hi=1),
    'bootstrap_resamples': validation.Int(lo=10),
}

# The low-rank synthetic setting (lowrank.py, robustness.py): task, teacher, training, eval.
LOWRANK_FIELDS = {
    **TRAINING_FIELDS,
    'd': validation.Int(lo=1),
    'data_scale': validation.Float(lo=0, lo_open=True),
    'energy_matched': validation.Bool(),
    'num_train': validation.Int(lo=0),
    'teacher_hidden': validation.Ints(lo=1),
    'out_dim': validation.Int(lo=2),
    'use_bias': validation.Bool(),
    'teacher_bias_scale': validation.Float(lo=0),
    'strength_decay': validation.Float(lo=0),
    'teacher_per_seed': validation.Bool(),
    'num_eval': validation.Int(lo=2),
    'eval_batch': validation.Int(lo=1),
    'probe_scale': validation.Float(lo=0, lo_open=True),
    'tau': validation.Float(lo=-1, hi=1),
    'attack_norm': validation.Choice(attacks.NORMS),
    'eps': validation.Floats(lo=0, unique=True),
    **ATTACK_FIELDS,
    'num_attack': validation.Int(lo=1),
}


def check_lowrank_rules(config) -> None:
  """Cross-field rules of the low-rank setting (after the table check).

  ``eval_batch`` divides ``num_eval``; the attack ensemble is valid.
  """
  if config.num_eval % config.eval_batch:
    raise ConfigError(f'config.eval_batch must divide config.num_eval = {config.num_eval}, '
                      f'got {config.eval_batch}')
  check_attack_rules(config)


def check_ccat_batch(config) -> None:
  """Cross-field rule: CCAT needs ``batch_size >= 2``."""
  if 'ccat' in as_tuple(config.methods) and config.batch_size < 2:
    raise ConfigError(f'config.batch_size must be >= 2 when config.methods has ccat, '
                      f'got {config.batch_size}')


def spec_columns(config) -> List[str]:
  """``spec_in``, ``spec_off``, and their per-layer columns when the teacher has several
  hidden layers (the deeper layers specialize less: the summaries show each)."""
  n_layers = len(config.teacher_hidden)
  if n_layers < 2:
    return ['spec_in', 'spec_off']
  return (['spec_in'] + [f'spec_in_l{k + 1}' for k in range(n_layers)]
          + ['spec_off'] + [f'spec_off_l{k + 1}' for k in range(n_layers)])


def spec_log_text(rows: Sequence[Mapping[str, Any]], n_layers: int) -> str:
  """``spec_in 0.962 (layers 0.991 / 0.934) spec_off ...``: means over ``rows``.

  Per-layer means appear with several hidden layers; ``n/a`` where a column is
  empty (off-subspace columns at full rank).
  """
  def mean(key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return f'{np.mean(vals):.3f}' if vals else 'n/a'
  parts = []
  for where in ('in', 'off'):
    text = f'spec_{where} {mean(f"spec_{where}")}'
    if n_layers > 1 and mean(f'spec_{where}') != 'n/a':
      text += ' (layers ' + ' / '.join(mean(f'spec_{where}_l{k + 1}')
                                       for k in range(n_layers)) + ')'
    parts.append(text)
  return ' '.join(parts)


def metric_columns(config) -> List[str]:
  """Columns of one student's evaluation (``LowRankEvaluator.evaluate``), in order."""
  n_layers = len(config.teacher_hidden)
  cols = ['train_loss', 'spec_in'] + [f'spec_in_l{l + 1}' for l in range(n_layers)]
  cols += ['spec_off'] + [f'spec_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'frac_in_l{l + 1}' for l in range(n_layers)]
  cols += [f'frac_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'dead_l{l + 1}' for l in range(n_layers)]
  cols += ['wcos_in', 'wcos_off', 'wcos_off_random', 'clean_agree']
  main, per_attack = evaluate.columns(LOWRANK_LABELS, WHERES,
                                      [eps_name(e) for e in config.eps],
                                      attack_config(config).attacks)
  return cols + main + per_attack


@functools.lru_cache(maxsize=None)
def mesh():
  """The seeds mesh over every device (all hosts after ``jax.distributed.initialize``)."""
  return sweep.seed_mesh()


def shard(tree):
  """Lays a pytree with a leading seeds axis over ``mesh()``."""
  return sweep.shard_seeds(tree, mesh())


def num_padded_seeds(config) -> int:
  """Seeds to compute: ``num_seeds`` rounded up to a multiple of the device count.

  The extra seeds are ordinary seeds ``num_seeds, num_seeds + 1, ...`` whose
  results are dropped, so the kept results do not depend on the device count.
  """
  return sweep.padded_size(config.num_seeds, mesh())


class SeedKeys(NamedTuple):
  """``[S]`` keys per use; a shared problem uses one teacher/basis key for every seed."""
  teacher: jax.Array
  basis: jax.Array
  student: jax.Array
  train: jax.Array
  eval: jax.Array


def seed_keys(config) -> SeedKeys:
  """Keys of ``num_padded_seeds(config)`` seeds; seed ``s`` uses ``fold_in(seed, s)``."""
  num, per_seed_teacher = num_padded_seeds(config), bool(config.teacher_per_seed)
  seed = config.seed

  def draw():  # integer work: exact at any optimization level
    master = jax.random.PRNGKey(seed)
    per_seed = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(master, s), 5))(
        jnp.arange(num))
    keys = SeedKeys(*(per_seed[:, i] for i in range(5)))
    if not per_seed_teacher:
      shared = jax.random.split(jax.random.fold_in(master, 2 ** 31 - 1), 2)
      keys = keys._replace(teacher=jnp.broadcast_to(shared[0], keys.teacher.shape),
                           basis=jnp.broadcast_to(shared[1], keys.basis.shape))
    return keys
  return sweep.jit_once(draw)()


class Problem(NamedTuple):
  teacher: models.MLP
  student: models.MLP
  teacher_params: Any   # [S, ...]
  bases: jax.Array      # [S, d, d]; rank r uses the leading r columns
  student_params: Any   # [S, ...] initial student parameters


def build_problem(config, keys: SeedKeys) -> Problem:
  """Teachers, nested subspace bases and initial students, one per seed."""
  d = config.d
  teacher = models.MLP(tuple(config.teacher_hidden), config.out_dim, config.use_bias)
  student = models.student_of(teacher, config.width_mult, config.student_init_scale)

  def draw(keys):
    teacher_params = jax.vmap(functools.partial(
        models.random_teacher_params, model=teacher, in_dim=d,
        bias_scale=config.teacher_bias_scale, strength_decay=config.strength_decay))(
            keys.teacher)
    bases = jax.vmap(lambda k: data.random_orthonormal(k, d, d))(keys.basis)
    student_params = jax.vmap(lambda k: student.init(k, jnp.zeros((1, d))))(keys.student)
    return teacher_params, bases, student_params
  return Problem(teacher, student, *sweep.jit_once(draw)(keys))


def rank_projector(bases: jax.Array, r: int) -> jax.Array:
  """``[S, d, d]`` projectors onto the span of the leading ``r`` basis columns."""
  return jax.vmap(lambda u: data.projectors(u)[0])(bases[:, :, :r])


def lowrank_args(bases: jax.Array, r: int, scales: jax.Array) -> Dict[str, jax.Array]:
  """Per-seed ``data_args`` of the online sampler at rank ``r`` (see ``sampler``).

  ``basis`` ``[S, d, r]`` (what the sampler reads), ``projector`` ``[S, d, d]``
  (what the orthogonal augmentation reads) and ``scale`` ``[S]``.
  """
  return {'basis': bases[:, :, :r], 'projector': rank_projector(bases, r), 'scale': scales}


def data_scale(config, r: int) -> float:
  """Per-coordinate std ``s`` of ``z`` at rank ``r`` (see ``energy_matched``)."""
  if config.energy_matched:
    return data.energy_matched_scale(config.d, r, config.data_scale)
  return config.data_scale


def sampler(num_train: int):
  """``(key, data_args, n) -> x``: online low-rank samples, or a fixed training set.

  Online (``num_train = 0``): ``data.sample_subspace`` from ``data_args['basis']``
  (``[d, r]``, ``r`` normals per example) and ``data_args['scale']``; the
  training chunk is compiled once per rank. Fixed: ``num_train`` rows of
  ``data_args['train_x']``, drawn with replacement.
  """
  if num_train == 0:
    return lambda key, a, n: data.sample_subspace(key, a['basis'], n, a['scale'])
  return lambda key, a, n: a['train_x'][jax.random.randint(key, (n,), 0, num_train)]


def make_optimizer(config, num_steps: int = None):
  return train.make_optimizer(
      config.optimizer, config.learning_rate, momentum=config.momentum,
      weight_decay=config.weight_decay, schedule=config.schedule,
      total_steps=num_steps or config.num_steps)


class Background:
  """``fn(*args, **kwargs)`` in a daemon thread, for work that only warms caches.

  ``wait()`` joins it and returns ``fn``'s result, or None when it raised (the
  error is logged: the work it would have saved is then done where it is needed,
  e.g. a program traced and compiled at its first call).
  """

  def __init__(self, name: str, fn: Callable, *args, **kwargs):
    self.name, self._result, self._error = name, None, None
    t0 = time.perf_counter()

    def body():
      try:
        self._result = fn(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except
        self._error = e
      self.seconds = time.perf_counter() - t0
    self.seconds = None
    self._thread = threading.Thread(target=body, name=name, daemon=True)
    self._thread.start()

  def wait(self):
    self._thread.join()
    if self._error is not None:
      logging.warning('%s failed (%s: %s); its work is done when needed instead', self.name,
                      type(self._error).__name__, self._error)
      return None
    return self._result


# Training checkpoints are saved at most this often (seconds), and at the end of each stage:
# a run option (``--checkpoint_every_sec``), not a config field, since it does not change
# results. Orbax takes ~0.2 s per save; at every 2,000-step chunk the main job saved 40 times.
DEFAULT_CHECKPOINT_EVERY_SEC = 60.0
_checkpoint_every_sec = DEFAULT_CHECKPOINT_EVERY_SEC


def set_checkpoint_every_sec(seconds: float) -> None:
  """Sets how often (at most) the binaries save training checkpoints; 0: every chunk."""
  global _checkpoint_every_sec
  _checkpoint_every_sec = sweep.checked_interval(seconds, 'checkpoint_every_sec')


def checkpoint_every_sec() -> float:
  """The binaries' checkpoint interval (``set_checkpoint_every_sec``)."""
  return _checkpoint_every_sec


def train_or_keep_last_good(loss_fn, optimizer, state, teacher_params, data_args, keys, config,
                            workdir: str, stage: str, num_steps: int = None,
                            shared_args=None):
  """``train.train_seeds`` on sharded inputs, with progress and resumable checkpoints.

  ``shared_args``: data every student reads (no seeds axis), replicated once
  per device instead of copied per student. Checkpoints go to
  ``workdir/checkpoints/<stage>`` (at most every ``--checkpoint_every_sec``,
  and at the end); a rerun resumes there. On divergence, saves
  the last good parameters in the workdir and stops with a message. Returns
  the final state (sharded) and the loss history (numpy).
  """
  state, teacher_params, data_args, keys = shard((state, teacher_params, data_args, keys))
  if shared_args is not None:
    shared_args = sweep.replicate(shared_args, mesh())
  checkpointer = sweep.Checkpointer(os.path.join(workdir, 'checkpoints', stage),
                                    every_sec=_checkpoint_every_sec)
  try:
    return train.train_seeds(loss_fn, optimizer, state, teacher_params, data_args, keys,
                             num_steps=num_steps or config.num_steps,
                             chunk_steps=config.chunk_steps, on_chunk=progress_logger(stage),
                             checkpointer=checkpointer, shared_args=shared_args)
  except train.TrainingDivergedError as e:
    path = os.path.join(workdir, f'last_good_params_{stage}.msgpack')
    params = sweep.to_host(e.last_good_state.params)  # a collective: every process
    if jax.process_index() == 0:
      io.save_pytree(path, params)
    raise RunError(f'{e} ({stage}); last good parameters saved to {path}; lower '
                   f'config.learning_rate') from e
  finally:
    checkpointer.close()


def train_grid(config, workdir: str, points, make_loss: Callable, make_args: Callable,
               init_params, teacher_params, train_keys, timings: Optional[Dict] = None):
  """Trains every grid point x seed, one compiled method at a time (the studies' loop).

  For each method of ``points`` (``methods.group_by_method``), its ``G``
  grid points x ``S`` seeds form one students axis (grid-major): the initial
  parameters, teacher parameters and keys (each ``[S, ...]``) are tiled
  ``G`` times, ``make_loss(method)`` is the loss and ``make_args(method,
  method_points)`` returns ``(data_args, shared_args)`` (per student, and
  read by every student; ``train_or_keep_last_good``). Checkpoints in
  ``workdir/checkpoints/<method>``; ``timings['train_<method>']`` the seconds.

  Returns:
    ``(params, final_loss)``: host parameters ``[P * S, ...]`` in ``points``
    order and the final training losses ``[P * S]`` (NaN with no steps).
  """
  optimizer = make_optimizer(config)
  s = jax.tree_util.tree_leaves(train_keys)[0].shape[0]
  trained, losses = [], []
  for method, mpoints in methods.group_by_method(points):
    g = len(mpoints)
    t0 = time.perf_counter()
    data_args, shared = make_args(method, mpoints)
    state = jax.vmap(lambda p: train.init_state(p, optimizer))(methods.tile(init_params, g))
    state, loss = train_or_keep_last_good(
        make_loss(method), optimizer, state, methods.tile(teacher_params, g), data_args,
        methods.tile(train_keys, g), config, workdir, method, shared_args=shared)
    trained.append(sweep.to_host(state.params))
    losses.append(loss[:, -1] if loss.size else np.full((g * s,), np.nan))
    seconds = time.perf_counter() - t0
    if timings is not None:
      timings[f'train_{method}'] = seconds
    logging.info('trained %s: %d grid points x %d seeds in %.1fs', method, g, s, seconds)
  params = jax.tree_util.tree_map(lambda *v: np.concatenate(v), *trained)
  return params, np.concatenate(losses)


def grid_point_name(method: str, hp: Mapping[str, Any]) -> str:
  """A grid point's name in the attack checks: its variant, and where AT attacked."""
  name = methods.variant_name(method, hp)
  return f"{name} {hp['at_where']}" if hp.get('at_where') else name


def method_attack_checks(config, points, ev: 'Evaluation', attack_cfg: evaluate.AttackConfig,
                         headline: float) -> Dict[str, Any]:
  """``evaluate.attack_checks`` per grid point (its kept students), summarized.

  Per grid point, not per method: the variants of a method (AT at 0.5 and at 2,
  say) differ in how hard they are to attack, and the convergence check
  (``Evaluation.doubled``) must hold for each.
  """
  s = num_padded_seeds(config)
  checks = {}
  for p, (method, hp) in enumerate(points):
    rows = np.zeros(len(points) * s, bool)
    rows[p * s:p * s + config.num_seeds] = True
    checks[grid_point_name(method, hp)] = evaluate.attack_checks(
        ev.result, ev.final, headline=headline, attacks_run=attack_cfg.attacks,
        convergence_points=attack_cfg.convergence_points(), rows=rows, doubled=ev.doubled)
  summary = attack_checks_summary(config, checks)
  log_unconverged(summary)
  return summary


class Evaluation(NamedTuple):
  """The raw outcome of an evaluation: ``evaluate.Result``, its ``combine``d successes, and
  the convergence check's ``Result`` (the doubled ensemble on the first points), if run."""
  result: evaluate.Result
  final: Dict[Any, np.ndarray]
  doubled: Optional[evaluate.Result] = None


# fold_in(attack key, .): the convergence check's keys (other random starts than the run's).
DOUBLING_KEY = 2 ** 31 - 5


def surrogate_apply(config, student, teacher):
  """``(student, teacher)`` apply functions with surrogate ReLU gradients for ``apgd_pair``.

  None when ``config.surrogate_temperature`` is 0 (exact gradients).
  """
  t = float(config.surrogate_temperature)
  if t == 0:
    return None
  return models.surrogate(student, t).apply, models.surrogate(teacher, t).apply


def doubling_args(config, x: jax.Array, keys: jax.Array, shared: bool = False):
  """The convergence check's inputs: the first ``convergence_points`` of ``x [S, N, ...]``
  (or shared ``[N, ...]`` with ``shared=True``) and ``keys [S]`` folded with ``DOUBLING_KEY``."""
  n = min(int(config.convergence_points), int(config.num_attack))
  return (x[:n] if shared else x[:, :n]), jax.vmap(
      lambda k: jax.random.fold_in(k, DOUBLING_KEY))(keys)


def log_unconverged(checks: Mapping[str, Any]) -> None:
  """A warning per group whose attack has not converged (``evaluate.doubling``)."""
  for name, g in checks['groups'].items():
    d = g.get('doubling')
    if d is not None and not d['converged']:
      before, after = d['cells'][d['max_gain_cell']]
      logging.warning('%s: the attack has not converged: doubling its iterations raises %s '
                      'from %.3f to %.3f on the first %d points (its errors are lower bounds)',
                      name, d['max_gain_cell'], before, after, d['points'])


class LowRankEvaluator:
  """Compiles the evaluation of a batch of students once, for every rank and method.

  ``held_out`` draws per-seed evaluation data; ``evaluate`` returns one dict of
  ``metric_columns`` (minus ``train_loss``) per student, and the raw
  ``Evaluation`` (for ``evaluate.attack_checks`` and CCAT). Budgets and
  projectors are array arguments, so nothing recompiles across budgets or
  methods (Square recompiles per subspace dimension).
  """

  def __init__(self, config, teacher: models.MLP, student: models.MLP):
    self.config = config
    c = config
    t_apply, s_apply = teacher.apply, student.apply

    def held_out(projector, scale, key):
      def one(p, sc, k):
        k_spec, k_probe, k_att, k_pgd, k_tr = jax.random.split(k, 5)
        out = {'x_eval': data.sample_lowrank(k_spec, p, c.num_eval, sc),
               'x_attack': data.sample_lowrank(k_att, p, c.num_attack, sc),
               'probe_key': k_probe, 'pgd_key': k_pgd}
        if c.num_train:
          out['train_x'] = data.sample_lowrank(k_tr, p, c.num_train, sc)
        return out
      return jax.vmap(one)(projector, scale, key)

    def spec(sp, tp, x, projector, probe_key):
      return jax.vmap(functools.partial(
          metrics.lowrank_specialization, t_apply, s_apply, probe_scale=c.probe_scale,
          tau=c.tau, batch_size=c.eval_batch))(tp, sp, x, projector, probe_key)

    def confidence(sp, tp, x):  # CCAT thresholds: confidence and correctness on x_eval
      s = s_apply(sp, x)[0]
      return jax.nn.softmax(s).max(-1), s.argmax(-1) == t_apply(tp, x)[0].argmax(-1)

    self.held_out = sweep.jit_once(held_out)  # runs once per rank
    self._spec = jax.jit(spec)
    self._confidence = jax.jit(jax.vmap(confidence))
    self.attack_config = attack_config(config)
    surrogate = surrogate_apply(config, student, teacher)
    self.attacks = evaluate.Evaluator(s_apply, t_apply, norm=c.attack_norm,
                                      config=self.attack_config, surrogate_apply=surrogate)
    self.doubled_attacks = None
    if c.convergence_points:
      self.doubled_attacks = evaluate.Evaluator(s_apply, t_apply, norm=c.attack_norm,
                                                config=self.attack_config.scaled(2),
                                                surrogate_apply=surrogate)

  def ccat_thresholds(self, params, teacher_params, held) -> np.ndarray:
    """``[S]`` thresholds passing ``ccat_pass_rate`` of the correctly classified points."""
    conf, correct = sweep.to_host(self._confidence(params, teacher_params, held['x_eval']))
    return np.array([evaluate.ccat_threshold(cf, ok, self.config.ccat_pass_rate)
                     for cf, ok in zip(conf, correct)], np.float32)

  def attack(self, params, teacher_params, projector, held, full_rank: bool,
             labels_kinds=LOWRANK_LABELS, thresholds=None, check: bool = True) -> Evaluation:
    """The attack ensemble in S (``in``), S_perp (``off``) and unconstrained (``full``).

    At full rank there is no complement and ``in`` is the whole space: only
    ``full`` is attacked (``rows`` copies it to ``in``). With ``check`` and
    ``convergence_points > 0``, the doubled ensemble attacks the first points again
    (``Evaluation.doubled``).
    """
    args, kwargs = self._attack_args(params, teacher_params, projector, held, full_rank,
                                     labels_kinds, thresholds)
    result = self.attacks.run(*args, **kwargs)
    doubled = None
    if check and self.doubled_attacks is not None:
      doubled = self.doubled_attacks.run(*self._doubling_args(args), **kwargs)
    return Evaluation(result, evaluate.combine(result), doubled)

  def _doubling_args(self, args):
    params, teacher_params, x, keys = args
    return (params, teacher_params, *doubling_args(self.config, x, keys))

  def _attack_args(self, params, teacher_params, projector, held, full_rank, labels_kinds,
                   thresholds):
    """``evaluate.Evaluator.run``'s arguments: ``(args, kwargs)`` unpacked by the caller."""
    d = projector.shape[-1]
    projs = {}
    if not full_rank:
      eye = jnp.eye(d, dtype=projector.dtype)
      projs = {'in': projector, 'off': shard(eye[None] - projector)}
    return ((params, teacher_params, held['x_attack'], held['pgd_key']),
            dict(eps=self.config.eps, labels_kinds=labels_kinds, projectors=projs,
                 thresholds=thresholds, identity_full=self.config.attack_norm == 'l2'))

  @staticmethod
  def _spec_args(params, teacher_params, projector, held):
    """The specialization program's arguments (``evaluate`` and ``prepare`` alike)."""
    return params, teacher_params, held['x_eval'], projector, held['probe_key']

  def prepare(self, params, teacher_params, projector, held, full_rank: bool) -> int:
    """Traces, lowers and compiles ``evaluate``'s programs for these shapes; runs nothing.

    ``params``: any students of the evaluated ones' structure (e.g. before training).
    The low-rank binary calls it in a background thread (``Background``) while the
    first students train. Returns the number of programs prepared.
    """
    params, teacher_params, projector, held = shard((params, teacher_params, projector, held))
    self._spec.trace(*self._spec_args(params, teacher_params, projector, held)).lower().compile()
    args, kwargs = self._attack_args(params, teacher_params, projector, held, full_rank,
                                     LOWRANK_LABELS, None)
    prepared = 1 + self.attacks.prepare(*args, **kwargs)
    if self.doubled_attacks is not None:
      prepared += self.doubled_attacks.prepare(*self._doubling_args(args), **kwargs)
    return prepared

  def evaluate(self, params, teacher_params, projector, held, full_rank: bool):
    """Metrics of a batch of students ``[S, ...]``; off-subspace ones are None at full rank.

    Inputs are laid over the seeds mesh (``shard``); S must be a multiple of
    the device count. Returns ``(rows, Evaluation)``.
    """
    c = self.config
    num = projector.shape[0]
    d = projector.shape[-1]
    rank = int(round(float(np.trace(np.asarray(sweep.to_host(projector)[0])))))
    params, teacher_params, projector, held = shard((params, teacher_params, projector, held))
    spec = sweep.to_host(self._spec(*self._spec_args(params, teacher_params, projector, held)))
    ev = self.attack(params, teacher_params, projector, held, full_rank)
    adv = attack_rows(c, ev, full_rank)
    baseline = None if full_rank else specialization.random_cosine_baseline(d - rank)
    rows = []
    for i in range(num):
      row = {'spec_in': float(np.mean(spec['spec_in'][i])),
             'spec_off': None if full_rank else float(np.mean(spec['spec_off'][i]))}
      for l in range(spec['spec_in'].shape[1]):
        row[f'spec_in_l{l + 1}'] = float(spec['spec_in'][i, l])
        row[f'spec_off_l{l + 1}'] = None if full_rank else float(spec['spec_off'][i, l])
        row[f'frac_in_l{l + 1}'] = float(spec['frac_in'][i, l])
        row[f'frac_off_l{l + 1}'] = None if full_rank else float(spec['frac_off'][i, l])
        row[f'dead_l{l + 1}'] = int(spec['dead_in'][i, l])
      row['wcos_in'] = float(spec['wcos_in'][i])
      row['wcos_off'] = None if full_rank else float(spec['wcos_off'][i])
      row['wcos_off_random'] = baseline
      row['clean_agree'] = float(spec['clean_agree'][i])
      row.update(adv[i])
      rows.append(row)
    return rows, ev


def attack_rows(config, ev: Evaluation, full_rank: bool) -> List[Dict[str, Any]]:
  """Per-student ``adv_*`` columns; at full rank ``in`` = ``full`` and ``off`` is empty."""
  names = {float(e): eps_name(e) for e in config.eps}
  rows = evaluate.records(ev.result, ev.final, names)
  adv_columns = [k for k in metric_columns(config) if k.startswith('adv_')]
  for row in rows:
    for key in list(row):
      if full_rank and '_full_' in key:
        row[key.replace('_full_', '_in_', 1)] = row[key]
    for key in adv_columns:
      if key not in row:
        row[key] = None  # the complement at full rank
  return rows
