r"""Where the main job's evaluation time goes: the attack ensemble of one rank taken apart.

Builds the default low-rank experiment (``benchmarks/setting.py``'s ``LowRankJob``, the
defaults of ``experiments/configs/lowrank.py``: ``d = 40``, 8 students, the ``standard``
ensemble, 512 attacked points, L2 budgets 0.5 / 1 / 2) at ``--rank`` and runs
``LowRankEvaluator.evaluate`` as ``python -m experiments.lowrank`` does, on the students
at initialization (every attack runs a fixed number of iterations, so the cost does not
depend on how well they are trained). Prints

* the first evaluation's wall time (tracing, lowering and compiling - or
  loading from the persistent compilation cache, ``--compilation_cache``);
* per attack and label kind, the seconds of its calls (3 subspaces x 3
  budgets), median of ``--repeats`` evaluations, and the whole evaluation;
* two micro-benchmarks of what made the ensemble slow on XLA:CPU (each a
  jitted 100-step ``lax.scan``, us per step): the teacher's top-2 gap with
  ``lax.top_k`` against ``attacks.top_values``, and ``attacks.project`` on
  ``[N, 1, D, 1]`` (a trailing axis of 1, Square's search layout for
  vectors until 2026-11-26) against ``[N, 1, 1, D]`` (channels-first); and
  Square's cost per query with a trivial objective (its own search: windows,
  patterns, norms, acceptance) and with a student's margin, against the margin
  alone.

At an older commit, run that commit's version of this script (``--micro=false`` where
``attacks.top_values`` does not exist yet).

    python -m benchmarks.profile_eval [--rank=10] [--repeats=3] [--micro=true]
"""

import argparse
import collections
import statistics
import time

from benchmarks import hardware


