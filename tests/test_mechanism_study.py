"""The mechanism study binary (experiments/mechanism.py): its pieces, bad input, a tiny run."""

import json
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from experiments import mechanism
from experiments import mechanism_report
from experiments import report
from experiments import validation
from experiments.configs import mechanism as mechanism_config
from tsrobust import data
from tsrobust import io
from tsrobust import lowrank
from tsrobust import mechanism as mechanism_lib
from tsrobust import metrics
from tsrobust import models
from tsrobust import train

TINY = dict(d=6, rank=2, teacher_hidden=(3,), out_dim=3, width_mult=2, num_teachers=2,
            students_per_teacher=1, num_steps=40, chunk_steps=20, batch_size=16, num_eval=64,
            eval_batch=32, num_attack=16, convergence_points=8, max_escalations=0)
TINY_SECTIONS = dict(attack=dict(strength='fast', apgd_t_steps=0, square_queries=0),
                     intervention=dict(rescale_c=(0.0, 1.0, 2.0)),
                     augmentation=dict(ranks=(2, 4), scales=(0.3,)),
                     dependence=dict(width_mults=(1, 2), num_train=(32,)),
                     dynamics=dict(num_points=3, record_chunk_steps=20))


def tiny_config(**overrides):
  config = mechanism_config.get_config()
  config.update(TINY)
  for section, values in TINY_SECTIONS.items():
    config[section].update(values)
  for key, value in overrides.items():
    if '.' in key:
      section, field = key.split('.')
      config[section][field] = value
    else:
      config[key] = value
  return config


# ----------------------------------------------------------------------------
# Pieces.
# ----------------------------------------------------------------------------

def _projectors(d=6, r=2):
  return data.projectors(data.random_orthonormal(jax.random.PRNGKey(3), d, r))


def test_projected_noise_is_the_library_augmentation_and_noise_in_s():
  """Q = P_perp is train.noise_augmentation('orthogonal'), Q = I its 'isotropic' (the same
  draws); Q = P keeps the batch in S; a fraction of the batch is noisy."""
  p, p_perp = _projectors()
  x = data.sample_lowrank(jax.random.PRNGKey(1), p, 8)
  key = jax.random.PRNGKey(2)
  args = {'aug_scale': jnp.float32(0.7), 'aug_fraction': jnp.float32(0.5), 'projector': p}
  for q, kind in ((p_perp, 'orthogonal'), (jnp.eye(6), 'isotropic')):
    got = mechanism.projected_noise(None, None, {**args, 'noise_projector': q}, x, key)
    want = train.noise_augmentation(kind)(None, None, args, x, key)
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=kind)
  got = np.asarray(mechanism.projected_noise(None, None, {**args, 'noise_projector': p}, x, key))
  np.testing.assert_allclose(got @ np.asarray(p_perp), 0.0, atol=1e-5)   # still in S
  moved = np.abs(got - np.asarray(x)).max(1) > 1e-3
  assert moved.tolist() == [True] * 4 + [False] * 4


def test_matched_noise_energy():
  """E||Q xi||^2 = scale^2 d for every kind at its matched per-direction std."""
  d, r, scale = 6, 2, 0.3
  p, p_perp = _projectors(d, r)
  xi = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (200000, d)))
  for kind, q in (('orth', p_perp), ('iso', np.eye(d)), ('in', p)):
    noise = mechanism.matched_scale(kind, scale, d, r) * xi @ np.asarray(q)
    np.testing.assert_allclose((noise ** 2).sum(1).mean(), scale ** 2 * d, rtol=0.01,
                               err_msg=kind)


def test_students_grouped_by_teacher():
  """K = 2: students 2t and 2t + 1 share teacher t's teacher and basis keys, each has its
  own init, data and evaluation keys; K = 1: lowrank.seed_keys' keys."""
  keys = mechanism.seed_keys(tiny_config(students_per_teacher=2), 4)
  plain = lowrank.seed_keys(0, 4)
  for name in ('teacher', 'basis'):
    v = np.asarray(getattr(keys, name))
    np.testing.assert_array_equal(v[[0, 1, 2, 3]], np.asarray(getattr(plain, name))[[0, 0, 2, 2]])
  for name in ('student', 'train', 'eval'):
    np.testing.assert_array_equal(getattr(keys, name), getattr(plain, name))
  one = mechanism.seed_keys(tiny_config(), 4)
  for a, b in zip(one, plain):
    np.testing.assert_array_equal(a, b)
  c = mechanism.cohort(tiny_config(num_teachers=3, students_per_teacher=2))
  assert (c.kept, c.teacher.tolist(), c.student.tolist()) == (6, [0, 0, 1, 1, 2, 2],
                                                             [0, 1, 0, 1, 0, 1])


