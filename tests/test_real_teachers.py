"""Teachers as a replicated axis in the image study (``num_teachers``): config rules, teacher
specs and keys, per-student teachers in the evaluator, the teacher column, verdicts."""

import json
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from experiments import real
from experiments import real_checks
from experiments import real_eval
from experiments import study
from experiments import validation
from experiments import verdicts as verdicts_binary
from experiments.configs import real as real_config
from tsrobust import cnn
from tsrobust import evaluate
from tsrobust import image_eval
from tsrobust import io
from tsrobust import teachers
from tsrobust import verdicts

from tests.test_real import _toy_dataset as toy_dataset
from tests.test_real import tiny_config


class TestConfig:

  @pytest.mark.parametrize('overrides, message', [
      (dict(num_teachers=0), 'config.num_teachers must be >= 1, got 0'),
      (dict(num_seeds=3, num_teachers=2),
       r'config.num_seeds must be a multiple of config.num_teachers = 2 \(num_seeds / '
       r'num_teachers students of each teacher per grid point\), got 3'),
      (dict(num_seeds=2, num_teachers=4), 'config.num_seeds must be a multiple of '
                                          'config.num_teachers = 4'),
  ])
  def test_bad_teacher_counts_are_named(self, overrides, message):
    with pytest.raises(validation.ConfigError, match=message):
      real.validate_config(tiny_config(**overrides))

  def test_default_is_four_teachers_in_every_preset_but_the_replicated(self):
    for preset in real_config.PRESETS:
      c = real_config.get_config(preset)
      if preset.endswith(real_config.REPLICATED):
        base = real_config.get_config(preset[:-len(real_config.REPLICATED)])
        assert (c.num_teachers, c.num_seeds, c.num_attack, c.convergence_points) == (8, 8, 25, 25)
        # Thinned within a teacher, graded where claim 4 needs it (docs: real_config.replicate).
        assert c.dataset == base.dataset and c.lowrank_rank == base.lowrank_rank
        assert c.eps == base.eps
        if base.lowrank_rank:  # graded noise: 4 scales per augmentation, a claim-4 cell
          assert (c.methods, c.at_eps) == (base.methods, (0.5,))
          # From each image set's own off-subspace spread per pixel (its probe scale) to 1.
          assert c.aug_scales == {'mnist_lowrank_replicated': (0.15, 0.3, 0.5, 1.0),
                                  'fashion_mnist_replicated': (0.125, 0.25, 0.5, 1.0)}[preset]
          assert c.aug_scales[0] == base.probe_scale
        else:  # graded: 4 budgets per robust-training family, a claim-4 cell per teacher
          assert c.methods == ('standard', 'at', 'ccat')
          assert c.at_eps == c.ccat_eps == (0.05, 0.1, 0.2, 0.3)
      else:  # one student of each of 4 teachers per grid point
        assert (c.num_teachers, c.num_seeds) == (4, 4), preset
    real.validate_config(tiny_config(num_seeds=4, num_teachers=2))
    real.validate_config(tiny_config(num_seeds=4, num_teachers=4))

  def test_cli_refuses_before_work_in_one_line(self, tmp_path, capfd):
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
      cli.run_binary(real.validate_config, real.train_and_evaluate, real._DEFAULT_CONFIG,
                     ('results.csv',), argv=['real', f'--workdir={tmp_path}',
                                                '--config.num_seeds=3',
                                                '--config.num_teachers=2'],
                     flag_values=flags.FlagValues())
    assert info.value.code == 2
    err = capfd.readouterr().err
    assert err.startswith('error: config.num_seeds must be a multiple of config.num_teachers')
    assert err.count('\n') == 1
    assert not os.listdir(tmp_path)

  def test_student_teachers_and_padding(self):
    c = tiny_config(num_seeds=6, num_teachers=3)
    np.testing.assert_array_equal(real_checks.student_teachers(c, 6), [0, 0, 1, 1, 2, 2])
    # Padded seeds (computed, dropped) learn from the last teacher.
    np.testing.assert_array_equal(real_checks.student_teachers(c, 8),
                                  [0, 0, 1, 1, 2, 2, 2, 2])
    one = tiny_config(num_seeds=3, num_teachers=1)
    np.testing.assert_array_equal(real_checks.student_teachers(one, 4), [0, 0, 0, 0])


