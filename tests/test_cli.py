"""experiments/cli.py: --help, --print_config, workdir errors, Ctrl-C, logs and progress."""

import json
import logging as logging_lib
import os
import signal
import subprocess
import sys
import threading
import time

from absl import flags
from absl import logging as absl_logging
import pytest

from experiments import cli
from experiments import lowrank
from experiments import real
from experiments import real_checks
from experiments import robustness
from experiments import validation
from experiments.configs import lowrank as lowrank_config
from experiments.configs import real as real_config
from experiments.configs import robustness as robustness_config
from tsrobust import check_results
from tsrobust import io
from tsrobust import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BINARIES = [(lowrank, lowrank.CONFIG_FIELDS, lowrank_config.get_config, ''),
            (robustness, robustness.CONFIG_FIELDS, robustness_config.get_config, ''),
            (real, real_checks.CONFIG_FIELDS, real_config.get_config, '')]
BINARIES += [(real, real_checks.CONFIG_FIELDS, lambda p=p: real_config.get_config(p), f':{p}')
             for p in real_config.PRESETS if p != 'mnist']
BINARIES.append((lowrank, lowrank.CONFIG_FIELDS, lambda: lowrank_config.get_config('smoke'),
                 ':smoke'))


def _never(config, workdir):
  raise AssertionError(f'train_and_evaluate ran: {workdir}')


def _run(module, fields, args, capfd, train_and_evaluate=_never):
  """``module``'s entry point in-process on private flags: (exit code, stdout, stderr)."""
  capfd.readouterr()
  code = 0  # returning is exit code 0 (absl.app exits with it)
  try:
    cli.run_binary(module.validate_config, train_and_evaluate, module._DEFAULT_CONFIG,
                   ('results.csv',), argv=['prog', *args], flag_values=flags.FlagValues(),
                   fields=fields, doc=module.__doc__)
  except SystemExit as e:
    code = e.code
  out, err = capfd.readouterr()
  return code, out, err


# ----------------------------------------------------------------------------
# --help: every field with its value, what it may hold and its meaning.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('module, fields, get_config, preset', BINARIES,
                         ids=[m.__name__.split('.')[-1] + p for m, _, _, p in BINARIES])
def test_help_lists_every_field_with_its_meaning(module, fields, get_config, preset, capfd):
  config_file = module._DEFAULT_CONFIG + preset
  code, out, err = _run(module, fields, [f'--config={config_file}', '--help'], capfd)
  assert code == 0 and err == '', err
  assert out.startswith(module.__doc__.strip().splitlines()[0])
  for flag in cli.RUN_FLAGS:
    assert f'\n  --{flag}' in out, flag
  config = get_config()
  meanings = cli.field_meanings(config_file)
  lines = out.splitlines()
  leaves = [(name, name, fields[name]) for name in config if name != 'attack']
  # The attack section's fields, by their path (--config.attack.strength=...).
  leaves += [(f'attack.{name}', name, fields['attack'][name]) for name in config.attack]
  assert 'attack' in config
  for path, name, field in leaves:
    head = f'  --config.{path}='
    at = [i for i, line in enumerate(lines) if line.startswith(head)]
    assert len(at) == 1, path
    assert meanings[name], f'config.{path} has no comment beside its default'
    body = ' '.join(line.strip() for line in lines[at[0] + 1:at[0] + 4])
    assert body.startswith(' '.join(meanings[name].split()[:3])), (path, body)
    assert f'[{field.describe()}]' in ' '.join(
        line.strip() for line in lines[at[0] + 1:at[0] + 6]), path
  assert 'chex' not in out and '--test_' not in out  # no test-only flags


def test_help_known_answer_and_overrides(capfd):
  code, out, _ = _run(lowrank, lowrank.CONFIG_FIELDS, ['--help', '--config.num_seeds=3'], capfd)
  assert code == 0
  lines = out.splitlines()
  i = lines.index('  --config.num_seeds=3')  # the value with the command line's override
  assert lines[i + 1] == '      students per rank (a vmapped axis) [int >= 1]'
  i = lines.index("  --config.optimizer='momentum'")
  assert lines[i + 1] == '      student optimizer [one of sgd | momentum | adam]'
  assert '  --config=experiments/configs/lowrank.py' in lines
  # The fields in the config file's order, not sorted.
  fields = [line.split('=')[0][len('  --config.'):] for line in lines
            if line.startswith('  --config.')]
  assert fields[:3] == ['seed', 'num_seeds', 'd']


