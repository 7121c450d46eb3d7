r"""The mechanism study: why students break off the data subspace (claims 2, 3 and 5).

The paper's argument is a mechanism: first-layer gradients lie in the data subspace S, so
``P_perp W`` of a student never leaves its random initialization (claim 2), and
perturbations in S_perp move teacher and student pre-activations by unrelated amounts
(claim 3). On the low-rank setting (rank ``rank`` of ``d``), with ``num_teachers`` teachers
x ``students_per_teacher`` students per condition, this binary tests it directly:

1. **Interventions** (``config.intervention``): after standard training, the students'
   ``P_perp W`` is replaced by their teacher nodes' - one student node per teacher node
   (``transplant``: ``mechanism.transplant_off_subspace``) or every student node specialized
   to one (``transplant_all``: ``mechanism.transplant_off_subspace_all``) - or rescaled,
   ``W -> P W + c P_perp W`` (``mechanism.rescale_off_subspace``); each variant is evaluated
   like a trained student.
2. **Optimizers** (``config.optimizers``): SGD, SGD with momentum and Adam, each without and
   with weight decay: ``||P_perp (W - W0)|| / ||P_perp W0||`` and the off-subspace weight
   cosine beside its random baseline.
3. **Dynamics** (``config.dynamics``): the same runs record, at log-spaced steps inside the
   one training pass (``mechanism.train_with_snapshots``), every teacher node's best
   correlation in and off S and its student's ``P_perp`` movement; the teachers have strength
   decay, so the order in which nodes specialize can be read against their strength.
4. **Claim 5's specificity** (``config.augmentation``): teacher-labelled noise in S_perp
   (``orth``), isotropic (``iso``) or in S (``in``) at matched noise energy
   (``E||noise||^2 = scale^2 d``), at unsaturated scales and several ranks; paired per teacher.
5. **Dependence** (``config.dependence``): claims 1-3 (spec_in, spec_off, off-subspace minus
   in-subspace error) for several student widths and for finite training sets.

Every student of items 1, 4 and 5 is evaluated at once by one ``LowRankEvaluator``
(narrower students zero-padded to its width, ``pad_params``): specialization in and off S, and
the attack ensemble for oracle labels (the teacher at ``x + delta``) in S, S_perp and
unconstrained, with the convergence check and its escalation per condition. Intervals are over
teachers (``tsrobust.clustered``): the t-interval of the teacher means, and differences paired
per teacher. The tables and figures are ``experiments/mechanism_report.py``'s.

    python -m experiments.mechanism --workdir=runs/mechanism \
        [--config=experiments/configs/mechanism.py] [--config.FIELD=VALUE ...]

Writes into ``--workdir``: ``results.csv`` / ``results.json`` (one record per student per
condition, column ``part`` naming the item above), ``dynamics.csv`` (one record per student,
recorded step and teacher node), ``intervals.json`` (the teacher-level intervals and paired
differences of the tables), ``attack_checks.json``, ``summary.md`` (the tables) and the
figures ``mechanism_intervention.png``, ``mechanism_dynamics.png``,
``mechanism_claim5.png``.
"""

import dataclasses
import functools
import math
import os
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments import mechanism_report
from experiments import study
from experiments import summaries
from experiments import validation
from experiments.configs import mechanism as mechanism_config
from tsrobust import data
from tsrobust import evaluate
from tsrobust import io
from tsrobust import lowrank
from tsrobust import lowrank_eval
from tsrobust import mechanism
from tsrobust import methods as methods_lib
from tsrobust import metrics
from tsrobust import numerics
from tsrobust import specialization
from tsrobust import sweep
from tsrobust import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs', 'mechanism.py')

OUTPUTS = ('results.csv', 'results.json', 'dynamics.csv', 'intervals.json',
           'attack_checks.json', 'summary.md', 'mechanism_intervention.png',
           'mechanism_dynamics.png', 'mechanism_claim5.png')

# Every config field: type, range, choices (validation.check_config), beside the defaults.
CONFIG_FIELDS = mechanism_config.FIELDS


