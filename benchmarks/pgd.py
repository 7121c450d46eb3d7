r"""L2 PGD with the oracle objective: tsrobust (JAX) vs the PyTorch equivalent.

Both sides attack the same student ``40 -> 50 -> 10`` and teacher
``40 -> 10 -> 10`` of seed 0 of the default low-rank setting (PyTorch holds
copies of the JAX parameters) on the same clean points, and do the same work:

* objective ``KL(softmax(teacher(x + delta)) || softmax(student(x + delta)))``
  per example, differentiated through both networks w.r.t. ``delta`` only
  (JAX: ``attacks.oracle_objective(..., 'kl')``; PyTorch: ``F.kl_div(...,
  log_target=True)``, networks with ``requires_grad_(False)`` and
  ``torch.autograd.grad`` w.r.t. ``delta``);
* random start uniform in the L2 ball of the feasible subspace;
* ``--steps`` steps ``delta += alpha * P g / ||P g||`` then projection onto
  the ball in the subspace (``delta <- P delta``, rescaled to norm <= eps),
  ``alpha = 2.5 eps / steps`` (the library's default), one restart.

``--where=off`` (default) restricts ``delta`` to the complement of the data
subspace (``P = P_perp``, the attack that matters in the paper), ``in`` to the
subspace, ``full`` is unconstrained (no projector on either side).

JAX: ``jax.jit`` of ``attacks.pgd`` (whole attack, random start included),
compiled before timing (compile time reported separately). Reported:
examples x steps per second, median of ``--repeats`` side-by-side runs.

    python -m benchmarks.pgd --batch_sizes=512,4096 --steps=20
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hardware
from benchmarks import setting
from tsrobust import attacks
from tsrobust import data


def make_jax(problem: setting.Problem, x, eps: float, steps: int, projector):
  sp = setting.seed_slice(problem.state.params, 0)
  tp = setting.seed_slice(problem.teacher_params, 0)
  s_apply, t_apply = problem.student.apply, problem.teacher.apply

  @jax.jit
  def attack(sp, tp, x, key, projector):
    objective = attacks.oracle_objective(lambda v: s_apply(sp, v)[0],
                                         lambda v: t_apply(tp, v)[0], 'kl')
    return attacks.pgd(objective, x, key, eps=eps, alpha=2.5 * eps / steps, steps=steps,
                       norm='l2', projector=projector)

  def objective_at(delta):
    return attacks.oracle_objective(lambda v: s_apply(sp, v)[0],
                                    lambda v: t_apply(tp, v)[0], 'kl')(x + delta)

  state = {'key': jax.random.PRNGKey(1)}

  def run():
    state['key'], k = jax.random.split(state['key'])
    return jax.block_until_ready(attack(sp, tp, x, k, projector))
  run.objective = lambda delta: float(objective_at(delta).mean())
  return run


def make_torch(problem: setting.Problem, x_np, eps: float, steps: int, projector_np,
               device: str):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  seed = setting.torch_seed(problem, 0, device)
  student = seed.student.requires_grad_(False)
  teacher = seed.teacher
  x = torch.from_numpy(np.array(x_np)).to(device)
  proj = None if projector_np is None else torch.from_numpy(np.array(projector_np)).to(device)
  dim = x.shape[1] if proj is None else float(torch.trace(proj))
  alpha = 2.5 * eps / steps
  sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)

  def kl(xa):
    return F.kl_div(F.log_softmax(student(xa), -1), F.log_softmax(teacher(xa), -1),
                    reduction='none', log_target=True).sum(-1)

  def attack():
    direction = torch.randn_like(x)
    if proj is not None:
      direction = direction @ proj
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    radius = eps * torch.rand(x.shape[0], 1, device=device) ** (1.0 / max(dim, 1))
    delta = direction * radius
    for _ in range(steps):
      delta.requires_grad_(True)
      g, = torch.autograd.grad(kl(x + delta).sum(), delta)
      with torch.no_grad():
        if proj is not None:
          g = g @ proj
        delta = delta + alpha * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if proj is not None:
          delta = delta @ proj
        delta = delta * (eps / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    return delta.detach()

  def run():
    delta = attack()
    sync()
    return delta

  def objective(delta):
    with torch.no_grad():
      return float(kl(x + delta).mean())
  run.objective = objective
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_sizes', default='512,4096')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--eps', type=float, default=1.0)
  parser.add_argument('--where', default='off', choices=('off', 'in', 'full'))
  parser.add_argument('--rank', type=int, default=setting.RANK)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--inner', type=int, default=0,
                      help='attacks per timed call (0: enough for ~0.5 s of JAX work)')
  parser.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--torch_device', default=None)
  parser.add_argument('--wait_quiet', type=float, default=0,
                      help='before each batch size, wait up to this many seconds until '
                      'other processes use < 0.1 core')
  args = parser.parse_args()
  device = args.torch_device
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
  print(hardware.environment())
  print(f'torch device: {device}' if args.torch else 'torch: skipped')
  problem = setting.jax_problem(1, args.rank)
  c = problem.config
  proj = problem.projector[0]
  projector = {'in': proj, 'off': jnp.eye(c.d) - proj, 'full': None}[args.where]
  print(f'L2 PGD, oracle KL objective, {args.steps} steps, eps {args.eps}, '
        f'alpha {2.5 * args.eps / args.steps:g}, delta in: {args.where}, rank {args.rank}; '
        f'repeats {args.repeats} (median)\n', flush=True)
  rows = []
  for n in (int(b) for b in args.batch_sizes.split(',')):
    waited = hardware.wait_until_quiet(args.wait_quiet)
    load_before = hardware.load()
    meter = hardware.OtherLoad()
    x = data.sample_lowrank(jax.random.PRNGKey(2), proj, n,
                            float(problem.data_args['scale'][0]))
    jax_run = make_jax(problem, x, args.eps, args.steps, projector)
    t0 = time.perf_counter()
    jax_run()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax_run()
    once = time.perf_counter() - t0
    inner = args.inner or max(1, int(0.5 / max(once, 1e-6)))
    torch_run = None
    if args.torch:
      torch_run = make_torch(problem, np.asarray(x), args.eps, args.steps,
                             None if projector is None else np.asarray(projector), device)
      torch_run()
    t_j, t_t, out = [], [], {}
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for _ in range(inner):
        out['jax'] = jax_run()
      t_j.append((time.perf_counter() - t0) / inner)
      if torch_run:
        t0 = time.perf_counter()
        for _ in range(inner):
          out['torch'] = torch_run()
        t_t.append((time.perf_counter() - t0) / inner)
    med = lambda v: statistics.median(v) if v else float('nan')
    objective = {'jax': jax_run.objective(out['jax'])}
    if torch_run:
      objective['torch'] = torch_run.objective(out['torch'])
    rows.append(dict(n=n, jax=med(t_j), torch=med(t_t), compile=compile_s - once,
                     load=load_before, load_after=hardware.load(), others=meter.cores()))
    print(f'batch {n}: jax {t_j} | torch {t_t} (s per attack, {inner} attacks per timing) | '
          f'mean KL at x + delta: {objective} | load {load_before} -> {hardware.load()}, '
          f'waited {waited:.0f}s for quiet', flush=True)
  print(f'\nL2 PGD throughput, examples x steps per second ({args.steps} steps, '
        f'delta in {args.where}), median of {args.repeats}\n')
  print('| batch | JAX (ex*steps/s) | PyTorch (ex*steps/s) | JAX speed-up (T_torch / T_jax) '
        '| JAX ms/attack | PyTorch ms/attack | JAX compile (s) | load 1m (before -> after) '
        '| other procs (cores) |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    thr = lambda t: r['n'] * args.steps / t
    print(f'| {r["n"]} | {thr(r["jax"]):,.0f} | {thr(r["torch"]):,.0f} | '
          f'{r["torch"] / r["jax"]:.1f}x | {1e3 * r["jax"]:.2f} | {1e3 * r["torch"]:.2f} | '
          f'{r["compile"]:.1f} | {r["load"].split(",")[0]} -> '
          f'{r["load_after"].split(",")[0]} | {r["others"]:.2f} |')


if __name__ == '__main__':
  main()