@pytest.mark.slow  # two interpreter starts (~3 s); the in-process tests above cover the text
def test_the_entry_point_help_exits_0_and_helpfull_adds_absl_flags_not_test_flags():
  """The real entry point (absl.app, whose modules define --verbosity, and chex's and
  absltest's test-only flags on import)."""
  run = lambda flag: subprocess.run([sys.executable, '-m', 'experiments.lowrank', flag],
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
  short, full = run('--help'), run('--helpfull')
  assert (short.returncode, short.stderr, full.returncode, full.stderr) == (0, '', 0, '')
  assert '--config.num_seeds=8' in short.stdout and '--verbosity' not in short.stdout
  assert full.stdout.startswith(short.stdout.rsplit('\n\n', 1)[0])
  assert '--config.num_seeds=8' in full.stdout and '--verbosity' in full.stdout
  for out in (short.stdout, full.stdout):
    assert 'chex' not in out and '--test_tmpdir' not in out and 'absltest' not in out


def test_help_with_a_bad_config_is_one_line(capfd):
  code, out, err = _run(lowrank, lowrank.CONFIG_FIELDS,
                        ['--help', '--config=/nonexistent/c.py'], capfd)
  assert code == cli.USAGE_EXIT_CODE and out == ''
  assert err.startswith('error: --config: the config file could not be loaded')


def test_field_meanings_known_answers(tmp_path):
  path = tmp_path / 'c.py'
  path.write_text(
      'from experiments.configs import attacks\n'
      'def get_config(preset=""):\n'
      '  c = {}\n'
      '  c.a = 1          # the trailing comment, not the block above\n'
      '  # A block above. Its second sentence is cut (e.g. this one).\n'
      '  c.b = "x # y"\n'
      '\n'
      '  c.c = 2\n'
      '  # Only for a preset, after the first assignment.\n'
      '  c.c = 3\n'
      '  c.d = 4  # Ilyas et al. 2019: et al. does not end a sentence. Here it ends.\n'
      '  attacks.add_attack_fields(c, 0.0)\n')
  meanings = cli.field_meanings(str(path) + ':preset')
  assert meanings['a'] == 'the trailing comment, not the block above'
  assert meanings['b'] == 'A block above.'
  assert meanings['c'] == ''  # its first assignment has no comment
  assert meanings['d'] == 'Ilyas et al. 2019: et al. does not end a sentence.'
  assert meanings['square_queries'] == 'Square attack queries'  # an imported config module


def test_the_smoke_preset_is_small_and_valid():
  smoke = lowrank_config.get_config('smoke')
  lowrank.validate_config(smoke)
  default = lowrank_config.get_config()
  assert (smoke.d, smoke.ranks, smoke.num_seeds, smoke.attack.strength) == (
      20, (5, 20), 2, 'fast')
  students = lambda c: len(c.ranks) * c.num_seeds * c.num_steps * c.num_attack
  assert students(smoke) * 100 < students(default)
  with pytest.raises(ValueError, match="config preset must be one of"):
    lowrank_config.get_config('huge')


def test_describe_known_answers():
  assert validation.Int(lo=1).describe() == 'int >= 1'
  assert validation.Int(lo=1, special={-1: "the preset's"}).describe() == (
      "int >= 1, or -1 (the preset's)")
  assert validation.Floats(lo=0, hi=1, unique=True).describe() == 'floats in [0, 1], distinct'
  assert validation.Choice(('sgd', 'adam')).describe() == 'one of sgd | adam'
  assert validation.Names(('a', 'b')).describe() == 'names from a | b'
  assert validation.Float(lo=0, lo_open=True).describe() == 'float > 0'
  assert validation.Float(lo=0, hi=0.999).describe() == 'float in [0, 0.999]'
  assert validation.Ints(lo=1, min_len=0).describe() == 'ints >= 1, at least 0'
  assert validation.Bool().describe() == 'True | False'
  assert validation.Str('a path').describe() == 'a path'


# ----------------------------------------------------------------------------
# --print_config: validated, resolved, nothing computed.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('module, fields, get_config, preset', BINARIES[:3],
                         ids=['lowrank', 'robustness', 'real'])
def test_print_config_prints_the_resolved_config_and_computes_nothing(
    module, fields, get_config, preset, capfd, tmp_path):
  # 12 students: a multiple of every default's teacher count (real 4) and K (robustness 2).
  code, out, err = _run(module, fields, ['--print_config', '--config.num_seeds=12',
                                         '--config.seed=7'], capfd)
  assert code == 0, err
  printed = json.loads(out)
  want = get_config()
  want.update(num_seeds=12, seed=7)
  assert printed == json.loads(json.dumps(io.to_plain(want.to_dict())))
  assert list(printed)[:2] == ['seed', 'num_seeds']  # the config file's order


