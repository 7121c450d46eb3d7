"""The attack ensemble's config fields, shared by every experiment config: defaults
(``add_attack_fields``) and schema (``FIELDS``)."""

import ml_collections

from experiments import validation
from tsrobust import attacks
from tsrobust import evaluate

_PRESETS = {-1: "the preset's"}

# Every field ``add_attack_fields`` adds: type, range, choices (validation.check_config).
FIELDS = {
    'attack_strength': validation.Choice(evaluate.STRENGTHS),
    'attack_steps': validation.Int(lo=-1),
    'attack_restarts': validation.Int(lo=1, special=_PRESETS),
    'apgd_steps': validation.Int(lo=-1),
    'apgd_restarts': validation.Int(lo=1, special=_PRESETS),
    'apgd_t_steps': validation.Int(lo=-1),
    'attack_targets': validation.Int(lo=-1),
    'square_queries': validation.Int(lo=-1),
    'pair_steps': validation.Int(lo=-1),
    'pair_targets': validation.Int(lo=-1),
    'pair_restarts': validation.Int(lo=1, special=_PRESETS),
    'pair_smoothing': validation.Float(lo=0, special={-1.0: "the preset's"}),
    'surrogate_temperature': validation.Float(lo=0),
    'convergence_points': validation.Int(lo=0),
    'attack_step_factor': validation.Float(lo=0, lo_open=True),
    'oracle_loss': validation.Choice(attacks.ORACLE_LOSSES),
    'oracle_tolerance': validation.Float(lo=0),
}




def add_attack_fields(c: ml_collections.ConfigDict, oracle_tolerance: float,
                      convergence_points: int) -> None:
  """Adds the ensemble's fields (``FIELDS`` validates them, ``study.attack_config`` reads them)."""
  c.attack_strength = 'standard'  # fast | standard | strong | reference (evaluate.PRESETS)
  # Overrides of the preset (-1: the preset's value; 0 iterations: that attack is off).
  c.attack_steps = -1         # PGD steps
  c.attack_restarts = -1      # PGD restarts
  c.apgd_steps = -1           # APGD iterations (untargeted)
  c.apgd_restarts = -1        # APGD restarts (untargeted)
  c.apgd_t_steps = -1         # APGD-T iterations per target class
  c.attack_targets = -1       # APGD-T target classes
  c.square_queries = -1       # Square attack queries
  c.pair_steps = -1           # apgd_pair (oracle labels): APGD iterations per pair of classes
  c.pair_targets = -1         # apgd_pair: the teacher's next classes, 2 pairs each
  c.pair_restarts = -1        # apgd_pair restarts
  c.pair_smoothing = -1.0     # apgd_pair's soft minimum, relative to the logit scale (0: min)
  c.surrogate_temperature = 0.1  # apgd_pair follows ReLU gradients sigmoid(z / T) (0: exact)
  # Convergence check: the ensemble with every iteration count doubled (other random keys)
  # attacks the first this-many attacked points again; 0: no check.
  c.convergence_points = convergence_points  # points the doubled ensemble attacks again
  c.attack_step_factor = 2.5  # PGD's alpha = factor * eps / steps (Madry et al.)
  c.oracle_loss = 'kl'        # PGD's oracle objective: kl | mse
  # An oracle error needs the teacher's top-2 logit gap >= this at x + delta (0: any
  # disagreement; see docs/lowrank.md, "Why a tolerance").
  c.oracle_tolerance = oracle_tolerance
