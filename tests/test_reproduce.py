"""experiments/reproduce.py: the study table, the skip logic, the report, README + docs surgery."""

import importlib
import json
import os
import subprocess
import sys

from absl import flags
import pytest

from experiments import lowrank
from experiments import mechanism
from experiments import real
from experiments import reproduce
from experiments import robustness
from experiments import validation
from tsrobust import datasets
from tsrobust import io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = reproduce


# ----------------------------------------------------------------------------
# The study table and its configs.
# ----------------------------------------------------------------------------

def test_studies_in_order_and_commands():
  assert [s.name for s in R.STUDIES] == ['lowrank', 'lowrank_strict', 'lowrank_linf',
                                         'robustness', 'mechanism', 'mechanism_strong',
                                         'mechanism_deep', 'real', 'real_lowrank',
                                         'fashion_mnist', 'cifar10', 'real_replicated',
                                         'real_lowrank_replicated', 'fashion_mnist_replicated']
  by_name = {s.name: s for s in R.STUDIES}
  lowrank_study, strict, linf, real_lowrank, cifar10 = (
      by_name[n] for n in ('lowrank', 'lowrank_strict', 'lowrank_linf', 'real_lowrank',
                           'cifar10'))
  # The teacher-replicated image studies run in --preset=paper only, with the real binary's
  # _replicated presets; paper runs every other study too.
  assert [s.name for s in R.STUDIES if s.presets == ('paper',)] == [
      'real_replicated', 'real_lowrank_replicated', 'fashion_mnist_replicated']
  assert all(s.presets == R.PRESETS for s in R.STUDIES if s.presets != ('paper',))
  assert R.study_args(by_name['real_lowrank_replicated'], 'paper', 'w') == [
      '--workdir=w', '--config=experiments/configs/real.py:mnist_lowrank_replicated']
  # The verdict table's column a study's results fill (its own column in the report).
  assert [R.study_setting(s.name) for s in R.STUDIES] == [
      'lowrank', None, None, 'robustness', 'mechanism', None, None, 'real', 'real_lowrank',
      'fashion_mnist', None, 'real', 'real_lowrank', 'fashion_mnist']
  assert R.study_args(lowrank_study, 'full', 'runs/x/lowrank') == ['--workdir=runs/x/lowrank']
  # Variants of a default config: their overrides in both presets, before the quick ones.
  assert R.study_args(strict, 'full', 'w') == ['--workdir=w', '--config.attack.oracle_tolerance=0']
  assert R.command_line(linf, R.study_args(linf, 'full', 'w')) == (
      "python -m experiments.lowrank --workdir=w --config.attack_norm=linf "
      "'--config.eps=(0.05,0.1,0.2)'")
  quick_strict = R.study_args(strict, 'quick', 'w')
  assert quick_strict[:2] == ['--workdir=w', '--config.attack.oracle_tolerance=0']
  assert quick_strict[2:] == R.study_args(lowrank_study, 'quick', 'w')[1:]
  assert R.command_line(lowrank_study, ['--workdir=runs/x/lowrank']) == (
      'python -m experiments.lowrank --workdir=runs/x/lowrank')
  assert R.study_args(real_lowrank, 'full', 'w') == [
      '--workdir=w', '--config=experiments/configs/real.py:mnist_lowrank']
  assert R.study_args(cifar10, 'full', 'w', '/data/c10') == [
      '--workdir=w', '--config=experiments/configs/real.py:cifar10',
      '--config.data_dir=/data/c10']
  quick = R.study_args(lowrank_study, 'quick', 'w')
  assert '--config.attack.strength=fast' in quick and '--config.ranks=(2,6)' in quick
  assert R.command_line(lowrank_study, quick).count("'--config.ranks=(2,6)'") == 1  # quoted
  with pytest.raises(ValueError, match="preset must be one of"):
    R.study_args(lowrank_study, 'medium', 'w')
  with pytest.raises(ValueError, match='needs cifar10_dir'):
    R.study_args(cifar10, 'full', 'w')


_VALIDATE = {'lowrank': lowrank.validate_config, 'robustness': robustness.validate_config,
             'mechanism': mechanism.validate_config, 'real': real.validate_config}