def _split_teacher(key, d=6, r=2):
  """A teacher 6 -> 3 -> 2 and a student of width 6 computing the same function: student
  nodes 2j and 2j + 1 are copies of teacher node j scaled by 0.5 and 2 (output weights
  shared 0.3 / 0.7), their off-subspace weights then replaced by random ones."""
  teacher = models.MLP((3,), 2)
  student = models.MLP((6,), 2)
  k_t, k_b, k_n = jax.random.split(key, 3)
  tp = models.random_teacher_params(k_t, teacher, d)
  p, p_perp = data.projectors(data.random_orthonormal(k_b, d, r))
  h, o = tp['params']['hidden_0'], tp['params']['output']
  scale = jnp.tile(jnp.array([0.5, 2.0]), 3)
  share = jnp.tile(jnp.array([0.3, 0.7]), 3)
  node = jnp.repeat(jnp.arange(3), 2)
  w = h['kernel'][:, node] * scale
  noise = jax.random.normal(k_n, w.shape)
  sp = {'params': {'hidden_0': {'kernel': w - p_perp @ w + p_perp @ noise,
                                'bias': h['bias'][node] * scale},
                   'output': {'kernel': o['kernel'][node] * (share / scale)[:, None],
                              'bias': o['bias']}}}
  return teacher, student, tp, sp, p, p_perp


def test_transplant_all_restores_an_over_realized_copy_of_the_teacher():
  """Every student node copying a teacher node gets its off-subspace weights back: the
  student is the teacher again, off S too; the one-to-one transplant restores one copy per
  teacher node and zeroes the other, which does not."""
  teacher, student, tp, sp, p, p_perp = _split_teacher(jax.random.PRNGKey(7))
  x = data.sample_lowrank(jax.random.PRNGKey(8), p, 512, 2.0)
  x_off = data.off_subspace_probe(jax.random.PRNGKey(9), x, p_perp, 1.0)
  np.testing.assert_allclose(student.apply(sp, x)[0], teacher.apply(tp, x)[0], atol=1e-4)
  assert np.abs(student.apply(sp, x_off)[0] - teacher.apply(tp, x_off)[0]).max() > 0.1
  new, info = mechanism_lib.transplant_off_subspace_all(teacher.apply, student.apply, sp, tp, p,
                                                        x)
  assert info['teacher_of_student'].tolist() == [0, 0, 1, 1, 2, 2]
  assert info['students_of_teacher'].tolist() == [2, 2, 2]
  assert (int(info['num_matched']), int(info['num_zeroed'])) == (6, 0)
  np.testing.assert_allclose(student.apply(new, x_off)[0], teacher.apply(tp, x_off)[0],
                             atol=1e-4)
  one, one_info = mechanism_lib.transplant_off_subspace(teacher.apply, student.apply, sp, tp, p,
                                                        x)
  assert int(one_info['num_matched']) == 3 and int(one_info['num_zeroed']) == 3
  assert np.abs(student.apply(one, x_off)[0] - teacher.apply(tp, x_off)[0]).max() > 0.1
  # In S nothing changed; with min_corr above every correlation, every P_perp w is zeroed.
  np.testing.assert_allclose(student.apply(new, x)[0], student.apply(sp, x)[0], atol=1e-5)
  none, none_info = mechanism_lib.transplant_off_subspace_all(
      teacher.apply, student.apply, sp, tp, p, x, min_corr=1.01)
  assert int(none_info['num_matched']) == 0
  np.testing.assert_allclose(p_perp @ models.first_layer_kernel(none), 0.0, atol=1e-5)


