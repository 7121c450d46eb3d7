"""Declarative config validation, and user mistakes ending in one line (no traceback)."""

import json
import logging as logging_lib
import os
import subprocess
import sys

from absl import flags
from absl import logging as absl_logging
import ml_collections
import numpy as np
import pytest

from experiments import cli
from experiments import lowrank
from experiments import real
from experiments import real_checks
from experiments import robustness
from experiments import study
from experiments import validation
from experiments.configs import attacks as attacks_config
from experiments.configs import lowrank as lowrank_config
from experiments.configs import real as real_config
from experiments.configs import robustness as robustness_config
from tsrobust import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = validation


# ----------------------------------------------------------------------------
# Fields: known answers.
# ----------------------------------------------------------------------------

def _message(field, name, value):
  with pytest.raises(validation.ConfigError) as info:
    field.check(name, value)
  return str(info.value)


def test_int_field():
  f = V.Int(lo=0, hi=5)
  assert f.check('n', 3) == 3 and f.check('n', 0) == 0 and f.check('n', 5) == 5
  assert _message(f, 'n', -1) == 'config.n must be >= 0, got -1'
  assert _message(f, 'n', 6) == 'config.n must be <= 5, got 6'
  assert _message(f, 'n', 2.0) == 'config.n must be an integer, got 2.0'
  assert _message(f, 'n', True) == 'config.n must be an integer, got True'
  assert _message(f, 'n', '3') == "config.n must be an integer, got '3'"


def test_int_field_with_a_special_value():
  f = V.Int(lo=1, special={-1: "the preset's"})
  assert f.check('r', -1) == -1 and f.check('r', 1) == 1
  for bad in (0, -2):
    assert _message(f, 'r', bad) == f"config.r must be -1 (the preset's) or >= 1, got {bad}"


def test_float_field():
  f = V.Float(lo=0, hi=1, lo_open=True)
  assert f.check('x', 1) == 1.0 and isinstance(f.check('x', 1), float)
  assert _message(f, 'x', 0.0) == 'config.x must be > 0, got 0.0'
  assert _message(f, 'x', 1.5) == 'config.x must be <= 1, got 1.5'
  assert _message(f, 'x', float('nan')) == 'config.x must be a finite number, got nan'
  assert _message(f, 'x', 'a') == "config.x must be a finite number, got 'a'"
  assert V.Float(lo=0).check('x', 0.0) == 0.0  # a closed bound admits it


def test_bool_choice_and_string_fields():
  assert V.Bool().check('b', False) is False
  assert _message(V.Bool(), 'b', 1) == 'config.b must be True or False, got 1'
  opt = V.Choice(('sgd', 'momentum', 'adam'))
  assert opt.check('optimizer', 'adam') == 'adam'
  assert _message(opt, 'optimizer', 'adm') == (
      "config.optimizer must be one of ('sgd', 'momentum', 'adam'), got 'adm' "
      "(did you mean 'adam'?)")
  assert _message(opt, 'optimizer', 'lbfgs') == (
      "config.optimizer must be one of ('sgd', 'momentum', 'adam'), got 'lbfgs'")
  path = V.Str('a path (a string)')
  assert path.check('data_dir', '') == ''
  assert _message(path, 'data_dir', 3) == 'config.data_dir must be a path (a string), got 3'


def test_sequence_fields():
  ints = V.Ints(lo=1, unique=True)
  assert ints.check('ranks', [2, 5]) == (2, 5) and ints.check('ranks', 3) == (3,)
  assert _message(ints, 'ranks', ()) == (
      'config.ranks must be a sequence of at least 1 values, got ()')
  assert _message(ints, 'ranks', (0,)) == 'config.ranks values must be >= 1, got 0 in (0,)'
  assert _message(ints, 'ranks', (2, 2)) == 'config.ranks values must be distinct, got (2, 2)'
  assert _message(ints, 'ranks', (2, 1.5)) == 'config.ranks must hold integers, got 1.5 in (2, 1.5)'
  assert V.Ints(lo=1, min_len=0).check('dense', ()) == ()
  floats = V.Floats(lo=0)
  assert floats.check('eps', (0.5, 1)) == (0.5, 1)
  assert _message(floats, 'eps', (0.5, -1.0)) == (
      'config.eps values must be >= 0, got -1.0 in (0.5, -1.0)')
  assert _message(floats, 'eps', 'big') == (
      "config.eps must be a sequence of at least 1 values, got 'big'")


