"""Shared pieces of the experiment binaries: config checks, progress, result files."""

import numbers
import os
from typing import Any, Dict, Iterable, List, Mapping, Sequence

from absl import logging
import ml_collections
import numpy as np

from tsrobust import io


class ConfigError(ValueError):
  """An invalid config value; the message names the field and what is allowed."""


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  if field not in config:
    raise ConfigError(f'config.{field} is missing')
  return config[field]


def check_int(config, field: str, lo: int = None, hi: int = None) -> int:
  v = _get(config, field)
  if isinstance(v, bool) or not isinstance(v, numbers.Integral):
    raise ConfigError(f'config.{field} must be an integer, got {v!r}')
  if lo is not None and v < lo:
    raise ConfigError(f'config.{field} must be >= {lo}, got {v}')
  if hi is not None and v > hi:
    raise ConfigError(f'config.{field} must be <= {hi}, got {v}')
  return int(v)


def check_float(config, field: str, lo: float = None, hi: float = None,
                lo_open: bool = False) -> float:
  v = _get(config, field)
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v):
    raise ConfigError(f'config.{field} must be a finite number, got {v!r}')
  if lo is not None and (v <= lo if lo_open else v < lo):
    raise ConfigError(f'config.{field} must be {">" if lo_open else ">="} {lo}, got {v}')
  if hi is not None and v > hi:
    raise ConfigError(f'config.{field} must be <= {hi}, got {v}')
  return float(v)


def check_bool(config, field: str) -> bool:
  v = _get(config, field)
  if not isinstance(v, bool):
    raise ConfigError(f'config.{field} must be True or False, got {v!r}')
  return v


def check_choice(config, field: str, allowed: Sequence[str]) -> str:
  v = _get(config, field)
  if v not in allowed:
    raise ConfigError(f'config.{field} must be one of {tuple(allowed)}, got {v!r}')
  return v


def check_sequence(config, field: str, kind: type, lo: float = None, hi: float = None,
                   min_len: int = 1, unique: bool = False) -> tuple:
  """A non-empty tuple/list of ints (``kind=int``) or numbers in ``[lo, hi]``."""
  v = _get(config, field)
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    v = (v,)
  if not isinstance(v, (list, tuple)) or len(v) < min_len:
    raise ConfigError(f'config.{field} must be a sequence of at least {min_len} values, '
                      f'got {v!r}')
  want = numbers.Integral if kind is int else numbers.Real
  for item in v:
    if isinstance(item, bool) or not isinstance(item, want) or not np.isfinite(item):
      raise ConfigError(f'config.{field} must hold {"integers" if kind is int else "numbers"},'
                        f' got {item!r} in {v!r}')
    if lo is not None and item < lo:
      raise ConfigError(f'config.{field} values must be >= {lo}, got {item} in {v!r}')
    if hi is not None and item > hi:
      raise ConfigError(f'config.{field} values must be <= {hi}, got {item} in {v!r}')
  if unique and len(set(v)) != len(v):
    raise ConfigError(f'config.{field} values must be distinct, got {v!r}')
  return tuple(v)


def progress_logger(stage: str):
  """An ``on_chunk`` callback logging one line per chunk: steps/s and ETA."""
  def on_chunk(info: Mapping[str, float]) -> None:
    logging.info('%s: step %d/%d  loss %.3e  %.0f steps/s  ETA %.0fs', stage, info['step'],
                 info['num_steps'], info['loss'], info['steps_per_sec'], info['eta_sec'])
  return on_chunk


def eps_name(eps: Any) -> str:
  """A budget as written in the config (``1.0`` -> ``'1.0'``, ``1`` -> ``'1'``)."""
  return str(eps)


def write_results(workdir: str, config: ml_collections.ConfigDict,
                  records: List[Dict[str, Any]], columns: Iterable[str],
                  extra: Mapping[str, Any] = None) -> None:
  """``results.csv`` and ``results.json`` (config, versions, records), atomically."""
  columns = list(columns)
  io.write_csv(os.path.join(workdir, 'results.csv'), records, columns)
  payload = {'config': config.to_dict(), 'versions': io.library_versions(),
             'columns': columns, 'records': records}
  if extra:
    payload.update(extra)
  io.write_json(os.path.join(workdir, 'results.json'), payload)