@pytest.mark.parametrize('preset', R.PRESETS)
def test_every_study_config_loads_and_is_valid(preset, tmp_path):
  """Each study's config, parsed as its binary parses it, passes the binary's checks."""
  for study in R.STUDIES:
    if preset not in study.presets:
      continue
    if R.preset_error(study.config):
      continue  # a preset not written yet: the study is skipped (test below)
    args = R.study_args(study, preset, str(tmp_path / study.name),
                        str(tmp_path) if study.needs_cifar10 else None)
    stand_in = None
    if study.data_dir and not os.path.isdir(study.data_dir):
      # An installed data set this machine lacks (a fresh machine has no Fashion-MNIST):
      # the config is checked against a folder holding its files' names.
      stand_in = tmp_path / f'{study.name}_data'
      stand_in.mkdir()
      for name in datasets.MNIST_FILES:
        (stand_in / name).write_bytes(b'')
      args.append(f'--config.data_dir={stand_in}')
    config = R.load_config(study, args)
    module = importlib.import_module(f'experiments.configs.{study.binary}')
    default = (module.get_config(study.config.split(':')[1]) if study.config
               else module.get_config())
    if stand_in is not None:
      assert default.data_dir == study.data_dir and config.data_dir == str(stand_in)
      default.data_dir = str(stand_in)
    if study.needs_cifar10:
      assert config.dataset == 'cifar10' and config.data_dir == str(tmp_path)
      default.data_dir = str(tmp_path)
    else:  # real.validate_config looks for the CIFAR-10 files
      _VALIDATE[study.binary](config)
    if preset == 'quick':
      students = config.get('num_seeds') or config.num_teachers * config.students_per_teacher
      assert config.attack.strength == 'fast' and students == 2
      assert config.num_steps < default.num_steps
    else:  # the binary's defaults (except a variant's overrides), the manual's numbers
      changed = {k: v for k, v in config.to_dict().items() if default.to_dict()[k] != v}
      assert changed == {'lowrank_strict': {'attack': {**default.to_dict()['attack'],
                                                    'oracle_tolerance': 0.0}},
                         'lowrank_linf': {'attack_norm': 'linf', 'eps': (0.05, 0.1, 0.2)},
                         }.get(study.name, {})


def test_preset_error():
  assert R.preset_error(None) is None
  assert R.preset_error('experiments/configs/real.py:cifar10') is None
  why = R.preset_error('experiments/configs/real.py:nosuchpreset')
  assert why and 'nosuchpreset' in why


# ----------------------------------------------------------------------------
# Skip logic.
# ----------------------------------------------------------------------------

def _finish(folder, config, done):
  os.makedirs(folder, exist_ok=True)
  io.write_json(os.path.join(folder, 'config.json'),
                json.loads(json.dumps(io.to_plain(config.to_dict()))))
  for name in done:
    with open(os.path.join(folder, name), 'w') as f:
      f.write('| rank | n |\n|---|---|\n| 2 | 2 |\n' if name == 'summary.md' else 'x\n')


def test_is_finished(tmp_path):
  study = R.STUDIES[0]
  folder = str(tmp_path / 'lowrank')
  config = R.load_config(study, R.study_args(study, 'quick', folder))
  assert not R.is_finished(folder, config, study.done)  # nothing there
  _finish(folder, config, study.done[:-1])
  assert not R.is_finished(folder, config, study.done)  # interrupted: rerun (it resumes)
  _finish(folder, config, study.done)
  assert R.is_finished(folder, config, study.done)
  full = R.load_config(study, R.study_args(study, 'full', folder))
  with pytest.raises(validation.ConfigError, match=r'holds a run with a different config '
                     r'\(fields \[.*\'num_steps\''):
    R.is_finished(folder, full, study.done)


def _tiny_studies():
  return tuple(s for s in R.STUDIES if s.name in ('lowrank', 'robustness'))


def test_reproduce_reuses_finished_studies_and_runs_the_others(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'report')
  studies = _tiny_studies()
  first = studies[0]
  config = R.load_config(first, R.study_args(first, 'quick', f'{workdir}/lowrank'))
  _finish(os.path.join(workdir, 'lowrank'), config, first.done)
  ran = []

  def fake_run(study, args, wd, commit, root=R.ROOT, side_by_side=False):
    assert side_by_side  # jobs=2
    ran.append(study.name)
    _finish(os.path.join(wd, study.name), R.load_config(study, args, root), study.done)
    return 'ran', '', 3.0
  monkeypatch.setattr(R, 'run_study', fake_run)
  outcomes = R.reproduce(workdir, 'quick', studies=studies, log=lambda _: None, jobs=2)
  assert ran == ['robustness']
  assert [(o.name, o.status) for o in outcomes] == [('lowrank', 'reused'),
                                                    ('robustness', 'ran')]
  report = open(os.path.join(workdir, 'REPORT.md')).read()
  assert R.report_preset(report) == 'quick'
  blocks = R.generated_blocks(report)
  # Each study's own column of the verdict table comes with its tables.
  assert set(blocks) == {'lowrank-summary', 'robustness-summary', 'lowrank-verdicts',
                         'robustness-verdicts', 'verdicts'}
  assert blocks['lowrank-verdicts'].startswith('| claim | synthetic low-rank |\n')
  # A second run reuses both; a full run into the same folder is refused before any work.
  ran.clear()
  assert [o.status for o in R.reproduce(workdir, 'quick', studies=studies,
                                        log=lambda _: None)] == ['reused', 'reused']
  assert not ran
  with pytest.raises(validation.ConfigError, match='^study lowrank: .* holds a run with a '
                     'different config'):
    R.reproduce(workdir, 'full', studies=studies, log=lambda _: None)
  assert not ran


