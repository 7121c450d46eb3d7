"""The benchmarks measure the binaries' default jobs (``benchmarks/setting.py``).

The benchmarks import the library only, never a binary: the values they measure are
declared once, in ``benchmarks/setting.py`` (``LowRankJob``, ``ImageJob``), and their
networks, data and optimizers are built from library calls. These tests hold those
values to the binaries' default configs, and what the benchmarks build to what the
binaries build: ``setting.build`` / ``setting.rank_inputs`` (the run
``benchmarks/main_job_floor.py``'s ``rank_runner`` times, and ``setting.jax_problem``'s)
to ``experiments.lowrank.build`` / ``rank_inputs`` on a tiny config and on the default
one, and the image job's teacher, pretraining spec, data and optimizer to
``experiments/real.py``'s. So a benchmark cannot drift from the job it measures.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import pytest

from benchmarks import setting
from experiments import lowrank as lowrank_binary
from experiments import real
from experiments import real_eval
from experiments import study
from experiments.configs import lowrank as lowrank_config
from experiments.configs import real as real_config
from tests import test_lowrank
from tsrobust import lowrank
from tsrobust import teachers
from tsrobust import train


def job_of(config) -> setting.LowRankJob:
  """The benchmark's job of a low-rank ``config``: its fields of the same names, and the
  attack ensemble the binary makes of it (``study.attack_config``)."""
  return dataclasses.replace(lowrank.from_mapping(setting.LowRankJob, config),
                             attack=study.attack_config(config))


def _written(value) -> str:
  """A value as written, sequences as tuples: ``1`` and ``1.0`` differ (column names)."""
  return repr(tuple(value) if isinstance(value, (list, tuple)) else value)


def _mismatches(job, config, skip=()):
  """The job's fields that the config lacks or holds another value of (as written)."""
  return [f.name for f in dataclasses.fields(job) if f.name not in skip and (
      f.name not in config or _written(getattr(job, f.name)) != _written(config[f.name]))]


def test_lowrank_job_is_the_default_config():
  config = lowrank_config.get_config()
  assert _mismatches(setting.LowRankJob(), config, skip=('attack',)) == []
  assert setting.LowRankJob().attack == study.attack_config(config)


def test_image_job_is_the_default_config():
  assert _mismatches(setting.ImageJob(), real_config.get_config()) == []


def _same_updates(opt_a, opt_b):
  """Two optimizers move the same parameters the same way over three steps."""
  params = {'w': jnp.arange(3.0), 'b': jnp.ones(())}
  state_a, state_b = opt_a.init(params), opt_b.init(params)
  for t in range(3):
    grads = jax.tree_util.tree_map(lambda v: jnp.cos(v + t), params)
    up_a, state_a = opt_a.update(grads, state_a, params)
    up_b, state_b = opt_b.update(grads, state_b, params)
    chex.assert_trees_all_equal(up_a, up_b)


def _seed(tree, i=0):
  return jax.tree_util.tree_map(lambda v: v[i], tree)


