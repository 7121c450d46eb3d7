r"""Attack strength and speed: tsrobust's attack ensemble vs torchattacks (independent code).

Two networks hold the same weights in JAX and in PyTorch (the JAX parameters
are copied; logits are asserted equal within ``--logit_tol`` on the clean
points and on every adversarial point torchattacks returns):

* ``mlp``: the default low-rank student ``40 -> 50 -> 10`` of seed 0
  (``benchmarks/setting.py``), trained on its teacher ``40 -> 10 -> 10`` for
  ``--mlp_train_steps`` steps of the default trainer; points ``s P g`` from
  the rank-10 data subspace; L2 attacks on the student with *fixed* labels
  (the teacher's argmax at the clean point), no input range;
* ``cnn``: the real-image teacher's architecture (``experiments/configs/real.py``, as
  ``benchmarks/setting.py``'s ``ImageJob`` declares it: conv (8, 16), dense (32,),
  3 x 3 kernels, 2 x 2 max pooling), trained by cross-entropy with Adam on the bundled
  MNIST training set (``--cnn_train_steps`` steps, the config's batch and learning
  rate); the first ``--cnn_points`` test images; L-inf attacks with the true
  labels, inputs clipped to [0, 1].

Success rate = fraction of the attacked points misclassified at the returned
point (points already misclassified clean count as successes), judged by the
JAX network; torchattacks' points are checked to be feasible (norm <= eps,
in range) first. Rows:

* ours: ``evaluate.Evaluator`` at ``--strengths`` presets (``standard``,
  ``strong``): the ensemble's worst case per example (``evaluate.combine``)
  and each of its attacks alone;
* ours with escalation: a strength ``PRESET+escalation`` (e.g. ``standard+escalation``,
  the binaries' default) runs the preset, then the convergence check and escalation the
  binaries run (``escalation.escalate``, as ``image_eval`` / ``lowrank_eval`` call it): the
  ensemble with every iteration, query and target count doubled attacks the first
  ``convergence_points`` points again (capped by the number of points) and, if it finds
  more than 0.01 more at
  some budget, attacks every point at 2x and is checked at 4x, ..., up to
  ``max_escalations`` doublings. One group per network, all budgets together, as a group
  is a grid point's students at every budget in the binaries; ``convergence_points`` and
  ``max_escalations`` are the defaults of the binary whose students the network stands
  for (``experiments/configs``: ``mlp`` the low-rank study's, ``mlp_at`` the robustness
  study's, ``cnn`` / ``cnn_at`` the image study's). Its rows are the ensemble and each
  attack after escalation (successes at any level), a row with the level reached (the
  ensemble at ``2 ** level`` x; the network's, so the same at every budget) and notes
  with each check's gain per budget;
* torchattacks: ``APGD`` (CE, ``--ta_steps`` iterations, 1 restart),
  ``APGDT`` (targeted DLR, ``--ta_steps`` iterations, all 9 target classes),
  ``Square`` (``--ta_queries`` queries), ``AutoAttack(version='standard')``
  as torchattacks builds it (APGD-CE, APGD-T, FAB-T, Square 5000; its APGD
  and APGD-T use torchattacks' default of 10 iterations), and the union of
  these per example.

The notes under each table compare every strength of ours with the torchattacks union
per budget (examples broken by one side only; the target of issue 30: ours >= the union
minus 0.01 at every budget) and, with AutoAttack, with AutoAttack.

torchattacks wants ``[N, C, H, W]`` inputs in [0, 1]. The CNN's images are
that already (NCHW). The MLP's inputs are presented to it through an exact
affine change of variables ``x = lo + scale * u`` (``u`` in [0, 1] for every
point of every ball; the L2 budget becomes ``eps / scale``; the [0, 1] clamp
never binds, so the attack is the unclipped one): as ``[N, 1, 1, 40]`` for
APGD / APGDT, and as a padded ``[N, 1, 7, 7]`` (9 extra coordinates the
network ignores) for Square and AutoAttack, since torchattacks' Square needs
square windows of side 7 inside the image. Perturbing the padding wastes
some of the budget (gradient attacks only through their random start), which
can only weaken those two attacks.

Throughput (MLP, L2, fixed labels, eps ``--throughput_eps``): examples x
iterations per second of one jitted ``attacks.apgd`` call (CE, ``--steps``
iterations, 1 restart, with the success tracking the ensemble uses; also
without it), compiled and warmed up before timing, vs torchattacks' ``APGD``
(CE, 1 restart, same iterations) on the same points, at each of
``--torch_threads`` (torch's default, one per core, and 1: on a machine
shared with other processes, two OpenMP threads can be several times slower
than one and vary wildly), side by side in each of ``--repeats`` repeats,
medians. torchattacks' success-rate runs use ``--strength_torch_threads``.

    python -m benchmarks.attack_strength --num_points=500 --batch_sizes=512,4096 --steps=100
    python -m benchmarks.attack_strength --networks=cnn_at --cnn_points=100 \
        --strengths=standard,standard+escalation --nothroughput
"""

import math
import statistics
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hardware
from benchmarks import setting
from tsrobust import attacks
from tsrobust import cnn
from tsrobust import data
from tsrobust import datasets
from tsrobust import escalation
from tsrobust import evaluate
from tsrobust import lowrank
from tsrobust import lowrank_eval
from tsrobust import methods
from tsrobust import teachers
from tsrobust import train

