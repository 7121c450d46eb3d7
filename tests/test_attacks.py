"""Attacks: projections; PGD / APGD known answers, feasibility, best iterate; objectives."""

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


def _iterates(c, alpha, steps, norm):
  """PGD iterates from 0 on ``-||delta - c||^2`` in an unbounded ball: ``[n, steps + 1, d]``."""
  p = np.zeros_like(c, dtype=np.float64)
  out = [p]
  for _ in range(steps):
    g = 2 * (c - p)
    if norm == 'linf':
      step = np.sign(g)
    else:
      step = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    p = p + alpha * step
    out.append(p)
  return np.stack(out, 1)


def _iterate_values(c, alpha, steps, norm):
  """Objective ``-||delta - c||^2`` of each of ``_iterates``: ``[n, steps + 1]``."""
  return -((_iterates(c, alpha, steps, norm) - c[:, None]) ** 2).sum(-1)


def _linear_problem(sub):
  """``(w, x, P)``: a linear objective ``x @ w`` and the subspace of the case.

  ``sub``: None, 'random' (the rank-3 subspace of ``_projectors``) or
  'coords' (coordinates 0, 2, 3, 6).
  """
  rng = np.random.default_rng(50)
  w = rng.normal(size=(D,)).astype(np.float32)
  x = rng.normal(size=(6, D)).astype(np.float32)
  proj = {None: None, 'random': _projectors()[0],
          'coords': np.diag([1, 0, 1, 1, 0, 0, 1, 0]).astype(np.float32)}[sub]
  return w, x, proj


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

  @chex.variants(with_jit=True, without_jit=True)
  def test_range_scaling_never_rounds_past_the_bounds(self):
    """``x + delta`` stays in [0, 1] exactly after the subspace branch's scaling.

    Without a margin, ``x + delta * ((1 - x) / delta)`` rounds one ulp past 1 in ~1% of
    float32 cases: 40,000 random rows, each with a binding coordinate, would hold
    hundreds. The margin costs a few ulps of the budget, no more.
    """
    rng = np.random.default_rng(40)
    n = 40_000
    x = rng.uniform(0.0, 1.0, size=(n, 2)).astype(np.float32)
    # The first coordinate overshoots 1 by a factor 1.01-3: it binds. The second is small.
    delta = np.stack([(1.0 - x[:, 0]) * rng.uniform(1.01, 3.0, n),
                      rng.uniform(-1e-3, 0.0, n)], 1).astype(np.float32)
    self.assertTrue(np.all(x[:, 0] + delta[:, 0] > 1.0))
    out = np.asarray(self.variant(
        lambda a, d: attacks._clip_inputs(a, d, (0.0, 1.0), np.eye(2, dtype=np.float32))
    )(x, delta))  # pylint: disable=protected-access
    xa = x + out
    self.assertEqual(int((xa > 1.0).sum() + (xa < 0.0).sum()), 0)
    factor = out[:, 0] / delta[:, 0]
    room = np.minimum((1.0 - x[:, 0]) / delta[:, 0], (0.0 - x[:, 1]) / delta[:, 1])
    np.testing.assert_allclose(factor, room, rtol=3e-6)
    np.testing.assert_allclose(out[:, 1] / delta[:, 1], factor, rtol=1e-6)
    # A delta with room to spare is returned as it is.
    small = np.full((3, 2), 0.01, np.float32)
    kept = attacks._clip_inputs(  # pylint: disable=protected-access
        np.full((3, 2), 0.5, np.float32), small, (0.0, 1.0), np.eye(2, dtype=np.float32))
    np.testing.assert_array_equal(kept, small)

  def test_image_shaped_inputs(self):
    proj, comp = _subspace('in')
    delta = jnp.asarray(np.random.default_rng(3).normal(size=(5, 2, 2, 2)), jnp.float32)
    out = attacks.project(delta, EPS, 'l2', proj)
    self.assertEqual(out.shape, (5, 2, 2, 2))
    self.assertTrue(np.all(_norms(out, 'l2') <= EPS + 1e-5))
    np.testing.assert_allclose(np.asarray(out).reshape(5, D) @ comp, 0.0, atol=1e-5)


