"""The real-image experiment: config checks, image transforms, teacher checkpoints, the binary."""

import json
import os

from absl import flags
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments import real
from experiments.configs import real as real_config
from tsrobust import cnn
from tsrobust import datasets
from tsrobust import io
from tsrobust import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(num_seeds=2, num_train=64, num_test=40, teacher_conv=(2,), teacher_dense=(4,),
            teacher_training='pgd', teacher_steps=10, teacher_batch=16, teacher_pgd_steps=1,
            rf_steps=2, rf_batch=32, methods=('standard', 'at', 'ccat', 'robust_features'),
            at_eps=(0.1,), at_steps=1, ccat_steps=1, num_steps=4, chunk_steps=4, batch_size=8,
            eps=(0.1, 0.3), attack_strength='fast', num_attack=8, eval_batch=20,
            bootstrap_resamples=20)


def tiny_config(**overrides):
  config = real_config.get_config()
  config.update(TINY)
  config.update(overrides)
  return config


def _toy_dataset(n=32, m=10, hw=8):
  rng = np.random.default_rng(0)
  return datasets.Dataset(rng.uniform(size=(n, hw, hw, 1)).astype(np.float32),
                          rng.integers(0, 10, n).astype(np.int32),
                          rng.uniform(size=(m, hw, hw, 1)).astype(np.float32),
                          rng.integers(0, 10, m).astype(np.int32), 'toy')


class TestConfig:

  def test_defaults_are_valid(self):
    real.validate_config(real_config.get_config())

  @pytest.mark.parametrize('overrides, message', [
      (dict(dataset='svhn'), r"config.dataset must be one of \('mnist', 'cifar10'\)"),
      (dict(dataset='cifar10'), 'config.data_dir must name the folder holding the CIFAR-10'),
      (dict(data_dir='/nonexistent/mnist'), "config.data_dir '/nonexistent/mnist' does not exist"),
      (dict(methods=('standard', 'fgsm')), 'config.methods must be distinct names from'),
      (dict(methods=('standard', 'orth')), 'config.methods: orth .* needs config.lowrank_rank'),
      (dict(at_eps=(-0.1,)), 'config.at_eps values must be >= 0'),
      (dict(teacher_training='fgsm'), 'config.teacher_training must be one of'),
      (dict(teacher_conv=()), 'config.teacher_conv must be a sequence of at least 1'),
      (dict(rf_start='zeros'), 'config.rf_start must be one of'),
      (dict(methods=('ccat',), batch_size=1), 'config.batch_size must be >= 2'),
  ])
  def test_bad_fields_are_named(self, overrides, message):
    with pytest.raises(common.ConfigError, match=message):
      real.validate_config(tiny_config(**overrides))

  def test_data_dir_without_the_files(self, tmp_path):
    (tmp_path / 'train-images-idx3-ubyte.gz').write_bytes(b'')
    with pytest.raises(common.ConfigError, match=r"lacks the mnist files \['train-labels"):
      real.validate_config(tiny_config(data_dir=str(tmp_path)))
    with pytest.raises(common.ConfigError, match=r"lacks the cifar10 files \['data_batch_1.bin"):
      real.validate_config(tiny_config(dataset='cifar10', data_dir=str(tmp_path)))

  def test_sizes_checked_after_loading(self):
    with pytest.raises(common.ConfigError, match='config.eval_batch must divide the number of '
                                                 'test images 10'):
      real._validate_sizes(tiny_config(eval_batch=3, num_attack=4), _toy_dataset())

  def test_cifar_preset_and_budget_names(self):
    c = real_config.get_config('cifar10')
    with pytest.raises(common.ConfigError, match='config.data_dir must name the folder'):
      real.validate_config(c)
    assert real.budget_name(c, 8.0) == '8.0_255'
    assert real.budget(c, 8.0) == pytest.approx(8 / 255)
    assert real.budget_name(real_config.get_config(), 0.1) == '0.1'
    with pytest.raises(ValueError, match='preset'):
      real_config.get_config('svhn')


