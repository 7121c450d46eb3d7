"""The experiment binaries' command line: flags, help, errors, interruptions, workdir, logs.

Everything a user of ``python -m experiments.<binary>`` meets besides the results goes
through this module, so that every binary behaves alike:

- ``--help`` (exit 0): the binary's docstring, its run flags and every config field with
  its value, what it may hold (the binary's ``validation`` table) and its one-line meaning
  (the comment beside the field's default in ``experiments/configs/*.py``: one schema, read
  where it is written). ``--helpfull`` adds absl's own flags (logging, debugging), never
  the test-only flags that chex and absltest define on import.
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
  during a long evaluation).
"""

import ast
import json
import logging as logging_lib
import os
import re
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

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
  if nested:  # the configs are flat: --config.d.x or a misspelled --config.foo.bar
    return (f'--config.{nested[0]}: config fields are not nested; write --config.FIELD=VALUE '
            f'with a field of the config')
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
             'unrolled_threefry', 'checkpoint_every_sec', 'coordinator_address',
             'num_processes', 'process_id')


def define_flags(default_config: str, flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Optional[Sequence[str]] = None) -> None:
  """Defines ``--config``, ``--workdir``, ``--print_config``, ``--cpu_devices``,
  ``--compilation_cache``, ``--unrolled_threefry``, ``--checkpoint_every_sec`` and the
  multi-process flags (``RUN_FLAGS``).

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

def _comments(source: str) -> Dict[int, tuple]:
  """Line number (1-based) -> ``(comment text, whether the line holds code before it)``."""
  import io as io_lib  # pylint: disable=g-import-not-at-top
  import tokenize  # pylint: disable=g-import-not-at-top
  out = {}
  code_lines = set()
  for tok in tokenize.generate_tokens(io_lib.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      out[tok.start[0]] = (tok.string.lstrip('#').strip(), tok.start[0] in code_lines)
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENCODING, tokenize.ENDMARKER):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  return out


def _comment_of(comments: Mapping[int, tuple], lineno: int, end_lineno: int) -> str:
  """The comment documenting the assignment on lines ``lineno..end_lineno`` (1-based).

  Its trailing comment (``c.x = 1  # meaning``), else the comment lines directly above it
  (no blank line between), joined; ``''`` when there is neither.
  """
  text, after_code = comments.get(end_lineno, ('', False))
  if after_code:
    return text
  block = []
  i = lineno - 1
  while i in comments and not comments[i][1]:
    block.insert(0, comments[i][0])
    i -= 1
  return ' '.join(block)


def _first_sentence(text: str) -> str:
  """``text`` up to the end of its first sentence (a period followed by a space)."""
  m = re.search(r'(?<!\be\.g)(?<!\bi\.e)(?<!\bcf)(?<!\bvs)(?<!\bal)\.\s', text)
  return text[:m.start() + 1] if m else text


def _config_module_path(module: str, root: str) -> str:
  return os.path.join(root, *module.split('.')) + '.py'


def field_meanings(config_file: str) -> Dict[str, str]:
  """Field -> its one-line meaning, read from the config file's comments.

  A field's meaning is the comment beside its default in the file that first sets it
  (``c.FIELD = value  # meaning``, or the comment lines right above the assignment, cut
  at the end of their first sentence): ``config_file`` first, then the config modules it
  imports (``from experiments.configs import attacks``), depth first. The config files
  are the one place a field's default and meaning are written (``--help`` shows both).
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  meanings: Dict[str, str] = {}
  seen = set()

  def visit(path: str) -> None:
    if path in seen or not os.path.isfile(path):
      return
    seen.add(path)
    with open(path) as f:
      source = f.read()
    comments = _comments(source)
    tree = ast.parse(source)
    imported = []
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == 'experiments.configs':
        imported += [_config_module_path(f'experiments.configs.{a.name}', root)
                     for a in node.names]
    assigns = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Assign)),
                     key=lambda n: n.lineno)
    for node in assigns:  # the first assignment of a field documents it (a preset's later)
      for target in node.targets:
        if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
            and target.attr not in meanings):
          meanings[target.attr] = _first_sentence(_comment_of(comments, node.lineno,
                                                              node.end_lineno))
    for path_ in imported:
      visit(path_)

  visit(os.path.abspath(config_file.split(':', 1)[0]))
  return meanings


