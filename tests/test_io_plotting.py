"""Result files (atomic, readable by others) and figures that say what they plot."""

import os
import stat

import matplotlib
import numpy as np
import pytest

from tsrobust import io
from tsrobust import plotting

matplotlib.use('Agg')


@pytest.fixture
def umask():
  """Sets the process's umask for a test (restored after it)."""
  previous = os.umask(0o022)
  os.umask(previous)
  yield lambda mask: os.umask(mask)
  os.umask(previous)


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


def _lowrank_csv(path, ranks=(5, 10, 40), seeds=3, eps='1.0'):
  rows = []
  for r in ranks:
    for s in range(seeds):
      full = r == 40
      rows.append({'rank': r, 'seed': s, 'spec_in': 1.0, 'spec_off': None if full else 0.5,
                   f'adv_oracle_in_{eps}': 0.0, f'adv_oracle_off_{eps}': None if full else 0.8,
                   f'adv_oracle_full_{eps}': 0.0 if full else 0.8 + 0.01 * s})
  io.write_csv(str(path), rows)
  return str(path)


def _methods_csv(path, methods):
  rows = [{'method': m, 'variant': f'{m} 0.5' if m == 'at' else m, 'seed': s,
           'spec_in': 1.0, 'spec_off': 0.5 + 0.1 * i, 'spec_mean': 0.8, 'spec_l1': 0.9,
           'spec_l2': 0.7, 'adv_oracle_full_1.0': 0.5, 'robust_acc_oracle_0.1': 0.4}
          for i, m in enumerate(methods) for s in range(2)]
  io.write_csv(str(path), rows)
  return str(path)


def test_result_files_are_readable_by_others(tmp_path, umask):
  """Every writer gives a new file the mode ``open()`` would: 0644 under umask 022 (not
  ``mkstemp``'s 0600), and the user's umask is respected."""
  umask(0o022)
  paths = [str(tmp_path / n) for n in ('r.csv', 'r.json', 's.md', 'p.msgpack', 'f.png')]
  io.write_csv(paths[0], [{'a': 1}])
  io.write_json(paths[1], {'a': 1})
  io.atomic_write_text(paths[2], 'text')
  io.save_pytree(paths[3], {'w': np.zeros(2)})
  plotting.plot_lowrank(_lowrank_csv(tmp_path / 'l.csv'), paths[4], eps='1.0', norm='l2')
  assert {p: oct(_mode(p)) for p in paths} == {p: oct(0o644) for p in paths}
  assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(p) for p in paths] + ['l.csv'])
  umask(0o077)
  io.write_csv(paths[0], [{'a': 2}])  # replaced: the new file's mode
  assert oct(_mode(paths[0])) == oct(0o600)


@pytest.fixture
def figures(monkeypatch):
  """The figures the plotting functions draw, kept instead of saved."""
  kept = []
  monkeypatch.setattr(plotting, '_save', lambda fig, out_png: kept.append(fig))
  return kept


def test_lowrank_figure_names_ensemble_norm_budget_and_integer_ranks(tmp_path, figures):
  plotting.plot_lowrank(_lowrank_csv(tmp_path / 'r.csv'), 'unused.png', eps='1.0', norm='l2')
  left, right = figures[0].axes
  assert 'attack ensemble' in right.get_title() and 'L2 budget 1.0' in right.get_title()
  assert 'worst case per point' in right.get_title()
  for ax in (left, right):
    assert list(ax.get_xticks()) == [5, 10, 40]  # the ranks, no 7.5
  assert '3 seeds' in figures[0]._suptitle.get_text()
  labels = [t.get_text() for t in right.get_legend().get_texts()]
  assert labels == ['delta in S', 'delta in S_perp', 'delta unconstrained']


def test_the_norm_comes_from_results_json_when_not_given(tmp_path, figures):
  csv_path = _lowrank_csv(tmp_path / 'results.csv', eps='0.1')
  io.write_json(str(tmp_path / 'results.json'), {'config': {'attack_norm': 'linf'}})
  plotting.plot_lowrank(csv_path, 'unused.png', eps='0.1')
  assert 'L-inf budget 0.1' in figures[0].axes[1].get_title()


