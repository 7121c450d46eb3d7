"""The main job's floor times the main job's own computation (``benchmarks/main_job_floor.py``).

``rank_runner`` calls the training chunk and the evaluation directly, without
``train.train_seeds`` and the binary around them; its metrics must equal what
``experiments.lowrank`` writes for the same config, or the floor would time
something else. A tiny config, 2 ranks x 2 seeds.
"""

import numpy as np
import pytest

from benchmarks import main_job_floor
from experiments import lowrank
from tests import test_lowrank
from tests.test_benchmarks_defaults import job_of


@pytest.mark.slow
def test_floor_computes_what_the_main_job_reports(tmp_path):
  config = test_lowrank.tiny_config()
  records = lowrank.train_and_evaluate(config, str(tmp_path))
  one_rank = main_job_floor.rank_runner(job_of(config))
  checked = 0
  for r in config.ranks:
    seconds, rows = one_rank(r)
    assert len(seconds) == 3 and all(t >= 0 for t in seconds)
    mine = [rec for rec in records if rec['rank'] == r]
    assert len(mine) == config.num_seeds
    for rec, row in zip(mine, rows):
      for name, value in row.items():
        if value is None:
          assert rec[name] is None, name
        else:
          np.testing.assert_allclose(rec[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
          checked += 1
  assert checked > 2 * len(config.ranks) * 20  # spec_*, wcos_*, every adv_* column


def test_floor_refuses_a_fixed_training_set():
  config = test_lowrank.tiny_config(num_train=32)
  with pytest.raises(ValueError, match='num_train'):
    main_job_floor.rank_runner(job_of(config))
