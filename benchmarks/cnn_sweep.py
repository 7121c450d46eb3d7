r"""The image study's CNN students: S students trained by tsrobust and by PyTorch peers.

The student is the image binary's default (``benchmarks/setting.py``'s ``ImageJob``):
the teacher CNN conv (8, 16), dense (32,), 3 x 3 kernels, 2 x 2 max pooling, a fixed
random teacher (``cnn.init_params``, not pretrained: speed does not depend on it), the
student ``cnn.student_of(teacher, width_mult=2)``, MNIST-sized inputs (the bundled
MNIST training images by default, ``--data=random`` for uniform random ones), batch 32,
Adam lr 1e-3, MSE to the teacher's outputs: the ``standard`` method's loss
(``train.teacher_regression_loss``, minibatches drawn with replacement from the shared
training images, as ``experiments/real.py`` trains).

Four trainers, side by side, from the same initial students and on the same batches:

(a) ``vmap``: tsrobust's ``train.train_seeds`` (``jit(vmap(lax.scan chunk))``, one chunk
    of ``--steps`` steps, the images passed once as ``shared_args``), the students
    sharded over JAX's devices as the binaries do (on a CPU one device per core;
    ``--cpu_devices=1`` for one device; S padded to a multiple of the device count
    with extra students, trained and timed as in the binaries), timed after
    compilation, ``jax.block_until_ready``;
(b) ``sequential``: a Python loop over S ``nn.Sequential`` students (``Conv2d`` /
    ``ReLU`` / ``MaxPool2d`` / ``Flatten`` / ``Linear``), one after the other, each with its
    own ``torch.optim.Adam``, ``F.mse_loss``, ``zero_grad / backward / step``;
(c) ``torch_func``: ``torch.func.vmap(torch.func.grad(loss))`` over the students'
    parameters stacked by ``torch.func.stack_module_state`` (``functional_call``), one
    ``torch.optim.Adam`` over the stacked tensors (Adam is elementwise, so that is each
    student's own Adam);
(d) ``grouped``: the hand-batched ensemble: the S students' conv layers as one grouped
    convolution (``groups=S``, input ``[B, S * C, H, W]``), their dense layers as batched
    matmuls (``baddbmm`` with ``[S, in, out]`` kernels), loss = sum over students of
    each one's mean MSE (so each student's gradient is its own), ``torch.optim.Adam``
    over the stacked tensors.

Same weights: the PyTorch students are the JAX students copied (flax conv kernels
``[k, k, C_in, C_out]`` (HWIO) -> PyTorch ``[C_out, C_in, k, k]`` (OIHW); dense kernels
transposed; the first dense kernel's rows permuted from the flax flattening order
(H, W, C) to PyTorch's (C, H, W)); the library's convolution is im2col + one matmul
(``cnn._Conv``), a cross-correlation with 'SAME' zero padding, which is what
``F.conv2d(padding='same')`` computes. Same batches: student ``i``'s step ``t`` in
tsrobust draws the indices ``randint(split(fold_in(key_i, t))[0], (B,), 0, N)``
(``train.make_chunk_fn``, ``train.teacher_regression_loss``, ``lowrank.sampler``);
``batch_indices`` computes them and the PyTorch trainers gather the same images
(inside their timed loops, as the JAX trainer gathers inside its own).
``tests/test_benchmarks_cnn_sweep.py`` checks that every trainer's students, after a
few steps, give the JAX students' outputs, and after 0 steps the JAX initial loss (and
the same after a few PGD-AT steps, given tsrobust's random starts).

PGD-AT (``--step=pgd_at``, or ``both``): the image study's ``at`` students' step, the attack
inside training. tsrobust: the same ``train.train_seeds`` with the loss
``methods.make_loss('at', ...)`` and the per-student ``data_args`` of
``methods.student_args`` (``at_eps``, ``at_fraction``), the settings
``real_eval.method_settings`` gives the default config (``at_settings``: L-inf, 3 PGD steps of
``2.5 eps / 3``, oracle labels (the teacher at the attacked point), the whole batch attacked,
pixels in [0, 1], one restart from a random start; ``--at_eps``, default 0.3, the larger of the
study's two budgets). The PyTorch peers run the same PGD (``torch_pgd``: the random start,
``sign`` steps clipped to the box and the pixel range, per example the best of every iterate
as ``attacks.pgd`` keeps it, hence one more forward at the last point), through their own
model (sequential: each student; ``torch_func``: ``vmap(grad(objective, argnums=1))``;
``grouped``: all S students in the grouped model at once; the attack's gradients are the
inputs' only, its bookkeeping under ``torch.no_grad``, no host syncs), then the step at the
attacked points. Given tsrobust's random starts (``jax_random_starts``) they reach the JAX
students' weights (the tests' known answer); timed, they draw their own, so the held-out
losses (clean test images) agree within the spread the random starts make.

Every repeat runs the trainers back to back (their order rotated from one repeat to the
next), so a change in load hits all of them; each reported time is the median over
``--repeats``. The held-out loss (MSE of every student to the teacher on ``--heldout``
test images, mean over the S students) is printed per trainer after timing: the
trainers train the same thing, so it agrees closely.

FLOP/s: the convolutions' and matmuls' FLOPs per student-step (``flops_per_student_step``:
``B`` x (the student's forward, its backward = twice the forward less the first layer's
input gradient, the teacher's forward)) times S x steps per second, as a fraction of a
large float32 ``jnp.dot``'s rate on the same machine (``torch.mm``'s is recorded too).

    python -m benchmarks.cnn_sweep --students=1,8,32 --steps=200 --repeats=3 \
        --json=/tmp/cnn_sweep.json
    python -m benchmarks.cnn_sweep --step=pgd_at --students=1,8,32 --steps=10 --repeats=3

``--json``: ``rows[]`` one per step kind and S (``rows[].step``), see ``run_sweep``.
"""

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hardware
from benchmarks import seed_sweep
from benchmarks import setting
from tsrobust import attacks
from tsrobust import cnn
from tsrobust import io
from tsrobust import lowrank
from tsrobust import methods
from tsrobust import sweep
from tsrobust import train

