"""Every matrix product of the library names float32's full precision (tsrobust.numerics).

On a CPU, XLA computes float32 products in float32 whatever the precision says, so no
numerical test here can see a product that would drop to TF32 on a GPU or bfloat16 on a
TPU. These tests read the programs instead: each library path is traced under a global
``jax.default_matmul_precision('bfloat16')`` and every ``dot_general`` in it, its
gradients' and its loops' bodies included, must carry ``Precision.HIGHEST``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tsrobust import attacks
from tsrobust import cnn
from tsrobust import data
from tsrobust import datasets
from tsrobust import lowrank as lowrank_lib
from tsrobust import models
from tsrobust import numerics
from tsrobust import specialization
from tsrobust import square
from tsrobust import train

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
D, R = 6, 2


def _subjaxprs(value):
  if isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)
  elif hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr


def _dot_precisions(jaxpr):
  """The ``precision`` of every ``dot_general`` in ``jaxpr`` and its sub-programs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append(eqn.params['precision'])
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        found.extend(_dot_precisions(sub))
  return found


def _precisions_under_low_default(fn, *args):
  with jax.default_matmul_precision('bfloat16'):
    return _dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr)


def _assert_all_highest(fn, *args, at_least=1):
  found = _precisions_under_low_default(fn, *args)
  assert len(found) >= at_least, f'expected >= {at_least} products, traced {len(found)}'
  assert all(p == HIGHEST for p in found), found


def test_the_check_sees_a_product_without_precision():
  """The reader is not vacuous: a plain ``@`` traced the same way is not at HIGHEST."""
  a = jnp.ones((3, 4))
  found = _precisions_under_low_default(lambda u: jnp.sin(u @ u.T).sum(), a)
  assert len(found) == 1 and found[0] != HIGHEST
  assert _precisions_under_low_default(lambda u: numerics.matmul(u, u.T), a) == [HIGHEST]
  # Inside a scan's body, and in a gradient's transposed products, too.
  grad_of_scan = jax.grad(lambda u: jax.lax.scan(lambda c, _: (c @ u, None), u, None, 2)[0]
                          .sum())
  found = _precisions_under_low_default(grad_of_scan, jnp.eye(3))
  assert len(found) >= 3 and all(p != HIGHEST for p in found)


def _teacher_student():
  teacher = models.MLP(hidden_widths=(3,), out_dim=2)
  student = models.student_of(teacher, 2)
  tp = models.random_teacher_params(jax.random.PRNGKey(0), teacher, D)
  sp = student.init(jax.random.PRNGKey(1), jnp.zeros((1, D)))
  return teacher, student, tp, sp


def _basis_and_projector():
  basis = data.random_orthonormal(jax.random.PRNGKey(2), D, R)
  return basis, data.projectors(basis)[0]


def test_training_step_on_subspace_data():
  """The SGD step of the main job: data drawn in S, teacher labels, student gradient."""
  teacher, student, tp, sp = _teacher_student()
  basis, _ = _basis_and_projector()
  loss_fn = train.teacher_regression_loss(
      student.apply, teacher.apply, 'mse',
      lambda key, a, n: data.sample_subspace(key, a['basis'], n, a['scale']), batch_size=4)
  opt = optax.sgd(0.1, momentum=0.9)
  state = train.init_state(sp, opt)
  step = lambda s, k: train.train_step(loss_fn, opt, s, tp, {'basis': basis, 'scale': 1.0}, k)
  # Data (1), teacher forward (2), student forward (2) and backward (3: no input grad).
  _assert_all_highest(step, state, jax.random.PRNGKey(3), at_least=8)


def test_data_and_projectors():
  basis, projector = _basis_and_projector()
  key = jax.random.PRNGKey(4)
  _assert_all_highest(data.projectors, basis)
  _assert_all_highest(lambda k: data.sample_lowrank(k, projector, 5, 1.0), key)
  _assert_all_highest(lambda k: data.sample_subspace(k, basis, 5, 1.0), key)
  _assert_all_highest(lambda x, k: data.off_subspace_probe(k, x, projector, 0.5),
                      jnp.ones((5, D)), key)
  bases = jnp.stack([data.random_orthonormal(jax.random.PRNGKey(i), D, D) for i in range(2)])
  _assert_all_highest(lambda b: lowrank_lib.rank_projector(b, R), bases)


@pytest.mark.parametrize('attack', ['pgd', 'apgd', 'square'])
def test_attacks_in_the_subspace_with_an_oracle_objective(attack):
  teacher, student, tp, sp = _teacher_student()
  basis, projector = _basis_and_projector()
  objective = attacks.oracle_margin_objective(lambda x: student.apply(sp, x)[0],
                                              lambda x: teacher.apply(tp, x)[0])
  x = jax.random.normal(jax.random.PRNGKey(5), (4, D))
  run = {
      'pgd': lambda x, k: attacks.pgd(objective, x, k, eps=0.5, alpha=0.1, steps=3,
                                      norm='l2', projector=projector),
      'apgd': lambda x, k: attacks.apgd(objective, x, k, eps=0.5, steps=4, norm='linf',
                                        projector=projector),
      'square': lambda x, k: square.square(objective, x, k, eps=0.5, queries=3, norm='l2',
                                           basis=basis),
  }[attack]
  _assert_all_highest(run, x, jax.random.PRNGKey(6), at_least=4)


def test_specialization_and_weight_alignment():
  teacher, student, tp, sp = _teacher_student()
  _, projector = _basis_and_projector()
  x = jax.random.normal(jax.random.PRNGKey(7), (8, D))
  _assert_all_highest(
      lambda x: specialization.network_stats(teacher.apply, student.apply, tp, sp, x,
                                             batch_size=4), x, at_least=5)
  tk = tp['params']['hidden_0']['kernel']
  sk = sp['params']['hidden_0']['kernel']
  _assert_all_highest(
      lambda t, s: specialization.weight_alignment(t, s, jnp.zeros(3, jnp.int32), projector),
      tk, sk,
      at_least=4)


def test_cnn_and_pca():
  model = cnn.make_cnn((2,), (3,), 2, pool='avg')
  params = cnn.init_params(jax.random.PRNGKey(8), model, (4, 4, 1))
  images = jax.random.normal(jax.random.PRNGKey(9), (3, 4, 4, 1))
  _assert_all_highest(jax.grad(lambda p: model.apply(p, images)[0].sum()), params,
                      at_least=6)
  pca = datasets.fit_pca(np.asarray(images), 2)
  _assert_all_highest(lambda x: datasets.fit_pca(x, 2).projector, images, at_least=2)
  _assert_all_highest(lambda x: datasets.project_pca(x, pca), images)