NETWORKS = ('mlp', 'mlp_at', 'cnn', 'cnn_at')
_NETWORKS = flags.DEFINE_list('networks', ['mlp', 'cnn'], f'which networks: {", ".join(NETWORKS)}')
_CNN_AT_EPS = flags.DEFINE_float('cnn_at_eps', 0.1, 'cnn_at: the L-inf budget of its PGD-AT')
_AT_EPS = flags.DEFINE_float('at_eps', 0.5, 'mlp_at: the L2 budget of its PGD adversarial '
                             'training (the robustness study: 0.5 / 1 / 2)')
_AT_TRAIN_STEPS = flags.DEFINE_integer('at_train_steps', 10000,
                                       'mlp_at: training steps (the robustness study: 10,000)')
_NUM_POINTS = flags.DEFINE_integer('num_points', 500, 'attacked points (MLP)')
_CNN_POINTS = flags.DEFINE_integer('cnn_points', 100,
                                   'attacked test images of the CNN (0: --num_points)')
_MLP_EPS = flags.DEFINE_list('mlp_eps', ['0.5', '1', '2'], 'L2 budgets of the MLP')
_CNN_EPS = flags.DEFINE_list('cnn_eps', ['0.05', '0.1', '0.2'], 'L-inf budgets of the CNN')
_STRENGTHS = flags.DEFINE_list('strengths', ['standard', 'strong'],
                               'presets of our ensemble (evaluate.PRESETS); PRESET+escalation '
                               "(e.g. standard+escalation, the binaries' default): the preset "
                               "with the binaries' convergence check and escalation")
_MLP_TRAIN_STEPS = flags.DEFINE_integer('mlp_train_steps', 4000,
                                        'training steps of the MLP student on its teacher')
_CNN_TRAIN_STEPS = flags.DEFINE_integer('cnn_train_steps', 1000,
                                        'Adam steps of the CNN on MNIST (cross-entropy)')
_TA_STEPS = flags.DEFINE_integer('ta_steps', 100, "torchattacks APGD / APGDT iterations")
_TA_QUERIES = flags.DEFINE_integer('ta_queries', 5000, "torchattacks Square queries")
_AUTOATTACK = flags.DEFINE_boolean('autoattack', True, "run torchattacks' AutoAttack")
_SEED = flags.DEFINE_integer('seed', 0, 'seed of the points and of every attack')
_LOGIT_TOL = flags.DEFINE_float('logit_tol', 1e-4, 'max |JAX - PyTorch| logit difference')
_THROUGHPUT = flags.DEFINE_boolean('throughput', True, 'time APGD (MLP)')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['512', '4096'], 'throughput batch sizes')
_STEPS = flags.DEFINE_integer('steps', 100, 'APGD iterations of the throughput runs')
_THROUGHPUT_EPS = flags.DEFINE_float('throughput_eps', 1.0, 'L2 budget of the throughput runs')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed repeats (median)')
_TORCH_THREADS = flags.DEFINE_list('torch_threads', ['0', '1'],
                                   'torch.set_num_threads of the throughput runs, each timed '
                                   "(0: torch's default, one per core)")
_WAIT_QUIET = flags.DEFINE_float('wait_quiet', 0,
                                 'before each throughput batch size, wait up to this many '
                                 'seconds until other processes use < 0.1 core')
_STRENGTH_TORCH_THREADS = flags.DEFINE_integer(
    'strength_torch_threads', 1, 'torch.set_num_threads of the success-rate runs (0: default; '
    'the rates do not depend on it; 1 is the fastest on a shared 2-core machine)')


# ----------------------------------------------------------------------------
# The two networks, in JAX and in PyTorch.
# ----------------------------------------------------------------------------


class Network(NamedTuple):
  """One attacked network, both frameworks.

  ``x`` is in JAX layout (``[N, d]`` or ``[N, H, W, C]``); ``to_torch(x)``
  gives torchattacks' view of it (``[N, C, H, W]`` in [0, 1]), ``from_torch``
  maps back; ``eps_torch(eps)`` is the budget in torchattacks' coordinates.
  """
  name: str
  apply: Callable            # (params, x) -> (logits, activations)
  params: Any
  x: np.ndarray
  labels: np.ndarray         # [N] int: fixed (teacher's argmax at x) or true labels
  label_kind: str            # 'fixed' or 'true'
  norm: str                  # 'l2' or 'linf'
  eps: Tuple[float, ...]
  clip_range: Optional[Tuple[float, float]]
  torch_model: Any           # takes torchattacks' view
  to_torch: Callable
  from_torch: Callable
  eps_torch: Callable
  torch_padded: Any = None   # MLP: the zero-padded square view (Square, AutoAttack)
  to_torch_padded: Optional[Callable] = None
  from_torch_padded: Optional[Callable] = None
  info: str = ''


def _logits(net: Network, x) -> np.ndarray:
  return np.asarray(jax.jit(net.apply)(net.params, jnp.asarray(x))[0])


