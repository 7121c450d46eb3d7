"""Declarative config validation: one table of fields per binary, plus cross-field rules.

A binary's config is checked against a table ``{field name: Field}`` that
says, for every field, its type, range, allowed choices and whether it is a
sequence (``check_config``). A field the table does not know is an error (a
misspelled ``--config.optimiser=adam`` names the closest fields), and so is
a field of the table missing from the config. Rules that relate several
fields (``eval_batch`` divides ``num_eval``, every rank <= ``d``, ...) are
written out by each binary's ``validate_config`` after the table check.

Every failure raises ``ConfigError`` with one line that names the field and
what is allowed, e.g. ``config.momentum must be <= 0.999, got 1.5``.
"""

import dataclasses
import difflib
import numbers
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np


class ConfigError(ValueError):
  """An invalid config value; the message names the field and what is allowed."""


_KINDS = (int, float, bool, str)


@dataclasses.dataclass(frozen=True)
class Field:
  """What one config field may hold.

  Attributes:
    kind: ``int``, ``float``, ``bool`` or ``str`` (of the value, or of each item
      of a sequence).
    lo, hi: inclusive bounds of numbers (``lo`` exclusive if ``lo_open``).
    choices: the allowed strings (``kind=str``), or a function returning them when the
      field is checked (a registry that can grow, e.g. ``methods.names``); ``None``: any
      string.
    sequence: a tuple / list of ``kind`` (a single item is taken as a 1-tuple).
    min_len: the fewest items of a sequence.
    unique: a sequence's items must be distinct.
    special: values allowed besides the range, with their meaning (e.g.
      ``{-1: "the preset's"}``).
    what: how a plain string field is described in messages (e.g. ``'a path'``).
    none: the meaning of None where the field may hold it (e.g. ``"the preset's"``);
      None: it may not.
  """
  kind: type
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  choices: Optional[Union[Tuple[str, ...], Callable[[], Sequence[str]]]] = None
  sequence: bool = False
  min_len: int = 1
  unique: bool = False
  special: Tuple[Tuple[Any, str], ...] = ()
  what: str = 'a string'
  none: Optional[str] = None

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f'Field.kind must be one of {_KINDS}, got {self.kind!r}')
    if self.choices is not None and self.kind is not str:
      raise ValueError('Field.choices needs kind=str')

  def describe(self) -> str:
    """What the field may hold, in a few words (``--help``): ``'int >= 1'``,
    ``"int >= 1, or -1 (the preset's)"``, ``'one of sgd | momentum | adam'``,
    ``'floats in [0, 1], distinct'``."""
    if self.kind is str and self.choices is not None:
      text = ('names from ' if self.sequence else 'one of ') + ' | '.join(self.allowed())
    elif self.kind is str:
      text = self.what
    elif self.kind is bool:
      text = 'True | False'
    else:
      text = {int: 'int', float: 'float'}[self.kind] + ('s' if self.sequence else '')
      bound = lambda v: f'{v:g}' if isinstance(v, float) else str(v)
      if self.lo is not None and self.hi is not None:
        text += f' in {"(" if self.lo_open else "["}{bound(self.lo)}, {bound(self.hi)}]'
      elif self.lo is not None:
        text += f' {">" if self.lo_open else ">="} {bound(self.lo)}'
      elif self.hi is not None:
        text += f' <= {bound(self.hi)}'
      if self.sequence and self.min_len != 1:
        text += f', at least {self.min_len}'
      if self.unique:
        text += ', distinct'
    for value, meaning in self.special:
      text += f', or {value!r} ({meaning})'
    if self.none is not None:
      text += f', or None ({self.none})'
    return text

  def allowed(self) -> Optional[Tuple[str, ...]]:
    """The allowed strings now (``choices``, called when it is a function)."""
    return tuple(self.choices()) if callable(self.choices) else self.choices

  def check(self, name: str, value: Any) -> Any:
    """``value`` as the field holds it (a tuple for a sequence); raises ``ConfigError``."""
    if value is None and self.none is not None:
      return None
    if self.sequence:
      return self._check_sequence(name, value)
    if self.kind is str:
      return self._check_string(name, value)
    if self.kind is bool:
      if not isinstance(value, bool):
        raise ConfigError(f'config.{name} must be True or False, got {value!r}')
      return value
    if _is_number(value, self.kind) and value in dict(self.special):
      return self.kind(value)
    if not _is_number(value, self.kind):
      raise ConfigError(f'config.{name} must be {_a_number(self.kind)}, got {value!r}')
    problem = self._range_problem(value)
    if problem:
      special = self.special + ((None, self.none),) if self.none is not None else self.special
      if special:
        allowed = ', '.join(f'{v!r} ({meaning})' for v, meaning in special)
        raise ConfigError(f'config.{name} must be {allowed} or {problem}, got {value!r}')
      raise ConfigError(f'config.{name} must be {problem}, got {value!r}')
    return self.kind(value)

  def _range_problem(self, v) -> Optional[str]:
    """The violated bound of ``v`` as ``'>= 0'``, or None."""
    if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
      return f'{">" if self.lo_open else ">="} {self.lo}'
    if self.hi is not None and v > self.hi:
      return f'<= {self.hi}'
    return None

  def _check_string(self, name: str, value: Any) -> str:
    if self.choices is None:
      if not isinstance(value, str):
        raise ConfigError(f'config.{name} must be {self.what}, got {value!r}')
      return value
    choices = self.allowed()
    if not isinstance(value, str) or value not in choices:
      raise ConfigError(f'config.{name} must be one of {choices}, got {value!r}'
                        + _did_you_mean(value, choices))
    return value

  def _check_sequence(self, name: str, value: Any) -> tuple:
    if self.kind is str:  # distinct names from ``choices``
      choices = self.allowed()
      items = (value,) if isinstance(value, str) else value
      listed = items if isinstance(items, (list, tuple)) else None
      bad = [x for x in listed or () if not isinstance(x, str) or x not in choices]
      if listed is None or len(listed) < self.min_len or bad or len(set(listed)) != len(listed):
        hint = _did_you_mean(bad[0], choices) if bad else ''
        raise ConfigError(f'config.{name} must be distinct names from {choices}, '
                          f'got {value!r}{hint}')
      return tuple(items)
    items = (value,) if _is_number(value, float) else value
    if not isinstance(items, (list, tuple)) or len(items) < self.min_len:
      raise ConfigError(f'config.{name} must be a sequence of at least {self.min_len} values, '
                        f'got {value!r}')
    for item in items:
      if not _is_number(item, self.kind):
        raise ConfigError(f'config.{name} must hold {_numbers(self.kind)}, got {item!r} in '
                          f'{value!r}')
      problem = self._range_problem(item)
      if problem:
        raise ConfigError(f'config.{name} values must be {problem}, got {item} in {value!r}')
    if self.unique and len(set(items)) != len(items):
      raise ConfigError(f'config.{name} values must be distinct, got {value!r}')
    return tuple(items)


