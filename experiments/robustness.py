r"""The specialization-robustness study (PAPER.md sections 4-7, claims 4-5).

On the low-rank synthetic setting (one rank r < d), trains students with
every method of a grid - standard training, PGD adversarial training (several
budgets, unconstrained and restricted to the data subspace), CCAT, and noise
augmentation in the orthogonal complement of the data subspace or
isotropic (the control) at several scales - ``num_seeds`` students per grid
point. Each method is compiled once: its grid points and seeds form one
vmapped axis. All students are then evaluated together as in the low-rank
experiment, and specialization is correlated with robust accuracy.

    python -m experiments.robustness --workdir=runs/robustness \
        [--config=experiments/configs/robustness.py] [--config.FIELD=VALUE ...]

Writes into ``--workdir``: ``results.csv`` / ``results.json`` (one row per
student), ``correlation.json``, ``summary.md`` (mean +- std per grid point)
and ``robustness.png`` (specialization vs robust accuracy, one color per
method).
"""

import os
import time
from typing import Any, Dict, List, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import validation
from tsrobust import attacks
from tsrobust import evaluate
from tsrobust import io
from tsrobust import plotting
from tsrobust import sweep
from tsrobust import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'robustness.py')

METHODS = ('standard', 'at', 'ccat', 'orth', 'iso')
HPARAM_COLUMNS = ('at_eps', 'at_where', 'at_label', 'ccat_eps', 'aug_scale')


# Every config field: type, range, choices (validation.check_config).
CONFIG_FIELDS = {
    **common.LOWRANK_FIELDS,
    **common.METHOD_GRID_FIELDS,
    'rank': validation.Int(lo=1),
    'methods': validation.Names(METHODS),
    'at_where': validation.Names(('full', 'in')),
    'at_norm': validation.Choice(attacks.NORMS),
    'ccat_norm': validation.Choice(attacks.NORMS),
}


def validate_config(config) -> None:
  """Checks every field at start; raises ``common.ConfigError`` naming the field.

  The table ``CONFIG_FIELDS``, then the cross-field rules: ``rank < d``,
  ``batch_size >= 2`` with CCAT, and ``common.check_lowrank_rules``
  (``eval_batch`` divides ``num_eval``; a valid attack ensemble).
  """
  validation.check_config(config, CONFIG_FIELDS)
  if config.rank >= config.d:
    raise common.ConfigError(
        f'config.rank must satisfy 1 <= rank < d = {config.d} (the study needs an '
        f'off-subspace), got {config.rank}')
  common.check_ccat_batch(config)
  common.check_lowrank_rules(config)


def grid(config) -> List[Tuple[str, Dict[str, Any]]]:
  """``(method, hyper-parameters)`` of every grid point, grouped by method."""
  points = []
  for method in common.as_tuple(config.methods):
    if method == 'standard':
      points.append((method, {}))
    elif method == 'at':
      points += [(method, {'at_eps': e, 'at_where': w, 'at_label': config.at_label})
                 for w in common.as_tuple(config.at_where) for e in config.at_eps]
    elif method == 'ccat':
      points += [(method, {'ccat_eps': e}) for e in config.ccat_eps]
    else:
      points += [(method, {'aug_scale': s}) for s in config.aug_scales]
  return points


def columns(config) -> List[str]:
  cols = ['method', *HPARAM_COLUMNS, 'seed'] + common.metric_columns(config)
  if 'ccat' in common.as_tuple(config.methods):
    cols += ['ccat_threshold'] + [f'ccat_err_{common.eps_name(e)}' for e in config.eps]
    cols += [f'ccat_accepted_wrong_{common.eps_name(e)}' for e in config.eps]
  return cols


def _method_loss(config, method: str, problem):
  """The loss function of ``method``, compiled once for all its grid points."""
  t_apply, s_apply = problem.teacher.apply, problem.student.apply
  sample = common.sampler(config.num_train)
  if method == 'standard':
    return train.teacher_regression_loss(s_apply, t_apply, config.loss, sample,
                                         config.batch_size)
  if method == 'at':
    transform = train.pgd_augmentation(s_apply, t_apply, config.loss, norm=config.at_norm,
                                       steps=config.at_steps,
                                       step_factor=config.attack_step_factor,
                                       label=config.at_label)
    return train.teacher_regression_loss(
        s_apply, t_apply, config.loss, sample, config.batch_size, transform=transform,
        label_at='transformed' if config.at_label == 'oracle' else 'clean')
  if method == 'ccat':
    return train.ccat_loss(s_apply, t_apply, sample, config.batch_size, norm=config.ccat_norm,
                           steps=config.ccat_steps, step_factor=config.attack_step_factor,
                           rho=config.ccat_rho)
  kind = {'orth': 'orthogonal', 'iso': 'isotropic'}[method]
  return train.teacher_regression_loss(s_apply, t_apply, config.loss, sample,
                                       config.batch_size,
                                       transform=train.noise_augmentation(kind))


