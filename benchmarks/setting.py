"""The benchmarked problem: the default low-rank setting, in JAX and in PyTorch.

JAX side: built exactly as ``experiments/lowrank.py`` builds it, from the
default config ``experiments/configs/lowrank.py`` (``d = 40``, teacher
``40 -> 10 -> 10`` ReLU, student ``40 -> 50 -> 10`` (width x5), MSE to the
teacher's outputs, SGD momentum 0.9, lr 0.05, batch 128, fresh low-rank
Gaussian inputs ``s U z`` every step, ``r`` normals per example) at one rank
(10 by default).

PyTorch side: the same teacher, projector and initial student of a seed,
copied from the JAX problem, so both frameworks train literally the same
networks from the same start; only the data stream's random numbers differ.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.configs import lowrank as lowrank_config
from tsrobust import models
from tsrobust import train

RANK = 10


def config(num_seeds: int, rank: int = RANK):
  """The default low-rank config with ``num_seeds`` students and one rank."""
  c = lowrank_config.get_config()
  c.num_seeds = num_seeds
  c.ranks = (rank,)
  return c


class Problem(NamedTuple):
  """Everything ``train.train_seeds`` takes, batched over ``[S]`` seeds."""
  config: Any
  teacher: models.MLP
  student: models.MLP
  loss_fn: Any
  optimizer: Any
  state: train.TrainState
  teacher_params: Any
  data_args: Any
  keys: jax.Array
  projector: jax.Array   # [S, d, d]


@functools.lru_cache(maxsize=None)
def _loss_fn(student: models.MLP, teacher: models.MLP, loss: str, batch_size: int):
  # One loss function object per setting, so train.train_seeds can reuse its
  # compiled chunk across calls (it keys its cache on the loss function).
  return train.teacher_regression_loss(student.apply, teacher.apply, loss,
                                       common.sampler(0), batch_size)


@functools.lru_cache(maxsize=None)
def _optimizer(name: str, lr: float, momentum: float):
  return train.make_optimizer(name, lr, momentum=momentum)


def jax_problem(num_seeds: int, rank: int = RANK) -> Problem:
  """Seeds ``0 .. num_seeds - 1`` of the default setting (seed ``s`` = ``fold_in(0, s)``)."""
  c = config(num_seeds, rank)
  if c.weight_decay or c.schedule != 'constant' or c.num_train:
    raise ValueError('the benchmark assumes the default config (no weight decay, '
                     'constant schedule, online data)')
  keys = common.seed_keys(c)
  problem = common.build_problem(c, keys)
  optimizer = _optimizer(c.optimizer, c.learning_rate, c.momentum)
  loss_fn = _loss_fn(problem.student, problem.teacher, c.loss, c.batch_size)
  scales = jnp.full((problem.bases.shape[0],), common.data_scale(c, rank))
  data_args = common.lowrank_args(problem.bases, rank, scales)
  projector = data_args['projector']
  state = jax.vmap(lambda p: train.init_state(p, optimizer))(problem.student_params)
  # Exactly num_seeds seeds (no padding to the device count: one device here).
  cut = lambda tree: jax.tree_util.tree_map(lambda v: v[:num_seeds], tree)
  return Problem(c, problem.teacher, problem.student, loss_fn, optimizer, cut(state),
                 cut(problem.teacher_params), cut(data_args),
                 keys.train[:num_seeds], projector[:num_seeds])


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