TORCH_TRAINERS = ('sequential', 'torch_func', 'grouped')
# 'vmap_batched' (--also_batched): train_seeds with batching='vmap', every student of a device
# at once: the program the binaries ran on a CPU before they mapped the students one at a time.
TRAINERS = ('vmap', 'vmap_batched') + TORCH_TRAINERS
TORCH_WARMUP_STEPS = 5
STEP_KINDS = ('standard', 'pgd_at')
# The PGD-AT students' budget: the larger of the image study's default grid
# (``experiments/configs/real.py``: ``at_eps = (0.05, 0.3)``; the time does not depend on it).
AT_EPS = 0.3


def at_settings(job: setting.ImageJob) -> methods.Settings:
  """The methods' settings the image study trains its PGD-AT (``at``) students with.

  ``experiments/real_eval.method_settings`` of the default config: the loss and batch of
  ``job``, L-inf PGD of ``at_steps = 3`` steps of ``step_factor * eps / at_steps`` (2.5),
  oracle labels, the whole batch attacked, pixels kept in [0, 1]; the rest are
  ``methods.Settings``' defaults, which are the config's (a test checks they are equal).
  """
  return methods.Settings(loss=job.loss, batch_size=job.batch_size, clip_range=(0.0, 1.0),
                          budget_scale=1.0 / job.eps_denominator)


class Problem(NamedTuple):
  """S students of one teacher, their optimizer, loss and data (``make_problem``)."""
  job: setting.ImageJob
  teacher: cnn.CNN
  student: cnn.CNN
  teacher_params: Any   # one teacher (no seeds axis)
  state: Any            # train.TrainState [S, ...]
  keys: Any             # [S] training keys
  optimizer: Any
  loss_fn: Any
  train_x: np.ndarray   # [N, H, W, C] float32
  test_x: np.ndarray    # [n, H, W, C] float32
  kind: str = 'standard'  # the step: STEP_KINDS
  data_args: Any = None   # per-student data_args [S] (PGD-AT: at_eps, at_fraction), or None
  settings: Any = None    # methods.Settings (PGD-AT), or None

  @property
  def num_seeds(self) -> int:
    return int(self.keys.shape[0])

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(self.train_x.shape[1:])


def make_problem(num_seeds: int, *, job: Optional[setting.ImageJob] = None,
                 data: str = 'mnist', image_shape: Sequence[int] = (28, 28, 1),
                 num_train: int = 4000, num_heldout: int = 1000, seed: int = 0,
                 step: str = 'standard', at_eps: float = AT_EPS) -> Problem:
  """The image job's teacher (random), ``num_seeds`` students, Adam and the step's loss.

  Args:
    num_seeds: students S.
    job: the ``ImageJob`` (default: the binary's default config); its CNN, width
      multiplier, optimizer, loss and batch size.
    data: ``'mnist'`` (``job.load_data()``: the bundled MNIST, its training and test
      images) or ``'random'`` (uniform ``[num_train + num_heldout, *image_shape]``).
    num_heldout: test images of the held-out loss.
    seed: the teacher's, students' and training keys' PRNG seed.
    step: ``'standard'`` (the ``standard`` method's loss) or ``'pgd_at'`` (the ``at``
      method's, ``methods.make_loss('at', ...)`` with ``at_settings(job)``, every student
      at the budget ``at_eps`` through ``methods.student_args``, as the study builds them).
  """
  if step not in STEP_KINDS:
    raise ValueError(f'step must be one of {STEP_KINDS}, got {step!r}')
  job = job or setting.ImageJob()
  if data == 'mnist':
    ds = job.load_data()
    train_x, test_x = np.asarray(ds.train_x, np.float32), np.asarray(ds.test_x, np.float32)
  elif data == 'random':
    x = np.random.default_rng(seed).random((num_train + num_heldout,) + tuple(image_shape),
                                           np.float32)
    train_x, test_x = x[:num_train], x[num_train:]
  else:
    raise ValueError(f"data must be 'mnist' or 'random', got {data!r}")
  test_x = test_x[:num_heldout]
  teacher = job.teacher_model()
  student = cnn.student_of(teacher, job.width_mult, job.student_init_scale)
  shape = train_x.shape[1:]
  k_teacher, k_student, k_train = jax.random.split(jax.random.PRNGKey(seed), 3)
  teacher_params = cnn.init_params(k_teacher, teacher, shape)
  params = jax.vmap(lambda k: cnn.init_params(k, student, shape))(
      jax.random.split(k_student, num_seeds))
  optimizer = setting.make_optimizer(job)
  state = jax.vmap(lambda p: train.init_state(p, optimizer))(params)
  sample = lowrank.sampler(train_x.shape[0])
  data_args = settings = None
  if step == 'standard':
    loss_fn = train.teacher_regression_loss(student.apply, teacher.apply, job.loss, sample,
                                            job.batch_size)
  else:
    settings = at_settings(job)
    loss_fn = methods.make_loss('at', student.apply, teacher.apply, sample, settings)
    data_args = methods.student_args([('at', {'at_eps': at_eps})], num_seeds, settings)
  return Problem(job, teacher, student, teacher_params, state,
                 jax.random.split(k_train, num_seeds), optimizer, loss_fn, train_x, test_x,
                 step, data_args, settings)


class PGDSpec(NamedTuple):
  """One student's PGD of PGD-AT, in float32 as the library computes it (``pgd_spec``)."""
  eps: float
  alpha: float       # step_factor * eps / steps
  steps: int
  clip_range: Tuple[float, float]


