"""The reproduction report's text: ``REPORT.md``, its generated blocks and its header.

Pure functions over text, used by ``experiments/reproduce.py`` (which re-exports them):

- ``render_report``: ``REPORT.md`` from the studies' ``Outcome`` rows, every table of a
  study's ``summary.md`` wrapped in named ``<!-- BEGIN GENERATED: <name> -->`` / ``<!-- END
  GENERATED: <name> -->`` markers (``mark_tables``);
- the generated-block surgery of ``--update_readme``: reading the blocks of a text
  (``generated_blocks``), replacing them in README.md and the pages of ``docs/``
  (``replace_generated_blocks``), the figures a page links (``linked_figures``,
  ``docs_name``) and the preset a report was made with (``report_preset``);
- the report's header rows: date, git commit, library versions, machine (``header_rows``).
"""

import datetime
import os
import platform
import re
import subprocess
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from experiments import summaries
from tsrobust import io
from tsrobust import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = 'REPORT.md'


# ----------------------------------------------------------------------------
# Reports: pure functions over text.
# ----------------------------------------------------------------------------

BEGIN = '<!-- BEGIN GENERATED: {} -->'
END = '<!-- END GENERATED: {} -->'
_MARKER = re.compile(r'^\s*<!-- (BEGIN|END) GENERATED: (\S+) -->\s*$')
_NAME = re.compile(r'^[A-Za-z0-9_.-]+$')
_PRESET_LINE = re.compile(r'^<!-- reproduce: preset=(\w+)(?: studies=([\w,]+))? -->$', re.M)
# A summary.md line naming the table right below it (experiments/mechanism.py writes them).
_TABLE_NAME = re.compile(r'^<!-- table: ([A-Za-z0-9_.-]+) -->$')


def format_duration(seconds: float) -> str:
  """``42 s``, ``2 min 16 s``, ``1 h 05 min``."""
  s = int(round(seconds))
  if s < 60:
    return f'{s} s'
  if s < 3600:
    return f'{s // 60} min {s % 60} s'
  return f'{s // 3600} h {(s % 3600) // 60:02d} min'


def _table_kind(header: str, context: str) -> str:
  named = _TABLE_NAME.match(context.strip())
  if named:  # the summary names its table on the line above it
    return named.group(1)
  first = header.strip().strip('|').split('|')[0].strip()
  if first == 'group':
    return 'attack-checks'
  if first == 'variant':
    return 'wilson'
  if context.startswith(summaries.SUBSPACE_TABLE_TITLE):
    return 'subspaces'
  if first == 'robust accuracy':
    m = re.search(r'Correlation across students of `([^`]+)`', context)
    return f'correlation-{m.group(1)}' if m else 'correlation'
  return 'summary'


def mark_tables(study: str, markdown: str, heading_shift: int = 2) -> Tuple[str, List[str]]:
  """Wraps every table of a ``summary.md`` in named generated-block markers.

  A table is a run of lines starting with ``|``. Its name is ``<study>-<kind>``: the name
  given on the line right above it (``<!-- table: <kind> -->``), else ``summary``
  (the per-group means), ``attack-checks`` (first header cell ``group``), ``wilson``
  (``variant``), ``subspaces`` (the paragraph before it starts with
  ``summaries.SUBSPACE_TABLE_TITLE``), ``correlation-<x>`` (``robust accuracy``; ``x`` from the
  paragraph before it), with ``-2``, ``-3``... on repeats. Headings go ``heading_shift``
  levels down, to sit under the report's study heading. Returns the text and the names, in
  order.
  """
  out, names, context = [], [], ''
  lines = markdown.splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.startswith('|'):
      j = i
      while j < len(lines) and lines[j].startswith('|'):
        j += 1
      name = f'{study}-{_table_kind(line, context)}'
      if name in names:
        name += f'-{sum(n == name or n.startswith(name + "-") for n in names) + 1}'
      names.append(name)
      out += [BEGIN.format(name), *lines[i:j], END.format(name)]
      if _TABLE_NAME.match(context.strip()):  # a name is the next table's only
        context = ''
      i = j
      continue
    if line.startswith('#'):
      line = '#' * heading_shift + line
    if line.strip():
      context = line
    out.append(line)
    i += 1
  return '\n'.join(out) + '\n', names


def generated_blocks(text: str) -> Dict[str, str]:
  """The named generated blocks of ``text``: name -> the lines between its markers.

  Raises:
    ValueError: a marker left open, an END without its BEGIN, nested or repeated blocks,
      or a name other than letters, digits, ``_ . -``.
  """
  blocks, current, body = {}, None, []
  for number, line in enumerate(text.splitlines(keepends=True), 1):
    m = _MARKER.match(line)
    if not m:
      if current is not None:
        body.append(line)
      continue
    kind, name = m.groups()
    if not _NAME.match(name):
      raise ValueError(f'line {number}: generated block name {name!r} must be letters, '
                       f'digits, _ . -')
    if kind == 'BEGIN':
      if current is not None:
        raise ValueError(f'line {number}: BEGIN GENERATED: {name} inside block {current} '
                         f'(blocks do not nest; close it with END GENERATED: {current})')
      if name in blocks:
        raise ValueError(f'line {number}: generated block {name} appears twice')
      current, body = name, []
    else:
      if current != name:
        raise ValueError(f'line {number}: END GENERATED: {name} without its BEGIN'
                         + (f' (block {current} is open)' if current else ''))
      blocks[name] = ''.join(body)
      current = None
  if current is not None:
    raise ValueError(f'generated block {current} is not closed (no END GENERATED: {current})')
  return blocks


