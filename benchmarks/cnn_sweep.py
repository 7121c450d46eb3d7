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
few steps, give the JAX students' outputs, and after 0 steps the JAX initial loss.

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
from tsrobust import cnn
from tsrobust import io
from tsrobust import lowrank
from tsrobust import sweep
from tsrobust import train

TRAINERS = ('vmap', 'sequential', 'torch_func', 'grouped')
TORCH_TRAINERS = TRAINERS[1:]
TORCH_WARMUP_STEPS = 5


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

  @property
  def num_seeds(self) -> int:
    return int(self.keys.shape[0])

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(self.train_x.shape[1:])


def make_problem(num_seeds: int, *, job: Optional[setting.ImageJob] = None,
                 data: str = 'mnist', image_shape: Sequence[int] = (28, 28, 1),
                 num_train: int = 4000, num_heldout: int = 1000, seed: int = 0) -> Problem:
  """The image job's teacher (random), ``num_seeds`` students, Adam and the standard loss.

  Args:
    num_seeds: students S.
    job: the ``ImageJob`` (default: the binary's default config); its CNN, width
      multiplier, optimizer, loss and batch size.
    data: ``'mnist'`` (``job.load_data()``: the bundled MNIST, its training and test
      images) or ``'random'`` (uniform ``[num_train + num_heldout, *image_shape]``).
    num_heldout: test images of the held-out loss.
    seed: the teacher's, students' and training keys' PRNG seed.
  """
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
  loss_fn = train.teacher_regression_loss(student.apply, teacher.apply, job.loss,
                                          lowrank.sampler(train_x.shape[0]), job.batch_size)
  return Problem(job, teacher, student, teacher_params, state,
                 jax.random.split(k_train, num_seeds), optimizer, loss_fn, train_x, test_x)


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
  teacher forward. The backward is twice the forward less the first layer's input gradient."""
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
  return {'exact': b * per_example, 'student_forward': b * sum(student),
          'teacher_forward': b * sum(teacher)}


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


def make_vmap(problem: Problem, steps: int, mesh=None):
  """(a) ``train.train_seeds`` over all of ``problem``'s students (sharded over ``mesh``)."""
  p = problem
  teacher = jax.tree_util.tree_map(
      lambda v: jnp.broadcast_to(v, (p.num_seeds,) + v.shape), p.teacher_params)
  inputs = (p.state, teacher, {}, p.keys)
  shared = {'train_x': jnp.asarray(p.train_x)}
  if mesh is not None:
    inputs = sweep.shard_seeds(inputs, mesh)
    shared = sweep.replicate(shared, mesh)
  inputs, shared = jax.block_until_ready((inputs, shared))

  def run():
    state, _ = train.train_seeds(p.loss_fn, p.optimizer, *inputs, num_steps=steps,
                                 chunk_steps=max(steps, 1), shared_args=shared)
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


def _torch_setup(problem: Problem, num_seeds: int, steps: int, device) -> _Torch:
  import torch  # pylint: disable=g-import-not-at-top
  shape = problem.image_shape
  students = [torch_sequential(torch_layers(setting.seed_slice(problem.state.params, i),
                                            problem.student, shape), problem.student, device)
              for i in range(num_seeds)]
  teacher = torch_sequential(torch_layers(problem.teacher_params, problem.teacher, shape),
                             problem.teacher, device).requires_grad_(False)
  idx = torch.from_numpy(batch_indices(problem, num_seeds, max(steps, 1))).to(device)
  return _Torch(students, teacher, _nchw(problem.train_x, device), idx,
                seed_sweep._torch_sync(device))  # pylint: disable=protected-access


