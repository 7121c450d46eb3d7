"""The image study's config checks (``experiments/real.py``): every field, before any work.

``validate_config`` checks the fields' types, ranges and choices
(``CONFIG_FIELDS``) and the cross-field rules at start; ``validate_sizes``
the rules that need the loaded data's sizes (before any PCA is fitted).
Both raise ``validation.ConfigError`` naming the field.
"""

import numpy as np

from experiments import study
from experiments import validation
from experiments.configs import attacks as attack_fields
from experiments.configs import lowrank as lowrank_config
from experiments.configs import robustness as robustness_config
from experiments.real_eval import LABEL_KINDS
from tsrobust import attacks
from tsrobust import cnn
from tsrobust import datasets
from tsrobust import methods as methods_lib
from tsrobust import robust_dataset
from tsrobust import teachers

TEACHER_TRAININGS = teachers.TEACHER_TRAININGS
# Pixels per image of each dataset: lowrank_rank is checked against them before any work.
IMAGE_SIZES = {name: int(np.prod(shape)) for name, shape in datasets.IMAGE_SHAPES.items()}
BUNDLED_MNIST_TRAIN = datasets.BUNDLED_SIZE - datasets.NUM_CLASSES * datasets.BUNDLED_TEST_PER_CLASS


def _check_data_dir(config) -> None:
  """``data_dir`` holds the dataset's files (``datasets.check_data_dir``), before any work."""
  try:
    datasets.check_data_dir(config.dataset, config.data_dir, field='config.data_dir')
  except ValueError as e:
    raise validation.ConfigError(str(e)) from e


# Every config field: type, range, choices (validation.check_config).
CONFIG_FIELDS = {
    **lowrank_config.TRAINING_FIELDS,
    **robustness_config.METHOD_GRID_FIELDS,
    **attack_fields.FIELDS,
    'num_teachers': validation.Int(lo=1),
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
    'pgd_warmup': validation.Float(lo=0, hi=1),
    'methods': validation.Names(methods_lib.names),
    'rf_model_init': validation.Choice(teachers.RF_MODEL_INITS),
    'rf_model_eps': validation.Float(lo=0, lo_open=True),
    'rf_model_steps': validation.Int(lo=1),
    'rf_steps': validation.Int(lo=1),
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
  """Checks every field at start; raises ``validation.ConfigError`` naming the field.

  The table ``CONFIG_FIELDS``, then the cross-field rules: ``num_seeds`` a multiple of
  ``num_teachers`` (``check_teachers``); ``data_dir`` holds
  the dataset's files (CIFAR-10 needs one); ``teacher_eps > 0`` for a PGD
  teacher; ``robust_features`` needs a hidden layer; ``orth`` / ``iso`` need
  ``lowrank_rank > 0``; ``lowrank_rank`` below the image size and the number
  of training images where they are known before loading (the dataset's
  image size; ``num_train``, or the bundled MNIST's 4,000); ``batch_size >= 2``
  with CCAT; a valid attack ensemble. Checks that need the loaded data:
  ``validate_sizes`` (before the PCA is fitted).
  """
  validation.check_config(config, CONFIG_FIELDS)
  check_teachers(config)
  _check_data_dir(config)
  _check_rank(config, IMAGE_SIZES[config.dataset],
              config.num_train or (BUNDLED_MNIST_TRAIN if config.dataset == 'mnist'
                                   and not config.data_dir else 0))
  if config.teacher_training == 'pgd' and config.teacher_eps <= 0:
    raise validation.ConfigError(f'config.teacher_eps must be > 0 for a PGD-trained teacher '
                                 f'(config.teacher_training = pgd), got {config.teacher_eps}')
  methods = [methods_lib.METHODS[m] for m in study.as_tuple(config.methods)]
  for m in methods:
    if m.robust_dataset and not (config.teacher_dense or len(config.teacher_conv)):
      raise validation.ConfigError(f'config.methods: {m.name} needs a hidden layer (its robust-'
                                   f'feature dataset matches a penultimate layer)')
    if m.needs_subspace and config.lowrank_rank == 0:
      raise validation.ConfigError(f'config.methods: {m.name} (trained with a data subspace: the '
                                   f'PCA one) needs config.lowrank_rank > 0')
  study.check_batch_size(config)
  study.check_attack_rules(config)


def check_teachers(config) -> None:
  """``num_seeds`` (students per grid point) is a multiple of ``num_teachers`` (T >= 1 is the
  table's rule), so every teacher has ``num_seeds / T`` students per grid point.

  The seeds padded up to a multiple of the device count (``study.num_padded_seeds``) are
  computed and dropped; they learn from the last teacher (``student_teachers``), so any
  device count fits.
  """
  t, n = config.num_teachers, config.num_seeds
  if n % t:
    raise validation.ConfigError(f'config.num_seeds must be a multiple of config.num_teachers = '
                                 f'{t} (num_seeds / num_teachers students of each teacher per '
                                 f'grid point), got {n}')


def student_teachers(config, num_padded: int) -> np.ndarray:
  """``[num_padded]`` the teacher of each computed seed: ``s // (num_seeds / num_teachers)``;
  the padded seeds ``s >= num_seeds`` (dropped) the last teacher's.

  >>> import ml_collections
  >>> c = ml_collections.ConfigDict({'num_seeds': 4, 'num_teachers': 2})
  >>> student_teachers(c, 6).tolist()
  [0, 0, 1, 1, 1, 1]
  """
  k = config.num_seeds // config.num_teachers
  return np.minimum(np.arange(num_padded) // k, config.num_teachers - 1)


def _check_rank(config, image_size: int, num_train: int) -> None:
  """``lowrank_rank`` <= the pixels per image and < the training images (0: unknown yet).

  The centered training images span at most ``num_train - 1`` directions, so
  a larger rank would add directions of zero variance, picked arbitrarily.
  """
  r = config.lowrank_rank
  if r > image_size:
    raise validation.ConfigError(f'config.lowrank_rank must be <= the number of pixels per image '
                                 f'{image_size} ({config.dataset}), got {r}')
  if num_train and r > num_train - 1:
    raise validation.ConfigError(f'config.lowrank_rank must be < the number of training images '
                                 f'{num_train} (the centered training set spans at most '
                                 f'{num_train - 1} directions), got {r}')


def validate_sizes(config, dataset: datasets.Dataset) -> None:
  """Checks that need the loaded data's sizes (before any PCA is fitted)."""
  m = dataset.test_x.shape[0]
  n = dataset.train_x.shape[0]
  if m % config.eval_batch:
    raise validation.ConfigError(f'config.eval_batch must divide the number of test images {m}, '
                                 f'got {config.eval_batch}')
  if config.num_attack > m:
    raise validation.ConfigError(f'config.num_attack must be <= the number of test images {m}, '
                                 f'got {config.num_attack}')
  _check_rank(config, int(np.prod(dataset.image_shape)), n)
  for m in study.as_tuple(config.methods):
    if methods_lib.METHODS[m].robust_dataset and n < 2:
      raise validation.ConfigError(f'config.num_train must be >= 2 for {m}')