# Constructors of the field kinds the configs use.

def Int(lo: Optional[int] = None, hi: Optional[int] = None,  # pylint: disable=invalid-name
        special: Mapping[int, str] = None, none: Optional[str] = None) -> Field:
  """An integer in ``[lo, hi]`` (or one of ``special``, e.g. ``{-1: "the preset's"}``; or None
  where ``none`` says what it means)."""
  return Field(int, lo=lo, hi=hi, special=tuple((special or {}).items()), none=none)


def Float(lo: Optional[float] = None, hi: Optional[float] = None,  # pylint: disable=invalid-name
          lo_open: bool = False, special: Mapping[float, str] = None,
          none: Optional[str] = None) -> Field:
  """A finite number in ``[lo, hi]`` (``(lo, hi]`` if ``lo_open``), or one of ``special``; or
  None where ``none`` says what it means."""
  return Field(float, lo=lo, hi=hi, lo_open=lo_open, special=tuple((special or {}).items()),
               none=none)


def Bool() -> Field:  # pylint: disable=invalid-name
  return Field(bool)


def _choices(choices):
  return choices if callable(choices) else tuple(choices)


def Choice(choices: Sequence[str]) -> Field:  # pylint: disable=invalid-name
  """One string of ``choices`` (or of what the function ``choices()`` returns)."""
  return Field(str, choices=_choices(choices))


