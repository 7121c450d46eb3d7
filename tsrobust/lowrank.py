"""The low-rank teacher-student setting (PAPER.md sections 1-3), built from explicit arguments.

Inputs ``x = U z`` lie in an r-dimensional subspace S of R^d (``U`` the leading
r columns of a random orthonormal basis); a random ReLU MLP teacher labels
them; over-realized students of the same family (widths x ``width_mult``)
learn from its outputs. Everything is per seed, on a leading seeds axis:

* ``Setting``: the setting's arguments, defaults the paper's (d = 40, a
  40 -> 10 -> 10 teacher, students 5x as wide, online data);
* ``seed_keys``: the named key streams of every seed (``rng.LOWRANK_STREAMS``),
  seeds grouped ``students_per_teacher`` to a teacher (``teacher_ids``);
* ``build_problem``: teachers, nested subspace bases and initial students;
* ``rank_projector``, ``lowrank_args``, ``data_scale``, ``sampler``: the
  training data at rank r, as ``train.train_seeds``' ``data_args``;
* ``build_run`` / ``rank_inputs``: all of a run (keys, problem, optimizer, loss,
  evaluator) and its inputs at one rank, as the low-rank binary and the benchmarks build them.

The experiment binaries build a ``Setting`` from their config (its fields
have the same names); a user builds one directly:

>>> setting = Setting(d=6, teacher_hidden=(3,), out_dim=3, width_mult=2)
>>> keys = seed_keys(seed=0, num_seeds=2)
>>> problem = build_problem(setting, keys)
>>> problem.bases.shape, lowrank_args(problem.bases, 2, jnp.ones(2))['basis'].shape
((2, 6, 6), (2, 6, 2))
"""

import dataclasses
import functools
import numbers
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import data
from tsrobust import evaluate
from tsrobust import lowrank_eval
from tsrobust import models
from tsrobust import rng
from tsrobust import sweep
from tsrobust import train

__all__ = ['Setting', 'SeedKeys', 'teacher_ids', 'seed_keys', 'Problem', 'build_problem',
           'rank_projector', 'lowrank_args', 'data_scale', 'sampler', 'from_mapping', 'Run',
           'build_run', 'rank_inputs']


@dataclasses.dataclass(frozen=True)
class Setting:
  """The low-rank setting's arguments (``experiments/configs/lowrank.py`` documents each).

  Attributes:
    d: input dimension.
    teacher_hidden: the teacher's hidden widths.
    out_dim: outputs (classes).
    use_bias: teacher and student layers have biases.
    teacher_bias_scale: teacher biases ~ N(0, scale^2).
    strength_decay: fan-out of teacher hidden node j scaled by (j + 1)^-decay.
    teacher_per_seed: every teacher of the seeds axis draws its own network and basis
      (False: one teacher and basis shared by every seed).
    students_per_teacher: K, seeds per teacher: seed ``s`` is a student of teacher
      ``s // K`` (``teacher_ids``, ``seed_keys``); 1: every seed its own teacher. With
      ``teacher_per_seed=False`` every seed is a student of the one shared teacher, whatever K.
    width_mult: student widths = width_mult x the teacher's.
    student_init_scale: student kernels start as N(0, scale^2 / fan_in).
    data_scale: per-coordinate std of full-rank data.
    energy_matched: ``z ~ N(0, s^2 I_r)`` with ``s = data_scale * sqrt(d / r)``.
    num_train: 0: fresh samples every step; N > 0: a fixed training set of N points.
  """
  d: int = 40
  teacher_hidden: Tuple[int, ...] = (10,)
  out_dim: int = 10
  use_bias: bool = True
  teacher_bias_scale: float = 0.5
  strength_decay: float = 0.0
  teacher_per_seed: bool = True
  students_per_teacher: int = 1
  width_mult: int = 5
  student_init_scale: float = 1.0
  data_scale: float = 1.0
  energy_matched: bool = True
  num_train: int = 0


def from_mapping(cls, values: Mapping[str, Any]):
  """``cls(**...)`` from the entries of ``values`` named as ``cls``'s fields (a config).

  Sequences become tuples (a config holds tuples or lists).

  >>> from_mapping(Setting, {'d': 6, 'teacher_hidden': [3], 'other': 1}).teacher_hidden
  (3,)
  """
  names = [f.name for f in dataclasses.fields(cls)]
  plain = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  return cls(**{n: plain(values[n]) for n in names if n in values})


