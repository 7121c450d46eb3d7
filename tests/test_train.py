"""Training: losses, optimizers, chunked scans, vmapped seeds, divergence."""

import functools
import os
import tempfile

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsrobust import data
from tsrobust import models
from tsrobust import sweep
from tsrobust import train

D, R = 8, 3


class _Interrupted(Exception):
  pass


@functools.lru_cache(maxsize=None)
def _problem(num_seeds, optimizer_name='momentum', lr=0.05, weight_decay=0.0, hidden=(4,),
             batch=16):
  """A tiny low-rank problem with ``num_seeds`` seeds stacked on a leading axis.

  Cached: tests asking for the same problem share its arrays (immutable) and its
  ``loss_fn``, hence ``train_seeds``' compiled chunks.
  """
  teacher = models.MLP(hidden, 3)
  student = models.student_of(teacher, 2)
  keys = jax.random.split(jax.random.PRNGKey(0), 4 * num_seeds).reshape(num_seeds, 4, 2)
  opt = train.make_optimizer(optimizer_name, lr, weight_decay=weight_decay)

  @jax.jit  # one program, not one eager compile per operation (set-up is most of the time)
  def arrays(keys):
    tparams = jax.vmap(functools.partial(models.random_teacher_params, model=teacher,
                                         in_dim=D))(keys[:, 0])
    bases = jax.vmap(lambda k: data.random_orthonormal(k, D, R))(keys[:, 1])
    sparams = jax.vmap(lambda k: student.init(k, jnp.zeros((1, D))))(keys[:, 2])
    state = jax.vmap(lambda p: train.init_state(p, opt))(sparams)
    return tparams, bases @ jnp.swapaxes(bases, 1, 2), state
  tparams, projector, state = arrays(keys)
  loss_fn = train.teacher_regression_loss(
      student.apply, teacher.apply, 'mse',
      lambda k, a, n: data.sample_lowrank(k, a['projector'], n, a['scale']), batch)
  data_args = {'projector': projector, 'scale': jnp.full((num_seeds,), 1.5)}
  return loss_fn, opt, state, tparams, data_args, keys[:, 3]


def _index(tree, i):
  return jax.tree_util.tree_map(lambda v: v[i], tree)


class TeacherLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_known_values(self):
    s = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    t = jnp.array([[3.0, 2.0], [0.0, 4.0]])
    mse = self.variant(functools.partial(train.teacher_loss, loss='mse'))(s, t)
    np.testing.assert_allclose(mse, (4.0 + 16.0) / 4, rtol=1e-6)
    ce = self.variant(functools.partial(train.teacher_loss, loss='ce_argmax'))(s, t)
    # teacher argmax: class 0 for row 0, class 1 for row 1.
    expected = -(jax.nn.log_softmax(s[0])[0] + jax.nn.log_softmax(s[1])[1]) / 2
    np.testing.assert_allclose(ce, expected, rtol=1e-6)
    soft = self.variant(functools.partial(train.teacher_loss, loss='ce_soft'))(s, t)
    expected = -jnp.mean((jax.nn.softmax(t) * jax.nn.log_softmax(s)).sum(-1))
    np.testing.assert_allclose(soft, expected, rtol=1e-6)

  def test_gradient_does_not_flow_into_teacher(self):
    g = jax.grad(lambda t: train.teacher_loss(jnp.ones((2, 3)), t, 'mse'))(jnp.zeros((2, 3)))
    np.testing.assert_array_equal(g, 0.0)

  def test_unknown_names_raise(self):
    with pytest.raises(ValueError, match='loss must be one of'):
      train.teacher_loss(jnp.ones((1, 2)), jnp.ones((1, 2)), 'hinge')
    with pytest.raises(ValueError, match='optimizer must be one of'):
      train.make_optimizer('rmsprop', 0.1)
    with pytest.raises(ValueError, match='learning_rate must be > 0'):
      train.make_optimizer('sgd', 0.0)
    with pytest.raises(ValueError, match='total_steps'):
      train.make_optimizer('sgd', 0.1, schedule='cosine')