def pgd_spec(problem: Problem, i: int = 0) -> PGDSpec:
  """Student ``i``'s attack: ``train.pgd_augmentation``'s ``attacks.pgd`` arguments.

  Only what the PyTorch peers implement: L-inf, oracle labels, the whole batch, one
  restart, a random start, no subspace, pixels clipped (``check_pgd_at_supported``).
  """
  st = problem.settings
  eps = np.float32(problem.data_args['at_eps'][i])
  alpha = np.float32(st.step_factor) * eps / np.float32(st.at_steps)
  return PGDSpec(float(eps), float(alpha), st.at_steps, tuple(st.clip_range))


def check_pgd_at_supported(problem: Problem) -> None:
  """Raises ``ValueError`` where the study's PGD-AT is one the PyTorch peers do not write."""
  st = problem.settings
  fractions = np.asarray(problem.data_args['at_fraction'])
  eps = np.asarray(problem.data_args['at_eps'])
  if (st.at_norm != 'linf' or st.at_label != 'oracle' or st.loss != 'mse'
      or st.clip_range is None or not np.all(fractions == 1.0) or not np.all(eps == eps[0])):
    raise ValueError('the PyTorch PGD-AT peers implement L-inf PGD with oracle labels, the MSE, '
                     'the whole batch attacked, pixels clipped and one budget for all students; '
                     f'got {st} and at_eps {eps}, at_fraction {fractions}')


def jax_random_starts(problem: Problem, num_seeds: int, steps: int) -> np.ndarray:
  """``[num_seeds, steps, B, C, H, W]`` PGD-AT's random starts in tsrobust's step ``t``.

  Before clipping the pixels: ``teacher_regression_loss`` splits the step's key
  ``fold_in(key_i, t)`` and hands the second half to the transform;
  ``attacks.pgd`` splits it once per restart (one) and ``_random_start`` draws the start.
  For the tests: the PyTorch trainers, given these, compute what tsrobust computes.
  """
  b = problem.job.batch_size
  x = jnp.zeros((b,) + problem.image_shape, jnp.float32)
  eps = problem.data_args['at_eps'][:num_seeds]

  def one(key, e, t):
    run_key = jax.random.split(jax.random.split(jax.random.fold_in(key, t))[1], 1)[0]
    return attacks._random_start(run_key, x, e, 'linf', None)  # pylint: disable=protected-access
  starts = jax.vmap(lambda k, e: jax.vmap(lambda t: one(k, e, t))(jnp.arange(steps)))(
      problem.keys[:num_seeds], eps)
  return np.ascontiguousarray(np.asarray(starts).transpose(0, 1, 2, 5, 3, 4))


def batch_indices(problem: Problem, num_seeds: int, steps: int) -> np.ndarray:
  """``[num_seeds, steps, B]`` the training images tsrobust's step ``t`` of student ``i`` uses.

  ``train.make_chunk_fn`` gives step ``t`` the key ``fold_in(key_i, t)``;
  ``train.teacher_regression_loss`` splits it and samples with the first half;
  ``lowrank.sampler`` draws ``randint(key, (B,), 0, N)``.
  """
  n, b = problem.train_x.shape[0], problem.job.batch_size

  def one(key, t):
    return jax.random.randint(jax.random.split(jax.random.fold_in(key, t))[0], (b,), 0, n)
  idx = jax.vmap(lambda k: jax.vmap(lambda t: one(k, t))(jnp.arange(steps)))(
      problem.keys[:num_seeds])
  return np.array(idx).reshape(num_seeds, steps, b)


def flops_per_student_step(problem: Problem) -> dict:
  """Conv and matmul FLOPs of one student-step (a batch): student forward + backward,
  teacher forward. The backward is twice the forward less the first layer's input gradient.

  PGD-AT adds the attack: per PGD step the student's and the teacher's forward and their
  input gradients (as much again: every layer's, no weight gradients), and a last forward
  of both at the final point (``attacks.pgd`` evaluates every iterate)."""
  def forward(model):
    h, w, c = problem.image_shape
    k = model.kernel_size
    layers = []
    for width in model.conv_widths:
      layers.append(2 * h * w * k * k * c * width)
      c = width
      if model.pool != 'none':
        h, w = h // 2, w // 2
    fan_in = h * w * c
    for width in tuple(model.dense_widths) + (model.out_dim,):
      layers.append(2 * fan_in * width)
      fan_in = width
    return layers
  student, teacher = forward(problem.student), forward(problem.teacher)
  b = problem.job.batch_size
  per_example = 3 * sum(student) - student[0] + sum(teacher)
  out = {'exact': b * per_example, 'student_forward': b * sum(student),
         'teacher_forward': b * sum(teacher)}
  if problem.kind == 'pgd_at':
    both = sum(student) + sum(teacher)
    out['attack'] = b * (problem.settings.at_steps * 2 * both + both)
    out['exact'] += out['attack']
  return out


def jax_outputs(problem: Problem, params: Any, x: np.ndarray) -> np.ndarray:
  return np.asarray(problem.student.apply(params, x)[0])


def heldout_loss(problem: Problem, predict, num_seeds: int) -> float:
  """Mean over students ``0 .. num_seeds-1`` of the MSE to the teacher on the test images.

  ``predict(i, x [n, H, W, C]) -> [n, out]``: student ``i``'s outputs.
  """
  target = np.asarray(problem.teacher.apply(problem.teacher_params, problem.test_x)[0])
  return float(np.mean([np.mean((np.asarray(predict(i, problem.test_x)) - target) ** 2)
                        for i in range(num_seeds)]))


def jax_predictor(problem: Problem, params: Any):
  apply = jax.jit(problem.student.apply)
  return lambda i, x: np.asarray(apply(setting.seed_slice(params, i), x)[0])


# ----------------------------------------------------------------------------
# The trainers. ``make_*`` does the untimed preparation and returns ``run()`` that
# trains ``steps`` steps from the initial students, blocks and returns the final
# state. The PyTorch ones also have, as attributes of ``run``:
#   init_state()      fresh copies of the initial students and optimizer state;
#   step(state, x)    one step of every student on x [S, B, C, H, W] (what the timed
#                     loop calls, on the images of ``batch_indices``);
#   predictor(state)  ``fn(i, x [n, H, W, C]) -> [n, out]`` numpy;
#   prepare(r)        r fresh states made outside the timed region; warmup().
# ----------------------------------------------------------------------------


