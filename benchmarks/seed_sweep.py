r"""Seed sweeps: S students of the default low-rank setting, three ways, side by side.

(a) ``vmap``: tsrobust's trainer ``train.train_seeds`` (``jit(vmap(lax.scan
    chunk))`` over a leading seeds axis, with its per-chunk finite check);
(b) ``seq-jax``: a Python loop over seeds of the same single-seed chunk,
    ``jax.jit(train.make_chunk_fn(...))``, compiled once and called per seed;
(c) ``seq-torch``: the sequential PyTorch loop a PyTorch user would write: one
    student after another, ``torch.optim.SGD(momentum=0.9)``, ``F.mse_loss``,
    ``zero_grad / backward / step`` every step, inputs ``s * randn(B, d) @ P``
    drawn on the fly, no per-step host syncs (the JAX side has none either).

All three train the same students (the PyTorch students, teachers and
projectors are copies of the JAX ones) for the same steps, batch, widths
and optimizer (``benchmarks/setting.py``).

Timing. Every repeat runs (a), (b), (c) back to back ("side by side"), so a
change in machine load hits all three; each reported time is the median over
``--repeats``. Compilation is excluded from the JAX timings: every function is
compiled and run once before timing, and JAX's own compile events
(tracing, lowering, XLA compile) are recorded during every timed call; if
any happen there (e.g. a ``train_seeds`` without a compile cache), their
duration is subtracted and the row is flagged. Compile time is reported
separately. Sequential loops over more than ``--max_seq_seeds`` seeds time
only the first ``--max_seq_seeds`` seeds and extrapolate linearly (marked
``~``, "extrapolated from k seeds").

FLOP/s: the vmapped sweep's matmul FLOPs (``setting.flops_per_student_step``:
data ``2Bd^2`` + teacher forward + student forward and backward) per second,
as a fraction of a large float32 ``jnp.dot``'s FLOP/s on the same device
(``benchmarks/hardware.py``).

    python -m benchmarks.seed_sweep --seeds=1,8,32,128,512 --steps=2000
"""

import argparse
import copy
import os
import statistics
import time

import jax
import numpy as np

from benchmarks import hardware
from benchmarks import setting
from tsrobust import train

_COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration',
                   '/jax/core/compile/backend_compile_duration')


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
  c0 = CLOCK.total
  t0 = time.perf_counter()
  out = fn()
  wall = time.perf_counter() - t0
  return wall, CLOCK.total - c0, out


# ----------------------------------------------------------------------------
# The three trainers. Each ``make_*`` does the untimed preparation and
# returns ``run()`` that trains, blocks until done and returns the final students.
# ----------------------------------------------------------------------------


def make_vmap(problem: setting.Problem, steps: int, chunk_steps: int):
  p = problem

  def run():
    state, losses = train.train_seeds(p.loss_fn, p.optimizer, p.state, p.teacher_params,
                                      p.data_args, p.keys, num_steps=steps,
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


def make_torch(problem: setting.Problem, num_seeds: int, steps: int, device: str):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  c = problem.config
  seeds = [setting.torch_seed(problem, i, device) for i in range(num_seeds)]
  sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)

  def train_one(seed, student, steps=steps):
    opt = torch.optim.SGD(student.parameters(), lr=c.learning_rate, momentum=c.momentum)
    for _ in range(steps):
      x = seed.scale * (torch.randn(c.batch_size, c.d, device=device) @ seed.projector)
      with torch.no_grad():
        target = seed.teacher(x)
      loss = F.mse_loss(student(x), target)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()

  def run_on(students):
    for s, st in zip(seeds, students):
      train_one(s, st)
    sync()
    return students

  def run():
    return run_on(run.fresh.pop())
  # Fresh copies of the initial students, made outside the timed region.
  run.fresh = []
  run.prepare = lambda k: run.fresh.extend(
      [[copy.deepcopy(s.student) for s in seeds] for _ in range(k)])
  run.warmup = lambda: (train_one(seeds[0], copy.deepcopy(seeds[0].student), 100), sync())
  return run


def heldout_mse(problem: setting.Problem, k: int, trained: dict, device: str,
                n: int = 4096) -> dict:
  """Mean over seeds ``0 .. k-1`` of the students' MSE to the teacher on ``n`` fresh points.

  A check that the three trainers train the same thing (computed after timing).
  ``trained`` maps a name to batched Flax params (``vmap``), a list of Flax
  params (``seq-jax``) or a list of torch students (``torch``).
  """
  rng = np.random.default_rng(12345)
  out = {}
  for i in range(k):
    proj = np.asarray(problem.projector[i])
    x = (float(problem.data_args['scale'][i]) * rng.standard_normal((n, proj.shape[0]))
         @ proj).astype(np.float32)
    t = np.asarray(problem.teacher.apply(setting.seed_slice(problem.teacher_params, i), x)[0])
    preds = {'init': problem.student.apply(setting.seed_slice(problem.state.params, i), x)[0]}
    for name, value in trained.items():
      if name == 'vmap':
        preds[name] = problem.student.apply(setting.seed_slice(value, i), x)[0]
      elif name == 'seq-jax':
        preds[name] = problem.student.apply(value[i], x)[0]
      else:
        import torch  # pylint: disable=g-import-not-at-top
        with torch.no_grad():
          preds[name] = value[i](torch.from_numpy(x).to(device)).cpu().numpy()
    for name, pred in preds.items():
      out.setdefault(name, []).append(float(np.mean((np.asarray(pred) - t) ** 2)))
  return {name: f'{np.mean(v):.2e}' for name, v in out.items()}


# ----------------------------------------------------------------------------


