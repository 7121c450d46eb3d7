"""Result files, written atomically (temporary file in the same folder, fsync, rename).

A reader never sees a partial file: it sees the old file or the new one. Files are
readable by others as any new file is (``-rw-r--r--`` under the usual umask 022).
Missing values (``None`` or NaN) are written as empty CSV cells and JSON
``null`` - never as 0.
"""

import csv
import io as _io
import json
import math
import os
import platform
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ['file_mode', 'atomic_write_bytes', 'atomic_write_text', 'to_plain',
           'write_json', 'write_csv', 'read_csv', 'cpu_model', 'library_versions',
           'save_pytree', 'columns_with_prefix', 'markdown_summary']


def file_mode() -> int:
  """The mode ``open()`` gives a new file: ``0o666`` less the process's umask (``0o644``
  under the usual umask 022). Read without changing the umask (``/proc/self/status``);
  022 where that is not available.

  >>> oct(file_mode() & 0o600)  # the owner can always read and write
  '0o600'
  """
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return 0o666 & ~int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  return 0o644


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically, readable as any new file is (``file_mode``:
  ``-rw-r--r--`` under the usual umask, not ``mkstemp``'s private ``-rw-------``).

  >>> import os, tempfile
  >>> path = os.path.join(tempfile.mkdtemp(), 'a.txt')
  >>> atomic_write_bytes(path, b'x')
  >>> open(path, 'rb').read(), oct(os.stat(path).st_mode & 0o777) == oct(file_mode())
  (b'x', True)
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp')
  try:
    os.fchmod(fd, file_mode())
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  atomic_write_bytes(path, text.encode('utf-8'))


def to_plain(value: Any) -> Any:
  """JSON-ready copy: numpy/JAX scalars and arrays to Python, NaN/inf to None.

  >>> to_plain({'a': np.float32(0.5), 'b': (1, float('nan')), 'c': np.arange(2)})
  {'a': 0.5, 'b': [1, None], 'c': [0, 1]}
  """
  if isinstance(value, Mapping):
    return {str(k): to_plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_plain(v) for v in value]
  if hasattr(value, 'tolist') and not isinstance(value, (str, bytes)):
    return to_plain(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON (strict: NaN and infinities become ``null``)."""
  atomic_write_text(path, json.dumps(to_plain(obj), indent=2, allow_nan=False) + '\n')


def _cell(value: Any) -> str:
  value = to_plain(value)
  if value is None:
    return ''
  if isinstance(value, float):
    return repr(value)
  return str(value)


def write_csv(path: str, records: Sequence[Mapping[str, Any]],
              columns: Optional[Sequence[str]] = None) -> None:
  """Atomic CSV, one row per record; columns default to first-seen key order.

  >>> import os, tempfile
  >>> path = os.path.join(tempfile.mkdtemp(), 'results.csv')
  >>> write_csv(path, [{'rank': 5, 'spec_off': 0.5}, {'rank': 40, 'spec_off': None}])
  >>> open(path).read().splitlines()  # an empty cell for None, never 0
  ['rank,spec_off', '5,0.5', '40,']
  >>> read_csv(path)
  [{'rank': 5.0, 'spec_off': 0.5}, {'rank': 40.0, 'spec_off': None}]
  """
  if columns is None:
    columns = []
    for r in records:
      columns.extend(k for k in r if k not in columns)
  buf = _io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(columns)
  for r in records:
    w.writerow([_cell(r.get(c)) for c in columns])
  atomic_write_text(path, buf.getvalue())


def read_csv(path: str) -> List[Dict[str, Optional[float]]]:
  """Reads a results CSV: numeric cells as float, empty cells as None, others as str."""
  rows = []
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      parsed = {}
      for k, v in row.items():
        if v == '':
          parsed[k] = None
        else:
          try:
            parsed[k] = float(v)
          except ValueError:
            parsed[k] = v
      rows.append(parsed)
  return rows


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or 'unknown'


def library_versions() -> Dict[str, str]:
  """Versions of the numerical stack, for embedding in result files."""
  import chex
  import flax
  import jax
  import optax
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': getattr(__import__('jaxlib'), '__version__', 'unknown'),
          'flax': flax.__version__, 'optax': optax.__version__, 'chex': chex.__version__,
          'numpy': np.__version__, 'backend': jax.default_backend()}


def save_pytree(path: str, tree: Any) -> None:
  """Saves a pytree of arrays atomically (flax msgpack serialization)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  atomic_write_bytes(path, serialization.msgpack_serialize(
      serialization.to_state_dict(tree)))


def columns_with_prefix(records: Iterable[Mapping[str, Any]], prefix: str) -> List[str]:
  """Columns of ``records`` starting with ``prefix``, in first-seen order.

  >>> columns_with_prefix([{'seed': 0, 'adv_in': 0.1, 'adv_off': 0.2}], 'adv_')
  ['adv_in', 'adv_off']
  """
  out = []
  for r in records:
    out.extend(k for k in r if k.startswith(prefix) and k not in out)
  return out


def markdown_summary(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str],
                     columns: Sequence[str], digits: int = 3) -> str:
  """A markdown table: mean +- sample std (ddof=1) over the rows of each group, per column.

  Missing values (None / NaN) are ignored; a group with none shows ``-``, and
  a group with one value shows ``value +- -`` (no spread from one value).
  Groups appear in first-seen order.

  >>> rows = [{'rank': 5, 'spec_off': 0.4}, {'rank': 5, 'spec_off': 0.6},
  ...         {'rank': 40, 'spec_off': None}]
  >>> print(markdown_summary(rows, ['rank'], ['spec_off']))
  | rank | n | spec_off |
  |---|---|---|
  | 5 | 2 | 0.500 +- 0.141 |
  | 40 | 1 | - |
  <BLANKLINE>
  """
  groups: Dict[tuple, List[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault(tuple(r.get(g) for g in group_by), []).append(r)
  header = list(group_by) + ['n'] + list(columns)
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for key, members in groups.items():
    cells = [_group_cell(k) for k in key] + [str(len(members))]
    for c in columns:
      vals = [float(m[c]) for m in members
              if m.get(c) is not None and math.isfinite(float(m[c]))]
      if not vals:
        cells.append('-')
      else:
        spread = f'{np.std(vals, ddof=1):.{digits}f}' if len(vals) > 1 else '-'
        cells.append(f'{np.mean(vals):.{digits}f} +- {spread}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _group_cell(value: Any) -> str:
  if value is None:
    return '-'
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value)
