"""The mechanism study's tables and figures (``experiments/mechanism.py``'s report).

``summary_tables`` turns the study's records and dynamics into summary.md's tables (each
named on the line above it, ``<!-- table: NAME -->``, for ``experiments.reproduce``) and the
teacher-level intervals behind them (``intervals.json``): every cell is the mean of the
teacher means with its 95% t-interval over teachers (``clustered.teacher_mean_interval``),
every difference is paired per teacher (``clustered.paired_difference``). ``plot_all`` draws
the figures from the result files (``results.csv``, ``dynamics.csv``, ``results.json``'s
config), one fixed colour per intervention and noise kind (``COLORS``).
"""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from experiments import study
from tsrobust import clustered
from tsrobust import io
from tsrobust import mechanism
from tsrobust import plotting

# One colour per intervention and noise kind in every figure: 'none' (standard training) and
# orth / iso as tsrobust.plotting draws those methods; the others in colours no method uses.
COLORS = {
    'none': plotting.method_style('standard').color,
    'transplant': '#E69F00',
    'transplant_all': '#CC6677',
    'rescale': '#882255',
    'standard': plotting.method_style('standard').color,
    'orth': plotting.method_style('orth').color,
    'iso': plotting.method_style('iso').color,
    'in': '#999933',
}
NOISE_LABELS = {'standard': 'no noise (standard training)',
                'orth': 'noise in S_perp (orth)', 'iso': 'isotropic noise (iso)',
                'in': 'noise in S (in)'}
PARTS = ('intervention', 'optimizer', 'augmentation', 'dependence')


# ----------------------------------------------------------------------------
# Intervals.
# ----------------------------------------------------------------------------

def _fmt(v: Optional[float], digits: int = 3) -> str:
  return '-' if v is None or not np.isfinite(v) else f'{v:.{digits}f}'


def _finite(rows, column):
  return [r for r in rows if r.get(column) is not None and np.isfinite(r[column])]


def interval(rows: Sequence[Dict[str, Any]], column: str) -> Optional[Dict[str, Any]]:
  """``clustered.teacher_mean_interval`` of ``column`` over ``rows`` (None: fewer than two
  teachers with a value)."""
  rows = _finite(rows, column)
  if len({r['teacher'] for r in rows}) < 2:
    return None
  return clustered.teacher_mean_interval([r[column] for r in rows], [r['teacher'] for r in rows])


def paired(a_rows, b_rows, column: str) -> Optional[Dict[str, Any]]:
  """``clustered.paired_difference`` of ``column``, ``a`` minus ``b`` per teacher (t-interval);
  None with fewer than two teachers in common."""
  a_rows, b_rows = _finite(a_rows, column), _finite(b_rows, column)
  if len({r['teacher'] for r in a_rows} & {r['teacher'] for r in b_rows}) < 2:
    return None
  return clustered.paired_difference([r[column] for r in a_rows], [r[column] for r in b_rows],
                                     [r['teacher'] for r in a_rows],
                                     [r['teacher'] for r in b_rows], method='t')