def _finish(t: _Torch, steps: int, init_state, step, predictor, device, loop=None):
  """The timed ``run()`` with its attributes. Its loop: ``loop(state)`` if given, else
  ``steps`` calls of ``step(state, the batches of every student)``."""
  def run_():
    state = run_.fresh.pop()
    if loop is not None:
      loop(state)
    else:
      for i in range(steps):
        step(state, t.images[t.idx[:, i]])
    t.sync()
    return state

  def warmup():
    state = init_state()
    for i in range(TORCH_WARMUP_STEPS):
      step(state, t.images[t.idx[:, i % t.idx.shape[1]]])
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


def make_sequential(problem: Problem, num_seeds: int, steps: int, device='cpu'):
  """(b) A Python loop over S students, each with its own ``torch.optim.Adam``."""
  import torch  # pylint: disable=g-import-not-at-top
  t = _torch_setup(problem, num_seeds, steps, device)
  lr = problem.job.learning_rate

  def init_state():
    students = [copy.deepcopy(s) for s in t.students]
    return [(s, torch.optim.Adam(s.parameters(), lr=lr)) for s in students]

  def step_one(student, opt, x):
    setting.torch_regression_step(t.teacher, student, opt, x)

  def step(state, x):
    for (student, opt), xi in zip(state, x):
      step_one(student, opt, xi)

  def loop(state):
    for i, (student, opt) in enumerate(state):  # one student after the other
      for j in range(steps):
        step_one(student, opt, t.images[t.idx[i, j]])

  def predictor(state):
    return lambda i, x: state[i][0](x)
  return _finish(t, steps, init_state, step, predictor, device, loop)


def make_torch_func(problem: Problem, num_seeds: int, steps: int, device='cpu'):
  """(c) ``vmap(grad(functional_call))`` over stacked students, Adam on the stacks."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import func  # pylint: disable=g-import-not-at-top
  t = _torch_setup(problem, num_seeds, steps, device)
  lr = problem.job.learning_rate
  stacked, _ = func.stack_module_state(t.students)
  stacked = {k: v.detach() for k, v in stacked.items()}
  base = copy.deepcopy(t.students[0]).to('meta')

  def loss(params, x, target):
    return torch.mean((func.functional_call(base, params, (x,)) - target) ** 2)
  grads_fn = func.vmap(func.grad(loss))

  def init_state():
    params = {k: v.clone() for k, v in stacked.items()}
    return params, torch.optim.Adam(list(params.values()), lr=lr)

  def step(state, x):
    params, opt = state
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


def make_grouped(problem: Problem, num_seeds: int, steps: int, device='cpu'):
  """(d) Grouped convolutions (``groups=S``) and batched matmuls, Adam on the stacks."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  t = _torch_setup(problem, num_seeds, steps, device)
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

  def step(state, x):
    params, opt = state
    k, b = x.shape[:2]
    with torch.no_grad():
      target = t.teacher(x.reshape((k * b,) + x.shape[2:])).reshape(k, b, -1)
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
            torch_trainers: Sequence[str] = TORCH_TRAINERS, device='cpu') -> dict:
  """Times every trainer ``repeats`` times (alternated) on ``num_seeds`` students.

  ``problem`` may hold more students (the vmap trainer's padding); the PyTorch
  trainers train the first ``num_seeds``, and held-out losses are over those.

  Returns ``{'trainers': {name: {'seconds', 'seconds_per_repeat',
  'seconds_per_student_step', 'heldout_loss', ['compile_seconds']}},
  'heldout_loss_init': ..., 'note': ...}``.
  """
  runs = {'vmap': make_vmap(problem, steps, mesh)}
  compile_s, _, _ = seed_sweep.timed(runs['vmap'])
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
      if comp > 0 and n == 'vmap':
        note += f' (vmap recompiled in a timed call, {comp:.1f}s, subtracted)'
      times[n].append(wall - comp)
  predictors = {'vmap': jax_predictor(problem, final['vmap'])}
  predictors.update({n: runs[n].predictor(final[n]) for n in torch_trainers})
  trainers = {}
  for n in names:
    med = statistics.median(times[n])
    trainers[n] = {'seconds': med, 'seconds_per_repeat': times[n],
                   'seconds_per_student_step': med / (num_seeds * max(steps, 1)),
                   'heldout_loss': heldout_loss(problem, predictors[n], num_seeds)}
  trainers['vmap']['compile_seconds'] = compile_s
  return {'trainers': trainers, 'note': note.strip(),
          'heldout_loss_init': heldout_loss(
              problem, jax_predictor(problem, problem.state.params), num_seeds)}