def make_vmap(problem: Problem, steps: int, mesh=None, batching: str = 'vmap'):
  """(a) ``train.train_seeds`` over all of ``problem``'s students (sharded over ``mesh``),
  with ``batching`` (``'vmap'`` or ``'map'``: ``train.train_seeds``)."""
  p = problem
  teacher = jax.tree_util.tree_map(
      lambda v: jnp.broadcast_to(v, (p.num_seeds,) + v.shape), p.teacher_params)
  inputs = (p.state, teacher, p.data_args or {}, p.keys)
  shared = {'train_x': jnp.asarray(p.train_x)}
  if mesh is not None:
    inputs = sweep.shard_seeds(inputs, mesh)
    shared = sweep.replicate(shared, mesh)
  inputs, shared = jax.block_until_ready((inputs, shared))

  def run():
    state, _ = train.train_seeds(p.loss_fn, p.optimizer, *inputs, num_steps=steps,
                                 chunk_steps=max(steps, 1), shared_args=shared,
                                 batching=batching)
    return jax.block_until_ready(state.params)
  return run


def torch_layers(params: Any, model: cnn.CNN, image_shape: Sequence[int]):
  """One flax CNN's parameters as PyTorch's ``[(weight, bias), ...]`` numpy arrays.

  Conv kernels HWIO -> OIHW; dense kernels ``[in, out]`` -> ``[out, in]``; the first
  dense layer's inputs reordered from flax's (H, W, C) flattening to PyTorch's (C, H, W).
  """
  p = params['params']
  h, w, _ = image_shape
  out = []
  for i, _ in enumerate(model.conv_widths):
    k = np.asarray(p[f'conv_{i}']['kernel'])
    out.append((k.transpose(3, 2, 0, 1), _bias(p[f'conv_{i}'])))
    if model.pool != 'none':
      h, w = h // 2, w // 2
  c = model.conv_widths[-1]
  names = cnn.layer_names(model)[len(model.conv_widths):]
  for j, name in enumerate(names):
    k = np.asarray(p[name]['kernel'])
    if j == 0:
      k = k.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
    out.append((k.T, _bias(p[name])))
  return [(np.array(k, order='C'), b) for k, b in out]


def _bias(layer):
  return np.array(layer['bias']) if 'bias' in layer else None


