"""Test-session settings.

JAX's persistent compilation cache: the attack ensemble compiles a dozen small
programs per binary, and the binaries' tests (in-process and in subprocesses,
which inherit the environment) compile the same ones again and again. The
cache is keyed by the program, the jax version and the backend, so a stale
entry is never used; it lives in ``.pytest_cache/jax`` (gitignored) unless
``JAX_COMPILATION_CACHE_DIR`` is already set.
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(_ROOT, '.pytest_cache', 'jax'))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