class TrainSeedsTest(chex.TestCase):

  def test_vmapped_equals_single_seed(self):
    loss_fn, opt, state, tparams, data_args, keys = _problem(3)
    batched, losses = train.train_seeds(loss_fn, opt, state, tparams, data_args, keys,
                                        num_steps=40, chunk_steps=20)
    self.assertEqual(losses.shape, (3, 2))
    chunk = jax.jit(train.make_chunk_fn(loss_fn, opt, 40))
    for i in range(3):
      single, single_losses = chunk(_index(state, i), _index(tparams, i),
                                    _index(data_args, i), keys[i])
      chex.assert_trees_all_close(_index(batched.params, i), single.params, atol=1e-5,
                                  rtol=1e-5)
      np.testing.assert_allclose(losses[i, -1], single_losses[20:].mean(), rtol=1e-4)
    # Seeds really differ (the test would pass vacuously if every seed were equal).
    self.assertGreater(float(jnp.abs(batched.params['params']['hidden_0']['kernel'][0]
                                     - batched.params['params']['hidden_0']['kernel'][1]).max()),
                       1e-2)

  def test_map_batching_equals_vmap(self):
    """``batching='map'`` (one seed at a time per device) trains the same students, with
    and without ``shared_args``; an unknown batching is refused."""
    loss_fn, opt, state, tparams, data_args, keys = _problem(3)
    run = functools.partial(train.train_seeds, loss_fn, opt, state, tparams, num_steps=20,
                            chunk_steps=10)
    vmapped, v_losses = run(data_args, keys)
    mapped, m_losses = run(data_args, keys, batching='map')
    chex.assert_trees_all_close(mapped.params, vmapped.params, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(m_losses, v_losses, rtol=1e-5)
    shared = {'projector': data_args['projector'][0]}
    one_subspace = {'scale': data_args['scale']}
    tiled = {**one_subspace, 'projector': jnp.broadcast_to(shared['projector'],
                                                           data_args['projector'].shape)}
    with_shared, _ = run(one_subspace, keys, shared_args=shared, batching='map')
    chex.assert_trees_all_close(with_shared.params, run(tiled, keys)[0].params, atol=1e-5,
                                rtol=1e-5)
    with pytest.raises(ValueError, match="batching must be one of"):
      run(data_args, keys, batching='pmap')

  def test_chunking_does_not_change_the_trajectory(self):
    loss_fn, opt, state, tparams, data_args, keys = _problem(2)
    whole, _ = train.train_seeds(loss_fn, opt, state, tparams, data_args, keys,
                                 num_steps=30, chunk_steps=30)
    pieces, losses = train.train_seeds(loss_fn, opt, state, tparams, data_args, keys,
                                       num_steps=30, chunk_steps=7)
    self.assertEqual(losses.shape, (2, 5))  # 7+7+7+7+2
    chex.assert_trees_all_close(whole.params, pieces.params, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(pieces.step, [30, 30])

  def test_training_lowers_the_loss(self):
    loss_fn, opt, state, tparams, data_args, keys = _problem(2)
    _, losses = train.train_seeds(loss_fn, opt, state, tparams, data_args, keys,
                                  num_steps=600, chunk_steps=100)
    self.assertTrue(np.all(losses[:, -1] < 0.2 * losses[:, 0]), losses)

  def test_a_step_reading_loss_gets_the_global_step(self):
    # loss = -w (t + 1) at step t: SGD with lr 1 adds t + 1 to w, so after steps 0..4 of
    # each seed (in chunks of 2, resumed from step 0) w = 1 + 2 + 3 + 4 + 5 = 15.
    loss_fn = train.reads_step(lambda w, tp, da, key, step: -w * (step + 1))
    opt = train.make_optimizer('sgd', 1.0)
    state = jax.vmap(lambda w: train.init_state(w, opt))(jnp.zeros((2,)))
    final, losses = train.train_seeds(loss_fn, opt, state, jnp.zeros((2,)), jnp.zeros((2,)),
                                      jax.random.split(jax.random.PRNGKey(0), 2),
                                      num_steps=5, chunk_steps=2)
    np.testing.assert_allclose(final.params, [15.0, 15.0])
    # Mean loss of each chunk: steps (0, 1): -(0*1 + 1*2)/2; (2, 3): -(3*3 + 6*4)/2; (4): -10*5.
    np.testing.assert_allclose(losses, [[-1.0, -16.5, -50.0]] * 2)

  def test_progress_callback(self):
    loss_fn, opt, state, tparams, data_args, keys = _problem(1)
    seen = []
    train.train_seeds(loss_fn, opt, state, tparams, data_args, keys, num_steps=10,
                      chunk_steps=4, on_chunk=seen.append)
    self.assertEqual([s['step'] for s in seen], [4, 8, 10])
    self.assertTrue(all(s['steps_per_sec'] > 0 and np.isfinite(s['loss']) for s in seen))
    self.assertEqual(seen[-1]['eta_sec'], 0.0)
    # No checkpointer: nothing resumed, no checkpoint.
    self.assertEqual({(s['resumed_from'], s['last_checkpoint']) for s in seen}, {(None, None)})

  def _stopped_after_chunk_2(self, **checkpointer_args):
    """A 35-step run in chunks of 7, stopped after chunk 2 with a ``Checkpointer`` of
    ``checkpointer_args``: ``(run, straight result, folder)``; ``run`` takes the keyword
    arguments of ``train_seeds`` and ``straight`` is an uninterrupted run's result."""
    loss_fn, opt, state, tparams, data_args, keys = _problem(2)
    run = functools.partial(train.train_seeds, loss_fn, opt, state, tparams, data_args, keys,
                            num_steps=35, chunk_steps=7)
    straight = run()
    folder = self.enterContext(tempfile.TemporaryDirectory())

    def stop_after_chunk_2(info):
      if info['step'] == 14:
        raise _Interrupted

    checkpointer = sweep.Checkpointer(folder, **checkpointer_args)
    with pytest.raises(_Interrupted):
      run(checkpointer=checkpointer, on_chunk=stop_after_chunk_2)
    checkpointer.close()
    return run, straight, folder

  def test_interrupted_run_resumes_to_the_same_state(self):
    """Stopped after chunk 2 (the checkpoint is saved before ``on_chunk``), the same call
    again runs only the remaining chunks and ends where an uninterrupted run ends."""
    run, (straight, straight_losses), folder = self._stopped_after_chunk_2()
    checkpointer = sweep.Checkpointer(folder)
    self.assertEqual(checkpointer.latest_step(), 14)
    seen = []
    resumed, resumed_losses = run(checkpointer=checkpointer, on_chunk=seen.append)
    checkpointer.close()
    self.assertEqual([s['step'] for s in seen], [21, 28, 35])  # chunks 1-2 not rerun
    # Each report says where training resumed and the newest checkpoint (one per chunk).
    self.assertEqual([(s['resumed_from'], s['last_checkpoint']) for s in seen],
                     [(14, 21), (14, 28), (14, 35)])
    np.testing.assert_array_equal(resumed.step, [35, 35])
    chex.assert_trees_all_close(resumed.params, straight.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(resumed.opt_state, straight.opt_state, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(resumed_losses, straight_losses, rtol=1e-6)
    # A checkpoint of another run (step 35 is past a run of 30 steps) is refused, not
    # silently reused.
    checkpointer = sweep.Checkpointer(folder)
    with pytest.raises(ValueError, match='does not belong to a run'):
      run(num_steps=30, checkpointer=checkpointer)
    checkpointer.close()

  def test_checkpoint_interval_saves_the_last_chunk(self):
    """With ``every_sec`` longer than the run, only the last chunk is saved (forced): a run
    stopped after chunk 2 left nothing to resume, so the rerun trains all 5 chunks and ends
    where an uninterrupted run ends, with its checkpoint at the last step."""
    run, (straight, _), folder = self._stopped_after_chunk_2(every_sec=3600)
    checkpointer = sweep.Checkpointer(folder, every_sec=3600)
    self.assertIsNone(checkpointer.latest_step())
    seen = []
    resumed, _ = run(checkpointer=checkpointer, on_chunk=seen.append)
    self.assertEqual(checkpointer.latest_step(), 35)
    checkpointer.close()
    self.assertEqual([s['step'] for s in seen], [7, 14, 21, 28, 35])
    self.assertEqual([s['last_checkpoint'] for s in seen], [None] * 4 + [35])
    self.assertEqual({s['resumed_from'] for s in seen}, {None})
    chex.assert_trees_all_close(resumed.params, straight.params, atol=1e-6, rtol=1e-6)

  def test_divergence_stops_with_last_good_state(self):
    loss_fn, opt, state, tparams, data_args, keys = _problem(2, optimizer_name='sgd', lr=1e6)
    with pytest.raises(train.TrainingDivergedError, match='diverged') as info:
      train.train_seeds(loss_fn, opt, state, tparams, data_args, keys, num_steps=200,
                        chunk_steps=5)
    err = info.value
    self.assertTrue(err.bad_seeds)
    self.assertEqual(err.step % 5, 0)
    np.testing.assert_array_equal(err.last_good_state.step, [err.step, err.step])
    for leaf in jax.tree_util.tree_leaves(err.last_good_state.params):
      self.assertTrue(np.isfinite(np.asarray(leaf)).all())

  def test_divergence_mid_run_keeps_the_chunk_before_it(self):
    """The loss turns NaN at step 12: chunks of 5 stop at step 10, with the state of 10 good
    steps (equal to a run of 10 steps) and the checkpoint at step 10; the chunk queued behind
    the bad one (train_seeds queues one ahead) is neither kept nor saved."""
    loss_fn, opt, state, tparams, data_args, keys = _problem(2)

    def nan_from_12(params, teacher_params, args, key, step):
      return jnp.where(step >= 12, jnp.nan, loss_fn(params, teacher_params, args, key))
    nan_from_12.reads_step = True
    folder = os.path.join(self.enterContext(tempfile.TemporaryDirectory()), 'ckpt')
    checkpointer = sweep.Checkpointer(folder)
    with pytest.raises(train.TrainingDivergedError, match='diverged') as info:
      train.train_seeds(nan_from_12, opt, state, tparams, data_args, keys, num_steps=30,
                        chunk_steps=5, checkpointer=checkpointer)
    self.assertEqual(checkpointer.latest_step(), 10)
    checkpointer.close()
    err = info.value
    self.assertEqual((err.step, err.bad_seeds), (10, [0, 1]))
    good, _ = train.train_seeds(loss_fn, opt, state, tparams, data_args, keys, num_steps=10,
                                chunk_steps=5)
    chex.assert_trees_all_close(err.last_good_state, good, atol=0, rtol=0)


class OffSubspaceWeightsTest(chex.TestCase):
  """Claim 2: SGD moves first-layer weights only inside the data subspace."""

  def _off_subspace_change(self, optimizer_name, weight_decay=0.0):
    loss_fn, opt, state, tparams, data_args, keys = _problem(
        2, optimizer_name=optimizer_name, lr=0.01 if optimizer_name == 'adam' else 0.05,
        weight_decay=weight_decay)
    final, _ = train.train_seeds(loss_fn, opt, state, tparams, data_args, keys,
                                 num_steps=300, chunk_steps=100)
    p_perp = jnp.eye(D) - data_args['projector']
    w0 = state.params['params']['hidden_0']['kernel']
    w1 = final.params['params']['hidden_0']['kernel']
    p = data_args['projector']
    moved_in = float(jnp.abs(p @ w1 - p @ w0).max())
    moved_off = float(jnp.abs(p_perp @ w1 - p_perp @ w0).max())
    return moved_in, moved_off

  @parameterized.parameters('sgd', 'momentum')
  def test_sgd_leaves_complement_at_init(self, name):
    moved_in, moved_off = self._off_subspace_change(name)
    self.assertGreater(moved_in, 1e-2)   # it did learn inside the subspace
    self.assertLess(moved_off, 1e-5)     # and nothing outside it

  def test_adam_and_weight_decay_do_move_it(self):
    # The same measurement detects a change where theory says there is one.
    _, adam_off = self._off_subspace_change('adam')
    self.assertGreater(adam_off, 1e-3)
    _, wd_off = self._off_subspace_change('sgd', weight_decay=0.5)
    self.assertGreater(wd_off, 1e-3)
