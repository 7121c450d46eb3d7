"""The image study's evaluation and reports (``experiments/real.py``'s helpers).

Budgets (``budget``, ``budget_name``: in units of ``1 / eps_denominator``),
the teacher's CNN (``teacher_model``), the methods' settings, the compiled
student evaluator (``Evaluator``: specialization per layer on the test set,
on off-subspace probes with a PCA projector, and the attack ensemble judged
by the oracle and / or the true labels), the result columns, the
correlations and the markdown / figure reports.
"""

import os
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import chex
import jax
import jax.numpy as jnp
import numpy as np

from experiments import study
from experiments import summaries
from tsrobust import cnn
from tsrobust import data
from tsrobust import datasets
from tsrobust import evaluate
from tsrobust import io
from tsrobust import lowrank_eval
from tsrobust import methods
from tsrobust import plotting
from tsrobust import rng
from tsrobust import specialization
from tsrobust import stats
from tsrobust import sweep
from tsrobust import teachers

HPARAM_COLUMNS = methods.hparam_columns(with_at_where=False)
LABEL_KINDS = ('oracle', 'true')  # evaluate.LABEL_KINDS the image study can attack with
WHERES = ('in', 'off', 'full')    # attack subspaces with lowrank_rank > 0 (PCA S, S_perp, all)
PROBE_KEY = rng.IMAGE_PROBES      # fold_in(PRNGKey(seed), .) of the off-subspace probes


def budget(config, eps) -> float:
  """A budget as a fraction of the pixel range: ``eps / eps_denominator``."""
  return float(eps) / float(config.eps_denominator)


def budget_name(config, eps) -> str:
  """Column suffix of a budget: ``0.1`` (denominator 1) or ``8_255`` (8/255)."""
  denom = float(config.eps_denominator)
  if denom == 1:
    return study.eps_name(eps)
  return f'{study.eps_name(eps)}_{int(denom) if denom.is_integer() else denom}'


def clip_range(config) -> Optional[Tuple[float, float]]:
  """Valid pixel range of attacks: [0, 1], or None for PCA-projected (low-rank) images."""
  return None if config.lowrank_rank else (0.0, 1.0)


def attack_labels(config) -> Tuple[str, ...]:
  """The label kinds of the students' attacks, in ``LABEL_KINDS`` order."""
  chosen = study.as_tuple(config.attack_labels)
  return tuple(k for k in LABEL_KINDS if k in chosen)


def teacher_model(config, num_classes: int = datasets.NUM_CLASSES) -> cnn.CNN:
  """The teacher's CNN (``teacher_conv``, ``teacher_dense``, ...); students widen it."""
  return cnn.make_cnn(tuple(config.teacher_conv), tuple(config.teacher_dense), num_classes,
                      kernel_size=config.kernel_size, pool=config.pool,
                      use_bias=config.use_bias)


def method_settings(config) -> methods.Settings:
  """The methods' settings of ``config``: ``attack_norm`` for PGD-AT and CCAT, the pixel
  range (none at low rank), budgets in units of ``1 / eps_denominator``."""
  return methods.Settings(
      loss=config.loss, batch_size=config.batch_size, at_norm=config.attack_norm,
      at_steps=config.at_steps, at_label=config.at_label, at_fraction=config.at_fraction,
      ccat_norm=config.attack_norm, ccat_steps=config.ccat_steps, ccat_rho=config.ccat_rho,
      aug_fraction=config.aug_fraction, step_factor=config.attack.pgd_step_factor,
      clip_range=clip_range(config), budget_scale=1.0 / config.eps_denominator)


