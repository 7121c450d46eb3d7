"""Convolutional teachers and students for images.

A ``CNN`` is a stack of conv-ReLU(-pool) blocks followed by ReLU Dense layers
and a Dense output layer. It follows ``models.MLP``'s contract: ``apply``
returns ``(outputs, activations)`` where ``activations`` holds the post-ReLU
activations of every hidden layer, first layer first - conv layers as
``[N, H, W, C]`` (before pooling), Dense layers as ``[N, n]``. Specialization
(``specialization.network_stats``) treats a conv channel's activations over
samples *and* positions as one node.

The student family of a teacher multiplies every hidden width (conv channels
and Dense widths) by ``k`` (``student_of``), as for the MLP.
"""

import functools
import numbers
from typing import Callable, Optional, Sequence, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from tsrobust import models
from tsrobust import numerics
from tsrobust import sweep

__all__ = ['POOLS', 'im2col', 'conv2d', 'pool2x2', 'CNN', 'make_cnn', 'layer_names',
           'hidden_widths', 'student_of', 'init_params']

POOLS = ('max', 'avg', 'none')


def im2col(x: chex.Array, kernel_size: int) -> chex.Array:
  """``[N, H, W, k * k * C]`` patches of ``x [N, H, W, C]`` with zero ('SAME') padding.

  Built from ``k * k`` shifted slices, so that a conv is one matmul (``conv2d``;
  under ``vmap`` over seeds it runs one seed at a time), and its input gradient is
  pads and slices. On CPU this is several times faster than a vmapped
  ``lax.conv_general_dilated`` (a grouped convolution) for the small nets
  used here. Patch entry ``(i, j, c)`` is at index ``(i * k + j) * C + c``,
  matching a ``[k, k, C, C_out]`` kernel reshaped to ``[k * k * C, C_out]``.
  """
  chex.assert_rank(x, 4)
  lo = (kernel_size - 1) // 2
  hi = kernel_size - 1 - lo
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kernel_size)
                          for j in range(kernel_size)], axis=-1)


def pool2x2(x: chex.Array, kind: str) -> chex.Array:
  """2 x 2 max or average pooling with stride 2 of ``[N, H, W, C]`` (odd sides floored).

  A reshape and a reduction: its gradient is much cheaper on CPU than the
  ``select_and_scatter`` of ``nn.max_pool``, and the values are the same.
  """
  chex.assert_rank(x, 4)
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c)
  if kind == 'max':
    return x.max(axis=(2, 4))
  if kind == 'avg':
    return x.mean(axis=(2, 4))
  raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")


def _one_at_a_time(fun: Callable[..., chex.Array]) -> Callable[..., chex.Array]:
  """``fun`` (arrays -> one array) whose ``vmap`` is a ``lax.map`` of ``fun`` over the mapped
  axis (unmapped arguments broadcast): same values, one example's working set at a time.

  Not differentiable itself (``custom_vmap``): used only inside ``conv2d``'s ``custom_vjp``.
  """
  fun_ = custom_vmap(fun)

  @fun_.def_vmap
  def rule(axis_size, in_batched, *args):
    args = tuple(a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                 for a, b in zip(args, in_batched))
    return jax.lax.map(lambda a: fun(*a), args), True
  return fun_


@functools.lru_cache(maxsize=None)
def _conv2d_fn(kernel_size: int) -> Callable[[chex.Array, chex.Array], chex.Array]:
  def plain(x, w):
    return numerics.matmul(im2col(x, kernel_size), w)

  forward = _one_at_a_time(plain)
  input_grad = _one_at_a_time(lambda x, w, g: jax.vjp(plain, x, w)[1](g)[0])
  weight_grad = _one_at_a_time(lambda x, w, g: jax.vjp(plain, x, w)[1](g)[1])

  @jax.custom_vjp
  def conv(x, w):
    return forward(x, w)
  conv.defvjp(lambda x, w: (forward(x, w), (x, w)),
              lambda res, g: (input_grad(*res, g), weight_grad(*res, g)))
  return conv


