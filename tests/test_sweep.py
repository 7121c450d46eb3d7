"""Sharded seeds, every CPU core, resumable runs, progress reporting and config validation."""

import io as _io
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import cli
from experiments import lowrank
from experiments import real
from experiments import robustness
from experiments import validation
from experiments.configs import lowrank as lowrank_config
from experiments.configs import real as real_config
from experiments.configs import robustness as robustness_config
from tsrobust import io
from tsrobust import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(num_seeds=3, d=6, ranks=(2, 6), teacher_hidden=(3,), out_dim=3, width_mult=2,
            num_steps=60, chunk_steps=20, batch_size=16, num_eval=64, eval_batch=32,
            num_attack=16, attack=dict(strength='fast'), eps=(0.5, 1.0, 2.0))


def _flags(overrides, prefix=''):
  out = []
  for k, v in overrides.items():
    if isinstance(v, dict):  # a section: --config.attack.strength=fast
      out += _flags(v, f'{prefix}{k}.')
    else:
      out.append(f'--config.{prefix}{k}={v}')
  return out


def _child_env(env=None):
  """``os.environ`` on the CPU with no CPU device count of the user's, then ``env``.

  Children then take the default path of ``sweep.use_all_cpu_cores``
  whatever this session's environment sets.
  """
  full_env = {k: v for k, v in os.environ.items() if k != 'JAX_NUM_CPU_DEVICES'}
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                     full_env.pop('XLA_FLAGS', '')).strip()
  if xla_flags:
    full_env['XLA_FLAGS'] = xla_flags
  full_env['JAX_PLATFORMS'] = 'cpu'
  full_env.update(env or {})
  return full_env


def _binary_args(workdir, overrides, flags=()):
  return ([sys.executable, '-m', 'experiments.lowrank', f'--workdir={workdir}', *flags]
          + _flags(overrides))


def _run_binary(workdir, overrides, env=None, wait=True, flags=()):
  args = _binary_args(workdir, overrides, flags)
  full_env = _child_env(env)
  if not wait:
    return subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  done = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _assert_same_results(csv_a, csv_b, atol):
  a, b = io.read_csv(csv_a), io.read_csv(csv_b)
  assert len(a) == len(b) and a
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      if ra[k] is None or rb[k] is None:
        assert ra[k] is None and rb[k] is None, k
      else:
        np.testing.assert_allclose(ra[k], rb[k], atol=atol, err_msg=k)


def test_padded_size_and_sharding():
  mesh = sweep.seed_mesh()
  n = mesh.devices.size
  assert sweep.padded_size(1, mesh) == n
  assert sweep.padded_size(n + 1, mesh) == 2 * n
  tree = {'a': jnp.arange(2 * n * 3).reshape(2 * n, 3)}
  sharded = sweep.shard_seeds(tree, mesh)
  np.testing.assert_array_equal(sweep.to_host(sharded)['a'], tree['a'])
  assert sharded['a'].sharding.spec == jax.sharding.PartitionSpec('seeds')
  with pytest.raises(ValueError, match='num_seeds must be >= 1'):
    sweep.padded_size(0, mesh)


def _tiny_config(**overrides):
  config = lowrank_config.get_config()
  config.update(TINY)
  config.update(overrides)
  return config


