"""Default config of the specialization-robustness study (experiments/robustness.py).

Starts from the low-rank experiment's config (same task, networks, training
and evaluation fields) at one rank, and adds the grid of training methods.
Every field can be overridden on the command line.
"""

from experiments.configs import lowrank


def get_config():
  c = lowrank.get_config()
  del c['ranks']
  c.rank = 10                 # data rank r (< d, so there is an off-subspace)
  c.num_seeds = 4             # students per grid point
  c.num_steps = 10000         # training steps per student
  c.chunk_steps = 1000        # steps per jitted lax.scan chunk
  c.eps = (0.5, 1.0, 2.0)     # evaluation budgets (L2); the middle one is the headline

  c.methods = ('standard', 'at', 'ccat', 'orth', 'iso')  # the training methods compared
  # PGD adversarial training (Madry et al. 2018): grid at_eps x at_where.
  c.at_eps = (0.5, 1.0, 2.0)   # PGD-AT training budgets
  c.at_where = ('full', 'in')  # full: unconstrained; in: delta restricted to the data subspace
  c.at_label = 'oracle'        # oracle: teacher at the perturbed point; fixed: at the clean point
  c.at_norm = 'l2'             # norm of PGD-AT's budget
  c.at_steps = 5               # PGD steps per training batch
  c.at_fraction = 1.0          # fraction of each batch replaced by PGD points
  # CCAT (Stutz et al. 2020), trained with its own cross-entropy loss.
  c.ccat_eps = (1.0,)          # CCAT training budgets
  c.ccat_norm = 'l2'           # norm of CCAT's budget (and of its lam)
  c.ccat_steps = 5             # PGD steps of CCAT's attack
  c.ccat_rho = 10.0            # lam = (1 - min(1, ||delta|| / eps))^rho
  c.ccat_pass_rate = 0.99      # evaluation: threshold passing this fraction of clean points
  # Noise augmentation, teacher-labelled: orth = x + P_perp xi, iso = x + xi (control).
  c.aug_scales = (0.5, 1.0, 2.0)  # std of the noise xi (orth, iso)
  c.aug_fraction = 0.5         # fraction of each batch replaced by noisy points

  c.bootstrap_resamples = 2000  # bootstrap resamples (of seeds) of the correlation intervals
  return c
