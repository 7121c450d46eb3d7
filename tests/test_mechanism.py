"""Mechanism: off-subspace movement, interventions, matching, dynamics snapshots."""

import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsrobust import data
from tsrobust import lowrank
from tsrobust import mechanism
from tsrobust import metrics
from tsrobust import models
from tsrobust import sweep
from tsrobust import train

D, R = 8, 3
TEACHER = models.MLP((4,), 3)
STUDENT = models.student_of(TEACHER, 2)


def _index(tree, i):
  return jax.tree_util.tree_map(lambda v: v[i], tree)


@functools.lru_cache(maxsize=None)
def _single():
  """One teacher, its projector (rank R of D), P_perp, a student and evaluation sets."""
  @sweep.jit_once   # set-up code: compiled at XLA's level 0 on a CPU (fast to compile)
  def arrays(key):
    k_t, k_b, k_s, k_x = jax.random.split(key, 4)
    tparams = models.random_teacher_params(k_t, TEACHER, D)
    p, p_perp = data.projectors(data.random_orthonormal(k_b, D, R))
    sparams = STUDENT.init(k_s, jnp.zeros((1, D)))
    x_in, x_off = mechanism.probe_sets(k_x, p, 512, scale=1.5)
    return tparams, p, p_perp, sparams, x_in, x_off
  return arrays(jax.random.PRNGKey(0))


def _kernel(params):
  return np.asarray(models.first_layer_kernel(params))


def _scrambled(params, p_perp, key):
  """``params`` with the first layer's off-subspace part replaced by a random one."""
  w = models.first_layer_kernel(params)
  noise = jax.random.normal(key, w.shape)
  return mechanism._with_first_layer_kernel(params, w - p_perp @ w + p_perp @ noise)


class MovementTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_when_unchanged(self):
    _, p, _, sparams, _, _ = _single()
    w0 = models.first_layer_kernel(sparams)
    self.assertEqual(float(self.variant(mechanism.off_subspace_movement)(w0, w0, p)), 0.0)
    np.testing.assert_array_equal(
        self.variant(mechanism.node_off_subspace_movement)(w0, w0, p), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_computed_ratio(self):
    _, p, p_perp, sparams, _, _ = _single()
    w0 = models.first_layer_kernel(sparams)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=w0.shape), rng.normal(size=w0.shape)
    p_np, perp_np = np.asarray(p, np.float64), np.asarray(p_perp, np.float64)
    w = np.asarray(w0) + p_np @ a + 0.3 * perp_np @ b   # moved in S and, by 0.3 P_perp b, off
    w0_np = np.asarray(w0, np.float64)
    expected = np.linalg.norm(0.3 * perp_np @ b) / np.linalg.norm(perp_np @ w0_np)
    expected_nodes = (np.linalg.norm(0.3 * perp_np @ b, axis=0)
                      / np.linalg.norm(perp_np @ w0_np, axis=0))
    w = jnp.asarray(w, jnp.float32)
    got = self.variant(mechanism.off_subspace_movement)(w, w0, p)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(self.variant(mechanism.node_off_subspace_movement)(w, w0, p),
                               expected_nodes, rtol=1e-5)
    # Params dicts: the first layer is read.
    moved = mechanism._with_first_layer_kernel(sparams, w)
    np.testing.assert_allclose(mechanism.off_subspace_movement(moved, sparams, p), expected,
                               rtol=1e-5)


class RescaleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_c_one_is_identity(self):
    _, p, _, sparams, _, _ = _single()
    out = self.variant(mechanism.rescale_off_subspace)(sparams, p, 1.0)
    chex.assert_trees_all_equal(out, sparams)

  @chex.variants(with_jit=True, without_jit=True)
  def test_c_zero_and_two(self):
    _, p, p_perp, sparams, _, _ = _single()
    w = _kernel(sparams)
    for c in (0.0, 2.0):
      out = self.variant(mechanism.rescale_off_subspace)(sparams, p, c)
      w_new = _kernel(out)
      np.testing.assert_allclose(p @ w_new, p @ w, atol=1e-6)            # P W unchanged
      np.testing.assert_allclose(p_perp @ w_new, c * (p_perp @ w), atol=1e-6)
      # Only the first-layer kernel changes: biases and the output layer stay.
      chex.assert_trees_all_equal(out['params']['output'], sparams['params']['output'])
      chex.assert_trees_all_equal(out['params']['hidden_0']['bias'],
                                  sparams['params']['hidden_0']['bias'])

  def test_vmaps_over_c(self):
    _, p, _, sparams, _, _ = _single()
    cs = jnp.array([0.0, 0.5, 2.0])
    batched = jax.vmap(lambda c: mechanism.rescale_off_subspace(sparams, p, c))(cs)
    for i, c in enumerate(cs):
      chex.assert_trees_all_close(_index(batched, i),
                                  mechanism.rescale_off_subspace(sparams, p, float(c)),
                                  atol=1e-6)


