"""The low-rank setting in the library (tsrobust.lowrank, lowrank_eval) and the key streams."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import real_eval
from experiments import study
from experiments.configs import lowrank as lowrank_config
from experiments.configs import real as real_config
from experiments.configs import robustness as robustness_config
from tsrobust import image_eval
from tsrobust import lowrank
from tsrobust import lowrank_eval
from tsrobust import rng


def test_per_seed_known_keys():
  master = jax.random.PRNGKey(3)
  keys = rng.per_seed(master, 4, rng.LOWRANK_STREAMS)
  for s in range(4):
    want = jax.random.split(jax.random.fold_in(master, s), 5)
    for i, name in enumerate(rng.LOWRANK_STREAMS):
      np.testing.assert_array_equal(keys[name][s], want[i])
  # The image study's three streams: the split it has always used (results unchanged).
  image = rng.per_seed(master, 2, rng.IMAGE_STREAMS)
  old = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(master, i), 3))(jnp.arange(2))
  for i, name in enumerate(rng.IMAGE_STREAMS):
    np.testing.assert_array_equal(image[name], old[:, i])


def test_reserved_constants_are_distinct_and_far_from_seeds():
  reserved = [rng.SHARED_PROBLEM, rng.TEACHER_PRETRAINING, rng.ROBUST_FEATURES,
              rng.IMAGE_PROBES, rng.CONVERGENCE_CHECK, rng.REFERENCE_CHECK, rng.PAIR_LADDER]
  assert len(set(reserved)) == len(reserved)
  assert min(reserved) > 2 ** 30
  assert rng.TEACHER_EVALUATION != rng.ROBUST_MODEL_EVALUATION


def test_seed_keys_per_seed_and_shared():
  per_seed = lowrank.seed_keys(0, 3)
  assert len({tuple(np.asarray(k)) for k in per_seed.teacher}) == 3
  shared = lowrank.seed_keys(0, 3, teacher_per_seed=False)
  halves = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), rng.SHARED_PROBLEM), 2)
  for s in range(3):
    np.testing.assert_array_equal(shared.teacher[s], halves[0])
    np.testing.assert_array_equal(shared.basis[s], halves[1])
    # The students' own streams do not depend on sharing the teacher.
    np.testing.assert_array_equal(shared.student[s], per_seed.student[s])
    np.testing.assert_array_equal(shared.train[s], per_seed.train[s])


def _old_seed_keys(seed, num_seeds):
  """The keys of every seed as they were before teachers had students: seed ``s`` splits
  ``fold_in(PRNGKey(seed), s)`` into the five streams, in order."""
  master = jax.random.PRNGKey(seed)
  return {name: np.stack([np.asarray(jax.random.split(jax.random.fold_in(master, s), 5)[i])
                          for s in range(num_seeds)])
          for i, name in enumerate(rng.LOWRANK_STREAMS)}


def test_one_student_per_teacher_keeps_every_key():
  """students_per_teacher = 1 (the default): every key bit-identical to the old ones."""
  old = _old_seed_keys(5, 6)
  for keys in (lowrank.seed_keys(5, 6), lowrank.seed_keys(5, 6, True, 1)):
    for name in rng.LOWRANK_STREAMS:
      np.testing.assert_array_equal(np.asarray(getattr(keys, name)), old[name], err_msg=name)
  assert lowrank.teacher_ids(6).tolist() == list(range(6))


def test_students_of_one_teacher_share_its_teacher_and_basis():
  k1 = lowrank.seed_keys(0, 7)
  k2 = lowrank.seed_keys(0, 7, students_per_teacher=2)
  assert lowrank.teacher_ids(7, True, 2).tolist() == [0, 0, 1, 1, 2, 2, 3]
  for s in range(7):
    first = (s // 2) * 2  # the teacher's first seed
    np.testing.assert_array_equal(k2.teacher[s], k1.teacher[first])
    np.testing.assert_array_equal(k2.basis[s], k1.basis[first])
    for name in ('student', 'train', 'eval'):  # the student's own streams
      np.testing.assert_array_equal(getattr(k2, name)[s], getattr(k1, name)[s])
  setting = lowrank.Setting(d=6, teacher_hidden=(3,), out_dim=3, width_mult=2,
                            students_per_teacher=2)
  problem = lowrank.build_problem(setting, k2)
  seed = lambda tree, i: jax.tree_util.tree_map(lambda v: np.asarray(v[i]), tree)
  # Seeds 0 and 1: one teacher and basis, two initial students; seed 2: another teacher.
  chex.assert_trees_all_equal(seed(problem.teacher_params, 0), seed(problem.teacher_params, 1))
  np.testing.assert_array_equal(problem.bases[0], problem.bases[1])
  assert not np.array_equal(problem.bases[0], problem.bases[2])
  kernel = lambda params, i: seed(params, i)['params']['hidden_0']['kernel']
  assert not np.array_equal(kernel(problem.student_params, 0), kernel(problem.student_params, 1))
  assert not np.array_equal(kernel(problem.teacher_params, 0), kernel(problem.teacher_params, 2))
  # The run's keys follow the setting's field.
  assert lowrank.teacher_ids(4, False, 2).tolist() == [0, 0, 0, 0]
  shared = lowrank.seed_keys(0, 4, False, 2)
  np.testing.assert_array_equal(shared.teacher, lowrank.seed_keys(0, 4, False).teacher)


@pytest.mark.parametrize('bad', [0, -1, 1.5, True])
def test_students_per_teacher_must_be_a_positive_integer(bad):
  with pytest.raises(ValueError, match='students_per_teacher must be an integer >= 1'):
    lowrank.seed_keys(0, 4, True, bad)
  with pytest.raises(ValueError, match='students_per_teacher must be an integer >= 1'):
    lowrank.teacher_ids(4, True, bad)


def test_problem_from_explicit_arguments():
  setting = lowrank.Setting(d=6, teacher_hidden=(3,), out_dim=3, width_mult=2)
  problem = lowrank.build_problem(setting, lowrank.seed_keys(1, 2))
  assert problem.bases.shape == (2, 6, 6)
  np.testing.assert_allclose(problem.bases[0].T @ problem.bases[0], np.eye(6), atol=1e-5)
  assert tuple(problem.student.hidden_widths) == (6,)
  args = lowrank.lowrank_args(problem.bases, 2, jnp.full((2,), 1.5))
  np.testing.assert_allclose(np.trace(np.asarray(args['projector'][1])), 2.0, atol=1e-5)
  x = lowrank.sampler(0)(jax.random.PRNGKey(0), jax.tree_util.tree_map(lambda v: v[0], args), 8)
  np.testing.assert_allclose(x @ args['projector'][0], x, atol=1e-5)  # in S
  # Energy matched: s = data_scale * sqrt(d / r).
  assert np.isclose(lowrank.data_scale(setting, 2), np.sqrt(6 / 2))
  assert lowrank.data_scale(dataclasses.replace(setting, energy_matched=False), 2) == 1.0


def test_library_defaults_are_the_default_configs():
  """The library's settings and the binaries' configs state the same defaults."""
  config = lowrank_config.get_config()
  assert study.setting(config) == lowrank.Setting()
  default = lowrank_eval.EvalSetting()
  assert (config.num_attack, config.convergence_points) == (default.num_attack,
                                                            default.convergence_points)
  # The robustness study (2 students per teacher) attacks half the points per student.
  evaluation = lowrank.from_mapping(lowrank_eval.EvalSetting, robustness_config.get_config())
  assert evaluation == dataclasses.replace(default, num_attack=256, convergence_points=64)


def test_image_eval_setting_checks_its_arguments():
  with pytest.raises(ValueError, match='budget_names must name each of the 2 budgets'):
    image_eval.ImageEvalSetting(budgets=(0.1, 0.2), budget_names=('0.1',))
  with pytest.raises(ValueError, match='attack_labels must be in'):
    image_eval.ImageEvalSetting(attack_labels=('fixed',))
  # The defaults are the image study's (MNIST) default config's.
  assert real_eval.setting(real_config.get_config()) == image_eval.ImageEvalSetting()
