"""tsrobust: robustness in the teacher-student setting, in JAX.

Modules (each importable on its own): ``models``, ``data``,
``specialization``, ``attacks``, ``train``, ``metrics``, ``io``, ``plotting``.
"""

__version__ = '0.1.0'
