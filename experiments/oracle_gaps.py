r"""Where do oracle errors lie? The teacher's top-2 logit gap at the points an attack breaks.

Reloads one trained student of a finished low-rank run (its final checkpoint in
``--workdir``), attacks its held-out points with untargeted APGD on the oracle
margin, *strict* oracle (any disagreement counts), in the data subspace S and
in its complement, and prints the teacher's top-2 logit gap at the successes
next to its gap at the clean points, and the student's logit error on them.
Successes whose gap is ~0 sit on the teacher's own decision boundary: the
slivers that ``config.attack.oracle_tolerance`` excludes.

    python -m experiments.oracle_gaps --workdir=runs/lowrank --rank=5 --seed_index=0
"""

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import study
from tsrobust import attacks
from tsrobust import evaluate
from tsrobust import lowrank
from tsrobust import train

flags.DEFINE_string('workdir', None, 'A finished experiments.lowrank run.')
flags.DEFINE_integer('rank', 5, 'Which rank of the run.')
flags.DEFINE_integer('seed_index', 0, 'Which student (seed) of that rank.')
flags.DEFINE_float('eps', 1.0, 'L2 budget.')
flags.DEFINE_integer('steps', 30, 'APGD iterations.')


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  if not workdir or not os.path.exists(os.path.join(workdir, 'config.json')):
    raise app.UsageError('--workdir must hold a finished experiments.lowrank run')
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  for field in ('teacher_hidden', 'ranks', 'eps'):
    config[field] = tuple(config[field])
  r, i = flags.FLAGS.rank, flags.FLAGS.seed_index
  if r not in config.ranks or r == config.d:
    raise app.UsageError(f'--rank must be one of the run\'s ranks below d: {config.ranks}')
  if not 0 <= i < config.num_seeds:
    raise app.UsageError(f'--seed_index must be in [0, {config.num_seeds})')
  keys = study.seed_keys(config)
  problem = lowrank.build_problem(study.setting(config), keys)
  optimizer = study.make_optimizer(config)
  scales = jnp.full((keys.eval.shape[0],), lowrank.data_scale(study.setting(config), r))
  data_args = lowrank.lowrank_args(problem.bases, r, scales)
  projector = data_args['projector']
  evaluator = study.lowrank_evaluator(config, problem)
  held = evaluator.held_out(projector, scales, keys.eval)
  if config.num_train:
    data_args['train_x'] = held['train_x']
  state = jax.vmap(lambda p: train.init_state(p, optimizer))(problem.student_params)
  loss_fn = train.teacher_regression_loss(problem.student.apply, problem.teacher.apply,
                                          config.loss, lowrank.sampler(config.num_train),
                                          config.batch_size)
  state, _ = study.train_or_keep_last_good(loss_fn, optimizer, state, problem.teacher_params,
                                           data_args, keys.train, config, workdir, f'rank{r}')
  pick = lambda tree: jax.tree_util.tree_map(lambda v: np.asarray(v)[i], tree)
  sp, tp = pick(state.params), pick(problem.teacher_params)
  s_fn = lambda v: problem.student.apply(sp, v)[0]
  t_fn = lambda v: problem.teacher.apply(tp, v)[0]
  x, p = pick(held['x_attack']), pick(projector)
  gap = lambda v: np.asarray(evaluate.teacher_gap(t_fn(v)))
  err = float(jnp.sqrt(((s_fn(x) - t_fn(x)) ** 2).mean()))
  print(f'rank {r}, seed {i}: student-teacher logit error on clean points (RMS) {err:.4f}')
  q = np.quantile(gap(x), [0.01, 0.1, 0.5])
  print(f'teacher gap at clean points: 1% {q[0]:.4f}, 10% {q[1]:.4f}, median {q[2]:.4f}')
  success = attacks.oracle_success(s_fn, t_fn)
  for name, proj in (('in S', p), ('in S_perp', np.eye(p.shape[0], dtype=p.dtype) - p)):
    delta = attacks.apgd(attacks.oracle_margin_objective(s_fn, t_fn), x, jax.random.PRNGKey(0),
                         eps=flags.FLAGS.eps, steps=flags.FLAGS.steps, norm='l2',
                         projector=jnp.asarray(proj), success_fn=success)
    ok = np.asarray(success(x + delta))
    g = gap(x + delta)[ok]
    line = f'{name}: strict oracle error {ok.mean():.3f}'
    if ok.any():
      line += (f'; teacher gap at the successes: median {np.median(g):.4f}, max {g.max():.4f}, '
               f'fraction < 0.05: {(g < 0.05).mean():.3f}')
    print(line)


if __name__ == '__main__':
  app.run(main)