def cell(rep: Optional[Dict[str, Any]], digits: int = 3) -> str:
  """``'0.512 [0.401, 0.623]'`` of an interval report (``-`` when there is none)."""
  if rep is None:
    return '-'
  lo, hi = rep['ci']
  return f'{_fmt(rep["estimate"], digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], name: str) -> List[str]:
  """A markdown table, named for ``experiments.reproduce`` by the comment line above it."""
  return ([f'<!-- table: {name} -->', '| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in rows] + [''])


# ----------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------

def _by_condition(records, part):
  out = {}
  for r in records:
    if r['part'] == part:
      out.setdefault(r['condition'], []).append(r)
  return out


def first_specialized_steps(dynamics, tau: float) -> Dict[Tuple[str, int], np.ndarray]:
  """``{(condition, seed): [J]}`` the first recorded step at which each teacher node's best
  correlation in S reaches ``tau`` (inf: never; NaN: dead at the end)."""
  out = {}
  grouped = {}
  for row in dynamics:
    grouped.setdefault((row['condition'], row['seed']), []).append(row)
  for key, rows in grouped.items():
    nodes = max(r['node'] for r in rows) + 1
    first = np.full(nodes, np.inf)
    last_step = max(r['step'] for r in rows)
    for r in sorted(rows, key=lambda r: r['step']):
      if r['corr_in'] is not None and r['corr_in'] >= tau and not np.isfinite(first[r['node']]):
        first[r['node']] = r['step']
      if r['step'] == last_step and not r['alive']:
        first[r['node']] = np.nan
    out[key] = first
  return out


def spearman(x: np.ndarray, y: np.ndarray) -> Optional[float]:
  """Spearman correlation (average ranks of ties; inf ranks last), None when undefined."""
  ok = ~np.isnan(y)
  x, y = x[ok], y[ok]
  if len(x) < 3:
    return None
  rank = lambda v: _average_ranks(v)
  rx, ry = rank(x), rank(y)
  if np.ptp(rx) == 0 or np.ptp(ry) == 0:
    return None
  return float(np.corrcoef(rx, ry)[0, 1])


def _average_ranks(v: np.ndarray) -> np.ndarray:
  order = np.argsort(v, kind='stable')
  ranks = np.empty(len(v))
  sv = v[order]
  i = 0
  while i < len(v):
    j = i
    while j + 1 < len(v) and sv[j + 1] == sv[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2.0
    i = j + 1
  return ranks


def summary_tables(config, records, dynamics) -> Tuple[str, Dict[str, Any]]:
  """summary.md's tables (teacher-level intervals) and ``intervals.json``'s content."""
  h = study.eps_name(study.headline_eps(config))
  eps = [study.eps_name(e) for e in config.eps]
  t, k = config.num_teachers, config.students_per_teacher
  intervals: Dict[str, Any] = {'level': 0.95, 'num_teachers': t, 'students_per_teacher': k,
                               'headline_eps': h}
  lines = [f'# The mechanism study: rank r = {config.rank} of d = {config.d}, {t} teachers x '
           f'{k} student(s) per condition', '',
           f'Cells: mean over the {t} teacher means with its 95% t-interval over teachers '
           '(`clustered.teacher_mean_interval`); differences are paired per teacher '
           '(`clustered.paired_difference`). Oracle errors are the attack ensemble\'s '
           f'(`attack.strength = {config.attack.strength}`, {config.num_attack} points per '
           f'student, {config.attack_norm.upper()} budget {h} unless named; escalated where the '
           'convergence check fails: see the end).', '']

  # 1. Interventions.
  inter = _by_condition(records, 'intervention')
  cols = ['spec_in', 'spec_off', 'wcos_off', 'moved_off', 'clean_agree',
          f'adv_oracle_in_{h}', f'adv_oracle_off_{h}', f'adv_oracle_full_{h}']
  rows, rep = [], {}
  for name, members in inter.items():
    rep[name] = {col: interval(members, col) for col in cols}
    rows.append([name, str(len(members))] + [cell(rep[name][col]) for col in cols])
  intervals['intervention'] = rep
  lines += ['## 1. Interventions on the off-subspace weights after standard training', '',
            'Each student trained by standard training, then its first-layer `P_perp W` '
            'replaced by its teacher nodes\' or rescaled. `transplant` '
            '(`mechanism.transplant_off_subspace`): one student node per teacher node (its '
            'best, one-to-one) gets `P_perp w_T` scaled by `||P w_S|| / ||P w_T||`, every other '
            'node `P_perp w = 0`; `transplant_all` (`mechanism.transplant_off_subspace_all`): '
            'every student node whose best correlation in S with a teacher node reaches '
            f'{config.intervention.min_corr:g} gets that node\'s, the others 0; `rescale c`: '
            '`W -> P W + c P_perp W`. `moved_off`: `||P_perp (W - W0)|| / ||P_perp W0||` after '
            'the intervention.', '']
  lines += _table(['intervention', 'students'] + [f'`{c_}`' for c_ in cols], rows,
                  'intervention')
  width = config.width_mult * config.teacher_hidden[0]
  for kind, what in (('transplant', 'one per teacher node'),
                     ('transplant_all', 'every node correlating >= '
                                        f'{config.intervention.min_corr:g} with a teacher node')):
    tr = inter.get(kind)
    if tr:
      matched = np.mean([r['transplant_matched'] for r in tr])
      zeroed = np.mean([r['transplant_zeroed'] for r in tr])
      lines += [f'`{kind}` ({what}): {matched:.1f} of the {width} student nodes matched, '
                f'{zeroed:.1f} unmatched (their `P_perp w` set to 0), per student.', '']
  base = inter.get('none', [])
  pcols = ['spec_in', 'spec_off', 'wcos_off', 'clean_agree', f'adv_oracle_in_{h}',
           f'adv_oracle_off_{h}', f'adv_oracle_full_{h}']
  rows, rep = [], {}
  for name, members in inter.items():
    if name == 'none':
      continue
    rep[name] = {col: paired(members, base, col) for col in pcols}
    rows.append([name, str(len({m['teacher'] for m in members}))]
                + [cell(rep[name][col]) for col in pcols])
  intervals['intervention_minus_none'] = rep
  lines += ['Each intervention minus `none`, paired per teacher:', '']
  lines += _table(['intervention', 'teachers'] + [f'`{c_}`' for c_ in pcols], rows,
                  'intervention-paired')
  bcols = [f'adv_oracle_{w}_{e}' for w in ('off', 'full') for e in eps]
  rows = [[name, str(len(members))] + [cell(interval(members, col)) for col in bcols]
          for name, members in inter.items()]
  lines += ['Oracle error off S and unconstrained at every budget:', '']
  lines += _table(['intervention', 'students'] + [f'`{c_}`' for c_ in bcols], rows,
                  'intervention-budgets')

  # 2. Optimizers.
  d = config.dynamics
  opt = _by_condition(records, 'optimizer')
  ocols = ['moved_off', 'wcos_off', 'spec_in', 'spec_off', 'train_loss']
  rows, rep = [], {}
  for name, members in opt.items():
    rep[name] = {col: interval(members, col) for col in ocols}
    rows.append([name, _fmt(members[0]['learning_rate'], 4), str(len(members))]
                + [cell(rep[name][col], 5 if col == 'train_loss' else 4 if col == 'moved_off'
                        else 3) for col in ocols[:2]]
                + [_fmt(members[0]['wcos_off_random'])]
                + [cell(rep[name][col], 6 if col == 'train_loss' else 3) for col in ocols[2:]])
  intervals['optimizer'] = rep
  lines += ['## 2. Claim 2 under optimizers', '',
            f'Standard training of the same students ({config.num_steps} steps, teachers with '
            f'strength decay {d.teacher_strength_decay:g}) by each optimizer, without and '
            f'with weight decay {config.optimizers.decay:g} '
            '(`optax.add_decayed_weights` before the optimizer). `moved_off`: '
            '`||P_perp (W - W0)|| / ||P_perp W0||` of the first layer (0: `P_perp W` never '
            'moved); `wcos_off`: mean `|cos(P_perp w_T, P_perp w_S)|` over teacher nodes and '
            'their best students, beside its value for random directions; spec on '
            f'{config.num_eval} held-out points (and the same moved off S).', '']
  lines += _table(['optimizer', 'learning rate', 'students', '`moved_off`', '`wcos_off`',
                   'random `wcos_off`', '`spec_in`', '`spec_off`', 'final loss'], rows,
                  'optimizers')

  # 3. Dynamics.
  first = first_specialized_steps(dynamics, config.tau)
  nodes = config.teacher_hidden[0]
  strengths = (np.arange(nodes) + 1.0) ** -d.teacher_strength_decay
  steps = mechanism.log_spaced_steps(config.num_steps, d.record_chunk_steps, d.num_points)
  rows, rep = [], {}
  for name, members in opt.items():
    per = np.array([first[(name, m['seed'])] for m in members])  # [students, J]
    medians = []
    for j in range(nodes):
      col = per[:, j]
      col = col[~np.isnan(col)]
      medians.append('-' if not len(col) else
                     (f'> {config.num_steps}' if not np.isfinite(np.median(col))
                      else f'{np.median(col):g}'))
    rhos = [(m, spearman(np.arange(nodes, dtype=float), first[(name, m['seed'])]))
            for m in members]
    rho_rows = [{'teacher': m['teacher'], 'rho': v} for m, v in rhos if v is not None]
    rep[name] = interval(rho_rows, 'rho')
    never = int(np.isinf(per).sum())
    rows.append([name] + medians + [cell(rep[name]), f'{never} / {per.size}'])
  intervals['dynamics_spearman'] = rep
  lines += ['## 3. Dynamics: when does each teacher node specialize?', '',
            f'Median over students of the first recorded step (of {len(steps)} log-spaced '
            f'ones) at which the teacher node\'s best correlation in S reaches '
            f'tau = {config.tau:g} (`> {config.num_steps}`: not by the end). Node j\'s fan-out '
            f'is scaled by (j + 1)^-{d.teacher_strength_decay:g} (node 1 strongest). '
            '`rho`: Spearman correlation, per student, of node index (weaker) with that step '
            '(never: last), its interval over teachers; rho > 0: strong nodes specialize '
            'first. The curves are `mechanism_dynamics.png`.', '']
  lines += _table(['optimizer'] + [f'node {j + 1} ({strengths[j]:.2g})' for j in range(nodes)]
                  + ['`rho`', 'never specialized'], rows, 'dynamics')

  # 4. Claim 5.
  aug = _by_condition(records, 'augmentation')
  acols = ['spec_off', 'wcos_off', 'moved_off', f'adv_oracle_in_{h}', f'adv_oracle_off_{h}',
           f'adv_oracle_full_{h}']
  rows, rep = [], {}
  for name, members in aug.items():
    rep[name] = {col: interval(members, col) for col in acols}
    m = members[0]
    rows.append([str(m['rank']), m['aug_kind'], _fmt(m['aug_scale'], 2), str(len(members))]
                + [cell(rep[name][col]) for col in acols])
  intervals['augmentation'] = rep
  lines += ['## 4. Claim 5: is it noise in S_perp that helps?', '',
            'Students trained with teacher-labelled noise on '
            f'{config.augmentation.fraction:g} of each batch: in S_perp (`orth`), isotropic '
            '(`iso`) or in S (`in`), at matched noise energy `E||noise||^2 = scale^2 d` (per '
            'direction: `scale sqrt(d / (d - r))`, `scale`, `scale sqrt(d / r)`).', '']
  lines += _table(['rank', 'noise', 'scale', 'students'] + [f'`{c_}`' for c_ in acols], rows,
                  'claim5')
  pairs = [(a, b) for a, b in (('orth', 'iso'), ('orth', 'in'), ('iso', 'in'))
           if a in config.augmentation.kinds and b in config.augmentation.kinds]
  rows, rep = [], {}
  off = f'adv_oracle_off_{h}'
  full = f'adv_oracle_full_{h}'
  for rk in config.augmentation.ranks:
    for s in config.augmentation.scales:
      key = f'r={rk} scale {s:g}'
      rep[key] = {}
      cells = []
      for a, b in pairs:
        for col in (off, full):
          rep[key][f'{a} - {b}: {col}'] = paired(aug.get(f'r={rk} {a} {s:g}', []),
                                                 aug.get(f'r={rk} {b} {s:g}', []), col)
          cells.append(cell(rep[key][f'{a} - {b}: {col}']))
      rows.append([str(rk), f'{s:g}'] + cells)
  intervals['augmentation_paired'] = rep
  lines += ['Differences between noise kinds, paired per teacher (negative: the first kind '
            'leaves less error):', '']
  lines += _table(['rank', 'scale'] + [f'{a} - {b}: `{col}`' for a, b in pairs
                                       for col in (off, full)], rows, 'claim5-paired')

  # 5. Dependence.
  dep = _by_condition(records, 'dependence')
  dcols = ['spec_in', 'spec_off', 'wcos_off', f'adv_oracle_in_{h}', f'adv_oracle_off_{h}',
           'clean_agree']
  rows, rep = [], {}
  for name, members in dep.items():
    for m in members:
      m['_off_minus_in'] = m[f'adv_oracle_off_{h}'] - m[f'adv_oracle_in_{h}']
    rep[name] = {col: interval(members, col) for col in dcols + ['_off_minus_in']}
    m = members[0]
    rows.append([str(m['width_mult']), 'online' if not m['num_train'] else str(m['num_train']),
                 str(len(members))] + [cell(rep[name][col]) for col in dcols[:5]]
                + [cell(rep[name]['_off_minus_in']), cell(rep[name]['clean_agree'])])
    for m in members:
      del m['_off_minus_in']
  intervals['dependence'] = {k_: {('off_minus_in' if c_ == '_off_minus_in' else c_): v
                                  for c_, v in d_.items()} for k_, d_ in rep.items()}
  lines += ['## 5. Dependence of claims 1-3 on width and training-set size', '',
            f'Standard training at rank {config.rank}; `k`: width multiplier (student width k x '
            f'{config.teacher_hidden[0]}); N: a fixed training set of N points (online: fresh '
            'samples every step). Off minus in: the oracle error in S_perp minus in S, per '
            'student.', '']
  lines += _table(['k', 'N', 'students'] + [f'`{c_}`' for c_ in dcols[:5]]
                  + ['off minus in', '`clean_agree`'], rows, 'dependence')
  return '\n'.join(lines), intervals


# ----------------------------------------------------------------------------
# Figures (from the result files).
# ----------------------------------------------------------------------------

def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> None:
  import io as io_lib  # pylint: disable=g-import-not-at-top
  buf = io_lib.BytesIO()
  fig.savefig(buf, format='png', dpi=120)
  _pyplot().close(fig)
  io.atomic_write_bytes(path, buf.getvalue())


def _teacher_ci(rows, column):
  rep = interval(rows, column)
  if rep is None:
    vals = [r[column] for r in rows if r.get(column) is not None]
    v = float(np.mean(vals)) if vals else np.nan
    return v, 0.0, 0.0
  return rep['estimate'], rep['estimate'] - rep['ci'][0], rep['ci'][1] - rep['estimate']


def _run_config(workdir: str) -> Dict[str, Any]:
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)['config']


def _null_formatter():
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  return ticker.NullFormatter()


def _norm_text(norm: str) -> str:
  return {'l2': 'L2', 'linf': 'L-inf'}.get(norm, norm)


def _title(fig, text: str, width_in: float) -> None:
  """A figure title wrapped to the figure's width (``width_in`` inches)."""
  import textwrap  # pylint: disable=g-import-not-at-top
  fig.suptitle('\n'.join(textwrap.wrap(text, int(width_in * 11))), fontsize=11)


def plot_interventions(workdir: str) -> None:
  """Oracle error vs budget after each intervention, in S / S_perp / unconstrained."""
  plt = _pyplot()
  cfg = _run_config(workdir)
  rows = [r for r in io.read_csv(os.path.join(workdir, 'results.csv'))
          if r['part'] == 'intervention']
  eps = [study.eps_name(e) for e in cfg['eps']]
  groups = {}
  for r in rows:
    groups.setdefault(r['condition'], []).append(r)
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), sharey=True)
  styles = ('-', '--', ':', '-.')
  rescaled = [name for name, m in groups.items() if m[0]['intervention'] == 'rescale']
  for ax, where, title in zip(axes, ('in', 'off', 'full'),
                              ('delta in S', 'delta in S_perp', 'delta unconstrained')):
    for i, (name, members) in enumerate(groups.items()):
      kind = members[0]['intervention']
      style = styles[rescaled.index(name) % len(styles)] if kind == 'rescale' else '-'
      stats = [_teacher_ci(members, f'adv_oracle_{where}_{e}') for e in eps]
      x = np.array([float(e) for e in eps]) * (1 + 0.015 * (i - len(groups) / 2))
      ax.errorbar(x, [s[0] for s in stats], yerr=np.array([[s[1] for s in stats],
                                                            [s[2] for s in stats]]),
                  color=COLORS[kind], linestyle=style, marker='o', markerfacecolor='none',
                  capsize=3, label=name)
    ax.set_xscale('log')
    ax.set_xticks([float(e) for e in eps])
    ax.set_xticklabels(eps)
    ax.xaxis.set_minor_formatter(_null_formatter())
    ax.set_xlabel(f'attack budget eps ({_norm_text(cfg["attack_norm"])} norm)')
    ax.set_title(title)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('oracle adversarial error (fraction of points)')
  axes[0].legend(fontsize=8, title='intervention on P_perp W', title_fontsize=8,
                 loc='upper left')
  t = cfg['num_teachers'] * cfg['students_per_teacher']
  _title(fig, f'Oracle error after interventions on the off-subspace weights, '
              f'{_norm_text(cfg["attack_norm"])} budgets {", ".join(eps)} (attack ensemble '
              f'`{cfg["attack"]["strength"]}`, worst case per point). Mean of '
              f'{cfg["num_teachers"]} teacher means, 95% t-interval over teachers; {t} '
              f'students per intervention, rank {cfg["rank"]} of d = {cfg["d"]}; rescale 1 is '
              'the identity (= none)', 14)
  fig.tight_layout()
  _save(fig, os.path.join(workdir, 'mechanism_intervention.png'))