class TestSpecs:

  def test_teacher_zero_is_the_one_teacher_spec(self):
    c = tiny_config()
    for role in teachers.ROLES:
      assert teachers.teacher_spec(c, role, teacher_index=0) == teachers.teacher_spec(c, role)
    assert 'teacher_index' not in teachers.teacher_spec(c)

  def test_other_teachers_have_their_index_and_hash(self):
    c = tiny_config(teacher_training='standard', rf_model_init='teacher')
    specs = [teachers.teacher_spec(c, teacher_index=t) for t in range(3)]
    assert [s.get('teacher_index') for s in specs] == [None, 1, 2]
    assert len({teachers.config_hash(s) for s in specs}) == 3
    # A robust model fine-tuned from teacher t records teacher t (index and init_from).
    robust = [teachers.teacher_spec(c, 'robust_model', teacher_index=t) for t in range(2)]
    assert robust[1]['teacher_index'] == 1
    assert [r['init_from'] for r in robust] == [teachers.config_hash(s) for s in specs[:2]]
    # The PGD teacher is its own robust model, per teacher.
    pgd = tiny_config(teacher_training='pgd', rf_model_init='teacher')
    assert (teachers.teacher_spec(pgd, 'robust_model', teacher_index=1)
            == teachers.teacher_spec(pgd, teacher_index=1))

  @pytest.mark.parametrize('index', [-1, 1.5, True])
  def test_bad_index(self, index):
    with pytest.raises(ValueError, match='teacher_index must be an integer >= 0'):
      teachers.teacher_spec(tiny_config(), teacher_index=index)

  def test_pretrained_teachers_are_independent(self, tmp_path):
    """Teacher 1 starts from another initialization than teacher 0 and the robust model's
    stream; teacher 0 trained with an index of 0 is the one-teacher network."""
    c = tiny_config(teacher_training='standard', teacher_steps=3, num_train=32)
    ds = toy_dataset(m=20)
    model = real_eval.teacher_model(c)
    root = str(tmp_path)
    p0, i0 = teachers.pretrain_teacher(teachers.teacher_spec(c), model, ds, root)
    p1, i1 = teachers.pretrain_teacher(teachers.teacher_spec(c, teacher_index=1), model, ds,
                                       root)
    r0, _ = teachers.pretrain_teacher(teachers.teacher_spec(c, 'robust_model'), model, ds,
                                      root, 'robust_model')
    assert i0['hash'] != i1['hash'] and not i1['reused']
    assert os.path.isdir(os.path.join(root, i0['hash']))
    assert os.path.isdir(os.path.join(root, i1['hash']))
    leaves = lambda p: jax.tree_util.tree_leaves(p)
    assert not any(np.allclose(a, b) for a, b in zip(leaves(p0), leaves(p1)) if a.size > 1)
    # Not the robust model's stream (whose key folds in 1 too) either: other kernels.
    k1 = [a for a in leaves(p1) if a.ndim == 4][0]
    kr = [a for a in leaves(r0) if a.ndim == 4][0]
    assert not np.allclose(k1, kr)
    with open(os.path.join(root, i1['hash'], 'spec.json')) as f:
      assert json.load(f)['teacher_index'] == 1
    again, info = teachers.pretrain_teacher(teachers.teacher_spec(c, teacher_index=0), model,
                                            ds, root)
    assert info['hash'] == i0['hash'] and info['reused']
    for a, b in zip(leaves(again), leaves(p0)):
      np.testing.assert_array_equal(a, b)


