r"""Seed sweeps: S students of the default low-rank setting, five ways, side by side.

(a) ``vmap``: tsrobust's trainer ``train.train_seeds`` (``jit(vmap(lax.scan
    chunk))`` over a leading seeds axis, with its per-chunk finite check), the
    seeds sharded over JAX's devices as the experiment binaries do it: on a
    CPU, one device per core by default (``sweep.use_all_cpu_cores``;
    ``--cpu_devices=1`` for the one-device path), S padded to a multiple of
    the device count with extra seeds (trained and timed, as in the binaries;
    the row says so);
(b) ``seq-jax``: a Python loop over seeds of the same single-seed chunk,
    ``jax.jit(train.make_chunk_fn(...))``, compiled once and called per seed;
(c) ``seq-torch``: the sequential PyTorch loop a PyTorch user would write: one
    student after another, ``torch.optim.SGD(momentum=0.9)``, ``F.mse_loss``,
    ``zero_grad / backward / step`` every step, inputs ``s * randn(B, d) @ P``
    drawn on the fly, no per-step host syncs (the JAX side has none either);
(d) ``torch-batched``: the hand-batched ensemble a PyTorch user who cares
    about speed writes: every layer's weights stacked ``[S, in, out]`` (biases
    ``[S, 1, out]``), forward ``bias.baddbmm(h, kernel)`` (ReLU between) for
    teacher and students, loss = sum over students of each one's mean MSE (so
    each student's gradient is its own), gradients by ``torch.autograd.grad``
    on the stacked tensors, and SGD-momentum in place under ``torch.no_grad()``
    exactly as ``torch.optim.SGD(momentum=0.9)`` does it (``buf = 0.9 buf + g;
    p -= lr buf``); inputs ``s_i * randn(B, d) @ P_i`` drawn per student per
    step, as one ``randn(S, B, d)`` and one ``bmm``;
(e) ``torch-func``: ``torch.func.vmap(torch.func.grad(loss))`` over the
    students' parameters stacked by ``torch.func.stack_module_state``, the loss
    calling the ``nn.Sequential`` student through ``torch.func.functional_call``
    (the teacher likewise, ``vmap(functional_call)``); same inputs and update
    as (d).

All five train the same students (the PyTorch students, teachers and
projectors are copies of the JAX ones) for the same steps, batch, widths and
optimizer (``benchmarks/setting.py``); only the random inputs differ between
frameworks (the two ensembles draw ``s z U^T`` from ``r`` normals per example, the same law
as the library's ``s xi P`` from ``d`` and cheaper in PyTorch). The held-out MSE of every
trainer's students is printed to show they train the same thing, and
``tests/test_benchmarks_seed_sweep.py`` checks that (c), (d), (e) and a JAX step give the
same parameters from the same batches: every PyTorch trainer's timed loop is ``draw`` then
``step(state, x)``, and the test calls the same ``step`` with fixed batches. PyTorch's
thread count is printed (``--torch_threads``, default: PyTorch's own, one per
core).

Timing. Every repeat runs (a) .. (e) back to back ("side by side"), so a
change in machine load hits all of them; each reported time is the median over
``--repeats``. Compilation is excluded from the JAX timings: every function is
compiled and run once before timing, and JAX's own compile events
(tracing, lowering, XLA compile) are recorded during every timed call; if
any happen there (e.g. a ``train_seeds`` without a compile cache), their
duration is subtracted and the row is flagged. Compile time is reported
separately. The PyTorch trainers are warmed up (a few steps) before timing,
and their fresh initial students are copied outside the timed region.
Sequential loops over more than ``--max_seq_seeds`` seeds time only the first
``--max_seq_seeds`` seeds and extrapolate linearly (marked ``~``,
"extrapolated from k seeds"); the batched trainers always train all S.

FLOP/s: each trainer's matmul FLOPs (``setting.flops_per_student_step``:
data ``2Bd^2`` + teacher forward + student forward and backward, times S x
steps; the S students asked for, not the vmap trainer's padding seeds) per
second, as a fraction of a large float32 ``jnp.dot``'s FLOP/s on the same
machine (``benchmarks/hardware.py``; ``torch.mm``'s is recorded too).

``--json=PATH`` writes (atomically, after every S) the machine (cores, CPU,
``os.getloadavg()`` at start and end and before / after every S, cores kept
busy by other processes), versions, the setting, the reference matmul rates,
and per S and trainer: seconds per repeat and their median, seeds timed,
FLOP/s and fraction of the reference, held-out MSE; compile seconds.

    python -m benchmarks.seed_sweep --seeds=1,8,32,128 --steps=1000 --repeats=3 \
        --json=/tmp/seed_sweep.json
"""

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks import hardware
from benchmarks import setting
from tsrobust import io
from tsrobust import sweep
from tsrobust import train

_COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration',
                   '/jax/core/compile/backend_compile_duration')

TRAINERS = ('vmap', 'seq-jax', 'seq-torch', 'torch-batched', 'torch-func')
TORCH_WARMUP_STEPS = 20


class CompileClock:
  """Seconds JAX spent tracing, lowering and compiling since it was created."""

  def __init__(self):
    self.total = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **_):
    if event in _COMPILE_EVENTS:
      self.total += duration


CLOCK = None


def timed(fn):
  """``(wall seconds, seconds of JAX compilation inside, result)`` of ``fn()``."""
  c0 = CLOCK.total if CLOCK else 0.0
  t0 = time.perf_counter()
  out = fn()
  wall = time.perf_counter() - t0
  return wall, (CLOCK.total if CLOCK else 0.0) - c0, out


# ----------------------------------------------------------------------------
# The trainers. Each ``make_*`` does the untimed preparation and returns
# ``run()`` that trains, blocks until done and returns the final students.
# The PyTorch ones also expose, as attributes of ``run``:
#   init_state()      fresh copies of the initial students (and optimizer state);
#   step(state, x)    one training step of every student on inputs x [k, B, d]
#                     (the timed loop calls the same function on drawn inputs);
#   kernels(state)    the students as [(kernel [k, in, out], bias [k, out]), ...]
#                     numpy arrays in the Flax layout (for the tests);
#   predict(state, i, x)  seed i's outputs on x [n, d] (numpy, for the held-out MSE);
#   prepare(r)        make r fresh states outside the timed region; warmup().
# ----------------------------------------------------------------------------


def make_vmap(problem: setting.Problem, steps: int, chunk_steps: int, mesh=None):
  """(a) ``train.train_seeds`` on all of ``problem``'s seeds, sharded over ``mesh`` if given."""
  p = problem
  inputs = (p.state, p.teacher_params, p.data_args, p.keys)
  if mesh is not None:
    inputs = jax.block_until_ready(sweep.shard_seeds(inputs, mesh))

  def run():
    state, _ = train.train_seeds(p.loss_fn, p.optimizer, *inputs, num_steps=steps,
                                 chunk_steps=chunk_steps)
    return jax.block_until_ready(state.params)
  return run


def make_seq_jax(problem: setting.Problem, num_seeds: int, steps: int, chunk_steps: int):
  p = problem
  chunks = {}
  lengths = [min(chunk_steps, steps - s) for s in range(0, steps, chunk_steps)]
  for n in set(lengths):
    chunks[n] = jax.jit(train.make_chunk_fn(p.loss_fn, p.optimizer, n))
  seeds = [tuple(setting.seed_slice(t, i) for t in (p.state, p.teacher_params, p.data_args,
                                                      p.keys)) for i in range(num_seeds)]
  seeds = jax.block_until_ready(seeds)

  def run(seeds=seeds):
    finals = []
    for state, tp, da, key in seeds:
      for n in lengths:
        state, _ = chunks[n](state, tp, da, key)
      finals.append(state.params)
    return jax.block_until_ready(finals)
  run.warmup = lambda: run(seeds[:1])  # compiles every chunk length once
  return run


