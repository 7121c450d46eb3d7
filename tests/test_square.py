"""Square attack: masked and linear known answers, feasibility, vmap, bases, errors."""

import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import attacks
from tsrobust import square

N = 32
EPS = 0.3
QUERIES = 200
# Fraction of the closed-form best gain eps * ||w||_* that the clean margin lacks.
REACHABLE = {'linf': 0.7, 'l2': 0.75}
REACHABLE_IMAGES = {'linf': 0.7, 'l2': 0.35}  # L2 windows (>= 3x3) align slowly with a random w.
UNREACHABLE = 1.2
VECTORS, IMAGES = (N, 8), (N, 6, 6, 1)


def _dual_norm(w, norm):
  return np.abs(w).sum() if norm == 'linf' else np.linalg.norm(w)


def _linear_problem(seed, shape, norm, frac, eps=EPS):
  """Inputs, weights and biases such that the margin ``x @ w + b`` is ``-frac * eps ||w||_*``.

  The best achievable gain of ``delta @ w`` over the ``norm`` ball is the
  dual norm ``eps ||w||_*``, so the points can be flipped iff ``frac < 1``.
  ``x`` lies in ``[0.3, 0.7]``: ``clip_range=(0, 1)`` never binds at ``eps=0.3``.
  """
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.3, 0.7, size=shape).astype(np.float32)
  w = rng.normal(size=int(np.prod(shape[1:]))).astype(np.float32)
  b = -(x.reshape(shape[0], -1) @ w) - frac * eps * _dual_norm(w, norm)
  return jnp.asarray(x), jnp.asarray(w), jnp.asarray(b, jnp.float32)


def _masked_student(w, b):
  """Two-class logits ``[0, x @ w + b]`` behind ``stop_gradient``: zero gradient everywhere."""
  def logits(xa):
    s = xa.reshape(xa.shape[0], -1) @ w + b
    return jax.lax.stop_gradient(jnp.stack([jnp.zeros_like(s), s], -1))
  return logits


def _margin_and_success(student, label=0):
  """The margin ``max_{k != t} s_k - s_t`` and the success test ``argmax != t``."""
  def margin(xa):
    s = student(xa)
    return jnp.delete(s, label, axis=-1, assume_unique_indices=True).max(-1) - s[:, label]
  return margin, lambda xa: student(xa).argmax(-1) != label


def _square_on_masked(x, w, b, basis, key, eps, norm):
  """Square on the masked student: ``(delta, broken)``.

  One jitted function for all tests, called with the same argument types
  (compiling is the slow part of these tests).
  """
  return _jitted_square_on_masked(x, w, b, basis, key, jnp.asarray(eps, jnp.float32), norm)


@functools.partial(jax.jit, static_argnames=('norm',))
def _jitted_square_on_masked(x, w, b, basis, key, eps, norm):
  margin, success = _margin_and_success(_masked_student(w, b))
  delta = square.square(margin, x, key, eps=eps, queries=QUERIES, norm=norm, basis=basis,
                        clip_range=(0.0, 1.0), success_fn=success)
  return delta, success(x + delta)


@functools.partial(jax.jit, static_argnames=('norm',))
def _pgd_on_masked(x, w, b, key, eps, norm):
  margin, success = _margin_and_success(_masked_student(w, b))
  delta = attacks.pgd(margin, x, key, eps=eps, alpha=eps / 4, steps=20, norm=norm,
                      restarts=1, clip_range=(0.0, 1.0), success_fn=success)
  return delta, success(x + delta)


def _norms(v, norm):
  v = np.asarray(v).reshape(v.shape[0], -1)
  return np.abs(v).max(1) if norm == 'linf' else np.linalg.norm(v, axis=1)


