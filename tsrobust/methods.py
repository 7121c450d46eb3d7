"""The method registry: the students' training methods, shared by every study.

One place holds what a training method is, for the synthetic low-rank study
(``experiments/robustness.py``) and the image study (``experiments/real.py``):
``METHODS[name]`` is a ``Method``, which carries

* its grid: the hyper-parameter it is swept over (``Method.hparam``, one of
  ``HPARAM_COLUMNS``) and how the grid's options expand into points
  (``Method.expand``; ``grid``), grouped by method so that each method
  compiles once, its grid points and seeds forming one vmapped students axis
  (grid-major: student ``p * S + s`` is grid point ``p``, seed ``s``;
  ``tile``, ``student_index``);
* its loss (``Method.loss``; ``make_loss``), from the networks' apply
  functions, a minibatch sampler and the methods' ``Settings``;
* its per-student ``data_args`` (``Method.student_args``: budgets, noise
  scales and fractions, one value per student; ``Method.subspace_args``: the
  synthetic study's subspace-restricted attacks) and the data every student
  reads (``Method.shared_data``);
* what a study must provide or add for it: a data subspace
  (``needs_subspace``), a robust-feature dataset (``robust_dataset``), CCAT's
  own evaluation (``ccat_evaluation``), a smallest batch (``min_batch_size``),
  and whether the synthetic study can run it (``synthetic``).

A new method is one ``register(Method(...))``: the studies take their grids,
losses, data and extra evaluations from the registry, and none branches on a
method's name.

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
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import attacks
from tsrobust import robust_dataset
from tsrobust import train

__all__ = ['METHODS', 'HPARAM_COLUMNS', 'NUMERIC_HPARAMS', 'AT_WHERES', 'Method', 'register',
           'names', 'GridPoint', 'grid', 'hparam_columns', 'variant_name', 'group_by_method',
           'student_index', 'tile', 'record_head', 'Settings', 'make_loss',
           'student_args', 'subspace_args', 'student_mask', 'records']

# Every hyper-parameter a grid point can carry, in the order of the result columns.
HPARAM_COLUMNS = ('at_eps', 'at_where', 'at_label', 'ccat_eps', 'aug_scale')
# The numeric ones: a grid point's variant name (``variant_name``) shows the first it has.
NUMERIC_HPARAMS = ('at_eps', 'ccat_eps', 'aug_scale')
AT_WHERES = ('full', 'in')

GridPoint = Tuple[str, Dict[str, Any]]


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


# (student_apply, teacher_apply, sample, settings) -> train.LossFn
LossBuilder = Callable[[Callable, Callable, Callable, Settings], train.LossFn]


def _no_args(points, num_seeds, settings):  # pylint: disable=unused-argument
  return {}


def _no_subspace_args(points, projector):  # pylint: disable=unused-argument
  return {}


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method: everything a study needs to train and evaluate its students.

  Attributes:
    name: the method's name in configs and results (``config.methods``, ``method``).
    loss: ``(student_apply, teacher_apply, sample, settings) -> loss_fn``
      (``make_loss``).
    hparam: the hyper-parameter its grid sweeps (a ``HPARAM_COLUMNS`` entry), or
      None: one grid point.
    grid_option: the ``grid`` option holding ``hparam``'s values (``'at_eps'``,
      ``'aug_scales'``).
    expand: ``options -> [hyper-parameters]`` of its grid points, replacing the
      default (one point per value of ``grid_option``); ``at``'s adds ``at_where``.
    student_args: ``(points, num_seeds, settings) -> data_args`` per student
      (``student_args``).
    subspace_args: ``(points, projector) -> data_args`` of the synthetic study's
      subspace-restricted attacks (``subspace_args``).
    shared_data: what every student reads besides the training inputs, by name:
      ``'projector'`` (the data subspace's), ``'robust_x'`` (the robust-feature
      images); the image study passes them once, not per student.
    needs_subspace: needs a data subspace (the image study: ``lowrank_rank > 0``).
    robust_dataset: trains on a robust-feature dataset, which the image study
      builds from a robust model's penultimate layer (a hidden layer needed).
    ccat_evaluation: evaluated also by CCAT's criterion (``evaluate.ccat_threshold``,
      ``merge_ccat``, ``ccat_records``): its results get the ``ccat_*`` columns.
    min_batch_size: the smallest ``batch_size`` it trains with.
    synthetic: the synthetic study can run it (it has no robust-feature data).
  """
  name: str
  loss: LossBuilder
  hparam: Optional[str] = None
  grid_option: Optional[str] = None
  expand: Optional[Callable[[Mapping[str, Any]], List[Dict[str, Any]]]] = None
  student_args: Callable[[Sequence[GridPoint], int, Settings], Dict[str, jax.Array]] = _no_args
  subspace_args: Callable[[Sequence[GridPoint], chex.Array], Dict[str, jax.Array]] = (
      _no_subspace_args)
  shared_data: Tuple[str, ...] = ()
  needs_subspace: bool = False
  robust_dataset: bool = False
  ccat_evaluation: bool = False
  min_batch_size: int = 1
  synthetic: bool = True

  def points(self, options: Mapping[str, Any]) -> List[GridPoint]:
    """Its grid points for ``grid``'s ``options``."""
    if self.expand is not None:
      return [(self.name, hp) for hp in self.expand(options)]
    if self.hparam is None:
      return [(self.name, {})]
    return [(self.name, {self.hparam: v}) for v in options.get(self.grid_option, ())]