def Str(what: str = 'a string') -> Field:  # pylint: disable=invalid-name
  """Any string (a path, ...); ``what`` describes it in messages."""
  return Field(str, what=what)


def Ints(lo: Optional[int] = None, min_len: int = 1,  # pylint: disable=invalid-name
         unique: bool = False) -> Field:
  """A sequence of at least ``min_len`` integers >= ``lo``."""
  return Field(int, lo=lo, sequence=True, min_len=min_len, unique=unique)


def Floats(lo: Optional[float] = None, hi: Optional[float] = None,  # pylint: disable=invalid-name
           unique: bool = False, min_len: int = 1) -> Field:
  """A sequence of at least ``min_len`` finite numbers in ``[lo, hi]``."""
  return Field(float, lo=lo, hi=hi, sequence=True, min_len=min_len, unique=unique)


def Names(choices: Sequence[str]) -> Field:  # pylint: disable=invalid-name
  """A non-empty sequence of distinct strings of ``choices`` (one string: a 1-tuple); a
  function ``choices()`` is called at each check."""
  return Field(str, choices=_choices(choices), sequence=True)


# A config's table: field -> Field, or section -> the section's table (``config.attack``).
Table = Mapping[str, Union[Field, Mapping[str, Any]]]


def field_paths(table: Table, prefix: str = '') -> List[str]:
  """Every field of ``table`` by its path (``'d'``, ``'attack.pgd_steps'``).

  >>> field_paths({'d': Int(), 'attack': {'strength': Str(), 'pgd_steps': Int()}})
  ['d', 'attack.strength', 'attack.pgd_steps']
  """
  out = []
  for name, field in table.items():
    if isinstance(field, Field):
      out.append(prefix + name)
    else:
      out += field_paths(field, f'{prefix}{name}.')
  return out


def check_config(config: Mapping[str, Any], table: Table, _prefix: str = '',
                 _root: Optional[Table] = None) -> None:
  """Checks ``config`` against ``table``: no unknown field, none missing, every value allowed.

  A section (a table as a field's entry) is checked field by field, its fields named by
  their path (``config.attack.pgd_steps``).

  Raises:
    ConfigError: naming the first offending field and what it may hold.
  """
  root = table if _root is None else _root
  for name in config:
    if name not in table:
      raise ConfigError(unknown_field_message(_prefix + name, field_paths(root)))
  for name, field in table.items():
    path = _prefix + name
    if name not in config:
      raise ConfigError(f'config.{path} is missing')
    if isinstance(field, Field):
      field.check(path, config[name])
    elif not hasattr(config[name], 'keys'):
      raise ConfigError(f'config.{path} is a section of fields ({", ".join(field)}): set '
                        f'them as --config.{path}.FIELD=VALUE, got {config[name]!r}')
    else:
      check_config(config[name], field, f'{path}.', root)


def unknown_field_message(name: str, known: Sequence[str]) -> str:
  """``config.<name> is not a field ...``, with the closest known fields (or all of them)."""
  close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
  if close:
    hint = 'did you mean ' + ' or '.join(f'config.{c}' for c in close) + '?'
  else:
    hint = 'the fields are ' + ', '.join(sorted(known))
  return f'config.{name} is not a field of this config; {hint}'


def _did_you_mean(value: Any, choices: Sequence[str]) -> str:
  close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
  return f' (did you mean {close[0]!r}?)' if close else ''


def _is_number(v: Any, kind: type) -> bool:
  if isinstance(v, bool):
    return False
  if kind is int:
    return isinstance(v, numbers.Integral)
  return isinstance(v, numbers.Real) and bool(np.isfinite(v))


def _a_number(kind: type) -> str:
  return 'an integer' if kind is int else 'a finite number'


def _numbers(kind: type) -> str:
  return 'integers' if kind is int else 'numbers'