def conv2d(x: chex.Array, kernel: chex.Array,
           one_at_a_time: Optional[bool] = None) -> chex.Array:
  """Stride-1 ``'SAME'`` convolution ``[N, H, W, C] x [k, k, C, F] -> [N, H, W, F]``:
  ``im2col(x, k) @ kernel.reshape(k * k * C, F)``.

  ``one_at_a_time`` (default: on where the students run one at a time,
  ``sweep.default_seed_batching() == 'map'``, i.e. on a CPU unless ``--seed_batching``
  says otherwise): under ``vmap``
  (the students of ``train.train_seeds``) the forward pass, the input gradient and the
  weight gradient each run as a ``lax.map`` over the mapped axis instead of one batched
  im2col and matmul: the same operations, so the same values, but one student's patches
  at a time stay in cache. On one CPU core the PGD-AT step of 32 image students got 1.3x
  faster (benchmarks/RESULTS.md, issue 35). It is then differentiable once in reverse mode
  (``custom_vjp``; no forward mode, no second derivatives: pass ``False`` for those). On a
  GPU or TPU the batched matmul is kept: there the students run in parallel.

  >>> x, k = jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 5))
  >>> float(conv2d(x, k)[0, 1, 1, 0]), float(conv2d(x, k)[0, 0, 0, 0])  # interior, corner
  (27.0, 12.0)
  """
  chex.assert_rank([x, kernel], [4, 4])
  k, _, c_in, features = kernel.shape
  w = kernel.reshape(k * k * c_in, features)
  if one_at_a_time is None:
    one_at_a_time = sweep.default_seed_batching() == 'map'
  if not one_at_a_time:
    return numerics.matmul(im2col(x, k), w)
  return _conv2d_fn(k)(x, w)


class _Conv(nn.Module):
  """Stride-1 'SAME' convolution as im2col + matmul (parameters laid out as ``nn.Conv``'s)."""
  features: int
  kernel_size: int
  use_bias: bool
  kernel_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    k, c_in = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (k, k, c_in, self.features))
    y = conv2d(x, kernel)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,))
    return y


class CNN(nn.Module):
  """Conv-ReLU(-pool) blocks, then ReLU Dense layers, then a Dense output.

  Attributes:
    conv_widths: output channels of each conv layer (``kernel_size`` square
      kernels, stride 1, ``'SAME'`` padding).
    dense_widths: width of each hidden Dense layer after flattening.
    out_dim: number of outputs.
    kernel_size: side of the conv kernels.
    pool: ``'max'`` or ``'avg'`` (2 x 2 window, stride 2, after every conv
      block; odd sides are floored) or ``'none'``.
    use_bias: whether every layer has a bias.
    init_scale: kernels start as N(0, init_scale**2 / fan_in); biases at 0.
    relu_grad_temperature: 0 (exact ReLU gradients) or the temperature of the
      surrogate gradient (``models.relu``, ``models.surrogate``).
  """
  conv_widths: Sequence[int]
  dense_widths: Sequence[int]
  out_dim: int
  kernel_size: int = 3
  pool: str = 'max'
  use_bias: bool = True
  init_scale: float = 1.0
  relu_grad_temperature: float = 0.0

  @nn.compact
  def __call__(self, x: chex.Array) -> Tuple[chex.Array, Tuple[chex.Array, ...]]:
    """Args: x [N, H, W, C_in]. Returns (outputs [N, out_dim], activations).

    ``activations`` is ``(h_1 [N, H, W, c_1], ..., h_conv [N, H', W', c_last],
    d_1 [N, n_1], ...)``: one entry per conv layer (post-ReLU, pre-pool) then
    one per hidden Dense layer.
    """
    chex.assert_rank(x, 4)
    if self.pool not in POOLS:
      raise ValueError(f'pool must be one of {POOLS}, got {self.pool!r}')
    kernel_init = nn.initializers.variance_scaling(
        self.init_scale ** 2, 'fan_in', 'normal')
    h = x
    acts = []
    for i, width in enumerate(self.conv_widths):
      h = models.relu(_Conv(width, self.kernel_size, self.use_bias, kernel_init,
                            name=f'conv_{i}')(h), self.relu_grad_temperature)
      acts.append(h)
      if self.pool != 'none':
        h = pool2x2(h, self.pool)
    h = h.reshape(h.shape[0], -1)
    for i, width in enumerate(self.dense_widths):
      h = models.relu(nn.Dense(width, use_bias=self.use_bias, kernel_init=kernel_init,
                               precision=numerics.PRECISION, name=f'dense_{i}')(h),
                      self.relu_grad_temperature)
      acts.append(h)
    out = nn.Dense(self.out_dim, use_bias=self.use_bias, kernel_init=kernel_init,
                   precision=numerics.PRECISION, name='output')(h)
    return out, tuple(acts)