def replace_generated_blocks(text: str, blocks: Mapping[str, str]) -> str:
  """``text`` with the body of every generated block replaced by ``blocks[name]``.

  The markers and every line outside them are kept as they are.

  Raises:
    ValueError: ``text``'s markers are unbalanced (``generated_blocks``), or a block of
      ``text`` has no entry in ``blocks``.
  """
  names = list(generated_blocks(text))  # validates the markers
  missing = [n for n in names if n not in blocks]
  if missing:
    raise ValueError(f'no generated block for the marker(s) {missing} (the report has '
                     f'{sorted(blocks)})')
  out, inside = [], False
  for line in text.splitlines(keepends=True):
    m = _MARKER.match(line)
    if m and m.group(1) == 'BEGIN':
      out.append(line)
      body = blocks[m.group(2)]
      out.append(body if not body or body.endswith('\n') else body + '\n')
      inside = True
    elif m:
      out.append(line)
      inside = False
    elif not inside:
      out.append(line)
  return ''.join(out)


def report_preset(report: str) -> Optional[str]:
  """The preset a ``REPORT.md`` was made with (its ``<!-- reproduce: preset=... -->`` line)."""
  m = _PRESET_LINE.search(report)
  return m.group(1) if m else None


def report_studies(report: str) -> Optional[Tuple[str, ...]]:
  """The studies a ``REPORT.md`` of ``--studies=...`` was limited to; None: every study."""
  m = _PRESET_LINE.search(report)
  return tuple(m.group(2).split(',')) if m and m.group(2) else None


def _longest_prefix(text: str, prefixes: Sequence[str]) -> Optional[str]:
  owners = [p for p in prefixes if text.startswith(p)]
  return max(owners, key=len) if owners else None


def block_study(name: str, study_names: Sequence[str]) -> Optional[str]:
  """The study a generated block belongs to: the longest study name ``s`` with ``name``
  ``s-...`` (``mechanism_strong-claim5`` is ``mechanism_strong``'s); None: no study's."""
  owner = _longest_prefix(name, [s + '-' for s in study_names])
  return owner and owner[:-1]


def figure_study(figure: str, study_names: Sequence[str]) -> Optional[str]:
  """The study a ``docs/*.png`` comes from (``docs_name``): the longest study name it starts
  with; None: no study's."""
  return _longest_prefix(figure.rsplit('/', 1)[-1], study_names)


def linked_figures(markdown: str, in_docs: bool = False) -> List[str]:
  """The ``docs/*.png`` paths ``markdown`` links, in order, once each.

  README.md links ``docs/lowrank.png``; a page inside ``docs/`` (``in_docs``) links
  ``lowrank.png``, the same file.
  """
  if in_docs:
    found = ['docs/' + f for f in re.findall(r'\]\(([^)\s/]+\.png)\)', markdown)]
  else:
    found = re.findall(r'\]\((docs/[^)\s]+\.png)\)', markdown)
  return list(dict.fromkeys(found))


def docs_name(study: str, figure: str) -> str:
  """The name of a study's figure in ``docs/``: as is when it starts with the study's name
  (``lowrank.png``), else prefixed by it (``real_spec_vs_robust.png``)."""
  return figure if figure.startswith(study) else f'{study}_{figure}'


class Outcome(NamedTuple):
  """What happened to one study in a reproduce run (``render_report``'s input)."""
  name: str
  command: str
  status: str                 # ran | reused | skipped | failed
  detail: str                 # why skipped / failed, or when the reused run ran
  wall_s: Optional[float]     # the run's wall time (a reused one: its original run's)
  commit: Optional[str]       # the commit the results were made with, when known
  summary: Optional[str]      # the study's summary.md
  figures: Tuple[str, ...]    # .png files in the study's workdir
  verdicts: Optional[str] = None  # its setting's column of the verdict table (None: none)