def fmt_t(t: float, extrapolated_from: int = 0) -> str:
  if t != t:  # nan
    return '-'
  return f'{t:.2f}' + (f' ~{extrapolated_from}' if extrapolated_from else '')


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
                      help='run the PyTorch loop (needs requirements-bench.txt)')
  parser.add_argument('--torch_device', default=None,
                      help='default: cuda if available, else cpu')
  parser.add_argument('--seq_jax', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--matmul_n', type=int, default=2048)
  parser.add_argument('--wait_quiet', type=float, default=0,
                      help='before each S, wait up to this many seconds until other '
                      'processes use < 0.1 core')
  args = parser.parse_args()
  global CLOCK
  CLOCK = CompileClock()
  seeds = [int(s) for s in args.seeds.split(',')]
  device = args.torch_device
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
  print(hardware.environment())
  print(f'torch device: {device}' if args.torch else 'torch: skipped')
  peak = hardware.matmul_flops(args.matmul_n)
  print(f'float32 jnp.dot {args.matmul_n}x{args.matmul_n}: {peak / 1e9:.1f} GFLOP/s')
  flops = setting.flops_per_student_step(setting.config(1, args.rank))
  print(f'matmul FLOPs per student-step: {flops}')
  print(f'steps {args.steps}, chunk_steps {args.chunk_steps}, rank {args.rank}, '
        f'repeats {args.repeats} (median)\n', flush=True)

  rows = []
  for s in seeds:
    waited = hardware.wait_until_quiet(args.wait_quiet)
    load_before = hardware.load()
    meter = hardware.OtherLoad()
    problem = setting.jax_problem(s, args.rank)
    k = min(s, args.max_seq_seeds)
    # Warm-up: compile (a) and (b), one call of each; torch's first call too.
    vmap_run = make_vmap(problem, args.steps, args.chunk_steps)
    wall, compile_v, _ = timed(vmap_run)
    seq_run = make_seq_jax(problem, k, args.steps, args.chunk_steps) if args.seq_jax else None
    compile_j = timed(seq_run.warmup)[1] if seq_run else float('nan')
    torch_run = make_torch(problem, k, args.steps, device) if args.torch else None
    if torch_run:
      torch_run.prepare(args.repeats)
      torch_run.warmup()
    t_v, t_j, t_t, others, note = [], [], [], [], ''
    final = {}
    for _ in range(args.repeats):
      rep_meter = hardware.OtherLoad()
      wall, comp, final['vmap'] = timed(vmap_run)
      if comp > 0:
        note = f'(a) recompiled in timed calls ({comp:.1f}s, subtracted)'
      t_v.append(wall - comp)
      if seq_run:
        wall, comp, final['seq-jax'] = timed(seq_run)
        t_j.append((wall - comp) * s / k)
      if torch_run:
        wall, _, final['torch'] = timed(torch_run)
        t_t.append(wall * s / k)
      others.append(rep_meter.cores())
    med = lambda v: statistics.median(v) if v else float('nan')
    row = dict(S=s, k=k if k < s else 0, vmap=med(t_v), seq=med(t_j), torch=med(t_t),
               compile_v=compile_v, compile_j=compile_j,
               ratios_t=[b / a for a, b in zip(t_v, t_t)], load=load_before,
               load_after=hardware.load(), others=meter.cores())
    rows.append(row)
    check = heldout_mse(problem, k, final, device)
    print(f'S={s}: vmap {t_v} (compile {compile_v:.1f}s) | seq-jax {t_j} (compile '
          f'{compile_j:.1f}s) | torch {t_t}' + (f' [seq: {k} seeds timed, scaled x{s / k:g}]'
                                                if k < s else '')
          + f' | held-out MSE, seeds 0-{k - 1}: {check} | load {row["load"]} -> '
          f'{row["load_after"]}, other processes (cores) per repeat '
          f'{[round(o, 2) for o in others]}, waited {waited:.0f}s for quiet {note}',
          flush=True)

  t1 = next((r['vmap'] for r in rows if r['S'] == 1), float('nan'))
  print(f'\nSeed sweep, {args.steps} steps per student, batch {problem.config.batch_size}; '
        f'times in seconds (median of {args.repeats}); "~k" = sequential loop extrapolated '
        f'linearly from k seeds; FLOP/s of the vmapped trainer vs jnp.dot '
        f'{args.matmul_n}^2 ({peak / 1e9:.1f} GFLOP/s)\n')
  print('| S | T_vmap | T_seq_jax | T_torch | torch / vmap | seq_jax / vmap | '
        'T_vmap(S) / T_vmap(1) | compile vmap | compile seq | GFLOP/s (vmap) | % of matmul '
        '| load 1m (before -> after) | other procs (cores) |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    achieved = r['S'] * args.steps * flops['exact'] / r['vmap']
    ratio_range = (f' ({min(r["ratios_t"]):.1f}-{max(r["ratios_t"]):.1f})'
                   if r['ratios_t'] else '')
    print(f'| {r["S"]} | {r["vmap"]:.3f} | {fmt_t(r["seq"], r["k"])} | '
          f'{fmt_t(r["torch"], r["k"])} | {r["torch"] / r["vmap"]:.1f}x{ratio_range} | '
          f'{r["seq"] / r["vmap"]:.1f}x | {r["vmap"] / t1:.2f} | {r["compile_v"]:.1f} | '
          f'{r["compile_j"]:.1f} | {achieved / 1e9:.2f} | {100 * achieved / peak:.2f}% | '
          f'{r["load"].split(",")[0]} -> {r["load_after"].split(",")[0]} | '
          f'{r["others"]:.2f} |')
  print(f'\ntorch / vmap: ratio of medians (min-max of the per-repeat ratios). other procs: '
        f'cores kept busy by other processes during the row (of {os.cpu_count()}). '
        f'load at end: {hardware.load()}')


if __name__ == '__main__':
  main()
