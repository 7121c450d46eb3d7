"""The method registry: the students' training methods, shared by every study.

One place holds what a training method is, for the synthetic low-rank study
(``experiments/robustness.py``) and the image study (``experiments/real.py``):

* its name (``METHODS``) and hyper-parameters (``HPARAM_COLUMNS``);
* the grid of ``(method, hyper-parameters)`` points a study trains
  (``grid``), grouped by method so that each method compiles once, its grid
  points and seeds forming one vmapped students axis (grid-major: student
  ``p * S + s`` is grid point ``p``, seed ``s``; ``tile``, ``student_index``);
* its loss (``make_loss``), from the networks' apply functions, a minibatch
  sampler and the methods' ``Settings``;
* its per-student ``data_args`` (``student_args``: budgets, noise scales and
  fractions, one value per student; ``subspace_args``: the synthetic study's
  subspace-restricted attacks).

Methods (``data_args`` each reads):

* ``standard``: regression on the teacher's outputs (``train.teacher_regression_loss``);
* ``at``: PGD adversarial training (``train.pgd_augmentation``; ``at_eps``,
  ``at_fraction``, optionally ``at_projector``); hyper-parameters ``at_eps``
  and, in the synthetic study, ``at_where`` (``full`` / ``in``: delta in the
  data subspace) and ``at_label``;
* ``ccat``: confidence-calibrated adversarial training (``train.ccat_loss``;
  ``ccat_eps``, optionally ``ccat_projector``);
* ``robust_features``: standard training on a robust-feature dataset
  (``robust_dataset.paired_regression_loss``; ``robust_x``, ``train_x``);
* ``orth`` / ``iso``: noise augmentation in the orthogonal complement of the
  data subspace / isotropic, the control (``train.noise_augmentation``;
  ``aug_scale``, ``aug_fraction``, ``projector`` for ``orth``).
"""

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import attacks
from tsrobust import robust_dataset
from tsrobust import train

__all__ = ['METHODS', 'AUGMENTATIONS', 'HPARAM_COLUMNS', 'NUMERIC_HPARAMS', 'AT_WHERES',
           'GridPoint', 'grid', 'hparam_columns', 'variant_name', 'group_by_method',
           'student_index', 'tile', 'record_head', 'Settings', 'make_loss',
           'student_args', 'subspace_args', 'student_mask', 'records']

METHODS = ('standard', 'at', 'ccat', 'robust_features', 'orth', 'iso')
# Noise augmentations: method -> train.noise_augmentation's kind.
AUGMENTATIONS = {'orth': 'orthogonal', 'iso': 'isotropic'}
# Every hyper-parameter a grid point can carry, in the order of the result columns.
HPARAM_COLUMNS = ('at_eps', 'at_where', 'at_label', 'ccat_eps', 'aug_scale')
# The numeric ones: a grid point's variant name (``variant_name``) shows the first it has.
NUMERIC_HPARAMS = ('at_eps', 'ccat_eps', 'aug_scale')
AT_WHERES = ('full', 'in')

GridPoint = Tuple[str, Dict[str, Any]]


def _check_methods(methods: Sequence[str]) -> None:
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f'unknown methods {unknown}; the methods are {METHODS}')