class SeedKeys(NamedTuple):
  """``[S]`` keys per stream (``rng.LOWRANK_STREAMS``); a shared problem uses one teacher /
  basis key for every seed."""
  teacher: jax.Array
  basis: jax.Array
  student: jax.Array
  train: jax.Array
  eval: jax.Array


def _check_students_per_teacher(students_per_teacher) -> int:
  if (isinstance(students_per_teacher, bool)
      or not isinstance(students_per_teacher, numbers.Integral) or students_per_teacher < 1):
    raise ValueError(f'students_per_teacher must be an integer >= 1, got {students_per_teacher!r}')
  return int(students_per_teacher)


def teacher_ids(num_seeds: int, teacher_per_seed: bool = True,
                students_per_teacher: int = 1) -> np.ndarray:
  """``[num_seeds]`` the teacher of each seed: ``s // students_per_teacher``, or 0 for every
  seed when one teacher is shared (``teacher_per_seed=False``).

  >>> teacher_ids(6, students_per_teacher=2).tolist(), teacher_ids(3, False).tolist()
  ([0, 0, 1, 1, 2, 2], [0, 0, 0])
  """
  k = _check_students_per_teacher(students_per_teacher)
  if not teacher_per_seed:
    return np.zeros(num_seeds, np.int64)
  return np.arange(num_seeds, dtype=np.int64) // k


def seed_keys(seed: int, num_seeds: int, teacher_per_seed: bool = True,
              students_per_teacher: int = 1) -> SeedKeys:
  """Keys of ``num_seeds`` seeds; seed ``s`` splits ``fold_in(PRNGKey(seed), s)``.

  Teachers are a replicated axis: seed ``s`` is a student of teacher ``t = s // K``
  (``K = students_per_teacher``), and its teacher and basis keys are those of seed
  ``t * K``, the teacher's first student; its student, train and eval keys stay its own.
  With ``K = 1`` every key is the seed's own (the same keys as before teachers had
  students). With ``teacher_per_seed=False`` every seed's teacher and basis keys are the
  two halves of ``fold_in(PRNGKey(seed), rng.SHARED_PROBLEM)``, whatever ``K``.
  ``num_seeds`` need not be a multiple of ``K`` (padded seeds may fill a last teacher
  partly).
  """
  k = _check_students_per_teacher(students_per_teacher)

  def draw():  # integer work: exact at any optimization level
    master = jax.random.PRNGKey(seed)
    keys = SeedKeys(**rng.per_seed(master, num_seeds, rng.LOWRANK_STREAMS))
    if not teacher_per_seed:
      shared = jax.random.split(jax.random.fold_in(master, rng.SHARED_PROBLEM), 2)
      keys = keys._replace(teacher=jnp.broadcast_to(shared[0], keys.teacher.shape),
                           basis=jnp.broadcast_to(shared[1], keys.basis.shape))
    elif k > 1:
      first = jnp.asarray(teacher_ids(num_seeds, True, k) * k)  # each teacher's first seed
      keys = keys._replace(teacher=keys.teacher[first], basis=keys.basis[first])
    return keys
  return sweep.jit_once(draw)()


class Problem(NamedTuple):
  teacher: models.MLP
  student: models.MLP
  teacher_params: Any   # [S, ...]
  bases: jax.Array      # [S, d, d]; rank r uses the leading r columns
  student_params: Any   # [S, ...] initial student parameters


def build_problem(setting: Setting, keys: SeedKeys) -> Problem:
  """Teachers, nested subspace bases and initial students, one per seed of ``keys``."""
  d = setting.d
  teacher = models.MLP(tuple(setting.teacher_hidden), setting.out_dim, setting.use_bias)
  student = models.student_of(teacher, setting.width_mult, setting.student_init_scale)

  def draw(keys):
    teacher_params = jax.vmap(functools.partial(
        models.random_teacher_params, model=teacher, in_dim=d,
        bias_scale=setting.teacher_bias_scale, strength_decay=setting.strength_decay))(
            keys.teacher)
    bases = jax.vmap(lambda k: data.random_orthonormal(k, d, d))(keys.basis)
    student_params = jax.vmap(lambda k: student.init(k, jnp.zeros((1, d))))(keys.student)
    return teacher_params, bases, student_params
  return Problem(teacher, student, *sweep.jit_once(draw)(keys))