class MatchTest(parameterized.TestCase):

  def test_collisions_keep_the_best_correlated_teacher_node(self):
    corr = jnp.array([[0.9, 0.1, 0.0, 0.0],
                      [0.95, 0.2, 0.0, 0.0],   # also picks student 0, correlates more: wins
                      [0.0, 0.1, 0.8, 0.0],
                      [0.0, 0.0, 0.99, 0.0],   # ineligible (dead): proposes nothing
                      [0.0, 0.5, 0.0, 0.5]])   # tie between students 1 and 3: argmax, 1
    eligible = jnp.array([True, True, True, False, True])
    out = mechanism.match_teacher_nodes(corr, eligible)
    self.assertEqual(out['teacher_of_student'].tolist(), [1, 4, 2, -1])
    self.assertEqual(out['student_of_teacher'].tolist(), [-1, 0, 2, -1, 1])
    self.assertEqual(out['best_student'].tolist(), [0, 0, 2, 2, 1])

  def test_equal_correlations_go_to_the_lower_teacher_node(self):
    corr = jnp.array([[0.7, 0.0], [0.7, 0.1]])
    out = mechanism.match_teacher_nodes(corr, jnp.array([True, True]))
    self.assertEqual(out['teacher_of_student'].tolist(), [0, -1])
    self.assertEqual(out['student_of_teacher'].tolist(), [0, -1])


class TransplantTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_teacher_into_a_scrambled_copy_of_itself(self):
    tparams, p, p_perp, _, x_in, _ = _single()
    fn = self.variant(functools.partial(mechanism.transplant_off_subspace, TEACHER.apply,
                                        TEACHER.apply))
    # A student equal to its teacher: a no-op.
    same, info = fn(tparams, tparams, p, x_in)
    chex.assert_trees_all_close(same, tparams, atol=1e-6)
    self.assertEqual(int(info['num_zeroed']), 0)
    # The same with its off-subspace weights scrambled: the teacher's come back.
    scrambled = _scrambled(tparams, p_perp, jax.random.PRNGKey(5))
    self.assertGreater(float(jnp.abs(_kernel(scrambled) - _kernel(tparams)).max()), 0.1)
    out, info = fn(scrambled, tparams, p, x_in)
    chex.assert_trees_all_close(out, tparams, atol=1e-6)
    self.assertEqual(info['teacher_of_student'].tolist(), [0, 1, 2, 3])
    self.assertEqual(info['student_of_teacher'].tolist(), [0, 1, 2, 3])
    np.testing.assert_allclose(info['norm_ratio'], 1.0, atol=1e-5)
    self.assertEqual((int(info['num_matched']), int(info['num_zeroed'])), (4, 0))

  def test_wider_student_scaled_copies_and_unmatched_nodes(self):
    """Student nodes 0-3: teacher nodes scaled by 2 (off S scrambled), 4-7 random: the
    first four get 2 P_perp w_T (ratio 2), the others P_perp w = 0 and keep P w."""
    tparams, p, p_perp, sparams, x_in, _ = _single()
    w_t = models.first_layer_kernel(tparams)
    hidden = sparams['params']['hidden_0']
    kernel = jnp.concatenate([2.0 * w_t, hidden['kernel'][:, 4:]], axis=1)
    bias = jnp.concatenate([2.0 * tparams['params']['hidden_0']['bias'], hidden['bias'][4:]])
    student = {'params': {**sparams['params'], 'hidden_0': {'kernel': kernel, 'bias': bias}}}
    student = _scrambled(student, p_perp, jax.random.PRNGKey(6))
    out, info = mechanism.transplant_off_subspace(TEACHER.apply, STUDENT.apply, student,
                                                  tparams, p, x_in)
    w_new, w_old = _kernel(out), _kernel(student)
    np.testing.assert_allclose(w_new[:, :4], 2.0 * np.asarray(w_t), atol=1e-5)
    np.testing.assert_allclose(p_perp @ w_new[:, 4:], 0.0, atol=1e-6)
    np.testing.assert_allclose(p @ w_new[:, 4:], p @ w_old[:, 4:], atol=1e-6)
    self.assertEqual(info['teacher_of_student'].tolist(), [0, 1, 2, 3, -1, -1, -1, -1])
    np.testing.assert_allclose(info['norm_ratio'], [2.0] * 4 + [0.0] * 4, atol=1e-5)
    self.assertEqual((int(info['num_matched']), int(info['num_zeroed'])), (4, 4))
    np.testing.assert_allclose(info['match_corr'], 1.0, atol=1e-5)
    # Biases and the output layer are untouched.
    chex.assert_trees_all_equal(out['params']['output'], student['params']['output'])
    chex.assert_trees_all_equal(out['params']['hidden_0']['bias'], bias)
    # min_corr above every correlation: nothing matched, every off-subspace part zeroed.
    out, info = mechanism.transplant_off_subspace(TEACHER.apply, STUDENT.apply, student,
                                                  tparams, p, x_in, min_corr=1.5)
    self.assertEqual(int(info['num_zeroed']), 8)
    np.testing.assert_allclose(p_perp @ _kernel(out), 0.0, atol=1e-6)

  def test_intervene_by_name(self):
    tparams, p, _, sparams, x_in, _ = _single()
    args = (TEACHER.apply, STUDENT.apply, sparams, tparams, p, x_in)
    none, info = mechanism.intervene('none', *args)
    self.assertIs(none, sparams)
    self.assertEqual(info, {})
    chex.assert_trees_all_equal(mechanism.intervene('rescale', *args, c=0.5)[0],
                                mechanism.rescale_off_subspace(sparams, p, 0.5))
    chex.assert_trees_all_equal(mechanism.intervene('transplant', *args)[0],
                                mechanism.transplant_off_subspace(*args)[0])