def torch_cnn(model: cnn.CNN, params: Any):
  """A PyTorch module (NCHW input) computing ``model.apply(params, .)[0]`` (NHWC input)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  if model.kernel_size % 2 != 1:
    raise ValueError('the PyTorch copy assumes an odd kernel size (symmetric SAME padding)')
  p = params['params']

  def dense(name):
    kernel = np.asarray(p[name]['kernel'])
    lin = nn.Linear(kernel.shape[0], kernel.shape[1], bias=model.use_bias)
    with torch.no_grad():
      lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
      if model.use_bias:
        lin.bias.copy_(torch.from_numpy(np.array(p[name]['bias'])))
    return lin

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      convs = []
      for i in range(len(model.conv_widths)):
        kernel = np.asarray(p[f'conv_{i}']['kernel'])  # [k, k, C_in, C_out]
        conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], model.kernel_size,
                         padding=model.kernel_size // 2, bias=model.use_bias)
        with torch.no_grad():
          conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
          if model.use_bias:
            conv.bias.copy_(torch.from_numpy(np.array(p[f'conv_{i}']['bias'])))
        convs.append(conv)
      self.convs = nn.ModuleList(convs)
      self.dense = nn.ModuleList([dense(f'dense_{i}') for i in range(len(model.dense_widths))])
      self.output = dense('output')

    def forward(self, x):
      for conv in self.convs:
        x = torch.relu(conv(x))
        if model.pool == 'max':
          x = nn.functional.max_pool2d(x, 2)
        elif model.pool == 'avg':
          x = nn.functional.avg_pool2d(x, 2)
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flax flattens NHWC
      for lin in self.dense:
        x = torch.relu(lin(x))
      return self.output(x)

  return Net().eval().requires_grad_(False)


def _unit_view(mlp, d: int, side: Optional[int], lo: float, scale: float):
  """``u [N, 1, 1, d]`` (or ``[N, 1, side, side]``, first ``d`` used) ``-> mlp(lo + scale * u)``."""
  from torch import nn  # pylint: disable=g-import-not-at-top

  class View(nn.Module):

    def __init__(self):
      super().__init__()
      self.mlp = mlp

    def forward(self, u):
      return self.mlp(lo + scale * u.reshape(u.shape[0], -1)[:, :d])
  return View().eval().requires_grad_(False)


def _square_side(d: int) -> int:
  """Smallest square image side that holds ``d`` values and torchattacks' L2 Square windows."""
  side = max(math.isqrt(d - 1) + 1, 1)
  while True:
    s = max(int(round(math.sqrt(0.8 * side * side))), 3)
    s += 1 - s % 2
    if s <= side:
      return side
    side += 1


