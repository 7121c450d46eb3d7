"""Robust-feature datasets (Ilyas et al. 2019) by representation matching.

With a robust (adversarially trained) model's penultimate representation
``g`` (its last hidden layer's post-ReLU activations), each training image
``x`` gets a new image ``x_r``: start from another image (or noise) ``x0``
and minimize ``||g(x_r) - g(x)||_2`` by normalized (L2) gradient steps,
clipping to the input range after each step (PAPER.md section 6)::

    x_r <- clip(x_r - step_size * grad / ||grad||_2, lo, hi)

The dataset is ``{(x_r, label of x)}``. In the teacher-student setting the
label of ``x`` is the teacher's output at ``x``: ``paired_regression_loss``
fits a student at ``x_r`` to the teacher at ``x``.

Everything is jitted: ``lax.scan`` over steps, batched over examples, and
``lax.map`` over batches of examples so memory stays bounded (or, with a
progress callback, one jitted call per batch). With a ``mesh`` each batch's
examples are spread over its devices (on a CPU, one device per core).

Batch size matters on a CPU: the step is memory-bound, and it is fastest when a
device's slice of the batch fits in its caches. Measured on this project's
2-core machine with the MNIST teacher's architecture (conv 8, 16; dense 32;
``python -m benchmarks.rf_matching``): 124 us per image and step for batches
of 1,024 on one device, 101 over 2 devices, 72 for batches of 128 over 2
devices.
"""

import time
from typing import Callable, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from tsrobust import sweep
from tsrobust import train

__all__ = ['STARTS', 'RepFn', 'penultimate', 'representation_distance',
           'match_representation', 'starting_points', 'robust_feature_dataset',
           'matching_report', 'paired_regression_loss']

STARTS = ('permutation', 'noise')

RepFn = Callable[[chex.Array], chex.Array]


def penultimate(apply_fn: Callable, params: chex.ArrayTree) -> RepFn:
  """``x [N, ...] -> [N, R]``: a model's last hidden layer's activations, flattened.

  ``apply_fn(params, x)`` returns ``(outputs, activations)`` (``models.MLP`` /
  ``cnn.CNN``); the representation is ``activations[-1]``.

  >>> from tsrobust import models
  >>> model = models.MLP((3, 2), 4)
  >>> params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
  >>> penultimate(model.apply, params)(jnp.ones((7, 5))).shape  # the 2-wide last hidden layer
  (7, 2)
  """
  def rep(x):
    acts = apply_fn(params, x)[1]
    if not acts:
      raise ValueError('the model has no hidden layer, so no penultimate representation')
    return acts[-1].reshape(x.shape[0], -1)
  return rep


def representation_distance(rep_fn: RepFn, x: chex.Array, target_rep: chex.Array) -> chex.Array:
  """``[N]`` ``||g(x_i) - target_i||_2`` for ``x [N, ...]`` and ``target_rep [N, R]``.

  >>> rep = lambda x: 2 * x
  >>> representation_distance(rep, jnp.array([[1.0, 0.0]]), jnp.array([[2.0, 3.0]])).tolist()
  [3.0]
  """
  rep = rep_fn(x)
  chex.assert_equal_shape([rep, target_rep])
  return jnp.sqrt(((rep - target_rep) ** 2).sum(-1))


def match_representation(rep_fn: RepFn, x0: chex.Array, target_rep: chex.Array, *,
                         steps: int, step_size: chex.Numeric,
                         clip_range: Optional[Tuple[float, float]] = (0.0, 1.0)) -> chex.Array:
  """Images whose representation approaches ``target_rep``, from ``x0``.

  ``steps`` normalized gradient steps on ``||g(x) - target||_2`` per example
  (each example's gradient divided by its own L2 norm), each followed by
  clipping to ``clip_range`` (None: no clipping).

  Args:
    rep_fn: ``[N, ...] -> [N, R]`` representation (each row depends only on
      its own example).
    x0: ``[N, ...]`` starting images.
    target_rep: ``[N, R]`` representations to match.
    steps: number of steps (static, >= 0).
    step_size: L2 length of each step.
    clip_range: valid input range, or None.

  Returns:
    ``[N, ...]`` images, the shape of ``x0``.
  """
  if steps < 0:
    raise ValueError(f'steps must be >= 0, got {steps}')
  chex.assert_rank(target_rep, 2)
  chex.assert_equal_shape_prefix([x0, target_rep], 1)

  def total_distance(x):
    rep = rep_fn(x)
    return jnp.sqrt(((rep - target_rep) ** 2).sum(-1) + 1e-12).sum()
  grad_fn = jax.grad(total_distance)

  def step(x, _):
    g = grad_fn(x)
    norm = jnp.sqrt((g.reshape(g.shape[0], -1) ** 2).sum(-1))
    g = g / jnp.maximum(norm, 1e-12).reshape((-1,) + (1,) * (g.ndim - 1))
    x = x - step_size * g
    if clip_range is not None:
      x = jnp.clip(x, clip_range[0], clip_range[1])
    return x, None
  x, _ = jax.lax.scan(step, x0, None, length=steps)
  return x


