"""The experiment binaries' command line: flags, help, errors, interruptions, workdir, logs.

Everything a user of ``python -m experiments.<binary>`` meets besides the results goes
through this module, so that every binary behaves alike:

- ``--help`` (exit 0): the binary's docstring, its run flags and every config field with
  its value, what it may hold (the binary's ``validation`` table) and its one-line meaning
  (the comment beside the field's default in ``experiments/configs/*.py``: one schema, read
  where it is written; ``experiments/field_docs.py``). ``--helpfull`` adds absl's own
  flags (logging, debugging), never the test-only flags that chex and absltest define on
  import.
- ``--print_config`` (exit 0): validates the config and prints it resolved (the config
  file, its preset, the overrides), as the run's ``config.json`` would hold it; computes
  nothing.
- User mistakes end in one line ``error: ...`` on stderr (exit 2), a stopped run likewise
  (exit 1), and so does any ``OSError`` on the workdir.
- Ctrl-C ends in one line (exit 130, no traceback) saying where the run was, its last
  checkpoint and that rerunning the same command resumes. A checkpoint being written when
  it comes is finished first (``tsrobust.sweep.Checkpointer``).
- Log lines are ``HH:MM:SS LEVEL message``; training and evaluation report progress with
  an ETA (one live line on a terminal, a few throttled lines elsewhere: about one a minute
  during a long evaluation): ``experiments/progress.py``, which also keeps where the run is.

This module owns the flags, ``--help``, the one-line errors, the workdir checks, the
multi-process set-up and ``run_binary``; it re-exports the names of ``progress`` and
``field_docs`` that the binaries use (``cli.progress_logger``, ``cli.STATUS``...).
"""

import json
import logging as logging_lib
import os
import re
import sys
import tempfile
import textwrap
from typing import Any, Callable, List, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from experiments import field_docs
from experiments import progress
from experiments import validation
from tsrobust import io
from tsrobust import sweep

ConfigError = validation.ConfigError

USAGE_EXIT_CODE = 2      # a mistake in the command line or the config (as argparse)
RUN_EXIT_CODE = 1        # a run stopped (RunError), e.g. diverged training
INTERRUPT_EXIT_CODE = 130  # Ctrl-C (128 + SIGINT), as a shell reports it

HELP_ARGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull')


class RunError(RuntimeError):
  """A run stopped for a reason the user can act on (``run_binary`` prints it in one line)."""


# ----------------------------------------------------------------------------
# One-line errors.
# ----------------------------------------------------------------------------

def exit_with_error(message: Any, code: int = USAGE_EXIT_CODE, stream=None) -> None:
  """Writes ``error: <message>`` as one line on stderr and exits with ``code``."""
  stream = sys.stderr if stream is None else stream
  stream.write(f'error: {one_line(str(message))}\n')
  stream.flush()
  raise SystemExit(code)


def one_line(text: str) -> str:
  """``text`` on one line: a multi-line message (one wrapping a traceback, as a config
  file's failure to load does) is its first line and its last (the error itself).
  """
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
  if nested:  # --config.d.x (d is not a section) or a misspelled --config.foo.bar
    head = nested[0].split('.', 1)[0]
    return (f'--config.{nested[0]}: config.{head} is not a section of fields; write '
            f'--config.FIELD=VALUE with a field of the config, or --config.SECTION.FIELD=VALUE '
            f'with a section such as config.attack')
  if isinstance(error, KeyError) and error.args:  # KeyError quotes its message
    return one_line(str(error.args[0]))
  return one_line(str(error))


# ----------------------------------------------------------------------------
# Flags.
# ----------------------------------------------------------------------------

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


# The run flags every binary defines (``define_flags``), in the order ``--help`` lists them.
RUN_FLAGS = ('workdir', 'config', 'print_config', 'cpu_devices', 'compilation_cache',
             'unrolled_threefry', 'seed_batching', 'checkpoint_every_sec',
             'coordinator_address', 'num_processes', 'process_id')


