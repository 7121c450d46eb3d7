"""The low-rank setting's evaluation: specialization and the attack ensemble, per student.

``LowRankEvaluator`` compiles, once for a batch of students ``[S, ...]``, the
specialization measures in and off the data subspace (``metrics.lowrank_specialization``)
and the attack ensemble (``evaluate.Evaluator``) in S (``in``), in S_perp (``off``) and
unconstrained (``full``), judged by the oracle and by the teacher's clean label; with
``convergence_points > 0`` the ensemble doubled (``AttackConfig.scaled(2)``) attacks the
first points again, per group of students, and groups where that still finds more are
attacked harder, up to ``max_escalations`` doublings (``escalation.escalate``).
``metric_columns`` lists a student's columns; ``attack_rows`` builds their ``adv_*`` part.

Its arguments are an ``EvalSetting`` (names as the binaries' config fields, defaults the
paper's) and an ``evaluate.AttackConfig`` (``evaluate.preset``).
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import data
from tsrobust import escalation
from tsrobust import evaluate
from tsrobust import metrics
from tsrobust import models
from tsrobust import specialization
from tsrobust import sweep

__all__ = ['LABELS', 'EvalSetting', 'Evaluation', 'eps_name', 'adv_columns',
           'metric_columns', 'attack_rows', 'surrogate_apply', 'doubling_args',
           'padded_students', 'level_evaluators', 'LowRankEvaluator']

LABELS = ('oracle', 'fixed')  # the label kinds of the synthetic setting (evaluate.LABEL_KINDS)


@dataclasses.dataclass(frozen=True)
class EvalSetting:
  """The evaluation's arguments (``experiments/configs/lowrank.py`` documents each).

  Attributes:
    eps: attack budgets; result columns name them as written (``eps_name``).
    attack_norm: ``l2`` or ``linf``.
    num_eval, eval_batch: held-out points of the specialization measures, and
      their streaming batch (it divides ``num_eval``).
    probe_scale: std of the off-subspace probes ``x + P_perp xi``.
    tau: a teacher node is specialized when its best correlation is >= tau.
    num_attack: held-out points attacked per student.
    convergence_points: points the doubled ensemble attacks again (0: no check).
    max_escalations: a group of students whose check fails is attacked again on all its
      points by the doubled ensemble, then checked one level up, at most this many times
      (``escalation.escalate``; 0: the check only).
    reference_points: with N > 0, the ``reference`` preset's ensemble attacks each group's
      first N points after the evaluation and reports how much it adds
      (``escalation.reference_check``; costly: for checking the defaults, not for routine
      runs).
    surrogate_temperature: ``apgd_pair`` follows ReLU gradients ``sigmoid(z / T)``
      (0: exact gradients).
    ccat_pass_rate: CCAT's threshold passes this fraction of the correctly
      classified clean points.
  """
  eps: Tuple[Any, ...] = (0.5, 1.0, 2.0)
  attack_norm: str = 'l2'
  num_eval: int = 4096
  eval_batch: int = 1024
  probe_scale: float = 1.0
  tau: float = 0.9
  num_attack: int = 512
  convergence_points: int = 128
  max_escalations: int = 3
  reference_points: int = 0
  surrogate_temperature: float = 0.1
  ccat_pass_rate: float = 0.99


def eps_name(eps: Any) -> str:
  """A budget as written in the config (``1.0`` -> ``'1.0'``, ``1`` -> ``'1'``)."""
  return str(eps)


def adv_columns(eps: Sequence[Any], attacks_run: Sequence[str]) -> List[str]:
  """The ``adv_*`` columns: ensemble errors per label, subspace and budget, then per attack."""
  main, per_attack = evaluate.columns(LABELS, evaluate.WHERES, [eps_name(e) for e in eps],
                                      attacks_run)
  return main + per_attack


def metric_columns(n_layers: int, eps: Sequence[Any], attacks_run: Sequence[str]) -> List[str]:
  """Columns of one student's evaluation (``train_loss``, then ``LowRankEvaluator.evaluate``'s).

  ``n_layers``: the teacher's hidden layers; ``attacks_run``: ``AttackConfig.attacks``.
  """
  cols = ['train_loss', 'spec_in'] + [f'spec_in_l{l + 1}' for l in range(n_layers)]
  cols += ['spec_off'] + [f'spec_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'frac_in_l{l + 1}' for l in range(n_layers)]
  cols += [f'frac_off_l{l + 1}' for l in range(n_layers)]
  cols += [f'dead_l{l + 1}' for l in range(n_layers)]
  cols += ['wcos_in', 'wcos_off', 'wcos_off_random', 'clean_agree']
  return cols + adv_columns(eps, attacks_run)


class Evaluation(NamedTuple):
  """The raw outcome of an evaluation: ``evaluate.Result`` (escalated groups' successes
  included), its ``combine``d successes, and the convergence report per group
  (``escalation.escalate``), if the check ran."""
  result: evaluate.Result
  final: Dict[Any, np.ndarray]
  convergence: Optional[Dict[str, Any]] = None
  reference: Optional[Dict[str, Any]] = None  # escalation.reference_check's report


def surrogate_apply(student, teacher, temperature: float):
  """``(student, teacher)`` apply functions with surrogate ReLU gradients for ``apgd_pair``.

  None when ``temperature`` is 0 (exact gradients).
  """
  t = float(temperature)
  if t == 0:
    return None
  return models.surrogate(student, t).apply, models.surrogate(teacher, t).apply


def doubling_args(x: jax.Array, keys: jax.Array, points: int, shared: bool = False):
  """The convergence check's inputs: the first ``points`` of ``x [S, N, ...]`` (or shared
  ``[N, ...]`` with ``shared=True``) and ``keys [S]`` folded with ``rng.CONVERGENCE_CHECK``."""
  return (x[:points] if shared else x[:, :points]), escalation.escalation_keys(keys, 1)


def padded_students(students: np.ndarray, multiple: int) -> np.ndarray:
  """``students`` (indices) padded with its last to a multiple of ``multiple`` (the devices
  a batch of students is laid over); the caller drops the padded rows' results."""
  students = np.asarray(students, int)
  pad = -len(students) % multiple
  return np.concatenate([students, np.repeat(students[-1:], pad)])