class PGDTest(chex.TestCase):
  # Attacks run jitted only: un-jitted, the scans compile all the same, and the
  # compiles are what these tests spend their time on.

  @chex.variants(with_jit=True)
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

  @chex.variants(with_jit=True)
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

  @chex.variants(with_jit=True)
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

  @parameterized.parameters('linf', 'l2')
  def test_returns_the_best_iterate(self, norm):
    """A step too large for a concave objective oscillates; pgd returns the best iterate.

    Objective ``-||x + delta - c||^2`` with its maximum inside a huge ball,
    from 0, step 0.4: the iterates overshoot ``c`` and oscillate, and the last
    one is worse than an earlier one for some examples. The iterates are
    recomputed here in numpy.
    """
    n, d, steps, alpha = 16, 2, 7, 0.4
    c = np.random.default_rng(40).uniform(-1.0, 1.0, size=(n, d)).astype(np.float32)
    x = np.zeros((n, d), np.float32)
    objective = lambda xa: -((xa - c) ** 2).sum(-1)
    delta = attacks.pgd(objective, x, jax.random.PRNGKey(41), eps=100.0, alpha=alpha,
                        steps=steps, norm=norm, random_start=False)
    values = _iterate_values(c, alpha, steps, norm)
    np.testing.assert_allclose(objective(x + delta), values.max(1), rtol=1e-5, atol=1e-6)
    self.assertTrue(np.any(values[:, -1] < values.max(1) - 1e-3))  # Last iterate is worse.
    self.assertTrue(np.any(values.argmax(1) > 0))  # And the start is not always best.

  def test_best_iterate_prefers_success(self):
    """Among the same iterates, a success beats any larger objective of a non-success."""
    n, d, steps, alpha = 16, 2, 7, 0.4
    c = np.random.default_rng(42).uniform(-1.0, 1.0, size=(n, d)).astype(np.float32)
    x = np.zeros((n, d), np.float32)
    objective = lambda xa: -((xa - c) ** 2).sum(-1)
    success = lambda xa: xa[:, 0] * np.sign(c[:, 0]) < 0.3 * np.abs(c[:, 0])
    delta = attacks.pgd(objective, x, jax.random.PRNGKey(43), eps=100.0, alpha=alpha,
                        steps=steps, norm='l2', random_start=False, success_fn=success)
    values = _iterate_values(c, alpha, steps, 'l2')
    points = _iterates(c, alpha, steps, 'l2')  # [n, steps + 1, d]
    ok = points[..., 0] * np.sign(c[:, None, 0]) < 0.3 * np.abs(c[:, None, 0])
    expected = np.where(ok.any(1), np.where(ok, values, -np.inf).max(1), values.max(1))
    np.testing.assert_allclose(objective(x + delta), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(success(x + delta), ok.any(1))
    # The start (0) always succeeds, a lower objective than later iterates.
    self.assertTrue(np.all(ok[:, 0]) and np.any(expected < values.max(1) - 1e-3))

  def test_l2_random_start_radius(self):
    """The L2 start has radius eps * U: uniform on [0, eps], not concentrated near eps."""
    n = 4000
    for sub in (None, 'in'):
      proj, comp = _subspace(sub)
      x = jnp.zeros((n, D))
      # No steps and a constant objective: the returned delta is the start point.
      delta = attacks.pgd(lambda xa: jnp.zeros(xa.shape[0]), x, jax.random.PRNGKey(44),
                          eps=EPS, alpha=0.0, steps=0, norm='l2', projector=proj)
      r = _norms(delta, 'l2') / EPS
      self.assertTrue(np.all(r <= 1 + 1e-6))
      self.assertAlmostEqual(r.mean(), 0.5, delta=0.03)
      np.testing.assert_allclose(np.quantile(r, [0.1, 0.5, 0.9]), [0.1, 0.5, 0.9], atol=0.03)
      if comp is not None:
        np.testing.assert_allclose(np.asarray(delta) @ comp, 0.0, atol=1e-5)
      # Directions: the mean of the unit vectors is ~0 (no preferred direction).
      unit = np.asarray(delta) / np.maximum(r[:, None] * EPS, 1e-12)
      self.assertLess(np.abs(unit.mean(0)).max(), 0.05)

  @chex.variants(with_jit=True)
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
    with pytest.raises(ValueError, match='objective_fn'):
      attacks.pgd(lambda xa: xa, x, jax.random.PRNGKey(0), eps=0.1, alpha=0.1, steps=1)
    with pytest.raises(ValueError, match='projector'):
      attacks.pgd(obj, x, jax.random.PRNGKey(0), eps=0.1, alpha=0.1, steps=1,
                  projector=jnp.eye(D - 1))
    f = lambda xa: xa[:, :2]
    with pytest.raises(ValueError, match=r"\('kl', 'mse'\)"):
      attacks.oracle_objective(f, f, 'ce')
    with pytest.raises(ValueError, match=r"\('oracle', 'fixed'\)"):
      attacks.robust_error(f, f, x, jax.random.PRNGKey(0), eps=0.1, alpha=0.1, steps=1,
                           label='true')


class OracleTest(chex.TestCase):
  # Attacks run jitted only (as in PGDTest); objectives with and without jit.

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
    # The definitions, in float64 numpy: sum_c (s_c - t_c)^2, KL(softmax(t) || softmax(s)).
    s, t = np.asarray(student(x), np.float64), np.asarray(teacher(x), np.float64)
    if loss == 'mse':
      want = ((s - t) ** 2).sum(-1)
    else:
      log_softmax = lambda z: z - z.max(-1, keepdims=True) - np.log(
          np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
      want = (np.exp(log_softmax(t)) * (log_softmax(t) - log_softmax(s))).sum(-1)
    self.assertTrue(np.all(want > 1e-3))  # the two networks really differ on every point
    np.testing.assert_allclose(diff, want, rtol=1e-4, atol=1e-6)

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

  @chex.variants(with_jit=True)
  def test_oracle_error_of_teacher_is_zero(self):
    teacher = _small_mlp(23, width=16)
    x = jax.random.normal(jax.random.PRNGKey(24), (16, D))
    run = self.variant(lambda x, k, e: attacks.robust_error(
        teacher, teacher, x, k, eps=e, alpha=e / 4, steps=5, label='oracle', norm='l2'))
    for eps in (0.1, 1.0, 10.0):
      err = run(x, jax.random.PRNGKey(25), eps)
      self.assertEqual(err.shape, (16,))
      self.assertFalse(np.any(err))

  @chex.variants(with_jit=True)
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


class ClosedFormTest(chex.TestCase):
  """On ``f(x) = x @ w`` both attacks reach the closed-form maximum of ``delta @ w``.

  L2: ``eps ||P w||_2``; L-inf: ``eps ||P w||_1`` (``P`` the identity, a
  random subspace for L2, a coordinate subspace for L-inf, where ``project``'s
  scaling rule is still exact). PGD (fixed step ``eps / 4``) needs more steps
  than APGD: in the L-inf coordinate subspace its error shrinks only by
  ``eps / (eps + alpha) = 0.8`` per step (50 steps), APGD's step starts at
  ``2 eps`` and 20 steps are plenty.
  """

  @parameterized.parameters(*[(attack, norm, sub) for attack in ('pgd', 'apgd')
                              for norm, sub in (('l2', None), ('l2', 'random'),
                                                ('linf', None), ('linf', 'coords'))])
  def test_linear_model_reaches_the_maximum(self, attack, norm, sub):
    w, x, proj = _linear_problem(sub)
    pw = w if proj is None else proj @ w
    best = EPS * (np.linalg.norm(pw) if norm == 'l2' else np.abs(pw).sum())
    objective = lambda xa: xa @ w
    if attack == 'pgd':
      run = jax.jit(lambda x, k: attacks.pgd(objective, x, k, eps=EPS, alpha=EPS / 4, steps=50,
                                             norm=norm, projector=proj))
    else:
      run = jax.jit(lambda x, k: attacks.apgd(objective, x, k, eps=EPS, steps=20, norm=norm,
                                              projector=proj))
    delta = np.asarray(run(x, jax.random.PRNGKey(51)))
    np.testing.assert_allclose(delta @ w, np.full(x.shape[0], best), rtol=1e-3)
    self.assertTrue(np.all(_norms(delta, norm) <= EPS + 1e-5))
    if proj is not None:
      np.testing.assert_allclose(delta @ (np.eye(D) - proj), 0.0, atol=1e-5)


class APGDTest(chex.TestCase):

  def test_checkpoints_of_the_paper(self):
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (Croce & Hein 2020).
    self.assertEqual(attacks.apgd_checkpoints(100), (22, 41, 57, 70, 80, 87, 93, 99))
    self.assertEqual(attacks.apgd_checkpoints(10), (3, 5, 6, 7, 8, 9))
    self.assertEqual(attacks.apgd_checkpoints(1), ())

  @parameterized.parameters(*COMBOS)
  def test_output_is_feasible(self, norm, sub):
    """In the ball, in the subspace and in the input range, with restarts and success."""
    proj, comp = _subspace(sub)
    f = _small_mlp(60)
    x = jax.random.uniform(jax.random.PRNGKey(61), (12, D))
    x = x.at[:, :2].set(jnp.array([0.0, 1.0]))  # Some coordinates on the boundary.
    y = f(x).argmax(-1)
    delta, first = jax.jit(lambda x, k: attacks.apgd(
        attacks.margin_objective(f, y), x, k, eps=0.8, steps=6, norm=norm, projector=proj,
        clip_range=(0.0, 1.0), restarts=2, success_fn=attacks.fixed_label_success(f, y),
        return_trace=True))(x, jax.random.PRNGKey(62))
    self.assertEqual(delta.shape, x.shape)
    chex.assert_shape(first, (12,))
    self.assertEqual(first.dtype, jnp.int32)
    self.assertTrue(np.all(_norms(delta, norm) <= 0.8 + 1e-5))
    xa = np.asarray(x + delta)
    self.assertTrue(np.all(xa >= 0.0) and np.all(xa <= 1.0))
    if comp is not None:
      np.testing.assert_allclose(np.asarray(delta) @ comp, 0.0, atol=1e-5)

  @parameterized.parameters('linf', 'l2')
  def test_interior_maximum_needs_the_step_schedule(self, norm):
    """A concave objective with its maximum inside the ball: halving the step finds it.

    A fixed step of ``2 eps`` oscillates at distance ~``eps`` (PGD with that
    step gets at best about -0.1 (L2) and -1.2 (L-inf) on these examples);
    APGD's halvings (at most 8 in 100 steps: the step ends >= ``2 eps / 256``)
    bring the best iterate close to ``c``.
    """
    c = np.random.default_rng(63).uniform(-0.3, 0.3, size=(8, D)).astype(np.float32)
    x = jnp.zeros((8, D))
    objective = lambda xa: -((xa - c) ** 2).sum(-1)
    delta = attacks.apgd(objective, x, jax.random.PRNGKey(64), eps=1.0, steps=100, norm=norm)
    self.assertTrue(np.all(objective(x + delta) > -1e-2))

  def test_trace_is_consistent_with_the_result(self):
    """``success(x + delta)`` exactly where ``first_success <= steps``; restarts only help."""
    steps = 8
    f = _small_mlp(65, width=16)
    x = jax.random.normal(jax.random.PRNGKey(66), (64, D))
    y = f(x).argmax(-1)
    success = attacks.fixed_label_success(f, y)
    key = jax.random.PRNGKey(67)

    def run(restarts):
      return jax.jit(lambda x, k: attacks.apgd(
          attacks.dlr_objective(f, y), x, k, eps=0.6, steps=steps, norm='l2',
          restarts=restarts, success_fn=success, return_trace=True))(x, key)
    delta, first = run(1)
    first = np.asarray(first)
    np.testing.assert_array_equal(np.asarray(success(x + delta)), first <= steps)
    # Non-trivial: some points broken after some steps, some never.
    self.assertTrue(np.any(first == steps + 1))
    self.assertTrue(np.any((first > 0) & (first <= steps)))
    self.assertTrue(np.all((first >= 0) & (first <= steps + 1)))
    # Restart 0 of 3 is the run above (split(key, 1)[0] == split(key, 3)[0]).
    delta3, first3 = run(3)
    first3 = np.asarray(first3)
    self.assertTrue(np.all(first3 <= first))
    np.testing.assert_array_equal(np.asarray(success(x + delta3)), first3 <= steps)

  def test_first_success_at_the_start_and_never(self):
    """Iteration 0 where even the start point succeeds; ``steps + 1`` where nothing can."""
    # A large-margin linear model at x = (10, 0, ...): argmax 0 everywhere in
    # the ball. Against label 1 every point, the start included, is an error;
    # against label 0 none is.
    w = jnp.array([[1.0, -1.0]] + [[0.0, 0.0]] * (D - 1))
    model = lambda xa: xa @ w
    x = jnp.zeros((10, D)).at[:, 0].set(10.0)
    y = jnp.array([1] * 5 + [0] * 5)
    _, first = attacks.apgd(attacks.margin_objective(model, y), x, jax.random.PRNGKey(68),
                            eps=0.5, steps=3, success_fn=attacks.fixed_label_success(model, y),
                            return_trace=True)
    np.testing.assert_array_equal(first, [0] * 5 + [4] * 5)

  def test_vmap_over_seeds_with_traced_eps(self):
    """One jit of the attack vmapped over a leading seeds axis of params, for every eps.

    Seed ``s`` of the vmapped run equals the single-seed run. (A linear model:
    on plateaus of a saturating one, float rounding that differs between the
    batched and single matmuls can flip near-ties between iterates.)
    """
    seeds, n = 3, 10
    rng = np.random.default_rng(69)
    w = jnp.asarray(rng.normal(size=(seeds, D, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
    proj, _ = _subspace('in')

    def attack(w, key, eps):
      model = lambda v: v @ w
      y = model(x).argmax(-1)
      return attacks.apgd(attacks.dlr_objective(model, y), x, key, eps=eps, steps=5, norm='l2',
                          projector=proj, success_fn=attacks.fixed_label_success(model, y),
                          return_trace=True)
    keys = jax.random.split(jax.random.PRNGKey(70), seeds)
    vmapped = jax.jit(jax.vmap(attack, in_axes=(0, 0, None)))
    single = jax.jit(attack)
    for eps in (0.1, 0.5, 2.0):
      delta, first = vmapped(w, keys, eps)
      chex.assert_shape(delta, (seeds, n, D))
      chex.assert_shape(first, (seeds, n))
      for s in range(seeds):
        d_s, f_s = single(w[s], keys[s], eps)
        np.testing.assert_allclose(delta[s], d_s, atol=1e-5)
        np.testing.assert_array_equal(first[s], f_s)
    self.assertEqual(vmapped._cache_size(), 1)  # pylint: disable=protected-access
    self.assertEqual(single._cache_size(), 1)  # pylint: disable=protected-access

  def test_invalid_arguments_raise(self):
    x = jnp.zeros((2, D))
    obj = lambda xa: xa.sum(-1)
    key = jax.random.PRNGKey(0)
    for kwargs, match in (({'steps': 0}, 'steps'), ({'restarts': 0}, 'restarts'),
                          ({'norm': 'l1'}, 'norm'), ({'rho': 0.0}, 'rho'),
                          ({'rho': 1.5}, 'rho'), ({'momentum': -0.1}, 'momentum'),
                          ({'momentum': 1.1}, 'momentum'),
                          ({'return_trace': True}, 'success_fn')):
      args = dict(eps=0.1, steps=2)
      args.update(kwargs)
      with pytest.raises(ValueError, match=match):
        attacks.apgd(obj, x, key, **args)
    with pytest.raises(ValueError, match='steps'):
      attacks.apgd_checkpoints(0)


class ObjectiveTest(chex.TestCase):
  # Logits of 2 examples over 4 classes; labels 0 and 3.
  Z = np.array([[3.0, 1.0, 2.0, 0.0], [0.5, 2.0, -1.0, 1.0]], np.float32)
  Y = np.array([0, 3], np.int32)

  @chex.variants(with_jit=True, without_jit=True)
  def test_margin(self):
    out = self.variant(attacks.margin)(self.Z, self.Y)
    np.testing.assert_allclose(out, [2.0 - 3.0, 2.0 - 1.0], rtol=1e-6)
    obj = self.variant(attacks.margin_objective(lambda v: 2 * v, self.Y))(self.Z)
    np.testing.assert_allclose(obj, [-2.0, 2.0], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dlr_known_values_and_invariance(self):
    dlr = self.variant(attacks.dlr_objective(lambda v: v, self.Y))
    # Example 0: -(3 - 2) / (3 - 1); example 1: sorted 2, 1, .5, -1: -(1 - 2) / (2 - .5).
    np.testing.assert_allclose(dlr(self.Z), [-0.5, 1.0 / 1.5], rtol=1e-6)
    # Invariant to shifting and (positive) scaling of the logits.
    np.testing.assert_allclose(dlr(3.0 * self.Z - 7.0), dlr(self.Z), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_targeted_objectives(self):
    t = np.array([2, 1], np.int32)
    tdlr = self.variant(attacks.targeted_dlr_objective(lambda v: v, self.Y, t))(self.Z)
    # Example 0: -(3 - 2) / (3 - (1 + 0) / 2); example 1: -(1 - 2) / (2 - (.5 - 1) / 2).
    np.testing.assert_allclose(tdlr, [-1.0 / 2.5, 1.0 / 2.25], rtol=1e-6)
    tm = self.variant(attacks.targeted_margin_objective(lambda v: v, self.Y, t))(self.Z)
    np.testing.assert_allclose(tm, [2.0 - 3.0, 2.0 - 1.0], rtol=1e-6)

  def test_class_count_checks(self):
    z2 = jnp.array([[1.0, 0.0]])
    with pytest.raises(ValueError, match='at least 3 classes'):
      attacks.dlr_objective(lambda v: v, jnp.array([0]))(z2)
    with pytest.raises(ValueError, match='at least 4 classes'):
      attacks.targeted_dlr_objective(lambda v: v, jnp.array([0]), jnp.array([1]))(
          jnp.array([[1.0, 0.0, 2.0]]))
    with pytest.raises(ValueError, match='at least 2 classes'):
      attacks.margin(jnp.array([[1.0]]), jnp.array([0]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_oracle_margins(self):
    # Teacher's label at x_adv: argmax of (x0, -x0) - class 0 where x0 > 0.
    teacher = lambda xa: jnp.stack([xa[:, 0], -xa[:, 0], jnp.zeros_like(xa[:, 0])], -1)
    student = lambda xa: jnp.stack([xa[:, 1], 2 * xa[:, 1], jnp.ones_like(xa[:, 1])], -1)
    xa = jnp.array([[1.0, 3.0], [-1.0, 3.0], [1.0, -1.0]])
    # Student logits: (3, 6, 1), (3, 6, 1), (-1, -2, 1); teacher labels 0, 1, 0.
    om = self.variant(attacks.oracle_margin_objective(student, teacher))(xa)
    np.testing.assert_allclose(om, [6.0 - 3.0, 3.0 - 6.0, 1.0 + 1.0], rtol=1e-6)
    targets = jnp.array([2, 0, 1])
    otm = self.variant(attacks.oracle_targeted_margin_objective(student, teacher, targets))(xa)
    np.testing.assert_allclose(otm, [1.0 - 3.0, 3.0 - 6.0, -2.0 + 1.0], rtol=1e-6)

  def test_oracle_margin_gradient_flows_through_the_student_only(self):
    teacher = lambda xa: jnp.stack([xa[:, 0], -xa[:, 0]], -1)
    student = lambda xa: jnp.stack([xa[:, 1], -xa[:, 1]], -1)
    g = jax.grad(lambda xa: attacks.oracle_margin_objective(student, teacher)(xa).sum())(
        jnp.array([[1.0, 5.0]]))
    # t = 0: margin = s_1 - s_0 = -2 x1; no gradient through the teacher's argmax.
    np.testing.assert_allclose(g, [[0.0, -2.0]], rtol=1e-6)

  def test_top_values_is_lax_top_k(self):
    rng = np.random.default_rng(0)
    ties = jnp.asarray(rng.integers(-2, 2, size=(64, 6)).astype(np.float32))  # many ties
    z = jnp.asarray(rng.normal(size=(64, 6)).astype(np.float32))
    for k in (1, 2, 3, 4, 6):
      for logits in (ties, z):
        np.testing.assert_array_equal(jax.jit(attacks.top_values, static_argnums=1)(logits, k),
                                      jax.lax.top_k(logits, k)[0])
      weights = jnp.arange(1.0, k + 1)  # the gradient reaches the same entries (no ties)
      got = jax.grad(lambda v, k=k, w=weights: (attacks.top_values(v, k) * w).sum())(z)
      want = jax.grad(lambda v, k=k, w=weights: (jax.lax.top_k(v, k)[0] * w).sum())(z)
      np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(attacks.top_values(self.Z, 3), [[3, 2, 1], [2, 1, 0.5]])
    for k in (0, 7):
      with pytest.raises(ValueError, match='k must be'):
        attacks.top_values(z, k)

  @chex.variants(with_jit=True, without_jit=True)
  def test_top_other_classes(self):
    z = np.array([[3.0, 1.0, 2.0, 0.0], [1.0, 5.0, 1.0, 4.0]], np.float32)
    y = np.array([0, 3], np.int32)
    top = self.variant(lambda z, y: attacks.top_other_classes(z, y, 3))(z, y)
    self.assertEqual(top.dtype, jnp.int32)
    # Example 1: label 3 excluded although its logit is second; tie 0 / 2 to the lower index.
    np.testing.assert_array_equal(top, [[2, 1, 3], [1, 0, 2]])
    np.testing.assert_array_equal(attacks.top_other_classes(z, y, 1), [[2], [1]])
    # The label is excluded even when all logits tie.
    np.testing.assert_array_equal(
        attacks.top_other_classes(np.zeros((1, 3), np.float32), np.array([0]), 2), [[1, 2]])
    for k in (0, 4):
      with pytest.raises(ValueError, match='k must be'):
        attacks.top_other_classes(z, y, k)


def test_oracle_pair_objective_known_answer():
  """min(f, g): f the student's margin for class b, g the teacher's for class a minus tol."""
  s = jnp.array([[0.0, 1.0, 3.0], [2.0, 0.5, 0.0]])
  t = jnp.array([[2.0, 1.5, 0.0], [0.0, 1.0, 0.0]])
  a, b = jnp.array([0, 1]), jnp.array([2, 0])
  obj = attacks.oracle_pair_objective(lambda v: s, lambda v: t, a, b, tolerance=0.25)
  # Example 0: f = 3 - 1 = 2, g = 2 - 1.5 - 0.25 = 0.25; example 1: f = 2 - 0.5 = 1.5,
  # g = 1 - 0 - 0.25 = 0.75.
  np.testing.assert_allclose(obj(jnp.zeros((2, 1))), [0.25, 0.75], rtol=1e-6)
  smooth = attacks.oracle_pair_objective(lambda v: s, lambda v: t, a, b, tolerance=0.25,
                                         smoothing=0.5)
  want = [-0.5 * np.logaddexp(-2 / 0.5, -0.25 / 0.5), -0.5 * np.logaddexp(-1.5 / 0.5, -0.75 / 0.5)]
  np.testing.assert_allclose(smooth(jnp.zeros((2, 1))), want, rtol=1e-6)
  assert (smooth(jnp.zeros((2, 1))) <= obj(jnp.zeros((2, 1)))).all()  # soft min <= min
