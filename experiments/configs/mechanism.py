"""Default config of the mechanism study (experiments/mechanism.py).

Starts from the low-rank experiment's config (same task, networks, training and evaluation
fields) at one rank, with teachers as a replicated axis (``num_teachers`` T x
``students_per_teacher`` K students per condition), and adds one section per part of the
study: ``intervention`` (claim 3's cause), ``optimizers`` and ``dynamics`` (claim 2, the
specialization curves), ``augmentation`` (claim 5's specificity) and ``dependence`` (width,
finite training sets). Every field can be overridden on the command line, e.g.
``--config.num_teachers=8 --config.augmentation.scales='(0.05,0.1,0.3)'``.

The defaults are sized to finish in about 10 minutes on a 2-core CPU (docs/mechanism.md
gives the measured time): 4 teachers x 1 student, 10,000 steps, and the other binaries'
``standard`` attack ensemble on 64 points per student, all of them attacked again by the
convergence check, escalated up to twice (the ensemble at 4x) where a doubling still adds:
fewer points rather than a weaker ensemble, because the noise-trained and transplanted
students are robust and a weak ensemble under-reports their error (docs/mechanism.md).
``--config=experiments/configs/mechanism.py:strong`` attacks the same students on 256 points
each, escalated up to 3 times (the check that 64 points suffice; docs/mechanism.md gives its
time);
``:deep`` runs the study with a two-hidden-layer teacher (40 -> 10 -> 10 -> 10), student
widths 1x to 10x and claim 5 at r = 10, scale 0.3 only. More teachers:
``--config.num_teachers=8``.
"""

import ml_collections

from experiments import validation
from experiments.configs import lowrank
from tsrobust import mechanism
from tsrobust import train

# The kinds of teacher-labelled noise compared in claim 5 (experiments/mechanism.py).
NOISE_KINDS = ('orth', 'iso', 'in')
# The interventions: tsrobust.mechanism.INTERVENTIONS and 'transplant_all'
# (mechanism.transplant_off_subspace_all: every specialized student node, not one per teacher node).
INTERVENTIONS = mechanism.INTERVENTIONS + ('transplant_all',)

PRESETS = ('default', 'strong', 'deep')

# The fields of the low-rank config that this study replaces: students are num_teachers x
# students_per_teacher, every teacher with its own network and subspace; training is online
# (fixed training sets are config.dependence.num_train).
_DROPPED = ('ranks', 'num_seeds', 'teacher_per_seed', 'num_train')


def _positive_floats(unique: bool = True) -> validation.Field:
  """A sequence of finite numbers > 0."""
  return validation.Field(float, lo=0, lo_open=True, sequence=True, unique=unique)


# Every field of this config: type, range, choices (validation.check_config).
FIELDS = {
    **{k: v for k, v in lowrank.SETTING_FIELDS.items() if k not in _DROPPED},
    'rank': validation.Int(lo=1),
    'num_teachers': validation.Int(lo=2),
    'students_per_teacher': validation.Int(lo=1),
    'intervention': {
        'names': validation.Names(INTERVENTIONS),
        'rescale_c': validation.Floats(lo=0, unique=True),
        'min_corr': validation.Float(lo=-1, hi=1),
    },
    'optimizers': {
        'optimizer_names': validation.Names(train.OPTIMIZERS),
        'lr_sgd': validation.Float(lo=0, lo_open=True),
        'lr_momentum': validation.Float(lo=0, lo_open=True),
        'lr_adam': validation.Float(lo=0, lo_open=True),
        'decay': validation.Float(lo=0, lo_open=True),
    },
    'dynamics': {
        'num_points': validation.Int(lo=2),
        'record_chunk_steps': validation.Int(lo=1),
        'teacher_strength_decay': validation.Float(lo=0),
    },
    'augmentation': {
        'kinds': validation.Names(NOISE_KINDS),
        'scales': _positive_floats(),
        'ranks': validation.Ints(lo=1, unique=True),
        'fraction': validation.Float(lo=0, hi=1, lo_open=True),
    },
    'dependence': {
        'width_mults': validation.Ints(lo=1, unique=True),
        'num_train': validation.Ints(lo=1, unique=True),
    },
}