def define_flags(default_config: str, flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Optional[Sequence[str]] = None) -> None:
  """Defines ``--config``, ``--workdir``, ``--print_config``, ``--cpu_devices``,
  ``--compilation_cache``, ``--unrolled_threefry``, ``--seed_batching``,
  ``--checkpoint_every_sec`` and the multi-process flags (``RUN_FLAGS``).

  ``--config.FIELD=VALUE`` of a field the config lacks is accepted here (the
  config is not locked) and refused by the binary's table check
  (``validation.check_config``), which names the closest fields. ``argv``:
  the command line the config overrides are read from (default ``sys.argv``).

  Raises:
    ConfigError: the default config file fails to load with the overrides.
  """
  try:
    config_flags.DEFINE_config_file(
        'config', default_config, 'Experiment config file (FILE or FILE:PRESET); every field '
        'can be overridden as --config.FIELD=VALUE.', flag_values=flag_values,
        lock_config=False, accept_new_attributes=True,
        sys_argv=None if argv is None else list(argv))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(_flag_error_message(e, sys.argv if argv is None else argv)) from e
  flags.DEFINE_string('workdir', None, 'Folder for the result files (required); rerunning a '
                      'command with the same folder resumes it.', flag_values=flag_values)
  flags.DEFINE_boolean('print_config', False, 'Validate the config, print it resolved (as the '
                       "run's config.json would hold it) and exit; computes nothing.",
                       flag_values=flag_values)
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
  flags.DEFINE_enum('seed_batching', 'auto', ('auto',) + sweep.SEED_BATCHINGS,
                    'How each device runs its students where a binary lets the backend '
                    "choose (the image study): 'map' one at a time (their working set stays "
                    "in the CPU's caches), 'vmap' all at once (an accelerator's choice); "
                    "'auto': map on a CPU, vmap elsewhere (sweep.default_seed_batching). "
                    'The same computation, rounded differently: over training that moves '
                    'results (docs/scaling.md).',
                    flag_values=flag_values)
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


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """``--coordinator_address``, ``--num_processes``, ``--process_id`` (``init_distributed``)."""
  flags.DEFINE_string('coordinator_address', '', 'host:port of process 0 in a multi-process '
                      'run (jax.distributed); empty: a single process.', flag_values=flag_values)
  flags.DEFINE_integer('num_processes', 1, 'Processes in the run (with --coordinator_address).',
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer('process_id', 0, 'This process\'s index in [0, --num_processes); '
                       'process 0 writes every file.', lower_bound=0, flag_values=flag_values)


# ----------------------------------------------------------------------------
# --help: the run flags and every config field, from one schema.
# ----------------------------------------------------------------------------

# The config fields' lines (each field's meaning read from its config file's comments):
# experiments/field_docs.py.
field_meanings = field_docs.field_meanings
config_help = field_docs.config_help


def _flag_help(flag_values: flags.FlagValues, names: Sequence[str], width: int = 100) -> str:
  out = []
  for name in names:
    flag = flag_values[name]
    if name == 'config':
      default = display_path(str(config_flags.get_config_filename(flag)))
    else:
      default = flag.default
    value = '' if default is None else f'={default}'
    out.append(f'  --{name}{value}')
    out += textwrap.wrap(flag.help, width, initial_indent=' ' * 6, subsequent_indent=' ' * 6)
  return '\n'.join(out)


def display_path(path: str) -> str:
  """``path`` relative to the repository root when it lies inside it."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rel = os.path.relpath(os.path.abspath(path.split(':', 1)[0]), root)
  suffix = ':' + path.split(':', 1)[1] if ':' in path else ''
  return path if rel.startswith(os.pardir) else rel + suffix


def help_text(doc: str, flag_values: flags.FlagValues, fields: Mapping[str, validation.Field],
              full: bool = False) -> str:
  """What ``--help`` prints: ``doc``, the run flags, every config field (and, ``full``,
  absl's own flags: logging, debugging; never the test-only flags of chex and absltest)."""
  config_file = config_flags.get_config_filename(flag_values['config'])
  parts = [textwrap.dedent(doc or '').strip(), '',
           'Run flags:', _flag_help(flag_values, [n for n in RUN_FLAGS if n in flag_values]),
           '', f'Config fields (--config.FIELD=VALUE; values of {display_path(config_file)}'
               ' with this command line\'s overrides):',
           config_help(flag_values.config, config_file, fields)]
  if full:
    for module in sorted(flag_values.flags_by_module_dict()):
      if module.startswith(('absl.app', 'absl.logging', 'absl.flags')):
        parts += ['', f'{module}:', flag_values.module_help(module)]
  else:
    parts += ['', "absl's own flags (logging, debugging): --helpfull"]
  return '\n'.join(parts).rstrip() + '\n'


# ----------------------------------------------------------------------------
# The workdir.
# ----------------------------------------------------------------------------

def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a ``workdir`` whose ``config.json`` holds a different config.

  Its checkpoints and results belong to that config and would be silently
  mixed; the message names the differing fields and what to do.
  """
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is a file, not a folder; use another --workdir')
  try:
    if not os.path.exists(path):
      return
    current = json.loads(json.dumps(io.to_plain(config.to_dict())))  # as it reads back
    with open(path) as f:
      previous = json.load(f)
  except OSError as e:
    raise workdir_error(workdir, e) from e
  if previous != current:
    changed = sorted(k for k in set(previous) | set(current)
                     if previous.get(k) != current.get(k))
    values = '; '.join(f'{k}: {previous.get(k, "(none)")!r} there, '
                       f'{current.get(k, "(none)")!r} now' for k in changed[:3])
    raise ConfigError(
        f'{workdir} holds a run with a different config (fields {changed} differ; {values}); '
        f'use a new --workdir, or delete that one to start over')


def workdir_error(workdir: str, error: OSError, path: Optional[str] = None) -> ConfigError:
  """The one-line error of any ``OSError`` on ``workdir`` (creating it, writing in it);
  ``path``: the file it was about, when not the workdir itself."""
  reason = error.strerror or type(error).__name__
  where = f' at {path}' if path and not _same_path(path, workdir) else ''
  return ConfigError(f'--workdir {workdir} cannot be written ({reason}{where}); use another '
                     f'--workdir')


def _same_path(a: str, b: str) -> bool:
  return os.path.abspath(str(a)) == os.path.abspath(str(b))


def ensure_writable_workdir(workdir: str, probe: bool = True) -> None:
  """Creates ``workdir`` and (``probe``) checks that a file can be written there (and
  removed). In a multi-process run only process 0 probes: the others write nothing.

  Raises:
    ConfigError: any ``OSError`` (a folder that cannot be created, or written: read-only,
      no permission, a full disk), in one line naming the workdir.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    if probe:
      fd, path = tempfile.mkstemp(dir=workdir, prefix='.write-check-')
      os.close(fd)
      os.unlink(path)
  except OSError as e:
    raise workdir_error(workdir, e) from e


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates ``workdir`` and records the config in ``config.json``.

  A workdir already holding a different config is refused (``check_workdir``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  check_workdir(workdir, config)
  ensure_writable_workdir(workdir, probe=jax.process_index() == 0)
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    return
  if jax.process_index() == 0:
    try:
      io.write_json(path, json.loads(json.dumps(io.to_plain(config.to_dict()))))
    except OSError as e:
      raise workdir_error(workdir, e) from e


# ----------------------------------------------------------------------------
# Logs and progress: experiments/progress.py. Re-exported here, where the binaries and
# their training loop look them up (``cli.progress_logger``: a test patching it there
# reaches the training loop).
# ----------------------------------------------------------------------------

_DropLibraryInfo = progress._DropLibraryInfo  # pylint: disable=protected-access
QUIET_LOGGERS = progress.QUIET_LOGGERS
LOG_FORMAT = progress.LOG_FORMAT
LOG_DATE_FORMAT = progress.LOG_DATE_FORMAT
quiet_library_logs = progress.quiet_library_logs
RunStatus = progress.RunStatus
STATUS = progress.STATUS
stage_label = progress.stage_label
progress_logger = progress.progress_logger
evaluation_progress = progress.evaluation_progress


# ----------------------------------------------------------------------------
# The binaries' entry point.
# ----------------------------------------------------------------------------

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
  import jax  # pylint: disable=g-import-not-at-top
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


def _loaded_config(flag_values: flags.FlagValues) -> ml_collections.ConfigDict:
  """``--config`` as loaded, or a ``UsageError`` saying why it could not be."""
  config = flag_values.config
  if not isinstance(config, ml_collections.ConfigDict):
    try:  # a --config file that failed to load: its error is raised on any access
      config.to_dict()
    except OSError as e:
      cause = str(e).strip().splitlines()[-1].strip()
      raise app.UsageError(f'--config: the config file could not be loaded ({cause})') from e
    raise app.UsageError(f'--config must give an ml_collections.ConfigDict, got '
                         f'{type(config).__name__}')
  return config


def config_json(config: ml_collections.ConfigDict) -> str:
  """``config`` as JSON, one field per line in the config file's order (``--print_config``).

  The values are those ``config.json`` records (``prepare_workdir``); tuples are lists.
  """
  plain = io.to_plain(config.to_dict())
  names = [n for n in (getattr(config, '_fields', None) or plain) if n in plain]
  body = ',\n'.join(f'  {json.dumps(n)}: {json.dumps(plain[n])}' for n in names)
  return '{\n' + body + '\n}\n'


def _inside(path: Optional[str], folder: str) -> bool:
  if not path:
    return False
  path, folder = os.path.abspath(str(path)), os.path.abspath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _main(argv: Sequence[str], validate: Callable, train_and_evaluate: Callable,
          outputs: Sequence[str], flag_values: flags.FlagValues) -> None:
  """The body of a binary; a user mistake ends in one line on stderr (``exit_with_error``)."""
  import jax  # pylint: disable=g-import-not-at-top
  workdir = flag_values.workdir
  STATUS.reset()
  try:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {list(argv[1:])}; flags are written '
                           f'--name=value')
    quiet_library_logs()  # before JAX starts its backends
    if not workdir and not flag_values.print_config:
      raise app.UsageError('--workdir is required (the folder for the result files)')
    config = _loaded_config(flag_values)
    validate(config)
    if workdir:
      check_workdir(workdir, config)  # mistakes are reported before any output or JAX work
    if flag_values.print_config:
      sys.stdout.write(config_json(config))
      sys.stdout.flush()
      return
    ensure_writable_workdir(workdir, probe=flag_values.process_id == 0)
    sweep.use_all_cpu_cores(flag_values.cpu_devices  # before any JAX work
                            or cpu_devices_per_process(flag_values))
    cache = sweep.use_compilation_cache(flag_values.compilation_cache)  # before any compile
    threefry = flag_values.unrolled_threefry and sweep.use_unrolled_threefry_on_cpu()
    sweep.set_seed_batching(None if flag_values.seed_batching == 'auto'
                            else flag_values.seed_batching)
    set_checkpoint_every_sec(flag_values.checkpoint_every_sec)
    init_distributed(flag_values)  # after the checks (a mistake stops every process alike)
    devices = jax.devices()
    logging.info('running on %d %s device(s) (--cpu_devices=%d, %d cores): %s; compilation '
                 'cache %s; threefry on CPU %s; image students %s', len(devices),
                 devices[0].platform, flag_values.cpu_devices, sweep.cpu_cores(), devices,
                 cache or 'off', 'unrolled' if threefry else "JAX's default",
                 'one at a time per device' if sweep.default_seed_batching() == 'map'
                 else 'all at once per device')
    train_and_evaluate(config, workdir)
  except (ConfigError, app.UsageError) as e:
    exit_with_error(e)
  except RunError as e:
    exit_with_error(e, code=RUN_EXIT_CODE)
  except KeyboardInterrupt:
    exit_with_error(STATUS.interrupted_message(), code=INTERRUPT_EXIT_CODE)
  except OSError as e:
    if not _inside(getattr(e, 'filename', None), workdir or '.'):
      raise
    exit_with_error(workdir_error(workdir, e, e.filename), code=RUN_EXIT_CODE)
  if jax.process_index() == 0:
    logging.info('wrote %s in %s', ', '.join(outputs), workdir)
  else:
    logging.info('process %d of %d done (process 0 writes the files)', jax.process_index(),
                 jax.process_count())


def exit_now(code: int) -> None:
  """Ends the process with ``code`` at once, after flushing the logs and stdio.

  A run stopped mid-way (Ctrl-C, a diverged run) may leave JAX work in flight: the next
  training chunk already queued, evaluation programs compiling in a background thread.
  The interpreter's teardown then races those threads and can abort the process (exit
  134, or a segmentation fault) after the one-line message; ``os._exit`` skips the
  teardown. Nothing is lost: result files and checkpoints are written atomically, and a
  checkpoint being written was finished first (``sweep.finish_before_interrupt``).
  """
  logging_lib.shutdown()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)  # pylint: disable=protected-access


def _help_request(args: Sequence[str]) -> Optional[str]:
  """``'full'`` for ``--helpfull``, ``'short'`` for ``--help`` and its aliases, else None."""
  kinds = [a for a in args[1:] if a in HELP_ARGS]
  if not kinds:
    return None
  return 'full' if '--helpfull' in kinds else 'short'


def run_binary(validate: Callable, train_and_evaluate: Callable, default_config: str,
               outputs: Sequence[str], argv: Optional[Sequence[str]] = None,
               flag_values: Optional[flags.FlagValues] = None, *,
               fields: Optional[Mapping[str, validation.Field]] = None,
               doc: Optional[str] = None) -> None:
  """The absl entry point of an experiment binary (call under ``__main__``).

  Defines ``--config`` (an ml_collections config file, every field
  overridable), ``--workdir`` and the other run flags here rather than at
  import, so binaries can be imported side by side; validates the config
  (``validate``: the binary's table and cross-field checks) and the workdir
  before any work.

  ``--help`` prints ``doc`` (the binary's docstring), the run flags and every field of
  the config with its value, what ``fields`` (the binary's ``validation`` table) allows
  and its meaning (``field_meanings``), and exits 0. ``--print_config`` validates and
  prints the resolved config and exits 0 (``--workdir`` optional; when given it is
  checked too).

  Every user mistake - a flag absl cannot parse, an unknown or misspelled
  config field, a bad value, a workdir holding another config or one that cannot be
  written, a check that needs the loaded data (a ``ConfigError`` raised in
  ``train_and_evaluate``) - ends with one line ``error: <message>`` on stderr, naming
  the field and what is allowed, and exit code 2 (no traceback, no usage text); a
  ``RunError`` (e.g. diverged training) or an ``OSError`` writing in the workdir
  likewise, with exit code 1; Ctrl-C with one line saying where the run was and how to
  resume, exit code 130.

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
    fields: the binary's config table (``validation.check_config``), for ``--help``.
    doc: the text ``--help`` starts with (default: the ``__main__`` module's docstring).
  """
  in_app = flag_values is None
  flag_values = flags.FLAGS if in_app else flag_values
  args = list(sys.argv if argv is None else argv)
  want_help = _help_request(args)
  if want_help:
    args = [args[0]] + [a for a in args[1:] if a not in HELP_ARGS]
  try:
    define_flags(default_config, flag_values, args)
  except ConfigError as e:
    exit_with_error(e)
  if want_help:
    parse_flags(args, flag_values)
    try:
      _loaded_config(flag_values)
    except app.UsageError as e:
      exit_with_error(e)
    if doc is None:
      doc = getattr(sys.modules.get('__main__'), '__doc__', '') or ''
    sys.stdout.write(help_text(doc, flag_values, fields or {}, full=want_help == 'full'))
    sys.stdout.flush()
    raise SystemExit(0)
  main = lambda a: _main(a, validate=validate, train_and_evaluate=train_and_evaluate,
                         outputs=outputs, flag_values=flag_values)
  if in_app:
    try:
      try:
        app.run(main, argv=args, flags_parser=lambda a: parse_flags(a, flag_values))
      except KeyboardInterrupt:  # Ctrl-C outside the run itself (parsing, absl's set-up)
        exit_with_error(STATUS.interrupted_message(), code=INTERRUPT_EXIT_CODE)
    except SystemExit as e:
      if e.code in (INTERRUPT_EXIT_CODE, RUN_EXIT_CODE):
        exit_now(e.code)
      raise
  else:
    main(parse_flags(args, flag_values))