def test_reproduce_of_some_studies(tmp_path, monkeypatch):
  """--studies runs those only, in the table's order, and the report names them."""
  ran = []

  def fake_run(study, args, wd, commit, root=R.ROOT, side_by_side=False):
    ran.append(study.name)
    _finish(os.path.join(wd, study.name), R.load_config(study, args, root), study.done)
    return 'ran', '', 3.0
  monkeypatch.setattr(R, 'run_study', fake_run)
  workdir = str(tmp_path / 'report')
  outcomes = R.reproduce(workdir, 'quick', log=lambda _: None, only=['robustness', 'lowrank'])
  assert ran == ['lowrank', 'robustness']
  assert [o.name for o in outcomes] == ['lowrank', 'robustness']
  report = open(os.path.join(workdir, 'REPORT.md')).read()
  assert '<!-- reproduce: preset=quick studies=lowrank,robustness -->' in report
  assert '--preset=quick --studies=lowrank,robustness`' in report
  assert R.report_lib.report_studies(report) == ('lowrank', 'robustness')
  assert R.report_lib.report_studies(report.replace(' studies=lowrank,robustness', '')) is None


def test_same_command_up_to_the_workdir_path():
  cmd = 'python -m experiments.lowrank --workdir=runs/f/lowrank --config.d=4'
  assert R.same_command(cmd, cmd, '/repo')
  assert R.same_command('python -m experiments.lowrank --workdir=/repo/runs/f/lowrank '
                        '--config.d=4', cmd, '/repo')
  assert not R.same_command('python -m experiments.lowrank --workdir=/other/runs/f/lowrank '
                            '--config.d=4', cmd, '/repo')
  assert not R.same_command(cmd.replace('d=4', 'd=5'), cmd, '/repo')
  assert not R.same_command(None, cmd, '/repo')


def test_block_and_figure_owners():
  names = [s.name for s in R.STUDIES]
  assert R.report_lib.block_study('mechanism_strong-claim5-paired', names) == 'mechanism_strong'
  assert R.report_lib.block_study('mechanism-claim5', names) == 'mechanism'
  assert R.report_lib.block_study('real_lowrank-summary', names) == 'real_lowrank'
  assert R.report_lib.block_study('a', names) is None
  assert R.report_lib.figure_study('docs/mechanism_strong_mechanism_claim5.png',
                                   names) == 'mechanism_strong'
  assert R.report_lib.figure_study('docs/robustness.png', names) == 'robustness'
  assert R.report_lib.figure_study('docs/other.png', names) is None


def test_study_env_cache_and_gpu_memory():
  env = R.study_env('runs/x', side_by_side=False, environ={'PATH': '/bin'})
  assert env == {'PATH': '/bin', 'JAX_COMPILATION_CACHE_DIR': os.path.abspath('runs/x/jax_cache')}
  # Side by side on a GPU machine, each process allocates what it needs, not 75% of the GPU.
  env = R.study_env('runs/x', side_by_side=True, environ={})
  assert env['XLA_PYTHON_CLIENT_PREALLOCATE'] == 'false'
  mine = {'JAX_COMPILATION_CACHE_DIR': '/c', 'XLA_PYTHON_CLIENT_PREALLOCATE': 'true'}
  assert R.study_env('runs/x', side_by_side=True, environ=mine) == mine  # the user's kept


def test_a_preset_not_available_is_skipped(tmp_path, monkeypatch):
  study = R.Study('later', 'real', 'experiments/configs/real.py:not_yet', (), R._REAL_DONE)
  monkeypatch.setattr(R, 'run_study', lambda *a, **k: pytest.fail('ran a skipped study'))
  (outcome,) = R.reproduce(str(tmp_path), 'full', studies=(study,), log=lambda _: None)
  assert outcome.status == 'skipped' and outcome.detail.startswith('preset not available (')
  report = open(tmp_path / 'REPORT.md').read()
  assert '## later' in report and 'Status: skipped: preset not available' in report
  assert list(R.generated_blocks(report)) == ['verdicts']  # every cell 'not run'
  assert 'not run | not run |' in R.generated_blocks(report)['verdicts']


def test_a_study_whose_data_is_not_installed_is_skipped(tmp_path, monkeypatch):
  fashion = next(s for s in R.STUDIES if s.name == 'fashion_mnist')
  assert fashion.data_dir == datasets.FASHION_MNIST_DIR
  study = fashion._replace(data_dir=str(tmp_path / 'absent'))
  monkeypatch.setattr(R, 'run_study', lambda *a, **k: pytest.fail('ran a skipped study'))
  (outcome,) = R.reproduce(str(tmp_path / 'run'), 'full', studies=(study,), log=lambda _: None)
  assert outcome.status == 'skipped'
  assert outcome.detail == (f'data not installed: no folder {tmp_path / "absent"}; apt-get '
                            'install dataset-fashion-mnist (Debian) installs it')
  report = open(tmp_path / 'run' / 'REPORT.md').read()
  assert 'Status: skipped: data not installed' in report and 'apt-get install' in report


# ----------------------------------------------------------------------------
# The report: known answers.
# ----------------------------------------------------------------------------

SUMMARY = """\
# Real images: mnist

| method | n | spec |
|---|---|---|
| standard | 2 | 0.5 +- 0.1 |

Correlation across students of `spec_mean` with robust accuracy (95% intervals).

| robust accuracy | n |
|---|---|
| `x` | 2 |

| variant | n |
|---|---|
| standard | 16 |

Adversarial error by subspace and budget (delta in S, in S_perp, unconstrained):

| method | n | adv_oracle_in_0.25 |
|---|---|---|
| standard | 2 | 0.1 +- 0.0 |

## Attack checks (`attack.strength = fast`)

| group | students |
|---|---|
| standard | 2 |
"""