def _torch_sync(device: str):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.cuda.synchronize if str(device).startswith('cuda') else (lambda: None)


def _fresh_states(run, init_state):
  """Adds ``prepare(r)`` (r fresh states, made untimed) and ``run.fresh`` to ``run``."""
  run.fresh = []
  run.prepare = lambda r: run.fresh.extend(init_state() for _ in range(r))
  run.init_state = init_state


def sgd_momentum_(params, grads, bufs, lr: float, momentum: float):
  """In place: ``buf = momentum * buf + g; p -= lr * buf`` for every tensor.

  With buffers starting at zero this is ``torch.optim.SGD(lr, momentum)``
  (dampening 0, no Nesterov, no weight decay) step for step (its first step
  sets ``buf = g``, which equals ``momentum * 0 + g``), and optax's
  ``sgd(lr, momentum)``. Call under ``torch.no_grad()``.
  """
  for p, g, buf in zip(params, grads, bufs):
    buf.mul_(momentum).add_(g)
    p.add_(buf, alpha=-lr)


def batched_forward(layers, x):
  """``x [S, B, in]`` through stacked Dense layers ``[(kernel [S, in, out], bias), ...]``.

  ReLU between layers, none after the last; ``bias`` is ``[S, 1, out]`` or None.
  """
  h = x
  for i, (kernel, bias) in enumerate(layers):
    h = h.bmm(kernel) if bias is None else bias.baddbmm(h, kernel)
    if i < len(layers) - 1:
      h = h.relu()
  return h


def make_seq_torch(problem: setting.Problem, num_seeds: int, steps: int, device: str):
  """(c) The sequential PyTorch loop over ``num_seeds`` seeds. State: ``[(student, opt)]``."""
  import torch  # pylint: disable=g-import-not-at-top
  c = problem.config
  seeds = [setting.torch_seed(problem, i, device) for i in range(num_seeds)]
  sync = _torch_sync(device)

  def new(seed):
    student = copy.deepcopy(seed.student)
    return student, torch.optim.SGD(student.parameters(), lr=c.learning_rate,
                                    momentum=c.momentum)

  def step_one(seed, student, opt, x):
    setting.torch_regression_step(seed.teacher, student, opt, x)

  def train_one(seed, student, opt, steps=steps):
    for _ in range(steps):
      step_one(seed, student, opt, seed.scale * (torch.randn(c.batch_size, c.d, device=device)
                                                 @ seed.projector))

  def step(state, x):
    for seed, (student, opt), xi in zip(seeds, state, x):
      step_one(seed, student, opt, xi)

  def run():
    state = run.fresh.pop()
    for seed, (student, opt) in zip(seeds, state):
      train_one(seed, student, opt)
    sync()
    return state

  def kernels(state):
    linears = [[m for m in student if isinstance(m, torch.nn.Linear)] for student, _ in state]
    return [(np.stack([ls[j].weight.detach().cpu().numpy().T for ls in linears]),
             np.stack([ls[j].bias.detach().cpu().numpy() for ls in linears]))
            for j in range(len(linears[0]))]

  def predict(state, i, x):
    with torch.no_grad():
      return state[i][0](torch.from_numpy(x).to(device)).cpu().numpy()

  _fresh_states(run, lambda: [new(s) for s in seeds])
  run.step, run.kernels, run.predict = step, kernels, predict
  run.warmup = lambda: (train_one(seeds[0], *new(seeds[0]), TORCH_WARMUP_STEPS), sync())
  return run


