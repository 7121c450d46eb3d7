"""The library's public surface: the package docstring and every module's ``__all__``."""

import importlib
import os
import pkgutil
import re

import numpy as np
import pytest

import tsrobust

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def test_the_package_docstring_names_every_module_and_modules_declare_their_api():
  names = sorted(m.name for m in pkgutil.iter_modules(tsrobust.__path__))
  for name in names:
    assert f'``{name}``' in tsrobust.__doc__, name
    module = importlib.import_module(f'tsrobust.{name}')
    public = module.__all__
    assert public and all(hasattr(module, n) for n in public), name
    defined = [n for n, v in vars(module).items() if not n.startswith('_') and callable(v)
               and getattr(v, '__module__', None) == module.__name__]
    assert set(defined) <= set(public), (name, set(defined) - set(public))


def _python_blocks(path):
  with open(path) as f:
    return re.findall(r'```python\n(.*?)```', f.read(), re.S)


def test_the_manual_shows_the_readmes_example():
  readme = _python_blocks(os.path.join(ROOT, 'README.md'))
  assert len(readme) == 1
  assert _python_blocks(os.path.join(ROOT, 'docs', 'api.md')) == readme


@pytest.mark.slow
def test_the_readmes_library_example_trains_and_evaluates(capsys):
  """The README's example runs as written and shows what it says: specialization ~1 in S,
  not off it, and a high oracle error off S."""
  code = _python_blocks(os.path.join(ROOT, 'README.md'))[0]
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert out.startswith('spec_in') and 'oracle error off S' in out
  spec, errors = namespace['spec'], namespace['errors']
  assert np.all(np.asarray(spec['spec_in']) > 0.99)
  assert np.all(np.asarray(spec['spec_off']) < 0.7)
  assert np.all(np.asarray(errors[('oracle', 'off')]) > 0.5)
  assert np.asarray(namespace['losses']).shape == (2, 4)


def _documents():
  pages = sorted(f for f in os.listdir(os.path.join(ROOT, 'docs')) if f.endswith('.md'))
  return ['README.md'] + [f'docs/{p}' for p in pages]


def test_the_readme_is_a_short_guide_without_a_work_log():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  assert len(text.splitlines()) <= 200
  assert not re.search(r'\bUTC\b|\b20\d\d-\d\d-\d\d\b', text)  # no timestamps
  assert not re.search(r'\bcommit [0-9a-f]{7,40}\b', text)    # no commit hashes
  assert '<!-- test-command -->\n```bash\npip install -r requirements.txt -e ".[test]" && ' \
         'python -m pytest -q -n 2 --dist loadfile -m "slow or not slow"\n```' in text
  for name in ('LICENSE', 'CITATION.cff'):
    assert os.path.isfile(os.path.join(ROOT, name)), name


def test_every_relative_link_of_the_readme_and_the_manual_resolves():
  for rel in _documents():
    with open(os.path.join(ROOT, rel)) as f:
      text = f.read()
    for link in re.findall(r'\]\(([^)\s#]+)(?:#[^)]*)?\)', text):
      if not link.startswith(('http://', 'https://')):
        target = os.path.join(ROOT, os.path.dirname(rel), link)
        assert os.path.exists(target), (rel, link)