def test_a_padded_narrow_student_is_the_same_network():
  """pad_params: a width-1 student as a width-2 network computes the same outputs and the same
  specialization (its zero nodes never match a teacher node)."""
  keys = lowrank.seed_keys(0, 1)
  narrow = lowrank.build_problem(lowrank.Setting(d=6, teacher_hidden=(3, 2), out_dim=3,
                                                 width_mult=1), keys)
  wide = lowrank.build_problem(lowrank.Setting(d=6, teacher_hidden=(3, 2), out_dim=3,
                                               width_mult=2), keys)
  one = lambda tree: jax.tree_util.tree_map(lambda v: v[0], tree)
  params = one(narrow.student_params)
  padded = one(mechanism.pad_params(narrow.student_params, wide.student_params))
  assert jax.tree_util.tree_map(jnp.shape, padded) == jax.tree_util.tree_map(
      jnp.shape, one(wide.student_params))
  p, _ = _projectors()
  x = data.sample_lowrank(jax.random.PRNGKey(4), p, 256, 2.0)
  out_n, acts_n = narrow.student.apply(params, x)
  out_w, acts_w = wide.student.apply(padded, x)
  np.testing.assert_allclose(out_w, out_n, atol=1e-6)
  np.testing.assert_allclose(acts_w[0][:, :3], acts_n[0], atol=1e-6)
  np.testing.assert_array_equal(acts_w[0][:, 3:], 0.0)
  teacher = one(narrow.teacher_params)
  spec = lambda net, sp: metrics.lowrank_specialization(narrow.teacher.apply, net.apply, teacher,
                                                        sp, x, p, jax.random.PRNGKey(5))
  a, b = spec(narrow.student, params), spec(wide.student, padded)
  for k in ('spec_in', 'spec_off', 'wcos_in', 'wcos_off', 'clean_agree'):
    np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=k)


def test_first_specialized_steps_and_spearman():
  rows = []
  for step, corr in ((0, (0.1, 0.2, 0.3)), (10, (0.95, 0.2, 0.3)), (100, (0.99, 0.92, 0.5))):
    rows += [{'condition': 'sgd', 'seed': 0, 'step': step, 'node': j, 'corr_in': c,
              'alive': True} for j, c in enumerate(corr)]
  first = mechanism_report.first_specialized_steps(rows, 0.9)[('sgd', 0)]
  assert first.tolist() == [10.0, 100.0, np.inf]
  assert mechanism_report.spearman(np.arange(3.0), first) == pytest.approx(1.0)   # strong first
  assert mechanism_report.spearman(np.arange(3.0), first[::-1]) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------
# Bad input: one line naming the field, exit 2, before any work.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('overrides, message', [
    (dict(rank=6), 'config.rank must be < d = 6: the interventions act on S_perp, which a '
                   'full-rank problem does not have; got 6'),
    ({'augmentation.ranks': (2, 6)}, 'config.augmentation.ranks must each be < d = 6'),
    ({'optimizers.optimizer_names': ('sgd', 'lion')}, "config.optimizers.optimizer_names must "
                                                      "be distinct names "
                                            "from ('sgd', 'momentum', 'adam'), got ('sgd', "
                                            "'lion')"),
    ({'intervention.names': ('none', 'swap')}, 'config.intervention.names must be distinct '
                                               'names from'),
    ({'intervention.names': ('transplant',)}, "config.intervention.names must include 'none'"),
    ({'augmentation.scales': (0.1, 0.0)}, 'config.augmentation.scales values must be > 0, '
                                          'got 0.0 in (0.1, 0.0)'),
    ({'augmentation.scales': (-0.1,)}, 'config.augmentation.scales values must be > 0'),
    ({'augmentation.kinds': ('orth', 'gauss')}, 'config.augmentation.kinds must be distinct'),
    ({'intervention.rescale_c': (-1.0,)}, 'config.intervention.rescale_c values must be >= 0'),
    ({'optimizers.decay': 0.0}, 'config.optimizers.decay must be > 0'),
    (dict(num_teachers=1), 'config.num_teachers must be >= 2'),
])
def test_bad_config(overrides, message, tmp_path):
  with pytest.raises(validation.ConfigError) as info:
    mechanism.train_and_evaluate(tiny_config(**overrides), str(tmp_path / 'w'))
  assert message in str(info.value)
  assert not (tmp_path / 'w').exists()


