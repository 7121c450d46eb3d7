"""Seeds as a sharded axis, and checkpoints that make a sweep resumable.

Sharding: every array with a leading seeds axis is laid out over a 1-D
``Mesh`` of all devices (``NamedSharding(mesh, P('seeds'))``). Jitted,
vmapped functions then run each device's seeds where they live; the same code
runs on one CPU, one GPU or many, and multi-process after
``jax.distributed.initialize()`` (every process builds the same full arrays
from the same keys and keeps its devices' slices; ``to_host`` gathers results
back to every process; tests/test_multiprocess.py runs two CPU processes). The
seeds axis must be a multiple of the device count: ``padded_size`` says how
many seeds to build; the padded seeds are real extra seeds whose results the
caller drops.

Checkpoints: ``Checkpointer`` saves a pytree (train state and loss history)
with orbax after a chunk (after every chunk, or at most every ``every_sec``
seconds and at the end); a rerun restores the newest complete one.
Orbax writes to a temporary folder and renames it, so a run killed mid-save
leaves the previous checkpoint intact.

One seed at a time: ``map_over_seeds(fn, batched)`` runs ``fn`` on one seed at a time
on each device (``shard_map`` over the mesh, ``lax.map`` over the device's own seeds)
instead of ``vmap`` over all of them. On a CPU that keeps one seed's working set in cache:
the image study's CNN step runs 2.35x (standard) and 1.83x (PGD-AT) faster than vmapped at
32 students (benchmarks/RESULTS.md, "one student at a time"). On an accelerator ``vmap``
keeps the seeds in parallel.

CPU devices: XLA:CPU runs one device's batched small matrix products on about
one core, so on a CPU the seeds axis only uses the machine when JAX has one
CPU device per core. ``use_all_cpu_cores()``, called before any JAX
computation, sets that up (the experiment binaries call it; ``--cpu_devices``).

Compilation cache: ``use_compilation_cache()`` turns on JAX's persistent
compilation cache (``~/.cache/tsrobust/jax``), so a rerun loads the programs an
earlier run compiled (the binaries call it; ``--compilation_cache``).

Random numbers on CPU: ``use_unrolled_threefry_on_cpu()`` has JAX lower the
threefry hash as the straight-line code it uses on accelerators (same bits,
3-6x faster draws on XLA:CPU; the binaries call it; ``--unrolled_threefry``).
"""

import contextlib
import importlib
import numbers
import os
import re
import signal
import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple
import warnings

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

__all__ = ['SEEDS_AXIS', 'cpu_cores', 'use_all_cpu_cores',
           'default_compilation_cache_dir', 'compilation_cache_dir',
           'use_compilation_cache', 'SETUP_COMPILER_OPTIONS', 'jit_once',
           'use_unrolled_threefry_on_cpu', 'seed_mesh', 'padded_size', 'shard_seeds',
           'map_over_seeds', 'SEED_BATCHINGS', 'default_seed_batching', 'set_seed_batching',
           'replicate', 'sync_processes', 'to_host', 'checked_interval',
           'finish_before_interrupt', 'Checkpointer']

SEEDS_AXIS = 'seeds'

_FORCE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def cpu_cores() -> int:
  """The cores this process may run on (its CPU affinity where known, else ``os.cpu_count()``)."""
  if hasattr(os, 'sched_getaffinity'):
    return max(1, len(os.sched_getaffinity(0)))
  return max(1, os.cpu_count() or 1)


def _default_platform_is_cpu() -> Optional[bool]:
  """True / False when ``jax_platforms`` (or ``JAX_PLATFORMS``) names the default; None if unset.

  Reads the setting only: initializing a backend to find out would fix the
  CPU device count before it can be chosen.
  """
  platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  first = platforms.split(',')[0].strip().lower()
  return (first == 'cpu') if first else None


def _user_cpu_device_count() -> Optional[Tuple[int, str]]:
  """``(count, where it was set)`` if the user chose the CPU device count, else None.

  ``jax_num_cpu_devices`` (``jax.config.update`` or ``JAX_NUM_CPU_DEVICES``)
  takes precedence over ``--xla_force_host_platform_device_count`` in
  ``XLA_FLAGS``, as in JAX's CPU client.
  """
  configured = jax.config.jax_num_cpu_devices
  if configured >= 0:  # the default is -1
    return configured, 'jax_num_cpu_devices'
  counts = re.findall(_FORCE_COUNT_FLAG + r'=(\d+)', os.environ.get('XLA_FLAGS', ''))
  if counts:
    return int(counts[-1]), f'XLA_FLAGS {_FORCE_COUNT_FLAG}'
  return None