def test_mark_tables():
  text, names = R.mark_tables('real', SUMMARY)
  assert names == ['real-summary', 'real-correlation-spec_mean', 'real-wilson',
                   'real-subspaces', 'real-attack-checks']
  assert text.startswith('### Real images: mnist\n')
  assert '\n#### Attack checks' in text
  assert ('<!-- BEGIN GENERATED: real-wilson -->\n| variant | n |\n|---|---|\n| standard | 16 |\n'
          '<!-- END GENERATED: real-wilson -->\n') in text
  assert R.generated_blocks(text)['real-summary'] == (
      '| method | n | spec |\n|---|---|---|\n| standard | 2 | 0.5 +- 0.1 |\n')
  twice, names = R.mark_tables('s', '| a |\n|---|\n\n| b |\n|---|\n\n| c |\n|---|\n')
  assert names == ['s-summary', 's-summary-2', 's-summary-3']
  # A summary may name a table on the line above it (experiments/mechanism.py does).
  named, names = R.mark_tables('m', 'Text.\n\n<!-- table: claim5 -->\n| group |\n|---|\n\n'
                                    '| group |\n|---|\n')
  assert names == ['m-claim5', 'm-attack-checks']
  assert '<!-- table: claim5 -->\n<!-- BEGIN GENERATED: m-claim5 -->\n| group |' in named


def test_format_duration():
  assert [R.format_duration(s) for s in (0.4, 42, 136.2, 3599, 3600 + 5 * 60 + 1)] == [
      '0 s', '42 s', '2 min 16 s', '59 min 59 s', '1 h 05 min']


def test_render_report():
  outcomes = [R.Outcome('lowrank', 'python -m experiments.lowrank --workdir=d/lowrank', 'ran',
                        '', 136.0, 'abc123def4567890', '| rank | n |\n|---|---|\n| 2 | 2 |\n',
                        ('lowrank.png',)),
              R.Outcome('real_lowrank', 'python -m experiments.real --workdir=d/real_lowrank',
                        'skipped', 'preset not available (no)', None, None, None, ())]
  text = R.render_report('full', {'date': '2030-01-01 00:00 UTC'}, outcomes, 'd')
  assert R.report_preset(text) == 'full'
  assert '| date | 2030-01-01 00:00 UTC |' in text
  assert '| [lowrank](#lowrank) | ran | 2 min 16 s |' in text
  assert '| [real_lowrank](#real_lowrank) | skipped | - |' in text
  assert '```bash\npython -m experiments.lowrank --workdir=d/lowrank\n```' in text
  assert 'Status: ran in 2 min 16 s. Log: [lowrank.log](lowrank.log).' in text
  assert 'Status: skipped: preset not available (no).' in text
  block = R.generated_blocks(text)['lowrank-summary']
  assert block.startswith('| rank | n |\n|---|---|\n| 2 | 2 |\n\n<sub>')  # a blank line
  assert 'study `lowrank`, commit abc123def456.' in block
  assert '![lowrank lowrank.png](lowrank/lowrank.png)' in text
  assert '(docs: `docs/lowrank.png`)' in text


def test_verdict_section(tmp_path):
  """The report's verdict table reads the settings' results in the workdir, names the commit
  of each, and a partial (--studies) report writes it only when every setting has results."""
  from tsrobust import io as io_lib  # pylint: disable=g-import-not-at-top
  rows = []
  for t in range(5):  # claim 3: off - in error 0.4 + small noise over 5 teachers
    off = 0.6 + 0.01 * t
    rows.append({'rank': 5.0, 'teacher': float(t), 'seed': float(t), 'spec_in': 0.99,
                 'spec_off': 0.5, 'wcos_off': 0.15, 'wcos_off_random': 0.146,
                 **{f'adv_oracle_in_{b}': 0.2 for b in ('0.5', '1.0', '2.0')},
                 **{f'adv_oracle_off_{b}': off for b in ('0.5', '1.0', '2.0')},
                 **{f'adv_oracle_full_{b}': off for b in ('0.5', '1.0', '2.0')}})
  workdir = tmp_path / 'w'
  (workdir / 'lowrank').mkdir(parents=True)
  io_lib.write_csv(str(workdir / 'lowrank' / 'results.csv'), rows)
  (workdir / 'lowrank.run.json').write_text('{"commit": "0123456789abcdef"}')
  partial = R.verdict_section(str(workdir), partial=True)
  assert partial == ('Not written: the verdict table needs every setting\'s results in this '
                     'folder; missing: robustness, mechanism, real, real_lowrank, '
                     'fashion_mnist.')
  text = R.verdict_section(str(workdir))
  block = R.generated_blocks(text)['verdicts']
  claim3 = [line for line in block.split('\n') if line.startswith('| 3.')][0].split(' | ')
  assert claim3[1].startswith('holds: 0.420 [0.400, 0.440]') and claim3[1].endswith('T=5')
  assert claim3[2:] == ['not run'] * 4 + ['not run |']
  assert '0123456789ab' not in block  # the block goes into the README: no commit hashes
  assert text.endswith('<!-- END GENERATED: verdicts -->\n\nThe results\' commits: '
                       'synthetic low-rank (lowrank) 0123456789ab.\n')
  report = R.render_report('full', {}, [], 'w', verdicts=text)
  assert '## Verdicts\n\n<!-- BEGIN GENERATED: verdicts -->' in report
  # A setting's replicated study (--preset=paper), when it has results, is read in place of
  # its one-teacher study: here the one-teacher folder holds a table with 10x the effect.
  (workdir / 'lowrank_replicated').mkdir()
  io_lib.write_csv(str(workdir / 'lowrank_replicated' / 'results.csv'), rows)
  (workdir / 'lowrank_replicated.run.json').write_text('{"commit": "fedcba9876543210"}')
  io_lib.write_csv(str(workdir / 'lowrank' / 'results.csv'),
                   [{**r, **{k: 10 * v for k, v in r.items() if k.startswith('adv_oracle_off')}}
                    for r in rows])
  text = R.verdict_section(str(workdir))
  claim3 = [line for line in text.split('\n') if line.startswith('| 3.')][0].split(' | ')
  assert claim3[1].startswith('holds: 0.420 [0.400, 0.440]')
  assert 'synthetic low-rank (lowrank_replicated) fedcba987654.' in text