def grid(methods: Sequence[str], *, at_eps: Sequence[float] = (),
         ccat_eps: Sequence[float] = (), aug_scales: Sequence[float] = (),
         at_where: Optional[Sequence[str]] = None,
         at_label: Optional[str] = None) -> List[GridPoint]:
  """``(method, hyper-parameters)`` of every grid point, grouped by method.

  In the order of ``methods``: ``standard`` and ``robust_features`` one point
  each (no hyper-parameter); ``at`` one per budget of ``at_eps`` - with
  ``at_where`` (the synthetic study), one per ``(where, eps)``, where-major,
  each also carrying ``at_label``; ``ccat`` one per ``ccat_eps``; ``orth`` /
  ``iso`` one per noise scale of ``aug_scales``.

  Raises:
    ValueError: an unknown method or ``at_where`` value.

  >>> grid(('standard', 'at', 'orth'), at_eps=(0.5, 1.0), aug_scales=(1.0,))
  [('standard', {}), ('at', {'at_eps': 0.5}), ('at', {'at_eps': 1.0}), ('orth', {'aug_scale': 1.0})]
  """
  _check_methods(methods)
  if at_where is not None and any(w not in AT_WHERES for w in at_where):
    raise ValueError(f'at_where values must be in {AT_WHERES}, got {tuple(at_where)}')
  points = []
  for method in methods:
    if method == 'at' and at_where is None:
      points += [(method, {'at_eps': e}) for e in at_eps]
    elif method == 'at':
      points += [(method, {'at_eps': e, 'at_where': w, 'at_label': at_label})
                 for w in at_where for e in at_eps]
    elif method == 'ccat':
      points += [(method, {'ccat_eps': e}) for e in ccat_eps]
    elif method in AUGMENTATIONS:
      points += [(method, {'aug_scale': s}) for s in aug_scales]
    else:
      points.append((method, {}))
  return points


def hparam_columns(with_at_where: bool) -> Tuple[str, ...]:
  """The hyper-parameter columns of a study's results (``at_where``, ``at_label``: synthetic)."""
  if with_at_where:
    return HPARAM_COLUMNS
  return tuple(h for h in HPARAM_COLUMNS if h not in ('at_where', 'at_label'))


def variant_name(method: str, hp: Dict[str, Any]) -> str:
  """A grid point's label in tables and figures (``'at 0.1'``, ``'standard'``).

  The method and its first numeric hyper-parameter as written (``str``).

  >>> variant_name('at', {'at_eps': 0.05}), variant_name('standard', {})
  ('at 0.05', 'standard')
  """
  for h in NUMERIC_HPARAMS:
    if hp.get(h) is not None:
      return f'{method} {hp[h]}'
  return method


def group_by_method(points: Sequence[GridPoint]) -> List[Tuple[str, List[GridPoint]]]:
  """``[(method, its points)]`` in the order the methods first appear.

  >>> [(m, len(p)) for m, p in group_by_method(grid(('at', 'iso'), at_eps=(1, 2),
  ...                                               aug_scales=(1,)))]
  [('at', 2), ('iso', 1)]
  """
  methods = list(dict.fromkeys(m for m, _ in points))
  return [(m, [p for p in points if p[0] == m]) for m in methods]


def student_index(point: int, seed: int, num_seeds: int) -> int:
  """Position of grid point ``point``'s seed ``seed`` on the (grid-major) students axis.

  >>> student_index(point=2, seed=1, num_seeds=4)
  9
  """
  return point * num_seeds + seed


def tile(tree: chex.ArrayTree, times: int) -> chex.ArrayTree:
  """Repeats a leading seeds axis: ``[S, ...] -> [times * S, ...]`` (grid-major).

  >>> tile({'w': jnp.array([1, 2])}, 3)['w'].tolist()
  [1, 2, 1, 2, 1, 2]
  """
  return jax.tree_util.tree_map(lambda v: jnp.concatenate([v] * times), tree)


def record_head(method: str, hp: Dict[str, Any], seed: int, columns: Sequence[str],
                variant: bool = False) -> Dict[str, Any]:
  """The first fields of a student's result record: method, (variant,) hyper-parameters, seed.

  ``columns``: the study's hyper-parameter columns (``hparam_columns``); a
  column the grid point lacks is None.
  """
  head = {'method': method}
  if variant:
    head['variant'] = variant_name(method, hp)
  head.update({h: hp.get(h) for h in columns})
  head['seed'] = seed
  return head


