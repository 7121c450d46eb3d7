"""The CNN sweep's trainers train what tsrobust trains (``benchmarks/cnn_sweep.py``).

On a tiny CNN (conv (2, 3), dense (4,), students twice as wide, 8 x 8 random images):
the batches PyTorch is given are those tsrobust's chunk draws, and from the same initial
students every PyTorch trainer reaches the JAX students' outputs and held-out loss;
after 0 steps every trainer's loss is the JAX loss at the initial weights (a known
answer). The PGD-AT step (the attack inside training): its settings are the image study's
``at`` students', and given tsrobust's random starts every PyTorch trainer's PGD-AT reaches
the JAX students' weights (a known answer; with their own random starts they do not, so the
check has teeth); ``run_sweep`` writes both step kinds into one JSON. PyTorch is a
benchmark-only dependency (``requirements-bench.txt``) that CI
does not install: the tests that need it are skipped without it
(``pytest.importorskip``, as ``tests/test_benchmarks_seed_sweep.py``); the JAX part runs.
"""

import dataclasses
import importlib.util
import json

import jax
import numpy as np
import pytest

from benchmarks import cnn_sweep
from benchmarks import setting
from experiments import real_eval
from experiments.configs import real as real_config
from tsrobust import train

NUM_SEEDS = 2
NUM_STEPS = 3
JOB = dataclasses.replace(setting.ImageJob(), teacher_conv=(2, 3), teacher_dense=(4,))


def _has_torch() -> bool:
  return importlib.util.find_spec('torch') is not None


@pytest.fixture(scope='module')
def problem():
  return cnn_sweep.make_problem(NUM_SEEDS, job=JOB, data='random', image_shape=(8, 8, 1),
                                num_train=64, num_heldout=50)


@pytest.fixture(scope='module')
def jax_trained(problem):
  """The JAX students after ``NUM_STEPS`` steps of the benchmark's vmap trainer."""
  return cnn_sweep.make_vmap(problem, NUM_STEPS)()


def test_problem_is_the_image_jobs_student(problem):
  assert problem.student.conv_widths == (4, 6) and problem.student.dense_widths == (8,)
  assert problem.job.optimizer == 'adam' and problem.job.batch_size == 32
  assert problem.train_x.shape == (64, 8, 8, 1) and problem.test_x.shape == (50, 8, 8, 1)
  # Known count: conv 3x3x1x4 + 3x3x4x6 (2 x 2 pooled twice: 8 -> 2), dense 2*2*6 -> 8 -> 10.
  flops = cnn_sweep.flops_per_student_step(problem)
  conv0, conv1 = 2 * 64 * 9 * 4, 2 * 16 * 9 * 4 * 6
  student = conv0 + conv1 + 2 * 24 * 8 + 2 * 8 * 10
  teacher = 2 * 64 * 9 * 2 + 2 * 16 * 9 * 2 * 3 + 2 * 12 * 4 + 2 * 4 * 10
  assert flops['exact'] == 32 * (3 * student - conv0 + teacher)


def test_batch_indices_are_the_chunks_batches(problem):
  """One JAX step on the images ``batch_indices`` names equals the chunk's step."""
  idx = cnn_sweep.batch_indices(problem, NUM_SEEDS, 2)
  assert idx.shape == (NUM_SEEDS, 2, 32) and idx.max() < 64
  fixed = train.teacher_regression_loss(problem.student.apply, problem.teacher.apply, 'mse',
                                        lambda key, a, n: a['x'], 32)
  chunk = jax.jit(jax.vmap(train.make_chunk_fn(problem.loss_fn, problem.optimizer, 1),
                           in_axes=(0, None, None, 0)))
  want, _ = chunk(problem.state, problem.teacher_params,
                  {'train_x': jax.numpy.asarray(problem.train_x)}, problem.keys)

  def step(st, x, k):
    return train.train_step(fixed, problem.optimizer, st, problem.teacher_params, {'x': x},
                            k)[0]
  got = jax.jit(jax.vmap(step))(problem.state, problem.train_x[idx[:, 0]], problem.keys)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         want.params, got.params)


def test_vmap_trainer_trains(problem, jax_trained):
  init = cnn_sweep.heldout_loss(problem, cnn_sweep.jax_predictor(problem, problem.state.params),
                                NUM_SEEDS)
  after = cnn_sweep.heldout_loss(problem, cnn_sweep.jax_predictor(problem, jax_trained),
                                 NUM_SEEDS)
  assert np.isfinite(init) and after != init