def _study_section(o: Outcome, workdir_display: str) -> List[str]:
  lines = [f'## {o.name}', '', '```bash', o.command, '```', '']
  wall = '-' if o.wall_s is None else format_duration(o.wall_s)
  status = {'ran': f'ran in {wall}', 'reused': f'reused (finished results of the same '
            f'config; that run took {wall})', 'skipped': 'skipped', 'failed': 'failed'}[o.status]
  if o.detail:
    status += f': {o.detail}'
  lines += [f'Status: {status}. Log: [{o.name}.log]({o.name}.log).', '']
  if o.summary is not None:
    source = (f'<sub>Generated by `python -m experiments.reproduce` into '
              f'`{workdir_display}/{REPORT}`, study `{o.name}`'
              + (f', commit {o.commit[:12]}' if o.commit else '') + '.</sub>')
    marked, _ = mark_tables(o.name, o.summary)
    # Each block ends with where it came from (a blank line first: it is not a table row).
    marked = re.sub(r'\n(<!-- END GENERATED: \S+ -->)', lambda m: f'\n\n{source}\n{m.group(1)}',
                    marked)
    lines += [f'### Tables (`{o.name}/summary.md`)', '', marked.rstrip('\n'), '']
  if o.verdicts is not None:
    name = f'{o.name}-verdicts'
    lines += [f'### Verdicts of `{o.name}` (rules: `docs/verdicts.md`)', '',
              BEGIN.format(name), o.verdicts.rstrip('\n'), '',
              f'<sub>`python -m experiments.verdicts` on `{workdir_display}/{o.name}`'
              + (f', commit {o.commit[:12]}' if o.commit else '') + '.</sub>',
              END.format(name), '']
  if o.figures:
    lines += ['### Figures', '']
    for fig in o.figures:
      lines += [f'`{o.name}/{fig}` (docs: `docs/{docs_name(o.name, fig)}`)', '',
                f'![{o.name} {fig}]({o.name}/{fig})', '']
  return lines


def render_report(preset: str, header: Mapping[str, str], outcomes: Sequence[Outcome],
                  workdir_display: str, studies: Optional[Sequence[str]] = None,
                  verdicts: Optional[str] = None) -> str:
  """The text of ``REPORT.md``: header rows, a table of the studies, the claims' verdicts,
  a section per study.

  ``studies``: the names a ``--studies=...`` run was limited to (None: every study); the
  report says so on its preset line, and ``--update_readme`` then updates their blocks only.
  ``verdicts``: the "Verdicts" section's markdown (None: no section).
  """
  only = f' studies={",".join(studies)}' if studies else ''
  flag = f' --studies={",".join(studies)}' if studies else ''
  lines = ['# Reproduction report', '', f'<!-- reproduce: preset={preset}{only} -->', '',
           f'Written by `python -m experiments.reproduce --workdir={workdir_display} '
           f'--preset={preset}{flag}`. ' + ('`quick`: tiny configs that show the whole pipeline; '
                                      'the numbers are not the manual\'s.' if preset == 'quick'
                                      else '`full`: the binaries\' default configs, the '
                                      'manual\'s numbers.' if preset == 'full' else
                                      '`paper`: the binaries\' default configs and the image '
                                      'studies with 8 teachers, whose results the verdicts '
                                      'read.'), '',
           '| | |', '|---|---|']
  lines += [f'| {k} | {v} |' for k, v in header.items()]
  lines += ['', '| study | status | wall time |', '|---|---|---|']
  for o in outcomes:
    wall = '-' if o.wall_s is None or o.status == 'skipped' else format_duration(o.wall_s)
    lines.append(f'| [{o.name}](#{o.name}) | {o.status} | {wall} |')
  lines.append('')
  if verdicts is not None:
    lines += ['## Verdicts', '', verdicts.rstrip('\n'), '']
  for o in outcomes:
    lines += _study_section(o, workdir_display)
  return '\n'.join(lines).rstrip('\n') + '\n'


# ----------------------------------------------------------------------------
# The machine, the checkout.
# ----------------------------------------------------------------------------

def git_commit(root: str = ROOT) -> Tuple[Optional[str], Optional[bool]]:
  """``(commit, dirty)`` of the checkout at ``root`` (dirty: tracked files changed);
  ``(None, None)`` outside a git checkout."""
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()
    status = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                            cwd=root, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None, None
  return commit, bool(status.strip())


def header_rows(root: str = ROOT) -> Dict[str, str]:
  """Date, commit, versions and machine of a report."""
  import jax  # pylint: disable=g-import-not-at-top
  sweep.use_all_cpu_cores()  # the devices the binaries use (--cpu_devices=0)
  commit, dirty = git_commit(root)
  v = io.library_versions()
  devices = jax.devices()
  load = os.getloadavg() if hasattr(os, 'getloadavg') else None
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      'git commit': ('unknown (not a git checkout)' if commit is None else
                     f'{commit}' + (' (dirty: tracked files changed)' if dirty else ' (clean)')),
      'versions': ', '.join(f'{k} {v[k]}' for k in
                            ('python', 'jax', 'jaxlib', 'flax', 'optax', 'numpy')),
      'machine': f'{sweep.cpu_cores()} cores, {io.cpu_model()}, {platform.system()} '
                 f'{platform.release()}',
      'JAX devices': f'{len(devices)} x {devices[0].platform} ({devices[0].device_kind})',
      'load average (1, 5, 15 min) at the end': ('-' if load is None else
                                                 ', '.join(f'{x:.1f}' for x in load)),
  }
