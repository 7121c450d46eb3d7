"""Robust training methods (PGD-AT, CCAT, noise augmentations) and correlation statistics."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsrobust import attacks
from tsrobust import data
from tsrobust import metrics
from tsrobust import models
from tsrobust import stats
from tsrobust import train

D, R = 8, 2


class CcatTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_lambda_known_values(self):
    delta = jnp.array([[0.0, 0.0], [0.3, 0.4], [1.0, 0.0], [3.0, 4.0]])  # L2 norms 0, .5, 1, 5
    lam = self.variant(lambda d: attacks.ccat_lambda(d, 1.0, 'l2', rho=1.0))(delta)
    np.testing.assert_allclose(lam, [1.0, 0.5, 0.0, 0.0], atol=1e-6)
    lam10 = self.variant(lambda d: attacks.ccat_lambda(d, 1.0, 'l2', rho=10.0))(delta)
    np.testing.assert_allclose(lam10, [1.0, 0.5 ** 10, 0.0, 0.0], atol=1e-7)
    # L-inf uses the max coordinate: ||(0.3, 0.4)||_inf = 0.4.
    lam_inf = self.variant(lambda d: attacks.ccat_lambda(d, 0.8, 'linf', rho=2.0))(delta)
    np.testing.assert_allclose(lam_inf[1], 0.5 ** 2, rtol=1e-6)

  def test_target_interpolates_onehot_and_uniform(self):
    t = attacks.ccat_target(jnp.array([0, 2]), jnp.array([1.0, 0.25]), 4)
    np.testing.assert_allclose(t[0], [1, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(t[1], [0.1875, 0.1875, 0.4375, 0.1875], atol=1e-7)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)

  def test_objective_is_largest_non_label_confidence(self):
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    obj = attacks.ccat_objective(lambda x: x, jnp.array([0, 2]))(logits)
    np.testing.assert_allclose(obj, [0.2, 0.3], rtol=1e-5)

  def test_threshold_passes_99_percent(self):
    conf = jax.random.permutation(jax.random.PRNGKey(0), jnp.arange(1, 101) / 100.0)
    thr = attacks.confidence_threshold(conf, 0.99)
    np.testing.assert_allclose(thr, 0.02, rtol=1e-6)  # 0.02 ... 1.00 pass: 99 of 100
    self.assertEqual(int((conf >= thr).sum()), 99)
    conf = jnp.linspace(0.0, 1.0, 1000)
    thr = attacks.confidence_threshold(conf, 0.99)
    self.assertEqual(int((conf >= thr).sum()), 990)
    # Ties: every point passes when all confidences are equal.
    tied = jnp.full((10,), 0.3)
    self.assertTrue(bool((tied >= attacks.confidence_threshold(tied)).all()))
    with pytest.raises(ValueError, match='pass_rate'):
      attacks.confidence_threshold(conf, 1.5)

  def test_ccat_error_counts_only_accepted_wrong_points(self):
    # Student = teacher: never wrong, whatever the threshold.
    w = jax.random.normal(jax.random.PRNGKey(1), (D, 3))
    f = lambda x: x @ w
    x = jax.random.normal(jax.random.PRNGKey(2), (32, D))
    err = attacks.ccat_robust_error(f, f, x, jax.random.PRNGKey(3), eps=1.0, alpha=0.2,
                                    steps=5, threshold=0.0, norm='l2')
    self.assertEqual(float(err.mean()), 0.0)
    # A student that disagrees with the teacher everywhere: all accepted points are errors,
    # and a threshold above every confidence rejects them all.
    g = lambda x: -(x @ w)
    wrong = attacks.ccat_robust_error(g, f, x, jax.random.PRNGKey(3), eps=0.0, alpha=0.0,
                                      steps=1, threshold=0.0, norm='l2')
    self.assertEqual(float(wrong.mean()), 1.0)
    rejected = attacks.ccat_robust_error(g, f, x, jax.random.PRNGKey(3), eps=0.0, alpha=0.0,
                                         steps=1, threshold=1.01, norm='l2')
    self.assertEqual(float(rejected.mean()), 0.0)


def _tiny(num_seeds=1):
  teacher = models.MLP((4,), 3)
  student = models.student_of(teacher, 2)
  k = jax.random.split(jax.random.PRNGKey(7), 3)
  tparams = models.random_teacher_params(k[0], teacher, D)
  basis = data.random_orthonormal(k[1], D, R)
  p, _ = data.projectors(basis)
  sparams = student.init(k[2], jnp.zeros((1, D)))
  return teacher, student, tparams, p, sparams


def _sample(key, args, n):
  return data.sample_lowrank(key, args['projector'], n, args['scale'])


class TransformTest(chex.TestCase):

  def test_orthogonal_noise_lives_in_the_complement(self):
    _, _, _, p, _ = _tiny()
    x = data.sample_lowrank(jax.random.PRNGKey(0), p, 20, 2.0)
    args = {'projector': p, 'aug_scale': 1.5, 'aug_fraction': 0.25}
    out = train.noise_augmentation('orthogonal')(None, None, args, x, jax.random.PRNGKey(1))
    moved = np.abs(np.asarray(out - x)).max(-1) > 1e-6
    np.testing.assert_array_equal(moved, np.arange(20) < 5)  # round(0.25 * 20) = 5 rows
    np.testing.assert_allclose((out - x) @ p, 0.0, atol=1e-5)
    iso = train.noise_augmentation('isotropic')(None, None, {**args, 'aug_fraction': 1.0}, x,
                                                jax.random.PRNGKey(1))
    self.assertGreater(float(jnp.abs((iso - x) @ p).max()), 0.1)  # the control is not
    with pytest.raises(ValueError, match='noise kind'):
      train.noise_augmentation('radial')

  @pytest.mark.filterwarnings('ignore')
  def test_pgd_points_are_feasible_and_harder(self):
    teacher, student, tparams, p, sparams = _tiny()
    x = data.sample_lowrank(jax.random.PRNGKey(0), p, 16, 2.0)
    args = {'at_eps': 0.7, 'at_fraction': 1.0, 'at_projector': p}
    tr = train.pgd_augmentation(student.apply, teacher.apply, 'mse', norm='l2', steps=5)
    out = jax.jit(tr)(sparams, tparams, args, x, jax.random.PRNGKey(1))
    delta = np.asarray(out - x)
    self.assertTrue(np.all(np.linalg.norm(delta, axis=1) <= 0.7 + 1e-5))
    np.testing.assert_allclose(delta @ (np.eye(D) - np.asarray(p)), 0.0, atol=1e-5)
    loss = lambda v: train.per_example_teacher_loss(student.apply(sparams, v)[0],
                                                    teacher.apply(tparams, v)[0], 'mse')
    self.assertGreater(float(loss(out).mean()), float(loss(x).mean()))

  def test_ccat_loss_with_zero_budget_is_cross_entropy_to_teacher_labels(self):
    teacher, student, tparams, p, sparams = _tiny()
    args = {'projector': p, 'scale': 2.0, 'ccat_eps': 0.0, 'ccat_projector': jnp.eye(D)}
    key = jax.random.PRNGKey(3)
    ccat = jax.jit(train.ccat_loss(student.apply, teacher.apply, _sample, 8, norm='l2', steps=2))
    x = _sample(jax.random.split(key)[0], args, 8)
    expected = train.teacher_loss(student.apply(sparams, x)[0], teacher.apply(tparams, x)[0],
                                  'ce_argmax')
    np.testing.assert_allclose(ccat(sparams, tparams, args, key), expected, rtol=1e-5)


def _train_method(method, steps=1500, seeds=3):
  """Trains ``seeds`` students of the tiny problem with ``method``; returns params, P, tparams."""
  teacher = models.MLP((4,), 4)
  student = models.student_of(teacher, 3)
  keys = jax.random.split(jax.random.PRNGKey(11), 4 * seeds).reshape(seeds, 4, 2)
  tparams = jax.vmap(functools.partial(models.random_teacher_params, model=teacher,
                                       in_dim=D))(keys[:, 0])
  bases = jax.vmap(lambda k: data.random_orthonormal(k, D, R))(keys[:, 1])
  p = bases @ jnp.swapaxes(bases, 1, 2)
  sparams = jax.vmap(lambda k: student.init(k, jnp.zeros((1, D))))(keys[:, 2])
  args = {'projector': p, 'scale': jnp.full((seeds,), 2.0),
          'at_eps': jnp.full((seeds,), 1.0), 'at_fraction': jnp.full((seeds,), 1.0),
          'at_projector': jnp.broadcast_to(jnp.eye(D), (seeds, D, D)),
          'aug_scale': jnp.full((seeds,), 1.0), 'aug_fraction': jnp.full((seeds,), 0.5)}
  transform = {'standard': None, 'orth': train.noise_augmentation('orthogonal'),
               'at': train.pgd_augmentation(student.apply, teacher.apply, 'mse', norm='l2',
                                            steps=3)}[method]
  loss_fn = train.teacher_regression_loss(student.apply, teacher.apply, 'mse', _sample, 32,
                                          transform=transform)
  opt = train.make_optimizer('momentum', 0.05)
  state = jax.vmap(lambda q: train.init_state(q, opt))(sparams)
  final, _ = train.train_seeds(loss_fn, opt, state, tparams, args, keys[:, 3],
                               num_steps=steps, chunk_steps=steps)
  return teacher, student, tparams, p, sparams, final.params


@functools.lru_cache(maxsize=None)
def _trained(method):
  return _train_method(method)


def _off_subspace_error(method):
  teacher, student, tparams, p, _, params = _trained(method)
  errors = []
  for i in range(p.shape[0]):
    sp = jax.tree_util.tree_map(lambda v: v[i], params)
    tp = jax.tree_util.tree_map(lambda v: v[i], tparams)
    x = data.sample_lowrank(jax.random.PRNGKey(100 + i), p[i], 256, 2.0)
    err = attacks.robust_error(lambda v: student.apply(sp, v)[0],
                               lambda v: teacher.apply(tp, v)[0], x, jax.random.PRNGKey(5),
                               eps=1.0, alpha=0.15, steps=15, norm='l2', label='oracle',
                               projector=jnp.eye(D) - p[i])
    errors.append(float(err.mean()))
  return np.mean(errors)


def _off_subspace_cosine(method):
  """Mean matched-pair ``wcos_off`` over seeds, and how far ``P_perp W`` moved."""
  teacher, student, tparams, p, init, params = _trained(method)
  cos = []
  for i in range(p.shape[0]):
    pick = lambda tree, j=i: jax.tree_util.tree_map(lambda v: v[j], tree)
    x = data.sample_lowrank(jax.random.PRNGKey(200 + i), p[i], 512, 2.0)
    m = metrics.lowrank_specialization(teacher.apply, student.apply, pick(tparams),
                                       pick(params), x, p[i], jax.random.PRNGKey(9))
    cos.append(float(m['wcos_off']))
  ws = params['params']['hidden_0']['kernel']
  w0 = init['params']['hidden_0']['kernel']
  moved = float(jnp.abs((jnp.eye(D) - p) @ (ws - w0)).max())
  return float(np.mean(cos)), moved


@pytest.mark.slow  # 3 methods x 3 seeds x 1500 steps, then attacks
class MethodsReduceOffSubspaceErrorTest(chex.TestCase):
  """Claims 3-5 on a tiny problem: same seeds, same steps, different methods."""

  def test_at_and_orthogonal_augmentation_lower_off_subspace_error(self):
    standard = _off_subspace_error('standard')
    at = _off_subspace_error('at')
    orth = _off_subspace_error('orth')
    self.assertGreater(standard, 0.15)
    self.assertLess(at, standard - 0.1)
    self.assertLess(orth, standard - 0.1)

  def test_orthogonal_augmentation_aligns_off_subspace_weights(self):
    std_cos, std_moved = _off_subspace_cosine('standard')
    orth_cos, orth_moved = _off_subspace_cosine('orth')
    self.assertLess(std_moved, 1e-5)      # SGD: P_perp W stays at its initialization
    self.assertGreater(orth_moved, 1e-2)  # augmentation moves it ...
    self.assertLess(std_cos, 0.6)         # random: E|cos| ~ sqrt(2 / (pi (D - R))) = 0.33
    self.assertGreater(orth_cos, 0.9)     # ... toward the teacher's


class StatsTest(chex.TestCase):

  def test_known_pearson(self):
    x = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = jnp.array([2.0, 4.0, 5.0, 4.0, 5.0])
    np.testing.assert_allclose(stats.pearson(x, y), 6 / np.sqrt(60), rtol=1e-6)
    np.testing.assert_allclose(stats.pearson(x, -3 * x + 1), -1.0, rtol=1e-6)
    self.assertTrue(np.isnan(stats.pearson(x, jnp.ones(5))))

  def test_spearman_of_monotone_data_is_one(self):
    x = jnp.linspace(0.1, 3.0, 20)
    y = jnp.exp(3 * x)
    self.assertLess(float(stats.pearson(x, y)), 0.9)
    np.testing.assert_allclose(stats.spearman(x, y), 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats.spearman(x, -y), -1.0, rtol=1e-6)

  def test_average_ranks_with_ties(self):
    np.testing.assert_allclose(stats.average_ranks(jnp.array([10.0, 30.0, 20.0, 20.0])),
                               [1.0, 4.0, 2.5, 2.5])

  def test_bootstrap_intervals(self):
    x = jnp.linspace(0.0, 1.0, 40)
    lo, hi = stats.bootstrap_interval(stats.spearman, x, x ** 3, jax.random.PRNGKey(0), 200)
    np.testing.assert_allclose([lo, hi], [1.0, 1.0], rtol=1e-6)
    noise = jax.random.normal(jax.random.PRNGKey(1), (40,))
    rep = stats.correlation_report(x, x + 0.1 * noise, jax.random.PRNGKey(2), 500)
    self.assertLessEqual(rep['pearson_ci'][0], rep['pearson'])
    self.assertGreaterEqual(rep['pearson_ci'][1], rep['pearson'])
    self.assertGreater(rep['pearson_ci'][0], 0.0)  # strongly correlated: excludes 0
    unrelated = stats.correlation_report(x, noise, jax.random.PRNGKey(3), 500)
    self.assertLess(unrelated['pearson_ci'][0], 0.0)  # independent: includes 0
    self.assertGreater(unrelated['pearson_ci'][1], 0.0)