def off_subspace_probes(config, x: Any, projector: Any) -> jax.Array:
  """``x + P_perp xi``, ``xi ~ N(0, probe_scale^2 I)`` per image (``x [N, H, W, C]``).

  ``projector``: ``[D, D]`` PCA projector ``P`` over the flattened image. The key
  is ``fold_in(PRNGKey(seed), PROBE_KEY)``: every student sees the same probes.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), PROBE_KEY)
  flat = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  p_perp = jnp.eye(flat.shape[1], dtype=flat.dtype) - jnp.asarray(projector, flat.dtype)
  return data.off_subspace_probe(key, flat, p_perp, config.probe_scale).reshape(x.shape)


def _spec_columns(rows: List[Dict[str, Any]], stats: Dict[str, np.ndarray], tag: str,
                  mean_name: str) -> None:
  """Adds ``spec_{tag}l{l}``, ``mean_name`` (their mean) and ``frac_{tag}l{l}`` to ``rows``."""
  for i, row in enumerate(rows):
    for l in range(stats['spec'].shape[1]):
      row[f'spec_{tag}l{l + 1}'] = float(stats['spec'][i, l])
    row[mean_name] = float(np.nanmean(stats['spec'][i]))
    for l in range(stats['frac'].shape[1]):
      row[f'frac_{tag}l{l + 1}'] = float(stats['frac'][i, l])


class Evaluator:
  """Compiled evaluation of students against one teacher (``lax.map`` over students).

  Specialization on the whole test set; the attack ensemble
  (``tsrobust.evaluate``, ``attack_norm``) on its first ``num_attack``
  images, judged by the oracle and/or the true labels (``attack_labels``).
  Budgets are array arguments: one compilation per attack and label kind.

  With a PCA projector ``P`` (``lowrank_rank > 0``; ``[D, D]`` over the
  flattened image, the centered subspace S) the test images lie in the affine
  set ``m + S``, so their specialization is the in-subspace one; it is also
  measured on the off-subspace probes ``x + P_perp xi``, ``xi ~ N(0,
  probe_scale^2 I)`` (one probe per test image, shared by every student), and
  every attack runs with ``delta`` in S (``in``), in S_perp (``off``) and
  unconstrained (``full``).
  """

  def __init__(self, config, teacher: cnn.CNN, student: cnn.CNN, teacher_params,
               dataset: datasets.Dataset, pca_projector: Optional[Any] = None):
    c = config
    t_apply, s_apply = teacher.apply, student.apply
    tp = teacher_params
    self.config = config
    self.teacher_params = tp
    self.x_test = jnp.asarray(dataset.test_x)
    self.y_test = jnp.asarray(dataset.test_y)
    self.x_att = self.x_test[:c.num_attack]
    self.y_att = self.y_test[:c.num_attack]
    self.labels = attack_labels(config)
    t_fn = lambda v: t_apply(tp, v)[0]

    def spec_one(sp, x, y):
      layers = specialization.network_stats(t_apply, s_apply, tp, sp, x, c.eval_batch)
      sums = [specialization.summarize(s, c.tau) for s in layers]
      batches = x.reshape((-1, c.eval_batch) + x.shape[1:])
      logits = jax.lax.map(lambda xb: s_apply(sp, xb)[0], batches)
      logits = logits.reshape((-1,) + logits.shape[2:])
      pred = logits.argmax(-1)
      t_pred = jax.lax.map(lambda xb: t_fn(xb).argmax(-1), batches).reshape(-1)
      return {'spec': jnp.stack([s.mean_max_corr for s in sums]),
              'frac': jnp.stack([s.frac_specialized for s in sums]),
              'dead': jnp.stack([s.num_dead for s in sums]),
              'clean_acc': (pred == y).mean(), 'clean_agree': (pred == t_pred).mean(),
              'confidence': jax.nn.softmax(logits).max(-1), 'agree': pred == t_pred}

    def spec_probe(sp, x):
      sums = [specialization.summarize(s, c.tau) for s in
              specialization.network_stats(t_apply, s_apply, tp, sp, x, c.eval_batch)]
      return {'spec': jnp.stack([s.mean_max_corr for s in sums]),
              'frac': jnp.stack([s.frac_specialized for s in sums])}

    self._spec = jax.jit(lambda params, x, y: jax.lax.map(
        lambda sp: spec_one(sp, x, y), params))
    self._spec_probe = jax.jit(lambda params, x: jax.lax.map(
        lambda sp: spec_probe(sp, x), params))
    self.projector = None
    if pca_projector is not None:
      p = jnp.asarray(pca_projector, jnp.float32)
      d = int(np.prod(self.x_test.shape[1:]))
      chex.assert_shape(p, (d, d))
      self.projector = p
      self.x_probe = off_subspace_probes(config, self.x_test, p)
    self.attack_config = study.attack_config(config)
    kw = dict(norm=c.attack_norm, clip_range=clip_range(config), shared_teacher=True,
              shared_data=True, batching='map')
    surrogate = lowrank_eval.surrogate_apply(student, teacher, config.surrogate_temperature)
    self.attacks = evaluate.Evaluator(s_apply, t_apply, config=self.attack_config,
                                      surrogate_apply=surrogate, **kw)
    self.doubled_attacks = None
    if c.convergence_points:
      self.doubled_attacks = evaluate.Evaluator(s_apply, t_apply,
                                                config=self.attack_config.scaled(2),
                                                surrogate_apply=surrogate, **kw)
    self.teacher_attacks = evaluate.Evaluator(t_apply, t_apply, config=self.attack_config, **kw)
    # Test-set predictions of a teacher-shaped network (the teacher, the robust model):
    # compiled once, streamed in eval_batch chunks.
    self._teacher_predict = jax.jit(lambda params, x: jax.lax.map(
        lambda xb: t_apply(params, xb)[0].argmax(-1),
        x.reshape((-1, c.eval_batch) + x.shape[1:])).reshape(-1))
    self.budgets = [budget(c, e) for e in c.eps]
    self.names = {budget(c, e): budget_name(c, e) for e in c.eps}

  def _projectors(self, num: int) -> Dict[str, Any]:
    """``{'in': P, 'off': I - P}`` of the restricted attacks (empty at full rank).

    With L2 every subspace runs through one compiled attack: ``in`` and ``off``
    are given per student (``[S, D, D]``, laid over the devices), as the
    identity that ``evaluate.Evaluator.run`` uses for ``full``. With L-inf
    they are shared ``[D, D]`` (``full`` clips per coordinate, unprojected).
    """
    if self.projector is None:
      return {}
    p = self.projector
    projs = {'in': p, 'off': jnp.eye(p.shape[0], dtype=p.dtype) - p}
    if self.config.attack_norm == 'l2':
      projs = {w: study.shard(jnp.broadcast_to(v, (num,) + v.shape)) for w, v in projs.items()}
    return projs

  def _rows(self, ev: lowrank_eval.Evaluation, kinds) -> List[Dict[str, Any]]:
    """``robust_acc_{label}_{eps}`` (ensemble) and ``..._{attack}`` (each attack alone)."""
    acc = evaluate.error_rates(ev.final)
    num = next(iter(acc.values())).shape[0]
    rows = [{} for _ in range(num)]
    for kind in kinds:
      for j, b in enumerate(ev.result.eps):
        for i in range(num):
          rows[i][f'robust_acc_{kind}_{self.names[b]}'] = float(1 - acc[(kind, 'full')][i, j])
        for attack in self.attack_config.attacks_for(kind):
          err = ev.result.success[(kind, 'full', attack)][:, j].mean(-1)
          for i in range(num):
            rows[i][f'robust_acc_{kind}_{self.names[b]}_{attack}'] = float(1 - err[i])
    return rows

  def teacher(self, key, params=None, on_progress=None) -> Dict[str, float]:
    """Clean test accuracy and true-label robust accuracy per budget of one network.

    ``params``: a network of the teacher's architecture (default: the teacher;
    e.g. the robust model of the robust-feature dataset), evaluated by the
    same compiled attacks. The robust accuracy (unconstrained attacks, true
    labels) is reported whatever ``attack_labels`` holds: it costs one
    network, and says how robust the oracle itself is at each budget. ``on_progress``:
    see ``evaluate.Evaluator.run``.
    """
    params = self.teacher_params if params is None else params
    pred = self._teacher_predict(params, self.x_test)
    out = {'clean_acc': float((pred == self.y_test).mean())}
    add_axis = lambda tree: jax.tree_util.tree_map(lambda v: jnp.asarray(v)[None], tree)
    result = self.teacher_attacks.run(add_axis(params), self.teacher_params, self.x_att,
                                      key[None], eps=self.budgets, labels_kinds=('true',),
                                      labels=self.y_att, on_progress=on_progress)
    ev = lowrank_eval.Evaluation(result, evaluate.combine(result))
    out.update({k: v for k, v in self._rows(ev, ('true',))[0].items()})
    return out

  def _adv_rows(self, ev: lowrank_eval.Evaluation) -> List[Dict[str, Any]]:
    """``adv_{label}_{where}_{eps}`` (ensemble, consistent) and ``..._{attack}`` (raw)."""
    return evaluate.records(ev.result, ev.final, self.names)

  def students(self, params, keys, ccat_mask: np.ndarray, progress=None):
    """Metrics of students ``params [P, ...]`` (``keys [P]`` attack keys).

    Returns ``(rows, Evaluation)``; CCAT students (``ccat_mask``) are also
    evaluated by CCAT's criterion (``ccat_err_*``, ``ccat_accepted_wrong_*``),
    and their accepted-and-wrong points count as oracle errors. ``progress``:
    ``what -> on_progress`` (``evaluate.Evaluator.run``), called once per evaluation.
    """
    progress = progress or (lambda what: None)
    c = self.config
    spec = sweep.to_host(self._spec(params, self.x_test, self.y_test))
    num = spec['clean_acc'].shape[0]
    rows = [{} for _ in range(num)]
    _spec_columns(rows, spec, '', 'spec_mean')
    for i in range(num):
      for l in range(spec['spec'].shape[1]):
        rows[i][f'dead_l{l + 1}'] = int(spec['dead'][i, l])
      rows[i]['clean_acc'] = float(spec['clean_acc'][i])
      rows[i]['clean_agree'] = float(spec['clean_agree'][i])
    if self.projector is not None:
      _spec_columns(rows, sweep.to_host(self._spec_probe(params, self.x_probe)), 'off_',
                    'spec_off')
    kwargs = dict(eps=self.budgets, labels_kinds=self.labels,
                  projectors=self._projectors(num) or None)
    result = self.attacks.run(params, self.teacher_params, self.x_att, keys, labels=self.y_att,
                              on_progress=progress(f'{num} students'), **kwargs)
    doubled = None
    if self.doubled_attacks is not None:  # the convergence check (evaluate.doubling)
      x_check, keys_check = lowrank_eval.doubling_args(
          self.x_att, keys, min(int(c.convergence_points), int(c.num_attack)), shared=True)
      doubled = self.doubled_attacks.run(
          params, self.teacher_params, x_check, keys_check, labels=self.y_att[:x_check.shape[0]],
          on_progress=progress(f'convergence check, {num} students'), **kwargs)
    ev = lowrank_eval.Evaluation(result, evaluate.combine(result), doubled)
    sel = np.flatnonzero(ccat_mask)
    for i in range(num):
      for b in sorted(self.budgets):
        rows[i][f'ccat_err_{self.names[b]}'] = None
        rows[i][f'ccat_accepted_wrong_{self.names[b]}'] = None
      rows[i]['ccat_threshold'] = None
    if sel.size:
      pick = lambda tree: jax.tree_util.tree_map(lambda v: v[sel], tree)
      thresholds = np.array([evaluate.ccat_threshold(spec['confidence'][i], spec['agree'][i],
                                                     c.ccat_pass_rate) for i in sel],
                            np.float32)
      res_c = self.attacks.run(pick(params), self.teacher_params, self.x_att, keys[sel],
                               eps=self.budgets, labels_kinds=('ccat',),
                               thresholds=thresholds,
                               on_progress=progress(f"{sel.size} CCAT students by CCAT's "
                                                    f'criterion'))
      fin_c = evaluate.combine(res_c)
      ev = lowrank_eval.Evaluation(result, evaluate.merge_ccat(ev.final, fin_c, sel), doubled)
      for i, c_row, threshold in zip(sel, evaluate.ccat_records(res_c, fin_c, self.names),
                                     thresholds):
        rows[i].update(c_row, ccat_threshold=float(threshold))
    for row, adv in zip(rows, self._rows(ev, self.labels)):
      row.update(adv)
    if self.projector is not None:
      for row, adv in zip(rows, self._adv_rows(ev)):
        row.update(adv)
    return rows, ev


def columns(config) -> List[str]:
  """Columns of ``results.csv``; with ``lowrank_rank > 0`` also the off-subspace ones.

  ``spec_off_l{l}`` / ``spec_off`` / ``frac_off_l{l}`` (probes ``x + P_perp xi``)
  and ``adv_{label}_{where}_{eps}[_{attack}]`` for ``where`` in ``in`` / ``off``
  / ``full``, named as in the low-rank binary (``adv = 1 - robust_acc``; the
  ``full`` ones equal ``1 - robust_acc_{label}_{eps}``).
  """
  n_layers = len(config.teacher_conv) + len(config.teacher_dense)
  labels = attack_labels(config)
  lowrank = config.lowrank_rank > 0
  names = [budget_name(config, e) for e in config.eps]
  attacks_run = study.attack_config(config).attacks
  cols = ['method', 'variant', *HPARAM_COLUMNS, 'seed', 'train_loss']
  cols += [f'spec_l{l + 1}' for l in range(n_layers)] + ['spec_mean']
  if lowrank:
    cols += [f'spec_off_l{l + 1}' for l in range(n_layers)] + ['spec_off']
  cols += [f'frac_l{l + 1}' for l in range(n_layers)]
  if lowrank:
    cols += [f'frac_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'dead_l{l + 1}' for l in range(n_layers)]
  cols += ['clean_acc', 'clean_agree']
  cols += [f'robust_acc_{label}_{n}' for label in labels for n in names]
  cols += [f'robust_acc_{label}_{n}_{a}' for label in labels for n in names for a in attacks_run
           if label == 'oracle' or a not in evaluate.ORACLE_ONLY_ATTACKS]
  if lowrank:
    main, per_attack = evaluate.columns(labels, WHERES, names, attacks_run)
    cols += main + per_attack
  cols += ['ccat_threshold'] + [f'ccat_err_{n}' for n in names]
  cols += [f'ccat_accepted_wrong_{n}' for n in names]
  return cols


def correlations(config, records) -> Dict[str, Any]:
  """Pearson / Spearman of ``spec_mean`` vs robust accuracy per budget: pooled, within methods.

  Intervals bootstrap seeds (all methods of a seed share its initial student
  and data order), see ``summaries.correlation``. With ``lowrank_rank > 0``,
  ``out['spec_off']`` holds the same for ``spec_off`` (off-subspace probes).
  """
  key = jax.random.PRNGKey(config.seed)
  methods = [r['method'] for r in records]
  seeds = [r['seed'] for r in records]

  def table(x_name, offset):
    x = np.array([r[x_name] for r in records], np.float64)
    out = {}
    for i, eps in enumerate(config.eps):
      name = budget_name(config, eps)
      for label in attack_labels(config):
        j = LABEL_KINDS.index(label)
        column = f'robust_acc_{label}_{name}'
        acc = np.array([r[column] for r in records], np.float64)
        out[column] = summaries.correlation(x, acc, methods, seeds,
                                         jax.random.fold_in(key, offset + 10 * i + j),
                                         config.bootstrap_resamples)
    return out
  out = {'x': 'spec_mean', 'n_students': len(records), 'bootstrap': 'clustered by seed',
         **table('spec_mean', 0)}
  if config.lowrank_rank:
    out['spec_off'] = table('spec_off', 1000)
  return out


def wilson_table(config, records) -> str:
  """Robust accuracy per method variant pooled over seeds' attacked images, Wilson 95% intervals."""
  names = [budget_name(config, e) for e in config.eps]
  variants = list(dict.fromkeys(r['variant'] for r in records))
  cols = [f'robust_acc_{label}_{n}' for label in attack_labels(config) for n in names]
  lines = ['Robust accuracy per variant, pooled over its seeds\' attacked images (n = seeds x '
           f'{config.num_attack}), with Wilson 95% intervals:', '',
           '| variant | n | ' + ' | '.join(f'`{c}`' for c in cols) + ' |',
           '|' + '---|' * (2 + len(cols))]
  for v in variants:
    rows = [r for r in records if r['variant'] == v]
    n = len(rows) * config.num_attack
    cells = [v, str(n)]
    for c in cols:
      k = int(round(sum(r[c] for r in rows) * config.num_attack))
      lo, hi = stats.wilson_interval(k, n)
      cells.append(f'{k / n:.3f} [{float(lo):.3f}, {float(hi):.3f}]')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def robust_features_line(config, rf: Dict[str, Any]) -> str:
  """One paragraph on the robust-feature dataset: its robust model and how well it matched."""
  names = [budget_name(config, e) for e in config.eps]
  model = rf['robust_model_eval']
  # The warm-up the robust model's spec holds (teachers.teacher_spec computes it).
  role = 'teacher' if rf['robust_model_is_teacher'] else 'robust_model'
  steps = teachers.teacher_spec(config, role).get('eps_warmup', 0)
  warmup = f', budget ramped up over its first {steps} steps' if steps else ''
  if rf['robust_model_is_teacher']:  # the PGD-trained teacher: its own budget and steps
    origin = (f'the teacher itself (L-inf PGD-AT at {config.teacher_eps:g} for '
              f'{config.teacher_steps} steps{warmup})')
  else:
    origin = ('trained from scratch (own initialization and PRNG stream)'
              if rf['robust_model_init'] == 'scratch' else 'the teacher fine-tuned')
    origin += (f', L-inf PGD-AT at {config.rf_model_eps:g} for {config.rf_model_steps} steps'
               f'{warmup}')
  return (f'Robust-feature dataset: robust model {origin}; clean test accuracy '
          f'{model["clean_acc"]:.3f}, true-label robust accuracy '
          + ', '.join(f'{model[f"robust_acc_true_{n}"]:.3f} (eps {n})' for n in names)
          + f'. Matching: {config.rf_steps} normalized L2 steps of {config.rf_step_size:g} from '
          f'{"another training image" if config.rf_start == "permutation" else "noise"}; mean '
          f'representation distance {rf["rep_distance_start"]:.2f} at the start, '
          f'{rf["rep_distance_end"]:.2f} at the end, against a representation norm of '
          f'{rf["rep_norm"]:.2f} (end / norm {rf["rep_distance_end"] / rf["rep_norm"]:.3f}).')


