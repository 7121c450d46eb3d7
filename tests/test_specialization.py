"""Specialization: correlations, streaming statistics, summaries, weight alignment."""

import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsrobust import models
from tsrobust import specialization as spec

# Two zero-mean, orthogonal, equal-norm patterns over 4 rows (|u|^2 = |v|^2 = 4).
U4 = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
V4 = np.array([1.0, 1.0, -1.0, -1.0], np.float32)


def _stats_close(s1, s2, rtol=1e-5, atol=1e-5):
  for a, b in zip(s1, s2):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


class CorrelationMatrixTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_identical_activations_have_unit_diagonal(self):
    a = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    rho = self.variant(spec.correlation_matrix)(a, a)
    self.assertEqual(rho.shape, (5, 5))
    np.testing.assert_allclose(np.diag(rho), 1.0, atol=1e-5)
    # Symmetric, and bounded by 1 in absolute value.
    np.testing.assert_allclose(rho, rho.T, atol=1e-6)
    self.assertLessEqual(float(jnp.abs(rho).max()), 1.0 + 1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_affine_maps(self):
    a = np.random.default_rng(1).normal(size=(300, 3)).astype(np.float32)
    corr = self.variant(spec.correlation_matrix)
    np.testing.assert_allclose(np.diag(corr(a, 3.0 * a + 2.0)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.diag(corr(a, -a)), -1.0, atol=1e-5)
    np.testing.assert_allclose(np.diag(corr(a, -0.5 * a + 7.0)), -1.0, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_independent_columns_are_uncorrelated(self):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20000, 3)).astype(np.float32)
    b = rng.normal(size=(20000, 4)).astype(np.float32)
    rho = self.variant(spec.correlation_matrix)(a, b)
    self.assertEqual(rho.shape, (3, 4))
    self.assertLess(float(jnp.abs(rho).max()), 0.05)

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_corrcoef(self):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(500, 4)).astype(np.float32)
    # Correlated with a, with offsets and different scales.
    b = (a @ rng.normal(size=(4, 6)) + 0.5 * rng.normal(size=(500, 6)) + 3.0).astype(np.float32)
    rho = self.variant(spec.correlation_matrix)(a, b)
    expected = np.corrcoef(a.astype(np.float64), b.astype(np.float64), rowvar=False)[:4, 4:]
    np.testing.assert_allclose(rho, expected, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_conv_pools_samples_and_positions(self):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(6, 3, 2, 4)).astype(np.float32)
    b = rng.normal(size=(6, 3, 2, 5)).astype(np.float32)
    rho = self.variant(spec.correlation_matrix)(a, b)
    expected = np.corrcoef(a.reshape(-1, 4).astype(np.float64),
                           b.reshape(-1, 5).astype(np.float64), rowvar=False)[:4, 4:]
    np.testing.assert_allclose(rho, expected, atol=1e-5)

  def test_bad_rank_raises(self):
    with pytest.raises(ValueError, match='activations must be'):
      spec.correlation_matrix(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)))


class SummarizeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_built_exact_case(self):
    # Teacher [u, 2u + 1, u + 2v, const], student [u, -u, v].
    teacher = np.stack([U4, 2 * U4 + 1, U4 + 2 * V4, np.full(4, 5.0, np.float32)], 1)
    student = np.stack([U4, -U4, V4], 1)
    s = self.variant(lambda a, b: spec.summarize(spec.batch_stats(a, b), tau=0.9))(
        teacher, student)
    c = 2 / math.sqrt(5)  # corr(u + 2v, v) = 8 / (sqrt(20) * 2).
    np.testing.assert_array_equal(s.alive, [True, True, True, False])
    self.assertEqual(int(s.num_dead), 1)
    np.testing.assert_allclose(s.max_corr[:3], [1.0, 1.0, c], atol=1e-6)
    self.assertTrue(np.isnan(s.max_corr[3]))
    np.testing.assert_array_equal(s.best_student[:3], [0, 0, 2])
    np.testing.assert_allclose(s.mean_max_corr, (2 + c) / 3, atol=1e-6)
    np.testing.assert_allclose(s.frac_specialized, 2 / 3, atol=1e-6)
    # c = 0.894 < 0.9 <= 1; a lower threshold specializes all alive nodes.
    s85 = spec.summarize(spec.batch_stats(teacher, student), tau=0.85)
    np.testing.assert_allclose(s85.frac_specialized, 1.0, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dead_teacher_node_is_excluded(self):
    rng = np.random.default_rng(5)
    x = rng.normal(size=2000).astype(np.float32)
    noise = rng.normal(size=2000).astype(np.float32)
    teacher = np.stack([x, 2 * x + 1, np.full_like(x, 0.3)], 1)
    student = np.stack([x, -x, noise], 1)
    s = self.variant(lambda a, b: spec.summarize(spec.batch_stats(a, b)))(teacher, student)
    np.testing.assert_array_equal(s.alive, [True, True, False])
    self.assertEqual(int(s.num_dead), 1)
    np.testing.assert_allclose(s.max_corr[:2], 1.0, atol=1e-5)
    self.assertTrue(np.isnan(s.max_corr[2]))
    np.testing.assert_allclose(s.mean_max_corr, 1.0, atol=1e-5)
    np.testing.assert_allclose(s.frac_specialized, 1.0)
    np.testing.assert_array_equal(s.best_student[:2], [0, 0])

  def test_all_dead_gives_nan(self):
    teacher = np.ones((10, 2), np.float32)
    student = np.random.default_rng(6).normal(size=(10, 3)).astype(np.float32)
    s = spec.summarize(spec.batch_stats(teacher, student))
    self.assertEqual(int(s.num_dead), 2)
    self.assertTrue(np.isnan(s.mean_max_corr))
    self.assertTrue(np.isnan(s.frac_specialized))


class StreamingTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('dense', (50,), 3, 4),
      ('conv', (50, 3, 2), 2, 5),
  )
  def test_uneven_chunks_equal_one_shot(self, lead, j, k):
    rng = np.random.default_rng(7)
    a = (rng.normal(size=lead + (j,)) + 4.0).astype(np.float32)
    b = (a[..., :1] * rng.normal(size=(k,)) + rng.normal(size=lead + (k,)) - 2.0
         ).astype(np.float32)
    one_shot = spec.batch_stats(a, b)

    def streamed(a, b):
      s = spec.empty_stats(j, k)
      for lo, hi in [(0, 7), (7, 20), (20, 21), (21, 50)]:
        s = spec.merge_stats(s, spec.batch_stats(a[lo:hi], b[lo:hi]))
      return s
    s = self.variant(streamed)(a, b)
    _stats_close(s, one_shot, rtol=1e-5, atol=1e-4)
    self.assertEqual(float(s.count), float(np.prod(lead)))
    np.testing.assert_allclose(spec.correlation_from_stats(s),
                               spec.correlation_matrix(a, b), atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_empty_is_identity(self):
    rng = np.random.default_rng(8)
    s = spec.batch_stats(rng.normal(size=(9, 2)).astype(np.float32),
                         rng.normal(size=(9, 3)).astype(np.float32))
    merge = self.variant(spec.merge_stats)
    e = spec.empty_stats(2, 3)
    _stats_close(merge(e, s), s, rtol=1e-6, atol=1e-6)
    _stats_close(merge(s, e), s, rtol=1e-6, atol=1e-6)
    _stats_close(merge(e, e), e, rtol=0, atol=0)

  @parameterized.named_parameters(('dense', False), ('conv', True))
  def test_network_stats_batched_equals_one_shot(self, conv):
    rng = np.random.default_rng(9)
    shape = (24, 2, 3, 4) if conv else (24, 4)
    x = rng.normal(size=shape).astype(np.float32)

    def apply(params, xb):
      h1 = jax.nn.relu(xb @ params['w1'] + 0.3)
      h2 = jax.nn.relu(h1 @ params['w2'] - 0.1)
      return h2.sum(-1), (h1, h2)

    tp = {'w1': rng.normal(size=(4, 3)).astype(np.float32),
          'w2': rng.normal(size=(3, 2)).astype(np.float32)}
    sp = {'w1': rng.normal(size=(4, 5)).astype(np.float32),
          'w2': rng.normal(size=(5, 4)).astype(np.float32)}
    one = spec.network_stats(apply, apply, tp, sp, x)
    batched = jax.jit(lambda x: spec.network_stats(apply, apply, tp, sp, x, batch_size=6))(x)
    self.assertLen(one, 2)
    self.assertLen(batched, 2)
    _, (ht1, ht2) = apply(tp, x)
    _, (hs1, hs2) = apply(sp, x)
    direct = (spec.batch_stats(ht1, hs1), spec.batch_stats(ht2, hs2))
    for s_one, s_b, s_d in zip(one, batched, direct):
      _stats_close(s_one, s_d)
      _stats_close(s_b, s_d, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(spec.correlation_from_stats(s_b),
                                 spec.correlation_from_stats(s_d), atol=1e-5)
    self.assertEqual(batched[1].cross.shape, (2, 4))
    with pytest.raises(ValueError, match='batch_size must divide'):
      spec.network_stats(apply, apply, tp, sp, x, batch_size=5)


class NetworkSpecializationTest(chex.TestCase):

  def _teacher(self):
    teacher = models.MLP((4, 3), 2)
    tparams = models.random_teacher_params(jax.random.PRNGKey(0), teacher, 5)
    x = jax.random.normal(jax.random.PRNGKey(1), (400, 5))
    return teacher, tparams, x

  def test_teacher_against_itself(self):
    teacher, tparams, x = self._teacher()
    stats = spec.network_stats(teacher.apply, teacher.apply, tparams, tparams, x,
                               batch_size=100)
    self.assertLen(stats, 2)
    for layer, width in zip(stats, (4, 3)):
      self.assertEqual(layer.cross.shape, (width, width))
      s = spec.summarize(layer)
      alive = np.asarray(s.alive)
      self.assertGreater(alive.sum(), 0)
      np.testing.assert_allclose(s.mean_max_corr, 1.0, atol=1e-4)
      np.testing.assert_allclose(s.frac_specialized, 1.0)
      np.testing.assert_array_equal(np.asarray(s.best_student)[alive],
                                    np.arange(width)[alive])
      rho = spec.correlation_from_stats(layer)
      np.testing.assert_allclose(np.diag(rho)[alive], 1.0, atol=1e-4)

  def test_student_duplicating_teacher_nodes(self):
    teacher, tparams, x = self._teacher()
    student = models.student_of(teacher, 2)
    self.assertEqual(tuple(student.hidden_widths), (8, 6))
    t = tparams['params']
    w0, b0 = t['hidden_0']['kernel'], t['hidden_0']['bias']
    w1, b1 = t['hidden_1']['kernel'], t['hidden_1']['bias']
    w2, b2 = t['output']['kernel'], t['output']['bias']
    # Student layer 1 = [h1, h1]; layer 2 kernel rows [A; B] with A + B = [w1, w1].
    a = jnp.concatenate([w1, 0.3 * w1], 1)
    b = jnp.concatenate([jnp.zeros_like(w1), 0.7 * w1], 1)
    sparams = {'params': {
        'hidden_0': {'kernel': jnp.concatenate([w0, w0], 1),
                     'bias': jnp.concatenate([b0, b0])},
        'hidden_1': {'kernel': jnp.concatenate([a, b], 0),
                     'bias': jnp.concatenate([b1, b1])},
        'output': {'kernel': jnp.concatenate([w2, w2], 0) / 2, 'bias': b2},
    }}
    # Sanity: a valid params tree for the student, computing the teacher's function.
    chex.assert_trees_all_equal_shapes(sparams, student.init(jax.random.PRNGKey(2), x[:1]))
    np.testing.assert_allclose(student.apply(sparams, x)[0], teacher.apply(tparams, x)[0],
                               atol=1e-4)
    stats = spec.network_stats(teacher.apply, student.apply, tparams, sparams, x)
    self.assertLen(stats, 2)
    for layer, width in zip(stats, (4, 3)):
      self.assertEqual(layer.cross.shape, (width, 2 * width))
      s = spec.summarize(layer)
      alive = np.asarray(s.alive)
      self.assertGreater(alive.sum(), 0)
      np.testing.assert_allclose(s.mean_max_corr, 1.0, atol=1e-4)
      np.testing.assert_allclose(s.frac_specialized, 1.0)
      np.testing.assert_array_equal((np.asarray(s.best_student) % width)[alive],
                                    np.arange(width)[alive])

  def test_layer_count_mismatch_raises(self):
    teacher, tparams, x = self._teacher()
    shallow = models.MLP((4,), 2)
    sparams = shallow.init(jax.random.PRNGKey(3), x[:1])
    with pytest.raises(ValueError, match='hidden layers'):
      spec.network_stats(teacher.apply, shallow.apply, tparams, sparams, x)


class WeightAlignmentTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_in_and_off_subspace_cosines(self):
    rng = np.random.default_rng(10)
    d, r, j, k = 8, 3, 4, 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    p = (q[:, :r] @ q[:, :r].T).astype(np.float32)
    p_perp = np.eye(d, dtype=np.float32) - p
    wt = rng.normal(size=(d, j)).astype(np.float32)
    best = np.array([5, 0, 3, 2])
    ws = rng.normal(size=(d, k)).astype(np.float32)
    ws[:, best] = 2 * (p @ wt) - (p_perp @ wt)  # P w_S = 2 P w_T, P_perp w_S = -P_perp w_T.
    align = self.variant(spec.weight_alignment)
    cos_in, cos_off = align(wt, ws, best, p)
    np.testing.assert_allclose(cos_in, 1.0, atol=1e-5)
    np.testing.assert_allclose(cos_off, -1.0, atol=1e-5)
    cos_in2, cos_off2 = align(wt, ws, best, p, p_perp)
    np.testing.assert_allclose(cos_in2, cos_in, atol=1e-6)
    np.testing.assert_allclose(cos_off2, cos_off, atol=1e-6)
    # A different matching picks random student columns: |cos| < 1.
    cos_in3, _ = align(wt, ws, np.array([1, 1, 1, 1]), p)
    self.assertLess(float(jnp.abs(cos_in3).max()), 0.999)

  def test_random_cosine_baseline(self):
    for n in (1, 2, 10, 50):
      self.assertAlmostEqual(spec.random_cosine_baseline(n), math.sqrt(2 / (math.pi * n)),
                             places=12)
    rng = np.random.default_rng(11)
    u, v = rng.normal(size=(2, 20000, 50))
    cos = (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
    mc = np.abs(cos).mean()
    self.assertLess(abs(mc / spec.random_cosine_baseline(50) - 1), 0.05)
    with pytest.raises(ValueError, match='dim'):
      spec.random_cosine_baseline(0)