def test_print_config_validates_and_checks_a_given_workdir(capfd, tmp_path):
  code, out, err = _run(lowrank, lowrank.CONFIG_FIELDS,
                        ['--print_config', '--config.num_seeds=0'], capfd)
  assert code == cli.USAGE_EXIT_CODE and out == ''
  assert err == 'error: config.num_seeds must be >= 1, got 0\n'
  config = lowrank_config.get_config()
  config.seed = 5
  cli.prepare_workdir(str(tmp_path), config)
  code, out, err = _run(lowrank, lowrank.CONFIG_FIELDS,
                        ['--print_config', f'--workdir={tmp_path}'], capfd)
  assert code == cli.USAGE_EXIT_CODE and out == ''
  assert "fields ['seed'] differ" in err
  assert sorted(os.listdir(tmp_path)) == ['config.json']


def test_print_config_does_not_create_the_workdir(capfd, tmp_path):
  code, out, _ = _run(lowrank, lowrank.CONFIG_FIELDS,
                      ['--print_config', f'--workdir={tmp_path / "new"}'], capfd)
  assert code == 0 and json.loads(out)['d'] == 40
  assert not (tmp_path / 'new').exists()


# ----------------------------------------------------------------------------
# The workdir: any OSError is one line.
# ----------------------------------------------------------------------------

def test_a_workdir_that_cannot_be_written_is_one_line(capfd, tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied', str(tmp_path / '.write-check-x'))
  monkeypatch.setattr(cli.tempfile, 'mkstemp', refuse)
  code, out, err = _run(lowrank, lowrank.CONFIG_FIELDS, [f'--workdir={tmp_path}'], capfd)
  assert code == cli.USAGE_EXIT_CODE and 'Traceback' not in err
  assert err == (f'error: --workdir {tmp_path} cannot be written (Permission denied); use '
                 f'another --workdir\n')


def test_a_workdir_that_cannot_be_created_is_the_same_line(capfd, tmp_path):
  (tmp_path / 'file').write_text('')
  workdir = tmp_path / 'file' / 'sub'
  code, _, err = _run(lowrank, lowrank.CONFIG_FIELDS, [f'--workdir={workdir}'], capfd)
  assert code == cli.USAGE_EXIT_CODE
  assert err == (f'error: --workdir {workdir} cannot be written (Not a directory); use '
                 f'another --workdir\n')


def test_an_oserror_in_the_workdir_during_the_run_is_one_line(capfd, tmp_path):
  def full_disk(config, workdir):
    raise OSError(28, 'No space left on device', os.path.join(workdir, 'results.csv'))
  code, _, err = _run(lowrank, lowrank.CONFIG_FIELDS, [f'--workdir={tmp_path}',
                                                      '--cpu_devices=1'], capfd, full_disk)
  assert code == cli.RUN_EXIT_CODE and 'Traceback' not in err
  assert err.splitlines()[-1] == (
      f'error: --workdir {tmp_path} cannot be written (No space left on device at '
      f'{tmp_path / "results.csv"}); use another --workdir')


# ----------------------------------------------------------------------------
# Ctrl-C: the message, a checkpoint being written is finished first.
# ----------------------------------------------------------------------------

def test_interrupted_messages():
  status = cli.RunStatus()
  resume = 'rerun the same command to resume'
  assert status.interrupted_message() == f'interrupted before training started; {resume}'
  status.training('rank5')
  assert status.interrupted_message() == (
      f'interrupted at rank 5 (starting); last checkpoint: none; {resume}')
  status.training('rank5', 1200, 20000, 1000)
  assert status.interrupted_message() == (
      f'interrupted at rank 5, step 1200 of 20000; last checkpoint: step 1000; {resume}')
  status.saved_checkpoint(1400)  # a save held the interrupt until it was written
  assert status.interrupted_message() == (
      f'interrupted at rank 5, step 1400 of 20000; last checkpoint: step 1400; {resume}')
  status.training('at', 10, 100, None)
  assert status.interrupted_message() == (
      f'interrupted at method at, step 10 of 100; last checkpoint: none; {resume}')
  status.evaluating = 'rank 5'
  assert status.interrupted_message().startswith('interrupted while evaluating rank 5; ' + resume)


def test_a_ctrl_c_inside_finish_before_interrupt_comes_after_it(monkeypatch):
  """SIGINT during the block is held: the block finishes, then KeyboardInterrupt is raised;
  the handler is Python's default again after it."""
  if threading.current_thread() is not threading.main_thread():
    pytest.fail('pytest runs tests in the main thread')
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    finished = []
    with pytest.raises(KeyboardInterrupt):
      with sweep.finish_before_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes: give it the chance
          pass
        finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with sweep.finish_before_interrupt():  # no interrupt: nothing raised
      pass
  finally:
    signal.signal(signal.SIGINT, previous)


_TINY = ['--cpu_devices=1', '--checkpoint_every_sec=0', '--config.num_seeds=2', '--config.d=6',
         '--config.ranks=(2,)', '--config.teacher_hidden=(3,)', '--config.out_dim=3',
         '--config.width_mult=2', '--config.batch_size=16', '--config.num_eval=64',
         '--config.eval_batch=32', '--config.num_attack=16', '--config.attack.strength=fast',
         '--config.attack.apgd_t_steps=0', '--config.attack.square_queries=0',
         '--config.num_steps=60000', '--config.chunk_steps=2000']


def _default_sigint():
  # As a terminal gives it: a shell without job control starts background jobs (`cmd &`,
  # e.g. a CI script run that way) with SIGINT ignored, the children inherit that, and an
  # ignored Ctrl-C must not reach them.
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _binary(workdir, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, '-m', 'experiments.lowrank', f'--workdir={workdir}',
                           *_TINY], cwd=ROOT, env=env, text=True, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, preexec_fn=_default_sigint, **kwargs)