def validate_config(config) -> None:
  """Checks every field at start; raises ``validation.ConfigError`` naming the field.

  The table ``CONFIG_FIELDS``, then the cross-field rules: ``rank < d`` and every
  augmentation rank ``< d`` (an intervention or noise off S needs an S_perp),
  ``intervention.names`` holds ``none`` (the baseline), ``num_steps >= 1``, ``eval_batch``
  divides ``num_eval``, and a valid attack ensemble (``study.check_attack_rules``).
  """
  validation.check_config(config, CONFIG_FIELDS)
  if config.rank >= config.d:
    raise validation.ConfigError(
        f'config.rank must be < d = {config.d}: the interventions act on S_perp, which a '
        f'full-rank problem does not have; got {config.rank}')
  for r in config.augmentation.ranks:
    if r >= config.d:
      raise validation.ConfigError(
          f'config.augmentation.ranks must each be < d = {config.d} (noise off S needs an '
          f'S_perp), got {r}')
  if 'none' not in config.intervention.names:
    raise validation.ConfigError(
        f"config.intervention.names must include 'none' (the baseline of the paired "
        f'differences), got {tuple(config.intervention.names)}')
  if config.num_steps < 1:
    raise validation.ConfigError(f'config.num_steps must be >= 1 (the dynamics record '
                                 f'training), got {config.num_steps}')
  if config.num_eval % config.eval_batch:
    raise validation.ConfigError(f'config.eval_batch must divide config.num_eval = '
                                 f'{config.num_eval}, got {config.eval_batch}')
  study.check_attack_rules(config)


# ----------------------------------------------------------------------------
# Students, teachers, keys.
# ----------------------------------------------------------------------------

class Cohort(NamedTuple):
  """The students of one condition: ``kept`` = T x K of them (``padded`` computed)."""
  kept: int
  padded: int
  teacher: np.ndarray   # [kept] teacher id of each kept student
  student: np.ndarray   # [kept] index of the student among its teacher's


