"""Dataset loaders on small files written in the exact IDX / CIFAR-10 binary formats."""

import gzip
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsrobust import datasets


def _idx_bytes(array: np.ndarray) -> bytes:
  """The IDX encoding of a uint8 array: magic 0x0000 08 ndim, big-endian sizes, data."""
  header = bytes([0, 0, 0x08, array.ndim])
  header += b''.join(int(s).to_bytes(4, 'big') for s in array.shape)
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write(path: str, data: bytes, gz: bool = False) -> str:
  if gz:
    path += '.gz'
    data = gzip.compress(data)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def _mnist_dir(tmp_path, n_train=5, n_test=3, gz_test=True, seed=0):
  """Four MNIST IDX files (train raw, test gzipped by default); returns the arrays too."""
  rng = np.random.default_rng(seed)
  arrays = {
      'train-images-idx3-ubyte': rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      'train-labels-idx1-ubyte': rng.integers(0, 10, (n_train,), dtype=np.uint8),
      't10k-images-idx3-ubyte': rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      't10k-labels-idx1-ubyte': rng.integers(0, 10, (n_test,), dtype=np.uint8),
  }
  for name, arr in arrays.items():
    _write(str(tmp_path / name), _idx_bytes(arr), gz=gz_test and name.startswith('t10k'))
  return str(tmp_path), arrays