def test_names_field():
  names = V.Names(('standard', 'at', 'ccat'))
  assert names.check('methods', 'at') == ('at',)
  assert names.check('methods', ['ccat', 'standard']) == ('ccat', 'standard')
  prefix = "config.methods must be distinct names from ('standard', 'at', 'ccat'), got "
  assert _message(names, 'methods', ('standrd',)) == (
      prefix + "('standrd',) (did you mean 'standard'?)")
  assert _message(names, 'methods', ('at', 'at')) == prefix + "('at', 'at')"
  assert _message(names, 'methods', ()) == prefix + '()'
  assert _message(names, 'methods', 3) == prefix + '3'


def test_field_definitions_are_checked():
  with pytest.raises(ValueError, match='Field.kind must be one of'):
    validation.Field(list)
  with pytest.raises(ValueError, match='Field.choices needs kind=str'):
    validation.Field(int, choices=('a',))


# ----------------------------------------------------------------------------
# The tables.
# ----------------------------------------------------------------------------

def test_unknown_and_missing_fields():
  table = {'optimizer': V.Choice(('sgd', 'adam')), 'learning_rate': V.Float(lo=0)}
  config = {'optimizer': 'adam', 'learning_rate': 0.1}
  validation.check_config(config, table)
  with pytest.raises(validation.ConfigError) as info:
    validation.check_config({**config, 'optimiser': 'adam'}, table)
  assert str(info.value) == ('config.optimiser is not a field of this config; did you mean '
                             'config.optimizer?')
  with pytest.raises(validation.ConfigError) as info:
    validation.check_config({**config, 'xyzzy': 1}, table)
  assert str(info.value) == ('config.xyzzy is not a field of this config; the fields are '
                             'learning_rate, optimizer')
  with pytest.raises(validation.ConfigError, match='^config.learning_rate is missing$'):
    validation.check_config({'optimizer': 'adam'}, table)


@pytest.mark.parametrize('module, get_config', [
    (lowrank, lowrank_config.get_config),
    (robustness, robustness_config.get_config),
    (real_checks, lambda: real_config.get_config('mnist')),
    (real_checks, lambda: real_config.get_config('cifar10')),
], ids=['lowrank', 'robustness', 'real:mnist', 'real:cifar10'])
def test_tables_cover_exactly_the_default_configs(module, get_config):
  assert set(module.CONFIG_FIELDS) == set(get_config())


def test_attack_table_covers_exactly_the_shared_attack_fields():
  c = ml_collections.ConfigDict()
  attacks_config.add_attack_fields(c, oracle_tolerance=0.0, convergence_points=0)
  assert set(attacks_config.FIELDS) == set(c)
  assert set(attacks_config.FIELDS['attack']) == set(c.attack)
  # The section's keys are evaluate.preset's arguments: it takes the section whole.
  assert study.attack_config(c) == evaluate.preset('standard', oracle_tolerance=0.0)


@pytest.mark.parametrize('module, get_config', [
    (lowrank, lowrank_config.get_config), (robustness, robustness_config.get_config),
    (real, real_config.get_config),
    (real, lambda: real_config.get_config('mnist_lowrank'))],
    ids=['lowrank', 'robustness', 'real', 'real-mnist_lowrank'])
def test_default_configs_are_valid(module, get_config):
  """The defaults pass their binary's checks, which only read the config."""
  config = get_config()
  before = config.to_dict()
  assert module.validate_config(config) is None
  assert config.to_dict() == before


def test_cross_field_rules():
  c = lowrank_config.get_config()
  c.eval_batch = 1000
  with pytest.raises(validation.ConfigError, match='config.eval_batch must divide config.num_eval'):
    lowrank.validate_config(c)
  c = robustness_config.get_config()
  c.update(methods=('ccat',), batch_size=1)
  with pytest.raises(validation.ConfigError, match='config.batch_size must be >= 2 when '
                                               'config.methods has ccat, got 1'):
    robustness.validate_config(c)
  c = real_config.get_config()
  c.update(teacher_training='pgd', teacher_eps=0.0)
  with pytest.raises(validation.ConfigError, match='config.teacher_eps must be > 0 for a '
                                               'PGD-trained teacher'):
    real.validate_config(c)
  c = lowrank_config.get_config()
  c.attack.update(pgd_steps=0, apgd_steps=0, apgd_t_steps=0, square_queries=0, pair_steps=0)
  with pytest.raises(validation.ConfigError, match='config.attack: '):
    lowrank.validate_config(c)
  c.attack.update(pair_steps=10)  # apgd_pair alone: nothing for the fixed labels
  with pytest.raises(validation.ConfigError, match='the clean-label evaluations need another'):
    lowrank.validate_config(c)


