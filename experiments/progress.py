"""The experiment binaries' log lines, progress reports and run status.

- Log lines are ``HH:MM:SS LEVEL message``, kept to the binary's own progress lines and
  every warning (``quiet_library_logs``).
- Training and evaluation report progress with an ETA (``progress_logger``,
  ``evaluation_progress``): one live line on a terminal, a few throttled lines elsewhere
  (about one a minute during a long evaluation, a heartbeat while one attack run lasts).
- ``STATUS`` (a ``RunStatus``), kept by those callbacks, is where the run is: the training
  stage, its step and last checkpoint, or the evaluation running; the line Ctrl-C prints
  (``experiments/cli.py``) says it.

``experiments/cli.py`` re-exports these names; the binaries and their training loop call
them as ``cli.progress_logger``, ``cli.evaluation_progress``, ``cli.STATUS``.
"""

import logging as logging_lib
import re
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging


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
