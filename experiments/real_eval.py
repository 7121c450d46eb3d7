"""The image study's evaluation and reports (``experiments/real.py``'s helpers).

Budgets (``budget``, ``budget_name``: in units of ``1 / eps_denominator``),
the teacher's CNN (``teacher_model``), the methods' settings, the student
evaluator of a config (``evaluator``: the library's ``image_eval.ImageEvaluator``,
specialization per layer on the test set, on off-subspace probes with a PCA
projector, and the attack ensemble judged by the oracle and / or the true labels),
the result columns, the correlations and the markdown / figure reports. With several
teachers (``num_teachers > 1``) the correlations' bootstrap resamples teachers and the
reports add teacher-level intervals (``teacher_level``: ``experiments.summaries``'
teacher functions, as the synthetic studies use them).
"""

import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
import numpy as np

from experiments import study
from experiments import summaries
from tsrobust import cnn
from tsrobust import datasets
from tsrobust import evaluate
from tsrobust import image_eval
from tsrobust import io
from tsrobust import lowrank
from tsrobust import methods
from tsrobust import plotting
from tsrobust import stats
from tsrobust import teachers

HPARAM_COLUMNS = methods.hparam_columns(with_at_where=False)
LABEL_KINDS = image_eval.LABELS  # the label kinds the image study can attack with
WHERES = evaluate.WHERES         # attack subspaces with lowrank_rank > 0 (PCA S, S_perp, all)


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


def setting(config) -> image_eval.ImageEvalSetting:
  """The ``image_eval.ImageEvalSetting`` of ``config`` (budgets in pixel units)."""
  same_names = lowrank.from_mapping(image_eval.ImageEvalSetting, config)
  return dataclasses.replace(
      same_names, budgets=tuple(budget(config, e) for e in config.eps),
      budget_names=tuple(budget_name(config, e) for e in config.eps),
      attack_labels=attack_labels(config), clip_range=clip_range(config),
      probe_seed=config.seed)


def evaluator(config, teacher: cnn.CNN, student: cnn.CNN, teacher_params,
              dataset: datasets.Dataset, pca_projector: Optional[Any] = None,
              shared_teacher: bool = True) -> image_eval.ImageEvaluator:
  """The image study's evaluator of ``config`` (``image_eval.ImageEvaluator``);
  ``shared_teacher=False``: its ``students`` take each student's teacher."""
  return image_eval.ImageEvaluator(setting(config), study.attack_config(config), teacher,
                                   student, teacher_params, dataset, pca_projector,
                                   mesh=study.mesh(), shared_teacher=shared_teacher)