def rank_projector(bases: jax.Array, r: int) -> jax.Array:
  """``[S, d, d]`` projectors onto the span of the leading ``r`` basis columns."""
  return jax.vmap(lambda u: data.projectors(u)[0])(bases[:, :, :r])


def lowrank_args(bases: jax.Array, r: int, scales: jax.Array) -> Dict[str, jax.Array]:
  """Per-seed ``data_args`` of the online sampler at rank ``r`` (see ``sampler``).

  ``basis`` ``[S, d, r]`` (what the sampler reads), ``projector`` ``[S, d, d]``
  (what the orthogonal augmentation reads) and ``scale`` ``[S]``.
  """
  return {'basis': bases[:, :, :r], 'projector': rank_projector(bases, r), 'scale': scales}


def data_scale(setting: Setting, r: int) -> float:
  """Per-coordinate std ``s`` of ``z`` at rank ``r`` (see ``Setting.energy_matched``)."""
  if setting.energy_matched:
    return data.energy_matched_scale(setting.d, r, setting.data_scale)
  return setting.data_scale


def sampler(num_train: int) -> Callable[[jax.Array, Dict[str, jax.Array], int], jax.Array]:
  """``(key, data_args, n) -> x``: online low-rank samples, or a fixed training set.

  Online (``num_train = 0``): ``data.sample_subspace`` from ``data_args['basis']``
  (``[d, r]``, ``r`` normals per example) and ``data_args['scale']``; the
  training chunk is compiled once per rank. Fixed: ``num_train`` rows of
  ``data_args['train_x']``, drawn with replacement.
  """
  if num_train == 0:
    return lambda key, a, n: data.sample_subspace(key, a['basis'], n, a['scale'])
  return lambda key, a, n: a['train_x'][jax.random.randint(key, (n,), 0, num_train)]


class Run(NamedTuple):
  """What every rank of a low-rank run uses (``build_run``)."""
  keys: SeedKeys
  problem: Problem
  optimizer: Any
  loss_fn: Any
  evaluator: lowrank_eval.LowRankEvaluator


@functools.lru_cache(maxsize=None)
def _regression_loss(student: models.MLP, teacher: models.MLP, loss: str, num_train: int,
                     batch_size: int):
  # One loss function object per setting: train.train_seeds keys its compiled chunk on it,
  # so runs built again (a benchmark's repeats) reuse the compiled program.
  return train.teacher_regression_loss(student.apply, teacher.apply, loss, sampler(num_train),
                                       batch_size)


def build_run(setting: Setting, evaluation: lowrank_eval.EvalSetting,
              attack_config: evaluate.AttackConfig, *, seed: int, num_seeds: int, optimizer,
              loss: str = 'mse', batch_size: int = 128, mesh=None) -> Run:
  """A run's seed keys, teachers / bases / initial students, loss and evaluator.

  Args:
    setting, evaluation, attack_config: the setting, its evaluation and the ensemble.
    seed, num_seeds: the master seed and the seeds computed (padded to the devices).
    optimizer: the students' optax optimizer (``train.make_optimizer``).
    loss, batch_size: the regression loss to the teacher and the batch per step.
    mesh: the seeds mesh (default: every device).
  """
  keys = seed_keys(seed, num_seeds, bool(setting.teacher_per_seed),
                   setting.students_per_teacher)
  problem = build_problem(setting, keys)
  loss_fn = _regression_loss(problem.student, problem.teacher, loss, setting.num_train,
                             batch_size)
  evaluator = lowrank_eval.LowRankEvaluator(evaluation, attack_config, problem.teacher,
                                            problem.student, num_train=setting.num_train,
                                            mesh=mesh)
  return Run(keys, problem, optimizer, loss_fn, evaluator)


def rank_inputs(run: Run, setting: Setting, r: int, held_out: bool = True):
  """``(data_args, held, state)`` at rank ``r``: the training data's arguments (with the
  projector), the held-out data (None without ``held_out``, unless a fixed training set
  needs it), and the students' initial optimizer state."""
  s = run.keys.train.shape[0]
  scales = jnp.full((s,), data_scale(setting, r))
  data_args = lowrank_args(run.problem.bases, r, scales)
  held: Optional[Dict[str, Any]] = None
  if held_out or setting.num_train:
    held = run.evaluator.held_out(data_args['projector'], scales, run.keys.eval)
  if setting.num_train:
    data_args['train_x'] = held['train_x']
  state = jax.vmap(lambda p: train.init_state(p, run.optimizer))(run.problem.student_params)
  return data_args, held, state