def _value_text(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    inner = ', '.join(_value_text(v) for v in value)
    return f'({inner},)' if len(value) == 1 else f'({inner})'
  return repr(value)


def config_help(config: ml_collections.ConfigDict, config_file: str,
                fields: Mapping[str, validation.Field], width: int = 100) -> str:
  """The config section of ``--help``: every field, its value, what it may hold, its meaning."""
  meanings = field_meanings(config_file)
  out = []
  # The fields in the order the config file sets them (ConfigDict.keys() sorts them).
  names = list(getattr(config, '_fields', None) or config.keys())
  for name in names:
    head = f'  --config.{name}={_value_text(config[name])}'
    field = fields.get(name)
    body = meanings.get(name, '')
    if field is not None:
      body = (body + ' ' if body else '') + f'[{field.describe()}]'
    out.append(head)
    out += textwrap.wrap(body, width, initial_indent=' ' * 6, subsequent_indent=' ' * 6)
  return '\n'.join(out)


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
# Logs and progress.
# ----------------------------------------------------------------------------

class _DropLibraryInfo(logging_lib.Filter):
  """Drops INFO records of checkpointing internals (orbax logs every file it writes)."""

  def filter(self, record):
    return record.levelno >= logging_lib.WARNING or '/orbax/' not in record.pathname


# Loggers whose INFO records are noise to a user (e.g. jax's "Unable to initialize backend
# 'tpu'" on every machine without one): shown from WARNING up unless --verbosity >= 1.
QUIET_LOGGERS = ('jax._src.xla_bridge',)

LOG_FORMAT = '%(asctime)s %(levelname)s %(message)s'
LOG_DATE_FORMAT = '%H:%M:%S'


def quiet_library_logs() -> None:
  """Keeps a binary's log to its own progress lines (and every warning), each line
  ``HH:MM:SS LEVEL message`` (instead of absl's ~50-character prefix).

  Call before JAX starts its backends (the TPU INFO line is logged then).
  With ``--verbosity=1`` (DEBUG) or more, the libraries' INFO lines stay.
  """
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
  handler.setFormatter(logging_lib.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
  level = logging_lib.INFO if logging.get_verbosity() >= logging.DEBUG else logging_lib.WARNING
  for name in QUIET_LOGGERS:
    logging_lib.getLogger(name).setLevel(level)


class RunStatus:
  """Where a binary's run is (for the one line Ctrl-C prints): the training stage, its step
  and last checkpoint, or the evaluation running. The progress callbacks keep it."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.stage: Optional[str] = None
    self.step: Optional[int] = None
    self.num_steps: Optional[int] = None
    self.checkpoint: Optional[int] = None
    self.evaluating: Optional[str] = None
    self.evaluation_token: Optional[object] = None  # identifies the evaluation_progress in use

  def training(self, stage: str, step: Optional[int] = None, num_steps: Optional[int] = None,
               checkpoint: Optional[int] = None) -> None:
    self.stage, self.step, self.num_steps = stage, step, num_steps
    self.checkpoint, self.evaluating, self.evaluation_token = checkpoint, None, None

  def saved_checkpoint(self, step: Optional[int]) -> None:
    """A checkpoint at ``step`` was written (after the last progress report)."""
    if step is not None:
      self.checkpoint = step
      self.step = max(self.step or 0, step)

  def interrupted_message(self) -> str:
    """``interrupted at rank 5, step 1200 of 20000; last checkpoint: step 1000; rerun the
    same command to resume``."""
    resume = 'rerun the same command to resume'
    if self.evaluating is not None:
      return (f'interrupted while evaluating {self.evaluating}; {resume} (finished training '
              f'stages load from their checkpoints)')
    if self.stage is None:
      return f'interrupted before training started; {resume}'
    where = f'interrupted at {stage_label(self.stage)}'
    if self.step is not None:
      where += f', step {self.step}' + (f' of {self.num_steps}' if self.num_steps else '')
    else:
      where += ' (starting)'
    ckpt = 'none' if self.checkpoint is None else f'step {self.checkpoint}'
    return f'{where}; last checkpoint: {ckpt}; {resume}'


STATUS = RunStatus()


def stage_label(stage: str) -> str:
  """A training stage as a reader says it: ``rank5`` -> ``rank 5``, ``at`` -> ``method at``."""
  m = re.fullmatch(r'rank(\d+)', stage)
  if m:
    return f'rank {m.group(1)}'
  from tsrobust import methods  # pylint: disable=g-import-not-at-top
  if stage in methods.METHODS:
    return f'method {stage}'
  return stage


def _format_eta(seconds: float) -> str:
  """``ETA 42s``, ``ETA 3m05s``, ``ETA 1h02m``."""
  s = int(round(max(seconds, 0.0)))
  if s < 60:
    return f'ETA {s}s'
  if s < 3600:
    return f'ETA {s // 60}m{s % 60:02d}s'
  return f'ETA {s // 3600}h{(s % 3600) // 60:02d}m'


def progress_logger(stage: str, max_lines: int = 10, stream=None):
  """An ``on_chunk`` callback reporting steps/s and ETA, and keeping ``STATUS``.

  On a terminal: one live line, rewritten in place (``\\r``), ended when the
  stage ends. Elsewhere (CI, files): at most ``max_lines`` log lines per stage,
  evenly spaced, the last one always included. A stage resumed from a checkpoint
  (``info['resumed_from']``) says so first.
  """
  stream = sys.stderr if stream is None else stream
  live = hasattr(stream, 'isatty') and stream.isatty()
  logged = [0]
  first = [True]
  STATUS.training(stage)

  def on_chunk(info: Mapping[str, float]) -> None:
    STATUS.training(stage, int(info['step']), int(info['num_steps']),
                    info.get('last_checkpoint'))
    if first[0] and info.get('resumed_from') is not None:
      logging.info('%s: resumed from its checkpoint at step %d', stage_label(stage),
                   info['resumed_from'])
    first[0] = False
    text = (f"{stage}: step {info['step']}/{info['num_steps']}  loss {info['loss']:.3e}  "
            f"{info['steps_per_sec']:.0f} steps/s  {_format_eta(info['eta_sec'])}")
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


def evaluation_progress(what: str, max_gap_sec: float = 60.0, stream=None,
                        clock: Callable[[], float] = time.monotonic,
                        heartbeat_poll_sec: float = 5.0):
  """An ``on_progress`` callback of ``tsrobust.evaluate.Evaluator.run``: attack runs done of
  all, the last one, and an ETA; it also keeps ``STATUS`` (``evaluating what``).

  On a terminal: one live line. Elsewhere: a log line when waiting for the next attack run
  could leave more than ``max_gap_sec`` seconds since the start or the last line (if the
  next run took 1.5 times the longest so far: runs differ, Square's are the longest), so a
  long evaluation says where it is at least about once a minute, not at every short run;
  and a last line when it ends, if it logged before (a short evaluation stays silent).
  A single attack run can outlast ``max_gap_sec`` (the pair attack on 24 image students
  takes ~100 s on 2 cores), so with the real clock a daemon thread also looks every
  ``heartbeat_poll_sec`` and logs that the next run is still going once ``max_gap_sec -
  2 * heartbeat_poll_sec`` have passed without a line; it stops at the last run, or when
  another evaluation or a training stage starts.
  """
  stream = sys.stderr if stream is None else stream
  live = hasattr(stream, 'isatty') and stream.isatty()
  start = clock()
  state = {'last': start, 'lines': 0, 'previous': start, 'longest': 0.0, 'done': 0,
           'total': None}
  lock = threading.Lock()
  stop = threading.Event()
  STATUS.evaluating = what
  token = STATUS.evaluation_token = object()

  def log_line(text: str, now: float) -> None:
    state['last'] = now
    state['lines'] += 1
    logging.info('%s', text)

  def eta(now: float, done: int, total: int) -> str:
    return _format_eta((now - start) / max(done, 1) * (total - done))

  def heartbeat() -> None:
    while not stop.wait(heartbeat_poll_sec):
      if STATUS.evaluation_token is not token:
        return  # another evaluation or a training stage took over (or this one failed)
      with lock:
        now = clock()
        if now - state['last'] < max_gap_sec - 2 * heartbeat_poll_sec:
          continue
        done, total = state['done'], state['total']
        if total is None:
          log_line(f'evaluating {what}: the first attack run is still going (compiling '
                   f'and attacking)  {now - start:.0f}s', now)
        else:
          log_line(f'evaluating {what}: {done}/{total} attack runs done, the next one still '
                   f'going  {now - start:.0f}s  {eta(now, done, total)}', now)

  if not live and clock is time.monotonic and heartbeat_poll_sec:
    threading.Thread(target=heartbeat, name=f'progress: {what}', daemon=True).start()

  def on_progress(info: Mapping[str, Any]) -> None:
    with lock:
      now = clock()
      done, total = int(info['done']), int(info['total'])
      state['done'], state['total'] = done, total
      state['longest'] = max(state['longest'], now - state['previous'])
      state['previous'] = now
      attack = '/'.join(str(info[k]) for k in ('attack', 'label', 'where', 'eps') if k in info)
      text = (f'evaluating {what}: {done}/{total} attack runs ({attack})  '
              f'{now - start:.0f}s  {eta(now, done, total)}')
      last = done >= total
      if last:
        stop.set()
      if live:
        stream.write('\r' + text + ('\n' if last else ''))
        stream.flush()
        return
      next_line_late = now - state['last'] + 1.5 * state['longest'] > max_gap_sec
      if (last and state['lines']) or (not last and next_line_late):
        log_line(text, now)
  return on_progress


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

