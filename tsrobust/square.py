"""Square attack (Andriushchenko et al., ECCV 2020): gradient-free random search.

``square`` maximizes a per-example objective (e.g. the margin
``max_{k != t} s_k - s_t``) over perturbations in an L-inf or L2 ball using
only forward evaluations, so it is unaffected by masked / zero gradients:
when it breaks points that gradient attacks (``attacks.pgd``) could not, the
model masks gradients.

Search layout. The search runs on a variable ``z`` laid out channels-first,
``[N, C, H, W]``; windows ("squares") are rectangles over ``(H, W)`` that
cover all ``C`` channels:

* images ``x: [N, H, W, C]``: ``z`` is ``x``'s layout transposed to
  ``[N, C, H, W]``; windows are ``s x s`` squares with ``s ~ sqrt(p * H * W)``
  (they cover a fraction ``~p`` of the pixels, as in the paper);
* vectors ``x: [N, D]``: ``z`` is ``[N, 1, 1, D]``; windows are contiguous
  segments of length ``s ~ p * D`` (a fraction ``~p`` of the coordinates);
* with ``basis`` (``U: [D, k]``, orthonormal columns): ``z`` holds subspace
  coordinates ``c``, laid out ``[N, 1, 1, k]`` (windows are segments of
  ``c``), and ``delta = (c @ U^T)`` reshaped like ``x``.

(Channels-first keeps a long axis minor: laid out ``[N, H, W, C]`` with ``C = 1``
- vectors, MNIST - every elementwise step of the search ran several times slower
on XLA:CPU; ``benchmarks/RESULTS.md``, "The main job's evaluation".)

Schedule of p (``p_schedule``): ``p_init`` is halved each time the
iteration index, rescaled to 10,000 queries (``floor(i * 10000 / queries)``
as AutoAttack does), passes 10, 50, 200, 500, 1000, 2000, 4000, 6000 and
8000 (so ``p`` ends at ``p_init / 512``).

L-inf (``norm='linf'``):

* initialization: vertical stripes, ``z[n, :, w, c] = +-eps`` (a random sign
  per column and channel; for vectors and subspace coordinates, a random
  sign per coordinate);
* step: side ``s = round(sqrt(p H W))`` (vectors: ``round(p D)``), clipped to
  ``[1, min(H, W) - 1]`` (vectors: ``[1, D - 1]``); a window at a uniformly random position (per
  example) is set to ``+-eps`` with one random sign per channel. As in the
  paper, a sign vector that would leave the window unchanged is rejected:
  up to ``_LINF_TRIES`` sign vectors are drawn and the first that changes
  the window is used.

L2 (``norm='l2'``), the paper's mass-moving scheme:

* initialization: the paper's grid of tiles (side ``max(min(H, W) // 5, 1)``;
  1-D: length ``max(D // 25, 1)``), each filled with the window pattern below
  times a random sign per channel, then scaled to ``||z||_2 = eps``;
* window pattern: two halves of opposite sign, each a "pseudo-Gaussian" of
  nested centred rectangles (ring ``r`` from the centre has value
  ``sum_{j > r} 1 / j^2`` up to the outermost ring), each half of unit norm,
  the whole of unit norm; 2-D windows are split along rows or columns at
  random, 1-D segments into their left and right halves;
* step: side ``s = round(sqrt(p H W))`` (vectors: ``round(p D)``), at least 3,
  made odd, at most ``min(H, W)`` (vectors: ``D``). Two windows ``W1``, ``W2`` of that
  side at independent random positions. Per channel, the mass of ``z`` in
  ``W1 u W2`` plus an equal share of the unused budget
  ``max(eps^2 - ||z||^2, 0)`` is put into ``W1`` as
  ``pattern * sign + z|W1 / ||z outside W2||``, rescaled to that mass,
  and ``W2 \\ W1`` is zeroed. So ``||z_new||_2 = eps`` (all the budget is
  used) before clipping to ``clip_range`` gives some up (it is reclaimed at
  later steps).

Acceptance: per example, a candidate replaces the current point when the
objective does not decrease or ``success_fn`` says the candidate succeeds
(the paper accepts strict increases only; accepting ties makes the search walk
across a plateau - a model whose gradient and margin are flat, e.g. masked -
instead of standing still; elsewhere ties are rare); points that have succeeded
are frozen (they keep their
successful perturbation). Each iteration evaluates ``objective_fn`` (and
``success_fn``) once on the whole batch: ``queries + 1`` evaluations in all
(the extra one is the initialization). The loop is a ``jax.lax.scan``;
``queries`` is static and ``eps`` may be traced.
"""

