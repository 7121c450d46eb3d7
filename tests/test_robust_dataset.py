"""Robust-feature datasets: starting points, representation matching, paired loss."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from tsrobust import cnn
from tsrobust import robust_dataset
from tsrobust import sweep
from tsrobust import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
  model = cnn.make_cnn((4,), (8,), 3)
  return model, cnn.init_params(jax.random.PRNGKey(0), model, (6, 6, 1))


class RobustDatasetTest(chex.TestCase):

  def test_penultimate(self):
    model, params = _model()
    x = jax.random.uniform(jax.random.PRNGKey(1), (5, 6, 6, 1))
    rep = robust_dataset.penultimate(model.apply, params)(x)
    np.testing.assert_allclose(rep, model.apply(params, x)[1][-1])
    conv_only = cnn.make_cnn((4,), (), 3)
    p2 = cnn.init_params(jax.random.PRNGKey(0), conv_only, (6, 6, 1))
    chex.assert_shape(robust_dataset.penultimate(conv_only.apply, p2)(x), (5, 6 * 6 * 4))

  def test_starting_points(self):
    x = jnp.arange(7.0).reshape(7, 1, 1, 1)
    x0 = robust_dataset.starting_points(jax.random.PRNGKey(0), x)
    assert sorted(np.asarray(x0).ravel().tolist()) == list(range(7))  # a permutation
    assert (np.asarray(x0) != np.asarray(x)).all()                     # no image starts at itself
    noise = robust_dataset.starting_points(jax.random.PRNGKey(0), x, 'noise', (0.2, 0.4))
    assert float(noise.min()) >= 0.2 and float(noise.max()) <= 0.4
    with pytest.raises(ValueError, match='start must be one of'):
      robust_dataset.starting_points(jax.random.PRNGKey(0), x, 'zeros')
    with pytest.raises(ValueError, match='at least 2 examples'):
      robust_dataset.starting_points(jax.random.PRNGKey(0), x[:1])

  @chex.variants(with_jit=True, without_jit=True)
  def test_matching_lowers_the_representation_distance(self):
    model, params = _model()
    rep = robust_dataset.penultimate(model.apply, params)
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 6, 6, 1))
    x0 = robust_dataset.starting_points(jax.random.PRNGKey(2), x)
    target = rep(x)
    x_r = self.variant(lambda a: robust_dataset.match_representation(
        rep, a, target, steps=40, step_size=0.05))(x0)
    before = robust_dataset.representation_distance(rep, x0, target)
    after = robust_dataset.representation_distance(rep, x_r, target)
    assert float(after.mean()) < 0.5 * float(before.mean())
    assert float(x_r.min()) >= 0.0 and float(x_r.max()) <= 1.0
    # Each step moves every image by at most step_size in L2.
    moved = jnp.sqrt(((x_r - x0) ** 2).reshape(16, -1).sum(-1))
    assert float(moved.max()) <= 40 * 0.05 + 1e-4

  def test_zero_steps_is_identity(self):
    model, params = _model()
    rep = robust_dataset.penultimate(model.apply, params)
    x0 = jax.random.uniform(jax.random.PRNGKey(1), (3, 6, 6, 1))
    out = robust_dataset.match_representation(rep, x0, rep(x0), steps=0, step_size=0.1)
    np.testing.assert_array_equal(out, x0)

  def test_batched_equals_one_batch(self):
    model, params = _model()
    rep = robust_dataset.penultimate(model.apply, params)
    x = jax.random.uniform(jax.random.PRNGKey(1), (7, 6, 6, 1))
    kw = dict(steps=5, step_size=0.1)
    one, x0 = robust_dataset.robust_feature_dataset(rep, x, jax.random.PRNGKey(3), **kw)
    batched, x0b = jax.jit(lambda v: robust_dataset.robust_feature_dataset(
        rep, v, jax.random.PRNGKey(3), batch_size=3, **kw))(x)  # 3 batches, the last padded
    chex.assert_shape([one, batched], [(7, 6, 6, 1)] * 2)
    np.testing.assert_array_equal(x0, x0b)
    np.testing.assert_allclose(one, batched, atol=1e-5)

  def test_paired_regression_loss(self):
    model, params = _model()
    x = jax.random.uniform(jax.random.PRNGKey(1), (10, 6, 6, 1))
    loss_fn = robust_dataset.paired_regression_loss(model.apply, model.apply, 'mse', 4)
    key = jax.random.PRNGKey(5)
    # Student = teacher and x_r = x: zero loss.
    assert float(loss_fn(params, params, {'robust_x': x, 'train_x': x}, key)) == 0.0
    # Otherwise: the student at x_r[i] against the teacher at x[i].
    xr = x[::-1]
    idx = jax.random.randint(key, (4,), 0, 10)
    want = train.teacher_loss(model.apply(params, xr[idx])[0], model.apply(params, x[idx])[0],
                              'mse')
    np.testing.assert_allclose(loss_fn(params, params, {'robust_x': xr, 'train_x': x}, key),
                               want, rtol=1e-6)
    with pytest.raises(ValueError, match='loss must be one of'):
      robust_dataset.paired_regression_loss(model.apply, model.apply, 'l1', 4)


class PairingTest(chex.TestCase):
  """``x_r[i]`` stays paired with ``x[i]`` through batching and padding.

  The representation is the image itself (``g(x) = x``, flattened): matching
  then moves ``x_r[i]`` straight towards ``x[i]`` by steps of L2 length 0.05
  (0.025 per pixel), so with enough steps ``x_r[i]`` ends within a step of
  ``x[i]``, while the other images are at least 0.1 per pixel away - any
  mix-up of examples across batches or with the padding shows.
  """

  def _data(self, n=7):
    # Distinct images: image i is the constant (i + 1) / 10.
    return jnp.broadcast_to((jnp.arange(n, dtype=jnp.float32)[:, None, None, None] + 1) / 10,
                            (n, 2, 2, 1))

  def test_identity_representation_recovers_each_target(self):
    x = self._data()
    rep = lambda v: v.reshape(v.shape[0], -1)
    for batch_size in (None, 3, 7, 10):  # 3: 3 batches, the last padded by 2
      x_r, x0 = robust_dataset.robust_feature_dataset(rep, x, jax.random.PRNGKey(0), steps=30,
                                                      step_size=0.05, batch_size=batch_size)
      assert not np.allclose(x0, x)  # each started from another image
      np.testing.assert_allclose(x_r, x, atol=0.025 + 1e-5, err_msg=str(batch_size))
      nearest = np.abs(np.asarray(x_r)[:, None] - np.asarray(x)[None]).max((2, 3, 4)).argmin(1)
      np.testing.assert_array_equal(nearest, np.arange(7))

  def test_progress_path_equals_the_traced_path(self):
    x = self._data()
    rep = lambda v: (v.reshape(v.shape[0], -1) ** 2)  # a nonlinear, per-example representation
    reports = []
    kw = dict(steps=4, step_size=0.1, batch_size=3)
    traced, x0 = robust_dataset.robust_feature_dataset(rep, x, jax.random.PRNGKey(1), **kw)
    looped, x0l = robust_dataset.robust_feature_dataset(rep, x, jax.random.PRNGKey(1),
                                                        on_batch=reports.append, **kw)
    np.testing.assert_array_equal(x0, x0l)
    np.testing.assert_allclose(looped, traced, atol=1e-6)
    assert [r['step'] for r in reports] == [3, 6, 7]
    assert all(r['num_steps'] == 7 for r in reports)
    # The last report is the mean distance of the last batch's one real image, not the padding.
    want = robust_dataset.representation_distance(rep, looped[6:], rep(x[6:]))
    np.testing.assert_allclose(reports[-1]['loss'], float(want[0]), rtol=1e-5)

  def test_matching_report_known_values(self):
    rep = lambda v: v.reshape(v.shape[0], -1)
    x = jnp.array([[[[3.0]], [[4.0]]], [[[0.0]], [[1.0]]]])  # representations (3, 4), (0, 1)
    x0 = jnp.zeros_like(x)
    x_r = x + jnp.array([0.5, 0.0])[:, None, None, None]
    report = robust_dataset.matching_report(rep, x, x_r, x0)
    # start: |(3,4)| = 5 and |(0,1)| = 1; end: 0.5 * sqrt(2) and 0; norm: (5 + 1) / 2.
    np.testing.assert_allclose(report['rep_distance_start'], 3.0, rtol=1e-6)
    np.testing.assert_allclose(report['rep_distance_end'], 0.25 * np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(report['rep_norm'], 3.0, rtol=1e-6)


def test_mesh_of_the_session_devices():
  """Matches spread over a mesh of the session's devices = on one device, both paths.

  ``batch_size=3`` is rounded up to a multiple of the device count, which the
  progress reports show; the identity representation's known answer (each
  ``x_r[i]`` ends within a step of ``x[i]``) shows the pairing survives the
  layout and the padding. ``test_mesh_of_two_cpu_devices`` runs it on 2 devices.
  """
  num_devices = jax.device_count()
  model, params = _model()
  rep = robust_dataset.penultimate(model.apply, params)
  x = jax.random.uniform(jax.random.PRNGKey(1), (7, 6, 6, 1))
  mesh = sweep.seed_mesh()
  kw = dict(steps=5, step_size=0.1, batch_size=3)
  ref, x0 = robust_dataset.robust_feature_dataset(rep, x, jax.random.PRNGKey(3), **kw)
  reports = []
  looped, x0l = robust_dataset.robust_feature_dataset(
      rep, x, jax.random.PRNGKey(3), on_batch=reports.append, mesh=mesh, **kw)
  traced, _ = jax.jit(lambda v: robust_dataset.robust_feature_dataset(
      rep, v, jax.random.PRNGKey(3), mesh=mesh, **kw))(x)
  batch = -(-3 // num_devices) * num_devices
  assert [r['step'] for r in reports] == list(range(batch, 7, batch)) + [7]
  np.testing.assert_array_equal(x0, x0l)
  chex.assert_shape([looped, traced], [(7, 6, 6, 1)] * 2)
  np.testing.assert_allclose(looped, ref, atol=1e-5)
  np.testing.assert_allclose(traced, ref, atol=1e-5)

  ident = lambda v: v.reshape(v.shape[0], -1)
  targets = jnp.broadcast_to((jnp.arange(7, dtype=jnp.float32)[:, None, None, None] + 1) / 10,
                             (7, 2, 2, 1))
  x_r, _ = robust_dataset.robust_feature_dataset(ident, targets, jax.random.PRNGKey(0), steps=30,
                                                 step_size=0.05, batch_size=3,
                                                 on_batch=lambda r: None, mesh=mesh)
  np.testing.assert_allclose(x_r, targets, atol=0.025 + 1e-5)

  flat = Mesh(np.asarray(jax.devices()).reshape(1, -1), ('a', 'b'))
  with pytest.raises(ValueError, match='mesh must be 1-D'):
    robust_dataset.robust_feature_dataset(rep, x, jax.random.PRNGKey(3), mesh=flat, **kw)


def test_mesh_of_two_cpu_devices():
  """The same test with the batches really split, over 2 CPU devices (a subprocess)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu')
  code = ('import jax; from tests import test_robust_dataset as t; '
          'print(jax.device_count()); t.test_mesh_of_the_session_devices(); print("ok")')
  done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ['2', 'ok'], done.stdout