def _cores():
  """The cores this process may use, counted here independently of ``sweep``."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def _devices_used(log):
  found = re.search(r'running on (\d+) cpu device', log)
  assert found, log[-3000:]
  return int(found.group(1))


# Square's random search accepts a candidate on a strict comparison of objectives, so
# last-bit differences between the batch shapes of one and two devices (a different
# GEMM blocking) can change its path; it is off here, where what is compared is the
# sharding. (On one device a seed's results do not depend on the other seeds.)
SHARDED = TINY | {'ranks': '(2,6)', 'attack': {'strength': 'fast', 'square_queries': 0}}


@pytest.mark.slow
def test_default_runs_on_every_core_with_the_same_results(tmp_path):
  """The binaries' default: one CPU device per core, 3 seeds padded to a multiple of it,
  sharded; the same results as ``--cpu_devices=1`` (a single device)."""
  runs = {'default': (), 'one': ('--cpu_devices=1',)}
  procs = {}
  try:
    for name, flags in runs.items():  # side by side: each spends most of its time compiling
      with open(tmp_path / f'{name}.log', 'w') as log:
        procs[name] = subprocess.Popen(_binary_args(tmp_path / name, SHARDED, flags), cwd=ROOT,
                                       env=_child_env(), stdout=subprocess.DEVNULL, stderr=log)
    for proc in procs.values():
      proc.wait(timeout=900)
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  logs = {name: (tmp_path / f'{name}.log').read_text() for name in runs}
  for name, proc in procs.items():
    assert proc.returncode == 0, logs[name][-3000:]
  used = _devices_used(logs['default'])
  assert used == _cores()
  if os.cpu_count() >= 2 and _cores() >= 2:
    assert used >= 2 and 'CpuDevice(id=1)' in logs['default']  # really sharded
  assert _devices_used(logs['one']) == 1
  rows = io.read_csv(str(tmp_path / 'default' / 'results.csv'))
  assert [r['seed'] for r in rows] == [0, 1, 2, 0, 1, 2]  # the padded seeds are dropped
  _assert_same_results(str(tmp_path / 'one' / 'results.csv'),
                       str(tmp_path / 'default' / 'results.csv'), atol=1e-4)


def _python(code, **env):
  done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=_child_env(env),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout.split()


class _Clock:
  """A stand-in for the ``time`` module inside ``sweep``: ``monotonic()`` returns ``now``."""
  now = 100.0

  def monotonic(self):
    return self.now


def test_checkpointer_saves_when_due_or_forced(tmp_path, monkeypatch):
  """``every_sec``: a save is skipped until that many seconds passed since the last save (or
  the checkpointer's start); ``force`` always saves; 0 saves at every call."""
  clock = _Clock()
  monkeypatch.setattr(sweep, 'time', clock)
  tree = {'w': jnp.arange(3.0)}
  ck = sweep.Checkpointer(str(tmp_path / 'a'), every_sec=10)
  saved = []
  for step, now, force in ((1, 105.0, False), (2, 109.9, False), (3, 110.0, False),
                           (4, 115.0, False), (5, 116.0, True), (6, 125.9, False),
                           (7, 126.0, False)):
    clock.now = now
    if ck.save(step, dict(tree, w=tree['w'] + step), force=force):
      saved.append(step)
  assert saved == [3, 5, 7]
  assert ck.latest_step() == 7
  step, back = ck.restore(tree)
  np.testing.assert_array_equal(np.asarray(back['w']), [7.0, 8.0, 9.0])
  ck.close()
  every = sweep.Checkpointer(str(tmp_path / 'b'))
  assert every.every_sec == 0 and every.save(1, tree) and every.save(2, tree)
  assert every.latest_step() == 2
  every.close()
  numpy_float = sweep.Checkpointer(str(tmp_path / 'c'), every_sec=np.float32(2.5))
  assert numpy_float.every_sec == 2.5
  numpy_float.close()
  for bad in (-1, float('nan'), '5', True):
    with pytest.raises(ValueError, match='every_sec must be a number >= 0'):
      sweep.Checkpointer(str(tmp_path / 'c'), every_sec=bad)


@pytest.mark.slow  # a fresh Python process each (JAX's backends must not have started)
@pytest.mark.parametrize('num_devices', [None, 3])
def test_use_all_cpu_cores_makes_the_devices_it_returns(num_devices):
  """One CPU device per core (``os.cpu_count()`` or the CPU affinity), or the count asked for."""
  out = _python('import jax; from tsrobust import sweep; '
                f'n = sweep.use_all_cpu_cores({num_devices}); '
                'print(n, len(jax.devices()), jax.devices()[0].platform)')
  want = _cores() if num_devices is None else num_devices
  assert out == [str(want), str(want), 'cpu']


_KEEPS_THE_USERS_COUNT = """
import warnings
import jax
from tsrobust import sweep
before = jax.config.jax_num_cpu_devices
jax.config.update('jax_platforms', 'tpu')  # another platform first: nothing to do
assert sweep.use_all_cpu_cores() == 0 and jax.config.jax_num_cpu_devices == before
jax.config.update('jax_platforms', 'cpu')
assert sweep.use_all_cpu_cores() == 3 and jax.config.jax_num_cpu_devices == before
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  assert sweep.use_all_cpu_cores(2) == 3
assert len(caught) == 1 and 'already sets 3' in str(caught[0].message), caught
assert jax.config.jax_num_cpu_devices == before
print(len(jax.devices()))
"""


@pytest.mark.slow
@pytest.mark.parametrize('env', [{'XLA_FLAGS': '--xla_force_host_platform_device_count=3'},
                                 {'JAX_NUM_CPU_DEVICES': '3'}], ids=['XLA_FLAGS', 'config'])
def test_use_all_cpu_cores_keeps_the_users_count(env):
  assert _python(_KEEPS_THE_USERS_COUNT, **env) == ['3']


_MAP_OVER_SEEDS = """
import jax, jax.numpy as jnp, numpy as np
from tsrobust import sweep
assert sweep.use_all_cpu_cores(2) == 2
mesh = sweep.seed_mesh()
fn = lambda w, x, b: jnp.tanh(w @ x) + b   # [3, 3] @ [3, 5] per seed, b shared
w = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3))
x = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 5))
want = jax.vmap(fn, in_axes=(0, 0, None))(w, x, 1.0)
mapped = jax.jit(sweep.map_over_seeds(fn, (True, True, False)))
got = mapped(*sweep.shard_seeds((w, x), mesh), 1.0)
np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
assert got.sharding.spec == jax.sharding.PartitionSpec('seeds'), got.sharding
assert len(got.sharding.device_set) == 2
odd = mapped(w[:3], x[:3], 1.0)   # 3 seeds on 2 devices: one lax.map
np.testing.assert_allclose(odd, want[:3], rtol=1e-6, atol=1e-6)
try:
  mapped(w, x)
  raise SystemExit('a missing argument was accepted')
except ValueError as e:
  assert 'expected 3 arguments' in str(e), e
print('ok')
"""


@pytest.mark.slow
def test_map_over_seeds_runs_each_devices_seeds_and_equals_vmap():
  """Two CPU devices: each maps over its own seeds (the output stays laid over both); the
  values are ``vmap``'s; a seeds axis that does not split over the devices still runs."""
  assert _python(_MAP_OVER_SEEDS) == ['ok']


def test_use_all_cpu_cores_once_jax_runs_warns_and_changes_nothing():
  if jax.default_backend() != 'cpu':
    pytest.skip('runs on the CPU')
  n = len(jax.local_devices(backend='cpu'))  # JAX's backends are initialized from here on
  with pytest.warns(UserWarning, match='use_all_cpu_cores'):
    assert sweep.use_all_cpu_cores(n + 1) == n
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert sweep.use_all_cpu_cores(n) == n
  assert len(jax.local_devices(backend='cpu')) == n
  for bad in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match='num_devices must be None'):
      sweep.use_all_cpu_cores(bad)


