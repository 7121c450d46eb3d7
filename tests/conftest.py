"""Test-session settings.

JAX's persistent compilation cache: the attack ensemble compiles a dozen small
programs per binary, and the binaries' tests (in-process and in subprocesses,
which inherit the environment) compile the same ones again and again. The
cache is keyed by the program, the jax version and the backend, so a stale
entry is never used; it lives in ``.pytest_cache/jax`` (gitignored) unless
``JAX_COMPILATION_CACHE_DIR`` is already set.

``pytest -m slow`` or ``-m "slow or not slow"``: see setup.cfg (the default run
deselects the tests marked ``slow``).
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(_ROOT, '.pytest_cache', 'jax'))
# Every program, not only those that took >= 1 s to compile: the tests' eager set-up
# (un-jitted vmaps, inits, chex's without_jit variants) compiles hundreds of small
# programs, together most of the default run's time when each is compiled afresh.
# (In the environment, so the binaries' subprocesses cache them too.)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

# The tests' own reference products (plain ``@`` in known answers) at float32's full
# precision on every backend, as the library's are (tsrobust.numerics): XLA's default on
# an NVIDIA GPU is TF32, whose ~1e-3 errors fail references held to 1e-5. (On a CPU this
# changes nothing; test_numerics checks the library's products without relying on it.)
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