def _run_binary(args, capfd):
  """The binary's entry point, in-process on private flags: (exit code, stderr)."""
  capfd.readouterr()
  with pytest.raises(SystemExit) as info:
    cli.run_binary(mechanism.validate_config, mechanism.train_and_evaluate,
                   mechanism._DEFAULT_CONFIG, mechanism.OUTPUTS, argv=['mechanism', *args],
                   flag_values=flags.FlagValues())
  return info.value.code, capfd.readouterr().err


def test_command_line_names_the_field(tmp_path, capfd):
  work = tmp_path / 'bad'
  for args, err in (
      (['--config.rank=40'], 'error: config.rank must be < d = 40: the interventions act on '
                             'S_perp, which a full-rank problem does not have; got 40\n'),
      (["--config.optimizers.optimizer_names=('sgd','adamw')"],
       "error: config.optimizers.optimizer_names must be distinct names from ('sgd', 'momentum', "
       "'adam'), got ('sgd', 'adamw') (did you mean 'adam'?)\n"),
      (["--config.intervention.names=('none','transplnt')"],
       "error: config.intervention.names must be distinct names from ('none', 'rescale', "
       "'transplant', 'transplant_all'), got ('none', 'transplnt') (did you mean "
       "'transplant'?)\n"),
      (["--config.augmentation.scales=(0.1,-0.2)"],
       'error: config.augmentation.scales values must be > 0, got -0.2 in (0.1, -0.2)\n')):
    code, got = _run_binary([f'--workdir={work}', *args], capfd)
    assert (code, got) == (2, err)
    assert not work.exists()


def test_default_and_strong_configs_are_valid():
  for preset in mechanism_config.PRESETS:
    mechanism.validate_config(mechanism_config.get_config(preset))
  with pytest.raises(ValueError, match='config preset must be one of'):
    mechanism_config.get_config('huge')


# ----------------------------------------------------------------------------
# A tiny run, end to end.
# ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('mechanism'))
  return workdir, mechanism.train_and_evaluate(tiny_config(), workdir)


def _rows(records, part, condition=None):
  return [r for r in records if r['part'] == part
          and (condition is None or r['condition'] == condition)]


@pytest.mark.slow
def test_tiny_run_files_and_records(tiny_run):
  workdir, records = tiny_run
  for name in mechanism.OUTPUTS:
    assert os.path.isfile(os.path.join(workdir, name)), name
  for name in mechanism.OUTPUTS:
    if name.endswith('.png'):
      with open(os.path.join(workdir, name), 'rb') as f:
        assert f.read(4) == b'\x89PNG'
  rows = io.read_csv(os.path.join(workdir, 'results.csv'))
  assert len(rows) == len(records)
  conditions = list(dict.fromkeys((r['part'], r['condition']) for r in records))
  assert conditions == (
      [('intervention', c) for c in ('none', 'transplant', 'transplant_all', 'rescale 0',
                                     'rescale 1', 'rescale 2')]
      + [('optimizer', c) for c in ('sgd', 'sgd + wd 0.0001', 'momentum',
                                    'momentum + wd 0.0001', 'adam', 'adam + wd 0.0001')]
      + [('augmentation', f'r={r} {k}') for r in (2, 4)
         for k in ('standard', 'orth 0.3', 'iso 0.3', 'in 0.3')]
      + [('dependence', c) for c in ('k=1 online', 'k=2 online', 'k=2 N=32')])
  for part, condition in conditions:  # one record per student per condition
    members = _rows(records, part, condition)
    assert [(m['teacher'], m['student']) for m in members] == [(0, 0), (1, 0)]
  dynamics = io.read_csv(os.path.join(workdir, 'dynamics.csv'))
  steps = sorted({r['step'] for r in dynamics})
  assert steps == [0.0, 20.0, 40.0]
  assert len(dynamics) == 6 * 2 * len(steps) * 3  # runs x students x steps x teacher nodes
  with open(os.path.join(workdir, 'intervals.json')) as f:
    intervals = json.load(f)
  assert set(intervals) >= {'intervention', 'intervention_minus_none', 'optimizer',
                            'dynamics_spearman', 'augmentation', 'augmentation_paired',
                            'dependence'}
  # The tables carry stable names in the reproduction report.
  with open(os.path.join(workdir, 'summary.md')) as f:
    _, names = report.mark_tables('mechanism', f.read())
  assert names[:9] == ['mechanism-intervention', 'mechanism-intervention-paired',
                       'mechanism-intervention-budgets', 'mechanism-optimizers',
                       'mechanism-dynamics', 'mechanism-claim5', 'mechanism-claim5-paired',
                       'mechanism-dependence', 'mechanism-attack-checks']


