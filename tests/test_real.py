"""The real-image experiment: config checks, image transforms, teacher checkpoints, the binary."""

import json
import os

from absl import flags
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from experiments import real
from experiments import real_checks
from experiments import real_eval
from experiments import reproduce
from experiments import validation
from experiments.configs import real as real_config
from tsrobust import check_results
from tsrobust import cnn
from tsrobust import datasets
from tsrobust import io
from tsrobust import teachers
from tsrobust import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One teacher (the default is 4): the tiny runs test the one-teacher programs; the teacher
# axis has its own tests (test_real_teachers.py).
TINY = dict(num_seeds=2, num_teachers=1, num_train=64, num_test=40, teacher_conv=(2,),
            teacher_dense=(4,),
            teacher_training='pgd', teacher_steps=10, teacher_batch=16, teacher_pgd_steps=1,
            rf_model_steps=10, rf_steps=2, rf_batch=32,
            methods=('standard', 'at', 'ccat', 'robust_features'),
            at_eps=(0.1,), ccat_eps=(0.3,), at_steps=1, ccat_steps=1, num_steps=4, chunk_steps=4,
            batch_size=8,
            eps=(0.1, 0.3), attack=dict(strength='fast'), num_attack=8, eval_batch=20,
            attack_labels=('oracle', 'true'),  # both kinds (the default is oracle only)
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

  @pytest.mark.parametrize('overrides, message', [
      (dict(dataset='svhn'),
       r"config.dataset must be one of \('mnist', 'cifar10', 'fashion_mnist'\)"),
      (dict(dataset='cifar10'), 'config.data_dir must name the folder holding the CIFAR-10'),
      (dict(data_dir='/nonexistent/mnist'), "config.data_dir '/nonexistent/mnist' does not exist"),
      (dict(methods=('standard', 'fgsm')), 'config.methods must be distinct names from'),
      (dict(methods=('standard', 'orth')), 'config.methods: orth .* needs config.lowrank_rank'),
      (dict(at_eps=(-0.1,)), 'config.at_eps values must be >= 0'),
      (dict(teacher_training='fgsm'), 'config.teacher_training must be one of'),
      (dict(teacher_conv=()), 'config.teacher_conv must be a sequence of at least 1'),
      (dict(rf_start='zeros'), 'config.rf_start must be one of'),
      (dict(pgd_warmup=1.5), 'config.pgd_warmup must be <= 1'),
      (dict(methods=('ccat',), batch_size=1), 'config.batch_size must be >= 2'),
      (dict(methods=('standard', 'iso')), 'config.methods: iso .* needs config.lowrank_rank'),
      (dict(lowrank_rank=785), 'config.lowrank_rank must be <= the number of pixels per '
                               r'image 784 \(mnist\), got 785'),
      (dict(lowrank_rank=64), 'config.lowrank_rank must be < the number of training images 64 '
                              r'\(the centered training set spans at most 63 directions\)'),
      (dict(attack_labels=()), 'config.attack_labels must be'),
      (dict(attack_labels=('oracle', 'fixed')), 'config.attack_labels must be distinct names'),
      (dict(attack_norm='l1'), 'config.attack_norm must be one of'),
      (dict(probe_scale=0.0), 'config.probe_scale must be > 0'),
  ])
  def test_bad_fields_are_named(self, overrides, message):
    with pytest.raises(validation.ConfigError, match=message):
      real.validate_config(tiny_config(**overrides))

  def test_data_dir_without_the_files(self, tmp_path):
    (tmp_path / 'train-images-idx3-ubyte.gz').write_bytes(b'')
    with pytest.raises(validation.ConfigError, match=r"lacks the mnist files \['train-labels"):
      real.validate_config(tiny_config(data_dir=str(tmp_path)))
    with pytest.raises(validation.ConfigError,
                       match=r"lacks the cifar10 files \['data_batch_1.bin"):
      real.validate_config(tiny_config(dataset='cifar10', data_dir=str(tmp_path)))

  def test_sizes_checked_after_loading(self):
    with pytest.raises(validation.ConfigError, match='config.eval_batch must divide the number of '
                                                 'test images 10'):
      real_checks.validate_sizes(tiny_config(eval_batch=3, num_attack=4), _toy_dataset())
    # Sizes known only from the files (an IDX folder): checked before the PCA is fitted.
    with pytest.raises(validation.ConfigError, match='config.lowrank_rank must be < the number of '
                                                 'training images 32'):
      real_checks.validate_sizes(tiny_config(lowrank_rank=32, eval_batch=5, num_attack=4),
                                 _toy_dataset())
    with pytest.raises(validation.ConfigError, match='config.lowrank_rank must be <= the number of '
                                                 'pixels per image 16'):
      real_checks.validate_sizes(tiny_config(lowrank_rank=17, eval_batch=5, num_attack=4),
                                 _toy_dataset(n=40, hw=4))

  def test_lowrank_preset(self):
    c = real_config.get_config('mnist_lowrank')
    real.validate_config(c)
    assert c.dataset == 'mnist' and c.lowrank_rank > 0 and c.attack_norm == 'l2'
    assert {'standard', 'at', 'orth', 'iso'} <= set(c.methods)
    assert 'oracle' in c.attack_labels
    assert real_eval.clip_range(c) is None
    assert real_eval.clip_range(real_config.get_config()) == (0, 1)

  def test_default_columns_unchanged(self):
    # The full-rank default keeps exactly its columns (no off-subspace ones), in order;
    # the students' true-label columns come with attack_labels.
    layers = range(1, 4)
    eps = ('0.05', '0.1')
    attacks_run = ('pgd', 'apgd', 'apgd_t', 'square')
    for kinds in (('oracle',), ('oracle', 'true')):
      c = real_config.get_config()
      c.attack_labels = kinds
      want = (['method', 'variant', 'at_eps', 'ccat_eps', 'aug_scale', 'teacher', 'seed',
               'train_loss']
              + [f'spec_l{l}' for l in layers] + ['spec_mean'] + [f'frac_l{l}' for l in layers]
              + [f'dead_l{l}' for l in layers] + ['clean_acc', 'clean_agree']
              + [f'robust_acc_{k}_{e}' for k in kinds for e in eps]
              + [f'robust_acc_{k}_{e}_{a}' for k in kinds for e in eps
                 for a in attacks_run + (('apgd_pair',) if k == 'oracle' else ())]
              + ['ccat_threshold'] + [f'ccat_err_{e}' for e in eps]
              + [f'ccat_accepted_wrong_{e}' for e in eps])
      assert real_eval.columns(c) == want, kinds
    low = real_eval.columns(real_config.get_config('mnist_lowrank'))
    for col in ('spec_off_l1', 'spec_off_l3', 'spec_off', 'frac_off_l2', 'adv_oracle_in_0.25',
                'adv_oracle_off_0.5', 'adv_oracle_full_0.5', 'adv_oracle_off_0.5_square',
                'robust_acc_oracle_0.5'):
      assert col in low, col
    assert not [c for c in low if '_true_' in c]

  def test_robust_features_line_names_the_robust_models_training(self):
    c = tiny_config(teacher_eps=0.2, teacher_steps=7, rf_model_eps=0.1, rf_model_steps=10,
                    pgd_warmup=0.0)
    rf = {'robust_model_eval': {'clean_acc': 0.9, 'robust_acc_true_0.1': 0.5,
                                'robust_acc_true_0.3': 0.25},
          'robust_model_is_teacher': True, 'robust_model_init': 'teacher',
          'rep_distance_start': 4.0, 'rep_distance_end': 1.0, 'rep_norm': 8.0}
    line = real_eval.robust_features_line(c, rf)
    assert line.startswith('Robust-feature dataset: robust model the teacher itself (L-inf '
                           'PGD-AT at 0.2 for 7 steps); clean test accuracy 0.900, true-label '
                           'robust accuracy 0.500 (eps 0.1), 0.250 (eps 0.3).')
    assert line.endswith('1.00 at the end, against a representation norm of 8.00 '
                         '(end / norm 0.125).')
    line = real_eval.robust_features_line(c, dict(rf, robust_model_is_teacher=False))
    assert 'robust model the teacher fine-tuned, L-inf PGD-AT at 0.1 for 10 steps;' in line
    c.pgd_warmup = 0.2  # round(0.2 * 10) = 2 and round(0.2 * 7) = 1 warm-up steps
    line = real_eval.robust_features_line(c, dict(rf, robust_model_is_teacher=False,
                                                  robust_model_init='scratch'))
    assert ('robust model trained from scratch (own initialization and PRNG stream), L-inf '
            'PGD-AT at 0.1 for 10 steps, budget ramped up over its first 2 steps;') in line
    assert ('the teacher itself (L-inf PGD-AT at 0.2 for 7 steps, budget ramped up over its '
            'first 1 steps);') in real_eval.robust_features_line(c, rf)

  def test_cifar_preset_and_budget_names(self):
    c = real_config.get_config('cifar10')
    with pytest.raises(validation.ConfigError, match='config.data_dir must name the folder'):
      real.validate_config(c)
    assert real_eval.budget_name(c, 8.0) == '8.0_255'
    assert real_eval.budget(c, 8.0) == pytest.approx(8 / 255)
    assert real_eval.budget_name(real_config.get_config(), 0.1) == '0.1'
    assert c.num_train == 0 and c.rf_steps == 1000  # full training set; Ilyas et al.'s steps
    default = real_config.get_config()  # issue 10: an independent robust model, 1,000 steps
    assert (default.rf_model_init, default.rf_steps) == ('scratch', 1000)
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
    clean = teachers.supervised_loss(teacher.apply, 8, 8, pgd_steps=0)
    adv = teachers.supervised_loss(teacher.apply, 8, 8, pgd_steps=3)
    key = jax.random.PRNGKey(0)
    assert float(adv(tp, None, args, key)) > float(clean(tp, None, args, key))


class TestTeacherCheckpoint:

  def test_round_trip_and_changed_config(self, tmp_path):
    ds = _toy_dataset()
    config = tiny_config(teacher_steps=6, teacher_training='standard')
    model = real_eval.teacher_model(config)
    workdir = str(tmp_path)
    spec = teachers.teacher_spec(config)
    p1, info1 = teachers.pretrain_teacher(spec, model, ds, workdir)
    assert not info1['reused']
    assert os.path.exists(os.path.join(info1['folder'], 'spec.json'))
    p2, info2 = teachers.pretrain_teacher(teachers.teacher_spec(config), model, ds, workdir)
    assert info2['reused'] and info2['folder'] == info1['folder']
    chex.assert_trees_all_equal(p1, p2)
    # A field that is not the teacher's does not change the folder ...
    assert teachers.teacher_spec(tiny_config(teacher_steps=6, teacher_training='standard',
                                             num_steps=99)) == spec
    # ... a teacher field does: a new teacher is trained, not the stale one reused.
    changed = teachers.teacher_spec(tiny_config(teacher_steps=6, teacher_training='standard',
                                                teacher_lr=0.01))
    p3, info3 = teachers.pretrain_teacher(changed, model, ds, workdir)
    assert not info3['reused'] and info3['folder'] != info1['folder']
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p1),
                                                          jax.tree_util.tree_leaves(p3)))
    # The robust model is PGD-trained from scratch on its own stream by default; with
    # rf_model_init = teacher it is the teacher itself when that is PGD-trained.
    assert teachers.teacher_spec(config, 'robust_model')['teacher_training'] == 'pgd'
    pgd = tiny_config(teacher_training='pgd')
    assert teachers.teacher_spec(pgd, 'robust_model') != teachers.teacher_spec(pgd)
    pgd.rf_model_init = 'teacher'
    assert teachers.teacher_spec(pgd, 'robust_model') == teachers.teacher_spec(pgd)
    # A folder whose recorded spec does not match is refused.
    with open(os.path.join(info1['folder'], 'spec.json'), 'w') as f:
      json.dump({'edited': True}, f)
    with pytest.raises(ValueError, match='holds a different teacher config'):
      teachers.pretrain_teacher(spec, model, ds, workdir)