def make_torch_batched(problem: setting.Problem, num_seeds: int, steps: int, device: str):
  """(d) The hand-batched PyTorch ensemble. State: ``(params, momentum buffers)`` lists.

  Inputs are drawn as ``s z U^T`` (``r`` normals per example), the same law as the
  library's ``s xi P`` and cheaper in PyTorch (``draw``).
  """
  import torch  # pylint: disable=g-import-not-at-top
  c = problem.config
  stacked = setting.torch_stacked(problem, num_seeds, device)
  teacher, basis_t, scale = stacked.teacher, stacked.basis_t, stacked.scale
  sync = _torch_sync(device)
  lr, momentum, batch = c.learning_rate, c.momentum, c.batch_size
  r = basis_t.shape[1]

  def init_state():
    params = [t.clone().requires_grad_(True)
              for layer in stacked.student for t in layer if t is not None]
    return params, [torch.zeros_like(p) for p in params]

  def layers(params):
    it = iter(params)
    return [(next(it), next(it) if bias is not None else None)
            for _, bias in stacked.student]

  def draw():
    # z U^T with z ~ N(0, I_r): the law of the library's s xi P (P = U U^T, xi ~ N(0, I_d))
    # from r instead of d normals and an [r x d] instead of a [d x d] product: 0.36 against
    # 1.0-1.4 s per 1,000 draws of S = 32 here, so the strongest form of this peer.
    return scale * torch.randn(num_seeds, batch, r, device=device).bmm(basis_t)

  def step(state, x):
    params, bufs = state
    with torch.no_grad():
      target = batched_forward(teacher, x)
    out = batched_forward(layers(params), x)
    loss = ((out - target) ** 2).mean(dim=(1, 2)).sum()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
      sgd_momentum_(params, grads, bufs, lr, momentum)

  def run():
    state = run.fresh.pop()
    for _ in range(steps):
      step(state, draw())
    sync()
    return state

  def kernels(state):
    return [(k.detach().cpu().numpy(), None if b is None else b.detach().cpu().numpy()[:, 0])
            for k, b in layers(state[0])]

  def predict(state, i, x):
    with torch.no_grad():
      one = [(k[i:i + 1], None if b is None else b[i:i + 1]) for k, b in layers(state[0])]
      return batched_forward(one, torch.from_numpy(x).to(device)[None])[0].cpu().numpy()

  def warmup():
    state = init_state()
    for _ in range(TORCH_WARMUP_STEPS):
      step(state, draw())
    sync()

  _fresh_states(run, init_state)
  run.step, run.draw, run.kernels, run.predict, run.warmup = step, draw, kernels, predict, warmup
  return run