class SnapshotTest(chex.TestCase):

  def test_vmap_equals_unbatched(self):
    tparams, p, _, sparams, x_in, x_off = _single()
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    # Three "seeds": the student moved by different random amounts, in and off S.
    moved = [mechanism._with_first_layer_kernel(
        sparams, _kernel(sparams) + 0.1 * (i + 1) * jax.random.normal(k, (D, 8)))
        for i, k in enumerate(keys)]
    stack = lambda trees: jax.tree_util.tree_map(lambda *v: jnp.stack(v), *trees)
    rep = lambda tree: stack([tree] * 3)
    batched = mechanism.batched_snapshot(TEACHER.apply, STUDENT.apply)(
        rep(tparams), stack(moved), rep(sparams), rep(p), rep(x_in), rep(x_off))
    for i in range(3):
      single = mechanism.snapshot(TEACHER.apply, STUDENT.apply, tparams, moved[i], sparams, p,
                                  x_in, x_off)
      self.assertEqual(set(single), set(batched))
      for name, value in single.items():
        chex.assert_shape(value, () if name == 'moved_off_layer' else (4,))
        np.testing.assert_allclose(batched[name][i], value, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
      self.assertGreater(float(single['moved_off_layer']), 0.0)


@functools.lru_cache(maxsize=None)
def _training_problem(num_seeds=2):
  setting = lowrank.Setting(d=D, teacher_hidden=(4,), out_dim=3, width_mult=2)
  problem = lowrank.build_problem(setting, lowrank.seed_keys(0, num_seeds))
  data_args = lowrank.lowrank_args(problem.bases, R, jnp.full((num_seeds,), 1.5))
  keys = lowrank.seed_keys(0, num_seeds)
  x_in, x_off = sweep.jit_once(jax.vmap(lambda k, pr: mechanism.probe_sets(k, pr, 256, 1.5)))(
      keys.eval, data_args['projector'])
  loss_fn = train.teacher_regression_loss(problem.student.apply, problem.teacher.apply, 'mse',
                                          lowrank.sampler(0), 16)
  return problem, data_args, keys, x_in, x_off, loss_fn


class TrainingTest(chex.TestCase):
  """Claim 2 with the library's trainer, and the recorder inside the run."""

  def _train(self, weight_decay, record_steps, chunk_steps=20, lr=0.05):
    problem, data_args, keys, x_in, x_off, loss_fn = _training_problem()
    opt = train.make_optimizer('sgd', lr, weight_decay=weight_decay)
    state = jax.vmap(lambda prm: train.init_state(prm, opt))(problem.student_params)
    snap = mechanism.batched_snapshot(problem.teacher.apply, problem.student.apply)
    record = lambda params: snap(problem.teacher_params, params, problem.student_params,
                                 data_args['projector'], x_in, x_off)
    final, losses, records = mechanism.train_with_snapshots(
        loss_fn, opt, state, problem.teacher_params, data_args, keys.train,
        record_steps=record_steps, chunk_steps=chunk_steps, record=record)
    return opt, state, final, losses, records

  def test_sgd_leaves_p_perp_w_at_init_and_records_the_run(self):
    problem, data_args, keys, x_in, x_off, loss_fn = _training_problem()
    steps = mechanism.log_spaced_steps(60, 20, 4)
    self.assertEqual(steps, (0, 20, 40, 60))
    opt, state, final, losses, records = self._train(0.0, steps)
    # One pass cut at the recorded steps is the uninterrupted run.
    plain, plain_losses = train.train_seeds(loss_fn, opt, state, problem.teacher_params,
                                            data_args, keys.train, num_steps=60,
                                            chunk_steps=20)
    chex.assert_trees_all_close(final.params, plain.params, atol=1e-7, rtol=0)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
    # Claim 2: the first layer learned in S and did not move off it.
    projector = data_args['projector']
    w0 = models.first_layer_kernel(problem.student_params)
    w1 = models.first_layer_kernel(final.params)
    moved_in = jax.vmap(lambda pr, a, b: jnp.linalg.norm(pr @ (a - b)))(projector, w1, w0)
    self.assertGreater(float(moved_in.min()), 1e-2)
    movement = jax.vmap(mechanism.off_subspace_movement)(w1, w0, projector)
    self.assertLess(float(movement.max()), 1e-5)
    # The records: [seeds, points, J], starting at exactly 0 movement, staying < 1e-5.
    chex.assert_shape(records['corr_in'], (2, 4, 4))
    chex.assert_shape(records['moved_off_layer'], (2, 4))
    np.testing.assert_array_equal(records['moved_off_layer'][:, 0], 0.0)
    self.assertLess(float(np.nanmax(records['moved_off'])), 1e-5)
    self.assertLess(float(records['moved_off_layer'].max()), 1e-5)
    # The last point is the end-of-training specialization of metrics.lowrank_specialization
    # on the same inputs (its probes are data.off_subspace_probe's, as probe_sets').
    spec = jax.jit(jax.vmap(functools.partial(metrics.lowrank_specialization,
                                              problem.teacher.apply, problem.student.apply)))
    k_off = jax.vmap(lambda k: jax.random.split(k)[1])(keys.eval)
    refs = spec(problem.teacher_params, final.params, x_in, projector, k_off)
    for s in range(2):
      ref = _index(refs, s)
      last = _index(records, s)
      alive = np.asarray(last['alive'][-1])
      np.testing.assert_allclose(np.asarray(last['corr_in'][-1])[alive].mean(),
                                 ref['spec_in'][0], atol=1e-5)
      np.testing.assert_allclose(np.nanmean(np.asarray(last['corr_off'][-1])[alive]),
                                 ref['spec_off'][0], atol=1e-5)
      np.testing.assert_allclose(np.abs(np.asarray(last['wcos_off'][-1])[alive]).mean(),
                                 ref['wcos_off'], atol=1e-5)
      np.testing.assert_allclose(np.asarray(last['wcos_in'][-1])[alive].mean(),
                                 ref['wcos_in'], atol=1e-5)

  def test_weight_decay_shrinks_p_perp_w(self):
    """With an L2 penalty the off-subspace part only decays: P_perp W_t = (1 - lr wd)^t
    P_perp W_0, so the movement is exactly 1 - (1 - lr wd)^t."""
    lr, wd = 0.05, 0.5
    _, _, _, _, records = self._train(wd, (0, 60), lr=lr)
    np.testing.assert_allclose(records['moved_off_layer'][:, -1], 1 - (1 - lr * wd) ** 60,
                               rtol=1e-4)
    self.assertGreater(float(records['moved_off_layer'][:, -1].min()), 0.5)


class LogSpacedStepsTest(parameterized.TestCase):

  @parameterized.parameters((1000, 10, 6), (18000, 500, 12), (100, 30, 5), (50, 100, 4))
  def test_on_chunk_boundaries(self, num_steps, chunk_steps, num_points):
    steps = mechanism.log_spaced_steps(num_steps, chunk_steps, num_points)
    self.assertEqual((steps[0], steps[-1]), (0, num_steps))
    self.assertEqual(list(steps), sorted(set(steps)))
    self.assertLessEqual(len(steps), num_points)
    self.assertTrue(all(s % chunk_steps == 0 for s in steps[:-1]))

  def test_known_values(self):
    self.assertEqual(mechanism.log_spaced_steps(1000, 10, 6), (0, 10, 30, 100, 320, 1000))
    self.assertEqual(mechanism.log_spaced_steps(50, 100, 4), (0, 50))


class BadInputTest(parameterized.TestCase):

  def test_full_rank_projector(self):
    tparams, _, _, sparams, x_in, _ = _single()
    eye = jnp.eye(D)
    w = models.first_layer_kernel(sparams)
    calls = [lambda: mechanism.off_subspace_movement(w, w, eye),
             lambda: mechanism.rescale_off_subspace(sparams, eye, 0.5),
             lambda: mechanism.transplant_off_subspace(TEACHER.apply, STUDENT.apply, sparams,
                                                       tparams, eye, x_in),
             lambda: mechanism.intervene('none', TEACHER.apply, STUDENT.apply, sparams,
                                         tparams, eye, x_in),
             lambda: mechanism.check_projector(jnp.stack([eye, eye]))]
    for call in calls:
      with pytest.raises(ValueError, match='projector is full rank'):
        call()

  @parameterized.parameters(-1.0, float('nan'), float('inf'))
  def test_bad_rescale_factor(self, c):
    _, p, _, sparams, _, _ = _single()
    with pytest.raises(ValueError, match='^c must be >= 0'):
      mechanism.rescale_off_subspace(sparams, p, c)

  def test_bad_scales(self):
    _, p, _, _, _, _ = _single()
    for kwargs, field in (({'scale': 0.0}, 'scale'), ({'scale': -1.0}, 'scale'),
                          ({'probe_scale': 0.0}, 'probe_scale'), ({'n': 1}, 'n')):
      args = {'n': 16, **kwargs}
      with pytest.raises(ValueError, match=f'^{field} must be'):
        mechanism.probe_sets(jax.random.PRNGKey(0), p, **args)

  def test_unknown_intervention(self):
    tparams, p, _, sparams, x_in, _ = _single()
    with pytest.raises(ValueError, match="intervention name must be one of .* got 'graft'"):
      mechanism.intervene('graft', TEACHER.apply, STUDENT.apply, sparams, tparams, p, x_in)

  def test_x_eval_off_the_subspace_and_shapes(self):
    tparams, p, _, sparams, _, x_off = _single()
    with pytest.raises(ValueError, match='^x_eval must lie in the data subspace'):
      mechanism.transplant_off_subspace(TEACHER.apply, STUDENT.apply, sparams, tparams, p,
                                        x_off)
    with pytest.raises(AssertionError):   # chex: x_eval of the wrong dimension
      mechanism.transplant_off_subspace(TEACHER.apply, STUDENT.apply, sparams, tparams, p,
                                        jnp.zeros((16, D + 1)))

  def test_linear_model_has_no_nodes_to_match(self):
    linear = models.MLP((), 3)
    params = linear.init(jax.random.PRNGKey(0), jnp.zeros((1, D)))
    _, p, _, _, x_in, _ = _single()
    with pytest.raises(ValueError, match='must have a hidden layer'):
      mechanism.transplant_off_subspace(linear.apply, linear.apply, params, params, p, x_in)

  def test_bad_steps(self):
    for args, field in (((0, 10, 5), 'num_steps'), ((100, 0, 5), 'chunk_steps'),
                        ((100, 10, 1), 'num_points'), ((100.0, 10, 5), 'num_steps')):
      with pytest.raises(ValueError, match=f'^{field} must be an integer'):
        mechanism.log_spaced_steps(*args)
    problem, data_args, keys, _, _, loss_fn = _training_problem()
    opt = train.make_optimizer('sgd', 0.05)
    state = jax.vmap(lambda prm: train.init_state(prm, opt))(problem.student_params)
    for bad in ((), (20, 10), (-1, 10)):
      with pytest.raises(ValueError, match='^record_steps must be'):
        mechanism.train_with_snapshots(loss_fn, opt, state, problem.teacher_params, data_args,
                                       keys.train, record_steps=bad, chunk_steps=10,
                                       record=lambda params: {})