def _backends_are_initialized() -> bool:
  """Whether JAX has built its backends (then the CPU device count is fixed)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  initialized = getattr(xla_bridge, 'backends_are_initialized', None)  # private API
  if initialized is not None:
    return bool(initialized())
  return bool(getattr(xla_bridge, '_backends', None))


def _initialized_cpu_device_count() -> int:
  try:
    return jax.local_device_count('cpu')
  except RuntimeError:  # no CPU backend (jax_platforms excludes it)
    return 0


def use_all_cpu_cores(num_devices: Optional[int] = None) -> int:
  """Gives JAX one CPU device per core, so sharded seeds run on every core.

  Call it before any JAX computation (right after the imports of a script);
  then ``seed_mesh()`` spans all the CPU devices and ``shard_seeds`` lays the
  seeds over them. Each seed's results then equal the one-device run's within
  float error (tests/test_sweep.py: 1e-4), as long as each seed's computation
  does not depend on the other seeds in its batch.

  It changes nothing when:

  * ``jax_platforms`` / ``JAX_PLATFORMS`` names another platform first (JAX
    runs elsewhere): returns 0. When it is unset JAX may still pick a GPU or
    TPU; the setting is then harmless, as ``jax_num_cpu_devices`` is read only
    when JAX builds its CPU client.
  * The user already chose a count, with ``jax_num_cpu_devices`` (also
    ``JAX_NUM_CPU_DEVICES``) or ``--xla_force_host_platform_device_count`` in
    ``XLA_FLAGS``: returns that count (warns if ``num_devices`` asks for another).
  * JAX's backends are already initialized, so the count is fixed: returns the
    current number of CPU devices, with a warning if that is not the count wanted.

  Args:
    num_devices: how many CPU devices to create; None: one per core
      (``cpu_cores()``). 1 is JAX's default.

  Returns:
    The number of CPU devices JAX's CPU client has or will have (0 if the
    default platform is set to something else).

  Raises:
    ValueError: if ``num_devices`` is not None or a positive integer.
  """
  if num_devices is not None and (isinstance(num_devices, bool) or
                                  not isinstance(num_devices, int) or num_devices < 1):
    raise ValueError(f'num_devices must be None (one per core) or an integer >= 1, '
                     f'got {num_devices!r}')
  if _default_platform_is_cpu() is False:
    return 0
  wanted = cpu_cores() if num_devices is None else num_devices
  user = _user_cpu_device_count()
  if user is not None:
    count, where = user
    if num_devices is not None and num_devices != count:
      warnings.warn(f'use_all_cpu_cores: {num_devices} CPU devices asked for, but {where} '
                    f'already sets {count}; keeping {count}', stacklevel=2)
    wanted = count
  if _backends_are_initialized():
    current = _initialized_cpu_device_count()
    if current != wanted:
      warnings.warn(f'use_all_cpu_cores: JAX is already initialized with {current} CPU '
                    f'device(s), so it cannot switch to {wanted}; call it before any JAX '
                    f'computation', stacklevel=2)
    return current
  if user is None:
    try:
      jax.config.update('jax_num_cpu_devices', wanted)
    except RuntimeError:  # initialized in between (another thread)
      current = _initialized_cpu_device_count()
      warnings.warn(f'use_all_cpu_cores: JAX was initialized with {current} CPU device(s) '
                    f'before {wanted} could be set', stacklevel=2)
      return current
  return wanted


def default_compilation_cache_dir(environ=None) -> str:
  """``$XDG_CACHE_HOME/tsrobust/jax`` (``~/.cache/tsrobust/jax`` when it is unset)."""
  environ = os.environ if environ is None else environ
  base = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'tsrobust', 'jax')


def compilation_cache_dir(requested: Optional[str], current: Optional[str],
                          environ=None) -> Optional[str]:
  """The folder of JAX's persistent compilation cache to use, or None (off).

  Args:
    requested: what the caller asks for: None = the default
      (``default_compilation_cache_dir()``), ``''`` = off, else a folder.
    current: the folder JAX is already configured with (``jax.config
      .jax_compilation_cache_dir``, also set by ``JAX_COMPILATION_CACHE_DIR``);
      when set it wins, as the user chose it.
    environ: the environment (default ``os.environ``).
  """
  if current:
    return current
  if requested == '':
    return None
  return os.path.abspath(os.path.expanduser(requested or default_compilation_cache_dir(environ)))


def use_compilation_cache(cache_dir: Optional[str] = None) -> Optional[str]:
  """Turns on JAX's persistent compilation cache; returns its folder (None: off).

  A program compiled once (the training chunk, each attack of the evaluation
  ensemble: most of a short run's wall time on a CPU) is then loaded from disk
  by every later run with the same program, jax version and backend, instead
  of compiled again; the cache is keyed by all three, so an entry is never
  used for a different program. Call it before any JAX computation, like
  ``use_all_cpu_cores``. The experiment binaries call it (``--compilation_cache``).
  Programs of every compile time are cached (``jax_persistent_cache_min_compile_time_secs``
  = 0, unless ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` is set; JAX's default
  caches only those that took >= 1 s, and the main job's many small ones took ~3 s of
  its warm run).

  Args:
    cache_dir: None: ``$XDG_CACHE_HOME/tsrobust/jax``; ``''``: leave the cache
      off; else the folder. A folder the user already gave JAX
      (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept.

  Returns:
    The folder in use, or None when the cache stays off (also when the folder
    cannot be created: a warning says why, and the run goes on uncached).
  """
  path = compilation_cache_dir(cache_dir, jax.config.jax_compilation_cache_dir)
  if path is None or path == jax.config.jax_compilation_cache_dir:
    return path
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    warnings.warn(f'use_compilation_cache: {path} cannot be created ({e.strerror}); '
                  f'compiling without a persistent cache', stacklevel=2)
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    # Every program, not only those that took >= 1 s to compile (JAX's default): the
    # main job's dozens of sub-second programs cost ~3 s of a warm run otherwise.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return path


# XLA:CPU at its default optimization level spends seconds compiling threefry and the
# normal sampler (measured: the low-rank binary's set-up of teachers, bases and initial
# students, 8 seeds, took 117 s as eager ops and 86 s jitted, 16-18 s jitted at level 0,
# on 2 loaded cores); code that runs once does not repay that.
SETUP_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def jit_once(fn, **jit_kwargs):
  """``jax.jit`` for one-shot set-up code (random initialization, data draws).

  On the CPU backend the function is compiled at XLA's optimization level 0
  (``SETUP_COMPILER_OPTIONS``), which compiles the PRNG several times faster;
  elsewhere it is a plain ``jax.jit``. Results are the same computation but
  not bitwise equal to the optimized build's (float rounding of the normal
  sampler's polynomial, ~1e-6); integer work such as key splitting is exact.
  Use it for code that runs once per run, not for training or attack loops.

  >>> draw = jit_once(lambda key: jax.random.split(key, 3))  # set-up code, run once
  >>> draw(jax.random.PRNGKey(0)).shape
  (3, 2)
  """
  def compiled(*args, **kwargs):
    if not jitted:  # the backend is known only once JAX runs
      options = SETUP_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None
      jitted.append(jax.jit(fn, compiler_options=options, **jit_kwargs))
    return jitted[0](*args, **kwargs)
  jitted = []
  compiled.__wrapped__ = fn
  return compiled


def _threefry_lowerings():
  """``(threefry2x32_p, unrolled rule, register_lowering)`` of this jax, or None.

  Private jax names: ``jax._src.random.threefry2x32`` (jax >= 0.7) or
  ``jax._src.prng`` (earlier); None when neither holds them.
  """
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  for name in ('jax._src.random.threefry2x32', 'jax._src.prng'):
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    prim = getattr(module, 'threefry2x32_p', None)
    rule = getattr(module, '_threefry2x32_lowering_rule', None)
    if prim is not None and rule is not None:
      return prim, rule, mlir.register_lowering
  return None


_unrolled_threefry = []


def use_unrolled_threefry_on_cpu() -> bool:
  """Lowers the threefry hash on CPU as straight-line code; same bits, faster.

  JAX lowers ``threefry2x32`` (the hash behind every ``jax.random`` draw with
  the default PRNG) on CPU as a rolled loop of 5 iterations over whole arrays,
  and everywhere else as one unrolled elementwise computation. XLA:CPU
  vectorizes the unrolled form: ``python -m benchmarks.threefry`` on this
  project's 2-core CPU (jax 0.10.2, 2026-11-27) measured ``jax.random.bits``
  19.1 -> 3.3 ns and ``jax.random.normal`` 19.4 -> 5.6 ns per number, a scan
  drawing ``[4, 40, 128]`` normals per step 163 -> 79 us per step, and that
  scan compiled faster (1.09 -> 0.48 s). The
  hash is integer arithmetic, so every key, bit and sample is bitwise the
  same (``tests/test_sweep.py`` checks ``split``, ``fold_in``, ``bits``,
  ``normal``, ``uniform`` against the default lowering). Only programs compiled
  afterwards change; call it before any JAX work, like ``use_all_cpu_cores``.
  The experiment binaries call it (``--unrolled_threefry``). It affects the
  whole process (a lowering rule is global in JAX), and uses JAX private
  names: on a jax without them it changes nothing and returns False.

  Returns:
    Whether the unrolled lowering is in use on CPU.
  """
  if _unrolled_threefry:
    return True
  found = _threefry_lowerings()
  if found is None:
    return False
  prim, rule, register = found
  register(prim, rule, platform='cpu')
  _unrolled_threefry.append(True)
  return True


def seed_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``'seeds'`` over ``devices`` (default: all global devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (SEEDS_AXIS,))


def padded_size(num_seeds: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh size that is >= ``num_seeds``.

  >>> mesh = seed_mesh(jax.devices()[:1])
  >>> padded_size(3, mesh)  # a multiple of the mesh's one device
  3
  """
  if num_seeds < 1:
    raise ValueError(f'num_seeds must be >= 1, got {num_seeds}')
  n = mesh.devices.size
  return -(-num_seeds // n) * n


SEED_BATCHINGS = ('vmap', 'map')


_seed_batching: List[str] = []  # set_seed_batching's choice (empty: by the backend)


def set_seed_batching(batching: Optional[str]) -> None:
  """Makes ``default_seed_batching()`` return ``batching`` in this process (None: the
  backend's choice again): the binaries' ``--seed_batching``, e.g. ``'vmap'`` on a CPU to
  run every student of a device at once, as the image path did before issue 35.

  >>> set_seed_batching('vmap'); default_seed_batching()
  'vmap'
  >>> set_seed_batching(None)
  """
  if batching is not None and batching not in SEED_BATCHINGS:
    raise ValueError(f'seed batching must be one of {SEED_BATCHINGS} or None, got {batching!r}')
  _seed_batching[:] = [] if batching is None else [batching]


def default_seed_batching() -> str:
  """``'map'`` where JAX's default backend is the CPU (one seed's working set stays in
  cache), else ``'vmap'`` (an accelerator runs the seeds in parallel); what
  ``set_seed_batching`` set, if anything."""
  if _seed_batching:
    return _seed_batching[0]
  return 'map' if jax.default_backend() == 'cpu' else 'vmap'


def map_over_seeds(fn: Callable, batched: Sequence[bool],
                   mesh: Optional[Mesh] = None) -> Callable:
  """``fn`` over the leading (seeds) axis of the arguments flagged in ``batched``, one seed
  at a time on each device.

  The same values as ``jax.vmap(fn, in_axes=...)`` (up to float rounding of batched
  products): under ``jit``, each device of ``mesh`` (default ``seed_mesh()``) runs a
  ``lax.map`` over its own block of seeds (``shard_map``; the outputs keep the seeds
  axis laid over the devices, as ``shard_seeds`` lays it). Arguments not flagged are
  shared (every seed reads them; replicated). A seeds axis that is not a multiple of
  the mesh size runs as one ``lax.map``.

  >>> f = map_over_seeds(lambda w, x: w * x, (True, False))
  >>> jax.jit(f)(np.arange(4.0), 2.0).tolist()
  [0.0, 2.0, 4.0, 6.0]
  """
  batched = tuple(bool(b) for b in batched)

  def mapped(*args):
    if len(args) != len(batched):
      raise ValueError(f'expected {len(batched)} arguments (batched {batched}), '
                       f'got {len(args)}')
    per = tuple(a for a, b in zip(args, batched) if b)
    shared = tuple(a for a, b in zip(args, batched) if not b)
    num = jax.tree_util.tree_leaves(per)[0].shape[0]

    def local(per, shared):
      def one(per_seed):
        it_p, it_s = iter(per_seed), iter(shared)
        return fn(*[next(it_p) if b else next(it_s) for b in batched])
      return jax.lax.map(one, per)

    m = seed_mesh() if mesh is None else mesh
    if m.devices.size == 1 or num % m.devices.size:
      return local(per, shared)
    spec = PartitionSpec(SEEDS_AXIS)
    return jax.shard_map(local, mesh=m, in_specs=(spec, PartitionSpec()), out_specs=spec,
                         check_vma=False)(per, shared)
  return mapped


def shard_seeds(tree: Any, mesh: Mesh) -> Any:
  """Lays every leaf's leading (seeds) axis over the mesh.

  Every process must pass the same full arrays (as built from the same keys);
  each device receives its slice. Leading axes must be multiples of the mesh
  size (see ``padded_size``).

  >>> mesh = seed_mesh(jax.devices()[:1])
  >>> tree = shard_seeds({'w': np.arange(6.0).reshape(3, 2)}, mesh)
  >>> tree['w'].sharding.spec == PartitionSpec(SEEDS_AXIS), to_host(tree)['w'].tolist()[2]
  (True, [4.0, 5.0])
  """
  sharding = NamedSharding(mesh, PartitionSpec(SEEDS_AXIS))
  n = mesh.devices.size

  def put(leaf):
    leaf = jax.numpy.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
    if leaf.ndim == 0 or leaf.shape[0] % n:
      raise ValueError(f'the seeds axis ({leaf.shape[:1]}) must be a multiple of the '
                       f'{n} devices; build padded_size(num_seeds, mesh) seeds')
    if jax.process_count() == 1:
      return jax.device_put(leaf, sharding)
    if not leaf.is_fully_addressable:  # already global (an earlier result): keep or re-lay
      if leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
        return leaf
      return jax.jit(lambda v: v, out_shardings=sharding)(leaf)
    # A process-local array, the same full value on every process: each process lays its
    # devices' slices (device_put would need a committed global value).
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree_util.tree_map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a copy of every leaf on every device of the mesh (data all seeds share).

  Every process must pass the same full arrays, as for ``shard_seeds``.
  """
  sharding = NamedSharding(mesh, PartitionSpec())

  def put(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return jax.jit(lambda v: v, out_shardings=sharding)(leaf)
    host = np.asarray(leaf)
    if jax.process_count() == 1:
      return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree_util.tree_map(put, tree)


_SYNC_TIMEOUT_S = 3600
_sync_count = [0]


def sync_processes() -> None:
  """Waits until every process of a multi-process run gets here (no-op with one process).

  A barrier of the coordination service (``jax.distributed``), not a device
  collective: gloo, JAX's CPU collectives between processes, gives up after
  30 s when it first connects them, so a process that compiled or loaded data
  for longer than the others would fail the first collective. Every
  cross-process collective of this module (``to_host``, ``Checkpointer``) is
  preceded by this barrier (timeout: an hour). Every process must call it
  equally often, in the same order.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client  # private API; None without jax.distributed
  if client is None:
    return
  _sync_count[0] += 1
  client.wait_at_barrier(f'tsrobust_sync_{_sync_count[0]}', _SYNC_TIMEOUT_S * 1000)


def to_host(tree: Any) -> Any:
  """Numpy copies of (possibly sharded, possibly multi-host) arrays, on every process.

  With several processes this is a collective: every process must call it, in
  the same order. An array spread over processes is gathered whole (its global
  shape); a process-local array (one every process computed alike) is copied as is.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sync_processes()

  def get(v):
    if not isinstance(v, jax.Array) or v.is_fully_addressable:
      return np.asarray(jax.device_get(v))
    return np.asarray(multihost_utils.process_allgather(v, tiled=True))
  return jax.tree_util.tree_map(get, tree)


def _process_local(v: Any) -> bool:
  """A jax.Array on this process's devices only, in a run of several processes."""
  return jax.process_count() > 1 and isinstance(v, jax.Array) and v.is_fully_addressable


def _replicated_sharding() -> NamedSharding:
  return NamedSharding(seed_mesh(), PartitionSpec())


def _replicated_global(v: jax.Array) -> jax.Array:
  """A process-local array (the same on every process) as a global array replicated on all
  devices, without communication (orbax refuses process-local arrays in multi-process runs)."""
  host = np.asarray(v)
  return jax.make_array_from_callback(host.shape, _replicated_sharding(), lambda idx: host[idx])


def checked_interval(seconds: Any, name: str) -> float:
  """``seconds`` as a float if it is a real number >= 0 (not a bool), else a ValueError
  naming ``name``: the check of every checkpoint interval.

  >>> checked_interval(2, 'every_sec')
  2.0
  >>> checked_interval(-1, 'every_sec')
  Traceback (most recent call last):
  ValueError: every_sec must be a number >= 0, got -1
  """
  if (isinstance(seconds, bool) or not isinstance(seconds, numbers.Real)
      or not seconds >= 0):
    raise ValueError(f'{name} must be a number >= 0, got {seconds!r}')
  return float(seconds)


@contextlib.contextmanager
def finish_before_interrupt():
  """Holds a Ctrl-C (SIGINT) that arrives inside the block and raises it when the block ends.

  For work that must not stop half-way, such as writing a checkpoint: the interrupt
  is not lost, only delayed until the block is done. Only in the main thread, and only
  while SIGINT has Python's default handler (a program that installed its own keeps it).

  >>> with finish_before_interrupt():
  ...   done = 1 + 1
  >>> done
  2
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  held = []
  signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if held:
    raise KeyboardInterrupt


class Checkpointer:
  """Orbax checkpoints of one training stage in ``folder``, keyed by step.

  ``save(step, tree)`` after each chunk; ``restore(template)`` returns
  ``(step, tree)`` of the newest complete checkpoint (restored with the
  shardings of ``template``), or None.

  ``every_sec``: 0 (the default) saves at every ``save`` call; ``> 0`` saves
  only when at least that many seconds passed since the last save (or since
  the checkpointer was made), or when the call says ``force`` (``train_seeds``
  forces the last chunk's). A run killed in between loses at most
  ``every_sec`` seconds of training and resumes from the last save; orbax's
  ~0.2 s per save (folders, metadata, a rename) then stays off a loop of short
  chunks (the main job saved 40 times in ~70 s at every chunk).

  With several processes, every process calls ``save`` / ``restore`` alike on
  the same folder (a file system they all see); orbax writes each process's
  shards, and process 0's clock decides whether a ``save`` call saves (its
  decision is broadcast, so all processes save together). A process-local
  array (one every process holds alike, such as a single teacher being
  trained) is saved as a global replicated array, which orbax writes once,
  and restored back to the template's device.

  A save, once begun, completes: a Ctrl-C (SIGINT) arriving during it is held
  and raised as ``KeyboardInterrupt`` right after it (``finish_before_interrupt``),
  so an interrupted run never leaves a half-written checkpoint. Folders that a
  killed process (``kill -9``) left half-written are removed by the next
  ``Checkpointer`` on the folder (orbax's ``cleanup_tmp_directories``).
  """

  def __init__(self, folder: str, max_to_keep: int = 1, every_sec: float = 0.0):
    every_sec = checked_interval(every_sec, 'every_sec')
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.folder = os.path.abspath(folder)
    self.every_sec = every_sec
    sync_processes()
    self._manager = ocp.CheckpointManager(
        self.folder, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False,
            cleanup_tmp_directories=True))
    self._last_save = time.monotonic()

  def _due(self, force: bool) -> bool:
    """Whether this ``save`` call saves: the same answer on every process."""
    due = force or time.monotonic() - self._last_save >= self.every_sec
    if force or not self.every_sec or jax.process_count() == 1:
      return due
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    sync_processes()
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))

  def save(self, step: int, tree: Any, force: bool = False) -> bool:
    """Saves ``tree`` as ``step`` if it is due (see ``every_sec``) or ``force``; returns
    whether it saved."""
    if not self._due(force):
      return False
    tree = jax.tree_util.tree_map(
        lambda v: _replicated_global(v) if _process_local(v) else v, tree)
    sync_processes()
    with finish_before_interrupt():
      self._manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
      self._manager.wait_until_finished()
    self._last_save = time.monotonic()
    return True

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore(self, template: Any) -> Optional[Tuple[int, Any]]:
    step = self._manager.latest_step()
    if step is None:
      return None

    def abstract(v):
      sharding = _replicated_sharding() if _process_local(v) else getattr(v, 'sharding', None)
      return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
    sync_processes()
    tree = self._manager.restore(step, args=self._ocp.args.StandardRestore(
        jax.tree_util.tree_map(abstract, template)))
    return step, jax.tree_util.tree_map(
        lambda t, v: jax.device_put(v.addressable_data(0), t.sharding) if _process_local(t) else v,
        template, tree)

  def close(self) -> None:
    sync_processes()
    self._manager.close()
