"""Figures drawn from result files (never from live training state).

Every figure says what it plots: the quantity, the attack ensemble, the norm and the
budget. A method has one colour and one marker in every figure (``METHOD_STYLES``, the
colour-blind-safe Okabe-Ito palette), and the legend spells its name out. Markers are
hollow and of different shapes, so students of different methods at the same point (a
PGD-AT student restricted to S beside a standard one; orthogonal and isotropic noise at
robust accuracy 1) stay visible. Figures are written atomically with mode 0644
(``tsrobust.io``).
"""

import io as _io
import json
import os
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from tsrobust import io

__all__ = ['MethodStyle', 'METHOD_STYLES', 'method_style', 'budget_text', 'plot_lowrank',
           'plot_spec_vs_robustness', 'plot_spec_per_layer', 'plot_spec_vs_accuracy']


class MethodStyle(NamedTuple):
  """How one training method is drawn: ``color``, matplotlib ``marker``, legend ``label``,
  and the marker's ``size`` (points^2): different sizes nest the hollow markers of
  students that coincide (orthogonal and isotropic noise both at robust accuracy 1)."""
  color: str
  marker: str
  label: str
  size: float = 40.0


# One style per method of ``tsrobust.methods.METHODS``, the same in every figure.
METHOD_STYLES = {
    'standard': MethodStyle('#000000', 'o', 'standard training', 36.0),
    'at': MethodStyle('#D55E00', 's', 'PGD adversarial training', 52.0),
    'ccat': MethodStyle('#CC79A7', 'D', 'CCAT (confidence-calibrated AT)', 40.0),
    'robust_features': MethodStyle('#009E73', 'P', 'robust-feature dataset', 60.0),
    'orth': MethodStyle('#0072B2', '^', 'noise in S_perp (orthogonal augmentation)', 120.0),
    'iso': MethodStyle('#56B4E9', 'v', 'isotropic noise (augmentation control)', 30.0),
}
_OTHER = MethodStyle('#999999', 'X', '', 40.0)
_VARIANT_LINES = ('-', '--', ':', '-.')


def method_style(method: str) -> MethodStyle:
  """The style of ``method`` (a grey cross and the name itself for an unknown one).

  >>> method_style('at').label
  'PGD adversarial training'
  >>> method_style('mine').label
  'mine'
  """
  return METHOD_STYLES.get(method, _OTHER._replace(label=method))


def budget_text(eps: str, norm: Optional[str]) -> str:
  """A budget as a reader says it: ``'L2 budget 1.0'``, ``'L-inf budget 8/255'``.

  >>> budget_text('1.0', 'l2'), budget_text('8.0_255', 'linf'), budget_text('0.1', None)
  ('L2 budget 1.0', 'L-inf budget 8/255', 'budget 0.1')
  """
  if '_' in eps:
    num, den = eps.split('_', 1)
    eps = f'{float(num):g}/{den}'
  name = {'l2': 'L2 ', 'linf': 'L-inf '}.get(norm or '', '')
  return f'{name}budget {eps}'


def _norm_of(results_csv: str) -> Optional[str]:
  """``config.attack_norm`` of the run whose ``results.json`` lies beside ``results_csv``."""
  path = os.path.join(os.path.dirname(os.path.abspath(results_csv)), 'results.json')
  try:
    with open(path) as f:
      return json.load(f)['config'].get('attack_norm')
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _by_rank(rows, column: str) -> Tuple[List[float], List[float], List[float]]:
  """Ranks with at least one value of ``column``, and its mean and sample std over seeds."""
  groups: Dict[float, List[float]] = defaultdict(list)
  for row in rows:
    v = row.get(column)
    if v is not None and np.isfinite(v):
      groups[row['rank']].append(v)
  ranks = sorted(groups)
  std = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
  return (ranks, [float(np.mean(groups[r])) for r in ranks], [std(groups[r]) for r in ranks])