def mlp_network(num_points: int, train_steps: int, eps: Sequence[float], seed: int,
                at_eps: float = 0.0) -> Network:
  """The default low-rank student of seed 0; with ``at_eps > 0`` trained by PGD-AT instead.

  PGD-AT as the robustness study trains it (``experiments/configs/robustness.py``: L2, 5
  steps, oracle labels, the whole batch attacked, unconstrained), at budget ``at_eps``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  p = setting.jax_problem(1)
  loss_fn, data_args, how = p.loss_fn, p.data_args, 'standard training'
  if at_eps > 0:
    settings = methods.Settings(loss=p.config.loss, batch_size=p.config.batch_size,
                                at_norm='l2', at_steps=5, at_label='oracle', at_fraction=1.0)
    points = [('at', {'at_eps': at_eps, 'at_where': 'full', 'at_label': 'oracle'})]
    loss_fn = methods.make_loss('at', p.student.apply, p.teacher.apply,
                                lowrank.sampler(p.config.num_train), settings)
    data_args = {**p.data_args, **methods.student_args(points, 1, settings),
                 **methods.subspace_args(points, p.projector)}
    how = f'PGD-AT (L2, eps {at_eps:g}, 5 steps, oracle labels)'
  state, losses = train.train_seeds(loss_fn, p.optimizer, p.state, p.teacher_params,
                                    data_args, p.keys, num_steps=train_steps,
                                    chunk_steps=min(1000, max(train_steps, 1)))
  sp = setting.seed_slice(state.params, 0)
  tp = setting.seed_slice(p.teacher_params, 0)
  x = np.asarray(data.sample_lowrank(jax.random.fold_in(jax.random.PRNGKey(seed), 1),
                                     p.projector[0], num_points,
                                     float(p.data_args['scale'][0])))
  labels = np.asarray(p.teacher.apply(tp, x)[0].argmax(-1)).astype(np.int32)
  d = x.shape[1]
  margin = max(eps) + 1.0
  lo = float(x.min()) - margin
  scale = float(x.max()) + margin - lo
  side = _square_side(d)
  student = setting.torch_mlp(sp, 'cpu').requires_grad_(False).eval()

  def to_torch(v):
    return torch.from_numpy(((np.asarray(v) - lo) / scale).astype(np.float32)).reshape(
        -1, 1, 1, d)

  def from_torch(u):
    return (lo + scale * u.detach().cpu().numpy().reshape(u.shape[0], -1)[:, :d]).astype(
        np.float32)

  def to_padded(v):
    u = np.full((len(v), side * side), 0.5, np.float32)
    u[:, :d] = (np.asarray(v) - lo) / scale
    return torch.from_numpy(u).reshape(-1, 1, side, side)

  widths = ' -> '.join(str(w) for w in (d,) + tuple(p.student.hidden_widths)
                       + (p.student.out_dim,))
  info = (f'MLP student {widths} trained by {how} for '
          f'{train_steps} steps on its teacher (final chunk loss {float(losses[0, -1]):.2e}, '
          f'{time.perf_counter() - t0:.0f} s); torchattacks view x = {lo:.3f} + {scale:.3f} u; '
          f'Square / AutoAttack on [N, 1, {side}, {side}] ({side * side - d} padding entries)')
  return Network('mlp_at' if at_eps > 0 else 'mlp', p.student.apply, sp, x, labels, 'fixed',
                 'l2', tuple(eps), None,
                 _unit_view(student, d, None, lo, scale), to_torch, from_torch,
                 lambda e: e / scale, _unit_view(student, d, side, lo, scale), to_padded,
                 from_torch, info)


def cnn_network(num_points: int, train_steps: int, eps: Sequence[float], seed: int,
                at_eps: float = 0.0) -> Network:
  """The real study's teacher architecture on MNIST; with ``at_eps > 0`` trained by L-inf
  PGD-AT (5 steps, the budget ramped up over the first fifth of training, as the image
  study's robust models are)."""
  import torch  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  c = setting.ImageJob()  # the image binary's default (MNIST) config
  ds = datasets.load('mnist', None)
  if num_points > ds.test_x.shape[0]:
    raise ValueError(f'--cnn_points must be <= {ds.test_x.shape[0]} (the test set), '
                     f'got {num_points}')
  model = c.teacher_model(ds.num_classes)
  n = ds.train_x.shape[0]
  loss_fn = teachers.supervised_loss(model.apply, n, c.teacher_batch,
                                     pgd_steps=5 if at_eps else 0,
                                     eps_warmup=train_steps // 5 if at_eps else 0)
  optimizer = train.make_optimizer('adam', c.teacher_lr)
  k_init, k_train = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 2))
  params = cnn.init_params(k_init, model, ds.image_shape)
  add_axis = lambda tree: jax.tree_util.tree_map(lambda v: jnp.asarray(v)[None], tree)
  state = add_axis(train.init_state(params, optimizer))
  data_args = add_axis({'train_x': ds.train_x, 'train_y': ds.train_y,
                        'at_eps': jnp.float32(at_eps)})
  state, losses = train.train_seeds(loss_fn, optimizer, state, jnp.zeros((1,)), data_args,
                                    k_train[None], num_steps=train_steps,
                                    chunk_steps=min(250, max(train_steps, 1)))
  params = jax.tree_util.tree_map(lambda v: np.asarray(v[0]), state.params)
  x = np.asarray(ds.test_x[:num_points])
  labels = np.asarray(ds.test_y[:num_points]).astype(np.int32)
  test_acc = float((np.asarray(jax.jit(model.apply)(params, ds.test_x)[0]).argmax(-1)
                    == ds.test_y).mean())
  to_torch = lambda v: torch.from_numpy(np.ascontiguousarray(np.asarray(v).transpose(0, 3, 1, 2)))
  from_torch = lambda u: u.detach().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float32)
  how = f', L-inf PGD-AT at {at_eps:g} (5 steps)' if at_eps else ''
  info = (f'CNN conv {tuple(c.teacher_conv)} dense {tuple(c.teacher_dense)} on {ds.name} '
          f'({n} train images{how}), Adam lr {c.teacher_lr} batch {c.teacher_batch}, '
          f'{train_steps} steps (final chunk loss {float(losses[0, -1]):.3f}, '
          f'{time.perf_counter() - t0:.0f} s); test accuracy {test_acc:.3f} '
          f'({ds.test_x.shape[0]} images)')
  return Network('cnn_at' if at_eps else 'cnn', model.apply, params, x, labels, 'true', 'linf',
                 tuple(eps), (0.0, 1.0),
                 torch_cnn(model, params), to_torch, from_torch, lambda e: e, info=info)


def check_same_logits(net: Network, x: np.ndarray, tol: float, padded: bool = False) -> float:
  """Max |JAX - PyTorch| logit difference at ``x`` (JAX layout); raises above ``tol``."""
  import torch  # pylint: disable=g-import-not-at-top
  model = net.torch_padded if padded else net.torch_model
  to = net.to_torch_padded if padded else net.to_torch
  with torch.no_grad():
    t = model(to(x)).numpy()
  diff = float(np.abs(t - _logits(net, x)).max())
  if not diff <= tol:
    raise AssertionError(f'{net.name}: JAX and PyTorch logits differ by {diff:.2e} > {tol:g}')
  return diff


# ----------------------------------------------------------------------------
# Success rates.
# ----------------------------------------------------------------------------


def misclassified(net: Network, x_adv: np.ndarray) -> np.ndarray:
  return _logits(net, x_adv).argmax(-1) != net.labels


ESCALATION = '+escalation'  # strength suffix: the preset, then the binaries' escalation


def parse_strength(strength: str) -> Tuple[str, bool]:
  """``(preset, escalated)`` of a ``--strengths`` entry (``standard``,
  ``standard+escalation``); raises ValueError on an unknown preset."""
  base = strength[:-len(ESCALATION)] if strength.endswith(ESCALATION) else strength
  evaluate.preset(base)
  return base, base != strength