def _tile(tree, times: int):
  """Repeats the leading seeds axis: ``[S, ...] -> [times * S, ...]`` (grid-major)."""
  return jax.tree_util.tree_map(lambda v: jnp.concatenate([v] * times), tree)


def _method_args(config, points, projector, scales) -> Dict[str, jax.Array]:
  """Per-student ``data_args`` for one method's grid points x seeds."""
  s, d = config.num_seeds, config.d
  g = len(points)
  args = {'projector': _tile(projector, g), 'scale': _tile(scales, g)}
  eye = jnp.broadcast_to(jnp.eye(d), projector.shape)

  def per_point(name):  # grid-major: student g * S + seed has grid point g's value
    return jnp.repeat(jnp.array([hp[name] for _, hp in points], jnp.float32), s)
  method = points[0][0]
  if method == 'at':
    args['at_eps'] = per_point('at_eps')
    args['at_fraction'] = jnp.full((g * s,), config.at_fraction)
    args['at_projector'] = jnp.concatenate(
        [projector if hp['at_where'] == 'in' else eye for _, hp in points])
  elif method == 'ccat':
    args['ccat_eps'] = per_point('ccat_eps')
    args['ccat_projector'] = _tile(eye, g)
  elif method in ('orth', 'iso'):
    args['aug_scale'] = per_point('aug_scale')
    args['aug_fraction'] = jnp.full((g * s,), config.aug_fraction)
  return args


def _merge_ccat(ev: common.Evaluation, ev_ccat: common.Evaluation,
                sel: np.ndarray) -> common.Evaluation:
  """Counts CCAT-attack successes (accepted and wrong) as oracle errors of those students.

  A point that is accepted and wrong w.r.t. the oracle is wrong w.r.t. the
  oracle, so the plain error is at least the thresholded one by construction.
  """
  final = {k: v.copy() for k, v in ev.final.items()}
  for (label, where), v in ev_ccat.final.items():
    final[('oracle', where)][sel] |= v
  return common.Evaluation(ev.result, final)


def correlations(config, records) -> Dict[str, Any]:
  """Pearson / Spearman of robust accuracy vs specialization: pooled, within methods, by seed."""
  key = jax.random.PRNGKey(config.seed)
  out = {'robust_accuracy': '1 - adv_oracle_full_{eps}', 'n_students': len(records),
         'bootstrap': 'clustered by seed'}
  spec = {'spec_in': np.array([r['spec_in'] for r in records]),
          'spec_off': np.array([r['spec_off'] for r in records])}
  spec['spec_mean'] = (spec['spec_in'] + spec['spec_off']) / 2
  methods = [r['method'] for r in records]
  seeds = [r['seed'] for r in records]
  for i, eps in enumerate(config.eps):
    name = common.eps_name(eps)
    acc = 1.0 - np.array([r[f'adv_oracle_full_{name}'] for r in records])
    out[f'eps_{name}'] = {
        s_name: common.correlation(s_val, acc, methods, seeds,
                                   jax.random.fold_in(key, 10 * i + j),
                                   config.bootstrap_resamples)
        for j, (s_name, s_val) in enumerate(spec.items())}
  return out


def correlation_markdown(config, corr) -> str:
  """Per specialization measure, the correlation table over budgets."""
  parts = []
  for s_name in ('spec_off', 'spec_in', 'spec_mean'):
    names = [common.eps_name(e) for e in config.eps]
    reports = {f'1 - adv_oracle_full_{n}': corr[f'eps_{n}'][s_name] for n in names}
    parts.append(common.correlation_markdown(reports, s_name, config.bootstrap_resamples))
  return '\n'.join(parts)