def _save(fig, out_png: str) -> None:
  """Saves a figure atomically, mode 0644 (``io.atomic_write_bytes``)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buf = _io.BytesIO()
  fig.savefig(buf, format='png', dpi=120)
  plt.close(fig)
  io.atomic_write_bytes(out_png, buf.getvalue())


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _scatter(ax, xs, ys, method: str, label: Optional[str] = None):
  """Hollow markers of ``method``; smaller markers drawn above larger ones, so coinciding
  students of several methods show as nested outlines."""
  style = method_style(method)
  ax.scatter(xs, ys, facecolors='none', edgecolors=style.color, marker=style.marker,
             s=style.size, linewidths=1.3, label=label or style.label,
             zorder=3.0 - style.size / 1000.0)


def _label_stacks(ax, points: Dict[str, List[Tuple[float, float]]], most: int = 2,
                  min_students: int = 4) -> None:
  """Writes, beside the ``most`` largest stacks of at least ``min_students`` coinciding
  students (equal to 3 decimals) of several methods, how many of each method it holds:
  ``'here: orth 12, iso 12, at 4'``."""
  stacks: Dict[Tuple[float, float], Dict[str, int]] = defaultdict(lambda: defaultdict(int))
  for method, pts in points.items():
    for x, y in pts:
      stacks[(round(x, 3), round(y, 3))][method] += 1
  shared = [(k, v) for k, v in stacks.items()
            if len(v) > 1 and sum(v.values()) >= min_students]
  shared.sort(key=lambda kv: -sum(kv[1].values()))
  for (x, y), counts in shared[:most]:
    text = ', '.join(f'{m} {n}' for m, n in sorted(counts.items(), key=lambda mn: -mn[1]))
    ax.annotate(f'here: {text}', (x, y), xytext=(-60, -30), textcoords='offset points',
                ha='right', va='top', fontsize=7, color='#444444',
                arrowprops=dict(arrowstyle='-', color='#888888', lw=0.6))


def _legend_label(method: str, count: int) -> str:
  """``'orth: noise in S_perp (orthogonal augmentation), 12 students'``."""
  return f'{method}: {method_style(method).label}, {count} students'


def _method_order(rows) -> List[str]:
  """Methods in ``METHOD_STYLES``' order (the same legend order in every figure)."""
  present = set(r['method'] for r in rows)
  known = [m for m in METHOD_STYLES if m in present]
  return known + sorted(present - set(known))


