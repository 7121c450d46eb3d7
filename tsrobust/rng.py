"""Named PRNG key streams: which key feeds which use, for every study, in one place.

A study's randomness starts from one master key ``PRNGKey(seed)``. Seed ``s``
of the seeds axis gets ``split(fold_in(master, s), len(streams))``, one key per
named stream (``per_seed``): the low-rank studies' ``LOWRANK_STREAMS`` (teacher,
subspace basis, student initialization, training data, evaluation data), the
image study's ``IMAGE_STREAMS`` (student initialization, training data,
evaluation). Draws outside the seeds axis fold a reserved constant into the
master key (or into an attack key): those constants are below, named, far
from any seed index.

>>> keys = per_seed(jax.random.PRNGKey(0), 3, IMAGE_STREAMS)
>>> sorted(keys), keys['train'].shape
(['eval', 'init', 'train'], (3, 2))
"""

from typing import Dict, Sequence

import jax
import jax.numpy as jnp

__all__ = ['LOWRANK_STREAMS', 'IMAGE_STREAMS', 'SHARED_PROBLEM', 'TEACHER_PRETRAINING',
           'ROBUST_FEATURES', 'IMAGE_PROBES', 'CONVERGENCE_CHECK', 'REFERENCE_CHECK',
           'PAIR_LADDER', 'TEACHER_EVALUATION', 'ROBUST_MODEL_EVALUATION', 'per_seed']

# Per-seed streams, in split order (changing the order changes every result).
LOWRANK_STREAMS = ('teacher', 'basis', 'student', 'train', 'eval')
IMAGE_STREAMS = ('init', 'train', 'eval')

# fold_in(master, .): one teacher and basis shared by every seed (teacher_per_seed = False).
SHARED_PROBLEM = 2 ** 31 - 1
# fold_in(master, .): pretraining of the image teacher / robust model (tsrobust.teachers).
TEACHER_PRETRAINING = 2 ** 31 - 2
# fold_in(master, .): the robust-feature dataset's starting points.
ROBUST_FEATURES = 2 ** 31 - 3
# fold_in(master, .): the image study's off-subspace probes (every student sees the same).
IMAGE_PROBES = 2 ** 31 - 4
# fold_in(attack key, .): the convergence check's doubled ensemble (other random starts).
CONVERGENCE_CHECK = 2 ** 31 - 5
# fold_in(attack key, .): the reference check's ensemble (escalation.reference_check).
REFERENCE_CHECK = 2 ** 31 - 6
# fold_in(attack key, .): the rungs of experiments.pair_ladder (then the rung's index).
PAIR_LADDER = 2 ** 31 - 7
# fold_in(master, .): the image study's attacks on the teacher and on the robust model.
TEACHER_EVALUATION = 7
ROBUST_MODEL_EVALUATION = 8


def per_seed(master: jax.Array, num_seeds: int, streams: Sequence[str]) -> Dict[str, jax.Array]:
  """``{stream: [num_seeds] keys}``: seed ``s`` splits ``fold_in(master, s)`` into the streams.

  Integer work only: the same keys jitted or not, on any backend.
  """
  keys = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(master, s), len(streams)))(
      jnp.arange(num_seeds))
  return {name: keys[:, i] for i, name in enumerate(streams)}