def _check_same_run(job, got, config, want):
  """``setting.build(job)`` and ``rank_inputs`` at every rank equal the binary's."""
  chex.assert_trees_all_equal(got.keys, want.keys)
  assert got.problem.teacher == want.problem.teacher
  assert got.problem.student == want.problem.student
  chex.assert_trees_all_equal(got.problem.teacher_params, want.problem.teacher_params)
  chex.assert_trees_all_equal(got.problem.bases, want.problem.bases)
  chex.assert_trees_all_equal(got.problem.student_params, want.problem.student_params)
  assert got.evaluator.setting == want.evaluator.setting
  assert got.evaluator.attack_config == want.evaluator.attack_config
  _same_updates(got.optimizer, want.optimizer)
  key = jax.random.PRNGKey(7)
  for r in config.ranks:
    data_got, held_got, state_got = setting.rank_inputs(job, got, r)
    data_want, held_want, state_want = lowrank_binary.rank_inputs(config, want, r)
    chex.assert_trees_all_equal(data_got, data_want)
    chex.assert_trees_all_equal(held_got, held_want)
    chex.assert_trees_all_equal(state_got, state_want)
    # The loss on a fixed batch (the key draws it) and one training step, seed 0.
    args = (_seed(got.problem.teacher_params), _seed(data_got), key)
    loss_got = got.loss_fn(_seed(state_got.params), *args)
    loss_want = want.loss_fn(_seed(state_want.params), *args)
    assert float(loss_got) > 0 and float(loss_got) == float(loss_want)
    step_got = train.train_step(got.loss_fn, got.optimizer, _seed(state_got), *args)
    step_want = train.train_step(want.loss_fn, want.optimizer, _seed(state_want), *args)
    chex.assert_trees_all_equal(step_got, step_want)


def test_floor_builds_the_main_jobs_run_on_a_tiny_config():
  config = test_lowrank.tiny_config()
  job = job_of(config)
  assert job.d != setting.LowRankJob().d and job.attack != setting.LowRankJob().attack
  _check_same_run(job, setting.build(job), config, lowrank_binary.build(config))


def test_default_job_builds_the_main_jobs_run():
  config = lowrank_config.get_config()
  config.ranks = (setting.RANK,)
  job = setting.config(config.num_seeds, setting.RANK)
  _check_same_run(job, setting.build(job), config, lowrank_binary.build(config))
  # jax_problem: the first seeds of that run, at rank RANK.
  p = setting.jax_problem(2)
  want = lowrank_binary.build(config)
  data_args, _, state = lowrank_binary.rank_inputs(config, want, setting.RANK)
  first = lambda tree: jax.tree_util.tree_map(lambda v: v[:2], tree)
  chex.assert_trees_all_equal(p.teacher_params, first(want.problem.teacher_params))
  chex.assert_trees_all_equal(p.state, first(state))
  chex.assert_trees_all_equal(p.data_args, first(data_args))
  chex.assert_trees_all_equal(p.projector, first(data_args['projector']))
  chex.assert_trees_all_equal(p.keys, first(want.keys.train))


PGD = dict(seed=2, pgd_warmup=0.2, teacher_training='pgd', teacher_eps=0.2,
           teacher_steps=300, rf_model_eps=0.3, rf_model_steps=400)


@pytest.mark.parametrize('overrides', [{}, PGD, dict(rf_model_init='teacher')],
                         ids=['default', 'pgd', 'fine_tuned'])
def test_image_teacher_and_its_pretraining_spec_are_the_binarys(overrides):
  config = real_config.get_config()
  config.update(overrides)
  job = dataclasses.replace(setting.ImageJob(), **overrides)
  assert job.teacher_model() == real_eval.teacher_model(config)
  assert job.teacher_model(3) == real_eval.teacher_model(config, 3)
  for role in teachers.ROLES:
    assert job.teacher_spec(role) == teachers.teacher_spec(config, role), role
    assert (teachers.config_hash(job.teacher_spec(role))
            == teachers.config_hash(teachers.teacher_spec(config, role)))


@pytest.mark.parametrize('overrides', [{}, dict(num_train=300, num_test=250, lowrank_rank=5)],
                         ids=['default', 'pca'])
def test_image_data_and_optimizer_are_the_binarys(overrides):
  config = real_config.get_config()
  config.update(overrides)
  job = dataclasses.replace(setting.ImageJob(), **overrides)
  got, (want, _, _) = job.load_data(), real.load_data(config)
  assert got.name == want.name and got.num_classes == want.num_classes
  for name in ('train_x', 'train_y', 'test_x', 'test_y'):
    chex.assert_trees_all_equal(getattr(got, name), getattr(want, name))
  _same_updates(setting.make_optimizer(job), study.make_optimizer(config))