def test_a_paper_only_study_is_not_in_the_other_presets(tmp_path):
  for preset in ('quick', 'full'):
    with pytest.raises(validation.ConfigError, match='unknown: real_lowrank_replicated'):
      R.reproduce(str(tmp_path), preset, only=['real_lowrank_replicated'])


# ----------------------------------------------------------------------------
# README + docs surgery: known answers.
# ----------------------------------------------------------------------------

README = """\
# Title

Prose before.
<!-- BEGIN GENERATED: a -->
| old | a |
<!-- END GENERATED: a -->
Between, untouched: <!-- not a marker -->

<!-- BEGIN GENERATED: b -->
<!-- END GENERATED: b -->
After.
"""


def test_replace_generated_blocks():
  new = R.replace_generated_blocks(README, {'a': '| new | a |\n\n<sub>from x</sub>\n',
                                            'b': '| new | b |', 'unused': 'z\n'})
  assert new == README.replace('| old | a |\n', '| new | a |\n\n<sub>from x</sub>\n').replace(
      '<!-- BEGIN GENERATED: b -->\n', '<!-- BEGIN GENERATED: b -->\n| new | b |\n')
  assert R.generated_blocks(new) == {'a': '| new | a |\n\n<sub>from x</sub>\n',
                                     'b': '| new | b |\n'}
  assert R.replace_generated_blocks(new, R.generated_blocks(README)) == README  # round trip
  assert R.replace_generated_blocks('no markers\n', {'a': 'x'}) == 'no markers\n'


@pytest.mark.parametrize('text, message', [
    ('<!-- BEGIN GENERATED: a -->\nx\n', 'generated block a is not closed'),
    ('x\n<!-- END GENERATED: a -->\n', 'line 2: END GENERATED: a without its BEGIN'),
    ('<!-- BEGIN GENERATED: a -->\n<!-- END GENERATED: b -->\n',
     'line 2: END GENERATED: b without its BEGIN (block a is open)'),
    ('<!-- BEGIN GENERATED: a -->\n<!-- BEGIN GENERATED: b -->\n',
     'line 2: BEGIN GENERATED: b inside block a'),
    ('<!-- BEGIN GENERATED: a -->\n<!-- END GENERATED: a -->\n'
     '<!-- BEGIN GENERATED: a -->\n<!-- END GENERATED: a -->\n',
     'line 3: generated block a appears twice'),
    ('<!-- BEGIN GENERATED: a/b -->\n', "name 'a/b' must be"),
])
def test_unbalanced_markers_are_errors(text, message):
  with pytest.raises(ValueError, match=None) as info:
    R.generated_blocks(text)
  assert message in str(info.value)
  with pytest.raises(ValueError):
    R.replace_generated_blocks(text, {'a': 'x', 'b': 'y'})


def test_a_marker_without_a_block_is_an_error():
  with pytest.raises(ValueError, match=r"no generated block for the marker\(s\) \['b'\]"):
    R.replace_generated_blocks(README, {'a': 'x\n'})


