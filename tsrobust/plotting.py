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