def _random_basis(dim, k, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
  return q[:, :k].astype(np.float32)


class ScheduleTest(chex.TestCase):

  def test_p_halves_at_the_rescaled_fractions(self):
    p = square.p_schedule(10000, 0.8)
    self.assertEqual(p.shape, (10000,))
    np.testing.assert_allclose(p[[0, 10, 11, 50, 51, 8000, 8001, 9999]],
                               0.8 / np.array([1, 1, 2, 2, 4, 256, 512, 512]))
    # Rescaled to the number of queries: the same fractions of the run.
    p = square.p_schedule(1000, 0.5)
    np.testing.assert_allclose(p[[1, 2, 5, 6, 800, 801]], 0.5 / np.array([1, 2, 2, 4, 256, 512]))
    self.assertTrue(np.all(np.diff(p) <= 0))


class KnownAnswerTest(chex.TestCase):

  @parameterized.parameters('linf', 'l2')
  def test_breaks_masked_model_where_pgd_fails(self, norm):
    x, w, b = _linear_problem(0, VECTORS, norm, REACHABLE[norm])
    key = jax.random.PRNGKey(1)
    _, pgd_broken = _pgd_on_masked(x, w, b, key, EPS, norm)
    _, sq_broken = _square_on_masked(x, w, b, None, key, EPS, norm)
    self.assertLessEqual(float(pgd_broken.mean()), 0.1)  # Zero gradient: only the random start.
    self.assertGreaterEqual(float(sq_broken.mean()), 0.9)

  @parameterized.parameters(('linf', VECTORS), ('l2', VECTORS), ('linf', IMAGES), ('l2', IMAGES))
  def test_linear_model_threshold(self, norm, shape):
    reach = (REACHABLE if len(shape) == 2 else REACHABLE_IMAGES)[norm]
    for frac, should_break in ((reach, True), (UNREACHABLE, False)):
      x, w, b = _linear_problem(2, shape, norm, frac)
      delta, broken = _square_on_masked(x, w, b, None, jax.random.PRNGKey(3), EPS, norm)
      delta = np.asarray(delta)
      # The range never binds here: the whole budget is used, and no more.
      np.testing.assert_allclose(_norms(delta, norm), EPS, rtol=1e-5)
      gain = delta.reshape(N, -1) @ np.asarray(w)
      self.assertTrue(np.all(gain <= EPS * _dual_norm(np.asarray(w), norm) * (1 + 1e-5)))
      if should_break:
        self.assertGreaterEqual(float(broken.mean()), 0.9, (norm, shape))
      else:
        self.assertFalse(np.any(broken), (norm, shape))


class FeasibilityTest(chex.TestCase):

  @parameterized.parameters(
      ('linf', IMAGES, None), ('l2', IMAGES, None), ('linf', VECTORS, None), ('l2', VECTORS, None),
      ('l2', (N, 5, 6, 3), None),  # L2 moves mass per channel
      # With a basis the input's shape only matters through a reshape: one of each
      # (each configuration is one more compile).
      ('linf', IMAGES, 5), ('l2', VECTORS, 3))
  def test_ball_range_and_subspace(self, norm, shape, rank):
    _, w, b = _linear_problem(4, shape, norm, 0.5)  # Any objective: only feasibility matters.
    rng = np.random.default_rng(4)
    dim = int(np.prod(shape[1:]))
    basis = None if rank is None else _random_basis(dim, rank)
    if rank is None:  # The range binds: points on its boundary.
      x = rng.uniform(size=shape).astype(np.float32)
      x.reshape(N, -1)[:, :2] = [0.0, 1.0]
      eps = 0.4 if norm == 'linf' else 1.0
    else:  # Scaled, not clipped: interior points, large budgets.
      x = rng.uniform(0.1, 0.9, size=shape).astype(np.float32)
      eps = 0.4 if norm == 'linf' else 1.5
    delta, _ = _square_on_masked(jnp.asarray(x), w, b, basis, jax.random.PRNGKey(5), eps, norm)
    delta = np.asarray(delta)
    self.assertEqual(delta.shape, shape)
    self.assertTrue(np.all(_norms(delta, norm) <= eps + 1e-5))
    self.assertTrue(np.all(x + delta >= -1e-6) and np.all(x + delta <= 1 + 1e-6))
    self.assertGreater(_norms(delta, norm).mean(), 0.2 * eps)  # It did move.
    if basis is not None:
      flat = delta.reshape(N, -1)
      np.testing.assert_allclose(flat - flat @ basis @ basis.T, 0.0, atol=1e-5)


class LayoutTest(chex.TestCase):

  @parameterized.parameters('linf', 'l2')
  def test_start_on_multichannel_images(self, norm):
    """An objective that every step lowers accepts nothing: ``delta`` is the start, laid out
    like ``x``.

    L-inf: vertical stripes, ``delta[n, :, w, c] = +-eps`` (one sign per column
    and channel); L2: norm ``eps``. The objective, minus the variation of ``x_adv`` along H,
    is 0 at vertical stripes and below 0 once a window (smaller than H) changes them.
    """
    shape = (4, 5, 6, 3)
    x = jnp.full(shape, 0.5)
    variation_along_h = lambda xa: -jnp.abs(jnp.diff(xa, axis=1)).sum((1, 2, 3))
    delta = np.asarray(jax.jit(lambda k: square.square(
        variation_along_h, x, k, eps=0.2, queries=5, norm=norm))(jax.random.PRNGKey(0)))
    self.assertEqual(delta.shape, shape)
    if norm == 'linf':
      np.testing.assert_allclose(np.abs(delta), 0.2, rtol=1e-6)
      np.testing.assert_array_equal(delta, np.broadcast_to(delta[:, :1], shape))  # along H
      self.assertTrue(np.any(delta[..., 0] != delta[..., 1]))  # signs differ across channels
      self.assertTrue(np.any(delta[:, :, 0] != delta[:, :, 1]))  # and across columns
    else:
      np.testing.assert_allclose(_norms(delta, 'l2'), 0.2, rtol=1e-5)


class VmapTest(chex.TestCase):

  def test_vmap_over_parameters_and_traced_eps(self):
    problems = [_linear_problem(seed, VECTORS, 'linf', 0.8) for seed in (6, 7, 8)]
    x = problems[0][0]
    ws = jnp.stack([w for _, w, _ in problems])
    bs = jnp.stack([b for _, _, b in problems])
    eps = jnp.array([0.2, 0.3, 0.25])
    key = jax.random.PRNGKey(9)
    batched = jax.jit(jax.vmap(lambda w, b, e: _square_on_masked(x, w, b, None, key, e, 'linf')))
    deltas, broken = batched(ws, bs, eps)
    compiled = None
    for i in range(3):
      delta, brk = _square_on_masked(x, ws[i], bs[i], None, key, eps[i], 'linf')
      compiled = compiled or _jitted_square_on_masked._cache_size()
      self.assertEqual(_jitted_square_on_masked._cache_size(), compiled)  # eps is traced.
      chex.assert_trees_all_close(deltas[i], delta, atol=1e-6)
      np.testing.assert_array_equal(broken[i], brk)
      self.assertTrue(np.all(_norms(deltas[i], 'linf') <= eps[i] + 1e-6))


class StreamTest(chex.TestCase):

  @parameterized.parameters(
      ('l2', 1.6745195388793945, -2.932147979736328, 21.67153549194336),
      ('linf', -1.0, 2.8945555686950684, 96.0))
  def test_random_stream_is_pinned(self, norm, total, weighted, l1):
    """Digests of a 9-query search, recorded at commit 4759520.

    Step ``i`` draws its uniforms from ``split(key, queries + 1)[i + 1]``; they are now
    drawn one step ahead and carried (a speed-up that must not change the search). A
    shifted or reused key changes these digests at O(1); XLA rounding changes at ~1e-7.
    """
    x = jnp.linspace(-1.0, 1.0, 16 * 12).reshape(16, 12)
    w = jnp.cos(jnp.arange(12.0))
    delta = square.square(lambda xa: jnp.sin(3.0 * xa @ w), x, jax.random.key(4), eps=0.5,
                          queries=9, norm=norm)
    probe = jnp.sin(jnp.arange(delta.size) * 1.0).reshape(delta.shape)
    np.testing.assert_allclose([delta.sum(), (delta * probe).sum(), jnp.abs(delta).sum()],
                               [total, weighted, l1], rtol=1e-5, atol=1e-5)


class BasisTest(chex.TestCase):

  def test_basis_from_projector_recovers_subspace(self):
    u = _random_basis(10, 4, seed=10)
    p = jnp.asarray(u @ u.T)
    got = jax.jit(functools.partial(square.basis_from_projector, rank=4))(p)
    self.assertEqual(got.shape, (10, 4))
    np.testing.assert_allclose(got @ got.T, p, atol=1e-5)
    np.testing.assert_allclose(got.T @ got, np.eye(4), atol=1e-5)


class ErrorTest(chex.TestCase):

  def test_bad_input_raises(self):
    x = np.zeros((2, 8), np.float32)
    key = jax.random.PRNGKey(0)
    objective = lambda xa: xa.sum(-1)
    bad = [({'queries': 0}, 'queries'), ({'queries': 2.5}, 'queries'),
           ({'norm': 'l1'}, 'norm'), ({'p_init': 0.0}, 'p_init'), ({'p_init': 1.5}, 'p_init'),
           ({'basis': np.zeros((7, 2))}, 'basis'), ({'basis': np.zeros((8, 0))}, 'basis'),
           ({'basis': np.zeros((8,))}, 'basis')]
    for kwargs, name in bad:
      args = {'eps': 0.1, 'queries': 3, **kwargs}
      with self.assertRaisesRegex(ValueError, name):
        square.square(objective, x, key, **args)
    with self.assertRaisesRegex(ValueError, 'x must'):
      square.square(objective, np.zeros((2, 3, 4)), key, eps=0.1, queries=3)
    with self.assertRaisesRegex(ValueError, 'rank'):
      square.basis_from_projector(np.eye(4), 5)
    with self.assertRaisesRegex(ValueError, 'projector'):
      square.basis_from_projector(np.eye(4)[:3], 2)
