"""The benchmarked problems: the default low-rank setting (in JAX and in PyTorch) and the
image study's networks, built from the library with the values the benchmarks measure.

Those values are declared here, once: ``LowRankJob`` (the main job, ``python -m
experiments.lowrank`` with its default config: ``d = 40``, teacher ``40 -> 10 -> 10``
ReLU, student ``40 -> 50 -> 10`` (width x5), MSE to the teacher's outputs, SGD momentum
0.9, lr 0.05, batch 128, fresh low-rank Gaussian inputs ``s U z`` every step, ``r``
normals per example, the ``standard`` attack ensemble) and ``ImageJob`` (``python -m
experiments.real``'s default, MNIST: the teacher CNN conv (8, 16), dense (32,), 3 x 3
kernels, 2 x 2 max pooling, trained with Adam; students twice as wide, Adam, batch 32).
``tests/test_benchmarks_defaults.py`` checks that they equal the binaries' default
configs and that ``build`` / ``rank_inputs`` build what ``experiments/lowrank.py`` builds,
so a benchmark cannot drift from the job it measures. Field names are the configs'.

JAX side (``jax_problem``): the low-rank job at one rank (10 by default).

PyTorch side: the same teacher, projector and initial student of a seed,
copied from the JAX problem, so both frameworks train literally the same
networks from the same start; only the data stream's random numbers differ.
"""

import dataclasses
import functools
from typing import Any, NamedTuple, Tuple

import jax
import numpy as np

from tsrobust import cnn
from tsrobust import datasets
from tsrobust import evaluate
from tsrobust import lowrank
from tsrobust import lowrank_eval
from tsrobust import models
from tsrobust import sweep
from tsrobust import teachers
from tsrobust import train

RANK = 10


_SETTING = lowrank.Setting()
_EVAL = lowrank_eval.EvalSetting()


