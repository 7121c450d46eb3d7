"""The image study's evaluation: specialization per layer and the attack ensemble, per student.

``ImageEvaluator`` compiles, once for a batch of CNN students of one teacher (or, with
``shared_teacher=False``, each student with its own teacher of the same architecture), their
specialization per layer on the test set (and on off-subspace probes with a PCA
subspace), clean accuracy and agreement, and the attack ensemble (``evaluate.Evaluator``,
``lax.map`` over students) judged by the oracle and / or the true labels, in the PCA
subspace, its complement and unconstrained; with ``convergence_points > 0`` the doubled
ensemble attacks the first points again, per group of students, and escalates the groups
where it finds more (``escalation.escalate``). It is shaped as ``lowrank_eval.LowRankEvaluator``:
an ``ImageEvalSetting`` (defaults the MNIST study's), an ``evaluate.AttackConfig`` and the
networks.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import cnn
from tsrobust import data
from tsrobust import datasets
from tsrobust import escalation
from tsrobust import evaluate
from tsrobust import lowrank_eval
from tsrobust import rng
from tsrobust import specialization
from tsrobust import sweep

__all__ = ['LABELS', 'ImageEvalSetting', 'off_subspace_probes', 'ImageEvaluator']

LABELS = ('oracle', 'true')  # the label kinds the image study attacks with (evaluate.LABEL_KINDS)


@dataclasses.dataclass(frozen=True)
class ImageEvalSetting:
  """The image evaluation's arguments (``experiments/configs/real.py`` documents each).

  Attributes:
    budgets: attack budgets as fractions of the pixel range; ``budget_names`` their
      column suffixes (``'0.1'``, ``'8_255'``).
    attack_labels: the label kinds of the students' attacks (``LABELS``, in order).
    attack_norm: ``linf`` or ``l2``.
    clip_range: the attacks' valid pixel range (None: unbounded, e.g. PCA images).
    num_attack: test images attacked per student.
    eval_batch: streaming batch of the specialization statistics (divides the test size).
    tau: a teacher node is specialized when its best correlation is >= tau.
    probe_seed, probe_scale: the off-subspace probes' key ``fold_in(PRNGKey(probe_seed),
      rng.IMAGE_PROBES)`` and noise std.
    convergence_points: points the doubled ensemble attacks again (0: no check).
    max_escalations: the most doublings of a group whose check fails (0: the check only).
    reference_points: the ``reference`` ensemble's check on each group's first points (0:
      none; ``escalation.reference_check``).
    surrogate_temperature: ``apgd_pair``'s surrogate ReLU gradients (0: exact).
    ccat_pass_rate: CCAT's threshold passes this fraction of the agreeing clean points.
  """
  budgets: Tuple[float, ...] = (0.05, 0.1)
  budget_names: Tuple[str, ...] = ('0.05', '0.1')
  attack_labels: Tuple[str, ...] = ('oracle',)
  attack_norm: str = 'linf'
  clip_range: Optional[Tuple[float, float]] = (0.0, 1.0)
  num_attack: int = 100
  eval_batch: int = 250
  tau: float = 0.9
  probe_seed: int = 0
  probe_scale: float = 0.15
  convergence_points: int = 25
  max_escalations: int = 3
  reference_points: int = 0
  surrogate_temperature: float = 0.1
  ccat_pass_rate: float = 0.99

  def __post_init__(self):
    if len(self.budgets) != len(self.budget_names):
      raise ValueError(f'budget_names must name each of the {len(self.budgets)} budgets, got '
                       f'{self.budget_names}')
    unknown = [k for k in self.attack_labels if k not in LABELS]
    if unknown:
      raise ValueError(f'attack_labels must be in {LABELS}, got {tuple(self.attack_labels)}')


def off_subspace_probes(x: Any, projector: Any, seed: int, scale: float) -> jax.Array:
  """``x + P_perp xi``, ``xi ~ N(0, scale^2 I)`` per image (``x [N, H, W, C]``).

  ``projector``: ``[D, D]`` PCA projector ``P`` over the flattened image. The key
  is ``fold_in(PRNGKey(seed), rng.IMAGE_PROBES)``: every student sees the same probes.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), rng.IMAGE_PROBES)
  flat = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  p_perp = jnp.eye(flat.shape[1], dtype=flat.dtype) - jnp.asarray(projector, flat.dtype)
  return data.off_subspace_probe(key, flat, p_perp, scale).reshape(x.shape)