def off_subspace_probes(config, x: Any, projector: Any) -> jax.Array:
  """``image_eval.off_subspace_probes`` with the config's seed and ``probe_scale``."""
  return image_eval.off_subspace_probes(x, projector, config.seed, config.probe_scale)


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
  cols = ['method', 'variant', *HPARAM_COLUMNS, 'teacher', 'seed', 'train_loss']
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

  With one teacher the intervals bootstrap seeds (all methods of a seed share
  its initial student and data order); with several, teachers (all students of
  a teacher move together, as in the synthetic studies), see ``summaries.correlation``;
  then ``out['teacher_level']`` holds ``teacher_level``. With ``lowrank_rank > 0``,
  ``out['spec_off']`` holds the same for ``spec_off`` (off-subspace probes).
  """
  key = jax.random.PRNGKey(config.seed)
  methods = [r['method'] for r in records]
  several = config.num_teachers > 1
  unit = 'teacher' if several else 'seed'
  clusters = [r[unit] for r in records]

  def table(x_name, offset):
    x = np.array([r[x_name] for r in records], np.float64)
    out = {}
    for i, eps in enumerate(config.eps):
      name = budget_name(config, eps)
      for label in attack_labels(config):
        j = LABEL_KINDS.index(label)
        column = f'robust_acc_{label}_{name}'
        acc = np.array([r[column] for r in records], np.float64)
        out[column] = summaries.correlation(x, acc, methods, clusters,
                                            jax.random.fold_in(key, offset + 10 * i + j),
                                            config.bootstrap_resamples, unit=unit)
    return out
  out = {'x': 'spec_mean', 'n_students': len(records), 'bootstrap': f'clustered by {unit}',
         **table('spec_mean', 0)}
  if several:
    out['n_teachers'] = len(set(clusters))
  if config.lowrank_rank:
    out['spec_off'] = table('spec_off', 1000)
  if several:
    out['teacher_level'] = teacher_level(config, records)
  return out


def robust_accuracy_columns(config) -> List[str]:
  """``robust_acc_{label}_{eps}`` of every attack label kind and budget."""
  return [f'robust_acc_{label}_{budget_name(config, e)}' for label in attack_labels(config)
          for e in config.eps]


def teacher_level(config, records) -> Dict[str, Any]:
  """Teacher-level inference (``tsrobust.clustered``; ``summaries``' teacher functions).

  ``'variants'``: per variant, ``clean_acc``, ``spec_mean`` and each robust accuracy as
  the mean over teachers with the t-interval over them; ``'paired_vs_standard'``: per
  variant, its robust accuracies minus standard training's, per teacher (None without
  ``standard``); ``'within_variants'``: per robust accuracy, the correlation of
  ``spec_mean`` with it within variants, pooled by Fisher z, and within teacher x variant
  cells (>= 4 students each) with the t-interval over teachers.
  """
  acc = robust_accuracy_columns(config)
  spec = [r['spec_mean'] for r in records]
  return {
      'unit': 'teacher', 'level': 0.95,
      'variants': summaries.teacher_intervals(records, lambda r: r['variant'],
                                              ['clean_acc', 'spec_mean', *acc]),
      'paired_vs_standard': summaries.paired_differences(records, lambda r: r['variant'],
                                                         'standard', acc),
      'within_variants': {c: summaries.within_correlations(
          spec, [r[c] for r in records], [r['variant'] for r in records],
          [r['teacher'] for r in records]) for c in acc}}


def teacher_level_markdown(config, corr) -> str:
  """The teacher-level sections of summary.md (``teacher_level``)."""
  tl = corr['teacher_level']
  acc = robust_accuracy_columns(config)
  t = corr['n_teachers']
  k = config.num_seeds // config.num_teachers
  parts = [f'## Teacher-level inference ({t} teachers x {k} student(s) per teacher per '
           'variant)', '',
           summaries.teacher_intervals_markdown(
               tl['variants'], 'variant', ['clean_acc', 'spec_mean', *acc],
               'Per variant: the mean over teachers of each teacher\'s mean over its '
               'students, with the 95% t-interval over the teachers '
               '(`clustered.teacher_mean_interval`, T - 1 degrees of freedom; the students of '
               'one teacher are not independent draws, so the teacher is the unit).')]
  if tl['paired_vs_standard'] is not None:
    parts.append(summaries.paired_differences_markdown(
        tl['paired_vs_standard'], 'variant', acc,
        'Paired differences against standard training: per teacher, the variant\'s mean '
        'robust accuracy minus standard training\'s (the same teacher), then the mean over '
        'teachers with the 95% t-interval (`clustered.paired_difference`).',
        baseline='standard'))
  parts.append(summaries.within_correlations_markdown(
      tl['within_variants'],
      'Within variants: the Pearson correlation of `spec_mean` with robust accuracy among '
      'the students of one variant, pooled over variants by Fisher z (its interval treats '
      'the variants as independent; they share the teachers, so it is too narrow). '
      '*Teacher x variant*: within the students of one teacher and variant (>= 4 needed), '
      'pooled per teacher, then the t-interval over teachers (`-`: no cell large enough).',
      groups='variants', group='variant'))
  return '\n'.join(parts)


def wilson_table(config, records) -> str:
  """Robust accuracy per method variant pooled over seeds' attacked images, Wilson 95% intervals.

  The intervals treat the seeds x images as independent: with one teacher they hold no
  teacher variation (the text says so); with several, the teacher-level table
  (``teacher_level_markdown``) is the one to read."""
  variants = list(dict.fromkeys(r['variant'] for r in records))
  cols = robust_accuracy_columns(config)
  scope = ('one teacher: the intervals hold no teacher variation' if config.num_teachers == 1
           else f'{config.num_teachers} teachers pooled: these intervals ignore the teacher '
           'variation; see the teacher-level inference below')
  lines = ['Robust accuracy per variant, pooled over its seeds\' attacked images (n = seeds x '
           f'{config.num_attack}), with Wilson 95% intervals ({scope}):', '',
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
          f'{rf["rep_norm"]:.2f} (end / norm {rf["rep_distance_end"] / rf["rep_norm"]:.3f}).'
          + _robust_models_per_teacher(config, rf))


def _robust_models_per_teacher(config, rf: Dict[str, Any]) -> str:
  """With several teachers: whose robust model(s) the paragraph describes ('' with one)."""
  if config.num_teachers == 1:
    return ''
  if 'per_teacher' not in rf:
    return (f' The robust model and its dataset are shared by the {config.num_teachers} '
            'teachers (independent of each); every student fits its own teacher at the '
            'source images.')
  return (' The numbers above are teacher 0\'s; each teacher has its own robust model and '
          'dataset (clean test accuracy '
          + ' / '.join(f'{r["robust_model_eval"]["clean_acc"]:.3f}' for r in rf['per_teacher'])
          + '; end / norm '
          + ' / '.join(f'{r["rep_distance_end"] / r["rep_norm"]:.3f}' for r in rf['per_teacher'])
          + ', teachers 0 to ' + str(len(rf['per_teacher']) - 1) + ').')


def summary_markdown(config, records, teacher_eval, corr, sizes,
                     rf: Optional[Dict[str, Any]],
                     all_teachers: Optional[List[Dict[str, Any]]] = None) -> str:
  """summary.md's text; ``all_teachers``: summary.json's per-teacher entries (several: each
  teacher's line, and the teacher-level sections)."""
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
  def teacher_line(name, ev):
    return (f'{name}: clean test accuracy {ev["clean_acc"]:.3f}; true-label robust accuracy '
            + ', '.join(f'{ev[f"robust_acc_true_{n}"]:.3f} (eps {n})' for n in names) + '.')
  lines = [f'# Real images: {sizes["dataset"]} ({sizes["num_train"]} train / '
           f'{sizes["num_test"]} test images, {sizes["num_attack"]} attacked)', '']
  if all_teachers is None or len(all_teachers) == 1:
    lines += [teacher_line('Teacher', teacher_eval), '']
  else:
    lines += [f'{len(all_teachers)} teachers, {config.num_seeds // len(all_teachers)} student(s) '
              'of each per variant:', '']
    lines += ['- ' + teacher_line(f'Teacher {t["index"]} (`{t["checkpoint"]}`)', t)
              for t in all_teachers]
    lines.append('')
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
  resampled = ('seeds: all methods of a seed move together; one teacher, so the intervals '
               'hold no teacher variation' if config.num_teachers == 1
               else 'teachers: all students of a teacher move together')
  lines += ['Students (mean +- sample std over seeds):', '',
            io.markdown_summary(records, ['method', *HPARAM_COLUMNS], cols),
            wilson_table(config, records),
            summaries.correlation_markdown(reports, 'spec_mean', config.bootstrap_resamples,
                                           resampled=resampled)]
  if config.lowrank_rank:
    lines += [summaries.SUBSPACE_TABLE_TITLE + ' (delta in S, in S_perp, unconstrained; mean +- '
              'sample std over seeds):', '',
              io.markdown_summary(records, ['method', *HPARAM_COLUMNS],
                                  [f'adv_{label}_{w}_{n}' for label in labels for n in names
                                   for w in WHERES]),
              summaries.correlation_markdown(corr['spec_off'], 'spec_off',
                                             config.bootstrap_resamples, resampled=resampled)]
  if 'teacher_level' in corr:
    lines.append(teacher_level_markdown(config, corr))
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
  order = ('dataset', 'teacher', 'teachers', 'student_widths', 'pca_explained_variance',
           'robust_features', 'correlation', 'budgets', 'attack_checks', 'timings_sec')
  summary = {k: corr if k == 'correlation' else summary[k] for k in order}
  summary['versions'] = io.library_versions()
  if jax.process_index() == 0:
    study.write_results(workdir, config, records, columns(config))
    io.write_json(os.path.join(workdir, 'summary.json'), summary)
    io.atomic_write_text(os.path.join(workdir, 'summary.md'),
                         summary_markdown(config, records, summary['teacher'], corr,
                                          summary['dataset'], summary['robust_features'],
                                          summary['teachers'])
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