# The blocks each document holds (README.md none: it shows figures; docs/ the tables).
DOC_BLOCKS = {
    'README.md': ['verdicts'],
    'docs/verdicts.md': ['verdicts'],
    'docs/lowrank.md': ['lowrank-summary', 'lowrank_strict-summary', 'lowrank_linf-summary',
                        'lowrank-attack-checks', 'lowrank-attack-checks-2'],
    'docs/real.md': ['real-summary', 'real-wilson', 'real-wilson-2', 'real-wilson-3',
                     'real-correlation-spec_mean',
                     'real-attack-checks', 'real-attack-checks-2', 'real_replicated-verdicts',
                     'real_replicated-wilson-2', 'real_replicated-wilson-3',
                     'real_lowrank-summary', 'real_lowrank-subspaces',
                     'real_lowrank-correlation-spec_off', 'real_lowrank-wilson-2',
                     'real_lowrank-wilson-3', 'real_lowrank_replicated-verdicts',
                     'real_lowrank_replicated-wilson-2', 'real_lowrank_replicated-wilson-3',
                     'real_lowrank_replicated-subspaces', 'fashion_mnist-summary',
                     'fashion_mnist-subspaces', 'fashion_mnist-correlation-spec_mean',
                     'fashion_mnist-wilson-2', 'fashion_mnist-wilson-3',
                     'fashion_mnist_replicated-verdicts', 'fashion_mnist_replicated-wilson-2',
                     'fashion_mnist_replicated-wilson-3', 'fashion_mnist_replicated-subspaces'],
    'docs/mechanism.md': ['mechanism-intervention', 'mechanism-intervention-paired',
                          'mechanism-intervention-budgets', 'mechanism-optimizers',
                          'mechanism-dynamics', 'mechanism-claim5', 'mechanism-claim5-paired',
                          'mechanism-dependence', 'mechanism-attack-checks-2',
                          'mechanism_strong-intervention-paired', 'mechanism_strong-claim5-paired',
                          'mechanism_strong-attack-checks-2', 'mechanism_deep-dependence',
                          'mechanism_deep-intervention', 'mechanism_deep-optimizers',
                          'mechanism_deep-claim5-paired'],
    'docs/robustness.md': ['robustness-summary', 'robustness-correlation-spec_off',
                           'robustness-correlation-spec_in', 'robustness-summary-2',
                           'robustness-summary-3', 'robustness-correlation',
                           'robustness-attack-checks', 'robustness-attack-checks-2'],
}
DOC_FIGURES = {'README.md': ['docs/lowrank.png', 'docs/robustness.png'],
               'docs/lowrank.md': ['docs/lowrank.png'],
               'docs/mechanism.md': ['docs/mechanism_intervention.png',
                                     'docs/mechanism_dynamics.png', 'docs/mechanism_claim5.png',
                                     'docs/mechanism_strong_mechanism_intervention.png',
                                     'docs/mechanism_strong_mechanism_claim5.png'],
               'docs/robustness.md': ['docs/robustness.png']}


def _text(rel):
  return open(os.path.join(ROOT, rel)).read()


def test_documents_markers_and_figures():
  """README.md and docs/*.md: markers balanced, each naming a table of a study's summary;
  the figures they link are ones a study writes, and exist."""
  docs = R.documents(ROOT)
  assert docs[0] == 'README.md' and set(DOC_BLOCKS) <= set(docs)
  for rel in docs:
    text = _text(rel)
    names = list(R.generated_blocks(text))
    assert names == DOC_BLOCKS.get(rel, []), rel
    assert {n.split('-')[0] for n in names} <= {s.name for s in R.STUDIES} | {
        R.VERDICTS_BLOCK}
    figures = R.linked_figures(text, in_docs=rel.startswith('docs/'))
    assert figures == DOC_FIGURES.get(rel, []), rel
    for fig in figures:
      assert os.path.isfile(os.path.join(ROOT, fig)), fig
  assert R.docs_name('lowrank', 'lowrank.png') == 'lowrank.png'
  assert R.docs_name('real', 'spec_vs_robust.png') == 'real_spec_vs_robust.png'


def test_linked_figures_in_the_readme_and_in_docs():
  text = '![a](docs/a.png) ![b](b.png) ![c](docs/a.png) [not a figure](docs/x.md)'
  assert R.linked_figures(text) == ['docs/a.png']
  assert R.linked_figures(text, in_docs=True) == ['docs/b.png']


def _full_report(tmp_path, blocks, preset='full', figures=('lowrank/lowrank.png',)):
  workdir = tmp_path / 'run'
  workdir.mkdir(parents=True, exist_ok=True)
  for fig in figures:
    (workdir / os.path.dirname(fig)).mkdir(parents=True, exist_ok=True)
    (workdir / fig).write_bytes(b'png bytes of ' + fig.encode())
  body = ''.join(f'{R.BEGIN.format(n)}\n{b}{R.END.format(n)}\n' for n, b in blocks.items())
  (workdir / 'REPORT.md').write_text(f'# R\n\n<!-- reproduce: preset={preset} -->\n\n{body}')
  return str(workdir)


PAGE = """\
# A page of the manual

<!-- BEGIN GENERATED: c -->
| old | c |
<!-- END GENERATED: c -->
![fig](lowrank.png)
"""


def test_update_documents(tmp_path):
  """README.md and every docs page with markers or figures are updated; a page without
  either is left alone; a second run changes nothing."""
  workdir = _full_report(tmp_path, {'a': '| A |\n', 'b': '| B |\n', 'c': '| C |\n',
                                    'extra': '| E |\n'})
  root = tmp_path / 'repo'
  (root / 'docs').mkdir(parents=True)
  (root / 'README.md').write_text(README + '![fig](docs/lowrank.png)\n')
  (root / 'docs' / 'page.md').write_text(PAGE)
  (root / 'docs' / 'plain.md').write_text('no markers\n')
  done = R.update_documents(workdir, str(root))
  assert done == ['a', 'b', 'docs/lowrank.png', 'c']
  assert (root / 'README.md').read_text() == (
      README.replace('| old | a |', '| A |').replace(
          '<!-- BEGIN GENERATED: b -->\n', '<!-- BEGIN GENERATED: b -->\n| B |\n')
      + '![fig](docs/lowrank.png)\n')
  assert (root / 'docs' / 'page.md').read_text() == PAGE.replace('| old | c |', '| C |')
  assert (root / 'docs' / 'plain.md').read_text() == 'no markers\n'
  assert (root / 'docs' / 'lowrank.png').read_bytes() == b'png bytes of lowrank/lowrank.png'
  before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob('*') if p.is_file()}
  assert R.update_documents(workdir, str(root)) == done
  after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob('*') if p.is_file()}
  assert after == before  # nothing rewritten