class _Projected:
  """A CNN that sees only ``m + P (x - m)``: blind to every direction of S_perp."""

  def __init__(self, model, projector, mean):
    self.model, self.projector, self.mean = model, projector, mean

  @property
  def relu_grad_temperature(self):
    return self.model.relu_grad_temperature

  def clone(self, **updates):  # what models.surrogate calls: the evaluator's attack gradients
    return _Projected(self.model.clone(**updates), self.projector, self.mean)

  def apply(self, params, x):
    flat = x.reshape(x.shape[0], -1) - self.mean
    return self.model.apply(params, (self.mean + flat @ self.projector).reshape(x.shape))


class TestLowRankEvaluation:
  """Known answers of the image evaluator with a PCA projector (toy 6x6 images, rank 4)."""

  def _setup(self, **overrides):
    ds = _toy_dataset(n=40, m=10, hw=6)
    pca = datasets.fit_pca(ds.train_x, 4)
    ds = ds._replace(test_x=np.asarray(datasets.project_pca(ds.test_x, pca)))
    config = tiny_config(lowrank_rank=4, attack_norm='l2', attack_labels=('oracle',),
                         eps=(0.5, 3.0), num_attack=10, eval_batch=5, probe_scale=0.5,
                         attack=dict(apgd_t_steps=0, square_queries=0), **overrides)
    teacher = real_eval.teacher_model(config)
    tp = cnn.init_params(jax.random.PRNGKey(0), teacher, (6, 6, 1))
    # Two students of the teacher's shape near the teacher: they agree with it on most clean
    # points, and attacks can make them disagree.
    leaves, tree = jax.tree_util.tree_flatten(tp)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    sp = jax.tree_util.tree_unflatten(tree, [
        v[None] + 0.05 * jnp.abs(v).mean() * jax.random.normal(k, (2,) + v.shape)
        for v, k in zip(leaves, keys)])
    return config, ds, pca, teacher, teacher, tp, sp

  def test_probes_leave_the_subspace_by_the_probe_scale(self):
    config, ds, pca, *_ = self._setup()
    x = jnp.asarray(ds.test_x)
    probes = real_eval.off_subspace_probes(config, x, pca.projector)
    noise = np.asarray(probes - x).reshape(10, -1)
    np.testing.assert_allclose(noise @ np.asarray(pca.projector), 0.0, atol=1e-5)
    # E||P_perp xi||^2 = probe_scale^2 (D - r): 0.25 * 32 per image.
    assert np.mean((noise ** 2).sum(1)) == pytest.approx(0.25 * 32, rel=0.25)
    chex.assert_trees_all_equal(probes, real_eval.off_subspace_probes(config, x, pca.projector))

  def test_projectors_per_norm(self):
    config, ds, pca, teacher, student, tp, _ = self._setup()
    ev = real_eval.evaluator(config, teacher, student, tp, ds, pca.projector)
    projs = ev._projectors(2)
    assert set(projs) == {'in', 'off'}
    chex.assert_shape(projs['in'], (2, 36, 36))  # L2: per student, one compiled attack
    np.testing.assert_allclose(projs['in'][1] + projs['off'][1], np.eye(36), atol=1e-6)
    linf = real_eval.evaluator(tiny_config(lowrank_rank=4, eval_batch=5, num_attack=10),
                               teacher, student, tp, ds, pca.projector)
    chex.assert_shape(linf._projectors(2)['off'], (36, 36))  # L-inf: shared
    assert real_eval.evaluator(config, teacher, student, tp, ds)._projectors(2) == {}
    assert not hasattr(real_eval.evaluator(config, teacher, student, tp, ds), 'x_probe')

  @pytest.mark.slow
  def test_networks_blind_to_s_perp(self):
    """Teacher and students that see only m + P (x - m): a delta in S_perp changes neither,
    so the off-subspace attack (delta with no component in S) finds exactly the clean
    disagreements at every budget, and the probes x + P_perp xi give exactly spec_in."""
    config, ds, pca, teacher, student, tp, sp = self._setup()
    t_blind = _Projected(teacher, pca.projector, pca.mean)
    s_blind = _Projected(student, pca.projector, pca.mean)
    ev = real_eval.evaluator(config, t_blind, s_blind, tp, ds, pca.projector)
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    rows, _ = ev.students(sp, keys, np.zeros(2, bool))
    x_att = jnp.asarray(ds.test_x[:10])
    clean = np.asarray(jax.vmap(lambda p: s_blind.apply(p, x_att)[0].argmax(-1))(sp)
                       != t_blind.apply(tp, x_att)[0].argmax(-1)[None])
    for i, r in enumerate(rows):
      for l in (1, 2):
        assert r[f'spec_off_l{l}'] == pytest.approx(r[f'spec_l{l}'], abs=1e-5)
      for e in ('0.5', '3.0'):
        assert r[f'adv_oracle_off_{e}'] == pytest.approx(clean[i].mean())
        assert r[f'adv_oracle_full_{e}'] >= max(r[f'adv_oracle_in_{e}'], r[f'adv_oracle_off_{e}'])
        assert r[f'robust_acc_oracle_{e}'] == pytest.approx(1 - r[f'adv_oracle_full_{e}'])
      # In S the attack does move them: more disagreements at a large budget.
      assert r['adv_oracle_in_3.0'] > clean[i].mean()


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
  assert check_results.check_file(os.path.join(workdir, 'results.csv')) == ([], 8)
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
  rf = summary['robust_features']  # an independent robust model, trained from scratch
  assert rf['robust_model_init'] == 'scratch' and not rf['robust_model_is_teacher']
  assert rf['rep_distance_end'] < rf['rep_distance_start']
  with open(os.path.join(workdir, 'results.json')) as f:
    assert len(json.load(f)['records']) == 8
  text = open(os.path.join(workdir, 'summary.md')).read()
  assert '| robust_features |' in text and 'Pearson' in text
  assert ('Robust-feature dataset: robust model trained from scratch (own initialization and '
          'PRNG stream), L-inf PGD-AT at 0.1 for 10 steps') in text
  assert f'{rf["rep_distance_end"]:.2f} at the end' in text