def torch_sequential(layers, model: cnn.CNN, device):
  """An ``nn.Sequential`` of ``model`` holding ``torch_layers``' weights."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  mods = []
  n_conv = len(model.conv_widths)
  pool = {'max': nn.MaxPool2d, 'avg': nn.AvgPool2d}.get(model.pool)
  for i, (w, b) in enumerate(layers):
    if i < n_conv:
      m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding='same', bias=b is not None)
    else:
      if i == n_conv:
        mods.append(nn.Flatten())
      m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
      m.weight.copy_(torch.from_numpy(w))
      if b is not None:
        m.bias.copy_(torch.from_numpy(b))
    mods.append(m)
    if i < len(layers) - 1:
      mods.append(nn.ReLU())
    if i < n_conv and pool is not None:
      mods.append(pool(2))
  return nn.Sequential(*mods).to(device)


def _nchw(x: np.ndarray, device):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)


class _Torch(NamedTuple):
  students: list       # S nn.Sequential, the JAX students copied
  teacher: Any         # nn.Sequential
  images: Any          # [N, C, H, W] tensor
  idx: Any             # [S, steps, B] long tensor
  sync: Any
  pgd: Optional[PGDSpec]  # PGD-AT's attack (None: the standard step)
  starts: Any          # None, or [S, steps, B, C, H, W] PGD-AT's random starts (tests)


def _torch_setup(problem: Problem, num_seeds: int, steps: int, device,
                 starts: Optional[np.ndarray] = None) -> _Torch:
  import torch  # pylint: disable=g-import-not-at-top
  shape = problem.image_shape
  students = [torch_sequential(torch_layers(setting.seed_slice(problem.state.params, i),
                                            problem.student, shape), problem.student, device)
              for i in range(num_seeds)]
  teacher = torch_sequential(torch_layers(problem.teacher_params, problem.teacher, shape),
                             problem.teacher, device).requires_grad_(False)
  idx = torch.from_numpy(batch_indices(problem, num_seeds, max(steps, 1))).to(device)
  pgd = None
  if problem.kind == 'pgd_at':
    check_pgd_at_supported(problem)
    pgd = pgd_spec(problem)
  if starts is not None:
    starts = torch.from_numpy(np.array(starts, np.float32)).to(device)  # a writable copy
  return _Torch(students, teacher, _nchw(problem.train_x, device), idx,
                seed_sweep._torch_sync(device), pgd, starts)  # pylint: disable=protected-access


def torch_pgd(value_and_grad, value, x, spec: PGDSpec, start=None):
  """``attacks.pgd`` (L-inf, one restart, no subspace, pixels clipped) in PyTorch: ``x + delta``.

  A random start (``start``, before clipping, or uniform in ``[-eps, eps]``), ``spec.steps``
  steps ``delta <- clip(delta + alpha sign(g))`` (the box, then the pixel range); as the
  library, per example the best of every iterate (the start, each step's and the final one's
  objective: one more forward), the earliest among equals. ``x [..., B, C, H, W]``;
  ``value_and_grad(xa) -> (objective [..., B], its gradient wrt xa)``, ``value(xa)``: the
  objective alone. No host synchronization.
  """
  import torch  # pylint: disable=g-import-not-at-top
  lo, hi = spec.clip_range
  eps, alpha = spec.eps, spec.alpha
  with torch.no_grad():
    delta = torch.empty_like(x).uniform_(-1.0, 1.0).mul_(eps) if start is None else start
    delta = (x + delta).clamp_(lo, hi).sub_(x)
    best = delta
    best_obj = torch.full(x.shape[:-3], -float('inf'), dtype=x.dtype, device=x.device)

  def keep(best, best_obj, delta, obj):
    better = obj > best_obj
    return torch.where(better[..., None, None, None], delta, best), torch.where(better, obj,
                                                                                best_obj)
  for _ in range(spec.steps):
    obj, g = value_and_grad(x + delta)
    with torch.no_grad():
      best, best_obj = keep(best, best_obj, delta, obj)
      delta = (delta + alpha * g.sign()).clamp_(-eps, eps)
      delta = (x + delta).clamp_(lo, hi).sub_(x)
  with torch.no_grad():
    best, _ = keep(best, best_obj, delta, value(x + delta))
    return x + best


def _finish(t: _Torch, steps: int, init_state, step, predictor, device, loop=None):
  """The timed ``run()`` with its attributes. Its loop: ``loop(state)`` if given, else
  ``steps`` calls of ``step(state, the batches of every student, their random starts)``."""
  def start(i):
    return None if t.starts is None else t.starts[:, i]

  def run_():
    state = run_.fresh.pop()
    if loop is not None:
      loop(state)
    else:
      for i in range(steps):
        step(state, t.images[t.idx[:, i]], start(i))
    t.sync()
    return state

  def warmup():
    state = init_state()
    for i in range(TORCH_WARMUP_STEPS):
      step(state, t.images[t.idx[:, i % t.idx.shape[1]]], None)
    t.sync()

  def predictor_(state):
    import torch  # pylint: disable=g-import-not-at-top
    fn = predictor(state)

    def predict(i, x):
      with torch.no_grad():
        return fn(i, _nchw(x, device)).cpu().numpy()
    return predict
  seed_sweep._fresh_states(run_, init_state)  # pylint: disable=protected-access
  run_.step, run_.predictor, run_.warmup = step, predictor_, warmup
  return run_


def make_sequential(problem: Problem, num_seeds: int, steps: int, device='cpu', starts=None):
  """(b) A Python loop over S students, each with its own ``torch.optim.Adam``.

  PGD-AT: each student's batch attacked by ``torch_pgd`` through that student
  (``torch.autograd.grad`` of the objective wrt the inputs only), then the step at the
  attacked points. ``starts``: PGD-AT's random starts to use (``jax_random_starts``).
  """
  import torch  # pylint: disable=g-import-not-at-top
  t = _torch_setup(problem, num_seeds, steps, device, starts)
  lr = problem.job.learning_rate

  def init_state():
    students = [copy.deepcopy(s) for s in t.students]
    return [(s, torch.optim.Adam(s.parameters(), lr=lr)) for s in students]

  def objective(student, xa):  # [B] the oracle MSE: the teacher at the attacked point
    return ((student(xa) - t.teacher(xa)) ** 2).mean(-1)

  def attack(student, x, start):
    def value_and_grad(xa):
      xa = xa.detach().requires_grad_(True)
      obj = objective(student, xa)
      return obj.detach(), torch.autograd.grad(obj.sum(), xa)[0]
    return torch_pgd(value_and_grad, lambda xa: objective(student, xa), x, t.pgd, start)

  def step_one(student, opt, x, start):
    if t.pgd is not None:
      x = attack(student, x, start)
    setting.torch_regression_step(t.teacher, student, opt, x)

  def step(state, x, start):
    for i, ((student, opt), xi) in enumerate(zip(state, x)):
      step_one(student, opt, xi, None if start is None else start[i])

  def loop(state):
    for i, (student, opt) in enumerate(state):  # one student after the other
      for j in range(steps):
        step_one(student, opt, t.images[t.idx[i, j]],
                 None if t.starts is None else t.starts[i, j])

  def predictor(state):
    return lambda i, x: state[i][0](x)
  return _finish(t, steps, init_state, step, predictor, device, loop)


def make_torch_func(problem: Problem, num_seeds: int, steps: int, device='cpu', starts=None):
  """(c) ``vmap(grad(functional_call))`` over stacked students, Adam on the stacks.

  PGD-AT: the attack's input gradients by ``vmap(grad(objective, argnums=1))`` over the
  stacked students and their batches (the teacher shared), then the step at the attacked
  points."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import func  # pylint: disable=g-import-not-at-top
  t = _torch_setup(problem, num_seeds, steps, device, starts)
  lr = problem.job.learning_rate
  stacked, _ = func.stack_module_state(t.students)
  stacked = {k: v.detach() for k, v in stacked.items()}
  base = copy.deepcopy(t.students[0]).to('meta')

  def loss(params, x, target):
    return torch.mean((func.functional_call(base, params, (x,)) - target) ** 2)
  grads_fn = func.vmap(func.grad(loss))

  def objective(params, xa):  # (sum, [B]) the oracle MSE of one student
    obj = ((func.functional_call(base, params, (xa,)) - t.teacher(xa)) ** 2).mean(-1)
    return obj.sum(), obj
  input_grads = func.vmap(func.grad(objective, argnums=1, has_aux=True))
  values = func.vmap(lambda p, xa: objective(p, xa)[1])

  def init_state():
    params = {k: v.clone() for k, v in stacked.items()}
    return params, torch.optim.Adam(list(params.values()), lr=lr)

  def attack(params, x, start):
    def value_and_grad(xa):
      g, obj = input_grads(params, xa)
      return obj, g
    return torch_pgd(value_and_grad, lambda xa: values(params, xa), x, t.pgd, start)

  def step(state, x, start):
    params, opt = state
    if t.pgd is not None:
      x = attack(params, x, start)
    s, b = x.shape[:2]
    with torch.no_grad():
      target = t.teacher(x.reshape((s * b,) + x.shape[2:])).reshape(s, b, -1)
    grads = grads_fn(params, x, target)
    for k, v in params.items():
      v.grad = grads[k]
    opt.step()

  def predictor(state):
    return lambda i, x: func.functional_call(base, {k: v[i] for k, v in state[0].items()},
                                             (x,))
  return _finish(t, steps, init_state, step, predictor, device)


