"""Two local CPU processes joined by ``jax.distributed`` run the low-rank binary.

The seeds are sharded over the devices of both processes; the results must equal a
single-process run's, and only process 0 may write files. Every process runs under a
Python audit hook (``sys.addaudithook``) that records each file it opens for writing,
renames, removes or creates under the workdir, so "process 1 wrote nothing" is observed,
not inferred from which files exist; process 0's record must hold the result files, which
shows the hook sees the binary's writes. ``checkpoints/`` is left out: orbax checkpoints
are collective (every process writes its own shards there).
"""

import json
import os
import socket
import subprocess
import sys
import time

from absl import flags
import pytest

from experiments import cli
from experiments import lowrank
from tsrobust import io
from tsrobust import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # all three runs together (cold compilation cache, 2 busy cores: ~4 min)

# As tests/test_sweep.py's SHARDED (Square off: its strict comparisons can follow another
# path on last-bit differences between batch shapes), with 2 seeds: one per process.
CONFIG = {'num_seeds': 2, 'd': 6, 'ranks': '(2,6)', 'teacher_hidden': '(3,)', 'out_dim': 3,
          'width_mult': 2, 'num_steps': 60, 'chunk_steps': 20, 'batch_size': 16,
          'num_eval': 64, 'eval_batch': 32, 'num_attack': 16, 'attack.strength': 'fast',
          'eps': '(0.5,1.0,2.0)', 'attack.square_queries': 0}

RESULT_FILES = ('config.json', 'results.csv', 'results.json', 'summary.md',
                'attack_checks.json', 'lowrank.png')

# Runs ``python -m experiments.lowrank ARGS`` with an audit hook; at exit writes the sorted
# list of paths under WORKDIR (outside WORKDIR/checkpoints) that the process wrote to OUT.
_AUDITED = r'''
import atexit, json, os, runpy, sys
out, root = sys.argv[1], os.path.realpath(sys.argv[2])
skip = os.path.join(root, 'checkpoints')
written = set()
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def record(path):
  if isinstance(path, bytes):
    path = os.fsdecode(path)
  if not isinstance(path, (str, os.PathLike)):
    return  # a file descriptor
  path = os.path.realpath(os.fspath(path))
  inside = path == root or path.startswith(root + os.sep)
  if inside and path != root and path != skip and not path.startswith(skip + os.sep):
    written.add(os.path.relpath(path, root))

def hook(event, args):
  if event == 'open' and isinstance(args[2], int) and args[2] & WRITE:
    record(args[0])
  elif event == 'os.rename':
    record(args[1])
  elif event in ('os.remove', 'os.mkdir', 'os.rmdir', 'os.truncate', 'shutil.rmtree'):
    record(args[0])

def dump():
  with open(out, 'w') as f:
    json.dump(sorted(written), f)

sys.addaudithook(hook)
atexit.register(dump)
sys.argv = ['experiments.lowrank'] + sys.argv[3:]
runpy.run_module('experiments.lowrank', run_name='__main__', alter_sys=True)
'''


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env():
  """The CPU, with no CPU device count of the user's (each run sets its own)."""
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_NUM_CPU_DEVICES', 'XLA_FLAGS')}
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _start(tmp_path, name, workdir, flags):
  """Starts one audited process; its log is ``tmp_path/name.log``, its writes ``name.json``."""
  args = [sys.executable, '-c', _AUDITED, str(tmp_path / f'{name}.json'), str(workdir),
          f'--workdir={workdir}', *flags] + [f'--config.{k}={v}' for k, v in CONFIG.items()]
  with open(tmp_path / f'{name}.log', 'w') as log:
    return subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_processes_equal_one_and_only_process_0_writes(tmp_path):
  port = _free_port()
  multi = tmp_path / 'multi'
  runs = {f'process{i}': (multi, ('--cpu_devices=1', f'--coordinator_address=localhost:{port}',
                                  '--num_processes=2', f'--process_id={i}'))
          for i in range(2)}
  runs['single'] = (tmp_path / 'single', ('--cpu_devices=1',))
  procs = {}
  try:
    for name, (workdir, args) in runs.items():
      procs[name] = _start(tmp_path, name, workdir, args)
    deadline = time.monotonic() + TIMEOUT_S
    for proc in procs.values():
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  logs = {name: (tmp_path / f'{name}.log').read_text() for name in runs}
  for name, proc in procs.items():
    assert proc.returncode == 0, f'{name}:\n{logs[name][-4000:]}'

  # Really one run over both processes: 2 global devices, one per process.
  for i in range(2):
    assert f'process {i} of 2' in logs[f'process{i}'], logs[f'process{i}'][-3000:]
    assert 'running on 2 cpu device(s)' in logs[f'process{i}'], logs[f'process{i}'][-3000:]
  assert 'running on 1 cpu device(s)' in logs['single']

  writes = {name: json.loads((tmp_path / f'{name}.json').read_text()) for name in runs}
  assert writes['process1'] == [], writes['process1']
  for name in ('process0', 'single'):
    assert set(RESULT_FILES) <= set(writes[name]), (name, writes[name])
  finished = lambda paths: {p for p in paths if not os.path.basename(p).startswith('.')}
  assert finished(writes['process0']) == finished(writes['single']), writes  # not temporaries

  multi_rows = io.read_csv(str(multi / 'results.csv'))
  single_rows = io.read_csv(str(tmp_path / 'single' / 'results.csv'))
  assert [r['seed'] for r in multi_rows] == [0, 1, 0, 1]
  assert len(multi_rows) == len(single_rows)
  for a, b in zip(single_rows, multi_rows):
    assert a.keys() == b.keys()
    for k in a:
      if a[k] is None or b[k] is None:
        assert a[k] is None and b[k] is None, k
      else:
        assert b[k] == pytest.approx(a[k], abs=1e-4), (k, a, b)