def escalation_setting(name: str) -> Tuple[int, int]:
  """``(convergence_points, max_escalations)``: the defaults of the binary whose students
  network ``name`` stands for (``experiments/configs``)."""
  from experiments.configs import lowrank as lowrank_config  # pylint: disable=g-import-not-at-top
  from experiments.configs import real  # pylint: disable=g-import-not-at-top
  from experiments.configs import robustness  # pylint: disable=g-import-not-at-top
  configs = {'mlp': lowrank_config.get_config, 'mlp_at': robustness.get_config,
             'cnn': real.get_config, 'cnn_at': real.get_config}
  if name not in configs:
    raise ValueError(f'no binary default for network {name!r}; one of {sorted(configs)}')
  c = configs[name]()
  return int(c.convergence_points), int(c.max_escalations)


def _evaluator(net: Network, config: evaluate.AttackConfig) -> evaluate.Evaluator:
  return evaluate.Evaluator(net.apply, net.apply, norm=net.norm, config=config,
                            clip_range=net.clip_range, shared_teacher=True, shared_data=True,
                            batching='map' if net.name.startswith('cnn') else 'vmap')


def _ours(net: Network, strength: str, seed: int, config: evaluate.AttackConfig,
          check: Optional[Tuple[int, int]]):
  """``(rows, wall seconds, escalation report or None)``; ``check``: ``(check_points,
  max_level)`` of ``escalation.escalate`` (None: no check)."""
  ev = _evaluator(net, config)
  sp = jax.tree_util.tree_map(lambda v: jnp.asarray(v)[None], net.params)
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 3), 1)

  def run(evaluator, students, k, start, stop):
    params = jax.tree_util.tree_map(lambda v: v[np.asarray(students)], sp)
    return evaluator.run(params, net.params, jnp.asarray(net.x[start:stop]),
                         k[np.asarray(students)], eps=net.eps, labels_kinds=(net.label_kind,),
                         labels=jnp.asarray(net.labels[start:stop]))
  t0 = time.perf_counter()
  result = run(ev, [0], keys, 0, len(net.x))
  report = None
  if check is not None:  # as image_eval / lowrank_eval run it, one group: this network
    levels = lowrank_eval.level_evaluators(lambda c: _evaluator(net, c), config)

    def level_run(level, students, start, stop):
      return run(levels(level), students, escalation.escalation_keys(keys, level), start, stop)
    result, report = escalation.escalate(level_run, result, {net.name: np.ones(1, bool)},
                                         check[0], check[1])
  wall = time.perf_counter() - t0
  rows = {f'ours {strength}: ensemble': evaluate.combine(result)[(net.label_kind, 'full')][0]}
  for attack in ev.config.attacks_for(net.label_kind):
    rows[f'ours {strength}: {attack}'] = result.success[(net.label_kind, 'full', attack)][0]
  return rows, wall, report


def ours(net: Network, strength: str, seed: int,
         config: Optional[evaluate.AttackConfig] = None
         ) -> Tuple[Dict[str, np.ndarray], float]:
  """``{row: [E, N] bool}`` of our ensemble at ``strength`` and of each attack; wall seconds.

  ``config``: the ensemble, in place of ``strength``'s preset (``strength`` names the rows).
  """
  rows, wall, _ = _ours(net, strength, seed,
                        evaluate.preset(strength) if config is None else config, None)
  return rows, wall


def ours_escalated(net: Network, strength: str, seed: int, check_points: int, max_level: int,
                   config: Optional[evaluate.AttackConfig] = None
                   ) -> Tuple[Dict[str, np.ndarray], float, Dict[str, Any]]:
  """``ours`` followed by the binaries' convergence check and escalation.

  ``escalation.escalate`` with one group (this network, every budget), the first
  ``check_points`` points checked, at most ``max_level`` doublings; keys
  ``escalation.escalation_keys`` of ``ours``' keys. ``strength``: ``PRESET+escalation``
  (or any row name with ``config``). Returns ``(rows, wall seconds, report)``: the rows
  after escalation (each attack's successes at any level), all levels' wall time, and
  ``escalate``'s report of the network's group (``level``, ``checks``, ``converged``, ...)
  with ``points`` and ``max_level``.
  """
  if config is None:
    config = evaluate.preset(parse_strength(strength)[0])
  rows, wall, report = _ours(net, strength, seed, config, (check_points, max_level))
  group = report['groups'][net.name]
  return rows, wall, {'points': report['points'], 'max_level': report['max_level'],
                      'threshold': report['threshold'], **group}


def escalation_notes(net: Network, strength: str, report: Dict[str, Any]) -> List[str]:
  """One line per check of ``ours_escalated``'s report: the gain per budget."""
  head = (f'ours {strength}: convergence check on the first {report["points"]} points, at '
          f'most {report["max_level"]} doublings; level reached {report["level"]} (ensemble at '
          f'{2 ** report["level"]}x on every point); '
          + ('converged' if report['converged'] else
             'NOT converged at the last level (its errors are lower bounds)'))
  lines = [head]
  for c in report['checks']:
    gains = []
    for e in net.eps:
      b, a = c['cells'][f'{net.label_kind}_full_{e:g}']
      gains.append(f'eps {e:g} {b:.3f} -> {a:.3f}')
    lines.append(f'ours {strength}: check at {2 ** (c["level"] + 1)}x (level {c["level"]}): '
                 + ', '.join(gains) + f' (max gain {c["max_gain"]:+.3f}: '
                 + ('converged' if c['converged'] else 'escalate') + ')')
  return lines


