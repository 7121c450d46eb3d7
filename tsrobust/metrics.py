"""Per-student metrics of the low-rank setting, for one seed (vmap for many).

Composes ``specialization`` and ``data``: in-subspace and off-subspace
specialization per hidden layer, first-layer weight alignment of matched
pairs, and clean agreement with the teacher. Attacks are separate
(``attacks.robust_error``) so a sweep compiles each attack once and feeds
budgets and projectors as arrays.
"""

from typing import Callable, Dict

import chex
import jax.numpy as jnp

from tsrobust import data
from tsrobust import models
from tsrobust import specialization

__all__ = ['lowrank_specialization']


def lowrank_specialization(teacher_apply: Callable, student_apply: Callable,
                           teacher_params: chex.ArrayTree, student_params: chex.ArrayTree,
                           x: chex.Array, projector: chex.Array, probe_key: chex.PRNGKey, *,
                           probe_scale: float = 1.0, tau: float = 0.9,
                           batch_size: int = None) -> Dict[str, chex.Array]:
  """Specialization in and out of the data subspace, and weight alignment.

  Args:
    teacher_apply, student_apply: ``(params, x) -> (outputs, activations)``.
    teacher_params, student_params: one seed's parameters.
    x: ``[N, d]`` held-out inputs from the subspace.
    projector: ``[d, d]`` projector ``P`` onto the data subspace.
    probe_key: key for the off-subspace probes ``x + P_perp xi``.
    probe_scale: standard deviation of each coordinate of ``xi``.
    tau: specialization threshold.
    batch_size: streaming batch size (must divide N), or None.

  Returns:
    A dict of arrays:
      ``spec_in``, ``spec_off``: ``[L]`` mean max correlation per hidden layer;
      ``frac_in``, ``frac_off``: ``[L]`` fraction of teacher nodes specialized;
      ``dead_in``: ``[L]`` dead teacher nodes on the data;
      ``wcos_in``: mean signed ``cos(P w_T, P w_S)`` over alive first-layer
        teacher nodes and their best students (matched in-subspace);
      ``wcos_off``: mean ``|cos(P_perp w_T, P_perp w_S)|`` over the same pairs
        (absolute: the sign of a random cosine carries no information, and
        ``specialization.random_cosine_baseline`` is an E|cos|);
      ``clean_agree``: fraction of ``x`` where student and teacher argmax agree.

  >>> import jax
  >>> from tsrobust import models
  >>> teacher = models.MLP((4,), 3)
  >>> tparams = models.random_teacher_params(jax.random.PRNGKey(0), teacher, in_dim=8)
  >>> p, _ = data.projectors(data.random_orthonormal(jax.random.PRNGKey(1), 8, 3))
  >>> x = data.sample_lowrank(jax.random.PRNGKey(2), p, 256)
  >>> out = lowrank_specialization(teacher.apply, teacher.apply, tparams, tparams, x, p,
  ...                              jax.random.PRNGKey(3))
  >>> {k: round(float(out[k].mean()), 3) for k in ('spec_in', 'wcos_in', 'clean_agree')}
  {'spec_in': 1.0, 'wcos_in': 1.0, 'clean_agree': 1.0}
  """
  chex.assert_rank([x, projector], 2)
  projector_perp = jnp.eye(projector.shape[0], dtype=projector.dtype) - projector
  x_off = data.off_subspace_probe(probe_key, x, projector_perp, probe_scale)
  stats_in = specialization.network_stats(teacher_apply, student_apply, teacher_params,
                                          student_params, x, batch_size)
  stats_off = specialization.network_stats(teacher_apply, student_apply, teacher_params,
                                           student_params, x_off, batch_size)
  sum_in = [specialization.summarize(s, tau) for s in stats_in]
  sum_off = [specialization.summarize(s, tau) for s in stats_off]
  first = sum_in[0]
  cos_in, cos_off = specialization.weight_alignment(
      models.first_layer_kernel(teacher_params), models.first_layer_kernel(student_params),
      first.best_student, projector, projector_perp)
  alive = first.alive
  n_alive = jnp.maximum(alive.sum(), 1)
  agree = (student_apply(student_params, x)[0].argmax(-1)
           == teacher_apply(teacher_params, x)[0].argmax(-1))
  return {
      'spec_in': jnp.stack([s.mean_max_corr for s in sum_in]),
      'spec_off': jnp.stack([s.mean_max_corr for s in sum_off]),
      'frac_in': jnp.stack([s.frac_specialized for s in sum_in]),
      'frac_off': jnp.stack([s.frac_specialized for s in sum_off]),
      'dead_in': jnp.stack([s.num_dead for s in sum_in]),
      'wcos_in': jnp.where(alive, cos_in, 0.0).sum() / n_alive,
      'wcos_off': jnp.where(alive, jnp.abs(cos_off), 0.0).sum() / n_alive,
      'clean_agree': agree.mean(),
  }