class TestMnistIdx:

  def test_loads_raw_and_gz(self, tmp_path):
    data_dir, arrays = _mnist_dir(tmp_path)
    ds = datasets.load_mnist(data_dir)
    assert ds.train_x.shape == (5, 28, 28, 1) and ds.test_x.shape == (3, 28, 28, 1)
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
    np.testing.assert_allclose(ds.train_x[..., 0], arrays['train-images-idx3-ubyte'] / 255.0,
                               rtol=1e-6)
    np.testing.assert_allclose(ds.test_x[..., 0], arrays['t10k-images-idx3-ubyte'] / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(ds.train_y, arrays['train-labels-idx1-ubyte'])
    np.testing.assert_array_equal(ds.test_y, arrays['t10k-labels-idx1-ubyte'])
    assert ds.image_shape == (28, 28, 1)
    assert datasets.load('mnist', data_dir).train_x.shape == (5, 28, 28, 1)

  def test_read_idx_header_known_answer(self, tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = _write(str(tmp_path / 'x'), _idx_bytes(arr))
    with open(path, 'rb') as f:
      assert f.read(8) == bytes([0, 0, 8, 3, 0, 0, 0, 2])
    np.testing.assert_array_equal(datasets.read_idx(path, 0x0803), arr)

  def test_missing_file(self, tmp_path):
    data_dir, _ = _mnist_dir(tmp_path)
    os.remove(os.path.join(data_dir, 't10k-labels-idx1-ubyte.gz'))
    with pytest.raises(ValueError, match=r'missing file.*t10k-labels-idx1-ubyte.*\.gz'):
      datasets.load_mnist(data_dir)
    with pytest.raises(ValueError, match='not a directory'):
      datasets.load_mnist(os.path.join(data_dir, 'nope'))

  @pytest.mark.parametrize('gz', [False, True])
  def test_truncated_images(self, tmp_path, gz):
    data_dir, arrays = _mnist_dir(tmp_path, gz_test=False)
    path = os.path.join(data_dir, 'train-images-idx3-ubyte')
    os.remove(path)
    _write(path, _idx_bytes(arrays['train-images-idx3-ubyte'])[:-100], gz=gz)
    with pytest.raises(ValueError, match=r'train-images-idx3-ubyte.*truncated.*3920 data '
                                         r'bytes.*found 3820'):
      datasets.load_mnist(data_dir)

  def test_too_long(self, tmp_path):
    data_dir, arrays = _mnist_dir(tmp_path, gz_test=False)
    _write(os.path.join(data_dir, 'train-labels-idx1-ubyte'),
           _idx_bytes(arrays['train-labels-idx1-ubyte']) + b'\x00')
    with pytest.raises(ValueError, match='train-labels-idx1-ubyte: too long'):
      datasets.load_mnist(data_dir)

  def test_wrong_magic(self, tmp_path):
    data_dir, arrays = _mnist_dir(tmp_path, gz_test=False)
    # A labels file where the images file should be: magic 2049 instead of 2051.
    _write(os.path.join(data_dir, 't10k-images-idx3-ubyte'),
           _idx_bytes(arrays['t10k-labels-idx1-ubyte']))
    with pytest.raises(ValueError, match=r't10k-images-idx3-ubyte: wrong magic number 2049.*'
                                         r'expected 2051'):
      datasets.load_mnist(data_dir)

  def test_corrupt_gzip(self, tmp_path):
    data_dir, arrays = _mnist_dir(tmp_path)
    path = os.path.join(data_dir, 't10k-images-idx3-ubyte.gz')
    with open(path, 'rb') as f:
      raw = f.read()
    with open(path, 'wb') as f:
      f.write(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match='t10k-images-idx3-ubyte.gz: not a valid gzip'):
      datasets.load_mnist(data_dir)

  def test_wrong_sizes(self, tmp_path):
    data_dir, arrays = _mnist_dir(tmp_path, gz_test=False)
    _write(os.path.join(data_dir, 'train-labels-idx1-ubyte'),
           _idx_bytes(arrays['train-labels-idx1-ubyte'][:4]))
    with pytest.raises(ValueError, match=r'holds 5 images but .*train-labels-idx1-ubyte holds 4 '
                                         r'labels'):
      datasets.load_mnist(data_dir)
    (tmp_path / 'b').mkdir()
    data_dir2, _ = _mnist_dir(tmp_path / 'b', gz_test=False)
    _write(os.path.join(data_dir2, 'train-images-idx3-ubyte'),
           _idx_bytes(np.zeros((5, 27, 28), np.uint8)))
    with pytest.raises(ValueError, match='expected 28 x 28 images'):
      datasets.load_mnist(data_dir2)

  def test_bad_label(self, tmp_path):
    data_dir, _ = _mnist_dir(tmp_path, gz_test=False)
    _write(os.path.join(data_dir, 'train-labels-idx1-ubyte'),
           _idx_bytes(np.array([0, 1, 2, 3, 12], np.uint8)))
    with pytest.raises(ValueError, match=r'labels must be in \[0, 9\], found 12'):
      datasets.load_mnist(data_dir)


class TestFashionMnist:
  """Fashion-MNIST: the MNIST IDX format under its own name, by default in the Debian folder."""

  def test_named_from_the_loader(self, tmp_path):
    data_dir, arrays = _mnist_dir(tmp_path)
    ds = datasets.load_fashion_mnist(data_dir)
    assert ds.name == 'fashion_mnist' and ds.train_x.shape == (5, 28, 28, 1)
    np.testing.assert_allclose(ds.test_x[..., 0], arrays['t10k-images-idx3-ubyte'] / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(ds.train_y, arrays['train-labels-idx1-ubyte'])
    # The same files read by name: the name follows the dataset asked for.
    assert datasets.load('fashion_mnist', data_dir).name == 'fashion_mnist'
    assert datasets.load('mnist', data_dir).name == 'mnist'
    assert datasets.IMAGE_SHAPES['fashion_mnist'] == ds.image_shape

  def test_default_folder(self, tmp_path, monkeypatch):
    data_dir, arrays = _mnist_dir(tmp_path, n_train=7)
    monkeypatch.setattr(datasets, 'FASHION_MNIST_DIR', data_dir)
    ds = datasets.load('fashion_mnist')  # no data_dir: the (here patched) Debian folder
    assert ds.name == 'fashion_mnist' and ds.train_x.shape == (7, 28, 28, 1)
    np.testing.assert_array_equal(ds.test_y, arrays['t10k-labels-idx1-ubyte'])
    assert datasets.default_data_dir('fashion_mnist') == data_dir
    assert datasets.default_data_dir('mnist') is None

  def test_missing_folder_says_how_to_install(self, tmp_path, monkeypatch):
    absent = str(tmp_path / 'absent')
    with pytest.raises(ValueError, match=r"data_dir '.*absent' does not exist or is not a folder; "
                                         r'install Fashion-MNIST with: apt-get install '
                                         r'dataset-fashion-mnist'):
      datasets.load_fashion_mnist(absent)
    monkeypatch.setattr(datasets, 'FASHION_MNIST_DIR', absent)
    with pytest.raises(ValueError, match='apt-get install dataset-fashion-mnist'):
      datasets.load('fashion_mnist')

  def test_missing_files_listed(self, tmp_path):
    data_dir, _ = _mnist_dir(tmp_path)
    os.remove(os.path.join(data_dir, 'train-labels-idx1-ubyte'))
    os.remove(os.path.join(data_dir, 't10k-images-idx3-ubyte.gz'))
    assert datasets.missing_files('fashion_mnist', data_dir) == [
        'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte']
    with pytest.raises(ValueError, match=r"config.data_dir '.*' lacks the fashion_mnist files "
                                         r"\['train-labels-idx1-ubyte', 't10k-images-idx3-ubyte'\] "
                                         r'\(raw or .gz\); install Fashion-MNIST with: apt-get'):
      datasets.check_data_dir('fashion_mnist', data_dir, field='config.data_dir')
    with pytest.raises(ValueError, match=r"lacks the mnist files \['train-labels-idx1-ubyte', "
                                         r"'t10k-images-idx3-ubyte'\] \(raw or .gz\)$"):
      datasets.check_data_dir('mnist', data_dir)  # no install hint for MNIST

  def test_check_data_dir_other_datasets(self, tmp_path):
    datasets.check_data_dir('mnist', '')  # the bundled subset needs no folder
    with pytest.raises(ValueError, match='cifar10 needs a data_dir'):
      datasets.check_data_dir('cifar10', None)
    _cifar_dir(str(tmp_path), records=1)
    datasets.check_data_dir('cifar10', str(tmp_path))
    os.remove(os.path.join(str(tmp_path), 'test_batch.bin'))
    assert datasets.missing_files('cifar10', str(tmp_path)) == ['test_batch.bin']
    with pytest.raises(ValueError, match='dataset must be one of'):
      datasets.check_data_dir('svhn', str(tmp_path))


def _cifar_records(labels, rng):
  """Raw records (label byte + R, G, B planes) and the NHWC images they encode."""
  planes = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
  rows = np.concatenate([np.asarray(labels, np.uint8)[:, None], planes.reshape(len(labels), -1)],
                        axis=1)
  return rows.tobytes(), planes.transpose(0, 2, 3, 1)


def _cifar_dir(folder, records=3, seed=0):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  images, labels = {}, {}
  for name in datasets.CIFAR10_TRAIN_FILES + (datasets.CIFAR10_TEST_FILE,):
    lab = rng.integers(0, 10, records)
    raw, img = _cifar_records(lab, rng)
    _write(os.path.join(folder, name), raw)
    images[name], labels[name] = img, lab
  return images, labels


class TestCifar10:

  def test_loads_channels_in_order(self, tmp_path):
    images, labels = _cifar_dir(str(tmp_path))
    ds = datasets.load_cifar10(str(tmp_path), records=3)
    assert ds.train_x.shape == (15, 32, 32, 3) and ds.test_x.shape == (3, 32, 32, 3)
    assert ds.train_x.dtype == np.float32
    expected = np.concatenate([images[n] for n in datasets.CIFAR10_TRAIN_FILES]) / 255.0
    np.testing.assert_allclose(ds.train_x, expected, rtol=1e-6)
    np.testing.assert_array_equal(
        ds.train_y, np.concatenate([labels[n] for n in datasets.CIFAR10_TRAIN_FILES]))
    np.testing.assert_allclose(ds.test_x, images['test_batch.bin'] / 255.0, rtol=1e-6)

  def test_known_pixel_layout(self, tmp_path):
    # One record: label 7, red plane all 10, green 20, blue pixel (row 1, col 2) = 255.
    planes = np.zeros((3, 32, 32), np.uint8)
    planes[0] = 10
    planes[1] = 20
    planes[2, 1, 2] = 255
    path = _write(str(tmp_path / 'one.bin'), bytes([7]) + planes.tobytes())
    x, y = datasets.read_cifar10_bin(path, records=1)
    assert y.tolist() == [7]
    np.testing.assert_allclose(x[0, :, :, 0], 10 / 255.0)
    np.testing.assert_allclose(x[0, :, :, 1], 20 / 255.0)
    assert x[0, 1, 2, 2] == 1.0 and x[0, 2, 1, 2] == 0.0

  def test_nested_folder(self, tmp_path):
    _cifar_dir(str(tmp_path / 'cifar-10-batches-bin'))
    assert datasets.load_cifar10(str(tmp_path), records=3).train_x.shape[0] == 15

  def test_truncated(self, tmp_path):
    _cifar_dir(str(tmp_path))
    path = os.path.join(str(tmp_path), 'data_batch_3.bin')
    with open(path, 'rb') as f:
      raw = f.read()
    _write(path, raw[:-10])
    with pytest.raises(ValueError, match=r'data_batch_3.bin: 9209 bytes, expected 9219 '
                                         r'\(3 records'):
      datasets.load_cifar10(str(tmp_path), records=3)
    with pytest.raises(ValueError, match='expected a positive multiple of 3073'):
      datasets.load_cifar10(str(tmp_path), records=None)

  def test_distribution_size_expected_by_default(self, tmp_path):
    _cifar_dir(str(tmp_path))
    with pytest.raises(ValueError, match=r'data_batch_1.bin: 9219 bytes, expected 30730000 '
                                         r'\(10000 records'):
      datasets.load_cifar10(str(tmp_path))

  def test_missing_and_bad_label(self, tmp_path):
    _cifar_dir(str(tmp_path))
    os.remove(os.path.join(str(tmp_path), 'test_batch.bin'))
    with pytest.raises(ValueError, match='missing file: .*test_batch.bin'):
      datasets.load_cifar10(str(tmp_path), records=3)
    raw, _ = _cifar_records([1, 11], np.random.default_rng(0))
    path = _write(str(tmp_path / 'bad.bin'), raw)
    with pytest.raises(ValueError, match=r'bad.bin: record 1 has label 11'):
      datasets.read_cifar10_bin(path, records=2)
    with pytest.raises(ValueError, match='cifar10 needs a data_dir'):
      datasets.load('cifar10')
    with pytest.raises(ValueError, match='dataset must be one of'):
      datasets.load('svhn')


class TestBundled:

  @pytest.mark.slow  # decodes the 5000 bundled images
  def test_shapes_dtype_range_split(self):
    ds = datasets.load_mnist_bundled()
    assert ds.train_x.shape == (4000, 28, 28, 1) and ds.test_x.shape == (1000, 28, 28, 1)
    assert ds.train_x.dtype == np.float32 and ds.test_y.dtype == np.int32
    for x in (ds.train_x, ds.test_x):
      assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(ds.train_y), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(ds.test_y), np.full(10, 100))
    assert ds.name == 'mnist-bundled'
    # The split is fixed: disjoint, covering, and the same on every call.
    x_all, y_all = datasets._bundled_arrays()
    tr, te = datasets.bundled_split(y_all)
    assert len(set(tr) | set(te)) == 5000 and not set(tr) & set(te)
    np.testing.assert_array_equal(ds.test_x, x_all[te])
    np.testing.assert_array_equal(datasets.load_mnist_bundled().train_y, ds.train_y)
    small = datasets.take(ds, 10, 20)
    assert small.train_x.shape[0] == 10 and small.test_x.shape[0] == 20
    with pytest.raises(ValueError, match=r'num_train must be in \[0, 4000\]'):
      datasets.take(ds, 4001)


class TestPCA(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_recovers_a_low_rank_affine_set(self):
    key = jax.random.PRNGKey(0)
    basis = jnp.linalg.qr(jax.random.normal(key, (12, 3)))[0]
    mean = 0.5 * jnp.ones(12)
    x = (mean + jax.random.normal(jax.random.PRNGKey(1), (200, 3)) @ basis.T).reshape(
        200, 2, 2, 3)
    pca = self.variant(lambda v: datasets.fit_pca(v, 3))(x)
    chex.assert_shape([pca.mean, pca.basis, pca.projector], [(12,), (12, 3), (12, 12)])
    np.testing.assert_allclose(pca.projector, basis @ basis.T, atol=1e-4)
    np.testing.assert_allclose(pca.projector @ pca.projector, pca.projector, atol=1e-5)
    np.testing.assert_allclose(float(pca.explained), 1.0, atol=1e-5)
    # Data already in m + S is unchanged; anything maps into m + S.
    np.testing.assert_allclose(self.variant(datasets.project_pca)(x, pca), x, atol=1e-4)
    y = jax.random.uniform(jax.random.PRNGKey(2), (5, 2, 2, 3))
    yp = datasets.project_pca(y, pca).reshape(5, -1) - pca.mean
    np.testing.assert_allclose(yp @ pca.projector, yp, atol=1e-5)

  def test_lowrank_dataset(self):
    rng = np.random.default_rng(0)
    ds = datasets.Dataset(rng.uniform(size=(30, 4, 4, 1)).astype(np.float32),
                          np.zeros(30, np.int32),
                          rng.uniform(size=(10, 4, 4, 1)).astype(np.float32),
                          np.zeros(10, np.int32), 'toy')
    low, pca = datasets.lowrank(ds, 5)
    assert low.train_x.shape == (30, 4, 4, 1) and low.name == 'toy-pca5'
    np.testing.assert_allclose(np.trace(np.asarray(pca.projector)), 5.0, atol=1e-4)
    with pytest.raises(ValueError, match='rank must satisfy 1 <= rank <= D = 16, got 17'):
      datasets.fit_pca(ds.train_x, 17)
