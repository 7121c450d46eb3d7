"""Data every seed reads, passed once (``train_seeds(shared_args=...)``), not copied per seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import real
from experiments.configs import real as real_config
from tsrobust import models
from tsrobust import sweep
from tsrobust import train

S, D, N = 4, 5, 64


def _setup():
  teacher = models.MLP((3,), 2)
  student = models.student_of(teacher, 2)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  tparams = jax.vmap(lambda k: models.random_teacher_params(k, teacher, in_dim=D))(
      jax.random.split(keys[0], S))
  params = jax.vmap(lambda k: student.init(k, jnp.zeros((1, D))))(jax.random.split(keys[1], S))
  opt = train.make_optimizer('momentum', 0.05)
  state = jax.vmap(lambda p: train.init_state(p, opt))(params)
  train_x = jax.random.normal(keys[2], (N, D))

  def sample(key, args, n):  # a minibatch of the training set, scaled per seed
    return args['scale'] * args['train_x'][jax.random.randint(key, (n,), 0, N)]
  loss_fn = train.teacher_regression_loss(student.apply, teacher.apply, 'mse', sample, 16)
  return loss_fn, opt, state, tparams, train_x, jax.random.split(keys[3], S)


def test_shared_args_equal_per_seed_copies():
  loss_fn, opt, state, tparams, train_x, keys = _setup()
  scale = jnp.array([1.0, 0.5, 2.0, 1.5])
  copied, loss_c = train.train_seeds(
      loss_fn, opt, state, tparams, {'scale': scale, 'train_x': jnp.broadcast_to(
          train_x, (S, N, D))}, keys, num_steps=30, chunk_steps=10)
  shared, loss_s = train.train_seeds(loss_fn, opt, state, tparams, {'scale': scale}, keys,
                                     num_steps=30, chunk_steps=10,
                                     shared_args={'train_x': train_x})
  np.testing.assert_allclose(loss_s, loss_c, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(shared.params),
                  jax.tree_util.tree_leaves(copied.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert loss_s[:, -1].mean() < loss_s[:, 0].mean()  # it trained


def test_shared_args_on_the_device_mesh():
  """Seeds laid over the mesh with replicated shared data (the binaries' path) = no mesh.

  The mesh holds the test session's devices (one unless XLA_FLAGS asks for
  more); the binaries' 2-device runs go through the same calls.
  """
  loss_fn, opt, state, tparams, train_x, keys = _setup()
  args = {'scale': jnp.ones((S,))}
  mesh = sweep.seed_mesh()
  ref, _ = train.train_seeds(loss_fn, opt, state, tparams, args, keys, num_steps=10,
                             chunk_steps=10, shared_args={'train_x': train_x})
  out, _ = train.train_seeds(loss_fn, opt, *sweep.shard_seeds((state, tparams, args, keys), mesh),
                             num_steps=10, chunk_steps=10,
                             shared_args=sweep.replicate({'train_x': train_x}, mesh))
  for a, b in zip(jax.tree_util.tree_leaves(sweep.to_host(out.params)),
                  jax.tree_util.tree_leaves(ref.params)):
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6)


def test_shared_args_bad_input():
  loss_fn, opt, state, tparams, train_x, keys = _setup()
  with pytest.raises(ValueError, match='both hold'):
    train.train_seeds(loss_fn, opt, state, tparams, {'train_x': jnp.zeros((S, N, D))}, keys,
                      num_steps=1, chunk_steps=1, shared_args={'train_x': train_x})
  with pytest.raises(ValueError, match='must be dicts'):
    train.train_seeds(loss_fn, opt, state, tparams, jnp.ones((S,)), keys, num_steps=1,
                      chunk_steps=1, shared_args={'train_x': train_x})


def test_real_method_args_share_the_images():
  """The image binary passes images, robust features and the projector once, not per student."""
  config = real_config.get_config()
  method_args = real.method_args
  x = np.zeros((10, 4, 4, 1), np.float32)
  proj = np.eye(16, dtype=np.float32)
  points = [('at', {'at_eps': 0.1}), ('at', {'at_eps': 0.3})]
  args, shared = method_args(config, points, 3, x, None, None)
  assert set(shared) == {'train_x'} and shared['train_x'].shape == x.shape
  np.testing.assert_allclose(args['at_eps'], [0.1] * 3 + [0.3] * 3, rtol=1e-6)
  args, shared = method_args(config, [('robust_features', {})], 3, x, x + 1, None)
  assert args == {} and shared['robust_x'].shape == x.shape
  args, shared = method_args(config, [('orth', {'aug_scale': 0.5})], 3, x, None, proj)
  assert shared['projector'].shape == (16, 16) and args['aug_scale'].shape == (3,)