@dataclasses.dataclass(frozen=True)
class Settings:
  """The methods' settings that are not grid hyper-parameters.

  Attributes:
    loss: the regression loss to the teacher (``train.LOSSES``).
    batch_size: examples per step.
    at_norm, at_steps, at_label, at_fraction: PGD-AT's attack norm, steps,
      label (``oracle``: the teacher at the perturbed point; ``fixed``: at the
      clean one) and the fraction of each batch replaced by attacked points.
    ccat_norm, ccat_steps, ccat_rho: CCAT's attack norm, steps and the
      sharpness of its target's transition to uniform.
    aug_fraction: fraction of each batch that gets noise (``orth`` / ``iso``).
    step_factor: attack step size ``step_factor * eps / steps``.
    clip_range: valid input range of the attacks (None: unbounded).
    budget_scale: ``at_eps`` / ``ccat_eps`` are multiplied by it (image
      budgets in units of ``1 / eps_denominator``).
  """
  loss: str = 'mse'
  batch_size: int = 32
  at_norm: str = 'linf'
  at_steps: int = 3
  at_label: str = 'oracle'
  at_fraction: float = 1.0
  ccat_norm: str = 'linf'
  ccat_steps: int = 3
  ccat_rho: float = 10.0
  aug_fraction: float = 0.5
  step_factor: float = 2.5
  clip_range: Optional[Tuple[float, float]] = None
  budget_scale: float = 1.0


def make_loss(method: str, student_apply: Callable, teacher_apply: Callable,
              sample: Callable, settings: Settings) -> train.LossFn:
  """The loss function of ``method``, compiled once for all its grid points and seeds.

  Args:
    method: one of ``METHODS``.
    student_apply, teacher_apply: ``(params, x) -> (outputs, activations)``.
    sample: ``(key, data_args, n) -> [n, ...]`` a minibatch of inputs (not
      used by ``robust_features``, which pairs ``robust_x`` with ``train_x``).
    settings: the methods' ``Settings``.

  Returns:
    ``loss_fn(params, teacher_params, data_args, key) -> scalar``
    (``train.LossFn``); ``data_args`` holds what the method reads (module
    docstring).
  """
  _check_methods([method])
  s = settings
  if method == 'standard':
    return train.teacher_regression_loss(student_apply, teacher_apply, s.loss, sample,
                                         s.batch_size)
  if method == 'at':
    if s.at_label not in attacks.LABELS:
      raise ValueError(f'at_label must be one of {attacks.LABELS}, got {s.at_label!r}')
    transform = train.pgd_augmentation(student_apply, teacher_apply, s.loss, norm=s.at_norm,
                                       steps=s.at_steps, step_factor=s.step_factor,
                                       label=s.at_label, clip_range=s.clip_range)
    return train.teacher_regression_loss(
        student_apply, teacher_apply, s.loss, sample, s.batch_size, transform=transform,
        label_at='transformed' if s.at_label == 'oracle' else 'clean')
  if method == 'ccat':
    return train.ccat_loss(student_apply, teacher_apply, sample, s.batch_size,
                           norm=s.ccat_norm, steps=s.ccat_steps, step_factor=s.step_factor,
                           rho=s.ccat_rho, clip_range=s.clip_range)
  if method == 'robust_features':
    return robust_dataset.paired_regression_loss(student_apply, teacher_apply, s.loss,
                                                 s.batch_size)
  return train.teacher_regression_loss(student_apply, teacher_apply, s.loss, sample,
                                       s.batch_size,
                                       transform=train.noise_augmentation(
                                           AUGMENTATIONS[method]))


def _one_method(points: Sequence[GridPoint]) -> str:
  if not points:
    raise ValueError('points must hold at least one grid point')
  method = points[0][0]
  if any(m != method for m, _ in points):
    raise ValueError(f'points must be of one method, got {sorted({m for m, _ in points})}')
  _check_methods([method])
  return method