def _feasible(net: Network, x_adv: np.ndarray, eps: float) -> Tuple[bool, float]:
  delta = (x_adv - net.x).reshape(len(net.x), -1)
  size = (np.sqrt((delta.astype(np.float64) ** 2).sum(-1)) if net.norm == 'l2'
          else np.abs(delta).max(-1))
  ok = bool((size <= eps * (1 + 1e-4) + 1e-5).all())
  if net.clip_range is not None:
    lo, hi = net.clip_range
    ok &= bool((x_adv >= lo - 1e-6).all() and (x_adv <= hi + 1e-6).all())
  return ok, float(size.max())


def torchattacks_rows(net: Network, seed: int, steps: int, queries: int, autoattack: bool,
                      tol: float) -> Tuple[Dict[str, np.ndarray], Dict[str, float], List[str]]:
  """``{row: [E, N] bool}`` of torchattacks' attacks, wall seconds per row, notes."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchattacks  # pylint: disable=g-import-not-at-top
  norm = {'l2': 'L2', 'linf': 'Linf'}[net.norm]
  num_classes = int(_logits(net, net.x[:1]).shape[-1])
  y = torch.from_numpy(net.labels.astype(np.int64))
  padded = net.torch_padded is not None
  specs = [
      ('torchattacks: APGD-CE', False,
       lambda m, e: torchattacks.APGD(m, norm=norm, eps=e, steps=steps, n_restarts=1,
                                      loss='ce', seed=seed)),
      ('torchattacks: APGD-T', False,
       lambda m, e: torchattacks.APGDT(m, norm=norm, eps=e, steps=steps, n_restarts=1,
                                       n_classes=num_classes, seed=seed)),
      ('torchattacks: Square', padded,
       lambda m, e: torchattacks.Square(m, norm=norm, eps=e, n_queries=queries, n_restarts=1,
                                        seed=seed)),
  ]
  if autoattack:
    specs.append(('torchattacks: AutoAttack', padded,
                  lambda m, e: torchattacks.AutoAttack(m, norm=norm, eps=e, version='standard',
                                                       n_classes=num_classes, seed=seed)))
  rows, walls, notes = {}, {}, []
  for name, use_padded, make in specs:
    model = net.torch_padded if use_padded else net.torch_model
    to = net.to_torch_padded if use_padded else net.to_torch
    back = net.from_torch_padded if use_padded else net.from_torch
    out, wall, max_diff = [], 0.0, 0.0
    for e in net.eps:
      torch.manual_seed(seed)
      t0 = time.perf_counter()
      u_adv = make(model, net.eps_torch(e))(to(net.x), y)
      wall += time.perf_counter() - t0
      x_adv = back(u_adv)
      ok, size = _feasible(net, x_adv, e)
      if not ok:
        notes.append(f'{name} at eps {e:g}: infeasible points (max norm {size:.6g})')
      max_diff = max(max_diff, check_same_logits(net, x_adv, tol, use_padded))
      out.append(misclassified(net, x_adv))
    rows[name] = np.stack(out)
    walls[name] = wall
    notes.append(f'{name}: {wall:.1f} s, max |JAX - PyTorch| logit diff at its points '
                 f'{max_diff:.1e}')
    print(f'  {name}: {rows[name].mean(-1)} ({wall:.1f} s)', flush=True)
  rows['torchattacks: union of the above'] = np.any(np.stack(list(rows.values())), 0)
  return rows, walls, notes


def strength_table(net: Network, strengths: Sequence[str], seed: int) -> Tuple[str, List[str]]:
  clean = misclassified(net, net.x)
  rows: Dict[str, np.ndarray] = {}
  walls: Dict[str, float] = {}
  notes = [net.info, f'clean logit diff JAX vs PyTorch: '
           f'{check_same_logits(net, net.x, _LOGIT_TOL.value):.1e}'
           + (f' (padded view {check_same_logits(net, net.x, _LOGIT_TOL.value, True):.1e})'
              if net.torch_padded is not None else '')]
  levels: Dict[str, int] = {}
  for strength in strengths:
    if parse_strength(strength)[1]:
      points, max_level = escalation_setting(net.name)
      r, wall, report = ours_escalated(net, strength, seed, points, max_level)
      levels[f'ours {strength}: ensemble'] = report['level']
      notes += escalation_notes(net, strength, report)
    else:
      r, wall = ours(net, strength, seed)
    rows.update(r)
    walls[f'ours {strength}: ensemble'] = wall
    print(f'  ours {strength}: {r[f"ours {strength}: ensemble"].mean(-1)} ({wall:.1f} s incl. '
          'compile)', flush=True)
  r, w, n = torchattacks_rows(net, seed, _TA_STEPS.value, _TA_QUERIES.value, _AUTOATTACK.value,
                              _LOGIT_TOL.value)
  rows.update(r)
  walls.update(w)
  notes += n
  eps_cols = ' | '.join(f'eps {e:g}' for e in net.eps)
  lines = [f'| attack | {eps_cols} | wall s (all budgets) |',
           '|---|' + '---|' * len(net.eps) + '---|',
           '| clean error | ' + ' | '.join(f'{clean.mean():.3f}' for _ in net.eps) + ' | |']
  for name, s in rows.items():
    missed = int((clean[None] & ~s).sum())  # every clean error must count as a success
    if missed:
      notes.append(f'{name}: {missed} clean errors (point x budget) not counted as successes')
    wall = f'{walls[name]:.1f}' if name in walls else ''
    lines.append(f'| {name} | ' + ' | '.join(f'{v:.3f}' for v in s.mean(-1)) + f' | {wall} |')
    if name in levels:  # the network's group: one level for every budget
      lines.append(f'| {name[:-len(": ensemble")]}: level reached (ensemble at 2^level x) | '
                   + ' | '.join(str(levels[name]) for _ in net.eps) + ' | |')
  def target(strength, name, reference):  # ours >= reference - 0.01 at every budget
    gap = rows[f'ours {strength}: ensemble'].mean(-1) - reference.mean(-1)
    return (f'ours {strength} - {name} per budget: ' + ', '.join(f'{g:+.3f}' for g in gap)
            + ' -> target (>= -0.01 at every budget) '
            f'{"HOLDS" if (gap >= -0.01 - 1e-12).all() else "MISSED"}')
  targets = []
  if 'torchattacks: AutoAttack' in rows:
    targets += [target(s, 'AutoAttack', rows['torchattacks: AutoAttack']) for s in strengths]
  union = rows['torchattacks: union of the above']
  for strength in strengths:
    ens = rows[f'ours {strength}: ensemble']
    only_ta = (union & ~ens).mean(-1)
    only_us = (ens & ~union).mean(-1)
    targets.append(f'ours {strength} vs the torchattacks union, per example: broken only by '
                   f'torchattacks {", ".join(f"{v:.3f}" for v in only_ta)}; only by ours '
                   f'{", ".join(f"{v:.3f}" for v in only_us)}')
  # issue 30: our default >= the torchattacks union - 0.01
  targets += [target(s, 'the torchattacks union', union) for s in strengths]
  return '\n'.join(lines), notes + targets


# ----------------------------------------------------------------------------
# Throughput.
# ----------------------------------------------------------------------------


def throughput(net: Network, batch_sizes: Sequence[int], steps: int, eps: float, repeats: int,
               seed: int, torch_threads: Sequence[int], wait_quiet: float) -> str:
  """Markdown rows: one per (batch, torch thread count); all timed side by side per repeat."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchattacks  # pylint: disable=g-import-not-at-top
  p = setting.jax_problem(1)
  tp = setting.seed_slice(p.teacher_params, 0)
  s_fn = lambda v: net.apply(net.params, v)[0]

  def make(track: bool):
    @jax.jit
    def run(x, y, key):
      return attacks.apgd(attacks.fixed_label_objective(s_fn, y), x, key, eps=eps, steps=steps,
                          norm='l2',
                          success_fn=attacks.fixed_label_success(s_fn, y) if track else None)
    return run
  our_apgd, our_plain = make(True), make(False)

  lines = ['| batch | torch threads | ours (ex*it/s) | torchattacks (ex*it/s) '
           '| speed-up T_ta / T_ours (min-max) | ours s/attack | torchattacks s/attack '
           '| ours without success tracking (ex*it/s) | ours compile (s) '
           '| success ours / ta | load 1m (before -> after) | other procs (cores) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for n in batch_sizes:
    waited = hardware.wait_until_quiet(wait_quiet)
    load0, meter = hardware.load(), hardware.OtherLoad()
    x = data.sample_lowrank(jax.random.fold_in(jax.random.PRNGKey(seed), 4 + n), p.projector[0],
                            n, float(p.data_args['scale'][0]))
    y = p.teacher.apply(tp, x)[0].argmax(-1)
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    delta = jax.block_until_ready(our_apgd(x, y, key))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(our_apgd(x, y, key))  # warm-up
    compile_s -= time.perf_counter() - t0
    jax.block_until_ready(our_plain(x, y, key))
    jax.block_until_ready(our_plain(x, y, key))
    atk = torchattacks.APGD(net.torch_model, norm='L2', eps=net.eps_torch(eps), steps=steps,
                            n_restarts=1, loss='ce', seed=seed)
    u, yt = net.to_torch(np.asarray(x)), torch.from_numpy(np.asarray(y).astype(np.int64))
    for threads in torch_threads:
      torch.set_num_threads(threads)
      u_adv = atk(u, yt)  # warm-up
    t_j, t_p, t_t = [], [], {k: [] for k in torch_threads}
    for _ in range(repeats):
      t0 = time.perf_counter()
      delta = jax.block_until_ready(our_apgd(x, y, key))
      t_j.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      jax.block_until_ready(our_plain(x, y, key))
      t_p.append(time.perf_counter() - t0)
      for threads in torch_threads:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        u_adv = atk(u, yt)
        t_t[threads].append(time.perf_counter() - t0)
    succ_j = float((s_fn(x + delta).argmax(-1) != y).mean())
    succ_t = float((s_fn(jnp.asarray(net.from_torch(u_adv))).argmax(-1) != y).mean())
    tj, tpl = statistics.median(t_j), statistics.median(t_p)
    load1, others = hardware.load(), meter.cores()
    print(f'  batch {n}: ours {t_j} | ours without tracking {t_p} | torchattacks '
          f'{t_t} s (by torch threads) | waited {waited:.0f} s '
          'for quiet', flush=True)
    for threads in torch_threads:
      tt = statistics.median(t_t[threads])
      ratios = [t / j for t, j in zip(t_t[threads], t_j)]
      lines.append(f'| {n} | {threads} | {n * steps / tj:,.0f} | {n * steps / tt:,.0f} | '
                   f'{tt / tj:.1f}x ({min(ratios):.1f}-{max(ratios):.1f}) | {tj:.3f} | '
                   f'{tt:.3f} | {n * steps / tpl:,.0f} | {compile_s:.1f} | '
                   f'{succ_j:.3f} / {succ_t:.3f} | {load0.split(",")[0]} -> '
                   f'{load1.split(",")[0]} | {others:.2f} |')
  return '\n'.join(lines)


def versions() -> str:
  import torch  # pylint: disable=g-import-not-at-top
  import torchattacks  # pylint: disable=g-import-not-at-top
  return (f'jax {jax.__version__}, torch {torch.__version__} '
          f'(threads {torch.get_num_threads()}), torchattacks {torchattacks.__version__}; '
          f'jax devices {jax.devices()}')


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  default_threads = torch.get_num_threads()
  for name in _NETWORKS.value:
    if name not in NETWORKS:
      raise ValueError(f"--networks must hold some of {', '.join(NETWORKS)}, got {name!r}")
  for s in _STRENGTHS.value:
    parse_strength(s)
  t_start = time.perf_counter()
  print(hardware.environment())
  print(versions())
  print(f'load at start: {hardware.load()}\n', flush=True)
  seed = _SEED.value
  torch.set_num_threads(_STRENGTH_TORCH_THREADS.value or default_threads)
  out = []
  mlp = None
  meter = hardware.OtherLoad()
  n, n_cnn = _NUM_POINTS.value, _CNN_POINTS.value or _NUM_POINTS.value
  mlp_eps, cnn_eps = [float(e) for e in _MLP_EPS.value], [float(e) for e in _CNN_EPS.value]
  if 'mlp' in _NETWORKS.value or _THROUGHPUT.value:  # also the throughput benchmark's
    mlp = mlp_network(n, _MLP_TRAIN_STEPS.value, mlp_eps, seed)
  networks = {  # name -> (build, title), in the order they run
      'mlp': (lambda: mlp, f'MLP (L2, fixed labels, no clipping), N = {n}'),
      'mlp_at': (lambda: mlp_network(n, _AT_TRAIN_STEPS.value, mlp_eps, seed,
                                     at_eps=_AT_EPS.value),
                 f'MLP trained by PGD-AT at eps {_AT_EPS.value:g} (L2, fixed labels, no '
                 f'clipping), N = {n}'),
      'cnn': (lambda: cnn_network(n_cnn, _CNN_TRAIN_STEPS.value, cnn_eps, seed),
              f'MNIST CNN (L-inf, true labels, clip [0, 1]), N = {n_cnn}'),
      'cnn_at': (lambda: cnn_network(n_cnn, _CNN_TRAIN_STEPS.value, cnn_eps, seed,
                                     at_eps=_CNN_AT_EPS.value),
                 f'MNIST CNN trained by PGD-AT at {_CNN_AT_EPS.value:g} (L-inf, true labels, '
                 f'clip [0, 1]), N = {n_cnn}'),
  }
  assert tuple(networks) == NETWORKS
  for name, (build, title) in networks.items():
    if name in _NETWORKS.value:
      net = build()
      print(title, flush=True)
      table, notes = strength_table(net, _STRENGTHS.value, seed)
      out.append((title, table, notes))
  strength_others = meter.cores()
  thr = None
  if _THROUGHPUT.value:
    threads = list(dict.fromkeys(int(t) or default_threads for t in _TORCH_THREADS.value))
    print(f'throughput (torch threads {threads})', flush=True)
    thr = throughput(mlp, [int(b) for b in _BATCH_SIZES.value], _STEPS.value,
                     _THROUGHPUT_EPS.value, _REPEATS.value, seed, threads, _WAIT_QUIET.value)
  print('\n' + '=' * 78)
  print(f'torchattacks APGD / APGD-T: {_TA_STEPS.value} iterations; Square: '
        f'{_TA_QUERIES.value} queries; success = misclassified at the returned point '
        '(clean errors included)')
  for title, table, notes in out:
    print(f'\n### {title}\n\n{table}\n')
    for line in notes:
      print(f'- {line}')
  print(f'\nother processes kept {strength_others:.2f} cores busy during the success-rate runs')
  if thr:
    print(f'\n### APGD throughput (MLP, L2, CE, {_STEPS.value} iterations, 1 restart, '
          f'eps {_THROUGHPUT_EPS.value:g}), median of {_REPEATS.value}\n\n{thr}')
  print(f'\ntotal {time.perf_counter() - t_start:.0f} s; load at end: {hardware.load()}')


if __name__ == '__main__':
  app.run(main)