def test_update_documents_of_some_studies(tmp_path):
  """A --studies report updates its studies' blocks and figures; every other study's block
  and figure is kept, and one of its own studies' blocks missing is still an error."""
  workdir = _full_report(tmp_path, {'robustness-summary': '| new rob |\n'},
                         figures=('robustness/robustness.png', 'lowrank/lowrank.png'))
  report = os.path.join(workdir, 'REPORT.md')
  with open(report) as f:
    text = f.read()
  with open(report, 'w') as f:
    f.write(text.replace('preset=full', 'preset=full studies=robustness'))
  root = tmp_path / 'repo'
  (root / 'docs').mkdir(parents=True)
  readme = ('<!-- BEGIN GENERATED: lowrank-summary -->\n| old low |\n'
            '<!-- END GENERATED: lowrank-summary -->\n'
            '<!-- BEGIN GENERATED: robustness-summary -->\n| old rob |\n'
            '<!-- END GENERATED: robustness-summary -->\n'
            '![a](docs/lowrank.png) ![b](docs/robustness.png)\n')
  (root / 'README.md').write_text(readme)
  (root / 'docs' / 'lowrank.png').write_bytes(b'old lowrank')
  done = R.update_documents(workdir, str(root))
  assert done == ['robustness-summary', 'docs/robustness.png']
  assert (root / 'README.md').read_text() == readme.replace('| old rob |', '| new rob |')
  assert (root / 'docs' / 'lowrank.png').read_bytes() == b'old lowrank'
  assert (root / 'docs' / 'robustness.png').read_bytes() == (
      b'png bytes of robustness/robustness.png')
  (root / 'README.md').write_text(readme + '<!-- BEGIN GENERATED: robustness-wilson -->\n'
                                  '<!-- END GENERATED: robustness-wilson -->\n')
  with pytest.raises(validation.ConfigError, match=r"robustness-wilson"):
    R.update_documents(workdir, str(root))


def test_the_repository_documents_regenerate_without_a_diff(tmp_path):
  """A report holding the blocks the documents hold now, and the figures they show:
  updating the repository's README.md and docs/ from it changes no byte."""
  blocks = {}
  for rel in R.documents(ROOT):
    blocks.update(R.generated_blocks(_text(rel)))
  figures = {'docs/lowrank.png': 'lowrank/lowrank.png',
             'docs/robustness.png': 'robustness/robustness.png'}
  for name in ('intervention', 'dynamics', 'claim5'):
    figures[f'docs/mechanism_{name}.png'] = f'mechanism/mechanism_{name}.png'
  for name in ('intervention', 'claim5'):
    figures[f'docs/mechanism_strong_mechanism_{name}.png'] = (
        f'mechanism_strong/mechanism_{name}.png')
  workdir = _full_report(tmp_path, blocks, figures=())
  for doc_fig, study_fig in figures.items():
    os.makedirs(os.path.join(workdir, os.path.dirname(study_fig)), exist_ok=True)
    with open(os.path.join(ROOT, doc_fig), 'rb') as f, \
        open(os.path.join(workdir, study_fig), 'wb') as g:
      g.write(f.read())
  root = tmp_path / 'repo'
  (root / 'docs').mkdir(parents=True)
  for rel in R.documents(ROOT) + list(figures):
    with open(os.path.join(ROOT, rel), 'rb') as f:
      (root / rel).write_bytes(f.read())
  before = {p: p.read_bytes() for p in root.rglob('*') if p.is_file()}
  done = R.update_documents(workdir, str(root))
  assert {p: p.read_bytes() for p in root.rglob('*') if p.is_file()} == before
  assert set(done) >= set(blocks) | set(figures)


@pytest.mark.parametrize('blocks, preset, page, message', [
    ({'a': 'x\n', 'b': 'y\n', 'c': 'z\n'}, 'quick', PAGE,
     'needs a report of --preset=full or paper; '),
    ({'a': 'x\n', 'b': 'y\n'}, 'full', PAGE,
     "docs/page.md: no generated block for the marker(s) ['c']"),
    ({'a': 'x\n'}, 'full', PAGE, "README.md: no generated block for the marker(s) ['b']"),
    ({'a': 'x\n', 'b': 'y\n', 'c': 'z\n'}, 'full', PAGE + '![f](other.png)\n',
     "docs/page.md links ['docs/lowrank.png', 'docs/other.png'], which no study"),
])
def test_update_documents_errors_change_nothing(tmp_path, blocks, preset, page, message):
  workdir = _full_report(tmp_path, blocks, preset, figures=())
  root = tmp_path / 'repo'
  (root / 'docs').mkdir(parents=True)
  (root / 'README.md').write_text(README)
  (root / 'docs' / 'page.md').write_text(page)
  with pytest.raises(validation.ConfigError) as info:
    R.update_documents(workdir, str(root))
  assert message in str(info.value)
  assert (root / 'README.md').read_text() == README  # untouched
  assert (root / 'docs' / 'page.md').read_text() == page
  assert os.listdir(root / 'docs') == ['page.md']


