"""The image binary on Fashion-MNIST: the preset, its folder check, the data's name.

Every test writes its own small IDX files (the real data is not needed).
"""

import gzip
import os

from absl import flags
import numpy as np
import pytest

from experiments import cli
from experiments import real
from experiments import validation
from experiments.configs import real as real_config
from tsrobust import datasets


def _idx_folder(folder, n_train=40, n_test=20, seed=0):
  """The four gzipped IDX files of a tiny MNIST-format dataset (as the Debian package has)."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {'train-images-idx3-ubyte': rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            'train-labels-idx1-ubyte': rng.integers(0, 10, (n_train,), dtype=np.uint8),
            't10k-images-idx3-ubyte': rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            't10k-labels-idx1-ubyte': rng.integers(0, 10, (n_test,), dtype=np.uint8)}
  for name, arr in arrays.items():
    header = bytes([0, 0, 8, arr.ndim]) + b''.join(int(s).to_bytes(4, 'big') for s in arr.shape)
    with open(os.path.join(folder, name + '.gz'), 'wb') as f:
      f.write(gzip.compress(header + arr.tobytes()))
  return str(folder), arrays


def test_preset_fields():
  c = real_config.get_config('fashion_mnist')
  assert c.dataset == 'fashion_mnist' and c.data_dir == datasets.FASHION_MNIST_DIR
  assert c.data_dir == '/usr/share/datasets/fashion-mnist'  # where the Debian package puts it
  assert c.num_train == 0 and c.num_test == 0  # every training and test image
  assert c.lowrank_rank == 30 and c.attack_norm == 'l2'
  assert {'standard', 'at', 'orth', 'iso'} == set(c.methods)
  assert 'fashion_mnist' in real_config.PRESETS


def test_preset_validates_with_the_files(tmp_path):
  data_dir, _ = _idx_folder(tmp_path / 'fm')
  c = real_config.get_config('fashion_mnist')
  # The preset reads the Debian package's folder unless told otherwise, the data named as such.
  assert (c.dataset, c.data_dir) == ('fashion_mnist', datasets.FASHION_MNIST_DIR)
  assert c.num_train == 0 and c.num_test == 0  # the full training and test sets
  c.data_dir = data_dir
  assert real.validate_config(c) is None


@pytest.mark.parametrize('make, message', [
    (lambda p: str(p / 'absent'), "config.data_dir '.*absent' does not exist or is not a folder"),
    (lambda p: str(p), r"config.data_dir '.*' lacks the fashion_mnist files \['train-images"),
])
def test_missing_data_names_the_install_line(tmp_path, make, message):
  c = real_config.get_config('fashion_mnist')
  c.data_dir = make(tmp_path)
  with pytest.raises(validation.ConfigError, match=message + '.*; install Fashion-MNIST with: '
                                                         'apt-get install dataset-fashion-mnist'):
    real.validate_config(c)


def test_empty_data_dir_means_the_debian_folder(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, 'FASHION_MNIST_DIR', str(tmp_path / 'absent'))
  c = real_config.get_config()
  c.dataset, c.data_dir = 'fashion_mnist', ''
  with pytest.raises(validation.ConfigError, match="config.data_dir '.*absent' does not exist.*"
                                               'apt-get install dataset-fashion-mnist'):
    real.validate_config(c)
  data_dir, arrays = _idx_folder(tmp_path / 'absent')
  real.validate_config(c)
  c.num_test, c.eval_batch, c.num_attack = 20, 10, 4
  ds, pca, _ = real.load_data(c)
  assert ds.name == 'fashion_mnist' and pca is None and ds.train_x.shape == (40, 28, 28, 1)
  np.testing.assert_array_equal(ds.train_y, arrays['train-labels-idx1-ubyte'])


def test_load_data_names_fashion_mnist(tmp_path):
  """The binary's own loading path: the name the summary and logs print, PCA included."""
  data_dir, arrays = _idx_folder(tmp_path)
  c = real_config.get_config('fashion_mnist')
  c.update(dict(data_dir=data_dir, lowrank_rank=5, num_test=20, eval_batch=10, num_attack=4))
  ds, pca, info = real.load_data(c)
  assert ds.name == 'fashion_mnist-pca5'
  assert ds.train_x.shape == (40, 28, 28, 1) and ds.test_x.shape == (20, 28, 28, 1)
  assert pca.basis.shape == (784, 5) and 0 < info['explained'] < 1
  np.testing.assert_array_equal(ds.test_y, arrays['t10k-labels-idx1-ubyte'])


def test_cli_missing_folder_is_one_line(tmp_path, capfd):
  capfd.readouterr()
  workdir = tmp_path / 'work'
  with pytest.raises(SystemExit) as info:
    cli.run_binary(real.validate_config, real.train_and_evaluate, real._DEFAULT_CONFIG,
                   ('results.csv',),
                   argv=['real', f'--workdir={workdir}',
                            '--config=experiments/configs/real.py:fashion_mnist',
                            f'--config.data_dir={tmp_path / "absent"}'],
                      flag_values=flags.FlagValues())
  assert info.value.code == 2
  err = capfd.readouterr().err
  assert err.startswith('error: config.data_dir ') and err.count('\n') == 1
  assert 'apt-get install dataset-fashion-mnist' in err
  assert not workdir.exists()  # before any work
