"""The method registry (tsrobust.methods), and both study binaries taking their grids from it."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import real
from experiments import robustness
from experiments import validation
from experiments.configs import real as real_config
from experiments.configs import robustness as robustness_config
from tsrobust import methods
from tsrobust import models
from tsrobust import robust_dataset
from tsrobust import train


class TestGrid:

  def test_image_grid_known_points(self):
    points = methods.grid(('standard', 'at', 'ccat', 'robust_features', 'orth', 'iso'),
                          at_eps=(0.1, 0.3), ccat_eps=(0.3,), aug_scales=(0.5, 1.0))
    assert points == [
        ('standard', {}), ('at', {'at_eps': 0.1}), ('at', {'at_eps': 0.3}),
        ('ccat', {'ccat_eps': 0.3}), ('robust_features', {}),
        ('orth', {'aug_scale': 0.5}), ('orth', {'aug_scale': 1.0}),
        ('iso', {'aug_scale': 0.5}), ('iso', {'aug_scale': 1.0})]

  def test_subspace_at_is_where_major_with_its_label(self):
    points = methods.grid(('at', 'standard'), at_eps=(0.5, 1.0), at_where=('full', 'in'),
                          at_label='fixed')
    assert points == [
        ('at', {'at_eps': 0.5, 'at_where': 'full', 'at_label': 'fixed'}),
        ('at', {'at_eps': 1.0, 'at_where': 'full', 'at_label': 'fixed'}),
        ('at', {'at_eps': 0.5, 'at_where': 'in', 'at_label': 'fixed'}),
        ('at', {'at_eps': 1.0, 'at_where': 'in', 'at_label': 'fixed'}),
        ('standard', {})]

  def test_bad_input(self):
    with pytest.raises(ValueError, match='unknown methods'):
      methods.grid(('standard', 'trades'))
    with pytest.raises(ValueError, match='at_where values must be in'):
      methods.grid(('at',), at_eps=(0.1,), at_where=('off',))

  def test_columns_and_names(self):
    assert methods.hparam_columns(True) == ('at_eps', 'at_where', 'at_label', 'ccat_eps',
                                            'aug_scale')
    assert methods.hparam_columns(False) == ('at_eps', 'ccat_eps', 'aug_scale')
    assert methods.variant_name('at', {'at_eps': 0.1}) == 'at 0.1'
    assert methods.variant_name('orth', {'aug_scale': 2}) == 'orth 2'
    assert methods.variant_name('at', {'at_eps': 8.0, 'at_where': 'in'}) == 'at 8.0'
    assert methods.variant_name('robust_features', {}) == 'robust_features'
    assert methods.group_by_method([('at', {'at_eps': 1}), ('iso', {}), ('at', {'at_eps': 2})]) \
        == [('at', [('at', {'at_eps': 1}), ('at', {'at_eps': 2})]), ('iso', [('iso', {})])]


class TestBinariesUseTheRegistry:
  """Both study binaries take their grid from ``tsrobust.methods.grid``, before any work."""

  class _Stop(Exception):
    pass

  def _grid_call(self, binary, config, tmp_path):
    calls = []

    def spy(*args, **kwargs):
      calls.append((args, kwargs))
      raise self._Stop()
    with mock.patch.object(methods, 'grid', spy), pytest.raises(self._Stop):
      binary.train_and_evaluate(config, str(tmp_path))
    assert len(calls) == 1
    return calls[0]

  def test_robustness(self, tmp_path):
    config = robustness_config.get_config()
    config.update(methods=('standard', 'at'), at_eps=(0.5,), at_where=('in',))
    args, kwargs = self._grid_call(robustness, config, tmp_path)
    assert args == (('standard', 'at'),)
    assert kwargs['at_where'] == ('in',) and kwargs['at_label'] == config.at_label
    assert tuple(kwargs['at_eps']) == (0.5,)
    # Unpatched, the binary's grid is the registry's.
    assert robustness.grid(config) == methods.grid(
        ('standard', 'at'), at_eps=(0.5,), at_where=('in',), at_label=config.at_label)

  def test_real(self, tmp_path):
    config = real_config.get_config()
    config.update(methods=('ccat', 'robust_features'), ccat_eps=(0.2,))
    args, kwargs = self._grid_call(real, config, tmp_path)
    assert args == (('ccat', 'robust_features'),)
    assert tuple(kwargs['ccat_eps']) == (0.2,) and 'at_where' not in kwargs
    assert real.grid(config) == [('ccat', {'ccat_eps': 0.2}), ('robust_features', {})]


class TestANewMethod:
  """A method is one registry entry: registered here, the robustness binary runs it unchanged."""

  @pytest.mark.slow  # trains and evaluates 4 students end to end (about 30 s of CPU)
  def test_registered_method_runs_through_the_robustness_binary(self, tmp_path, monkeypatch):
    def copy_loss(student_apply, teacher_apply, sample, settings):
      # Standard training's loss, written as a user would for a new method.
      return train.teacher_regression_loss(student_apply, teacher_apply, settings.loss, sample,
                                           settings.batch_size)
    monkeypatch.setattr(methods, 'METHODS', dict(methods.METHODS))  # the registry restored
    methods.register(methods.Method('copy_of_standard', copy_loss))
    assert methods.names(synthetic=True)[-1] == 'copy_of_standard'
    with pytest.raises(ValueError, match='registered already'):
      methods.register(methods.Method('copy_of_standard', copy_loss))

    config = robustness_config.get_config()
    config.update(methods=('standard', 'copy_of_standard'), num_seeds=2, d=6, rank=2,
                  teacher_hidden=(3,), out_dim=3, width_mult=2, num_steps=20, chunk_steps=20,
                  batch_size=16, num_eval=32, eval_batch=32, num_attack=8,
                  attack=dict(strength='fast', apgd_t_steps=0, square_queries=0),
                  convergence_points=0, bootstrap_resamples=10)
    records = robustness.train_and_evaluate(config, str(tmp_path))
    assert [r['method'] for r in records] == ['standard'] * 2 + ['copy_of_standard'] * 2
    # Known answer: the same loss on the same seeds' keys trains and evaluates the same
    # students, so every column but the name is equal.
    for std, new in zip(records[:2], records[2:]):
      assert {k: v for k, v in new.items() if k != 'method'} == \
          {k: v for k, v in std.items() if k != 'method'}
    assert records[0] != records[1]  # two seeds, two students
    with pytest.raises(validation.ConfigError, match="did you mean 'copy_of_standard'"):
      robustness.validate_config(_with(config, methods=('copy_of_standrd',)))


def _with(config, **overrides):
  out = config.copy_and_resolve_references()
  out.update(overrides)
  return out


class TestStudentArgs:

  def test_values_per_student_grid_major(self):
    settings = methods.Settings(at_fraction=0.5, aug_fraction=0.25, budget_scale=0.5)
    args = methods.student_args([('at', {'at_eps': 0.2}), ('at', {'at_eps': 0.6})], 3, settings)
    np.testing.assert_allclose(args['at_eps'], [0.1] * 3 + [0.3] * 3, rtol=1e-6)
    np.testing.assert_array_equal(args['at_fraction'], [0.5] * 6)
    assert args['at_eps'].dtype == jnp.float32
    args = methods.student_args([('ccat', {'ccat_eps': 8.0})], 2, settings)
    np.testing.assert_allclose(args['ccat_eps'], [4.0, 4.0])
    args = methods.student_args([('iso', {'aug_scale': 0.3}), ('iso', {'aug_scale': 1.0})], 1,
                                settings)  # noise scales are not budgets: not rescaled
    np.testing.assert_allclose(args['aug_scale'], [0.3, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(args['aug_fraction'], [0.25, 0.25])
    assert methods.student_args([('standard', {})], 4, settings) == {}
    with pytest.raises(ValueError, match='of one method'):
      methods.student_args([('at', {'at_eps': 0.1}), ('ccat', {'ccat_eps': 0.1})], 1, settings)

  def test_subspace_args(self):
    proj = jnp.stack([jnp.diag(jnp.array([1.0, 0.0, 0.0])), jnp.diag(jnp.array([0., 1., 0.]))])
    points = [('at', {'at_eps': 1.0, 'at_where': 'full'}),
              ('at', {'at_eps': 1.0, 'at_where': 'in'})]
    at = methods.subspace_args(points, proj)['at_projector']
    np.testing.assert_array_equal(at, np.stack([np.eye(3), np.eye(3), proj[0], proj[1]]))
    ccat = methods.subspace_args([('ccat', {'ccat_eps': 1.0})], proj)['ccat_projector']
    np.testing.assert_array_equal(ccat, np.stack([np.eye(3)] * 2))
    assert methods.subspace_args([('orth', {'aug_scale': 1.0})], proj) == {}

  def test_tile_and_index(self):
    tree = {'a': jnp.array([1, 2]), 'b': jnp.array([[1.0], [2.0]])}
    tiled = methods.tile(tree, 3)
    np.testing.assert_array_equal(tiled['a'], [1, 2, 1, 2, 1, 2])
    assert tiled['b'].shape == (6, 1)
    assert methods.student_index(2, 1, 4) == 9
    assert int(tiled['a'][methods.student_index(2, 1, 2)]) == 2  # seed 1's value

  def test_records_and_mask(self):
    points = [('standard', {}), ('at', {'at_eps': 0.1}), ('at', {'at_eps': 0.3})]
    # 2 kept seeds of 3 computed (a padded seed per grid point), students grid-major.
    mask = methods.student_mask(points, 'at', 2, 3)
    np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1, 0, 1, 1, 0])
    loss = np.arange(9, dtype=np.float64)
    rows = [{'metric': 10 * i} for i in range(9)]
    recs = methods.records(points, 2, 3, ('at_eps', 'ccat_eps'), loss, rows, variant=True)
    assert [(r['method'], r['seed'], r['train_loss'], r['metric']) for r in recs] == [
        ('standard', 0, 0.0, 0), ('standard', 1, 1.0, 10), ('at', 0, 3.0, 30),
        ('at', 1, 4.0, 40), ('at', 0, 6.0, 60), ('at', 1, 7.0, 70)]
    assert list(recs[2]) == ['method', 'variant', 'at_eps', 'ccat_eps', 'seed', 'train_loss',
                             'metric']
    assert recs[4]['variant'] == 'at 0.3' and recs[0]['at_eps'] is None
    with pytest.raises(ValueError, match='one dict per student'):
      methods.records(points, 2, 3, (), loss, rows[:8])
    # With the seeds' teachers: a teacher field before the seed, the same at every grid point.
    recs = methods.records(points, 2, 3, ('at_eps',), loss, rows, teachers=[7, 7])
    assert list(recs[2])[:4] == ['method', 'at_eps', 'teacher', 'seed']
    assert [r['teacher'] for r in recs] == [7] * 6
    with pytest.raises(ValueError, match='one teacher per seed'):
      methods.records(points, 2, 3, (), loss, rows, teachers=[0])
    with pytest.raises(ValueError, match='num_padded must be'):
      methods.student_mask(points, 'at', 3, 2)


class TestMakeLoss:
  """Each method's loss is the library loss it names, with the settings passed through."""

  def _setup(self):
    teacher = models.MLP((3,), 3)
    student = models.student_of(teacher, 2)
    tp = models.random_teacher_params(jax.random.PRNGKey(0), teacher, in_dim=4)
    sp = student.init(jax.random.PRNGKey(1), jnp.zeros((1, 4)))
    x = jax.random.normal(jax.random.PRNGKey(2), (16, 4))
    sample = lambda key, a, n: a['train_x'][jax.random.randint(key, (n,), 0, 16)]
    return teacher, student, tp, sp, x, sample

  def test_losses_equal_the_library_constructions(self):
    teacher, student, tp, sp, x, sample = self._setup()
    s = methods.Settings(loss='mse', batch_size=8, at_norm='l2', at_steps=2, at_label='fixed',
                         ccat_norm='linf', ccat_steps=2, ccat_rho=5.0, step_factor=2.0)
    key = jax.random.PRNGKey(3)
    args = {'train_x': x, 'at_eps': jnp.float32(0.5), 'at_fraction': jnp.float32(0.5),
            'ccat_eps': jnp.float32(0.3), 'aug_scale': jnp.float32(0.4),
            'aug_fraction': jnp.float32(1.0), 'robust_x': x[::-1],
            'projector': jnp.diag(jnp.array([1.0, 1.0, 0.0, 0.0]))}
    want = {
        'standard': train.teacher_regression_loss(student.apply, teacher.apply, 'mse', sample, 8),
        'at': train.teacher_regression_loss(
            student.apply, teacher.apply, 'mse', sample, 8, label_at='clean',
            transform=train.pgd_augmentation(student.apply, teacher.apply, 'mse', norm='l2',
                                             steps=2, step_factor=2.0, label='fixed')),
        'ccat': train.ccat_loss(student.apply, teacher.apply, sample, 8, norm='linf', steps=2,
                                step_factor=2.0, rho=5.0),
        'robust_features': robust_dataset.paired_regression_loss(student.apply, teacher.apply,
                                                                 'mse', 8),
        'orth': train.teacher_regression_loss(student.apply, teacher.apply, 'mse', sample, 8,
                                              transform=train.noise_augmentation('orthogonal')),
        'iso': train.teacher_regression_loss(student.apply, teacher.apply, 'mse', sample, 8,
                                             transform=train.noise_augmentation('isotropic')),
    }
    values = set()
    for method in methods.METHODS:
      got = methods.make_loss(method, student.apply, teacher.apply, sample, s)(sp, tp, args, key)
      np.testing.assert_allclose(got, want[method](sp, tp, args, key), rtol=1e-6,
                                 err_msg=method)
      values.add(round(float(got), 6))
    assert len(values) == len(methods.METHODS)  # six different losses
    with pytest.raises(ValueError, match='unknown methods'):
      methods.make_loss('trades', student.apply, teacher.apply, sample, s)
