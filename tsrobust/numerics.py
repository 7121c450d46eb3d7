"""The precision of tsrobust's matrix products: float32's own, on every backend.

XLA's *default* precision for a float32 matrix product depends on the backend: on a
CPU it is float32, on an NVIDIA GPU from Ampere on it is TF32 (a 10-bit mantissa,
~1e-3 relative error per product), and on a TPU it is bfloat16 passes. The studies'
contracts are exact geometric statements that such rounding breaks. Measured on an
NVIDIA H200 (jax 0.11.2) before every product below named its precision: perturbations
projected onto a subspace had components outside it above the tests' 1e-5 tolerance;
low-rank training inputs ``s U z`` were not exactly low-rank, so plain SGD moved the
student's weights in the complement (which, on exact data, it never touches); a teacher
correlated with itself gave less than 1; 83 of the default test suite's 486 tests failed
there, 3 with ``jax_default_matmul_precision='highest'``.

So every matrix product the library computes (the networks' layers, projections onto
and off subspaces, data drawn in a subspace, correlation sums, the PCA) names
``PRECISION`` explicitly, whatever ``jax_default_matmul_precision`` says. On a CPU both
are float32, but XLA compiles some fused products differently: the main job's losses and
attack columns stayed byte-identical, its specialization moved by <= 2e-7. On a GPU it
costs speed at large seed counts (``benchmarks/RESULTS.md``, "Seed sweep on a GPU").
Products inside a user's own model or objective, passed to our attacks, follow the
user's settings.
"""

import jax
import jax.numpy as jnp

__all__ = ['PRECISION', 'matmul']

PRECISION = jax.lax.Precision.HIGHEST


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` (``jnp.matmul``'s broadcasting) at ``PRECISION``.

  >>> matmul(jnp.eye(2), jnp.array([[1.0], [2.0]])).tolist()
  [[1.0], [2.0]]
  """
  return jnp.matmul(a, b, precision=PRECISION)