def test_compilation_cache_dir_default_off_and_the_users_choice(tmp_path):
  env = {'XDG_CACHE_HOME': str(tmp_path / 'xdg')}
  default = str(tmp_path / 'xdg' / 'tsrobust' / 'jax')
  assert sweep.default_compilation_cache_dir(env) == default
  home = os.path.join(os.path.expanduser('~'), '.cache', 'tsrobust', 'jax')
  assert sweep.default_compilation_cache_dir({}) == home
  assert sweep.compilation_cache_dir(None, None, env) == default
  assert sweep.compilation_cache_dir('', None, env) is None  # off
  assert sweep.compilation_cache_dir('rel/c', None, env) == os.path.abspath('rel/c')
  assert sweep.compilation_cache_dir('~/c', None, env) == os.path.expanduser('~/c')
  for requested in (None, '', '/x'):  # a folder JAX already has (JAX_COMPILATION_CACHE_DIR)
    assert sweep.compilation_cache_dir(requested, '/users/own', env) == '/users/own'


@pytest.mark.slow
def test_binary_fills_the_default_compilation_cache_and_a_rerun_loads_it(tmp_path):
  """No JAX_COMPILATION_CACHE_DIR: the binary compiles into $XDG_CACHE_HOME/tsrobust/jax; a
  rerun loads every program from it (no new entries). (``--compilation_cache=`` is off: the
  test above; a third run to show it would compile everything again.)"""
  env = {k: v for k, v in _child_env({'XDG_CACHE_HOME': str(tmp_path / 'xdg')}).items()
         if k not in ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')}
  tiny = TINY | {'ranks': '(2,)', 'num_steps': 20,
                 'attack': {'strength': 'fast', 'apgd_t_steps': 0, 'square_queries': 0}}
  cache = tmp_path / 'xdg' / 'tsrobust' / 'jax'

  def run(name):
    done = subprocess.run(_binary_args(tmp_path / name, tiny, ('--cpu_devices=1',)),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr

  log = run('first')
  assert f'compilation cache {cache}; threefry on CPU unrolled' in log
  # The evaluation's programs compiled beside the training, without an error.
  assert re.search(r'\d+ evaluation programs prepared in', log), log[-3000:]
  assert 'evaluation programs failed' not in log
  entries = set(os.listdir(cache))
  assert len(entries) >= 5  # training chunk, specialization, attacks...
  run('second')
  assert set(os.listdir(cache)) == entries  # every program loaded, none compiled anew
  _assert_same_results(str(tmp_path / 'first' / 'results.csv'),
                       str(tmp_path / 'second' / 'results.csv'), atol=0)


_THREEFRY_DRAWS = """
import hashlib, sys
import jax
import numpy as np
from tsrobust import sweep
if sys.argv[1] == 'unrolled':
  assert sweep.use_unrolled_threefry_on_cpu() and sweep.use_unrolled_threefry_on_cpu()
key = jax.random.PRNGKey(3)
def draws(k):
  return (jax.random.split(k, 5), jax.random.fold_in(k, 7), jax.random.bits(k, (1001,)),
          jax.random.normal(jax.random.fold_in(k, 1), (64, 33)),
          jax.random.uniform(k, (7, 5)), jax.random.randint(k, (9,), 0, 100))
digest = hashlib.sha256()
for x in jax.jit(draws)(key) + draws(key):  # jitted and op by op
  digest.update(np.asarray(x).tobytes())
hlo = jax.jit(lambda k: jax.random.bits(k, (1001,))).lower(key).as_text()
print(digest.hexdigest(), 'while' in hlo)
"""


@pytest.mark.slow  # a fresh process each: the lowering is chosen per process, before compiling
def test_unrolled_threefry_draws_the_same_bits_without_the_loop():
  """Keys, bits, normals, uniforms and integers are bitwise those of JAX's CPU default (a
  rolled loop in the program); the unrolled program has no loop."""
  if jax.default_backend() != 'cpu':
    pytest.skip('the lowering is changed on the CPU only')
  default = subprocess.run([sys.executable, '-c', _THREEFRY_DRAWS, 'default'], cwd=ROOT,
                           env=_child_env(), capture_output=True, text=True, timeout=300)
  unrolled = subprocess.run([sys.executable, '-c', _THREEFRY_DRAWS, 'unrolled'], cwd=ROOT,
                            env=_child_env(), capture_output=True, text=True, timeout=300)
  assert default.returncode == 0 and unrolled.returncode == 0, (default.stderr[-2000:],
                                                                unrolled.stderr[-2000:])
  digest_default, loop_default = default.stdout.split()
  digest_unrolled, loop_unrolled = unrolled.stdout.split()
  assert (loop_default, loop_unrolled) == ('True', 'False')
  assert digest_unrolled == digest_default


# Resuming after an interruption: tests/test_train.py (the library) and tests/test_lowrank.py
# (the binary, in-process).


def test_changed_config_in_existing_workdir_is_refused(tmp_path):
  """A workdir records its config at the start of a run (``prepare_workdir``); a run of
  another config there stops before any work."""
  config = _tiny_config(num_steps=20, ranks=(2,))
  cli.prepare_workdir(str(tmp_path), config)
  cli.prepare_workdir(str(tmp_path), config)  # the same config: accepted
  assert os.listdir(tmp_path) == ['config.json']
  config.learning_rate = 0.01
  with pytest.raises(validation.ConfigError,
                     match=r"different config \(fields \['learning_rate'\]"):
    lowrank.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path) == ['config.json']


def test_progress_on_a_terminal_is_one_live_line():
  class Tty(_io.StringIO):
    def isatty(self):
      return True
  stream = Tty()
  report = cli.progress_logger('stage', stream=stream)
  for step in range(10, 101, 10):
    report({'step': step, 'num_steps': 100, 'loss': 1.0, 'steps_per_sec': 5.0,
            'eta_sec': (100 - step) / 5.0})
  text = stream.getvalue()
  assert text.count('\r') == 10 and text.count('\n') == 1 and text.endswith('ETA 0s\n')


def test_progress_off_a_terminal_is_bounded(caplog):
  report = cli.progress_logger('stage', max_lines=5, stream=_io.StringIO())
  with caplog.at_level('INFO'):
    for step in range(1, 1001):
      report({'step': step, 'num_steps': 1000, 'loss': 1.0, 'steps_per_sec': 5.0,
              'eta_sec': 0.0})
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('stage:')]
  assert len(lines) == 5
  assert lines[-1].startswith('stage: step 1000/1000')