@pytest.mark.parametrize('name', cnn_sweep.TORCH_TRAINERS)
def test_torch_trainer_starts_from_the_jax_students(name, problem):
  pytest.importorskip('torch')
  run = cnn_sweep.MAKERS[name](problem, NUM_SEEDS, 0)
  run.prepare(1)
  state = run()
  predict = run.predictor(state)
  want = cnn_sweep.jax_predictor(problem, problem.state.params)
  for i in range(NUM_SEEDS):
    np.testing.assert_allclose(predict(i, problem.test_x), want(i, problem.test_x),
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cnn_sweep.heldout_loss(problem, predict, NUM_SEEDS),
                             cnn_sweep.heldout_loss(problem, want, NUM_SEEDS), rtol=1e-5)


@pytest.mark.parametrize('name', cnn_sweep.TORCH_TRAINERS)
def test_torch_trainer_matches_jax_steps(name, problem, jax_trained):
  pytest.importorskip('torch')
  run = cnn_sweep.MAKERS[name](problem, NUM_SEEDS, NUM_STEPS)
  _assert_reaches_jax(run, problem, jax_trained)


def _assert_reaches_jax(run, problem, jax_trained):
  """The PyTorch trainer ``run`` ends where the JAX students ``jax_trained`` did."""
  run.prepare(1)
  predict = run.predictor(run())
  want = cnn_sweep.jax_predictor(problem, jax_trained)
  init = cnn_sweep.jax_predictor(problem, problem.state.params)
  x = problem.test_x
  for i in range(NUM_SEEDS):
    # The students moved far more than the tolerance, so the comparison has teeth.
    assert np.abs(want(i, x) - init(i, x)).max() > 100 * 1e-5
    np.testing.assert_allclose(predict(i, x), want(i, x), rtol=1e-4, atol=1e-5)


def test_measure_record_shape(problem):
  """``measure``'s record: every trainer's seconds, per student-step and held-out loss."""
  torch_trainers = cnn_sweep.TORCH_TRAINERS if _has_torch() else ()  # else JAX alone
  row = cnn_sweep.measure(problem, NUM_SEEDS, 0, 2, torch_trainers=torch_trainers)
  assert set(row['trainers']) == {'vmap', *torch_trainers}
  for v in row['trainers'].values():
    assert len(v['seconds_per_repeat']) == 2 and v['seconds'] >= 0
    assert v['seconds_per_student_step'] == v['seconds'] / NUM_SEEDS
    # 0 steps: every trainer's loss is the JAX loss at the initial weights.
    np.testing.assert_allclose(v['heldout_loss'], row['heldout_loss_init'], rtol=1e-5)
  assert 'compile_seconds' in row['trainers']['vmap']
  assert cnn_sweep.best_peer(row['trainers']) in (torch_trainers or (None,))


# ----------------------------------------------------------------------------
# The PGD-AT step.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def pgd_problem():
  return cnn_sweep.make_problem(NUM_SEEDS, job=JOB, data='random', image_shape=(8, 8, 1),
                                num_train=64, num_heldout=50, step='pgd_at')


@pytest.fixture(scope='module')
def jax_pgd_trained(pgd_problem):
  """The JAX students after ``NUM_STEPS`` PGD-AT steps of the benchmark's vmap trainer."""
  return cnn_sweep.make_vmap(pgd_problem, NUM_STEPS)()


def test_pgd_at_is_the_image_studys(pgd_problem):
  """The settings are ``real_eval.method_settings`` of the default config, the budget one
  of its ``at_eps``, and the attack the one the PyTorch peers write."""
  config = real_config.get_config()
  assert cnn_sweep.at_settings(setting.ImageJob()) == real_eval.method_settings(config)
  assert cnn_sweep.AT_EPS in config.at_eps
  assert pgd_problem.kind == 'pgd_at' and pgd_problem.settings == cnn_sweep.at_settings(JOB)
  np.testing.assert_array_equal(pgd_problem.data_args['at_eps'], [np.float32(0.3)] * NUM_SEEDS)
  np.testing.assert_array_equal(pgd_problem.data_args['at_fraction'], [1.0] * NUM_SEEDS)
  cnn_sweep.check_pgd_at_supported(pgd_problem)
  spec = cnn_sweep.pgd_spec(pgd_problem)
  assert spec.steps == 3 and spec.clip_range == (0.0, 1.0)
  np.testing.assert_allclose([spec.eps, spec.alpha], [0.3, 0.25], rtol=1e-6)
  with pytest.raises(ValueError, match='step must be one of'):
    cnn_sweep.make_problem(1, job=JOB, data='random', image_shape=(8, 8, 1), step='at')


