"""benchmarks/memory.py: the measurement runs, and memory follows the data, not S x data."""

import jax
import pytest

from benchmarks import memory

STUDENT_PARAMS = (3 * 3 * 1 * 16 + 16) + (3 * 3 * 16 * 32 + 32) + (7 * 7 * 32 * 64 + 64) + (
    64 * 10 + 10)  # the default student: conv 16, 32 (3x3, max pool), dense 64, 10 outputs


def _check_record(r, seeds, n):
  assert r['seeds'] == seeds and r['num_train'] == n and r['devices'] == len(jax.devices())
  assert r['data_mb'] * memory.MB == n * 28 * 28 * 4
  assert r['params_mb'] * memory.MB == seeds * STUDENT_PARAMS * 4
  assert r['state_mb'] > 3 * r['params_mb']  # parameters and Adam's two moments
  assert r['copies_mb'] == pytest.approx(seeds * r['data_mb'])
  assert r['bound_mb'] == pytest.approx(r['devices'] * r['data_mb'] + r['state_mb'])
  assert r['baseline_mb'] > 0 and r['peak_mb'] >= r['baseline_mb']
  assert r['final_loss'] > 0  # it trained, to a finite loss
  if r['peak_reset']:
    # The images were resident: the data phase's peak over the memory just before it (the
    # rise over the baseline can be less where the test worker freed memory in between).
    assert r['data_rise_mb'] >= 0.9 * r['data_mb']


def test_measure_reports_its_arrays():
  seeds, n = 2 * len(jax.devices()), 10000  # 30 MiB of images
  record = memory.measure(seeds, n, 2)
  _check_record(record, seeds, n)
  text = memory.line(record)
  assert text.startswith(f'S={seeds} N={n} 2 steps') and 'peak RSS' in text


@pytest.mark.slow
def test_peak_rss_follows_the_data_not_its_copies():
  devices = len(jax.devices())
  n = 20000  # 61 MiB of images
  small = memory.measure(2 * devices, n, 2)
  large = memory.measure(8 * devices, n, 2)
  _check_record(small, 2 * devices, n)
  _check_record(large, 8 * devices, n)
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