def _scan_time(fn, arg, steps: int = 100, repeats: int = 5) -> float:
  """us per step of ``fn`` inside a jitted ``lax.scan`` (a carry keeps it from being hoisted)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def loop(a):
    def body(c, _):
      return c + 0.0 * fn(a + c).sum(), None
    return jax.lax.scan(body, jnp.float32(0), None, length=steps)[0]
  f = jax.jit(loop)
  jax.block_until_ready(f(arg))
  return 1e6 * hardware.median_time(lambda: jax.block_until_ready(f(arg)), repeats) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rank', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--cpu_devices', type=int, default=0, help='0: one per core')
  parser.add_argument('--compilation_cache', default='', help="'' (default): off")
  parser.add_argument('--micro', default='true', choices=('true', 'false'))
  parser.add_argument('--unrolled_threefry', action=argparse.BooleanOptionalAction,
                      default=True,
                      help='unrolled threefry on CPU, as the binaries (--unrolled_threefry)')
  args = parser.parse_args()
  from tsrobust import sweep  # pylint: disable=g-import-not-at-top
  sweep.use_all_cpu_cores(args.cpu_devices or None)
  sweep.use_compilation_cache(args.compilation_cache)
  if args.unrolled_threefry:
    sweep.use_unrolled_threefry_on_cpu()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import setting  # pylint: disable=g-import-not-at-top
  from tsrobust import attacks  # pylint: disable=g-import-not-at-top
  from tsrobust import evaluate  # pylint: disable=g-import-not-at-top
  from tsrobust import square as square_lib  # pylint: disable=g-import-not-at-top
  print(hardware.environment())
  meter = hardware.OtherLoad()

  config = setting.LowRankJob()  # the main job's default config
  run = setting.build(config)
  problem, ev = run.problem, run.evaluator
  s = setting.num_padded_seeds(config)
  data_args, held, _ = setting.rank_inputs(config, run, args.rank)
  projector = data_args['projector']
  full_rank = args.rank == config.d

  times = collections.defaultdict(list)
  current = collections.defaultdict(float)
  make_fn = ev.attacks._fn  # pylint: disable=protected-access

  def timed_fn(attack, label, subspace, shared):
    fn = make_fn(attack, label, subspace, shared)

    def call(*a):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*a))
      current[(attack, label)] += time.perf_counter() - t0
      return out
    return call
  ev.attacks._fn = timed_fn  # pylint: disable=protected-access

  def evaluate_once():
    current.clear()
    t0 = time.perf_counter()
    ev.evaluate(problem.student_params, problem.teacher_params, projector, held,
                full_rank=full_rank)
    return time.perf_counter() - t0

  first = evaluate_once()
  totals = []
  for _ in range(args.repeats):
    totals.append(evaluate_once())
    for k, v in current.items():
      times[k].append(v)
  print(f'rank {args.rank}, {s} students x {config.num_attack} points, budgets {config.eps}; '
        f'first evaluation (trace + compile or cache) {first:.2f} s; medians of '
        f'{args.repeats}; other processes {meter.cores():.2f} cores\n')
  print('| attack | label | s (3 subspaces x 3 budgets) |\n|---|---|---|')
  for (attack, label), v in sorted(times.items(), key=lambda kv: -statistics.median(kv[1])):
    print(f'| {attack} | {label} | {statistics.median(v):.2f} |')
  print(f'| all | | **{statistics.median(totals):.2f}** (whole evaluation, with '
        f'specialization) |\n', flush=True)

  if args.micro == 'true':
    n = s * config.num_attack // jax.device_count()  # one device's share
    logits = jax.random.normal(jax.random.PRNGKey(0), (n, config.out_dim))
    top_k = _scan_time(lambda t: -jnp.diff(jax.lax.top_k(t, 2)[0], axis=-1)[:, 0], logits)
    top_v = _scan_time(evaluate.teacher_gap, logits)  # the library's: attacks.top_values
    v = jax.random.normal(jax.random.PRNGKey(1), (n, config.d))
    minor1 = _scan_time(lambda z: attacks.project(z, 1.0, 'l2'), v.reshape(n, 1, config.d, 1))
    minor_d = _scan_time(lambda z: attacks.project(z, 1.0, 'l2'), v.reshape(n, 1, 1, config.d))
    print(f'| micro-benchmark ({n} examples, one device) | us / step | ratio |\n|---|---|---|')
    print(f'| top-2 gap, `lax.top_k` | {top_k:.1f} | {top_k / top_v:.1f}x |')
    print(f'| top-2 gap, `evaluate.teacher_gap` (`attacks.top_values`) | {top_v:.1f} | 1 |')
    print(f'| L2 `project`, `[N, 1, D, 1]` | {minor1:.1f} | {minor1 / minor_d:.1f}x |')
    print(f'| L2 `project`, `[N, 1, 1, D]` | {minor_d:.1f} | 1 |')
    # Square's own search (windows, patterns, norms, acceptance) against its objective: one
    # student's margin on the same n examples, us per query.
    params = jax.tree_util.tree_map(lambda a: a[0], problem.student_params)
    margin = attacks.margin_objective(lambda xa: problem.student.apply(params, xa)[0],
                                      jnp.zeros((n,), jnp.int32))
    queries, key = 100, jax.random.PRNGKey(2)

    def per_query(objective):
      f = jax.jit(lambda z: square_lib.square(objective, z, key, eps=1.0, queries=queries,
                                              norm='l2'))
      jax.block_until_ready(f(v))
      return 1e6 * hardware.median_time(lambda: jax.block_until_ready(f(v)), 3) / queries
    search = per_query(lambda xa: xa[:, 0])
    full = per_query(margin)
    alone = _scan_time(margin, v)
    print(f'| Square L2, per query, trivial objective `x[:, 0]` (the search) | {search:.1f} | '
          f'{search / alone:.1f}x |')
    print(f"| Square L2, per query, a student's margin | {full:.1f} | {full / alone:.1f}x |")
    print(f"| the student's margin alone | {alone:.1f} | 1 |")


if __name__ == '__main__':
  main()