class TestImageTransforms(chex.TestCase):

  def _nets(self):
    teacher = cnn.make_cnn((2,), (4,), 3)
    student = cnn.student_of(teacher, 2)
    tp = cnn.init_params(jax.random.PRNGKey(0), teacher, (6, 6, 1))
    sp = cnn.init_params(jax.random.PRNGKey(1), student, (6, 6, 1))
    x = jax.random.uniform(jax.random.PRNGKey(2), (8, 6, 6, 1))
    return teacher, student, tp, sp, x

  @chex.variants(with_jit=True, without_jit=True)
  def test_linf_pgd_augmentation_is_feasible_and_clipped(self):
    teacher, student, tp, sp, x = self._nets()
    transform = train.pgd_augmentation(student.apply, teacher.apply, 'mse', norm='linf',
                                       steps=3, clip_range=(0.0, 1.0))
    args = {'at_eps': jnp.float32(0.2), 'at_fraction': jnp.float32(0.5)}
    xa = self.variant(transform)(sp, tp, args, x, jax.random.PRNGKey(3))
    chex.assert_shape(xa, x.shape)
    delta = xa - x
    assert float(jnp.abs(delta).max()) <= 0.2 + 1e-6
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    np.testing.assert_array_equal(delta[4:], 0.0)  # only the first half is attacked
    assert float(jnp.abs(delta[:4]).max()) > 0.0

  def test_library_pgd_augmentation_flattens_nhwc(self):
    # train.pgd_augmentation with a [D, D] projector works on NHWC images (it does not clip).
    teacher, student, tp, sp, x = self._nets()
    transform = train.pgd_augmentation(student.apply, teacher.apply, 'mse', norm='linf', steps=2)
    args = {'at_eps': jnp.float32(0.1), 'at_fraction': jnp.float32(1.0),
            'at_projector': jnp.eye(36)}
    xa = jax.jit(transform)(sp, tp, args, x, jax.random.PRNGKey(0))
    chex.assert_shape(xa, x.shape)
    assert float(jnp.abs(xa - x).max()) <= 0.1 + 1e-6

  def test_ccat_loss_and_noise(self):
    teacher, student, tp, sp, x = self._nets()
    sample = lambda k, a, n: a['train_x'][jax.random.randint(k, (n,), 0, 8)]
    loss_fn = jax.jit(train.ccat_loss(student.apply, teacher.apply, sample, 8, norm='linf',
                                      steps=2, clip_range=(0.0, 1.0)))
    key = jax.random.PRNGKey(0)
    # Zero budget: nothing to attack, every target one-hot: the cross-entropy to the
    # teacher's labels on the batch the loss draws (with the first half of its key).
    clean = loss_fn(sp, tp, {'train_x': x, 'ccat_eps': jnp.float32(0.0)}, key)
    batch = sample(jax.random.split(key)[0], {'train_x': x}, 8)
    want = train.teacher_loss(student.apply(sp, batch)[0], teacher.apply(tp, batch)[0],
                              'ce_argmax')
    np.testing.assert_allclose(clean, want, rtol=1e-5)
    # A budget: the attacked half gets other points and softened targets.
    value = loss_fn(sp, tp, {'train_x': x, 'ccat_eps': jnp.float32(0.3)}, key)
    assert np.isfinite(float(value)) and abs(float(value) - float(want)) > 1e-4
    u = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(4), (36, 5)))[0]
    p = u @ u.T
    orth = train.noise_augmentation('orthogonal')
    xa = orth(None, None, {'aug_scale': 1.0, 'aug_fraction': 1.0, 'projector': p}, x,
              jax.random.PRNGKey(1))
    noise = (xa - x).reshape(8, -1)
    np.testing.assert_allclose(noise @ p, 0.0, atol=1e-5)
    assert float(jnp.abs(noise).max()) > 0.1

  def test_supervised_pgd_loss_is_higher_than_clean(self):
    teacher, _, tp, _, x = self._nets()
    args = {'train_x': x, 'train_y': jnp.arange(8) % 3, 'at_eps': jnp.float32(0.3)}
    clean = real.supervised_loss(teacher.apply, 8, 8, pgd_steps=0)
    adv = real.supervised_loss(teacher.apply, 8, 8, pgd_steps=3)
    key = jax.random.PRNGKey(0)
    assert float(adv(tp, None, args, key)) > float(clean(tp, None, args, key))


class TestTeacherCheckpoint:

  def test_round_trip_and_changed_config(self, tmp_path):
    ds = _toy_dataset()
    config = tiny_config(teacher_steps=6, teacher_training='standard')
    model = real.teacher_model(config)
    workdir = str(tmp_path)
    spec = real.teacher_spec(config)
    p1, info1 = real.pretrain_teacher(spec, model, ds, workdir)
    assert not info1['reused']
    assert os.path.exists(os.path.join(info1['folder'], 'spec.json'))
    p2, info2 = real.pretrain_teacher(real.teacher_spec(config), model, ds, workdir)
    assert info2['reused'] and info2['folder'] == info1['folder']
    chex.assert_trees_all_equal(p1, p2)
    # A field that is not the teacher's does not change the folder ...
    assert real.teacher_spec(tiny_config(teacher_steps=6, teacher_training='standard',
                                         num_steps=99)) == spec
    # ... a teacher field does: a new teacher is trained, not the stale one reused.
    changed = real.teacher_spec(tiny_config(teacher_steps=6, teacher_training='standard',
                                            teacher_lr=0.01))
    p3, info3 = real.pretrain_teacher(changed, model, ds, workdir)
    assert not info3['reused'] and info3['folder'] != info1['folder']
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p1),
                                                          jax.tree_util.tree_leaves(p3)))
    # The robust model is a PGD-trained variant, or the teacher itself when that is PGD-trained.
    assert real.teacher_spec(config, 'robust_model')['teacher_training'] == 'pgd'
    pgd = tiny_config(teacher_training='pgd')
    assert real.teacher_spec(pgd, 'robust_model') == real.teacher_spec(pgd)
    # A folder whose recorded spec does not match is refused.
    with open(os.path.join(info1['folder'], 'spec.json'), 'w') as f:
      json.dump({'edited': True}, f)
    with pytest.raises(ValueError, match='holds a different teacher config'):
      real.pretrain_teacher(spec, model, ds, workdir)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('real'))
  return workdir, real.train_and_evaluate(tiny_config(), workdir)