METHODS: Dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds ``method`` to ``METHODS`` (after the others: grids keep the config's order).

  Raises:
    ValueError: a method of that name exists, or ``hparam`` is not a result column.
  """
  if method.name in METHODS:
    raise ValueError(f'a method named {method.name!r} is registered already')
  if method.hparam is not None and method.hparam not in HPARAM_COLUMNS:
    raise ValueError(f'Method.hparam must be one of {HPARAM_COLUMNS} (the result columns), '
                     f'got {method.hparam!r}')
  METHODS[method.name] = method
  return method


def names(synthetic: bool = False) -> Tuple[str, ...]:
  """The registered methods' names (``synthetic``: only those the synthetic study runs).

  >>> names()[:3], 'robust_features' in names(synthetic=True)
  (('standard', 'at', 'ccat'), False)
  """
  return tuple(m.name for m in METHODS.values() if m.synthetic or not synthetic)


def _check_methods(methods: Sequence[str]) -> None:
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f'unknown methods {unknown}; the methods are {names()}')


def grid(methods: Sequence[str], **options) -> List[GridPoint]:
  """``(method, hyper-parameters)`` of every grid point, grouped by method.

  In the order of ``methods``, each method's ``Method.points(options)``; for
  the registered ones: ``standard`` and ``robust_features`` one point each (no
  hyper-parameter); ``at`` one per budget of ``at_eps`` - with ``at_where``
  (the synthetic study), one per ``(where, eps)``, where-major, each also
  carrying ``at_label``; ``ccat`` one per ``ccat_eps``; ``orth`` / ``iso``
  one per noise scale of ``aug_scales``.

  Raises:
    ValueError: an unknown method or ``at_where`` value.

  >>> grid(('standard', 'at', 'orth'), at_eps=(0.5, 1.0), aug_scales=(1.0,))
  [('standard', {}), ('at', {'at_eps': 0.5}), ('at', {'at_eps': 1.0}), ('orth', {'aug_scale': 1.0})]
  """
  _check_methods(methods)
  points = []
  for method in methods:
    points += METHODS[method].points(options)
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
                variant: bool = False, teacher: Optional[int] = None) -> Dict[str, Any]:
  """The first fields of a student's result record: method, (variant,) hyper-parameters,
  (teacher,) seed.

  ``columns``: the study's hyper-parameter columns (``hparam_columns``); a
  column the grid point lacks is None. ``teacher``: the seed's teacher (a study with
  a teachers axis), None: no ``teacher`` field.
  """
  head = {'method': method}
  if variant:
    head['variant'] = variant_name(method, hp)
  head.update({h: hp.get(h) for h in columns})
  if teacher is not None:
    head['teacher'] = teacher
  head['seed'] = seed
  return head


def make_loss(method: str, student_apply: Callable, teacher_apply: Callable,
              sample: Callable, settings: Settings) -> train.LossFn:
  """The loss function of ``method``, compiled once for all its grid points and seeds.

  Args:
    method: a registered method's name (``METHODS``).
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
  return METHODS[method].loss(student_apply, teacher_apply, sample, settings)


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
  args = METHODS[method].student_args(points, num_seeds, settings)
  for v in args.values():
    chex.assert_shape(v, (len(points) * num_seeds,))
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
  return METHODS[method].subspace_args(points, projector)


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
            rows: Sequence[Dict[str, Any]], variant: bool = False,
            teachers: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
  """One result record per kept student, grid point by grid point, seed by seed.

  Student ``student_index(p, seed, num_padded)`` of the students axis gets
  ``record_head`` (method, variant, the hyper-parameter ``columns``, teacher, seed),
  ``train_loss`` (its final training loss) and its metrics ``rows[i]``;
  padded seeds (``seed >= num_seeds``) are dropped.

  Args:
    points: the grid (``grid``).
    num_seeds, num_padded: kept and computed seeds per grid point.
    columns: hyper-parameter columns (``hparam_columns``).
    train_loss: ``[P * num_padded]`` final losses.
    rows: ``P * num_padded`` metric dicts.
    variant: add the ``variant`` name (``variant_name``).
    teachers: ``[num_seeds]`` the teacher of each seed (every grid point's seed ``s`` has
      teacher ``teachers[s]``), as the ``teacher`` field; None: no such field.
  """
  num = len(points) * num_padded
  chex.assert_shape(train_loss, (num,))
  if len(rows) != num:
    raise ValueError(f'rows must hold one dict per student ({num}), got {len(rows)}')
  if teachers is not None and len(teachers) != num_seeds:
    raise ValueError(f'teachers must hold one teacher per seed ({num_seeds}), '
                     f'got {len(teachers)}')
  out = []
  for p, (method, hp) in enumerate(points):
    for seed in range(num_seeds):
      i = student_index(p, seed, num_padded)
      teacher = None if teachers is None else int(teachers[seed])
      out.append({**record_head(method, hp, seed, columns, variant, teacher),
                  'train_loss': float(train_loss[i]), **rows[i]})
  return out