def test_pgd_at_flops(problem, pgd_problem):
  """Known count: per PGD step the forward and input gradient of student and teacher, a
  last forward of both, then the standard step."""
  student = 2 * 64 * 9 * 4 + 2 * 16 * 9 * 4 * 6 + 2 * 24 * 8 + 2 * 8 * 10
  teacher = 2 * 64 * 9 * 2 + 2 * 16 * 9 * 2 * 3 + 2 * 12 * 4 + 2 * 4 * 10
  flops = cnn_sweep.flops_per_student_step(pgd_problem)
  assert flops['attack'] == 32 * (3 * 2 + 1) * (student + teacher)
  assert flops['exact'] == (cnn_sweep.flops_per_student_step(problem)['exact']
                            + flops['attack'])


def test_jax_random_starts_shape(pgd_problem):
  starts = cnn_sweep.jax_random_starts(pgd_problem, NUM_SEEDS, NUM_STEPS)
  assert starts.shape == (NUM_SEEDS, NUM_STEPS, 32, 1, 8, 8)
  assert np.abs(starts).max() <= np.float32(0.3) and np.abs(starts).max() > 0.29
  assert not np.allclose(starts[0, 0], starts[0, 1]) and not np.allclose(starts[0], starts[1])


@pytest.mark.parametrize('name', cnn_sweep.TORCH_TRAINERS)
def test_pgd_at_torch_trainer_matches_jax_steps(name, pgd_problem, jax_pgd_trained):
  """Given tsrobust's random starts, ``NUM_STEPS`` PyTorch PGD-AT steps give the JAX
  students (attack: start, 3 sign steps clipped to the box and [0, 1], best iterate)."""
  pytest.importorskip('torch')
  starts = cnn_sweep.jax_random_starts(pgd_problem, NUM_SEEDS, NUM_STEPS)
  run = cnn_sweep.MAKERS[name](pgd_problem, NUM_SEEDS, NUM_STEPS, starts=starts)
  _assert_reaches_jax(run, pgd_problem, jax_pgd_trained)


def test_pgd_at_random_starts_matter(pgd_problem, jax_pgd_trained):
  """With PyTorch's own random starts (the timed runs) the students differ from the JAX ones
  by far more than the tolerance above: the known answer depends on the attack."""
  pytest.importorskip('torch')
  run = cnn_sweep.MAKERS['grouped'](pgd_problem, NUM_SEEDS, NUM_STEPS)
  run.prepare(1)
  predict = run.predictor(run())
  want = cnn_sweep.jax_predictor(pgd_problem, jax_pgd_trained)
  x = pgd_problem.test_x
  assert max(np.abs(predict(i, x) - want(i, x)).max() for i in range(NUM_SEEDS)) > 1e-3


def test_run_sweep_json_both_steps(tmp_path):
  """``--step=both``: one JSON with a row per step kind and S, in seed_sweep's shape."""
  has_torch = _has_torch()
  path = tmp_path / 'cnn.json'
  args = cnn_sweep.parse_args(
      [f'--students={NUM_SEEDS}', f'--steps={NUM_STEPS}', '--at_train_steps=2', '--repeats=1',
       '--step=both', '--data=random', '--heldout=50', '--matmul_n=64', f'--json={path}']
      + ([] if has_torch else ['--no-torch']))
  cnn_sweep.run_sweep(args, job=JOB, image_shape=(8, 8, 1), num_train=64)
  record = json.loads(path.read_text())
  rows = record['rows']
  assert [(r['step'], r['S'], r['steps']) for r in rows] == [
      ('standard', NUM_SEEDS, NUM_STEPS), ('pgd_at', NUM_SEEDS, 2)]
  assert record['setting']['step_kinds'] == ['standard', 'pgd_at']
  pgd = record['setting']['pgd_at']
  assert (pgd['steps'], pgd['at_steps'], pgd['at_norm'], pgd['random_start']) == (
      2, 3, 'linf', True)
  names = {'vmap', *(cnn_sweep.TORCH_TRAINERS if has_torch else ())}
  for r in rows:
    assert set(r['trainers']) == names
    assert r['flops_per_student_step'] == (
        record['setting']['flops_per_student_step']['exact'] if r['step'] == 'standard'
        else pgd['flops_per_student_step']['exact'])
    for v in r['trainers'].values():
      assert v['seconds'] > 0 and len(v['seconds_per_repeat']) == 1
      # The same start and batches: held-out losses agree (PGD-AT: random starts differ).
      np.testing.assert_allclose(v['heldout_loss'], r['trainers']['vmap']['heldout_loss'],
                                 rtol=1e-4 if r['step'] == 'standard' else 2e-2)
      assert v['heldout_loss'] != r['heldout_loss_init']