def plot_dynamics(workdir: str) -> None:
  """Each teacher node's best correlation in and off S vs training step, one panel per
  optimizer run (mean over students)."""
  plt = _pyplot()
  cfg = _run_config(workdir)
  rows = io.read_csv(os.path.join(workdir, 'dynamics.csv'))
  conditions = list(dict.fromkeys(r['condition'] for r in rows))
  names = list(dict.fromkeys(r['optimizer'] for r in rows))
  fig, axes = plt.subplots(2, len(names), figsize=(4.6 * len(names), 7.4), squeeze=False,
                           sharex=True, sharey=True)
  nodes = int(max(r['node'] for r in rows)) + 1
  cmap = plt.get_cmap('viridis')
  steps = sorted({r['step'] for r in rows})
  first_step = next((s for s in steps if s > 0), 1.0)
  for condition in conditions:
    sub = [r for r in rows if r['condition'] == condition]
    col = names.index(sub[0]['optimizer'])
    row = 1 if sub[0]['weight_decay'] else 0
    ax = axes[row][col]
    for j in range(nodes):
      for column, line in (('corr_in', '-'), ('corr_off', '--')):
        y = []
        for s in steps:
          v = [r[column] for r in sub if r['node'] == j and r['step'] == s
               and r[column] is not None]
          y.append(np.mean(v) if v else np.nan)
        strength = next(r['strength'] for r in sub if r['node'] == j)
        ax.plot(steps, y, linestyle=line, color=cmap(j / max(nodes - 1, 1)), lw=1.2,
                label=f'node {j + 1} (x{strength:.2g})' if column == 'corr_in' else None)
    ax.set_xscale('symlog', linthresh=first_step)
    ax.set_title(condition)
    ax.grid(alpha=0.3)
    ax.axhline(cfg['tau'], color='#888888', lw=0.8, linestyle=':')
  for ax in axes[-1]:
    ax.set_xlabel('training step (symlog)')
  for ax in axes[:, 0]:
    ax.set_ylabel('best correlation with a student node')
  handles, labels = axes[0][0].get_legend_handles_labels()
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  handles += [Line2D([], [], color='k', linestyle='-'), Line2D([], [], color='k', linestyle='--'),
              Line2D([], [], color='#888888', linestyle=':')]
  labels += ['in S (held-out data)', 'off S (x + P_perp xi)', f'tau = {cfg["tau"]:g}']
  fig.legend(handles, labels, loc='lower center', ncol=min(8, len(labels)), fontsize=8,
             frameon=False)
  decay = cfg['dynamics']['teacher_strength_decay']
  _title(fig, f'Specialization of each teacher node during training, mean over '
              f'{cfg["num_teachers"] * cfg["students_per_teacher"]} students (node j\'s '
              f'fan-out scaled by (j + 1)^-{decay:g}: node 1 strongest). Top: no weight decay; '
              f'bottom: weight decay {cfg["optimizers"]["decay"]:g}. No attack: '
              f'correlations of first-layer activations; rank {cfg["rank"]} of d = {cfg["d"]}',
         4.6 * len(names))
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  _save(fig, os.path.join(workdir, 'mechanism_dynamics.png'))


