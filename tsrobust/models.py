"""Teacher and student networks.

Every model's ``apply`` returns ``(outputs, activations)`` where
``activations`` is a tuple holding the post-ReLU activations of every hidden
layer, first layer first. Specialization is measured on those.

Random teachers follow Tian (2019)'s code: Gaussian weights with each node's
fan-in vector normalized to unit norm, an optional Gaussian bias, and an
optional *strength decay* that scales the fan-out weights of hidden node ``j``
by ``(j + 1) ** -decay`` so that teacher nodes have different strengths.
Students are the same family with every hidden width multiplied by ``k``.

``relu`` is the models' activation. With ``relu_grad_temperature`` ``T > 0`` a
model computes the same values but differentiates each ReLU as
``sigmoid(z / T)`` instead of the step ``1[z > 0]``: a smooth *surrogate
gradient* for attacks (``surrogate``), which sees hidden units that are off
at the current point but turn on nearby (the exact gradient of an inactive
unit is 0, so a gradient attack cannot find the inputs where it wakes up).
"""

import numbers
from typing import Sequence, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from tsrobust import numerics

__all__ = ['MLP', 'layer_names', 'student_of', 'random_teacher_params',
           'first_layer_kernel', 'relu', 'surrogate']


@jax.custom_jvp
def _relu_with_sigmoid_grad(z: chex.Array, temperature: chex.Array) -> chex.Array:
  return jnp.maximum(z, 0.0)


@_relu_with_sigmoid_grad.defjvp
def _relu_with_sigmoid_grad_jvp(primals, tangents):
  z, temperature = primals
  dz, _ = tangents
  slope = jax.nn.sigmoid(z / temperature)
  return jnp.maximum(z, 0.0), slope * dz


def relu(z: chex.Array, grad_temperature: float = 0.0) -> chex.Array:
  """``max(z, 0)``; with ``grad_temperature`` ``T > 0`` differentiated as ``sigmoid(z / T)``.

  The value is exactly ReLU's for every ``T``; only derivatives change (``T = 0``:
  ``jax.nn.relu``'s).

  >>> import jax, jax.numpy as jnp
  >>> z = jnp.array([-1.0, 0.5])
  >>> relu(z, 0.5).tolist(), jax.grad(lambda v: relu(v).sum())(z).tolist()
  ([0.0, 0.5], [0.0, 1.0])
  >>> [round(g, 4) for g in jax.grad(lambda v: relu(v, 0.5).sum())(z).tolist()]
  [0.1192, 0.7311]
  """
  if grad_temperature < 0:
    raise ValueError(f'grad_temperature must be >= 0, got {grad_temperature!r}')
  if grad_temperature == 0:
    return nn.relu(z)
  return _relu_with_sigmoid_grad(z, jnp.asarray(grad_temperature, z.dtype))


def surrogate(model: nn.Module, grad_temperature: float) -> nn.Module:
  """``model`` (an ``MLP`` or ``cnn.CNN``) with surrogate ReLU gradients (see ``relu``).

  Same parameters and the same outputs; gradients of its ``apply`` follow
  ``sigmoid(z / grad_temperature)`` through every ReLU. ``grad_temperature = 0``
  returns the exact model.
  """
  if not hasattr(model, 'relu_grad_temperature'):
    raise ValueError(f'surrogate needs a model with relu_grad_temperature (MLP, CNN), got '
                     f'{type(model).__name__}')
  if not grad_temperature >= 0:
    raise ValueError(f'grad_temperature must be >= 0, got {grad_temperature!r}')
  return model.clone(relu_grad_temperature=float(grad_temperature))


class MLP(nn.Module):
  """ReLU MLP returning outputs and every hidden layer's activations.

  Attributes:
    hidden_widths: width of each hidden layer (empty means linear model).
    out_dim: number of outputs.
    use_bias: whether every Dense layer has a bias.
    init_scale: kernels start as N(0, init_scale**2 / fan_in); biases at 0.
    relu_grad_temperature: 0 (exact ReLU gradients) or the temperature of the
      surrogate gradient (``relu``, ``surrogate``); the values never change.

  >>> model = MLP(hidden_widths=(3,), out_dim=2)
  >>> params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  >>> out, (h1,) = model.apply(params, jnp.ones((5, 4)))
  >>> out.shape, h1.shape, bool((h1 >= 0).all())  # hidden activations are post-ReLU
  ((5, 2), (5, 3), True)
  """
  hidden_widths: Sequence[int]
  out_dim: int
  use_bias: bool = True
  init_scale: float = 1.0
  relu_grad_temperature: float = 0.0

  @nn.compact
  def __call__(self, x: chex.Array) -> Tuple[chex.Array, Tuple[chex.Array, ...]]:
    """Args: x [batch, d]. Returns (outputs [batch, out_dim], (h_1 [batch, n_1], ...))."""
    chex.assert_rank(x, 2)
    kernel_init = nn.initializers.variance_scaling(
        self.init_scale ** 2, 'fan_in', 'normal')
    h = x
    acts = []
    for i, width in enumerate(self.hidden_widths):
      h = relu(nn.Dense(width, use_bias=self.use_bias, kernel_init=kernel_init,
                        precision=numerics.PRECISION, name=f'hidden_{i}')(h),
               self.relu_grad_temperature)
      acts.append(h)
    out = nn.Dense(self.out_dim, use_bias=self.use_bias, kernel_init=kernel_init,
                   precision=numerics.PRECISION, name='output')(h)
    return out, tuple(acts)