def level_evaluators(make: Callable[[evaluate.AttackConfig], evaluate.Evaluator],
                     config: evaluate.AttackConfig) -> Callable[[int], evaluate.Evaluator]:
  """``level -> evaluate.Evaluator`` of ``config.scaled(2 ** level)``, built once per level."""
  cache = {}

  def get(level):
    if level not in cache:
      cache[level] = make(config.scaled(2 ** level))
    return cache[level]
  return get


class LowRankEvaluator:
  """Compiles the evaluation of a batch of students once, for every rank and method.

  ``held_out`` draws per-seed evaluation data; ``evaluate`` returns one dict of
  ``metric_columns`` (minus ``train_loss``) per student, and the raw
  ``Evaluation`` (for ``evaluate.attack_checks`` and CCAT). Budgets and
  projectors are array arguments, so nothing recompiles across budgets or
  methods (Square recompiles per subspace dimension).

  Args:
    setting: the evaluation's ``EvalSetting``.
    attack_config: the ensemble (``evaluate.preset``).
    teacher, student: the networks (``lowrank.Problem``'s).
    num_train: with N > 0, ``held_out`` also draws the N points of a fixed
      training set (``train_x``).
    mesh: the seeds mesh inputs are laid over (default: every device).
  """

  def __init__(self, setting: EvalSetting, attack_config: evaluate.AttackConfig,
               teacher: models.MLP, student: models.MLP, num_train: int = 0, mesh=None):
    self.setting = c = setting
    self.mesh = sweep.seed_mesh() if mesh is None else mesh
    t_apply, s_apply = teacher.apply, student.apply

    def held_out(projector, scale, key):
      def one(p, sc, k):
        k_spec, k_probe, k_att, k_pgd, k_tr = jax.random.split(k, 5)
        out = {'x_eval': data.sample_lowrank(k_spec, p, c.num_eval, sc),
               'x_attack': data.sample_lowrank(k_att, p, c.num_attack, sc),
               'probe_key': k_probe, 'pgd_key': k_pgd}
        if num_train:
          out['train_x'] = data.sample_lowrank(k_tr, p, num_train, sc)
        return out
      return jax.vmap(one)(projector, scale, key)

    def spec(sp, tp, x, projector, probe_key):
      return jax.vmap(functools.partial(
          metrics.lowrank_specialization, t_apply, s_apply, probe_scale=c.probe_scale,
          tau=c.tau, batch_size=c.eval_batch))(tp, sp, x, projector, probe_key)

    def confidence(sp, tp, x):  # CCAT thresholds: confidence and correctness on x_eval
      s = s_apply(sp, x)[0]
      return jax.nn.softmax(s).max(-1), s.argmax(-1) == t_apply(tp, x)[0].argmax(-1)

    self.held_out = sweep.jit_once(held_out)  # runs once per rank
    self._spec = jax.jit(spec)
    self._confidence = jax.jit(jax.vmap(confidence))
    self.attack_config = attack_config
    surrogate = surrogate_apply(student, teacher, c.surrogate_temperature)
    make = lambda cfg: evaluate.Evaluator(s_apply, t_apply, norm=c.attack_norm, config=cfg,
                                          surrogate_apply=surrogate)
    self.attacks = make(self.attack_config)
    self.level_attacks = level_evaluators(make, self.attack_config)
    self.reference_attacks = (make(self.attack_config.with_budget_of('reference'))
                              if c.reference_points else None)

  def shard(self, tree):
    """Lays a pytree with a leading seeds axis over ``mesh``."""
    return sweep.shard_seeds(tree, self.mesh)

  def ccat_thresholds(self, params, teacher_params, held) -> np.ndarray:
    """``[S]`` thresholds passing ``ccat_pass_rate`` of the correctly classified points."""
    conf, correct = sweep.to_host(self._confidence(params, teacher_params, held['x_eval']))
    return np.array([evaluate.ccat_threshold(cf, ok, self.setting.ccat_pass_rate)
                     for cf, ok in zip(conf, correct)], np.float32)

  def attack(self, params, teacher_params, projector, held, full_rank: bool,
             labels_kinds=LABELS, thresholds=None, check: bool = True,
             groups: Optional[Dict[str, np.ndarray]] = None,
             progress: Optional[Callable[[str], Callable]] = None) -> Evaluation:
    """The attack ensemble in S (``in``), S_perp (``off``) and unconstrained (``full``).

    At full rank there is no complement and ``in`` is the whole space: only
    ``full`` is attacked (``rows`` copies it to ``in``). With ``check`` and
    ``convergence_points > 0``, the doubled ensemble attacks the first points again, per
    group of students (``groups``: ``{name: [S] bool}``, disjoint; default: one group of
    all), and the groups where it finds more are escalated (``escalation.escalate``,
    ``Evaluation.convergence``). ``progress``: ``what -> on_progress``
    (``evaluate.Evaluator.run``), called once per run of the ensemble.
    """
    progress = progress or (lambda what: None)
    args, kwargs = self._attack_args(params, teacher_params, projector, held, full_rank,
                                     labels_kinds, thresholds)
    result = self.attacks.run(*args, on_progress=progress('the ensemble'), **kwargs)
    convergence = reference = None
    groups = {'all': np.ones(projector.shape[0], bool)} if groups is None else groups
    if check and self.setting.convergence_points:
      def level_run(level, students, start, stop):
        what = (f'the convergence check, {2 ** level}x' if start == 0 else
                f'{len(students)} students attacked at {2 ** level}x (not converged)')
        return self._subset_run(self.level_attacks(level),
                                lambda k: escalation.escalation_keys(k, level), args, kwargs,
                                progress(what))(students, start, stop)
      result, convergence = escalation.escalate(
          level_run, result, groups, self.setting.convergence_points,
          self.setting.max_escalations)
    if check and self.reference_attacks is not None:
      reference = escalation.reference_check(
          self._subset_run(self.reference_attacks, escalation.reference_keys, args, kwargs,
                           progress('the reference check')),
          result, groups, self.setting.reference_points)
    return Evaluation(result, evaluate.combine(result), convergence, reference)

  def _subset_run(self, attacks, fold_keys, args, kwargs, on_progress):
    """``(students, start, stop) -> Result``: ``attacks`` on those students' points, with
    keys ``fold_keys(keys)`` (``escalation.escalate`` / ``reference_check``'s ``run``)."""
    params, teacher_params, x, keys = args
    multiple = self.mesh.devices.size

    def run(students, start, stop):
      idx = padded_students(students, multiple)
      pick = lambda tree: jax.tree_util.tree_map(lambda v: v[idx], tree)
      kw = dict(kwargs)
      kw['projectors'] = self.shard(pick(kwargs['projectors']))
      if kwargs.get('thresholds') is not None:
        kw['thresholds'] = np.asarray(kwargs['thresholds'])[idx]
      sp, tp, xs, ks = self.shard((pick(params), pick(teacher_params),
                                   pick(x)[:, start:stop], pick(keys)))
      out = attacks.run(sp, tp, xs, fold_keys(ks), on_progress=on_progress, **kw)
      return escalation.take_students(out, np.arange(len(students)))
    return run

  def _attack_args(self, params, teacher_params, projector, held, full_rank, labels_kinds,
                   thresholds):
    """``evaluate.Evaluator.run``'s arguments: ``(args, kwargs)`` unpacked by the caller."""
    d = projector.shape[-1]
    projs = {}
    if not full_rank:
      eye = jnp.eye(d, dtype=projector.dtype)
      projs = {'in': projector, 'off': self.shard(eye[None] - projector)}
    return ((params, teacher_params, held['x_attack'], held['pgd_key']),
            dict(eps=self.setting.eps, labels_kinds=labels_kinds, projectors=projs,
                 thresholds=thresholds, identity_full=self.setting.attack_norm == 'l2'))

  @staticmethod
  def _spec_args(params, teacher_params, projector, held):
    """The specialization program's arguments (``evaluate`` and ``prepare`` alike)."""
    return params, teacher_params, held['x_eval'], projector, held['probe_key']

  def prepare(self, params, teacher_params, projector, held, full_rank: bool) -> int:
    """Traces, lowers and compiles ``evaluate``'s programs for these shapes; runs nothing.

    ``params``: any students of the evaluated ones' structure (e.g. before training).
    The low-rank binary calls it in a background thread (``Background``) while the
    first students train. Returns the number of programs prepared.
    """
    params, teacher_params, projector, held = self.shard(
        (params, teacher_params, projector, held))
    self._spec.trace(*self._spec_args(params, teacher_params, projector, held)).lower().compile()
    args, kwargs = self._attack_args(params, teacher_params, projector, held, full_rank,
                                     LABELS, None)
    prepared = 1 + self.attacks.prepare(*args, **kwargs)
    if self.setting.convergence_points:  # the check on every student's first points
      params, teacher_params, x, keys = args
      points = min(int(self.setting.convergence_points), int(self.setting.num_attack))
      prepared += self.level_attacks(1).prepare(params, teacher_params,
                                                *doubling_args(x, keys, points), **kwargs)
    return prepared

  def evaluate(self, params, teacher_params, projector, held, full_rank: bool,
               groups: Optional[Dict[str, np.ndarray]] = None,
               progress: Optional[Callable[[str], Callable]] = None):
    """Metrics of a batch of students ``[S, ...]``; off-subspace ones are None at full rank.

    Inputs are laid over the seeds mesh (``shard``); S must be a multiple of
    the device count. ``groups`` and ``progress``: as in ``attack``. Returns
    ``(rows, Evaluation)``.
    """
    num = projector.shape[0]
    d = projector.shape[-1]
    rank = int(round(float(np.trace(np.asarray(sweep.to_host(projector)[0])))))
    params, teacher_params, projector, held = self.shard(
        (params, teacher_params, projector, held))
    spec = sweep.to_host(self._spec(*self._spec_args(params, teacher_params, projector, held)))
    ev = self.attack(params, teacher_params, projector, held, full_rank, groups=groups,
                     progress=progress)
    adv = attack_rows(ev, self.setting.eps, self.attack_config.attacks, full_rank)
    baseline = None if full_rank else specialization.random_cosine_baseline(d - rank)
    rows = []
    for i in range(num):
      row = {'spec_in': float(np.mean(spec['spec_in'][i])),
             'spec_off': None if full_rank else float(np.mean(spec['spec_off'][i]))}
      for l in range(spec['spec_in'].shape[1]):
        row[f'spec_in_l{l + 1}'] = float(spec['spec_in'][i, l])
        row[f'spec_off_l{l + 1}'] = None if full_rank else float(spec['spec_off'][i, l])
        row[f'frac_in_l{l + 1}'] = float(spec['frac_in'][i, l])
        row[f'frac_off_l{l + 1}'] = None if full_rank else float(spec['frac_off'][i, l])
        row[f'dead_l{l + 1}'] = int(spec['dead_in'][i, l])
      row['wcos_in'] = float(spec['wcos_in'][i])
      row['wcos_off'] = None if full_rank else float(spec['wcos_off'][i])
      row['wcos_off_random'] = baseline
      row['clean_agree'] = float(spec['clean_agree'][i])
      row.update(adv[i])
      rows.append(row)
    return rows, ev


def attack_rows(ev: Evaluation, eps: Sequence[Any], attacks_run: Sequence[str],
                full_rank: bool) -> List[Dict[str, Any]]:
  """Per-student ``adv_*`` columns; at full rank ``in`` = ``full`` and ``off`` is empty."""
  names = {float(e): eps_name(e) for e in eps}
  rows = evaluate.records(ev.result, ev.final, names)
  columns = adv_columns(eps, attacks_run)
  for row in rows:
    for key in list(row):
      if full_rank and '_full_' in key:
        row[key.replace('_full_', '_in_', 1)] = row[key]
    for key in columns:
      if key not in row:
        row[key] = None  # the complement at full rank
  return rows