# ----------------------------------------------------------------------------
# The binaries: every user mistake ends in one line on stderr, exit code 2.
# ----------------------------------------------------------------------------

def _run(module, args, capfd, train_and_evaluate=None):
  """Runs ``module``'s entry point in-process on private flags; returns (exit code, stderr)."""
  capfd.readouterr()
  with pytest.raises(SystemExit) as info:
    cli.run_binary(module.validate_config, train_and_evaluate or module.train_and_evaluate,
                   module._DEFAULT_CONFIG, ('results.csv',), argv=['prog', *args],
                   flag_values=flags.FlagValues())
  return info.value.code, capfd.readouterr().err


def _assert_one_line(code, err, *needles):
  assert code == cli.USAGE_EXIT_CODE, err
  assert 'Traceback' not in err, err
  lines = err.splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith('error: ')
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def _never(config, workdir):
  raise AssertionError(f'train_and_evaluate ran: {workdir}')


def test_workdir_holding_another_config(tmp_path, capfd):
  tiny = ['--config.d=6', '--config.ranks=(2,)', '--config.num_steps=0', '--config.num_eval=64',
          '--config.eval_batch=32', '--config.num_attack=8', '--config.attack.strength=fast']
  config = lowrank_config.get_config()
  config.update(d=6, ranks=(2,), num_steps=0, num_eval=64, eval_batch=32, num_attack=8,
                attack=dict(strength='fast'), learning_rate=0.01)
  cli.prepare_workdir(str(tmp_path), config)
  before = os.listdir(tmp_path)
  code, err = _run(lowrank, [f'--workdir={tmp_path}', *tiny], capfd)
  line = _assert_one_line(code, err, "different config (fields ['learning_rate'] differ",
                          'learning_rate: 0.01 there, 0.05 now', 'use a new --workdir')
  assert str(tmp_path) in line
  assert os.listdir(tmp_path) == before
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['learning_rate'] == 0.01


def test_workdir_that_is_a_file(tmp_path, capfd):
  path = tmp_path / 'file'
  path.write_text('')
  code, err = _run(lowrank, [f'--workdir={path}'], capfd, _never)
  _assert_one_line(code, err, f'--workdir {path} is a file, not a folder')


@pytest.mark.parametrize('arg, needles', [
    ('--config.optimiser=adam', ['config.optimiser is not a field', 'did you mean '
                                 'config.optimizer?']),
    ('--config.numseeds=3', ['config.numseeds is not a field', 'config.num_seeds']),
    ('--config.optimizer.lr=1', ['--config.optimizer.lr: config.optimizer is not a section']),
    ('--config.foo.bar=1', ['--config.foo.bar: config.foo is not a section']),
])
def test_unknown_field(tmp_path, capfd, arg, needles):
  code, err = _run(lowrank, [f'--workdir={tmp_path / "w"}', arg], capfd, _never)
  _assert_one_line(code, err, *needles)
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('module, arg, needles', [
    (lowrank, '--config.num_seeds=0', ['config.num_seeds must be >= 1, got 0']),
    (lowrank, '--config.optimizer=adm', ["config.optimizer must be one of ('sgd', 'momentum', "
                                         "'adam'), got 'adm' (did you mean 'adam'?)"]),
    (lowrank, '--config.ranks=(2,50)', ['config.ranks must satisfy 1 <= r <= d = 40, got r = 50']),
    (lowrank, '--config.num_seeds=abc', ['--config.num_seeds=abc', 'int']),
    (robustness, '--config.methods=(standard,trades)', ['config.methods must be distinct names']),
    (real, '--config.teacher_training=fgsm', ['config.teacher_training must be one of']),
    (real, '--config.data_dir=/nonexistent', ["config.data_dir '/nonexistent' does not exist"]),
])
def test_bad_value(tmp_path, capfd, module, arg, needles):
  code, err = _run(module, [f'--workdir={tmp_path / "w"}', arg], capfd, _never)
  _assert_one_line(code, err, *needles)
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('args, needles', [
    ([], ['--workdir is required']),
    (['--workdir=w', 'extra'], ["unexpected arguments ['extra']"]),
    (['--workdir=w', '--workdr=x'], ["Unknown command line flag 'workdr'"]),
    (['--workdir=w', '--cpu_devices=-1'], ['--cpu_devices=-1']),
    (['--workdir=w', '--checkpoint_every_sec=-1'], ['--checkpoint_every_sec=-1']),
    (['--workdir=w', '--config=/nonexistent/config.py'],
     ['--config: the config file could not be loaded', 'No such file']),
    (['--workdir=w', f'--config={real._DEFAULT_CONFIG}:svhn'],
     ["config preset must be one of ('mnist', 'cifar10', 'mnist_lowrank', 'fashion_mnist', "
      "'mnist_replicated', 'mnist_lowrank_replicated', 'fashion_mnist_replicated'), "
      "got 'svhn'"]),
])
def test_bad_command_line(capfd, args, needles):
  code, err = _run(real, args, capfd, _never)
  _assert_one_line(code, err, *needles)


