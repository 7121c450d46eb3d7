"""The seed sweep's PyTorch trainers train what tsrobust trains (``benchmarks/seed_sweep.py``).

From the same initial students and the same fixed batches, the sequential
PyTorch loop, the hand-batched ensemble and the ``torch.func`` ensemble must
reach the same parameters as ``train.train_step`` (vmapped over seeds) on the
same students, within float32 tolerance. Each trainer's ``step`` is the
function its timed loop calls on freshly drawn inputs; here it gets fixed ones.

PyTorch is a benchmark-only dependency (``requirements-bench.txt``) that CI
does not install, so this module is skipped where ``torch`` is not importable
(``pytest.importorskip``, used only here for that reason); it runs wherever
the benchmarks can run.
"""

import jax
import numpy as np
import pytest

from benchmarks import seed_sweep
from benchmarks import setting
from tsrobust import models
from tsrobust import train

torch = pytest.importorskip('torch')

NUM_SEEDS = 3
NUM_STEPS = 4
TORCH_TRAINERS = {'seq-torch': seed_sweep.make_seq_torch,
                  'torch-batched': seed_sweep.make_torch_batched,
                  'torch-func': seed_sweep.make_torch_func}


@pytest.fixture(scope='module')
def problem():
  return setting.jax_problem(NUM_SEEDS)


@pytest.fixture(scope='module')
def batches(problem):
  """``[steps, seeds, B, d]`` fixed inputs ``s_i g P_i`` (numpy float32)."""
  c = problem.config
  g = np.random.default_rng(0).standard_normal((NUM_STEPS, NUM_SEEDS, c.batch_size, c.d))
  proj = np.asarray(problem.projector)
  scale = np.asarray(problem.data_args['scale'])[:, None, None]
  return np.stack([scale * np.einsum('sbd,sde->sbe', x, proj) for x in g]).astype(np.float32)


def _flax_layers(params, model):
  p = params['params']
  return [(np.asarray(p[n]['kernel']), np.asarray(p[n]['bias']))
          for n in models.layer_names(model)]


@pytest.fixture(scope='module')
def jax_trained(problem, batches):
  """The JAX students after ``train.train_step`` on each fixed batch in turn."""
  c = problem.config
  assert c.loss == 'mse' and c.optimizer == 'momentum'
  loss_fn = train.teacher_regression_loss(problem.student.apply, problem.teacher.apply, c.loss,
                                          lambda key, a, n: a['x'], c.batch_size)
  step = jax.jit(jax.vmap(lambda st, tp, x: train.train_step(
      loss_fn, problem.optimizer, st, tp, {'x': x}, jax.random.PRNGKey(0))[0]))
  state = problem.state
  for x in batches:
    state = step(state, problem.teacher_params, x)
  return state.params


def _train_torch(name, problem, batches, steps=NUM_STEPS):
  run = TORCH_TRAINERS[name](problem, NUM_SEEDS, 1000, 'cpu')
  state = run.init_state()
  for x in batches[:steps]:
    run.step(state, torch.from_numpy(x))
  return run, state


@pytest.mark.parametrize('name', sorted(TORCH_TRAINERS))
def test_torch_trainer_starts_from_the_jax_students(name, problem, batches):
  run, state = _train_torch(name, problem, batches, steps=0)
  for (k, b), (k0, b0) in zip(run.kernels(state),
                              _flax_layers(problem.state.params, problem.student)):
    np.testing.assert_array_equal(k, k0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize('name', sorted(TORCH_TRAINERS))
def test_torch_trainer_matches_jax_steps_on_fixed_batches(name, problem, batches, jax_trained):
  run, state = _train_torch(name, problem, batches)
  want = _flax_layers(jax_trained, problem.student)
  init = _flax_layers(problem.state.params, problem.student)
  for (k, b), (kw, bw), (k0, _) in zip(run.kernels(state), want, init):
    assert k.shape == kw.shape and b.shape == bw.shape
    # The students moved far more than the tolerance, so the comparison has teeth.
    assert np.abs(kw - k0).max() > 100 * 2e-6
    np.testing.assert_allclose(k, kw, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(b, bw, rtol=1e-5, atol=2e-6)
  # The held-out check's predictions are those of the trained students.
  x = batches[0, 1]
  np.testing.assert_allclose(
      run.predict(state, 1, x),
      np.asarray(problem.student.apply(setting.seed_slice(jax_trained, 1), x)[0]),
      rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize('name', ['torch-batched', 'torch-func'])
def test_batched_draw_is_each_students_lowrank_law(name, problem):
  c = problem.config
  torch.manual_seed(0)
  run = TORCH_TRAINERS[name](problem, NUM_SEEDS, 1000, 'cpu')
  x = np.stack([run.draw().numpy() for _ in range(20)], axis=1)  # [S, 20, B, d]
  assert x.shape == (NUM_SEEDS, 20, c.batch_size, c.d)
  for i in range(NUM_SEEDS):
    proj = np.asarray(problem.projector[i])
    xi = x[i].reshape(-1, c.d)
    np.testing.assert_allclose(xi @ proj, xi, atol=1e-4)  # in seed i's subspace
    # Var of s g P along the subspace: s^2 per dimension, so E|x|^2 = s^2 rank.
    s = float(problem.data_args['scale'][i])
    np.testing.assert_allclose(np.mean(np.sum(xi ** 2, -1)), s ** 2 * np.trace(proj), rtol=0.05)
