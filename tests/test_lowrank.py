"""The low-rank experiment binary: end to end on a tiny config, and config errors."""

import json
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from experiments import lowrank
from experiments import validation
from experiments.configs import lowrank as lowrank_config
from tsrobust import check_results
from tsrobust import data
from tsrobust import io
from tsrobust import lowrank as lowrank_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(num_seeds=2, d=6, ranks=(2, 6), teacher_hidden=(3,), out_dim=3, width_mult=2,
            num_steps=60, chunk_steps=30, batch_size=16, num_eval=64, eval_batch=32,
            num_attack=16, attack=dict(strength='fast'), eps=(0.5, 1.0, 2.0))


def tiny_config(**overrides):
  config = lowrank_config.get_config()
  config.update(TINY)
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lowrank'))
  records = lowrank.train_and_evaluate(tiny_config(), workdir)
  return workdir, records


@pytest.mark.slow
def test_writes_files_that_parse(tiny_run):
  workdir, records = tiny_run
  rows = io.read_csv(os.path.join(workdir, 'results.csv'))
  assert len(rows) == len(records) == 4  # 2 ranks x 2 seeds
  assert check_results.check_file(os.path.join(workdir, 'results.csv')) == ([], 4)
  assert [(r['rank'], r['teacher'], r['seed']) for r in rows] == [
      (2, 0, 0), (2, 1, 1), (6, 0, 0), (6, 1, 1)]  # one student per teacher: teacher = seed
  expected = ['rank', 'teacher', 'seed', 'spec_in', 'spec_in_l1', 'spec_off', 'wcos_in', 'wcos_off',
              'wcos_off_random', 'clean_agree']
  expected += [f'adv_{lab}_{w}_{e}' for lab in ('oracle', 'fixed')
               for w in ('in', 'off', 'full') for e in ('0.5', '1.0', '2.0')]
  assert set(expected) <= set(rows[0])
  with open(os.path.join(workdir, 'results.json')) as f:
    payload = json.load(f)
  assert payload['config']['d'] == 6
  assert {'jax', 'flax', 'optax'} <= set(payload['versions'])
  assert len(payload['records']) == 4
  with open(os.path.join(workdir, 'lowrank.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(workdir, 'summary.md')) as f:
    table = f.read()
  assert table.startswith('| rank | n | spec_in')
  assert len(table.split('\n\n')[0].strip().splitlines()) == 4  # header, rule, two ranks
  assert '## Attack checks (`attack.strength = fast`)' in table
  with open(os.path.join(workdir, 'attack_checks.json')) as f:
    checks = json.load(f)
  assert checks['attack_config']['pgd_steps'] == 5  # the fast preset
  assert set(checks['groups']) == {'rank_2', 'rank_6'}
  for group in checks['groups'].values():
    assert group['final'] == {'non_monotone_in_eps': 0, 'subspace_not_in_full': 0,
                              'row_violations': 0}
    assert set(group['per_attack']) == {'pgd', 'apgd', 'apgd_t', 'square', 'apgd_pair'}
    assert set(group['convergence']) == {'oracle', 'fixed'}
    assert group['doubling']['points'] == 16 and group['doubling']['students'] == 2
  assert ('### Convergence: the ensemble with every iteration, query and target count '
          'doubled') in table
  assert '## Teacher-level intervals (2 teachers x 1 student(s) per teacher per rank)' in table


@pytest.mark.slow
def test_students_per_teacher(tmp_path):
  """Two students per teacher: the teacher column, students of one teacher share its
  network and subspace (not their initial weights), and the teacher-level table."""
  config = tiny_config(num_seeds=4, students_per_teacher=2, ranks=(2,), num_steps=30)
  workdir = str(tmp_path)
  records = lowrank.train_and_evaluate(config, workdir)
  rows = io.read_csv(os.path.join(workdir, 'results.csv'))
  assert [(r['teacher'], r['seed']) for r in rows] == [(0, 0), (0, 1), (1, 2), (1, 3)]
  assert [r['teacher'] for r in records] == [0, 0, 1, 1]
  with open(os.path.join(workdir, 'results.csv')) as f:
    assert f.readline().startswith('rank,teacher,seed,')
  run = lowrank.build(config)
  seed = lambda tree, i: jax.tree_util.tree_map(lambda v: np.asarray(v[i]), tree)
  for a, b, same in ((0, 1, True), (2, 3, True), (1, 2, False)):
    teachers_equal = all(np.array_equal(x, y) for x, y in zip(
        jax.tree_util.tree_leaves(seed(run.problem.teacher_params, a)),
        jax.tree_util.tree_leaves(seed(run.problem.teacher_params, b))))
    assert teachers_equal == same, (a, b)
    assert np.array_equal(run.problem.bases[a], run.problem.bases[b]) == same, (a, b)
    assert not np.array_equal(run.keys.student[a], run.keys.student[b])
  # The teacher-level table: per rank, finite estimates with finite t-intervals (2 teachers).
  with open(os.path.join(workdir, 'summary.md')) as f:
    text = f.read()
  assert '## Teacher-level intervals (2 teachers x 2 student(s) per teacher per rank)' in text
  section = text.split('## Teacher-level intervals')[1].split('## Attack checks')[0]
  table = [line for line in section.splitlines() if line.startswith('|')]
  assert table[0] == ('| rank | teachers | students | `adv_oracle_in_1.0` | '
                      '`adv_oracle_off_1.0` | `adv_oracle_full_0.5` | `adv_oracle_full_1.0` | '
                      '`adv_oracle_full_2.0` |')
  cells = [c.strip() for c in table[2].strip('|').split('|')]
  assert cells[:3] == ['2', '2', '4']
  for cell in cells[3:]:
    estimate, lo, hi = (float(v) for v in cell.replace('[', '').replace(']', '')
                        .replace(',', '').split())
    assert lo <= estimate <= hi and all(np.isfinite([estimate, lo, hi])), cell
  # The estimate is the mean of the two teachers' means (equal sizes: the students' mean).
  assert estimate == pytest.approx(np.mean([r['adv_oracle_full_2.0'] for r in records]),
                                   abs=1e-3)


@pytest.mark.slow
def test_errors_are_consistent_and_per_attack_columns(tiny_run):
  """The ensemble's errors obey the nesting invariants; each attack's own column is <= them."""
  _, records = tiny_run
  attacks = ('pgd', 'apgd', 'apgd_t', 'square')
  for r in records:
    for lab in ('oracle', 'fixed'):
      for where in ('in', 'off', 'full'):
        seq = [r[f'adv_{lab}_{where}_{e}'] for e in ('0.5', '1.0', '2.0')]
        if seq[0] is None:
          assert r['rank'] == 6 and where == 'off'
          continue
        assert seq == sorted(seq)
        for e, value in zip(('0.5', '1.0', '2.0'), seq):
          for a in attacks:
            assert r[f'adv_{lab}_{where}_{e}_{a}'] <= value + 1e-9
      for e in ('0.5', '1.0', '2.0'):
        full = r[f'adv_{lab}_full_{e}']
        assert full >= r[f'adv_{lab}_in_{e}']
        if r['rank'] == 6:  # full rank: in is the whole space
          assert full == r[f'adv_{lab}_in_{e}']
        else:
          assert full >= r[f'adv_{lab}_off_{e}']


@pytest.mark.slow
def test_values_are_fractions_of_the_right_counts(tiny_run):
  """Each column is what it claims to be a mean of (per student, not over seeds)."""
  _, records = tiny_run
  for r in records:
    assert r['spec_in'] == r['spec_in_l1']  # one hidden layer: the mean over layers is it
    if r['rank'] == 2:
      assert r['spec_off'] == r['spec_off_l1']
      # E|cos| of random vectors in the d - r = 4 dimensional complement.
      assert r['wcos_off_random'] == pytest.approx(np.sqrt(2 / (np.pi * 4)))
    # Fractions of the teacher nodes alive on the data (of 3), the 64 evaluation points, the
    # 16 attacked points.
    assert r['dead_l1'] in (0, 1, 2, 3)
    for key, count in (('frac_in', 3 - r['dead_l1']), ('clean_agree', 64), ('adv_', 16)):
      for k in [k for k in r if k.startswith(key) and r[k] is not None]:
        assert r[k] * count == pytest.approx(round(r[k] * count), abs=1e-5), (k, r[k])


class _Interrupted(Exception):
  pass


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_results(tiny_run, tmp_path, monkeypatch):
  """Stopped in rank 2 after its first chunk, the same call again resumes from the
  checkpoint (only the second chunk is trained) and writes tiny_run's results."""
  real_logger = cli.progress_logger
  seen = []

  def stop_in_rank2(stage, **kwargs):
    report = real_logger(stage, **kwargs)

    def on_chunk(info):
      seen.append((stage, info['step']))
      report(info)
      if stage == 'rank2' and info['step'] == 30:
        raise _Interrupted
    return on_chunk
  monkeypatch.setattr(cli, 'progress_logger', stop_in_rank2)
  monkeypatch.setattr(cli, '_checkpoint_every_sec', 0.0)  # a checkpoint after every chunk
  workdir = str(tmp_path)
  with pytest.raises(_Interrupted):
    lowrank.train_and_evaluate(tiny_config(), workdir)
  assert seen == [('rank2', 30)]
  assert not os.path.exists(os.path.join(workdir, 'results.csv'))
  monkeypatch.setattr(cli, 'progress_logger',
                      lambda stage, **kwargs: lambda info: seen.append((stage, info['step'])))
  seen.clear()
  lowrank.train_and_evaluate(tiny_config(), workdir)  # the same call again
  assert seen == [('rank2', 60), ('rank6', 30), ('rank6', 60)]
  straight = io.read_csv(os.path.join(tiny_run[0], 'results.csv'))
  resumed = io.read_csv(os.path.join(workdir, 'results.csv'))
  assert len(straight) == len(resumed) == 4
  for a, b in zip(straight, resumed):
    assert a.keys() == b.keys()
    for k in a:
      if a[k] is None or b[k] is None:
        assert a[k] is None and b[k] is None, k
      else:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_full_rank_off_subspace_columns_are_empty(tiny_run):
  workdir, _ = tiny_run
  rows = io.read_csv(os.path.join(workdir, 'results.csv'))
  for row in rows:
    off = [k for k in row if '_off' in k]
    assert off
    if row['rank'] == 6:
      assert all(row[k] is None for k in off), {k: row[k] for k in off}
    else:
      assert all(row[k] is not None for k in off)


@pytest.mark.parametrize('field, value, message', [
    ('ranks', (2, 7), 'config.ranks must satisfy 1 <= r <= d = 6'),
    ('ranks', (0,), 'config.ranks values must be >= 1'),
    ('eps', (0.5, -1.0), 'config.eps values must be >= 0'),
    ('num_seeds', 0, 'config.num_seeds must be >= 1'),
    ('optimizer', 'lbfgs', 'config.optimizer must be one of'),
    ('eval_batch', 30, 'config.eval_batch must divide config.num_eval'),
    ('learning_rate', -0.1, 'config.learning_rate must be > 0'),
    ('attack_norm', 'l1', 'config.attack_norm must be one of'),
    ('attack', {'strength': 'medium'}, 'config.attack.strength must be one of'),
    ('attack', {'apgd_steps': -2}, "config.attack.apgd_steps must be None (the preset's) or >= 0"),
    ('attack', {'pgd_restarts': 0},
     "config.attack.pgd_restarts must be None (the preset's) or >= 1"),
    ('attack', {'targets': -1}, "config.attack.targets must be None (the preset's) or >= 0"),
])
def test_bad_config_fails_at_start(tmp_path, field, value, message):
  with pytest.raises(validation.ConfigError) as info:
    lowrank.train_and_evaluate(tiny_config(**{field: value}), str(tmp_path))
  assert message in str(info.value)
  assert not os.listdir(tmp_path)  # nothing was started


@pytest.mark.parametrize('overrides, message', [
    (dict(students_per_teacher=3),
     'config.num_seeds must be a multiple of config.students_per_teacher = 3 (the students of '
     'each teacher), got 2'),
    (dict(students_per_teacher=0), 'config.students_per_teacher must be >= 1'),
    (dict(teacher_per_seed=False, num_seeds=4, students_per_teacher=2),
     'config.students_per_teacher must be 1 or config.num_seeds = 4 when '
     'config.teacher_per_seed is False (one teacher shared by every student), got 2'),
])
def test_bad_students_per_teacher_fails_at_start(tmp_path, overrides, message):
  with pytest.raises(validation.ConfigError) as info:
    lowrank.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert message in str(info.value)
  assert not os.listdir(tmp_path)


def test_students_per_teacher_combinations_that_hold():
  # A shared teacher with students_per_teacher 1 (the default) or num_seeds; K dividing
  # num_seeds.
  from tsrobust import lowrank as lowrank_lib  # pylint: disable=g-import-not-at-top
  for overrides, teachers in ((dict(teacher_per_seed=False), [0, 0]),
                              (dict(teacher_per_seed=False, students_per_teacher=2), [0, 0]),
                              (dict(num_seeds=6, students_per_teacher=3), [0, 0, 0, 1, 1, 1])):
    config = tiny_config(**overrides)
    lowrank.validate_config(config)  # raises on a combination it refuses
    ids = lowrank_lib.teacher_ids(config.num_seeds, config.teacher_per_seed,
                                  config.students_per_teacher)
    assert ids.tolist() == teachers, overrides


def _run_binary(args, capfd):
  """The binary's entry point, in-process on private flags: (exit code, stderr)."""
  capfd.readouterr()
  with pytest.raises(SystemExit) as info:
    cli.run_binary(lowrank.validate_config, lowrank.train_and_evaluate,
                   lowrank._DEFAULT_CONFIG, ('results.csv',), argv=['lowrank', *args],
                   flag_values=flags.FlagValues())
  return info.value.code, capfd.readouterr().err


def test_command_line_names_a_bad_value(tmp_path, capfd):
  """The binary validates flags before any work, in one line on stderr (the success path
  through the command line is exercised by tests/test_sweep.py; the absl entry point and
  every kind of mistake by tests/test_validation.py)."""
  code, err = _run_binary([f'--workdir={tmp_path / "bad"}', '--config.d=6',
                           '--config.ranks=(2,9)'], capfd)
  assert code == 2
  assert err == 'error: config.ranks must satisfy 1 <= r <= d = 6, got r = 9\n'
  assert not (tmp_path / 'bad').exists()
  code, err = _run_binary([f'--workdir={tmp_path / "bad"}', '--config.num_seeds=6',
                           '--config.students_per_teacher=4'], capfd)
  assert code == 2
  assert err == ('error: config.num_seeds must be a multiple of config.students_per_teacher = '
                 '4 (the students of each teacher), got 6\n')
  assert not (tmp_path / 'bad').exists()
  code, err = _run_binary([], capfd)
  assert code == 2 and err == 'error: --workdir is required (the folder for the result files)\n'


def test_online_sampler_draws_in_each_seeds_subspace():
  # lowrank_lib.lowrank_args + lowrank_lib.sampler(0): the training inputs of seed i lie in the
  # span of its own first r basis columns, with the energy-matched scale.
  d, r, n = 6, 2, 4000
  bases = jnp.stack([data.random_orthonormal(jax.random.PRNGKey(i), d, d) for i in range(2)])
  args = lowrank_lib.lowrank_args(bases, r, jnp.array([1.0, 3.0]))
  assert args['basis'].shape == (2, d, r) and args['projector'].shape == (2, d, d)
  sample = lowrank_lib.sampler(0)
  for i in range(2):
    seed = jax.tree_util.tree_map(lambda v, i=i: v[i], args)
    x = np.asarray(sample(jax.random.PRNGKey(9), seed, n), np.float64)
    p = np.asarray(bases[i, :, :r] @ bases[i, :, :r].T, np.float64)
    np.testing.assert_allclose(args['projector'][i], p, atol=1e-6)
    np.testing.assert_allclose(x - x @ p, 0.0, atol=1e-5)
    np.testing.assert_allclose((x ** 2).sum(1).mean(), r * float(args['scale'][i]) ** 2,
                               rtol=0.05)
