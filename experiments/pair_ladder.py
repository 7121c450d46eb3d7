r"""Where the pair attack's budget finds a robustness run's oracle errors: pairs, iterations, restarts.

Reloads the students of a finished ``experiments.robustness`` run (its final checkpoints in
``--workdir``) and attacks each student's first ``--points`` held-out points, unconstrained,
with the ensemble's ``apgd_pair`` alone (oracle labels, the run's tolerance, smoothing and
momentum) at every budget of a ladder: ``STEPSxTARGETSxRESTARTS`` is APGD with that many
iterations, restarts, and ``2 * TARGETS`` pairs of the clean label and its nearest classes
(``attacks.oracle_pairs``; at most ``2 (C - 1)``). It prints, per grid point and budget, the
mean oracle error of each rung and of the union of all rungs, and names the cells where the
last rung still adds more than ``--tolerance`` over the one before:

    python -m experiments.pair_ladder --workdir=runs/robustness --methods=at \
        --ladder=100x3x1,200x3x1,100x9x1,200x9x1,800x9x1,500x9x2,2000x9x1

With ``--reference=SxTxR`` one more budget runs after the ladder, from keys of its own, and
is compared with the ladder's union (``union - reference`` per cell; not part of the
union): e.g. whether the chain the escalation runs (``100x3x1,200x6x1,400x9x1,800x9x1``: the
pair attack of ``AttackConfig.scaled(2 ** L)``, L = 0..3, on 10 classes) reaches the
``reference`` preset's ``500x9x2``.

The first rung attacks with the run's own keys (``evaluate.Evaluator.run``'s), so with
``--points`` equal to the run's ``num_attack`` a rung of the run's pair budget repeats the
run's first attack exactly (the ``adv_oracle_full_<eps>_apgd_pair`` column, before any
escalation); every other rung draws its own keys. ``docs/evaluation.md`` reads it to say which
part of the reference check's budget finds what the default misses on adversarially trained
students.
"""

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from experiments import robustness
from experiments import study
from tsrobust import evaluate
from tsrobust import io
from tsrobust import lowrank_eval
from tsrobust import rng
from tsrobust import sweep



def define_flags() -> None:
  """The command line's flags, defined when run as a program (not at import, so the module
  can be imported beside others that define flags of the same names)."""
  flags.DEFINE_string('workdir', None, 'A finished experiments.robustness run.')
  flags.DEFINE_list('ladder', ['100x3x1', '200x3x1', '100x9x1', '200x9x1', '800x9x1',
                               '500x9x2'],
                    'Budgets of apgd_pair, weakest first: STEPSxTARGETSxRESTARTS.')
  flags.DEFINE_integer('points', 64, 'Attacked points per student (the first ones).')
  flags.DEFINE_list('methods', None, 'Only these methods (default: every grid point).')
  flags.DEFINE_list('eps', None, "L2 budgets (default: the run's).")
  flags.DEFINE_float('tolerance', 0.01, 'A rung adding more than this to the one before it '
                     'has not converged.')
  flags.DEFINE_string('reference', None, 'One more budget STEPSxTARGETSxRESTARTS, compared '
                      "with the ladder's union (not part of it).")
  flags.DEFINE_string('json', None, 'Also write the table as JSON here.')


_RUNG = re.compile(r'^(\d+)x(\d+)x(\d+)$')


def parse_rung(text: str) -> Tuple[int, int, int]:
  """``'STEPSxTARGETSxRESTARTS'`` -> ``(steps, targets, restarts)``, each >= 1."""
  m = _RUNG.match(text.strip())
  if not m or min(int(g) for g in m.groups()) < 1:
    raise ValueError(f'a --ladder entry must be STEPSxTARGETSxRESTARTS with each >= 1 '
                     f'(e.g. 100x3x1), got {text!r}')
  return tuple(int(g) for g in m.groups())


def rung_config(base: evaluate.AttackConfig, steps: int, targets: int,
                restarts: int) -> evaluate.AttackConfig:
  """``base``'s criteria (tolerance, smoothing, momentum, ...) with ``apgd_pair`` alone at
  that budget: every other attack of the ensemble off."""
  return dataclasses.replace(
      base.with_budget_of('standard'), pgd_steps=0, apgd_steps=0, apgd_t_steps=0,
      square_queries=0, pair_steps=steps, pair_targets=targets, pair_restarts=restarts)


def load_run(workdir: str):
  """The run's config (``config.json``); refuses a folder without finished results."""
  if not workdir or not os.path.exists(os.path.join(workdir, 'results.csv')):
    raise app.UsageError('--workdir must hold a finished experiments.robustness run '
                         '(config.json, results.csv and its checkpoints)')
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  defaults = robustness.robustness_config.get_config()
  for field, value in defaults.items():  # JSON lists back to the config's tuples
    if isinstance(value, tuple) and field in config:
      config[field] = tuple(config[field])
  robustness.validate_config(config)
  return config