@pytest.mark.slow
def test_binary_writes_files_that_parse(tiny_run):
  workdir, records = tiny_run
  for name in ('results.csv', 'results.json', 'summary.json', 'summary.md', 'config.json',
               'specialization_layers.png', 'spec_vs_robust.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  rows = io.read_csv(os.path.join(workdir, 'results.csv'))
  # standard + at (1 eps) + ccat (1 eps) + robust_features = 4 grid points x 2 seeds.
  assert len(rows) == len(records) == 8
  assert [r['method'] for r in rows] == [m for m in ('standard', 'at', 'ccat', 'robust_features')
                                         for _ in range(2)]
  assert [r['seed'] for r in rows] == [0, 1] * 4
  for r in rows:
    assert r['spec_mean'] == pytest.approx((r['spec_l1'] + r['spec_l2']) / 2, abs=1e-6)
    # Fractions of the 40 test images and of the 8 attacked ones.
    for col in ('clean_acc', 'clean_agree'):
      assert r[col] * 40 == pytest.approx(round(r[col] * 40), abs=1e-6), col
    for kind in ('oracle', 'true'):
      small, large = r[f'robust_acc_{kind}_0.1'], r[f'robust_acc_{kind}_0.3']
      assert large <= small  # nested budgets
      for e, ensemble in (('0.1', small), ('0.3', large)):
        assert ensemble * 8 == pytest.approx(round(ensemble * 8), abs=1e-6)
        for attack in ('pgd', 'apgd', 'apgd_t', 'square'):  # the worst case over each attack
          assert ensemble <= r[f'robust_acc_{kind}_{e}_{attack}'] + 1e-9, (kind, e, attack)
    assert (r['ccat_err_0.1'] is not None) == (r['method'] == 'ccat')
    assert (r['at_eps'] is not None) == (r['method'] == 'at')
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['dataset']['num_train'] == 64 and summary['dataset']['num_test'] == 40
  assert 0.0 <= summary['teacher']['clean_acc'] <= 1.0
  assert set(summary['teacher']) >= {'robust_acc_true_0.1', 'robust_acc_true_0.3'}
  corr = summary['correlation']['robust_acc_oracle_0.1']
  assert corr['n'] == 8 and len(corr['pearson_ci']) == 2
  assert summary['robust_features']['robust_model_is_teacher']
  with open(os.path.join(workdir, 'results.json')) as f:
    assert len(json.load(f)['records']) == 8
  text = open(os.path.join(workdir, 'summary.md')).read()
  assert '| robust_features |' in text and 'Pearson' in text


@pytest.mark.slow
def test_changed_config_is_refused_and_teachers_can_be_shared(tiny_run, tmp_path):
  workdir, _ = tiny_run
  with pytest.raises(common.ConfigError, match=r"different config \(fields \['num_steps'\]"):
    real.train_and_evaluate(tiny_config(num_steps=5), workdir)
  # The run's teacher sits in <workdir>/teachers/<hash of its spec> ...
  config = tiny_config()
  own = real.teachers_root(config, workdir)
  assert own == os.path.join(os.path.abspath(workdir), 'teachers')
  assert os.path.isdir(real.teacher_folder(own, real.teacher_spec(config)))
  # ... and another workdir naming that folder as teacher_dir finds it there.
  shared = tiny_config(teacher_dir=own)
  assert real.teachers_root(shared, str(tmp_path)) == own


def test_cli_validates_before_work(tmp_path, capfd):
  """The binary's entry point (in-process, private flags; the absl entry point itself:
  tests/test_validation.py) stops with one line naming the field, before any work."""
  capfd.readouterr()
  with pytest.raises(SystemExit) as info:
    common.run_binary(real.validate_config, real.train_and_evaluate, real._DEFAULT_CONFIG,
                      ('results.csv',), argv=['real', f'--workdir={tmp_path}',
                                              "--config.methods=('standard','bogus')"],
                      flag_values=flags.FlagValues())
  assert info.value.code == 2
  err = capfd.readouterr().err
  assert err.startswith('error: config.methods must be distinct names from') and 'bogus' in err
  assert err.count('\n') == 1
  assert not os.listdir(tmp_path)