def _spec_columns(rows: List[Dict[str, Any]], stats: Dict[str, np.ndarray], tag: str,
                  mean_name: str) -> None:
  """Adds ``spec_{tag}l{l}``, ``mean_name`` (their mean) and ``frac_{tag}l{l}`` to ``rows``."""
  for i, row in enumerate(rows):
    for l in range(stats['spec'].shape[1]):
      row[f'spec_{tag}l{l + 1}'] = float(stats['spec'][i, l])
    row[mean_name] = float(np.nanmean(stats['spec'][i]))
    for l in range(stats['frac'].shape[1]):
      row[f'frac_{tag}l{l + 1}'] = float(stats['frac'][i, l])


class ImageEvaluator:
  """Compiled evaluation of students against their teacher (``lax.map`` over students).

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

  Args:
    setting: the evaluation's ``ImageEvalSetting``.
    attack_config: the ensemble (``evaluate.preset``).
    teacher, student: the networks; ``teacher_params`` the teacher's (one network, no
      students axis): every student's with ``shared_teacher``, else the default network of
      ``teacher`` (the teacher-shaped networks ``teacher`` evaluates).
    dataset: its test images are evaluated (the first ``num_attack`` attacked).
    pca_projector: ``[D, D]``, or None (no subspace).
    mesh: the seeds mesh per-student projectors are laid over (default: every device).
    shared_teacher: one teacher for every student (its parameters are compiled into the
      specialization program); False: ``students`` takes each student's teacher
      (``teacher_params [P, ...]``, e.g. students of several teachers, ``evaluate.Evaluator``'s
      ``shared_teacher=False``). Each student's metrics are those ``shared_teacher=True``
      with its own teacher gives it (up to float rounding).
  """

  def __init__(self, setting: ImageEvalSetting, attack_config: evaluate.AttackConfig,
               teacher: cnn.CNN, student: cnn.CNN, teacher_params,
               dataset: datasets.Dataset, pca_projector: Optional[Any] = None, mesh=None,
               shared_teacher: bool = True):
    self.setting = c = setting
    self.shared_teacher = bool(shared_teacher)
    self.mesh = sweep.seed_mesh() if mesh is None else mesh
    t_apply, s_apply = teacher.apply, student.apply
    tp = teacher_params
    self.teacher_params = tp
    self.x_test = jnp.asarray(dataset.test_x)
    self.y_test = jnp.asarray(dataset.test_y)
    self.x_att = self.x_test[:c.num_attack]
    self.y_att = self.y_test[:c.num_attack]
    self.labels = tuple(c.attack_labels)

    def spec_one(sp, tp, x, y):
      t_fn = lambda v: t_apply(tp, v)[0]
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

    def spec_probe(sp, tp, x):
      sums = [specialization.summarize(s, c.tau) for s in
              specialization.network_stats(t_apply, s_apply, tp, sp, x, c.eval_batch)]
      return {'spec': jnp.stack([s.mean_max_corr for s in sums]),
              'frac': jnp.stack([s.frac_specialized for s in sums])}

    if self.shared_teacher:  # the teacher compiled in, as a constant
      self._spec = jax.jit(lambda params, tps, x, y: jax.lax.map(
          lambda sp: spec_one(sp, tp, x, y), params))
      self._spec_probe = jax.jit(lambda params, tps, x: jax.lax.map(
          lambda sp: spec_probe(sp, tp, x), params))
    else:  # each student with its teacher
      self._spec = jax.jit(lambda params, tps, x, y: jax.lax.map(
          lambda a: spec_one(a[0], a[1], x, y), (params, tps)))
      self._spec_probe = jax.jit(lambda params, tps, x: jax.lax.map(
          lambda a: spec_probe(a[0], a[1], x), (params, tps)))
    self.projector = None
    if pca_projector is not None:
      p = jnp.asarray(pca_projector, jnp.float32)
      d = int(np.prod(self.x_test.shape[1:]))
      chex.assert_shape(p, (d, d))
      self.projector = p
      self.x_probe = off_subspace_probes(self.x_test, p, c.probe_seed, c.probe_scale)
    self.attack_config = attack_config
    kw = dict(norm=c.attack_norm, clip_range=c.clip_range, shared_teacher=True,
              shared_data=True, batching=sweep.default_seed_batching())
    surrogate = lowrank_eval.surrogate_apply(student, teacher, c.surrogate_temperature)
    make = lambda cfg: evaluate.Evaluator(s_apply, t_apply, config=cfg,
                                          surrogate_apply=surrogate,
                                          **dict(kw, shared_teacher=self.shared_teacher))
    self.attacks = make(self.attack_config)
    self.level_attacks = lowrank_eval.level_evaluators(make, self.attack_config)
    self.reference_attacks = (make(self.attack_config.with_budget_of('reference'))
                              if c.reference_points else None)
    self.teacher_attacks = evaluate.Evaluator(t_apply, t_apply, config=self.attack_config, **kw)
    # Test-set predictions of a teacher-shaped network (the teacher, the robust model):
    # compiled once, streamed in eval_batch chunks.
    self._teacher_predict = jax.jit(lambda params, x: jax.lax.map(
        lambda xb: t_apply(params, xb)[0].argmax(-1),
        x.reshape((-1, c.eval_batch) + x.shape[1:])).reshape(-1))
    self.budgets = [float(b) for b in c.budgets]
    self.names = dict(zip(self.budgets, c.budget_names))

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
    if self.setting.attack_norm == 'l2':
      projs = {w: sweep.shard_seeds(jnp.broadcast_to(v, (num,) + v.shape), self.mesh)
               for w, v in projs.items()}
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

  def _subset_run(self, attacks, fold_keys, params, teacher_params, keys, on_progress):
    """``(students, start, stop) -> Result``: ``attacks`` on those students' points with keys
    ``fold_keys(keys)`` (``escalation.escalate`` / ``reference_check``'s ``run``);
    ``teacher_params``: the shared teacher's, or ``[P, ...]`` per student."""
    multiple = self.mesh.devices.size

    def run(students, start, stop):
      idx = lowrank_eval.padded_students(students, multiple)
      pick = lambda tree: jax.tree_util.tree_map(lambda v: v[idx], tree)
      sp = sweep.shard_seeds(pick(params), self.mesh)
      tp = (teacher_params if self.shared_teacher
            else sweep.shard_seeds(pick(teacher_params), self.mesh))
      out = attacks.run(
          sp, tp, self.x_att[start:stop], fold_keys(jnp.asarray(keys)[idx]),
          labels=self.y_att[start:stop], eps=self.budgets, labels_kinds=self.labels,
          projectors=self._projectors(len(idx)) or None, on_progress=on_progress)
      return escalation.take_students(out, np.arange(len(students)))
    return run

  def _student_teachers(self, params, teacher_params):
    """The teacher argument of the compiled programs: the shared teacher's parameters, or
    ``teacher_params [P, ...]`` checked against the students ``params [P, ...]``."""
    if self.shared_teacher:
      if teacher_params is not None:
        raise ValueError('teacher_params is for an evaluator built with shared_teacher=False; '
                         'this one evaluates every student with its one teacher')
      return self.teacher_params
    if teacher_params is None:
      raise ValueError('teacher_params [P, ...] (each student\'s teacher) is needed: the '
                       'evaluator was built with shared_teacher=False')
    num = jax.tree_util.tree_leaves(params)[0].shape[0]
    for leaf, ref in zip(jax.tree_util.tree_leaves(teacher_params),
                         jax.tree_util.tree_leaves(self.teacher_params)):
      chex.assert_shape(leaf, (num,) + np.shape(ref))
    return teacher_params

  def students(self, params, keys, ccat_mask: np.ndarray, progress=None,
               groups: Optional[Dict[str, np.ndarray]] = None, teacher_params=None):
    """Metrics of students ``params [P, ...]`` (``keys [P]`` attack keys).

    Returns ``(rows, Evaluation)``; CCAT students (``ccat_mask``) are also
    evaluated by CCAT's criterion (``ccat_err_*``, ``ccat_accepted_wrong_*``),
    and their accepted-and-wrong points count as oracle errors. ``progress``:
    ``what -> on_progress`` (``evaluate.Evaluator.run``), called once per evaluation.
    ``groups``: ``{name: [P] bool}`` of the convergence check and its escalation
    (``escalation.escalate``; default one group of all). ``teacher_params``: each student's
    teacher, ``[P, ...]`` (laid out as ``params``), with ``shared_teacher=False`` only.
    """
    progress = progress or (lambda what: None)
    c = self.setting
    tps = self._student_teachers(params, teacher_params)
    spec_tps = None if self.shared_teacher else tps  # shared: compiled into the program
    spec = sweep.to_host(self._spec(params, spec_tps, self.x_test, self.y_test))
    num = spec['clean_acc'].shape[0]
    rows = [{} for _ in range(num)]
    _spec_columns(rows, spec, '', 'spec_mean')
    for i in range(num):
      for l in range(spec['spec'].shape[1]):
        rows[i][f'dead_l{l + 1}'] = int(spec['dead'][i, l])
      rows[i]['clean_acc'] = float(spec['clean_acc'][i])
      rows[i]['clean_agree'] = float(spec['clean_agree'][i])
    if self.projector is not None:
      _spec_columns(rows, sweep.to_host(self._spec_probe(params, spec_tps, self.x_probe)), 'off_',
                    'spec_off')
    kwargs = dict(eps=self.budgets, labels_kinds=self.labels,
                  projectors=self._projectors(num) or None)
    result = self.attacks.run(params, tps, self.x_att, keys, labels=self.y_att,
                              on_progress=progress(f'{num} students'), **kwargs)
    convergence = reference = None
    groups = {'all': np.ones(num, bool)} if groups is None else groups
    if c.convergence_points:  # the convergence check, escalated where it fails
      def level_run(level, students, start, stop):
        what = (f'convergence check at {2 ** level}x, {len(students)} students' if start == 0
                else f'{len(students)} students attacked at {2 ** level}x (not converged)')
        return self._subset_run(self.level_attacks(level),
                                lambda k: escalation.escalation_keys(k, level), params, tps,
                                keys, progress(what))(students, start, stop)
      result, convergence = escalation.escalate(level_run, result, groups,
                                                c.convergence_points, c.max_escalations)
    if self.reference_attacks is not None:
      reference = escalation.reference_check(
          self._subset_run(self.reference_attacks, escalation.reference_keys, params, tps,
                           keys, progress('reference check')), result, groups,
          c.reference_points)
    ev = lowrank_eval.Evaluation(result, evaluate.combine(result), convergence, reference)
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
      res_c = self.attacks.run(pick(params), tps if self.shared_teacher else pick(tps),
                               self.x_att, keys[sel],
                               eps=self.budgets, labels_kinds=('ccat',),
                               thresholds=thresholds,
                               on_progress=progress(f"{sel.size} CCAT students by CCAT's "
                                                    f'criterion'))
      fin_c = evaluate.combine(res_c)
      ev = lowrank_eval.Evaluation(result, evaluate.merge_ccat(ev.final, fin_c, sel),
                                   convergence, reference)
      for i, c_row, threshold in zip(sel, evaluate.ccat_records(res_c, fin_c, self.names),
                                     thresholds):
        rows[i].update(c_row, ccat_threshold=float(threshold))
    for row, adv in zip(rows, self._rows(ev, self.labels)):
      row.update(adv)
    if self.projector is not None:
      for row, adv in zip(rows, self._adv_rows(ev)):
        row.update(adv)
    return rows, ev
