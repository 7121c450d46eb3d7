"""Data (bases, projectors, samplers, probes) and models (MLP, students, teachers)."""

import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsrobust import data
from tsrobust import models


class BasisTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((8, 1), (8, 3), (8, 8), (20, 5))
  def test_random_orthonormal(self, d, r):
    u = self.variant(lambda k: data.random_orthonormal(k, d, r))(jax.random.PRNGKey(0))
    self.assertEqual(u.shape, (d, r))
    np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-5)

  def test_random_orthonormal_depends_on_key(self):
    u0 = data.random_orthonormal(jax.random.PRNGKey(0), 6, 2)
    u1 = data.random_orthonormal(jax.random.PRNGKey(1), 6, 2)
    self.assertGreater(float(jnp.abs(u0 - u1).max()), 1e-2)

  def test_bad_rank_raises(self):
    key = jax.random.PRNGKey(0)
    for fn in (data.random_orthonormal, data.nested_basis):
      with pytest.raises(ValueError, match='r = 9'):
        fn(key, 8, 9)
      with pytest.raises(ValueError, match='r = 0'):
        fn(key, 8, 0)
    with pytest.raises(ValueError, match='r = 9'):
      data.energy_matched_scale(8, 9)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nested_basis(self):
    key = jax.random.PRNGKey(1)
    bases = [self.variant(lambda k, r=r: data.nested_basis(k, 8, r))(key) for r in (1, 3, 8)]
    for b, r in zip(bases, (1, 3, 8)):
      self.assertEqual(b.shape, (8, r))
      np.testing.assert_allclose(b.T @ b, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(bases[1][:, :1], bases[0], atol=1e-6)
    np.testing.assert_allclose(bases[2][:, :3], bases[1], atol=1e-6)
    # The rank-1 subspace lies inside the rank-3 one.
    p3, _ = data.projectors(bases[1])
    np.testing.assert_allclose(p3 @ bases[0], bases[0], atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 3, 8)
  def test_projectors(self, r):
    u = data.random_orthonormal(jax.random.PRNGKey(2), 8, r)
    p, p_perp = self.variant(data.projectors)(u)
    np.testing.assert_allclose(p + p_perp, np.eye(8), atol=1e-6)
    np.testing.assert_allclose(p @ p, p, atol=1e-5)
    np.testing.assert_allclose(p_perp @ p_perp, p_perp, atol=1e-5)
    np.testing.assert_allclose(p, p.T, atol=1e-6)
    np.testing.assert_allclose(p @ p_perp, 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.trace(p), r, atol=1e-5)
    np.testing.assert_allclose(p @ u, u, atol=1e-5)


class SamplerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_sample_lowrank(self):
    d, r, s, n = 8, 3, 1.5, 40000
    p, p_perp = data.projectors(data.random_orthonormal(jax.random.PRNGKey(3), d, r))
    x = self.variant(lambda k, p: data.sample_lowrank(k, p, n, s))(jax.random.PRNGKey(4), p)
    self.assertEqual(x.shape, (n, d))
    np.testing.assert_allclose(x @ p_perp, 0.0, atol=1e-5)
    cov = np.asarray(x, np.float64).T @ np.asarray(x, np.float64) / n
    np.testing.assert_allclose(cov, s ** 2 * np.asarray(p), atol=0.05 * s ** 2)
    # Full rank: isotropic Gaussian with std s.
    xf = data.sample_lowrank(jax.random.PRNGKey(5), jnp.eye(d), n, s)
    np.testing.assert_allclose(np.cov(np.asarray(xf), rowvar=False), s ** 2 * np.eye(d),
                               atol=0.05 * s ** 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sample_subspace_has_the_projector_samplers_law(self):
    d, r, s, n = 8, 3, 1.5, 40000
    u = data.random_orthonormal(jax.random.PRNGKey(3), d, r)
    p, p_perp = data.projectors(u)
    x = self.variant(lambda k, u: data.sample_subspace(k, u, n, s))(jax.random.PRNGKey(4), u)
    self.assertEqual(x.shape, (n, d))
    np.testing.assert_allclose(x @ p_perp, 0.0, atol=1e-5)
    cov = np.asarray(x, np.float64).T @ np.asarray(x, np.float64) / n
    np.testing.assert_allclose(cov, s ** 2 * np.asarray(p), atol=0.05 * s ** 2)
    # Coordinates in the basis are the r drawn normals: z = U^T x / s, N(0, I_r).
    z = np.asarray(x @ u, np.float64) / s
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(r), atol=0.03)

  def test_sample_subspace_known_answer(self):
    # x = s (U z)^T with z = normal(key, [r, n]): with U = the first r columns of I_d,
    # x's first r coordinates are s z^T and the rest are 0.
    d, r, n, s = 5, 2, 7, 0.5
    key = jax.random.PRNGKey(11)
    x = data.sample_subspace(key, jnp.eye(d)[:, :r], n, s)
    z = jax.random.normal(key, (r, n))
    np.testing.assert_allclose(x[:, :r], s * np.asarray(z).T, rtol=1e-6)
    np.testing.assert_array_equal(x[:, r:], 0.0)

  @parameterized.parameters(1, 2, 8)
  def test_energy_matched_scale(self, r):
    d, scale = 8, 0.7
    s = data.energy_matched_scale(d, r, scale)
    self.assertAlmostEqual(s, scale * math.sqrt(d / r), places=12)
    p, _ = data.projectors(data.random_orthonormal(jax.random.PRNGKey(6), d, r))
    x = data.sample_lowrank(jax.random.PRNGKey(7), p, 40000, s)
    energy = float((x * x).sum(1).mean())
    self.assertLess(abs(energy / (d * scale ** 2) - 1), 0.05)

  @chex.variants(with_jit=True, without_jit=True)
  def test_off_subspace_probe(self):
    d, r, n = 8, 3, 500
    p, p_perp = data.projectors(data.random_orthonormal(jax.random.PRNGKey(8), d, r))
    x = data.sample_lowrank(jax.random.PRNGKey(9), p, n)
    probe = self.variant(lambda k, x, q: data.off_subspace_probe(k, x, q, 2.0))(
        jax.random.PRNGKey(10), x, p_perp)
    self.assertEqual(probe.shape, (n, d))
    np.testing.assert_allclose(probe @ p, x @ p, atol=1e-5)
    off = probe - x
    np.testing.assert_allclose(off @ p, 0.0, atol=1e-5)
    # The complement part has per-direction variance scale^2 (d - r directions).
    energy = float((off * off).sum(1).mean())
    self.assertLess(abs(energy / (4.0 * (d - r)) - 1), 0.15)


class ModelTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mlp_shapes_and_activations(self):
    model = models.MLP((5, 4), 3)
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 6))
    params = model.init(jax.random.PRNGKey(1), x)
    out, acts = self.variant(model.apply)(params, x)
    self.assertEqual(out.shape, (7, 3))
    self.assertIsInstance(acts, tuple)
    self.assertLen(acts, 2)
    self.assertEqual(acts[0].shape, (7, 5))
    self.assertEqual(acts[1].shape, (7, 4))
    for a in acts:
      self.assertTrue(np.all(np.asarray(a) >= 0))
    # Activations and outputs follow the Dense layers by hand.
    p = params['params']
    h1 = jax.nn.relu(x @ p['hidden_0']['kernel'] + p['hidden_0']['bias'])
    h2 = jax.nn.relu(h1 @ p['hidden_1']['kernel'] + p['hidden_1']['bias'])
    np.testing.assert_allclose(acts[0], h1, atol=1e-5)
    np.testing.assert_allclose(acts[1], h2, atol=1e-5)
    np.testing.assert_allclose(out, h2 @ p['output']['kernel'] + p['output']['bias'],
                               atol=1e-5)
    self.assertEqual(models.layer_names(model), ('hidden_0', 'hidden_1', 'output'))

  def test_linear_model_has_no_activations(self):
    model = models.MLP((), 2)
    x = jnp.ones((3, 4))
    out, acts = model.apply(model.init(jax.random.PRNGKey(0), x), x)
    self.assertEqual(out.shape, (3, 2))
    self.assertEqual(acts, ())

  def test_student_of(self):
    teacher = models.MLP((5, 4), 3, use_bias=False)
    student = models.student_of(teacher, 3, init_scale=0.5)
    self.assertEqual(tuple(student.hidden_widths), (15, 12))
    self.assertEqual(student.out_dim, 3)
    self.assertFalse(student.use_bias)
    self.assertEqual(student.init_scale, 0.5)
    self.assertEqual(tuple(models.student_of(teacher, 1).hidden_widths), (5, 4))
    for bad in (0, -1, 1.5):
      with pytest.raises(ValueError, match='width_mult'):
        models.student_of(teacher, bad)
    with pytest.raises(ValueError, match='init_scale'):
      models.student_of(teacher, 2, init_scale=0.0)