def summary_markdown(config, records, teacher_eval, corr, sizes,
                     rf: Optional[Dict[str, Any]]) -> str:
  names = [budget_name(config, e) for e in config.eps]
  labels = attack_labels(config)
  n_layers = len(config.teacher_conv) + len(config.teacher_dense)
  cols = [f'spec_l{l + 1}' for l in range(n_layers)] + ['spec_mean']
  if config.lowrank_rank:
    cols += ['spec_off']
  cols += ['clean_acc', 'clean_agree']
  for label in labels:
    cols += [f'robust_acc_{label}_{n}' for n in names]
  if study.has_ccat_evaluation(config):
    cols += [f'ccat_accepted_wrong_{n}' for n in names] + [f'ccat_err_{n}' for n in names]
  teacher_line = (f'Teacher: clean test accuracy {teacher_eval["clean_acc"]:.3f}'
                  '; true-label robust accuracy '
                  + ', '.join(f'{teacher_eval[f"robust_acc_true_{n}"]:.3f} (eps {n})'
                              for n in names))
  lines = [f'# Real images: {sizes["dataset"]} ({sizes["num_train"]} train / '
           f'{sizes["num_test"]} test images, {sizes["num_attack"]} attacked)', '',
           teacher_line + '.', '']
  if rf:
    lines += [robust_features_line(config, rf), '']
  if config.lowrank_rank:
    pca = sizes['pca']
    lines += [f'PCA rank {config.lowrank_rank}: {pca["explained"]:.3f} of the training '
              f'variance; mean L2 norm of a centered training image {pca["norm_centered"]:.2f}, '
              f'of its part in S {pca["norm_in"]:.2f}, of the part the projection drops '
              f'{pca["norm_off"]:.2f} ({pca["rms_off"]:.3f} RMS per pixel). Attacks: '
              f'{config.attack_norm}, delta in S (`in`), in S_perp (`off`), unconstrained '
              f'(`full`); `spec_off` on probes x + P_perp xi, xi ~ N(0, '
              f'{config.probe_scale:g}^2 I).', '']
  reports = {f'robust_acc_{label}_{n}': corr[f'robust_acc_{label}_{n}']
             for label in labels for n in names}
  lines += ['Students (mean +- sample std over seeds):', '',
            io.markdown_summary(records, ['method', *HPARAM_COLUMNS], cols),
            wilson_table(config, records),
            summaries.correlation_markdown(reports, 'spec_mean', config.bootstrap_resamples)]
  if config.lowrank_rank:
    lines += [summaries.SUBSPACE_TABLE_TITLE + ' (delta in S, in S_perp, unconstrained; mean +- '
              'sample std over seeds):', '',
              io.markdown_summary(records, ['method', *HPARAM_COLUMNS],
                                  [f'adv_{label}_{w}_{n}' for label in labels for n in names
                                   for w in WHERES]),
              summaries.correlation_markdown(corr['spec_off'], 'spec_off',
                                          config.bootstrap_resamples)]
  return '\n'.join(lines) + '\n'