def make_torch_func(problem: setting.Problem, num_seeds: int, steps: int, device: str):
  """(e) ``torch.func.vmap(grad(functional_call))`` ensemble. State: ``(params, buffers)`` dicts."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import func  # pylint: disable=g-import-not-at-top
  c = problem.config
  seeds = [setting.torch_seed(problem, i, device) for i in range(num_seeds)]
  sync = _torch_sync(device)
  lr, momentum, batch = c.learning_rate, c.momentum, c.batch_size
  student_params, _ = func.stack_module_state([s.student for s in seeds])
  teacher_params, _ = func.stack_module_state([s.teacher for s in seeds])
  student_params = {k: v.detach() for k, v in student_params.items()}
  teacher_params = {k: v.detach() for k, v in teacher_params.items()}
  student_base = copy.deepcopy(seeds[0].student).to('meta')
  teacher_base = copy.deepcopy(seeds[0].teacher).to('meta')
  basis_t = torch.from_numpy(setting.subspace_basis_t(problem.projector[:num_seeds])).to(
      device=device, dtype=torch.float32)
  r = basis_t.shape[1]
  scale = torch.tensor([s.scale for s in seeds], device=device)[:, None, None]

  def student_loss(params, x, target):
    return torch.mean((func.functional_call(student_base, params, (x,)) - target) ** 2)

  grads_fn = func.vmap(func.grad(student_loss))
  teacher_fn = func.vmap(lambda p, x: func.functional_call(teacher_base, p, (x,)))
  names = list(student_params)

  def init_state():
    params = {k: v.clone() for k, v in student_params.items()}
    return params, {k: torch.zeros_like(v) for k, v in params.items()}

  def draw():
    # z U^T with z ~ N(0, I_r): the law of the library's s xi P (P = U U^T, xi ~ N(0, I_d))
    # from r instead of d normals and an [r x d] instead of a [d x d] product: 0.36 against
    # 1.0-1.4 s per 1,000 draws of S = 32 here, so the strongest form of this peer.
    return scale * torch.randn(num_seeds, batch, r, device=device).bmm(basis_t)

  def step(state, x):
    params, bufs = state
    with torch.no_grad():
      target = teacher_fn(teacher_params, x)
    grads = grads_fn(params, x, target)
    with torch.no_grad():
      sgd_momentum_([params[k] for k in names], [grads[k] for k in names],
                    [bufs[k] for k in names], lr, momentum)

  def run():
    state = run.fresh.pop()
    for _ in range(steps):
      step(state, draw())
    sync()
    return state

  def kernels(state):
    linear = [k[:-len('.weight')] for k in names if k.endswith('.weight')]
    return [(state[0][f'{n}.weight'].cpu().numpy().transpose(0, 2, 1),
             state[0][f'{n}.bias'].cpu().numpy() if f'{n}.bias' in state[0] else None)
            for n in linear]

  def predict(state, i, x):
    with torch.no_grad():
      one = {k: v[i] for k, v in state[0].items()}
      return func.functional_call(student_base, one,
                                  (torch.from_numpy(x).to(device),)).cpu().numpy()

  def warmup():
    state = init_state()
    for _ in range(TORCH_WARMUP_STEPS):
      step(state, draw())
    sync()

  _fresh_states(run, init_state)
  run.step, run.draw, run.kernels, run.predict, run.warmup = step, draw, kernels, predict, warmup
  return run


def heldout_mse(problem: setting.Problem, k: int, predictors: dict, n: int = 4096) -> dict:
  """Mean over seeds ``0 .. k-1`` of the students' MSE to the teacher on ``n`` fresh points.

  A check that the trainers train the same thing (computed after timing).
  ``predictors`` maps a trainer's name to ``fn(i, x [n, d]) -> [n, C]``, seed
  ``i``'s trained student's outputs; ``'init'`` (the initial students) is added.
  """
  rng = np.random.default_rng(12345)
  predictors = dict(init=lambda i, x: problem.student.apply(
      setting.seed_slice(problem.state.params, i), x)[0], **predictors)
  out = {}
  for i in range(k):
    proj = np.asarray(problem.projector[i])
    x = (float(problem.data_args['scale'][i]) * rng.standard_normal((n, proj.shape[0]))
         @ proj).astype(np.float32)
    t = np.asarray(problem.teacher.apply(setting.seed_slice(problem.teacher_params, i), x)[0])
    for name, predict in predictors.items():
      out.setdefault(name, []).append(float(np.mean((np.asarray(predict(i, x)) - t) ** 2)))
  return {name: float(np.mean(v)) for name, v in out.items()}


# ----------------------------------------------------------------------------


def fmt_t(t: float, extrapolated_from: int = 0) -> str:
  if t != t:  # nan
    return '-'
  return f'{t:.2f}' + (f' ~{extrapolated_from}' if extrapolated_from else '')


def getloadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def torch_info(device) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  info = {'torch': torch.__version__, 'device': str(device),
          'threads': torch.get_num_threads(), 'interop_threads': torch.get_num_interop_threads()}
  if str(device).startswith('cuda'):
    info['device_name'] = torch.cuda.get_device_name(0)
  return info


def set_up_jax(cpu_devices: int, unrolled_threefry: bool) -> None:
  """Before any JAX computation: ``cpu_devices`` CPU devices (0: one per core, as the
  binaries) and, as the binaries, the unrolled threefry on CPU."""
  if cpu_devices < 0:
    raise ValueError(f'--cpu_devices must be >= 0, got {cpu_devices}')
  sweep.use_all_cpu_cores(cpu_devices or None)
  if unrolled_threefry:
    sweep.use_unrolled_threefry_on_cpu()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', default='1,8,32,128,512',
                      help='comma-separated numbers of students S')
  parser.add_argument('--steps', type=int, default=2000, help='training steps per student')
  parser.add_argument('--chunk_steps', type=int, default=2000,
                      help='steps per jitted chunk (the config default is 2000)')
  parser.add_argument('--rank', type=int, default=setting.RANK)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--max_seq_seeds', type=int, default=32,
                      help='sequential loops over more seeds time this many and extrapolate')
  parser.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True,
                      help='run the PyTorch trainers (needs requirements-bench.txt)')
  parser.add_argument('--seq_torch', action=argparse.BooleanOptionalAction, default=True,
                      help='with --torch: also the sequential PyTorch loop')
  parser.add_argument('--torch_device', default=None,
                      help='default: cuda if available, else cpu')
  parser.add_argument('--torch_threads', type=int, default=0,
                      help='torch.set_num_threads; 0 keeps PyTorch\'s default (one per core)')
  parser.add_argument('--seq_jax', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--cpu_devices', type=int, default=0,
                      help='JAX CPU devices the vmap trainer shards seeds over: 0 = one per '
                      'core (the binaries\' default), 1 = one device')
  parser.add_argument('--matmul_n', type=int, default=2048)
  parser.add_argument('--wait_quiet', type=float, default=0,
                      help='before each S, wait up to this many seconds until other '
                      'processes use < 0.1 core')
  parser.add_argument('--json', default=None, metavar='PATH',
                      help='also write the results as JSON here (rewritten after every S)')
  parser.add_argument('--unrolled_threefry', action=argparse.BooleanOptionalAction,
                      default=True,
                      help='unrolled threefry on CPU, as the binaries (--unrolled_threefry)')
  args = parser.parse_args()
  set_up_jax(args.cpu_devices, args.unrolled_threefry)
  global CLOCK
  CLOCK = CompileClock()
  seeds = [int(s) for s in args.seeds.split(',')]
  device = args.torch_device
  command = ' '.join(['python -m benchmarks.seed_sweep'] + sys.argv[1:])
  record = {'benchmark': 'seed_sweep', 'command': command,
            'date': f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}',
            'machine': {'cores': os.cpu_count(), 'cpu': io.cpu_model(),
                        'platform': platform.platform(), 'load_start': getloadavg(),
                        'jax_devices': [str(x) for x in jax.devices()],
                        'jax_num_devices': jax.device_count()},
            'versions': io.library_versions()}
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    record['versions'].update(torch_info(device))
  print(hardware.environment())
  print(f'torch device: {device}, threads {record["versions"]["threads"]}' if args.torch
        else 'torch: skipped')
  peak = hardware.matmul_flops(args.matmul_n)
  print(f'float32 jnp.dot {args.matmul_n}x{args.matmul_n}: {peak / 1e9:.1f} GFLOP/s')
  record['reference'] = {'matmul_n': args.matmul_n, 'jnp_dot_flops_per_s': peak}
  if args.torch:
    peak_torch = hardware.torch_matmul_flops(args.matmul_n, device=device)
    record['reference']['torch_mm_flops_per_s'] = peak_torch
    print(f'float32 torch.mm {args.matmul_n}x{args.matmul_n}: {peak_torch / 1e9:.1f} GFLOP/s')
  c1 = setting.config(1, args.rank)
  flops = setting.flops_per_student_step(c1)
  print(f'matmul FLOPs per student-step: {flops}')
  print(f'steps {args.steps}, chunk_steps {args.chunk_steps}, rank {args.rank}, '
        f'repeats {args.repeats} (median)\n', flush=True)
  record['setting'] = {'rank': args.rank, 'steps': args.steps, 'chunk_steps': args.chunk_steps,
                       'batch_size': c1.batch_size, 'd': c1.d,
                       'teacher_hidden': list(c1.teacher_hidden), 'width_mult': c1.width_mult,
                       'optimizer': c1.optimizer, 'learning_rate': c1.learning_rate,
                       'momentum': c1.momentum, 'repeats': args.repeats,
                       'max_seq_seeds': args.max_seq_seeds,
                       'flops_per_student_step': flops}
  record['rows'] = []
  mesh = sweep.seed_mesh()
  print(f'vmap: seeds sharded over {mesh.devices.size} JAX device(s)')

  rows = []
  for s in seeds:
    waited = hardware.wait_until_quiet(args.wait_quiet)
    load_before, loadavg_before = hardware.load(), getloadavg()
    meter = hardware.OtherLoad()
    # Seeds 0 .. padded-1 (padded: S rounded up to a multiple of the device
    # count); the vmap trainer trains them all, the other trainers seeds 0 .. S-1.
    padded = sweep.padded_size(s, mesh)
    problem = setting.jax_problem(padded, args.rank)
    k = min(s, args.max_seq_seeds)
    # Warm-up: compile (a) and (b), one call of each; the PyTorch trainers' first steps too.
    runs, timed_seeds, compile_s = {}, {}, {}
    runs['vmap'] = make_vmap(problem, args.steps, args.chunk_steps, mesh)
    _, compile_s['vmap'], _ = timed(runs['vmap'])
    timed_seeds['vmap'] = s
    if args.seq_jax:
      runs['seq-jax'] = make_seq_jax(problem, k, args.steps, args.chunk_steps)
      compile_s['seq-jax'] = timed(runs['seq-jax'].warmup)[1]
      timed_seeds['seq-jax'] = k
    if args.torch:
      if args.seq_torch:
        runs['seq-torch'] = make_seq_torch(problem, k, args.steps, device)
        timed_seeds['seq-torch'] = k
      runs['torch-batched'] = make_torch_batched(problem, s, args.steps, device)
      runs['torch-func'] = make_torch_func(problem, s, args.steps, device)
      timed_seeds['torch-batched'] = timed_seeds['torch-func'] = s
      for name in ('seq-torch', 'torch-batched', 'torch-func'):
        if name in runs:
          runs[name].prepare(args.repeats)
          runs[name].warmup()
    times = {name: [] for name in runs}
    others, note, final = [], '', {}
    for _ in range(args.repeats):
      rep_meter = hardware.OtherLoad()
      for name, run in runs.items():
        wall, comp, final[name] = timed(run)
        if comp > 0 and name in ('vmap', 'seq-jax'):
          note += f' ({name} recompiled in timed calls, {comp:.1f}s, subtracted)'
        times[name].append((wall - comp) * s / timed_seeds[name])
      others.append(rep_meter.cores())
    med = {name: statistics.median(v) for name, v in times.items()}
    loadavg_after = getloadavg()
    row = dict(S=s, k=k if k < s else 0, med=med, times=times, compile=compile_s,
               load=load_before, load_after=hardware.load(), others=meter.cores())
    rows.append(row)

    predictors = {'vmap': lambda i, x: problem.student.apply(
        setting.seed_slice(final['vmap'], i), x)[0]}
    if 'seq-jax' in final:
      predictors['seq-jax'] = lambda i, x: problem.student.apply(final['seq-jax'][i], x)[0]
    for name in ('seq-torch', 'torch-batched', 'torch-func'):
      if name in final:
        predictors[name] = (lambda name: lambda i, x: runs[name].predict(final[name], i, x))(
            name)
    check = heldout_mse(problem, k, predictors)
    scaled = f' [sequential: {k} seeds timed, scaled x{s / k:g}]' if k < s else ''
    if padded > s:
      scaled += f' [vmap: {padded} seeds trained (S padded to the {mesh.devices.size} devices)]'
    print(f'S={s}: ' + ' | '.join(f'{n} {[round(t, 3) for t in v]}' for n, v in times.items())
          + f' | compile (s) {dict((n, round(v, 1)) for n, v in compile_s.items())}{scaled}'
          + f' | held-out MSE, seeds 0-{k - 1}: '
          + ', '.join(f'{n} {v:.2e}' for n, v in check.items())
          + f' | load {row["load"]} -> {row["load_after"]}, other processes (cores) per '
          f'repeat {[round(o, 2) for o in others]}, waited {waited:.0f}s for quiet{note}',
          flush=True)

    trainers = {}
    for name, v in times.items():
      rate = s * args.steps * flops['exact'] / med[name]
      trainers[name] = {'seconds': med[name], 'seconds_per_repeat': v,
                        'seeds_timed': timed_seeds[name],
                        'extrapolated': timed_seeds[name] < s,
                        'matmul_flops_per_s': rate, 'fraction_of_jnp_dot': rate / peak,
                        'heldout_mse_seeds_0_to_k': check[name]}
      if 'torch_mm_flops_per_s' in record['reference']:
        trainers[name]['fraction_of_torch_mm'] = rate / record['reference'][
            'torch_mm_flops_per_s']
      if name in compile_s:
        trainers[name]['compile_seconds'] = compile_s[name]
    record['rows'].append({'S': s, 'vmap_seeds_trained': padded, 'heldout_k': k,
                           'heldout_mse_init': check['init'],
                           'trainers': trainers, 'loadavg_before': loadavg_before,
                           'loadavg_after': loadavg_after, 'other_procs_cores': row['others'],
                           'other_procs_cores_per_repeat': others, 'waited_for_quiet_s': waited,
                           'note': note.strip()})
    if args.json:
      record['machine']['load_end'] = getloadavg()
      io.write_json(args.json, record)

  t1 = next((r['med']['vmap'] for r in rows if r['S'] == 1), float('nan'))
  names = [n for n in TRAINERS if n in rows[0]['med']]
  print(f'\nSeed sweep, {args.steps} steps per student, batch {problem.config.batch_size}; '
        f'times in seconds (median of {args.repeats}); "~k" = sequential loop extrapolated '
        f'linearly from k seeds; ratios: T_trainer / T_vmap (ratio of medians, min-max of the '
        f'per-repeat ratios)\n')
  others_names = [n for n in names if n != 'vmap']
  header = (['S'] + [f'T {n}' for n in names] + [f'{n} / vmap' for n in others_names]
            + ['T_vmap(S) / T_vmap(1)', 'load 1m (before -> after)', 'other procs (cores)'])
  print('| ' + ' | '.join(header) + ' |')
  print('|---' * len(header) + '|')
  for r in rows:
    ratios = []
    for n in others_names:
      per = [b / a for a, b in zip(r['times']['vmap'], r['times'][n])]
      ratios.append(f'{r["med"][n] / r["med"]["vmap"]:.2f}x ({min(per):.2f}-{max(per):.2f})')
    k = r['k']
    print(f'| {r["S"]} | '
          + ' | '.join([fmt_t(r['med'][n], k if n.startswith('seq') else 0) for n in names]
                       + ratios) + f' | {r["med"]["vmap"] / t1:.2f} | '
          f'{r["load"].split(",")[0]} -> {r["load_after"].split(",")[0]} | '
          f'{r["others"]:.2f} |')
  print(f'\nMatmul GFLOP/s achieved (% of float32 jnp.dot {args.matmul_n}^2, '
        f'{peak / 1e9:.1f} GFLOP/s); compile seconds of the JAX trainers\n')
  print('| S | ' + ' | '.join(f'{n} GFLOP/s (%)' for n in names)
        + ' | compile vmap | compile seq-jax |')
  print('|---' * (len(names) + 3) + '|')
  for r in rows:
    cells = []
    for n in names:
      rate = r['S'] * args.steps * flops['exact'] / r['med'][n]
      cells.append(f'{rate / 1e9:.2f} ({100 * rate / peak:.1f}%)')
    print(f'| {r["S"]} | ' + ' | '.join(cells) + f' | {r["compile"]["vmap"]:.1f} | '
          f'{fmt_t(r["compile"].get("seq-jax", float("nan")))} |')
  print(f'\nother procs: cores kept busy by other processes during the row (of '
        f'{os.cpu_count()}). load at end: {hardware.load()}')
  if args.json:
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