def make_grouped(problem: Problem, num_seeds: int, steps: int, device='cpu', starts=None):
  """(d) Grouped convolutions (``groups=S``) and batched matmuls, Adam on the stacks.

  PGD-AT: the attack runs through the same grouped model, all S students at once (one
  ``torch.autograd.grad`` wrt the inputs ``[S, B, C, H, W]`` per PGD step; the teacher on
  the ``S * B`` points), then the step at the attacked points."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  t = _torch_setup(problem, num_seeds, steps, device, starts)
  model, lr, s = problem.student, problem.job.learning_rate, num_seeds
  n_conv = len(model.conv_widths)
  pool = {'max': F.max_pool2d, 'avg': F.avg_pool2d}.get(model.pool)
  per = [torch_layers(setting.seed_slice(problem.state.params, i), model,
                      problem.image_shape) for i in range(s)]
  stacked = []  # conv: [S * C_out, C_in, k, k], [S * C_out]; dense: [S, in, out], [S, 1, out]
  for j in range(len(per[0])):
    ws = [p[j][0] for p in per]
    bs = [p[j][1] for p in per]
    if j < n_conv:
      w, b = np.concatenate(ws), None if bs[0] is None else np.concatenate(bs)
    else:
      w = np.stack([x.T for x in ws])
      b = None if bs[0] is None else np.stack(bs)[:, None]
    stacked.append((torch.from_numpy(np.ascontiguousarray(w)).to(device),
                    None if b is None else torch.from_numpy(b).to(device)))

  def forward(layers, x):
    """``x [S, B, C, H, W]`` -> ``[S, B, out]``."""
    k, b = x.shape[:2]
    h = x.transpose(0, 1).reshape((b, k * x.shape[2]) + x.shape[3:])
    for j, (w, bias) in enumerate(layers):
      if j < n_conv:
        h = F.conv2d(h, w, bias, padding='same', groups=k).relu()
        if pool is not None:
          h = pool(h, 2)
        if j == n_conv - 1:
          h = h.reshape(b, k, -1).transpose(0, 1)
      else:
        h = h.bmm(w) if bias is None else bias.baddbmm(h, w)
        if j < len(layers) - 1:
          h = h.relu()
    return h

  def init_state():
    params = [v.clone().requires_grad_(True) for layer in stacked for v in layer
              if v is not None]
    return params, torch.optim.Adam(params, lr=lr)

  def layers(params):
    it = iter(params)
    return [(next(it), None if b is None else next(it)) for _, b in stacked]

  def teacher(x):  # [S, B, C, H, W] -> [S, B, out]
    k, b = x.shape[:2]
    return t.teacher(x.reshape((k * b,) + x.shape[2:])).reshape(k, b, -1)

  def attack(params, x, start):
    def objective(xa):  # [S, B] the oracle MSE
      return ((forward(layers(params), xa) - teacher(xa)) ** 2).mean(-1)

    def value_and_grad(xa):
      xa = xa.detach().requires_grad_(True)
      obj = objective(xa)
      return obj.detach(), torch.autograd.grad(obj.sum(), xa)[0]
    return torch_pgd(value_and_grad, objective, x, t.pgd, start)

  def step(state, x, start):
    params, opt = state
    if t.pgd is not None:
      x = attack(params, x, start)
    with torch.no_grad():
      target = teacher(x)
    loss = ((forward(layers(params), x) - target) ** 2).mean(dim=(1, 2)).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def predictor(state):
    def one(i, x):
      with torch.no_grad():
        mine = []
        for j, (w, b) in enumerate(layers(state[0])):
          if j < n_conv:
            c = w.shape[0] // s
            mine.append((w[i * c:(i + 1) * c], None if b is None else b[i * c:(i + 1) * c]))
          else:
            mine.append((w[i:i + 1], None if b is None else b[i:i + 1]))
        return forward(mine, x[None])[0]
    return one
  return _finish(t, steps, init_state, step, predictor, device)

MAKERS = {'sequential': make_sequential, 'torch_func': make_torch_func,
          'grouped': make_grouped}


# ----------------------------------------------------------------------------


def measure(problem: Problem, num_seeds: int, steps: int, repeats: int, *, mesh=None,
            torch_trainers: Sequence[str] = TORCH_TRAINERS, device='cpu',
            batching: str = 'vmap', also_batched: bool = False) -> dict:
  """Times every trainer ``repeats`` times (alternated) on ``num_seeds`` students.

  ``batching``: the ``vmap`` trainer's (``train.train_seeds``); ``also_batched``: also
  time ``vmap_batched``, the same trainer with ``batching='vmap'``.

  ``problem`` may hold more students (the vmap trainer's padding); the PyTorch
  trainers train the first ``num_seeds``, and held-out losses are over those.

  Returns ``{'trainers': {name: {'seconds', 'seconds_per_repeat',
  'seconds_per_student_step', 'heldout_loss', ['compile_seconds']}},
  'heldout_loss_init': ..., 'note': ...}``.
  """
  runs = {'vmap': make_vmap(problem, steps, mesh, batching)}
  compile_s, _, _ = seed_sweep.timed(runs['vmap'])
  jax_names = ['vmap']
  if also_batched:
    runs['vmap_batched'] = make_vmap(problem, steps, mesh, 'vmap')
    batched_compile_s, _, _ = seed_sweep.timed(runs['vmap_batched'])
    jax_names.append('vmap_batched')
  for name in torch_trainers:
    runs[name] = MAKERS[name](problem, num_seeds, steps, device)
    runs[name].prepare(repeats)
    runs[name].warmup()
  names = list(runs)
  times = {n: [] for n in names}
  final, note = {}, ''
  for r in range(repeats):
    for n in names[r % len(names):] + names[:r % len(names)]:  # rotated each repeat
      wall, comp, final[n] = seed_sweep.timed(runs[n])
      if comp > 0 and n in jax_names:
        note += f' ({n} recompiled in a timed call, {comp:.1f}s, subtracted)'
      times[n].append(wall - comp)
  predictors = {n: jax_predictor(problem, final[n]) for n in jax_names}
  predictors.update({n: runs[n].predictor(final[n]) for n in torch_trainers})
  trainers = {}
  for n in names:
    med = statistics.median(times[n])
    trainers[n] = {'seconds': med, 'seconds_per_repeat': times[n],
                   'seconds_per_student_step': med / (num_seeds * max(steps, 1)),
                   'heldout_loss': heldout_loss(problem, predictors[n], num_seeds)}
  trainers['vmap']['compile_seconds'] = compile_s
  if also_batched:
    trainers['vmap_batched']['compile_seconds'] = batched_compile_s
  return {'trainers': trainers, 'note': note.strip(),
          'heldout_loss_init': heldout_loss(
              problem, jax_predictor(problem, problem.state.params), num_seeds)}


def best_peer(trainers: dict) -> Optional[str]:
  peers = [n for n in TORCH_TRAINERS if n in trainers]
  return min(peers, key=lambda n: trainers[n]['seconds']) if peers else None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--students', default='1,8,32', help='comma-separated numbers S')
  parser.add_argument('--steps', type=int, default=200, help='training steps per student')
  parser.add_argument('--step', default='standard', choices=STEP_KINDS + ('both',),
                      help="the training step timed: the standard method's, PGD-AT's (the "
                      "image study's 'at' students: the attack inside training), or both")
  parser.add_argument('--at_eps', type=float, default=AT_EPS,
                      help='PGD-AT budget of every student (L-inf, pixels in [0, 1])')
  parser.add_argument('--at_train_steps', type=int, default=0,
                      help='training steps per student of the PGD-AT rows (0: --steps)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', default=None, metavar='PATH',
                      help='also write the results as JSON here (rewritten after every S)')
  parser.add_argument('--data', default='mnist', choices=('mnist', 'random'),
                      help='the bundled MNIST images, or uniform random 28 x 28 x 1 ones')
  parser.add_argument('--heldout', type=int, default=1000, help='test images of the loss')
  parser.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True,
                      help='run the PyTorch trainers (needs requirements-bench.txt)')
  parser.add_argument('--torch_threads', type=int, default=0,
                      help="torch.set_num_threads; 0 keeps PyTorch's default (one per core)")
  parser.add_argument('--cpu_devices', type=int, default=0,
                      help='JAX CPU devices the vmap trainer shards students over: 0 = one '
                      "per core (the binaries' default), 1 = one device")
  parser.add_argument('--batching', default='auto', choices=('auto',) + sweep.SEED_BATCHINGS,
                      help="the vmap trainer's train_seeds(batching=...): auto = the "
                      "binaries' choice (sweep.default_seed_batching(): 'map' on a CPU)")
  parser.add_argument('--also_batched', action=argparse.BooleanOptionalAction, default=False,
                      help="also time vmap_batched: train_seeds(batching='vmap'), every "
                      'student of a device at once')
  parser.add_argument('--matmul_n', type=int, default=2048)
  parser.add_argument('--unrolled_threefry', action=argparse.BooleanOptionalAction,
                      default=True, help='unrolled threefry on CPU, as the binaries')
  return parser.parse_args(argv)


def main():
  args = parse_args()
  seed_sweep.set_up_jax(args.cpu_devices, args.unrolled_threefry)
  seed_sweep.CLOCK = seed_sweep.CompileClock()
  run_sweep(args, sys.argv[1:])


def run_sweep(args: argparse.Namespace, argv: Sequence[str] = (), *,
              job: Optional[setting.ImageJob] = None, image_shape: Sequence[int] = (28, 28, 1),
              num_train: int = 4000) -> dict:
  """The sweep of ``args`` (``parse_args``): prints, writes ``--json``, returns the record.

  ``job``, ``image_shape``, ``num_train``: the problem (``make_problem``; tests: tiny ones).
  JSON: ``rows[]`` one per step kind and S (``rows[].step``: ``'standard'`` or
  ``'pgd_at'``, ``rows[].steps``, ``rows[].S``, ``rows[].trainers.<name>.seconds``, ...);
  ``setting.steps`` / ``setting.flops_per_student_step`` are the standard step's,
  ``setting.pgd_at`` PGD-AT's attack, steps and FLOPs.
  """
  job = job or setting.ImageJob()
  kinds = STEP_KINDS if args.step == 'both' else (args.step,)
  steps_of = {'standard': args.steps, 'pgd_at': args.at_train_steps or args.steps}
  students = [int(s) for s in args.students.split(',')]
  device = 'cpu'
  record = {'benchmark': 'cnn_sweep',
            'command': ' '.join(['python -m benchmarks.cnn_sweep'] + list(argv)),
            'date': f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}',
            'machine': {'cores': os.cpu_count(), 'cpu': io.cpu_model(),
                        'platform': platform.platform(),
                        'load_start': seed_sweep.getloadavg(),
                        'jax_devices': [str(x) for x in jax.devices()]},
            'versions': io.library_versions()}
  torch_trainers = TORCH_TRAINERS if args.torch else ()
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    record['versions'].update(seed_sweep.torch_info(device))
  print(hardware.environment())
  peak = hardware.matmul_flops(args.matmul_n)
  record['reference'] = {'matmul_n': args.matmul_n, 'jnp_dot_flops_per_s': peak}
  print(f'float32 jnp.dot {args.matmul_n}^2: {peak / 1e9:.1f} GFLOP/s')
  if args.torch:
    record['reference']['torch_mm_flops_per_s'] = hardware.torch_matmul_flops(
        args.matmul_n, device=device)
    print(f"float32 torch.mm {args.matmul_n}^2: "
          f"{record['reference']['torch_mm_flops_per_s'] / 1e9:.1f} GFLOP/s, torch device "
          f"{device}, threads {record['versions']['threads']}")
  mesh = sweep.seed_mesh()
  batching = (sweep.default_seed_batching() if args.batching == 'auto'
              else args.batching)
  problem_args = dict(job=job, data=args.data, image_shape=image_shape, num_train=num_train,
                      num_heldout=args.heldout, at_eps=args.at_eps)
  probes = {k: make_problem(1, step=k, **problem_args) for k in STEP_KINDS}
  flops = {k: flops_per_student_step(p) for k, p in probes.items()}
  probe = probes['standard']
  record['setting'] = {'data': args.data, 'image_shape': list(probe.image_shape),
                       'num_train': int(probe.train_x.shape[0]), 'heldout': args.heldout,
                       'teacher_conv': list(job.teacher_conv),
                       'teacher_dense': list(job.teacher_dense),
                       'kernel_size': job.kernel_size, 'pool': job.pool,
                       'width_mult': job.width_mult, 'batch_size': job.batch_size,
                       'optimizer': job.optimizer, 'learning_rate': job.learning_rate,
                       'loss': job.loss, 'steps': args.steps, 'repeats': args.repeats,
                       'flops_per_student_step': flops['standard'],
                       'step_kinds': list(kinds),
                       'vmap_devices': int(mesh.devices.size), 'vmap_batching': batching}
  if 'pgd_at' in kinds:
    st, spec = probes['pgd_at'].settings, pgd_spec(probes['pgd_at'])
    record['setting']['pgd_at'] = {
        'steps': steps_of['pgd_at'], 'method': 'at', 'at_eps': args.at_eps,
        'at_norm': st.at_norm, 'at_steps': st.at_steps, 'step_factor': st.step_factor,
        'alpha': spec.alpha, 'at_label': st.at_label, 'at_fraction': st.at_fraction,
        'clip_range': list(st.clip_range), 'restarts': 1, 'random_start': True,
        'flops_per_student_step': flops['pgd_at']}
  print('FLOPs per student-step: ' + ', '.join(
      f'{k} {flops[k]["exact"] / 1e6:.1f} M ({steps_of[k]} steps)' for k in kinds)
      + f'; repeats {args.repeats} (median); vmap: students sharded over {mesh.devices.size} '
      f"JAX device(s), batching '{batching}'\n", flush=True)
  record['rows'] = []
  for kind in kinds:
    steps = steps_of[kind]
    for s in students:
      padded = sweep.padded_size(s, mesh)
      problem = make_problem(padded, step=kind, **problem_args)
      meter, load_before = hardware.OtherLoad(), hardware.load()
      row = measure(problem, s, steps, args.repeats, mesh=mesh,
                    torch_trainers=torch_trainers, device=device, batching=batching,
                    also_batched=args.also_batched)
      for v in row['trainers'].values():
        v['flops_per_s'] = s * steps * flops[kind]['exact'] / v['seconds']
        v['fraction_of_jnp_dot'] = v['flops_per_s'] / peak
      peer = best_peer(row['trainers'])
      row.update(S=s, step=kind, steps=steps,
                 flops_per_student_step=flops[kind]['exact'], vmap_students_trained=padded,
                 best_peer=peer,
                 vmap_over_best_peer=(row['trainers']['vmap']['seconds']
                                      / row['trainers'][peer]['seconds']) if peer else None,
                 load_before=load_before, load_after=hardware.load(),
                 other_procs_cores=meter.cores())
      record['rows'].append(row)
      print(f'{kind} S={s}: ' + ' | '.join(
          f"{n} {[round(x, 2) for x in v['seconds_per_repeat']]} s, held-out "
          f"{v['heldout_loss']:.4g}" for n, v in row['trainers'].items())
          + f" | init held-out {row['heldout_loss_init']:.4g}; vmap compile "
          f"{row['trainers']['vmap']['compile_seconds']:.1f} s; load {load_before} -> "
          f"{row['load_after']}; other procs {row['other_procs_cores']:.2f} cores"
          + (f'; vmap trained {padded} (S padded to the devices)' if padded > s else '')
          + (f"; {row['note']}" if row['note'] else ''), flush=True)
      if args.json:
        record['machine']['load_end'] = seed_sweep.getloadavg()
        io.write_json(args.json, record)
  print_table(record)
  if args.json:
    print(f'wrote {args.json}')
  return record


def print_table(record: dict) -> None:
  """Per step kind, the Markdown table of per student-step seconds, ratios and FLOP/s
  fractions (rows without a ``step``, from before PGD-AT was measured, are standard)."""
  for kind in STEP_KINDS:
    rows = [r for r in record['rows'] if r.get('step', 'standard') == kind]
    if not rows:
      continue
    names = [n for n in TRAINERS if n in rows[0]['trainers']]
    title = 'CNN sweep' if kind == 'standard' else 'CNN sweep, PGD-AT step'
    print(f"\n{title}, {rows[0].get('steps', record['setting']['steps'])} steps, batch "
          f"{record['setting']['batch_size']}: ms per student-step (median of "
          f"{record['setting']['repeats']}), vmap / best PyTorch peer, % of float32 jnp.dot "
          f"({record['reference']['jnp_dot_flops_per_s'] / 1e9:.1f} GFLOP/s), held-out loss\n")
    header = (['S'] + [f'{n} ms' for n in names] + ['vmap / best peer']
              + [f'{n} %' for n in names] + [f'held-out {n}' for n in names])
    print('| ' + ' | '.join(header) + ' |')
    print('|---' * len(header) + '|')
    for r in rows:
      t = r['trainers']
      ratio = (f"{r['vmap_over_best_peer']:.2f}x ({r['best_peer']})" if r['best_peer']
               else '-')
      print(f"| {r['S']} | " + ' | '.join(
          [f"{1e3 * t[n]['seconds_per_student_step']:.2f}" for n in names] + [ratio]
          + [f"{100 * t[n]['fraction_of_jnp_dot']:.1f}" for n in names]
          + [f"{t[n]['heldout_loss']:.4g}" for n in names]) + ' |')


if __name__ == '__main__':
  main()
