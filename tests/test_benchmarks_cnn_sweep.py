"""The CNN sweep's trainers train what tsrobust trains (``benchmarks/cnn_sweep.py``).

On a tiny CNN (conv (2, 3), dense (4,), students twice as wide, 8 x 8 random images):
the batches PyTorch is given are those tsrobust's chunk draws, and from the same initial
students every PyTorch trainer reaches the JAX students' outputs and held-out loss;
after 0 steps every trainer's loss is the JAX loss at the initial weights (a known
answer). PyTorch is a benchmark-only dependency (``requirements-bench.txt``) that CI
does not install: the tests that need it are skipped without it
(``pytest.importorskip``, as ``tests/test_benchmarks_seed_sweep.py``); the JAX part runs.
"""

import dataclasses

import jax
import numpy as np
import pytest

from benchmarks import cnn_sweep
from benchmarks import setting
from tsrobust import train

NUM_SEEDS = 2
NUM_STEPS = 3
JOB = dataclasses.replace(setting.ImageJob(), teacher_conv=(2, 3), teacher_dense=(4,))


def _has_torch() -> bool:
  try:
    import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


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