def plot_spec_vs_robustness(results_csv: str, out_png: str, eps: str,
                            norm: Optional[str] = None) -> None:
  """Scatter of specialization (in / off subspace) vs oracle robust accuracy.

  One point per student, one colour and marker per method; robust accuracy is
  ``1 - adv_oracle_full_{eps}`` (the attack ensemble's worst case per point).

  Args:
    results_csv: a ``results.csv`` with ``method``, ``spec_in``, ``spec_off`` and
      ``adv_oracle_full_{eps}`` columns (``experiments/robustness.py``).
    out_png: the figure's path (written atomically).
    eps: the budget, as written in the column names.
    norm: the attack norm (``l2`` / ``linf``) for the title; default: the
      ``attack_norm`` of the ``results.json`` beside ``results_csv``.
  """
  plt = _pyplot()
  rows = io.read_csv(results_csv)
  norm = norm or _norm_of(results_csv)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
  methods = _method_order(rows)
  for ax, column, title in ((axes[0], 'spec_in', 'in-subspace specialization'),
                            (axes[1], 'spec_off', 'off-subspace specialization')):
    drawn = {}
    for method in methods:
      pts = [(r[column], 1.0 - r[f'adv_oracle_full_{eps}']) for r in rows
             if r['method'] == method and r.get(column) is not None]
      if pts:
        _scatter(ax, *zip(*pts), method, _legend_label(method, len(pts)))
        drawn[method] = pts
    _label_stacks(ax, drawn)
    ax.set_xlabel(f'{title} (mean max correlation)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f'oracle robust accuracy, {budget_text(eps, norm)}')
  axes[0].set_ylim(-0.05, 1.07)
  fig.legend(*axes[0].get_legend_handles_labels(), loc='lower center', ncol=3, fontsize=8,
             frameon=False)
  fig.suptitle('Specialization vs oracle robust accuracy, one point per student\n(attack '
               f'ensemble, worst case per point, {budget_text(eps, norm)})')
  fig.tight_layout(rect=(0, 0.12, 1, 1))
  _save(fig, out_png)


def plot_lowrank(results_csv: str, out_png: str, eps: str, norm: Optional[str] = None) -> None:
  """Specialization and oracle adversarial error against rank, in vs off subspace.

  Args:
    results_csv: a ``results.csv`` written by ``experiments/lowrank.py``.
    out_png: the figure's path (written atomically).
    eps: the budget to plot, as written in the column names.
    norm: the attack norm for the title; default: the ``attack_norm`` of the
      ``results.json`` beside ``results_csv``.
  """
  plt = _pyplot()
  rows = io.read_csv(results_csv)
  norm = norm or _norm_of(results_csv)
  seeds = max((sum(1 for r in rows if r['rank'] == k) for k in {r['rank'] for r in rows}),
              default=0)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  panels = [
      (axes[0], [('spec_in', 'in-subspace (held-out data in S)', 'o', '-'),
                 ('spec_off', 'off-subspace probes x + P_perp xi', 's', '--')],
       'mean max correlation', 'Specialization of the students'),
      (axes[1], [(f'adv_oracle_in_{eps}', 'delta in S', 'o', '-'),
                 (f'adv_oracle_off_{eps}', 'delta in S_perp', 's', '--'),
                 (f'adv_oracle_full_{eps}', 'delta unconstrained', '^', ':')],
       'oracle adversarial error',
       f'Oracle adversarial error, attack ensemble\n(worst case per point), '
       f'{budget_text(eps, norm)}'),
  ]
  ranks_all = sorted({int(r['rank']) for r in rows})
  colors = ('#0072B2', '#D55E00', '#000000')
  # Series a little apart along the rank axis, so coinciding points and error bars show.
  offset = 0.012 * (max(ranks_all) - min(ranks_all)) if len(ranks_all) > 1 else 0.0
  for ax, series, ylabel, title in panels:
    for i, ((column, label, marker, line), color) in enumerate(zip(series, colors)):
      ranks, mean, std = _by_rank(rows, column)
      if ranks:
        shift = (i - (len(series) - 1) / 2) * offset
        ax.errorbar(np.asarray(ranks) + shift, mean, yerr=std, marker=marker,
                    linestyle=line, color=color, capsize=3, label=label,
                    markerfacecolor='none')
    ax.set_xticks(ranks_all)
    ax.set_xlabel('rank r of the data subspace (r = d: full rank, no S_perp)')
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f'Low-rank teacher-student: mean +- sample std over {seeds} seeds per rank')
  fig.tight_layout()
  _save(fig, out_png)


def _variant_groups(rows) -> Dict[str, list]:
  """Rows grouped by their ``variant`` column (or ``method``), in first-seen order."""
  groups: Dict[str, list] = {}
  for row in rows:
    groups.setdefault(str(row.get('variant') or row['method']), []).append(row)
  return groups


def _variant_label(name: str, method: str) -> str:
  """``'at 0.05'`` -> ``'at 0.05: PGD adversarial training'`` (the grid point as the tables
  name it, then the method spelled out)."""
  return f'{name}: {method_style(method).label}'