class TestPerStudentTeachers:
  """``ImageEvaluator(shared_teacher=False)`` with each student's teacher equals evaluating
  each teacher's students with that teacher alone (the one-teacher path)."""

  def _setup(self, **overrides):
    ds = toy_dataset(m=20)
    c = tiny_config(**{'eval_batch': 10, 'num_attack': 6, 'attack_labels': ('oracle', 'true'),
                       'eps': (0.1, 0.3), **overrides})
    teacher = cnn.make_cnn((2,), (4,), 10, kernel_size=3, pool='max')
    student = cnn.student_of(teacher, 2, 1.0)
    t_params = [cnn.init_params(jax.random.PRNGKey(10 + t), teacher, ds.image_shape)
                for t in range(2)]
    # 4 students: 0, 1 of teacher 0; 2, 3 of teacher 1.
    s_params = jax.vmap(lambda k: cnn.init_params(k, student, ds.image_shape))(
        jax.random.split(jax.random.PRNGKey(3), 4))
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    return c, ds, teacher, student, t_params, s_params, keys

  # PGD alone (fast, the default run), and the ensemble with its escalation (slow).
  PGD_ONLY = {'strength': 'fast', 'apgd_steps': 0, 'apgd_t_steps': 0, 'square_queries': 0,
              'pair_steps': 0}
  ENSEMBLE = {'strength': 'fast', 'apgd_t_steps': 0, 'square_queries': 10}

  @pytest.mark.parametrize('attack, convergence_points', [
      (PGD_ONLY, 0), pytest.param(ENSEMBLE, 3, marks=pytest.mark.slow)])
  def test_equals_each_teacher_alone(self, attack, convergence_points):
    c, ds, teacher, student, t_params, s_params, keys = self._setup(
        attack=attack, convergence_points=convergence_points, attack_labels=('oracle',),
        eps=(0.3,))
    owner = np.array([0, 0, 1, 1])
    per_student = jax.tree_util.tree_map(lambda *v: jnp.stack(v)[owner], *t_params)
    ccat = np.array([False, True, False, True])  # one CCAT student per teacher
    joint = real_eval.evaluator(c, teacher, student, t_params[0], ds, shared_teacher=False)
    groups = {f't{t}': owner == t for t in range(2)}  # escalation groups = the teachers
    rows, _ = joint.students(s_params, keys, ccat, groups=groups, teacher_params=per_student)
    assert len(rows) == 4
    for t in range(2):
      sel = np.flatnonzero(owner == t)
      alone = real_eval.evaluator(c, teacher, student, t_params[t], ds)
      pick = lambda tree: jax.tree_util.tree_map(lambda v: v[sel], tree)
      ref, _ = alone.students(pick(s_params), keys[sel], ccat[sel])
      for i, r in zip(sel, ref):
        assert set(rows[i]) == set(r)
        for k, v in r.items():
          if v is None:
            assert rows[i][k] is None, k
          else:
            assert rows[i][k] == pytest.approx(v, abs=1e-5), (t, i, k)
    # The two teachers differ, so a student's specialization to the other teacher differs
    # (each student is measured against its own teacher).
    swapped, _ = joint.students(s_params, keys, ccat, groups=groups,
                                teacher_params=jax.tree_util.tree_map(
                                    lambda v: v[np.array([2, 3, 0, 1])], per_student))
    assert all(abs(swapped[i]['spec_l1'] - rows[i]['spec_l1']) > 1e-4 for i in range(4))

  def test_teacher_params_only_where_per_student(self):
    c, ds, teacher, student, t_params, s_params, keys = self._setup()
    shared = real_eval.evaluator(c, teacher, student, t_params[0], ds)
    with pytest.raises(ValueError, match='teacher_params is for an evaluator built with '
                                         'shared_teacher=False'):
      shared.students(s_params, keys, np.zeros(4, bool), teacher_params=s_params)
    joint = real_eval.evaluator(c, teacher, student, t_params[0], ds, shared_teacher=False)
    with pytest.raises(ValueError, match=r'teacher_params \[P, ...\]'):
      joint.students(s_params, keys, np.zeros(4, bool))

  @pytest.mark.slow
  def test_lowrank_subspace_attacks_per_student_teacher(self):
    """L2 attacks in S / S_perp (per-student projectors) with per-student teachers."""
    c, ds, teacher, student, t_params, s_params, keys = self._setup(
        lowrank_rank=4, attack_norm='l2', attack_labels=('oracle',), eps=(0.5, 2.0),
        attack={'strength': 'fast', 'apgd_t_steps': 0, 'square_queries': 10},
        convergence_points=0)
    flat = ds.train_x.reshape(ds.train_x.shape[0], -1)
    u = np.linalg.svd(flat - flat.mean(0), full_matrices=False)[2][:4].T
    projector = (u @ u.T).astype(np.float32)
    owner = np.array([0, 0, 1, 1])
    per_student = jax.tree_util.tree_map(lambda *v: jnp.stack(v)[owner], *t_params)
    joint = real_eval.evaluator(c, teacher, student, t_params[0], ds, projector,
                                shared_teacher=False)
    rows, _ = joint.students(s_params, keys, np.zeros(4, bool), teacher_params=per_student)
    for t in range(2):
      sel = np.flatnonzero(owner == t)
      alone = real_eval.evaluator(c, teacher, student, t_params[t], ds, projector)
      ref, _ = alone.students(jax.tree_util.tree_map(lambda v: v[sel], s_params), keys[sel],
                              np.zeros(2, bool))
      for i, r in zip(sel, ref):
        for k in ('spec_off', 'spec_mean', 'adv_oracle_in_0.5', 'adv_oracle_off_2.0',
                  'adv_oracle_full_2.0', 'clean_agree'):
          assert rows[i][k] == pytest.approx(r[k], abs=1e-5), (t, i, k)


