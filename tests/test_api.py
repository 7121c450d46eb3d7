"""The library's public surface: the package docstring and every module's ``__all__``."""

import importlib
import pkgutil

import tsrobust


# Modules whose owner is changing them (issue 30, the attack ensemble): their __all__ is
# theirs to add. Every other public module declares its API.
_ALL_PENDING = {'attacks', 'evaluate', 'square'}


def test_the_package_docstring_names_every_module_and_modules_declare_their_api():
  names = sorted(m.name for m in pkgutil.iter_modules(tsrobust.__path__))
  for name in names:
    assert f'``{name}``' in tsrobust.__doc__, name
    module = importlib.import_module(f'tsrobust.{name}')
    if name in _ALL_PENDING:
      continue
    public = module.__all__
    assert public and all(hasattr(module, n) for n in public), name
    defined = [n for n, v in vars(module).items() if not n.startswith('_') and callable(v)
               and getattr(v, '__module__', None) == module.__name__]
    assert set(defined) <= set(public), (name, set(defined) - set(public))