def train_and_evaluate(config, workdir: str) -> List[Dict[str, Any]]:
  """Runs the study and writes the result files; returns the records."""
  validate_config(config)
  common.prepare_workdir(workdir, config)
  r = config.rank
  s = common.num_padded_seeds(config)  # >= num_seeds; the padded seeds are dropped
  keys = common.seed_keys(config)
  problem = common.build_problem(config, keys)
  optimizer = common.make_optimizer(config)
  evaluator = common.LowRankEvaluator(config, problem.teacher, problem.student)
  projector = common.rank_projector(problem.bases, r)
  scales = jnp.full((s,), common.data_scale(config, r))
  held = evaluator.held_out(projector, scales, keys.eval)

  points = grid(config)
  methods = list(dict.fromkeys(m for m, _ in points))
  trained, losses = [], []
  for method in methods:
    mpoints = [p for p in points if p[0] == method]
    g = len(mpoints)
    t0 = time.perf_counter()
    data_args = _method_args(config, mpoints, projector, scales)
    if config.num_train:
      data_args['train_x'] = _tile(held['train_x'], g)
    state = jax.vmap(lambda p: train.init_state(p, optimizer))(
        _tile(problem.student_params, g))
    state, loss = common.train_or_keep_last_good(
        _method_loss(config, method, problem), optimizer, state,
        _tile(problem.teacher_params, g), data_args, _tile(keys.train, g), config, workdir,
        method)
    trained.append(sweep.to_host(state.params))
    losses.append(loss[:, -1] if loss.size else np.full((g * s,), np.nan))
    logging.info('trained %s: %d grid points x %d seeds in %.1fs', method, g, s,
                 time.perf_counter() - t0)

  # Evaluate every student at once: one compilation for the whole study.
  t0 = time.perf_counter()
  n_points = len(points)
  params = jax.tree_util.tree_map(lambda *v: np.concatenate(v), *trained)
  tparams = _tile(problem.teacher_params, n_points)
  held_all = _tile(held, n_points)
  proj_all = _tile(projector, n_points)
  rows, ev = evaluator.evaluate(params, tparams, proj_all, held_all, full_rank=False)
  ccat_idx = [i for i, (m, _) in enumerate(points) if m == 'ccat']
  ccat = {}
  if ccat_idx:
    # CCAT's own evaluation: threshold passing ccat_pass_rate of the correctly classified
    # held-out points, the ensemble plus CCAT's objective judged by acceptance and the oracle.
    sel = np.concatenate([np.arange(i * s, (i + 1) * s) for i in ccat_idx])
    pick = lambda tree: jax.tree_util.tree_map(lambda v: v[sel], tree)
    c_params, c_tparams, c_held, c_proj = common.shard(
        (pick(params), pick(tparams), pick(held_all), pick(proj_all)))
    thresholds = evaluator.ccat_thresholds(c_params, c_tparams, c_held)
    ev_c = evaluator.attack(c_params, c_tparams, c_proj, c_held, full_rank=False,
                            labels_kinds=('ccat',), thresholds=thresholds)
    rerr = evaluate.ccat_error(ev_c.result, ev_c.final)
    wrong = ev_c.final[('ccat', 'full')].mean(-1)
    for j, eps in enumerate(sorted(config.eps)):
      name = common.eps_name(eps)
      ccat[f'ccat_err_{name}'] = rerr[:, j]
      ccat[f'ccat_accepted_wrong_{name}'] = wrong[:, j]
    ccat['ccat_threshold'] = thresholds
    ev = _merge_ccat(ev, ev_c, sel)
    adv = common.attack_rows(config, ev, full_rank=False)
    for row, a in zip(rows, adv):
      row.update(a)
  logging.info('evaluated %d students in %.1fs', len(rows), time.perf_counter() - t0)
  checks = {}
  for method in methods:
    mask = np.array([points[p][0] == method and seed < config.num_seeds
                     for p in range(n_points) for seed in range(s)])
    checks[method] = evaluate.attack_checks(
        ev.result, ev.final, headline=common.headline_eps(config),
        attacks_run=evaluator.attack_config.attacks,
        convergence_points=evaluator.attack_config.convergence_points(), rows=mask)
  checks = common.attack_checks_summary(config, checks)

  loss_all = np.concatenate(losses)
  records, ccat_row = [], 0
  for p, (method, hp) in enumerate(points):
    for seed in range(s):
      i = p * s + seed
      if seed >= config.num_seeds:  # a padded seed
        if method == 'ccat':
          ccat_row += 1
        continue
      rec = {'method': method, **{h: hp.get(h) for h in HPARAM_COLUMNS}, 'seed': seed,
             'train_loss': float(loss_all[i]), **rows[i]}
      if method == 'ccat':
        rec.update({k: float(v[ccat_row]) for k, v in ccat.items()})
        ccat_row += 1
      records.append(rec)

  mid = common.eps_name(common.headline_eps(config))
  corr = correlations(config, records)
  common.write_results(workdir, config, records, columns(config))
  summary_cols = common.spec_columns(config) + [
      'wcos_off', 'clean_agree', f'adv_oracle_in_{mid}', f'adv_oracle_off_{mid}',
      f'adv_oracle_full_{mid}']
  if ccat_idx:
    summary_cols += [f'ccat_accepted_wrong_{mid}', f'ccat_err_{mid}']
  if jax.process_index() == 0:
    io.write_json(os.path.join(workdir, 'correlation.json'), corr)
    io.write_json(os.path.join(workdir, 'attack_checks.json'), checks)
    io.atomic_write_text(os.path.join(workdir, 'summary.md'), io.markdown_summary(
        records, ['method', 'at_eps', 'at_where', 'ccat_eps', 'aug_scale'], summary_cols)
        + '\n' + correlation_markdown(config, corr) + '\n'
        + common.attack_checks_markdown(checks))
    plotting.plot_spec_vs_robustness(os.path.join(workdir, 'results.csv'),
                                     os.path.join(workdir, 'robustness.png'), eps=mid)
  c_mid = corr[f'eps_{mid}']['spec_off']
  logging.info('spec_off vs robust accuracy at eps %s: pearson %.3f [%.3f, %.3f]', mid,
               c_mid['pearson'], *c_mid['pearson_ci'])
  return records


if __name__ == '__main__':
  common.run_binary(validate_config, train_and_evaluate, _DEFAULT_CONFIG,
                    ('results.csv', 'results.json', 'correlation.json', 'summary.md',
                     'attack_checks.json', 'robustness.png'))