def test_checkpoint_interval_flag_reaches_the_checkpointers(tmp_path, monkeypatch):
  """``--checkpoint_every_sec`` sets the interval of the binaries' checkpointers; 60 s when
  not given."""
  monkeypatch.setattr(cli, '_checkpoint_every_sec', cli.DEFAULT_CHECKPOINT_EVERY_SEC)
  seen = []

  def record(config, workdir):
    seen.append(cli.checkpoint_every_sec())
  for args, want in (([], 60.0), (['--checkpoint_every_sec=0'], 0.0),
                     (['--checkpoint_every_sec=2.5'], 2.5)):
    cli.run_binary(lowrank.validate_config, record, lowrank._DEFAULT_CONFIG, ('ck',),
                   argv=['prog', f'--workdir={tmp_path}', '--cpu_devices=1', *args],
                   flag_values=flags.FlagValues())
    assert seen[-1] == want, (args, seen)
  for bad in (-1, True, '5'):
    with pytest.raises(ValueError, match='checkpoint_every_sec must be a number >= 0'):
      cli.set_checkpoint_every_sec(bad)


def test_check_needing_the_loaded_data(tmp_path, capfd):
  """``real_checks.validate_sizes`` runs inside ``train_and_evaluate``, after the data loads."""
  code, err = _run(real, [f'--workdir={tmp_path}', '--cpu_devices=1', '--config.num_test=40',
                          '--config.eval_batch=7'], capfd)
  assert code == cli.USAGE_EXIT_CODE and 'Traceback' not in err, err
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  assert errors == ['error: config.eval_batch must divide the number of test images 40, got 7']
  assert err.splitlines()[-1] == errors[0]


def test_run_error_is_one_line_with_exit_code_1(tmp_path, capfd):
  def diverged(config, workdir):
    raise cli.RunError('training diverged at step 40 (rank2); lower config.learning_rate')
  code, err = _run(lowrank, [f'--workdir={tmp_path}', '--cpu_devices=1'], capfd, diverged)
  assert code == cli.RUN_EXIT_CODE
  assert err.splitlines()[-1] == ('error: training diverged at step 40 (rank2); lower '
                                  'config.learning_rate')
  assert 'Traceback' not in err


def test_one_line():
  assert cli.one_line('a\n  b\n') == 'a b'
  assert cli.one_line('flag --config=x: failed:\n  Traceback\n  File y\nValueError: bad') == (
      'flag --config=x: failed: ... ValueError: bad')


# ----------------------------------------------------------------------------
# Logs: the TPU INFO line, per-layer specialization.
# ----------------------------------------------------------------------------

def test_backend_info_lines_are_hidden_unless_verbose(monkeypatch):
  logger = logging_lib.getLogger('jax._src.xla_bridge')
  monkeypatch.setattr(logger, 'level', logger.level)  # restored after the test
  monkeypatch.setattr(absl_logging, 'get_verbosity', lambda: absl_logging.INFO)
  cli.quiet_library_logs()
  assert not logger.isEnabledFor(logging_lib.INFO)
  assert logger.isEnabledFor(logging_lib.WARNING)
  monkeypatch.setattr(absl_logging, 'get_verbosity', lambda: absl_logging.DEBUG)
  cli.quiet_library_logs()
  assert logger.isEnabledFor(logging_lib.INFO)
  filters = [f for f in absl_logging.get_absl_handler().filters
             if isinstance(f, cli._DropLibraryInfo)]
  assert len(filters) == 1  # added once, however often called