def layer_names(model: MLP) -> Tuple[str, ...]:
  """Names of the Dense layers of ``model`` in order, output last.

  >>> layer_names(MLP((10, 10), 3))
  ('hidden_0', 'hidden_1', 'output')
  """
  return tuple(f'hidden_{i}' for i in range(len(model.hidden_widths))) + ('output',)


def student_of(teacher: MLP, width_mult: int, init_scale: float = 1.0) -> MLP:
  """The over-realized student family of ``teacher``: widths ``k * m_l``.

  >>> student_of(MLP((10,), 10), width_mult=5).hidden_widths
  (50,)
  """
  if (isinstance(width_mult, bool) or not isinstance(width_mult, numbers.Integral)
      or width_mult < 1):
    raise ValueError(f'width_mult must be an integer >= 1, got {width_mult!r}')
  if init_scale <= 0:
    raise ValueError(f'init_scale must be > 0, got {init_scale!r}')
  width_mult = int(width_mult)
  return MLP(hidden_widths=tuple(width_mult * m for m in teacher.hidden_widths),
             out_dim=teacher.out_dim, use_bias=teacher.use_bias,
             init_scale=init_scale)


def random_teacher_params(key: chex.PRNGKey, model: MLP, in_dim: int,
                          bias_scale: float = 0.5,
                          strength_decay: float = 0.0) -> chex.ArrayTree:
  """Random teacher parameters (Tian 2019).

  Every kernel column (a node's fan-in vector) is Gaussian, normalized to unit
  norm. Biases, when the model has them, are N(0, bias_scale**2). With
  ``strength_decay > 0`` the fan-out weights of hidden node ``j`` (row ``j`` of
  the next layer's kernel) are multiplied by ``(j + 1) ** -strength_decay``.

  Args:
    key: PRNG key.
    model: the teacher's MLP.
    in_dim: input dimension d.
    bias_scale: standard deviation of the biases (>= 0).
    strength_decay: exponent of the fan-out decay (>= 0; 0 disables it).

  Returns:
    A Flax params dict ``{'params': {...}}`` for ``model``.

  >>> teacher = MLP((10,), 10)
  >>> params = random_teacher_params(jax.random.PRNGKey(0), teacher, in_dim=40)
  >>> w = params['params']['hidden_0']['kernel']
  >>> w.shape, bool(jnp.allclose(jnp.linalg.norm(w, axis=0), 1.0, atol=1e-5))  # unit fan-in
  ((40, 10), True)
  """
  if bias_scale < 0:
    raise ValueError(f'bias_scale must be >= 0, got {bias_scale!r}')
  if strength_decay < 0:
    raise ValueError(f'strength_decay must be >= 0, got {strength_decay!r}')
  names = layer_names(model)
  widths = (in_dim,) + tuple(model.hidden_widths) + (model.out_dim,)
  keys = jax.random.split(key, 2 * len(names))
  params = {}
  for i, name in enumerate(names):
    fan_in, fan_out = widths[i], widths[i + 1]
    w = jax.random.normal(keys[2 * i], (fan_in, fan_out))
    w = w / jnp.linalg.norm(w, axis=0, keepdims=True)
    if i > 0 and strength_decay > 0:
      decay = (jnp.arange(fan_in) + 1.0) ** (-strength_decay)
      w = w * decay[:, None]
    layer = {'kernel': w}
    if model.use_bias:
      layer['bias'] = bias_scale * jax.random.normal(keys[2 * i + 1], (fan_out,))
    params[name] = layer
  return {'params': params}


def first_layer_kernel(params: chex.ArrayTree) -> chex.Array:
  """The first Dense layer's kernel [d, n_1] (node ``j``'s weights are column j).

  >>> teacher = MLP((10,), 10)
  >>> first_layer_kernel(random_teacher_params(jax.random.PRNGKey(0), teacher, 40)).shape
  (40, 10)
  """
  p = params['params']
  return p['hidden_0']['kernel'] if 'hidden_0' in p else p['output']['kernel']