@dataclasses.dataclass(frozen=True)
class LowRankJob:
  """The main job's values (``experiments/configs/lowrank.py``'s defaults, same names;
  ``attack`` is the ``evaluate.AttackConfig`` the config's attack fields make)."""
  seed: int = 0
  num_seeds: int = 8
  ranks: Tuple[int, ...] = (5, 10, 20, 40)
  # The setting: the library's defaults (lowrank.Setting), which are the paper's.
  d: int = _SETTING.d
  data_scale: float = _SETTING.data_scale
  energy_matched: bool = _SETTING.energy_matched
  num_train: int = _SETTING.num_train
  teacher_hidden: Tuple[int, ...] = _SETTING.teacher_hidden
  out_dim: int = _SETTING.out_dim
  use_bias: bool = _SETTING.use_bias
  teacher_bias_scale: float = _SETTING.teacher_bias_scale
  strength_decay: float = _SETTING.strength_decay
  teacher_per_seed: bool = _SETTING.teacher_per_seed
  students_per_teacher: int = _SETTING.students_per_teacher
  width_mult: int = _SETTING.width_mult
  student_init_scale: float = _SETTING.student_init_scale
  # Training.
  loss: str = 'mse'
  optimizer: str = 'momentum'
  learning_rate: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 0.0
  schedule: str = 'constant'
  batch_size: int = 128
  num_steps: int = 20000
  chunk_steps: int = 2000
  # Evaluation: the library's defaults (lowrank_eval.EvalSetting).
  num_eval: int = _EVAL.num_eval
  eval_batch: int = _EVAL.eval_batch
  probe_scale: float = _EVAL.probe_scale
  tau: float = _EVAL.tau
  attack_norm: str = _EVAL.attack_norm
  eps: Tuple[float, ...] = _EVAL.eps
  num_attack: int = _EVAL.num_attack
  convergence_points: int = _EVAL.convergence_points
  surrogate_temperature: float = _EVAL.surrogate_temperature
  # The attack ensemble: the standard preset (no per-attack override).
  attack: evaluate.AttackConfig = evaluate.preset('standard', pgd_step_factor=2.5,
                                                  oracle_loss='kl', oracle_tolerance=0.05)

  def setting(self) -> lowrank.Setting:
    return lowrank.from_mapping(lowrank.Setting, dataclasses.asdict(self))

  def eval_setting(self) -> lowrank_eval.EvalSetting:
    return lowrank.from_mapping(lowrank_eval.EvalSetting, dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class ImageJob:
  """The image study's values (``experiments/configs/real.py``'s MNIST defaults, same names)."""
  seed: int = 0
  # Data.
  dataset: str = 'mnist'
  data_dir: str = ''
  num_train: int = 0
  num_test: int = 0
  lowrank_rank: int = 0
  # The teacher CNN and its pretraining (teachers.teacher_spec's fields).
  teacher_conv: Tuple[int, ...] = (8, 16)
  teacher_dense: Tuple[int, ...] = (32,)
  kernel_size: int = 3
  pool: str = 'max'
  use_bias: bool = True
  teacher_training: str = 'standard'
  teacher_eps: float = 0.1
  teacher_steps: int = 2000
  teacher_batch: int = 64
  teacher_lr: float = 0.003
  teacher_pgd_steps: int = 5
  pgd_warmup: float = 0.1
  eps_denominator: float = 1.0
  # The robust model and the robust-feature matching.
  rf_model_init: str = 'scratch'
  rf_model_eps: float = 0.1
  rf_model_steps: int = 1500
  rf_step_size: float = 0.1
  # Students.
  width_mult: int = 2
  student_init_scale: float = 1.0
  loss: str = 'mse'
  optimizer: str = 'adam'
  learning_rate: float = 0.001
  momentum: float = 0.9
  weight_decay: float = 0.0
  schedule: str = 'constant'
  batch_size: int = 32
  num_steps: int = 1000

  def load_data(self) -> datasets.Dataset:
    """The dataset (its first ``num_train`` / ``num_test`` images; PCA-projected at
    ``lowrank_rank > 0``), as ``experiments/real.py`` loads it."""
    ds = datasets.take(datasets.load(self.dataset, self.data_dir or None), self.num_train,
                       self.num_test)
    return datasets.lowrank(ds, self.lowrank_rank)[0] if self.lowrank_rank else ds

  def teacher_model(self, num_classes: int = datasets.NUM_CLASSES) -> cnn.CNN:
    """The teacher's CNN; the students widen it (``cnn.student_of``)."""
    return cnn.make_cnn(self.teacher_conv, self.teacher_dense, num_classes,
                        kernel_size=self.kernel_size, pool=self.pool, use_bias=self.use_bias)

  def teacher_spec(self, role: str = 'teacher') -> dict:
    """``teachers.teacher_spec`` of the teacher (or robust model): its checkpoint's key."""
    return teachers.teacher_spec(dataclasses.asdict(self), role)


def make_optimizer(job):
  """The students' optimizer of a ``LowRankJob`` or ``ImageJob`` (one object per value)."""
  return _optimizer(job.optimizer, job.learning_rate, job.momentum, job.weight_decay,
                    job.schedule, job.num_steps)


@functools.lru_cache(maxsize=None)
def _optimizer(name: str, lr: float, momentum: float, weight_decay: float, schedule: str,
               total_steps: int):
  # One object per value, so train.train_seeds reuses its compiled chunk across calls.
  return train.make_optimizer(name, lr, momentum=momentum, weight_decay=weight_decay,
                              schedule=schedule, total_steps=total_steps)


def config(num_seeds: int, rank: int = RANK) -> LowRankJob:
  """The default low-rank job with ``num_seeds`` students and one rank."""
  return dataclasses.replace(LowRankJob(), num_seeds=num_seeds, ranks=(rank,))


Run = lowrank.Run


def num_padded_seeds(job: LowRankJob, mesh=None) -> int:
  """``num_seeds`` rounded up to a multiple of the device count (the padded seeds are
  ordinary seeds whose results the job drops)."""
  return sweep.padded_size(job.num_seeds, sweep.seed_mesh() if mesh is None else mesh)


def build(job: LowRankJob, mesh=None) -> lowrank.Run:
  """The job's seed keys (padded seeds), teachers / bases / students, optimizer, loss and
  evaluator, over ``mesh`` (default: every device): ``lowrank.build_run``."""
  mesh = sweep.seed_mesh() if mesh is None else mesh
  return lowrank.build_run(job.setting(), job.eval_setting(), job.attack, seed=job.seed,
                           num_seeds=num_padded_seeds(job, mesh), optimizer=make_optimizer(job),
                           loss=job.loss, batch_size=job.batch_size, mesh=mesh)


def rank_inputs(job: LowRankJob, run: lowrank.Run, r: int, held_out: bool = True):
  """``(data_args, held, state)`` at rank ``r`` (``lowrank.rank_inputs``)."""
  return lowrank.rank_inputs(run, job.setting(), r, held_out)


class Problem(NamedTuple):
  """Everything ``train.train_seeds`` takes, batched over ``[S]`` seeds."""
  config: LowRankJob
  teacher: models.MLP
  student: models.MLP
  loss_fn: Any
  optimizer: Any
  state: train.TrainState
  teacher_params: Any
  data_args: Any
  keys: jax.Array
  projector: jax.Array   # [S, d, d]


def jax_problem(num_seeds: int, rank: int = RANK) -> Problem:
  """Seeds ``0 .. num_seeds - 1`` of the default setting (seed ``s`` = ``fold_in(0, s)``)."""
  c = config(num_seeds, rank)
  if c.weight_decay or c.schedule != 'constant' or c.num_train:
    raise ValueError('the benchmark assumes the default config (no weight decay, '
                     'constant schedule, online data)')
  run = build(c)
  data_args, _, state = rank_inputs(c, run, rank, held_out=False)
  projector = data_args['projector']
  # Exactly num_seeds seeds (no padding to the device count: one device here).
  cut = lambda tree: jax.tree_util.tree_map(lambda v: v[:num_seeds], tree)
  return Problem(c, run.problem.teacher, run.problem.student, run.loss_fn, run.optimizer,
                 cut(state), cut(run.problem.teacher_params), cut(data_args),
                 run.keys.train[:num_seeds], projector[:num_seeds])


def seed_slice(tree: Any, i: int) -> Any:
  """Seed ``i`` of a batched pytree (a single-seed pytree)."""
  return jax.tree_util.tree_map(lambda v: v[i], tree)


def flops_per_student_step(c) -> dict:
  """Matmul FLOPs (2 per multiply-add) of one training step of one student.

  With ``B`` = batch, ``d`` = input dim, ``m`` / ``n`` = teacher / student
  hidden width, ``C`` = outputs (one hidden layer, as in the default):

  * data ``s (U z)^T``: ``2 B d r`` (``r`` = the rank, ``c.ranks[0]``);
  * teacher forward (labels): ``2 B (d m + m C)``;
  * student forward: ``F = 2 B (d n + n C)``;
  * student backward: weight gradients ``2 B (d n + n C)`` (= F) plus the
    activation gradient of every layer but the first ``2 B n C`` (the input
    gradient is not needed, and XLA / autograd do not compute it).

  ``exact`` sums these; ``rule_3x`` uses the usual "forward + backward = 3x
  forward" for the student instead. Elementwise work (ReLU, the loss, the
  optimizer update, the random numbers) is not counted.
  """
  b, d, c_out = c.batch_size, c.d, c.out_dim
  widths_t = tuple(c.teacher_hidden)
  widths_s = tuple(c.width_mult * w for w in widths_t)
  if len(widths_t) != 1:
    raise ValueError('flop count written for one hidden layer (the default)')
  m, n = widths_t[0], widths_s[0]
  data = 2 * b * d * c.ranks[0]
  teacher = 2 * b * (d * m + m * c_out)
  forward = 2 * b * (d * n + n * c_out)
  backward = forward + 2 * b * n * c_out
  return {'data': data, 'teacher': teacher, 'student_fwd': forward,
          'student_bwd': backward, 'exact': data + teacher + forward + backward,
          'rule_3x': data + teacher + 3 * forward}


# ----------------------------------------------------------------------------
# PyTorch side.
# ----------------------------------------------------------------------------


def torch_regression_step(teacher, student, opt, x) -> None:
  """One PyTorch training step of ``student`` on the MSE to ``teacher``'s outputs at ``x``
  (the step a PyTorch user writes; every PyTorch peer of the benchmarks takes it)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    target = teacher(x)
  loss = F.mse_loss(student(x), target)
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()


def torch_mlp(params: Any, device):
  """A ``torch.nn.Sequential`` (Linear, ReLU, ..., Linear) holding Flax MLP ``params``."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  p = params['params']
  names = sorted((k for k in p if k.startswith('hidden_')), key=lambda k: int(k[7:]))
  layers = []
  for name in names + ['output']:
    kernel = np.asarray(p[name]['kernel'])  # [in, out]
    lin = nn.Linear(kernel.shape[0], kernel.shape[1], bias='bias' in p[name])
    with torch.no_grad():
      lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
      if 'bias' in p[name]:
        lin.bias.copy_(torch.from_numpy(np.array(p[name]['bias'])))
    layers += [lin, nn.ReLU()]
  return nn.Sequential(*layers[:-1]).to(device)


class TorchSeed(NamedTuple):
  teacher: Any      # nn.Sequential, requires_grad False
  student: Any      # nn.Sequential (fresh copy of the initial student)
  projector: Any    # [d, d] tensor
  scale: float


def torch_seed(problem: Problem, i: int, device) -> TorchSeed:
  """Seed ``i`` of ``problem`` as PyTorch modules / tensors on ``device``."""
  import torch  # pylint: disable=g-import-not-at-top
  teacher = torch_mlp(seed_slice(problem.teacher_params, i), device).requires_grad_(False)
  student = torch_mlp(seed_slice(problem.state.params, i), device)
  projector = torch.from_numpy(np.array(problem.projector[i])).to(device)
  return TorchSeed(teacher, student, projector, float(problem.data_args['scale'][i]))


class TorchStacked(NamedTuple):
  """Seeds ``0 .. S-1`` as stacked PyTorch tensors, for a hand-batched ensemble.

  ``teacher`` and ``student`` list the Dense layers in order (output last),
  each ``(kernel [S, in, out], bias [S, 1, out] or None)``, in the Flax
  layout (``x @ kernel + bias``), so ``bias.baddbmm(x, kernel)`` is the layer
  on ``x [S, B, in]``; ReLU between layers.
  """
  teacher: Any      # list of (kernel, bias); requires_grad False
  student: Any      # list of (kernel, bias): the initial students (copies)
  projector: Any    # [S, d, d]
  scale: Any        # [S, 1, 1]
  basis_t: Any      # [S, r, d]: U^T, U's columns an orthonormal basis of the data subspace


def torch_stacked(problem: Problem, num_seeds: int, device) -> TorchStacked:
  """Seeds ``0 .. num_seeds - 1`` of ``problem`` as ``TorchStacked`` on ``device``."""
  import torch  # pylint: disable=g-import-not-at-top

  def tensor(v):
    return torch.from_numpy(np.array(v[:num_seeds], np.float32)).to(device).contiguous()

  def layers(params, model):
    p = params['params']
    return [(tensor(p[name]['kernel']),
             tensor(p[name]['bias'])[:, None, :] if 'bias' in p[name] else None)
            for name in models.layer_names(model)]
  scale = tensor(problem.data_args['scale'])[:, None, None]
  return TorchStacked(layers(problem.teacher_params, problem.teacher),
                      layers(problem.state.params, problem.student),
                      tensor(problem.projector), scale,
                      tensor(subspace_basis_t(problem.projector)))


def subspace_basis_t(projector: Any) -> np.ndarray:
  """``[S, r, d]`` ``U^T`` of projectors ``P = U U^T`` ``[S, d, d]`` (rank ``r = trace P``):
  the eigenvectors of their unit eigenvalues, so ``z U^T``, ``z ~ N(0, I_r)``, has the law
  of ``xi P``, ``xi ~ N(0, I_d)``."""
  proj = np.asarray(projector, np.float64)
  r = int(round(float(np.trace(proj[0]))))
  return np.swapaxes(np.linalg.eigh(proj)[1][:, :, -r:], 1, 2)
