"""Attacks: projections, PGD feasibility and optimality, restarts, oracle objectives."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsrobust import attacks

D, R = 8, 3
EPS = 0.5
COMBOS = [(norm, sub) for norm in ('linf', 'l2') for sub in (None, 'in', 'off')]
PGD_COMBOS = [(norm, sub) for norm in ('linf', 'l2') for sub in (None, 'in')] + [('l2', 'off')]


def _projectors():
  """``(P, P_perp)`` of a random rank-3 subspace of R^8 (numpy, float32)."""
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(D, D)))
  p = (q[:, :R] @ q[:, :R].T).astype(np.float32)
  return p, (np.eye(D) - p).astype(np.float32)


def _subspace(which):
  """Projector for ``which`` in (None, 'in', 'off'), and the one onto its complement."""
  p, p_perp = _projectors()
  return {None: (None, None), 'in': (p, p_perp), 'off': (p_perp, p)}[which]


def _norms(v, norm):
  v = np.asarray(v).reshape(v.shape[0], -1)
  return np.abs(v).max(1) if norm == 'linf' else np.linalg.norm(v, axis=1)


def _small_mlp(seed, d=D, width=6, out=3):
  """A random one-hidden-layer ReLU network ``[N, d] -> [N, out]`` (plain jnp)."""
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(rng.normal(size=(d, width)) / np.sqrt(d), jnp.float32)
  b1 = jnp.asarray(0.1 * rng.normal(size=(width,)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(width, out)) / np.sqrt(width), jnp.float32)
  return lambda x: jax.nn.relu(x @ w1 + b1) @ w2


class ProjectTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*COMBOS)
  def test_feasible_and_idempotent(self, norm, sub):
    proj, comp = _subspace(sub)
    # Mix of tiny and huge perturbations.
    delta = np.random.default_rng(1).normal(size=(20, D)).astype(np.float32)
    delta *= np.logspace(-2, 2, 20, dtype=np.float32)[:, None]
    fn = self.variant(lambda v: attacks.project(v, EPS, norm, proj))
    out = fn(delta)
    self.assertEqual(out.shape, delta.shape)
    self.assertTrue(np.all(_norms(out, norm) <= EPS + 1e-5))
    if comp is not None:
      np.testing.assert_allclose(np.asarray(out) @ comp, 0.0, atol=1e-5)
    np.testing.assert_allclose(fn(out), out, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_full_space_known_answers(self):
    delta = np.array([[1.0, -2.0, 2.0, 0.0], [0.0, 3.0, 0.0, -4.0], [0.1, 0.1, 0.1, 0.1]],
                     np.float32)
    linf = self.variant(lambda v: attacks.project(v, EPS, 'linf'))(delta)
    np.testing.assert_allclose(linf, np.clip(delta, -EPS, EPS), atol=1e-7)
    l2 = self.variant(lambda v: attacks.project(v, 1.0, 'l2'))(delta)
    np.testing.assert_allclose(
        l2, [[1 / 3, -2 / 3, 2 / 3, 0.0], [0.0, 0.6, 0.0, -0.8],
             [0.1, 0.1, 0.1, 0.1]], rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('in', 'off')
  def test_l2_subspace_is_project_then_rescale(self, sub):
    proj, _ = _subspace(sub)
    delta = np.random.default_rng(2).normal(size=(10, D)) * np.linspace(0.05, 3, 10)[:, None]
    out = self.variant(lambda v: attacks.project(v, EPS, 'l2', proj))(delta.astype(np.float32))
    pd = delta @ proj.astype(np.float64)
    n = np.linalg.norm(pd, axis=1, keepdims=True)
    expected = pd * np.minimum(1.0, EPS / n)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # Some rows are inside the ball (unchanged after P), some are rescaled.
    self.assertTrue(np.any(n[:, 0] < EPS) and np.any(n[:, 0] > EPS))

  def test_image_shaped_inputs(self):
    proj, comp = _subspace('in')
    delta = jnp.asarray(np.random.default_rng(3).normal(size=(5, 2, 2, 2)), jnp.float32)
    out = attacks.project(delta, EPS, 'l2', proj)
    self.assertEqual(out.shape, (5, 2, 2, 2))
    self.assertTrue(np.all(_norms(out, 'l2') <= EPS + 1e-5))
    np.testing.assert_allclose(np.asarray(out).reshape(5, D) @ comp, 0.0, atol=1e-5)


class PGDTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*PGD_COMBOS)
  def test_output_is_feasible(self, norm, sub):
    proj, comp = _subspace(sub)
    f = _small_mlp(0)
    x = jax.random.normal(jax.random.PRNGKey(1), (12, D))
    objective = lambda xa: (f(xa) ** 2).sum(-1)
    run = self.variant(lambda x, k: attacks.pgd(objective, x, k, eps=EPS, alpha=0.2, steps=5,
                                                norm=norm, projector=proj, restarts=2))
    delta = run(x, jax.random.PRNGKey(2))
    self.assertEqual(delta.shape, x.shape)
    self.assertTrue(np.all(_norms(delta, norm) <= EPS + 1e-5))
    if comp is not None:
      np.testing.assert_allclose(np.asarray(delta) @ comp, 0.0, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('linf', 'l2')
  def test_clip_range(self, norm):
    f = _small_mlp(3)
    x = jax.random.uniform(jax.random.PRNGKey(4), (16, D))
    x = x.at[:, :2].set(jnp.array([0.0, 1.0]))  # Some coordinates on the boundary.
    objective = lambda xa: (f(xa) ** 2).sum(-1)
    run = self.variant(lambda x, k: attacks.pgd(objective, x, k, eps=0.8, alpha=0.3, steps=5,
                                                norm=norm, clip_range=(0.0, 1.0)))
    delta = run(x, jax.random.PRNGKey(5))
    xa = np.asarray(x + delta)
    self.assertTrue(np.all(xa >= 0.0) and np.all(xa <= 1.0))
    self.assertTrue(np.all(_norms(delta, norm) <= 0.8 + 1e-5))

  @parameterized.named_parameters(('linf', 'linf'), ('l2', 'l2'))
  def test_clip_range_with_subspace_keeps_the_contract(self, norm):
    """Documented contract: in S, in the ball, and x + delta in range.

    {delta in S, ||delta|| <= eps, x + delta in [lo, hi]} is convex and holds 0,
    so such a delta exists; clipping coordinates after projecting leaves S.
    """
    proj, comp = _subspace('in')
    x = jax.random.uniform(jax.random.PRNGKey(30), (8, D))
    w = jnp.asarray(np.random.default_rng(31).normal(size=(D,)), jnp.float32)
    delta = attacks.pgd(lambda xa: xa @ w, x, jax.random.PRNGKey(32), eps=1.0, alpha=0.25,
                        steps=10, norm=norm, projector=proj, clip_range=(0.0, 1.0))
    xa = np.asarray(x + delta)
    self.assertTrue(np.all(xa >= 0.0) and np.all(xa <= 1.0))
    self.assertTrue(np.all(_norms(delta, norm) <= 1.0 + 1e-5))
    np.testing.assert_allclose(np.asarray(delta) @ comp, 0.0, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('linf', 'l2')
  def test_raises_the_objective(self, norm):
    student = _small_mlp(6, width=16)
    x = jax.random.normal(jax.random.PRNGKey(7), (10, D))
    labels = student(x).argmax(-1)
    objective = attacks.fixed_label_objective(student, labels)
    run = self.variant(lambda x, k: attacks.pgd(objective, x, k, eps=0.3, alpha=0.1,
                                                steps=10, norm=norm))
    delta = run(x, jax.random.PRNGKey(8))
    self.assertTrue(np.all(objective(x + delta) > objective(x)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_linear_model_closed_form(self):
    rng = np.random.default_rng(9)
    w = rng.normal(size=(D,)).astype(np.float32)
    x = rng.normal(size=(6, D)).astype(np.float32)
    objective = lambda xa: xa @ w
    proj, _ = _subspace('in')

    def attack(norm, projector=None):
      return self.variant(lambda x, k: attacks.pgd(
          objective, x, k, eps=EPS, alpha=EPS / 4, steps=50, norm=norm, projector=projector,
          random_start=True))(x, jax.random.PRNGKey(10))
    np.testing.assert_allclose(attack('linf'), np.broadcast_to(EPS * np.sign(w), x.shape),
                               atol=1e-4)
    np.testing.assert_allclose(attack('l2'),
                               np.broadcast_to(EPS * w / np.linalg.norm(w), x.shape),
                               atol=1e-4)
    pw = proj @ w
    np.testing.assert_allclose(attack('l2', proj),
                               np.broadcast_to(EPS * pw / np.linalg.norm(pw), x.shape),
                               atol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_restarts_never_lower_the_objective(self):
    # keys = split(key, restarts) and the first run uses keys[0]; with the
    # (default) partitionable threefry, split(key, 1)[0] == split(key, 3)[0],
    # so restarts=3 starts from the restarts=1 run and keeps the per-example max.
    key = jax.random.PRNGKey(11)
    np.testing.assert_array_equal(jax.random.key_data(jax.random.split(key, 1)[0]),
                                  jax.random.key_data(jax.random.split(key, 3)[0]))
    f = _small_mlp(12, width=16)
    x = jax.random.normal(jax.random.PRNGKey(13), (16, D))
    objective = lambda xa: jnp.sin(3 * f(xa)).sum(-1)  # Non-concave.

    def attack(restarts):
      return self.variant(lambda x, k: attacks.pgd(objective, x, k, eps=1.0, alpha=0.1,
                                                   steps=2, norm='l2',
                                                   restarts=restarts))(x, key)
    one, three = objective(x + attack(1)), objective(x + attack(3))
    self.assertTrue(np.all(three >= one - 1e-5))
    self.assertTrue(np.any(three > one + 1e-4))

  def test_restarts_prefer_success(self):
    # Success where the first coordinate of x + delta is negative: the chosen
    # run must be a successful one whenever any run succeeds.
    x = jnp.zeros((64, D))
    objective = lambda xa: xa[:, 1]
    success = lambda xa: xa[:, 0] < 0
    key = jax.random.PRNGKey(14)
    d1 = attacks.pgd(objective, x, key, eps=1.0, alpha=0.1, steps=0, norm='l2', restarts=1,
                     success_fn=success)
    d4 = attacks.pgd(objective, x, key, eps=1.0, alpha=0.1, steps=0, norm='l2', restarts=4,
                     success_fn=success)
    s1, s4 = np.asarray(success(x + d1)), np.asarray(success(x + d4))
    self.assertTrue(np.all(s4[s1]))  # Never loses a success.
    self.assertGreater(s4.mean(), s1.mean())

  def test_invalid_arguments_raise(self):
    x = jnp.zeros((2, D))
    obj = lambda xa: xa.sum(-1)
    with pytest.raises(ValueError, match=r"norm must be one of \('linf', 'l2'\)"):
      attacks.pgd(obj, x, jax.random.PRNGKey(0), eps=0.1, alpha=0.1, steps=1, norm='l1')
    with pytest.raises(ValueError, match=r"norm must be one of \('linf', 'l2'\)"):
      attacks.project(x, 0.1, 'L2')
    with pytest.raises(ValueError, match='restarts'):
      attacks.pgd(obj, x, jax.random.PRNGKey(0), eps=0.1, alpha=0.1, steps=1, restarts=0)
    with pytest.raises(ValueError, match='steps'):
      attacks.pgd(obj, x, jax.random.PRNGKey(0), eps=0.1, alpha=0.1, steps=-1)
    f = lambda xa: xa[:, :2]
    with pytest.raises(ValueError, match=r"\('kl', 'mse'\)"):
      attacks.oracle_objective(f, f, 'ce')
    with pytest.raises(ValueError, match=r"\('oracle', 'fixed'\)"):
      attacks.robust_error(f, f, x, jax.random.PRNGKey(0), eps=0.1, alpha=0.1, steps=1,
                           label='true')


class OracleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('kl', 'mse')
  def test_oracle_objective(self, loss):
    teacher = _small_mlp(20)
    student = _small_mlp(21)
    x = jax.random.normal(jax.random.PRNGKey(22), (8, D))
    same = self.variant(attacks.oracle_objective(teacher, teacher, loss))(x)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    diff = self.variant(attacks.oracle_objective(student, teacher, loss))(x)
    self.assertEqual(diff.shape, (8,))
    self.assertTrue(np.all(diff > 0))

  def test_oracle_objective_known_values(self):
    s = jnp.array([[0.0, 0.0]])
    t = jnp.array([[np.log(3.0), 0.0]])  # softmax(t) = (3/4, 1/4).
    x = jnp.zeros((1, 1))
    mse = attacks.oracle_objective(lambda _: s, lambda _: t, 'mse')(x)
    np.testing.assert_allclose(mse, [np.log(3.0) ** 2], rtol=1e-6)
    kl = attacks.oracle_objective(lambda _: s, lambda _: t, 'kl')(x)
    expected = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    np.testing.assert_allclose(kl, [expected], rtol=1e-5)

  def test_oracle_gradient_flows_through_teacher(self):
    # Student constant, teacher linear: the oracle gradient is the teacher's.
    t = lambda xa: jnp.stack([xa[:, 0], -xa[:, 0]], -1)
    s = lambda xa: jnp.zeros((xa.shape[0], 2))
    g = jax.grad(lambda xa: attacks.oracle_objective(s, t, 'mse')(xa).sum())(
        jnp.array([[1.0, 5.0]]))
    np.testing.assert_allclose(g, [[4.0, 0.0]], rtol=1e-6)  # d/dx 2 x^2 at x = 1.

  @chex.variants(with_jit=True, without_jit=True)
  def test_oracle_error_of_teacher_is_zero(self):
    teacher = _small_mlp(23, width=16)
    x = jax.random.normal(jax.random.PRNGKey(24), (16, D))
    run = self.variant(lambda x, k, e: attacks.robust_error(
        teacher, teacher, x, k, eps=e, alpha=e / 4, steps=5, label='oracle', norm='l2'))
    for eps in (0.1, 1.0, 10.0):
      err = run(x, jax.random.PRNGKey(25), eps)
      self.assertEqual(err.shape, (16,))
      self.assertFalse(np.any(err))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('linf', 'l2')
  def test_fixed_label_large_eps_always_wins(self, norm):
    rng = np.random.default_rng(26)
    w = rng.normal(size=(D, 2)).astype(np.float32)
    model = lambda xa: xa @ w
    x = jnp.asarray(rng.normal(size=(16, D)), jnp.float32)
    err = self.variant(lambda x, k: attacks.robust_error(
        model, model, x, k, eps=20.0, alpha=5.0, steps=10, label='fixed', norm=norm))(
            x, jax.random.PRNGKey(27))
    self.assertTrue(np.all(err))
    # Zero budget: the student agrees with the teacher at the clean point.
    err0 = attacks.robust_error(model, model, x, jax.random.PRNGKey(27), eps=0.0, alpha=0.0,
                                steps=1, label='fixed', norm=norm)
    self.assertFalse(np.any(err0))