def starting_points(key: chex.PRNGKey, x: chex.Array, start: str = 'permutation',
                    noise_range: Tuple[float, float] = (0.0, 1.0)) -> chex.Array:
  """``[N, ...]`` starting images ``x0`` for the examples ``x [N, ...]``.

  ``'permutation'``: another training image - a random cyclic shift of a
  random permutation, so no example starts from itself (N >= 2);
  ``'noise'``: uniform noise in ``noise_range``.
  """
  if start not in STARTS:
    raise ValueError(f'start must be one of {STARTS}, got {start!r}')
  n = x.shape[0]
  if start == 'noise':
    return jax.random.uniform(key, x.shape, x.dtype, noise_range[0], noise_range[1])
  if n < 2:
    raise ValueError(f"start 'permutation' needs at least 2 examples, got {n}")
  perm = jax.random.permutation(key, n)
  source = jnp.zeros((n,), perm.dtype).at[perm].set(jnp.roll(perm, -1))
  return x[source]


def robust_feature_dataset(rep_fn: RepFn, x: chex.Array, key: chex.PRNGKey, *, steps: int,
                           step_size: chex.Numeric, start: str = 'permutation',
                           batch_size: Optional[int] = None,
                           clip_range: Optional[Tuple[float, float]] = (0.0, 1.0),
                           on_batch: Optional[Callable[[Dict[str, float]], None]] = None,
                           mesh: Optional[Mesh] = None) -> Tuple[chex.Array, chex.Array]:
  """The robust-feature images of ``x``: ``x_r[i]`` matches ``g(x[i])``.

  Each example starts from another training image (``start='permutation'``)
  or noise, and takes ``steps`` normalized L2 steps (``match_representation``),
  ``batch_size`` examples at once; the last batch is padded with copies of
  the last example, and the padding is dropped, so ``x_r[i]`` is always the
  match of ``x[i]``.

  Args:
    rep_fn: the robust model's representation (``penultimate``).
    x: ``[N, ...]`` training images.
    key: PRNG key (starting points).
    steps, step_size, clip_range: as in ``match_representation``.
    start: ``'permutation'`` or ``'noise'`` (``starting_points``; noise is
      uniform in ``clip_range``, or in [0, 1] without one).
    batch_size: examples matched at once. None: all at once. With a ``mesh``
      it is rounded up to a multiple of the mesh's device count.
    on_batch: None: one traceable computation (``lax.map`` over the batches;
      the function can be jitted). A callback: the batches run one after
      another, each as one jitted call (compiled once), and after each the
      callback gets ``step`` (examples done), ``num_steps`` (N), ``loss``
      (the batch's mean representation distance at the end), ``steps_per_sec``
      (examples per second) and ``eta_sec`` - the ``on_chunk`` progress
      report of ``train.train_seeds``. Not traceable (it calls back to Python).
    mesh: None: each batch runs where ``x`` lives. A 1-D mesh
      (``sweep.seed_mesh()``): each batch's examples are laid out over its
      devices (``sweep.shard_seeds``; every process passes the same ``x``).
      The matches are the same up to float rounding.

  Returns:
    ``(x_r, x0)``, both ``[N, ...]``: the matched images and their starts.
  """
  n = x.shape[0]
  batch_size = n if batch_size is None else min(batch_size, n)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if mesh is not None:
    if mesh.devices.ndim != 1:
      raise ValueError(f'mesh must be 1-D (sweep.seed_mesh()), got axes {mesh.axis_names}')
    batch_size = sweep.padded_size(batch_size, mesh)
    mesh = Mesh(mesh.devices, (sweep.SEEDS_AXIS,))  # the axis name sweep.shard_seeds lays out
  x0 = starting_points(key, x, start, clip_range if clip_range is not None else (0.0, 1.0))
  num_batches = -(-n // batch_size)

  def pad(v, size):
    m = v.shape[0]
    return jnp.concatenate([v, jnp.repeat(v[-1:], size - m, axis=0)]) if m < size else v

  def one_batch(args):
    xb, x0b = args
    if mesh is not None:
      spread = NamedSharding(mesh, PartitionSpec(sweep.SEEDS_AXIS))
      xb, x0b = (jax.lax.with_sharding_constraint(v, spread) for v in (xb, x0b))
    target = jax.lax.stop_gradient(rep_fn(xb))
    x_r = match_representation(rep_fn, x0b, target, steps=steps, step_size=step_size,
                               clip_range=clip_range)
    return x_r, representation_distance(rep_fn, x_r, target)

  if on_batch is None:
    def batched(v):
      v = pad(v, num_batches * batch_size)
      return v.reshape((num_batches, batch_size) + v.shape[1:])
    x_r, _ = jax.lax.map(one_batch, (batched(x), batched(x0)))
    return x_r.reshape((-1,) + x.shape[1:])[:n], x0

  match = jax.jit(one_batch)
  parts, t0 = [], time.perf_counter()
  for first in range(0, n, batch_size):
    xb, x0b = x[first:first + batch_size], x0[first:first + batch_size]
    m = xb.shape[0]
    batch = (pad(xb, batch_size), pad(x0b, batch_size))
    if mesh is not None:
      batch = sweep.shard_seeds(batch, mesh)
    xr_b, dist = sweep.to_host(match(batch))  # waits for the batch (dispatch is asynchronous)
    parts.append(xr_b[:m])
    loss = float(dist[:m].mean())
    done, elapsed = first + m, time.perf_counter() - t0
    on_batch({'step': done, 'num_steps': n, 'loss': loss,
              'steps_per_sec': done / elapsed, 'eta_sec': (n - done) * elapsed / done})
  x_r = jnp.asarray(np.concatenate(parts))
  chex.assert_equal_shape([x_r, x])
  return x_r, x0


def matching_report(rep_fn: RepFn, x: chex.Array, x_r: chex.Array,
                    x0: chex.Array) -> Dict[str, float]:
  """How well ``x_r [N, ...]`` matches ``g(x)``, beside where matching started (``x0``).

  Returns:
    ``rep_distance_start`` / ``rep_distance_end``: mean over examples of
    ``||g(x0_i) - g(x_i)||_2`` / ``||g(x_r_i) - g(x_i)||_2``; ``rep_norm``: mean
    ``||g(x_i)||_2``, the scale the distances compare with.
  """
  chex.assert_equal_shape([x, x_r, x0])

  @jax.jit
  def distances(x, x_r, x0):
    target = rep_fn(x)
    return (representation_distance(rep_fn, x0, target).mean(),
            representation_distance(rep_fn, x_r, target).mean(),
            jnp.sqrt((target ** 2).sum(-1)).mean())
  d0, d1, norm = (float(v) for v in distances(x, x_r, x0))
  return {'rep_distance_start': d0, 'rep_distance_end': d1, 'rep_norm': norm}


def paired_regression_loss(student_apply: Callable, teacher_apply: Callable, loss: str,
                           batch_size: int) -> Callable:
  """Standard training on a robust-feature dataset, labels from the teacher at the sources.

  Each step draws ``batch_size`` indices ``i`` and fits the student at
  ``data_args['robust_x'][i]`` to the teacher at ``data_args['train_x'][i]``
  (the image whose representation ``x_r`` matched), with ``loss`` as in
  ``train.teacher_loss``.

  Returns:
    ``loss_fn(params, teacher_params, data_args, key) -> scalar`` (a
    ``train.LossFn``).
  """
  if loss not in train.LOSSES:
    raise ValueError(f'loss must be one of {train.LOSSES}, got {loss!r}')

  def loss_fn(params, teacher_params, data_args, key):
    xr, xs = data_args['robust_x'], data_args['train_x']
    chex.assert_equal_shape([xr, xs])
    idx = jax.random.randint(key, (batch_size,), 0, xs.shape[0])
    return train.teacher_loss(student_apply(params, xr[idx])[0],
                              teacher_apply(teacher_params, xs[idx])[0], loss)
  return loss_fn