@pytest.mark.slow
def test_changed_config_is_refused_and_teachers_can_be_shared(tiny_run, tmp_path):
  workdir, _ = tiny_run
  with pytest.raises(validation.ConfigError, match=r"different config \(fields \['num_steps'\]"):
    real.train_and_evaluate(tiny_config(num_steps=5), workdir)
  # The run's teacher sits in <workdir>/teachers/<hash of its spec> ...
  config = tiny_config()
  own = teachers.teachers_root(config.teacher_dir, workdir)
  assert own == os.path.join(os.path.abspath(workdir), 'teachers')
  assert os.path.isdir(teachers.teacher_folder(own, teachers.teacher_spec(config)))
  # ... and another workdir naming that folder as teacher_dir finds it there.
  shared = tiny_config(teacher_dir=own)
  assert teachers.teachers_root(shared.teacher_dir, str(tmp_path)) == own


def test_cli_validates_before_work(tmp_path, capfd):
  """The binary's entry point (in-process, private flags; the absl entry point itself:
  tests/test_validation.py) stops with one line naming the field, before any work."""
  capfd.readouterr()
  with pytest.raises(SystemExit) as info:
    cli.run_binary(real.validate_config, real.train_and_evaluate, real._DEFAULT_CONFIG,
                   ('results.csv',), argv=['real', f'--workdir={tmp_path}',
                                              "--config.methods=('standard','bogus')"],
                      flag_values=flags.FlagValues())
  assert info.value.code == 2
  err = capfd.readouterr().err
  assert err.startswith('error: config.methods must be distinct names from') and 'bogus' in err
  assert err.count('\n') == 1
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_lowrank_binary_end_to_end(tmp_path):
  """lowrank_rank > 0 through the binary: PCA images, orth / iso training, spec_off per layer,
  oracle errors in S, in S_perp and unconstrained, consistent by construction."""
  config = tiny_config(lowrank_rank=5, methods=('standard', 'orth', 'iso'), aug_scales=(0.3,),
                       teacher_training='standard', attack_norm='l2', attack_labels=('oracle',),
                       eps=(0.5, 2.0), attack=dict(apgd_t_steps=0, square_queries=10))
  workdir = str(tmp_path)
  records = real.train_and_evaluate(config, workdir)
  rows = io.read_csv(os.path.join(workdir, 'results.csv'))
  assert len(rows) == len(records) == 6
  assert [r['method'] for r in rows] == [m for m in ('standard', 'orth', 'iso') for _ in range(2)]
  header = list(rows[0])
  assert header == real_eval.columns(config)
  assert not [c for c in header if '_true_' in c]
  for r in rows:
    assert r['spec_off'] == pytest.approx((r['spec_off_l1'] + r['spec_off_l2']) / 2, abs=1e-6)
    for e in ('0.5', '2.0'):
      for where in ('in', 'off', 'full'):  # fractions of the 8 attacked images
        v = r[f'adv_oracle_{where}_{e}']
        assert v * 8 == pytest.approx(round(v * 8), abs=1e-6)
      assert r[f'adv_oracle_full_{e}'] >= max(r[f'adv_oracle_in_{e}'], r[f'adv_oracle_off_{e}'])
      assert r[f'robust_acc_oracle_{e}'] == pytest.approx(1 - r[f'adv_oracle_full_{e}'])
    for where in ('in', 'off', 'full'):
      assert r[f'adv_oracle_{where}_0.5'] <= r[f'adv_oracle_{where}_2.0']
    assert (r['aug_scale'] is not None) == (r['method'] in ('orth', 'iso'))
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  pca = summary['dataset']['pca']
  assert summary['dataset']['dataset'] == 'mnist-bundled-pca5' and pca['rank'] == 5
  assert pca['explained'] == pytest.approx(summary['pca_explained_variance'])
  assert pca['norm_in'] < pca['norm_centered'] and pca['norm_off'] < pca['norm_centered']
  # Students judged by the oracle only; the teacher's own true-label robustness is reported.
  assert set(summary['teacher']) >= {'clean_acc', 'robust_acc_true_0.5', 'robust_acc_true_2.0'}
  assert set(summary['correlation']['spec_off']) == {'robust_acc_oracle_0.5',
                                                     'robust_acc_oracle_2.0'}
  assert os.path.getsize(os.path.join(workdir, 'spec_off_vs_robust.png')) > 0
  text = open(os.path.join(workdir, 'summary.md')).read()
  assert 'PCA rank 5' in text and '`spec_off`' in text and '| iso |' in text
  # Every budget's in / off / full errors in one table, which the reproduce report names.
  marked, names = reproduce.mark_tables('s', text)
  table = reproduce.generated_blocks(marked)['s-subspaces'].splitlines()
  assert 's-subspaces' in names and len(table) == 2 + 3
  assert table[0].split(' | ')[-6:] == [
      'adv_oracle_in_0.5', 'adv_oracle_off_0.5', 'adv_oracle_full_0.5', 'adv_oracle_in_2.0',
      'adv_oracle_off_2.0', 'adv_oracle_full_2.0 |']
  std_in = np.mean([r['adv_oracle_in_2.0'] for r in rows if r['method'] == 'standard'])
  assert table[2].startswith('| standard |') and f'| {std_in:.3f} +- ' in table[2]