def _scatter_styles(fig):
  """Per legend label: (edge colour as hex, marker path vertices) of its points."""
  out = {}
  for ax in fig.axes:
    for coll in ax.collections:
      color = matplotlib.colors.to_hex(coll.get_edgecolor()[0])
      out[coll.get_label()] = (color, coll.get_paths()[0].vertices.round(3).tolist())
  return out


def test_one_fixed_colour_and_marker_per_method_in_every_figure(tmp_path, figures):
  """A method keeps its colour and marker whichever methods ran and in whichever figure;
  legends spell the method out; markers are hollow (overlapping points stay visible)."""
  plotting.plot_spec_vs_robustness(_methods_csv(tmp_path / 'a.csv', ['standard', 'at', 'orth',
                                                                     'iso']),
                                   'unused.png', eps='1.0', norm='l2')
  plotting.plot_spec_vs_accuracy(_methods_csv(tmp_path / 'b.csv', ['at', 'iso']), 'unused.png',
                                 ['robust_acc_oracle_0.1'], norm='linf')
  a, b = (_scatter_styles(f) for f in figures)
  at_label = 'at: PGD adversarial training, 2 students'
  iso_label = 'iso: isotropic noise (augmentation control), 2 students'
  assert a[at_label] == b[at_label] and a[iso_label] == b[iso_label]
  assert a[at_label][0] == plotting.METHOD_STYLES['at'].color.lower()
  assert len({c for c, _ in a.values()}) == 4  # four methods, four colours
  assert len({str(v) for _, v in a.values()}) == 4  # and four markers
  for fig in figures:
    for coll in fig.axes[0].collections:
      assert not coll.get_facecolor().any()  # hollow
  assert 'oracle robust accuracy, L-inf budget 0.1' in figures[1].axes[0].get_title()
  assert 'attack ensemble' in figures[1].axes[0].get_title()
  assert 'L2 budget 1.0' in figures[0]._suptitle.get_text()


def test_coinciding_students_of_several_methods_are_labelled(tmp_path, figures):
  """Students of several methods on one point: nested markers (smaller above larger)
  and a note of how many of each method are there."""
  rows = [{'method': m, 'seed': s, 'spec_in': 1.0, 'spec_off': 1.0, 'adv_oracle_full_1.0': 0.0}
          for m, n in (('orth', 3), ('iso', 2), ('standard', 1)) for s in range(n)]
  rows.append({'method': 'at', 'seed': 0, 'spec_in': 0.5, 'spec_off': 0.5,
               'adv_oracle_full_1.0': 0.5})
  io.write_csv(str(tmp_path / 'r.csv'), rows)
  plotting.plot_spec_vs_robustness(str(tmp_path / 'r.csv'), 'unused.png', eps='1.0', norm='l2')
  ax = figures[0].axes[0]
  notes = [t.get_text() for t in ax.texts]
  assert notes == ['here: orth 3, iso 2, standard 1']
  order = {c.get_label().split(':')[0]: c.get_zorder() for c in ax.collections}
  assert order['iso'] > order['standard'] > order['orth']  # the smallest marker on top


def test_per_layer_lines_keep_the_method_style(tmp_path, figures):
  plotting.plot_spec_per_layer(_methods_csv(tmp_path / 'c.csv', ['standard', 'at']),
                               'unused.png')
  handles, labels = figures[0].axes[0].get_legend_handles_labels()
  assert labels == ['standard: standard training', 'at 0.5: PGD adversarial training']
  line = handles[1].lines[0]  # the errorbar's data line
  assert matplotlib.colors.to_hex(line.get_color()) == plotting.METHOD_STYLES['at'].color.lower()
  assert line.get_marker() == plotting.METHOD_STYLES['at'].marker
  assert list(figures[0].axes[0].get_xticks()) == [1, 2]