@pytest.mark.slow
def test_tiny_run_known_answers(tiny_run):
  """What the mechanism fixes, whatever the tiny students learned."""
  _, records = tiny_run
  none = _rows(records, 'intervention', 'none')
  metrics = [k for k in none[0] if k.startswith(('spec_', 'wcos_', 'clean_', 'adv_'))]
  # Plain momentum SGD on data in S never moves P_perp W: rescaling it by c moves it by
  # |c - 1| of its initial norm; c = 1 is the identity, evaluated identically.
  for c in (0.0, 1.0, 2.0):
    for r, n in zip(_rows(records, 'intervention', f'rescale {c:g}'), none):
      assert r['moved_off'] == pytest.approx(abs(c - 1.0), abs=1e-5)
      assert r['spec_in'] == pytest.approx(n['spec_in'], abs=1e-5)
      if c == 1.0:
        assert {k: r[k] for k in metrics} == {k: n[k] for k in metrics}
  assert all(n['moved_off'] < 1e-5 for n in none)
  # The transplant changes only P_perp W: the function on S, hence spec_in and the clean
  # agreement, is unchanged; the off-subspace weights now point along the teacher's.
  for r, n in zip(_rows(records, 'intervention', 'transplant'), none):
    assert r['spec_in'] == pytest.approx(n['spec_in'], abs=1e-4)
    assert r['clean_agree'] == pytest.approx(n['clean_agree'], abs=1e-9)
    assert r['wcos_off'] > n['wcos_off']
    assert r['transplant_matched'] + r['transplant_zeroed'] == 6
  # Every node pair the one-to-one transplant matches, transplant_all matches too.
  for r, a in zip(_rows(records, 'intervention', 'transplant'),
                  _rows(records, 'intervention', 'transplant_all')):
    assert a['spec_in'] == pytest.approx(r['spec_in'], abs=1e-4)
    assert a['transplant_matched'] + a['transplant_zeroed'] == 6
    assert a['transplant_matched'] >= r['transplant_matched']
  # Claim 2 under the optimizers: SGD leaves P_perp W where it started; with weight decay
  # it shrinks by exactly (1 - lr wd)^t; Adam moves it.
  sgd, sgd_wd = _rows(records, 'optimizer', 'sgd'), _rows(records, 'optimizer', 'sgd + wd 0.0001')
  assert all(r['moved_off'] < 1e-5 for r in sgd)
  for r in sgd_wd:
    assert r['moved_off'] == pytest.approx(1 - (1 - 0.5 * 1e-4) ** 40, rel=1e-3)
  assert all(r['moved_off'] > 1e-3 for r in _rows(records, 'optimizer', 'adam'))
  # Noise in S keeps every input in S, so P_perp W does not move; noise off S moves it.
  for r in (2, 4):
    assert all(m['moved_off'] < 1e-5 for m in _rows(records, 'augmentation', f'r={r} in 0.3'))
    assert all(m['moved_off'] > 1e-3 for m in _rows(records, 'augmentation', f'r={r} orth 0.3'))
    for m in _rows(records, 'augmentation', f'r={r} orth 0.3'):
      assert m['wcos_off_random'] == pytest.approx(np.sqrt(2 / (np.pi * (6 - r))))
  # The finite training set's and the widths' students.
  assert all(m['num_train'] == 32 for m in _rows(records, 'dependence', 'k=2 N=32'))
  k1 = _rows(records, 'dependence', 'k=1 online')
  assert all(m['width_mult'] == 1 and m['spec_in'] is not None for m in k1)