class TestReports:

  def _records(self, num_teachers, per_teacher=4):
    """Toy records of the default MNIST config's columns: standard and one AT variant."""
    rng = np.random.default_rng(1)
    out = []
    for variant in ('standard', 'at 0.05'):
      for t in range(num_teachers):
        for k in range(per_teacher):
          spec = rng.uniform(0.5, 1)
          out.append({'method': variant.split()[0], 'variant': variant, 'teacher': t,
                      'seed': t * per_teacher + k, 'spec_mean': spec,
                      'spec_off': spec - 0.1, 'clean_acc': rng.uniform(0.8, 1),
                      'robust_acc_oracle_0.05': spec * 0.5 + 0.1 * t + rng.normal(0, 0.05),
                      'robust_acc_oracle_0.1': spec * 0.3 + rng.normal(0, 0.05)})
    return out

  def test_correlations_resample_teachers_with_several(self):
    c = real_config.get_config()
    c.update(num_seeds=8, num_teachers=2, bootstrap_resamples=50)
    corr = real_eval.correlations(c, self._records(2))
    assert corr['bootstrap'] == 'clustered by teacher' and corr['n_teachers'] == 2
    assert corr['robust_acc_oracle_0.05']['bootstrap'] == 'clustered by teacher'
    tl = corr['teacher_level']
    cell = tl['variants']['standard']['columns']['robust_acc_oracle_0.05']
    assert cell['num_teachers'] == 2 and len(cell['ci']) == 2
    assert tl['paired_vs_standard']['at 0.05']['robust_acc_oracle_0.1']['num_teachers'] == 2
    text = real_eval.teacher_level_markdown(c, corr)
    assert 'Teacher-level inference (2 teachers x 4 student(s) per teacher' in text
    # One teacher: today's seed bootstrap, no teacher-level block.
    one = real_config.get_config()
    one.update(num_seeds=8, num_teachers=1, bootstrap_resamples=50)
    recs = [dict(r, seed=r['seed'] % 8, teacher=0) for r in self._records(1, 8)]
    corr1 = real_eval.correlations(one, recs)
    assert corr1['bootstrap'] == 'clustered by seed' and 'teacher_level' not in corr1
    assert 'n_teachers' not in corr1
    assert '(one teacher: the intervals hold no teacher variation)' in real_eval.wilson_table(
        one, recs)

  def test_image_verdicts_read_the_teacher_column(self, tmp_path):
    """A two-teacher image run's results.csv gets teacher-level verdicts; one teacher:
    'not established (one teacher)'."""
    for num_teachers, name in ((2, 'two'), (1, 'one')):
      workdir = tmp_path / name
      workdir.mkdir()
      recs = self._records(num_teachers, 8 // num_teachers)
      cols = ['method', 'variant', 'teacher', 'seed', 'spec_mean', 'spec_off', 'clean_acc']
      io.write_csv(str(workdir / 'results.csv'), recs, cols)
      cells = verdicts_binary.cells_from_workdirs({'real_lowrank': str(workdir)})
      claim1 = [x for x in cells if x['setting'] == 'real_lowrank' and x['claim'] == 1][0]
      if num_teachers == 2:
        assert claim1['teachers'] == 2 and claim1['ci'] is not None
        assert claim1['verdict'] != verdicts.ONE_TEACHER
      else:
        assert claim1['verdict'] == verdicts.ONE_TEACHER


@pytest.fixture(scope='module')
def two_teacher_run(tmp_path_factory):
  """A T = 2 run of the tiny config (4 students per grid point, 2 per teacher), with the
  teachers' folder shared with a T = 1 run of the same fields."""
  shared = str(tmp_path_factory.mktemp('teachers'))
  overrides = dict(num_seeds=4, teacher_dir=shared, methods=('standard', 'at', 'robust_features'),
                   rf_model_init='teacher', teacher_training='standard', rf_model_steps=4)
  two = str(tmp_path_factory.mktemp('real_t2'))
  records = real.train_and_evaluate(tiny_config(num_teachers=2, **overrides), two)
  return two, records, shared, overrides


@pytest.mark.slow
def test_two_teachers_end_to_end(two_teacher_run, tmp_path):
  workdir, records, shared, overrides = two_teacher_run
  rows = io.read_csv(os.path.join(workdir, 'results.csv'))
  assert len(rows) == len(records) == 3 * 4
  assert [r['teacher'] for r in rows] == [0, 0, 1, 1] * 3
  assert [r['seed'] for r in rows] == [0, 1, 2, 3] * 3
  header = list(rows[0])
  assert header == real_eval.columns(tiny_config(num_teachers=2, **overrides))
  assert header.index('teacher') == header.index('seed') - 1
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  ts = summary['teachers']
  assert [t['index'] for t in ts] == [0, 1] and [t['seeds'] for t in ts] == [[0, 1], [2, 3]]
  assert ts[0]['checkpoint'] != ts[1]['checkpoint']
  assert summary['teacher']['checkpoint'] == ts[0]['checkpoint']  # teacher 0, as before
  assert summary['teacher']['clean_acc'] == ts[0]['clean_acc']
  for t in ts:
    assert {'clean_acc', 'robust_acc_true_0.1', 'robust_acc_true_0.3'} <= set(t)
  # Teacher 0's hash is a one-teacher run's; teacher 1 has its index in its spec.
  one = tiny_config(**overrides)
  assert ts[0]['checkpoint'] == teachers.config_hash(teachers.teacher_spec(one))
  with open(os.path.join(shared, ts[1]['checkpoint'], 'spec.json')) as f:
    assert json.load(f)['teacher_index'] == 1
  model = real_eval.teacher_model(one)
  ds, _, _ = real.load_data(one)
  p0, i0 = teachers.pretrain_teacher(teachers.teacher_spec(one), model, ds, shared)
  p1, i1 = teachers.pretrain_teacher(teachers.teacher_spec(one, teacher_index=1), model, ds,
                                     shared)
  assert i0['reused'] and i1['reused'] and i0['hash'] == ts[0]['checkpoint']
  assert not np.allclose(jax.tree_util.tree_leaves(p0)[0], jax.tree_util.tree_leaves(p1)[0])
  # Robust features derived from each teacher: one robust model per teacher.
  rf = summary['robust_features']
  assert [r['robust_model'] for r in rf['per_teacher']][0] == rf['robust_model']
  assert len({r['robust_model'] for r in rf['per_teacher']}) == 2
  corr = summary['correlation']
  assert corr['bootstrap'] == 'clustered by teacher' and corr['n_teachers'] == 2
  assert corr['teacher_level']['variants']['standard']['teachers'] == 2
  text = open(os.path.join(workdir, 'summary.md')).read()
  assert 'Teacher 1 (`' in text and 'Teacher-level inference (2 teachers' in text
  assert 'each teacher has its own robust model and dataset' in text
  # The verdicts see two teachers.
  cells = verdicts_binary.cells_from_workdirs({'real': workdir})
  assert not [x for x in cells if x['setting'] == 'real'
              and x['verdict'] == verdicts.ONE_TEACHER]


def test_shared_and_per_student_evaluators_are_the_documented_kinds():
  """The evaluator's attack programs take per-student teachers only when asked."""
  c = tiny_config(eval_batch=10, num_attack=6)
  ds = toy_dataset(m=20)
  teacher = cnn.make_cnn((2,), (4,), 10)
  student = cnn.student_of(teacher, 2, 1.0)
  tp = cnn.init_params(jax.random.PRNGKey(0), teacher, ds.image_shape)
  for shared in (True, False):
    ev = image_eval.ImageEvaluator(real_eval.setting(c), study.attack_config(c), teacher,
                                   student, tp, ds, shared_teacher=shared)
    assert isinstance(ev.attacks, evaluate.Evaluator)
    assert ev.attacks.shared_teacher is shared and ev.teacher_attacks.shared_teacher
