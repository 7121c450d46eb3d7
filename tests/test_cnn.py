"""CNN teachers and students: shapes, known-answer convolutions, conv specialization."""

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsrobust import cnn
from tsrobust import specialization
from tsrobust import sweep


class CNNTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_activation_shapes(self):
    model = cnn.make_cnn((3, 5), (7,), 4)
    params = cnn.init_params(jax.random.PRNGKey(0), model, (28, 28, 1))
    out, acts = self.variant(model.apply)(params, jnp.ones((2, 28, 28, 1)))
    chex.assert_shape(out, (2, 4))
    chex.assert_shape(list(acts), [(2, 28, 28, 3), (2, 14, 14, 5), (2, 7)])
    assert all(float(a.min()) >= 0.0 for a in acts)  # post-ReLU
    assert cnn.layer_names(model) == ('conv_0', 'conv_1', 'dense_0', 'output')
    assert cnn.hidden_widths(model) == (3, 5, 7)

  def test_shapes_without_pool_or_dense(self):
    model = cnn.make_cnn((2,), (), 3, pool='none', kernel_size=5)
    params = cnn.init_params(jax.random.PRNGKey(0), model, (9, 7, 3))
    out, acts = model.apply(params, jnp.ones((4, 9, 7, 3)))
    chex.assert_shape([out, acts[0]], [(4, 3), (4, 9, 7, 2)])
    # Odd sides are floored by the pool.
    model = cnn.make_cnn((2, 2), (), 3, pool='avg')
    params = cnn.init_params(jax.random.PRNGKey(0), model, (9, 7, 1))
    _, acts = model.apply(params, jnp.ones((1, 9, 7, 1)))
    chex.assert_shape(list(acts), [(1, 9, 7, 2), (1, 4, 3, 2)])

  def test_student_of(self):
    teacher = cnn.make_cnn((4, 8), (16,), 10, kernel_size=5, pool='avg', use_bias=False)
    student = cnn.student_of(teacher, 3, init_scale=0.5)
    assert student.conv_widths == (12, 24) and student.dense_widths == (48,)
    assert (student.out_dim, student.kernel_size, student.pool, student.use_bias,
            student.init_scale) == (10, 5, 'avg', False, 0.5)
    for bad in (0, 1.5, True):
      with pytest.raises(ValueError, match='width_mult must be an integer >= 1'):
        cnn.student_of(teacher, bad)

  def test_make_cnn_validates(self):
    with pytest.raises(ValueError, match='conv_widths must be a non-empty sequence'):
      cnn.make_cnn((), (4,), 10)
    with pytest.raises(ValueError, match=r'dense_widths must hold integers >= 1, got 0'):
      cnn.make_cnn((4,), (0,), 10)
    with pytest.raises(ValueError, match='pool must be one of'):
      cnn.make_cnn((4,), (), 10, pool='median')

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2, 3, 5)
  def test_im2col_conv_equals_lax_conv(self, k):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 6, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (k, k, 3, 4))
    want = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    got = self.variant(lambda v, u: cnn.im2col(v, k) @ u.reshape(-1, 4))(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  def test_vmapped_conv2d_equals_batched_im2col(self):
    """Known answer (issue 35): under vmap over students ``conv2d`` runs one student at a
    time; its outputs, input gradients and weight gradients are those of the batched
    im2col matmul it replaced, for a nested vmap and a shared (unmapped) kernel too."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 6, 4))   # [S, N, H, W, C]
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4, 5))   # [S, k, k, C, F]
    g = jax.random.normal(jax.random.PRNGKey(2), (3, 2, 5, 6, 5))

    def old(v, u):
      return cnn.im2col(v, 3) @ u.reshape(-1, 5)

    def loss(conv):
      return lambda v, u, t: jnp.sum(conv(v, u) * t)
    for conv in (cnn.conv2d, old):
      np.testing.assert_allclose(jax.jit(jax.vmap(conv))(x, w), jax.vmap(old)(x, w),
                                 rtol=1e-5, atol=1e-5)
    want = jax.vmap(jax.grad(loss(old), argnums=(0, 1)))(x, w, g)
    got = jax.jit(jax.vmap(jax.grad(loss(cnn.conv2d), argnums=(0, 1))))(x, w, g)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    shared = jax.jit(jax.vmap(jax.grad(loss(cnn.conv2d), argnums=(0, 1)),
                              in_axes=(0, None, 0)))(x, w[0], g)
    want = jax.vmap(jax.grad(loss(old), argnums=(0, 1)), in_axes=(0, None, 0))(x, w[0], g)
    for a, b in zip(shared, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    def summed(conv):  # a shared kernel's gradient summed over the mapped axis
      return lambda v, u: jnp.sum(jnp.sin(jax.vmap(conv, in_axes=(0, None))(v, u)))
    got = jax.jit(jax.grad(summed(cnn.conv2d), argnums=(0, 1)))(x, w[0])
    for a, b in zip(got, jax.grad(summed(old), argnums=(0, 1))(x, w[0])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    nested = jax.vmap(jax.vmap(cnn.conv2d))(x[:, None], w[:, None])[:, 0]
    np.testing.assert_allclose(nested, jax.vmap(old)(x, w), rtol=1e-5, atol=1e-5)

  def test_batched_conv_path_equals_and_has_second_derivatives(self):
    """``one_at_a_time=False`` (the GPU / TPU default) is the batched im2col matmul: the
    same values as the per-student path, and, unlike it, differentiable twice."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 6, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4, 5))
    batched = jax.vmap(lambda v, u: cnn.conv2d(v, u, one_at_a_time=False))(x, w)
    looped = jax.jit(jax.vmap(lambda v, u: cnn.conv2d(v, u, one_at_a_time=True)))(x, w)
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5)

    def curvature(one):  # d/dx of |d/dx sum(conv^2)|^2: a second derivative
      def grad_norm(v):
        g = jax.grad(lambda z: jnp.sum(cnn.conv2d(z, w[0], one_at_a_time=one) ** 2))(v)
        return jnp.sum(g ** 2)
      return jax.grad(grad_norm)(x[0])
    self.assertGreater(float(jnp.abs(curvature(False)).max()), 0.0)
    with self.assertRaises((TypeError, ValueError)):  # custom_vjp: no second derivative
      curvature(True)
    self.assertEqual(jax.default_backend(), 'cpu')  # so the default here is one at a time
    np.testing.assert_allclose(jax.jit(jax.vmap(cnn.conv2d))(x, w), batched, rtol=1e-5,
                               atol=1e-5)

  def test_seed_batching_vmap_keeps_the_batched_conv(self):
    """``--seed_batching=vmap`` (``sweep.set_seed_batching``) turns the per-student path off
    on a CPU too: the default conv is then the batched one, which has second derivatives."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 5))

    def curvature():
      grad_norm = lambda v: jnp.sum(jax.grad(lambda z: jnp.sum(cnn.conv2d(z, w) ** 2))(v) ** 2)
      return jax.grad(grad_norm)(x)
    self.assertEqual(sweep.default_seed_batching(), 'map')  # a CPU: one at a time
    with self.assertRaises((TypeError, ValueError)):
      curvature()
    sweep.set_seed_batching('vmap')
    try:
      self.assertEqual(sweep.default_seed_batching(), 'vmap')
      self.assertGreater(float(jnp.abs(curvature()).max()), 0.0)
    finally:
      sweep.set_seed_batching(None)
    self.assertEqual(sweep.default_seed_batching(), 'map')
    with self.assertRaisesRegex(ValueError, r"seed batching must be one of \('vmap', 'map'\)"):
      sweep.set_seed_batching('pmap')

  def test_vmapped_student_equals_per_student_apply(self):
    """The vmapped student (outputs, input and weight gradients) equals each student's
    own apply, on random weights."""
    model = cnn.make_cnn((4, 6), (8,), 3)
    params = jax.vmap(lambda k: cnn.init_params(k, model, (8, 8, 2)))(
        jax.random.split(jax.random.PRNGKey(0), 3))
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 2, 8, 8, 2))

    def loss(p, v):
      return jnp.sum(model.apply(p, v)[0] ** 2)
    out = jax.jit(jax.vmap(lambda p, v: model.apply(p, v)[0]))(params, x)
    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(params, x)
    for i in range(3):
      p_i = jax.tree_util.tree_map(lambda a, i=i: a[i], params)
      np.testing.assert_allclose(out[i], model.apply(p_i, x[i])[0], rtol=1e-5, atol=1e-6)
      want = jax.grad(loss, argnums=(0, 1))(p_i, x[i])
      got = jax.tree_util.tree_map(lambda a, i=i: a[i], grads)
      for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  def test_conv_layer_matches_flax_conv(self):
    model = cnn.make_cnn((4,), (), 2, pool='none')
    params = cnn.init_params(jax.random.PRNGKey(0), model, (6, 6, 2))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 6, 2))
    ref = nn.Conv(4, (3, 3), padding='SAME')
    want = ref.apply({'params': params['params']['conv_0']}, x)
    _, acts = model.apply(params, x)
    np.testing.assert_allclose(acts[0], jax.nn.relu(want), rtol=1e-5, atol=1e-5)

  @parameterized.parameters('max', 'avg')
  def test_pool_equals_flax(self, kind):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 8, 3))
    ref = nn.max_pool if kind == 'max' else nn.avg_pool
    np.testing.assert_allclose(cnn.pool2x2(x, kind), ref(x, (2, 2), strides=(2, 2)),
                               rtol=1e-6)


def _embed(teacher_params, student_params, teacher, image_hw):
  """Student parameters equal to the teacher's in its first channels / units, 0 elsewhere.

  The extra student nodes are then constant 0 (dead), and student node j of
  every layer reproduces teacher node j: the student computes the teacher.
  """
  # numpy, not eager jnp .at[].set: each of those compiles a scatter.
  tp = jax.tree_util.tree_map(np.asarray, teacher_params['params'])
  sp = jax.tree_util.tree_map(lambda v: np.zeros(v.shape, np.float32), student_params['params'])
  out = {}
  h, w = image_hw
  n_conv = len(teacher.conv_widths)
  for name, layer in tp.items():
    new = dict(sp[name])
    kern = layer['kernel']
    if name.startswith('conv'):
      new['kernel'][:, :, :kern.shape[2], :kern.shape[3]] = kern
    elif name in ('dense_0', 'output') and (name == 'dense_0' or not teacher.dense_widths):
      # Rows of the first Dense kernel follow the flattened [H', W', C] layout.
      hh, ww = h // 2 ** n_conv, w // 2 ** n_conv
      c_t, c_s = teacher.conv_widths[-1], new['kernel'].shape[0] // (hh * ww)
      k4 = new['kernel'].reshape(hh, ww, c_s, -1)
      k4[:, :, :c_t, :kern.shape[1]] = kern.reshape(hh, ww, c_t, -1)
      new['kernel'] = k4.reshape(hh * ww * c_s, -1)
    else:
      new['kernel'][:kern.shape[0], :kern.shape[1]] = kern
    new['bias'][:layer['bias'].shape[0]] = layer['bias']
    out[name] = new
  return {'params': out}


class ConvSpecializationTest(chex.TestCase):

  def test_correlation_over_samples_and_positions(self):
    a = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 4, 2))
    noise = jax.random.normal(jax.random.PRNGKey(1), (6, 5, 4))
    b = jnp.stack([3.0 * a[..., 0] + 1.0, -a[..., 1], noise], axis=-1)
    rho = specialization.correlation_matrix(a, b)
    chex.assert_shape(rho, (2, 3))
    np.testing.assert_allclose(rho[0, 0], 1.0, atol=1e-5)
    np.testing.assert_allclose(rho[1, 1], -1.0, atol=1e-5)
    rows_a, rows_b = np.asarray(a).reshape(-1, 2), np.asarray(b).reshape(-1, 3)
    want = np.corrcoef(rows_a.T, rows_b.T)[:2, 2:]
    np.testing.assert_allclose(rho, want, atol=1e-5)

  def test_embedded_teacher_is_fully_specialized(self):
    teacher = cnn.make_cnn((3, 4), (5,), 3)
    student = cnn.student_of(teacher, 2)
    tp = cnn.init_params(jax.random.PRNGKey(0), teacher, (8, 8, 1))
    tp = jax.tree_util.tree_map(lambda v: v + 0.1, tp)  # nonzero biases: fewer dead nodes
    sp = _embed(tp, cnn.init_params(jax.random.PRNGKey(1), student, (8, 8, 1)), teacher, (8, 8))
    x = jax.random.uniform(jax.random.PRNGKey(2), (64, 8, 8, 1))
    np.testing.assert_allclose(jax.jit(student.apply)(sp, x)[0], jax.jit(teacher.apply)(tp, x)[0],
                               atol=1e-4)
    layer_stats = jax.jit(lambda tp, sp, x: specialization.network_stats(
        teacher.apply, student.apply, tp, sp, x, 16))(tp, sp, x)
    for s in layer_stats:
      summary = specialization.summarize(s)
      alive = np.asarray(summary.alive)
      np.testing.assert_allclose(np.asarray(summary.max_corr)[alive], 1.0, atol=1e-4)
      np.testing.assert_array_equal(np.asarray(summary.best_student)[alive],
                                    np.flatnonzero(alive))
    # Conv statistics count samples x positions.
    assert float(layer_stats[0].count) == 64 * 8 * 8
    assert float(layer_stats[1].count) == 64 * 4 * 4
    assert float(layer_stats[2].count) == 64
