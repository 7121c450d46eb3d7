"""Seeds as a sharded axis, and checkpoints that make a sweep resumable.

Sharding: every array with a leading seeds axis is laid out over a 1-D
``Mesh`` of all devices (``NamedSharding(mesh, P('seeds'))``). Jitted,
vmapped functions then run each device's seeds where they live; the same code
runs on one CPU, one GPU or many, and multi-host after
``jax.distributed.initialize()`` (every process builds the same full arrays
from the same keys and keeps its devices' slices). The seeds axis must be a
multiple of the device count: ``padded_size`` says how many seeds to build;
the padded seeds are real extra seeds whose results the caller drops.

Checkpoints: ``Checkpointer`` saves a pytree (train state and loss history)
with orbax after every chunk; a rerun restores the newest complete one.
Orbax writes to a temporary folder and renames it, so a run killed mid-save
leaves the previous checkpoint intact.
"""

import os
from typing import Any, Optional, Tuple

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

SEEDS_AXIS = 'seeds'


def seed_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``'seeds'`` over ``devices`` (default: all global devices)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (SEEDS_AXIS,))


def padded_size(num_seeds: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh size that is >= ``num_seeds``."""
  if num_seeds < 1:
    raise ValueError(f'num_seeds must be >= 1, got {num_seeds}')
  n = mesh.devices.size
  return -(-num_seeds // n) * n


def shard_seeds(tree: Any, mesh: Mesh) -> Any:
  """Lays every leaf's leading (seeds) axis over the mesh.

  Every process must pass the same full arrays (as built from the same keys);
  each device receives its slice. Leading axes must be multiples of the mesh
  size (see ``padded_size``).
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
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree_util.tree_map(put, tree)


def to_host(tree: Any) -> Any:
  """Numpy copies of (possibly sharded, possibly multi-host) arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(
      lambda v: np.asarray(multihost_utils.process_allgather(v, tiled=True)), tree)


class Checkpointer:
  """Orbax checkpoints of one training stage in ``folder``, keyed by step.

  ``save(step, tree)`` after each chunk; ``restore(template)`` returns
  ``(step, tree)`` of the newest complete checkpoint (restored with the
  shardings of ``template``), or None.
  """

  def __init__(self, folder: str, max_to_keep: int = 1):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.folder = os.path.abspath(folder)
    self._manager = ocp.CheckpointManager(
        self.folder, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False))

  def save(self, step: int, tree: Any) -> None:
    self._manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
    self._manager.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore(self, template: Any) -> Optional[Tuple[int, Any]]:
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree_util.tree_map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, 'sharding', None)),
        template)
    return step, self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self._manager.close()