import math
from typing import Callable, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import attacks
from tsrobust import numerics

__all__ = ['p_schedule', 'basis_from_projector', 'square']

Fn = Callable[[chex.Array], chex.Array]

# Iteration thresholds (on a 10,000-query scale) at which p is halved.
_P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# L-inf: sign vectors drawn per step to find one that changes the window.
_LINF_TRIES = 8
_TINY = 1e-12


def p_schedule(queries: int, p_init: float = 0.8) -> np.ndarray:
  """The fraction ``p`` of the input resampled at each iteration.

  Args:
    queries: number of iterations (>= 1).
    p_init: initial fraction, in ``(0, 1]``.

  Returns:
    ``[queries]`` float64 numpy array: ``p_init / 2^h(i)``, where ``h(i)`` counts
    the thresholds ``(10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)`` that
    ``floor(i * 10000 / queries)`` exceeds.
  """
  _check_schedule_args(queries, p_init)
  scaled = (np.arange(queries, dtype=np.int64) * 10000) // queries
  halvings = (scaled[:, None] > np.asarray(_P_THRESHOLDS)[None, :]).sum(1)
  return p_init / 2.0 ** halvings


def basis_from_projector(projector: chex.Array, rank: int) -> chex.Array:
  """Orthonormal basis of the range of an orthogonal projector.

  Args:
    projector: ``[D, D]`` symmetric projector ``P``.
    rank: number of columns (static), ``1 <= rank <= D``; normally ``trace(P)``.

  Returns:
    ``[D, rank]``: the eigenvectors of the ``rank`` largest eigenvalues of ``P``
    (``jnp.linalg.eigh``), so ``U U^T == P`` when ``rank == trace(P)``.
  """
  if projector.ndim != 2 or projector.shape[0] != projector.shape[1]:
    raise ValueError(f'projector must be a square [D, D] matrix, got shape {projector.shape}')
  d = projector.shape[0]
  if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= d:
    raise ValueError(f'rank must be an int in [1, {d}], got {rank!r}')
  _, vectors = jnp.linalg.eigh((projector + projector.T) / 2)
  return vectors[:, d - rank:]


def _check_schedule_args(queries: int, p_init: float) -> None:
  if not isinstance(queries, (int, np.integer)) or queries < 1:
    raise ValueError(f'queries must be an int >= 1, got {queries!r}')
  if not 0 < p_init <= 1:
    raise ValueError(f'p_init must be in (0, 1], got {p_init!r}')


def _side_lengths(queries: int, p_init: float, norm: str, rows: int, cols: int) -> np.ndarray:
  """``[queries]`` int32 window sides for a ``rows x cols`` layout (``rows == 1``: 1-D)."""
  p = p_schedule(queries, p_init)
  if rows == 1:
    side, room = np.round(p * cols), cols
  else:
    side, room = np.round(np.sqrt(p * rows * cols)), min(rows, cols)
  if norm == 'linf':
    side = np.clip(side, 1, max(room - 1, 1))
  else:
    side = np.maximum(side, 3)
    side = side + (side % 2 == 0)
    side = np.clip(side, 1, room)
  return side.astype(np.int32)