def write_reports(config, workdir: str, records: List[Dict[str, Any]], summary: Dict[str, Any],
                  t_start: float) -> None:
  """Correlations, then ``results.csv`` / ``.json``, ``summary.json`` / ``.md`` and the figures.

  ``summary``: the run's ``dataset`` (sizes, ``pca``), ``teacher``,
  ``robust_features``, ``attack_checks``, ``timings_sec`` ... fields;
  ``correlation`` (``correlations``), ``timings_sec['total']`` (since
  ``t_start``, a ``time.perf_counter()``) and ``versions`` are added. Files are
  written by process 0 only.
  """
  corr = correlations(config, records)
  summary['timings_sec']['total'] = time.perf_counter() - t_start
  order = ('dataset', 'teacher', 'student_widths', 'pca_explained_variance',
           'robust_features', 'correlation', 'budgets', 'attack_checks', 'timings_sec')
  summary = {k: corr if k == 'correlation' else summary[k] for k in order}
  summary['versions'] = io.library_versions()
  if jax.process_index() == 0:
    study.write_results(workdir, config, records, columns(config))
    io.write_json(os.path.join(workdir, 'summary.json'), summary)
    io.atomic_write_text(os.path.join(workdir, 'summary.md'),
                         summary_markdown(config, records, summary['teacher'], corr,
                                          summary['dataset'], summary['robust_features'])
                         + '\n' + summaries.attack_checks_markdown(summary['attack_checks']))
    results = os.path.join(workdir, 'results.csv')
    mid = budget_name(config, config.eps[len(config.eps) // 2])
    plotting.plot_spec_per_layer(results, os.path.join(workdir, 'specialization_layers.png'))
    acc_columns = [f'robust_acc_{label}_{mid}' for label in attack_labels(config)]
    plotting.plot_spec_vs_accuracy(results, os.path.join(workdir, 'spec_vs_robust.png'),
                                   acc_columns, norm=config.attack_norm)
    if config.lowrank_rank:
      plotting.plot_spec_vs_accuracy(results, os.path.join(workdir, 'spec_off_vs_robust.png'),
                                     acc_columns, spec_column='spec_off',
                                     norm=config.attack_norm)
  label = attack_labels(config)[0]
  first = corr[f'robust_acc_{label}_{budget_name(config, config.eps[0])}']
  logging.info('spec_mean vs robust_acc_%s (eps %s): pearson %.3f [%.3f, %.3f]', label,
               budget_name(config, config.eps[0]), first['pearson'], *first['pearson_ci'])