def ladder(trained: robustness.Students, config, rungs: Sequence[Tuple[int, int, int]],
           points: int, eps: Sequence[float], methods: Sequence[str] = (),
           reference: Optional[Tuple[int, int, int]] = None) -> Dict[str, Any]:
  """Every rung's oracle success on each selected student's first ``points`` points.

  Returns ``{'groups': [name], 'eps': [..], 'rungs': ['SxTxR'], 'error': [G, R, E] mean,
  'union': [G, E], 'success': {name: [R, S, E, N] bool}}``; with ``reference`` (a budget
  run after the rungs, with the keys a rung at that position would get) also
  ``'reference'`` ``'SxTxR'``, ``'reference_error'`` ``[G, E]`` and
  ``'reference_success'`` ``{name: [S, E, N]}``, outside the union.
  """
  s = trained.num_padded
  keep = [i for i, (m, _) in enumerate(trained.points) if not methods or m in methods]
  if not keep:
    raise ValueError(f'no grid point of methods {list(methods)}: the run has '
                     f'{sorted({m for m, _ in trained.points})}')
  if not 1 <= points <= config.num_attack:
    raise ValueError(f'points must be in [1, num_attack = {config.num_attack}], got {points}')
  students = np.concatenate([np.arange(i * s, i * s + config.num_seeds) for i in keep])
  idx = np.asarray(lowrank_eval.padded_students(students, study.mesh().devices.size))
  pick = lambda tree: jax.tree_util.tree_map(lambda v: np.asarray(v)[idx], tree)
  seeds = idx % s
  take = lambda tree: jax.tree_util.tree_map(lambda v: np.asarray(v)[seeds], tree)
  held = take(trained.held)
  sp, tp, x, keys = study.shard((pick(trained.params), take(trained.problem.teacher_params),
                                 held['x_attack'][:, :points], held['pgd_key']))
  base = trained.evaluator.attack_config
  surrogate = lowrank_eval.surrogate_apply(trained.problem.student, trained.problem.teacher,
                                           config.surrogate_temperature)
  out = []
  for j, rung in enumerate(list(rungs) + ([reference] if reference else [])):
    attacker = evaluate.Evaluator(trained.problem.student.apply, trained.problem.teacher.apply,
                                  norm=config.attack_norm, config=rung_config(base, *rung),
                                  surrogate_apply=surrogate)
    k = keys if j == 0 else jax.vmap(lambda kk, j=j: jax.random.fold_in(
        jax.random.fold_in(kk, rng.PAIR_LADDER), j))(keys)
    result = attacker.run(sp, tp, x, k, eps=eps, labels_kinds=('oracle',),
                          identity_full=config.attack_norm == 'l2')
    out.append(result.success[('oracle', 'full', 'apgd_pair')][:len(students)])
  success = np.stack(out)  # [R (+1), students, E, N]
  r = len(rungs)
  groups, err, union, by_group, ref = [], [], [], {}, {}
  for n, i in enumerate(keep):
    rows = slice(n * config.num_seeds, (n + 1) * config.num_seeds)
    g = success[:r, rows]
    name = study.grid_point_name(*trained.points[i])
    groups.append(name)
    by_group[name] = g
    err.append(g.mean((1, 3)))        # [R, E]
    union.append(g.any(0).mean((0, 2)))  # [E]
    if reference:
      ref[name] = success[r, rows]
  name_of = lambda rung: 'x'.join(str(v) for v in rung)
  table = {'groups': groups, 'eps': [float(e) for e in eps], 'rungs': [name_of(x) for x in rungs],
           'error': np.stack(err), 'union': np.stack(union), 'success': by_group}
  if reference:
    table.update(reference=name_of(reference), reference_success=ref,
                 reference_error=np.stack([ref[g].mean((0, 2)) for g in groups]))
  return table


def unconverged(table: Dict[str, Any], tolerance: float) -> List[Tuple[str, float, float]]:
  """``(group, eps, gain)`` of every cell where the last rung's error exceeds the one before
  it by more than ``tolerance``."""
  if len(table['rungs']) < 2:
    return []
  gain = table['error'][:, -1] - table['error'][:, -2]  # [G, E]
  return [(g, e, float(gain[i, j])) for i, g in enumerate(table['groups'])
          for j, e in enumerate(table['eps']) if gain[i, j] > tolerance]


def markdown(table: Dict[str, Any], points: int, num_seeds: int) -> str:
  """One row per grid point and budget: each rung's error, then the union's."""
  ref = 'reference' in table
  head = ['grid point', 'eps', *table['rungs'], 'union'] + (
      [f"reference {table['reference']}", 'union - reference'] if ref else [])
  lines = [f'apgd_pair alone, oracle labels, unconstrained; {num_seeds} students x the first '
           f'{points} points each; rung = iterations x targets x restarts '
           f'(2 x targets pairs)', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for i, g in enumerate(table['groups']):
    for j, e in enumerate(table['eps']):
      cells = [f'{v:.3f}' for v in table['error'][i, :, j]] + [f'{table["union"][i, j]:.3f}']
      if ref:
        r = table['reference_error'][i, j]
        cells += [f'{r:.3f}', f'{table["union"][i, j] - r:+.3f}']
      lines.append(f'| {g} | {e:g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  f = flags.FLAGS
  sweep.use_all_cpu_cores()  # before any JAX work: the run's devices (one per core)
  sweep.use_unrolled_threefry_on_cpu()  # as the binaries (the same bits, faster)
  config = load_run(f.workdir)
  try:
    rungs = [parse_rung(r) for r in f.ladder]
    reference = parse_rung(f.reference) if f.reference else None
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  eps = ([float(e) for e in f.eps] if f.eps else [float(e) for e in config.eps])
  if min(eps) <= 0:
    raise app.UsageError(f'--eps must be > 0, got {eps}')
  trained = robustness.trained_students(config, f.workdir)
  try:
    table = ladder(trained, config, rungs, f.points, eps, f.methods or (), reference)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(markdown(table, f.points, config.num_seeds))
  for g, e, gain in unconverged(table, f.tolerance):
    print(f'{g} at eps {e:g}: the last rung adds {gain:+.3f} (not converged)')
  if f.json:
    io.write_json(f.json, {
        'workdir': f.workdir, 'points': f.points, 'groups': table['groups'],
        'eps': table['eps'], 'rungs': table['rungs'], 'error': table['error'].tolist(),
        'union': table['union'].tolist(),
        **({'reference': table['reference'],
            'reference_error': table['reference_error'].tolist()} if reference else {})})


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('workdir')
  app.run(main)