@pytest.mark.slow
def test_ctrl_c_during_training_is_one_line_and_the_rerun_resumes(tmp_path):
  """SIGINT while rank 2 trains (a checkpoint after every 2,000-step chunk): exit 130, one
  line saying where, no traceback, no half-written checkpoint; the same command again
  resumes there and ends with the results of an uninterrupted run."""
  proc = _binary(tmp_path / 'cut')
  lines = []
  timer = threading.Timer(600, proc.kill)
  timer.start()
  try:
    for line in proc.stderr:  # the first progress line: training is under way
      lines.append(line)
      if 'rank2: step' in line:
        proc.send_signal(signal.SIGINT)
        break
    lines += proc.stderr.readlines()
    proc.wait()
  finally:
    timer.cancel()
  err = ''.join(lines)
  assert proc.returncode == cli.INTERRUPT_EXIT_CODE, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err[-3000:]
  assert errors[0].startswith('error: interrupted at rank 2, step ')
  assert errors[0].endswith('rerun the same command to resume')
  step = int(errors[0].split('last checkpoint: step ')[1].split(';')[0])
  assert 0 < step < 60000
  folder = tmp_path / 'cut' / 'checkpoints' / 'rank2'
  assert os.listdir(folder) == [str(step)]  # complete, no *.orbax-checkpoint-tmp-*
  assert not (tmp_path / 'cut' / 'results.csv').exists()

  rerun, straight = _binary(tmp_path / 'cut'), _binary(tmp_path / 'straight')
  for proc in (rerun, straight):
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    if proc is rerun:
      assert f'rank 2: resumed from its checkpoint at step {step}' in err, err[-3000:]
  a = io.read_csv(str(tmp_path / 'straight' / 'results.csv'))
  b = io.read_csv(str(tmp_path / 'cut' / 'results.csv'))
  assert a == b and len(a) == 2
  assert check_results.check_file(str(tmp_path / "cut" / "results.csv")) == ([], 2)


# ----------------------------------------------------------------------------
# Logs and progress.
# ----------------------------------------------------------------------------

