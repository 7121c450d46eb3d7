"""The attack ensemble's config fields, shared by every experiment config: defaults
(``add_attack_fields``) and schema (``FIELDS``).

The ensemble is the section ``config.attack``, whose keys are ``evaluate.preset``'s
arguments: ``evaluate.preset(**config.attack)`` builds it (None: the preset's value), and
each key is overridden as ``--config.attack.KEY=VALUE``.
"""

import ml_collections
from ml_collections import config_dict

from experiments import validation
from tsrobust import attacks
from tsrobust import evaluate

_PRESETS = "the preset's"

# Every field ``add_attack_fields`` adds: type, range, choices (validation.check_config).
FIELDS = {
    'attack': {
        'strength': validation.Choice(evaluate.STRENGTHS),
        'pgd_steps': validation.Int(lo=0, none=_PRESETS),
        'pgd_restarts': validation.Int(lo=1, none=_PRESETS),
        'pgd_step_factor': validation.Float(lo=0, lo_open=True),
        'apgd_steps': validation.Int(lo=0, none=_PRESETS),
        'apgd_restarts': validation.Int(lo=1, none=_PRESETS),
        'apgd_t_steps': validation.Int(lo=0, none=_PRESETS),
        'targets': validation.Int(lo=0, none=_PRESETS),
        'square_queries': validation.Int(lo=0, none=_PRESETS),
        'pair_steps': validation.Int(lo=0, none=_PRESETS),
        'pair_targets': validation.Int(lo=0, none=_PRESETS),
        'pair_restarts': validation.Int(lo=1, none=_PRESETS),
        'pair_smoothing': validation.Float(lo=0, none=_PRESETS),
        'pair_momentum': validation.Float(lo=0, lo_open=True, hi=1, none=_PRESETS),
        'oracle_loss': validation.Choice(attacks.ORACLE_LOSSES),
        'oracle_tolerance': validation.Float(lo=0),
    },
    'surrogate_temperature': validation.Float(lo=0),
    'convergence_points': validation.Int(lo=0),
    'max_escalations': validation.Int(lo=0),
    'reference_points': validation.Int(lo=0),
}


def add_attack_fields(c: ml_collections.ConfigDict, oracle_tolerance: float,
                      convergence_points: int) -> None:
  """Adds the ensemble's section and fields (``FIELDS`` validates them)."""
  c.attack = ml_collections.ConfigDict()
  a = c.attack
  a.strength = 'standard'     # fast | standard | strong | reference (evaluate.PRESETS)
  # Overrides of the preset (None: the preset's value; 0 iterations: that attack is off).
  a.pgd_steps = config_dict.placeholder(int)       # PGD steps
  a.pgd_restarts = config_dict.placeholder(int)    # PGD restarts
  a.pgd_step_factor = 2.5     # PGD's alpha = factor * eps / steps (Madry et al.)
  a.apgd_steps = config_dict.placeholder(int)      # APGD iterations (untargeted)
  a.apgd_restarts = config_dict.placeholder(int)   # APGD restarts (untargeted)
  a.apgd_t_steps = config_dict.placeholder(int)    # APGD-T iterations per target class
  a.targets = config_dict.placeholder(int)         # APGD-T target classes
  a.square_queries = config_dict.placeholder(int)  # Square attack queries
  # apgd_pair (oracle labels): APGD iterations per pair of classes.
  a.pair_steps = config_dict.placeholder(int)
  # apgd_pair: the teacher's next classes, 2 pairs each.
  a.pair_targets = config_dict.placeholder(int)
  a.pair_restarts = config_dict.placeholder(int)   # apgd_pair restarts
  # apgd_pair's soft minimum, relative to the logit scale (0: min).
  a.pair_smoothing = config_dict.placeholder(float)
  # apgd_pair's APGD alpha: weight of the new step vs the previous displacement (0.75 in
  # Croce & Hein; 0.4, heavier momentum, follows the teacher's boundaries further).
  a.pair_momentum = config_dict.placeholder(float)
  a.oracle_loss = 'kl'        # PGD's oracle objective: kl | mse
  # An oracle error needs the teacher's top-2 logit gap >= this at x + delta (0: any
  # disagreement; see docs/lowrank.md, "Why a tolerance").
  a.oracle_tolerance = oracle_tolerance
  c.surrogate_temperature = 0.1  # apgd_pair follows ReLU gradients sigmoid(z / T) (0: exact)
  # Convergence check: the ensemble with every iteration, query and target count doubled
  # (AttackConfig.scaled(2), other random keys)
  # attacks the first this-many attacked points again; 0: no check.
  c.convergence_points = convergence_points  # points the doubled ensemble attacks again
  # A group of students (a grid point) whose check fails is attacked again on all its points
  # by the doubled ensemble, then checked at 4x, ..., at most this many doublings; its
  # errors are the union over the levels (0: the check only, nothing escalated).
  c.max_escalations = 3
  # With N > 0, the `reference` preset's ensemble (well beyond `strong`; ~30x `standard`)
  # attacks each group's first N points after the evaluation: how far the default is from it
  # (costly).
  c.reference_points = 0