def plot_claim5(workdir: str) -> None:
  """Oracle error off S vs noise scale, one panel per rank, one line per noise kind."""
  plt = _pyplot()
  cfg = _run_config(workdir)
  rows = [r for r in io.read_csv(os.path.join(workdir, 'results.csv'))
          if r['part'] == 'augmentation']
  eps = study.eps_name(cfg['eps'][len(cfg['eps']) // 2])
  column = f'adv_oracle_off_{eps}'
  ranks = sorted({int(r['rank']) for r in rows})
  fig, axes = plt.subplots(1, len(ranks), figsize=(3.8 * len(ranks) + 1, 4.4), squeeze=False,
                           sharey=True)
  kinds = list(dict.fromkeys(r['aug_kind'] for r in rows if r['aug_kind'] != 'standard'))
  for ax, rk in zip(axes[0], ranks):
    at = [r for r in rows if int(r['rank']) == rk]
    std = [r for r in at if r['aug_kind'] == 'standard']
    if std:
      m, lo, hi = _teacher_ci(std, column)
      ax.errorbar([0.0], [m], yerr=[[lo], [hi]], color=COLORS['standard'], marker='o',
                  markerfacecolor='none', capsize=3, linestyle='none',
                  label=NOISE_LABELS['standard'])
    for i, kind in enumerate(kinds):
      scales = sorted({r['aug_scale'] for r in at if r['aug_kind'] == kind})
      stats = [_teacher_ci([r for r in at if r['aug_kind'] == kind and r['aug_scale'] == s],
                           column) for s in scales]
      xs = [0.0] + scales if std else scales
      ys = ([_teacher_ci(std, column)[0]] if std else []) + [s[0] for s in stats]
      ax.plot(xs, ys, color=COLORS[kind], lw=0.8, alpha=0.5)
      shift = 0.004 * (i - (len(kinds) - 1) / 2)
      ax.errorbar(np.array(scales) + shift, [s[0] for s in stats],
                  yerr=np.array([[s[1] for s in stats], [s[2] for s in stats]]),
                  color=COLORS[kind], marker='o^vs'[i % 4], markerfacecolor='none', capsize=3,
                  linestyle='none', label=NOISE_LABELS.get(kind, kind))
    ax.set_title(f'rank r = {rk} of d = {cfg["d"]}')
    ax.set_xlabel('noise scale s (energy s^2 d, matched)')
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(f'oracle error off S, {plotting.budget_text(eps, cfg["attack_norm"])}')
  axes[0][-1].legend(fontsize=8)
  _title(fig, f'Claim 5: oracle adversarial error for delta in S_perp, '
              f'{plotting.budget_text(eps, cfg["attack_norm"])} (attack ensemble '
              f'`{cfg["attack"]["strength"]}`, worst case per point), after training with '
              f'teacher-labelled noise of matched energy. Mean of {cfg["num_teachers"]} teacher '
              f'means, 95% t-interval over teachers', 3.8 * len(ranks) + 1)
  fig.tight_layout()
  _save(fig, os.path.join(workdir, 'mechanism_claim5.png'))


def plot_all(workdir: str) -> None:
  plot_interventions(workdir)
  plot_dynamics(workdir)
  plot_claim5(workdir)