def test_log_lines_are_time_level_message(monkeypatch):
  handler = absl_logging.get_absl_handler()
  monkeypatch.setattr(handler, 'formatter', handler.formatter)
  monkeypatch.setattr(handler.python_handler, 'formatter', handler.python_handler.formatter)
  cli.quiet_library_logs()
  record = logging_lib.LogRecord('absl', logging_lib.INFO, __file__, 1, 'rank %d done', (5,),
                                 None)
  record.created = 0.0  # 1970-01-01 00:00:00 UTC
  text = handler.python_handler.formatter.format(record)
  time_part, level, message = text.split(' ', 2)
  assert len(time_part) == 8 and time_part.count(':') == 2
  assert (level, message) == ('INFO', 'rank 5 done')


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_evaluation_progress_is_about_once_a_minute_with_an_eta(caplog):
  """A line when the next run, taking 1.5 times the longest so far, would end more than 60 s
  after the last line; not at every run; the last one since it logged before."""
  clock = _Clock()
  on_progress = cli.evaluation_progress('rank 5', max_gap_sec=60, clock=clock)
  assert cli.STATUS.evaluating == 'rank 5'
  times = (20.0, 40.0, 60.0, 80.0, 100.0, 120.0, 140.0, 160.0)  # 20 s per run
  with caplog.at_level(logging_lib.INFO):
    for done, now in enumerate(times, 1):
      clock.now = now
      on_progress({'done': done, 'total': 8, 'attack': 'apgd', 'label': 'oracle',
                   'where': 'off', 'eps': 1.0})
  lines = [r.getMessage() for r in caplog.records]
  assert lines == [
      'evaluating rank 5: 2/8 attack runs (apgd/oracle/off/1.0)  40s  ETA 2m00s',
      'evaluating rank 5: 4/8 attack runs (apgd/oracle/off/1.0)  80s  ETA 1m20s',
      'evaluating rank 5: 6/8 attack runs (apgd/oracle/off/1.0)  120s  ETA 40s',
      'evaluating rank 5: 8/8 attack runs (apgd/oracle/off/1.0)  160s  ETA 0s']


def test_evaluation_progress_with_runs_of_uneven_length(caplog):
  """Runs of 28 to 53 s, as the default image study's 24 students take on 2 CPU cores: no
  two lines more than 60 s apart."""
  clock = _Clock()
  on_progress = cli.evaluation_progress('24 students', max_gap_sec=60, clock=clock)
  ends = (33.0, 61.0, 89.0, 118.0, 171.0, 211.0, 259.0, 305.0)
  logged = []
  with caplog.at_level(logging_lib.INFO):
    for done, now in enumerate(ends, 1):
      clock.now = now
      before = len(caplog.records)
      on_progress({'done': done, 'total': len(ends)})
      if len(caplog.records) > before:
        logged.append(now)
  gaps = [b - a for a, b in zip([0.0] + logged, logged)]
  assert logged[-1] == ends[-1] and max(gaps) <= 60, logged


def test_an_attack_run_longer_than_the_gap_still_gets_lines(caplog):
  """With the real clock, a run that outlasts max_gap_sec is reported while it goes (no two
  lines further apart than the gap), and the lines stop with the last run."""
  with caplog.at_level(logging_lib.INFO):
    on_progress = cli.evaluation_progress('8 students', max_gap_sec=0.6,
                                          heartbeat_poll_sec=0.05)
    time.sleep(0.8)  # the first run: compiling and attacking
    on_progress({'done': 1, 'total': 2, 'attack': 'pgd'})
    time.sleep(1.3)  # the second, long one
    on_progress({'done': 2, 'total': 2, 'attack': 'apgd_pair'})
    lines = [(r.created, r.getMessage()) for r in caplog.records]
    time.sleep(0.7)  # the heartbeat has stopped
    assert len(caplog.records) == len(lines)
  texts = [t for _, t in lines]
  assert texts[0].startswith('evaluating 8 students: the first attack run is still going')
  assert any(t.startswith('evaluating 8 students: 1/2 attack runs done, the next one still '
                          'going') for t in texts), texts
  assert texts[-1].startswith('evaluating 8 students: 2/2 attack runs (apgd_pair)'), texts
  stamps = [c for c, _ in lines]
  # <= the gap, plus slack for a thread woken late on a loaded machine
  assert max(b - a for a, b in zip(stamps, stamps[1:])) <= 0.6 + 0.2, lines


def test_a_short_evaluation_logs_nothing(caplog):
  clock = _Clock()
  on_progress = cli.evaluation_progress('rank 5', max_gap_sec=60, clock=clock)
  with caplog.at_level(logging_lib.INFO):
    for done in (1, 2):
      clock.now = 5.0 * done
      on_progress({'done': done, 'total': 2})
  assert caplog.records == []


def test_training_progress_says_what_it_resumed(caplog):
  on_chunk = cli.progress_logger('rank5', max_lines=1)
  with caplog.at_level(logging_lib.INFO):
    on_chunk({'step': 14, 'num_steps': 35, 'steps_per_sec': 7.0, 'eta_sec': 3.0, 'loss': 0.5,
              'resumed_from': 7, 'last_checkpoint': 14})
  assert caplog.records[0].getMessage() == 'rank 5: resumed from its checkpoint at step 7'
  assert cli.STATUS.interrupted_message().startswith(
      'interrupted at rank 5, step 14 of 35; last checkpoint: step 14;')
