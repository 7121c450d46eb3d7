r"""The main job's floor: its device work alone, beside the whole job in the same minutes.

``python -m experiments.lowrank`` (defaults) trains 8 students for 20,000 steps at each
of the ranks 5, 10, 20, 40 and evaluates them (specialization and the ``standard``
attack ensemble). This script builds the same problem from the library
(``benchmarks/setting.py``: ``LowRankJob``, ``build``) and, with every program already
compiled and nothing else in the way (no per-chunk check, checkpoint or log, no
background compilation, no tracing, no plot), times per rank

* the set-up: the held-out data and the initial optimizer state;
* the training: the library's jitted chunk (``train._batched_chunk``, the executable
  ``train.train_seeds`` runs) called ``num_steps / chunk_steps`` times back to back,
  waited for once at the end;
* the evaluation: ``LowRankEvaluator.evaluate``, as the binary calls it.

Their sum is what the main job would take if everything but the computation cost
nothing: a floor for the job's wall time on this machine with this code. With
``--main_job_runs=N`` the whole job (``python -m experiments.lowrank --workdir=<temp>``,
warm compilation cache) runs N times in a subprocess, alternated with the floor's
repeats, so the two are compared within the same minutes (the machine's speed drifts by
up to ~30% over a day; ``benchmarks/RESULTS.md``).

    python -m benchmarks.main_job_floor [--repeats=3] [--main_job_runs=3]
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from benchmarks import hardware

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def main_job(python: str, workdir: Optional[str] = None, flags: Sequence[str] = ()) -> tuple:
  """``(wall s, user CPU s)`` of ``python -m experiments.lowrank --workdir=WORKDIR FLAGS``.

  ``workdir`` None: a temporary folder, removed afterwards. Raises RuntimeError with the
  end of the job's log when it fails.
  """
  if workdir is None:
    with tempfile.TemporaryDirectory() as tmp:
      return main_job(python, tmp, flags)
  workdir = os.path.abspath(workdir)  # the job runs in the repository root
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  done = subprocess.run([python, '-m', 'experiments.lowrank', f'--workdir={workdir}', *flags],
                        cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wall = time.perf_counter() - t0
  if done.returncode:
    raise RuntimeError(f'the main job with {list(flags)} failed (exit {done.returncode}):\n'
                       + '\n'.join(done.stderr.splitlines()[-20:]))
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return wall, after.ru_utime - before.ru_utime


def rank_runner(job):
  """``one_rank(r) -> ((set-up s, training s, evaluation s), rows)`` for ``job``.

  ``job``: a ``setting.LowRankJob`` (a config's: ``tests/test_benchmarks_defaults.job_of``).
  ``rows``: ``LowRankEvaluator.evaluate``'s per-student metrics (padded
  seeds included), which ``python -m experiments.lowrank`` reports for the same config
  (tested: ``tests/test_benchmarks_floor.py``). Call after the backend is set up.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import setting  # pylint: disable=g-import-not-at-top
  from tsrobust import train  # pylint: disable=g-import-not-at-top
  num_chunks = job.num_steps // job.chunk_steps
  if num_chunks * job.chunk_steps != job.num_steps or job.num_train:
    raise ValueError(f'the floor needs config.num_steps a multiple of config.chunk_steps and '
                     f'config.num_train = 0 (fresh data every step), got {job.num_steps}, '
                     f'{job.chunk_steps}, {job.num_train}')
  run = setting.build(job)
  # The executable train.train_seeds runs (one per loss, optimizer and chunk length).
  chunk = train._batched_chunk(  # pylint: disable=protected-access
      run.loss_fn, run.optimizer, job.chunk_steps)
  teacher_params, train_keys = run.evaluator.shard((run.problem.teacher_params, run.keys.train))

  def one_rank(r):
    t0 = time.perf_counter()
    data_args, held, state = setting.rank_inputs(job, run, r)
    state, data_args = jax.block_until_ready(run.evaluator.shard((state, data_args)))
    t1 = time.perf_counter()
    for _ in range(num_chunks):
      state, _ = chunk(state, teacher_params, data_args, train_keys)
    jax.block_until_ready(state)
    t2 = time.perf_counter()
    rows, _ = run.evaluator.evaluate(state.params, run.problem.teacher_params,
                                     data_args['projector'], held, full_rank=r == job.d)
    return (t1 - t0, t2 - t1, time.perf_counter() - t2), rows
  return one_rank


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3, help='timed passes over all ranks')
  parser.add_argument('--main_job_runs', type=int, default=0,
                      help='whole main jobs, alternated with the repeats (at most --repeats)')
  parser.add_argument('--compilation_cache', default=None,
                      help="as the binaries' flag (default: the binaries' cache folder)")
  args = parser.parse_args()
  if args.repeats < 1 or not 0 <= args.main_job_runs <= args.repeats:
    parser.error('need --repeats >= 1 and 0 <= --main_job_runs <= --repeats')
  from tsrobust import sweep  # pylint: disable=g-import-not-at-top
  sweep.use_all_cpu_cores()  # as the binaries: one CPU device per core
  sweep.use_compilation_cache(args.compilation_cache)
  sweep.use_unrolled_threefry_on_cpu()
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import setting  # pylint: disable=g-import-not-at-top
  print(hardware.environment())

  config = setting.LowRankJob()  # the main job's default config
  one_rank = rank_runner(config)

  t0 = time.perf_counter()
  for r in config.ranks:  # compiles (or loads) every program, runs each once
    one_rank(r)
  print(f'warm-up (compile or load every program, run everything once): '
        f'{time.perf_counter() - t0:.1f} s\n')

  passes, jobs, others = [], [], []
  for i in range(args.repeats):
    meter = hardware.OtherLoad()  # during the pass only (the main job runs outside them)
    passes.append({r: one_rank(r)[0] for r in config.ranks})
    others.append(meter.cores())
    total = sum(sum(v) for v in passes[-1].values())
    line = f'pass {i + 1}: floor {total:.1f} s'
    if i < args.main_job_runs:
      jobs.append(main_job(sys.executable))
      line += f'; main job {jobs[-1][0]:.1f} s wall, {jobs[-1][1]:.1f} s user CPU'
    print(line, flush=True)

  def med(r, j):
    return statistics.median(p[r][j] for p in passes)
  print(f'\n{setting.num_padded_seeds(config)} students, {config.num_steps} steps in chunks of '
        f'{config.chunk_steps}, ranks {config.ranks}; seconds, medians of {args.repeats} passes; '
        f'other processes {min(others):.2f}-{max(others):.2f} cores during the passes; '
        f'{jax.device_count()} {jax.devices()[0].platform} devices\n')
  print('| rank | set-up | training | us / step | evaluation | sum |\n|---|---|---|---|---|---|')
  for r in config.ranks:
    print(f'| {r} | {med(r, 0):.2f} | {med(r, 1):.2f} | '
          f'{1e6 * med(r, 1) / config.num_steps:.0f} | {med(r, 2):.2f} | '
          f'{sum(med(r, j) for j in range(3)):.2f} |')
  parts = [sum(med(r, j) for r in config.ranks) for j in range(3)]
  floors = [sum(sum(v) for v in p.values()) for p in passes]
  print(f'| all | {parts[0]:.2f} | {parts[1]:.2f} | | {parts[2]:.2f} | '
        f'**{statistics.median(floors):.1f}** (median of the passes\' sums; '
        f'{min(floors):.1f}-{max(floors):.1f}) |')
  if jobs:
    walls = [w for w, _ in jobs]
    print(f'\nmain job (python -m experiments.lowrank, defaults, warm cache), alternated with '
          f'the passes: {" / ".join(f"{w:.1f}" for w in walls)} s wall (median '
          f'{statistics.median(walls):.1f}), user CPU '
          f'{" / ".join(f"{u:.1f}" for _, u in jobs)} s; median job / median floor '
          f'{statistics.median(walls) / statistics.median(floors):.2f}')
  print(f'\nreference: jnp.dot 2048^2 float32 {hardware.matmul_flops(2048, 5) / 1e9:.1f} GFLOP/s;'
        f' {hardware.load()}')


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  main()
