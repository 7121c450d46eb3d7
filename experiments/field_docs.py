"""The config fields' lines of ``--help``: each field's value, what it may hold, its meaning.

A field's meaning is the comment beside its default in ``experiments/configs/*.py`` (read
from the source with ``ast`` and ``tokenize``: one schema, read where it is written); what
it may hold is the binary's ``validation`` table. ``experiments/cli.py`` builds ``--help``
from ``config_help`` and re-exports ``field_meanings`` and ``config_help``.
"""

import ast
import os
import re
import textwrap
from typing import Any, Dict, Mapping

import ml_collections

from experiments import validation


def _comments(source: str) -> Dict[int, tuple]:
  """Line number (1-based) -> ``(comment text, whether the line holds code before it)``."""
  import io as io_lib  # pylint: disable=g-import-not-at-top
  import tokenize  # pylint: disable=g-import-not-at-top
  out = {}
  code_lines = set()
  for tok in tokenize.generate_tokens(io_lib.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      out[tok.start[0]] = (tok.string.lstrip('#').strip(), tok.start[0] in code_lines)
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENCODING, tokenize.ENDMARKER):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  return out


def _comment_of(comments: Mapping[int, tuple], lineno: int, end_lineno: int) -> str:
  """The comment documenting the assignment on lines ``lineno..end_lineno`` (1-based).

  Its trailing comment (``c.x = 1  # meaning``), else the comment lines directly above it
  (no blank line between), joined; ``''`` when there is neither.
  """
  text, after_code = comments.get(end_lineno, ('', False))
  if after_code:
    return text
  block = []
  i = lineno - 1
  while i in comments and not comments[i][1]:
    block.insert(0, comments[i][0])
    i -= 1
  return ' '.join(block)


def _first_sentence(text: str) -> str:
  """``text`` up to the end of its first sentence (a period followed by a space)."""
  m = re.search(r'(?<!\be\.g)(?<!\bi\.e)(?<!\bcf)(?<!\bvs)(?<!\bal)\.\s', text)
  return text[:m.start() + 1] if m else text


def _config_module_path(module: str, root: str) -> str:
  return os.path.join(root, *module.split('.')) + '.py'


def field_meanings(config_file: str) -> Dict[str, str]:
  """Field -> its one-line meaning, read from the config file's comments.

  A field's meaning is the comment beside its default in the file that first sets it
  (``c.FIELD = value  # meaning``, or the comment lines right above the assignment, cut
  at the end of their first sentence): ``config_file`` first, then the config modules it
  imports (``from experiments.configs import attacks``), depth first. The config files
  are the one place a field's default and meaning are written (``--help`` shows both).
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  meanings: Dict[str, str] = {}
  seen = set()

  def visit(path: str) -> None:
    if path in seen or not os.path.isfile(path):
      return
    seen.add(path)
    with open(path) as f:
      source = f.read()
    comments = _comments(source)
    tree = ast.parse(source)
    imported = []
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == 'experiments.configs':
        imported += [_config_module_path(f'experiments.configs.{a.name}', root)
                     for a in node.names]
    assigns = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Assign)),
                     key=lambda n: n.lineno)
    for node in assigns:  # the first assignment of a field documents it (a preset's later)
      for target in node.targets:
        if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
            and target.attr not in meanings):
          meanings[target.attr] = _first_sentence(_comment_of(comments, node.lineno,
                                                              node.end_lineno))
    for path_ in imported:
      visit(path_)

  visit(os.path.abspath(config_file.split(':', 1)[0]))
  return meanings


def _value_text(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    inner = ', '.join(_value_text(v) for v in value)
    return f'({inner},)' if len(value) == 1 else f'({inner})'
  return repr(value)


def config_help(config: ml_collections.ConfigDict, config_file: str,
                fields: Mapping[str, validation.Field], width: int = 100) -> str:
  """The config section of ``--help``: every field, its value, what it may hold, its meaning."""
  meanings = field_meanings(config_file)
  out = []

  def add(section, table, prefix):
    # The fields in the order the config file sets them (ConfigDict.keys() sorts them).
    for name in list(getattr(section, '_fields', None) or section.keys()):
      value, field = section[name], table.get(name)
      if hasattr(value, 'keys'):  # a section (config.attack): its fields, by their path
        add(value, field if isinstance(field, Mapping) else {}, f'{prefix}{name}.')
        continue
      body = meanings.get(name, '')
      if isinstance(field, validation.Field):
        body = (body + ' ' if body else '') + f'[{field.describe()}]'
      out.append(f'  --config.{prefix}{name}={_value_text(value)}')
      out.extend(textwrap.wrap(body, width, initial_indent=' ' * 6, subsequent_indent=' ' * 6))
  add(config, fields, '')
  return '\n'.join(out)