def get_config(preset: str = 'default') -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f'config preset must be one of {PRESETS}, got {preset!r}')
  c = lowrank.get_config()
  for name in _DROPPED:
    if name in c:
      del c[name]
  c.rank = 10                 # data rank r of the interventions, optimizers and widths (< d)
  c.num_teachers = 4          # teachers T (each its own network and subspace); intervals over them
  # Students K of each teacher per condition: student s is a student of teacher s // K (its
  # teacher and subspace keys are student (s // K) * K's, its init and data keys its own).
  c.students_per_teacher = 1
  c.num_steps = 10000         # training steps per student
  c.chunk_steps = 1000        # steps per jitted lax.scan chunk
  c.attack.strength = 'standard'  # the ensemble (escalated where the convergence check fails)
  c.num_attack = 64           # held-out in-subspace points attacked per student
  # points the doubled ensemble attacks again (the check): all of them, so an escalation
  # reuses the check's attacks
  c.convergence_points = 64
  # a condition whose check fails is attacked again at 2x, then 4x (its last check: 8x)
  c.max_escalations = 2

  # 1. Interventions on the trained students' first-layer weights off S (claim 3's cause).
  c.intervention = ml_collections.ConfigDict()
  iv = c.intervention
  # none (the baseline, required) | transplant (one student node per teacher node gets the
  # teacher's P_perp w) | transplant_all (every specialized student node) | rescale (c P_perp W)
  iv.names = ('none', 'transplant', 'transplant_all', 'rescale')
  iv.rescale_c = (0.0, 0.5, 1.0, 2.0)  # the factors c of rescale (W -> P W + c P_perp W)
  # the transplants match a node pair only when its correlation in S is at least this
  iv.min_corr = 0.9

  # 2.-3. Claim 2 under optimizers, and specialization recorded during training.
  c.optimizers = ml_collections.ConfigDict()
  op = c.optimizers
  op.optimizer_names = ('sgd', 'momentum', 'adam')  # the optimizers, each without and with decay
  op.lr_sgd = 0.5             # plain SGD's learning rate (momentum's 0.05 / (1 - 0.9))
  op.lr_momentum = 0.05       # SGD with momentum (config.momentum)'s learning rate
  op.lr_adam = 0.003          # Adam's learning rate
  op.decay = 1e-4             # the weight decay of the runs "with" it (> 0)
  c.dynamics = ml_collections.ConfigDict()
  dy = c.dynamics
  dy.num_points = 12          # log-spaced steps recorded (on chunk boundaries), 0 included
  dy.record_chunk_steps = 100  # steps per jitted chunk of the optimizer runs (the records' grid)
  # fan-out of the optimizer runs' teacher node j scaled by (j+1)^-decay (strong nodes first)
  dy.teacher_strength_decay = 1.0

  # 4. Claim 5's specificity: teacher-labelled noise off S, isotropic, or in S.
  c.augmentation = ml_collections.ConfigDict()
  au = c.augmentation
  au.kinds = ('orth', 'iso', 'in')  # noise in S_perp | isotropic | in S
  # noise energy E||noise||^2 = scale^2 d for every kind (unsaturated scales)
  au.scales = (0.1, 0.3)
  au.ranks = (5, 10, 20, 30)  # data ranks r (< d) of the comparison
  au.fraction = 0.5           # fraction of each batch that gets noise

  # 5. Dependence of claims 1-3: student width, a finite training set.
  c.dependence = ml_collections.ConfigDict()
  de = c.dependence
  de.width_mults = (1, 2, 5)  # student width multipliers k (online data)
  de.num_train = (256, 1024, 10000)  # fixed training sets of N points (k = config.width_mult)

  if preset == 'strong':  # the defaults' students, on 4x the points, escalated once more
    c.num_attack = 256
    c.max_escalations = 3
  if preset == 'deep':  # a two-hidden-layer teacher, widths up to 10x, claim 5 at one point
    c.teacher_hidden = (10, 10)
    de.width_mults = (1, 2, 5, 10)
    au.ranks = (10,)
    au.scales = (0.3,)
  return c