class TeacherParamsTest(chex.TestCase):

  def test_unit_norm_columns_and_shapes(self):
    model = models.MLP((5, 4), 3)
    params = models.random_teacher_params(jax.random.PRNGKey(0), model, 6)
    ref = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 6)))
    chex.assert_trees_all_equal_shapes(params, ref)
    for name in models.layer_names(model):
      kernel = params['params'][name]['kernel']
      np.testing.assert_allclose(jnp.linalg.norm(kernel, axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(models.first_layer_kernel(params),
                                  params['params']['hidden_0']['kernel'])
    # Usable by the model.
    out, acts = model.apply(params, jnp.ones((2, 6)))
    self.assertEqual(out.shape, (2, 3))
    self.assertLen(acts, 2)

  def test_bias_scale(self):
    model = models.MLP((20000,), 1)
    params = models.random_teacher_params(jax.random.PRNGKey(2), model, 2, bias_scale=0.3)
    b = np.asarray(params['params']['hidden_0']['bias'])
    self.assertLess(abs(b.std() / 0.3 - 1), 0.03)
    self.assertLess(abs(b.mean()), 0.3 * 0.03)
    zero = models.random_teacher_params(jax.random.PRNGKey(2), model, 2, bias_scale=0.0)
    np.testing.assert_array_equal(zero['params']['hidden_0']['bias'], 0.0)

  def test_no_bias_model(self):
    model = models.MLP((5, 4), 3, use_bias=False)
    params = models.random_teacher_params(jax.random.PRNGKey(3), model, 6)
    for name in models.layer_names(model):
      self.assertEqual(set(params['params'][name]), {'kernel'})
    chex.assert_trees_all_equal_shapes(params, model.init(jax.random.PRNGKey(4),
                                                          jnp.zeros((1, 6))))

  def test_strength_decay(self):
    model = models.MLP((5, 4), 3)
    key = jax.random.PRNGKey(5)
    plain = models.random_teacher_params(key, model, 6)['params']
    decayed = models.random_teacher_params(key, model, 6, strength_decay=1.0)['params']
    # First layer and biases unchanged.
    np.testing.assert_allclose(decayed['hidden_0']['kernel'], plain['hidden_0']['kernel'],
                               atol=1e-7)
    for name in models.layer_names(model):
      np.testing.assert_array_equal(decayed[name]['bias'], plain[name]['bias'])
    # Row j of every later kernel (fan-out of hidden node j) scaled by 1 / (j + 1).
    for name, fan_in in (('hidden_1', 5), ('output', 4)):
      factor = 1.0 / np.arange(1, fan_in + 1)
      ratio = (np.linalg.norm(decayed[name]['kernel'], axis=1)
               / np.linalg.norm(plain[name]['kernel'], axis=1))
      np.testing.assert_allclose(ratio, factor, rtol=1e-5)
      np.testing.assert_allclose(decayed[name]['kernel'],
                                 plain[name]['kernel'] * factor[:, None], rtol=1e-5,
                                 atol=1e-7)

  def test_invalid_arguments_raise(self):
    model = models.MLP((3,), 2)
    with pytest.raises(ValueError, match='bias_scale'):
      models.random_teacher_params(jax.random.PRNGKey(0), model, 4, bias_scale=-0.1)
    with pytest.raises(ValueError, match='strength_decay'):
      models.random_teacher_params(jax.random.PRNGKey(0), model, 4, strength_decay=-1.0)


def test_surrogate_keeps_values_and_smooths_gradients():
  """``models.surrogate``: the same outputs; each ReLU differentiated as sigmoid(z / T)."""
  from tsrobust import cnn  # pylint: disable=g-import-not-at-top
  mlp = models.MLP((6,), 3)
  p = mlp.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
  smooth = models.surrogate(mlp, 0.3)
  np.testing.assert_array_equal(smooth.apply(p, x)[0], mlp.apply(p, x)[0])
  # One hidden layer: d out / d x = W1 diag(relu'(z)) W2, with relu' = sigmoid(z / T).
  w1, b1 = p['params']['hidden_0']['kernel'], p['params']['hidden_0']['bias']
  w2 = p['params']['output']['kernel']
  z = x[0] @ w1 + b1
  want = w1 @ (jax.nn.sigmoid(z / 0.3)[:, None] * w2)          # [4, 3]
  got = jax.jacobian(lambda v: smooth.apply(p, v[None])[0][0])(x[0]).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  exact = jax.jacobian(lambda v: mlp.apply(p, v[None])[0][0])(x[0]).T
  np.testing.assert_allclose(exact, w1 @ ((z > 0)[:, None] * w2), rtol=1e-5, atol=1e-6)
  assert models.surrogate(mlp, 0.0) == mlp
  net = cnn.make_cnn((3,), (4,), 2)
  cp = cnn.init_params(jax.random.PRNGKey(2), net, (6, 6, 1))
  xi = jax.random.uniform(jax.random.PRNGKey(3), (2, 6, 6, 1))
  smooth_cnn = models.surrogate(net, 0.1)
  np.testing.assert_array_equal(smooth_cnn.apply(cp, xi)[0], net.apply(cp, xi)[0])
  g = lambda m: jax.grad(lambda v: m.apply(cp, v)[0].sum())(xi)
  assert float(jnp.abs(g(smooth_cnn) - g(net)).max()) > 1e-4
  with pytest.raises(ValueError, match='grad_temperature'):
    models.surrogate(mlp, -1.0)
  with pytest.raises(ValueError, match='relu_grad_temperature'):
    models.surrogate(object(), 0.1)