def _every_field_rejects_garbage(module, get_config, garbage=None):
  """Every config field, set to a value of the wrong kind, fails naming that field; returns
  how many fields were rejected.

  ``garbage``: per-field bad values replacing the default ``'???'`` (for
  fields where any string is a valid value, such as a folder to create).
  """
  base = get_config().to_dict()
  garbage = garbage or {}
  unchecked = []
  for field in base:
    bad = dict(base)
    bad[field] = garbage.get(field, '???')
    try:
      module.validate_config(ml_collections.ConfigDict(bad))
    except validation.ConfigError as e:
      assert f'config.{field}' in str(e), (field, str(e))
    else:
      unchecked.append(field)
  assert not unchecked, f'fields not validated: {unchecked}'
  missing = dict(base)
  missing.pop('batch_size')
  with pytest.raises(validation.ConfigError, match='config.batch_size is missing'):
    module.validate_config(ml_collections.ConfigDict(missing))
  return len(base) - len(unchecked)


def test_lowrank_validates_every_field():
  checked = _every_field_rejects_garbage(lowrank, lowrank_config.get_config)
  assert checked == len(lowrank_config.get_config().to_dict())


def test_robustness_validates_every_field():
  checked = _every_field_rejects_garbage(robustness, robustness_config.get_config)
  assert checked == len(robustness_config.get_config().to_dict())


def test_real_validates_every_field():
  checked = _every_field_rejects_garbage(real, real_config.get_config, garbage={'teacher_dir': 3})
  assert checked == len(real_config.get_config().to_dict())


def test_jit_once_is_the_same_computation_as_jit():
  """Level-0 compilation of set-up code: keys exact, normals equal to float rounding."""
  def draw(key, n):
    k1, k2 = jax.random.split(key)
    return jax.random.split(k1, n), jax.random.normal(k2, (64, n))
  key = jax.random.PRNGKey(11)
  once = sweep.jit_once(draw, static_argnums=1)
  keys, normals = once(key, 5)
  ref_keys, ref_normals = jax.jit(draw, static_argnums=1)(key, 5)
  np.testing.assert_array_equal(np.asarray(keys), np.asarray(ref_keys))
  np.testing.assert_allclose(np.asarray(normals), np.asarray(ref_normals), atol=1e-5)
  assert normals.shape == (64, 5) and float(jnp.std(normals)) == pytest.approx(1.0, abs=0.2)
  assert once.__wrapped__ is draw
  again = once(key, 5)[1]  # cached: the same compiled function, the same numbers
  np.testing.assert_array_equal(np.asarray(again), np.asarray(normals))