def _check_widths(name: str, widths: Sequence[int], allow_empty: bool) -> None:
  if not isinstance(widths, (tuple, list)) or (not widths and not allow_empty):
    raise ValueError(f'{name} must be a {"" if allow_empty else "non-empty "}sequence of '
                     f'integers >= 1, got {widths!r}')
  for w in widths:
    if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1:
      raise ValueError(f'{name} must hold integers >= 1, got {w!r} in {widths!r}')


def make_cnn(conv_widths: Sequence[int], dense_widths: Sequence[int], out_dim: int, *,
             kernel_size: int = 3, pool: str = 'max', use_bias: bool = True,
             init_scale: float = 1.0) -> CNN:
  """A validated ``CNN`` (the dataclass itself accepts anything until applied).

  Raises:
    ValueError: naming the argument and what is allowed.

  >>> model = make_cnn((8, 16), (32,), 10)
  >>> hidden_widths(model), layer_names(model)
  ((8, 16, 32), ('conv_0', 'conv_1', 'dense_0', 'output'))
  >>> make_cnn((8,), (), 10, pool='median')
  Traceback (most recent call last):
  ValueError: pool must be one of ('max', 'avg', 'none'), got 'median'
  """
  _check_widths('conv_widths', conv_widths, allow_empty=False)
  _check_widths('dense_widths', dense_widths, allow_empty=True)
  if isinstance(out_dim, bool) or not isinstance(out_dim, numbers.Integral) or out_dim < 1:
    raise ValueError(f'out_dim must be an integer >= 1, got {out_dim!r}')
  if (isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral)
      or kernel_size < 1):
    raise ValueError(f'kernel_size must be an integer >= 1, got {kernel_size!r}')
  if pool not in POOLS:
    raise ValueError(f'pool must be one of {POOLS}, got {pool!r}')
  if not init_scale > 0:
    raise ValueError(f'init_scale must be > 0, got {init_scale!r}')
  return CNN(tuple(int(w) for w in conv_widths), tuple(int(w) for w in dense_widths),
             int(out_dim), int(kernel_size), pool, bool(use_bias), float(init_scale))


def layer_names(model: CNN) -> Tuple[str, ...]:
  """Names of the layers of ``model`` in order (conv, dense, output last)."""
  return (tuple(f'conv_{i}' for i in range(len(model.conv_widths)))
          + tuple(f'dense_{i}' for i in range(len(model.dense_widths))) + ('output',))


def hidden_widths(model: CNN) -> Tuple[int, ...]:
  """Width of every hidden layer (conv channels, then Dense widths), as in ``activations``."""
  return tuple(model.conv_widths) + tuple(model.dense_widths)


def student_of(teacher: CNN, width_mult: int, init_scale: float = 1.0) -> CNN:
  """The over-realized student family of ``teacher``: every hidden width times ``k``.

  >>> hidden_widths(student_of(make_cnn((8, 16), (32,), 10), width_mult=2))
  (16, 32, 64)
  """
  if (isinstance(width_mult, bool) or not isinstance(width_mult, numbers.Integral)
      or width_mult < 1):
    raise ValueError(f'width_mult must be an integer >= 1, got {width_mult!r}')
  if not init_scale > 0:
    raise ValueError(f'init_scale must be > 0, got {init_scale!r}')
  width_mult = int(width_mult)
  return make_cnn(tuple(width_mult * m for m in teacher.conv_widths),
                  tuple(width_mult * m for m in teacher.dense_widths), teacher.out_dim,
                  kernel_size=teacher.kernel_size, pool=teacher.pool,
                  use_bias=teacher.use_bias, init_scale=init_scale)


def init_params(key: chex.PRNGKey, model: CNN, image_shape: Sequence[int]) -> chex.ArrayTree:
  """Parameters of ``model`` for images of shape ``(H, W, C)``.

  Jitted (``model.init`` run eagerly dispatches, and compiles, every op of the
  forward pass one by one: seconds per call on CPU); works under ``vmap``.

  >>> model = make_cnn((2,), (4,), 3)
  >>> params = init_params(jax.random.PRNGKey(0), model, (8, 8, 1))
  >>> out, acts = model.apply(params, jnp.zeros((5, 8, 8, 1)))
  >>> out.shape, [a.shape for a in acts]  # conv activations [N, H, W, C], Dense [N, C]
  ((5, 3), [(5, 8, 8, 2), (5, 4)])
  """
  if len(image_shape) != 3:
    raise ValueError(f'image_shape must be (H, W, C), got {tuple(image_shape)!r}')
  return jax.jit(model.init)(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