def best_peer(trainers: dict) -> Optional[str]:
  peers = [n for n in TORCH_TRAINERS if n in trainers]
  return min(peers, key=lambda n: trainers[n]['seconds']) if peers else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--students', default='1,8,32', help='comma-separated numbers S')
  parser.add_argument('--steps', type=int, default=200, help='training steps per student')
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
  parser.add_argument('--matmul_n', type=int, default=2048)
  parser.add_argument('--unrolled_threefry', action=argparse.BooleanOptionalAction,
                      default=True, help='unrolled threefry on CPU, as the binaries')
  args = parser.parse_args()
  seed_sweep.set_up_jax(args.cpu_devices, args.unrolled_threefry)
  seed_sweep.CLOCK = seed_sweep.CompileClock()
  students = [int(s) for s in args.students.split(',')]
  device = 'cpu'
  record = {'benchmark': 'cnn_sweep',
            'command': ' '.join(['python -m benchmarks.cnn_sweep'] + sys.argv[1:]),
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
  job = setting.ImageJob()
  probe = make_problem(1, job=job, data=args.data, num_heldout=args.heldout)
  flops = flops_per_student_step(probe)
  record['setting'] = {'data': args.data, 'image_shape': list(probe.image_shape),
                       'num_train': int(probe.train_x.shape[0]), 'heldout': args.heldout,
                       'teacher_conv': list(job.teacher_conv),
                       'teacher_dense': list(job.teacher_dense),
                       'kernel_size': job.kernel_size, 'pool': job.pool,
                       'width_mult': job.width_mult, 'batch_size': job.batch_size,
                       'optimizer': job.optimizer, 'learning_rate': job.learning_rate,
                       'loss': job.loss, 'steps': args.steps, 'repeats': args.repeats,
                       'flops_per_student_step': flops,
                       'vmap_devices': int(mesh.devices.size)}
  print(f'FLOPs per student-step: {flops["exact"] / 1e6:.1f} M; steps {args.steps}, repeats '
        f'{args.repeats} (median); vmap: students sharded over {mesh.devices.size} '
        f'JAX device(s)\n', flush=True)
  record['rows'] = []
  for s in students:
    padded = sweep.padded_size(s, mesh)
    problem = make_problem(padded, job=job, data=args.data, num_heldout=args.heldout)
    meter, load_before = hardware.OtherLoad(), hardware.load()
    row = measure(problem, s, args.steps, args.repeats, mesh=mesh,
                  torch_trainers=torch_trainers, device=device)
    for v in row['trainers'].values():
      v['flops_per_s'] = s * args.steps * flops['exact'] / v['seconds']
      v['fraction_of_jnp_dot'] = v['flops_per_s'] / peak
    peer = best_peer(row['trainers'])
    row.update(S=s, vmap_students_trained=padded, best_peer=peer,
               vmap_over_best_peer=(row['trainers']['vmap']['seconds']
                                    / row['trainers'][peer]['seconds']) if peer else None,
               load_before=load_before, load_after=hardware.load(),
               other_procs_cores=meter.cores())
    record['rows'].append(row)
    print(f'S={s}: ' + ' | '.join(
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


def print_table(record: dict) -> None:
  """The Markdown table of per student-step seconds, ratios and FLOP/s fractions."""
  rows = record['rows']
  names = [n for n in TRAINERS if n in rows[0]['trainers']]
  print(f"\nCNN sweep, {record['setting']['steps']} steps, batch "
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