def cohort(config) -> Cohort:
  """T x K students, padded to a multiple of the devices (the padding is dropped)."""
  k = config.students_per_teacher
  kept = config.num_teachers * k
  idx = np.arange(kept)
  return Cohort(kept, sweep.padded_size(kept, study.mesh()), idx // k, idx % k)


def seed_keys(config, num: int) -> lowrank.SeedKeys:
  """``num`` students' keys (``lowrank.seed_keys``): student ``s`` of teacher ``s // K``, its
  teacher and basis keys student ``(s // K) * K``'s, its init, data and evaluation keys its own."""
  return lowrank.seed_keys(config.seed, num, True, config.students_per_teacher)


def setting(config, **changes) -> lowrank.Setting:
  """The ``lowrank.Setting`` of the config (online data), with ``changes``."""
  return dataclasses.replace(study.setting(config), num_train=0, **changes)


def evaluator_of(config, problem: lowrank.Problem) -> lowrank_eval.LowRankEvaluator:
  """The evaluator of ``problem``'s networks (``study.eval_setting``, ``study.attack_config``)."""
  return lowrank_eval.LowRankEvaluator(study.eval_setting(config), study.attack_config(config),
                                       problem.teacher, problem.student, mesh=study.mesh())


def tile(tree, times: int):
  return methods_lib.tile(tree, times)


def concat(trees: Sequence[Any]):
  return jax.tree_util.tree_map(lambda *v: jnp.concatenate(v), *trees)


# ----------------------------------------------------------------------------
# Claim 5: teacher-labelled noise off S, isotropic or in S, at matched energy.
# ----------------------------------------------------------------------------

def projected_noise(params, teacher_params, data_args, x, key):
  """``train.teacher_regression_loss``'s transform ``x + Q xi`` on a fraction of the batch.

  ``xi ~ N(0, aug_scale^2 I)``, ``Q = data_args['noise_projector']`` (``[d, d]``): ``P_perp``
  is ``train.noise_augmentation('orthogonal')``, the identity its ``'isotropic'`` (the same
  draws), ``P`` noise in S (which the library does not have). Reads ``aug_scale``,
  ``aug_fraction`` and ``noise_projector``; one compiled loss serves every kind, scale and rank.
  """
  del params, teacher_params
  xi = data_args['aug_scale'] * jax.random.normal(key, x.shape, x.dtype)
  xi = numerics.matmul(xi, data_args['noise_projector'])
  noisy = jnp.arange(x.shape[0]) < jnp.round(data_args['aug_fraction'] * x.shape[0])
  return x + jnp.where(noisy[:, None], xi, 0.0)


def noise_dim(kind: str, d: int, r: int) -> int:
  """Dimension of the noise of ``kind`` at rank ``r``: ``d - r`` (orth), ``d`` (iso), ``r`` (in)."""
  return {'orth': d - r, 'iso': d, 'in': r}[kind]


def matched_scale(kind: str, scale: float, d: int, r: int) -> float:
  """Per-direction std of ``kind``'s noise with energy ``E||Q xi||^2 = scale^2 d``.

  >>> [round(matched_scale(k, 0.1, 40, 10), 4) for k in ('orth', 'iso', 'in')]
  [0.1155, 0.1, 0.2]
  """
  return scale * math.sqrt(d / noise_dim(kind, d, r))


def noise_projector(kind: str, projector: jax.Array) -> jax.Array:
  """``[S, d, d]`` the noise's ``Q`` of ``kind`` for the data projectors ``[S, d, d]``."""
  eye = jnp.broadcast_to(jnp.eye(projector.shape[-1], dtype=projector.dtype), projector.shape)
  return {'orth': eye - projector, 'iso': eye, 'in': projector, 'standard': eye}[kind]


def _sample_in_subspace(key, args, n):
  """The online sampler from a ``[d, d]`` projector (one compiled loss for every rank)."""
  return data.sample_lowrank(key, args['projector'], n, args['scale'])


# ----------------------------------------------------------------------------
# The conditions: training and interventions.
# ----------------------------------------------------------------------------

class Block(NamedTuple):
  """The students of one condition, evaluated with every other block at once."""
  head: Dict[str, Any]         # the record fields shared by the condition's students
  params: Any                  # [padded, ...] trained (or intervened) students
  init_params: Any             # [padded, ...] their initialization (for moved_off)
  teacher_params: Any
  projector: jax.Array         # [padded, d, d] the data subspace
  held: Dict[str, Any]         # held-out data (LowRankEvaluator.held_out)
  train_loss: np.ndarray       # [padded]
  info: Dict[str, np.ndarray]  # per-student extras (transplant counts)


def _train(config, workdir, stage, loss_fn, optimizer, init_params, teacher_params, data_args,
           train_keys):
  """``study.train_or_keep_last_good`` from ``init_params``: host params and final losses."""
  state = jax.vmap(lambda p: train.init_state(p, optimizer))(init_params)
  state, losses = study.train_or_keep_last_good(loss_fn, optimizer, state, teacher_params,
                                                data_args, train_keys, config, workdir, stage)
  last = losses[:, -1] if losses.size else np.full(losses.shape[0], np.nan)
  return sweep.to_host(state.params), last


def _float(v) -> Optional[float]:
  v = float(v)
  return v if np.isfinite(v) else None


def intervention_blocks(config, problem, params, losses, held, projector):
  """The ``Block`` of every intervention of ``config.intervention`` on the trained students."""
  t_apply, s_apply = problem.teacher.apply, problem.student.apply
  mechanism.check_projector(projector)
  conditions = []
  for name in config.intervention.names:
    if name == 'rescale':
      conditions += [('rescale', float(c)) for c in config.intervention.rescale_c]
    else:
      conditions.append((name, None))
  blocks = []
  for name, c in conditions:
    if name == 'transplant_all':
      one = functools.partial(mechanism.transplant_off_subspace_all, t_apply, s_apply,
                              min_corr=config.intervention.min_corr)
    else:
      one = functools.partial(mechanism.intervene, name, t_apply, s_apply,
                              c=1.0 if c is None else c, min_corr=config.intervention.min_corr)
    new, info = jax.jit(jax.vmap(one))(params, problem.teacher_params, projector,
                                       held['x_eval'])
    extra = {}
    if name.startswith('transplant'):
      extra = {'transplant_matched': np.asarray(info['num_matched']),
               'transplant_zeroed': np.asarray(info['num_zeroed'])}
    label = name if c is None else f'rescale {c:g}'
    blocks.append(Block({'part': 'intervention', 'condition': label, 'intervention': name,
                         'rescale_c': c}, sweep.to_host(new), problem.student_params,
                        problem.teacher_params, projector, held, losses, extra))
  return blocks


def claim5_blocks(config, workdir, problem, keys, held_at, cohort_):
  """Trains every (rank, noise kind, scale) of ``config.augmentation`` at once; its ``Block``s."""
  a = config.augmentation
  d = config.d
  conditions = []
  for r in a.ranks:
    conditions.append((r, 'standard', 0.0))
    conditions += [(r, kind, float(s)) for kind in a.kinds for s in a.scales]
  n = cohort_.padded
  proj, scale, noise_p, aug = [], [], [], []
  for r, kind, s in conditions:
    p = lowrank.rank_projector(problem.bases, r)
    proj.append(p)
    scale.append(jnp.full((n,), lowrank.data_scale(setting(config), r)))
    noise_p.append(noise_projector(kind, p))
    aug.append(jnp.full((n,), 0.0 if kind == 'standard' else matched_scale(kind, s, d, r)))
  g = len(conditions)
  data_args = {'projector': jnp.concatenate(proj), 'scale': jnp.concatenate(scale),
               'noise_projector': jnp.concatenate(noise_p), 'aug_scale': jnp.concatenate(aug),
               'aug_fraction': jnp.full((g * n,), a.fraction)}
  loss_fn = train.teacher_regression_loss(problem.student.apply, problem.teacher.apply,
                                          config.loss, _sample_in_subspace, config.batch_size,
                                          transform=projected_noise)
  params, losses = _train(config, workdir, 'augmentation', loss_fn, study.make_optimizer(config),
                          tile(problem.student_params, g), tile(problem.teacher_params, g),
                          data_args, tile(keys.train, g))
  blocks = []
  for i, (r, kind, s) in enumerate(conditions):
    sl = lambda v, i=i: v[i * n:(i + 1) * n]
    label = f'r={r} {kind}' + ('' if kind == 'standard' else f' {s:g}')
    blocks.append(Block({'part': 'augmentation', 'condition': label, 'rank': r,
                         'aug_kind': kind, 'aug_scale': s},
                        jax.tree_util.tree_map(sl, params), problem.student_params,
                        problem.teacher_params, sl(data_args['projector']), held_at(r),
                        sl(losses), {}))
  return blocks


def num_train_blocks(config, workdir, problem, keys, held, data_args):
  """Students trained on a fixed training set of N points, for each N of
  ``config.dependence.num_train``; the set is drawn as ``LowRankEvaluator.held_out`` draws it."""
  blocks = []
  optimizer = study.make_optimizer(config)
  for n_train in config.dependence.num_train:
    def draw(key, p, s, n_train=n_train):
      return data.sample_lowrank(jax.random.split(key, 5)[4], p, n_train, s)
    train_x = jax.jit(jax.vmap(draw))(keys.eval, data_args['projector'], data_args['scale'])
    loss_fn = train.teacher_regression_loss(problem.student.apply, problem.teacher.apply,
                                            config.loss, lowrank.sampler(n_train),
                                            config.batch_size)
    params, losses = _train(config, workdir, f'num_train{n_train}', loss_fn, optimizer,
                            problem.student_params, problem.teacher_params,
                            {**data_args, 'train_x': train_x}, keys.train)
    blocks.append(Block({'part': 'dependence', 'condition': f'k={config.width_mult} N={n_train}',
                         'width_mult': config.width_mult, 'num_train': n_train},
                        params, problem.student_params, problem.teacher_params,
                        data_args['projector'], held, losses, {}))
  return blocks


def optimizer_runs(config, keys, held, data_args, cohort_):
  """Claims 2-3 under every optimizer, without and with weight decay, with the dynamics.

  Returns ``(records, dynamics)``: one record per kept student and run (the last snapshot:
  movement, weight cosines, spec in / off on ``held['x_eval']`` and its probes) and one row
  per kept student, recorded step and teacher node.
  """
  setting_ = setting(config, strength_decay=config.dynamics.teacher_strength_decay)
  problem = lowrank.build_problem(setting_, keys)
  o = config.optimizers
  lrs = {'sgd': o.lr_sgd, 'momentum': o.lr_momentum, 'adam': o.lr_adam}
  projector = data_args['projector']
  perp = jnp.eye(config.d)[None] - projector
  x_in = held['x_eval']
  x_off = jax.jit(jax.vmap(lambda k, x, q: data.off_subspace_probe(k, x, q, config.probe_scale)))(
      held['probe_key'], x_in, perp)
  snap = mechanism.batched_snapshot(problem.teacher.apply, problem.student.apply)
  steps = mechanism.log_spaced_steps(config.num_steps, config.dynamics.record_chunk_steps,
                                     config.dynamics.num_points)
  loss_fn = train.teacher_regression_loss(problem.student.apply, problem.teacher.apply,
                                          config.loss, lowrank.sampler(0), config.batch_size)
  tp, init, proj, xi, xo, args, tkeys = study.shard(
      (problem.teacher_params, problem.student_params, projector, x_in, x_off, data_args,
       keys.train))
  record = lambda params: snap(tp, params, init, proj, xi, xo)
  baseline = specialization.random_cosine_baseline(config.d - config.rank)
  strengths = (np.arange(config.teacher_hidden[0]) + 1.0) ** -setting_.strength_decay
  records, dynamics = [], []
  for name in o.optimizer_names:
    for wd in (0.0, float(o.decay)):
      stage = f'{name}' + (f'_wd{wd:g}' if wd else '')
      optimizer = train.make_optimizer(name, lrs[name], momentum=config.momentum,
                                       weight_decay=wd, schedule=config.schedule,
                                       total_steps=config.num_steps)
      state = jax.vmap(lambda p, optimizer=optimizer: train.init_state(p, optimizer))(init)
      try:
        state, losses, recs = mechanism.train_with_snapshots(
            loss_fn, optimizer, state, tp, args, tkeys, record_steps=steps,
            chunk_steps=config.dynamics.record_chunk_steps, record=record,
            on_chunk=cli.progress_logger(f'optimizer {stage}'))
      except train.TrainingDivergedError as e:
        raise cli.RunError(f'{e} (optimizer {stage}); lower config.optimizers.lr_{name}') from e
      recs = {k: np.asarray(v) for k, v in sweep.to_host(recs).items()}
      condition = name + (f' + wd {wd:g}' if wd else '')
      for i in range(cohort_.kept):
        alive = recs['alive'][i, -1]
        records.append({
            'part': 'optimizer', 'condition': condition, 'teacher': int(cohort_.teacher[i]),
            'student': int(cohort_.student[i]), 'seed': i, 'rank': config.rank,
            'width_mult': config.width_mult, 'optimizer': name, 'learning_rate': lrs[name],
            'weight_decay': wd, 'train_loss': float(losses[i, -1]),
            'moved_off': float(recs['moved_off_layer'][i, -1]),
            'spec_in': float(np.nanmean(recs['corr_in'][i, -1][alive])),
            'spec_off': float(np.nanmean(recs['corr_off'][i, -1][alive])),
            'wcos_in': float(np.mean(recs['wcos_in'][i, -1][alive])),
            'wcos_off': float(np.mean(np.abs(recs['wcos_off'][i, -1][alive]))),
            'wcos_off_random': baseline})
        for t, step in enumerate(steps):
          for j in range(recs['corr_in'].shape[-1]):
            dynamics.append({
                'optimizer': name, 'weight_decay': wd, 'condition': condition,
                'teacher': int(cohort_.teacher[i]), 'student': int(cohort_.student[i]),
                'seed': i, 'step': step, 'node': j, 'strength': float(strengths[j]),
                'alive': bool(recs['alive'][i, t, j]),
                'corr_in': _float(recs['corr_in'][i, t, j]),
                'corr_off': _float(recs['corr_off'][i, t, j]),
                'wcos_off': _float(recs['wcos_off'][i, t, j]),
                'moved_off': _float(recs['moved_off'][i, t, j])})
      logging.info('optimizer %s: moved_off %.4f, wcos_off %.3f (random %.3f)', condition,
                   np.mean([r['moved_off'] for r in records[-cohort_.kept:]]),
                   np.mean([r['wcos_off'] for r in records[-cohort_.kept:]]), baseline)
  return records, dynamics


# ----------------------------------------------------------------------------
# The evaluation: specialization and the oracle attacks, every condition at once.
# ----------------------------------------------------------------------------

# The label kind of every attack: the oracle's (the teacher at x + delta), the true error here.
LABELS = ('oracle',)

HEAD = ('part', 'condition', 'teacher', 'student', 'seed', 'rank', 'width_mult', 'num_train',
        'optimizer', 'learning_rate', 'weight_decay', 'intervention', 'rescale_c', 'aug_kind',
        'aug_scale', 'train_loss', 'moved_off', 'transplant_matched', 'transplant_zeroed')


def columns(config) -> List[str]:
  """The CSV columns: ``HEAD``, the specialization columns and the oracle ``adv_*`` columns
  of ``lowrank_eval.metric_columns`` (the fixed-label attacks do not run)."""
  return list(HEAD) + [c for c in study.metric_columns(config)
                       if c != 'train_loss' and not c.startswith('adv_fixed_')]


def pad_params(params, like):
  """``params`` with every leaf zero-padded at the end of each axis to ``like``'s shape.

  A narrower student (width ``k m``) becomes a network of ``like``'s width whose extra hidden
  nodes have zero weights and biases: the same function, gradients and attacks, and nodes of
  zero variance, which never match a teacher node. So every width is evaluated by one
  compiled evaluator.
  """
  return jax.tree_util.tree_map(
      lambda v, l: jnp.pad(v, [(0, b - a) for a, b in zip(v.shape, l.shape)]), params, like)


def _spec_rows(config, problem, params, teacher_params, projector, held) -> List[Dict[str, Any]]:
  """``LowRankEvaluator.evaluate``'s specialization columns (``metrics.lowrank_specialization``
  on ``held``'s points and probes)."""
  fn = jax.jit(jax.vmap(functools.partial(
      metrics.lowrank_specialization, problem.teacher.apply, problem.student.apply,
      probe_scale=config.probe_scale, tau=config.tau, batch_size=config.eval_batch)))
  spec = sweep.to_host(fn(teacher_params, params, held['x_eval'], projector, held['probe_key']))
  rows = []
  for i in range(projector.shape[0]):
    row = {'spec_in': float(np.mean(spec['spec_in'][i])),
           'spec_off': float(np.mean(spec['spec_off'][i]))}
    for l in range(spec['spec_in'].shape[1]):
      row.update({f'spec_in_l{l + 1}': float(spec['spec_in'][i, l]),
                  f'spec_off_l{l + 1}': float(spec['spec_off'][i, l]),
                  f'frac_in_l{l + 1}': float(spec['frac_in'][i, l]),
                  f'frac_off_l{l + 1}': float(spec['frac_off'][i, l]),
                  f'dead_l{l + 1}': int(spec['dead_in'][i, l])})
    row.update({'wcos_in': float(spec['wcos_in'][i]), 'wcos_off': float(spec['wcos_off'][i]),
                'clean_agree': float(spec['clean_agree'][i])})
    rows.append(row)
  return rows


def _attack_inputs(config, evaluator, params, teacher_params, projector, held):
  """``evaluate.Evaluator.run``'s arguments for the oracle attacks in S, S_perp and unconstrained
  (as ``LowRankEvaluator.attack`` builds them): ``(args, kwargs)``, laid over the mesh."""
  params, teacher_params, projector, held = evaluator.shard(
      (params, teacher_params, projector, held))
  eye = jnp.eye(projector.shape[-1], dtype=projector.dtype)
  return ((params, teacher_params, held['x_attack'], held['pgd_key']),
          dict(eps=config.eps, labels_kinds=LABELS,
               projectors={'in': projector, 'off': evaluator.shard(eye[None] - projector)},
               thresholds=None, identity_full=config.attack_norm == 'l2'))


def evaluate_blocks(config, problem, evaluator, blocks: Sequence[Block], cohort_):
  """Every block's kept students, evaluated at once: ``(records, attack checks)``.

  Specialization (``metrics.lowrank_specialization``), the attack ensemble for oracle labels
  in S, S_perp and unconstrained (``LowRankEvaluator.attack``) with the convergence check and
  its escalation per block (``groups``), and ``moved_off``. Students narrower than the
  evaluator's are padded (``pad_params``).
  """
  n = cohort_.padded
  params = concat([pad_params(b.params, problem.student_params) for b in blocks])
  tparams = concat([b.teacher_params for b in blocks])
  projector = concat([b.projector for b in blocks])
  held = concat([b.held for b in blocks])
  groups = {}
  for i, b in enumerate(blocks):
    mask = np.zeros(len(blocks) * n, bool)
    mask[i * n:i * n + cohort_.kept] = True
    groups[f'{b.head["part"]}: {b.head["condition"]}'] = mask
  t0 = time.perf_counter()
  spec = _spec_rows(config, problem, *evaluator.shard((params, tparams, projector, held)))
  moved = np.concatenate([np.asarray(jax.jit(jax.vmap(mechanism.off_subspace_movement))(
      b.params, b.init_params, b.projector)) for b in blocks])
  ev = evaluator.attack(*evaluator.shard((params, tparams, projector, held)), full_rank=False,
                        labels_kinds=LABELS, groups=groups,
                        progress=lambda what: cli.evaluation_progress(f'the students, {what}'))
  adv = lowrank_eval.attack_rows(ev, config.eps, evaluator.attack_config.attacks, False)
  logging.info('evaluated %d students in %.1fs', len(adv), time.perf_counter() - t0)
  cfg = evaluator.attack_config
  checks = {name: evaluate.attack_checks(
      ev.result, ev.final, headline=study.headline_eps(config), attacks_run=cfg.attacks,
      convergence_points=cfg.convergence_points(), rows=mask,
      convergence=summaries.group_convergence(ev, name)) for name, mask in groups.items()}
  records = []
  for bi, b in enumerate(blocks):
    r = b.head.get('rank', config.rank)
    for i in range(cohort_.kept):
      k = bi * n + i
      rec = {h: None for h in HEAD}
      rec.update({'rank': r, 'width_mult': config.width_mult, 'num_train': 0,
                  'optimizer': config.optimizer, 'learning_rate': config.learning_rate,
                  'weight_decay': config.weight_decay})
      rec.update(b.head)
      rec.update({'teacher': int(cohort_.teacher[i]), 'student': int(cohort_.student[i]),
                  'seed': i, 'train_loss': _float(b.train_loss[i]), 'moved_off': float(moved[k])})
      rec.update({key: int(v[i]) for key, v in b.info.items()})
      rec.update(spec[k])
      rec['wcos_off_random'] = specialization.random_cosine_baseline(config.d - r)
      rec.update({c: v for c, v in adv[k].items() if not c.startswith('adv_fixed_')})
      records.append(rec)
  return records, checks


# ----------------------------------------------------------------------------
# The study.
# ----------------------------------------------------------------------------

def conditions_of(config) -> int:
  """How many blocks the evaluation holds: interventions, augmentations, widths, sets."""
  i = config.intervention
  num = sum(len(i.rescale_c) if name == 'rescale' else 1 for name in i.names)
  a = config.augmentation
  num += len(a.ranks) * (1 + len(a.kinds) * len(a.scales))
  num += sum(1 for k in config.dependence.width_mults if k != config.width_mult)
  return num + len(config.dependence.num_train)


def train_and_evaluate(config, workdir: str) -> List[Dict[str, Any]]:
  """Runs the study and writes the result files; returns the records."""
  validate_config(config)
  cli.prepare_workdir(workdir, config)
  c = cohort(config)
  n = c.padded
  keys = seed_keys(config, n)
  main = setting(config)
  problem = lowrank.build_problem(main, keys)
  # The evaluator's networks: the widest student of the study (narrower ones are padded).
  widest = max(config.width_mult, *config.dependence.width_mults)
  eval_problem = lowrank.build_problem(setting(config, width_mult=widest), keys)
  evaluator = evaluator_of(config, eval_problem)
  scale_at = lambda r: jnp.full((n,), lowrank.data_scale(main, r))
  held_cache = {}

  def held_at(r):
    if r not in held_cache:
      held_cache[r] = evaluator.held_out(lowrank.rank_projector(problem.bases, r), scale_at(r),
                                         keys.eval)
    return held_cache[r]
  r = config.rank
  data_args = lowrank.lowrank_args(problem.bases, r, scale_at(r))
  projector = data_args['projector']
  held = held_at(r)
  num_blocks = conditions_of(config)
  timings = {}
  warm = None
  if jax.process_count() == 1:
    # The attack programs, compiled while the students train (as the low-rank binary does).
    args, kwargs = _attack_inputs(config, evaluator, tile(eval_problem.student_params, num_blocks),
                                  tile(problem.teacher_params, num_blocks),
                                  tile(projector, num_blocks), tile(held, num_blocks))
    warm = study.Background('evaluation programs', evaluator.attacks.prepare, *args, **kwargs)

  # 1. Standard training, then the interventions.
  t0 = time.perf_counter()
  loss_fn = train.teacher_regression_loss(problem.student.apply, problem.teacher.apply,
                                          config.loss, lowrank.sampler(0), config.batch_size)
  params, losses = _train(config, workdir, 'standard', loss_fn, study.make_optimizer(config),
                          problem.student_params, problem.teacher_params, data_args, keys.train)
  blocks = intervention_blocks(config, problem, params, losses, held, projector)
  timings['train_standard'] = time.perf_counter() - t0

  # 2.-3. Optimizers and the dynamics.
  t0 = time.perf_counter()
  opt_records, dynamics = optimizer_runs(config, keys, held, data_args, c)
  timings['train_optimizers'] = time.perf_counter() - t0

  # 4. Claim 5; 5. other widths, finite training sets.
  t0 = time.perf_counter()
  blocks += claim5_blocks(config, workdir, problem, keys, held_at, c)
  for k in config.dependence.width_mults:
    if k != config.width_mult:
      p = lowrank.build_problem(setting(config, width_mult=k), keys)
      loss_k = train.teacher_regression_loss(p.student.apply, p.teacher.apply, config.loss,
                                             lowrank.sampler(0), config.batch_size)
      w_params, w_losses = _train(config, workdir, f'width{k}', loss_k,
                                  study.make_optimizer(config), p.student_params,
                                  p.teacher_params, data_args, keys.train)
      blocks.append(Block({'part': 'dependence', 'condition': f'k={k} online',
                           'width_mult': k}, w_params, p.student_params, p.teacher_params,
                          projector, held, w_losses, {}))
  blocks += num_train_blocks(config, workdir, problem, keys, held, data_args)
  timings['train_others'] = time.perf_counter() - t0
  if warm is not None:
    prepared = warm.wait()
    if prepared is not None:
      logging.info('%d evaluation programs prepared in %.1fs beside the training', prepared,
                   warm.seconds)

  t0 = time.perf_counter()
  records, checks = evaluate_blocks(config, eval_problem, evaluator, blocks, c)
  timings['evaluate'] = time.perf_counter() - t0
  if config.width_mult in config.dependence.width_mults:  # the students of 'none'
    records += [{**rec, 'part': 'dependence', 'condition': f'k={config.width_mult} online',
                 'intervention': None, 'rescale_c': None}
                for rec in records if rec['part'] == 'intervention'
                and rec['intervention'] == 'none']
  records = order_records(records + opt_records)
  logging.info('timings: %s', ', '.join(f'{k} {v:.1f}s' for k, v in timings.items()))

  study.write_results(workdir, config, records, columns(config))
  tables, intervals = mechanism_report.summary_tables(config, records, dynamics)
  checks = summaries.attack_checks_summary(config, checks)
  summaries.log_unconverged(checks)
  if jax.process_index() == 0:
    io.write_csv(os.path.join(workdir, 'dynamics.csv'), dynamics, DYNAMICS_COLUMNS)
    io.write_json(os.path.join(workdir, 'intervals.json'), intervals)
    io.write_json(os.path.join(workdir, 'attack_checks.json'), checks)
    io.atomic_write_text(os.path.join(workdir, 'summary.md'),
                         tables + '\n' + summaries.attack_checks_markdown(checks))
    mechanism_report.plot_all(workdir)
  return records


DYNAMICS_COLUMNS = ('optimizer', 'weight_decay', 'condition', 'teacher', 'student', 'seed',
                    'step', 'node', 'strength', 'alive', 'corr_in', 'corr_off', 'wcos_off',
                    'moved_off')


def order_records(records):
  """Records part by part (``mechanism_report.PARTS``), conditions in the order they ran
  (dependence: the widths online, then the training sets by size), students in order."""
  order = {}
  for rec in records:
    order.setdefault((rec['part'], rec['condition']), len(order))
  dep = sorted({(r['num_train'] or 0, r['width_mult'], r['condition'])
                for r in records if r['part'] == 'dependence'})
  for i, (_, _, name) in enumerate(dep):
    order[('dependence', name)] = len(records) + i
  return sorted(records, key=lambda r: (mechanism_report.PARTS.index(r['part']),
                                        order[(r['part'], r['condition'])], r['seed']))


if __name__ == '__main__':
  cli.run_binary(validate_config, train_and_evaluate, _DEFAULT_CONFIG, OUTPUTS,
                 fields=CONFIG_FIELDS, doc=__doc__)