def student_args(points: Sequence[GridPoint], num_seeds: int,
                 settings: Settings) -> Dict[str, jax.Array]:
  """Per-student hyper-parameters ``data_args`` of one method's grid points x seeds.

  Student ``p * num_seeds + s`` (grid-major) gets grid point ``p``'s values:
  ``at``: ``at_eps`` (times ``budget_scale``) and ``at_fraction``; ``ccat``:
  ``ccat_eps`` (times ``budget_scale``); ``orth`` / ``iso``: ``aug_scale``
  and ``aug_fraction``; others: nothing. Every leaf is ``[P * num_seeds]``
  float32.
  """
  method = _one_method(points)
  num = len(points) * num_seeds

  def per_point(name, scale=1.0):
    return jnp.repeat(jnp.array([hp[name] * scale for _, hp in points], jnp.float32),
                      num_seeds)
  args = {}
  if method == 'at':
    args['at_eps'] = per_point('at_eps', settings.budget_scale)
    args['at_fraction'] = jnp.full((num,), settings.at_fraction, jnp.float32)
  elif method == 'ccat':
    args['ccat_eps'] = per_point('ccat_eps', settings.budget_scale)
  elif method in AUGMENTATIONS:
    args['aug_scale'] = per_point('aug_scale')
    args['aug_fraction'] = jnp.full((num,), settings.aug_fraction, jnp.float32)
  for v in args.values():
    chex.assert_shape(v, (num,))
  return args


def subspace_args(points: Sequence[GridPoint], projector: chex.Array) -> Dict[str, jax.Array]:
  """The synthetic study's attack subspaces of one method's grid points x seeds.

  Args:
    points: one method's grid points.
    projector: ``[S, d, d]`` each seed's data-subspace projector.

  Returns:
    ``at``: ``at_projector [P * S, d, d]`` - the seed's projector where the
    point's ``at_where`` is ``in``, the identity where ``full``; ``ccat``:
    ``ccat_projector`` (the identity, ``[P * S, d, d]``); others: nothing.
  """
  method = _one_method(points)
  chex.assert_rank(projector, 3)
  eye = jnp.broadcast_to(jnp.eye(projector.shape[-1]), projector.shape)
  if method == 'at':
    return {'at_projector': jnp.concatenate(
        [projector if hp['at_where'] == 'in' else eye for _, hp in points])}
  if method == 'ccat':
    return {'ccat_projector': tile(eye, len(points))}
  return {}


def student_mask(points: Sequence[GridPoint], method: str, num_seeds: int,
                 num_padded: int) -> np.ndarray:
  """``[P * num_padded]`` bool: the kept students (seed < ``num_seeds``) of ``method``.

  The students axis is grid-major with ``num_padded >= num_seeds`` seeds per
  grid point; the padded seeds (a multiple of the device count) are not kept.
  """
  if num_padded < num_seeds:
    raise ValueError(f'num_padded must be >= num_seeds {num_seeds}, got {num_padded}')
  return np.array([m == method and seed < num_seeds
                   for m, _ in points for seed in range(num_padded)])


def records(points: Sequence[GridPoint], num_seeds: int, num_padded: int,
            columns: Sequence[str], train_loss: np.ndarray,
            rows: Sequence[Dict[str, Any]], variant: bool = False) -> List[Dict[str, Any]]:
  """One result record per kept student, grid point by grid point, seed by seed.

  Student ``student_index(p, seed, num_padded)`` of the students axis gets
  ``record_head`` (method, variant, the hyper-parameter ``columns``, seed),
  ``train_loss`` (its final training loss) and its metrics ``rows[i]``;
  padded seeds (``seed >= num_seeds``) are dropped.

  Args:
    points: the grid (``grid``).
    num_seeds, num_padded: kept and computed seeds per grid point.
    columns: hyper-parameter columns (``hparam_columns``).
    train_loss: ``[P * num_padded]`` final losses.
    rows: ``P * num_padded`` metric dicts.
    variant: add the ``variant`` name (``variant_name``).
  """
  num = len(points) * num_padded
  chex.assert_shape(train_loss, (num,))
  if len(rows) != num:
    raise ValueError(f'rows must hold one dict per student ({num}), got {len(rows)}')
  out = []
  for p, (method, hp) in enumerate(points):
    for seed in range(num_seeds):
      i = student_index(p, seed, num_padded)
      out.append({**record_head(method, hp, seed, columns, variant),
                  'train_loss': float(train_loss[i]), **rows[i]})
  return out