# ----------------------------------------------------------------------------
# The command line: mistakes in one line, exit code 2.
# ----------------------------------------------------------------------------

def _run(args, capfd, root=ROOT):
  capfd.readouterr()
  with pytest.raises(SystemExit) as info:
    R.run(['reproduce', *args], flag_values=flags.FlagValues(), root=root)
  return info.value.code, capfd.readouterr().err


@pytest.mark.parametrize('args, message', [
    ([], 'error: --workdir is required (the folder of the report and the studies)\n'),
    (['--workdir=W', '--preset=medium'],
     'error: flag --preset=medium: value should be one of <quick|full|paper>\n'),
    (['--workdir=W', '--cifar10_dir=/no/such/folder'],
     "error: --cifar10_dir must be a folder holding the CIFAR-10 binary batches, "
     "got '/no/such/folder'\n"),
    (['--workdir=W', '--update_readme', '--cifar10_dir=/tmp'],
     'error: --cifar10_dir and --studies are not used with --update_readme (it copies an '
     'existing report, with the studies it ran)\n'),
    (['--workdir=W', '--update_readme', '--studies=lowrank'],
     'error: --cifar10_dir and --studies are not used with --update_readme (it copies an '
     'existing report, with the studies it ran)\n'),
    (['--workdir=W', '--studies=lowrank,robustnes'],
     'error: --studies must be distinct names among lowrank, lowrank_strict, lowrank_linf, '
     'robustness, mechanism, mechanism_strong, mechanism_deep, real, real_lowrank, fashion_mnist, '
     'cifar10, '
     'got lowrank,robustnes (unknown: robustnes)\n'),
    (['--workdir=W', '--studies=lowrank,lowrank'],
     'error: --studies must be distinct names among lowrank, lowrank_strict, lowrank_linf, '
     'robustness, mechanism, mechanism_strong, mechanism_deep, real, real_lowrank, fashion_mnist, '
     'cifar10, '
     'got lowrank,lowrank\n'),
    (['--workdir=W', 'extra'],
     "error: unexpected arguments ['extra']; flags are written --name=value\n"),
    (['--workdir=W', '--bogus=1'], 'error: Unknown command line flag \'bogus\'\n'),
])
def test_flag_mistakes_in_one_line(args, message, capfd, tmp_path):
  args = [a.replace('=W', f'={tmp_path / "w"}') for a in args]
  code, err = _run(args, capfd)
  assert code == 2
  assert err == message
  assert not (tmp_path / 'w').exists()


def test_update_readme_of_a_quick_report_in_one_line(tmp_path, capfd):
  workdir = _full_report(tmp_path, {'a': 'x\n'}, preset='quick', figures=())
  (tmp_path / 'README.md').write_text(README)
  code, err = _run([f'--workdir={workdir}', '--update_readme'], capfd, root=str(tmp_path))
  assert code == 2
  assert err == (f'error: --update_readme needs a report of --preset=full or paper; '
                 f'{workdir}/REPORT.md is from --preset=quick\n')
  assert (tmp_path / 'README.md').read_text() == README


# ----------------------------------------------------------------------------
# End to end.
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
  """``--preset=quick`` runs every study and writes a report with every study's section and
  every table README.md and docs/ show; a second run reuses every study."""
  workdir = str(tmp_path / 'quick')
  cmd = [sys.executable, '-m', 'experiments.reproduce', f'--workdir={workdir}',
         '--preset=quick']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  report = open(os.path.join(workdir, 'REPORT.md')).read()
  assert R.report_preset(report) == 'quick'
  blocks = R.generated_blocks(report)
  readme_names = [n for rel in R.documents(ROOT) for n in R.generated_blocks(_text(rel))]
  # Studies of installed data sets run where the data is (skipped, with the install line, where
  # it is not).
  absent = {s.name for s in R.STUDIES if s.data_dir and not os.path.isdir(s.data_dir)}
  # --preset=paper's replicated studies are not among quick's.
  absent |= {s.name for s in R.STUDIES if 'quick' not in s.presets}
  assert {n for n in readme_names if n.split('-')[0] not in absent} <= set(blocks)
  for study in ('lowrank', 'lowrank_strict', 'lowrank_linf', 'robustness', 'real',
                'real_lowrank', 'fashion_mnist'):
    assert f'\n## {study}\n' in report
    assert f'{study}/summary.md' in report or study in absent
  assert 'cifar10' not in [line[3:] for line in report.splitlines() if line.startswith('## ')]
  for name in ('lowrank/lowrank.png', 'robustness/robustness.png',
               'real/spec_vs_robust.png'):
    assert f']({name})' in report and os.path.isfile(os.path.join(workdir, name))
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  report = open(os.path.join(workdir, 'REPORT.md')).read()
  for study in ('lowrank', 'robustness', 'real'):
    assert f'| [{study}](#{study}) | reused |' in report