def _ring_table(size: int) -> jnp.ndarray:
  """``T[n] = sum_{j=1}^{n} 1 / j^2`` for ``n = 0 .. size``."""
  return jnp.asarray(np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, size + 1) ** 2)]),
                     jnp.float32)


def _normalize(v: chex.Array) -> chex.Array:
  """``v / ||v||_2`` over all but the leading axis (0 stays 0)."""
  n = jnp.sqrt((v * v).reshape(v.shape[0], -1).sum(-1))
  return v / jnp.maximum(n, _TINY).reshape((-1,) + (1,) * (v.ndim - 1))


def _window_pattern(u: chex.Array, v: chex.Array, len_u: chex.Numeric, len_v: chex.Numeric,
                    inside: chex.Array, table: chex.Array) -> chex.Array:
  """The L2 window pattern: two pseudo-Gaussian halves of opposite sign.

  Args:
    u: ``[N, A, B]`` int coordinates relative to the window along the split axis.
    v: ``[N, A, B]`` int coordinates relative to the window along the other axis.
    len_u, len_v: the window's lengths along ``u`` and ``v`` (int, may be traced).
    inside: ``[N, A, B]`` bool, the window.
    table: ``_ring_table`` covering ``max(len_u, len_v) // 2 + 1``.

  Returns:
    ``[N, A, B]`` float32, zero outside the window, unit L2 norm per example.
  """
  half = len_u // 2
  top = len(table) - 1

  def rings(uu, a, b):  # Nested centred rectangles of an a x b block.
    outer = jnp.maximum(a // 2, b // 2) + 1
    ring = jnp.maximum(jnp.abs(uu - a // 2), jnp.abs(v - b // 2))
    return table[jnp.clip(outer, 0, top)] - table[jnp.clip(ring, 0, top)]

  first = jnp.where(inside & (u < half), rings(u, half, len_v), 0.0)
  second = jnp.where(inside & (u >= half), rings(u - half, len_u - half, len_v), 0.0)
  return _normalize(_normalize(first) - _normalize(second))


def _randint(u: chex.Array, size: chex.Numeric) -> chex.Array:
  """Uniform ints in ``[0, size)`` from uniforms ``u`` in ``[0, 1)``."""
  return jnp.minimum(jnp.floor(u * size).astype(jnp.int32), size - 1)


def _window_mask(u_row: chex.Array, u_col: chex.Array, rows: int, cols: int,
                 side: chex.Numeric):
  """A window per example at a uniformly random position.

  Args:
    u_row, u_col: ``[N]`` uniforms in ``[0, 1)`` that place the window.
    rows, cols: the layout's size.
    side: the window's side (int, may be traced).

  Returns:
    ``(mask [N, rows, cols] bool, row0 [N], col0 [N])``; the window is
    ``side x side`` (``1 x side`` when ``rows == 1``) at ``(row0, col0)``.
  """
  side_r = 1 if rows == 1 else side
  row0 = _randint(u_row, rows - side_r + 1)
  col0 = _randint(u_col, cols - side + 1)
  r = jnp.arange(rows)[None, :, None]
  c = jnp.arange(cols)[None, None, :]
  mask = ((r >= row0[:, None, None]) & (r < row0[:, None, None] + side_r)
          & (c >= col0[:, None, None]) & (c < col0[:, None, None] + side))
  return mask, row0, col0


def _l2_init(key: chex.PRNGKey, shape: Tuple[int, ...], eps: chex.Numeric,
             table: chex.Array) -> chex.Array:
  """The paper's L2 start: a grid of window patterns with random signs, norm ``eps``.

  ``shape`` is ``(N, H, W, C)``; the start is returned channels-first, ``[N, C, H, W]``.
  """
  n, rows, cols, chans = shape
  if rows == 1:
    tile_r, tile_c = 1, max(cols // 25, 1)
  else:
    tile_r = tile_c = max(min(rows, cols) // 5, 1)
  grid_r, grid_c = rows // tile_r, cols // tile_c
  # One draw (random numbers are costly to compile): [..., 0] orientation, [..., 1:] signs.
  coins = jax.random.uniform(key, (n * grid_r * grid_c * (1 + chans),)) < 0.5
  coins = coins.reshape(n, grid_r, grid_c, 1 + chans)
  ii = jnp.broadcast_to(jnp.arange(tile_r)[:, None], (tile_r, tile_c))[None]
  jj = jnp.broadcast_to(jnp.arange(tile_c)[None, :], (tile_r, tile_c))[None]
  inside = jnp.ones((1, tile_r, tile_c), bool)
  if rows == 1:  # Segments, split into left and right halves.
    tile = _window_pattern(jj, ii, tile_c, 1, inside, table)[0]
    tiles = jnp.broadcast_to(tile, (n, grid_r, grid_c, tile_r, tile_c))
  else:  # Square tiles, split along rows or columns at random.
    tile = _window_pattern(ii, jj, tile_r, tile_c, inside, table)[0]
    tiles = jnp.where(coins[..., :1, None], tile.T, tile)
  signs = jnp.where(coins[..., None, None, 1:], 1.0, -1.0)
  blocks = tiles[..., None] * signs  # [n, grid_r, grid_c, tile_r, tile_c, chans]
  blocks = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, grid_r * tile_r, grid_c * tile_c, chans)
  off_r, off_c = (rows - grid_r * tile_r) // 2, (cols - grid_c * tile_c) // 2
  z = jnp.pad(blocks, ((0, 0), (off_r, rows - grid_r * tile_r - off_r),
                       (off_c, cols - grid_c * tile_c - off_c), (0, 0)))
  return _normalize(z.transpose(0, 3, 1, 2)) * eps  # channels-first


def _channel_norms(v: chex.Array) -> chex.Array:
  """``[N, C, 1, 1]`` L2 norms per example and channel of ``[N, C, H, W]``."""
  return jnp.sqrt((v * v).sum((2, 3), keepdims=True))


def square(objective_fn: Fn, x: chex.Array, key: chex.PRNGKey, *, eps: chex.Numeric,
           queries: int, norm: str = 'linf', basis: Optional[chex.Array] = None,
           clip_range: Optional[Tuple[float, float]] = None,
           success_fn: Optional[Fn] = None, p_init: float = 0.8) -> chex.Array:
  """Square attack: the best perturbation found by random search, per example.

  See the module docstring for the search (windows, p schedule, L-inf and L2
  schemes, acceptance).

  Args:
    objective_fn: ``x_adv [N, ...] -> [N]`` objective to maximize (e.g. the
      margin ``max_{k != t} s_k - s_t``). Each entry must depend only on its
      own example. Never differentiated.
    x: ``[N, H, W, C]`` images or ``[N, D]`` vectors (any ``[N, ...]`` with
      ``basis``).
    key: PRNG key.
    eps: budget (>= 0), scalar. May be traced: changing it does not recompile.
    queries: number of iterations after the initialization (>= 1, static).
    norm: ``'linf'`` or ``'l2'`` (static).
    basis: ``[D, k]`` orthonormal columns, ``D = prod(x.shape[1:])``, or None.
      The search runs on the coordinates ``c: [N, k]`` (segments of ``c``) and
      ``delta = c @ basis^T``. L2: ``||c||_2 <= eps`` is exact. L-inf: each
      candidate is mapped into the feasible set with ``attacks.project``
      (subspace, then scaled into the box: feasible, not a vertex).
    clip_range: ``(lo, hi)`` valid input range, or None: ``x + delta`` is kept
      in range with ``attacks._clip_inputs`` (with a basis, ``delta`` is scaled
      down, not clipped, so it stays in the subspace). ``x`` must be in range.
    success_fn: ``x_adv [N, ...] -> [N]`` bool, or None. A point that succeeds
      is frozen with its successful perturbation.
    p_init: initial fraction of the input resampled per step, in ``(0, 1]``.

  Returns:
    ``delta`` with the shape of ``x``: feasible (``||delta|| <= eps``, in the
    subspace of ``basis``, ``x + delta`` in ``clip_range``), the best found
    (a candidate is accepted only if it is no worse, so it is the last accepted one).

  Raises:
    ValueError: ``queries < 1``, ``norm`` not in ``attacks.NORMS``, ``p_init``
      outside ``(0, 1]``, ``basis`` not ``[D, k >= 1]``, or ``x`` neither
      ``[N, H, W, C]`` nor ``[N, D]`` without a basis.
  """
  if norm not in attacks.NORMS:
    raise ValueError(f'norm must be one of {attacks.NORMS}, got {norm!r}')
  _check_schedule_args(queries, p_init)
  if x.ndim < 2:
    raise ValueError(f'x must be [N, ...] with at least 2 dims, got shape {x.shape}')
  n = x.shape[0]
  dim = math.prod(x.shape[1:])
  projector = None
  if basis is not None:
    if basis.ndim != 2 or basis.shape[0] != dim or basis.shape[1] < 1:
      raise ValueError(f'basis must be [D, k] with D = prod(x.shape[1:]) = {dim} and k >= 1, '
                       f'got shape {basis.shape}')
    basis = jnp.asarray(basis)
    layout = (n, 1, basis.shape[1], 1)  # (N, H, W, C) of the search; z is [N, C, H, W]
    projector = numerics.matmul(basis, basis.T)
  elif x.ndim == 4:
    layout = x.shape
  elif x.ndim == 2:
    layout = (n, 1, dim, 1)
  else:
    raise ValueError(f'x must be [N, H, W, C] images or [N, D] vectors without a basis, '
                     f'got shape {x.shape}')
  _, rows, cols, chans = layout
  sides = jnp.asarray(_side_lengths(queries, p_init, norm, rows, cols))
  table = _ring_table(max(rows, cols) + 2)
  dtype = x.dtype
  clip = clip_range if basis is None else None  # Clipping in the search space.
  search_shape = (n, chans, rows, cols)
  x_l = x.reshape(layout).transpose(0, 3, 1, 2) if basis is None else None

  def to_delta(z):
    """Search variable ``[N, C, H, W]`` -> feasible ``delta`` shaped like ``x``."""
    if basis is None:
      return z.transpose(0, 2, 3, 1).reshape(x.shape)
    delta = numerics.matmul(z.reshape(n, -1), basis.T).reshape(x.shape)
    delta = attacks.project(delta, eps, norm, projector)
    return attacks._clip_inputs(x, delta, clip_range, projector)

  def evaluate(z):
    xa = x + to_delta(z)
    obj = objective_fn(xa)
    chex.assert_shape(obj, (n,))
    if success_fn is None:
      succ = jnp.zeros((n,), bool)
    else:
      succ = success_fn(xa)
      chex.assert_shape(succ, (n,))
    return obj, succ.astype(bool)

  keys = jax.random.split(key, queries + 1)
  k_init = keys[0]
  if norm == 'linf':
    ones = jnp.ones(search_shape, dtype)
    plus = attacks._clip_inputs(x_l, eps * ones, clip) if clip is not None else eps * ones
    minus = attacks._clip_inputs(x_l, -eps * ones, clip) if clip is not None else -eps * ones
    stripes = (jax.random.uniform(k_init, (n * cols * chans,)) < 0.5).reshape(n, cols, chans)
    z0 = jnp.where(stripes.transpose(0, 2, 1)[:, :, None, :], plus, minus)
  else:
    z0 = _l2_init(k_init, layout, eps, table).astype(dtype)
    if clip is not None:
      z0 = attacks._clip_inputs(x_l, z0, clip)

  # One flat draw of uniforms per step (random numbers are costly to compile).
  draws = (2 + _LINF_TRIES * chans) if norm == 'linf' else (5 + chans)

  def draw(key):
    return jax.random.uniform(key, (draws * n,)).reshape(draws, n)

  def linf_candidate(z, u, side):
    mask = _window_mask(u[0], u[1], rows, cols, side)[0][:, None]
    signs = (u[2:] < 0.5).reshape(_LINF_TRIES, chans, n).transpose(0, 2, 1)
    moves_up = (mask & (plus != z)).any((2, 3))  # [n, chans]
    moves_down = (mask & (minus != z)).any((2, 3))
    changes = jnp.where(signs, moves_up, moves_down).any(-1)  # [tries, n]
    pick = jnp.argmax(changes, axis=0)  # The first that changes (else 0).
    sign = signs[pick, jnp.arange(n)][:, :, None, None]
    return jnp.where(mask, jnp.where(sign, plus, minus), z)

  def l2_candidate(z, u, side):
    in1, row1, col1 = _window_mask(u[0], u[1], rows, cols, side)
    in2 = _window_mask(u[2], u[3], rows, cols, side)[0]
    r = jnp.arange(rows)[None, :, None] - row1[:, None, None]
    c = jnp.arange(cols)[None, None, :] - col1[:, None, None]
    r, c = jnp.broadcast_to(r, in1.shape), jnp.broadcast_to(c, in1.shape)
    if rows == 1:
      pattern = _window_pattern(c, r, side, 1, in1, table)
    else:
      swap = (u[4] < 0.5)[:, None, None]
      pattern = _window_pattern(jnp.where(swap, c, r), jnp.where(swap, r, c), side, side,
                                in1, table)
    m1, m2 = in1[:, None], in2[:, None]
    union = m1 | m2
    unused = jnp.maximum(eps ** 2 - (z * z).sum((1, 2, 3), keepdims=True), 0.0)
    target = jnp.sqrt(_channel_norms(jnp.where(union, z, 0.0)) ** 2 + unused / chans)
    old = jnp.where(m1, z, 0.0) / (_channel_norms(jnp.where(m2, 0.0, z)) + 1e-10)
    sign = jnp.where(u[5:] < 0.5, 1.0, -1.0).T[:, :, None, None].astype(dtype)
    new = pattern[:, None].astype(dtype) * sign + old
    new = new * target / jnp.maximum(_channel_norms(new), _TINY)
    cand = jnp.where(union, 0.0, z) + jnp.where(m1, new, 0.0)
    cand = attacks.project(cand, eps, 'l2')
    return attacks._clip_inputs(x_l, cand, clip) if clip is not None else cand

  candidate = linf_candidate if norm == 'linf' else l2_candidate

  # Step i uses the uniforms of keys[i + 1], drawn one step ahead and carried: a carried
  # array is computed once per step. Drawn inside the step, XLA:CPU fuses the (unrolled)
  # hash into every elementwise consumer and recomputes it per element of [N, C, H, W]
  # (the search per query took 616-700 instead of 376-391 us at 2,048 examples of rank
  # 10; benchmarks/RESULTS.md). The same numbers either way.
  def step(carry, inputs):
    z, obj, succ, u = carry
    next_key, side = inputs
    z_new = candidate(z, u, side)
    obj_new, succ_new = evaluate(z_new)
    accept = ~succ & ((obj_new >= obj) | succ_new)
    z = jnp.where(accept.reshape(-1, 1, 1, 1), z_new, z)
    obj = jnp.where(accept, obj_new, obj)
    return (z, obj, succ | (accept & succ_new), draw(next_key)), None

  obj0, succ0 = evaluate(z0)
  # The last step's look-ahead draw (with keys[1] again) is discarded.
  next_keys = jnp.concatenate([keys[2:], keys[1:2]])
  (z, _, _, _), _ = jax.lax.scan(step, (z0, obj0, succ0, draw(keys[1])), (next_keys, sides))
  delta = to_delta(z)
  chex.assert_shape(delta, x.shape)
  return delta