def test_spec_columns_per_layer():
  c = lowrank_config.get_config()
  assert study.spec_columns(c) == ['spec_in', 'spec_off']
  c.teacher_hidden = (10, 10)
  assert study.spec_columns(c) == ['spec_in', 'spec_in_l1', 'spec_in_l2', 'spec_off',
                                    'spec_off_l1', 'spec_off_l2']
  assert set(study.spec_columns(c)) <= set(study.metric_columns(c))


def test_spec_log_text_per_layer():
  rows = [{'spec_in': 0.9, 'spec_in_l1': 1.0, 'spec_in_l2': 0.8, 'spec_off': 0.5,
           'spec_off_l1': 0.6, 'spec_off_l2': 0.4},
          {'spec_in': 0.7, 'spec_in_l1': 0.9, 'spec_in_l2': 0.5, 'spec_off': 0.3,
           'spec_off_l1': 0.4, 'spec_off_l2': 0.2}]
  assert study.spec_log_text(rows, 2) == ('spec_in 0.800 (layers 0.950 / 0.650) '
                                           'spec_off 0.400 (layers 0.500 / 0.300)')
  assert study.spec_log_text(rows, 1) == 'spec_in 0.800 spec_off 0.400'
  full_rank = [dict(r, spec_off=None, spec_off_l1=None, spec_off_l2=None) for r in rows]
  assert study.spec_log_text(full_rank, 2) == 'spec_in 0.800 (layers 0.950 / 0.650) spec_off n/a'


@pytest.mark.slow
def test_deeper_teacher_summary_and_log_show_each_layer(tmp_path, caplog):
  config = lowrank_config.get_config()
  config.update(num_seeds=2, d=6, ranks=(2,), teacher_hidden=(3, 3), out_dim=3, width_mult=2,
                num_steps=30, chunk_steps=30, batch_size=16, num_eval=64, eval_batch=32,
                num_attack=8, attack=dict(strength='fast'), eps=(0.5, 1.0, 2.0))
  with caplog.at_level('INFO'):
    records = lowrank.train_and_evaluate(config, str(tmp_path))

  def mean(key):
    return f'{np.mean([r[key] for r in records]):.3f}'
  logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith('rank 2 done')]
  assert len(logged) == 1
  assert (f'spec_in {mean("spec_in")} (layers {mean("spec_in_l1")} / {mean("spec_in_l2")}) '
          f'spec_off {mean("spec_off")} (layers {mean("spec_off_l1")} / '
          f'{mean("spec_off_l2")})') in logged[0]
  with open(tmp_path / 'summary.md') as f:
    header, _, row = f.read().splitlines()[:3]
  assert header.startswith('| rank | n | spec_in | spec_in_l1 | spec_in_l2 | spec_off | '
                           'spec_off_l1 | spec_off_l2 | wcos_in |')
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert [c.split(' +- ')[0] for c in cells[2:8]] == [
      mean(k) for k in ('spec_in', 'spec_in_l1', 'spec_in_l2', 'spec_off', 'spec_off_l1',
                        'spec_off_l2')]


# ----------------------------------------------------------------------------
# The real entry points (absl.app), in subprocesses.
# ----------------------------------------------------------------------------

def _binary(module, *args):
  return subprocess.run([sys.executable, '-m', f'experiments.{module}', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_entry_point_unknown_field_is_one_line(tmp_path):
  done = _binary('lowrank', f'--workdir={tmp_path / "w"}', '--config.optimiser=adam')
  assert done.returncode == 2
  assert done.stderr == ('error: config.optimiser is not a field of this config; did you mean '
                         'config.optimizer?\n')
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_entry_point_data_check_keeps_progress_lines_and_hides_the_tpu_line(tmp_path):
  done = _binary('real', f'--workdir={tmp_path}', '--cpu_devices=1', '--config.num_test=40',
                 '--config.eval_batch=7')
  assert done.returncode == 2 and 'Traceback' not in done.stderr, done.stderr
  lines = done.stderr.splitlines()
  assert lines[-1] == 'error: config.eval_batch must divide the number of test images 40, got 7'
  assert any('running on 1 cpu device(s)' in line for line in lines), done.stderr
  assert 'Unable to initialize backend' not in done.stderr
