"""benchmarks/memory.py: the measurement runs, and memory follows the data, not S x data.

Each measurement runs as the script does, in a fresh process (``python -m
benchmarks.memory``): resident memory is a property of the whole process, and in a
test worker that ran other tests first, memory freed earlier but still resident
(malloc's free lists) can take the new images without the resident size rising, so
the data phase's rise measured there is less than the images (CI, 2026-12-07: 15.6 of
29.9 MiB).
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT_PARAMS = (3 * 3 * 1 * 16 + 16) + (3 * 3 * 16 * 32 + 32) + (7 * 7 * 32 * 64 + 64) + (
    64 * 10 + 10)  # the default student: conv 16, 32 (3x3, max pool), dense 64, 10 outputs


def _measure(tmp_path, seeds, n, devices):
  """The script's record for S=seeds, N=n, 2 steps on ``devices`` CPU devices."""
  path = tmp_path / f'memory_{seeds}_{n}.json'
  run = subprocess.run([sys.executable, '-m', 'benchmarks.memory', f'--seeds={seeds}',
                        f'--num_train={n}', '--steps=2', f'--cpu_devices={devices}',
                        f'--json={path}'], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  record = json.loads(path.read_text())
  assert memory.line(record) in run.stdout  # the one line it prints is the record's
  return record


def _check_record(r, seeds, n, devices):
  assert r['seeds'] == seeds and r['num_train'] == n and r['devices'] == devices
  assert r['data_mb'] * memory.MB == n * 28 * 28 * 4
  assert r['params_mb'] * memory.MB == seeds * STUDENT_PARAMS * 4
  assert r['state_mb'] > 3 * r['params_mb']  # parameters and Adam's two moments
  assert r['copies_mb'] == pytest.approx(seeds * r['data_mb'])
  assert r['bound_mb'] == pytest.approx(r['devices'] * r['data_mb'] + r['state_mb'])
  assert r['baseline_mb'] > 0 and r['peak_mb'] >= r['baseline_mb']
  assert r['final_loss'] > 0  # it trained, to a finite loss
  if r['peak_reset']:
    assert r['data_rise_mb'] >= 0.9 * r['data_mb']  # the images were resident


def test_measure_reports_its_arrays(tmp_path):
  seeds, n = 2, 10000  # 30 MiB of images
  record = _measure(tmp_path, seeds, n, 1)
  _check_record(record, seeds, n, 1)
  assert memory.line(record).startswith(f'S={seeds} N={n} 2 steps') and 'peak RSS' in (
      memory.line(record))


@pytest.mark.slow
def test_peak_rss_follows_the_data_not_its_copies(tmp_path):
  devices = 2  # one per core of this machine, as the binaries
  n = 20000  # 61 MiB of images
  small = _measure(tmp_path, 2 * devices, n, devices)
  large = _measure(tmp_path, 8 * devices, n, devices)
  _check_record(small, 2 * devices, n, devices)
  _check_record(large, 8 * devices, n, devices)
  if not (small['peak_reset'] and large['peak_reset']):
    pytest.skip('the peak RSS cannot be reset here (/proc/self/clear_refs)')
  # Six more students per device. Had each student its own copy of the images, the rise
  # would grow by 12 copies (~718 MiB). It does grow by the extra students' state and
  # their training step's activations and buffers (batch 32 of conv 16 / 32 maps, student
  # and teacher: ~5-10 MiB per student), and by the larger program's compilation: 129.5
  # MiB in a fresh clone's CI run (2026-11-27, empty compilation cache), which an earlier
  # bound of 2 x data (120 MiB) wrongly counted as copies. Half the copies' growth
  # separates the two cases.
  extra_copies_mb = large['copies_mb'] - small['copies_mb']
  assert large['rise_mb'] - small['rise_mb'] < 0.5 * extra_copies_mb