def plot_spec_per_layer(results_csv: str, out_png: str) -> None:
  """Specialization (mean max correlation) per layer, one line per method variant.

  A method's colour and marker, one line style per variant of it (its budget or scale).

  Args:
    results_csv: a ``results.csv`` with ``spec_l{l}`` columns and a
      ``variant`` (or ``method``) column, e.g. from ``experiments/real.py``.
    out_png: the figure's path (written atomically). Mean +- sample std over seeds.
  """
  plt = _pyplot()
  rows = io.read_csv(results_csv)
  layers = sorted((c for c in rows[0] if c.startswith('spec_l')), key=lambda c: int(c[6:]))
  fig, ax = plt.subplots(figsize=(8, 4.6))
  seen = defaultdict(int)
  groups = _variant_groups(rows)
  order = {m: i for i, m in enumerate(_method_order(rows))}
  for name, members in sorted(groups.items(), key=lambda kv: order[kv[1][0]['method']]):
    method = members[0]['method']
    style = method_style(method)
    vals = np.array([[np.nan if m.get(c) is None else m[c] for c in layers] for m in members],
                    float)
    std = np.nanstd(vals, 0, ddof=1) if len(members) > 1 else np.zeros(len(layers))
    x = np.arange(1, len(layers) + 1) + 0.04 * (order[method] - len(order) / 2)
    ax.errorbar(x, np.nanmean(vals, 0), yerr=std, marker=style.marker, color=style.color,
                linestyle=_VARIANT_LINES[seen[method] % len(_VARIANT_LINES)], capsize=3,
                markerfacecolor='none', label=_variant_label(name, method))
    seen[method] += 1
  ax.set_xticks(np.arange(1, len(layers) + 1))
  ax.set_xlabel('hidden layer (conv layers first)')
  ax.set_ylabel('mean max correlation')
  ax.set_title('Student specialization per layer on the test set, mean +- sample std over '
               'seeds')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, out_png)


def _accuracy_title(column: str, norm: Optional[str]) -> str:
  """``robust_acc_oracle_0.1`` -> ``'oracle robust accuracy, L-inf budget 0.1'``."""
  if column.startswith('robust_acc_'):
    label, eps = column[len('robust_acc_'):].split('_', 1)
    return f'{label} robust accuracy, {budget_text(eps, norm)}'
  return column


def plot_spec_vs_accuracy(results_csv: str, out_png: str, accuracy_columns: Sequence[str],
                          spec_column: str = 'spec_mean', norm: Optional[str] = None) -> None:
  """Scatter of ``spec_column`` vs each of ``accuracy_columns``, one point per student.

  One panel per accuracy column, one colour and marker per method.

  Args:
    results_csv: a ``results.csv`` with ``method`` and the named columns.
    out_png: the figure's path (written atomically).
    accuracy_columns: e.g. ``['robust_acc_oracle_0.1']`` (the attack ensemble's).
    spec_column: the specialization on the x axis.
    norm: the attack norm for the titles; default: the ``attack_norm`` of the
      ``results.json`` beside ``results_csv``.
  """
  plt = _pyplot()
  rows = io.read_csv(results_csv)
  norm = norm or _norm_of(results_csv)
  methods = _method_order(rows)
  fig, axes = plt.subplots(1, len(accuracy_columns), figsize=(5.5 * len(accuracy_columns) + 2.5,
                                                              4.8), squeeze=False)
  for ax, column in zip(axes[0], accuracy_columns):
    drawn = {}
    for method in methods:
      pts = [(m[spec_column], m[column]) for m in rows if m['method'] == method
             and m.get(spec_column) is not None and m.get(column) is not None]
      if pts:
        _scatter(ax, *zip(*pts), method, _legend_label(method, len(pts)))
        drawn[method] = pts
    _label_stacks(ax, drawn)
    ax.set_xlabel(f'{spec_column} (mean max correlation)')
    ax.set_ylabel(_accuracy_title(column, norm))
    ax.set_title(_accuracy_title(column, norm) + '\n(attack ensemble, worst case per point)')
    ax.set_ylim(-0.05, 1.07)
    ax.grid(alpha=0.3)
  ncol = min(3, 2 * len(accuracy_columns))
  rows_ = -(-len(methods) // ncol)
  fig.legend(*axes[0][0].get_legend_handles_labels(), loc='lower center', ncol=ncol,
             fontsize=8, frameon=False)
  fig.suptitle(f'Specialization ({spec_column}) vs robustness: one point per student')
  fig.tight_layout(rect=(0, 0.03 + 0.045 * rows_, 1, 1))
  _save(fig, out_png)
