"""Default config of the low-rank teacher-student experiment (experiments/lowrank.py).

Every field can be overridden on the command line, e.g.
``--config.ranks='(5, 40)' --config.num_seeds=16``.

``--config=experiments/configs/lowrank.py:smoke`` is a smoke test of the whole pipeline
(training, specialization, the attack ensemble, result files, figure) in about a minute
on 2 CPU cores: d = 20, ranks 5 and 20, 2 seeds, 3,000 steps, 128 attacked points, the
``fast`` ensemble. Its numbers show the effect (students specialize in S, not off it,
and break off it) but are not the manual's.
"""

import ml_collections

from experiments import validation
from experiments.configs import attacks as attack_fields
from tsrobust import attacks
from tsrobust import train

# Student training, shared by every binary.
TRAINING_FIELDS = {
    'seed': validation.Int(lo=0),
    'num_seeds': validation.Int(lo=1),
    'width_mult': validation.Int(lo=1),
    'student_init_scale': validation.Float(lo=0, lo_open=True),
    'loss': validation.Choice(train.LOSSES),
    'optimizer': validation.Choice(train.OPTIMIZERS),
    'learning_rate': validation.Float(lo=0, lo_open=True),
    'momentum': validation.Float(lo=0, hi=0.999),
    'weight_decay': validation.Float(lo=0),
    'schedule': validation.Choice(train.SCHEDULES),
    'batch_size': validation.Int(lo=1),
    'num_steps': validation.Int(lo=0),
    'chunk_steps': validation.Int(lo=1),
}

# The low-rank synthetic setting's fields (this config's and robustness.py's): task, teacher,
# training, evaluation.
SETTING_FIELDS = {
    **TRAINING_FIELDS,
    'd': validation.Int(lo=1),
    'data_scale': validation.Float(lo=0, lo_open=True),
    'energy_matched': validation.Bool(),
    'num_train': validation.Int(lo=0),
    'teacher_hidden': validation.Ints(lo=1),
    'out_dim': validation.Int(lo=2),
    'use_bias': validation.Bool(),
    'teacher_bias_scale': validation.Float(lo=0),
    'strength_decay': validation.Float(lo=0),
    'teacher_per_seed': validation.Bool(),
    'students_per_teacher': validation.Int(lo=1),
    'num_eval': validation.Int(lo=2),
    'eval_batch': validation.Int(lo=1),
    'probe_scale': validation.Float(lo=0, lo_open=True),
    'tau': validation.Float(lo=-1, hi=1),
    'attack_norm': validation.Choice(attacks.NORMS),
    'eps': validation.Floats(lo=0, unique=True),
    **attack_fields.FIELDS,
    'num_attack': validation.Int(lo=1),
}


# Every field of this config: type, range, choices (validation.check_config).
FIELDS = {**SETTING_FIELDS, 'ranks': validation.Ints(lo=1, unique=True)}

PRESETS = ('default', 'smoke')


def get_config(preset: str = 'default') -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f'config preset must be one of {PRESETS}, got {preset!r}')
  c = ml_collections.ConfigDict()
  c.seed = 0                  # master PRNG seed; seed s of the sweep uses fold_in(seed, s)
  c.num_seeds = 8             # students per rank (a vmapped axis)

  # Task: inputs x = U z in an r-dim subspace of R^d.
  c.d = 40                    # input dimension
  c.ranks = (5, 10, 20, 40)   # r = d is the full-rank case
  c.data_scale = 1.0          # per-coordinate std of full-rank data
  c.energy_matched = True     # z ~ N(0, s^2 I_r) with s = data_scale*sqrt(d/r): E||x||^2 equal at every rank
  c.num_train = 0             # 0: fresh samples every step (online); N > 0: a fixed training set of N points

  # Teacher (the oracle): a random ReLU MLP (Tian 2019).
  c.teacher_hidden = (10,)    # hidden widths m_1..m_{L-1}
  c.out_dim = 10              # outputs (classes) C
  c.use_bias = True           # teacher and student layers have biases
  c.teacher_bias_scale = 0.5  # teacher biases ~ N(0, scale^2)
  c.strength_decay = 0.0      # fan-out of hidden node j scaled by (j+1)^-decay
  c.teacher_per_seed = True   # each teacher draws its own network and subspace (False: shared)
  # Students per teacher K: seed s is a student of teacher s // K (its teacher and subspace
  # are seed (s // K) * K's; its init and data streams its own). num_seeds must be a multiple
  # of K; 1: one student per teacher. With teacher_per_seed = False every student has the one
  # shared teacher: K must then be 1 or num_seeds (both say so), and the teacher column is 0.
  c.students_per_teacher = 1

  # Student: same family, widths x width_mult.
  c.width_mult = 5            # student width = width_mult x the teacher's (over-realization)
  c.student_init_scale = 1.0  # kernels start as N(0, scale^2 / fan_in)

  # Training.
  c.loss = 'mse'              # student's loss to the teacher's outputs
  c.optimizer = 'momentum'    # student optimizer
  c.learning_rate = 0.05      # student learning rate
  c.momentum = 0.9            # momentum of optimizer = momentum
  c.weight_decay = 0.0        # L2 penalty added to the gradient (optax.add_decayed_weights)
  c.schedule = 'constant'     # learning-rate schedule
  c.batch_size = 128          # training batch per student and step
  c.num_steps = 20000         # training steps per student
  c.chunk_steps = 2000        # steps per jitted lax.scan chunk

  # Evaluation.
  c.num_eval = 4096           # held-out in-subspace points for specialization
  c.eval_batch = 1024         # streaming batch (must divide num_eval)
  c.probe_scale = 1.0         # xi ~ N(0, probe_scale^2 I_d) in the probes x + P_perp xi
  c.tau = 0.9                 # a teacher node is specialized when max_k rho_jk >= tau

  # Attacks: an ensemble (PGD, APGD, APGD-T, Square; tsrobust/evaluate.py), worst case per
  # example, judged by the oracle and by the teacher's clean label.
  c.attack_norm = 'l2'        # norm of the attack budgets
  c.eps = (0.5, 1.0, 2.0)     # attack budgets; columns are named with these as written
  attack_fields.add_attack_fields(c, oracle_tolerance=0.05, convergence_points=128)
  c.num_attack = 512          # held-out in-subspace points attacked

  if preset == 'smoke':
    c.update(d=20, ranks=(5, 20), num_seeds=2, num_steps=3000, chunk_steps=1000,
             num_eval=1024, eval_batch=512, num_attack=128)
    c.attack.strength = 'fast'
    # A demonstration, not a measurement: the check runs and says the fast ensemble has not
    # converged, without attacking harder (escalating it costs minutes).
    c.max_escalations = 0
  return c
