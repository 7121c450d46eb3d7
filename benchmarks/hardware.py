r"""What this machine can do: a large float32 matmul's FLOP/s, and the environment.

The seed sweep (``benchmarks/seed_sweep.py``) divides its achieved matmul
FLOP/s by the number measured here (``jnp.dot`` of two ``n x n`` float32
matrices, ``2 n^3`` FLOPs, compiled once, median of ``--repeats`` timed
calls, each ``block_until_ready``).

    python -m benchmarks.hardware [--sizes=1024,2048,4096] [--repeats=5]
"""

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import jaxlib

from tsrobust import io


def median_time(fn, repeats: int) -> float:
  """Median wall time of ``fn()`` over ``repeats`` calls (``fn`` must block)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of ``jnp.dot`` of two ``[n, n]`` float32 matrices (default precision)."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))  # compile
  jax.block_until_ready(f(a, b))  # warm
  t = median_time(lambda: jax.block_until_ready(f(a, b)), repeats)
  return 2 * n ** 3 / t


def torch_matmul_flops(n: int = 2048, repeats: int = 5, device: str = 'cpu') -> float:
  """The same for ``torch.mm`` (for reference)."""
  import torch  # pylint: disable=g-import-not-at-top
  a = torch.randn(n, n, device=device)
  b = torch.randn(n, n, device=device)

  def run():
    torch.mm(a, b)
    if device.startswith('cuda'):
      torch.cuda.synchronize()
  run()
  run()
  t = median_time(run, repeats)
  return 2 * n ** 3 / t


def load() -> str:
  """1/5/15-minute load averages, as ``uptime`` prints them."""
  try:
    return '%.2f, %.2f, %.2f' % os.getloadavg()
  except OSError:
    return 'unknown'


def _busy_cpu_seconds() -> float:
  """CPU seconds spent by all processes since boot (user, nice, system, irq, softirq)."""
  with open('/proc/stat') as f:
    fields = [int(v) for v in f.readline().split()[1:8]]
  user, nice, system, _, _, irq, softirq = fields
  return (user + nice + system + irq + softirq) / os.sysconf('SC_CLK_TCK')


def _children_cpu_seconds() -> float:
  """User + system CPU seconds of this process's children that have been waited for."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


class OtherLoad:
  """How many cores *other* processes kept busy since creation (Linux ``/proc/stat``).

  ``cores()`` = (CPU seconds of every process - this process's own and its finished
  children's, e.g. jobs run with ``subprocess.run``) / wall seconds: 0 on an otherwise
  idle machine, ``nproc`` when something else saturates it. Returns nan where
  ``/proc/stat`` is missing.
  """

  def __init__(self):
    self.t0 = time.perf_counter()
    self.own0 = time.process_time() + _children_cpu_seconds()
    try:
      self.busy0 = _busy_cpu_seconds()
    except (OSError, ValueError):
      self.busy0 = None

  def cores(self) -> float:
    if self.busy0 is None:
      return float('nan')
    wall = time.perf_counter() - self.t0
    own = time.process_time() + _children_cpu_seconds() - self.own0
    others = (_busy_cpu_seconds() - self.busy0) - own
    return max(others, 0.0) / max(wall, 1e-9)


def wait_until_quiet(max_wait: float, threshold: float = 0.1, window: float = 3.0) -> float:
  """Waits (up to ``max_wait`` s) until other processes use < ``threshold`` cores
  over ``window`` seconds; returns the seconds waited (0 when ``max_wait`` is 0)."""
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < max_wait:
    meter = OtherLoad()
    time.sleep(window)
    if not meter.cores() >= threshold:  # also stops on nan (no /proc/stat)
      break
  return time.perf_counter() - t0


def environment() -> str:
  """One block of text: date, machine, versions, devices, load."""
  lines = [f'date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}',
           f'machine: nproc={os.cpu_count()}, cpu: {io.cpu_model()}',
           f'python {platform.python_version()}, jax {jax.__version__}, '
           f'jaxlib {jaxlib.__version__}']
  try:
    import torch  # pylint: disable=g-import-not-at-top
    lines[-1] += f', torch {torch.__version__} (threads {torch.get_num_threads()})'
    if torch.cuda.is_available():
      lines.append(f'torch device: {torch.cuda.get_device_name(0)}')
  except ImportError:
    lines[-1] += ', torch not installed'
  lines.append(f'jax devices: {jax.devices()}')
  try:
    up = subprocess.run(['uptime'], capture_output=True, text=True, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    up = f'load average: {load()}'
  lines.append(f'uptime: {up}')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='1024,2048,4096')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True,
                      help='also time torch.mm')
  args = parser.parse_args()
  print(environment())
  print('\n| n | jnp.dot GFLOP/s | torch.mm GFLOP/s |\n|---|---|---|')
  device = 'cpu'
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
  for n in (int(s) for s in args.sizes.split(',')):
    j = matmul_flops(n, args.repeats) / 1e9
    t = torch_matmul_flops(n, args.repeats, device) / 1e9 if args.torch else float('nan')
    print(f'| {n} | {j:.1f} | {t:.1f} |', flush=True)
  print(f'\nload after: {load()}')


if __name__ == '__main__':
  main()