# ----------------------------------------------------------------------------
# The registered methods.
# ----------------------------------------------------------------------------

def _per_point(points, num_seeds, name, scale=1.0):
  """``[P * num_seeds]`` float32: grid point ``p``'s ``hp[name] * scale`` for each seed."""
  return jnp.repeat(jnp.array([hp[name] * scale for _, hp in points], jnp.float32), num_seeds)


def _constant(points, num_seeds, value):
  return jnp.full((len(points) * num_seeds,), value, jnp.float32)


def _identities(projector):
  return jnp.broadcast_to(jnp.eye(projector.shape[-1]), projector.shape)


def _standard_loss(student_apply, teacher_apply, sample, s: Settings):
  return train.teacher_regression_loss(student_apply, teacher_apply, s.loss, sample,
                                       s.batch_size)


def _at_loss(student_apply, teacher_apply, sample, s: Settings):
  if s.at_label not in attacks.LABELS:
    raise ValueError(f'at_label must be one of {attacks.LABELS}, got {s.at_label!r}')
  transform = train.pgd_augmentation(student_apply, teacher_apply, s.loss, norm=s.at_norm,
                                     steps=s.at_steps, step_factor=s.step_factor,
                                     label=s.at_label, clip_range=s.clip_range)
  return train.teacher_regression_loss(
      student_apply, teacher_apply, s.loss, sample, s.batch_size, transform=transform,
      label_at='transformed' if s.at_label == 'oracle' else 'clean')


def _at_points(options):
  """One point per budget; with ``at_where`` (the synthetic study) per (where, eps),
  where-major, each carrying ``at_label``."""
  at_eps, at_where = options.get('at_eps', ()), options.get('at_where')
  if at_where is None:
    return [{'at_eps': e} for e in at_eps]
  if any(w not in AT_WHERES for w in at_where):
    raise ValueError(f'at_where values must be in {AT_WHERES}, got {tuple(at_where)}')
  return [{'at_eps': e, 'at_where': w, 'at_label': options.get('at_label')}
          for w in at_where for e in at_eps]


def _at_args(points, num_seeds, s: Settings):
  return {'at_eps': _per_point(points, num_seeds, 'at_eps', s.budget_scale),
          'at_fraction': _constant(points, num_seeds, s.at_fraction)}


def _at_subspace(points, projector):
  eye = _identities(projector)
  return {'at_projector': jnp.concatenate(
      [projector if hp['at_where'] == 'in' else eye for _, hp in points])}


def _ccat_loss(student_apply, teacher_apply, sample, s: Settings):
  return train.ccat_loss(student_apply, teacher_apply, sample, s.batch_size, norm=s.ccat_norm,
                         steps=s.ccat_steps, step_factor=s.step_factor, rho=s.ccat_rho,
                         clip_range=s.clip_range)


def _ccat_args(points, num_seeds, s: Settings):
  return {'ccat_eps': _per_point(points, num_seeds, 'ccat_eps', s.budget_scale)}


def _ccat_subspace(points, projector):
  return {'ccat_projector': tile(_identities(projector), len(points))}


def _robust_features_loss(student_apply, teacher_apply, sample, s: Settings):  # pylint: disable=unused-argument
  return robust_dataset.paired_regression_loss(student_apply, teacher_apply, s.loss,
                                               s.batch_size)


def _noise_loss(kind: str) -> LossBuilder:
  def loss(student_apply, teacher_apply, sample, s: Settings):
    return train.teacher_regression_loss(student_apply, teacher_apply, s.loss, sample,
                                         s.batch_size, transform=train.noise_augmentation(kind))
  return loss


def _noise_args(points, num_seeds, s: Settings):
  return {'aug_scale': _per_point(points, num_seeds, 'aug_scale'),
          'aug_fraction': _constant(points, num_seeds, s.aug_fraction)}


register(Method('standard', _standard_loss))
register(Method('at', _at_loss, hparam='at_eps', grid_option='at_eps', expand=_at_points,
                student_args=_at_args, subspace_args=_at_subspace))
register(Method('ccat', _ccat_loss, hparam='ccat_eps', grid_option='ccat_eps',
                student_args=_ccat_args, subspace_args=_ccat_subspace, ccat_evaluation=True,
                min_batch_size=2))
register(Method('robust_features', _robust_features_loss, shared_data=('robust_x',),
                robust_dataset=True, synthetic=False))
register(Method('orth', _noise_loss('orthogonal'), hparam='aug_scale', grid_option='aug_scales',
                student_args=_noise_args, shared_data=('projector',), needs_subspace=True))
register(Method('iso', _noise_loss('isotropic'), hparam='aug_scale', grid_option='aug_scales',
                student_args=_noise_args, needs_subspace=True))
