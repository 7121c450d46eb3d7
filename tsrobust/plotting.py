"""Figures drawn from result files (never from live training state)."""

import os
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np

from tsrobust import io


def _by_rank(rows, column: str) -> Tuple[List[float], List[float], List[float]]:
  """Ranks with at least one value of ``column``, and its mean and std over seeds."""
  groups: Dict[float, List[float]] = defaultdict(list)
  for row in rows:
    v = row.get(column)
    if v is not None and np.isfinite(v):
      groups[row['rank']].append(v)
  ranks = sorted(groups)
  return (ranks, [float(np.mean(groups[r])) for r in ranks],
          [float(np.std(groups[r])) for r in ranks])


def _save(fig, out_png: str) -> None:
  """Saves a figure atomically (temporary file, then rename)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tmp = os.path.join(os.path.dirname(os.path.abspath(out_png)),
                     '.' + os.path.basename(out_png) + '.tmp.png')
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, out_png)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_spec_vs_robustness(results_csv: str, out_png: str, eps: str) -> None:
  """Scatter of specialization (in / off subspace) vs oracle robust accuracy.

  One point per student, one color per method; robust accuracy is
  ``1 - adv_oracle_full_{eps}``.
  """
  plt = _pyplot()
  rows = io.read_csv(results_csv)
  methods = list(dict.fromkeys(r['method'] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, column, title in ((axes[0], 'spec_in', 'in-subspace specialization'),
                            (axes[1], 'spec_off', 'off-subspace specialization')):
    for method in methods:
      pts = [(r[column], 1.0 - r[f'adv_oracle_full_{eps}']) for r in rows
             if r['method'] == method and r.get(column) is not None]
      if pts:
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, label=method, alpha=0.7, s=18)
    ax.set_xlabel(title + ' (mean max correlation)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f'oracle robust accuracy, budget {eps}')
  axes[1].legend()
  fig.suptitle('Specialization vs robustness: one point per student')
  fig.tight_layout()
  _save(fig, out_png)


def plot_lowrank(results_csv: str, out_png: str, eps: str) -> None:
  """Specialization and oracle adversarial error against rank, in vs off subspace.

  Args:
    results_csv: a ``results.csv`` written by ``experiments/lowrank.py``.
    out_png: the figure's path (written atomically).
    eps: the budget to plot, as written in the column names.
  """
  plt = _pyplot()
  rows = io.read_csv(results_csv)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  panels = [
      (axes[0], [('spec_in', 'in-subspace'), ('spec_off', 'off-subspace probes')],
       'mean max correlation', 'Specialization'),
      (axes[1], [(f'adv_oracle_in_{eps}', 'delta in S'),
                 (f'adv_oracle_off_{eps}', 'delta in S_perp'),
                 (f'adv_oracle_full_{eps}', 'unconstrained')],
       'oracle adversarial error', f'PGD, budget {eps}'),
  ]
  for ax, series, ylabel, title in panels:
    for column, label in series:
      ranks, mean, std = _by_rank(rows, column)
      if ranks:
        ax.errorbar(ranks, mean, yerr=std, marker='o', capsize=3, label=label)
    ax.set_xlabel('rank r of the data subspace')
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle('Low-rank teacher-student: mean +- std over seeds')
  fig.tight_layout()
  _save(fig, out_png)


def _variant_groups(rows) -> Dict[str, list]:
  """Rows grouped by their ``variant`` column (or ``method``), in first-seen order."""
  groups: Dict[str, list] = {}
  for row in rows:
    groups.setdefault(str(row.get('variant') or row['method']), []).append(row)
  return groups


def plot_spec_per_layer(results_csv: str, out_png: str) -> None:
  """Specialization (mean max correlation) per layer, one line per method variant.

  Args:
    results_csv: a ``results.csv`` with ``spec_l{l}`` columns and a
      ``variant`` (or ``method``) column, e.g. from ``experiments/real.py``.
    out_png: the figure's path (written atomically). Mean +- std over seeds.
  """
  plt = _pyplot()
  rows = io.read_csv(results_csv)
  layers = sorted((c for c in rows[0] if c.startswith('spec_l')), key=lambda c: int(c[6:]))
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, members in _variant_groups(rows).items():
    vals = np.array([[np.nan if m.get(c) is None else m[c] for c in layers] for m in members],
                    float)
    ax.errorbar(np.arange(1, len(layers) + 1), np.nanmean(vals, 0), yerr=np.nanstd(vals, 0),
                marker='o', capsize=3, label=name)
  ax.set_xticks(np.arange(1, len(layers) + 1))
  ax.set_xlabel('hidden layer (conv layers first)')
  ax.set_ylabel('mean max correlation')
  ax.set_title('Student specialization per layer (test set), mean +- std over seeds')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, out_png)


def plot_spec_vs_accuracy(results_csv: str, out_png: str, accuracy_columns: List[str],
                          spec_column: str = 'spec_mean') -> None:
  """Scatter of ``spec_column`` vs each of ``accuracy_columns``, one point per student.

  One panel per accuracy column, one color per method variant.
  """
  plt = _pyplot()
  rows = io.read_csv(results_csv)
  groups = _variant_groups(rows)
  fig, axes = plt.subplots(1, len(accuracy_columns), figsize=(5 * len(accuracy_columns), 4),
                           squeeze=False)
  for ax, column in zip(axes[0], accuracy_columns):
    for name, members in groups.items():
      pts = [(m[spec_column], m[column]) for m in members
             if m.get(spec_column) is not None and m.get(column) is not None]
      if pts:
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, label=name, alpha=0.75, s=20)
    ax.set_xlabel(f'{spec_column} (mean max correlation)')
    ax.set_ylabel(column)
    ax.set_title(column)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=8)
  fig.suptitle('Specialization vs robustness: one point per student')
  fig.tight_layout()
  _save(fig, out_png)