# Two processes save and restore one checkpoint: seeds sharded over both processes, a
# process-local array (as a single teacher being trained: orbax refuses those as they are in
# multi-process runs) and a numpy array; every value and placement must come back.
_CHECKPOINT = r'''
import sys
import jax
import jax.numpy as jnp
import numpy as np
folder, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
jax.distributed.initialize(f'localhost:{port}', 2, pid)
from tsrobust import sweep
mesh = sweep.seed_mesh()
n = mesh.devices.size
assert n == 2 and jax.process_count() == 2
tree = {'sharded': sweep.shard_seeds(jnp.arange(2.0 * n).reshape(n, 2), mesh),
        'local': jnp.arange(4.0)[None] + 1, 'host': np.ones((1, 2), np.float32)}
ck = sweep.Checkpointer(folder)
ck.save(5, tree)
ck.close()
ck = sweep.Checkpointer(folder)  # as a rerun would
step, back = ck.restore(tree)
ck.close()
assert step == 5
assert back['local'].is_fully_addressable and back['local'].sharding == tree['local'].sharding
assert not back['sharded'].is_fully_addressable
assert back['sharded'].sharding.is_equivalent_to(tree['sharded'].sharding, 2)
got, want = sweep.to_host(back), sweep.to_host(tree)
for k in want:
  np.testing.assert_array_equal(got[k], want[k], err_msg=k)
print('restored', pid)
'''


@pytest.mark.slow
def test_checkpoints_save_and_restore_across_two_processes(tmp_path):
  port = _free_port()
  env = _env() | {'JAX_NUM_CPU_DEVICES': '1'}
  procs = [subprocess.Popen([sys.executable, '-c', _CHECKPOINT, str(tmp_path / 'ckpt'), str(port),
                             str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, (proc, out) in enumerate(zip(procs, outs)):
    assert proc.returncode == 0 and f'restored {i}' in out, out[-3000:]


def _never(config, workdir):
  raise AssertionError(f'train_and_evaluate ran: {workdir}')


@pytest.mark.parametrize('args, message', [
    (['--num_processes=2'], '--num_processes and --process_id need --coordinator_address'),
    (['--process_id=1'], '--num_processes and --process_id need --coordinator_address'),
    (['--coordinator_address=localhost', '--num_processes=2'],
     "--coordinator_address must be host:port, got 'localhost'"),
    (['--coordinator_address=localhost:1', '--num_processes=2', '--process_id=2'],
     '--process_id must be in [0, 2) (--num_processes), got 2'),
])
def test_distributed_flag_mistakes_end_in_one_line(tmp_path, capfd, args, message):
  """Refused before joining anything (no coordinator is contacted), as other user mistakes."""
  capfd.readouterr()
  with pytest.raises(SystemExit) as info:
    cli.run_binary(lowrank.validate_config, _never, lowrank._DEFAULT_CONFIG,
                   ('results.csv',), argv=['prog', f'--workdir={tmp_path}', *args],
                   flag_values=flags.FlagValues())
  err = capfd.readouterr().err
  assert info.value.code == cli.USAGE_EXIT_CODE, err
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {message}'), err


@pytest.mark.parametrize('args, expected', [
    ([], None),                                                        # one process: per core
    (['--coordinator_address=localhost:1234', '--num_processes=2'], 'half'),
    (['--coordinator_address=127.0.0.1:1234', '--num_processes=2'], 'half'),
    (['--coordinator_address=[::1]:1234', '--num_processes=2'], 'half'),
    (['--coordinator_address=node0.cluster:1234', '--num_processes=2'], None),  # a machine each
    (['--coordinator_address=10.0.0.1:1234', '--num_processes=2'], None),
])
def test_processes_on_this_machine_share_its_cores(args, expected):
  values = flags.FlagValues()
  cli.define_distributed_flags(values)
  values(['prog', *args])
  want = None if expected is None else max(1, sweep.cpu_cores() // 2)
  assert cli.cpu_devices_per_process(values) == want
